//! NIP-86 management API through the real cluster: NIP-98 authorization, every method, its
//! effect on every gateway, and bans surviving restarts and a lost Redis snapshot.

use std::net::SocketAddr;
use std::time::Duration;

use relay_tests::{Client, Cluster, ClusterOptions, eventually};
use serde_json::{Value, json};
use shared::event::signing::Keys;
use shared::event::{Event, Kind};
use shared::nip98;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{note, now};

/// How long a change may take to reach every gateway.
const PROPAGATION: Duration = Duration::from_secs(3);

/// Sends one HTTP/1.1 request and returns the status code and body.
async fn http(addr: SocketAddr, request: String) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(15),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("response in time")
    .expect("read");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// POSTs `body` as a management request with the given `Authorization` header.
async fn post(addr: SocketAddr, body: &str, authorization: Option<String>) -> (u16, Value) {
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/nostr+json+rpc\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (status, text) = http(addr, request).await;
    let value = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, value)
}

/// A management call signed by `keys` (NIP-98, `u` = the relay's public URL as HTTP): how
/// a client signs.
async fn call(addr: SocketAddr, keys: &Keys, method: &str, params: Value) -> (u16, Value) {
    let body = json!({"method": method, "params": params}).to_string();
    let url = nip98::http_url(relay_tests::PUBLIC_URL);
    let authorization = nip98::authorization(keys, &url, "POST", body.as_bytes(), now());
    post(addr, &body, Some(authorization)).await
}

/// A call that must succeed; returns its result.
async fn ok(addr: SocketAddr, keys: &Keys, method: &str, params: Value) -> Value {
    let (status, answer) = call(addr, keys, method, params).await;
    assert_eq!(status, 200, "{method}: {answer}");
    assert!(answer.get("error").is_none(), "{method}: {answer}");
    answer["result"].clone()
}

