//! `COUNT` (NIP-45): the same checks as a `REQ`, then one count from a query worker; the
//! answer is `["COUNT", id, {"count": n}]` or `CLOSED`.

use shared::bus::{QueryKind, ReqId};
use shared::filter::Filter;
use shared::message::{SubId, closed_frame};

use crate::cmd::req::{admit, send_query};
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
        let admitted = admit(session, &self.query_id, &mut self.filters, false, true);
        let reservation = match admitted.await {
            Ok(reservation) => reservation,
            Err(reason) => {
                session.send(closed_frame(&self.query_id, &reason));
                return;
            }
        };
        let state = &session.state;
        let req = ReqId(state.next_id());
        state
            .registry
            .expect_count(session.conn, req, self.query_id.clone());
        let added = send_query(
            session,
            req,
            &self.query_id,
            self.filters,
            QueryKind::Count,
            session.viewer(),
            reservation,
        )
        .await;
        if let Err(e) = added {
            tracing::warn!(error = %e, "cannot publish count query");
            let reason = "error: the relay cannot count right now; try again";
            let frame = closed_frame(&self.query_id, reason);
            state
                .registry
                .count(session.conn, req, self.query_id, frame);
        }
    }
}
