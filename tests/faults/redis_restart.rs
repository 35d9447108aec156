//! Redis restarted under load (a private, non-persistent Redis: it comes back empty, so
//! consumer groups and pending entries are gone too). Publishers retry within bounds;
//! every `OK true` event is stored; the cluster serves again without restarting any
//! process.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use relay_tests::faults::{
    Agent, PrivateServices, PublishPlan, PublishReport, QueryEnd, WsClient, http_status, notes,
    publish, unique_tag, wait_readyz, wait_stored,
};
use relay_tests::{Cluster, ClusterOptions};
use serde_json::json;
use shared::event::signing::Keys;
use tokio::time::Instant;

use crate::{bounded, env, heavy};

const OUTAGE: Duration = Duration::from_secs(3);

/// Private Redis; 2 gateways (`RELAY_REPLY_TIMEOUT_MS=3000`), 1 worker of each kind. 8
/// connections × 100 events (windows of 10, 50 ms apart, each event sent at most 20 times).
/// After 200 `OK true`, Redis is stopped for 3 s and started again (empty). Checked: every
/// send is answered within 3 s + 3 s, `/readyz` is 503 while Redis is down and 200 after,
/// every `OK true` event is stored once, and fresh clients publish, read back and receive
/// live events across the two gateways, with the original processes still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_under_load_loses_nothing_and_recovers() {
    let _slot = heavy().await;
    let services = PrivateServices::start("redis-restart", true, false)
        .await
        .expect("private Redis starts");
    bounded(150, "redis_restart", async {
        let mut cluster = Cluster::start_with(
            services.services(),
            ClusterOptions {
                gateways: 2,
                ingest_workers: 1,
                query_workers: 1,
                env: env(&[
                    ("RELAY_REPLY_TIMEOUT_MS", "3000"),
                    ("RELAY_WORKER_FRESH_MS", "1500"),
                    ("RELAY_CLAIM_IDLE_MS", "1000"),
                ]),
            },
        )
        .await
        .expect("cluster starts");
        eprintln!("[redis] logs: target/test-logs/{}/", cluster.name);
        for g in &cluster.gateways {
            assert!(
                wait_readyz(g.addr, 200, Duration::from_secs(10))
                    .await
                    .is_ok()
            );
        }
        let tag = unique_tag("redis");
        let accepted = Arc::new(AtomicUsize::new(0));
        let plan = PublishPlan {
            window: 10,
            answer_wait: Duration::from_secs(6),
            max_sends: 20,
            pace: Duration::from_millis(50),
            deadline: Instant::now() + Duration::from_secs(60),
        };
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let events = notes(&Keys::generate(), 100, &tag, 0);
                tokio::spawn(publish(
                    cluster.gateways[i % 2].url(),
                    events,
                    plan.clone(),
                    Arc::clone(&accepted),
                ))
            })
            .collect();

        let start = Instant::now();
        while accepted.load(Ordering::Relaxed) < 200 && start.elapsed() < Duration::from_secs(40) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let at_stop = accepted.load(Ordering::Relaxed);
        services.stop_redis().await.expect("Redis stops");
        let down_at = Instant::now();
        let during = wait_readyz(cluster.gateways[0].addr, 503, OUTAGE).await;
        let left = OUTAGE.saturating_sub(down_at.elapsed());
        tokio::time::sleep(left).await;
        services.start_redis().await.expect("Redis starts again");
        let up_at = Instant::now();
        let mut back = Vec::new();
        for g in &cluster.gateways {
            back.push(wait_readyz(g.addr, 200, Duration::from_secs(20)).await);
        }
        eprintln!(
            "[redis] stopped after {at_stop} OK true, down {:?}; /readyz during {during:?}, \
             200 again after {back:?}",
            up_at - down_at
        );

        let mut report = PublishReport::default();
        for t in tasks {
            report.merge(t.await.expect("publisher"));
        }
        let outage = report.answers_between(down_at, up_at);
        let check = wait_stored(&cluster.db_url, &report.accepted, Duration::from_secs(15))
            .await
            .expect("database check");
        eprintln!(
            "[redis] published {}, sends {}, OK true {}, refused {} {:?}, never answered {}, \
             sends not answered in time {}, cut off {}, reconnects {}, connect failures {}; \
             while down: {} true / {} error: / {} other",
            report.events,
            report.sent,
            report.accepted.len(),
            report.refused.len(),
            report.sample_refusals(),
            report.unanswered.len(),
            report.no_answer_in_time,
            report.cut_off,
            report.reconnects,
            report.connect_failures,
            outage.0,
            outage.1,
            outage.2,
        );
        eprintln!(
            "[redis] OK true found {}, lost {}, duplicates {} (rows {}, distinct {})",
            check.found,
            check.lost(),
            check.duplicates,
            check.total_rows,
            check.distinct_rows
        );

        // Same processes, fresh clients: publish on gateway 0, read back there and live on
        // gateway 1.
        let mut alive = 0;
        for g in cluster.gateways.iter_mut() {
            alive += usize::from(g.child.try_wait().ok().flatten().is_none());
        }
        for w in cluster.workers.iter_mut() {
            alive += usize::from(w.try_wait().ok().flatten().is_none());
        }
        let live_tag = unique_tag("after");
        let listener = Agent::connect(&cluster.gateways[1].url())
            .await
            .expect("connect");
        listener.subscribe("live", &[json!({"#t": [live_tag]})]);
        assert!(
            listener
                .wait_until(Duration::from_secs(10), |s| s.eose.contains("live"))
                .await
        );
        let ev = notes(&Keys::generate(), 1, &live_tag, 0).remove(0);
        let mut fresh = WsClient::connect(&cluster.gateways[0].url())
            .await
            .expect("connect");
        let ack = fresh.publish(&ev, Duration::from_secs(10)).await;
        let read = fresh
            .query(
                "REQ",
                "r",
                &[json!({"ids": [ev.id.to_hex()]})],
                Duration::from_secs(10),
            )
            .await;
        let live = listener
            .wait_until(Duration::from_secs(10), |s| {
                s.ids("live").contains(&ev.id.to_hex())
            })
            .await;
        let read_back = matches!(&read, QueryEnd::Eose(events) if events.len() == 1);
        eprintln!(
            "[redis] after the restart: {alive} of 4 original processes running, fresh publish \
             {ack:?}, read back {read_back}, live across gateways {live}, /healthz {:?}",
            http_status(cluster.gateways[0].addr, "/healthz").await
        );

        assert!(
            at_stop >= 200,
            "load never reached 200 OKs before the restart"
        );
        assert_eq!(
            check.lost(),
            0,
            "OK true events missing: {:?}",
            check.missing_sample
        );
        assert_eq!(check.duplicates, 0);
        assert!(
            during.is_ok(),
            "/readyz was not 503 while Redis was down: {during:?}"
        );
        assert!(
            back.iter().all(Result::is_ok),
            "/readyz not 200 again: {back:?}"
        );
        assert_eq!(report.no_answer_in_time, 0, "sends without any OK in time");
        assert!(
            report.unanswered.is_empty() && report.refused.is_empty(),
            "events never accepted despite retries"
        );
        assert_eq!(alive, 4, "a process exited");
        assert_eq!(ack, Some((true, String::new())));
        assert!(read_back, "{read:?}");
        assert!(live, "live event did not cross gateways after the restart");
    })
    .await;
    drop(services);
}
