//! Relay NIPs and policy through the whole cluster: NIP-09, 11, 13, 40, 42, 45, 50, 62, 70,
//! limits and rate limits. Each rule is also tested where it must not fire.

use std::time::Duration;

use relay_tests::{Ack, Client, Cluster, ClusterOptions};
use serde_json::{Value, json};
use shared::event::signing::Keys;
use shared::event::{Event, Kind};
use shared::message::RelayMessage;

use crate::{note, now};

fn tag(name: &str, value: &str) -> Vec<String> {
    vec![name.to_owned(), value.to_owned()]
}

fn refused(ack: &Ack, prefix: &str) -> bool {
    !ack.accepted && ack.message.starts_with(prefix)
}

#[tokio::test]
async fn nip09_deletion_by_e_and_a_tags() {
    let cluster = Cluster::default_cluster().await;
    let mut c = cluster.client(0).await;
    let alice = Keys::generate();
    let mallory = Keys::generate();
    let t = now() - 100;
    let mine = note(&alice, t, "mine");
    let keep = note(&alice, t, "keep");
    let theirs = note(&mallory, t, "not alice's");
    for ev in [&mine, &keep, &theirs] {
        assert!(c.publish(ev).await.accepted);
    }
    let deletion = alice.sign(
        t + 1,
        Kind(5),
        vec![
            tag("e", &mine.id.to_hex()),
            tag("e", &theirs.id.to_hex()),
            tag("k", "1"),
        ],
        "oops",
    );
    assert!(c.publish(&deletion).await.accepted);
    let ids = |evs: &[Event]| evs.iter().map(|e| e.content.clone()).collect::<Vec<_>>();
    let got = c
        .req(
            "a",
            &[json!({"ids": [mine.id.to_hex(), keep.id.to_hex(), theirs.id.to_hex()]})],
        )
        .await;
    let mut got = ids(&got);
    got.sort();
    assert_eq!(
        got,
        vec!["keep", "not alice's"],
        "only the author's own event is deleted"
    );
    // The deletion request itself is served, and the deleted event cannot come back.
    assert_eq!(
        c.req("b", &[json!({"kinds": [5]})]).await,
        vec![deletion.clone()]
    );
    assert!(refused(&c.publish(&mine).await, "blocked:"));
    // Alice's request named Mallory's event first; Mallory's own request still sticks.
    let own = mallory.sign(t + 3, Kind(5), vec![tag("e", &theirs.id.to_hex())], "");
    assert!(c.publish(&own).await.accepted);
    assert!(
        c.req("theirs", &[json!({"ids": [theirs.id.to_hex()]})])
            .await
            .is_empty()
    );
    assert!(refused(&c.publish(&theirs).await, "blocked:"));
    // Deleting a deletion request has no effect.
    let undo = alice.sign(t + 2, Kind(5), vec![tag("e", &deletion.id.to_hex())], "");
    assert!(c.publish(&undo).await.accepted);
    assert_eq!(
        c.req("c", &[json!({"ids": [deletion.id.to_hex()]})])
            .await
            .len(),
        1
    );

    // `a` tag: every version up to the deletion's created_at is hidden; a later one is fine.
    let d = tag("d", "post");
    let v1 = alice.sign(t, Kind(30023), vec![d.clone()], "v1");
    assert!(c.publish(&v1).await.accepted);
    let address = format!("30023:{}:post", alice.pubkey().to_hex());
    let del_a = alice.sign(t + 10, Kind(5), vec![tag("a", &address)], "");
    assert!(c.publish(&del_a).await.accepted);
    let addr_filter = json!({"kinds": [30023], "authors": [alice.pubkey().to_hex()]});
    assert!(
        c.req("d", std::slice::from_ref(&addr_filter))
            .await
            .is_empty()
    );
    let v2 = alice.sign(
        t + 5,
        Kind(30023),
        vec![d.clone()],
        "v2, older than the deletion",
    );
    assert!(refused(&c.publish(&v2).await, "blocked:"));
    let v3 = alice.sign(t + 20, Kind(30023), vec![d], "v3, newer");
    assert!(c.publish(&v3).await.accepted);
    assert_eq!(c.req("e", &[addr_filter]).await, vec![v3]);
    // Someone else cannot delete alice's address.
    let other_a = mallory.sign(t + 30, Kind(5), vec![tag("a", &address)], "");
    assert!(c.publish(&other_a).await.accepted);
    assert_eq!(c.req("f", &[json!({"kinds": [30023]})]).await.len(), 1);

    // A deleted event's tag rows went with it: only v3's `d` tag is left of the three
    // versions', and no tag row lost its event.
    let db = cluster.db().await;
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE t.name = 'd'), \
                    count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.seq = t.event_seq)) \
             FROM tags t",
            &[],
        )
        .await
        .expect("query");
    let (d_tags, orphans): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(
        (d_tags, orphans),
        (1, 0),
        "tag rows of deleted events are gone"
    );
}

