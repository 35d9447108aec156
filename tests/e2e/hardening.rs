//! Attacks one hostile client can try on a public relay (issue "Hardening"), each run
//! against the real binaries while a [`Bystander`] on the same gateway must be served
//! within [`relay_tests::BYSTANDER_BOUND`]. Every test checks the refusal (its NIP-01
//! prefix, and that the attacker's connection still works) and the bystander.

use std::time::{Duration, Instant};

use relay_tests::{Bystander, Client, Cluster, ClusterOptions};
use serde_json::{Value, json};
use shared::event::signing::Keys;

use crate::{note, now};

/// One attack at a time: the bystander's bound is about what one hostile client costs the
/// others, not two attacks sharing this machine's two cores.
static ATTACK: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// Takes the attack slot for a test's whole run.
async fn attack_slot() -> tokio::sync::SemaphorePermit<'static> {
    ATTACK
        .acquire()
        .await
        .expect("the semaphore is never closed")
}

/// `n` distinct 64-character hex values.
fn hexes(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{i:064x}")).collect()
}

/// The attacker's connection still works after its attack: it may publish.
async fn still_works(attacker: &mut Client) {
    let ack = attacker
        .publish(&note(&Keys::generate(), now(), "still here"))
        .await;
    assert!(ack.accepted, "{ack:?}");
}

/// Runs `attack` while the bystander is served round after round; both must finish.
async fn while_attacked<F: std::future::Future<Output = ()>>(bystander: &mut Bystander, attack: F) {
    let served = async {
        for _ in 0..5 {
            bystander.served().await;
        }
    };
    tokio::join!(attack, served);
}

#[tokio::test]
async fn oversized_filters_are_refused_while_bystanders_are_served() {
    let _slot = attack_slot().await;
    let cluster = Cluster::default_cluster().await;
    let mut bystander = Bystander::connect(&cluster.url(), None).await;
    let mut attacker = Client::connect(&cluster.url()).await.expect("connects");
    let words: Vec<String> = (0..17).map(|i| format!("w{i}")).collect();
    let many_tags = json!({"#t": (0..1000).map(|i| format!("t{i}")).collect::<Vec<_>>()});
    let refused: Vec<(Vec<Value>, &str)> = vec![
        (
            vec![json!({"#t": (0..1001).map(|i| format!("t{i}")).collect::<Vec<_>>()})],
            "#t",
        ),
        (vec![json!({"authors": hexes(1001)})], "authors"),
        (vec![json!({"ids": hexes(1001)})], "ids"),
        (vec![json!({"search": words.join(" ")})], "search"),
        (vec![many_tags.clone(); 6], "together"),
    ];
    let attack = async {
        for round in 0..5 {
            for (i, (filters, names)) in refused.iter().enumerate() {
                let sub = format!("big-{round}-{i}");
                let message = attacker.req_closed(&sub, filters).await;
                assert!(
                    message.starts_with("invalid:") && message.contains(names),
                    "{sub}: {message}"
                );
            }
            // A value repeated 40,000 times is one value: served, not refused.
            let repeated = json!({"#t": vec!["nostr"; 40_000], "limit": 5000});
            attacker.send_req("repeated", &[repeated]).await;
            attacker.until_eose("repeated").await;
            // At the caps exactly: served.
            attacker
                .send_req("at-caps", &vec![many_tags.clone(); 5])
                .await;
            attacker.until_eose("at-caps").await;
        }
    };
    while_attacked(&mut bystander, attack).await;
    // The attacker's connection still works.
    still_works(&mut attacker).await;
}

/// Fills the cluster's database with `n` kind-1 rows (not valid events, which no query here
/// returns as results), so a query can be made to take long.
async fn seed_rows(cluster: &Cluster, n: i64) {
    let db = cluster.db().await;
    db.execute(
        "INSERT INTO events (id, pubkey, kind, created_at, json) \
         SELECT decode(md5(i::text) || md5((i + 1)::text), 'hex'), \
                decode(md5((i % 1000)::text) || md5('p'), 'hex'), 1, i, '{}' \
         FROM generate_series(1, $1::bigint) AS i",
        &[&n],
    )
    .await
    .expect("seed rows");
    db.batch_execute("ANALYZE events").await.expect("analyze");
}

