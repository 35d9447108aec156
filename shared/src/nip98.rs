//! NIP-98 HTTP authorization: a signed kind-27235 event, base64-encoded in an
//! `Authorization: Nostr <base64>` header, naming the request's URL, method and (as NIP-86
//! requires) the sha256 of its body.
//!
//! Pure functions: the caller says what the request was ([`Request`]), what time it is and
//! how far from it an authorization may be dated; nothing here reads a clock, a socket or
//! the configuration. The relay's management API (NIP-86) uses it; [`authorization`]
//! builds a header for clients and tests.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

use crate::event::{Event, Kind};

/// The NIP-98 event kind.
pub const HTTP_AUTH_KIND: Kind = Kind(27235);

/// How far an authorization event's `created_at` may be from now, in seconds: NIP-98's
/// suggestion, and the default of the gateway's setting.
pub const SUGGESTED_MAX_SKEW_SECS: u64 = 60;

/// Why an `Authorization` header was refused. Every one means HTTP 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No `Authorization` header, or not the `Nostr` scheme.
    #[error("missing `Authorization: Nostr <base64 event>` header")]
    Missing,
    /// The header is not base64 of an event's JSON.
    #[error("the authorization event is malformed: {0}")]
    Malformed(String),
    /// The event is not kind 27235.
    #[error("the authorization event must be kind 27235")]
    Kind,
    /// `created_at` is too far from now.
    #[error("the authorization event is older or newer than {max_skew_secs} seconds")]
    Stale {
        /// The window it is outside of.
        max_skew_secs: u64,
    },
    /// The `u` tag is not this request's URL.
    #[error("the authorization event's u tag is not this request's URL")]
    Url,
    /// The `method` tag is not this request's method.
    #[error("the authorization event's method tag is not this request's method")]
    Method,
    /// The `payload` tag is missing or is not the sha256 of the body.
    #[error("the authorization event's payload tag is not the sha256 of the body")]
    Payload,
    /// The id or signature does not verify.
    #[error("the authorization event's id or signature is invalid")]
    Signature,
}

/// The request an authorization event must name.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The request's absolute URL (compared after [`normalize_url`]).
    pub url: &'a str,
    /// The HTTP method, e.g. `POST` (compared case-insensitively).
    pub method: &'a str,
    /// The request body; its sha256 must be the `payload` tag.
    pub body: &'a [u8],
}

/// Checks an `Authorization` header value against `request` at time `now` (unix seconds),
/// accepting a `created_at` at most `max_skew_secs` from it, and returns the verified
/// authorization event (its `pubkey` is the signer; its signature, unique to each signing,
/// lets the caller refuse a second use within the window). The `payload` tag is required (NIP-86), even for an
/// empty body.
pub fn verify_header(
    header: Option<&str>,
    request: &Request<'_>,
    now: i64,
    max_skew_secs: u64,
) -> Result<Event, AuthError> {
    let event = parse_header(header.ok_or(AuthError::Missing)?)?;
    verify_event(&event, request, now, max_skew_secs)?;
    Ok(event)
}

/// Decodes `Nostr <base64 event JSON>` into a structurally valid event (not yet verified).
pub fn parse_header(header: &str) -> Result<Event, AuthError> {
    let (scheme, token) = header.trim().split_once(' ').ok_or(AuthError::Missing)?;
    if !scheme.eq_ignore_ascii_case("nostr") {
        return Err(AuthError::Missing);
    }
    let json = STANDARD
        .decode(token.trim())
        .map_err(|e| AuthError::Malformed(format!("not base64: {e}")))?;
    let json = String::from_utf8(json)
        .map_err(|_| AuthError::Malformed("the event is not UTF-8".into()))?;
    Event::from_json(&json).map_err(|e| AuthError::Malformed(e.to_string()))
}

/// NIP-98's checks, in its order, then the payload hash and the signature.
pub fn verify_event(
    event: &Event,
    request: &Request<'_>,
    now: i64,
    max_skew_secs: u64,
) -> Result<(), AuthError> {
    if event.kind != HTTP_AUTH_KIND {
        return Err(AuthError::Kind);
    }
    if !event.created_within(now, max_skew_secs) {
        return Err(AuthError::Stale { max_skew_secs });
    }
    let expected_url = normalize_url(request.url);
    let url_ok = single_tag(event, "u").is_some_and(|u| normalize_url(u) == expected_url);
    if !url_ok {
        return Err(AuthError::Url);
    }
    let method_ok =
        single_tag(event, "method").is_some_and(|m| m.eq_ignore_ascii_case(request.method));
    if !method_ok {
        return Err(AuthError::Method);
    }
    let payload = payload_hash(request.body);
    let payload_ok = single_tag(event, "payload").is_some_and(|p| p.eq_ignore_ascii_case(&payload));
    if !payload_ok {
        return Err(AuthError::Payload);
    }
    event.verify().map_err(|_| AuthError::Signature)
}

/// The value of the only tag named `name`; `None` when absent or repeated (an ambiguous
/// event authorizes nothing).
fn single_tag<'a>(event: &'a Event, name: &'a str) -> Option<&'a str> {
    let mut values = event.tag_values(name);
    let first = values.next()?;
    values.next().is_none().then_some(first)
}

/// Lowercase hex sha256 of a request body, as the `payload` tag carries it.
pub fn payload_hash(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// The HTTP URL of a relay whose WebSocket URL is `relay_url`: `ws://` becomes `http://`,
/// `wss://` becomes `https://`; other schemes are kept.
pub fn http_url(relay_url: &str) -> String {
    let url = relay_url.trim();
    match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("ws") => format!("http://{rest}"),
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("wss") => format!("https://{rest}"),
        _ => url.to_owned(),
    }
}

