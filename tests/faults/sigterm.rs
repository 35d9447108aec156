//! SIGTERM: a gateway closes its sockets with 1001 and exits 0 within the drain time; an
//! ingest worker under load finishes and acknowledges its batch, exits 0, and nothing it
//! answered `OK true` is lost.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use relay_tests::faults::{
    Agent, End, PublishPlan, PublishReport, notes, publish, signal, unique_tag, wait_exit,
    wait_stored,
};
use relay_tests::{Cluster, ClusterOptions};
use serde_json::json;
use shared::event::signing::Keys;
use tokio::time::Instant;

use crate::{bounded, env, heavy};

const DRAIN_SECS: u64 = 5;

/// Two gateways (`RELAY_DRAIN_SECS=5`); 5 subscribed clients on gateway 0, 1 on gateway 1.
/// SIGTERM gateway 0: each of its clients gets a close frame with 1001, the process exits 0
/// within the drain time, new connections to it fail; the client on gateway 1 keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_gateway_closes_clients_with_1001_and_exits_0() {
    bounded(60, "sigterm_gateway", async {
        let mut cluster = Cluster::start(ClusterOptions {
            gateways: 2,
            ingest_workers: 1,
            query_workers: 1,
            env: env(&[("RELAY_DRAIN_SECS", &DRAIN_SECS.to_string())]),
        })
        .await
        .expect("cluster starts");
        eprintln!("[sigterm-gw] logs: target/test-logs/{}/", cluster.name);
        let tag = unique_tag("term");
        let filter = json!({"#t": [tag]});
        let mut clients = Vec::new();
        for _ in 0..5 {
            let a = Agent::connect(&cluster.gateways[0].url())
                .await
                .expect("connect");
            a.subscribe("s", std::slice::from_ref(&filter));
            clients.push(a);
        }
        let other = Agent::connect(&cluster.gateways[1].url())
            .await
            .expect("connect");
        other.subscribe("s", std::slice::from_ref(&filter));
        for a in clients.iter().chain([&other]) {
            assert!(
                a.wait_until(Duration::from_secs(10), |s| s.eose.contains("s"))
                    .await
            );
        }

        let pid = cluster.gateways[0].pid().expect("gateway pid");
        let t = Instant::now();
        signal(pid, "TERM").expect("SIGTERM");
        let mut codes = Vec::new();
        for a in &clients {
            a.wait_until(Duration::from_secs(DRAIN_SECS + 2), |s| s.end.is_some())
                .await;
            codes.push(a.end());
        }
        let closed_in = t.elapsed();
        let status = wait_exit(
            &mut cluster.gateways[0].child,
            Duration::from_secs(DRAIN_SECS + 3),
        )
        .await;
        let exit_in = t.elapsed();
        let refused = relay_tests::faults::WsClient::connect(&cluster.gateways[0].url())
            .await
            .is_err();
        eprintln!(
            "[sigterm-gw] {} clients closed with {codes:?} within {closed_in:?}; exit \
             {status:?} after \
             {exit_in:?}; new connection refused: {refused}",
            clients.len()
        );
        let ev = notes(&Keys::generate(), 1, &tag, 0).remove(0);
        other.publish(&ev);
        let delivered = other
            .wait_until(Duration::from_secs(10), |s| {
                s.ids("s").contains(&ev.id.to_hex()) && s.oks.contains_key(&ev.id.to_hex())
            })
            .await;
        eprintln!(
            "[sigterm-gw] client on the other gateway: end {:?}, OK {:?}, live event \
             received {delivered}",
            other.end(),
            other.seen(|s| s.oks.get(&ev.id.to_hex()).cloned())
        );
        for code in &codes {
            assert_eq!(code, &Some(End::Close(Some(1001))));
        }
        let status = status.expect("gateway exits within the drain time");
        assert!(status.success(), "gateway exit status {status}");
        assert!(
            exit_in <= Duration::from_secs(DRAIN_SECS + 1),
            "exit took {exit_in:?}"
        );
        assert!(refused, "a stopped gateway accepted a connection");
        assert_eq!(other.end(), None);
        assert!(delivered);
    })
    .await;
}

