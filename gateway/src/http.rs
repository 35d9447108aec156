//! HTTP routes: `GET /` (WebSocket upgrade, or the NIP-11 document on
//! `Accept: application/nostr+json`), `POST /` (the NIP-86 management API, [`crate::admin`]),
//! `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use shared::bus::{self, Role};
use tower_http::cors::{Any, CorsLayer};

use crate::AppState;
use crate::session;

/// The gateway's routes.
pub fn router(state: Arc<AppState>) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_headers(Any)
        .allow_methods(Any);
    Router::new()
        .route("/", get(root).post(crate::admin::rpc))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(cors)
        .with_state(state)
}

async fn root(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if let Ok(upgrade) = upgrade {
        let ip = match client_ip(&state, peer, &headers) {
            Ok(ip) => ip,
            Err(reason) => {
                tracing::warn!(%peer, "refused a connection with a malformed X-Forwarded-For");
                return (StatusCode::BAD_REQUEST, reason).into_response();
            }
        };
        if state.moderation.get().blocks_ip(ip) {
            return (
                StatusCode::FORBIDDEN,
                "blocked: this address may not connect",
            )
                .into_response();
        }
        let limits = &state.config.limits;
        if state.registry.connections() >= limits.max_connections || *state.stopping.borrow() {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "relay is at capacity; try again later",
            )
                .into_response();
        }
        let Some(slot) = state.per_address.take(ip, limits.max_connections_per_ip) else {
            crate::metrics::refused_connection("per_ip");
            return (
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited: too many connections from your address",
            )
                .into_response();
        };
        // Past max_message_bytes a message gets a NOTICE; past twice that, the socket closes.
        let hard_max = limits.max_message_bytes.saturating_mul(2);
        let peer = session::Peer { ip, slot };
        return upgrade
            .read_buffer_size(limits.ws_read_buffer_bytes)
            .write_buffer_size(limits.ws_write_buffer_bytes)
            .max_message_size(hard_max)
            .max_frame_size(hard_max)
            .on_upgrade(move |socket| session::run(state, socket, peer));
    }
    let wants_info = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/nostr+json"));
    if wants_info {
        // NIP-11 wants all three CORS headers on the document itself; the CORS layer adds
        // Allow-Origin to every response but the other two only to preflight requests.
        return (
            [
                (header::CONTENT_TYPE, "application/nostr+json"),
                (header::ACCESS_CONTROL_ALLOW_HEADERS, "*"),
                (header::ACCESS_CONTROL_ALLOW_METHODS, "GET, POST, OPTIONS"),
            ],
            relay_info(&state).to_string(),
        )
            .into_response();
    }
    let hint = match &state.relay_urls {
        Some(urls) => format!(
            "This is a Nostr relay. Connect a Nostr client to {}\n",
            urls.canonical()
        ),
        None => {
            "This is a Nostr relay. Connect a Nostr client to this address with ws://\n".to_owned()
        }
    };
    hint.into_response()
}

/// The client's address: the TCP peer, or, when configured to trust the load balancer,
/// exactly the last `X-Forwarded-For` entry (the one the balancer appended: anything
/// before it is what the client claimed). `Err` when that entry is not an address: the
/// request is refused rather than counted under an address someone chose.
fn client_ip(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<std::net::IpAddr, &'static str> {
    if !state.config.rate.trust_forwarded {
        return Ok(peer.ip());
    }
    let Some(last_header) = headers.get_all("x-forwarded-for").iter().next_back() else {
        // Not through the balancer (a probe on the pod's own address).
        return Ok(peer.ip());
    };
    last_header
        .to_str()
        .ok()
        .and_then(|v| v.rsplit(',').next())
        .and_then(|hop| hop.trim().parse().ok())
        .ok_or("invalid: the last X-Forwarded-For entry is not an IP address")
}

