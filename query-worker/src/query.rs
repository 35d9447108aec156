//! The query batch handler: run each `REQ`'s filters, merge, stream back, end with EOSE; or
//! count for `COUNT`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

use std::time::{Duration, Instant};

use deadpool_postgres::Pool;

use shared::bus::{self, Entry, GatewayReply, QueryKind, QueryRequest, StoredEvent, TraceContext};
use shared::event::EventId;
use shared::filter::Filter;
use shared::message::raw_json;
use shared::store::StoreError;
use shared::worker::{Context, Handler};
use tracing::Instrument;

use crate::QueryConfig;
use shared::sql::{count_query, events_query};

/// The query worker's [`Handler`].
#[derive(Clone)]
pub struct Query {
    config: QueryConfig,
    /// Shared by every loop of this process.
    running: Running,
    /// Requests accepted and not answered yet (`ACCEPTED` permits).
    accepted: Arc<Semaphore>,
}

impl Query {
    /// A handler with these limits.
    pub fn new(config: QueryConfig) -> Self {
        Query {
            config,
            running: Running::default(),
            accepted: Arc::new(Semaphore::new(ACCEPTED)),
        }
    }
}

/// Requests of one address (one `cost_key`) this process runs at once: its slow queries
/// hold that many connections while everyone else's run beside them.
const PER_ADDRESS: usize = 2;

/// Requests a process holds at once, waiting for their address's turn or running; past it,
/// the loops stop reading until some are answered.
const ACCEPTED: usize = 1024;

/// Who runs a query now, by address: each address's semaphore, while anyone holds or waits
/// for it.
#[derive(Clone, Default)]
struct Running(Arc<Mutex<HashMap<String, Arc<Semaphore>>>>);

