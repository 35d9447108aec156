//! Postgres stopped for several seconds under load (a private Postgres): EVENTs are answered
//! `OK false "error: ..."` meanwhile, REQs end with `CLOSED "error: ..."` or EOSE (never
//! silence); after it is back, publishing and reading work and every `OK true` event is
//! stored.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use relay_tests::faults::{
    PrivateServices, PublishPlan, PublishReport, QueryEnd, WsClient, notes, publish, unique_tag,
    wait_readyz, wait_stored,
};
use relay_tests::{Cluster, ClusterOptions};
use serde_json::json;
use shared::event::signing::Keys;
use tokio::time::Instant;

use crate::{bounded, env, heavy};

const OUTAGE: Duration = Duration::from_secs(5);
const REPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// What the reader saw for its REQs.
#[derive(Debug, Default)]
struct Reads {
    eose: usize,
    closed_error: usize,
    closed_other: Vec<String>,
    no_answer: usize,
    dropped: usize,
    during_outage: (usize, usize),
}

/// Private Postgres; 1 gateway (`RELAY_REPLY_TIMEOUT_MS=3000`), 1 worker of each kind. 6
/// connections × 100 events (windows of 10, 50 ms apart, each sent at most 20 times) and a
/// reader sending a REQ every 300 ms. After 150 `OK true`, Postgres is stopped for 5 s.
/// Checked: EVENTs got `error:` while it was down, every REQ ended (EOSE or CLOSED error:)
/// within 3 s + 3 s, `/readyz` is 503 then 200, every `OK true` event is stored once, and a
/// fresh client publishes and reads back afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_under_load_answers_errors_then_recovers() {
    let _slot = heavy().await;
    let services = PrivateServices::start("pg-outage", false, true)
        .await
        .expect("private Postgres starts");
    bounded(150, "postgres_outage", async {
        let cluster = Cluster::start_with(
            services.services(),
            ClusterOptions {
                gateways: 1,
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
        eprintln!("[postgres] logs: target/test-logs/{}/", cluster.name);
        let gw = cluster.gateways[0].addr;
        assert!(wait_readyz(gw, 200, Duration::from_secs(10)).await.is_ok());
        let tag = unique_tag("pg");
        let accepted = Arc::new(AtomicUsize::new(0));
        let plan = PublishPlan {
            window: 10,
            answer_wait: REPLY_TIMEOUT * 2,
            max_sends: 20,
            pace: Duration::from_millis(50),
            deadline: Instant::now() + Duration::from_secs(60),
        };
        let tasks: Vec<_> = (0..6)
            .map(|_| {
                let events = notes(&Keys::generate(), 100, &tag, 0);
                tokio::spawn(publish(
                    cluster.url(),
                    events,
                    plan.clone(),
                    Arc::clone(&accepted),
                ))
            })
            .collect();

        // The reader: a REQ every 300 ms until told to stop, reconnecting if needed.
        let stop_reading = Arc::new(AtomicBool::new(false));
        let outage_window = Arc::new(std::sync::Mutex::new(None::<(Instant, Instant)>));
        let reader = {
            let url = cluster.url();
            let stop = Arc::clone(&stop_reading);
            let window = Arc::clone(&outage_window);
            let tag = tag.clone();
            tokio::spawn(async move {
                let mut reads = Reads::default();
                let mut client: Option<WsClient> = None;
                let mut n = 0;
                let mut log = Vec::new();
                while !stop.load(Ordering::Relaxed) && n < 400 {
                    n += 1;
                    if client.is_none() {
                        client = WsClient::connect(&url).await.ok();
                    }
                    let Some(c) = client.as_mut() else {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        continue;
                    };
                    let sub = format!("r{n}");
                    let filter = json!({"#t": [tag], "limit": 5});
                    let at = Instant::now();
                    let end = c.query("REQ", &sub, &[filter], REPLY_TIMEOUT * 2).await;
                    let _ = c.send_text(json!(["CLOSE", sub]).to_string()).await;
                    match &end {
                        QueryEnd::Eose(_) => reads.eose += 1,
                        QueryEnd::Closed(m) if m.starts_with("error:") => reads.closed_error += 1,
                        QueryEnd::Closed(m) => reads.closed_other.push(m.clone()),
                        QueryEnd::NoAnswer => reads.no_answer += 1,
                        QueryEnd::Count(_) => {}
                        QueryEnd::Dropped(_) => {
                            reads.dropped += 1;
                            client = None;
                        }
                    }
                    log.push((at, matches!(end, QueryEnd::Eose(_))));
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                if let Some((down, up)) = *window.lock().unwrap_or_else(|e| e.into_inner()) {
                    for (at, eose) in log {
                        if at >= down && at < up {
                            if eose {
                                reads.during_outage.0 += 1;
                            } else {
                                reads.during_outage.1 += 1;
                            }
                        }
                    }
                }
                reads
            })
        };

        let start = Instant::now();
        while accepted.load(Ordering::Relaxed) < 150 && start.elapsed() < Duration::from_secs(40) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let at_stop = accepted.load(Ordering::Relaxed);
        services.stop_postgres().await.expect("Postgres stops");
        let down_at = Instant::now();
        let during = wait_readyz(gw, 503, OUTAGE).await;
        tokio::time::sleep(OUTAGE.saturating_sub(down_at.elapsed())).await;
        services
            .start_postgres()
            .await
            .expect("Postgres starts again");
        let up_at = Instant::now();
        *outage_window.lock().unwrap_or_else(|e| e.into_inner()) = Some((down_at, up_at));
        let back = wait_readyz(gw, 200, Duration::from_secs(20)).await;
        eprintln!(
            "[postgres] stopped after {at_stop} OK true, down {:?}; /readyz 503 after {during:?}, \
             200 again after {back:?}",
            up_at - down_at
        );

        let mut report = PublishReport::default();
        for t in tasks {
            report.merge(t.await.expect("publisher"));
        }
        stop_reading.store(true, Ordering::Relaxed);
        let reads = reader.await.expect("reader");
        let outage = report.answers_between(down_at, up_at);
        let check = wait_stored(&cluster.db_url, &report.accepted, Duration::from_secs(15))
            .await
            .expect("database check");
        eprintln!(
            "[postgres] published {}, sends {}, OK true {}, refused {} {:?}, never answered {}, \
             sends not answered in time {}, cut off {}; EVENT answers while down: {} true / {} \
             error: / {} other",
            report.events,
            report.sent,
            report.accepted.len(),
            report.refused.len(),
            report.sample_refusals(),
            report.unanswered.len(),
            report.no_answer_in_time,
            report.cut_off,
            outage.0,
            outage.1,
            outage.2,
        );
        eprintln!(
            "[postgres] REQs: EOSE {}, CLOSED error: {}, other CLOSED {:?}, no answer {}, socket \
             dropped {}; sent while down: {} EOSE / {} CLOSED",
            reads.eose,
            reads.closed_error,
            reads.closed_other,
            reads.no_answer,
            reads.dropped,
            reads.during_outage.0,
            reads.during_outage.1,
        );
        eprintln!(
            "[postgres] OK true found {}, lost {}, duplicates {} (rows {}, distinct {})",
            check.found,
            check.lost(),
            check.duplicates,
            check.total_rows,
            check.distinct_rows
        );

        let mut fresh = WsClient::connect(&cluster.url()).await.expect("connect");
        let ev = notes(&Keys::generate(), 1, &tag, 0).remove(0);
        let ack = fresh.publish(&ev, Duration::from_secs(10)).await;
        let read = fresh
            .query(
                "REQ",
                "x",
                &[json!({"ids": [ev.id.to_hex()]})],
                Duration::from_secs(10),
            )
            .await;
        let read_back = matches!(&read, QueryEnd::Eose(events) if events.len() == 1);
        eprintln!("[postgres] after: fresh publish {ack:?}, read back {read_back}");

        assert!(
            at_stop >= 150,
            "load never reached 150 OKs before the outage"
        );
        assert_eq!(
            check.lost(),
            0,
            "OK true events missing: {:?}",
            check.missing_sample
        );
        assert_eq!(check.duplicates, 0);
        assert!(
            outage.1 > 0,
            "no EVENT was answered error: while Postgres was down"
        );
        assert_eq!(report.no_answer_in_time, 0, "sends without any OK in time");
        assert!(
            report.unanswered.is_empty() && report.refused.is_empty(),
            "events never accepted despite retries"
        );
        assert_eq!(reads.no_answer, 0, "REQs without EOSE or CLOSED in time");
        assert!(reads.closed_other.is_empty(), "{:?}", reads.closed_other);
        assert!(
            during.is_ok(),
            "/readyz was not 503 while Postgres was down: {during:?}"
        );
        assert!(back.is_ok(), "/readyz not 200 again: {back:?}");
        assert_eq!(ack, Some((true, String::new())));
        assert!(read_back, "{read:?}");
    })
    .await;
    drop(services);
}
