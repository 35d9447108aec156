//! The loop both workers run: connect, migrate, join the consumer group, then read a batch,
//! hand it to the worker's [`Handler`], acknowledge it, and repeat until shutdown.
//!
//! **Invariant:** an entry is acknowledged only after the handler returned for it, so an
//! entry whose worker dies mid-batch stays pending in its group (never silently dropped).

use std::future::Future;
use std::time::Duration;

use deadpool_postgres::Pool;
use redis::aio::ConnectionManager;

use crate::bus::{self, Bus, BusError, Consumer, Entry, Role};
use crate::config::{BusConfig, DatabaseConfig};
use crate::store::{self, StoreError};

/// Settings of the stream-reading loop, shared by both workers.
#[derive(clap::Args, Clone, Debug)]
pub struct WorkerConfig {
    /// Most stream entries read (and handled together) at once; a fuller batch is handled
    /// as soon as it is read, never waiting to fill.
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value_t = 256)]
    pub batch_size: usize,
    /// How long one read waits for new entries, in milliseconds; also how quickly the worker
    /// notices a shutdown request when idle.
    #[arg(long, env = "RELAY_BLOCK_MS", default_value_t = 1000)]
    pub block_ms: u64,
    /// Consumer name in the group; defaults to a random name per process.
    #[arg(long, env = "RELAY_CONSUMER_NAME")]
    pub consumer_name: Option<String>,
    /// How long to keep retrying Redis and Postgres at start before exiting with an error,
    /// in seconds.
    #[arg(long, env = "RELAY_STARTUP_TIMEOUT_SECS", default_value_t = 60)]
    pub startup_timeout_secs: u64,
    /// Entries another consumer read but left unacknowledged this long (it died) are taken
    /// over and handled by this one, in milliseconds.
    #[arg(long, env = "RELAY_CLAIM_IDLE_MS", default_value_t = 30_000)]
    pub claim_idle_ms: u64,
    /// Address of the worker's small HTTP server: `/metrics` (Prometheus), `/healthz`,
    /// `/readyz`. Port 0 picks a free port (logged at start).
    #[arg(long, env = "RELAY_METRICS_LISTEN", default_value = "127.0.0.1:0")]
    pub metrics_listen: String,
    /// How often the worker records a heartbeat (read by gateways' `/readyz`), in
    /// milliseconds.
    #[arg(long, env = "RELAY_HEARTBEAT_MS", default_value_t = 2000)]
    pub heartbeat_ms: u64,
    /// Batches this process handles at once, each read by its own consumer in the group
    /// (`<consumer name>-<n>` after the first): while one batch waits on Postgres, the next
    /// is being verified or queried. Default: 4 for the ingest worker, 2 for the query
    /// worker (it already runs a batch's queries side by side). Each needs a database
    /// connection: keep RELAY_DB_POOL_SIZE above it.
    #[arg(long, env = "RELAY_CONCURRENCY")]
    pub concurrency: Option<usize>,
}

impl WorkerConfig {
    /// How many batches a worker of `role` handles at once.
    pub fn loops(&self, role: Role) -> usize {
        // Ingest: four loops kept both cores of a 2-core bench machine busier than two,
        // while commits wait on the disk (200 publishing connections: 6-9% more events/s
        // in alternating rounds; 20 connections: the same latency). Six were no better.
        let default = match role {
            Role::Ingest => 4,
            Role::Query => 2,
        };
        self.concurrency.unwrap_or(default).max(1)
    }
}

/// A worker failure that stops the process.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// Redis failed at start.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Postgres failed at start.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The metrics address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The configured address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// What the worker's loop gives each handler.
#[derive(Clone)]
pub struct Context {
    /// Bus names.
    pub bus: Bus,
    /// A connection for replies and publishing (not the blocking reader's).
    pub redis: ConnectionManager,
    /// The database pool.
    pub db: Pool,
}