impl Running {
    /// Waits for one of `key`'s places; requests nobody pays for (`None`) never wait.
    async fn place(&self, key: Option<&str>) -> Option<Place> {
        let key = key?;
        let semaphore = Arc::clone(
            self.lock()
                .entry(key.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(PER_ADDRESS))),
        );
        // ok: the semaphore is never closed.
        let permit = Arc::clone(&semaphore).acquire_owned().await.ok()?;
        Some(Place {
            running: self.clone(),
            key: key.to_owned(),
            permit: Some(permit),
            semaphore,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Semaphore>>> {
        // A map of semaphores: a panic elsewhere leaves nothing half-updated in it.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A place among an address's running queries; dropping it frees the place, and the
/// address's entry once nobody else holds or waits for it.
struct Place {
    running: Running,
    key: String,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    semaphore: Arc<Semaphore>,
}

impl Drop for Place {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut running = self.running.lock();
        // Only the map's reference and this one are left: nobody holds or waits.
        if Arc::strong_count(&self.semaphore) == 2 {
            running.remove(&self.key);
        }
    }
}

/// What a stored event adds to a reply message besides its JSON (its id and separators).
const ENVELOPE_BYTES: usize = 96;

/// Why a request got no results.
enum Failure {
    /// Refused before it ran (too big, or its address's budget used up): the reason.
    Refused(String),
    /// It used up its database time (milliseconds).
    TimedOut(u64),
    /// Postgres failed.
    Store(StoreError),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}

impl Failure {
    /// The `error:` reason the client gets.
    fn reason(&self) -> String {
        match self {
            Failure::TimedOut(ms) => format!(
                "error: the query ran out of its {ms} ms of database time; ask for fewer events or narrower filters"
            ),
            Failure::Store(_) => "error: could not query the database".to_owned(),
            Failure::Refused(reason) => reason.clone(),
        }
    }

    fn log(&self, req: &QueryRequest) {
        match self {
            Failure::TimedOut(ms) => {
                metrics::counter!("nostr_query_timeouts_total", "kind" => req.kind.name())
                    .increment(1);
                tracing::warn!(sub = %req.sub_id, ms, "query ran out of time");
            }
            Failure::Store(e) => tracing::error!(error = %e, sub = %req.sub_id, "query failed"),
            Failure::Refused(_) => {}
        }
    }
}

/// What `run` comes to, unless the request was `refused` (then it never starts); a failure
/// as the reason the client gets, logged.
async fn unless_refused<T>(
    req: &QueryRequest,
    refused: Option<Failure>,
    run: impl std::future::Future<Output = Result<T, Failure>>,
) -> Result<T, String> {
    let result = match refused {
        Some(failure) => Err(failure),
        None => run.await,
    };
    result.map_err(|e| {
        e.log(req);
        e.reason()
    })
}

/// The rows of a request's filters so far, each event once.
#[derive(Default)]
struct Found {
    seen: HashSet<EventId>,
    rows: Vec<Row>,
}

impl Found {
    fn add(&mut self, rows: Vec<tokio_postgres::Row>) {
        for row in rows {
            let id_bytes: &[u8] = row.get(0);
            let Some(id) = EventId::from_slice(id_bytes) else {
                continue;
            };
            if self.seen.insert(id) {
                self.rows.push(Row {
                    id,
                    created_at: row.get(1),
                    json: row.get(2),
                });
            }
        }
    }
}

/// One stored row.
struct Row {
    id: EventId,
    created_at: i64,
    json: String,
}

/// `Some(rate-limited: reason)` when the address paying for `req` has used more than its
/// budget this window (the queries answered since this one was sent count).
async fn budget_used_up(
    redis: &mut redis::aio::ConnectionManager,
    req: &QueryRequest,
) -> Option<String> {
    let key = req.cost_key.as_ref().filter(|_| req.cost_limit_ms > 0)?;
    let used: Option<i64> = redis::AsyncCommands::get(redis, key).await.ok()?;
    let used = u64::try_from(used?).unwrap_or(0);
    (used > req.cost_limit_ms).then(|| {
        format!(
            "rate-limited: queries from your address used more than {} ms of database time this minute; slow down",
            req.cost_limit_ms
        )
    })
}

impl Handler for Query {
    /// Statements cut off at the query budget (`RELAY_QUERY_TIMEOUT_MS`).
    fn pool(&self, db: &shared::config::DatabaseConfig) -> Result<Pool, StoreError> {
        shared::store::read_pool(db, self.budget())
    }

    /// Waits (at most the query budget and a few seconds) for the requests still being
    /// answered.
    async fn drain(&self) {
        let wait = self.budget() + Duration::from_secs(5);
        let all = u32::try_from(ACCEPTED).unwrap_or(u32::MAX);
        if tokio::time::timeout(wait, self.accepted.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!("stopping with queries still unanswered");
        }
    }

    async fn handle(&mut self, ctx: &Context, entries: &[Entry]) -> redis::Pipeline {
        let requests = entries.iter().filter_map(|entry| {
            match entry.payload.as_deref().map(bus::decode::<QueryRequest>) {
                Some(Ok(req)) => {
                    let span =
                        shared::worker::process_span(entry, shared::bus::QUERY_GROUP, &req.trace);
                    span.record(
                        "nostr.subscription.id",
                        tracing::field::display(&req.sub_id),
                    );
                    span.record("nostr.query.kind", req.kind.name());
                    Some((req, span))
                }
                _ => {
                    tracing::warn!(entry = %entry.id, "dropping undecodable query entry");
                    None
                }
            }
        });
        // Each request is answered in a task of its own, so a slow one holds neither this
        // batch's other requests nor this loop: the batch is acknowledged once its requests
        // are accepted (a worker that dies loses the queries in hand; their gateways answer
        // `error:` at the reply timeout). At most ACCEPTED wait or run at once: past that,
        // the loop waits here before reading more.
        for (req, span) in requests {
            // ok: the semaphore is never closed.
            let Ok(permit) = Arc::clone(&self.accepted).acquire_owned().await else {
                continue;
            };
            let this = self.clone();
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let trace = TraceContext::of(&span);
                this.answer(&ctx, req, trace).instrument(span).await;
                drop(permit);
            });
        }
        // Each answer is sent by its task when ready.
        redis::pipe()
    }
}

impl Query {
    async fn answer(&self, ctx: &Context, req: QueryRequest, trace: TraceContext) {
        let channel = ctx.bus.gateway_channel(&req.gateway);
        let mut redis = ctx.redis.clone();
        let _place = self.running.place(req.cost_key.as_deref()).await;
        let started = Instant::now();
        // The gateway checked these already; a worker does not trust the bus with its time.
        // Nor does it run a query whose address used its database time up meanwhile.
        let refused = match self.config.limits.check(&req.filters) {
            Err(reason) => Some(reason),
            Ok(()) => budget_used_up(&mut redis, &req).await,
        }
        .map(Failure::Refused);
        // Database time, charged to the asking address: from a connection taken to the
        // answer (a negentropy round's whole time, its reconciliation included).
        let mut db_time = Duration::ZERO;
        let messages: Vec<String> = match &req.kind {
            QueryKind::Events => {
                let run = self.run_filters(&ctx.db, &req, &mut db_time);
                match unless_refused(&req, refused, run).await {
                    Ok(rows) => {
                        tracing::Span::current().record("nostr.results", rows.len());
                        self.chunks(&req, rows, trace)
                    }
                    Err(message) => vec![bus::encode(&GatewayReply::Closed {
                        conn: req.conn,
                        req: req.req,
                        sub_id: req.sub_id.clone(),
                        message,
                    })],
                }
            }
            QueryKind::Count => {
                let run = self.count(&ctx.db, &req, &mut db_time);
                let result = unless_refused(&req, refused, run).await;
                vec![bus::encode(&GatewayReply::Count {
                    conn: req.conn,
                    req: req.req,
                    query_id: req.sub_id.clone(),
                    result,
                })]
            }
            QueryKind::Negentropy { message } => {
                let result = match (refused, req.filters.first()) {
                    (Some(refusal), _) => Err(refusal.reason()),
                    (None, Some(filter)) => {
                        let max = self.config.neg_max_items;
                        let reconciled =
                            crate::neg::reconcile(&ctx.db, filter, &req.viewer, message, max).await;
                        db_time = started.elapsed();
                        reconciled
                    }
                    (None, None) => Err("invalid: NEG-OPEN needs one filter".to_owned()),
                };
                vec![bus::encode(&GatewayReply::Neg {
                    conn: req.conn,
                    req: req.req,
                    sub_id: req.sub_id.clone(),
                    result,
                })]
            }
        };
        let kind = req.kind.name();
        let spent = started.elapsed();
        metrics::histogram!("nostr_query_seconds", "kind" => kind).record(spent.as_secs_f64());
        metrics::counter!("nostr_query_requests_total", "kind" => kind).increment(1);
        let mut pipe = redis::pipe();
        for m in messages {
            pipe.publish(&channel, m).ignore();
        }
        // The database time used is charged to the asking address (the gateway's
        // query-time limit), less what the gateway reserved for it.
        if let Some(key) = &req.cost_key {
            let used = i64::try_from(db_time.as_millis())
                .unwrap_or(i64::MAX)
                .max(1);
            let reserved = i64::try_from(req.cost_reserved_ms).unwrap_or(i64::MAX);
            pipe.incr(key, used.saturating_sub(reserved)).ignore();
            pipe.expire(key, bus::COST_KEY_TTL_SECS).ignore();
        }
        let sent: redis::RedisResult<()> = pipe.query_async(&mut redis).await;
        if let Err(e) = sent {
            tracing::error!(error = %e, sub = %req.sub_id, "sending query results failed");
        }
    }

