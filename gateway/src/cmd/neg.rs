//! NIP-77 negentropy: `NEG-OPEN`, `NEG-MSG`, `NEG-CLOSE`. The gateway keeps each session's
//! filter (and viewer) in the registry; every round goes to the query workers, which answer
//! as a stateless responder. Each round gets `NEG-MSG` or `NEG-ERR` within the reply
//! timeout; a session the client leaves idle is ended with `NEG-ERR closed:`.

use shared::bus::{QueryKind, ReqId, Viewer};
use shared::filter::Filter;
use shared::message::{NegMessage, SubId, neg_err_frame};

use crate::cmd::req::{admit, send_query, within_req_rate};
use crate::ratelimit::{self, Reservation};
use crate::session::Session;

/// A client's negentropy message.
pub enum Negentropy {
    /// `NEG-OPEN`: start (or restart) a session.
    Open {
        /// The session id.
        sub_id: SubId,
        /// Which events take part.
        filter: Box<Filter>,
        /// The initiator's first message.
        message: NegMessage,
    },
    /// `NEG-MSG`: the next round of an open session.
    Msg {
        /// The session id.
        sub_id: SubId,
        /// The initiator's message.
        message: NegMessage,
    },
    /// `NEG-CLOSE`: the client is done.
    Close(SubId),
}

impl Negentropy {
    /// The verb, for metrics and logs.
    pub fn verb(&self) -> &'static str {
        match self {
            Negentropy::Open { .. } => "NEG-OPEN",
            Negentropy::Msg { .. } => "NEG-MSG",
            Negentropy::Close(_) => "NEG-CLOSE",
        }
    }

    /// Opens a session or runs a round; `NEG-CLOSE` just forgets the session (no reply).
    pub async fn handle(self, session: &mut Session) {
        match self {
            Negentropy::Open {
                sub_id,
                filter,
                message,
            } => open(session, sub_id, *filter, message).await,
            Negentropy::Msg { sub_id, message } => round(session, sub_id, message).await,
            Negentropy::Close(sub_id) => session.state.registry.neg_close(session.conn, &sub_id),
        }
    }
}

/// `NEG-OPEN`: the same checks as a `REQ` (filter policy, id length, rate limit), then the
/// session limit; the session is registered before its first round goes on the bus.
async fn open(session: &mut Session, sub_id: SubId, filter: Filter, message: NegMessage) {
    let mut filters = [filter];
    let reservation = match admit(session, &sub_id, &mut filters, false, true).await {
        Ok(reservation) => reservation,
        Err(reason) => {
            // Including a session of the same id this would have replaced.
            end(session, &sub_id, &reason);
            return;
        }
    };
    let [filter] = filters;
    let state = &session.state;
    let req = ReqId(state.next_id());
    let viewer = session.viewer();
    let opened = state.registry.neg_open(
        session.conn,
        sub_id.clone(),
        filter.clone(),
        viewer.clone(),
        req,
    );
    if let Err(refused) = opened {
        session.send(neg_err_frame(&sub_id, &refused.to_string()));
        ratelimit::give_back(state, reservation).await;
        return;
    }
    publish(session, sub_id, req, filter, viewer, message, reservation).await;
}

/// Refuses with `NEG-ERR` and closes the session of that id: after a `NEG-ERR` it is over
/// (NIP-77); the client may open it again later.
pub(crate) fn end(session: &Session, sub_id: &SubId, reason: &str) {
    session.state.registry.neg_close(session.conn, sub_id);
    session.send(neg_err_frame(sub_id, reason));
}

/// `NEG-MSG`: the next round of an open session, against the filter it was opened with.
async fn round(session: &mut Session, sub_id: SubId, message: NegMessage) {
    let state = &session.state;
    let reservation = match within_req_rate(session, true).await {
        Ok(reservation) => reservation,
        Err(reason) => {
            end(session, &sub_id, &reason);
            return;
        }
    };
    let req = ReqId(state.next_id());
    let Some((filter, viewer)) = state.registry.neg_round(session.conn, &sub_id, req) else {
        session.send(neg_err_frame(
            &sub_id,
            "closed: no negentropy session with this id; send NEG-OPEN first",
        ));
        ratelimit::give_back(state, reservation).await;
        return;
    };
    publish(session, sub_id, req, filter, viewer, message, reservation).await;
}

/// Puts one round on the query stream; when Redis refuses, the session ends with `error:`.
async fn publish(
    session: &Session,
    sub_id: SubId,
    req: ReqId,
    filter: Filter,
    viewer: Viewer,
    message: NegMessage,
    reservation: Option<Reservation>,
) {
    let state = &session.state;
    let kind = QueryKind::Negentropy { message };
    let added = send_query(
        session,
        req,
        &sub_id,
        vec![filter],
        kind,
        viewer,
        reservation,
    )
    .await;
    if let Err(e) = added {
        tracing::warn!(error = %e, sub = %sub_id, "cannot publish negentropy round");
        let reason = "error: the relay cannot reconcile right now; try again".to_owned();
        state
            .registry
            .neg_reply(session.conn, req, &sub_id, Err(reason));
    }
}
