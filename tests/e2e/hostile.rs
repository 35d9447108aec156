//! Hostile input against a live gateway: every file of `tests/corpus/hostile/` (written by
//! `fuzz/examples/hostile_corpus.rs`) is replayed, and each must get its answer in bounded
//! time with the right NIP-01 prefix, without crashing or wedging anything.
//!
//! Text files go over one connection, one message at a time. `.bin` files (not UTF-8) are
//! sent three ways: as a binary frame (NOTICE), as lossy text (answered like any text) and
//! as a raw text frame, which RFC 6455 answers by failing the connection. Frames over twice
//! `RELAY_MAX_MESSAGE_BYTES` also close the socket. Those go over a connection of their
//! own, and a new connection must work afterwards.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use relay_tests::{Client, Cluster};
use serde_json::{Value, json};
use shared::event::Event;
use shared::event::signing::Keys;
use shared::message::RelayMessage;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::{barrier, note, now};

/// How long one input may take to be answered.
const REPLY_WAIT: Duration = Duration::from_secs(5);

/// The longest refusal reason accepted: a reply must never echo a large input back. (The
/// relay clips details to 200 characters, which `{:?}` escaping can make up to ten times
/// longer.)
const MAX_REASON_BYTES: usize = 4096;

/// What a corpus file must get back.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// `NOTICE` whose message starts with the prefix.
    Notice(&'static str),
    /// `OK false` whose message starts with the prefix.
    Refused(&'static str),
    /// `OK true`.
    Accepted,
    /// Stored or not, but decided: `OK true`, or `OK false` with a client-side prefix.
    /// Never `error:` (which asks the client to retry something that can never succeed).
    Decided,
    /// `CLOSED` whose message starts with the prefix.
    Closed(&'static str),
    /// Stored events, then `EOSE`.
    Eose,
    /// `EOSE`, or `CLOSED` with a client-side prefix; never `CLOSED error:`.
    Answered,
    /// `COUNT`.
    Count,
    /// No reply by protocol (`CLOSE` of an unknown id): a barrier `REQ` must be answered.
    Silent,
    /// The gateway closes the socket (a frame over twice the message limit).
    SocketClosed,
}

use Expect::*;

/// The expected reply to every corpus file (for `.bin` files: to their lossy text).
const EXPECTED: &[(&str, Expect)] = &[
    // Not JSON, or not quite.
    ("empty-frame.txt", Notice("invalid:")),
    ("whitespace-only.txt", Notice("invalid:")),
    ("not-json.txt", Notice("invalid:")),
    ("truncated-array.json", Notice("invalid:")),
    ("unterminated-string.json", Notice("invalid:")),
    ("single-quotes.json", Notice("invalid:")),
    ("trailing-comma.json", Notice("invalid:")),
    ("trailing-garbage.json", Notice("invalid:")),
    ("two-messages-in-one-frame.json", Notice("invalid:")),
    ("bom-at-start.json", Notice("invalid:")),
    ("nan-literal.json", Notice("invalid:")),
    ("raw-nul-byte-in-string.txt", Notice("invalid:")),
    ("raw-newline-in-string.txt", Notice("invalid:")),
    ("json-null.json", Notice("invalid:")),
    ("json-object.json", Notice("invalid:")),
    ("json-string.json", Notice("invalid:")),
    ("empty-array.json", Notice("invalid:")),
    ("verb-number.json", Notice("invalid:")),
    ("verb-null.json", Notice("invalid:")),
    ("verb-lowercase.json", Notice("unsupported:")),
    ("verb-unknown-10000-chars.json", Notice("unsupported:")),
    ("deep-nesting-10000.json", Notice("invalid:")),
    ("deep-nesting-10000-in-filter.json", Notice("invalid:")),
    ("deep-nesting-100-in-filter.json", Closed("invalid:")),
    ("number-1000-digits.json", Notice("invalid:")),
    // Unicode.
    ("lone-surrogate.json", Refused("invalid:")),
    ("lone-surrogate-in-sub-id.json", Notice("invalid:")),
    ("surrogate-pair-escaped.json", Accepted),
    ("unicode-controls-and-separators.json", Accepted),
    ("sub-id-64-multibyte-chars.json", Eose),
    ("sub-id-65-multibyte-chars.json", Notice("invalid:")),
    ("sub-id-64-combining-chars.json", Eose),
    ("sub-id-empty.json", Notice("invalid:")),
    ("sub-id-number.json", Notice("invalid:")),
    ("sub-id-null.json", Notice("invalid:")),
    // Not UTF-8: the lossy text's answer (binary frames get NOTICE, raw text frames a close).
    ("invalid-utf8-bytes.bin", Notice("invalid:")),
    ("invalid-utf8-in-sub-id.bin", Eose),
    ("invalid-utf8-overlong-nul.bin", Notice("invalid:")),
    ("invalid-utf8-truncated-sequence.bin", Count),
    ("invalid-utf8-encoded-surrogate.bin", Eose),
    // EVENT: wrong shape. An unreadable id gets NOTICE, a readable one OK false.
    ("event-arity-1.json", Notice("invalid:")),
    ("event-arity-3.json", Notice("invalid:")),
    ("event-not-object.json", Notice("invalid:")),
    ("event-array-not-object.json", Notice("invalid:")),
    ("event-empty-object.json", Notice("invalid:")),
    ("event-id-number.json", Notice("invalid:")),
    ("event-id-uppercase-hex.json", Notice("invalid:")),
    ("event-id-65-hex.json", Notice("invalid:")),
    ("event-pubkey-number.json", Refused("invalid:")),
    ("event-tags-object.json", Refused("invalid:")),
    ("event-tags-numbers.json", Refused("invalid:")),
    ("event-tags-null.json", Refused("invalid:")),
    ("event-tag-empty-array.json", Refused("invalid:")),
    ("event-kind-string.json", Refused("invalid:")),
    ("event-kind-negative.json", Refused("invalid:")),
    ("event-kind-65536.json", Refused("invalid:")),
    ("event-kind-float.json", Refused("invalid:")),
    ("event-created-at-float.json", Refused("invalid:")),
    ("event-created-at-negative.json", Refused("invalid:")),
    ("event-created-at-1e400.json", Refused("invalid:")),
    ("event-created-at-u64-overflow.json", Refused("invalid:")),
    ("event-created-at-string.json", Refused("invalid:")),
    ("event-content-number.json", Refused("invalid:")),
    ("event-content-null.json", Refused("invalid:")),
    ("event-sig-short.json", Refused("invalid:")),
    ("event-missing-sig.json", Refused("invalid:")),
    ("event-missing-tags.json", Refused("invalid:")),
    ("event-tags-200kb-string.json", Refused("invalid:")),
    // EVENT: well formed, refused by the gateway's policy or the worker's checks.
    ("event-bad-signature.json", Refused("invalid:")),
    ("event-id-mismatch.json", Refused("invalid:")),
    ("event-pubkey-not-on-curve.json", Refused("invalid:")),
    ("event-created-at-i64-max.json", Refused("invalid:")),
    ("event-kind-22242.json", Refused("invalid:")),
    ("event-expired.json", Refused("invalid:")),
    ("event-2501-tags.json", Refused("invalid:")),
    ("event-content-100001-chars.json", Refused("invalid:")),
    (
        "event-content-just-below-message-limit.json",
        Refused("invalid:"),
    ),
    (
        "event-content-just-above-message-limit.json",
        Notice("invalid:"),
    ),
    ("event-content-1mb.json", SocketClosed),
    // EVENT: hostile but valid.
    ("event-extra-fields.json", Accepted),
    ("event-duplicate-keys.json", Accepted),
    ("event-raw-newline-in-content.txt", Refused("invalid:")),
    ("event-raw-tab-in-content.txt", Refused("invalid:")),
    ("event-nul-in-content.json", Accepted),
    ("event-nul-in-tag.json", Accepted),
    ("event-nul-in-d-tag-addressable.json", Decided),
    ("event-deletion-nul-in-address.json", Decided),
    ("event-tag-value-2kb.json", Accepted),
    ("event-content-99999-emoji.json", Accepted),
    ("event-expiration-not-a-number.json", Accepted),
    ("event-ephemeral-kind.json", Accepted),
    // REQ.
    ("req-arity-1.json", Notice("invalid:")),
    ("req-arity-2.json", Closed("invalid:")),
    ("req-1000-filters.json", Closed("invalid:")),
    ("req-e-tag-10000-values.json", Notice("invalid:")),
    ("req-e-tag-7000-values.json", Eose),
    ("req-t-tag-10000-values.json", Closed("invalid:")),
    ("req-limit-u64-overflow.json", Closed("invalid:")),
    ("req-limit-u64-max.json", Eose),
    ("req-limit-negative.json", Closed("invalid:")),
    ("req-limit-float.json", Closed("invalid:")),
    ("req-kinds-negative.json", Closed("invalid:")),
    ("req-kinds-string.json", Closed("invalid:")),
    ("req-since-1e400.json", Notice("invalid:")),
    ("req-since-float.json", Closed("invalid:")),
    ("req-since-i64-min-until-i64-max.json", Eose),
    ("req-since-after-until.json", Eose),
    ("req-filter-string.json", Closed("invalid:")),
    ("req-filter-null.json", Closed("invalid:")),
    ("req-filter-array.json", Closed("invalid:")),
    ("req-unknown-field.json", Closed("unsupported:")),
    ("req-unknown-field-10000-chars.json", Closed("unsupported:")),
    (
        "req-unknown-field-10000-control-chars.json",
        Closed("unsupported:"),
    ),
    ("req-tag-multi-letter.json", Closed("unsupported:")),
    ("req-ids-empty.json", Eose),
    ("req-tag-value-nul.json", Answered),
    ("req-search-nul.json", Answered),
    // COUNT.
    ("count-arity-1.json", Notice("invalid:")),
    ("count-arity-2.json", Closed("invalid:")),
    ("count-sub-id-number.json", Notice("invalid:")),
    ("count-bad-filter.json", Closed("invalid:")),
    ("count-1000-filters.json", Closed("invalid:")),
    ("count-empty-filter.json", Count),
    // CLOSE.
    ("close-arity-1.json", Notice("invalid:")),
    ("close-arity-3.json", Notice("invalid:")),
    ("close-sub-id-number.json", Notice("invalid:")),
    ("close-sub-id-object.json", Notice("invalid:")),
    ("close-sub-id-65-chars.json", Notice("invalid:")),
    ("close-unknown-sub.json", Silent),
    // AUTH.
    ("auth-arity-1.json", Notice("invalid:")),
    ("auth-arity-3.json", Notice("invalid:")),
    ("auth-string-not-event.json", Notice("invalid:")),
    ("auth-malformed-event.json", Refused("invalid:")),
    ("auth-wrong-challenge.json", Refused("invalid:")),
    ("auth-kind-1.json", Refused("invalid:")),
];

/// What one replay got.
struct Outcome {
    reply: String,
    failure: Option<String>,
    elapsed: Duration,
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/hostile")
}

/// The string at `index` of a JSON array message, if the text is one.
fn string_at(text: &str, index: usize) -> Option<String> {
    let value: Value = serde_json::from_str(text).ok()?;
    value.get(index)?.as_str().map(str::to_owned)
}

/// The `id` of the event in `["EVENT"|"AUTH", {...}]`, if readable.
fn event_id_of(text: &str) -> Option<String> {
    let value: Value = serde_json::from_str(text).ok()?;
    value.get(1)?.get("id")?.as_str().map(str::to_owned)
}

fn short(s: &str, max: usize) -> String {
    let mut out: String = s.chars().take(max).collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out.escape_debug().to_string()
}

/// A refusal reason must carry `prefix` and stay small.
fn check_reason(kind: &str, message: &str, prefix: &str) -> Option<String> {
    if message.len() > MAX_REASON_BYTES {
        return Some(format!(
            "{kind} reason is {} bytes (limit {MAX_REASON_BYTES}): the input is echoed back",
            message.len()
        ));
    }
    (!message.starts_with(prefix))
        .then(|| format!("{kind} {message:?} does not start with {prefix:?}"))
}

/// A client-side refusal prefix: the relay decided, the client should not retry.
fn client_side(message: &str) -> bool {
    [
        "invalid:",
        "unsupported:",
        "blocked:",
        "restricted:",
        "pow:",
        "duplicate:",
    ]
    .iter()
    .any(|p| message.starts_with(p))
}

/// Sends `text` on `client` and checks the answer against `expect`.
async fn replay_text(client: &mut Client, text: &str, expect: Expect) -> Outcome {
    let start = Instant::now();
    client.send_text(text).await;
    let (reply, failure) = answer(client, text, expect).await;
    Outcome {
        reply,
        failure,
        elapsed: start.elapsed(),
    }
}

/// Reads until the first answer to the message just sent (skipping a REQ's stored events).
async fn answer(client: &mut Client, text: &str, expect: Expect) -> (String, Option<String>) {
    let sub = string_at(text, 1);
    let event_id = event_id_of(text);
    if let Silent = expect {
        // Nothing comes back for this one; a barrier REQ proves the gateway read past it.
        let deadline = Instant::now() + REPLY_WAIT;
        return match tokio::time::timeout_at(deadline.into(), barrier(client)).await {
            Ok(()) => ("(no reply; barrier EOSE)".into(), None),
            Err(_) => ("-".into(), Some("no barrier EOSE in time".into())),
        };
    }
    let deadline = Instant::now() + REPLY_WAIT;
    let mut stored = 0usize;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(frame) = client.recv_text_within(left).await else {
            let what = if Instant::now() >= deadline {
                format!("no answer within {REPLY_WAIT:?}")
            } else {
                "the socket closed".to_owned()
            };
            return ("-".into(), Some(what));
        };
        let Some(msg) = RelayMessage::parse(&frame) else {
            return (short(&frame, 60), Some("not a NIP-01 relay message".into()));
        };
        let (reply, failure) = match (msg, expect) {
            (RelayMessage::Event { sub_id, .. }, _) if Some(&sub_id) == sub.as_ref() => {
                stored += 1;
                continue;
            }
            (RelayMessage::Notice(m), Notice(prefix)) => {
                (format!("NOTICE {m}"), check_reason("NOTICE", &m, prefix))
            }
            (
                RelayMessage::Ok {
                    event_id: id,
                    accepted,
                    message,
                },
                Refused(_) | Accepted | Decided,
            ) => {
                let reply = format!("OK {accepted} {message}");
                let failure = if event_id.as_ref().is_some_and(|want| *want != id) {
                    Some(format!("OK for {id}, not for the event sent"))
                } else {
                    match expect {
                        Refused(prefix) if accepted => {
                            Some(format!("accepted; wanted OK false {prefix}"))
                        }
                        Refused(prefix) => check_reason("OK", &message, prefix),
                        Accepted if !accepted => Some("refused; wanted OK true".into()),
                        Decided if !accepted && !client_side(&message) => Some(format!(
                            "OK false {message:?}: wanted OK true, or OK false with a client-side prefix"
                        )),
                        Decided if !accepted => check_reason("OK", &message, ""),
                        _ => None,
                    }
                };
                (reply, failure)
            }
            (RelayMessage::Closed { sub_id, message }, Closed(_) | Answered)
                if Some(&sub_id) == sub.as_ref() =>
            {
                let reply = format!("CLOSED {message}");
                let failure = match expect {
                    Closed(prefix) => check_reason("CLOSED", &message, prefix),
                    _ if !client_side(&message) => Some(format!(
                        "CLOSED {message:?}: wanted EOSE, or CLOSED with a client-side prefix"
                    )),
                    _ => check_reason("CLOSED", &message, ""),
                };
                (reply, failure)
            }
            (RelayMessage::Eose(sub_id), Eose | Answered) if Some(&sub_id) == sub.as_ref() => {
                client.send_json(json!(["CLOSE", sub_id])).await;
                (format!("EOSE ({stored} stored)"), None)
            }
            (RelayMessage::Count { query_id, count }, Count) if Some(&query_id) == sub.as_ref() => {
                (format!("COUNT {count}"), None)
            }
            (other, _) => {
                let reply = short(&frame, 80);
                return (
                    reply,
                    Some(
                        format!("unexpected answer {other:?}")
                            .chars()
                            .take(200)
                            .collect(),
                    ),
                );
            }
        };
        return (reply, failure);
    }
}

/// Sends `frame` on a connection of its own and expects the gateway to close it.
async fn replay_closing(url: &str, frame: Message) -> Outcome {
    let start = Instant::now();
    let (mut ws, _) = tokio::time::timeout(REPLY_WAIT, connect_async(url))
        .await
        .expect("connect in time")
        .expect("connect");
    // The AUTH challenge comes first.
    let first = tokio::time::timeout(REPLY_WAIT, ws.next()).await;
    assert!(
        matches!(first, Ok(Some(Ok(Message::Text(_))))),
        "no AUTH challenge: {first:?}"
    );
    // The relay may hang up while the frame is still being written.
    let _ = ws.send(frame).await;
    let deadline = tokio::time::Instant::now() + REPLY_WAIT;
    loop {
        let (reply, failure) = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => (
                "-".into(),
                Some(format!("socket still open after {REPLY_WAIT:?}")),
            ),
            Ok(None) => ("socket closed".into(), None),
            Ok(Some(Err(e))) => (short(&format!("socket closed ({e})"), 60), None),
            Ok(Some(Ok(Message::Close(close)))) => (
                match close {
                    Some(c) => format!("close {} {}", u16::from(c.code), c.reason),
                    None => "close".into(),
                },
                None,
            ),
            Ok(Some(Ok(Message::Text(t)))) => (
                short(&t, 80),
                Some("answered instead of closing the socket".into()),
            ),
            Ok(Some(Ok(_))) => continue,
        };
        return Outcome {
            reply,
            failure,
            elapsed: start.elapsed(),
        };
    }
}

