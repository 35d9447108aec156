//! The ingest batch handler: decode, verify, store, answer, fan out.

use std::time::Instant;

use serde_json::value::RawValue;
use shared::bus::{
    self, ConnId, Entry, GatewayId, GatewayReply, IngestRequest, LiveEvent, TraceContext,
};
use shared::config::RelayUrls;
use shared::event::{Event, EventId, KindClass};
use shared::message::BIG_MESSAGE_BYTES;
use shared::moderation::{self, Current, is_admin_entry};
use shared::worker::{Context, Handler};
use tracing::Instrument;

use crate::write::{self, Outcome, Pending};

/// The ingest worker's [`Handler`].
#[derive(Clone)]
pub struct Ingest {
    /// This relay's host, for NIP-62 requests addressed to it.
    relay_urls: Option<RelayUrls>,
    /// How often the worker's `RELAY_PUBLIC_URL` is advertised (its heartbeat interval).
    heartbeat: std::time::Duration,
    purge_every: std::time::Duration,
    /// Most expired events deleted by one purge statement.
    purge_batch: i64,
    /// Most events stored in one transaction.
    store_batch_events: usize,
    /// The moderation state (NIP-86), followed from Redis.
    moderation: Current,
    redis_url: String,
}

impl Ingest {
    /// A handler for this configuration.
    pub fn new(config: &crate::Config) -> Self {
        Ingest {
            relay_urls: config.public.urls().ok().flatten(),
            purge_every: std::time::Duration::from_secs(config.expiry_purge_secs),
            heartbeat: std::time::Duration::from_millis(config.worker.heartbeat_ms.max(1)),
            purge_batch: config.expiry_purge_batch,
            store_batch_events: usize::from(config.store_batch_events),
            moderation: Current::default(),
            redis_url: config.bus.redis_url.clone(),
        }
    }
}

/// Deletes expired events every `every`, in bounded statements.
async fn purge_loop(db: deadpool_postgres::Pool, every: std::time::Duration, batch: i64) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        loop {
            match write::purge_expired(&db, shared::unix_now(), batch).await {
                Ok(n) if n > 0 => tracing::info!(purged = n, "deleted expired events"),
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "purging expired events failed");
                    break;
                }
            }
        }
    }
}

/// One event of the batch, with where its `OK` goes and the span that traces it.
struct Item {
    gateway: GatewayId,
    conn: ConnId,
    id: EventId,
    event: Result<Event, String>,
    /// The event JSON as the gateway serialized it (`Event::to_json`): stored and broadcast
    /// as is, never serialized or parsed again.
    json: Box<RawValue>,
    span: tracing::Span,
}

impl Handler for Ingest {
    /// Generic plans kept per connection: every statement takes a whole batch as arrays.
    fn pool(
        &self,
        db: &shared::config::DatabaseConfig,
    ) -> Result<deadpool_postgres::Pool, shared::store::StoreError> {
        shared::store::write_pool(db)
    }

    fn start(&mut self, ctx: &Context) {
        tokio::spawn(crate::admin::rebuild_snapshot(
            ctx.clone(),
            self.moderation.clone(),
        ));
        tokio::spawn(shared::bus::advertise_public_url(
            ctx.redis.clone(),
            ctx.bus.clone(),
            self.relay_urls
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            self.heartbeat,
        ));
        tokio::spawn(moderation::follow(
            self.moderation.clone(),
            ctx.redis.clone(),
            self.redis_url.clone(),
            ctx.bus.clone(),
        ));
        if !self.purge_every.is_zero() {
            tokio::spawn(purge_loop(
                ctx.db.clone(),
                self.purge_every,
                self.purge_batch,
            ));
        }
    }

