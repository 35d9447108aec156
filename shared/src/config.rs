//! Configuration pieces every binary shares, read from flags or environment variables.
//!
//! Each binary has one `Config` struct (clap derive) that flattens the pieces it needs from
//! here; clap reads the environment, so no other code calls `std::env::var`. Every binary's
//! `--help` lists each setting with its variable and default.

use std::fmt;

/// Where the bus lives and what its names start with.
#[derive(clap::Args, Clone)]
pub struct BusConfig {
    /// Redis URL for streams and pub/sub.
    #[arg(
        long,
        env = "RELAY_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/"
    )]
    pub redis_url: String,
    /// Prefix of every Redis key and channel, so several relays (or tests) can share a Redis.
    #[arg(long, env = "RELAY_BUS_PREFIX", default_value = "nostr")]
    pub bus_prefix: String,
    /// Number of ingest and query stream shards; all binaries of a cluster must agree.
    #[arg(long, env = "RELAY_BUS_SHARDS", default_value_t = 1)]
    pub bus_shards: u16,
}

impl fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusConfig")
            .field("redis_url", &mask_url(&self.redis_url))
            .field("bus_prefix", &self.bus_prefix)
            .field("bus_shards", &self.bus_shards)
            .finish()
    }
}

/// The Postgres database (workers only).
#[derive(clap::Args, Clone)]
pub struct DatabaseConfig {
    /// Postgres URL, e.g. postgres://user:password@host:5432/nostr.
    #[arg(
        long,
        env = "RELAY_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/nostr"
    )]
    pub database_url: String,
    /// Maximum open database connections of this process; more requests wait for one.
    #[arg(long, env = "RELAY_DB_POOL_SIZE", default_value_t = 8)]
    pub db_pool_size: usize,
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("database_url", &mask_url(&self.database_url))
            .field("db_pool_size", &self.db_pool_size)
            .finish()
    }
}

/// How many stored events a filter may return. The gateway applies and advertises these
/// (NIP-11); query workers apply them again.
#[derive(clap::Args, Clone, Debug)]
pub struct QueryLimits {
    /// Events returned for a filter without `limit`.
    #[arg(long, env = "RELAY_DEFAULT_LIMIT", default_value_t = 500)]
    pub default_limit: u64,
    /// The most events returned for one filter, whatever its `limit` says.
    #[arg(long, env = "RELAY_MAX_LIMIT", default_value_t = 5000)]
    pub max_limit: u64,
}

impl QueryLimits {
    /// The limit to apply to a filter's requested `limit`.
    pub fn clamp(&self, requested: Option<u64>) -> u64 {
        requested.unwrap_or(self.default_limit).min(self.max_limit)
    }
}

/// The relay's public address, as clients know it.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct PublicUrl {
    /// The relay's public WebSocket URL (e.g. wss://relay.example.com). Used for NIP-42
    /// `relay` tags, NIP-62 requests to vanish, and shown on `GET /`.
    #[arg(long, env = "RELAY_PUBLIC_URL")]
    pub public_url: Option<String>,
}

/// Reduces a relay URL to what identifies the relay: lowercase host and port, without the
/// scheme, path slashes or default ports. `wss://Relay.Example.com/` and
/// `relay.example.com:443` give the same result.
pub fn relay_host(url: &str) -> String {
    let url = url.trim();
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let host = rest
        .split(['/', '?', '#'])
        .next()
        .unwrap_or("")
        .to_lowercase();
    match default_port(scheme) {
        Some(port) => host.strip_suffix(port).map_or(host.clone(), str::to_owned),
        None => host
            .strip_suffix(":443")
            .or_else(|| host.strip_suffix(":80"))
            .map_or(host.clone(), str::to_owned),
    }
}

/// The port a URL's scheme implies, as written after a host (`:443` for `wss` and `https`,
/// `:80` for `ws` and `http`); the scheme's case does not matter.
pub fn default_port(scheme: &str) -> Option<&'static str> {
    match scheme.to_ascii_lowercase().as_str() {
        "wss" | "https" => Some(":443"),
        "ws" | "http" => Some(":80"),
        _ => None,
    }
}

/// Log output.
#[derive(clap::Args, Clone, Debug)]
pub struct LogConfig {
    /// Log line format on stderr. The filter comes from RUST_LOG (default "info").
    #[arg(long, env = "RELAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `url` with any password replaced by `***`, for logging.
pub fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_hosts_normalize() {
        assert_eq!(relay_host("wss://Relay.Example.com/"), "relay.example.com");
        assert_eq!(
            relay_host("wss://relay.example.com:443"),
            "relay.example.com"
        );
        assert_eq!(relay_host("ws://127.0.0.1:7777"), "127.0.0.1:7777");
        assert_eq!(relay_host("127.0.0.1:7777/"), "127.0.0.1:7777");
        assert_ne!(
            relay_host("wss://relay.example.com"),
            relay_host("wss://other.example.com")
        );
    }

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            mask_url("postgres://relay:s3cret@db:5432/nostr"),
            "postgres://relay:***@db:5432/nostr"
        );
        assert_eq!(mask_url("redis://:pw@r:6379/"), "redis://:***@r:6379/");
        assert_eq!(mask_url("redis://127.0.0.1/"), "redis://127.0.0.1/");
    }
}
