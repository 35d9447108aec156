//! NIP-62 requests to vanish: which kind-62 events this relay must act on.
//!
//! A request addressed to this relay deletes everything its author published up to its
//! `created_at`, and the gift wraps addressed to them (the ingest worker's `write` module).
//! It is followed "regardless of the user's status": a banned or not-allowed pubkey, a kind
//! outside the allow list or a connection that did not authenticate can still vanish.

use crate::config::RelayUrls;
use crate::event::{Event, Kind};

/// The kind of a request to vanish.
pub const REQUEST_KIND: Kind = Kind(62);

/// The `relay` tag value that addresses every relay.
pub const ALL_RELAYS: &str = "ALL_RELAYS";

/// Whether `event` is a request to vanish addressed to this relay, whose public URLs are
/// `urls` when it has them: kind 62 with a `relay` tag naming this relay
/// ([`RelayUrls::names_this_relay`]) or [`ALL_RELAYS`]. Without a public URL only
/// [`ALL_RELAYS`] requests are.
pub fn is_addressed_here(event: &Event, urls: Option<&RelayUrls>) -> bool {
    event.kind == REQUEST_KIND
        && event
            .tag_values("relay")
            .any(|r| r == ALL_RELAYS || urls.is_some_and(|u| u.names_this_relay(r)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::signing::Keys;

    fn request(kind: u16, relay: &str) -> Event {
        let tags = vec![vec!["relay".to_owned(), relay.to_owned()]];
        Keys::generate().sign(1, Kind(kind), tags, "")
    }

    #[test]
    fn requests_name_this_relay_or_all_relays() {
        let urls = RelayUrls::parse("wss://relay.test").expect("valid");
        let here = Some(&urls);
        assert!(is_addressed_here(&request(62, "wss://RELAY.test/"), here));
        assert!(is_addressed_here(&request(62, "ALL_RELAYS"), here));
        assert!(is_addressed_here(&request(62, "ALL_RELAYS"), None));
        assert!(!is_addressed_here(&request(62, "wss://relay.test"), None));
        assert!(!is_addressed_here(&request(62, "wss://other.test"), here));
        assert!(!is_addressed_here(&request(62, "ws://relay.test"), here));
        assert!(!is_addressed_here(&request(62, "all_relays"), here));
        assert!(!is_addressed_here(&request(1, "ALL_RELAYS"), here));
    }
}
