//! `COUNT` (NIP-45): the same checks as a `REQ`, then one count from a query worker; the
//! answer is `["COUNT", id, {"count": n}]` or `CLOSED`.

use shared::bus::{self, QueryKind, QueryRequest, ReqId, TraceContext};
use shared::filter::Filter;
use shared::message::{SubId, closed_frame};
use tracing::Instrument;

use crate::cmd::req::{admit, send_span};
use crate::session::Session;

/// A client asking for a count.
pub struct Count {
    query_id: SubId,
    filters: Vec<Filter>,
}

impl Count {
    /// Wraps a parsed `COUNT`.
    pub fn new(query_id: SubId, filters: Vec<Filter>) -> Self {
        Count { query_id, filters }
    }

    /// Publishes the count query; the answer comes back through the reply channel.
    pub async fn handle(mut self, session: &mut Session) {
        if let Err(reason) = admit(session, &self.query_id, &mut self.filters, false).await {
            session.send(closed_frame(&self.query_id, &reason));
            return;
        }
        let state = &session.state;
        let stream = state.bus.query_stream(session.conn);
        let send = send_span(&stream);
        let request = QueryRequest {
            gateway: state.gateway.clone(),
            conn: session.conn,
            req: ReqId(state.next_id()),
            sub_id: self.query_id.clone(),
            filters: self.filters,
            kind: QueryKind::Count,
            viewer: session.viewer(),
            trace: TraceContext::of(&send),
        };
        let mut redis = state.redis.clone();
        state
            .registry
            .expect_count(session.conn, self.query_id.clone());
        let added = bus::add_entry(&mut redis, &stream, &bus::encode(&request))
            .instrument(send)
            .await;
        if let Err(e) = added {
            tracing::warn!(error = %e, "cannot publish count query");
            let reason = "error: the relay cannot count right now; try again";
            let frame = closed_frame(&self.query_id, reason);
            state.registry.count(session.conn, &self.query_id, frame);
        }
    }
}