#[tokio::test]
async fn nip11_document_shows_the_enforced_limits() {
    let cluster = Cluster::start(ClusterOptions::with_env(&[
        ("RELAY_NAME", "test relay"),
        ("RELAY_DESCRIPTION", "for tests"),
        ("RELAY_PUBKEY", &"a".repeat(64)),
        ("RELAY_CONTACT", "mailto:ops@example.com"),
        ("RELAY_ICON", "https://example.com/icon.png"),
        ("RELAY_MAX_SUBSCRIPTIONS", "7"),
        ("RELAY_MAX_LIMIT", "123"),
        ("RELAY_MIN_POW_DIFFICULTY", "4"),
        ("RELAY_CREATED_AT_LOWER_LIMIT", "86400"),
    ]))
    .await
    .expect("cluster");
    let doc = nip11(&cluster).await;
    assert_eq!(doc["name"], "test relay");
    assert_eq!(doc["description"], "for tests");
    assert_eq!(doc["pubkey"], "a".repeat(64));
    assert_eq!(doc["contact"], "mailto:ops@example.com");
    assert_eq!(doc["icon"], "https://example.com/icon.png");
    assert!(
        doc["software"]
            .as_str()
            .is_some_and(|s| s.starts_with("https://"))
    );
    assert!(doc["version"].is_string());
    assert_eq!(
        doc["supported_nips"],
        json!([1, 9, 11, 13, 40, 42, 45, 50, 62, 70, 77, 86])
    );
    let l = &doc["limitation"];
    assert_eq!(l["max_subscriptions"], 7);
    assert_eq!(l["max_limit"], 123);
    assert_eq!(l["min_pow_difficulty"], 4);
    assert_eq!(l["restricted_writes"], true);
    assert_eq!(l["created_at_lower_limit"], 86400);
    assert_eq!(l["max_subid_length"], 64);
    for key in [
        "max_message_length",
        "max_event_tags",
        "max_content_length",
        "default_limit",
        "created_at_upper_limit",
    ] {
        assert!(l[key].is_u64(), "{key} is advertised");
    }
}

async fn nip11(cluster: &Cluster) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = cluster.gateways[0].addr;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nAccept: application/nostr+json\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("");
    serde_json::from_str(body).expect("NIP-11 JSON")
}

/// Signs kind-1 notes with a rising nonce until the id has `bits` leading zero bits.
fn mine(keys: &Keys, bits: u32) -> Event {
    for nonce in 0u64.. {
        let ev = keys.sign(
            now(),
            Kind(1),
            vec![vec!["nonce".into(), nonce.to_string(), bits.to_string()]],
            "mined",
        );
        if ev.pow_difficulty() >= bits {
            return ev;
        }
    }
    unreachable!("the nonce space is not exhausted")
}

#[tokio::test]
async fn nip13_minimum_proof_of_work() {
    let cluster = Cluster::start(ClusterOptions::with_env(&[(
        "RELAY_MIN_POW_DIFFICULTY",
        "8",
    )]))
    .await
    .expect("cluster");
    let mut c = cluster.client(0).await;
    let keys = Keys::generate();
    let weak = loop {
        let ev = note(&keys, now(), "weak");
        if ev.pow_difficulty() < 8 {
            break ev;
        }
    };
    let ack = c.publish(&weak).await;
    assert!(refused(&ack, "pow:"), "{ack:?}");
    assert!(c.publish(&mine(&keys, 8)).await.accepted);
}

