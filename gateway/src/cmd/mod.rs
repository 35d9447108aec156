//! Client verbs (NIP-01 `EVENT`, `REQ`, `CLOSE`; NIP-42 `AUTH`; NIP-45 `COUNT`; NIP-77
//! `NEG-OPEN`, `NEG-MSG`, `NEG-CLOSE`). Each is a small type built from a parsed [`ClientMessage`] with a `handle`
//! that does its work through the [`Session`]. Anything unparseable is answered by
//! [`reject`]: `OK false` when the event id is known, `CLOSED` when the subscription id is
//! known, `NOTICE` otherwise. The connection always stays open.

mod auth;
mod close;
mod count;
mod event;
mod neg;
pub(crate) mod req;

use shared::message::{ClientMessage, MessageError, closed_frame, notice_frame, ok_frame};

use crate::session::Session;

/// A parsed client message.
pub enum Command {
    /// `EVENT`.
    Event(event::Publish),
    /// `REQ`.
    Req(req::Subscribe),
    /// `CLOSE`.
    Close(close::Unsubscribe),
    /// `AUTH` (NIP-42).
    Auth(auth::Authenticate),
    /// `COUNT` (NIP-45).
    Count(count::Count),
    /// `NEG-OPEN`, `NEG-MSG`, `NEG-CLOSE` (NIP-77).
    Neg(neg::Negentropy),
}

impl Command {
    /// Parses one text frame.
    pub fn parse(text: &str) -> Result<Self, MessageError> {
        Ok(match ClientMessage::parse(text)? {
            ClientMessage::Event(event) => Command::Event(event::Publish::new(*event)),
            ClientMessage::Req { sub_id, filters } => {
                Command::Req(req::Subscribe::new(sub_id, filters))
            }
            ClientMessage::Close(sub_id) => Command::Close(close::Unsubscribe::new(sub_id)),
            ClientMessage::Auth(event) => Command::Auth(auth::Authenticate::new(*event)),
            ClientMessage::Count { query_id, filters } => {
                Command::Count(count::Count::new(query_id, filters))
            }
            ClientMessage::NegOpen {
                sub_id,
                filter,
                message,
            } => Command::Neg(neg::Negentropy::Open {
                sub_id,
                filter,
                message,
            }),
            ClientMessage::NegMsg { sub_id, message } => {
                Command::Neg(neg::Negentropy::Msg { sub_id, message })
            }
            ClientMessage::NegClose(sub_id) => Command::Neg(neg::Negentropy::Close(sub_id)),
        })
    }

    /// The verb, for metrics and logs.
    pub fn verb(&self) -> &'static str {
        match self {
            Command::Event(_) => "EVENT",
            Command::Req(_) => "REQ",
            Command::Close(_) => "CLOSE",
            Command::Auth(_) => "AUTH",
            Command::Count(_) => "COUNT",
            Command::Neg(c) => c.verb(),
        }
    }

    /// Runs the command.
    pub async fn handle(self, session: &mut Session) {
        match self {
            Command::Event(c) => c.handle(session).await,
            Command::Req(c) => c.handle(session).await,
            Command::Close(c) => c.handle(session),
            Command::Auth(c) => c.handle(session).await,
            Command::Count(c) => c.handle(session).await,
            Command::Neg(c) => c.handle(session).await,
        }
    }
}

/// The producer span of an entry put on the Redis stream `stream` (an `EVENT` on its ingest
/// shard, a query on its query shard); the entry carries its trace context.
pub(crate) fn send_span(stream: &str) -> tracing::Span {
    shared::trace_span!(
        "send",
        otel.name = %format!("send {stream}"),
        otel.kind = "producer",
        messaging.system = "redis",
        messaging.operation.type = "send",
        messaging.destination.name = %stream,
    )
}

/// Answers a message that could not be parsed.
pub fn reject(session: &Session, err: MessageError) {
    let reason = err.reason();
    match &err {
        MessageError::BadEvent { id: Some(id), .. } => session.send(ok_frame(id, false, &reason)),
        MessageError::BadFilter { verb, sub_id, .. } | MessageError::NoFilter { verb, sub_id } => {
            if *verb == "REQ" {
                req::refuse(session, sub_id, &reason);
            } else {
                session.send(closed_frame(sub_id, &reason));
            }
        }
        MessageError::BadNeg { sub_id, .. } => neg::end(session, sub_id, &reason),
        _ => session.send(notice_frame(&reason)),
    }
}
