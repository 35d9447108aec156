//! The bus contract: every Redis stream, consumer group and pub/sub channel the binaries use,
//! the envelopes that travel on them, and the small Redis client pieces all binaries share.
//!
//! ```text
//! <prefix>:ingest:<shard>   stream   gateway → ingest workers   IngestRequest, or a Batch
//!                                                                 of them   group "ingest"
//! <prefix>:query:<shard>    stream   gateway → query workers    QueryRequest    group "query"
//! <prefix>:gw:<gateway id>  channel  workers → one gateway      GatewayReply, or a Batch
//! <prefix>:live             channel  ingest workers → gateways  a Batch of LiveEvent
//! <prefix>:workers:<role>   zset     worker heartbeats (member = consumer, score = unix ms)
//! <prefix>:rl:<what>:<who>:<minute>  counter  gateways' rate limits (expire after 2 min)
//! <prefix>:nip98:<sig>      string   NIP-98 authorizations used (expire after 2 windows)
//! <prefix>:public-url       string   ingest workers' RELAY_PUBLIC_URL (gateways compare theirs)
//! <prefix>:moderation       hash     NIP-86 snapshot (fields version, state), see moderation
//! <prefix>:moderation       channel  ingest workers → everyone: a new snapshot version
//! <prefix>:admin:<gateway>  channel  ingest workers → one gateway   AdminReply
//! ```
//!
//! Stream entries carry one field, [`ENTRY_FIELD`], holding the envelope as JSON; an ingest
//! entry may hold a [`Batch`] of `IngestRequest`s instead (a gateway puts the events that
//! arrived together in one entry). Channel messages are the envelope as JSON, or a [`Batch`]
//! of envelopes as a JSON array: ingest workers send one message per channel per batch.
//! Readers accept both ([`decode_batch`]).
//! Event JSON inside envelopes is carried verbatim ([`RawValue`]) so it is serialized once,
//! by the gateway, and never again.

use std::fmt;
use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamReadOptions, StreamReadReply,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::BusConfig;
use crate::event::{EventId, Kind, PubKey};
use crate::filter::Filter;
use crate::message::{NegMessage, SubId};

/// The consumer group of the ingest streams.
pub const INGEST_GROUP: &str = "ingest";
/// The consumer group of the query streams.
pub const QUERY_GROUP: &str = "query";
/// The single field of every stream entry, holding the JSON envelope.
pub const ENTRY_FIELD: &str = "m";

/// A failure talking to Redis or decoding an envelope.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// Redis refused or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// An envelope was not the JSON this version expects.
    #[error("bad envelope: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Identifies one gateway process; replies for its connections go to its own channel.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GatewayId(String);

impl GatewayId {
    /// A fresh random id (16 hex characters), new at every start, so a restarted gateway
    /// never receives replies meant for its previous life.
    pub fn random() -> Self {
        GatewayId(hex::encode(rand::random::<[u8; 8]>()))
    }
}

impl fmt::Display for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GatewayId({})", self.0)
    }
}

/// A WebSocket connection, unique within its gateway.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConnId(pub u64);

/// One `REQ` as sent to the query workers, unique within its gateway. A reply whose `ReqId`
/// is not the subscription's current one (the client replaced or closed it) is dropped.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReqId(pub u64);

/// W3C trace context (`traceparent`, optionally `tracestate`) carried with each message so a
/// trace continues across processes. Empty when tracing is off.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// The `traceparent` header value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The `tracestate` header value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

impl TraceContext {
    fn is_empty(&self) -> bool {
        self.traceparent.is_none() && self.tracestate.is_none()
    }
}

/// Gateway → ingest worker: one `EVENT` from a client.
#[derive(Debug, Serialize, Deserialize)]
pub struct IngestRequest {
    /// The gateway holding the connection, which gets the `OK`.
    pub gateway: GatewayId,
    /// The connection that sent the event.
    pub conn: ConnId,
    /// The event as parsed by the gateway (shape checked, not yet verified).
    pub event: Box<RawValue>,
    /// Trace context of the gateway's receive span.
    #[serde(default, skip_serializing_if = "TraceContext::is_empty")]
    pub trace: TraceContext,
}

