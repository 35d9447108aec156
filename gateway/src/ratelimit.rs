//! Cluster-wide rate limits: fixed one-minute windows counted in Redis, so every gateway
//! sees the same counts. One round trip per check (a Lua script increments every counter
//! and reports the first one over its limit).
//!
//! If Redis cannot be asked, the check lets the message through: the message then fails on
//! the bus anyway, with an `error:` reply.
//!
//! An address is counted by [`address_key`]: an IPv4 address as itself, an IPv6 address by
//! its /64 prefix.

use std::net::IpAddr;

use shared::event::PubKey;

use crate::AppState;

/// The window length in seconds.
const WINDOW_SECS: i64 = 60;

/// The script, hashed once (Redis runs it by hash after the first load).
static SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(SOURCE));

// KEYS[i] is counter i; ARGV[2i-1] its maximum, ARGV[2i] what this message adds (0 only
// reads it), the last ARGV the counters' lifetime.
const SOURCE: &str = r"
local exceeded = 0
for i, key in ipairs(KEYS) do
  local n = redis.call('INCRBY', key, ARGV[2 * i])
  if redis.call('TTL', key) < 0 then redis.call('EXPIRE', key, ARGV[2 * #KEYS + 1]) end
  if exceeded == 0 and n > tonumber(ARGV[2 * i - 1]) then exceeded = i end
end
return exceeded
";

pub use shared::address::address_key;

/// A counter and its per-window maximum.
pub struct Limit {
    what: &'static str,
    who: String,
    max: u64,
    /// What one message adds to the counter (0: the counter is only read).
    add: u64,
}

impl Limit {
    /// Events per address.
    pub fn events_from_ip(ip: IpAddr, max: u64) -> Self {
        Limit {
            what: "ev-ip",
            who: address_key(ip),
            max,
            add: 1,
        }
    }

    /// Events per pubkey.
    pub fn events_from_pubkey(pubkey: &PubKey, max: u64) -> Self {
        Limit {
            what: "ev-pk",
            who: pubkey.to_hex(),
            max,
            add: 1,
        }
    }

    /// REQ/COUNT/negentropy messages per address.
    pub fn reqs_from_ip(ip: IpAddr, max: u64) -> Self {
        Limit {
            what: "req-ip",
            who: address_key(ip),
            max,
            add: 1,
        }
    }

    /// Milliseconds of database time the address's queries used this window. Each query
    /// reserves `reserve_ms` when it is checked (so a burst sent before any answer counts
    /// too), and the query worker adds what it really used minus the reservation
    /// ([`query_time_key`], [`shared::bus::QueryRequest::cost_reserved_ms`]).
    pub fn query_time_from_ip(ip: IpAddr, max_ms: u64, reserve_ms: u64) -> Self {
        Limit {
            what: "qms-ip",
            who: address_key(ip),
            max: max_ms,
            add: reserve_ms,
        }
    }

    /// AUTH messages per address.
    pub fn auths_from_ip(ip: IpAddr, max: u64) -> Self {
        Limit {
            what: "auth-ip",
            who: address_key(ip),
            max,
            add: 1,
        }
    }
}

/// The counter a query worker adds the database time of a query from `ip` to, or `None`
/// when the query-time limit is off.
pub fn query_time_key(state: &AppState, ip: IpAddr) -> Option<String> {
    let limit = Limit::query_time_from_ip(ip, state.config.rate.query_ms_per_ip, 0);
    (limit.max > 0).then(|| {
        let window = shared::unix_now() / WINDOW_SECS;
        state.bus.rate_key(limit.what, &limit.who, window)
    })
}

/// Counts one message against every limit (0 = off); returns the first limit exceeded.
pub async fn exceeded(state: &AppState, limits: Vec<Limit>) -> Option<Limit> {
    let limits: Vec<Limit> = limits.into_iter().filter(|l| l.max > 0).collect();
    if limits.is_empty() {
        return None;
    }
    let window = shared::unix_now() / WINDOW_SECS;
    let mut invocation = SCRIPT.prepare_invoke();
    for l in &limits {
        invocation.key(state.bus.rate_key(l.what, &l.who, window));
    }
    for l in &limits {
        invocation.arg(l.max).arg(l.add);
    }
    invocation.arg(WINDOW_SECS * 2);
    let mut redis = state.redis.clone();
    match invocation.invoke_async::<usize>(&mut redis).await {
        Ok(0) => None,
        Ok(i) => limits.into_iter().nth(i - 1),
        Err(e) => {
            tracing::warn!(error = %e, "rate limit check failed; letting the message through");
            None
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.what {
            "ev-ip" => "events per minute from your address",
            "ev-pk" => "events per minute from this pubkey",
            "qms-ip" => "ms of database time per minute for queries from your address",
            "auth-ip" => "AUTH messages per minute from your address",
            _ => "requests per minute from your address",
        };
        write!(f, "rate-limited: more than {} {what}; slow down", self.max)
    }
}
