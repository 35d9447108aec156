//! Outages answered in time: with every ingest worker gone an EVENT still gets `OK false
//! "error: ..."`, with every query worker gone a REQ or COUNT gets `CLOSED "error: ..."`,
//! both within the reply timeout; `/readyz` answers 503 meanwhile and 200 once workers are
//! back, and then everything works again.

use std::time::Duration;

use relay_tests::faults::{Incoming, QueryEnd, WsClient, wait_exit, wait_readyz};
use relay_tests::{Cluster, ClusterOptions};
use serde_json::json;
use shared::event::Kind;
use shared::event::signing::Keys;
use shared::message::RelayMessage;
use tokio::time::Instant;

use crate::{bounded, env};

const REPLY_TIMEOUT: Duration = Duration::from_millis(2_000);
/// Scheduling slack allowed on top of the reply timeout.
const MARGIN: Duration = Duration::from_millis(2_000);

/// One gateway (`RELAY_REPLY_TIMEOUT_MS=2000`, `RELAY_WORKER_FRESH_MS=1500`), one worker of
/// each kind. Kill -9 the ingest worker: an EVENT gets `OK false error:` within 2 s + 2 s and
/// `/readyz` turns 503. Kill -9 the query worker: REQ and COUNT get `CLOSED error:` in time.
/// Start new workers: `/readyz` is 200 again, publishing and reading work, and the event
/// answered `error:` gets no second `OK`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_down_are_answered_within_reply_timeout_and_readyz_follows() {
    bounded(90, "workers_down", async {
        let mut cluster = Cluster::start(ClusterOptions {
            gateways: 1,
            ingest_workers: 1,
            query_workers: 1,
            env: env(&[
                ("RELAY_REPLY_TIMEOUT_MS", "2000"),
                ("RELAY_WORKER_FRESH_MS", "1500"),
            ]),
        })
        .await
        .expect("cluster starts");
        eprintln!("[outage] logs: target/test-logs/{}/", cluster.name);
        let gw = cluster.gateways[0].addr;
        let ready = wait_readyz(gw, 200, Duration::from_secs(10)).await;
        assert!(ready.is_ok(), "/readyz never 200 at start: {ready:?}");

        let keys = Keys::generate();
        let author = keys.pubkey().to_hex();
        let now = shared::unix_now();
        let ev0 = keys.sign(now, Kind(1), vec![], "before the outage");
        let ev1 = keys.sign(now, Kind(1), vec![], "no ingest worker");
        let ev2 = keys.sign(now, Kind(1), vec![], "after the outage");
        let mut c = WsClient::connect(&cluster.url()).await.expect("connect");
        let ack = c.publish(&ev0, Duration::from_secs(10)).await;
        assert_eq!(ack, Some((true, String::new())), "baseline publish");

        // Every ingest worker gone (workers: ingest first, then query).
        cluster.workers[0].start_kill().expect("kill ingest worker");
        wait_exit(&mut cluster.workers[0], Duration::from_secs(5)).await;
        let t = Instant::now();
        let ack = c.publish(&ev1, REPLY_TIMEOUT + MARGIN + MARGIN).await;
        let event_wait = t.elapsed();
        eprintln!("[outage] no ingest worker: EVENT answered {ack:?} after {event_wait:?}");
        let (accepted, message) = ack.expect("an OK while no ingest worker runs");
        assert!(!accepted && message.starts_with("error:"), "{message:?}");
        assert!(
            event_wait <= REPLY_TIMEOUT + MARGIN,
            "OK took {event_wait:?}"
        );
        let not_ready = wait_readyz(gw, 503, Duration::from_secs(5)).await;
        eprintln!("[outage] /readyz 503 after {not_ready:?} without ingest workers");
        assert!(not_ready.is_ok(), "/readyz stayed {not_ready:?}");

        // Every query worker gone.
        cluster.workers[1].start_kill().expect("kill query worker");
        wait_exit(&mut cluster.workers[1], Duration::from_secs(5)).await;
        let filter = json!({"authors": [author]});
        let t = Instant::now();
        let req = c
            .query(
                "REQ",
                "q1",
                std::slice::from_ref(&filter),
                REPLY_TIMEOUT + MARGIN + MARGIN,
            )
            .await;
        let req_wait = t.elapsed();
        let t = Instant::now();
        let count = c
            .query(
                "COUNT",
                "n1",
                std::slice::from_ref(&filter),
                REPLY_TIMEOUT + MARGIN + MARGIN,
            )
            .await;
        let count_wait = t.elapsed();
        eprintln!(
            "[outage] no query worker: REQ {req:?} after {req_wait:?}, COUNT {count:?} after \
             {count_wait:?}"
        );
        assert!(
            matches!(&req, QueryEnd::Closed(m) if m.starts_with("error:")),
            "{req:?}"
        );
        assert!(
            matches!(&count, QueryEnd::Closed(m) if m.starts_with("error:")),
            "{count:?}"
        );
        assert!(req_wait <= REPLY_TIMEOUT + MARGIN && count_wait <= REPLY_TIMEOUT + MARGIN);

        // Workers back.
        let ingest = cluster
            .spawn_worker("ingest-worker", 10)
            .await
            .expect("ingest worker restarts");
        cluster.workers.push(ingest);
        let query = cluster
            .spawn_worker("query-worker", 11)
            .await
            .expect("query worker restarts");
        cluster.workers.push(query);
        let ready = wait_readyz(gw, 200, Duration::from_secs(10)).await;
        eprintln!("[outage] workers restarted: /readyz 200 after {ready:?}");
        assert!(ready.is_ok(), "/readyz stayed {ready:?}");

        // The restarted worker may now handle ev1 from the stream; its answer must not reach
        // the client a second time.
        let mut second_ok = 0;
        let until = Instant::now() + Duration::from_millis(1_500);
        loop {
            match c
                .next(until.saturating_duration_since(Instant::now()))
                .await
            {
                Incoming::Msg(RelayMessage::Ok { event_id, .. }) if event_id == ev1.id.to_hex() => {
                    second_ok += 1
                }
                Incoming::Timeout => break,
                Incoming::Closed(_) | Incoming::Dropped(_) => panic!("socket ended"),
                _ => {}
            }
        }
        let ack = c.publish(&ev2, Duration::from_secs(10)).await;
        assert_eq!(ack, Some((true, String::new())), "publish after recovery");
        let got = c
            .query(
                "REQ",
                "q2",
                std::slice::from_ref(&filter),
                Duration::from_secs(10),
            )
            .await;
        let QueryEnd::Eose(events) = got else {
            panic!("REQ after recovery: {got:?}")
        };
        let ids: Vec<_> = events.iter().map(|e| e.id).collect();
        let count = c
            .query(
                "COUNT",
                "n2",
                std::slice::from_ref(&filter),
                Duration::from_secs(10),
            )
            .await;
        eprintln!(
            "[outage] after recovery: stored {} of 3 (the event answered error: stored later: {}), \
             COUNT {count:?}, second OK for it {second_ok}",
            events.len(),
            ids.contains(&ev1.id)
        );
        assert!(ids.contains(&ev0.id) && ids.contains(&ev2.id), "{ids:?}");
        assert!(matches!(count, QueryEnd::Count(n) if n == events.len() as u64));
        assert_eq!(second_ok, 0, "an EVENT got a second OK");
    })
    .await;
}