/// What a query answers: stored events (`REQ`), their number (`COUNT`), or a negentropy
/// round (NIP-77 `NEG-OPEN` / `NEG-MSG`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueryKind {
    /// Stream the matching events, then EOSE.
    #[default]
    Events,
    /// Answer with the number of matching events.
    Count,
    /// Reconcile: the worker loads the `(created_at, id)` of every event matching the one
    /// filter, answers `message` as the negentropy responder and replies
    /// [`GatewayReply::Neg`]. The responder keeps no state between rounds, so each
    /// `NEG-MSG` is a request of its own carrying the session's filter again.
    Negentropy {
        /// The initiator's message.
        message: NegMessage,
    },
}

impl QueryKind {
    /// `"req"`, `"count"` or `"negentropy"`, for metrics and spans.
    pub fn name(&self) -> &'static str {
        match self {
            QueryKind::Events => "req",
            QueryKind::Count => "count",
            QueryKind::Negentropy { .. } => "negentropy",
        }
    }
}

/// Who is asking, for read-restricted kinds (NIP-42): events of a restricted kind are
/// returned only when one of `authed` is their author or is named in a `p` tag.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Viewer {
    /// Pubkeys the connection authenticated as.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authed: Vec<PubKey>,
    /// Kinds readable only by their author or `p`-tagged recipients.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restricted_kinds: Vec<Kind>,
}

impl Viewer {
    /// Whether this viewer may see `event`.
    pub fn may_see(&self, event: &crate::event::Event) -> bool {
        !self.restricted_kinds.contains(&event.kind) || event.involves_any(&self.authed)
    }
}

/// Gateway → query worker: the stored-events part of one `REQ`, or one `COUNT`.
#[derive(Debug, Serialize, Deserialize)]
pub struct QueryRequest {
    /// The gateway holding the subscription.
    pub gateway: GatewayId,
    /// The connection holding the subscription.
    pub conn: ConnId,
    /// Which `REQ` this is, so stale answers can be told apart.
    pub req: ReqId,
    /// The client's subscription id.
    pub sub_id: SubId,
    /// The filters, ORed. Filters with `limit: 0` are not sent.
    pub filters: Vec<Filter>,
    /// Events or a count.
    #[serde(default)]
    pub kind: QueryKind,
    /// Who is asking (read-restricted kinds).
    #[serde(default)]
    pub viewer: Viewer,
    /// Trace context.
    #[serde(default, skip_serializing_if = "TraceContext::is_empty")]
    pub trace: TraceContext,
    /// The Redis counter the database time of this request is added to (milliseconds): the
    /// asking address's query-time rate limit, which the gateway checks before each query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_key: Option<String>,
    /// What the gateway reserved on `cost_key` when it sent the request (milliseconds); the
    /// worker adds the time it used minus this.
    #[serde(default)]
    pub cost_reserved_ms: u64,
    /// The budget `cost_key` counts against (milliseconds per window): a worker that finds
    /// it used up (by queries answered since this one was sent) refuses without running.
    #[serde(default)]
    pub cost_limit_ms: u64,
}

/// How long a query-time counter ([`QueryRequest::cost_key`]) lives, in seconds: two of the
/// gateway's one-minute windows.
pub const COST_KEY_TTL_SECS: i64 = 120;

/// A stored event as it travels back to a gateway: its id (for duplicate suppression) and
/// its JSON, verbatim.
#[derive(Debug, Serialize, Deserialize)]
pub struct StoredEvent {
    /// The event id.
    pub id: EventId,
    /// The event JSON as stored.
    pub json: Box<RawValue>,
}

