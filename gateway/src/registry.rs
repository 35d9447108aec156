//! Every connection and subscription this gateway holds, the index that finds the
//! subscriptions a live event may match, and the delivery of replies and live events.
//!
//! A subscription starts in the *stored* phase: its `REQ` went to the query workers, and live
//! events that match are buffered. When the stored events end (EOSE), the buffer is flushed,
//! minus events already sent as stored, and the subscription turns *live*.
//!
//! **Invariant:** a subscription is registered (and indexed) before its `REQ` is published,
//! so an event committed while the query runs is buffered, never missed.
//!
//! **Invariant:** nothing here awaits: delivery uses `try_send` on each connection's bounded
//! queue, and a connection whose queue is full is told to close (slow consumer).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::ws::Message;
use shared::bus::{ConnId, ReqId, StoredEvent, Viewer};
use shared::event::{Event, EventId, Kind, PubKey};
use shared::filter::Filter;
use shared::message::{
    NegMessage, SubId, closed_frame, eose_frame, event_frame, neg_err_frame, neg_msg_frame,
};
use shared::search::LiveText;
use tokio::sync::{Notify, mpsc};

/// A live event, parsed once per gateway and shared by every subscription it goes to.
pub struct LiveEvent {
    /// The parsed event, for matching.
    pub event: Event,
    /// Its JSON, copied verbatim into each `EVENT` frame.
    pub json: String,
}

/// What a connection's session needs to hear from the registry.
pub struct ConnHandle {
    /// The bounded outbound queue the connection's writer drains.
    pub tx: mpsc::Sender<Message>,
    /// Notified when the connection must be closed (its queue overflowed).
    pub kill: Arc<Notify>,
    /// Bytes of text frames in the queue: added here, taken off by the writer as it sends.
    pub queued: Arc<SendQueueBytes>,
}

enum Phase {
    Stored {
        buffered: Vec<Arc<LiveEvent>>,
        seen: HashSet<EventId>,
    },
    Live {
        seen: HashSet<EventId>,
        forget_at: Instant,
    },
}

struct Sub {
    req: ReqId,
    /// Shared, so live matching can run on a copy of the pointer outside the lock.
    filters: Arc<Vec<Filter>>,
    keys: Vec<IndexKey>,
    /// What the subscription holds in memory (its filters and index entries), about.
    bytes: usize,
    phase: Phase,
    /// While stored events are awaited: when to give up with `CLOSED error:`.
    deadline: Option<Instant>,
}

struct Conn {
    handle: ConnHandle,
    subs: HashMap<SubId, Sub>,
    /// The sum of the subscriptions' `bytes`.
    sub_bytes: usize,
    /// NIP-42 pubkeys, for read-restricted kinds.
    authed: Vec<PubKey>,
    /// Events sent to the bus whose `OK` has not come yet.
    pending_ok: Awaited<EventId>,
    /// `COUNT`s sent to the bus and not answered yet, by request (ids may repeat).
    pending_count: Awaited<(ReqId, SubId)>,
    /// NIP-77 negentropy sessions, by their own ids (not `REQ` ids).
    neg: HashMap<SubId, NegSession>,
}

impl Conn {
    /// Removes a subscription, and its bytes from the connection's count.
    fn remove_sub(&mut self, sub_id: &SubId) -> Option<Sub> {
        let sub = self.subs.remove(sub_id)?;
        self.sub_bytes -= sub.bytes;
        Some(sub)
    }
}

/// Requests sent to the bus whose answers have not come yet: each key's deadlines, oldest
/// first. A key may be awaited more than once (the same event published twice), and each
/// request gets exactly one answer: the worker's or, once its deadline passes, the
/// gateway's own `error:`.
struct Awaited<K>(HashMap<K, VecDeque<Instant>>);

impl<K> Default for Awaited<K> {
    fn default() -> Self {
        Awaited(HashMap::new())
    }
}

impl<K: std::hash::Hash + Eq + Clone> Awaited<K> {
    fn expect(&mut self, key: K, deadline: Instant) {
        self.0.entry(key).or_default().push_back(deadline);
    }

    /// Whether an answer for `key` is awaited; if so, it no longer is (oldest first).
    fn answer(&mut self, key: &K) -> bool {
        let Some(deadlines) = self.0.get_mut(key) else {
            return false;
        };
        deadlines.pop_front();
        if deadlines.is_empty() {
            self.0.remove(key);
        }
        true
    }

    /// Forgets every request: their keys, one per request.
    fn take_all(&mut self) -> Vec<K> {
        self.0
            .drain()
            .flat_map(|(key, deadlines)| std::iter::repeat_n(key, deadlines.len()))
            .collect()
    }

    /// Forgets the requests whose deadline is past `now`: their keys, one per request.
    fn expire(&mut self, now: Instant) -> Vec<K> {
        let mut expired = Vec::new();
        self.0.retain(|key, deadlines| {
            while deadlines.front().is_some_and(|d| *d <= now) {
                deadlines.pop_front();
                expired.push(key.clone());
            }
            !deadlines.is_empty()
        });
        expired
    }
}

/// A NIP-77 negentropy session. The query workers keep nothing between rounds, so the
/// gateway holds what every round is answered against: the filter and the viewer as they
/// were at `NEG-OPEN` (a later AUTH does not change the set mid-reconciliation).
struct NegSession {
    filter: Filter,
    viewer: Viewer,
    /// The round in flight, or the last one answered; replies for any other are dropped.
    req: ReqId,
    /// While a round is in flight: when to give up with `NEG-ERR error:`.
    deadline: Option<Instant>,
    /// Between rounds: when to end the session with `NEG-ERR closed:`.
    idle_at: Instant,
}

/// The index keys of a subscription: each filter is filed under its most selective
/// condition, so a live event only visits subscriptions that could match it.
#[derive(Clone, PartialEq, Eq, Hash)]
enum IndexKey {
    Id(EventId),
    Author(PubKey),
    Tag(char, String),
    Kind(Kind),
    All,
}

