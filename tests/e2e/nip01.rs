//! NIP-01 through the whole cluster.

use std::collections::HashSet;
use std::time::Duration;

use relay_tests::{Client, Cluster, ClusterOptions};
use serde_json::{Value, json};
use shared::event::signing::Keys;
use shared::event::{Event, Kind};
use shared::message::RelayMessage;
use tokio_tungstenite::tungstenite::Message;

use crate::{barrier, note, now};

fn ids(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.id.to_hex()).collect()
}

#[tokio::test]
async fn publish_gets_ok_and_reads_back() {
    let cluster = Cluster::default_cluster().await;
    let mut c = cluster.client(0).await;
    let keys = Keys::generate();
    let ev = note(&keys, now(), "hello\n\"world\" ünïcødé");
    let ack = c.publish(&ev).await;
    assert!(ack.accepted, "{ack:?}");
    assert_eq!(ack.message, "");
    let got = c.req("r", &[json!({"ids": [ev.id.to_hex()]})]).await;
    assert_eq!(got, vec![ev.clone()]);

    // The stored row is committed in Postgres, exactly once.
    let db = cluster.db().await;
    let row = db
        .query_one(
            "SELECT count(*) FROM events WHERE id = $1",
            &[&ev.id.as_bytes().as_slice()],
        )
        .await
        .expect("query");
    assert_eq!(row.get::<_, i64>(0), 1);
}

#[tokio::test]
async fn bad_id_and_bad_signature_are_invalid() {
    let cluster = Cluster::default_cluster().await;
    let mut c = cluster.client(0).await;
    let keys = Keys::generate();
    let good = note(&keys, now(), "original");

    let mut wrong_content = serde_json::to_value(&good).expect("json");
    wrong_content["content"] = json!("tampered");
    c.send_json(json!(["EVENT", wrong_content])).await;
    let ack = c.ok_for(&good.id.to_hex()).await;
    assert!(!ack.accepted);
    assert!(ack.message.starts_with("invalid:"), "{ack:?}");

    let mut wrong_sig = serde_json::to_value(&good).expect("json");
    let other = note(&keys, now(), "other");
    wrong_sig["sig"] = json!(other.sig.to_hex());
    c.send_json(json!(["EVENT", wrong_sig])).await;
    let ack = c.ok_for(&good.id.to_hex()).await;
    assert!(!ack.accepted);
    assert!(ack.message.starts_with("invalid:"), "{ack:?}");

    // Neither was stored, and the connection still works.
    assert!(
        c.req("r", &[json!({"authors": [keys.pubkey().to_hex()]})])
            .await
            .is_empty()
    );
    assert!(c.publish(&good).await.accepted);
}

#[tokio::test]
async fn duplicates_are_ok_with_duplicate_prefix() {
    let cluster = Cluster::default_cluster().await;
    let mut c = cluster.client(0).await;
    let ev = note(&Keys::generate(), now(), "once");
    assert!(c.publish(&ev).await.accepted);
    let again = c.publish(&ev).await;
    assert!(again.accepted);
    assert!(again.message.starts_with("duplicate:"), "{again:?}");
    assert_eq!(
        c.req("r", &[json!({"ids": [ev.id.to_hex()]})]).await.len(),
        1
    );
}

