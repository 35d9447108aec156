//! Writes the hostile-input corpus (`tests/corpus/hostile/`): one client message per file,
//! named by what it is. The corpus seeds the fuzz targets and is replayed against a live
//! gateway by `tests/e2e/hostile.rs`, which holds the expected reply of every file.
//!
//! Everything is deterministic (fixed key, fixed timestamps, BIP-340 signing without
//! auxiliary randomness), so regenerating gives the same bytes:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example hostile_corpus -- tests/corpus/hostile
//! ```
//!
//! `.bin` files are not valid UTF-8 (replayed as binary frames, as lossy text and as raw
//! text frames); `.txt` files are not JSON; `.json` files are JSON or nearly so.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use shared::event::signing::Keys;
use shared::event::{Event, Kind, compute_id};

/// A fixed moment in the past (2023-11-14), so that no event is refused as from the future.
const T: i64 = 1_700_000_000;

struct Corpus {
    dir: PathBuf,
    count: usize,
}

impl Corpus {
    fn put(&mut self, name: &str, bytes: impl AsRef<[u8]>) {
        std::fs::write(self.dir.join(name), bytes).expect("write corpus file");
        self.count += 1;
    }
}

fn keys() -> Keys {
    Keys::from_secret_bytes([0x42; 32]).expect("valid secret")
}

fn tags(list: &[&[&str]]) -> Vec<Vec<String>> {
    list.iter()
        .map(|t| t.iter().map(|s| (*s).to_owned()).collect())
        .collect()
}

fn event_msg(event: &Event) -> String {
    format!("[\"EVENT\",{}]", event.to_json())
}

/// `["EVENT", <event with one field replaced>]`.
fn mutated(event: &Event, field: &str, value: Value) -> String {
    let mut v = serde_json::to_value(event).expect("event serializes");
    v[field] = value;
    json!(["EVENT", v]).to_string()
}

/// `["EVENT", <event without one field>]`.
fn without(event: &Event, field: &str) -> String {
    let mut v = serde_json::to_value(event).expect("event serializes");
    v.as_object_mut().expect("object").remove(field);
    json!(["EVENT", v]).to_string()
}

/// `["EVENT", <event whose created_at is written as the literal `raw`>]`, for numbers that
/// a JSON value cannot hold.
fn raw_created_at(event: &Event, raw: &str) -> String {
    let from = format!("\"created_at\":{}", event.created_at);
    let msg = event_msg(event);
    assert!(msg.contains(&from));
    msg.replace(&from, &format!("\"created_at\":{raw}"))
}

