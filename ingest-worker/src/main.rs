//! `ingest-worker`: verifies and stores events from the ingest stream. See `lib.rs`.

use anyhow::Context as _;
use clap::Parser;
use ingest_worker::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    shared::telemetry::init(config.log.log_format);
    tracing::info!(?config, "starting ingest-worker");
    ingest_worker::run(config, shared::shutdown::shutdown_signal())
        .await
        .context("ingest-worker failed")
}
