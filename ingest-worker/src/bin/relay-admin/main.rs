//! `relay-admin`: the operator's command line (import, export, stats, delete, sync).
//! The commands live in [`cli`]; this is glue: parse, run, exit code. It stores through the
//! ingest worker's library (`ingest_worker::write`), so imported events are checked and
//! written exactly as published ones.

use std::process::ExitCode;

use clap::Parser as _;

mod cli;

use cli::Cli;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Only warnings from the libraries; the commands report on stdout and stderr themselves.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if cli::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay-admin: {e:#}");
            cli::exit_code(&e)
        }
    }
}