/// A fresh connection gets its challenge and answers a REQ.
async fn new_connection_works(url: &str) -> Option<String> {
    let fresh = tokio::time::timeout(REPLY_WAIT, async {
        let mut c = Client::connect(url).await.ok()?;
        barrier(&mut c).await;
        Some(())
    })
    .await;
    match fresh {
        Ok(Some(())) => None,
        _ => Some("a new connection did not work afterwards".into()),
    }
}

#[tokio::test]
async fn hostile_corpus_gets_answers_and_nothing_crashes() {
    let started = Instant::now();
    let dir = corpus_dir();
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| {
            entry
                .expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    files.sort();
    let listed: BTreeSet<&str> = EXPECTED.iter().map(|(name, _)| *name).collect();
    let present: BTreeSet<&str> = files.iter().map(String::as_str).collect();
    assert_eq!(
        listed.len(),
        EXPECTED.len(),
        "a file is listed twice in EXPECTED"
    );
    let unlisted: Vec<_> = present.difference(&listed).collect();
    let missing: Vec<_> = listed.difference(&present).collect();
    assert!(
        unlisted.is_empty() && missing.is_empty(),
        "corpus and EXPECTED disagree: not in EXPECTED {unlisted:?}, not in the corpus {missing:?}"
    );
    assert!(files.len() >= 40, "only {} corpus files", files.len());

    let mut cluster = Cluster::default_cluster().await;
    let url = cluster.url();
    let mut client = cluster.client(0).await;
    let mut rows: Vec<(String, &'static str, Outcome)> = Vec::new();
    for name in &files {
        let expect = EXPECTED
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, e)| *e)
            .expect("listed");
        let bytes = std::fs::read(dir.join(name)).expect("read corpus file");
        if name.ends_with(".bin") {
            assert!(
                std::str::from_utf8(&bytes).is_err(),
                "{name} is valid UTF-8; .bin files must not be"
            );
            let start = Instant::now();
            client.send_raw(Message::binary(bytes.clone())).await;
            let (reply, failure) = answer(&mut client, "", Notice("invalid:")).await;
            let elapsed = start.elapsed();
            rows.push((
                name.clone(),
                "binary",
                Outcome {
                    reply,
                    failure,
                    elapsed,
                },
            ));
            let lossy = String::from_utf8_lossy(&bytes).into_owned();
            rows.push((
                name.clone(),
                "lossy text",
                replay_text(&mut client, &lossy, expect).await,
            ));
            let raw = Frame::message(bytes, OpCode::Data(Data::Text), true);
            let mut outcome = replay_closing(&url, Message::Frame(raw)).await;
            if outcome.failure.is_none() {
                outcome.failure = new_connection_works(&url).await;
            }
            rows.push((name.clone(), "raw text", outcome));
            continue;
        }
        let text = String::from_utf8(bytes).expect("text corpus files are UTF-8");
        let outcome = if let SocketClosed = expect {
            let mut outcome = replay_closing(&url, Message::text(text)).await;
            if outcome.failure.is_none() {
                outcome.failure = new_connection_works(&url).await;
            }
            outcome
        } else {
            replay_text(&mut client, &text, expect).await
        };
        rows.push((name.clone(), "text", outcome));
    }

    // Nothing crashed: every process still runs, and the same connection still publishes
    // and queries.
    let mut failures: Vec<String> = Vec::new();
    for (i, gw) in cluster.gateways.iter_mut().enumerate() {
        match gw.child.try_wait() {
            Ok(None) => {}
            other => failures.push(format!("gateway {i} is not running: {other:?}")),
        }
    }
    for (i, worker) in cluster.workers.iter_mut().enumerate() {
        match worker.try_wait() {
            Ok(None) => {}
            other => failures.push(format!("worker {i} is not running: {other:?}")),
        }
    }
    let ev = note(
        &Keys::generate(),
        now(),
        "still serving after the hostile corpus",
    );
    let ack = client.publish(&ev).await;
    if !ack.accepted {
        failures.push(format!(
            "a normal publish was refused afterwards: {}",
            ack.message
        ));
    }
    let got = client
        .req("after", &[json!({"ids": [ev.id.to_hex()]})])
        .await;
    if got != vec![ev.clone()] {
        failures.push(format!(
            "a normal REQ got {} events, wanted the one published",
            got.len()
        ));
    }
    client.send_json(json!(["CLOSE", "after"])).await;
    if let Some(f) = new_connection_works(&url).await {
        failures.push(f);
    }

    // NULs end to end: what was accepted is served back intact.
    let mut nul_report = Vec::new();
    for (name, check) in [
        ("event-nul-in-content.json", "content"),
        ("event-nul-in-tag.json", "tag"),
        ("event-nul-in-d-tag-addressable.json", "d tag"),
    ] {
        let text = std::fs::read_to_string(dir.join(name)).expect("read");
        let value: Value = serde_json::from_str(&text).expect("JSON");
        let sent = Event::from_value(value[1].clone()).expect("an event");
        let accepted = rows
            .iter()
            .any(|(n, _, o)| n == name && o.reply.starts_with("OK true"));
        let served = client
            .req("nul", &[json!({"ids": [sent.id.to_hex()]})])
            .await;
        client.send_json(json!(["CLOSE", "nul"])).await;
        let line = match (accepted, served.as_slice()) {
            (true, [back]) if *back == sent => {
                format!("{name}: stored and served back with the NUL in its {check}")
            }
            (true, other) => {
                failures.push(format!(
                    "{name}: accepted, but a REQ by id served {other:?}"
                ));
                format!("{name}: accepted but not served back intact")
            }
            (false, []) => format!("{name}: not stored"),
            (false, other) => {
                failures.push(format!(
                    "{name}: refused, yet served {} events",
                    other.len()
                ));
                format!("{name}: refused but served")
            }
        };
        nul_report.push(line);
    }

    println!("\n{:<48} {:<10} {:>6}  reply", "file", "frame", "ms");
    for (name, frame, o) in &rows {
        let mark = if o.failure.is_some() { "FAIL " } else { "" };
        println!(
            "{:<48} {:<10} {:>6}  {mark}{}",
            name,
            frame,
            o.elapsed.as_millis(),
            short(&o.reply, 90)
        );
        if let Some(f) = &o.failure {
            failures.push(format!(
                "{name} ({frame}): {} [reply: {}]",
                f,
                short(&o.reply, 120)
            ));
        }
    }
    for line in &nul_report {
        println!("NUL: {line}");
    }
    println!(
        "{} files, {} replays in {:.1} s",
        files.len(),
        rows.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "hostile input failures:\n  {}",
        failures.join("\n  ")
    );
}

