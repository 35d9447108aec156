//! Relay frames → `RelayMessage::parse` (what clients, the tests and the load generator
//! run on the relay's output). What parses must be rebuilt by the relay's own `*_frame`
//! functions into a frame that parses to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::event::EventId;
use shared::message::{
    RelayMessage, SubId, auth_frame, closed_frame, count_frame, eose_frame, event_frame,
    notice_frame, ok_frame,
};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Some(msg) = RelayMessage::parse(&text) else {
        return;
    };
    match msg {
        RelayMessage::Event { sub_id, event } => {
            common::check_event(&event);
            if let Ok(sub) = SubId::new(sub_id.clone()) {
                match RelayMessage::parse(&event_frame(&sub, &event.to_json())) {
                    Some(RelayMessage::Event {
                        sub_id: s,
                        event: e,
                    }) => {
                        assert_eq!(s, sub_id);
                        assert_eq!(e, event);
                    }
                    other => panic!("EVENT frame re-parsed as {other:?}"),
                }
            }
        }
        RelayMessage::Ok {
            event_id,
            accepted,
            message,
        } => {
            if let Ok(id) = EventId::from_hex(&event_id) {
                match RelayMessage::parse(&ok_frame(&id, accepted, &message)) {
                    Some(RelayMessage::Ok {
                        event_id: i,
                        accepted: a,
                        message: m,
                    }) => assert_eq!((i, a, m), (event_id, accepted, message)),
                    other => panic!("OK frame re-parsed as {other:?}"),
                }
            }
        }
        RelayMessage::Eose(sub_id) => {
            if let Ok(sub) = SubId::new(sub_id.clone()) {
                assert!(
                    matches!(RelayMessage::parse(&eose_frame(&sub)), Some(RelayMessage::Eose(s)) if s == sub_id)
                );
            }
        }
        RelayMessage::Closed { sub_id, message } => {
            if let Ok(sub) = SubId::new(sub_id.clone()) {
                match RelayMessage::parse(&closed_frame(&sub, &message)) {
                    Some(RelayMessage::Closed {
                        sub_id: s,
                        message: m,
                    }) => assert_eq!((s, m), (sub_id, message)),
                    other => panic!("CLOSED frame re-parsed as {other:?}"),
                }
            }
        }
        RelayMessage::Notice(message) => {
            assert!(
                matches!(RelayMessage::parse(&notice_frame(&message)), Some(RelayMessage::Notice(m)) if m == message)
            );
        }
        RelayMessage::Auth(challenge) => {
            assert!(
                matches!(RelayMessage::parse(&auth_frame(&challenge)), Some(RelayMessage::Auth(c)) if c == challenge)
            );
        }
        RelayMessage::Count { query_id, count } => {
            if let Ok(sub) = SubId::new(query_id.clone()) {
                match RelayMessage::parse(&count_frame(&sub, count)) {
                    Some(RelayMessage::Count {
                        query_id: q,
                        count: c,
                    }) => assert_eq!((q, c), (query_id, count)),
                    other => panic!("COUNT frame re-parsed as {other:?}"),
                }
            }
        }
    }
});