fn repeat_join(item: &str, n: usize, sep: &str) -> String {
    vec![item; n].join(sep)
}

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new("tests/corpus/hostile").to_path_buf());
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    let mut c = Corpus { dir, count: 0 };
    let k = keys();
    let pk = k.pubkey().to_hex();
    let hex64 = "e".repeat(64);

    // A valid note that the malformed variants below start from (never sent as is).
    let base = k.sign(T, Kind(1), tags(&[&["t", "hostile"]]), "base event");

    // ---- Not JSON, or not quite JSON ----
    c.put("empty-frame.txt", "");
    c.put("whitespace-only.txt", " \n\t \r\n");
    c.put("not-json.txt", "this is not json");
    c.put("truncated-array.json", "[\"EVENT\",{\"id\":");
    c.put("unterminated-string.json", "[\"REQ\",\"s");
    c.put("single-quotes.json", "['REQ','s',{}]");
    c.put("trailing-comma.json", "[\"REQ\",\"s\",{},]");
    c.put(
        "trailing-garbage.json",
        "[\"REQ\",\"s\",{}] trailing garbage",
    );
    c.put(
        "two-messages-in-one-frame.json",
        "[\"CLOSE\",\"a\"][\"CLOSE\",\"b\"]",
    );
    c.put(
        "bom-at-start.json",
        "\u{FEFF}[\"REQ\",\"bom\",{\"limit\":0}]",
    );
    c.put("nan-literal.json", "[\"REQ\",\"s\",{\"limit\":NaN}]");
    c.put("raw-nul-byte-in-string.txt", "[\"REQ\",\"s\u{0}\",{}]");
    c.put("raw-newline-in-string.txt", "[\"REQ\",\"line\nbreak\",{}]");
    c.put("json-null.json", "null");
    c.put("json-object.json", "{\"EVENT\":{}}");
    c.put("json-string.json", "\"REQ\"");
    c.put("empty-array.json", "[]");
    c.put("verb-number.json", "[1,\"s\",{}]");
    c.put("verb-null.json", "[null]");
    c.put("verb-lowercase.json", "[\"req\",\"s\",{}]");
    c.put(
        "verb-unknown-10000-chars.json",
        format!("[\"{}\"]", "X".repeat(10_000)),
    );
    c.put(
        "deep-nesting-10000.json",
        format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
    );
    c.put(
        "deep-nesting-10000-in-filter.json",
        format!(
            "[\"REQ\",\"s\",{{\"#t\":{}{}}}]",
            "[".repeat(10_000),
            "]".repeat(10_000)
        ),
    );
    // Deep, but under serde_json's recursion limit (128): parses, then the filter is refused.
    c.put(
        "deep-nesting-100-in-filter.json",
        format!(
            "[\"REQ\",\"s\",{{\"#t\":{}{}}}]",
            "[".repeat(100),
            "]".repeat(100)
        ),
    );
    c.put(
        "number-1000-digits.json",
        format!("[\"REQ\",\"s\",{{\"limit\":1{}}}]", "0".repeat(1000)),
    );

    // ---- Unicode edge cases ----
    c.put("lone-surrogate.json", {
        let msg = event_msg(&k.sign(T, Kind(1), vec![], "LONE"));
        msg.replace("\"LONE\"", "\"\\ud800\"")
    });
    c.put(
        "lone-surrogate-in-sub-id.json",
        "[\"REQ\",\"\\udc00\",{\"limit\":0}]",
    );
    // A valid surrogate pair, escaped: the id covers the decoded character.
    c.put("surrogate-pair-escaped.json", {
        let ev = k.sign(T + 1, Kind(1), vec![], "pair: 😀");
        let msg = event_msg(&ev);
        assert!(msg.contains("😀"));
        msg.replace('😀', "\\ud83d\\ude00")
    });
    c.put(
        "unicode-controls-and-separators.json",
        event_msg(&k.sign(
            T + 2,
            Kind(1),
            tags(&[&["t", "\u{2028}\u{2029}"]]),
            "\u{1}\u{1f}\u{7f}\u{2028}\u{2029}\u{feff}\u{fffd}\u{10ffff} é e\u{301}",
        )),
    );
    c.put(
        "sub-id-64-multibyte-chars.json",
        json!(["REQ", "😀".repeat(64), {"limit": 0}]).to_string(),
    );
    c.put(
        "sub-id-65-multibyte-chars.json",
        json!(["REQ", "😀".repeat(65), {"limit": 0}]).to_string(),
    );
    // 64 characters (code points) that render as 32 graphemes.
    c.put(
        "sub-id-64-combining-chars.json",
        json!(["REQ", "e\u{301}".repeat(32), {"limit": 0}]).to_string(),
    );
    c.put("sub-id-empty.json", "[\"REQ\",\"\",{}]");
    c.put("sub-id-number.json", "[\"REQ\",1,{}]");
    c.put("sub-id-null.json", "[\"REQ\",null,{}]");

    // ---- Invalid UTF-8 (binary, lossy text, raw text frame) ----
    c.put("invalid-utf8-bytes.bin", [0x00, 0x9f, 0x92, 0x96]);
    c.put(
        "invalid-utf8-in-sub-id.bin",
        b"[\"REQ\",\"s\xff\xfe\",{\"limit\":0}]".as_slice(),
    );
    c.put(
        "invalid-utf8-overlong-nul.bin",
        b"[\"EVENT\",{\"content\":\"\xc0\x80\"}]".as_slice(),
    );
    c.put(
        "invalid-utf8-truncated-sequence.bin",
        b"[\"COUNT\",\"x\xe2\x82\",{\"kinds\":[65535]}]".as_slice(),
    );
    c.put(
        "invalid-utf8-encoded-surrogate.bin",
        b"[\"REQ\",\"\xed\xa0\x80\",{\"ids\":[]}]".as_slice(),
    );

    // ---- EVENT: wrong types, missing fields, wrong arity ----
    c.put("event-arity-1.json", "[\"EVENT\"]");
    c.put(
        "event-arity-3.json",
        format!("[\"EVENT\",{},\"extra\"]", base.to_json()),
    );
    c.put("event-not-object.json", "[\"EVENT\",\"an event\"]");
    c.put("event-array-not-object.json", "[\"EVENT\",[1,2,3]]");
    c.put("event-empty-object.json", "[\"EVENT\",{}]");
    c.put("event-id-number.json", mutated(&base, "id", json!(12345)));
    c.put(
        "event-id-uppercase-hex.json",
        mutated(&base, "id", json!(base.id.to_hex().to_uppercase())),
    );
    c.put(
        "event-id-65-hex.json",
        mutated(&base, "id", json!("a".repeat(65))),
    );
    c.put(
        "event-pubkey-number.json",
        mutated(&base, "pubkey", json!(1)),
    );
    c.put(
        "event-tags-object.json",
        mutated(&base, "tags", json!({"e": "x"})),
    );
    c.put(
        "event-tags-numbers.json",
        mutated(&base, "tags", json!([[1, 2]])),
    );
    c.put("event-tags-null.json", mutated(&base, "tags", Value::Null));
    c.put(
        "event-tag-empty-array.json",
        mutated(&base, "tags", json!([[]])),
    );
    c.put("event-kind-string.json", mutated(&base, "kind", json!("1")));
    c.put(
        "event-kind-negative.json",
        mutated(&base, "kind", json!(-1)),
    );
    c.put(
        "event-kind-65536.json",
        mutated(&base, "kind", json!(65536)),
    );
    c.put("event-kind-float.json", mutated(&base, "kind", json!(1.0)));
    c.put(
        "event-created-at-float.json",
        raw_created_at(&base, "1700000000.5"),
    );
    c.put(
        "event-created-at-negative.json",
        raw_created_at(&base, "-1"),
    );
    c.put(
        "event-created-at-1e400.json",
        raw_created_at(&base, "1e400"),
    );
    c.put(
        "event-created-at-u64-overflow.json",
        raw_created_at(&base, "18446744073709551616"),
    );
    c.put(
        "event-created-at-string.json",
        mutated(&base, "created_at", json!("1700000000")),
    );
    c.put(
        "event-content-number.json",
        mutated(&base, "content", json!(5)),
    );
    c.put(
        "event-content-null.json",
        mutated(&base, "content", Value::Null),
    );
    c.put("event-sig-short.json", mutated(&base, "sig", json!("ab")));
    c.put("event-missing-sig.json", without(&base, "sig"));
    c.put("event-missing-tags.json", without(&base, "tags"));
    // A serde type error used to quote the whole offending string back.
    c.put(
        "event-tags-200kb-string.json",
        mutated(&base, "tags", json!("T".repeat(200_000))),
    );

    // ---- EVENT: well formed, refused by the relay ----
    c.put("event-bad-signature.json", {
        let mut v = serde_json::to_value(&base).expect("serializes");
        let sig = base.sig.to_hex();
        let flipped = if sig.starts_with('0') { "1" } else { "0" };
        v["sig"] = json!(format!("{flipped}{}", &sig[1..]));
        json!(["EVENT", v]).to_string()
    });
    c.put(
        "event-id-mismatch.json",
        mutated(&base, "content", json!("tampered")),
    );
    c.put("event-pubkey-not-on-curve.json", {
        // x = 5 is not the x coordinate of a secp256k1 point; the id is right, so the
        // worker gets as far as the key.
        let pubkey = shared::event::PubKey::from_hex(&format!("{:064x}", 5)).expect("hex");
        let id = compute_id(&pubkey, T, Kind(1), &[], "not on the curve");
        json!(["EVENT", {
            "id": id.to_hex(), "pubkey": pubkey.to_hex(), "created_at": T, "kind": 1,
            "tags": [], "content": "not on the curve", "sig": "0".repeat(128)
        }])
        .to_string()
    });
    c.put(
        "event-created-at-i64-max.json",
        event_msg(&k.sign(i64::MAX, Kind(1), vec![], "far future")),
    );
    c.put(
        "event-kind-22242.json",
        event_msg(&k.sign(T, Kind(22242), vec![], "auth as event")),
    );
    c.put(
        "event-expired.json",
        event_msg(&k.sign(T, Kind(1), tags(&[&["expiration", "1"]]), "expired")),
    );
    c.put("event-2501-tags.json", {
        let t: Vec<Vec<String>> = (0..2501).map(|i| vec!["t".into(), i.to_string()]).collect();
        event_msg(&k.sign(T, Kind(1), t, "too many tags"))
    });
    c.put(
        "event-content-100001-chars.json",
        event_msg(&k.sign(T, Kind(1), vec![], "x".repeat(100_001))),
    );
    // Just under RELAY_MAX_MESSAGE_BYTES (524288): read and parsed, then refused for its
    // content length (RELAY_MAX_CONTENT_LENGTH, 100000 characters).
    c.put("event-content-just-below-message-limit.json", {
        let msg = event_msg(&k.sign(T, Kind(1), vec![], "b".repeat(523_800)));
        assert!(msg.len() < 524_288 && msg.len() > 524_000, "{}", msg.len());
        msg
    });
    // Over the limit, under twice the limit: NOTICE, the socket stays.
    c.put("event-content-just-above-message-limit.json", {
        let msg = event_msg(&k.sign(T, Kind(1), vec![], "a".repeat(524_000)));
        assert!(
            msg.len() > 524_288 && msg.len() < 1_048_576,
            "{}",
            msg.len()
        );
        msg
    });
    // A 1 MiB content: over twice the limit, the gateway closes the socket.
    c.put("event-content-1mb.json", {
        let msg = event_msg(&k.sign(T, Kind(1), vec![], "m".repeat(1 << 20)));
        assert!(msg.len() > 1_048_576);
        msg
    });

    // ---- EVENT: hostile but valid; stored ----
    c.put(
        "event-extra-fields.json",
        event_msg(&k.sign(T + 3, Kind(1), vec![], "extra fields")).replace(
            "\"sig\":",
            "\"seen_on\":[\"wss://x\"],\"extra\":{\"a\":[1,null]},\"sig\":",
        ),
    );
    // Two "content" keys: serde_json keeps the last one, which is what was signed. The
    // relay stores its own serialization, so only one survives.
    c.put("event-duplicate-keys.json", {
        let ev = k.sign(T + 4, Kind(1), vec![], "the signed content");
        event_msg(&ev).replacen("\"content\":", "\"content\":\"a decoy\",\"content\":", 1)
    });
    // A raw control character inside a string is not JSON; the id is still readable.
    c.put(
        "event-raw-newline-in-content.txt",
        event_msg(&k.sign(T + 4, Kind(1), vec![], "line\nbreak")).replace("\\n", "\n"),
    );
    c.put(
        "event-raw-tab-in-content.txt",
        event_msg(&k.sign(T + 4, Kind(1), vec![], "tab\there")).replace("\\t", "\t"),
    );
    c.put(
        "event-nul-in-content.json",
        event_msg(&k.sign(T + 5, Kind(1), vec![], "before\u{0}after")),
    );
    c.put(
        "event-nul-in-tag.json",
        event_msg(&k.sign(T + 6, Kind(1), tags(&[&["t", "nul\u{0}tag"]]), "nul tag")),
    );
    c.put(
        "event-nul-in-d-tag-addressable.json",
        event_msg(&k.sign(T + 7, Kind(30023), tags(&[&["d", "slug\u{0}x"]]), "nul d")),
    );
    c.put(
        "event-deletion-nul-in-address.json",
        event_msg(&k.sign(
            T + 8,
            Kind(5),
            tags(&[&["a", &format!("30023:{pk}:slug\u{0}x")]]),
            "delete a NUL address",
        )),
    );
    c.put(
        "event-tag-value-2kb.json",
        event_msg(&k.sign(
            T + 9,
            Kind(1),
            tags(&[&["t", &"v".repeat(2048)]]),
            "long tag",
        )),
    );
    c.put(
        "event-content-99999-emoji.json",
        event_msg(&k.sign(T + 10, Kind(1), vec![], "😀".repeat(99_999))),
    );
    c.put(
        "event-expiration-not-a-number.json",
        event_msg(&k.sign(
            T + 11,
            Kind(1),
            tags(&[&["expiration", "99999999999999999999999"]]),
            "expiration overflows",
        )),
    );
    c.put(
        "event-ephemeral-kind.json",
        event_msg(&k.sign(T + 12, Kind(20001), vec![], "ephemeral")),
    );

    // ---- REQ ----
    c.put("req-arity-1.json", "[\"REQ\"]");
    c.put("req-arity-2.json", "[\"REQ\",\"s\"]");
    c.put(
        "req-1000-filters.json",
        format!("[\"REQ\",\"s\",{}]", repeat_join("{}", 1000, ",")),
    );
    c.put(
        "req-e-tag-10000-values.json",
        json!(["REQ", "s", {"#e": vec![hex64.clone(); 10_000]}]).to_string(),
    );
    // Under the message limit: reaches the query worker as one array parameter.
    c.put(
        "req-e-tag-7000-values.json",
        json!(["REQ", "s", {"#e": vec![hex64.clone(); 7_000]}]).to_string(),
    );
    c.put(
        "req-t-tag-10000-values.json",
        json!(["REQ", "s", {"#t": (0..10_000).map(|i| i.to_string()).collect::<Vec<_>>()}])
            .to_string(),
    );
    c.put(
        "req-limit-u64-overflow.json",
        "[\"REQ\",\"s\",{\"limit\":18446744073709551616}]",
    );
    c.put(
        "req-limit-u64-max.json",
        "[\"REQ\",\"s\",{\"limit\":18446744073709551615,\"kinds\":[65535]}]",
    );
    c.put("req-limit-negative.json", "[\"REQ\",\"s\",{\"limit\":-1}]");
    c.put("req-limit-float.json", "[\"REQ\",\"s\",{\"limit\":1.5}]");
    c.put(
        "req-kinds-negative.json",
        "[\"REQ\",\"s\",{\"kinds\":[-1]}]",
    );
    c.put("req-kinds-string.json", "[\"REQ\",\"s\",{\"kinds\":\"1\"}]");
    c.put("req-since-1e400.json", "[\"REQ\",\"s\",{\"since\":1e400}]");
    c.put("req-since-float.json", "[\"REQ\",\"s\",{\"since\":1.5}]");
    c.put(
        "req-since-i64-min-until-i64-max.json",
        "[\"REQ\",\"s\",{\"since\":-9223372036854775808,\"until\":9223372036854775807,\"kinds\":[65535]}]",
    );
    c.put(
        "req-since-after-until.json",
        "[\"REQ\",\"s\",{\"since\":10,\"until\":5}]",
    );
    c.put("req-filter-string.json", "[\"REQ\",\"s\",\"x\"]");
    c.put("req-filter-null.json", "[\"REQ\",\"s\",null]");
    c.put("req-filter-array.json", "[\"REQ\",\"s\",[]]");
    c.put("req-unknown-field.json", "[\"REQ\",\"s\",{\"foo\":1}]");
    c.put(
        "req-unknown-field-10000-chars.json",
        json!(["REQ", "s", {"F".repeat(10_000): 1}]).to_string(),
    );
    // Clipped to 200 characters, each escaped by `{:?}` into six (`\u{7f}`): found by the
    // filter fuzz target; the reply stays bounded, though longer than the clip.
    c.put(
        "req-unknown-field-10000-control-chars.json",
        json!(["REQ", "s", {"\u{7f}".repeat(10_000): 1}]).to_string(),
    );
    c.put(
        "req-tag-multi-letter.json",
        "[\"REQ\",\"s\",{\"#ee\":[\"x\"]}]",
    );
    c.put("req-ids-empty.json", "[\"REQ\",\"s\",{\"ids\":[]}]");
    c.put(
        "req-tag-value-nul.json",
        "[\"REQ\",\"s\",{\"#t\":[\"nul\\u0000tag\"]}]",
    );
    c.put(
        "req-search-nul.json",
        "[\"REQ\",\"s\",{\"search\":\"before\\u0000after\"}]",
    );

    // ---- COUNT ----
    c.put("count-arity-1.json", "[\"COUNT\"]");
    c.put("count-arity-2.json", "[\"COUNT\",\"c\"]");
    c.put("count-sub-id-number.json", "[\"COUNT\",7,{}]");
    c.put(
        "count-bad-filter.json",
        "[\"COUNT\",\"c\",{\"kinds\":\"1\"}]",
    );
    c.put(
        "count-1000-filters.json",
        format!("[\"COUNT\",\"c\",{}]", repeat_join("{}", 1000, ",")),
    );
    c.put("count-empty-filter.json", "[\"COUNT\",\"c\",{}]");

    // ---- CLOSE ----
    c.put("close-arity-1.json", "[\"CLOSE\"]");
    c.put("close-arity-3.json", "[\"CLOSE\",\"s\",\"extra\"]");
    c.put("close-sub-id-number.json", "[\"CLOSE\",1]");
    c.put("close-sub-id-object.json", "[\"CLOSE\",{}]");
    c.put(
        "close-sub-id-65-chars.json",
        json!(["CLOSE", "c".repeat(65)]).to_string(),
    );
    c.put("close-unknown-sub.json", "[\"CLOSE\",\"never-opened\"]");

    // ---- AUTH ----
    let auth = k.sign(
        T,
        Kind(22242),
        tags(&[
            &["relay", "ws://127.0.0.1"],
            &["challenge", "not-the-challenge"],
        ]),
        "",
    );
    c.put("auth-arity-1.json", "[\"AUTH\"]");
    c.put(
        "auth-arity-3.json",
        format!("[\"AUTH\",{},\"x\"]", auth.to_json()),
    );
    c.put(
        "auth-string-not-event.json",
        "[\"AUTH\",\"challenge-string\"]",
    );
    c.put(
        "auth-malformed-event.json",
        mutated(&auth, "kind", json!("22242")).replacen("EVENT", "AUTH", 1),
    );
    c.put(
        "auth-wrong-challenge.json",
        format!("[\"AUTH\",{}]", auth.to_json()),
    );
    c.put(
        "auth-kind-1.json",
        format!(
            "[\"AUTH\",{}]",
            k.sign(T, Kind(1), vec![], "not auth").to_json()
        ),
    );

    println!("wrote {} files to {}", c.count, c.dir.display());
}