fn index_keys(filters: &[Filter]) -> Vec<IndexKey> {
    let mut keys = Vec::new();
    for f in filters.iter().filter(|f| !f.is_empty_set()) {
        if let Some(ids) = &f.ids {
            keys.extend(ids.iter().copied().map(IndexKey::Id));
        } else if let Some(authors) = &f.authors {
            keys.extend(authors.iter().copied().map(IndexKey::Author));
        } else if let Some((letter, values)) = f.tags.iter().next() {
            keys.extend(values.iter().map(|v| IndexKey::Tag(*letter, v.clone())));
        } else if let Some(kinds) = &f.kinds {
            keys.extend(kinds.iter().copied().map(IndexKey::Kind));
        } else {
            keys.push(IndexKey::All);
        }
    }
    keys.sort_unstable_by_key(index_order);
    keys.dedup();
    keys
}

fn index_order(k: &IndexKey) -> (u8, String) {
    match k {
        IndexKey::Id(id) => (0, id.to_hex()),
        IndexKey::Author(a) => (1, a.to_hex()),
        IndexKey::Tag(l, v) => (2, format!("{l}{v}")),
        IndexKey::Kind(k) => (3, k.0.to_string()),
        IndexKey::All => (4, String::new()),
    }
}

/// About how many bytes a subscription with these filters and index keys holds: the
/// filters, and for each key its entry in the index.
fn subscription_bytes(filters: &[Filter], keys: &[IndexKey]) -> usize {
    const ENTRY: usize = std::mem::size_of::<IndexKey>() + std::mem::size_of::<(ConnId, SubId)>();
    let key_text: usize = keys
        .iter()
        .map(|k| match k {
            IndexKey::Tag(_, v) => v.len(),
            _ => 0,
        })
        .sum();
    filters.iter().map(Filter::approx_bytes).sum::<usize>() + keys.len() * 2 * ENTRY + key_text
}

#[derive(Default)]
struct Inner {
    conns: HashMap<ConnId, Conn>,
    index: HashMap<IndexKey, HashSet<(ConnId, SubId)>>,
    /// Live subscriptions whose duplicate window ends, in order: at that time their
    /// already-sent ids are dropped, whether or not another event comes.
    forget: VecDeque<(Instant, ConnId, SubId, ReqId)>,
}

impl Inner {
    fn unindex(&mut self, conn: ConnId, sub_id: &SubId, keys: &[IndexKey]) {
        for key in keys {
            if let Some(set) = self.index.get_mut(key) {
                set.remove(&(conn, sub_id.clone()));
                if set.is_empty() {
                    self.index.remove(key);
                }
            }
        }
    }
}

/// Registry settings, from the gateway's [`crate::config::Limits`].
#[derive(Clone, Copy)]
pub struct RegistryLimits {
    /// Live events buffered per subscription before EOSE.
    pub live_buffer: usize,
    /// How long ids sent before EOSE are remembered after it.
    pub duplicate_window: Duration,
    /// How long an EVENT, REQ or COUNT may wait for its worker's answer before the gateway
    /// answers `error:` itself.
    pub reply_timeout: Duration,
    /// Open negentropy sessions per connection; `neg_open` refuses one more.
    pub max_neg_sessions: usize,
    /// How long a negentropy session may wait for the client's next round.
    pub neg_idle: Duration,
    /// Bytes one connection's subscriptions may hold (filters and index entries);
    /// `subscribe` refuses one that would go past it.
    pub max_subscription_bytes: usize,
}

/// Why a subscription was not registered: the connection's subscriptions would hold too
/// much memory. Shown to the client (NIP-01 prefix) in the `CLOSED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionsTooBig {
    /// What the connection's subscriptions would hold with this one, in bytes.
    pub bytes: usize,
    /// [`RegistryLimits::max_subscription_bytes`].
    pub limit: usize,
}

impl std::fmt::Display for SubscriptionsTooBig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rate-limited: the subscriptions of this connection would hold about {} bytes; \
             the limit is {}; close some or ask with smaller filters",
            self.bytes, self.limit
        )
    }
}

/// Why a negentropy session was not opened: the connection has `limit` open already.
/// Shown to the client (NIP-01 prefix) in the `NEG-ERR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyNegSessions {
    /// Sessions open on the connection.
    pub open: usize,
    /// [`RegistryLimits::max_neg_sessions`].
    pub limit: usize,
}

impl std::fmt::Display for TooManyNegSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rate-limited: {} negentropy sessions are open; the limit is {}; close one first",
            self.open, self.limit
        )
    }
}

/// Who may see live events of which kinds.
pub struct LivePolicy {
    /// Kinds delivered only to an authenticated author or `p`-tagged recipient.
    pub restricted_kinds: Vec<Kind>,
}

/// The gateway's connections and subscriptions. One lock; every operation is short and
/// never awaits while holding it.
pub struct Registry {
    inner: Mutex<Inner>,
    limits: RegistryLimits,
    policy: LivePolicy,
}

/// The bytes of a connection's queued frames and their bound (`RELAY_SEND_QUEUE_BYTES`): the
/// queue's length counts messages, this its memory.
pub struct SendQueueBytes {
    queued: std::sync::atomic::AtomicUsize,
    max: usize,
}

impl SendQueueBytes {
    /// An empty queue that may hold `max` bytes.
    pub fn new(max: usize) -> Self {
        SendQueueBytes {
            queued: std::sync::atomic::AtomicUsize::new(0),
            max,
        }
    }

