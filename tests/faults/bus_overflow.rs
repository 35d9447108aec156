//! Redis drops a gateway's pub/sub subscriber (here: a live message over a tiny
//! `client-output-buffer-limit`, as a 32 MB burst would in production). The gateway must
//! notice, answer what it was waiting for with `error:` at once (not after the reply
//! timeout), end subscriptions that may have missed live events, resubscribe, and serve
//! again.

use std::time::{Duration, Instant};

use relay_tests::faults::{PrivateServices, wait_readyz};
use relay_tests::{Client, Cluster, ClusterOptions};
use serde_json::json;
use shared::event::Kind;
use shared::event::signing::Keys;
use shared::message::RelayMessage;

use crate::{bounded, env};

/// Private Redis whose pub/sub clients may buffer at most 64 KiB; the reply timeout is 20 s,
/// so any answer within 5 s comes from noticing the lost subscription.
#[tokio::test]
async fn a_dropped_subscriber_answers_error_at_once_and_resubscribes() {
    let services = PrivateServices::start("bus-overflow", true, false)
        .await
        .expect("private Redis starts");
    bounded(60, "bus_overflow", async {
        let cluster = Cluster::start_with(
            services.services(),
            ClusterOptions {
                env: env(&[("RELAY_REPLY_TIMEOUT_MS", "20000")]),
                ..Default::default()
            },
        )
        .await
        .expect("cluster starts");
        let redis = redis::Client::open(services.services().redis_url.as_str()).expect("url");
        let mut conn = redis
            .get_multiplexed_async_connection()
            .await
            .expect("redis connects");
        let mut listener = cluster.client(0).await;
        listener
            .send_req("live", &[json!({"kinds": [1], "limit": 0})])
            .await;
        listener.until_eose("live").await;
        let mut publisher = cluster.client(0).await;
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("client-output-buffer-limit")
            .arg("pubsub 65536 0 0")
            .query_async(&mut conn)
            .await
            .expect("config set");
        // Its live copy alone is over the subscriber's limit.
        let big = Keys::generate().sign(shared::unix_now(), Kind(1), vec![], "x".repeat(90_000));
        let started = Instant::now();
        publisher
            .send_text(format!("[\"EVENT\",{}]", big.to_json()))
            .await;
        let ack = publisher.ok_for(&big.id.to_hex()).await;
        let closed = loop {
            match listener.recv().await {
                RelayMessage::Closed { sub_id, message } if sub_id == "live" => break message,
                RelayMessage::Event { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        };
        let waited = started.elapsed();
        eprintln!("[bus-overflow] OK {ack:?}, CLOSED {closed:?} after {waited:?}");
        assert!(closed.starts_with("error:"), "{closed}");
        assert!(waited < Duration::from_secs(5), "answered after {waited:?}");
        assert!(ack.accepted || ack.message.starts_with("error:"), "{ack:?}");
        assert!(
            cluster
                .log("gateway-0")
                .contains("lost the Redis subscription")
        );
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("client-output-buffer-limit")
            .arg("pubsub 33554432 8388608 60")
            .query_async(&mut conn)
            .await
            .expect("config set");
        wait_readyz(cluster.gateways[0].addr, 200, Duration::from_secs(10))
            .await
            .expect("resubscribed");
        // Served again: the event is stored (OK true or not), and live delivery works.
        listener
            .send_req("again", &[json!({"kinds": [1], "limit": 0})])
            .await;
        listener.until_eose("again").await;
        let small = Keys::generate().sign(shared::unix_now(), Kind(1), vec![], "after");
        let mut fresh = Client::connect(&cluster.url()).await.expect("connects");
        assert!(fresh.publish(&small).await.accepted);
        assert_eq!(listener.next_event("again").await.id, small.id);
    })
    .await;
}