    async fn handle(&mut self, ctx: &Context, entries: &[Entry]) -> redis::Pipeline {
        crate::admin::handle(ctx, &self.moderation, entries).await;
        // Light events are parsed, verified, stored and answered before any heavy one is
        // looked at, so a client's heavy events cannot hold up the events sharing their
        // batch; the batch's acknowledgement still waits for both.
        let (light, heavy): (Vec<Decoded>, Vec<Decoded>) = decode_all(entries)
            .into_iter()
            .partition(|(_, _, json, _)| json.get().len() <= BIG_MESSAGE_BYTES);
        let mut answers = redis::pipe();
        self.handle_events(ctx, light, &mut answers).await;
        if heavy.is_empty() {
            return answers;
        }
        if answers.cmd_iter().next().is_some() {
            let mut redis = ctx.redis.clone();
            match answers.query_async::<()>(&mut redis).await {
                Ok(()) => answers = redis::pipe(),
                // Kept, to go with the heavy events' answers before the acknowledgement.
                Err(e) => {
                    tracing::warn!(error = %e, "sending answers before the heavy events failed")
                }
            }
        }
        self.handle_events(ctx, heavy, &mut answers).await;
        answers
    }
}

impl Ingest {
    /// Verifies, checks and stores `decoded`; adds their answers and live copies to `pipe`.
    async fn handle_events(
        &self,
        ctx: &Context,
        decoded: Vec<Decoded>,
        pipe: &mut redis::Pipeline,
    ) {
        let mut items = verify_all(decoded).await;
        let mut replies = Replies::default();
        let moderation = self.moderation.get();
        items.retain(|item| {
            let refused = item
                .event
                .as_ref()
                .ok()
                .and_then(|ev| moderation.refuses(ev, self.relay_urls.as_ref()));
            let Some(reason) = refused else { return true };
            metrics::counter!("nostr_ingest_events_total", "outcome" => "blocked").increment(1);
            replies.ok(item, false, reason);
            false
        });
        // The items to store (by index) and what the store needs of each.
        let (indexes, pending): (Vec<usize>, Vec<Pending<'_>>) = items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| match &item.event {
                Ok(event) if event.class() != KindClass::Ephemeral => Some((
                    i,
                    Pending {
                        event,
                        json: item.json.get(),
                        vanish: shared::vanish::is_addressed_here(event, self.relay_urls.as_ref()),
                    },
                )),
                _ => None,
            })
            .unzip();
        let mut results: Vec<Option<StoreResult>> = (0..items.len()).map(|_| None).collect();
        for (indexes, chunk) in indexes
            .chunks(self.store_batch_events)
            .zip(pending.chunks(self.store_batch_events))
        {
            let stored = store_chunk(ctx, &items, indexes, chunk).await;
            for (&i, result) in indexes.iter().zip(stored) {
                results[i] = Some(result);
            }
        }
        for (item, stored) in items.iter().zip(results) {
            answer(item, stored, &mut replies);
        }
        replies.add_to(ctx, pipe);
    }
}

/// What storing one event came to.
type StoreResult = Result<Outcome, shared::store::StoreError>;

/// An event as it comes off the bus: where its `OK` goes, its JSON, its span.
type Decoded = (GatewayId, ConnId, Box<RawValue>, tracing::Span);

/// Adds the `OK` (and live copy) of one item: `stored` is its store result, `None` for
/// items that were not stored (invalid, ephemeral).
fn answer(item: &Item, stored: Option<StoreResult>, replies: &mut Replies) {
    let (outcome, accepted, message) = match (&item.event, stored) {
        (Err(reason), _) => ("invalid", false, format!("invalid: {reason}")),
        (Ok(ev), _) if ev.class() == KindClass::Ephemeral => {
            replies.live(item);
            ("ephemeral", true, String::new())
        }
        (Ok(_), None) => return,
        (Ok(_), Some(result)) => match result {
            Ok(Outcome::Stored) => {
                replies.live(item);
                ("stored", true, String::new())
            }
            Ok(Outcome::Duplicate) => (
                "duplicate",
                true,
                "duplicate: already have this event".into(),
            ),
            Ok(Outcome::Superseded) => (
                "superseded",
                false,
                "duplicate: a newer version of this replaceable event is already stored".into(),
            ),
            Ok(Outcome::Deleted) => (
                "deleted",
                false,
                "blocked: this event was deleted and may not be published again".into(),
            ),
            Ok(Outcome::Vanished) => (
                "vanished",
                false,
                "blocked: the author asked this relay to delete their events".into(),
            ),
            Ok(Outcome::VanishedNow) => ("vanish_request", true, String::new()),
            Err(e) => {
                item.span.in_scope(
                    || tracing::error!(error = %e, id = %item.id, "storing event failed"),
                );
                (
                    "error",
                    false,
                    "error: could not store the event; try again".into(),
                )
            }
        },
    };
    metrics::counter!("nostr_ingest_events_total", "outcome" => outcome).increment(1);
    item.span.record("nostr.outcome", outcome);
    item.span
        .in_scope(|| tracing::debug!(outcome, "event handled"));
    replies.ok(item, accepted, message);
}

