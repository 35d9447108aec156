//! The gateway: axum HTTP server that terminates client WebSockets.
//!
//! - [`session`]: one task per WebSocket: reads frames, dispatches [`cmd`]s, writes from a
//!   bounded queue.
//! - [`cmd`]: one type per client verb (`EVENT`, `REQ`, `CLOSE`), each with `handle`.
//! - [`registry`]: connections, subscriptions, the live-match index, delivery.
//! - [`connections`]: open connections per client address (the per-address cap).
//! - [`pubsub`]: the Redis subscriber that brings replies and live events back.
//! - [`http`]: the routes: WebSocket upgrade, NIP-11, `/healthz`, `/readyz`.
//! - [`policy`]: what an event, `REQ` or `COUNT` must satisfy before it goes on the bus.
//! - [`ratelimit`]: cluster-wide rate limits, counted in Redis.
//! - [`admin`]: the NIP-86 management API (`POST /`), authorized by NIP-98.
//!
//! **Invariant:** the gateway holds no durable state; any gateway can die and its clients
//! reconnect to another.

pub mod admin;
pub mod cmd;
pub mod config;
pub mod connections;
pub mod http;
pub mod metrics;
pub mod policy;
pub mod publisher;
pub mod pubsub;
pub mod ratelimit;
pub mod registry;
pub mod session;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use redis::aio::ConnectionManager;
use shared::bus::{self, Bus, GatewayId};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::Config;
use registry::{LivePolicy, Registry, RegistryLimits};
use shared::event::Kind;
use shared::moderation::Current as Moderation;

/// What every request handler and session shares.
pub struct AppState {
    /// The configuration.
    pub config: Config,
    /// Bus names.
    pub bus: Bus,
    /// This process's id on the bus (its reply channel).
    pub gateway: GatewayId,
    /// Connection for publishing commands (self-reconnecting).
    pub redis: ConnectionManager,
    /// Appends published events to the ingest streams, several per entry.
    pub publisher: publisher::Publisher,
    /// Connections and subscriptions.
    pub registry: Registry,
    /// Open connections per client address.
    pub per_address: Arc<connections::PerAddress>,
    /// Whether the reply/live subscriber is connected.
    pub pubsub_up: AtomicBool,
    /// WebSocket sessions whose socket is not closed yet (the shutdown drain waits for
    /// them; a connection leaves the registry earlier, when it stops taking messages).
    pub open_sessions: AtomicUsize,
    /// Becomes `true` when the gateway is shutting down.
    pub stopping: watch::Receiver<bool>,
    /// Read-restricted kinds (from the validated configuration).
    pub restricted_kinds: Vec<Kind>,
    /// This relay's URLs, when `RELAY_PUBLIC_URL` is set: for NIP-42 and NIP-98 (both are
    /// refused without it: the URL is never taken from a request) and for NIP-62 requests
    /// to vanish (else only `ALL_RELAYS` ones are).
    pub relay_urls: Option<shared::config::RelayUrls>,
    /// Renders `/metrics`.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// The moderation state (NIP-86), followed from Redis.
    pub moderation: Moderation,
    /// The management API's admins and pending changes.
    pub admin: admin::Admin,
    next_id: AtomicU64,
}

impl AppState {
    /// A fresh id for a connection or a `REQ`.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Serves on `listener` until `shutdown` completes, then stops accepting, closes every
/// WebSocket with 1001 and waits (at most `drain_secs`) for them to finish.
pub async fn run(
    config: Config,
    listener: TcpListener,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let bus = Bus::new(&config.bus);
    // Lazy: the gateway serves (and answers `error:`) while Redis is away.
    let redis = bus::connect_lazy(&config.bus.redis_url, Duration::from_secs(2))
        .context("bad Redis URL")?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let limits = RegistryLimits {
        live_buffer: config.limits.live_buffer,
        duplicate_window: Duration::from_millis(config.limits.duplicate_window_ms),
        reply_timeout: Duration::from_millis(config.limits.reply_timeout_ms),
        max_neg_sessions: config.limits.max_neg_sessions,
        max_subscription_bytes: config.limits.max_subscription_bytes,
        neg_idle: Duration::from_secs(config.limits.neg_idle_secs),
    };
    let drain = Duration::from_secs(config.limits.drain_secs);
    let gateway = GatewayId::random();
    tracing::info!(%gateway, public_url = ?config.public.public_url, "gateway ready");
    let restricted_kinds = config.auth.restricted().map_err(anyhow::Error::msg)?;
    let admins = config.admin.admins().map_err(anyhow::Error::msg)?;
    let relay_urls = config.public.urls().map_err(anyhow::Error::msg)?;
    if relay_urls.is_none() {
        tracing::warn!(
            "RELAY_PUBLIC_URL is not set: AUTH (NIP-42) and the management API (NIP-86) are refused, and requests to vanish are followed only when addressed to ALL_RELAYS"
        );
    }
    let publisher = publisher::Publisher::start(
        redis.clone(),
        usize::from(config.limits.ingest_entry_events),
        config.limits.max_message_bytes,
    );
    let state = Arc::new(AppState {
        config,
        bus,
        gateway,
        redis,
        publisher,
        registry: Registry::new(
            limits,
            LivePolicy {
                restricted_kinds: restricted_kinds.clone(),
            },
        ),
        per_address: Arc::default(),
        pubsub_up: AtomicBool::new(false),
        open_sessions: AtomicUsize::new(0),
        stopping: stop_rx.clone(),
        restricted_kinds,
        relay_urls,
        metrics,
        moderation: Moderation::default(),
        admin: admin::Admin::new(admins),
        next_id: AtomicU64::new(1),
    });
    let moderation = tokio::spawn(shared::moderation::follow(
        state.moderation.clone(),
        state.redis.clone(),
        state.config.bus.redis_url.clone(),
        state.bus.clone(),
    ));
    let subscriber = tokio::spawn(pubsub::run(Arc::clone(&state), stop_rx.clone()));
    let expirer = tokio::spawn(expire_loop(Arc::clone(&state), stop_rx));

    let app = http::router(Arc::clone(&state));
    // Replies are small and latency-bound: no Nagle delay (it costs ~40 ms per multi-frame
    // answer against delayed ACKs).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutdown requested: closing connections");
        let _ = stop_tx.send(true);
    })
    .await
    .context("HTTP server failed")?;

    let deadline = tokio::time::Instant::now() + drain;
    while state.open_sessions.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = state.open_sessions.load(Ordering::Relaxed);
    if left > 0 {
        tracing::warn!(left, "drain deadline passed with connections still open");
    }
    subscriber.abort();
    expirer.abort();
    moderation.abort();
    tracing::info!("gateway stopped");
    Ok(())
}

/// Completes once `stopping` turns true (or its sender is gone).
pub async fn stopped(stopping: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, so callers' futures stay `Send`.
    let _ = stopping.wait_for(|s| *s).await.map(|_| ());
}

/// Answers, four times a second, whatever a worker left unanswered past its deadline.
async fn expire_loop(state: Arc<AppState>, mut stopping: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => state.registry.expire(std::time::Instant::now()),
            _ = stopped(&mut stopping) => return,
        }
    }
}
