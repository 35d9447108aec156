//! A client that subscribes to a busy stream and never reads: the gateway's memory stays
//! bounded, that client is disconnected, and a normal subscriber on the same gateway gets
//! every event.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use relay_tests::faults::{
    Agent, Incoming, PublishPlan, PublishReport, WsClient, notes, publish, rss_kib, unique_tag,
};
use relay_tests::{Cluster, ClusterOptions};
use serde_json::json;
use shared::event::signing::Keys;
use shared::message::RelayMessage;
use tokio::time::Instant;

use crate::{bounded, env, heavy};

const PUBLISHERS: usize = 5;
const PER_PUBLISHER: usize = 500;
const CONTENT_BYTES: usize = 8_192;
/// Events in flight per publisher: 5 × 12 = 60 stay under the send queue of 64, so even a
/// momentarily stalled writer cannot overflow a reading subscriber's queue with one burst.
const WINDOW: usize = 12;
/// Frames the gateway would hold for the slow client if nothing bounded them.
const VOLUME_KIB: u64 = (PUBLISHERS * PER_PUBLISHER * CONTENT_BYTES / 1024) as u64;

/// One gateway with `RELAY_SEND_QUEUE=64`, 2 ingest workers. A slow client (4 KiB socket
/// receive buffer) subscribes to the tag and stops reading; a normal client subscribes to the
/// same tag. 2,500 events of 8 KiB (about 20 MiB of frames; 5 connections × 500, windows
/// of 12) are published. Checked: the gateway's RSS (VmRSS, sampled every 100 ms) grows by
/// less than half that volume, the slow client is closed with 1008 (the close frame bypasses
/// its full queue), the normal subscriber receives all 2,500 and stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_dropped_memory_bounded_others_get_everything() {
    let _slot = heavy().await;
    bounded(180, "slow_consumer", async {
        let cluster = Cluster::start(ClusterOptions {
            gateways: 1,
            ingest_workers: 2,
            query_workers: 1,
            env: env(&[("RELAY_SEND_QUEUE", "64")]),
        })
        .await
        .expect("cluster starts");
        eprintln!("[slow] logs: target/test-logs/{}/", cluster.name);
        let pid = cluster.gateways[0].pid().expect("gateway pid");
        let tag = unique_tag("slow");
        let filter = json!({"#t": [tag], "since": shared::unix_now() - 5});

        let normal = Agent::connect(&cluster.url()).await.expect("connect");
        normal.subscribe("all", std::slice::from_ref(&filter));
        assert!(
            normal
                .wait_until(Duration::from_secs(10), |s| s.eose.contains("all"))
                .await
        );

        let mut slow = WsClient::connect_small_rcvbuf(cluster.gateways[0].addr, 4096)
            .await
            .expect("slow client connects");
        slow.send_req("all", std::slice::from_ref(&filter))
            .await
            .expect("REQ");
        loop {
            match slow.next(Duration::from_secs(10)).await {
                Incoming::Msg(RelayMessage::Eose(_)) => break,
                Incoming::Msg(_) | Incoming::Other(_) => {}
                other => panic!("slow client before EOSE: {other:?}"),
            }
        }
        // From here on the slow client reads nothing until the end.

        // Warm-up, so the baseline includes the gateway's steady-state allocations.
        let warm = notes(&Keys::generate(), 200, &tag, CONTENT_BYTES);
        let warm_ids: Vec<String> = warm.iter().map(|e| e.id.to_hex()).collect();
        let plan = PublishPlan {
            window: WINDOW,
            answer_wait: Duration::from_secs(15),
            max_sends: 1,
            pace: Duration::ZERO,
            deadline: Instant::now() + Duration::from_secs(120),
        };
        let warm_report = publish(
            cluster.url(),
            warm,
            plan.clone(),
            Arc::new(AtomicUsize::new(0)),
        )
        .await;
        assert_eq!(warm_report.accepted.len(), 200);
        assert!(
            normal
                .wait_until(Duration::from_secs(10), |s| s.count_of("all", &warm_ids)
                    == 200)
                .await
        );
        let rss_before = rss_kib(pid).expect("gateway RSS");

        let sampling = Arc::new(AtomicBool::new(true));
        let peak = Arc::new(AtomicU64::new(rss_before));
        let sampler = {
            let sampling = Arc::clone(&sampling);
            let peak = Arc::clone(&peak);
            tokio::spawn(async move {
                while sampling.load(Ordering::Relaxed) {
                    if let Some(rss) = rss_kib(pid) {
                        peak.fetch_max(rss, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let batches: Vec<_> = (0..PUBLISHERS)
            .map(|_| notes(&Keys::generate(), PER_PUBLISHER, &tag, CONTENT_BYTES))
            .collect();
        let ids: Vec<String> = batches.iter().flatten().map(|e| e.id.to_hex()).collect();
        let started = Instant::now();
        let tasks: Vec<_> = batches
            .into_iter()
            .map(|events| {
                tokio::spawn(publish(
                    cluster.url(),
                    events,
                    plan.clone(),
                    Arc::new(AtomicUsize::new(0)),
                ))
            })
            .collect();
        let mut report = PublishReport::default();
        for t in tasks {
            report.merge(t.await.expect("publisher"));
        }
        let published_in = started.elapsed();
        let got_all = normal
            .wait_until(Duration::from_secs(30), |s| {
                s.count_of("all", &ids) == ids.len()
            })
            .await;
        sampling.store(false, Ordering::Relaxed);
        let _ = sampler.await;
        let rss_after = rss_kib(pid).expect("gateway RSS");
        let rss_peak = peak.load(Ordering::Relaxed).max(rss_after);
        let normal_got = normal.seen(|s| s.count_of("all", &ids));

        // Now read what the slow client has: its buffered frames, then how the socket ended.
        let mut slow_events = 0;
        let drain_until = Instant::now() + Duration::from_secs(10);
        let slow_end = loop {
            match slow
                .next(drain_until.saturating_duration_since(Instant::now()))
                .await
            {
                Incoming::Msg(RelayMessage::Event { .. }) => slow_events += 1,
                Incoming::Msg(_) | Incoming::Other(_) => {}
                other => break other,
            }
        };
        eprintln!(
            "[slow] published {} events of {CONTENT_BYTES} B (~{} MiB) in {:.1}s, OK true {}; \
             gateway RSS before {} KiB, peak {} KiB (+{} KiB), after {} KiB",
            report.events,
            VOLUME_KIB / 1024,
            published_in.as_secs_f64(),
            report.accepted.len(),
            rss_before,
            rss_peak,
            rss_peak.saturating_sub(rss_before),
            rss_after,
        );
        eprintln!(
            "[slow] normal subscriber: {normal_got} of {} received, end {:?}; slow client: \
             {slow_events} \
             events read before {slow_end:?}",
            ids.len(),
            normal.end()
        );

        assert_eq!(report.accepted.len(), ids.len(), "not every event accepted");
        assert!(
            matches!(slow_end, Incoming::Closed(Some(1008))),
            "the slow client was not closed with 1008: {slow_end:?}"
        );
        assert!(
            slow_events < ids.len(),
            "the slow client got everything: it was not slow"
        );
        assert!(
            rss_peak.saturating_sub(rss_before) < VOLUME_KIB / 2,
            "gateway RSS grew by {} KiB for {VOLUME_KIB} KiB published",
            rss_peak.saturating_sub(rss_before)
        );
        assert!(
            got_all,
            "normal subscriber got {normal_got} of {}",
            ids.len()
        );
        assert_eq!(normal.end(), None, "normal subscriber was disconnected");
    })
    .await;
}