/// Stores `chunk` (the items at `indexes`) in one transaction, traced by one span: a child
/// of the first event's trace, linked to the others.
async fn store_chunk(
    ctx: &Context,
    items: &[Item],
    indexes: &[usize],
    chunk: &[Pending<'_>],
) -> Vec<Result<Outcome, shared::store::StoreError>> {
    let Some(&first) = indexes.first() else {
        return Vec::new();
    };
    let span = shared::trace_span!(
        parent: &items[first].span,
        "INSERT events",
        otel.kind = "client",
        db.system.name = "postgresql",
        db.operation.name = "INSERT",
        db.collection.name = "events",
        db.operation.batch.size = chunk.len(),
    );
    for &i in &indexes[1..] {
        TraceContext::of(&items[i].span).link(&span);
    }
    let started = Instant::now();
    let results = write::store_batch(&ctx.db, chunk).instrument(span).await;
    metrics::histogram!("nostr_ingest_commit_seconds").record(started.elapsed().as_secs_f64());
    // Events per transaction: the group commit's size (a stream entry may carry many).
    metrics::histogram!("nostr_ingest_transaction_size").record(chunk.len() as f64);
    results
}

/// The events of every entry (one, or a gateway's batch), in order, each with the span
/// that continues its trace. Admin entries are handled elsewhere.
fn decode_all(entries: &[Entry]) -> Vec<Decoded> {
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let Some(payload) = entry.payload.as_deref() else {
            tracing::warn!(entry = %entry.id, "dropping ingest entry without payload");
            continue;
        };
        if is_admin_entry(payload) {
            continue;
        }
        for decoded in bus::decode_batch::<IngestRequest>(payload) {
            match decoded {
                Ok(req) => {
                    let span =
                        shared::worker::process_span(entry, shared::bus::INGEST_GROUP, &req.trace);
                    out.push((req.gateway, req.conn, req.event, span));
                }
                Err(e) => {
                    tracing::warn!(error = %e, entry = %entry.id, "dropping undecodable ingest request");
                }
            }
        }
    }
    out
}

/// Batches up to this many events are verified on the loop's own thread (at most about
/// 0.2 ms of work): handing a small batch to the blocking pool and back cost more in thread
/// switches than the verification itself.
const INLINE_VERIFY_MAX: usize = 4;

/// Parses and verifies every event, spreading the signature checks over the cores. A few
/// small events are done on the loop's own thread; a big one never is.
async fn verify_all(decoded: Vec<Decoded>) -> Vec<Item> {
    let small = decoded
        .iter()
        .all(|(_, _, json, _)| json.get().len() <= BIG_MESSAGE_BYTES);
    if small && decoded.len() <= INLINE_VERIFY_MAX {
        return decoded.into_iter().filter_map(verify_one).collect();
    }
    let mut items = Vec::new();
    for part in in_parallel(decoded, verify_one).await {
        match part {
            Ok(part) => items.extend(part.into_iter().flatten()),
            Err(e) => tracing::error!(error = %e, "verification task failed"),
        }
    }
    items
}

