//! `ingest-worker`: verifies and stores events from the ingest stream. See `lib.rs`.

use anyhow::Context as _;
use clap::Parser;
use ingest_worker::Config;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let telemetry = shared::telemetry::init("ingest-worker", &config.log, &config.otel)
        .context("cannot set up telemetry")?;
    tracing::info!(?config, "starting ingest-worker");
    if config.public.urls().map_err(anyhow::Error::msg)?.is_none() {
        tracing::warn!(
            "RELAY_PUBLIC_URL is not set: requests to vanish (NIP-62) are followed only when addressed to ALL_RELAYS"
        );
    }
    let result = ingest_worker::run(
        config,
        telemetry.metrics_handle(),
        shared::shutdown::shutdown_signal(),
    )
    .await;
    telemetry.shutdown();
    result.context("ingest-worker failed")
}
