//! Three gateways behind a real load balancer (nginx); one gateway is killed with SIGKILL.
//! Its clients see their sockets close, reconnect through the balancer and carry on; the
//! clients of the other gateways notice nothing and miss no live event.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use relay_tests::faults::{Agent, Nginx, WsClient, notes, unique_tag, wait_exit};
use relay_tests::{Cluster, ClusterOptions};
use serde_json::json;
use shared::event::signing::Keys;
use tokio::time::Instant;

use crate::{bounded, heavy};

const CLIENTS: usize = 30;
const PER_CLIENT: usize = 2;
const VICTIM: usize = 1;

/// nginx (round robin, `proxy_next_upstream error timeout`) over 3 gateways; 30 clients
/// connect through it, all subscribed to one tag. Phase 1: each publishes 2 events and every
/// client must receive all 60. A steady publisher on gateway 0 sends one event per 25 ms
/// while gateway 1 is killed with SIGKILL. Its clients must see the socket end, reconnect
/// through nginx (to another gateway) and subscribe again; the others must stay connected
/// and receive every steady event. Phase 2: everyone publishes 2 more; every client must
/// receive all 60.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_three_gateways_kill9_one_clients_reconnect_others_unaffected() {
    let _slot = heavy().await;
    bounded(120, "nginx_balancer", async {
        let mut cluster = Cluster::start(ClusterOptions {
            gateways: 3,
            ingest_workers: 1,
            query_workers: 1,
            env: Vec::new(),
        })
        .await
        .expect("cluster starts");
        eprintln!("[lb] logs: target/test-logs/{}/", cluster.name);
        let addrs: Vec<_> = cluster.gateways.iter().map(|g| g.addr).collect();
        let nginx = Nginx::start(&addrs).await.expect("nginx starts");
        eprintln!(
            "[lb] nginx on {} (dir {})",
            nginx.url(),
            nginx.dir.display()
        );
        let gateway_of: HashMap<String, usize> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| (a.to_string(), i))
            .collect();

        let tag = unique_tag("lb");
        let since = shared::unix_now() - 5;
        let filter = json!({"#t": [tag], "since": since});
        let mut agents = Vec::new();
        let mut on = Vec::new();
        for _ in 0..CLIENTS {
            let client = WsClient::connect(&nginx.url())
                .await
                .expect("connect through nginx");
            let upstream = client.upstream.clone().expect("nginx sets X-Upstream");
            let gw = *gateway_of
                .get(&upstream)
                .unwrap_or_else(|| panic!("unknown upstream {upstream}"));
            let agent = Agent::spawn(client);
            agent.subscribe("live", std::slice::from_ref(&filter));
            agents.push(agent);
            on.push(gw);
        }
        for a in &agents {
            assert!(
                a.wait_until(Duration::from_secs(10), |s| s.eose.contains("live"))
                    .await
            );
        }
        let per_gateway: Vec<usize> = (0..3)
            .map(|g| on.iter().filter(|&&x| x == g).count())
            .collect();
        eprintln!("[lb] {CLIENTS} clients per gateway: {per_gateway:?}");
        assert!(
            per_gateway.iter().all(|&n| n > 0),
            "nginx did not spread the clients"
        );

        // Phase 1: live events crossing gateways.
        let keys: Vec<Keys> = (0..CLIENTS).map(|_| Keys::generate()).collect();
        let mut phase1 = HashSet::new();
        for (a, k) in agents.iter().zip(&keys) {
            for ev in notes(k, PER_CLIENT, &tag, 0) {
                phase1.insert(ev.id.to_hex());
                a.publish(&ev);
            }
        }
        let mut short1 = 0;
        for a in &agents {
            let ok = a
                .wait_until(Duration::from_secs(15), |s| {
                    s.count_of("live", &phase1) == phase1.len()
                })
                .await;
            short1 += usize::from(!ok);
        }
        eprintln!(
            "[lb] phase 1: {} events, clients missing some: {short1}",
            phase1.len()
        );
        assert_eq!(short1, 0);

        // A steady stream through gateway 0 while gateway 1 dies.
        let steady_stop = Arc::new(AtomicBool::new(false));
        let steady = {
            let url = cluster.gateways[0].url();
            let stop = Arc::clone(&steady_stop);
            let tag = tag.clone();
            tokio::spawn(async move {
                let agent = Agent::connect(&url)
                    .await
                    .expect("steady publisher connects");
                let keys = Keys::generate();
                let mut ids = Vec::new();
                for ev in notes(&keys, 400, &tag, 0) {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    agent.publish(&ev);
                    ids.push(ev.id.to_hex());
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                let wanted = ids.len();
                agent
                    .wait_until(Duration::from_secs(15), |s| s.oks.len() >= wanted)
                    .await;
                let accepted: HashSet<String> = agent.seen(|s| {
                    s.oks
                        .iter()
                        .filter(|(_, (ok, _))| *ok)
                        .map(|(id, _)| id.clone())
                        .collect()
                });
                (ids.len(), accepted)
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;

        cluster.gateways[VICTIM]
            .child
            .start_kill()
            .expect("kill -9 gateway");
        let killed_at = Instant::now();
        wait_exit(&mut cluster.gateways[VICTIM].child, Duration::from_secs(5)).await;
        let victims: Vec<usize> = (0..CLIENTS).filter(|&i| on[i] == VICTIM).collect();
        let mut noticed = Vec::new();
        for &i in &victims {
            let ended = agents[i]
                .wait_until(Duration::from_secs(10), |s| s.end.is_some())
                .await;
            let after = agents[i].seen(|s| s.end.as_ref().map(|(at, _)| *at - killed_at));
            noticed.push((ended, after, agents[i].end()));
        }
        let noticed_all = noticed.iter().all(|(ended, _, _)| *ended);
        let slowest = noticed.iter().filter_map(|(_, after, _)| *after).max();
        eprintln!(
            "[lb] SIGKILL gateway {VICTIM}: {} of its {} clients saw the socket end (slowest \
             after {slowest:?}), e.g. {:?}",
            noticed.iter().filter(|(e, _, _)| *e).count(),
            victims.len(),
            noticed.first().map(|(_, _, end)| end)
        );

        // Its clients reconnect through nginx.
        let mut reconnected_to = Vec::new();
        let mut retried = 0;
        for &i in &victims {
            let mut attempt = 0;
            let client = loop {
                attempt += 1;
                match WsClient::connect(&nginx.url()).await {
                    Ok(c) => break c,
                    Err(e) if attempt < 20 => {
                        eprintln!("[lb] reconnect attempt {attempt} failed: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => panic!("cannot reconnect through nginx: {e}"),
                }
            };
            // `$upstream_addr` lists every gateway tried: "dead:port, live:port".
            let upstream = client.upstream.clone().unwrap_or_default();
            let tried: Vec<&str> = upstream.split(',').map(str::trim).collect();
            retried += usize::from(tried.len() > 1);
            let gw = tried.last().and_then(|a| gateway_of.get(*a)).copied();
            reconnected_to.push(gw);
            let agent = Agent::spawn(client);
            agent.subscribe("live", std::slice::from_ref(&filter));
            agents[i] = agent;
            on[i] = gw.unwrap_or(usize::MAX);
        }
        for &i in &victims {
            assert!(
                agents[i]
                    .wait_until(Duration::from_secs(10), |s| s.eose.contains("live"))
                    .await
            );
        }
        let reconnect_took = killed_at.elapsed();
        eprintln!(
            "[lb] {} clients reconnected through nginx to gateways {reconnected_to:?} within \
             {reconnect_took:?} ({retried} after nginx tried the dead gateway first)",
            victims.len()
        );
        // Keep the steady stream going a little after everyone is back.
        tokio::time::sleep(Duration::from_millis(500)).await;

        steady_stop.store(true, Ordering::Relaxed);
        let (steady_sent, steady_ok) = steady.await.expect("steady publisher");

        // Phase 2: everyone publishes again, everyone receives everything.
        let mut phase2 = HashSet::new();
        for (a, k) in agents.iter().zip(&keys) {
            for ev in notes(k, PER_CLIENT, &tag, 0) {
                phase2.insert(ev.id.to_hex());
                a.publish(&ev);
            }
        }
        let mut short2 = 0;
        for a in &agents {
            let ok = a
                .wait_until(Duration::from_secs(15), |s| {
                    s.count_of("live", &phase2) == phase2.len()
                })
                .await;
            short2 += usize::from(!ok);
        }
        let phase2_oks = agents
            .iter()
            .map(|a| {
                a.seen(|s| {
                    phase2
                        .iter()
                        .filter(|id| matches!(s.oks.get(*id), Some((true, _))))
                        .count()
                })
            })
            .sum::<usize>();

        // The clients that were not on the killed gateway: never disconnected, no steady event
        // missing.
        let survivors: Vec<usize> = (0..CLIENTS).filter(|i| !victims.contains(i)).collect();
        let mut disconnected = 0;
        let mut missing_steady = 0;
        for &i in &survivors {
            disconnected += usize::from(agents[i].end().is_some());
            missing_steady += agents[i].seen(|s| steady_ok.len() - s.count_of("live", &steady_ok));
        }
        let repeated: usize = agents.iter().map(|a| a.seen(|s| s.repeated)).sum();
        let extra_oks: usize = agents.iter().map(|a| a.seen(|s| s.extra_oks)).sum();
        eprintln!(
            "[lb] steady publisher: sent {steady_sent}, OK true {}; survivors {}: disconnected \
             {disconnected}, steady events missed {missing_steady} (in total); phase 2: {} \
             events, OK true {phase2_oks}, clients missing some {short2}; repeated \
             deliveries {repeated}, second OKs {extra_oks}",
            steady_ok.len(),
            survivors.len(),
            phase2.len()
        );

        assert!(
            noticed_all,
            "a client of the killed gateway did not notice: {noticed:?}"
        );
        assert!(
            reconnected_to
                .iter()
                .all(|g| matches!(g, Some(g) if *g != VICTIM)),
            "reconnects went to {reconnected_to:?}"
        );
        assert_eq!(steady_ok.len(), steady_sent, "steady events not accepted");
        assert_eq!(
            disconnected, 0,
            "clients of other gateways were disconnected"
        );
        assert_eq!(
            missing_steady, 0,
            "clients of other gateways missed live events"
        );
        assert_eq!(phase2_oks, phase2.len());
        assert_eq!(short2, 0, "clients missed phase 2 events");
        assert_eq!(
            repeated, 0,
            "an event was delivered twice on one subscription"
        );
        assert_eq!(extra_oks, 0, "an EVENT got more than one OK");
        drop(nginx);
    })
    .await;
}