/// Worker → gateway: a reply for one connection.
#[derive(Debug, Serialize, Deserialize)]
pub enum GatewayReply {
    /// The answer to an `EVENT`.
    Ok {
        /// The connection that sent it.
        conn: ConnId,
        /// The event answered.
        event_id: EventId,
        /// Whether it was accepted.
        accepted: bool,
        /// Empty or `prefix: text`.
        message: String,
        /// Trace context of the worker span.
        #[serde(default, skip_serializing_if = "TraceContext::is_empty")]
        trace: TraceContext,
    },
    /// A chunk of stored events for a `REQ`; the last chunk has `eose` set.
    Events {
        /// The connection.
        conn: ConnId,
        /// The `REQ` answered.
        req: ReqId,
        /// The subscription.
        sub_id: SubId,
        /// Events, newest first.
        events: Vec<StoredEvent>,
        /// Whether this chunk ends the stored events.
        eose: bool,
        /// Trace context of the worker span.
        #[serde(default, skip_serializing_if = "TraceContext::is_empty")]
        trace: TraceContext,
    },
    /// The answer to a `COUNT`: the number, or `prefix: text` when it failed.
    Count {
        /// The connection.
        conn: ConnId,
        /// The request this answers: a late answer to an earlier `COUNT` with the same id
        /// is not taken for a later one's.
        req: ReqId,
        /// The `COUNT`'s id.
        query_id: SubId,
        /// The count, or why there is none.
        result: Result<u64, String>,
    },
    /// The answer to one negentropy round (NIP-77): the responder's message, or
    /// `prefix: text` for `NEG-ERR` (the negentropy subscription is over).
    Neg {
        /// The connection.
        conn: ConnId,
        /// The request answered; a reply for a round that is no longer current is dropped.
        req: ReqId,
        /// The negentropy subscription id.
        sub_id: SubId,
        /// The message for `NEG-MSG`, or the reason for `NEG-ERR`.
        result: Result<NegMessage, String>,
    },
    /// The `REQ` could not be answered (`prefix: text`); the subscription is over.
    Closed {
        /// The connection.
        conn: ConnId,
        /// The `REQ` answered.
        req: ReqId,
        /// The subscription.
        sub_id: SubId,
        /// `prefix: text`.
        message: String,
    },
}

/// Ingest worker → every gateway: an event to deliver to matching live subscriptions.
#[derive(Debug, Serialize, Deserialize)]
pub struct LiveEvent {
    /// The event JSON, verified, as stored (or, for ephemeral kinds, as received).
    pub event: Box<RawValue>,
    /// Trace context of the ingest span.
    #[serde(default, skip_serializing_if = "TraceContext::is_empty")]
    pub trace: TraceContext,
}

/// Encodes an envelope as JSON.
pub fn encode<T: Serialize>(envelope: &T) -> String {
    // ok: envelopes are strings, integers and already-valid raw JSON; serializing cannot fail.
    serde_json::to_string(envelope).expect("envelope serializes")
}

/// Decodes an envelope.
pub fn decode<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, BusError> {
    Ok(serde_json::from_str(text)?)
}

/// Decodes a channel message: one envelope (a JSON object) or a [`Batch`] of them (a JSON
/// array), in order. Each envelope decodes on its own, so one this version cannot read
/// costs only itself; a message that is not JSON at all is one error.
pub fn decode_batch<T: serde::de::DeserializeOwned>(text: &str) -> Vec<Result<T, BusError>> {
    if !text.trim_start().starts_with('[') {
        return vec![decode(text)];
    }
    match serde_json::from_str::<Vec<&RawValue>>(text) {
        Ok(items) => items.into_iter().map(|raw| decode(raw.get())).collect(),
        Err(e) => vec![Err(e.into())],
    }
}

/// Envelopes for one channel, published as one message (a JSON array): a worker's batch of
/// replies for one gateway, or of live events. Read with [`decode_batch`].
#[derive(Debug, Default)]
pub struct Batch {
    json: Vec<u8>,
}

impl Batch {
    /// Appends an envelope, serialized in place.
    pub fn push<T: Serialize>(&mut self, envelope: &T) {
        self.separate();
        // ok: envelopes are strings, integers and already-valid raw JSON (see `encode`).
        serde_json::to_writer(&mut self.json, envelope).expect("envelope serializes");
    }

    /// Appends an envelope already serialized with [`encode`].
    pub fn push_encoded(&mut self, envelope: &str) {
        self.separate();
        self.json.extend_from_slice(envelope.as_bytes());
    }

    /// Opens the array, or separates the next envelope from the one before.
    fn separate(&mut self) {
        self.json
            .push(if self.json.is_empty() { b'[' } else { b',' });
    }

    /// The message to publish (JSON text), or `None` if nothing was pushed.
    pub fn finish(mut self) -> Option<Vec<u8>> {
        if self.json.is_empty() {
            return None;
        }
        self.json.push(b']');
        Some(self.json)
    }

