//! NIP-01 messages: client → relay parsing, relay → client serialization (and parsing, for
//! clients such as the tests and the load generator).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::event::{Event, EventError, EventId, ExactEvent};
use crate::filter::{Filter, FilterError};

/// A subscription id: a non-empty string of at most 64 characters (NIP-01).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct SubId(String);

/// The NIP-01 maximum length of a subscription id, in characters.
pub const MAX_SUB_ID_CHARS: usize = 64;

impl SubId {
    /// Checks the NIP-01 rules: non-empty, at most 64 characters.
    pub fn new(s: impl Into<String>) -> Result<Self, MessageError> {
        let s = s.into();
        if s.is_empty() || s.chars().count() > MAX_SUB_ID_CHARS {
            return Err(MessageError::BadSubId);
        }
        Ok(SubId(s))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for SubId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        SubId::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for SubId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SubId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SubId({:?})", self.0)
    }
}

/// A message from a client: the verbs of NIP-01, NIP-42 and NIP-45.
#[derive(Debug, Clone)]
pub enum ClientMessage {
    /// `["EVENT", <event>]`: publish.
    Event(Box<Event>),
    /// `["REQ", <sub_id>, <filter>...]`: query and subscribe.
    Req {
        /// The subscription id, unique per connection.
        sub_id: SubId,
        /// One or more filters, ORed.
        filters: Vec<Filter>,
    },
    /// `["CLOSE", <sub_id>]`: stop a subscription.
    Close(SubId),
    /// `["AUTH", <signed kind-22242 event>]`: NIP-42 authentication.
    Auth(Box<Event>),
    /// `["COUNT", <query_id>, <filter>...]`: NIP-45 count of matching events.
    Count {
        /// The query id (same rules as a subscription id).
        query_id: SubId,
        /// One or more filters, ORed.
        filters: Vec<Filter>,
    },
    /// `["NEG-OPEN", <sub_id>, <filter>, <hex message>]`: NIP-77, start a reconciliation.
    NegOpen {
        /// The negentropy subscription id (a namespace apart from `REQ` ids).
        sub_id: SubId,
        /// Which events take part.
        filter: Box<Filter>,
        /// The initiator's first message (checked to be hex).
        message: NegMessage,
    },
    /// `["NEG-MSG", <sub_id>, <hex message>]`: NIP-77, the next round.
    NegMsg {
        /// The negentropy subscription id.
        sub_id: SubId,
        /// The initiator's message (checked to be hex).
        message: NegMessage,
    },
    /// `["NEG-CLOSE", <sub_id>]`: NIP-77, the client is done.
    NegClose(SubId),
}

/// A negentropy (NIP-77) message as it travels: non-empty, even-length hex, lowercase.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct NegMessage(String);

impl NegMessage {
    /// Checks that `s` is non-empty hex of whole bytes; keeps it lowercased.
    pub fn from_hex(s: &str) -> Result<Self, &'static str> {
        if s.is_empty() {
            return Err("negentropy message is empty");
        }
        if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("negentropy message must be hex-encoded bytes");
        }
        Ok(NegMessage(s.to_ascii_lowercase()))
    }

    /// Encodes message bytes; refused only when empty, like [`NegMessage::from_hex`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, &'static str> {
        if bytes.is_empty() {
            return Err("negentropy message is empty");
        }
        Ok(NegMessage(hex::encode(bytes)))
    }

    /// The hex text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The message bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        // The constructor admits only whole bytes of hex digits; decoding cannot fail.
        hex::decode(&self.0).unwrap_or_default()
    }
}

impl<'de> Deserialize<'de> for NegMessage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        NegMessage::from_hex(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for NegMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NegMessage({} bytes)", self.0.len() / 2)
    }
}