/// The NIPs this relay implements, all working through the whole cluster.
pub const SUPPORTED_NIPS: &[u32] = &[1, 9, 11, 13, 40, 42, 45, 50, 62, 70, 77, 86];

/// The NIP-11 relay information document; the `limitation` block shows the limits this
/// gateway enforces.
pub fn relay_info(state: &AppState) -> serde_json::Value {
    let c = &state.config;
    let info = &c.info;
    let moderation = state.moderation.get();
    let mut limitation = serde_json::json!({
        "max_message_length": c.limits.max_message_bytes,
        "max_subscriptions": c.limits.max_subscriptions,
        "max_filters": c.limits.max_filters,
        "max_limit": c.query_limits.max_limit,
        "default_limit": c.query_limits.default_limit,
        "max_subid_length": c.limits.max_subid_length.min(shared::message::MAX_SUB_ID_CHARS),
        "max_event_tags": c.event_limits.max_event_tags,
        "max_content_length": c.event_limits.max_content_length,
        "min_pow_difficulty": c.event_limits.min_pow_difficulty,
        "auth_required": c.auth.auth_read && c.auth.auth_write,
        "payment_required": false,
        // Any condition on publishing: AUTH, proof of work, or a NIP-86 allow list.
        "restricted_writes": c.auth.auth_write
            || c.event_limits.min_pow_difficulty > 0
            || !moderation.allowed_pubkeys.is_empty()
            || !moderation.allowed_kinds.is_empty(),
        "created_at_upper_limit": c.event_limits.created_at_upper_limit,
    });
    if c.event_limits.created_at_lower_limit > 0 {
        limitation["created_at_lower_limit"] = c.event_limits.created_at_lower_limit.into();
    }
    let mut doc = serde_json::json!({
        "name": moderation.name.as_ref().unwrap_or(&info.relay_name),
        "description": moderation.description.as_ref().unwrap_or(&info.relay_description),
        "software": "https://github.com/nostr-relay-cluster/relay",
        "version": env!("CARGO_PKG_VERSION"),
        "supported_nips": SUPPORTED_NIPS,
        "limitation": limitation,
    });
    for (key, value) in [
        ("pubkey", &info.relay_pubkey),
        ("contact", &info.relay_contact),
        (
            "icon",
            &moderation.icon.clone().or_else(|| info.relay_icon.clone()),
        ),
    ] {
        if let Some(v) = value {
            doc[key] = serde_json::Value::String(v.clone());
        }
    }
    doc
}

/// Prometheus text exposition of this gateway's metrics.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let body = state
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Ready when Redis answers, the reply subscriber is connected, and at least one ingest and
/// one query worker sent a heartbeat recently (workers only beat while Postgres answers).
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let fresh = Duration::from_millis(state.config.limits.worker_fresh_ms);
    let mut redis = state.redis.clone();
    let mut problems = Vec::new();
    if !state.pubsub_up.load(Ordering::Relaxed) {
        problems.push("redis subscriber not connected".to_owned());
    }
    for role in [Role::Ingest, Role::Query] {
        match bus::live_workers(&mut redis, &state.bus, role, fresh).await {
            Ok(0) => problems.push(format!("no live {} worker", role.name())),
            Ok(_) => {}
            Err(e) => problems.push(format!("redis: {e}")),
        }
    }
    // One relay, one URL: a gateway and an ingest worker that disagree would decide
    // differently whether a request to vanish is addressed here.
    let mine = state
        .relay_urls
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    if let Ok(Some(theirs)) = bus::advertised_public_url(&mut redis, &state.bus).await
        && theirs != mine
    {
        tracing::error!(
            gateway = %mine,
            ingest_worker = %theirs,
            "RELAY_PUBLIC_URL differs between this gateway and the ingest workers; give every process the same value"
        );
        problems.push(format!(
            "RELAY_PUBLIC_URL differs: this gateway has {mine:?}, the ingest workers {theirs:?}"
        ));
    }
    if problems.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
        )
            .into_response()
    }
}
