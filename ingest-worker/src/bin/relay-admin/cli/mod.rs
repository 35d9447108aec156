//! `relay-admin`: the operator's command line, talking to Postgres (and Redis for `stats`)
//! directly, without going through a gateway.
//!
//! - [`import`]: JSON lines in, verified and stored through [`ingest_worker::write::store_batch`],
//!   the ingest worker's own write path (keep-newest, NIP-09 tombstones, NIP-62).
//! - [`export`]: matching events out as JSON lines, read through a server-side cursor.
//! - [`stats`]: counts by kind, database size, stream lengths and lag.
//! - [`delete`]: removes matching events (operator action, no tombstones).
//! - [`sync`]: reconciles with another relay over WebSocket (NIP-77 negentropy when it
//!   advertises it, REQ paging otherwise); [`remote`] is the WebSocket/HTTP side and
//!   [`nip77`] the negentropy exchange.
//!
//! Exit codes: 0 done (an import may still have rejected lines), 1 failure (I/O, database,
//! the other relay broke off), 2 bad usage, 3 the other relay did not answer in time.

pub mod delete;
pub mod export;
pub mod import;
pub mod nip77;
pub mod remote;
pub mod stats;
pub mod sync;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use shared::config::{BusConfig, DatabaseConfig, PublicUrl};
use shared::filter::Filter;

/// Everything `relay-admin` can be told.
#[derive(clap::Parser, Debug)]
#[command(
    name = "relay-admin",
    version,
    about = "Operator tool for the relay: import, export, stats, delete, sync",
    after_help = "Exit codes: 0 done (an import may have rejected some lines), 1 failure \
                  (I/O, database, the other relay broke off), 2 bad usage, 3 the other relay \
                  did not answer within --timeout."
)]
pub struct Cli {
    #[command(flatten)]
    pub db: DatabaseConfig,
    #[command(flatten)]
    pub bus: BusConfig,
    #[command(flatten)]
    pub public: PublicUrl,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Stores events from JSON lines (one event per line), verified like EVENT from a
    /// client and written by the ingest worker's own code.
    ///
    /// Bad lines (not JSON, wrong id, bad signature, expired, ephemeral kinds) are reported
    /// on stderr with their line number and counted; the import goes on. Imported events are
    /// not fanned out live: subscribers see them on their next REQ, not as they arrive.
    Import(import::ImportArgs),
    /// Writes every stored event matching a filter as JSON lines (expired events excluded).
    Export(export::ExportArgs),
    /// Event counts by kind, database size, and the ingest and query streams' backlog.
    Stats(stats::StatsArgs),
    /// Deletes the stored events matching a filter. Unlike NIP-09, nothing stops the same
    /// events from being published again.
    Delete(delete::DeleteArgs),
    /// Copies events from or to another relay over WebSocket: NIP-77 negentropy when it
    /// lists 77 in its NIP-11 `supported_nips`, REQ paging otherwise.
    ///
    /// Pulled events are verified and stored like `import` (not fanned out live); pushed
    /// events are sent with EVENT and their OK answers counted.
    Sync(sync::SyncArgs),
}

/// The other relay did not answer in time (exit code 3).
#[derive(Debug, thiserror::Error)]
#[error("{what}: no answer within {secs} s")]
pub struct NoAnswer {
    /// What was waited for.
    pub what: String,
    /// The timeout, in seconds.
    pub secs: u64,
}

/// A request the tool refuses to run as given (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// How long `import` and `sync` wait for an unreachable database while applying migrations.
const MIGRATE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs one subcommand.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let pool = || -> anyhow::Result<deadpool_postgres::Pool> {
        shared::store::pool(&cli.db).context("cannot set up the database pool")
    };
    // import and sync write events through the ingest worker's own code, which needs the
    // current schema (migration 3's function, say): bring the database up to it first.
    let migrated = || async {
        let pool = pool()?;
        shared::store::migrate(&pool, MIGRATE_WAIT)
            .await
            .context("cannot bring the database schema up to date")?;
        anyhow::Ok(pool)
    };
    match cli.command {
        Command::Import(args) => import::run(&migrated().await?, &cli.public, args).await,
        Command::Export(args) => export::run(&pool()?, args).await,
        Command::Stats(args) => stats::run(&pool()?, &cli.bus, args).await,
        Command::Delete(args) => delete::run(&pool()?, args).await,
        Command::Sync(args) => sync::run(&migrated().await?, &cli.public, args).await,
    }
}

/// The exit code for an error returned by [`run`].
pub fn exit_code(error: &anyhow::Error) -> ExitCode {
    if error.chain().any(|e| e.is::<NoAnswer>()) {
        ExitCode::from(3)
    } else if error.chain().any(|e| e.is::<Usage>()) {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

/// Whether the error is a closed output pipe (`relay-admin export | head`): not a failure.
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Parses a `--filter` argument (a NIP-01 filter as JSON).
pub fn parse_filter(text: &str) -> anyhow::Result<Filter> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Usage(format!("--filter is not JSON: {e}")))?;
    Filter::from_value(&value).map_err(|e| Usage(format!("--filter: {e}")).into())
}

/// The filter's `limit` as a row count (none: every matching row).
fn row_limit(filter: &Filter) -> i64 {
    filter
        .limit
        .map_or(i64::MAX, |l| i64::try_from(l).unwrap_or(i64::MAX))
}

/// A duration from `--timeout` seconds.
fn seconds(secs: u64) -> Duration {
    Duration::from_secs(secs.max(1))
}
