//! The gateway's configuration: flags or `RELAY_*` environment variables.

use shared::config::{BusConfig, LogConfig, PublicUrl, QueryLimits};
use shared::event::{Kind, PubKey};
use shared::telemetry::OtelConfig;

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
    #[command(flatten)]
    pub public: PublicUrl,
    #[command(flatten)]
    pub bus: BusConfig,
    #[command(flatten)]
    pub limits: Limits,
    #[command(flatten)]
    pub query_limits: QueryLimits,
    #[command(flatten)]
    pub event_limits: EventLimits,
    #[command(flatten)]
    pub auth: AuthPolicy,
    #[command(flatten)]
    pub rate: RateLimits,
    #[command(flatten)]
    pub info: RelayInfo,
    #[command(flatten)]
    pub admin: AdminApi,
    #[command(flatten)]
    pub log: LogConfig,
    #[command(flatten)]
    pub otel: OtelConfig,
}

/// Bounds on what one connection may use. Each says what happens at the limit.
#[derive(clap::Args, Debug, Clone)]
pub struct Limits {
    /// Largest client message acted upon, in bytes. A larger one is answered with a NOTICE
    /// and dropped; one over twice this size closes the connection (close code 1009).
    #[arg(long, env = "RELAY_MAX_MESSAGE_BYTES", default_value_t = 512 * 1024)]
    pub max_message_bytes: usize,
    /// Read buffer of each WebSocket, in bytes (grows for larger messages as needed); small
    /// buffers keep idle connections cheap.
    #[arg(long, env = "RELAY_WS_READ_BUFFER_BYTES", default_value_t = 8 * 1024)]
    pub ws_read_buffer_bytes: usize,
    /// Bytes of outgoing frames gathered before a socket write; frames queued together go
    /// out in one write.
    #[arg(long, env = "RELAY_WS_WRITE_BUFFER_BYTES", default_value_t = 8 * 1024)]
    pub ws_write_buffer_bytes: usize,
    /// Open subscriptions per connection; a `REQ` for one more gets `CLOSED rate-limited:`.
    #[arg(long, env = "RELAY_MAX_SUBSCRIPTIONS", default_value_t = 100)]
    pub max_subscriptions: usize,
    /// Memory one connection's subscriptions may hold in this gateway (their filters and
    /// live-index entries, about), in bytes; a `REQ` that would go past it gets
    /// `CLOSED rate-limited:`.
    #[arg(long, env = "RELAY_MAX_SUBSCRIPTION_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub max_subscription_bytes: usize,
    /// Filters in one `REQ` or `COUNT`; more get `CLOSED invalid:`.
    #[arg(long, env = "RELAY_MAX_FILTERS", default_value_t = 20)]
    pub max_filters: usize,
    /// Longest subscription id, in characters (NIP-01 allows at most 64; larger values are
    /// capped at 64).
    #[arg(long, env = "RELAY_MAX_SUBID_LENGTH", default_value_t = 64)]
    pub max_subid_length: usize,
    /// Open connections this gateway accepts; past it, upgrades get HTTP 503.
    #[arg(long, env = "RELAY_MAX_CONNECTIONS", default_value_t = 20_000)]
    pub max_connections: usize,
    /// Open connections from one client address (IPv6: one /64) on this gateway; past it,
    /// upgrades get HTTP 429.
    #[arg(long, env = "RELAY_MAX_CONNECTIONS_PER_IP", default_value_t = 32)]
    pub max_connections_per_ip: usize,
    /// Messages queued for one client before it counts as too slow and is disconnected
    /// (close code 1008), so it cannot grow the gateway's memory.
    #[arg(long, env = "RELAY_SEND_QUEUE", default_value_t = 2048)]
    pub send_queue: usize,
    /// Bytes of frames queued for one client before it counts as too slow and is
    /// disconnected (close code 1008), whatever their number; a single larger frame is
    /// still sent when the queue is empty.
    #[arg(long, env = "RELAY_SEND_QUEUE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub send_queue_bytes: usize,
    /// Live events buffered for a subscription while its stored events are still coming;
    /// past it the subscription is ended with `CLOSED error:`.
    #[arg(long, env = "RELAY_LIVE_BUFFER", default_value_t = 2000)]
    pub live_buffer: usize,
    /// After EOSE, how long a subscription remembers the ids it already sent, to drop a live
    /// copy of an event it got as stored, in milliseconds.
    #[arg(long, env = "RELAY_DUPLICATE_WINDOW_MS", default_value_t = 5000)]
    pub duplicate_window_ms: u64,
    /// How long an EVENT, REQ or COUNT may wait for a worker's answer (workers, Redis or
    /// Postgres down) before the gateway answers `OK false error:` / `CLOSED error:` itself,
    /// in milliseconds.
    #[arg(long, env = "RELAY_REPLY_TIMEOUT_MS", default_value_t = 10_000)]
    pub reply_timeout_ms: u64,
    /// Open NIP-77 negentropy sessions per connection (a namespace apart from `REQ`
    /// subscriptions); a `NEG-OPEN` for one more gets `NEG-ERR rate-limited:`.
    #[arg(long, env = "RELAY_MAX_NEG_SESSIONS", default_value_t = 8)]
    pub max_neg_sessions: usize,
    /// How long a negentropy session may wait for the client's next `NEG-MSG` before it is
    /// ended with `NEG-ERR closed:`, in seconds.
    #[arg(long, env = "RELAY_NEG_IDLE_SECS", default_value_t = 60)]
    pub neg_idle_secs: u64,
    /// On shutdown, how long to wait for connections to close before exiting, in seconds.
    #[arg(long, env = "RELAY_DRAIN_SECS", default_value_t = 10)]
    pub drain_secs: u64,
    /// A worker counts as alive for `/readyz` if its heartbeat is younger than this, in ms.
    #[arg(long, env = "RELAY_WORKER_FRESH_MS", default_value_t = 6000)]
    pub worker_fresh_ms: u64,
    /// Most events in one ingest stream entry: events that arrive while the previous entry
    /// is being appended go together in the next (never waiting for more). An entry also
    /// stays within `RELAY_MAX_MESSAGE_BYTES` (a larger event goes alone). 1 appends each
    /// event on its own.
    #[arg(long, env = "RELAY_INGEST_ENTRY_EVENTS", default_value_t = 32,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub ingest_entry_events: u16,
}