#[tokio::test]
async fn every_filter_field_ordering_limit_and_or() {
    let cluster = Cluster::default_cluster().await;
    let mut c = cluster.client(0).await;
    let alice = Keys::generate();
    let bob = Keys::generate();
    let t0 = now() - 1000;
    let a1 = alice.sign(t0, Kind(1), vec![vec!["t".into(), "nostr".into()]], "a1");
    let a2 = alice.sign(
        t0 + 10,
        Kind(7),
        vec![
            vec!["e".into(), a1.id.to_hex()],
            vec!["p".into(), bob.pubkey().to_hex()],
        ],
        "+",
    );
    let b1 = bob.sign(
        t0 + 20,
        Kind(1),
        vec![
            vec!["t".into(), "rust".into()],
            vec!["T".into(), "Upper".into()],
        ],
        "b1",
    );
    let b2 = bob.sign(
        t0 + 30,
        Kind(1),
        vec![
            vec!["t".into(), "nostr".into()],
            vec!["t".into(), "rust".into()],
        ],
        "b2",
    );
    // Two events at the same second: ties are broken by lowest id first.
    let b3 = bob.sign(t0 + 40, Kind(1), vec![], "b3");
    let b4 = bob.sign(t0 + 40, Kind(1), vec![], "b4");
    for ev in [&a1, &a2, &b1, &b2, &b3, &b4] {
        assert!(c.publish(ev).await.accepted);
    }
    let (lo, hi) = if b3.id < b4.id {
        (&b3, &b4)
    } else {
        (&b4, &b3)
    };
    let a = alice.pubkey().to_hex();
    let b = bob.pubkey().to_hex();
    let cases: Vec<(Value, Vec<&Event>)> = vec![
        (
            json!({"ids": [a1.id.to_hex(), b1.id.to_hex()]}),
            vec![&b1, &a1],
        ),
        (json!({"authors": [a]}), vec![&a2, &a1]),
        (json!({"authors": [a, b], "kinds": [7]}), vec![&a2]),
        (
            json!({"kinds": [1], "authors": [b]}),
            vec![lo, hi, &b2, &b1],
        ),
        (json!({"#t": ["nostr"]}), vec![&b2, &a1]),
        (
            json!({"#t": ["nostr", "rust"], "authors": [b]}),
            vec![&b2, &b1],
        ),
        (json!({"#T": ["Upper"]}), vec![&b1]),
        // b2 carries both values: it counts once towards the limit.
        (json!({"#t": ["nostr", "rust"], "limit": 2}), vec![&b2, &b1]),
        (
            json!({"#t": ["rust", "nostr"], "kinds": [1]}),
            vec![&b2, &b1, &a1],
        ),
        (json!({"#e": [a1.id.to_hex()]}), vec![&a2]),
        (json!({"#p": [b]}), vec![&a2]),
        (
            json!({"authors": [a, b], "since": t0 + 10, "until": t0 + 30}),
            vec![&b2, &b1, &a2],
        ),
        (json!({"authors": [a, b], "since": t0 + 40}), vec![lo, hi]),
        (json!({"authors": [a, b], "until": t0}), vec![&a1]),
        (json!({"authors": [a, b], "limit": 3}), vec![lo, hi, &b2]),
        (json!({"authors": [a, b], "limit": 1}), vec![lo]),
        (json!({"authors": [a, b], "kinds": [9]}), vec![]),
        (json!({"authors": []}), vec![]),
    ];
    for (i, (filter, want)) in cases.into_iter().enumerate() {
        let got = c.req(&format!("f{i}"), std::slice::from_ref(&filter)).await;
        let want: Vec<Event> = want.into_iter().cloned().collect();
        assert_eq!(ids(&got), ids(&want), "filter {filter}");
    }
    // Several filters are ORed; an event matching two of them comes once; order holds.
    let got = c
        .req(
            "or",
            &[
                json!({"ids": [a1.id.to_hex()]}),
                json!({"#t": ["nostr"]}),
                json!({"kinds": [7], "authors": [a]}),
            ],
        )
        .await;
    assert_eq!(ids(&got), ids(&[b2.clone(), a2.clone(), a1.clone()]));
}