/// Runs `f` over `items` on the blocking pool, one chunk per core, keeping the order:
/// each chunk's results, or why its task failed. For signature checks, here and in
/// `relay-admin import`.
pub async fn in_parallel<T, R>(
    items: Vec<T>,
    f: impl Fn(T) -> R + Clone + Send + 'static,
) -> Vec<Result<Vec<R>, tokio::task::JoinError>>
where
    T: Send + 'static,
    R: Send + 'static,
{
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = items.len().div_ceil(threads).max(1);
    let mut rest = items;
    let mut tasks = Vec::new();
    while !rest.is_empty() {
        let tail = rest.split_off(chunk.min(rest.len()));
        let part = std::mem::replace(&mut rest, tail);
        let f = f.clone();
        tasks.push(tokio::task::spawn_blocking(move || {
            part.into_iter().map(f).collect::<Vec<R>>()
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await);
    }
    out
}

fn verify_one(
    (gateway, conn, json, span): (GatewayId, ConnId, Box<RawValue>, tracing::Span),
) -> Option<Item> {
    let _verify = shared::trace_span!(parent: &span, "verify").entered();
    match Event::from_json(json.get()) {
        Ok(event) => {
            span.record("nostr.event.id", tracing::field::display(event.id));
            span.record("nostr.event.kind", event.kind.0);
            let id = event.id;
            let started = Instant::now();
            let event = event.verify().map(|()| event).map_err(|e| e.to_string());
            metrics::histogram!("nostr_ingest_verify_seconds")
                .record(started.elapsed().as_secs_f64());
            drop(_verify);
            Some(Item {
                gateway,
                conn,
                id,
                event,
                json,
                span,
            })
        }
        Err(e) => {
            tracing::warn!(error = %e, "gateway forwarded an event that does not parse; dropping");
            None
        }
    }
}

/// Replies and live events of a batch, sent by the worker loop in one pipelined round trip
/// with the batch's acknowledgements: one message per channel, a JSON array of envelopes
/// (see `shared::bus`), so Redis and the gateways handle a message per batch, not per
/// event. Each envelope carries the trace context of its event's span.
#[derive(Default)]
struct Replies {
    /// Each gateway's `OK` replies.
    oks: std::collections::HashMap<GatewayId, bus::Batches>,
    /// Events for live subscriptions, on every gateway.
    live: bus::Batches,
}

impl Replies {
    fn ok(&mut self, item: &Item, accepted: bool, message: String) {
        let reply = GatewayReply::Ok {
            conn: item.conn,
            event_id: item.id,
            accepted,
            message,
            trace: TraceContext::of(&item.span),
        };
        self.oks
            .entry(item.gateway.clone())
            .or_default()
            .push(&reply);
    }

    fn live(&mut self, item: &Item) {
        self.live.push(&LiveEvent {
            event: item.json.clone(),
            trace: TraceContext::of(&item.span),
        });
    }

    /// The batch's messages: live events first, then the `OK`s, so a publisher subscribed
    /// to its own event sees it before its `OK`, as when each event was sent alone.
    fn add_to(self, ctx: &Context, pipe: &mut redis::Pipeline) {
        for live in self.live.finish() {
            pipe.publish(ctx.bus.live_channel(), live).ignore();
        }
        for (gateway, oks) in self.oks {
            let channel = ctx.bus.gateway_channel(&gateway);
            for oks in oks.finish() {
                pipe.publish(&channel, oks).ignore();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, payload: &str) -> Entry {
        Entry {
            stream: "t:ingest:0".into(),
            id: id.into(),
            payload: Some(payload.into()),
        }
    }

    fn request(conn: u64, event: &str) -> String {
        format!(r#"{{"gateway":"g","conn":{conn},"event":{event}}}"#)
    }

    #[test]
    fn entries_of_one_event_and_of_a_batch_decode_in_order() {
        let batch = format!(
            "[{},{},{}]",
            request(2, r#"{"n":2}"#),
            "{\"not\":\"a request\"}",
            request(3, r#"{"n":3}"#)
        );
        let entries = [
            entry("1-0", &request(1, r#"{"n":1}"#)),
            entry("2-0", &batch),
            entry("3-0", r#"{"admin":{}}"#),
        ];
        let decoded = decode_all(&entries);
        let got: Vec<(u64, &str)> = decoded
            .iter()
            .map(|(_, conn, event, _)| (conn.0, event.get()))
            .collect();
        // The undecodable request in the batch costs only itself; admin entries are
        // handled elsewhere.
        assert_eq!(
            got,
            vec![(1, r#"{"n":1}"#), (2, r#"{"n":2}"#), (3, r#"{"n":3}"#)]
        );
    }
}
