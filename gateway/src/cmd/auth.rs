//! `AUTH` (NIP-42): check the signed kind-22242 event against this connection's challenge
//! and this relay's URL, then treat its pubkey as authenticated for the connection.

use shared::event::Event;
use shared::message::ok_frame;

use crate::policy::AUTH_KIND;
use crate::session::Session;

/// A client authenticating.
pub struct Authenticate {
    event: Event,
}

impl Authenticate {
    /// Wraps a parsed AUTH event.
    pub fn new(event: Event) -> Self {
        Authenticate { event }
    }

    /// Verifies and records the authentication; answers `OK` either way.
    pub fn handle(self, session: &mut Session) {
        let id = self.event.id;
        match self.check(session) {
            Ok(()) => {
                session.authenticate(self.event.pubkey);
                session.send(ok_frame(&id, true, ""));
            }
            Err(reason) => session.send(ok_frame(&id, false, &reason)),
        }
    }

    fn check(&self, session: &Session) -> Result<(), String> {
        let ev = &self.event;
        if ev.kind != AUTH_KIND {
            return Err("invalid: an AUTH event must be of kind 22242".into());
        }
        let window = session.state.config.auth.auth_window_secs;
        if !ev.created_within(shared::unix_now(), window) {
            return Err(format!(
                "invalid: created_at must be within {window} seconds of now"
            ));
        }
        if ev.tag_values("challenge").next() != Some(session.challenge.as_str()) {
            return Err("invalid: the challenge does not match the one this relay sent".into());
        }
        let relay_ok = ev
            .tag_values("relay")
            .next()
            .is_some_and(|url| shared::config::relay_host(url) == session.relay_host);
        if !relay_ok {
            return Err("invalid: the relay tag does not name this relay".into());
        }
        ev.verify().map_err(|e| format!("invalid: {e}"))
    }
}