/// Why a client message was refused. [`MessageError::prefix`] gives the NIP-01 prefix; the
/// gateway answers with `OK false` when an event id is known, `CLOSED` when a subscription
/// id is known, and `NOTICE` otherwise.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// Not parseable as JSON.
    #[error("could not parse message as JSON: {0}")]
    NotJson(String),
    /// JSON, but not an array starting with a string verb.
    #[error("message must be a JSON array starting with a command name")]
    NotCommand,
    /// A verb this relay does not implement.
    #[error("unknown command {0:?}")]
    UnknownVerb(String),
    /// The subscription id is missing, not a string, empty, or longer than 64 characters.
    #[error("subscription id must be a string of 1 to 64 characters")]
    BadSubId,
    /// An `EVENT` message with a malformed event.
    #[error("{error}")]
    BadEvent {
        /// The event id, when the message carried a readable one (so `OK false` can be sent).
        id: Option<EventId>,
        /// What is wrong with the event.
        error: EventError,
    },
    /// A `REQ` or `COUNT` with a malformed filter.
    #[error("{error}")]
    BadFilter {
        /// `REQ` or `COUNT`.
        verb: &'static str,
        /// The subscription id (already checked).
        sub_id: SubId,
        /// What is wrong with the filter.
        error: FilterError,
    },
    /// A `NEG-OPEN` or `NEG-MSG` (NIP-77) whose subscription id is readable but whose filter
    /// or message is not; answered with `NEG-ERR`.
    #[error("{detail}")]
    BadNeg {
        /// The negentropy subscription id (already checked).
        sub_id: SubId,
        /// The NIP-01 prefix.
        prefix: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A `REQ` or `COUNT` whose id is readable but which has no filter; answered with
    /// `CLOSED`, as NIP-01 and NIP-45 want for every refused one.
    #[error("{verb} expects an id and at least one filter")]
    NoFilter {
        /// `REQ` or `COUNT`.
        verb: &'static str,
        /// The subscription id (already checked).
        sub_id: SubId,
    },
    /// A message with the wrong number of elements for its verb.
    #[error("{verb} expects {expected}")]
    BadArity {
        /// The verb.
        verb: &'static str,
        /// What it expects.
        expected: &'static str,
    },
}

impl MessageError {
    /// The NIP-01 machine-readable prefix.
    pub fn prefix(&self) -> &'static str {
        match self {
            MessageError::BadFilter { error, .. } => error.prefix(),
            MessageError::BadNeg { prefix, .. } => prefix,
            MessageError::UnknownVerb(_) => "unsupported",
            _ => "invalid",
        }
    }

    /// `"<prefix>: <message>"`, ready for `OK`, `CLOSED` or `NOTICE`.
    pub fn reason(&self) -> String {
        format!("{}: {}", self.prefix(), self)
    }
}

/// The event id of a frame that is not valid JSON but starts like an `EVENT` or `AUTH`
/// message (a raw control character in a string, say): the first `"id"` key outside an
/// escape, followed by 64 lowercase hex characters in quotes.
fn readable_event_id(text: &str) -> Option<EventId> {
    let rest = text.trim_start().strip_prefix('[')?.trim_start();
    let rest = rest
        .strip_prefix("\"EVENT\"")
        .or_else(|| rest.strip_prefix("\"AUTH\""))?;
    let mut from = 0;
    while let Some(at) = rest[from..].find("\"id\"") {
        let start = from + at;
        from = start + 4;
        if rest[..start].ends_with('\\') {
            continue;
        }
        let value = rest[from..].trim_start().strip_prefix(':')?.trim_start();
        let hex = value.strip_prefix('"')?.get(..64)?;
        if value[1 + 64..].starts_with('"') {
            return EventId::from_hex(hex).ok();
        }
        return None;
    }
    None
}

/// A client message (or one event's JSON) past this many bytes costs much more than a note
/// to parse, verify and store (thousands of tags, filters of thousands of values): the
/// gateway parses such frames on the blocking pool, and the ingest worker handles such
/// events after the light ones of their batch.
pub const BIG_MESSAGE_BYTES: usize = 16 * 1024;