#[tokio::test]
async fn nip40_expiration() {
    let cluster = Cluster::start(ClusterOptions::with_env(&[(
        "RELAY_EXPIRY_PURGE_SECS",
        "1",
    )]))
    .await
    .expect("cluster");
    let mut c = cluster.client(0).await;
    let keys = Keys::generate();
    let expired = keys.sign(
        now() - 10,
        Kind(1),
        vec![tag("expiration", &(now() - 1).to_string())],
        "gone",
    );
    assert!(refused(&c.publish(&expired).await, "invalid:"));
    let lasting = keys.sign(
        now(),
        Kind(1),
        vec![tag("expiration", &(now() + 3600).to_string())],
        "stays",
    );
    let short = keys.sign(
        now(),
        Kind(1),
        vec![tag("expiration", &(now() + 2).to_string())],
        "brief",
    );
    assert!(c.publish(&lasting).await.accepted);
    assert!(c.publish(&short).await.accepted);
    let filter = json!({"authors": [keys.pubkey().to_hex()]});
    assert_eq!(c.req("a", std::slice::from_ref(&filter)).await.len(), 2);
    // Once expired: never served, not counted, and purged in the background.
    let db = &cluster.db().await;
    let id = short.id.as_bytes().as_slice();
    relay_tests::eventually(
        Duration::from_secs(10),
        "purge of the expired event",
        || async move {
            let n: i64 = db
                .query_one("SELECT count(*) FROM events WHERE id = $1", &[&id])
                .await
                .expect("query")
                .get(0);
            n == 0
        },
    )
    .await;
    assert_eq!(
        c.req("b", std::slice::from_ref(&filter)).await,
        vec![lasting]
    );
    assert_eq!(c.count("n", &[filter]).await, Ok(1));
}

#[tokio::test]
async fn nip42_auth_checks_challenge_relay_time_and_signature() {
    let cluster = Cluster::default_cluster().await;
    let mut c = cluster.client(0).await;
    let keys = Keys::generate();
    let url = c.relay_url.clone();
    let challenge = c.challenge.clone();
    let attempts: Vec<(Vec<Vec<String>>, i64, Kind, &str)> = vec![
        (
            vec![tag("relay", &url), tag("challenge", "wrong")],
            now(),
            Kind(22242),
            "challenge",
        ),
        (
            vec![
                tag("relay", "wss://elsewhere.example.com"),
                tag("challenge", &challenge),
            ],
            now(),
            Kind(22242),
            "relay",
        ),
        (
            vec![tag("relay", &url), tag("challenge", &challenge)],
            now() - 3600,
            Kind(22242),
            "created_at",
        ),
        (
            vec![tag("relay", &url), tag("challenge", &challenge)],
            now(),
            Kind(1),
            "22242",
        ),
    ];
    for (tags, at, kind, why) in attempts {
        let ev = keys.sign(at, kind, tags, "");
        c.send_text(format!("[\"AUTH\",{}]", ev.to_json())).await;
        let ack = c.ok_for(&ev.id.to_hex()).await;
        assert!(
            refused(&ack, "invalid:") && ack.message.contains(why),
            "{why}: {ack:?}"
        );
    }
    let mut forged = serde_json::to_value(keys.sign(
        now(),
        Kind(22242),
        vec![tag("relay", &url), tag("challenge", &challenge)],
        "",
    ))
    .expect("json");
    forged["sig"] = json!("0".repeat(128));
    c.send_json(json!(["AUTH", forged.clone()])).await;
    assert!(!c.ok_for(forged["id"].as_str().expect("id")).await.accepted);
    let ack = c.auth(&keys).await;
    assert!(ack.accepted, "{ack:?}");
    // An AUTH event is never published or stored.
    let auth_ev = keys.sign(
        now(),
        Kind(22242),
        vec![tag("relay", &url), tag("challenge", &challenge)],
        "",
    );
    assert!(refused(&c.publish(&auth_ev).await, "invalid:"));
}

