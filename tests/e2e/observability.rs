//! Observability through the running cluster: one trace per event across processes
//! (checked with an in-process OTLP receiver), Prometheus metrics on every binary (also
//! counting the ingest worker's transactions), and structured logs carrying trace ids.

use std::time::Duration;

use relay_tests::otlp::{Receiver, Span};
use relay_tests::{Cluster, ClusterOptions};
use serde_json::json;
use shared::event::signing::Keys;

use crate::{note, now};

fn traced(receiver: &Receiver, extra: &[(&str, &str)]) -> ClusterOptions {
    let mut env: Vec<(String, String)> = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
            format!("http://{}", receiver.addr),
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/protobuf".into()),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ("OTEL_TRACES_SAMPLER".into(), "always_on".into()),
        (
            "OTEL_RESOURCE_ATTRIBUTES".into(),
            "deployment.environment=test".into(),
        ),
    ];
    env.extend(relay_tests::env_vars(extra));
    ClusterOptions {
        gateways: 2,
        env,
        ..Default::default()
    }
}

/// Waits (bounded) until `find` succeeds on the spans received so far.
async fn wait_for<T>(receiver: &Receiver, what: &str, find: impl Fn(&[Span]) -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(found) = find(&receiver.spans()) {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never received {what}; got {:#?}",
            receiver.spans()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn child_of<'a>(spans: &'a [Span], parent: &Span, service: &str, name: &str) -> Option<&'a Span> {
    spans.iter().find(|s| {
        s.trace_id == parent.trace_id
            && s.parent_id == parent.span_id
            && s.service == service
            && s.name == name
    })
}

#[tokio::test]
async fn one_trace_follows_an_event_from_gateway_to_worker_to_another_gateway() {
    let receiver = Receiver::start().await.expect("receiver");
    let cluster = Cluster::start(traced(&receiver, &[]))
        .await
        .expect("cluster");
    let keys = Keys::generate();
    let mut subscriber = cluster.client(1).await;
    assert!(
        subscriber
            .req("s", &[json!({"authors": [keys.pubkey().to_hex()]})])
            .await
            .is_empty()
    );
    let mut publisher = cluster.client(0).await;
    let ev = note(&keys, now(), "traced");
    assert!(publisher.publish(&ev).await.accepted);
    assert_eq!(subscriber.next_event("s").await, ev);
    let id = ev.id.to_hex();

    let (root, send, process, ok, live) = wait_for(&receiver, "the event's whole trace", |spans| {
        let root = spans
            .iter()
            .find(|s| s.name == "EVENT" && s.attr("nostr.event.id") == Some(id.as_str()))?;
        let send = child_of(spans, root, "gateway", "send nostr").or_else(|| {
            spans
                .iter()
                .find(|s| s.parent_id == root.span_id && s.name.starts_with("send "))
        })?;
        let process = spans.iter().find(|s| {
            s.parent_id == send.span_id
                && s.service == "ingest-worker"
                && s.name.starts_with("process ")
        })?;
        let ok = child_of(spans, process, "gateway", "deliver OK")?;
        let live = spans.iter().find(|s| {
            s.parent_id == process.span_id
                && s.name == "deliver live"
                && s.attr("nostr.deliveries").is_some_and(|n| n != "0")
        })?;
        child_of(spans, process, "ingest-worker", "verify")?;
        child_of(spans, process, "ingest-worker", "INSERT events")?;
        Some((
            root.clone(),
            send.clone(),
            process.clone(),
            ok.clone(),
            live.clone(),
        ))
    })
    .await;
    assert_eq!(root.service, "gateway");
    assert!(root.parent_id.is_empty(), "EVENT is the root span");
    for s in [&send, &process, &ok, &live] {
        assert_eq!(s.trace_id, root.trace_id, "{} is in the same trace", s.name);
    }
    assert_eq!(send.attr("messaging.system"), Some("redis"));
    assert_eq!(process.attr("messaging.operation.type"), Some("process"));
    assert_eq!(process.attr("nostr.event.kind"), Some("1"));
    assert_ne!(
        ok.attr("nostr.gateway"),
        live.attr("nostr.gateway"),
        "delivered live on the other gateway"
    );
    assert!(
        receiver.spans().iter().all(|s| s.attr("content").is_none()),
        "content is never an attribute"
    );

    // A REQ is one trace too: gateway → query worker → SQL → EOSE back on the gateway.
    let mut c = cluster.client(0).await;
    c.req(
        "traced-req",
        &[json!({"authors": [keys.pubkey().to_hex()]})],
    )
    .await;
    wait_for(&receiver, "the REQ's trace", |spans| {
        let root = spans
            .iter()
            .find(|s| s.name == "REQ" && s.attr("nostr.subscription.id") == Some("traced-req"))?;
        let send = spans
            .iter()
            .find(|s| s.parent_id == root.span_id && s.name.starts_with("send "))?;
        let process = spans
            .iter()
            .find(|s| s.parent_id == send.span_id && s.service == "query-worker")?;
        child_of(spans, process, "query-worker", "SELECT events")?;
        child_of(spans, process, "gateway", "deliver EOSE").cloned()
    })
    .await;
}

/// The same export over OTLP/gRPC (`OTEL_EXPORTER_OTLP_PROTOCOL=grpc`).
#[tokio::test]
async fn traces_export_over_grpc_too() {
    let receiver = Receiver::start_grpc().await.expect("receiver");
    let options = traced(
        &receiver,
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_SERVICE_NAME", "relay-grpc"),
        ],
    );
    let cluster = Cluster::start(ClusterOptions {
        gateways: 1,
        ..options
    })
    .await
    .expect("cluster");
    let mut c = cluster.client(0).await;
    let ev = note(&Keys::generate(), now(), "over grpc");
    assert!(c.publish(&ev).await.accepted);
    let id = ev.id.to_hex();
    let process = wait_for(&receiver, "the event's spans over gRPC", |spans| {
        let root = spans
            .iter()
            .find(|s| s.name == "EVENT" && s.attr("nostr.event.id") == Some(id.as_str()))?;
        spans
            .iter()
            .find(|s| s.trace_id == root.trace_id && s.name.starts_with("process "))
            .cloned()
    })
    .await;
    assert_eq!(
        process.service, "relay-grpc",
        "OTEL_SERVICE_NAME names the service"
    );
}