impl ClientMessage {
    /// Parses one client text frame.
    pub fn parse(text: &str) -> Result<Self, MessageError> {
        // The usual frame, a well-formed EVENT with exactly NIP-01's fields, is read
        // straight into its event without building a JSON tree first. Anything else, errors
        // included, takes the general path below, so its answer does not depend on this
        // shortcut.
        if let Ok((verb, ExactEvent(event))) = serde_json::from_str::<(&str, ExactEvent)>(text)
            && matches!(verb, "EVENT" | "AUTH")
        {
            let event = Box::new(event);
            return Ok(if verb == "EVENT" {
                ClientMessage::Event(event)
            } else {
                ClientMessage::Auth(event)
            });
        }
        let value: Value = serde_json::from_str(text).map_err(|e| {
            let detail = crate::event::clip(&e.to_string());
            // An EVENT (or AUTH) whose id can still be read is answered with `OK false`,
            // which a client waits for, rather than a NOTICE it may not show.
            match readable_event_id(text) {
                Some(id) => MessageError::BadEvent {
                    id: Some(id),
                    error: crate::event::EventError::Malformed(format!("not valid JSON: {detail}")),
                },
                None => MessageError::NotJson(detail),
            }
        })?;
        let Value::Array(mut items) = value else {
            return Err(MessageError::NotCommand);
        };
        let verb = match items.first() {
            Some(Value::String(v)) => v.clone(),
            _ => return Err(MessageError::NotCommand),
        };
        match verb.as_str() {
            "EVENT" | "AUTH" => {
                if items.len() != 2 {
                    return Err(MessageError::BadArity {
                        verb: if verb == "EVENT" { "EVENT" } else { "AUTH" },
                        expected: "one event object",
                    });
                }
                let raw = items.pop().unwrap_or(Value::Null);
                let id = raw
                    .get("id")
                    .and_then(Value::as_str)
                    .and_then(|s| EventId::from_hex(s).ok());
                let event = Event::from_value(raw)
                    .map(Box::new)
                    .map_err(|error| MessageError::BadEvent { id, error })?;
                Ok(if verb == "EVENT" {
                    ClientMessage::Event(event)
                } else {
                    ClientMessage::Auth(event)
                })
            }
            "REQ" | "COUNT" => {
                let sub_id = sub_id_at(&items)?;
                let verb = if verb == "REQ" { "REQ" } else { "COUNT" };
                if items.len() < 3 {
                    return Err(MessageError::NoFilter { verb, sub_id });
                }
                let filters = items[2..]
                    .iter()
                    .map(Filter::from_value)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|error| MessageError::BadFilter {
                        verb,
                        sub_id: sub_id.clone(),
                        error,
                    })?;
                Ok(if verb == "REQ" {
                    ClientMessage::Req { sub_id, filters }
                } else {
                    ClientMessage::Count {
                        query_id: sub_id,
                        filters,
                    }
                })
            }
            "CLOSE" => {
                let sub_id = sub_id_at(&items)?;
                if items.len() != 2 {
                    return Err(MessageError::BadArity {
                        verb: "CLOSE",
                        expected: "exactly one subscription id",
                    });
                }
                Ok(ClientMessage::Close(sub_id))
            }
            "NEG-OPEN" | "NEG-MSG" | "NEG-CLOSE" => parse_neg(&verb, &items),
            _ => Err(MessageError::UnknownVerb(truncate(&verb, 32))),
        }
    }
}