    /// Bytes so far (the message is one more).
    fn len(&self) -> usize {
        self.json.len()
    }
}

/// The most bytes a worker puts in one pub/sub message (a batch of replies or live events,
/// a chunk of stored events; a single larger envelope goes alone). Well under Redis's
/// pub/sub client output buffer limit (32 MB by default, 8 MB sustained for a minute): a
/// subscriber that lets more pile up is disconnected, so no single message may come near.
pub const MESSAGE_BYTES: usize = 1024 * 1024;

/// Envelopes for one channel cut into messages of at most `max_bytes` each (see
/// [`MESSAGE_BYTES`]), each a JSON array as [`Batch`] makes them.
#[derive(Debug)]
pub struct Batches {
    max_bytes: usize,
    current: Batch,
    done: Vec<Vec<u8>>,
}

impl Default for Batches {
    fn default() -> Self {
        Batches::new(MESSAGE_BYTES)
    }
}

impl Batches {
    /// Messages of at most `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        Batches {
            max_bytes,
            current: Batch::default(),
            done: Vec::new(),
        }
    }

    /// Appends an envelope, starting a new message when it would not fit in this one.
    pub fn push<T: Serialize>(&mut self, envelope: &T) {
        let before = self.current.len();
        // Serialized in place; moved to a message of its own if it did not fit.
        self.current.push(envelope);
        if before > 0 && self.current.len() + 1 > self.max_bytes {
            // Everything after the separator is the new envelope.
            let envelope = self.current.json.split_off(before + 1);
            self.current.json.truncate(before);
            let full = std::mem::take(&mut self.current);
            self.done.extend(full.finish());
            self.current.json.push(b'[');
            self.current.json.extend_from_slice(&envelope);
        }
    }

    /// The messages to publish, in order (none if nothing was pushed).
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        self.done.extend(self.current.finish());
        self.done
    }
}

/// The names of everything on the bus, under one prefix.
#[derive(Clone, Debug)]
pub struct Bus {
    prefix: String,
    shards: u16,
}

/// The role of a worker, for stream names and heartbeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Reads the ingest streams.
    Ingest,
    /// Reads the query streams.
    Query,
}

impl Role {
    /// `"ingest"` or `"query"`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Query => "query",
        }
    }

    /// The consumer group of this role's streams.
    pub fn group(self) -> &'static str {
        match self {
            Role::Ingest => INGEST_GROUP,
            Role::Query => QUERY_GROUP,
        }
    }
}

impl Bus {
    /// The names for a configuration.
    pub fn new(config: &BusConfig) -> Self {
        Bus {
            prefix: config.bus_prefix.clone(),
            shards: config.bus_shards.max(1),
        }
    }

    /// Every stream of a role, one per shard.
    pub fn streams(&self, role: Role) -> Vec<String> {
        (0..self.shards)
            .map(|n| format!("{}:{}:{n}", self.prefix, role.name()))
            .collect()
    }

    /// The ingest stream for an event: shards by the id's first two bytes.
    pub fn ingest_stream(&self, id: &EventId) -> String {
        let b = id.as_bytes();
        let n = u16::from_be_bytes([b[0], b[1]]) % self.shards;
        format!("{}:ingest:{n}", self.prefix)
    }

    /// The query stream for a connection's requests: all of one connection's `REQ`s go to
    /// the same shard.
    pub fn query_stream(&self, conn: ConnId) -> String {
        let n = (conn.0 % u64::from(self.shards)) as u16;
        format!("{}:query:{n}", self.prefix)
    }

    /// The channel a gateway listens on for its replies.
    pub fn gateway_channel(&self, gateway: &GatewayId) -> String {
        format!("{}:gw:{gateway}", self.prefix)
    }

    /// The channel every gateway listens on for live events.
    pub fn live_channel(&self) -> String {
        format!("{}:live", self.prefix)
    }

    /// A rate-limit counter: `what` (e.g. events per IP) for `who` in time window `window`.
    pub fn rate_key(&self, what: &str, who: &str, window: i64) -> String {
        format!("{}:rl:{what}:{who}:{window}", self.prefix)
    }

    /// The public URL setting the ingest workers run with, for gateways to compare theirs
    /// with ([`advertise_public_url`]).
    pub fn public_url_key(&self) -> String {
        format!("{}:public-url", self.prefix)
    }