/// One gateway, 2 ingest workers (`RELAY_CLAIM_IDLE_MS=1000`); 1,000 events (10 connections
/// × 100, windows of 10). SIGTERM ingest worker 0 after 300 `OK true`: it exits 0, every
/// event gets `OK true` (the other worker takes over), all 1,000 are stored exactly once;
/// then a restarted worker handles new events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ingest_worker_under_load_exits_0_and_loses_nothing() {
    let _slot = heavy().await;
    bounded(120, "sigterm_worker", async {
        let mut cluster = Cluster::start(ClusterOptions {
            gateways: 1,
            ingest_workers: 2,
            query_workers: 1,
            env: env(&[("RELAY_CLAIM_IDLE_MS", "1000")]),
        })
        .await
        .expect("cluster starts");
        eprintln!("[sigterm-worker] logs: target/test-logs/{}/", cluster.name);
        let tag = unique_tag("termw");
        let batches: Vec<_> = (0..10)
            .map(|_| notes(&Keys::generate(), 100, &tag, 0))
            .collect();
        let all_ids: HashSet<String> = batches.iter().flatten().map(|e| e.id.to_hex()).collect();
        let accepted = Arc::new(AtomicUsize::new(0));
        let plan = PublishPlan {
            window: 10,
            answer_wait: Duration::from_secs(15),
            max_sends: 1,
            pace: Duration::ZERO,
            deadline: Instant::now() + Duration::from_secs(60),
        };
        let tasks: Vec<_> = batches
            .into_iter()
            .map(|events| {
                tokio::spawn(publish(
                    cluster.url(),
                    events,
                    plan.clone(),
                    Arc::clone(&accepted),
                ))
            })
            .collect();
        let start = Instant::now();
        while accepted.load(Ordering::Relaxed) < 300 && start.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let at_term = accepted.load(Ordering::Relaxed);
        let pid = cluster.workers[0].id().expect("worker pid");
        let t = Instant::now();
        signal(pid, "TERM").expect("SIGTERM");
        let status = wait_exit(&mut cluster.workers[0], Duration::from_secs(15)).await;
        let exit_in = t.elapsed();
        let mut report = PublishReport::default();
        for task in tasks {
            report.merge(task.await.expect("publisher"));
        }
        let check = wait_stored(&cluster.db_url, &report.accepted, Duration::from_secs(15))
            .await
            .expect("database check");
        eprintln!(
            "[sigterm-worker] SIGTERM after {at_term} OK true: exit {status:?} in {exit_in:?}; \
             published {}, OK true {}, refused {} {:?}, no OK {}; found {}, lost {}, \
             duplicates {}, rows {} (distinct {})",
            report.events,
            report.accepted.len(),
            report.refused.len(),
            report.sample_refusals(),
            report.unanswered.len(),
            check.found,
            check.lost(),
            check.duplicates,
            check.total_rows,
            check.distinct_rows,
        );
        let status = status.expect("worker exits after SIGTERM");
        assert_eq!(status.code(), Some(0), "worker exit status {status}");
        assert_eq!(check.lost(), 0, "missing: {:?}", check.missing_sample);
        assert_eq!(check.duplicates, 0);
        assert_eq!(
            report.accepted.len(),
            all_ids.len(),
            "not every event accepted"
        );
        assert_eq!(check.total_rows, all_ids.len() as i64);

        // A restarted worker handles new events.
        let restarted = cluster
            .spawn_worker("ingest-worker", 2)
            .await
            .expect("worker restarts");
        cluster.workers.push(restarted);
        cluster.workers[1]
            .start_kill()
            .expect("kill the other ingest worker");
        wait_exit(&mut cluster.workers[1], Duration::from_secs(5)).await;
        let more = notes(&Keys::generate(), 20, &tag, 0);
        let more_report = publish(
            cluster.url(),
            more,
            PublishPlan {
                window: 20,
                answer_wait: Duration::from_secs(15),
                max_sends: 1,
                pace: Duration::ZERO,
                deadline: Instant::now() + Duration::from_secs(20),
            },
            Arc::new(AtomicUsize::new(0)),
        )
        .await;
        eprintln!(
            "[sigterm-worker] restarted worker alone: 20 more events, OK true {}",
            more_report.accepted.len()
        );
        assert_eq!(more_report.accepted.len(), 20);
    })
    .await;
}