/// The worker-specific part: handle one batch of entries. Every entry must be answered
/// before this returns: sent already, or put in the returned pipeline (replies to
/// gateways, live events), which the loop sends followed by the batch's acknowledgements,
/// in one round trip. (The query worker's handler, whose answers are reads a gateway can
/// time out, instead accepts them into tasks of its own and waits for them in
/// [`Handler::drain`].) Each of the [`WorkerConfig::concurrency`] loops has its own clone.
pub trait Handler: Clone + Send + 'static {
    /// Called once when the worker is ready, before the first batch; may spawn background
    /// tasks (they end with the process).
    fn start(&mut self, _ctx: &Context) {}

    /// The database pool this handler's statements need ([`store::pool`] unless a role
    /// wants other connection settings).
    fn pool(&self, db: &DatabaseConfig) -> Result<Pool, StoreError> {
        store::pool(db)
    }

    /// Called once the loops stopped, before the worker returns: a handler that answers in
    /// tasks of its own waits for them here (with a deadline of its own).
    fn drain(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Handles a batch; returns what is left to publish (possibly an empty pipeline).
    fn handle(
        &mut self,
        ctx: &Context,
        entries: &[Entry],
    ) -> impl Future<Output = redis::Pipeline> + Send;
}

/// Runs the worker until `shutdown` completes, then finishes and acknowledges the batch in
/// hand and returns.
pub async fn run<H: Handler>(
    role: Role,
    bus_config: &BusConfig,
    db_config: &DatabaseConfig,
    config: &WorkerConfig,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    mut handler: H,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let listener = tokio::net::TcpListener::bind(&config.metrics_listen)
        .await
        .map_err(|source| WorkerError::Listen {
            addr: config.metrics_listen.clone(),
            source,
        })?;
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics and health listening");
    }
    tokio::spawn(crate::health::serve(
        listener,
        metrics,
        std::sync::Arc::clone(&healthy),
    ));
    let startup = Duration::from_secs(config.startup_timeout_secs);
    let block = Duration::from_millis(config.block_ms);
    let bus = Bus::new(bus_config);
    let db = handler.pool(db_config)?;
    store::migrate(&db, startup).await?;
    let redis = bus::connect(&bus_config.redis_url, Duration::from_secs(5), startup).await?;
    let name = config
        .consumer_name
        .clone()
        .unwrap_or_else(|| format!("{}-{}", role.name(), hex::encode(rand::random::<[u8; 4]>())));
    // One consumer per loop, each with its own connection: a blocking read holds one.
    let mut consumers = Vec::new();
    let loops = config.loops(role);
    if db_config.db_pool_size <= loops {
        tracing::warn!(
            loops,
            pool = db_config.db_pool_size,
            "RELAY_DB_POOL_SIZE is not above RELAY_CONCURRENCY: batches will wait for database connections"
        );
    }
    for n in 0..loops {
        let reader = bus::connect(
            &bus_config.redis_url,
            block + Duration::from_secs(5),
            startup,
        )
        .await?;
        let consumer_name = if n == 0 {
            name.clone()
        } else {
            format!("{name}-{n}")
        };
        consumers.push(
            Consumer::join(
                reader,
                &bus,
                role,
                consumer_name,
                config.batch_size.max(1),
                block,
            )
            .await?,
        );
    }
    let ctx = Context { bus, redis, db };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let heartbeat = tokio::spawn(heartbeat_loop(
        ctx.clone(),
        role,
        name.clone(),
        Duration::from_millis(config.heartbeat_ms.max(100)),
        healthy,
        stop_rx.clone(),
    ));
    handler.start(&ctx);
    tracing::info!(
        role = role.name(),
        consumer = %name,
        loops = consumers.len(),
        "worker ready"
    );
    println!("ready");

    let claim_idle = Duration::from_millis(config.claim_idle_ms.max(1));
    // Each loop is a task of its own, so it runs on the runtime's worker threads next to
    // the I/O it waits for; polled from `main`'s thread instead, every wake-up of a loop
    // was a hand-over between threads.
    let mut loops = tokio::task::JoinSet::new();
    for consumer in consumers {
        loops.spawn(consume(
            role,
            consumer,
            handler.clone(),
            ctx.clone(),
            claim_idle,
            stop_rx.clone(),
        ));
    }
    while let Some(finished) = loops.join_next().await {
        if let Err(e) = finished
            && e.is_panic()
        {
            // A loop that panicked would leave the worker consuming less, or nothing, while
            // its heartbeat says healthy: end the process, so it is restarted, as when the
            // loops ran on main's thread.
            tracing::error!(role = role.name(), "a consume loop panicked; exiting");
            std::panic::resume_unwind(e.into_panic());
        }
    }
    handler.drain().await;
    tracing::info!(role = role.name(), "worker stopping");
    let _ = heartbeat.await;
    Ok(())
}

