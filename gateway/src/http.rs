//! HTTP routes: `GET /` (WebSocket upgrade, or the NIP-11 document on
//! `Accept: application/nostr+json`), `/healthz` and `/readyz`.

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
        .route("/", get(root))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
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
        let limits = &state.config.limits;
        if state.registry.connections() >= limits.max_connections || *state.stopping.borrow() {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "relay is at capacity; try again later",
            )
                .into_response();
        }
        let max = limits.max_message_bytes;
        return upgrade
            .max_message_size(max)
            .max_frame_size(max)
            .on_upgrade(move |socket| session::run(state, socket, peer));
    }
    let wants_info = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/nostr+json"));
    if wants_info {
        return (
            [(header::CONTENT_TYPE, "application/nostr+json")],
            relay_info(&state).to_string(),
        )
            .into_response();
    }
    let hint = match &state.config.public_url {
        Some(url) => format!("This is a Nostr relay. Connect a Nostr client to {url}\n"),
        None => {
            "This is a Nostr relay. Connect a Nostr client to this address with ws://\n".to_owned()
        }
    };
    hint.into_response()
}

/// The NIP-11 relay information document.
pub fn relay_info(state: &AppState) -> serde_json::Value {
    let info = &state.config.info;
    let mut doc = serde_json::json!({
        "name": info.relay_name,
        "description": info.relay_description,
        "software": "https://github.com/nostr-relay-cluster",
        "version": env!("CARGO_PKG_VERSION"),
        "supported_nips": [1, 11],
        "limitation": {
            "max_message_length": state.config.limits.max_message_bytes,
            "max_subid_length": shared::message::MAX_SUB_ID_CHARS,
            "auth_required": false,
            "payment_required": false,
            "restricted_writes": false,
        },
    });
    for (key, value) in [
        ("pubkey", &info.relay_pubkey),
        ("contact", &info.relay_contact),
        ("icon", &info.relay_icon),
    ] {
        if let Some(v) = value {
            doc[key] = serde_json::Value::String(v.clone());
        }
    }
    doc
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