    /// The most database time one request may take.
    fn budget(&self) -> Duration {
        Duration::from_millis(self.config.query_timeout_ms)
    }

    /// Runs each filter and merges: duplicates dropped, newest first with ties by lowest id
    /// (for a search, the order of relevance is kept). Together they get the request's
    /// budget: Postgres cuts the first statement off at it, and each later one at what is
    /// left (`SET LOCAL`, in one read transaction). `db_time` is set to the time spent once
    /// a connection was taken (what the address is charged).
    async fn run_filters(
        &self,
        db: &Pool,
        req: &QueryRequest,
        db_time: &mut Duration,
    ) -> Result<Vec<Row>, Failure> {
        let runs: Vec<(&Filter, u64)> = req
            .filters
            .iter()
            .filter(|f| !f.is_empty_set())
            .map(|f| (f, self.config.limits.clamp(f.limit)))
            .filter(|(_, limit)| *limit > 0)
            .collect();
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        let mut client = db.get().await.map_err(StoreError::from)?;
        let started = Instant::now();
        let now = shared::unix_now();
        let mut found = Found::default();
        let result = async {
            let [(filter, limit)] = runs.as_slice() else {
                // Several filters share the budget inside one transaction.
                let tx = client.transaction().await.map_err(StoreError::from)?;
                for (i, (filter, limit)) in runs.iter().enumerate() {
                    let q = events_query(filter, &req.viewer, now, *limit as i64);
                    if i == 0 {
                        found.add(q.fetch(&tx).await.map_err(|e| self.failure(e))?);
                        continue;
                    }
                    let left = self.budget().saturating_sub(started.elapsed());
                    if left.is_zero() {
                        return Err(Failure::TimedOut(self.config.query_timeout_ms));
                    }
                    let set = format!("SET LOCAL statement_timeout = {}", left.as_millis().max(1));
                    // Polled together, the two go out in one round trip, the SET first.
                    let (timeout_set, fetched) = tokio::join!(tx.batch_execute(&set), q.fetch(&tx));
                    timeout_set.map_err(StoreError::from)?;
                    found.add(fetched.map_err(|e| self.failure(e))?);
                }
                tx.commit().await.map_err(StoreError::from)?;
                return Ok(());
            };
            let q = events_query(filter, &req.viewer, now, *limit as i64);
            found.add(q.fetch(&client).await.map_err(|e| self.failure(e))?);
            Ok(())
        }
        .await;
        *db_time = started.elapsed();
        result?;
        let mut rows = found.rows;
        if req.filters.iter().all(|f| f.search.is_none()) {
            rows.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        }
        Ok(rows)
    }

