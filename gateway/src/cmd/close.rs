//! `CLOSE`: stop a subscription. NIP-01 defines no reply.

use shared::message::SubId;

use crate::session::Session;

/// A client ending a subscription.
pub struct Unsubscribe {
    sub_id: SubId,
}

impl Unsubscribe {
    /// Wraps a parsed `CLOSE`.
    pub fn new(sub_id: SubId) -> Self {
        Unsubscribe { sub_id }
    }

    /// Removes the subscription; unknown ids are ignored.
    pub fn handle(self, session: &mut Session) {
        session
            .state
            .registry
            .unsubscribe(session.conn, &self.sub_id);
    }
}
