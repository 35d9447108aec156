//! JSON → `Filter::from_value`. An accepted filter must serialize and re-parse to itself,
//! and matching it against fixed events must not panic (and must agree with
//! `is_empty_set`). A JSON array is also read element by element, so whole `REQ` messages
//! from the hostile corpus seed useful filters.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use shared::event::signing::Keys;
use shared::event::{Event, Kind};
use shared::filter::Filter;

fn events() -> &'static [Event] {
    static EVENTS: OnceLock<Vec<Event>> = OnceLock::new();
    EVENTS.get_or_init(|| {
        let keys = Keys::from_secret_bytes([7; 32]).expect("valid secret");
        let hex = "a".repeat(64);
        let tag = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        vec![
            keys.sign(1_700_000_000, Kind(1), vec![], "hello nostr"),
            keys.sign(
                0,
                Kind(30023),
                vec![
                    tag(&["d", "slug"]),
                    tag(&["e", &hex, "wss://relay.example"]),
                    tag(&["p", &hex]),
                    tag(&["t", "NOSTR"]),
                    tag(&["t", "x\u{0}y"]),
                    tag(&["subject", "long name"]),
                    tag(&["-"]),
                ],
                "ÉCOLE ß ﬀ \u{0} 😀",
            ),
            keys.sign(i64::MAX, Kind(65535), vec![tag(&["t", ""])], ""),
        ]
    })
}

fn check(value: &Value) {
    let filter = match Filter::from_value(value) {
        Ok(filter) => filter,
        Err(err) => {
            // Refusals never echo a large input back: details are clipped to
            // MAX_ERROR_DETAIL characters, and `{:?}` escaping may make each up to 10
            // (`\u{10ffff}`).
            let chars = err.to_string().chars().count();
            assert!(
                chars <= 10 * shared::event::MAX_ERROR_DETAIL + 100,
                "a {chars}-character refusal: {err}"
            );
            return;
        }
    };
    let text = serde_json::to_string(&filter).expect("filter serializes");
    let back: Filter = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("serialized filter does not re-parse: {e}\n{text}"));
    assert_eq!(back, filter, "{text}");
    let empty = filter.is_empty_set();
    for event in events() {
        let matched = filter.matches(event);
        assert!(!(empty && matched), "an empty-set filter matched: {text}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    check(&value);
    if let Value::Array(items) = &value {
        items.iter().for_each(check);
    }
});