/// Three filters over every seeded row: a union of 1.2 million rows to count.
const EVERYTHING: [&str; 3] = [r#"{}"#, r#"{"kinds":[1]}"#, r#"{"since":0}"#];

/// A cluster with `env` (and trusting `X-Forwarded-For`) on 400,000 seeded rows, a bystander
/// on 192.0.2.2 and an attacker on 192.0.2.1.
async fn slow_query_cluster(env: &[(&str, &str)]) -> (Cluster, Bystander, Client) {
    let mut options = ClusterOptions::with_env(env);
    options
        .env
        .extend(relay_tests::env_vars(&[("RELAY_TRUST_FORWARDED", "true")]));
    let cluster = Cluster::start(options).await.expect("cluster starts");
    seed_rows(&cluster, 400_000).await;
    let bystander = Bystander::connect(&cluster.url(), Some("192.0.2.2")).await;
    let attacker = Client::connect_from(&cluster.url(), "192.0.2.1")
        .await
        .expect("connects");
    (cluster, bystander, attacker)
}

#[tokio::test]
async fn slow_queries_end_with_error_and_their_database_time_is_rate_limited() {
    let _slot = attack_slot().await;
    let (_cluster, mut bystander, mut attacker) = slow_query_cluster(&[
        ("RELAY_QUERY_TIMEOUT_MS", "100"),
        ("RELAY_RATE_QUERY_MS_PER_IP", "1000"),
    ])
    .await;
    let everything: Vec<Value> = EVERYTHING
        .iter()
        .map(|f| serde_json::from_str(f).expect("json"))
        .collect();
    let attack = async {
        for i in 0..60 {
            let started = Instant::now();
            let answer = attacker.count(&format!("slow-{i}"), &everything).await;
            let message = answer.expect_err("a count of every row runs out of time");
            if message.starts_with("rate-limited:") {
                assert!(i >= 5, "rate-limited after {i} timeouts: {message}");
                assert!(message.contains("database time"), "{message}");
                return;
            }
            assert!(message.starts_with("error:"), "{message}");
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "the timeout answers long before the gateway gives up: {:?}",
                started.elapsed()
            );
        }
        panic!("60 slow counts and never rate-limited");
    };
    while_attacked(&mut bystander, attack).await;
    // The attacker may still publish; the bystander, on another address, still queries.
    still_works(&mut attacker).await;
    bystander.served().await;
}

#[tokio::test]
async fn one_connection_cannot_hold_unbounded_subscriptions() {
    let _slot = attack_slot().await;
    let cluster = Cluster::default_cluster().await;
    let mut bystander = Bystander::connect(&cluster.url(), None).await;
    let mut attacker = Client::connect(&cluster.url()).await.expect("connects");
    // Five filters of 1,000 distinct values each: at every per-REQ cap, and about 0.9 MB of
    // filters and index entries in the gateway.
    let big = |sub: usize| -> Vec<Value> {
        (0..5)
            .map(|f| json!({"#t": (0..1000).map(|i| format!("{sub}-{f}-{i}")).collect::<Vec<_>>(), "limit": 0}))
            .collect()
    };
    let attack = async {
        let mut open = 0;
        let refusal = loop {
            attacker.send_req(&format!("big-{open}"), &big(open)).await;
            let answer = attacker.recv().await;
            match answer {
                shared::message::RelayMessage::Eose(_) => open += 1,
                shared::message::RelayMessage::Closed { message, .. } => break message,
                other => panic!("unexpected {other:?}"),
            }
            assert!(open < 100, "100 big subscriptions were all taken");
        };
        assert!(
            refusal.starts_with("rate-limited:") && refusal.contains("bytes"),
            "{refusal}"
        );
        assert!(open >= 1, "one big subscription fits");
        // Live events are matched against the big filters meanwhile.
        let keys = Keys::generate();
        for i in 0..20 {
            let tagged = keys.sign(
                now(),
                shared::event::Kind(1),
                vec![vec!["t".into(), format!("0-0-{i}")]],
                "tagged",
            );
            assert!(attacker.publish(&tagged).await.accepted);
        }
        // Closing one makes room again.
        attacker.send_json(json!(["CLOSE", "big-0"])).await;
        attacker.send_req("again", &big(999)).await;
        attacker.until_eose("again").await;
    };
    while_attacked(&mut bystander, attack).await;
}