/// `NEG-OPEN`, `NEG-MSG` and `NEG-CLOSE` (NIP-77). Once the subscription id is readable,
/// refusals carry it, so the client gets `NEG-ERR` for that id.
fn parse_neg(verb: &str, items: &[Value]) -> Result<ClientMessage, MessageError> {
    let sub_id = sub_id_at(items)?;
    let bad = |prefix, detail: String| MessageError::BadNeg {
        sub_id: sub_id.clone(),
        prefix,
        detail,
    };
    let message_at = |i: usize| match items.get(i) {
        Some(Value::String(s)) => NegMessage::from_hex(s).map_err(|e| bad("invalid", e.to_owned())),
        _ => Err(bad(
            "invalid",
            "negentropy message must be a hex string".into(),
        )),
    };
    match verb {
        "NEG-OPEN" => {
            if items.len() != 4 {
                return Err(bad(
                    "invalid",
                    "NEG-OPEN expects an id, one filter and a message".into(),
                ));
            }
            let filter =
                Filter::from_value(&items[2]).map_err(|e| bad(e.prefix(), e.to_string()))?;
            Ok(ClientMessage::NegOpen {
                sub_id: sub_id.clone(),
                filter: Box::new(filter),
                message: message_at(3)?,
            })
        }
        "NEG-MSG" => {
            if items.len() != 3 {
                return Err(bad("invalid", "NEG-MSG expects an id and a message".into()));
            }
            Ok(ClientMessage::NegMsg {
                sub_id: sub_id.clone(),
                message: message_at(2)?,
            })
        }
        _ => {
            if items.len() != 2 {
                return Err(MessageError::BadArity {
                    verb: "NEG-CLOSE",
                    expected: "exactly one subscription id",
                });
            }
            Ok(ClientMessage::NegClose(sub_id))
        }
    }
}

fn sub_id_at(items: &[Value]) -> Result<SubId, MessageError> {
    match items.get(1) {
        Some(Value::String(s)) => SubId::new(s.as_str()),
        _ => Err(MessageError::BadSubId),
    }
}

/// At most `max` characters of `s`, so error messages never echo a huge input back.
fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// A message from the relay. The gateway builds frames with the `*_frame` functions (no
/// intermediate value); clients parse frames with [`RelayMessage::parse`].
#[derive(Debug, Clone)]
pub enum RelayMessage {
    /// `["EVENT", <sub_id>, <event>]`.
    Event {
        /// The subscription.
        sub_id: String,
        /// The event.
        event: Box<Event>,
    },
    /// `["OK", <event_id>, <accepted>, <message>]`.
    Ok {
        /// The event id answered.
        event_id: String,
        /// Whether the event was accepted.
        accepted: bool,
        /// Empty, or `prefix: text`.
        message: String,
    },
    /// `["EOSE", <sub_id>]`.
    Eose(String),
    /// `["CLOSED", <sub_id>, <message>]`.
    Closed {
        /// The subscription.
        sub_id: String,
        /// `prefix: text`.
        message: String,
    },
    /// `["NOTICE", <message>]`.
    Notice(String),
    /// `["AUTH", <challenge>]`.
    Auth(String),
    /// `["COUNT", <query_id>, {"count": <n>}]`.
    Count {
        /// The query id.
        query_id: String,
        /// The count.
        count: u64,
    },
}

impl RelayMessage {
    /// Parses a relay frame (for clients). Returns `None` for anything not NIP-01 shaped.
    pub fn parse(text: &str) -> Option<Self> {
        let items: Vec<Value> = serde_json::from_str(text).ok()?;
        let s = |i: usize| items.get(i).and_then(Value::as_str).map(str::to_owned);
        match items.first()?.as_str()? {
            "EVENT" => Some(RelayMessage::Event {
                sub_id: s(1)?,
                event: Box::new(Event::from_value(items.get(2)?.clone()).ok()?),
            }),
            "OK" => Some(RelayMessage::Ok {
                event_id: s(1)?,
                accepted: items.get(2)?.as_bool()?,
                message: s(3)?,
            }),
            "EOSE" => Some(RelayMessage::Eose(s(1)?)),
            "CLOSED" => Some(RelayMessage::Closed {
                sub_id: s(1)?,
                message: s(2)?,
            }),
            "NOTICE" => Some(RelayMessage::Notice(s(1)?)),
            "AUTH" => Some(RelayMessage::Auth(s(1)?)),
            "COUNT" => Some(RelayMessage::Count {
                query_id: s(1)?,
                count: items.get(2)?.get("count")?.as_u64()?,
            }),
            _ => None,
        }
    }
}

fn json_string(s: &str) -> String {
    // ok: serializing a &str cannot fail.
    serde_json::to_string(s).expect("string serializes")
}

