//! `AUTH` (NIP-42): check the signed kind-22242 event against this connection's challenge
//! and this relay's URL, then treat its pubkey as authenticated for the connection.

use shared::event::Event;
use shared::message::ok_frame;

use crate::policy::AUTH_KIND;
use crate::ratelimit::{self, Limit};
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
    pub async fn handle(self, session: &mut Session) {
        let id = self.event.id;
        let state = &session.state;
        let limit = Limit::auths_from_ip(session.ip, state.config.rate.auths_per_ip);
        if let Some(limit) = ratelimit::exceeded(state, vec![limit]).await {
            session.send(ok_frame(&id, false, &limit.to_string()));
            return;
        }
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
        let Some(urls) = &session.state.relay_urls else {
            return Err(
                "restricted: this relay cannot authenticate anyone: its operator has not set its public URL"
                    .into(),
            );
        };
        if ev.kind != AUTH_KIND {
            return Err("invalid: an AUTH event must be of kind 22242".into());
        }
        let window = session.state.config.auth.auth_window_secs;
        if !ev.created_within(shared::unix_now(), window) {
            return Err(format!(
                "invalid: created_at must be within {window} seconds of now"
            ));
        }
        let max = session.state.config.auth.max_identities;
        if session.authed.len() as u64 >= max && !session.authed.contains(&ev.pubkey) {
            return Err(format!(
                "restricted: this connection is authenticated as {max} pubkeys; the limit is {max}"
            ));
        }
        if ev.tag_values("challenge").next() != Some(session.challenge.as_str()) {
            return Err("invalid: the challenge does not match the one this relay sent".into());
        }
        let relay_ok = ev
            .tag_values("relay")
            .next()
            .is_some_and(|url| urls.names_this_relay(url));
        if !relay_ok {
            return Err("invalid: the relay tag does not name this relay".into());
        }
        ev.verify().map_err(|e| format!("invalid: {e}"))
    }
}
