//! kill -9 of an ingest worker in the middle of a publish burst: entries it held are
//! reclaimed by the surviving worker, nothing that got `OK true` is lost, nothing is stored
//! twice.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use relay_tests::faults::{
    PublishPlan, PublishReport, group_consumers, notes, publish, unique_tag, wait_exit, wait_stored,
};
use relay_tests::{Cluster, ClusterOptions};
use shared::event::Event;
use shared::event::signing::Keys;
use tokio::time::Instant;

use crate::{bounded, env, heavy};

const CONNECTIONS: usize = 50;
const PER_CONNECTION: usize = 100;
/// The worker is killed once this many events were accepted.
const KILL_AFTER: usize = 1_000;
/// Consumer names of the two ingest workers.
const VICTIM: &str = "ingest-victim";
const SURVIVOR: &str = "ingest-survivor";

/// 5,000 events (50 connections × 100, windows of 20) through 2 gateways into 2 ingest
/// workers (`RELAY_CLAIM_IDLE_MS=1000`); ingest worker 0 gets SIGKILL after 1,000 `OK
/// true`. Every `OK true` event must be in Postgres exactly once; every EVENT must get an
/// `OK` within the reply timeout (10 s default, waited 15 s); what was not accepted is
/// published again and must then be accepted, leaving exactly 5,000 rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_ingest_worker_mid_load_5000_events_50_conns() {
    let _slot = heavy().await;
    bounded(180, "kill9_ingest_worker", async {
        let mut cluster = Cluster::start(ClusterOptions {
            gateways: 2,
            ingest_workers: 0,
            query_workers: 1,
            env: env(&[
                ("RELAY_CLAIM_IDLE_MS", "1000"),
                ("RELAY_WORKER_FRESH_MS", "1500"),
            ]),
        })
        .await
        .expect("cluster starts");
        eprintln!("[kill9] logs: target/test-logs/{}/", cluster.name);
        // Two ingest workers with known consumer names, so the victim's pending entries can
        // be counted in the group.
        let base_env = cluster.options.env.clone();
        for (i, name) in [VICTIM, SURVIVOR].into_iter().enumerate() {
            cluster.options.env = base_env.clone();
            cluster
                .options
                .env
                .push(("RELAY_CONSUMER_NAME".into(), name.into()));
            let child = cluster
                .spawn_worker("ingest-worker", i)
                .await
                .expect("ingest worker starts");
            cluster.workers.push(child);
        }
        cluster.options.env = base_env;
        let victim = cluster.workers.len() - 2;
        let tag = unique_tag("kill9");
        let batches: Vec<_> = (0..CONNECTIONS)
            .map(|_| notes(&Keys::generate(), PER_CONNECTION, &tag, 0))
            .collect();
        let all_events: Vec<Event> = batches.iter().flatten().cloned().collect();
        let all_ids: HashSet<String> = all_events.iter().map(|e| e.id.to_hex()).collect();
        let accepted = Arc::new(AtomicUsize::new(0));
        let plan = PublishPlan {
            window: 20,
            answer_wait: Duration::from_secs(15),
            max_sends: 1,
            pace: Duration::ZERO,
            deadline: Instant::now() + Duration::from_secs(90),
        };
        let started = Instant::now();
        let tasks: Vec<_> = batches
            .into_iter()
            .enumerate()
            .map(|(i, events)| {
                tokio::spawn(publish(
                    cluster.gateways[i % 2].url(),
                    events,
                    plan.clone(),
                    Arc::clone(&accepted),
                ))
            })
            .collect();

        // Kill ingest worker 0 (workers: ingest first, then query) mid-burst.
        let wait_start = Instant::now();
        while accepted.load(Ordering::Relaxed) < KILL_AFTER
            && wait_start.elapsed() < Duration::from_secs(60)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let at_kill = accepted.load(Ordering::Relaxed);
        cluster.workers[victim]
            .start_kill()
            .expect("kill -9 ingest worker 0");
        let killed_at = Instant::now();
        let status = wait_exit(&mut cluster.workers[victim], Duration::from_secs(5)).await;
        // The dead worker's entries stay pending in the group until the survivor claims them
        // (after 1 s idle).
        let stream = format!("{}:ingest:0", cluster.prefix);
        let redis_url = cluster.services.redis_url.clone();
        let at_kill_consumers = group_consumers(&redis_url, &stream, "ingest")
            .await
            .expect("XINFO CONSUMERS");
        // The victim reads through RELAY_CONCURRENCY consumers: its name, then `<name>-<n>`.
        let victim_loop = format!("{VICTIM}-");
        let held: usize = at_kill_consumers
            .iter()
            .filter(|c| c.name == VICTIM || c.name.starts_with(&victim_loop))
            .map(|c| c.pending)
            .sum();
        eprintln!(
            "[kill9] SIGKILL ingest worker 0 after {at_kill} OK true ({status:?}); it held {held} \
             unacknowledged entries ({at_kill_consumers:?})"
        );
        if held == 0 {
            eprintln!("[kill9] warning: the kill fell between two batches; nothing to reclaim");
        }

        let mut report = PublishReport::default();
        for t in tasks {
            report.merge(t.await.expect("publisher task"));
        }
        let elapsed = started.elapsed();
        let after_kill = report.answers_between(killed_at, killed_at + Duration::from_secs(5));
        let check = wait_stored(&cluster.db_url, &report.accepted, Duration::from_secs(15))
            .await
            .expect("database check");
        eprintln!(
            "[kill9] published {}, OK true {}, OK false {} (error: {}), no OK {}, \
             no OK in time {}, cut off {}, in {:.1}s; answers in the 5 s after the kill: \
             {} true / {} error / {} other; slowest OK {:?}",
            report.events,
            report.accepted.len(),
            report.refused.len(),
            report.error_answers(),
            report.unanswered.len(),
            report.no_answer_in_time,
            report.cut_off,
            elapsed.as_secs_f64(),
            after_kill.0,
            after_kill.1,
            after_kill.2,
            report.slowest(),
        );
        if !report.refused.is_empty() {
            eprintln!("[kill9] refusals, e.g. {:?}", report.sample_refusals());
        }
        eprintln!(
            "[kill9] OK true found in Postgres {}, lost {}, duplicates {} (rows {}, distinct {})",
            check.found,
            check.lost(),
            check.duplicates,
            check.total_rows,
            check.distinct_rows
        );
        let after_consumers = group_consumers(&redis_url, &stream, "ingest")
            .await
            .expect("XINFO CONSUMERS");
        let still_pending: usize = after_consumers.iter().map(|c| c.pending).sum();
        eprintln!(
            "[kill9] afterwards: entries still pending in the group {still_pending} \
             ({after_consumers:?})"
        );
        assert_eq!(still_pending, 0, "entries never acknowledged");
        assert_eq!(
            check.lost(),
            0,
            "OK true events missing: {:?}",
            check.missing_sample
        );
        assert_eq!(check.duplicates, 0);
        assert_eq!(check.total_rows, check.distinct_rows);
        assert!(
            at_kill >= KILL_AFTER,
            "the load never reached {KILL_AFTER} OKs"
        );
        assert!(
            report.unanswered.is_empty() && report.no_answer_in_time == 0,
            "{} events got no OK at all ({} sends not answered within 15 s)",
            report.unanswered.len(),
            report.no_answer_in_time
        );

        // Whatever was not accepted is published again: all must now be accepted (as new or
        // as a duplicate of what the reclaiming worker stored), and stored exactly once.
        let retry_events: Vec<Event> = all_events
            .into_iter()
            .filter(|e| !report.accepted.contains(&e.id.to_hex()))
            .collect();
        let retry = retry_events.len();
        let mut second = PublishReport::default();
        if !retry_events.is_empty() {
            second = publish(
                cluster.gateways[0].url(),
                retry_events,
                PublishPlan {
                    window: 20,
                    answer_wait: Duration::from_secs(15),
                    max_sends: 3,
                    pace: Duration::ZERO,
                    deadline: Instant::now() + Duration::from_secs(30),
                },
                Arc::new(AtomicUsize::new(0)),
            )
            .await;
        }
        let duplicates_answered = second
            .answers
            .iter()
            .filter(|a| a.accepted && a.message.starts_with("duplicate:"))
            .count();
        let all = wait_stored(&cluster.db_url, &all_ids, Duration::from_secs(15))
            .await
            .expect("database check");
        eprintln!(
            "[kill9] republished {}: OK true {} ({} duplicate:), then stored {} of {}, \
             rows {}, distinct {}",
            retry,
            second.accepted.len(),
            duplicates_answered,
            all.found,
            all.asked,
            all.total_rows,
            all.distinct_rows
        );
        assert_eq!(
            second.accepted.len(),
            retry,
            "republished events not accepted"
        );
        assert_eq!(
            all.lost(),
            0,
            "events missing after republishing: {:?}",
            all.missing_sample
        );
        assert_eq!(all.duplicates, 0);
        assert_eq!(all.total_rows, all_ids.len() as i64);
        assert_eq!(all.distinct_rows, all_ids.len() as i64);
    })
    .await;
}
