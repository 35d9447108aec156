//! The query batch handler: run each `REQ`'s filters, merge, stream back, end with EOSE; or
//! count for `COUNT`.

use std::collections::HashSet;

use std::time::Instant;

use deadpool_postgres::Pool;
use futures_util::future::join_all;
use shared::bus::{self, Entry, GatewayReply, QueryKind, QueryRequest, StoredEvent, TraceContext};
use shared::event::EventId;
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
}

impl Query {
    /// A handler with these limits.
    pub fn new(config: QueryConfig) -> Self {
        Query { config }
    }
}

/// One stored row.
struct Row {
    id: EventId,
    created_at: i64,
    json: String,
}

impl Handler for Query {
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
        join_all(requests.map(|(req, span)| {
            let trace = TraceContext::of(&span);
            self.answer(ctx, req, trace).instrument(span)
        }))
        .await;
        // Each answer was sent as soon as it was ready.
        redis::pipe()
    }
}

impl Query {
    async fn answer(&self, ctx: &Context, req: QueryRequest, trace: TraceContext) {
        let channel = ctx.bus.gateway_channel(&req.gateway);
        let mut redis = ctx.redis.clone();
        let started = Instant::now();
        let messages: Vec<String> = match &req.kind {
            QueryKind::Events => match self.run_filters(&ctx.db, &req).await {
                Ok(rows) => {
                    tracing::Span::current().record("nostr.results", rows.len());
                    self.chunks(&req, rows, trace)
                }
                Err(e) => {
                    tracing::error!(error = %e, sub = %req.sub_id, "query failed");
                    vec![bus::encode(&GatewayReply::Closed {
                        conn: req.conn,
                        req: req.req,
                        sub_id: req.sub_id.clone(),
                        message: "error: could not query the database".into(),
                    })]
                }
            },
            QueryKind::Count => {
                let result = self.count(&ctx.db, &req).await.map_err(|e| {
                    tracing::error!(error = %e, query = %req.sub_id, "count failed");
                    "error: could not count in the database".to_owned()
                });
                vec![bus::encode(&GatewayReply::Count {
                    conn: req.conn,
                    req: req.req,
                    query_id: req.sub_id.clone(),
                    result,
                })]
            }
            QueryKind::Negentropy { message } => {
                let result = match req.filters.first() {
                    Some(filter) => {
                        let max = self.config.neg_max_items;
                        crate::neg::reconcile(&ctx.db, filter, &req.viewer, message, max).await
                    }
                    None => Err("invalid: NEG-OPEN needs one filter".to_owned()),
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
        metrics::histogram!("nostr_query_seconds", "kind" => kind)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("nostr_query_requests_total", "kind" => kind).increment(1);
        let mut pipe = redis::pipe();
        for m in messages {
            pipe.publish(&channel, m).ignore();
        }
        let sent: redis::RedisResult<()> = pipe.query_async(&mut redis).await;
        if let Err(e) = sent {
            tracing::error!(error = %e, sub = %req.sub_id, "sending query results failed");
        }
    }

    /// Runs each filter and merges: duplicates dropped, newest first with ties by lowest id
    /// (for a search, the order of relevance is kept).
    async fn run_filters(&self, db: &Pool, req: &QueryRequest) -> Result<Vec<Row>, StoreError> {
        let client = db.get().await?;
        let now = shared::unix_now();
        let mut seen = HashSet::new();
        let mut rows = Vec::new();
        for filter in req.filters.iter().filter(|f| !f.is_empty_set()) {
            let limit = self.config.limits.clamp(filter.limit);
            if limit == 0 {
                continue;
            }
            let q = events_query(filter, &req.viewer, now, limit as i64);
            let found = q.fetch(&client).await?;
            for row in found {
                let id_bytes: &[u8] = row.get(0);
                let Some(id) = EventId::from_slice(id_bytes) else {
                    continue;
                };
                if seen.insert(id) {
                    rows.push(Row {
                        id,
                        created_at: row.get(1),
                        json: row.get(2),
                    });
                }
            }
        }
        if req.filters.iter().all(|f| f.search.is_none()) {
            rows.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        }
        Ok(rows)
    }

    /// Counts the events matching any filter.
    async fn count(&self, db: &Pool, req: &QueryRequest) -> Result<u64, StoreError> {
        let filters: Vec<_> = req.filters.iter().filter(|f| !f.is_empty_set()).collect();
        if filters.is_empty() {
            return Ok(0);
        }
        let client = db.get().await?;
        let q = count_query(&filters, &req.viewer, shared::unix_now());
        let stmt = client.prepare_cached(&q.sql).await?;
        let n: i64 = client.query_one(&stmt, &q.param_refs()).await?.get(0);
        Ok(n.max(0) as u64)
    }

    /// Splits the rows into reply messages; the last (possibly empty) one carries EOSE.
    fn chunks(&self, req: &QueryRequest, rows: Vec<Row>, trace: TraceContext) -> Vec<String> {
        let size = self.config.reply_chunk.max(1);
        let mut events: Vec<StoredEvent> = rows
            .into_iter()
            .filter_map(|r| {
                raw_json(r.json)
                    .ok()
                    .map(|json| StoredEvent { id: r.id, json })
            })
            .collect();
        let mut out = Vec::new();
        loop {
            let rest = events.split_off(size.min(events.len()));
            let chunk = std::mem::replace(&mut events, rest);
            let eose = events.is_empty();
            out.push(bus::encode(&GatewayReply::Events {
                conn: req.conn,
                req: req.req,
                sub_id: req.sub_id.clone(),
                events: chunk,
                eose,
                trace: if eose {
                    trace.clone()
                } else {
                    TraceContext::default()
                },
            }));
            if eose {
                return out;
            }
        }
    }
}
