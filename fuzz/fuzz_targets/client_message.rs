//! Client frames → `ClientMessage::parse`. Parsed events must verify without panicking and
//! survive `to_json` / `canonical_json`; parsed filters must survive their wire form; ids
//! must keep NIP-01's length rule; every refusal must carry a NIP-01 prefix and stay short.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::filter::Filter;
use shared::message::ClientMessage;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    // The gateway only ever parses text frames, which are UTF-8; a lossy decode lets the
    // fuzzer's raw bytes reach the parser instead of being skipped.
    let text = String::from_utf8_lossy(data);
    match ClientMessage::parse(&text) {
        Ok(ClientMessage::Event(event) | ClientMessage::Auth(event)) => common::check_event(&event),
        Ok(
            ClientMessage::Req { sub_id, filters }
            | ClientMessage::Count {
                query_id: sub_id,
                filters,
            },
        ) => {
            check_sub_id(sub_id.as_str());
            assert!(!filters.is_empty(), "REQ/COUNT without filters accepted");
            for filter in &filters {
                let json = serde_json::to_value(filter).expect("filter serializes");
                let back = Filter::from_value(&json).expect("serialized filter re-parses");
                assert_eq!(&back, filter);
            }
        }
        Ok(ClientMessage::NegOpen { sub_id, filter, .. }) => {
            check_sub_id(sub_id.as_str());
            let json = serde_json::to_value(&*filter).expect("filter serializes");
            let back = Filter::from_value(&json).expect("serialized filter re-parses");
            assert_eq!(back, *filter);
        }
        Ok(
            ClientMessage::Close(sub_id)
            | ClientMessage::NegMsg { sub_id, .. }
            | ClientMessage::NegClose(sub_id),
        ) => {
            check_sub_id(sub_id.as_str());
        }

        Err(err) => {
            let prefix = err.prefix();
            assert!(
                matches!(prefix, "invalid" | "unsupported"),
                "unexpected prefix {prefix:?} for {err:?}"
            );
            let reason = err.reason();
            assert!(reason.starts_with(&format!("{prefix}: ")));
            // Refusals never echo a large input back: details are clipped to
            // MAX_ERROR_DETAIL characters, and `{:?}` escaping may make each up to 10
            // (`\u{10ffff}`).
            let chars = reason.chars().count();
            assert!(
                chars <= 10 * shared::event::MAX_ERROR_DETAIL + 100,
                "a {chars}-character reason: {reason}"
            );
        }
    }
});

/// NIP-01: a subscription id is 1 to 64 characters.
fn check_sub_id(sub_id: &str) {
    let chars = sub_id.chars().count();
    assert!(
        (1..=64).contains(&chars),
        "sub id of {chars} characters accepted"
    );
}
