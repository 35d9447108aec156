//! End-to-end tests: the real binaries, real Redis and Postgres, WebSocket clients.
//! Run with `make test` (it starts the services and sets `RELAY_TEST_*`).

mod admin_cli;
mod hardening;
mod hostile;
mod nip01;
mod nip77;
mod nip86;
mod observability;
mod policy;

use std::sync::atomic::{AtomicU64, Ordering};

use relay_tests::Client;
use serde_json::json;
use shared::event::signing::Keys;
use shared::event::{Event, Kind};

/// Sends a `REQ` that needs no query and waits for its `EOSE`. Everything the gateway queued
/// for this connection before is received first, so after `barrier` returns, "no event was
/// delivered" is a fact, not a timing guess.
pub async fn barrier(client: &mut Client) {
    static N: AtomicU64 = AtomicU64::new(0);
    let sub = format!("barrier-{}", N.fetch_add(1, Ordering::Relaxed));
    client.send_req(&sub, &[json!({"ids": []})]).await;
    client.until_eose(&sub).await;
    client.send_json(json!(["CLOSE", sub])).await;
}

/// A kind-1 note.
pub fn note(keys: &Keys, created_at: i64, content: &str) -> Event {
    keys.sign(created_at, Kind(1), vec![], content)
}

/// Current unix time.
pub fn now() -> i64 {
    shared::unix_now()
}