    /// Marks a NIP-98 authorization (by its signature) as used: the management API refuses
    /// a replay.
    pub fn used_authorization_key(&self, sig: &crate::event::Signature) -> String {
        format!("{}:nip98:{}", self.prefix, sig.to_hex())
    }

    /// The hash holding the moderation snapshot (NIP-86), see [`crate::moderation`].
    pub fn moderation_key(&self) -> String {
        format!("{}:moderation", self.prefix)
    }

    /// The channel announcing a new moderation snapshot version (payload: the version).
    pub fn moderation_channel(&self) -> String {
        format!("{}:moderation", self.prefix)
    }

    /// The channel a gateway listens on for answers to its management requests.
    pub fn admin_channel(&self, gateway: &GatewayId) -> String {
        format!("{}:admin:{gateway}", self.prefix)
    }

    /// The sorted set of a role's worker heartbeats.
    pub fn heartbeat_key(&self, role: Role) -> String {
        format!("{}:workers:{}", self.prefix, role.name())
    }
}

/// Opens a self-reconnecting Redis connection, retrying the first connect until it works
/// or `give_up_after` passes. `response_timeout` bounds each command (use a value above any
/// `BLOCK` time for connections that run blocking reads).
pub async fn connect(
    url: &str,
    response_timeout: Duration,
    give_up_after: Duration,
) -> Result<ConnectionManager, BusError> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_max_delay(Duration::from_secs(2));
    let deadline = tokio::time::Instant::now() + give_up_after;
    let mut delay = Duration::from_millis(100);
    loop {
        match client
            .get_connection_manager_with_config(config.clone())
            .await
        {
            Ok(conn) => return Ok(conn),
            Err(e) if tokio::time::Instant::now() + delay < deadline => {
                tracing::warn!(error = %e, "redis not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Opens a self-reconnecting Redis connection without waiting for Redis: the first command
/// connects, and fails (quickly) while Redis is down. For processes that must serve even
/// while Redis is away (the gateway answers `error:` then).
pub fn connect_lazy(url: &str, response_timeout: Duration) -> Result<ConnectionManager, BusError> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_max_delay(Duration::from_secs(2))
        .set_number_of_retries(1);
    Ok(ConnectionManager::new_lazy_with_config(client, config)?)
}

/// Creates `group` on `stream` (and the stream) if missing. The group starts at the
/// beginning of the stream, so entries added before any worker existed are not skipped.
pub async fn ensure_group(
    conn: &mut ConnectionManager,
    stream: &str,
    group: &str,
) -> Result<(), BusError> {
    let created: redis::RedisResult<()> = conn.xgroup_create_mkstream(stream, group, "0").await;
    match created {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Appends an envelope to a stream.
pub async fn add_entry(
    conn: &mut ConnectionManager,
    stream: &str,
    envelope: &str,
) -> Result<(), BusError> {
    let _: String = conn.xadd(stream, "*", &[(ENTRY_FIELD, envelope)]).await?;
    Ok(())
}

/// Appends entries, each `(stream, payload)`, in one round trip and in order. The outer
/// error is the round trip's (nothing can be known appended); otherwise each entry's own
/// result, in order, since Redis refuses commands one by one (a key of the wrong type, say).
pub async fn add_entries(
    conn: &mut ConnectionManager,
    entries: &[(&str, &[u8])],
) -> Result<Vec<Result<(), BusError>>, BusError> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for (stream, payload) in entries {
        pipe.xadd(*stream, "*", &[(ENTRY_FIELD, *payload)]);
    }
    let added: Vec<redis::RedisResult<String>> = pipe.query_async(conn).await?;
    Ok(added
        .into_iter()
        .map(|r| r.map(drop).map_err(BusError::from))
        .collect())
}

/// One stream entry read by a consumer.
#[derive(Debug)]
pub struct Entry {
    /// The stream it came from.
    pub stream: String,
    /// Its entry id.
    pub id: String,
    /// The envelope JSON, or `None` when the entry had no readable [`ENTRY_FIELD`].
    pub payload: Option<String>,
}

impl Entry {
    fn from_stream(stream: &str, entry: StreamId) -> Self {
        let payload = entry
            .map
            .get(ENTRY_FIELD)
            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok());
        Entry {
            stream: stream.to_owned(),
            id: entry.id,
            payload,
        }
    }
}

/// A consumer in a group over every shard of a role's streams.
pub struct Consumer {
    conn: ConnectionManager,
    streams: Vec<String>,
    group: &'static str,
    name: String,
    batch: usize,
    block: Duration,
}

impl Consumer {
    /// Joins (creating if needed) the role's group on every shard.
    pub async fn join(
        mut conn: ConnectionManager,
        bus: &Bus,
        role: Role,
        name: String,
        batch: usize,
        block: Duration,
    ) -> Result<Self, BusError> {
        let streams = bus.streams(role);
        for stream in &streams {
            ensure_group(&mut conn, stream, role.group()).await?;
        }
        Ok(Consumer {
            conn,
            streams,
            group: role.group(),
            name,
            batch,
            block,
        })
    }

    /// This consumer's name in the group.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads up to `batch` new entries, waiting at most `block` for the first one. If the
    /// groups are gone (Redis restarted without persistence), they are created again.
    pub async fn read(&mut self) -> Result<Vec<Entry>, BusError> {
        let opts = StreamReadOptions::default()
            .group(self.group, &self.name)
            .count(self.batch)
            .block(self.block.as_millis() as usize);
        let ids: Vec<&str> = self.streams.iter().map(|_| ">").collect();
        let reply: redis::RedisResult<Option<StreamReadReply>> =
            self.conn.xread_options(&self.streams, &ids, &opts).await;
        let reply = match reply {
            Err(e) if e.code() == Some("NOGROUP") => {
                tracing::warn!(
                    "consumer groups are missing (Redis restarted?); creating them again"
                );
                for stream in &self.streams {
                    ensure_group(&mut self.conn, stream, self.group).await?;
                }
                return Ok(Vec::new());
            }
            other => other?,
        };
        let mut out = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                out.push(Entry::from_stream(&key.key, entry));
            }
        }
        Ok(out)
    }

    /// Takes over up to `batch` entries that another consumer of the group read but did not
    /// acknowledge for at least `min_idle` (it died or hangs), so they are handled after all.
    pub async fn claim(&mut self, min_idle: Duration) -> Result<Vec<Entry>, BusError> {
        let mut out = Vec::new();
        for stream in &self.streams {
            let mut start = "0-0".to_owned();
            while out.len() < self.batch {
                let opts = StreamAutoClaimOptions::default().count(self.batch - out.len());
                let reply: redis::RedisResult<StreamAutoClaimReply> = self
                    .conn
                    .xautoclaim_options(
                        stream,
                        self.group,
                        &self.name,
                        min_idle.as_millis() as u64,
                        &start,
                        opts,
                    )
                    .await;
                let reply = match reply {
                    Err(e) if e.code() == Some("NOGROUP") => break,
                    other => other?,
                };
                if !reply.deleted_ids.is_empty() {
                    // Pending entries whose data is gone: nothing to redo, release them.
                    let _: redis::RedisResult<()> =
                        self.conn.xack(stream, self.group, &reply.deleted_ids).await;
                }
                out.extend(
                    reply
                        .claimed
                        .into_iter()
                        .map(|e| Entry::from_stream(stream, e)),
                );
                if reply.next_stream_id == "0-0" {
                    break;
                }
                start = reply.next_stream_id;
            }
        }
        Ok(out)
    }

    /// Adds to `pipe` the commands that acknowledge and delete handled entries. Deleting is
    /// safe because each stream has exactly one consumer group; it keeps the streams from
    /// growing. Any connection may send them.
    pub fn ack_into(&self, pipe: &mut redis::Pipeline, entries: &[Entry]) {
        for stream in &self.streams {
            let ids: Vec<&str> = entries
                .iter()
                .filter(|e| &e.stream == stream)
                .map(|e| e.id.as_str())
                .collect();
            if !ids.is_empty() {
                pipe.xack(stream, self.group, &ids).ignore();
                pipe.xdel(stream, &ids).ignore();
            }
        }
    }
}

/// Records that a worker is alive and healthy (Redis and its database reachable), so
/// gateways can tell whether the cluster is ready. Entries older than `stale` are pruned.
pub async fn heartbeat(
    conn: &mut ConnectionManager,
    bus: &Bus,
    role: Role,
    consumer: &str,
    stale: Duration,
) -> Result<(), BusError> {
    let key = bus.heartbeat_key(role);
    let now = unix_millis();
    let () = redis::pipe()
        .zadd(&key, consumer, now)
        .ignore()
        .zrembyscore(&key, 0, now - stale.as_millis() as i64)
        .ignore()
        .query_async(conn)
        .await?;
    Ok(())
}

/// Every gateway and ingest worker of a cluster must decide "addressed to this relay" by the
/// same `RELAY_PUBLIC_URL`. An ingest worker keeps its setting (`""` when unset) under
/// [`Bus::public_url_key`], rewritten every `every` and expiring after five of them;
/// [`advertised_public_url`] reads it for the gateways' `/readyz`. Runs until the process
/// ends.
pub async fn advertise_public_url(
    mut conn: ConnectionManager,
    bus: Bus,
    setting: String,
    every: Duration,
) {
    let key = bus.public_url_key();
    let ttl = u64::try_from(every.as_millis().saturating_mul(5)).unwrap_or(u64::MAX);
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let set: redis::RedisResult<()> = redis::cmd("SET")
            .arg(&key)
            .arg(&setting)
            .arg("PX")
            .arg(ttl.max(1))
            .query_async(&mut conn)
            .await;
        if let Err(e) = set {
            tracing::debug!(error = %e, "cannot advertise RELAY_PUBLIC_URL");
        }
    }
}

