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

// KEYS[i] is counter i; ARGV[3i-2] its maximum, ARGV[3i-1] what this message adds,
// ARGV[3i] "1" for a budget (it is only taken when it fits: a refused message adds
// nothing) or "0" for a count (every message counts, refused or not); the last ARGV is
// the counters' lifetime.
const SOURCE: &str = r"
local ttl = ARGV[3 * #KEYS + 1]
local function add(key, n)
  local total = redis.call('INCRBY', key, n)
  if redis.call('TTL', key) < 0 then redis.call('EXPIRE', key, ttl) end
  return total
end
for i, key in ipairs(KEYS) do
  if ARGV[3 * i] == '1' then
    local used = tonumber(redis.call('GET', key) or '0')
    if used + tonumber(ARGV[3 * i - 1]) > tonumber(ARGV[3 * i - 2]) then return i end
  end
end
local exceeded = 0
for i, key in ipairs(KEYS) do
  if ARGV[3 * i] ~= '1' then
    local n = add(key, ARGV[3 * i - 1])
    if exceeded == 0 and n > tonumber(ARGV[3 * i - 2]) then exceeded = i end
  end
end
if exceeded ~= 0 then return exceeded end
for i, key in ipairs(KEYS) do
  if ARGV[3 * i] == '1' then add(key, ARGV[3 * i - 1]) end
end
return 0
";
use shared::address::address_key;

/// A counter and its per-window maximum.
pub struct Limit {
    what: &'static str,
    who: String,
    max: u64,
    /// What one message adds to the counter.
    add: u64,
    /// A budget (taken only when it fits) rather than a count.
    budget: bool,
}

impl Limit {
    /// Events per address.
    pub fn events_from_ip(ip: IpAddr, max: u64) -> Self {
        Limit {
            what: "ev-ip",
            who: address_key(ip),
            max,
            add: 1,
            budget: false,
        }
    }

    /// Events per pubkey.
    pub fn events_from_pubkey(pubkey: &PubKey, max: u64) -> Self {
        Limit {
            what: "ev-pk",
            who: pubkey.to_hex(),
            max,
            add: 1,
            budget: false,
        }
    }

    /// REQ/COUNT/negentropy messages per address.
    pub fn reqs_from_ip(ip: IpAddr, max: u64) -> Self {
        Limit {
            what: "req-ip",
            who: address_key(ip),
            max,
            add: 1,
            budget: false,
        }
    }

    /// Milliseconds of database time the address's queries used this window, a budget.
    /// Each query reserves `reserve_ms` when it is checked (so a burst sent before any
    /// answer counts too); the query worker adds what it really used minus the reservation
    /// ([`Reservation`]), or the gateway gives it back when no query goes out.
    pub fn query_time_from_ip(ip: IpAddr, max_ms: u64, reserve_ms: u64) -> Self {
        Limit {
            what: "qms-ip",
            who: address_key(ip),
            max: max_ms,
            add: reserve_ms,
            budget: true,
        }
    }

    fn key(&self, state: &AppState, window: i64) -> String {
        state.bus.rate_key(self.what, &self.who, window)
    }

    /// AUTH messages per address.
    pub fn auths_from_ip(ip: IpAddr, max: u64) -> Self {
        Limit {
            what: "auth-ip",
            who: address_key(ip),
            max,
            add: 1,
            budget: false,
        }
    }
}

/// Database time reserved on an address's budget for one query: it travels with the query
/// (`QueryRequest::cost_key`, `cost_reserved_ms`) so the worker settles it, or is given
/// back with [`give_back`] when no query goes out.
#[derive(Debug)]
pub struct Reservation {
    /// The budget's counter, in the window the reservation was taken in.
    pub key: String,
    /// Milliseconds reserved.
    pub ms: u64,
    /// The budget it was reserved on, per window.
    pub limit: u64,
}

/// Gives a reservation back: no query went out for it (`None`: nothing was reserved).
pub async fn give_back(state: &AppState, reservation: Option<Reservation>) {
    let Some(reservation) = reservation else {
        return;
    };
    let mut redis = state.redis.clone();
    let given_back: redis::RedisResult<i64> = redis::cmd("DECRBY")
        .arg(&reservation.key)
        .arg(reservation.ms)
        .query_async(&mut redis)
        .await;
    if let Err(e) = given_back {
        tracing::debug!(error = %e, "cannot give back a query-time reservation");
    }
}

/// Counts one message against every limit (0 = off); returns the first limit exceeded.
pub async fn exceeded(state: &AppState, limits: Vec<Limit>) -> Option<Limit> {
    check(state, limits, shared::unix_now() / WINDOW_SECS)
        .await
        .err()
}

/// Counts one query message against `count` and reserves `budget`'s time (0 = off): the
/// reservation, or the first limit exceeded (then nothing is reserved).
pub async fn reserve(
    state: &AppState,
    count: Limit,
    budget: Limit,
) -> Result<Option<Reservation>, Limit> {
    let window = shared::unix_now() / WINDOW_SECS;
    let reservation = (budget.max > 0).then(|| Reservation {
        key: budget.key(state, window),
        ms: budget.add,
        limit: budget.max,
    });
    check(state, vec![count, budget], window).await?;
    Ok(reservation)
}

async fn check(state: &AppState, limits: Vec<Limit>, window: i64) -> Result<(), Limit> {
    let limits: Vec<Limit> = limits.into_iter().filter(|l| l.max > 0).collect();
    if limits.is_empty() {
        return Ok(());
    }
    let mut invocation = SCRIPT.prepare_invoke();
    for l in &limits {
        invocation.key(l.key(state, window));
    }
    for l in &limits {
        invocation
            .arg(l.max)
            .arg(l.add)
            .arg(if l.budget { "1" } else { "0" });
    }
    invocation.arg(WINDOW_SECS * 2);
    let mut redis = state.redis.clone();
    match invocation.invoke_async::<usize>(&mut redis).await {
        Ok(0) => Ok(()),
        Ok(i) => match limits.into_iter().nth(i - 1) {
            Some(limit) => Err(limit),
            None => Ok(()),
        },
        Err(e) => {
            tracing::warn!(error = %e, "rate limit check failed; letting the message through");
            Ok(())
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
