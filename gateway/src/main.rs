//! `gateway`: terminates client WebSockets and bridges them to the bus. See `lib.rs`.

use anyhow::Context as _;
use clap::Parser;
use gateway::Config;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let telemetry = shared::telemetry::init("gateway", &config.log, &config.otel)
        .context("cannot set up telemetry")?;
    tracing::info!(?config, "starting gateway");
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr().context("listener has no address")?;
    // The one stdout line: scripts and tests read the bound address from it.
    println!("listening on {addr}");
    let result = gateway::run(
        config,
        listener,
        telemetry.metrics_handle(),
        shared::shutdown::shutdown_signal(),
    )
    .await;
    telemetry.shutdown();
    result.context("gateway failed")
}