/// One loop: read (or take over) a batch, handle it, acknowledge it, until `stop`.
async fn consume<H: Handler>(
    role: Role,
    mut consumer: Consumer,
    mut handler: H,
    ctx: Context,
    claim_idle: Duration,
    mut stop_rx: tokio::sync::watch::Receiver<bool>,
) {
    let claim_every = (claim_idle / 2).max(Duration::from_millis(100));
    let mut next_claim = tokio::time::Instant::now() + claim_every;
    let mut backoff = Duration::from_millis(100);
    while !*stop_rx.borrow() {
        let now = tokio::time::Instant::now();
        let read = if now >= next_claim {
            next_claim = now + claim_every;
            let claimed = consumer.claim(claim_idle).await;
            if let Ok(entries) = &claimed
                && !entries.is_empty()
            {
                tracing::warn!(
                    count = entries.len(),
                    "took over entries left pending by another consumer"
                );
            }
            claimed
        } else {
            consumer.read().await
        };
        let entries = match read {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(error = %e, "reading the stream failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop_rx.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        if entries.is_empty() {
            continue;
        }
        metrics::histogram!("nostr_worker_batch_size", "role" => role.name())
            .record(entries.len() as f64);
        let mut pipe = handler.handle(&ctx, &entries).await;
        consumer.ack_into(&mut pipe, &entries);
        let sent: redis::RedisResult<()> = pipe.query_async(&mut ctx.redis.clone()).await;
        if let Err(e) = sent {
            // Unacknowledged entries stay pending and are handled again after
            // RELAY_CLAIM_IDLE_MS; inserts are idempotent.
            tracing::warn!(error = %e, count = entries.len(), "publishing the batch's replies or acknowledging it failed");
        }
    }
}

/// The span of handling one stream entry (OpenTelemetry messaging conventions), a child of
/// the sender's span. Fields each worker fills in later are declared here, empty.
pub fn process_span(
    entry: &Entry,
    group: &'static str,
    trace: &crate::bus::TraceContext,
) -> tracing::Span {
    use tracing::field::Empty;
    let span = crate::trace_span!(
        "process",
        otel.name = %format!("process {}", entry.stream),
        otel.kind = "consumer",
        messaging.system = "redis",
        messaging.operation.type = "process",
        messaging.destination.name = %entry.stream,
        messaging.consumer.group.name = group,
        messaging.message.id = %entry.id,
        nostr.event.id = Empty,
        nostr.event.kind = Empty,
        nostr.outcome = Empty,
        nostr.subscription.id = Empty,
        nostr.query.kind = Empty,
        nostr.results = Empty,
        trace_id = Empty,
    );
    trace.parent(&span);
    span
}

/// Every `every`: if Postgres answers, records a heartbeat in Redis; updates the health
/// flag behind `/readyz` and the stream gauges.
async fn heartbeat_loop(
    mut ctx: Context,
    role: Role,
    consumer: String,
    every: Duration,
    healthy: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let stale = every * 3;
    loop {
        let ok = if store::ping(&ctx.db).await {
            match bus::heartbeat(&mut ctx.redis, &ctx.bus, role, &consumer, stale).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "heartbeat failed");
                    false
                }
            }
        } else {
            tracing::warn!("database unreachable; not sending a heartbeat");
            false
        };
        healthy.store(ok, std::sync::atomic::Ordering::Relaxed);
        if ok {
            bus::record_stream_gauges(&mut ctx.redis, &ctx.bus, role).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}
