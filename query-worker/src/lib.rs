//! The query worker: a consumer in the `query` group of the query streams.
//!
//! For each `REQ` ([`shared::bus::QueryRequest`]): every filter becomes one indexed SQL
//! query ([`sql`]), the results are merged (ORed, duplicates removed), ordered newest first
//! with ties by lowest id (by relevance for NIP-50 searches), and streamed back to the
//! gateway in chunks, the last one marked end-of-stored-events. A `COUNT` (NIP-45) becomes
//! one `count(*)` over the ORed filters. A negentropy round (NIP-77) loads the filter's
//! `(created_at, id)` items and answers as the stateless responder (`neg.rs`).

mod neg;
mod query;

use std::future::Future;

use shared::bus::Role;
use shared::config::{BusConfig, DatabaseConfig, LogConfig, QueryLimits};
use shared::telemetry::OtelConfig;
use shared::worker::{self, WorkerConfig, WorkerError};

/// Everything the query worker can be told, from flags or `RELAY_*` variables.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "query-worker",
    version,
    about = "Answers Nostr REQ queries from the query stream"
)]
pub struct Config {
    #[command(flatten)]
    pub bus: BusConfig,
    #[command(flatten)]
    pub db: DatabaseConfig,
    #[command(flatten)]
    pub worker: WorkerConfig,
    #[command(flatten)]
    pub query: QueryConfig,
    #[command(flatten)]
    pub log: LogConfig,
    #[command(flatten)]
    pub otel: OtelConfig,
}

/// How answers are sized.
#[derive(clap::Args, Debug, Clone)]
pub struct QueryConfig {
    #[command(flatten)]
    pub limits: QueryLimits,
    /// Events per reply message to the gateway; bounds the size of one pub/sub message.
    #[arg(long, env = "RELAY_REPLY_CHUNK", default_value_t = 200)]
    pub reply_chunk: usize,
    /// The most events one NIP-77 negentropy reconciliation may cover; a filter matching
    /// more is answered `NEG-ERR blocked: this query is too big`. Every round loads the set
    /// again, so this bounds the rows one `NEG-MSG` can make a worker read.
    #[arg(long, env = "RELAY_NEG_MAX_ITEMS", default_value_t = 100_000)]
    pub neg_max_items: u64,
    /// The database time one REQ, COUNT or negentropy round may take, in milliseconds.
    /// Postgres cancels a statement that runs longer, and a REQ whose filters together
    /// take longer stops before its next filter; either way the client gets
    /// `CLOSED error:` (`NEG-ERR error:`) and the worker moves on.
    #[arg(long, env = "RELAY_QUERY_TIMEOUT_MS", default_value_t = 3000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub query_timeout_ms: u64,
}

/// Runs until `shutdown` completes; `metrics` is served on the worker's HTTP port.
pub async fn run(
    config: Config,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let handler = query::Query::new(config.query.clone());
    worker::run(
        Role::Query,
        &config.bus,
        &config.db,
        &config.worker,
        metrics,
        handler,
        shutdown,
    )
    .await
}
