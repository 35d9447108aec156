//! `query-worker`: answers stored-event queries from the query stream. See `lib.rs`.

use anyhow::Context as _;
use clap::Parser;
use query_worker::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    shared::telemetry::init(config.log.log_format);
    tracing::info!(?config, "starting query-worker");
    query_worker::run(config, shared::shutdown::shutdown_signal())
        .await
        .context("query-worker failed")
}