pub use crate::config::normalize_url;

/// A complete `Authorization` header value (`Nostr <base64>`) signed by `keys` for a request
/// to `url` with `method` and `body`, dated `now`. For clients, tools and tests.
pub fn authorization(
    keys: &crate::event::signing::Keys,
    url: &str,
    method: &str,
    body: &[u8],
    now: i64,
) -> String {
    let tags = vec![
        vec!["u".to_owned(), url.to_owned()],
        vec!["method".to_owned(), method.to_owned()],
        vec!["payload".to_owned(), payload_hash(body)],
    ];
    let event = keys.sign_fresh(now, HTTP_AUTH_KIND, tags, "");
    format!("Nostr {}", STANDARD.encode(event.to_json()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::signing::Keys;

    const URL: &str = "http://127.0.0.1:7777/";
    const BODY: &[u8] = br#"{"method":"supportedmethods","params":[]}"#;
    const NOW: i64 = 1_700_000_000;
    const WINDOW: u64 = SUGGESTED_MAX_SKEW_SECS;

    fn request() -> Request<'static> {
        Request {
            url: URL,
            method: "POST",
            body: BODY,
        }
    }

    fn signed(keys: &Keys, tags: Vec<Vec<String>>, kind: Kind, at: i64) -> String {
        let event = keys.sign(at, kind, tags, "");
        format!("Nostr {}", STANDARD.encode(event.to_json()))
    }

    fn tags(u: &str, method: &str, body: &[u8]) -> Vec<Vec<String>> {
        vec![
            vec!["u".into(), u.into()],
            vec!["method".into(), method.into()],
            vec!["payload".into(), payload_hash(body)],
        ]
    }

    #[test]
    fn a_correct_header_names_its_signer() {
        let keys = Keys::generate();
        let header = authorization(&keys, URL, "POST", BODY, NOW);
        assert_eq!(
            verify_header(Some(&header), &request(), NOW + 30, WINDOW).map(|e| e.pubkey),
            Ok(keys.pubkey())
        );
        // The window is the caller's: 90 s late is stale in 60 s and fine in 120 s.
        assert!(verify_header(Some(&header), &request(), NOW + 90, WINDOW).is_err());
        assert_eq!(
            verify_header(Some(&header), &request(), NOW + 90, 120).map(|e| e.pubkey),
            Ok(keys.pubkey())
        );
    }

    #[test]
    fn every_check_refuses() {
        let keys = Keys::generate();
        let check = |header: &str| verify_header(Some(header), &request(), NOW, WINDOW);
        assert_eq!(
            verify_header(None, &request(), NOW, WINDOW),
            Err(AuthError::Missing)
        );
        assert_eq!(check("Bearer abc"), Err(AuthError::Missing));
        assert!(matches!(check("Nostr ***"), Err(AuthError::Malformed(_))));
        let ok = tags(URL, "POST", BODY);
        assert_eq!(
            check(&signed(&keys, ok.clone(), Kind(1), NOW)),
            Err(AuthError::Kind)
        );
        assert_eq!(
            check(&signed(&keys, ok.clone(), HTTP_AUTH_KIND, NOW - 61)),
            Err(AuthError::Stale {
                max_skew_secs: WINDOW
            })
        );
        assert_eq!(
            check(&signed(&keys, ok.clone(), HTTP_AUTH_KIND, NOW + 61)),
            Err(AuthError::Stale {
                max_skew_secs: WINDOW
            })
        );
        assert_eq!(
            check(&signed(
                &keys,
                tags("http://other:7777/", "POST", BODY),
                HTTP_AUTH_KIND,
                NOW
            )),
            Err(AuthError::Url)
        );
        assert_eq!(
            check(&signed(&keys, tags(URL, "GET", BODY), HTTP_AUTH_KIND, NOW)),
            Err(AuthError::Method)
        );
        assert_eq!(
            check(&signed(
                &keys,
                tags(URL, "POST", b"{}"),
                HTTP_AUTH_KIND,
                NOW
            )),
            Err(AuthError::Payload)
        );
        let no_payload = ok[..2].to_vec();
        assert_eq!(
            check(&signed(&keys, no_payload, HTTP_AUTH_KIND, NOW)),
            Err(AuthError::Payload)
        );
        let mut twice = ok.clone();
        twice.push(vec!["u".into(), "http://evil/".into()]);
        assert_eq!(
            check(&signed(&keys, twice, HTTP_AUTH_KIND, NOW)),
            Err(AuthError::Url)
        );
    }

    #[test]
    fn a_tampered_event_fails_the_signature_check() {
        let keys = Keys::generate();
        let mut event = keys.sign(NOW, HTTP_AUTH_KIND, tags(URL, "POST", BODY), "");
        event.content = "changed".into();
        assert_eq!(
            verify_event(&event, &request(), NOW, WINDOW),
            Err(AuthError::Signature)
        );
    }

    #[test]
    fn urls_compare_normalized() {
        assert_eq!(
            normalize_url("HTTP://Relay.Example.com:80"),
            "http://relay.example.com/"
        );
        assert_eq!(
            normalize_url("https://relay.example.com:443/x?a=1#frag"),
            "https://relay.example.com/x?a=1"
        );
        assert_eq!(
            normalize_url("http://127.0.0.1:7777"),
            "http://127.0.0.1:7777/"
        );
        assert_ne!(normalize_url("http://a/x"), normalize_url("http://a/y"));
        assert_eq!(
            http_url("wss://relay.example.com"),
            "https://relay.example.com"
        );
        assert_eq!(http_url("ws://127.0.0.1:7777/"), "http://127.0.0.1:7777/");
        assert_eq!(http_url("https://x/"), "https://x/");
    }
}