#[tokio::test]
async fn every_binary_serves_prometheus_metrics() {
    let cluster = Cluster::default_cluster().await;
    let mut c = cluster.client(0).await;
    let ev = note(&Keys::generate(), now(), "counted");
    assert!(c.publish(&ev).await.accepted);
    assert!(
        !c.publish(&note(&Keys::generate(), now() + 100_000, "future"))
            .await
            .accepted
    );
    c.req("m", &[json!({"ids": [ev.id.to_hex()]})]).await;
    c.send_text("not json").await;
    c.recv().await;

    let gateway = http_get(cluster.gateways[0].addr, "/metrics").await;
    for needle in [
        "nostr_gateway_connections ",
        "nostr_gateway_messages_received_total{type=\"EVENT\"}",
        "nostr_gateway_messages_received_total{type=\"invalid\"}",
        "nostr_gateway_messages_sent_total{type=\"EOSE\"}",
        "nostr_gateway_ok_false_total{reason=\"invalid\"}",
    ] {
        assert!(
            gateway.contains(needle),
            "gateway metrics lack {needle}:\n{gateway}"
        );
    }
    for (name, addr) in &cluster.worker_http {
        let body = http_get(*addr, "/metrics").await;
        let needles: &[&str] = if name.starts_with("ingest") {
            &[
                "nostr_ingest_events_total{outcome=\"stored\"}",
                "nostr_ingest_commit_seconds_bucket",
                "nostr_ingest_verify_seconds_count",
                "nostr_worker_batch_size",
            ]
        } else {
            &[
                "nostr_query_seconds_bucket",
                "nostr_query_requests_total{kind=\"req\"}",
            ]
        };
        for needle in needles {
            assert!(
                body.contains(needle),
                "{name} metrics lack {needle}:\n{body}"
            );
        }
        assert!(http_get(*addr, "/healthz").await.contains("ok"));
    }
    // Stream gauges come with the heartbeat.
    let worker = cluster.worker_http[0].1;
    relay_tests::eventually(Duration::from_secs(5), "stream gauges", || async move {
        let body = http_get(worker, "/metrics").await;
        body.contains("nostr_stream_pending{") && body.contains("nostr_stream_length{")
    })
    .await;
}