/// What an event may look like; each violation gets `OK false` with the prefix named.
#[derive(clap::Args, Debug, Clone)]
pub struct EventLimits {
    /// Most tags in one event (`invalid:`).
    #[arg(long, env = "RELAY_MAX_EVENT_TAGS", default_value_t = 2500)]
    pub max_event_tags: usize,
    /// Longest `content`, in characters (`invalid:`).
    #[arg(long, env = "RELAY_MAX_CONTENT_LENGTH", default_value_t = 100_000)]
    pub max_content_length: usize,
    /// How far in the past `created_at` may be, in seconds; 0 accepts any age (`invalid:`).
    #[arg(long, env = "RELAY_CREATED_AT_LOWER_LIMIT", default_value_t = 0)]
    pub created_at_lower_limit: i64,
    /// How far in the future `created_at` may be, in seconds (`invalid:`).
    #[arg(long, env = "RELAY_CREATED_AT_UPPER_LIMIT", default_value_t = 900)]
    pub created_at_upper_limit: i64,
    /// Minimum NIP-13 proof-of-work difficulty (leading zero bits of the id); 0 is off
    /// (`pow:`).
    #[arg(long, env = "RELAY_MIN_POW_DIFFICULTY", default_value_t = 0)]
    pub min_pow_difficulty: u32,
}

/// NIP-42 authentication policies; each refusal is `auth-required:` (or `restricted:` when
/// the client authenticated as someone else).
#[derive(clap::Args, Debug, Clone)]
pub struct AuthPolicy {
    /// Only authenticated clients may publish.
    #[arg(long, env = "RELAY_AUTH_WRITE", default_value_t = false, action = clap::ArgAction::Set)]
    pub auth_write: bool,
    /// Only authenticated clients may query (REQ and COUNT).
    #[arg(long, env = "RELAY_AUTH_READ", default_value_t = false, action = clap::ArgAction::Set)]
    pub auth_read: bool,
    /// Kinds given only to an authenticated author or `p`-tagged recipient, through REQ,
    /// live delivery and COUNT; comma-separated, empty for none.
    #[arg(long, env = "RELAY_RESTRICTED_KINDS", default_value = "4,1059,14")]
    pub restricted_kinds: String,
    /// How far an AUTH event's `created_at` may be from now, in seconds.
    #[arg(long, env = "RELAY_AUTH_WINDOW_SECS", default_value_t = 600)]
    pub auth_window_secs: u64,
    /// Pubkeys one connection may authenticate as (NIP-42 allows several); an AUTH for one
    /// more gets `OK false restricted:`.
    #[arg(long, env = "RELAY_MAX_AUTH_IDENTITIES", default_value_t = 4,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_identities: u64,
}

impl AuthPolicy {
    /// The read-restricted kinds, parsed.
    pub fn restricted(&self) -> Result<Vec<Kind>, String> {
        self.restricted_kinds
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<u16>()
                    .map(Kind)
                    .map_err(|_| format!("RELAY_RESTRICTED_KINDS: {s:?} is not a kind"))
            })
            .collect()
    }
}