/// The close codes name the problem (RFC 6455): 1009 for a frame over the hard size limit
/// (twice `RELAY_MAX_MESSAGE_BYTES`), 1007 for a text frame that is not UTF-8.
#[tokio::test]
async fn oversized_and_invalid_utf8_frames_get_1009_and_1007() {
    let cluster = Cluster::start(relay_tests::ClusterOptions::with_env(&[(
        "RELAY_MAX_MESSAGE_BYTES",
        "1024",
    )]))
    .await
    .expect("cluster");
    let url = cluster.gateways[0].url();
    // Small enough that the gateway has read the whole frame when it refuses it, so the
    // socket closes cleanly and the close frame is not lost to a reset.
    let oversized = format!("[\"NOTICE\",\"{}\"]", "x".repeat(3000));
    let out = replay_closing(&url, Message::text(oversized)).await;
    assert!(
        out.reply.starts_with("close 1009"),
        "oversized: {}",
        out.reply
    );
    let raw = Frame::message(
        vec![b'[', b'"', 0xff, 0xfe, b'"', b']'],
        OpCode::Data(Data::Text),
        true,
    );
    let out = replay_closing(&url, Message::Frame(raw)).await;
    assert!(
        out.reply.starts_with("close 1007"),
        "invalid UTF-8: {}",
        out.reply
    );
    assert_eq!(new_connection_works(&url).await, None);
}