#[tokio::test]
async fn json_logs_carry_trace_ids_and_one_line_per_connection() {
    let receiver = Receiver::start().await.expect("receiver");
    let cluster = Cluster::start(traced(
        &receiver,
        &[
            ("RELAY_LOG_FORMAT", "json"),
            ("RUST_LOG", "info,ingest_worker=debug"),
        ],
    ))
    .await
    .expect("cluster");
    {
        let mut c = cluster.client(0).await;
        let ev = note(&Keys::generate(), now(), "logged");
        assert!(c.publish(&ev).await.accepted);
        // A write-policy refusal is logged inside the EVENT span.
        c.send_text("[\"EVENT\",{}]").await;
        c.recv().await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = cluster.log("gateway-0");
        let lines: Vec<serde_json::Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let closed = lines
            .iter()
            .find(|l| l["fields"]["message"] == "connection closed");
        if let Some(closed) = closed {
            assert!(lines.len() == log.lines().count(), "every line is JSON");
            assert!(
                lines
                    .iter()
                    .any(|l| l["fields"]["message"] == "connection opened")
            );
            assert_eq!(closed["fields"]["received"], 2);
            assert!(
                closed["fields"]["sent"].as_u64().is_some_and(|n| n >= 3),
                "{closed}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no connection-closed line in:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Worker log lines inside a traced span name its trace.
    let ingest = cluster.log("ingest-worker-0");
    let lines: Vec<serde_json::Value> = ingest
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(
        lines.len(),
        ingest.lines().count(),
        "every line is JSON:\n{ingest}"
    );
    let handled = lines
        .iter()
        .find(|l| l["fields"]["message"] == "event handled")
        .unwrap_or_else(|| panic!("no 'event handled' line in:\n{ingest}"));
    let trace_id = handled["span"]["trace_id"].as_str().unwrap_or("");
    assert_eq!(trace_id.len(), 32, "trace id in the log line: {handled}");
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut response = String::new();
    tokio::time::timeout(relay_tests::WAIT, stream.read_to_string(&mut response))
        .await
        .expect("in time")
        .expect("read");
    response
}

/// An ingest entry holding several events (as a gateway appends events that arrive
/// together) is stored in transactions of at most `RELAY_STORE_BATCH_EVENTS` events, and
/// every event is kept. The entry is appended by the test, as a gateway would, so that its
/// size does not depend on timing.
#[tokio::test]
async fn an_entry_of_many_events_is_stored_in_bounded_transactions() {
    use shared::bus::{Batch, ConnId, GatewayId, IngestRequest};

    let cluster = Cluster::start(ClusterOptions::with_env(&[(
        "RELAY_STORE_BATCH_EVENTS",
        "2",
    )]))
    .await
    .expect("cluster");
    let keys = Keys::generate();
    let events: Vec<_> = (0..5).map(|i| note(&keys, now() - i, "batched")).collect();
    let gateway = GatewayId::random();
    let mut batch = Batch::default();
    for (n, ev) in events.iter().enumerate() {
        batch.push(&IngestRequest {
            gateway: gateway.clone(),
            conn: ConnId(n as u64),
            event: serde_json::value::RawValue::from_string(ev.to_json()).expect("json"),
            trace: Default::default(),
        });
    }
    let payload = batch.finish().expect("five events");
    let redis = redis::Client::open(cluster.services.redis_url.as_str()).expect("redis url");
    let mut conn = redis::aio::ConnectionManager::new(redis)
        .await
        .expect("redis");
    let stream = format!("{}:ingest:0", cluster.prefix);
    let added = shared::bus::add_entries(&mut conn, &[(stream.as_str(), payload.as_slice())])
        .await
        .expect("appended");
    assert!(added.iter().all(Result::is_ok), "{added:?}");

    let db = &cluster.db().await;
    relay_tests::eventually(relay_tests::WAIT, "all 5 events stored", || async move {
        let stored: i64 = db
            .query_one("SELECT count(*) FROM events WHERE kind = 1", &[])
            .await
            .expect("count")
            .get(0);
        stored == 5
    })
    .await;
    // Five events, at most two per transaction: three transactions, of 2, 2 and 1 events.
    // The worker counts a transaction just after Postgres answers its commit, so the
    // counts may lag the rows.
    let ingest = &cluster.worker_http[0];
    assert!(ingest.0.starts_with("ingest"), "{}", ingest.0);
    let counted = |body: &str| {
        metric(body, "nostr_ingest_commit_seconds_count") >= 3.0
            && metric(body, "nostr_ingest_transaction_size_count") >= 3.0
    };
    let addr = ingest.1;
    relay_tests::eventually(relay_tests::WAIT, "3 transactions counted", || async move {
        counted(&http_get(addr, "/metrics").await)
    })
    .await;
    let body = http_get(addr, "/metrics").await;
    assert_eq!(
        metric(&body, "nostr_ingest_commit_seconds_count"),
        3.0,
        "{body}"
    );
    assert_eq!(
        metric(&body, "nostr_ingest_transaction_size_count"),
        3.0,
        "{body}"
    );
    assert_eq!(
        metric(&body, "nostr_ingest_transaction_size_sum"),
        5.0,
        "{body}"
    );
}

/// The value of an unlabelled metric in a Prometheus text body; 0 when it is absent.
fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|n| n.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
}
