//! Client verbs. Each is a small type built from a parsed [`ClientMessage`] with a `handle`
//! that does its work through the [`Session`]. Anything unparseable is answered by
//! [`reject`]: `OK false` when the event id is known, `CLOSED` when the subscription id is
//! known, `NOTICE` otherwise. The connection always stays open.

mod close;
mod event;
mod req;

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
        })
    }

    /// Runs the command.
    pub async fn handle(self, session: &Session) {
        match self {
            Command::Event(c) => c.handle(session).await,
            Command::Req(c) => c.handle(session).await,
            Command::Close(c) => c.handle(session),
        }
    }
}

/// Answers a message that could not be parsed.
pub fn reject(session: &Session, err: MessageError) {
    let reason = err.reason();
    match &err {
        MessageError::BadEvent { id: Some(id), .. } => session.send(ok_frame(id, false, &reason)),
        MessageError::BadFilter { sub_id, .. } => session.send(closed_frame(sub_id, &reason)),
        _ => session.send(notice_frame(&reason)),
    }
}