#[tokio::test]
async fn replaceable_events_keep_only_the_newest() {
    let cluster = Cluster::default_cluster().await;
    let mut c = cluster.client(0).await;
    let keys = Keys::generate();
    let t = now() - 100;
    let v1 = keys.sign(t, Kind(0), vec![], r#"{"name":"v1"}"#);
    let v2 = keys.sign(t + 1, Kind(0), vec![], r#"{"name":"v2"}"#);
    let filter = json!({"kinds": [0], "authors": [keys.pubkey().to_hex()]});
    assert!(c.publish(&v1).await.accepted);
    assert!(c.publish(&v2).await.accepted);
    assert_eq!(
        c.req("a", std::slice::from_ref(&filter)).await,
        vec![v2.clone()]
    );
    // An older version arriving late is refused and does not replace the newer one.
    let ack = c.publish(&v1).await;
    assert!(
        !ack.accepted && ack.message.starts_with("duplicate:"),
        "{ack:?}"
    );
    assert_eq!(
        c.req("b", std::slice::from_ref(&filter)).await,
        vec![v2.clone()]
    );
    // Same created_at: the lowest id wins, whichever arrives first.
    let x = keys.sign(t + 5, Kind(10002), vec![], "x");
    let y = keys.sign(t + 5, Kind(10002), vec![], "y");
    let (low, high) = if x.id < y.id { (x, y) } else { (y, x) };
    assert!(c.publish(&high).await.accepted);
    assert!(c.publish(&low).await.accepted);
    assert!(!c.publish(&high).await.accepted);
    let got = c
        .req(
            "c",
            &[json!({"kinds": [10002], "authors": [keys.pubkey().to_hex()]})],
        )
        .await;
    assert_eq!(got, vec![low]);
    // Tags of a replaced version are no longer queryable.
    let tagged = keys.sign(t + 10, Kind(3), vec![vec!["p".into(), "a".repeat(64)]], "");
    let untagged = keys.sign(t + 11, Kind(3), vec![vec!["p".into(), "b".repeat(64)]], "");
    assert!(c.publish(&tagged).await.accepted);
    assert!(c.publish(&untagged).await.accepted);
    assert!(
        c.req("d", &[json!({"#p": ["a".repeat(64)]})])
            .await
            .is_empty()
    );
    assert_eq!(
        c.req("e", &[json!({"#p": ["b".repeat(64)]})]).await,
        vec![untagged]
    );
}

#[tokio::test]
async fn addressable_events_are_replaced_per_d_tag() {
    let cluster = Cluster::default_cluster().await;
    let mut c = cluster.client(0).await;
    let keys = Keys::generate();
    let t = now() - 100;
    let d = |v: &str| vec![vec!["d".to_string(), v.to_string()]];
    let a1 = keys.sign(t, Kind(30023), d("one"), "a1");
    let a2 = keys.sign(t + 1, Kind(30023), d("one"), "a2");
    let b1 = keys.sign(t, Kind(30023), d("two"), "b1");
    let none = keys.sign(t, Kind(30023), vec![], "no d tag");
    let empty = keys.sign(
        t + 1,
        Kind(30023),
        d(""),
        "empty d tag replaces missing d tag",
    );
    for ev in [&a1, &a2, &b1, &none, &empty] {
        assert!(c.publish(ev).await.accepted);
    }
    let got = c
        .req(
            "a",
            &[json!({"kinds": [30023], "authors": [keys.pubkey().to_hex()]})],
        )
        .await;
    let mut got = ids(&got);
    got.sort();
    let mut want = ids(&[a2, b1, empty]);
    want.sort();
    assert_eq!(got, want);
    let by_d = c.req("b", &[json!({"#d": ["one"]})]).await;
    assert_eq!(by_d.len(), 1);
    assert_eq!(by_d[0].content, "a2");
}

#[tokio::test]
async fn ephemeral_events_are_delivered_but_never_stored() {
    let cluster = Cluster::default_cluster().await;
    let mut sub = cluster.client(0).await;
    let mut publisher = cluster.client(0).await;
    let keys = Keys::generate();
    let filter = json!({"kinds": [20001], "authors": [keys.pubkey().to_hex()]});
    assert!(
        sub.req("live", std::slice::from_ref(&filter))
            .await
            .is_empty()
    );
    let ev = keys.sign(now(), Kind(20001), vec![], "ephemeral");
    let ack = publisher.publish(&ev).await;
    assert!(ack.accepted, "{ack:?}");
    assert_eq!(sub.next_event("live").await, ev);
    assert!(publisher.req("stored", &[filter]).await.is_empty());
    let db = cluster.db().await;
    let row = db
        .query_one("SELECT count(*) FROM events WHERE kind = 20001", &[])
        .await
        .expect("query");
    assert_eq!(row.get::<_, i64>(0), 0);
}

#[tokio::test]
async fn live_delivery_on_the_same_and_another_gateway() {
    let cluster = Cluster::start(ClusterOptions {
        gateways: 2,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let keys = Keys::generate();
    let filter = json!({"authors": [keys.pubkey().to_hex()]});
    let mut on_a = cluster.client(0).await;
    let mut on_b = cluster.client(1).await;
    assert!(
        on_a.req("s", std::slice::from_ref(&filter))
            .await
            .is_empty()
    );
    assert!(
        on_b.req("s", std::slice::from_ref(&filter))
            .await
            .is_empty()
    );
    let mut publisher = cluster.client(0).await;
    let ev = note(&keys, now(), "through two gateways");
    assert!(publisher.publish(&ev).await.accepted);
    assert_eq!(on_a.next_event("s").await, ev);
    assert_eq!(on_b.next_event("s").await, ev);
    // Publishing on B reaches A too.
    let mut publisher_b = cluster.client(1).await;
    let ev2 = note(&keys, now(), "the other way");
    assert!(publisher_b.publish(&ev2).await.accepted);
    assert_eq!(on_a.next_event("s").await, ev2);
    // A non-matching event is not delivered.
    let stranger = note(&Keys::generate(), now(), "not for you");
    assert!(publisher.publish(&stranger).await.accepted);
    barrier(&mut on_a).await;
    assert!(
        on_a.next_event_within("s", Duration::from_millis(200))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn close_stops_delivery_and_req_replaces_a_subscription() {
    let cluster = Cluster::default_cluster().await;
    let mut sub = cluster.client(0).await;
    let mut publisher = cluster.client(0).await;
    let alice = Keys::generate();
    let bob = Keys::generate();
    assert!(
        sub.req("s", &[json!({"authors": [alice.pubkey().to_hex()]})])
            .await
            .is_empty()
    );
    // Replace "s" with a filter for bob: alice's events stop, bob's arrive.
    let old_bob = note(&bob, now() - 5, "stored bob");
    assert!(publisher.publish(&old_bob).await.accepted);
    assert_eq!(
        sub.req("s", &[json!({"authors": [bob.pubkey().to_hex()]})])
            .await,
        vec![old_bob]
    );
    assert!(
        publisher
            .publish(&note(&alice, now(), "alice"))
            .await
            .accepted
    );
    let bob_live = note(&bob, now(), "bob live");
    assert!(publisher.publish(&bob_live).await.accepted);
    assert_eq!(sub.next_event("s").await, bob_live);
    // CLOSE: nothing more.
    sub.send_json(json!(["CLOSE", "s"])).await;
    assert!(
        publisher
            .publish(&note(&bob, now(), "after close"))
            .await
            .accepted
    );
    barrier(&mut sub).await;
    assert!(
        sub.next_event_within("s", Duration::from_millis(200))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn limit_zero_gives_eose_at_once_then_live_events() {
    let cluster = Cluster::default_cluster().await;
    let mut c = cluster.client(0).await;
    let keys = Keys::generate();
    let old = note(&keys, now() - 10, "old");
    assert!(c.publish(&old).await.accepted);
    let stored = c
        .req(
            "z",
            &[json!({"authors": [keys.pubkey().to_hex()], "limit": 0})],
        )
        .await;
    assert!(stored.is_empty(), "limit 0 returns no stored events");
    let new = note(&keys, now(), "new");
    let mut publisher = cluster.client(0).await;
    assert!(publisher.publish(&new).await.accepted);
    assert_eq!(c.next_event("z").await, new);
}

/// An event committed while the REQ is in flight arrives exactly once: as stored or as live.
#[tokio::test]
async fn events_racing_a_req_arrive_exactly_once() {
    let cluster = Cluster::default_cluster().await;
    let keys = Keys::generate();
    let events: Vec<Event> = (0..60)
        .map(|i| note(&keys, now() - 100 + i, &format!("race {i}")))
        .collect();
    let mut publisher = cluster.client(0).await;
    let mut sub = cluster.client(0).await;
    let url = cluster.url();
    let to_send = events.clone();
    let publishing = tokio::spawn(async move {
        let mut p = Client::connect(&url).await.expect("connect");
        for ev in &to_send {
            assert!(p.publish(ev).await.accepted);
        }
    });
    // Not synchronisation: only lets the publisher get going so the REQ lands mid-stream.
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut got = sub
        .req("race", &[json!({"authors": [keys.pubkey().to_hex()]})])
        .await;
    publishing.await.expect("publisher");
    let marker = note(&keys, now(), "marker");
    assert!(publisher.publish(&marker).await.accepted);
    loop {
        let ev = sub.next_event("race").await;
        if ev == marker {
            break;
        }
        got.push(ev);
    }
    let mut seen = HashSet::new();
    for ev in &got {
        assert!(seen.insert(ev.id), "event delivered twice: {}", ev.content);
    }
    assert_eq!(seen.len(), events.len(), "every event arrives once");
}

/// Two ingest workers racing on versions of one replaceable event keep exactly the newest.
#[tokio::test]
async fn racing_ingest_workers_keep_the_newest_replaceable_version() {
    let cluster = Cluster::start(ClusterOptions {
        gateways: 2,
        ingest_workers: 2,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let keys = Keys::generate();
    let t = now() - 1000;
    let versions: Vec<Event> = (0..40)
        .map(|i| keys.sign(t + i, Kind(0), vec![], format!("v{i}")))
        .collect();
    let mut tasks = Vec::new();
    for (n, chunk) in versions.chunks(10).enumerate() {
        let url = cluster.gateways[n % 2].url();
        let chunk: Vec<Event> = chunk.iter().rev().cloned().collect();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&url).await.expect("connect");
            c.publish_all(&chunk).await;
        }));
    }
    for t in tasks {
        t.await.expect("publisher");
    }
    let mut c = cluster.client(0).await;
    let got = c
        .req(
            "r",
            &[json!({"kinds": [0], "authors": [keys.pubkey().to_hex()]})],
        )
        .await;
    assert_eq!(got, vec![versions[39].clone()]);
    let db = cluster.db().await;
    let row = db
        .query_one("SELECT count(*) FROM events WHERE kind = 0", &[])
        .await
        .expect("query");
    assert_eq!(row.get::<_, i64>(0), 1);
}

/// Input → the reply it must get, through one table. The connection keeps working after each.
#[tokio::test]
async fn malformed_input_gets_a_reply_and_the_connection_keeps_working() {
    let cluster = Cluster::default_cluster().await;
    let mut c = cluster.client(0).await;
    let id = "f".repeat(64);
    let long_sub = "x".repeat(65);
    let cases: Vec<(String, &str)> = vec![
        ("this is not json".into(), "NOTICE invalid:"),
        ("{\"an\":\"object\"}".into(), "NOTICE invalid:"),
        ("[]".into(), "NOTICE invalid:"),
        ("[42]".into(), "NOTICE invalid:"),
        (r#"["HELLO","world"]"#.into(), "NOTICE unsupported:"),
        (r#"["EVENT"]"#.into(), "NOTICE invalid:"),
        (r#"["EVENT",{"content":"no id"}]"#.into(), "NOTICE invalid:"),
        (
            format!(r#"["EVENT",{{"id":"{id}","kind":"one"}}]"#),
            "OK false invalid:",
        ),
        (r#"["REQ"]"#.into(), "NOTICE invalid:"),
        (r#"["REQ","s"]"#.into(), "CLOSED invalid:"),
        (r#"["COUNT","c"]"#.into(), "CLOSED invalid:"),
        (format!(r#"["REQ","{long_sub}",{{}}]"#), "NOTICE invalid:"),
        (r#"["REQ","s",{"ids":["xyz"]}]"#.into(), "CLOSED invalid:"),
        (
            r##"["REQ","s",{"#e":["not-hex"]}]"##.into(),
            "CLOSED invalid:",
        ),
        (r#"["REQ","s",{"kinds":["1"]}]"#.into(), "CLOSED invalid:"),
        (r#"["REQ","s",{"unknown":1}]"#.into(), "CLOSED unsupported:"),
        (r#"["REQ","s",[]]"#.into(), "CLOSED invalid:"),
        (r#"["CLOSE"]"#.into(), "NOTICE invalid:"),
        (r#"["CLOSE",1]"#.into(), "NOTICE invalid:"),
    ];
    for (input, want) in cases {
        c.send_text(input.clone()).await;
        let reply = c.recv().await;
        let got = match &reply {
            RelayMessage::Notice(m) => format!("NOTICE {m}"),
            RelayMessage::Ok {
                accepted, message, ..
            } => format!("OK {accepted} {message}"),
            RelayMessage::Closed { message, .. } => format!("CLOSED {message}"),
            other => format!("{other:?}"),
        };
        assert!(got.starts_with(want), "{input} → {got}, wanted {want}");
    }
    c.send_raw(Message::binary(vec![0u8, 159, 146, 150])).await;
    assert!(matches!(c.recv().await, RelayMessage::Notice(m) if m.starts_with("invalid:")));
    // Still serving.
    let ev = note(&Keys::generate(), now(), "still here");
    assert!(c.publish(&ev).await.accepted);
}

/// NIP-01: a REQ replaces the subscription of the same id, so a refused one ends it (its
/// CLOSED says so) instead of leaving the old filters delivering.
#[tokio::test]
async fn a_refused_req_ends_the_subscription_it_replaces() {
    let cluster = Cluster::default_cluster().await;
    let mut c = cluster.client(0).await;
    for refused in [
        r#"["REQ","s",{"ids":["xyz"]}]"#.to_owned(),
        r#"["REQ","s"]"#.to_owned(),
    ] {
        let keys = Keys::generate();
        let author = json!({"authors": [keys.pubkey().to_hex()]});
        assert!(c.req("s", std::slice::from_ref(&author)).await.is_empty());
        c.send_text(refused.clone()).await;
        assert!(
            matches!(c.recv().await, RelayMessage::Closed { sub_id, .. } if sub_id.as_str() == "s"),
            "{refused}"
        );
        let mut p = cluster.client(0).await;
        assert!(p.publish(&note(&keys, now(), &refused)).await.accepted);
        assert_eq!(
            c.next_event_within("s", Duration::from_millis(500)).await,
            None,
            "after {refused}"
        );
    }
}

#[tokio::test]
async fn nip11_health_and_readiness() {
    let cluster = Cluster::default_cluster().await;
    let gw = &cluster.gateways[0];
    let (status, headers, body) = http_get(gw.addr, "/", Some("application/nostr+json")).await;
    assert_eq!(status, 200);
    // NIP-11: all three CORS headers, on the document itself (not only on preflight).
    let lower = headers.to_ascii_lowercase();
    for wanted in [
        "access-control-allow-origin: *",
        "access-control-allow-headers: *",
        "access-control-allow-methods: ",
    ] {
        assert!(lower.contains(wanted), "{wanted} in {headers}");
    }
    let doc: Value = serde_json::from_str(&body).expect("NIP-11 JSON");
    assert!(
        doc["supported_nips"]
            .as_array()
            .is_some_and(|n| n.contains(&json!(1)) && n.contains(&json!(11)))
    );
    assert_eq!(doc["limitation"]["max_subid_length"], json!(64));
    assert_eq!(doc["limitation"]["restricted_writes"], json!(false));
    assert_eq!(http_get(gw.addr, "/healthz", None).await.0, 200);
    // Workers beat every 300 ms in tests; readiness follows within a few beats.
    assert!(
        relay_tests::faults::wait_readyz(gw.addr, 200, Duration::from_secs(5))
            .await
            .is_ok(),
        "gateway never became ready"
    );
}

/// A minimal HTTP/1.1 GET, enough for status, headers and a small body.
async fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
    accept: Option<&str>,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Origin: http://example.com\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    tokio::time::timeout(relay_tests::WAIT, stream.read_to_string(&mut response))
        .await
        .expect("response in time")
        .expect("read");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}
