//! The relay's moderation state (NIP-86): banned and allowed pubkeys, banned events, allowed
//! kinds, blocked IP addresses and the NIP-11 name, description and icon set by an admin.
//!
//! Postgres holds it durably (ingest workers write it, see `ingest-worker/src/admin.rs`).
//! Every process reads it from a JSON snapshot in Redis, the hash `<prefix>:moderation`
//! (fields `version` and `state`), loads it at start and reloads it when `<prefix>:moderation`
//! (a pub/sub channel) announces a new version, or when polling finds a new version (a missed
//! notification). [`store`] writes a snapshot only if its version is newer than the one in
//! Redis, so two workers finishing changes out of order cannot go back in time.
//!
//! Changes travel as [`AdminRequest`] on ingest stream shard 0 and are answered with an
//! [`AdminReply`] on the requesting gateway's admin channel.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use redis::AsyncCommands as _;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::bus::{self, Bus, BusError, GatewayId};
use crate::event::{Event, EventId, Kind, PubKey};

/// The whole moderation state, as one snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moderation {
    /// Increases with every change (kept in Postgres); 0 before any.
    pub version: u64,
    /// Pubkeys whose events are refused, with the admin's reason.
    #[serde(default)]
    pub banned_pubkeys: BTreeMap<PubKey, String>,
    /// When not empty, only these pubkeys may publish.
    #[serde(default)]
    pub allowed_pubkeys: BTreeMap<PubKey, String>,
    /// Events refused and deleted, with the reason.
    #[serde(default)]
    pub banned_events: BTreeMap<EventId, String>,
    /// When not empty, only these kinds may be published.
    #[serde(default)]
    pub allowed_kinds: BTreeSet<Kind>,
    /// Addresses that may not connect, with the reason.
    #[serde(default)]
    pub blocked_ips: BTreeMap<IpAddr, String>,
    /// NIP-11 `name` set by an admin (over the configured one).
    #[serde(default)]
    pub name: Option<String>,
    /// NIP-11 `description` set by an admin.
    #[serde(default)]
    pub description: Option<String>,
    /// NIP-11 `icon` set by an admin.
    #[serde(default)]
    pub icon: Option<String>,
}

impl Moderation {
    /// Why `event` may not be published here (`blocked: ...`), or `None`. A request to vanish
    /// addressed to this relay, whose URLs are `relay_urls` ([`crate::vanish`]), is never
    /// refused: NIP-62 has it followed regardless of the user's status.
    pub fn refuses(
        &self,
        event: &Event,
        relay_urls: Option<&crate::config::RelayUrls>,
    ) -> Option<String> {
        if crate::vanish::is_addressed_here(event, relay_urls) {
            return None;
        }
        if let Some(reason) = self.banned_events.get(&event.id) {
            return Some(with_reason("blocked: this event is banned", reason));
        }
        if let Some(reason) = self.banned_pubkeys.get(&event.pubkey) {
            return Some(with_reason("blocked: this pubkey is banned", reason));
        }
        if !self.allowed_pubkeys.is_empty() && !self.allowed_pubkeys.contains_key(&event.pubkey) {
            return Some("blocked: this relay only accepts events from allowed pubkeys".into());
        }
        if !self.allowed_kinds.is_empty() && !self.allowed_kinds.contains(&event.kind) {
            return Some(format!(
                "blocked: kind {} is not allowed on this relay",
                event.kind
            ));
        }
        None
    }

    /// Whether connections from `ip` are refused: its address is blocked or, for IPv6, any
    /// address of its /64 is (as [`crate::address`] counts clients).
    pub fn blocks_ip(&self, ip: IpAddr) -> bool {
        match canonical_ip(ip) {
            v4 @ IpAddr::V4(_) => self.blocked_ips.contains_key(&v4),
            IpAddr::V6(v6) => {
                let (first, last) = crate::address::prefix_range(v6);
                self.blocked_ips
                    .range(IpAddr::V6(first)..=IpAddr::V6(last))
                    .next()
                    .is_some()
            }
        }
    }
}

fn with_reason(message: &str, reason: &str) -> String {
    if reason.is_empty() {
        message.to_owned()
    } else {
        format!("{message} ({reason})")
    }
}

pub use crate::address::canonical_ip;

/// One change an admin asked for (the NIP-86 methods that write).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// `banpubkey`.
    BanPubkey {
        /// Who.
        pubkey: PubKey,
        /// Why (may be empty).
        reason: String,
    },
    /// `unbanpubkey`.
    UnbanPubkey {
        /// Who.
        pubkey: PubKey,
    },
    /// `allowpubkey`.
    AllowPubkey {
        /// Who.
        pubkey: PubKey,
        /// Why (may be empty).
        reason: String,
    },
    /// `unallowpubkey`.
    UnallowPubkey {
        /// Who.
        pubkey: PubKey,
    },
    /// `banevent`: refuse the event and delete it.
    BanEvent {
        /// Which.
        id: EventId,
        /// Why (may be empty).
        reason: String,
    },
    /// `allowevent`: take the event off the banned list.
    AllowEvent {
        /// Which.
        id: EventId,
    },
    /// `allowkind`.
    AllowKind {
        /// Which.
        kind: Kind,
    },
    /// `disallowkind`.
    DisallowKind {
        /// Which.
        kind: Kind,
    },
    /// `blockip`.
    BlockIp {
        /// Which.
        ip: IpAddr,
        /// Why (may be empty).
        reason: String,
    },
    /// `unblockip`.
    UnblockIp {
        /// Which.
        ip: IpAddr,
    },
    /// `changerelayname`.
    RelayName(String),
    /// `changerelaydescription`.
    RelayDescription(String),
    /// `changerelayicon`.
    RelayIcon(String),
}

