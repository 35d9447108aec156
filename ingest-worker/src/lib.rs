//! The ingest worker: a consumer in the `ingest` group of the ingest streams.
//!
//! For each batch: decode the envelopes, recompute ids and verify signatures (spread over
//! the cores), store what is storable in Postgres transactions of at most
//! `RELAY_STORE_BATCH_EVENTS` events ([`write`]), then answer `OK` to each originating
//! gateway and publish every stored or ephemeral event on the live channel. The shared loop
//! ([`shared::worker`]) acknowledges the batch afterwards.
//!
//! Management changes (NIP-86) arrive on ingest shard 0 and are applied by [`admin`]; events
//! refused by the moderation state are answered `blocked:` before anything is written.
//!
//! **Invariant:** `OK true` for a stored kind is sent only after the transaction holding the
//! event committed; ephemeral events are never written.

pub mod admin;
pub mod ingest;
pub mod write;

use std::future::Future;

use shared::bus::Role;
use shared::config::{BusConfig, DatabaseConfig, LogConfig, PublicUrl};
use shared::telemetry::OtelConfig;
use shared::worker::{self, WorkerConfig, WorkerError};

/// Everything the ingest worker can be told, from flags or `RELAY_*` variables.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "ingest-worker",
    version,
    about = "Verifies and stores Nostr events from the ingest stream"
)]
pub struct Config {
    #[command(flatten)]
    pub bus: BusConfig,
    #[command(flatten)]
    pub db: DatabaseConfig,
    #[command(flatten)]
    pub worker: WorkerConfig,
    #[command(flatten)]
    pub public: PublicUrl,
    /// How often expired events (NIP-40) are purged, in seconds; 0 turns purging off (they
    /// are still never served).
    #[arg(long, env = "RELAY_EXPIRY_PURGE_SECS", default_value_t = 60)]
    pub expiry_purge_secs: u64,
    /// Most expired events one purge statement deletes; a purge repeats statements until
    /// none are left, so this bounds each statement's locks and WAL, not the purge.
    #[arg(long, env = "RELAY_EXPIRY_PURGE_BATCH", default_value_t = 10_000,
          value_parser = clap::value_parser!(i64).range(1..))]
    pub expiry_purge_batch: i64,
    /// Most events stored in one transaction. A batch of entries can hold more (an entry
    /// holds up to a gateway's `RELAY_INGEST_ENTRY_EVENTS`); they are stored in several
    /// transactions, one after the other, so a failed transaction retries at most this many
    /// events one by one.
    #[arg(long, env = "RELAY_STORE_BATCH_EVENTS", default_value_t = 256,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub store_batch_events: u16,
    #[command(flatten)]
    pub log: LogConfig,
    #[command(flatten)]
    pub otel: OtelConfig,
}

/// Runs until `shutdown` completes; `metrics` is served on the worker's HTTP port.
pub async fn run(
    config: Config,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    worker::run(
        Role::Ingest,
        &config.bus,
        &config.db,
        &config.worker,
        metrics,
        ingest::Ingest::new(&config),
        shutdown,
    )
    .await
}
