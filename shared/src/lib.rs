//! The protocol and bus contract shared by the gateway and the workers.
//!
//! - [`address`]: client addresses as limits count them (IPv6 by /64).
//! - [`event`]: NIP-01 events, typed ids and keys, canonical serialization, id and BIP-340
//!   signature checks, kind classes.
//! - [`filter`]: NIP-01 filters, their parsing and in-memory matching.
//! - [`message`]: client and relay messages (parse and serialize).
//! - [`bus`]: Redis stream and channel names, the envelopes on them, and the consumer used
//!   by both workers.
//! - [`config`]: configuration pieces every binary flattens into its own `Config`.
//! - [`telemetry`]: logging setup.
//! - [`shutdown`]: the SIGINT/SIGTERM future.
//! - [`nip98`]: NIP-98 HTTP authorization (the management API's `Authorization` header).
//! - [`search`]: NIP-50 search: a query's words, live matching, the text events are
//!   indexed by.
//! - [`moderation`]: the NIP-86 moderation state, its Redis snapshot and the admin envelopes.
//! - [`vanish`]: NIP-62 requests to vanish: which ones this relay acts on.
//! - `store` (feature `worker`): the Postgres schema, migrations and pool.
//! - `sql` (feature `worker`): filters as parameterized SQL (query workers and tools).
//! - `nip77` (feature `worker`): NIP-77 item sets, built alike by both reconciling sides.
//! - `worker` (feature `worker`): the read → handle → ack loop both workers run.
//! - `health` (feature `worker`): the workers' small HTTP server (`/metrics`, `/healthz`,
//!   `/readyz`).
//!
//! **Invariant:** nothing here knows about axum or WebSockets; the binaries depend on this
//! crate and never on each other.
#![deny(missing_docs)]

pub mod address;
pub mod bus;
pub mod config;
pub mod event;
pub mod filter;
#[cfg(feature = "worker")]
pub mod health;
pub mod message;
pub mod moderation;
#[cfg(feature = "worker")]
pub mod nip77;
pub mod nip98;
pub mod search;
pub mod shutdown;
#[cfg(feature = "worker")]
pub mod sql;
#[cfg(feature = "worker")]
pub mod store;
pub mod telemetry;
pub mod vanish;
#[cfg(feature = "worker")]
pub mod worker;

/// Seconds since the Unix epoch, from the system clock.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
