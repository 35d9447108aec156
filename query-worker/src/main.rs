//! `query-worker`: answers stored-event queries from the query stream. See `lib.rs`.

use anyhow::Context as _;
use clap::Parser;
use query_worker::Config;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let telemetry = shared::telemetry::init("query-worker", &config.log, &config.otel)
        .context("cannot set up telemetry")?;
    tracing::info!(?config, "starting query-worker");
    let result = query_worker::run(
        config,
        telemetry.metrics_handle(),
        shared::shutdown::shutdown_signal(),
    )
    .await;
    telemetry.shutdown();
    result.context("query-worker failed")
}