#[tokio::test]
async fn gateways_are_not_ready_while_their_public_url_differs_from_the_ingest_workers() {
    let _slot = attack_slot().await;
    use relay_tests::faults::wait_readyz;
    let cluster = Cluster::default_cluster().await;
    let addr = cluster.gateways[0].addr;
    wait_readyz(addr, 200, Duration::from_secs(5))
        .await
        .expect("the harness gives every process the same URL");
    // An ingest worker with another URL keeps advertising it (played here from Redis).
    let redis = redis::Client::open(cluster.services.redis_url.as_str()).expect("redis url");
    let mut conn = redis
        .get_multiplexed_async_connection()
        .await
        .expect("redis connects");
    let key = format!("{}:public-url", cluster.prefix);
    let stop = tokio::sync::Notify::new();
    let impostor = async {
        loop {
            let () = redis::cmd("SET")
                .arg(&key)
                .arg("wss://elsewhere.example.com")
                .query_async(&mut conn)
                .await
                .expect("set");
            tokio::select! {
                _ = stop.notified() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    };
    let check = async {
        wait_readyz(addr, 503, Duration::from_secs(5))
            .await
            .expect("not ready while the URLs differ");
        stop.notify_one();
    };
    tokio::join!(impostor, check);
    assert!(
        cluster
            .log("gateway-0")
            .contains("RELAY_PUBLIC_URL differs")
    );
    // The real ingest worker rewrites its own URL: ready again.
    wait_readyz(addr, 200, Duration::from_secs(5))
        .await
        .expect("ready once they agree");
}

/// The HTTP status of a WebSocket upgrade sent as if from `forwarded` (an
/// `X-Forwarded-For` value); 101 when it succeeds (the socket is closed again).
async fn upgrade_status(url: &str, forwarded: &str) -> u16 {
    use tokio_tungstenite::tungstenite::{Error, client::IntoClientRequest};
    let mut request = url.into_client_request().expect("a request");
    request.headers_mut().insert(
        "x-forwarded-for",
        forwarded.parse().expect("a header value"),
    );
    match tokio_tungstenite::connect_async(request).await {
        Ok((mut ws, response)) => {
            let _ = ws.close(None).await;
            response.status().as_u16()
        }
        Err(Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("upgrade failed: {e}"),
    }
}

#[tokio::test]
async fn connections_count_by_the_balancer_s_hop_and_ipv6_by_64() {
    let _slot = attack_slot().await;
    let options = ClusterOptions::with_env(&[
        ("RELAY_TRUST_FORWARDED", "true"),
        ("RELAY_MAX_CONNECTIONS_PER_IP", "2"),
    ]);
    let cluster = Cluster::start(options).await.expect("cluster starts");
    let url = cluster.url();
    let mut bystander = Bystander::connect(&url, Some("192.0.2.200")).await;
    let attack = async {
        // Only the last entry counts: what the client wrote before it cannot spread it
        // over many addresses.
        let _a = Client::connect_from(&url, "10.0.0.1, 192.0.2.9")
            .await
            .expect("first");
        let _b = Client::connect_from(&url, "10.0.0.2, 192.0.2.9")
            .await
            .expect("second");
        assert_eq!(upgrade_status(&url, "10.0.0.3, 192.0.2.9").await, 429);
        // Nor can a malformed last entry hide it.
        assert_eq!(
            upgrade_status(&url, "192.0.2.10, not-an-address").await,
            400
        );
        assert_eq!(upgrade_status(&url, "192.0.2.10,").await, 400);
        // IPv6: one /64 is one client.
        let _c = Client::connect_from(&url, "2001:db8:0:1::1")
            .await
            .expect("v6 first");
        let _d = Client::connect_from(&url, "2001:db8:0:1::2")
            .await
            .expect("v6 second");
        assert_eq!(upgrade_status(&url, "2001:db8:0:1:ffff::3").await, 429);
        let _e = Client::connect_from(&url, "2001:db8:0:2::1")
            .await
            .expect("another /64");
    };
    while_attacked(&mut bystander, attack).await;
    // The places come back when the connections close.
    relay_tests::eventually(Duration::from_secs(5), "a place freed", || async {
        upgrade_status(&url, "192.0.2.9").await == 101
    })
    .await;
}

#[tokio::test]
async fn auth_identities_per_connection_are_capped_and_auth_is_rate_limited() {
    let _slot = attack_slot().await;
    let options = ClusterOptions::with_env(&[
        ("RELAY_TRUST_FORWARDED", "true"),
        ("RELAY_RATE_AUTHS_PER_IP", "30"),
    ]);
    let cluster = Cluster::start(options).await.expect("cluster starts");
    let mut bystander = Bystander::connect(&cluster.url(), Some("192.0.2.2")).await;
    let mut attacker = Client::connect_from(&cluster.url(), "192.0.2.1")
        .await
        .expect("connects");
    let attack = async {
        let first = Keys::generate();
        assert!(attacker.auth(&first).await.accepted);
        for _ in 0..3 {
            assert!(attacker.auth(&Keys::generate()).await.accepted);
        }
        let fifth = attacker.auth(&Keys::generate()).await;
        assert!(
            !fifth.accepted && fifth.message.starts_with("restricted:"),
            "{fifth:?}"
        );
        // One already held is fine again.
        assert!(attacker.auth(&first).await.accepted);
        // Then the address runs out of AUTH messages for this minute.
        let mut limited = None;
        for _ in 0..40 {
            let ack = attacker.auth(&Keys::generate()).await;
            if ack.message.starts_with("rate-limited:") {
                limited = Some(ack);
                break;
            }
        }
        assert!(limited.is_some(), "AUTH was never rate-limited");
    };
    while_attacked(&mut bystander, attack).await;
    still_works(&mut attacker).await;
}

#[tokio::test]
async fn a_repost_whose_embedded_event_repeats_tags_is_refused() {
    let _slot = attack_slot().await;
    let cluster = Cluster::default_cluster().await;
    let mut c = cluster.client(0).await;
    let keys = Keys::generate();
    for embedded in [
        r#"{"kind":1,"tags":[],"content":"x","tags":[["-"]]}"#,
        r#"{"kind":1,"tags":[["-"]],"tags":[]}"#,
    ] {
        let repost = keys.sign(now(), shared::event::Kind(6), vec![], embedded);
        let ack = c.publish(&repost).await;
        assert!(
            !ack.accepted && ack.message.starts_with("blocked:"),
            "{ack:?}"
        );
    }
    let plain = keys.sign(
        now(),
        shared::event::Kind(6),
        vec![],
        r#"{"kind":1,"tags":[]}"#,
    );
    assert!(c.publish(&plain).await.accepted);
}

#[tokio::test]
async fn heavy_deletions_and_gift_wraps_do_not_fail_other_events() {
    let _slot = attack_slot().await;
    let cluster = Cluster::default_cluster().await;
    let mut bystander = Bystander::connect(&cluster.url(), None).await;
    let mut attacker = Client::connect(&cluster.url()).await.expect("connects");
    let keys = Keys::generate();
    let pk = keys.pubkey().to_hex();
    // An addressable event, then deletions naming it among 2,400 addresses each.
    let article = keys.sign(
        now() - 10,
        shared::event::Kind(30023),
        vec![vec!["d".into(), "d-7".into()]],
        "to be deleted",
    );
    assert!(attacker.publish(&article).await.accepted);
    let deletion = |n: i64| {
        let tags = (0..2400)
            .map(|i| vec!["a".to_owned(), format!("30023:{pk}:d-{i}")])
            .collect();
        keys.sign(
            now() - 5,
            shared::event::Kind(5),
            tags,
            format!("deletion {n}"),
        )
    };
    let recipients: Vec<String> = (0..2400)
        .map(|_| Keys::generate().pubkey().to_hex())
        .collect();
    let wrap = |n: usize| {
        let tags = recipients
            .iter()
            .map(|r| vec!["p".to_owned(), r.clone()])
            .collect();
        Keys::generate().sign(now(), shared::event::Kind(1059), tags, format!("wrap {n}"))
    };
    // Signed and serialized before the clock starts: the test's own CPU (it shares one
    // thread with the bystander) must not count against the relay.
    let mut heavy: Vec<shared::event::Event> = (0..20).map(deletion).collect();
    heavy.extend((0..10).map(wrap));
    let frames: Vec<String> = heavy
        .iter()
        .map(|ev| format!("[\"EVENT\",{}]", ev.to_json()))
        .collect();
    let attack = async {
        // All at once, so they share batches (and transactions) with each other.
        for frame in &frames {
            attacker.send_text(frame.as_str()).await;
        }
        let mut waiting: std::collections::HashSet<String> =
            heavy.iter().map(|ev| ev.id.to_hex()).collect();
        while !waiting.is_empty() {
            if let shared::message::RelayMessage::Ok {
                event_id,
                accepted,
                message,
            } = attacker.recv().await
            {
                assert!(accepted, "{event_id}: {message}");
                waiting.remove(&event_id);
            }
        }
    };
    while_attacked(&mut bystander, attack).await;
    let gone = attacker
        .req("gone", &[json!({"ids": [article.id.to_hex()]})])
        .await;
    assert!(gone.is_empty(), "the address was deleted");
    let republished = attacker.publish(&article).await;
    assert!(
        !republished.accepted && republished.message.starts_with("blocked:"),
        "{republished:?}"
    );
}

#[tokio::test]
async fn events_with_nul_and_unlisted_escapes_round_trip_with_valid_ids() {
    let cluster = Cluster::default_cluster().await;
    let mut c = cluster.client(0).await;
    let mut listener = cluster.client(0).await;
    let keys = Keys::generate();
    listener
        .send_req(
            "live",
            &[json!({"authors": [keys.pubkey().to_hex()], "limit": 0})],
        )
        .await;
    listener.until_eose("live").await;
    // NUL, other C0 controls, DEL and U+2028 are serialized verbatim for the id (NIP-01 lists
    // only seven escapes), and travel as JSON escapes.
    let content = "nul\u{0}one\u{1}us\u{1f}del\u{7f}ls\u{2028}quote\"back\\\\nl\ntab\t";
    let ev = keys.sign(
        now(),
        shared::event::Kind(1),
        vec![vec!["t".into(), "tag\u{0}with\u{1}controls".into()]],
        content,
    );
    let ack = c.publish(&ev).await;
    assert!(ack.accepted, "{ack:?}");
    let stored = c.req("back", &[json!({"ids": [ev.id.to_hex()]})]).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0], ev, "served byte for byte");
    stored[0].verify().expect("the served event verifies");
    let live = listener.next_event("live").await;
    assert_eq!(live, ev);
    live.verify().expect("the live copy verifies");
}

#[tokio::test]
async fn query_time_reservations_are_settled_or_given_back() {
    let _slot = attack_slot().await;
    // Five queries may be in flight at once; a leaked reservation would use the budget up.
    let options = ClusterOptions::with_env(&[
        ("RELAY_RATE_QUERY_MS_PER_IP", "500"),
        ("RELAY_RATE_QUERY_RESERVE_MS", "100"),
        ("RELAY_REPLY_TIMEOUT_MS", "30000"),
    ]);
    let mut cluster = Cluster::start(options).await.expect("cluster starts");
    let mut c = cluster.client(0).await;
    // Live-only subscriptions run no query and reserve nothing.
    for i in 0..30 {
        let sub = format!("live-{i}");
        c.send_req(&sub, &[json!({"kinds": [1], "limit": 0})]).await;
        c.until_eose(&sub).await;
        c.send_json(json!(["CLOSE", sub])).await;
    }
    // Queries one after another: each reservation is settled by what the query used.
    for i in 0..30 {
        let sub = format!("q-{i}");
        c.send_req(&sub, &[json!({"kinds": [1], "limit": 1})]).await;
        c.until_eose(&sub).await;
        assert!(
            c.count(&format!("n-{i}"), &[json!({"kinds": [1]})])
                .await
                .is_ok()
        );
    }
    // With the query worker gone, queries stay in flight: past five, they are refused.
    let mut worker = cluster.workers.remove(1);
    worker.kill().await.expect("query worker killed");
    for i in 0..10 {
        c.send_req(&format!("burst-{i}"), &[json!({"kinds": [1], "limit": 1})])
            .await;
    }
    let mut refused = 0;
    while refused < 5 {
        if let shared::message::RelayMessage::Closed { sub_id, message } = c.recv().await {
            assert!(message.starts_with("rate-limited:"), "{sub_id}: {message}");
            refused += 1;
        }
    }
    // A new worker answers the five and settles their reservations: served again.
    let _worker = cluster
        .spawn_worker("query-worker", 1)
        .await
        .expect("query worker starts");
    relay_tests::eventually(Duration::from_secs(10), "a query served again", || async {
        let mut probe = cluster.client(0).await;
        probe
            .send_req("after", &[json!({"kinds": [1], "limit": 1})])
            .await;
        loop {
            match probe.recv().await {
                shared::message::RelayMessage::Eose(_) => return true,
                shared::message::RelayMessage::Closed { .. } => return false,
                _ => {}
            }
        }
    })
    .await;
}

#[tokio::test]
async fn a_burst_of_slow_queries_holds_no_worker_and_is_cut_off_by_its_budget() {
    let _slot = attack_slot().await;
    let (_cluster, mut bystander, mut attacker) = slow_query_cluster(&[
        ("RELAY_QUERY_TIMEOUT_MS", "1000"),
        ("RELAY_RATE_QUERY_MS_PER_IP", "5000"),
        ("RELAY_RATE_QUERY_RESERVE_MS", "100"),
    ])
    .await;
    // Forty slow counts at once: the gateway's reservations let all forty go out, but a
    // worker runs two of one address's at a time (in tasks of their own, so they hold no
    // loop) and refuses the rest once the address's five seconds are used.
    let attack = async {
        for i in 0..40 {
            let filters = EVERYTHING.join(",");
            attacker
                .send_text(format!("[\"COUNT\",\"slow-{i}\",{filters}]"))
                .await;
        }
        let started = Instant::now();
        let (mut ran, mut limited) = (0, 0);
        while ran + limited < 40 {
            match attacker.recv().await {
                shared::message::RelayMessage::Count { .. } => ran += 1,
                shared::message::RelayMessage::Closed { message, .. } => {
                    if message.starts_with("rate-limited:") {
                        limited += 1;
                    } else {
                        assert!(message.starts_with("error:"), "{message}");
                        ran += 1;
                    }
                }
                _ => {}
            }
        }
        eprintln!(
            "[burst] {ran} ran (counted or ran out of time), {limited} refused, in {:?}",
            started.elapsed()
        );
        assert!(ran <= 15 && limited >= 25, "{ran} slow queries ran");
        assert!(started.elapsed() < Duration::from_secs(10));
    };
    while_attacked(&mut bystander, attack).await;
}