/// Rate limits, counted in Redis so they hold across every gateway; 0 turns one off.
/// Exceeding one gets `rate-limited:`. An IPv6 address counts by its /64 prefix.
#[derive(clap::Args, Debug, Clone)]
pub struct RateLimits {
    /// Events per minute from one IP address.
    #[arg(long, env = "RELAY_RATE_EVENTS_PER_IP", default_value_t = 300)]
    pub events_per_ip: u64,
    /// Events per minute from one pubkey.
    #[arg(long, env = "RELAY_RATE_EVENTS_PER_PUBKEY", default_value_t = 120)]
    pub events_per_pubkey: u64,
    /// REQ and COUNT messages per minute from one IP address.
    #[arg(long, env = "RELAY_RATE_REQS_PER_IP", default_value_t = 600)]
    pub reqs_per_ip: u64,
    /// Milliseconds of query-worker database time per minute for the REQ, COUNT and
    /// negentropy rounds of one IP address (the workers measure it); past it, new queries
    /// get `CLOSED rate-limited:` until the minute is over. Prices a query by its cost, not
    /// only its count.
    #[arg(long, env = "RELAY_RATE_QUERY_MS_PER_IP", default_value_t = 20_000)]
    pub query_ms_per_ip: u64,
    /// Milliseconds each query reserves of that budget when it is sent (the worker gives
    /// back what it did not use), so queries sent in a burst, before any is answered,
    /// count too: at most about `RELAY_RATE_QUERY_MS_PER_IP` / this many are in flight.
    #[arg(long, env = "RELAY_RATE_QUERY_RESERVE_MS", default_value_t = 100)]
    pub query_reserve_ms: u64,
    /// AUTH messages per minute from one IP address (each is a signature check).
    #[arg(long, env = "RELAY_RATE_AUTHS_PER_IP", default_value_t = 60)]
    pub auths_per_ip: u64,
    /// Take the client address from the last `X-Forwarded-For` entry (set this only behind
    /// a load balancer that sets it).
    #[arg(long, env = "RELAY_TRUST_FORWARDED", default_value_t = false, action = clap::ArgAction::Set)]
    pub trust_forwarded: bool,
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

/// Who may use the NIP-86 management API (`POST /`, NIP-98 authorization).
#[derive(clap::Args, Debug, Clone)]
pub struct AdminApi {
    /// Hex pubkeys allowed to manage the relay, comma-separated; empty: the API refuses
    /// everyone (401 without valid authorization, 403 with it).
    #[arg(long, env = "RELAY_ADMIN_PUBKEYS", default_value = "")]
    pub admin_pubkeys: String,
    /// NIP-98: how far, in seconds, a management request's authorization event may be
    /// dated from the gateway's clock (either way); further gets 401.
    #[arg(long, env = "RELAY_ADMIN_AUTH_WINDOW_SECS", default_value_t = shared::nip98::SUGGESTED_MAX_SKEW_SECS)]
    pub admin_auth_window_secs: u64,
    /// Longest text parameter (a reason, the relay's name, description or icon URL) a
    /// management request may carry, in characters; longer gets an `invalid:` error.
    #[arg(long, env = "RELAY_ADMIN_MAX_TEXT", default_value_t = 4096)]
    pub admin_max_text: usize,
}

impl AdminApi {
    /// The admin pubkeys, parsed.
    pub fn admins(&self) -> Result<Vec<PubKey>, String> {
        self.admin_pubkeys
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                PubKey::from_hex(s).map_err(|_| {
                    format!("RELAY_ADMIN_PUBKEYS: {s:?} is not a 64-character lowercase hex pubkey")
                })
            })
            .collect()
    }
}

impl Config {
    /// Checks settings that clap cannot; call before opening any socket.
    pub fn validate(&self) -> Result<(), String> {
        self.public.urls()?;
        self.auth.restricted()?;
        self.admin.admins()?;
        if self.auth.auth_window_secs == 0 {
            return Err("RELAY_AUTH_WINDOW_SECS must be at least 1".into());
        }
        if self.admin.admin_auth_window_secs == 0 {
            return Err("RELAY_ADMIN_AUTH_WINDOW_SECS must be at least 1".into());
        }
        if self.admin.admin_max_text == 0 {
            return Err("RELAY_ADMIN_MAX_TEXT must be at least 1".into());
        }
        if self.limits.max_subid_length == 0 {
            return Err("RELAY_MAX_SUBID_LENGTH must be at least 1".into());
        }
        if self.limits.max_message_bytes < 1024 {
            return Err("RELAY_MAX_MESSAGE_BYTES must be at least 1024".into());
        }
        Ok(())
    }
}
