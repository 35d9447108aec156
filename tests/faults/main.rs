//! Fault tests: the real binaries under kill -9, Redis and Postgres restarts, Redis refusing
//! one command of a round trip, a load balancer losing a gateway, slow consumers, SIGTERM
//! and worker outages. Run with `make test` (it starts the shared services and sets
//! `RELAY_TEST_*`); tests that restart Redis or Postgres start private ones
//! (`relay_tests::faults::PrivateServices`).
//!
//! Each test is bounded in time and prints its counts (`-- --nocapture` shows them). The
//! load tests take [`HEAVY`] so that two of them never compete for the CPU at once.

mod balancer;
mod bus_overflow;
mod crash;
mod outage;
mod postgres;
mod redis_refusal;
mod redis_restart;
mod sigterm;
mod slow_consumer;

use std::future::Future;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

/// One load test at a time (this machine may have only two cores).
static HEAVY: Semaphore = Semaphore::const_new(1);

/// Takes the load-test slot.
pub async fn heavy() -> SemaphorePermit<'static> {
    HEAVY.acquire().await.expect("semaphore is never closed")
}

/// Environment pairs for `ClusterOptions::env`.
pub use relay_tests::env_vars as env;

/// Runs a test body, failing it if it takes longer than `secs`.
pub async fn bounded<F: Future>(secs: u64, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: did not finish within {secs} s"),
    }
}
