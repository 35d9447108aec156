//! `REQ`: register the subscription for live events first, then ask the query workers for
//! the stored ones. A `REQ` with an existing id replaces that subscription.

use shared::bus::{self, QueryRequest, ReqId, TraceContext};
use shared::filter::Filter;
use shared::message::SubId;

use crate::session::Session;

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
    pub async fn handle(self, session: &Session) {
        let state = &session.state;
        let req = ReqId(state.next_id());
        let query: Vec<Filter> = self
            .filters
            .iter()
            .filter(|f| f.limit != Some(0) && !f.is_empty_set())
            .cloned()
            .collect();
        let stored_done = query.is_empty();
        state.registry.subscribe(
            session.conn,
            self.sub_id.clone(),
            req,
            self.filters,
            stored_done,
        );
        if stored_done {
            return;
        }
        let request = QueryRequest {
            gateway: state.gateway.clone(),
            conn: session.conn,
            req,
            sub_id: self.sub_id.clone(),
            filters: query,
            trace: TraceContext::default(),
        };
        let stream = state.bus.query_stream(session.conn);
        let mut redis = state.redis.clone();
        if let Err(e) = bus::add_entry(&mut redis, &stream, &bus::encode(&request)).await {
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