/// Gateway → ingest worker (on ingest stream shard 0): apply one change.
///
/// Its JSON starts with `{"admin":` (the first field), which is how a worker tells it from
/// an `IngestRequest` without decoding twice ([`is_admin_entry`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct AdminRequest {
    /// The change.
    pub admin: Change,
    /// The gateway waiting for the answer.
    pub gateway: GatewayId,
    /// The request, unique within the gateway.
    pub request: u64,
}

/// Whether a stream entry's payload is an [`AdminRequest`].
pub fn is_admin_entry(payload: &str) -> bool {
    payload.starts_with("{\"admin\":")
}

/// Ingest worker → gateway (on its admin channel): the change was committed and the snapshot
/// of `version` written, or why not.
#[derive(Debug, Serialize, Deserialize)]
pub struct AdminReply {
    /// The request answered.
    pub request: u64,
    /// The new version, or an error message.
    pub result: Result<u64, String>,
}

const VERSION_FIELD: &str = "version";
const STATE_FIELD: &str = "state";

/// Writes `state` as the snapshot and announces it, unless Redis already has this version
/// or a newer one. Returns whether it was written.
const STORE_SCRIPT: &str = r#"
local current = redis.call('HGET', KEYS[1], 'version')
if current and tonumber(current) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'state', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 1
"#;

/// Stores `state` as the snapshot (if newer than Redis's) and publishes its version on the
/// moderation channel.
pub async fn store(
    conn: &mut ConnectionManager,
    bus: &Bus,
    state: &Moderation,
) -> Result<bool, BusError> {
    let written: i64 = redis::Script::new(STORE_SCRIPT)
        .key(bus.moderation_key())
        .arg(state.version)
        .arg(serde_json::to_string(state)?)
        .arg(bus.moderation_channel())
        .invoke_async(conn)
        .await?;
    Ok(written == 1)
}

/// The snapshot's version in Redis; `None` when there is no snapshot.
pub async fn version(conn: &mut ConnectionManager, bus: &Bus) -> Result<Option<u64>, BusError> {
    Ok(conn.hget(bus.moderation_key(), VERSION_FIELD).await?)
}

/// The snapshot in Redis; `None` when there is none.
pub async fn load(conn: &mut ConnectionManager, bus: &Bus) -> Result<Option<Moderation>, BusError> {
    let text: Option<String> = conn.hget(bus.moderation_key(), STATE_FIELD).await?;
    text.map(|t| bus::decode(&t)).transpose()
}

/// A process's current moderation state; cheap to clone and to read.
#[derive(Clone, Debug)]
pub struct Current(Arc<watch::Sender<Arc<Moderation>>>);

impl Default for Current {
    fn default() -> Self {
        Current(Arc::new(watch::Sender::new(
            Arc::new(Moderation::default()),
        )))
    }
}

impl Current {
    /// The state now.
    pub fn get(&self) -> Arc<Moderation> {
        Arc::clone(&self.0.borrow())
    }

    /// A receiver told of every replacement (e.g. to close connections from blocked IPs).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Moderation>> {
        self.0.subscribe()
    }

    /// Replaces the state when `state` is another version.
    pub fn offer(&self, state: Moderation) {
        self.0.send_if_modified(|current| {
            if current.version == state.version {
                return false;
            }
            tracing::info!(
                version = state.version,
                banned_pubkeys = state.banned_pubkeys.len(),
                banned_events = state.banned_events.len(),
                blocked_ips = state.blocked_ips.len(),
                "moderation state updated"
            );
            *current = Arc::new(state);
            true
        });
    }

    /// Loads the snapshot from Redis if its version differs from ours.
    pub async fn refresh(&self, conn: &mut ConnectionManager, bus: &Bus) -> Result<(), BusError> {
        let Some(v) = version(conn, bus).await? else {
            return Ok(());
        };
        if v == self.get().version {
            return Ok(());
        }
        if let Some(state) = load(conn, bus).await? {
            self.offer(state);
        }
        Ok(())
    }
}

/// How often [`follow`] checks the snapshot's version, in case a notification was missed
/// or the subscription is down.
pub const POLL: Duration = Duration::from_secs(3);