/// `["EVENT",<sub_id>,<event_json>]`, where `event_json` is the stored JSON, copied verbatim.
pub fn event_frame(sub_id: &SubId, event_json: &str) -> String {
    let sub = json_string(sub_id.as_str());
    let mut out = String::with_capacity(12 + sub.len() + event_json.len());
    out.push_str("[\"EVENT\",");
    out.push_str(&sub);
    out.push(',');
    out.push_str(event_json);
    out.push(']');
    out
}

/// `["OK",<event_id>,<accepted>,<message>]`.
pub fn ok_frame(event_id: &EventId, accepted: bool, message: &str) -> String {
    format!(
        "[\"OK\",\"{}\",{},{}]",
        event_id,
        accepted,
        json_string(message)
    )
}

/// `["EOSE",<sub_id>]`.
pub fn eose_frame(sub_id: &SubId) -> String {
    format!("[\"EOSE\",{}]", json_string(sub_id.as_str()))
}

/// `["CLOSED",<sub_id>,<message>]`.
pub fn closed_frame(sub_id: &SubId, message: &str) -> String {
    format!(
        "[\"CLOSED\",{},{}]",
        json_string(sub_id.as_str()),
        json_string(message)
    )
}

/// `["NOTICE",<message>]`.
pub fn notice_frame(message: &str) -> String {
    format!("[\"NOTICE\",{}]", json_string(message))
}

/// `["AUTH",<challenge>]`.
pub fn auth_frame(challenge: &str) -> String {
    format!("[\"AUTH\",{}]", json_string(challenge))
}

/// `["COUNT",<query_id>,{"count":<n>}]`.
pub fn count_frame(query_id: &SubId, count: u64) -> String {
    format!(
        "[\"COUNT\",{},{{\"count\":{count}}}]",
        json_string(query_id.as_str())
    )
}

/// `["NEG-MSG",<sub_id>,<hex message>]` (NIP-77).
pub fn neg_msg_frame(sub_id: &SubId, message: &NegMessage) -> String {
    format!(
        "[\"NEG-MSG\",{},\"{}\"]",
        json_string(sub_id.as_str()),
        message.as_str()
    )
}

/// `["NEG-ERR",<sub_id>,<reason>]` (NIP-77); the subscription is over.
pub fn neg_err_frame(sub_id: &SubId, reason: &str) -> String {
    format!(
        "[\"NEG-ERR\",{},{}]",
        json_string(sub_id.as_str()),
        json_string(reason)
    )
}