    /// Counts `n` more bytes unless that goes past the bound.
    fn add(&self, n: usize) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.queued
            .fetch_update(Relaxed, Relaxed, |q| {
                // An empty queue takes any one frame, so no single frame is refused for size.
                (q == 0 || q + n <= self.max).then_some(q + n)
            })
            .is_ok()
    }

    /// The writer sent (or dropped) a frame of `n` bytes.
    pub fn sent(&self, n: usize) {
        self.queued
            .fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Sends a frame without waiting; a full queue (in messages or bytes) marks the connection
/// for closing (the session logs it when it closes). Returns whether the frame was queued.
fn push(conn_id: ConnId, handle: &ConnHandle, frame: String) -> bool {
    let len = frame.len();
    if !handle.queued.add(len) {
        tracing::debug!(conn = conn_id.0, "send queue over its bytes; disconnecting");
        handle.kill.notify_one();
        return false;
    }
    match handle.tx.try_send(Message::Text(frame.into())) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            handle.queued.sent(len);
            tracing::debug!(conn = conn_id.0, "send queue full; disconnecting");
            handle.kill.notify_one();
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            handle.queued.sent(len);
            false
        }
    }
}

impl Registry {
    /// An empty registry.
    pub fn new(limits: RegistryLimits, policy: LivePolicy) -> Self {
        Registry {
            inner: Mutex::new(Inner::default()),
            limits,
            policy,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain maps behind; keep serving with them.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Number of open connections.
    pub fn connections(&self) -> usize {
        self.lock().conns.len()
    }

    /// Adds a connection.
    pub fn add_conn(&self, conn: ConnId, handle: ConnHandle) {
        self.lock().conns.insert(
            conn,
            Conn {
                handle,
                subs: HashMap::new(),
                sub_bytes: 0,
                authed: Vec::new(),
                pending_ok: Awaited::default(),
                pending_count: Awaited::default(),
                neg: HashMap::new(),
            },
        );
    }

    /// Records the pubkeys a connection authenticated as.
    pub fn set_authed(&self, conn: ConnId, authed: Vec<PubKey>) {
        if let Some(c) = self.lock().conns.get_mut(&conn) {
            c.authed = authed;
        }
    }

    /// Removes a connection and all its subscriptions.
    pub fn remove_conn(&self, conn: ConnId) {
        let mut inner = self.lock();
        if let Some(c) = inner.conns.remove(&conn) {
            for (sub_id, sub) in c.subs {
                inner.unindex(conn, &sub_id, &sub.keys);
            }
        }
    }

    /// Sends a frame to a connection (replies such as `OK` and `NOTICE`).
    pub fn send(&self, conn: ConnId, frame: String) {
        let inner = self.lock();
        if let Some(c) = inner.conns.get(&conn) {
            push(conn, &c.handle, frame);
        }
    }

    /// Whether a connection holds a subscription with this id.
    pub fn has_subscription(&self, conn: ConnId, sub_id: &SubId) -> bool {
        self.lock()
            .conns
            .get(&conn)
            .is_some_and(|c| c.subs.contains_key(sub_id))
    }

    /// Number of subscriptions a connection holds.
    pub fn subscriptions(&self, conn: ConnId) -> usize {
        self.lock().conns.get(&conn).map_or(0, |c| c.subs.len())
    }

    /// Registers (or replaces) a subscription in the stored phase. When `stored_done` is set
    /// (no stored query is needed, e.g. every filter has `limit: 0`), EOSE is sent at once
    /// and the subscription is live. Refused when the connection's subscriptions would hold
    /// more than `max_subscription_bytes` (the caller then ends the one it would replace,
    /// as for any refused `REQ`).
    pub fn subscribe(
        &self,
        conn: ConnId,
        sub_id: SubId,
        req: ReqId,
        filters: Vec<Filter>,
        stored_done: bool,
    ) -> Result<(), SubscriptionsTooBig> {
        // Built before the lock: a big filter costs its own connection, not everyone's.
        let keys = index_keys(&filters);
        let bytes = subscription_bytes(&filters, &keys);
        let deadline = (!stored_done).then(|| Instant::now() + self.limits.reply_timeout);
        let mut inner = self.lock();
        let Some(c) = inner.conns.get_mut(&conn) else {
            return Ok(());
        };
        let replaced = c.subs.get(&sub_id).map_or(0, |s| s.bytes);
        let total = c.sub_bytes - replaced + bytes;
        if total > self.limits.max_subscription_bytes {
            return Err(SubscriptionsTooBig {
                bytes: total,
                limit: self.limits.max_subscription_bytes,
            });
        }
        c.sub_bytes = total;
        let old = c.subs.insert(
            sub_id.clone(),
            Sub {
                req,
                filters: Arc::new(filters),
                keys: keys.clone(),
                bytes,
                phase: Phase::Stored {
                    buffered: Vec::new(),
                    seen: HashSet::new(),
                },
                deadline,
            },
        );
        if let Some(old) = old {
            inner.unindex(conn, &sub_id, &old.keys);
        }
        for key in keys {
            inner
                .index
                .entry(key)
                .or_default()
                .insert((conn, sub_id.clone()));
        }
        drop(inner);
        if stored_done {
            self.stored(conn, req, &sub_id, Vec::new(), true);
        }
        Ok(())
    }

    /// Ends a subscription (client `CLOSE`); unknown ids are ignored.
    pub fn unsubscribe(&self, conn: ConnId, sub_id: &SubId) {
        let mut inner = self.lock();
        let removed = inner
            .conns
            .get_mut(&conn)
            .and_then(|c| c.remove_sub(sub_id));
        if let Some(sub) = removed {
            inner.unindex(conn, sub_id, &sub.keys);
        }
    }

    /// Ends a subscription from the relay side with `CLOSED`, if `req` is still current.
    pub fn close(&self, conn: ConnId, req: ReqId, sub_id: &SubId, message: &str) {
        let mut inner = self.lock();
        let current = inner
            .conns
            .get(&conn)
            .and_then(|c| c.subs.get(sub_id))
            .is_some_and(|s| s.req == req);
        if !current {
            return;
        }
        if let Some(c) = inner.conns.get_mut(&conn)
            && let Some(sub) = c.remove_sub(sub_id)
        {
            push(conn, &c.handle, closed_frame(sub_id, message));
            inner.unindex(conn, sub_id, &sub.keys);
        }
    }

    /// Delivers stored events for `req` (dropped if the subscription moved on), and on
    /// `eose` sends EOSE, flushes buffered live events and turns the subscription live.
    pub fn stored(
        &self,
        conn: ConnId,
        req: ReqId,
        sub_id: &SubId,
        events: Vec<StoredEvent>,
        eose: bool,
    ) {
        let window = self.limits.duplicate_window;
        let mut inner = self.lock();
        let Some(c) = inner.conns.get_mut(&conn) else {
            return;
        };
        let Some(sub) = c.subs.get_mut(sub_id).filter(|s| s.req == req) else {
            return;
        };
        let Phase::Stored { buffered, seen } = &mut sub.phase else {
            return;
        };
        for ev in events {
            if seen.insert(ev.id) {
                push(conn, &c.handle, event_frame(sub_id, ev.json.get()));
            }
        }
        if eose {
            push(conn, &c.handle, eose_frame(sub_id));
            for live in buffered.drain(..) {
                if seen.insert(live.event.id) {
                    push(conn, &c.handle, event_frame(sub_id, &live.json));
                }
            }
            let forget_at = Instant::now() + window;
            let remember = !seen.is_empty();
            sub.phase = Phase::Live {
                seen: std::mem::take(seen),
                forget_at,
            };
            sub.deadline = None;
            if remember {
                inner
                    .forget
                    .push_back((forget_at, conn, sub_id.clone(), req));
            }
        }
    }

    /// Notes that an event went to the bus and its `OK` is awaited. Call before publishing,
    /// so a fast answer cannot arrive first.
    pub fn expect_ok(&self, conn: ConnId, id: EventId) {
        let deadline = Instant::now() + self.limits.reply_timeout;
        if let Some(c) = self.lock().conns.get_mut(&conn) {
            c.pending_ok.expect(id, deadline);
        }
    }

    /// Delivers a worker's `OK` if it is still awaited (a late one, after the gateway
    /// answered `error:` on its own, is dropped: every EVENT gets exactly one `OK`).
    pub fn ok(&self, conn: ConnId, id: EventId, frame: String) {
        let mut inner = self.lock();
        if let Some(c) = inner.conns.get_mut(&conn)
            && c.pending_ok.answer(&id)
        {
            push(conn, &c.handle, frame);
        }
    }

    /// Notes that a `COUNT` (request `req`) is about to go to the bus. Each `COUNT` gets its
    /// own answer, even when a client reuses an id.
    pub fn expect_count(&self, conn: ConnId, req: ReqId, query_id: SubId) {
        let deadline = Instant::now() + self.limits.reply_timeout;
        if let Some(c) = self.lock().conns.get_mut(&conn) {
            c.pending_count.expect((req, query_id), deadline);
        }
    }

    /// Delivers the answer to `COUNT` request `req` (or its `CLOSED`) if it is still
    /// awaited: not after the gateway answered `error:` on its own.
    pub fn count(&self, conn: ConnId, req: ReqId, query_id: SubId, frame: String) {
        let mut inner = self.lock();
        if let Some(c) = inner.conns.get_mut(&conn)
            && c.pending_count.answer(&(req, query_id))
        {
            push(conn, &c.handle, frame);
        }
    }

    /// Opens (or replaces) a negentropy session whose first round, `req`, is about to go to
    /// the bus. Refused when `max_neg_sessions` are open and `sub_id` is not one.
    pub fn neg_open(
        &self,
        conn: ConnId,
        sub_id: SubId,
        filter: Filter,
        viewer: Viewer,
        req: ReqId,
    ) -> Result<(), TooManyNegSessions> {
        let now = Instant::now();
        let deadline = now + self.limits.reply_timeout;
        let mut inner = self.lock();
        let Some(c) = inner.conns.get_mut(&conn) else {
            return Ok(());
        };
        if c.neg.len() >= self.limits.max_neg_sessions && !c.neg.contains_key(&sub_id) {
            return Err(TooManyNegSessions {
                open: c.neg.len(),
                limit: self.limits.max_neg_sessions,
            });
        }
        c.neg.insert(
            sub_id,
            NegSession {
                filter,
                viewer,
                req,
                deadline: Some(deadline),
                idle_at: now + self.limits.neg_idle,
            },
        );
        Ok(())
    }

    /// Starts round `req` of a negentropy session: its filter and viewer, or `None` when the
    /// connection holds no session with this id.
    pub fn neg_round(&self, conn: ConnId, sub_id: &SubId, req: ReqId) -> Option<(Filter, Viewer)> {
        let deadline = Instant::now() + self.limits.reply_timeout;
        let mut inner = self.lock();
        let neg = inner.conns.get_mut(&conn)?.neg.get_mut(sub_id)?;
        neg.req = req;
        neg.deadline = Some(deadline);
        Some((neg.filter.clone(), neg.viewer.clone()))
    }

    /// Delivers a round's answer if `req` is the round awaited: `NEG-MSG` (the session waits
    /// for the client again) or `NEG-ERR` (the session ends).
    pub fn neg_reply(
        &self,
        conn: ConnId,
        req: ReqId,
        sub_id: &SubId,
        result: Result<NegMessage, String>,
    ) {
        let mut inner = self.lock();
        let Some(c) = inner.conns.get_mut(&conn) else {
            return;
        };
        let Some(neg) = c
            .neg
            .get_mut(sub_id)
            .filter(|n| n.req == req && n.deadline.is_some())
        else {
            return;
        };
        match result {
            Ok(message) => {
                neg.deadline = None;
                neg.idle_at = Instant::now() + self.limits.neg_idle;
                push(conn, &c.handle, neg_msg_frame(sub_id, &message));
            }
            Err(reason) => {
                c.neg.remove(sub_id);
                push(conn, &c.handle, neg_err_frame(sub_id, &reason));
            }
        }
    }

    /// Ends a negentropy session (client `NEG-CLOSE`); unknown ids are ignored.
    pub fn neg_close(&self, conn: ConnId, sub_id: &SubId) {
        if let Some(c) = self.lock().conns.get_mut(&conn) {
            c.neg.remove(sub_id);
        }
    }

    /// Answers everything whose worker did not answer in time: `OK false error:` for
    /// events, `CLOSED error:` for REQs (the subscription ends) and COUNTs, `NEG-ERR error:`
    /// for negentropy rounds; and ends idle negentropy sessions with `NEG-ERR closed:`.
    pub fn expire(&self, now: Instant) {
        let mut inner = self.lock();
        let mut unindex = Vec::new();
        for (conn_id, c) in inner.conns.iter_mut() {
            let conn = *conn_id;
            for id in c.pending_ok.expire(now) {
                let frame = shared::message::ok_frame(
                    &id,
                    false,
                    "error: the relay did not store the event in time; try again",
                );
                push(conn, &c.handle, frame);
            }
            for (_, q) in c.pending_count.expire(now) {
                push(
                    conn,
                    &c.handle,
                    closed_frame(&q, "error: the relay could not count in time; try again"),
                );
            }
            expire_neg(conn, c, now);
            let stale: Vec<SubId> = c
                .subs
                .iter()
                .filter(|(_, s)| s.deadline.is_some_and(|d| d <= now))
                .map(|(id, _)| id.clone())
                .collect();
            for sub_id in stale {
                if let Some(sub) = c.remove_sub(&sub_id) {
                    push(
                        conn,
                        &c.handle,
                        closed_frame(
                            &sub_id,
                            "error: the relay could not answer in time; try again",
                        ),
                    );
                    unindex.push((conn, sub_id, sub.keys));
                }
            }
        }
        for (conn, sub_id, keys) in unindex {
            inner.unindex(conn, &sub_id, &keys);
        }
        forget_sent(&mut inner, now);
    }

    /// The bus subscription was lost, so answers and live events sent meanwhile are gone:
    /// every request in flight is answered now (`OK false error:`, `CLOSED error:` for
    /// COUNTs, `NEG-ERR error:` for negentropy rounds), and every subscription ends with
    /// `CLOSED error:` (it may have missed live events; the client subscribes again).
    pub fn bus_lost(&self) {
        const RETRY: &str = "error: the relay lost its connection to the bus; try again";
        let mut inner = self.lock();
        let mut unindex = Vec::new();
        for (conn_id, c) in inner.conns.iter_mut() {
            let conn = *conn_id;
            for id in c.pending_ok.take_all() {
                push(
                    conn,
                    &c.handle,
                    shared::message::ok_frame(&id, false, RETRY),
                );
            }
            for (_, q) in c.pending_count.take_all() {
                push(conn, &c.handle, closed_frame(&q, RETRY));
            }
            // Rounds in flight; sessions waiting for the client's next round go on.
            end_neg_sessions(conn, c, |neg| neg.deadline.map(|_| RETRY));
            for (sub_id, sub) in c.subs.drain() {
                push(conn, &c.handle, closed_frame(&sub_id, RETRY));
                unindex.push((conn, sub_id, sub.keys));
            }
            c.sub_bytes = 0;
        }
        for (conn, sub_id, keys) in unindex {
            inner.unindex(conn, &sub_id, &keys);
        }
    }

    /// Whether any subscription is indexed for live events on this gateway.
    pub fn has_subscriptions(&self) -> bool {
        !self.lock().index.is_empty()
    }

    /// Delivers a live event to every matching subscription on this gateway. Expired events
    /// (NIP-40) go nowhere; read-restricted kinds only to connections authenticated as the
    /// author or a `p`-tagged recipient.
    pub fn live(&self, live: Arc<LiveEvent>) -> usize {
        let ev = &live.event;
        if ev.is_expired(shared::unix_now()) {
            return 0;
        }
        // Everything per event is worked out before the lock: the index keys it may be filed
        // under and, for a restricted kind, who may read it (its author and `p` tags).
        let mut keys = vec![
            IndexKey::Id(ev.id),
            IndexKey::Author(ev.pubkey),
            IndexKey::Kind(ev.kind),
            IndexKey::All,
        ];
        keys.extend(
            ev.indexed_tags()
                .map(|(letter, value)| IndexKey::Tag(letter, value.to_owned())),
        );
        let readers: Option<Vec<PubKey>> = self
            .policy
            .restricted_kinds
            .contains(&ev.kind)
            .then(|| ev.readers().collect());
        // Under the lock, only what the index finds: each candidate's filters (a pointer).
        let candidates: Vec<(ConnId, SubId, ReqId, Arc<Vec<Filter>>)> = {
            let inner = self.lock();
            let found: HashSet<&(ConnId, SubId)> = keys
                .iter()
                .filter_map(|key| inner.index.get(key))
                .flatten()
                .collect();
            found
                .into_iter()
                .filter_map(|(conn, sub_id)| {
                    let c = inner.conns.get(conn)?;
                    if let Some(readers) = &readers
                        && !c.authed.iter().any(|pk| readers.contains(pk))
                    {
                        return None;
                    }
                    let sub = c.subs.get(sub_id)?;
                    Some((*conn, sub_id.clone(), sub.req, Arc::clone(&sub.filters)))
                })
                .collect()
        };
        // Matching runs without the lock: other connections go on meanwhile. Shared by
        // every candidate, so a search lowercases the content once per event.
        let text = LiveText::new(ev);
        let matched: Vec<(ConnId, SubId, ReqId)> = candidates
            .into_iter()
            .filter(|(_, _, _, filters)| filters.iter().any(|f| f.matches_live(ev, &text)))
            .map(|(conn, sub_id, req, _)| (conn, sub_id, req))
            .collect();
        if matched.is_empty() {
            return 0;
        }
        let now = Instant::now();
        let mut overflowed = Vec::new();
        let mut delivered = 0;
        let mut inner = self.lock();
        for (conn, sub_id, req) in matched {
            let Some(c) = inner.conns.get_mut(&conn) else {
                continue;
            };
            // Replaced or closed meanwhile: the new subscription was not matched.
            let Some(sub) = c.subs.get_mut(&sub_id).filter(|s| s.req == req) else {
                continue;
            };
            match &mut sub.phase {
                Phase::Stored { buffered, .. } => {
                    if buffered.len() < self.limits.live_buffer {
                        buffered.push(Arc::clone(&live));
                    } else {
                        crate::metrics::live_dropped("buffer_full");
                        overflowed.push((conn, sub.req, sub_id));
                    }
                }
                Phase::Live { seen, forget_at } => {
                    if !seen.is_empty() {
                        if now < *forget_at {
                            if !seen.insert(ev.id) {
                                continue;
                            }
                        } else {
                            *seen = HashSet::new();
                        }
                    }
                    if push(conn, &c.handle, event_frame(&sub_id, &live.json)) {
                        delivered += 1;
                    } else {
                        crate::metrics::live_dropped("slow_client");
                    }
                }
            }
        }
        drop(inner);
        crate::metrics::live_delivered(delivered);
        for (conn, req, sub_id) in overflowed {
            self.close(
                conn,
                req,
                &sub_id,
                "error: too many live events before the end of stored events; subscribe again",
            );
        }
        delivered
    }
}

/// Drops the already-sent ids of subscriptions whose duplicate window has passed, so a
/// subscription that never gets another event does not keep them for its whole life.
fn forget_sent(inner: &mut Inner, now: Instant) {
    while let Some((at, conn, sub_id, req)) = inner.forget.front().cloned() {
        if at > now {
            return;
        }
        inner.forget.pop_front();
        let sub = inner
            .conns
            .get_mut(&conn)
            .and_then(|c| c.subs.get_mut(&sub_id))
            .filter(|s| s.req == req);
        if let Some(Sub {
            phase: Phase::Live { seen, .. },
            ..
        }) = sub
        {
            *seen = HashSet::new();
        }
    }
}

/// Ends a connection's negentropy sessions whose round is overdue or whose client went quiet.
fn expire_neg(conn: ConnId, c: &mut Conn, now: Instant) {
    end_neg_sessions(conn, c, |neg| match neg.deadline {
        Some(d) if d <= now => Some("error: the relay could not reconcile in time; try again"),
        None if neg.idle_at <= now => Some("closed: no NEG-MSG for too long; send NEG-OPEN again"),
        _ => None,
    });
}

/// Ends, with `NEG-ERR`, the connection's negentropy sessions `reason` gives a reason for.
fn end_neg_sessions(
    conn: ConnId,
    c: &mut Conn,
    reason: impl Fn(&NegSession) -> Option<&'static str>,
) {
    let mut ended = Vec::new();
    c.neg.retain(|sub_id, neg| {
        let Some(reason) = reason(neg) else {
            return true;
        };
        ended.push(neg_err_frame(sub_id, reason));
        false
    });
    for frame in ended {
        push(conn, &c.handle, frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::event::signing::Keys;

    fn filter(v: serde_json::Value) -> Filter {
        Filter::from_value(&v).expect("valid filter")
    }

    fn registry() -> (Registry, mpsc::Receiver<Message>) {
        let reg = Registry::new(
            RegistryLimits {
                live_buffer: 10,
                duplicate_window: Duration::from_secs(5),
                reply_timeout: Duration::from_secs(5),
                max_neg_sessions: 1,
                neg_idle: Duration::from_secs(60),
                max_subscription_bytes: 64 * 1024,
            },
            LivePolicy {
                restricted_kinds: vec![Kind(4)],
            },
        );
        let (tx, rx) = mpsc::channel(100);
        reg.add_conn(
            ConnId(1),
            ConnHandle {
                tx,
                kill: Arc::new(Notify::new()),
                queued: Arc::new(SendQueueBytes::new(1024 * 1024)),
            },
        );
        (reg, rx)
    }

    fn texts(rx: &mut mpsc::Receiver<Message>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(Message::Text(t)) = rx.try_recv() {
            out.push(t.to_string());
        }
        out
    }

    fn live(ev: &Event) -> Arc<LiveEvent> {
        Arc::new(LiveEvent {
            event: ev.clone(),
            json: ev.to_json(),
        })
    }

    #[test]
    fn live_events_wait_for_eose_and_are_not_sent_twice() {
        let (reg, mut rx) = registry();
        let keys = Keys::generate();
        let sub = SubId::new("s").expect("valid");
        reg.subscribe(
            ConnId(1),
            sub.clone(),
            ReqId(1),
            vec![filter(serde_json::json!({"kinds":[1]}))],
            false,
        )
        .expect("within the byte limit");
        let a = keys.sign(1, Kind(1), vec![], "a");
        let b = keys.sign(2, Kind(1), vec![], "b");
        reg.live(live(&a));
        reg.live(live(&b));
        reg.live(live(&keys.sign(3, Kind(2), vec![], "other kind")));
        assert!(texts(&mut rx).is_empty(), "nothing before EOSE");
        let stored = StoredEvent {
            id: a.id,
            json: shared::message::raw_json(a.to_json()).expect("json"),
        };
        reg.stored(ConnId(1), ReqId(1), &sub, vec![stored], true);
        let got = texts(&mut rx);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].contains(&a.id.to_hex()));
        assert_eq!(got[1], "[\"EOSE\",\"s\"]");
        assert!(got[2].contains(&b.id.to_hex()));
        reg.live(live(&b));
        assert!(texts(&mut rx).is_empty(), "b was already sent");
        let c = keys.sign(4, Kind(1), vec![], "c");
        reg.live(live(&c));
        assert_eq!(texts(&mut rx).len(), 1);
    }

    #[test]
    fn restricted_kinds_reach_only_authenticated_parties() {
        let (reg, mut rx) = registry();
        let sub = SubId::new("dm").expect("valid");
        reg.subscribe(
            ConnId(1),
            sub.clone(),
            ReqId(1),
            vec![filter(serde_json::json!({"kinds":[4]}))],
            true,
        )
        .expect("within the byte limit");
        assert_eq!(texts(&mut rx).len(), 1, "EOSE");
        let me = Keys::generate();
        let dm = Keys::generate().sign(
            1,
            Kind(4),
            vec![vec!["p".into(), me.pubkey().to_hex()]],
            "secret",
        );
        reg.live(live(&dm));
        assert!(texts(&mut rx).is_empty(), "not authenticated");
        reg.set_authed(ConnId(1), vec![Keys::generate().pubkey()]);
        reg.live(live(&dm));
        assert!(texts(&mut rx).is_empty(), "authenticated as a stranger");
        reg.set_authed(ConnId(1), vec![me.pubkey()]);
        reg.live(live(&dm));
        assert_eq!(texts(&mut rx).len(), 1, "recipient");
    }

    #[test]
    fn unanswered_events_queries_and_counts_time_out_once() {
        let (reg, mut rx) = registry();
        let ev = Keys::generate().sign(1, Kind(1), vec![], "x");
        let sub = SubId::new("s").expect("valid");
        reg.expect_ok(ConnId(1), ev.id);
        reg.expect_ok(ConnId(1), ev.id);
        reg.subscribe(
            ConnId(1),
            sub.clone(),
            ReqId(1),
            vec![filter(serde_json::json!({}))],
            false,
        )
        .expect("within the byte limit");
        reg.expect_count(ConnId(1), ReqId(2), SubId::new("c").expect("valid"));
        reg.ok(ConnId(1), ev.id, "first".into());
        reg.expire(Instant::now());
        assert_eq!(
            texts(&mut rx),
            vec!["first".to_string()],
            "nothing is due yet"
        );
        reg.expire(Instant::now() + Duration::from_secs(6));
        let got = texts(&mut rx);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(
            got.iter()
                .any(|t| t.starts_with("[\"OK\"") && t.contains("error:"))
        );
        assert!(
            got.iter()
                .filter(|t| t.starts_with("[\"CLOSED\"") && t.contains("error:"))
                .count()
                == 2
        );
        reg.ok(ConnId(1), ev.id, "late".into());
        reg.stored(ConnId(1), ReqId(1), &sub, vec![], true);
        assert!(texts(&mut rx).is_empty(), "late answers are dropped");
        assert_eq!(reg.subscriptions(ConnId(1)), 0);
    }

    #[test]
    fn counts_with_one_id_get_their_own_answers() {
        let (reg, mut rx) = registry();
        let q = SubId::new("c").expect("valid");
        reg.expect_count(ConnId(1), ReqId(1), q.clone());
        reg.expect_count(ConnId(1), ReqId(2), q.clone());
        reg.count(ConnId(1), ReqId(2), q.clone(), "second".into());
        reg.count(ConnId(1), ReqId(1), q.clone(), "first".into());
        reg.count(ConnId(1), ReqId(1), q.clone(), "again".into());
        assert_eq!(texts(&mut rx), vec!["second", "first"]);
        // A COUNT that timed out: its late answer is not taken for the next one's.
        reg.expect_count(ConnId(1), ReqId(3), q.clone());
        reg.expire(Instant::now() + Duration::from_secs(6));
        let got = texts(&mut rx);
        assert!(
            got.len() == 1 && got[0].starts_with("[\"CLOSED\""),
            "{got:?}"
        );
        reg.expect_count(ConnId(1), ReqId(4), q.clone());
        reg.count(ConnId(1), ReqId(3), q.clone(), "late".into());
        reg.count(ConnId(1), ReqId(4), q.clone(), "fourth".into());
        assert_eq!(texts(&mut rx), vec!["fourth"]);
    }

    #[test]
    fn negentropy_rounds_time_out_idle_sessions_close_and_stale_answers_drop() {
        let (reg, mut rx) = registry();
        let sub = SubId::new("n").expect("valid");
        let open_as = |sub: &SubId, req| {
            reg.neg_open(
                ConnId(1),
                sub.clone(),
                filter(serde_json::json!({})),
                Viewer::default(),
                ReqId(req),
            )
        };
        let open = |req| open_as(&sub, req);
        assert_eq!(open(1), Ok(()));
        let other = SubId::new("m").expect("valid");
        assert_eq!(
            open_as(&other, 9),
            Err(TooManyNegSessions { open: 1, limit: 1 }),
            "the limit counts"
        );
        assert_eq!(open(2), Ok(()), "replacing is not one more");
        let answer = NegMessage::from_hex("61").expect("hex");
        reg.neg_reply(ConnId(1), ReqId(1), &sub, Ok(answer.clone()));
        assert!(
            texts(&mut rx).is_empty(),
            "the replaced round's answer is dropped"
        );
        reg.neg_reply(ConnId(1), ReqId(2), &sub, Ok(answer.clone()));
        assert_eq!(texts(&mut rx), vec!["[\"NEG-MSG\",\"n\",\"61\"]"]);
        assert!(reg.neg_round(ConnId(1), &sub, ReqId(3)).is_some());
        reg.expire(Instant::now() + Duration::from_secs(6));
        let got = texts(&mut rx);
        assert!(got[0].starts_with("[\"NEG-ERR\",\"n\",\"error:"), "{got:?}");
        reg.neg_reply(ConnId(1), ReqId(3), &sub, Ok(answer.clone()));
        assert!(texts(&mut rx).is_empty(), "late answers are dropped");
        assert!(reg.neg_round(ConnId(1), &sub, ReqId(4)).is_none());

        assert_eq!(open(5), Ok(()));
        reg.neg_reply(ConnId(1), ReqId(5), &sub, Ok(answer));
        texts(&mut rx);
        reg.expire(Instant::now() + Duration::from_secs(30));
        assert!(texts(&mut rx).is_empty(), "not idle yet");
        reg.expire(Instant::now() + Duration::from_secs(61));
        let got = texts(&mut rx);
        assert!(
            got[0].starts_with("[\"NEG-ERR\",\"n\",\"closed:"),
            "{got:?}"
        );
    }

    #[test]
    fn stale_replies_and_closed_subscriptions_get_nothing() {
        let (reg, mut rx) = registry();
        let keys = Keys::generate();
        let sub = SubId::new("s").expect("valid");
        reg.subscribe(
            ConnId(1),
            sub.clone(),
            ReqId(1),
            vec![filter(serde_json::json!({}))],
            false,
        )
        .expect("within the byte limit");
        reg.subscribe(
            ConnId(1),
            sub.clone(),
            ReqId(2),
            vec![filter(
                serde_json::json!({"authors":[keys.pubkey().to_hex()]}),
            )],
            false,
        )
        .expect("within the byte limit");
        reg.stored(ConnId(1), ReqId(1), &sub, vec![], true);
        assert!(
            texts(&mut rx).is_empty(),
            "reply for the replaced REQ is dropped"
        );
        reg.stored(ConnId(1), ReqId(2), &sub, vec![], true);
        assert_eq!(texts(&mut rx), vec!["[\"EOSE\",\"s\"]"]);
        reg.live(live(&Keys::generate().sign(
            1,
            Kind(1),
            vec![],
            "other author",
        )));
        assert!(texts(&mut rx).is_empty());
        reg.unsubscribe(ConnId(1), &sub);
        reg.live(live(&keys.sign(1, Kind(1), vec![], "after close")));
        assert!(texts(&mut rx).is_empty());
        assert_eq!(reg.subscriptions(ConnId(1)), 0);
    }

    #[test]
    fn losing_the_bus_answers_everything_in_flight_and_ends_subscriptions() {
        let (reg, mut rx) = registry();
        let ev = Keys::generate().sign(1, Kind(1), vec![], "x");
        reg.expect_ok(ConnId(1), ev.id);
        reg.expect_count(ConnId(1), ReqId(2), SubId::new("c").expect("valid"));
        for (sub, stored_done) in [("stored", false), ("live", true)] {
            let sub = SubId::new(sub).expect("valid");
            let filters = vec![filter(serde_json::json!({}))];
            reg.subscribe(ConnId(1), sub, ReqId(3), filters, stored_done)
                .expect("fits");
        }
        texts(&mut rx);
        reg.bus_lost();
        let got = texts(&mut rx);
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(
            got.iter().all(|t| t.contains("error: the relay lost")),
            "{got:?}"
        );
        assert_eq!(reg.subscriptions(ConnId(1)), 0);
        assert!(!reg.has_subscriptions(), "nothing left in the index");
        reg.expire(Instant::now() + Duration::from_secs(60));
        assert!(texts(&mut rx).is_empty(), "each was answered once");
    }

    #[test]
    fn a_send_queue_is_bounded_in_bytes_too() {
        let (reg, mut rx) = registry();
        let big = "x".repeat(600 * 1024);
        reg.send(ConnId(1), big.clone());
        let kill = {
            let inner = reg.lock();
            Arc::clone(&inner.conns[&ConnId(1)].handle.kill)
        };
        reg.send(ConnId(1), big.clone());
        assert_eq!(texts(&mut rx).len(), 1, "the second is over 1 MiB queued");
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(1), kill.notified())
                    .await
                    .expect("the connection is told to close")
            });
    }

    #[test]
    fn a_connection_s_subscriptions_are_bounded_in_bytes() {
        let (reg, mut rx) = registry();
        let big = |n: usize| {
            let values: Vec<String> = (0..n).map(|i| format!("value-{i}")).collect();
            vec![filter(serde_json::json!({"#t": values}))]
        };
        let sub = |s: &str| SubId::new(s).expect("valid");
        reg.subscribe(ConnId(1), sub("a"), ReqId(1), big(200), true)
            .expect("fits");
        let refused = reg
            .subscribe(ConnId(1), sub("b"), ReqId(2), big(300), true)
            .expect_err("past 64 KiB");
        assert!(refused.bytes > refused.limit);
        assert!(refused.to_string().starts_with("rate-limited:"));
        // Replacing a subscription counts only the new one; closing frees its bytes.
        reg.subscribe(ConnId(1), sub("a"), ReqId(3), big(250), true)
            .expect("replaces");
        reg.unsubscribe(ConnId(1), &sub("a"));
        reg.subscribe(ConnId(1), sub("b"), ReqId(4), big(300), true)
            .expect("room again");
        texts(&mut rx);
    }

    #[test]
    fn sent_ids_are_forgotten_after_the_window_without_another_event() {
        let (reg, _rx) = registry();
        let ev = Keys::generate().sign(1, Kind(1), vec![], "x");
        let sub = SubId::new("s").expect("valid");
        reg.subscribe(
            ConnId(1),
            sub.clone(),
            ReqId(1),
            vec![filter(serde_json::json!({"until": 5}))],
            false,
        )
        .expect("fits");
        let stored = StoredEvent {
            id: ev.id,
            json: shared::message::raw_json(ev.to_json()).expect("json"),
        };
        reg.stored(ConnId(1), ReqId(1), &sub, vec![stored], true);
        let remembered = |reg: &Registry| {
            let inner = reg.lock();
            match &inner.conns[&ConnId(1)].subs[&sub].phase {
                Phase::Live { seen, .. } => seen.len(),
                Phase::Stored { .. } => panic!("live after EOSE"),
            }
        };
        assert_eq!(remembered(&reg), 1);
        reg.expire(Instant::now() + Duration::from_secs(1));
        assert_eq!(remembered(&reg), 1, "within the window");
        reg.expire(Instant::now() + Duration::from_secs(6));
        assert_eq!(remembered(&reg), 0, "forgotten after it");
    }
}