/// Keeps `current` up to date, forever: loads the snapshot over `conn` (the caller's
/// connection), then reloads it on every notification (a subscription of its own, to
/// `redis_url`) and every [`POLL`]. Failures are logged and retried; abort the task to stop
/// it.
pub async fn follow(current: Current, mut conn: ConnectionManager, redis_url: String, bus: Bus) {
    let client = match redis::Client::open(redis_url.as_str()) {
        Ok(c) => c,
        Err(e) => return tracing::error!(error = %e, "bad Redis URL; moderation not followed"),
    };
    let channel = bus.moderation_channel();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let pubsub = async {
            let mut p = client.get_async_pubsub().await?;
            p.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(p)
        }
        .await;
        let mut pubsub = match pubsub {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to moderation changes; polling");
                None
            }
        };
        // Subscribed first, then loaded: a change between the two is not missed.
        refresh_logged(&current, &mut conn, &bus).await;
        match pubsub.as_mut() {
            Some(p) => {
                let mut messages = p.on_message();
                loop {
                    tokio::select! {
                        msg = messages.next() => match msg {
                            Some(_) => refresh_logged(&current, &mut conn, &bus).await,
                            None => break,
                        },
                        _ = tick.tick() => refresh_logged(&current, &mut conn, &bus).await,
                    }
                }
                tracing::warn!("lost the moderation subscription; reconnecting");
            }
            None => {
                tick.tick().await;
            }
        }
    }
}

async fn refresh_logged(current: &Current, conn: &mut ConnectionManager, bus: &Bus) {
    if let Err(e) = current.refresh(conn, bus).await {
        tracing::warn!(error = %e, "cannot load the moderation snapshot");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::signing::Keys;

    #[test]
    fn snapshot_round_trips() {
        let mut m = Moderation {
            version: 3,
            ..Default::default()
        };
        m.banned_pubkeys
            .insert(Keys::generate().pubkey(), "spam".into());
        m.allowed_kinds.insert(Kind(1));
        m.blocked_ips
            .insert("10.0.0.1".parse().expect("ip"), String::new());
        m.banned_events
            .insert(EventId::from_bytes([7; 32]), String::new());
        m.name = Some("n".into());
        let text = serde_json::to_string(&m).expect("serializes");
        let back: Moderation = serde_json::from_str(&text).expect("decodes");
        assert_eq!(back, m);
    }

    #[test]
    fn refusals() {
        let alice = Keys::generate();
        let bob = Keys::generate();
        let note = alice.sign(1, Kind(1), vec![], "hi");
        let mut m = Moderation::default();
        assert_eq!(m.refuses(&note, None), None);
        m.allowed_kinds.insert(Kind(7));
        assert!(
            m.refuses(&note, None)
                .is_some_and(|r| r.starts_with("blocked:"))
        );
        m.allowed_kinds.insert(Kind(1));
        assert_eq!(m.refuses(&note, None), None);
        m.allowed_pubkeys.insert(bob.pubkey(), String::new());
        assert!(m.refuses(&note, None).is_some());
        m.allowed_pubkeys.insert(alice.pubkey(), String::new());
        assert_eq!(m.refuses(&note, None), None);
        m.banned_pubkeys.insert(alice.pubkey(), "spam".into());
        assert_eq!(
            m.refuses(&note, None).as_deref(),
            Some("blocked: this pubkey is banned (spam)")
        );
        // NIP-62: a request to vanish addressed here is followed whatever the author's status.
        let relay = |r: &str| vec![vec!["relay".to_owned(), r.to_owned()]];
        let vanish = alice.sign(2, Kind(62), relay("wss://relay.test"), "");
        let here = crate::config::RelayUrls::parse("wss://relay.test").expect("valid");
        let other = crate::config::RelayUrls::parse("wss://other.test").expect("valid");
        assert_eq!(m.refuses(&vanish, Some(&here)), None);
        assert!(m.refuses(&vanish, Some(&other)).is_some());
        let everywhere = alice.sign(2, Kind(62), relay("ALL_RELAYS"), "");
        assert_eq!(m.refuses(&everywhere, None), None);
        m.banned_pubkeys.clear();
        m.banned_events.insert(note.id, String::new());
        assert_eq!(
            m.refuses(&note, None).as_deref(),
            Some("blocked: this event is banned")
        );
    }

    #[test]
    fn mapped_addresses_are_the_same_ip() {
        let mut m = Moderation::default();
        m.blocked_ips
            .insert("127.0.0.1".parse().expect("ip"), String::new());
        assert!(m.blocks_ip("::ffff:127.0.0.1".parse().expect("ip")));
        assert!(!m.blocks_ip("127.0.0.2".parse().expect("ip")));
        // IPv6: a blocked address blocks its /64, and nothing beyond.
        m.blocked_ips
            .insert("2001:db8:1:2::5".parse().expect("ip"), String::new());
        assert!(m.blocks_ip("2001:db8:1:2:ffff::1".parse().expect("ip")));
        assert!(!m.blocks_ip("2001:db8:1:3::5".parse().expect("ip")));
    }

    #[test]
    fn admin_requests_are_told_apart() {
        let req = AdminRequest {
            admin: Change::AllowKind { kind: Kind(1) },
            gateway: GatewayId::random(),
            request: 1,
        };
        assert!(is_admin_entry(&bus::encode(&req)));
        assert!(!is_admin_entry(r#"{"gateway":"x","conn":1,"event":{}}"#));
    }
}