#[tokio::test]
async fn nip42_auth_to_write_and_to_read() {
    let cluster = Cluster::start(ClusterOptions::with_env(&[
        ("RELAY_AUTH_WRITE", "true"),
        ("RELAY_AUTH_READ", "true"),
    ]))
    .await
    .expect("cluster");
    let mut c = cluster.client(0).await;
    let keys = Keys::generate();
    let ev = note(&keys, now(), "needs auth");
    assert!(refused(&c.publish(&ev).await, "auth-required:"));
    assert!(
        c.req_closed("r", &[json!({})])
            .await
            .starts_with("auth-required:")
    );
    assert!(
        c.count("n", &[json!({})])
            .await
            .is_err_and(|m| m.starts_with("auth-required:"))
    );
    // NIP-62: a request to vanish is followed without AUTH.
    let vanish = keys.sign(now(), Kind(62), vec![tag("relay", "ALL_RELAYS")], "");
    assert!(c.publish(&vanish).await.accepted);
    assert!(c.auth(&keys).await.accepted);
    let ev = note(&keys, now() + 1, "needs auth");
    assert!(c.publish(&ev).await.accepted);
    assert_eq!(
        c.req("r", &[json!({"ids": [ev.id.to_hex()]})]).await,
        vec![ev]
    );
}

