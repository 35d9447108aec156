//! `REQ`: register the subscription for live events first, then ask the query workers for
//! the stored ones. A `REQ` with an existing id replaces that subscription.

use shared::bus::{self, QueryKind, QueryRequest, ReqId, TraceContext};
use shared::filter::Filter;
use shared::message::{SubId, closed_frame};
use shared::telemetry::record_trace_id;
use tracing::{Instrument, field::Empty};

use crate::cmd::send_span;
use crate::policy;
use crate::ratelimit::{self, Limit, Reservation};
use crate::session::Session;

/// Refuses a `REQ` with `CLOSED`. A `REQ` replaces the subscription of the same id, and
/// `CLOSED` says it ended (NIP-01), so a refused one ends the old one too rather than leave
/// it delivering.
pub(crate) fn refuse(session: &Session, sub_id: &SubId, reason: &str) {
    session.state.registry.unsubscribe(session.conn, sub_id);
    session.send(closed_frame(sub_id, reason));
}

/// A client opening (or replacing) a subscription.
pub struct Subscribe {
    sub_id: SubId,
    filters: Vec<Filter>,
}

impl Subscribe {
    /// Wraps a parsed `REQ`.
    pub fn new(sub_id: SubId, filters: Vec<Filter>) -> Self {
        Subscribe { sub_id, filters }
    }

    /// Registers the subscription, then publishes the query. Filters with `limit: 0` (or
    /// that can match nothing) need no query; if none needs one, EOSE is sent at once.
    pub async fn handle(self, session: &mut Session) {
        let span = shared::trace_span!(
            "REQ",
            otel.kind = "server",
            nostr.subscription.id = %self.sub_id,
            nostr.filters = self.filters.len(),
            nostr.connection = session.conn.0,
            trace_id = Empty,
        );
        record_trace_id(&span);
        self.subscribe(session).instrument(span).await;
    }

    async fn subscribe(mut self, session: &mut Session) {
        let state = &session.state;
        // Filters with `limit: 0` (or matching nothing) need no query; `limit` only changes
        // by clamping in `admit`, never to or from 0.
        let stored_done = self
            .filters
            .iter()
            .all(|f| f.limit == Some(0) || f.is_empty_set());
        let admitted = admit(session, &self.sub_id, &mut self.filters, true, !stored_done);
        let reservation = match admitted.await {
            Ok(reservation) => reservation,
            Err(reason) => {
                refuse(session, &self.sub_id, &reason);
                return;
            }
        };
        let req = ReqId(state.next_id());
        let query: Vec<Filter> = self
            .filters
            .iter()
            .filter(|f| f.limit != Some(0) && !f.is_empty_set())
            .cloned()
            .collect();
        let registered = state.registry.subscribe(
            session.conn,
            self.sub_id.clone(),
            req,
            self.filters,
            stored_done,
        );
        if let Err(too_big) = registered {
            refuse(session, &self.sub_id, &too_big.to_string());
            ratelimit::give_back(state, reservation).await;
            return;
        }
        if stored_done {
            return;
        }
        let added = send_query(
            session,
            req,
            &self.sub_id,
            query,
            QueryKind::Events,
            session.viewer(),
            reservation,
        )
        .await;
        if let Err(e) = added {
            tracing::warn!(error = %e, sub = %self.sub_id, "cannot publish query");
            state.registry.close(
                session.conn,
                req,
                &self.sub_id,
                "error: the relay cannot answer queries right now; try again",
            );
        }
    }
}

/// The checks a `REQ` (`opens_subscription`) or `COUNT` passes before it goes on the bus:
/// id length, filter policy and limits, the subscription count, and the per-IP rate limit;
/// when it will `query`, the database time it reserves (see [`within_req_rate`]).
pub async fn admit(
    session: &Session,
    sub_id: &SubId,
    filters: &mut [Filter],
    opens_subscription: bool,
    query: bool,
) -> Result<Option<Reservation>, String> {
    let state = &session.state;
    policy::check_sub_id(session, sub_id)?;
    policy::check_query(session, filters)?;
    if opens_subscription {
        let max = state.config.limits.max_subscriptions;
        let open = state.registry.subscriptions(session.conn);
        if open >= max && !state.registry.has_subscription(session.conn, sub_id) {
            return Err(format!(
                "rate-limited: {open} subscriptions are open; the limit is {max}; close one first"
            ));
        }
    }
    within_req_rate(session, query).await
}

/// Counts one query message (`REQ`, `COUNT`, `NEG-OPEN`, `NEG-MSG`) against the per-IP
/// rate limit and, when it will `query` the workers, reserves database time on the
/// address's budget: the reservation goes with the query ([`send_query`]) or is given back.
/// Over either limit, `Err` holds the `rate-limited:` reason for the client.
pub async fn within_req_rate(
    session: &Session,
    query: bool,
) -> Result<Option<Reservation>, String> {
    let state = &session.state;
    let rate = &state.config.rate;
    let count = Limit::reqs_from_ip(session.ip, rate.reqs_per_ip);
    if !query {
        return match ratelimit::exceeded(state, vec![count]).await {
            Some(limit) => Err(limit.to_string()),
            None => Ok(None),
        };
    }
    let budget = Limit::query_time_from_ip(session.ip, rate.query_ms_per_ip, rate.query_reserve_ms);
    ratelimit::reserve(state, count, budget)
        .await
        .map_err(|limit| limit.to_string())
}

/// Puts a query on this connection's query stream shard, traced as a producer span, with
/// its database-time `reservation` for the worker to settle (given back when the query
/// cannot be sent).
pub async fn send_query(
    session: &Session,
    req: ReqId,
    sub_id: &SubId,
    filters: Vec<Filter>,
    kind: QueryKind,
    viewer: shared::bus::Viewer,
    reservation: Option<Reservation>,
) -> Result<(), bus::BusError> {
    let state = &session.state;
    let stream = state.bus.query_stream(session.conn);
    let send = send_span(&stream);
    let request = QueryRequest {
        gateway: state.gateway.clone(),
        conn: session.conn,
        req,
        sub_id: sub_id.clone(),
        filters,
        kind,
        viewer,
        trace: TraceContext::of(&send),
        cost_key: reservation.as_ref().map(|r| r.key.clone()),
        cost_reserved_ms: reservation.as_ref().map_or(0, |r| r.ms),
        cost_limit_ms: reservation.as_ref().map_or(0, |r| r.limit),
    };
    let mut redis = state.redis.clone();
    let added = bus::add_entry(&mut redis, &stream, &bus::encode(&request))
        .instrument(send)
        .await;
    if added.is_err() {
        ratelimit::give_back(state, reservation).await;
    }
    added
}