/// Publishes fresh events from `keys` of `kind` until one gets the wanted answer:
/// accepted, or refused with a `blocked:` message.
async fn until_publish(client: &mut Client, keys: &Keys, kind: Kind, accepted: bool, what: &str) {
    let mut n = 0;
    let deadline = tokio::time::Instant::now() + PROPAGATION;
    loop {
        n += 1;
        let ev = keys.sign(now(), kind, vec![], format!("{what} #{n}"));
        let ack = client.publish(&ev).await;
        let wanted = if accepted {
            ack.accepted
        } else {
            !ack.accepted && ack.message.starts_with("blocked:")
        };
        if wanted {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: last answer {ack:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The status of a WebSocket upgrade request.
async fn upgrade_status(addr: SocketAddr) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("answer in time")
        .expect("read");
    String::from_utf8_lossy(&buf[..n])
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn nip11(addr: SocketAddr) -> Value {
    let (_, body) = http(
        addr,
        format!(
            "GET / HTTP/1.1\r\nHost: {addr}\r\nAccept: application/nostr+json\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    serde_json::from_str(&body).expect("NIP-11 JSON")
}

async fn cluster(admin: &Keys) -> Cluster {
    Cluster::start(ClusterOptions {
        gateways: 2,
        ingest_workers: 2,
        query_workers: 1,
        env: vec![("RELAY_ADMIN_PUBKEYS".into(), admin.pubkey().to_hex())],
    })
    .await
    .expect("cluster starts")
}

async fn ids_on(client: &mut Client, id: &Event) -> usize {
    client
        .req("ids", &[json!({"ids": [id.id.to_hex()]})])
        .await
        .len()
}

#[tokio::test]
async fn unauthorized_requests_and_strangers_get_401() {
    let admin = Keys::generate();
    let cluster = cluster(&admin).await;
    let addr = cluster.gateways[0].addr;
    let body = json!({"method": "supportedmethods", "params": []}).to_string();
    let url = nip98::http_url(relay_tests::PUBLIC_URL);
    let t = now();
    let cases = [
        ("no header", None),
        (
            // The address the request was sent to (its Host) is not the relay's URL.
            "u of the Host header",
            Some(nip98::authorization(
                &admin,
                &format!("http://{addr}/"),
                "POST",
                body.as_bytes(),
                t,
            )),
        ),
        (
            "wrong u",
            Some(nip98::authorization(
                &admin,
                "http://example.com/",
                "POST",
                body.as_bytes(),
                t,
            )),
        ),
        (
            "wrong method",
            Some(nip98::authorization(
                &admin,
                &url,
                "GET",
                body.as_bytes(),
                t,
            )),
        ),
        (
            "wrong payload",
            Some(nip98::authorization(&admin, &url, "POST", b"{}", t)),
        ),
        (
            "stale",
            Some(nip98::authorization(
                &admin,
                &url,
                "POST",
                body.as_bytes(),
                t - 120,
            )),
        ),
        ("not base64", Some("Nostr !!!".to_owned())),
    ];
    for (what, authorization) in cases {
        let (status, answer) = post(addr, &body, authorization).await;
        assert_eq!(status, 401, "{what}: {answer}");
        assert!(answer["error"].is_string(), "{what}: {answer}");
    }
    // A valid signature by a key that is not an admin is no authorization either (NIP-86).
    let (status, answer) = call(addr, &Keys::generate(), "supportedmethods", json!([])).await;
    assert_eq!(status, 401, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("may not manage")),
        "{answer}"
    );
    // A forged signature: the admin's pubkey on another key's event.
    let mut forged_event = Keys::generate().sign(
        t,
        nip98::HTTP_AUTH_KIND,
        vec![
            vec!["u".into(), url.clone()],
            vec!["method".into(), "POST".into()],
            vec!["payload".into(), nip98::payload_hash(body.as_bytes())],
        ],
        "",
    );
    forged_event.pubkey = admin.pubkey();
    let forged = format!("Nostr {}", base64_encode(forged_event.to_json().as_bytes()));
    let (status, _) = post(addr, &body, Some(forged)).await;
    assert_eq!(status, 401, "forged signature");
    // The admin gets through.
    let methods = ok(addr, &admin, "supportedmethods", json!([])).await;
    let methods = methods.as_array().cloned().unwrap_or_default();
    assert!(methods.len() >= 18, "{methods:?}");
    assert!(methods.contains(&json!("banpubkey")), "{methods:?}");
    assert!(
        !methods.contains(&json!("supportedmethods")),
        "the other methods only: {methods:?}"
    );
    // An authorization works once: a replay within its time window is refused.
    let signed = nip98::authorization(&admin, &url, "POST", body.as_bytes(), now());
    let (status, answer) = post(addr, &body, Some(signed.clone())).await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = post(addr, &body, Some(signed)).await;
    assert_eq!(status, 401, "replayed: {answer}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("used already")),
        "{answer}"
    );
}

#[tokio::test]
async fn without_a_public_url_auth_and_management_are_refused() {
    let admin = Keys::generate();
    let options = ClusterOptions::with_env(&[
        ("RELAY_PUBLIC_URL", ""),
        ("RELAY_ADMIN_PUBKEYS", &admin.pubkey().to_hex()),
    ]);
    let cluster = Cluster::start(options).await.expect("cluster starts");
    let addr = cluster.gateways[0].addr;
    // Signed for the address the request goes to: once accepted, now refused.
    let body = json!({"method": "supportedmethods", "params": []}).to_string();
    let signed = nip98::authorization(
        &admin,
        &format!("http://{addr}/"),
        "POST",
        body.as_bytes(),
        now(),
    );
    let (status, answer) = post(addr, &body, Some(signed)).await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("RELAY_PUBLIC_URL")),
        "{answer}"
    );
    assert!(
        cluster
            .log("gateway-0")
            .contains("RELAY_PUBLIC_URL is not set"),
        "the operator is told"
    );
    // No AUTH challenge is offered, and an AUTH naming the Host is refused.
    let (mut ws, _) = tokio_tungstenite::connect_async(cluster.url())
        .await
        .expect("connects");
    let keys = Keys::generate();
    let auth = keys.sign(
        now(),
        shared::event::Kind(22242),
        vec![
            vec!["relay".into(), cluster.url()],
            vec!["challenge".into(), "anything".into()],
        ],
        "",
    );
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::text(format!(
        "[\"AUTH\",{}]",
        auth.to_json()
    )))
    .await
    .expect("sends");
    let first = tokio::time::timeout(relay_tests::WAIT, ws.next())
        .await
        .expect("an answer")
        .expect("open")
        .expect("a frame");
    let text = first.into_text().expect("text").to_string();
    assert!(
        text.starts_with("[\"OK\"") && text.contains("\"restricted:"),
        "no challenge first, then the refusal: {text}"
    );
}

/// Standard base64, written out so the test needs no extra crate.
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test]
async fn every_method_takes_effect_on_every_gateway_and_survives_restarts() {
    let admin = Keys::generate();
    let mut cluster = cluster(&admin).await;
    let g0 = cluster.gateways[0].addr;
    let g1 = cluster.gateways[1].addr;
    let mut c1 = cluster.client(1).await;
    let alice = Keys::generate();
    let mallory = Keys::generate();

    // Ban and unban a pubkey: changed on gateway 0, enforced on gateway 1.
    assert!(c1.publish(&note(&mallory, now(), "before")).await.accepted);
    let mal = mallory.pubkey().to_hex();
    assert_eq!(
        ok(g0, &admin, "banpubkey", json!([mal, "spam"])).await,
        json!(true)
    );
    until_publish(&mut c1, &mallory, Kind(1), false, "banned pubkey refused").await;
    assert_eq!(
        ok(g1, &admin, "listbannedpubkeys", json!([])).await,
        json!([{"pubkey": mal, "reason": "spam"}])
    );
    ok(g0, &admin, "unbanpubkey", json!([mal])).await;
    until_publish(&mut c1, &mallory, Kind(1), true, "unbanned pubkey accepted").await;
    assert_eq!(
        ok(g1, &admin, "listbannedpubkeys", json!([])).await,
        json!([])
    );

    // Allowed pubkeys.
    ok(
        g0,
        &admin,
        "allowpubkey",
        json!([alice.pubkey().to_hex(), "friend"]),
    )
    .await;
    until_publish(&mut c1, &mallory, Kind(1), false, "only allowed pubkeys").await;
    assert!(c1.publish(&note(&alice, now(), "allowed")).await.accepted);
    // NIP-62: a pubkey that may not post can still vanish.
    let all_relays = vec![vec!["relay".to_owned(), "ALL_RELAYS".to_owned()]];
    let vanish = Keys::generate().sign(now(), Kind(62), all_relays, "");
    let ack = c1.publish(&vanish).await;
    assert!(
        ack.accepted,
        "a request to vanish from a pubkey not allowed: {ack:?}"
    );
    // NIP-11: a pubkey allow list restricts writes.
    assert_eq!(nip11(g1).await["limitation"]["restricted_writes"], true);
    assert_eq!(
        ok(g1, &admin, "listallowedpubkeys", json!([])).await,
        json!([{"pubkey": alice.pubkey().to_hex(), "reason": "friend"}])
    );
    ok(
        g0,
        &admin,
        "unallowpubkey",
        json!([alice.pubkey().to_hex()]),
    )
    .await;
    until_publish(&mut c1, &mallory, Kind(1), true, "allow list emptied").await;
    assert_eq!(nip11(g1).await["limitation"]["restricted_writes"], false);

    // Allowed kinds.
    ok(g0, &admin, "allowkind", json!([1])).await;
    until_publish(&mut c1, &alice, Kind(7), false, "kind 7 not allowed").await;
    assert!(c1.publish(&note(&alice, now(), "kind 1")).await.accepted);
    assert_eq!(
        ok(g1, &admin, "listallowedkinds", json!([])).await,
        json!([1])
    );
    ok(g0, &admin, "disallowkind", json!([1])).await;
    until_publish(&mut c1, &alice, Kind(7), true, "every kind allowed again").await;
    assert_eq!(
        ok(g1, &admin, "listallowedkinds", json!([])).await,
        json!([])
    );

    // Ban an event: deleted, and refused when published again, everywhere.
    let bad = note(&alice, now(), "to be banned");
    assert!(c1.publish(&bad).await.accepted);
    assert_eq!(ids_on(&mut c1, &bad).await, 1);
    ok(g0, &admin, "banevent", json!([bad.id.to_hex(), "illegal"])).await;
    assert_eq!(ids_on(&mut c1, &bad).await, 0, "banned event deleted");
    let ack = c1.publish(&bad).await;
    assert!(
        !ack.accepted && ack.message.starts_with("blocked:"),
        "{ack:?}"
    );
    assert_eq!(
        ok(g1, &admin, "listbannedevents", json!([])).await,
        json!([{"id": bad.id.to_hex(), "reason": "illegal"}])
    );
    assert_eq!(
        ok(g1, &admin, "listeventsneedingmoderation", json!([])).await,
        json!([])
    );
    ok(g0, &admin, "allowevent", json!([bad.id.to_hex()])).await;
    let mut c0 = cluster.client(0).await;
    let deadline = tokio::time::Instant::now() + PROPAGATION;
    while !c0.publish(&bad).await.accepted {
        assert!(
            tokio::time::Instant::now() < deadline,
            "allowed event accepted again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        ok(g1, &admin, "listbannedevents", json!([])).await,
        json!([])
    );

    // Relay information.
    ok(g0, &admin, "changerelayname", json!(["managed relay"])).await;
    ok(
        g0,
        &admin,
        "changerelaydescription",
        json!(["set over NIP-86"]),
    )
    .await;
    ok(
        g0,
        &admin,
        "changerelayicon",
        json!(["https://example.com/i.png"]),
    )
    .await;
    for addr in [g0, g1] {
        eventually(PROPAGATION, "NIP-11 shows the new name", || async move {
            let doc = nip11(addr).await;
            doc["name"] == "managed relay"
                && doc["description"] == "set over NIP-86"
                && doc["icon"] == "https://example.com/i.png"
        })
        .await;
    }

    // Block the test's own address: upgrades refused, open connections closed; then unblock
    // (the management API itself stays reachable).
    ok(g0, &admin, "blockip", json!(["127.0.0.1", "abuse"])).await;
    for addr in [g0, g1] {
        eventually(PROPAGATION, "upgrade refused", || async move {
            upgrade_status(addr).await == 403
        })
        .await;
    }
    // Whatever was queued before arrives first, then the close.
    let closed = async { while c1.recv_text_within(PROPAGATION).await.is_some() {} };
    tokio::time::timeout(PROPAGATION * 2, closed)
        .await
        .expect("open connection from a blocked address closed");
    assert_eq!(
        ok(g1, &admin, "listblockedips", json!([])).await,
        json!([{"ip": "127.0.0.1", "reason": "abuse"}])
    );
    ok(g0, &admin, "unblockip", json!(["127.0.0.1"])).await;
    for addr in [g0, g1] {
        eventually(PROPAGATION, "upgrade allowed", || async move {
            upgrade_status(addr).await == 101
        })
        .await;
    }

    // Bans survive restarting every worker and gateway.
    ok(g0, &admin, "banpubkey", json!([mal, "again"])).await;
    for gateway in &mut cluster.gateways {
        let _ = gateway.child.kill().await;
    }
    for worker in &mut cluster.workers {
        let _ = worker.kill().await;
    }
    for i in 0..2 {
        let w = cluster
            .spawn_worker("ingest-worker", 10 + i)
            .await
            .expect("ingest worker");
        cluster.workers.push(w);
    }
    let w = cluster
        .spawn_worker("query-worker", 10)
        .await
        .expect("query worker");
    cluster.workers.push(w);
    let g2 = cluster.add_gateway().await.expect("gateway");
    let mut c2 = cluster.client(g2).await;
    until_publish(&mut c2, &mallory, Kind(1), false, "ban after restart").await;
    let g2_addr = cluster.gateways[g2].addr;
    assert_eq!(
        ok(g2_addr, &admin, "listbannedpubkeys", json!([])).await,
        json!([{"pubkey": mal, "reason": "again"}])
    );
    assert_eq!(nip11(g2_addr).await["name"], "managed relay");

    // A lost snapshot (Redis flushed) is rebuilt from Postgres by the next worker start.
    let redis = redis::Client::open(cluster.services.redis_url.as_str()).expect("redis url");
    let mut conn = redis
        .get_multiplexed_async_connection()
        .await
        .expect("redis connects");
    let key = format!("{}:moderation", cluster.prefix);
    let () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("DEL");
    let first_ingest = cluster.workers.len() - 3;
    let _ = cluster.workers[first_ingest].kill().await;
    let w = cluster
        .spawn_worker("ingest-worker", 20)
        .await
        .expect("ingest worker");
    cluster.workers.push(w);
    eventually(PROPAGATION, "snapshot rebuilt", || {
        let mut conn = conn.clone();
        let key = key.clone();
        async move {
            let exists: i64 = redis::cmd("EXISTS")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap_or(0);
            exists == 1
        }
    })
    .await;
    let g3 = cluster.add_gateway().await.expect("gateway");
    let mut c3 = cluster.client(g3).await;
    until_publish(
        &mut c3,
        &mallory,
        Kind(1),
        false,
        "ban after a lost snapshot",
    )
    .await;
    assert!(
        c3.publish(&note(&alice, now(), "still fine"))
            .await
            .accepted
    );
}