/// Checks that a stored event's JSON is a JSON value, for wrapping in bus envelopes.
pub fn raw_json(text: String) -> Result<Box<RawValue>, serde_json::Error> {
    RawValue::from_string(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Kind, signing::Keys};

    #[test]
    fn parses_the_three_verbs() {
        let ev = Keys::generate().sign(1, Kind(1), vec![], "hi");
        let text = format!("[\"EVENT\",{}]", ev.to_json());
        assert!(matches!(ClientMessage::parse(&text), Ok(ClientMessage::Event(e)) if *e == ev));
        let req = ClientMessage::parse(r#"["REQ","s1",{"kinds":[1]},{"limit":3}]"#).expect("req");
        assert!(
            matches!(req, ClientMessage::Req { ref sub_id, ref filters } if sub_id.as_str() == "s1" && filters.len() == 2)
        );
        assert!(
            matches!(ClientMessage::parse(r#"["CLOSE","s1"]"#), Ok(ClientMessage::Close(s)) if s.as_str() == "s1")
        );
    }

    #[test]
    fn an_event_that_is_not_json_but_has_a_readable_id_gets_ok_false() {
        let ev = Keys::generate().sign(1, Kind(1), vec![], "line\nbreak");
        let id = ev.id;
        // The JSON escape `\n` written as a raw newline: not JSON any more.
        let raw = format!("[\"EVENT\",{}]", ev.to_json()).replace("\\n", "\n");
        match ClientMessage::parse(&raw) {
            Err(e @ MessageError::BadEvent { id: Some(got), .. }) => {
                assert_eq!(got, id);
                assert!(e.reason().starts_with("invalid: "), "{}", e.reason());
            }
            other => panic!("expected OK false: {other:?}"),
        }
        let auth = raw.replacen("EVENT", "AUTH", 1);
        assert!(matches!(
            ClientMessage::parse(&auth),
            Err(MessageError::BadEvent { id: Some(_), .. })
        ));
        // No readable id: a NOTICE, as before.
        let hidden = format!(
            "[\"EVENT\",{{\"content\":\"\\\"id\\\":\\\"{}\\\"\t\"}}]",
            "a".repeat(64)
        );
        assert!(matches!(
            ClientMessage::parse(&hidden),
            Err(MessageError::NotJson(_))
        ));
        assert!(matches!(
            ClientMessage::parse("[\"REQ\",\"line\nbreak\",{}]"),
            Err(MessageError::NotJson(_))
        ));
    }

    #[test]
    fn events_parse_the_same_with_or_without_the_shortcut() {
        let ev = Keys::generate().sign(1, Kind(1), vec![vec!["t".into(), "x".into()]], "hi");
        let json = ev.to_json();
        let frames = [
            format!("[\"EVENT\",{json}]"),
            format!(" [ \"EVENT\" ,\n{json} ] "),
            format!("[\"EV\\u0045NT\",{json}]"),
        ];
        for text in &frames {
            assert!(
                matches!(ClientMessage::parse(text), Ok(ClientMessage::Event(e)) if *e == ev),
                "{text}"
            );
        }
        let auth = format!("[\"AUTH\",{json}]");
        assert!(matches!(ClientMessage::parse(&auth), Ok(ClientMessage::Auth(e)) if *e == ev));
        // A repeated field is refused by the direct reader and accepted (last one wins) by
        // the tree reader: the general path decides, as before the shortcut.
        let repeated = format!("[\"EVENT\",{}]", json.replacen('{', "{\"kind\":7,", 1));
        assert!(matches!(ClientMessage::parse(&repeated), Ok(ClientMessage::Event(e)) if *e == ev));
        let extra = format!("[\"EVENT\",{json},1]");
        assert!(ClientMessage::parse(&extra).is_err());
        // Unknown fields are skipped unvalidated by serde; the general path refuses these
        // (with `OK false`: the id is readable).
        for unknown in [r#""x":"\ud800","#, r#""x":1e400,"#] {
            let text = format!(
                "[\"EVENT\",{}]",
                json.replacen('{', &format!("{{{unknown}"), 1)
            );
            let err = ClientMessage::parse(&text).expect_err(&text);
            assert!(
                matches!(err, MessageError::BadEvent { id: Some(id), .. } if id == ev.id),
                "{text}: {err}"
            );
            assert!(err.reason().starts_with("invalid: "), "{text}: {err}");
        }
        let known_extra = format!("[\"EVENT\",{}]", json.replacen('{', "{\"x\":1,", 1));
        assert!(
            matches!(ClientMessage::parse(&known_extra), Ok(ClientMessage::Event(e)) if *e == ev)
        );
    }

    #[test]
    fn refusals_carry_what_the_reply_needs() {
        let id = "f".repeat(64);
        let bad_event = format!(r#"["EVENT",{{"id":"{id}","pubkey":"x"}}]"#);
        match ClientMessage::parse(&bad_event) {
            Err(MessageError::BadEvent { id: Some(got), .. }) => assert_eq!(got.to_hex(), id),
            other => panic!("unexpected {other:?}"),
        }
        match ClientMessage::parse(r#"["REQ","s",{"ids":["nope"]}]"#) {
            Err(e @ MessageError::BadFilter { .. }) => assert!(e.reason().starts_with("invalid: ")),
            other => panic!("unexpected {other:?}"),
        }
        let long = "x".repeat(65);
        let cases = [
            ("not json", "invalid: could not parse"),
            ("{}", "invalid: message must be"),
            ("[1,2]", "invalid: message must be"),
            (r#"["HELLO"]"#, "unsupported: unknown command"),
            (r#"["REQ",""]"#, "invalid: subscription id"),
            (r#"["REQ","s"]"#, "invalid: REQ expects"),
            (r#"["CLOSE",5]"#, "invalid: subscription id"),
            (r#"["EVENT"]"#, "invalid: EVENT expects"),
        ];
        for (text, want) in cases {
            let reason = ClientMessage::parse(text).expect_err(text).reason();
            assert!(reason.starts_with(want), "{text}: {reason}");
        }
        let text = format!(r#"["REQ","{long}",{{}}]"#);
        assert_eq!(
            ClientMessage::parse(&text).expect_err("long").reason(),
            "invalid: subscription id must be a string of 1 to 64 characters"
        );
        let sixty_four = "é".repeat(64);
        assert!(ClientMessage::parse(&format!(r#"["REQ","{sixty_four}",{{}}]"#)).is_ok());
    }

    #[test]
    fn negentropy_verbs_parse_and_refusals_name_the_session() {
        match ClientMessage::parse(r#"["NEG-OPEN","n",{"kinds":[1]},"61AB"]"#) {
            Ok(ClientMessage::NegOpen {
                sub_id, message, ..
            }) => {
                assert_eq!(sub_id.as_str(), "n");
                assert_eq!(message.as_str(), "61ab");
                assert_eq!(message.to_bytes(), vec![0x61, 0xab]);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            ClientMessage::parse(r#"["NEG-MSG","n","61"]"#),
            Ok(ClientMessage::NegMsg { .. })
        ));
        assert!(matches!(
            ClientMessage::parse(r#"["NEG-CLOSE","n"]"#),
            Ok(ClientMessage::NegClose(_))
        ));
        for text in [
            r#"["NEG-OPEN","n",{},"6"]"#,
            r#"["NEG-OPEN","n",{},"zz"]"#,
            r#"["NEG-OPEN","n",{"ids":["x"]},"61"]"#,
            r#"["NEG-OPEN","n",{}]"#,
            r#"["NEG-MSG","n",""]"#,
            r#"["NEG-MSG","n",97]"#,
        ] {
            match ClientMessage::parse(text) {
                Err(e @ MessageError::BadNeg { .. }) => {
                    assert!(e.reason().starts_with("invalid: "), "{text}: {e}")
                }
                other => panic!("{text}: unexpected {other:?}"),
            }
        }
        assert!(matches!(
            ClientMessage::parse(r#"["NEG-OPEN"]"#),
            Err(MessageError::BadSubId)
        ));
        let sub = SubId::new("n").expect("valid");
        let msg = NegMessage::from_hex("61").expect("hex");
        assert_eq!(neg_msg_frame(&sub, &msg), r#"["NEG-MSG","n","61"]"#);
        assert_eq!(
            neg_err_frame(&sub, "closed: x"),
            r#"["NEG-ERR","n","closed: x"]"#
        );
    }

    #[test]
    fn frames_round_trip_through_the_client_parser() {
        let ev = Keys::generate().sign(1, Kind(1), vec![], "a \"quoted\" note");
        let sub = SubId::new("sub \"1\"").expect("valid");
        match RelayMessage::parse(&event_frame(&sub, &ev.to_json())) {
            Some(RelayMessage::Event { sub_id, event }) => {
                assert_eq!(sub_id, "sub \"1\"");
                assert_eq!(*event, ev);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            matches!(RelayMessage::parse(&ok_frame(&ev.id, false, "invalid: x")),
            Some(RelayMessage::Ok { accepted: false, ref message, .. }) if message == "invalid: x")
        );
        assert!(
            matches!(RelayMessage::parse(&eose_frame(&sub)), Some(RelayMessage::Eose(s)) if s == sub.as_str())
        );
        assert!(matches!(
            RelayMessage::parse(&closed_frame(&sub, "error: x")),
            Some(RelayMessage::Closed { .. })
        ));
        assert!(
            matches!(RelayMessage::parse(&notice_frame("hello")), Some(RelayMessage::Notice(n)) if n == "hello")
        );
    }
}