    /// Counts the events matching any filter; `db_time` as for [`Query::run_filters`].
    async fn count(
        &self,
        db: &Pool,
        req: &QueryRequest,
        db_time: &mut Duration,
    ) -> Result<u64, Failure> {
        let filters: Vec<_> = req.filters.iter().filter(|f| !f.is_empty_set()).collect();
        if filters.is_empty() {
            return Ok(0);
        }
        let client = db.get().await.map_err(StoreError::from)?;
        let started = Instant::now();
        let q = count_query(&filters, &req.viewer, shared::unix_now());
        let counted = async {
            let stmt = client.prepare_cached(&q.sql).await?;
            Ok::<i64, StoreError>(client.query_one(&stmt, &q.param_refs()).await?.get(0))
        };
        let counted = counted.await;
        *db_time = started.elapsed();
        let n = counted.map_err(|e| self.failure(e))?;
        Ok(n.max(0) as u64)
    }

    fn failure(&self, e: StoreError) -> Failure {
        if e.is_timeout() {
            Failure::TimedOut(self.config.query_timeout_ms)
        } else {
            Failure::Store(e)
        }
    }

    /// Splits the rows into reply messages; the last (possibly empty) one carries EOSE.
    fn chunks(&self, req: &QueryRequest, rows: Vec<Row>, trace: TraceContext) -> Vec<String> {
        let size = self.config.reply_chunk.max(1);
        let message = |events: Vec<StoredEvent>, eose: bool| {
            bus::encode(&GatewayReply::Events {
                conn: req.conn,
                req: req.req,
                sub_id: req.sub_id.clone(),
                events,
                eose,
                trace: if eose {
                    trace.clone()
                } else {
                    TraceContext::default()
                },
            })
        };
        // A chunk ends at `size` events or near `bus::MESSAGE_BYTES` (a larger event goes
        // alone), so no reply comes near Redis's pub/sub output buffer limit.
        let mut out = Vec::new();
        let mut chunk = Vec::new();
        let mut bytes = 0;
        for r in rows {
            let Ok(json) = raw_json(r.json) else { continue };
            let len = json.get().len() + ENVELOPE_BYTES;
            if !chunk.is_empty() && (chunk.len() >= size || bytes + len > bus::MESSAGE_BYTES) {
                out.push(message(std::mem::take(&mut chunk), false));
                bytes = 0;
            }
            bytes += len;
            chunk.push(StoredEvent { id: r.id, json });
        }
        out.push(message(chunk, true));
        out
    }
}