/// The `RELAY_PUBLIC_URL` setting live ingest workers advertise, if any does.
pub async fn advertised_public_url(
    conn: &mut ConnectionManager,
    bus: &Bus,
) -> Result<Option<String>, BusError> {
    Ok(conn.get(bus.public_url_key()).await?)
}

/// How many workers of a role sent a heartbeat within `fresh`.
pub async fn live_workers(
    conn: &mut ConnectionManager,
    bus: &Bus,
    role: Role,
    fresh: Duration,
) -> Result<usize, BusError> {
    let now = unix_millis();
    let n: usize = conn
        .zcount(
            bus.heartbeat_key(role),
            now - fresh.as_millis() as i64,
            "+inf",
        )
        .await?;
    Ok(n)
}

/// How far one stream's consumer group is behind.
#[derive(Debug, Clone)]
pub struct StreamFigures {
    /// The stream's name.
    pub stream: String,
    /// The consumer group the figures are for (the role's).
    pub group: &'static str,
    /// Entries in the stream.
    pub length: u64,
    /// Entries the group read and has not acknowledged; `None` while the group does not
    /// exist (no worker has read this stream yet).
    pub pending: Option<u64>,
    /// Entries the group has not read yet, when Redis can tell.
    pub lag: Option<u64>,
}

