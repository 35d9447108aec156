//! The gateway's configuration: flags or `RELAY_*` environment variables.

use shared::config::{BusConfig, LogConfig};

/// Everything the gateway can be told.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "gateway",
    version,
    about = "Nostr relay gateway: WebSocket sessions bridged to Redis streams"
)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "RELAY_LISTEN", default_value = "127.0.0.1:7777")]
    pub listen: String,
    /// The relay's public WebSocket URL, as clients reach it (shown in NIP-11 and logs).
    #[arg(long, env = "RELAY_PUBLIC_URL")]
    pub public_url: Option<String>,
    #[command(flatten)]
    pub bus: BusConfig,
    #[command(flatten)]
    pub limits: Limits,
    #[command(flatten)]
    pub info: RelayInfo,
    #[command(flatten)]
    pub log: LogConfig,
}

/// Bounds on what one connection may use. Each says what happens at the limit.
#[derive(clap::Args, Debug, Clone)]
pub struct Limits {
    /// Largest WebSocket message accepted, in bytes; a larger one closes the connection.
    #[arg(long, env = "RELAY_MAX_MESSAGE_BYTES", default_value_t = 512 * 1024)]
    pub max_message_bytes: usize,
    /// Open connections this gateway accepts; past it, upgrades get HTTP 503.
    #[arg(long, env = "RELAY_MAX_CONNECTIONS", default_value_t = 20_000)]
    pub max_connections: usize,
    /// Messages queued for one client before it counts as too slow and is disconnected
    /// (close code 1008), so it cannot grow the gateway's memory.
    #[arg(long, env = "RELAY_SEND_QUEUE", default_value_t = 2048)]
    pub send_queue: usize,
    /// Live events buffered for a subscription while its stored events are still coming;
    /// past it the subscription is ended with `CLOSED error:`.
    #[arg(long, env = "RELAY_LIVE_BUFFER", default_value_t = 2000)]
    pub live_buffer: usize,
    /// After EOSE, how long a subscription remembers the ids it already sent, to drop a live
    /// copy of an event it got as stored, in milliseconds.
    #[arg(long, env = "RELAY_DUPLICATE_WINDOW_MS", default_value_t = 5000)]
    pub duplicate_window_ms: u64,
    /// On shutdown, how long to wait for connections to close before exiting, in seconds.
    #[arg(long, env = "RELAY_DRAIN_SECS", default_value_t = 10)]
    pub drain_secs: u64,
    /// A worker counts as alive for `/readyz` if its heartbeat is younger than this, in ms.
    #[arg(long, env = "RELAY_WORKER_FRESH_MS", default_value_t = 6000)]
    pub worker_fresh_ms: u64,
}

/// What NIP-11 says about this relay.
#[derive(clap::Args, Debug, Clone)]
pub struct RelayInfo {
    /// Relay name.
    #[arg(long, env = "RELAY_NAME", default_value = "nostr relay cluster")]
    pub relay_name: String,
    /// Relay description.
    #[arg(
        long,
        env = "RELAY_DESCRIPTION",
        default_value = "A horizontally scaled Nostr relay"
    )]
    pub relay_description: String,
    /// Operator's public key (hex).
    #[arg(long, env = "RELAY_PUBKEY")]
    pub relay_pubkey: Option<String>,
    /// Operator contact (URI).
    #[arg(long, env = "RELAY_CONTACT")]
    pub relay_contact: Option<String>,
    /// Relay icon URL.
    #[arg(long, env = "RELAY_ICON")]
    pub relay_icon: Option<String>,
}
