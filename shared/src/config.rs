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
    /// Distinct values in one list of one filter (`ids`, `authors`, `kinds`, or one `#x`);
    /// repeated values count once. More gets `CLOSED invalid:`.
    #[arg(long, env = "RELAY_MAX_FILTER_VALUES", default_value_t = 1000)]
    pub max_filter_values: usize,
    /// Distinct values (and search words) in all the filters of one `REQ` or `COUNT`
    /// together. More gets `CLOSED invalid:`.
    #[arg(long, env = "RELAY_MAX_REQ_VALUES", default_value_t = 5000)]
    pub max_req_values: usize,
    /// Distinct words in one filter's NIP-50 `search`. More gets `CLOSED invalid:`.
    #[arg(long, env = "RELAY_MAX_SEARCH_WORDS", default_value_t = 16)]
    pub max_search_words: usize,
}

impl QueryLimits {
    /// The per-filter bounds, as [`crate::filter::Filter::check_limits`] takes them.
    pub fn filter_limits(&self) -> crate::filter::FilterLimits {
        crate::filter::FilterLimits {
            max_values: self.max_filter_values,
            max_search_words: self.max_search_words,
        }
    }

    /// Refuses filters over the per-filter bounds or, together, over `max_req_values`:
    /// the `invalid:` reason for `CLOSED` (or `NEG-ERR`).
    pub fn check(&self, filters: &[crate::filter::Filter]) -> Result<(), String> {
        let limits = self.filter_limits();
        for f in filters {
            f.check_limits(&limits)
                .map_err(|e| format!("invalid: {e}"))?;
        }
        let total: usize = filters.iter().map(crate::filter::Filter::value_count).sum();
        if total > self.max_req_values {
            return Err(format!(
                "invalid: the filters hold {total} values together; the limit is {}",
                self.max_req_values
            ));
        }
        Ok(())
    }

    /// The limit to apply to a filter's requested `limit`.
    pub fn clamp(&self, requested: Option<u64>) -> u64 {
        requested.unwrap_or(self.default_limit).min(self.max_limit)
    }
}

/// The relay's public address, as clients know it.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct PublicUrl {
    /// The relay's public WebSocket URL (e.g. wss://relay.example.com); several, comma-
    /// separated, when one relay answers at several addresses (the first is shown on
    /// `GET /` and names the NIP-86 API). NIP-42 `relay` tags and NIP-62 requests to vanish
    /// must name one of them. Without it AUTH and the management API are refused: a URL
    /// taken from the request's `Host` would let another site relay our challenge. Every
    /// gateway and ingest worker of a cluster must have the same value.
    #[arg(long, env = "RELAY_PUBLIC_URL")]
    pub public_url: Option<String>,
}

impl PublicUrl {
    /// The configured URLs, checked; `None` when unset or empty.
    pub fn urls(&self) -> Result<Option<RelayUrls>, String> {
        match self.public_url.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(list) => RelayUrls::parse(list).map(Some),
        }
    }
}

/// This relay's public URLs, for deciding whether a URL a client wrote names this relay.
/// Two URLs name the same relay when their scheme, host, port and path agree (after
/// [`normalize_url`], a trailing `/` ignored): `wss://Relay.example.com:443/` is
/// `wss://relay.example.com`, but `ws://` is not `wss://` and `/other` is not `/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayUrls {
    /// As configured, first first.
    given: Vec<String>,
    /// The same, in comparable form.
    normalized: Vec<String>,
}

impl RelayUrls {
    /// Parses a comma-separated list of `ws://` or `wss://` URLs with a host.
    pub fn parse(list: &str) -> Result<Self, String> {
        let given: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if given.is_empty() {
            return Err("RELAY_PUBLIC_URL holds no URL".into());
        }
        for url in &given {
            let (scheme, rest) = url.split_once("://").unwrap_or(("", ""));
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            if !matches!(scheme.to_ascii_lowercase().as_str(), "ws" | "wss") || host.is_empty() {
                return Err(format!(
                    "RELAY_PUBLIC_URL: {url:?} is not a ws:// or wss:// URL with a host"
                ));
            }
        }
        let normalized = given.iter().map(|u| comparable(u)).collect();
        Ok(RelayUrls { given, normalized })
    }

    /// The first URL, as configured.
    pub fn canonical(&self) -> &str {
        &self.given[0]
    }

    /// Whether `url` names this relay.
    pub fn names_this_relay(&self, url: &str) -> bool {
        let url = comparable(url);
        self.normalized.contains(&url)
    }
}

impl std::fmt::Display for RelayUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.given.join(","))
    }
}

/// [`normalize_url`] without one trailing `/` of the path.
fn comparable(url: &str) -> String {
    let url = normalize_url(url);
    match url.strip_suffix('/') {
        Some(trimmed) => trimmed.to_owned(),
        None => url,
    }
}

/// A URL in the form two URLs naming the same resource share: scheme and host lowercased,
/// the scheme's default port dropped, an empty path written `/`, a fragment removed. Path
/// and query are kept exactly.
pub fn normalize_url(url: &str) -> String {
    let url = url.trim();
    let url = url.split('#').next().unwrap_or(url);
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let scheme = scheme.to_ascii_lowercase();
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(split);
    let mut authority = authority.to_ascii_lowercase();
    if let Some(port) = default_port(&scheme)
        && let Some(host) = authority.strip_suffix(port)
    {
        authority = host.to_owned();
    }
    let tail = if tail.starts_with('/') {
        tail.to_owned()
    } else {
        format!("/{tail}")
    };
    format!("{scheme}://{authority}{tail}")
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
    fn relay_urls_compare_scheme_host_port_and_path() {
        let urls = RelayUrls::parse("wss://Relay.Example.com, ws://127.0.0.1:7777").expect("valid");
        assert_eq!(urls.canonical(), "wss://Relay.Example.com");
        for same in [
            "wss://relay.example.com",
            "wss://relay.example.com/",
            "WSS://RELAY.example.com:443/",
            "ws://127.0.0.1:7777/",
        ] {
            assert!(urls.names_this_relay(same), "{same}");
        }
        for other in [
            "ws://relay.example.com",
            "wss://relay.example.com:8443",
            "wss://relay.example.com/other",
            "https://relay.example.com",
            "relay.example.com",
            "wss://evil.example.com/?wss://relay.example.com",
            "ws://127.0.0.1:7778",
        ] {
            assert!(!urls.names_this_relay(other), "{other}");
        }
        assert!(RelayUrls::parse("https://relay.example.com").is_err());
        assert!(RelayUrls::parse("relay.example.com").is_err());
        assert!(RelayUrls::parse(" , ").is_err());
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
