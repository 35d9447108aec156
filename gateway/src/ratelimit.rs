//! Cluster-wide rate limits: fixed one-minute windows counted in Redis, so every gateway
//! sees the same counts. One round trip per check (a Lua script increments every counter
//! and reports the first one over its limit).
//!
//! If Redis cannot be asked, the check lets the message through: the message then fails on
//! the bus anyway, with an `error:` reply.

use std::net::IpAddr;

use shared::event::PubKey;

use crate::AppState;

/// The window length in seconds.
const WINDOW_SECS: i64 = 60;

/// The script, hashed once (Redis runs it by hash after the first load).
static SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(SOURCE));

const SOURCE: &str = r"
local exceeded = 0
for i, key in ipairs(KEYS) do
  local n = redis.call('INCR', key)
  if n == 1 then redis.call('EXPIRE', key, ARGV[#KEYS + 1]) end
  if exceeded == 0 and n > tonumber(ARGV[i]) then exceeded = i end
end
return exceeded
";

/// A counter and its per-window maximum.
pub struct Limit {
    what: &'static str,
    who: String,
    max: u64,
}

impl Limit {
    /// Events per IP.
    pub fn events_from_ip(ip: IpAddr, max: u64) -> Self {
        Limit {
            what: "ev-ip",
            who: ip.to_string(),
            max,
        }
    }

    /// Events per pubkey.
    pub fn events_from_pubkey(pubkey: &PubKey, max: u64) -> Self {
        Limit {
            what: "ev-pk",
            who: pubkey.to_hex(),
            max,
        }
    }

    /// REQ/COUNT per IP.
    pub fn reqs_from_ip(ip: IpAddr, max: u64) -> Self {
        Limit {
            what: "req-ip",
            who: ip.to_string(),
            max,
        }
    }
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
        invocation.arg(l.max);
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
            _ => "requests per minute from your address",
        };
        write!(f, "rate-limited: more than {} {what}; slow down", self.max)
    }
}