/// The figures of each of a role's streams, for the role's group.
pub async fn stream_figures<C>(
    conn: &mut C,
    bus: &Bus,
    role: Role,
) -> redis::RedisResult<Vec<StreamFigures>>
where
    C: redis::aio::ConnectionLike + Send + Sync,
{
    let mut out = Vec::new();
    for stream in bus.streams(role) {
        let length: u64 = conn.xlen(&stream).await?;
        let groups: redis::RedisResult<redis::streams::StreamInfoGroupsReply> =
            conn.xinfo_groups(&stream).await;
        // A stream no worker ever read has no group yet: XINFO fails with "no such key".
        let group = groups
            .ok()
            .and_then(|g| g.groups.into_iter().find(|g| g.name == role.group()));
        out.push(StreamFigures {
            stream,
            group: role.group(),
            length,
            pending: group.as_ref().map(|g| g.pending as u64),
            lag: group.and_then(|g| g.lag.map(|l| l as u64)),
        });
    }
    Ok(out)
}

/// Sets the gauges of a role's streams from [`stream_figures`]: `nostr_stream_length`,
/// `nostr_stream_pending` and `nostr_stream_lag`. A failure only skips an update.
pub async fn record_stream_gauges(conn: &mut ConnectionManager, bus: &Bus, role: Role) {
    let Ok(figures) = stream_figures(conn, bus, role).await else {
        return;
    };
    for f in figures {
        metrics::gauge!("nostr_stream_length", "stream" => f.stream.clone()).set(f.length as f64);
        let labels = [("stream", f.stream), ("group", f.group.to_owned())];
        if let Some(pending) = f.pending {
            metrics::gauge!("nostr_stream_pending", &labels).set(pending as f64);
        }
        if let Some(lag) = f.lag {
            metrics::gauge!("nostr_stream_lag", &labels).set(lag as f64);
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus(shards: u16) -> Bus {
        Bus::new(&BusConfig {
            redis_url: String::new(),
            bus_prefix: "t".into(),
            bus_shards: shards,
        })
    }

    #[test]
    fn names_live_under_the_prefix() {
        let b = bus(2);
        assert_eq!(b.streams(Role::Ingest), vec!["t:ingest:0", "t:ingest:1"]);
        assert_eq!(b.query_stream(ConnId(3)), "t:query:1");
        assert_eq!(b.live_channel(), "t:live");
        let id = EventId::from_bytes([0xff; 32]);
        assert_eq!(b.ingest_stream(&id), "t:ingest:1");
        assert_eq!(bus(1).ingest_stream(&id), "t:ingest:0");
    }

    #[test]
    fn envelopes_round_trip_with_raw_event_json() {
        let json = r#"{"id":"x", "content":"a \"b\""}"#;
        let live = LiveEvent {
            event: RawValue::from_string(json.into()).expect("valid json"),
            trace: TraceContext::default(),
        };
        let text = encode(&live);
        assert!(
            !text.contains("trace"),
            "empty trace context is omitted: {text}"
        );
        let back: LiveEvent = decode(&text).expect("decodes");
        assert_eq!(back.event.get(), json);
        let reply = GatewayReply::Ok {
            conn: ConnId(7),
            event_id: EventId::from_bytes([1; 32]),
            accepted: true,
            message: String::new(),
            trace: TraceContext::default(),
        };
        let back: GatewayReply = decode(&encode(&reply)).expect("decodes");
        assert!(matches!(
            back,
            GatewayReply::Ok {
                conn: ConnId(7),
                accepted: true,
                ..
            }
        ));
    }

    #[test]
    fn a_batch_decodes_in_order_and_a_single_envelope_as_one() {
        let live = |n: u32| LiveEvent {
            event: RawValue::from_string(format!(r#"{{"n":{n}}}"#)).expect("valid json"),
            trace: TraceContext::default(),
        };
        assert!(Batch::default().finish().is_none(), "nothing to publish");
        let mut cut = Batches::new(40);
        for n in 0..5 {
            cut.push(&format!("envelope-{n}"));
        }
        cut.push(&"x".repeat(100));
        let messages: Vec<String> = cut
            .finish()
            .into_iter()
            .map(|m| String::from_utf8(m).expect("UTF-8"))
            .collect();
        assert_eq!(
            messages,
            [
                r#"["envelope-0","envelope-1","envelope-2"]"#.to_owned(),
                r#"["envelope-3","envelope-4"]"#.to_owned(),
                format!(r#"["{}"]"#, "x".repeat(100)),
            ],
            "at most 40 bytes each; a larger envelope goes alone"
        );
        let mut batch = Batch::default();
        for n in 0..3 {
            batch.push(&live(n));
        }
        let text = String::from_utf8(batch.finish().expect("three envelopes")).expect("UTF-8");
        let events = |text: &str| -> Vec<String> {
            decode_batch::<LiveEvent>(text)
                .into_iter()
                .map(|l| l.map_or_else(|e| format!("error: {e}"), |l| l.event.get().to_owned()))
                .collect()
        };
        assert_eq!(events(&text), [r#"{"n":0}"#, r#"{"n":1}"#, r#"{"n":2}"#]);
        assert_eq!(events(&encode(&live(9))), [r#"{"n":9}"#]);
        // One unreadable envelope costs only itself.
        let mixed = text.replacen(r#"{"event":{"n":1}}"#, "1", 1);
        let got = events(&mixed);
        assert_eq!(got.len(), 3, "{mixed}");
        assert!(got[1].starts_with("error: "), "{got:?}");
        assert_eq!([&got[0], &got[2]], [r#"{"n":0}"#, r#"{"n":2}"#]);
        assert!(events("[1,").iter().all(|e| e.starts_with("error: ")));
    }
}