/// Kinds 4, 1059 and 14 reach only their author or a `p`-tagged recipient: through REQ,
/// live delivery and COUNT alike.
#[tokio::test]
async fn nip42_read_restricted_kinds_through_req_live_and_count() {
    let cluster = Cluster::start(ClusterOptions {
        gateways: 2,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let alice = Keys::generate();
    let bob = Keys::generate();
    let eve = Keys::generate();
    let mut author = cluster.client(0).await;
    let mut anon = cluster.client(1).await;
    let mut eve_c = cluster.client(1).await;
    let mut bob_c = cluster.client(1).await;
    assert!(eve_c.auth(&eve).await.accepted);
    assert!(bob_c.auth(&bob).await.accepted);
    assert!(author.auth(&alice).await.accepted);
    let by_alice = json!({"authors": [alice.pubkey().to_hex()]});
    // Live subscriptions first: anonymous, a stranger, the recipient.
    for c in [&mut anon, &mut eve_c, &mut bob_c] {
        assert!(
            c.req("live", std::slice::from_ref(&by_alice))
                .await
                .is_empty()
        );
    }
    // Asking for only restricted kinds without AUTH is refused outright.
    assert!(
        anon.req_closed("dm", &[json!({"kinds": [4]})])
            .await
            .starts_with("auth-required:")
    );
    assert!(
        anon.count("n", &[json!({"kinds": [1059, 14]})])
            .await
            .is_err_and(|m| m.starts_with("auth-required:"))
    );

    let mut sent = Vec::new();
    for kind in [4, 1059, 14] {
        let dm = alice.sign(
            now(),
            Kind(kind),
            vec![tag("p", &bob.pubkey().to_hex())],
            "secret",
        );
        assert!(author.publish(&dm).await.accepted);
        sent.push(dm);
    }
    let public = note(&alice, now(), "public");
    assert!(author.publish(&public).await.accepted);

    // Live: the recipient gets everything, the others only the public note.
    for dm in &sent {
        assert_eq!(&bob_c.next_event("live").await, dm);
    }
    assert_eq!(bob_c.next_event("live").await, public);
    assert_eq!(anon.next_event("live").await, public);
    assert_eq!(eve_c.next_event("live").await, public);
    // Stored and counted alike.
    assert_eq!(
        anon.req("s", std::slice::from_ref(&by_alice)).await,
        vec![public.clone()]
    );
    assert_eq!(
        eve_c.req("s", std::slice::from_ref(&by_alice)).await,
        vec![public.clone()]
    );
    assert_eq!(
        bob_c.req("s", std::slice::from_ref(&by_alice)).await.len(),
        4
    );
    assert_eq!(
        author.req("s", std::slice::from_ref(&by_alice)).await.len(),
        4
    );
    assert_eq!(
        anon.count("n", std::slice::from_ref(&by_alice)).await,
        Ok(1)
    );
    assert_eq!(
        eve_c.count("n", std::slice::from_ref(&by_alice)).await,
        Ok(1)
    );
    assert_eq!(
        bob_c.count("n", &[json!({"kinds": [4, 1059, 14]})]).await,
        Ok(3)
    );
}

#[tokio::test]
async fn nip45_count_ors_filters() {
    let cluster = Cluster::default_cluster().await;
    let mut c = cluster.client(0).await;
    let a = Keys::generate();
    let b = Keys::generate();
    for ev in [
        note(&a, now(), "1"),
        note(&a, now() - 1, "2"),
        a.sign(now(), Kind(7), vec![], "+"),
        note(&b, now(), "3"),
    ] {
        assert!(c.publish(&ev).await.accepted);
    }
    let pa = a.pubkey().to_hex();
    let pb = b.pubkey().to_hex();
    assert_eq!(
        c.count("c1", &[json!({"authors": [pa], "kinds": [1]})])
            .await,
        Ok(2)
    );
    assert_eq!(
        c.count("c2", &[json!({"authors": [pa]}), json!({"authors": [pb]})])
            .await,
        Ok(4)
    );
    assert_eq!(
        c.count(
            "c3",
            &[
                json!({"authors": [pa], "kinds": [7]}),
                json!({"authors": [pa, pb], "kinds": [7]})
            ]
        )
        .await,
        Ok(1)
    );
    assert_eq!(
        c.count("c4", &[json!({"authors": [pb], "kinds": [30000]})])
            .await,
        Ok(0)
    );
    assert!(
        c.count("c5", &[json!({"ids": ["bad"]})])
            .await
            .is_err_and(|m| m.starts_with("invalid:"))
    );
}

#[tokio::test]
async fn nip50_search_by_relevance() {
    let cluster = Cluster::default_cluster().await;
    let mut c = cluster.client(0).await;
    let k = Keys::generate();
    let t = now() - 100;
    let once = note(&k, t + 3, "a relay is a server");
    let twice = note(
        &k,
        t,
        "nostr relay software: the best nostr relay runs nostr",
    );
    let other = note(&k, t + 5, "bitcoin only");
    // Kinds whose content is ciphertext (here a NIP-59 seal) are never searched, even when
    // their content holds the words.
    let seal = k.sign(t + 6, Kind(13), vec![], "bitcoin relay");
    for ev in [&once, &twice, &other, &seal] {
        assert!(c.publish(ev).await.accepted);
    }
    let got = c
        .req(
            "s",
            &[json!({"search": "nostr relay", "authors": [k.pubkey().to_hex()]})],
        )
        .await;
    assert_eq!(got, vec![twice.clone()], "all words must match");
    let got = c
        .req(
            "t",
            &[json!({"search": "relay", "authors": [k.pubkey().to_hex()]})],
        )
        .await;
    assert_eq!(
        got,
        vec![twice.clone(), once.clone()],
        "more relevant first, even if older"
    );
    let got = c
        .req(
            "u",
            &[json!({"search": "RELAY include:spam", "kinds": [1]})],
        )
        .await;
    assert_eq!(
        got.len(),
        2,
        "case-insensitive; unsupported extensions ignored"
    );
    // A search of extensions only still looks at searched events only: not the seal.
    let got = c
        .req(
            "x",
            &[json!({"search": "include:spam", "authors": [k.pubkey().to_hex()]})],
        )
        .await;
    assert_eq!(got.len(), 3, "the three notes, not the seal: {got:?}");
    assert!(
        c.req("v", &[json!({"search": "ethereum"})])
            .await
            .is_empty()
    );
    assert_eq!(c.count("w", &[json!({"search": "bitcoin"})]).await, Ok(1));
    // Live events match the search too.
    assert!(
        c.req("live", &[json!({"search": "zebra"})])
            .await
            .is_empty()
    );
    let mut e = cluster.client(0).await;
    assert!(
        e.req(
            "ext",
            &[json!({"search": "lang:en", "authors": [k.pubkey().to_hex()], "since": t + 50})]
        )
        .await
        .is_empty()
    );
    let mut p = cluster.client(0).await;
    assert!(p.publish(&note(&k, now(), "no match here")).await.accepted);
    let zebra_seal = k.sign(now(), Kind(13), vec![], "zebra");
    assert!(p.publish(&zebra_seal).await.accepted);
    let zebra = note(&k, now(), "a Zebra crossing");
    assert!(p.publish(&zebra).await.accepted);
    assert_eq!(c.next_event("live").await, zebra);
    // Live, too, a search of extensions only skips the seal.
    assert_eq!(e.next_event("ext").await.content, "no match here");
    assert_eq!(e.next_event("ext").await, zebra);
}

#[tokio::test]
async fn nip62_request_to_vanish() {
    let cluster = Cluster::start(ClusterOptions::with_env(&[(
        "RELAY_PUBLIC_URL",
        "wss://relay.test",
    )]))
    .await
    .expect("cluster");
    let mut c = cluster.client(0).await;
    let alice = Keys::generate();
    let bob = Keys::generate();
    let t = now() - 100;
    let old = note(&alice, t, "old");
    let deletion = alice.sign(t + 1, Kind(5), vec![tag("e", &"0".repeat(64))], "");
    let wrap_to_alice = bob.sign(
        t,
        Kind(1059),
        vec![tag("p", &alice.pubkey().to_hex())],
        "gift",
    );
    let bobs = note(&bob, t, "bob stays");
    for ev in [&old, &deletion, &wrap_to_alice, &bobs] {
        assert!(c.publish(ev).await.accepted);
    }
    // Addressed to another relay: nothing happens here.
    let elsewhere = alice.sign(
        t + 2,
        Kind(62),
        vec![tag("relay", "wss://other.example.com")],
        "",
    );
    assert!(c.publish(&elsewhere).await.accepted);
    assert_eq!(
        c.count("n", &[json!({"authors": [alice.pubkey().to_hex()]})])
            .await,
        Ok(3)
    );
    // Addressed to this relay (URL normalized): everything of alice's up to then goes.
    let vanish = alice.sign(
        t + 10,
        Kind(62),
        vec![tag("relay", "wss://RELAY.test/")],
        "please forget me",
    );
    assert!(c.publish(&vanish).await.accepted);
    assert_eq!(
        c.count("n", &[json!({"authors": [alice.pubkey().to_hex()]})])
            .await,
        Ok(0)
    );
    let db = cluster.db().await;
    let wraps: i64 = db
        .query_one("SELECT count(*) FROM events WHERE kind = 1059", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(wraps, 0, "gift wraps to alice are gone");
    assert_eq!(
        c.req(
            "b",
            &[json!({"authors": [bob.pubkey().to_hex()], "kinds": [1]})]
        )
        .await,
        vec![bobs]
    );
    // Older events cannot be re-published, nor can the deleted gift wraps; newer events can,
    // and so can new gift wraps to alice, even backdated as NIP-59 has them.
    assert!(refused(&c.publish(&old).await, "blocked:"));
    assert!(refused(&c.publish(&wrap_to_alice).await, "blocked:"));
    assert!(c.publish(&note(&alice, t + 20, "new start")).await.accepted);
    let new_wrap = bob.sign(
        t - 50,
        Kind(1059),
        vec![tag("p", &alice.pubkey().to_hex())],
        "new gift",
    );
    assert!(c.publish(&new_wrap).await.accepted);
    // ALL_RELAYS works too.
    let global = bob.sign(now(), Kind(62), vec![tag("relay", "ALL_RELAYS")], "");
    assert!(c.publish(&global).await.accepted);
    assert_eq!(
        c.count("m", &[json!({"authors": [bob.pubkey().to_hex()]})])
            .await,
        Ok(0)
    );
}

/// NIP-62 under `RELAY_AUTH_WRITE`: a request to vanish addressed to this relay by its URL
/// (`RELAY_PUBLIC_URL`, not `ALL_RELAYS`) passes the gateway without AUTH and is followed
/// by the ingest worker; one addressed to another relay needs AUTH like any event.
#[tokio::test]
async fn a_request_to_vanish_addressed_here_by_url_needs_no_auth() {
    let cluster = Cluster::start(ClusterOptions::with_env(&[
        ("RELAY_AUTH_WRITE", "true"),
        ("RELAY_PUBLIC_URL", "wss://relay.test"),
    ]))
    .await
    .expect("cluster");
    let mut c = cluster.client(0).await;
    let keys = Keys::generate();
    let elsewhere = keys.sign(
        now(),
        Kind(62),
        vec![tag("relay", "wss://other.example.com")],
        "",
    );
    assert!(refused(&c.publish(&elsewhere).await, "auth-required:"));
    let here = keys.sign(now(), Kind(62), vec![tag("relay", "wss://relay.test/")], "");
    let ack = c.publish(&here).await;
    assert!(ack.accepted, "{ack:?}");
    let db = cluster.db().await;
    let recorded: i64 = db
        .query_one(
            "SELECT count(*) FROM vanished WHERE pubkey = $1",
            &[&keys.pubkey().as_bytes().as_slice()],
        )
        .await
        .expect("query")
        .get(0);
    assert_eq!(recorded, 1, "the request to vanish is recorded");
}

#[tokio::test]
async fn nip70_protected_events_only_from_their_authenticated_author() {
    let cluster = Cluster::default_cluster().await;
    let alice = Keys::generate();
    let protected = alice.sign(now(), Kind(1), vec![vec!["-".into()]], "members only");
    let mut c = cluster.client(0).await;
    assert!(refused(&c.publish(&protected).await, "auth-required:"));
    assert!(c.auth(&Keys::generate()).await.accepted);
    assert!(refused(&c.publish(&protected).await, "restricted:"));
    assert!(c.auth(&alice).await.accepted);
    assert!(c.publish(&protected).await.accepted);
    // Unprotected events need no AUTH.
    let mut anon = cluster.client(0).await;
    assert!(anon.publish(&note(&alice, now(), "public")).await.accepted);
    // A repost must not embed a protected event; one that only points at it is fine.
    let bob = Keys::generate();
    let e = tag("e", &protected.id.to_hex());
    let embedding = bob.sign(now(), Kind(6), vec![e.clone()], protected.to_json());
    assert!(refused(&anon.publish(&embedding).await, "blocked:"));
    let pointing = bob.sign(now(), Kind(6), vec![e], "");
    assert!(anon.publish(&pointing).await.accepted);
}

#[tokio::test]
async fn limits_are_enforced_with_the_right_prefix_and_the_connection_goes_on() {
    let cluster = Cluster::start(ClusterOptions::with_env(&[
        ("RELAY_MAX_SUBSCRIPTIONS", "2"),
        ("RELAY_MAX_FILTERS", "2"),
        ("RELAY_MAX_SUBID_LENGTH", "8"),
        ("RELAY_MAX_LIMIT", "2"),
        ("RELAY_MAX_EVENT_TAGS", "3"),
        ("RELAY_MAX_CONTENT_LENGTH", "10"),
        ("RELAY_CREATED_AT_LOWER_LIMIT", "3600"),
        ("RELAY_CREATED_AT_UPPER_LIMIT", "60"),
        ("RELAY_MAX_MESSAGE_BYTES", "2048"),
    ]))
    .await
    .expect("cluster");
    let mut c = cluster.client(0).await;
    let k = Keys::generate();
    let cases: Vec<(Event, Option<&str>)> = vec![
        (
            k.sign(now(), Kind(1), vec![tag("t", "a"); 4], "x"),
            Some("invalid:"),
        ),
        (k.sign(now(), Kind(1), vec![tag("t", "a"); 3], "x"), None),
        (
            k.sign(now(), Kind(1), vec![], "ééééééééééé"),
            Some("invalid:"),
        ),
        (k.sign(now(), Kind(1), vec![], "éééééééééé"), None),
        (
            k.sign(now() + 600, Kind(1), vec![], "future"),
            Some("invalid:"),
        ),
        (k.sign(now() + 30, Kind(1), vec![], "soon"), None),
        (
            k.sign(now() - 7200, Kind(1), vec![], "past"),
            Some("invalid:"),
        ),
        (k.sign(now() - 1800, Kind(1), vec![], "recent"), None),
    ];
    for (ev, want) in cases {
        let ack = c.publish(&ev).await;
        match want {
            Some(prefix) => assert!(refused(&ack, prefix), "{}: {ack:?}", ev.content),
            None => assert!(ack.accepted, "{}: {ack:?}", ev.content),
        }
    }
    // limit is clamped to max_limit.
    assert_eq!(
        c.req(
            "l",
            &[json!({"authors": [k.pubkey().to_hex()], "limit": 50})]
        )
        .await
        .len(),
        2
    );
    c.send_json(json!(["CLOSE", "l"])).await;
    assert!(
        c.req_closed("toolongid", &[json!({})])
            .await
            .starts_with("invalid:")
    );
    assert!(
        c.req_closed("f", &[json!({}), json!({}), json!({})])
            .await
            .starts_with("invalid:")
    );
    assert!(c.req("s1", &[json!({"limit": 0})]).await.is_empty());
    assert!(c.req("s2", &[json!({"limit": 0})]).await.is_empty());
    assert!(
        c.req_closed("s3", &[json!({"limit": 0})])
            .await
            .starts_with("rate-limited:")
    );
    // Replacing an open subscription is not a new one; closing frees a slot.
    assert!(c.req("s2", &[json!({"limit": 0})]).await.is_empty());
    c.send_json(json!(["CLOSE", "s1"])).await;
    assert!(c.req("s3", &[json!({"limit": 0})]).await.is_empty());
    // An oversized message gets a NOTICE and the connection goes on; a huge one closes it.
    c.send_text(format!(
        "[\"REQ\",\"big\",{{\"#t\":[\"{}\"]}}]",
        "x".repeat(3000)
    ))
    .await;
    assert!(matches!(c.recv().await, RelayMessage::Notice(m) if m.starts_with("invalid:")));
    assert!(c.count("after", &[json!({"ids": []})]).await.is_ok());
    c.send_text("x".repeat(5000)).await;
    assert!(
        c.recv_text_within(relay_tests::WAIT).await.is_none(),
        "connection closed"
    );
}

#[tokio::test]
async fn rate_limits_hold_across_gateways() {
    let cluster = Cluster::start(ClusterOptions {
        gateways: 2,
        env: vec![
            ("RELAY_RATE_EVENTS_PER_IP".into(), "4".into()),
            ("RELAY_RATE_EVENTS_PER_PUBKEY".into(), "2".into()),
            ("RELAY_RATE_REQS_PER_IP".into(), "3".into()),
        ],
        ..Default::default()
    })
    .await
    .expect("cluster");
    let mut a = cluster.client(0).await;
    let mut b = cluster.client(1).await;
    let k1 = Keys::generate();
    let k2 = Keys::generate();
    let k3 = Keys::generate();
    // Per pubkey: two events of k1, whichever gateway.
    assert!(a.publish(&note(&k1, now(), "1")).await.accepted);
    assert!(b.publish(&note(&k1, now(), "2")).await.accepted);
    assert!(refused(
        &a.publish(&note(&k1, now(), "3")).await,
        "rate-limited:"
    ));
    // Per IP: four events in all (the refused one counted), across both gateways.
    assert!(b.publish(&note(&k2, now(), "4")).await.accepted);
    assert!(refused(
        &a.publish(&note(&k3, now(), "5")).await,
        "rate-limited:"
    ));
    // REQs per IP.
    assert!(a.req("r1", &[json!({"limit": 0})]).await.is_empty());
    assert!(b.req("r2", &[json!({"limit": 0})]).await.is_empty());
    assert!(a.count("c", &[json!({"kinds": [1]})]).await.is_ok());
    assert!(
        b.req_closed("r3", &[json!({"limit": 0})])
            .await
            .starts_with("rate-limited:")
    );
    // The connection itself is fine.
    let mut fresh = Client::connect(&cluster.gateways[1].url())
        .await
        .expect("connect");
    assert!(
        fresh
            .count("c", &[json!({})])
            .await
            .is_err_and(|m| m.starts_with("rate-limited:"))
    );
}
