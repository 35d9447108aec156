//! NIP-01 events: typed ids and keys, parsing, canonical serialization, id and signature checks.
//!
//! An [`Event`] is only built by [`Event::from_json`] (or [`Event::from_value`]), which checks
//! the shape of every field (64-char lowercase hex, integer ranges, tags as arrays of strings).
//! Whether the id and signature are *right* is a separate, more expensive step:
//! [`Event::verify`], run by the ingest workers.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::{self, Write as _};

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// Why an event (or one of its fields) was refused. Every variant maps to the `invalid:` prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// The message is not JSON of the event's shape (missing field, wrong type, bad number).
    #[error("malformed event: {0}")]
    Malformed(String),
    /// A field that must be 64 or 128 characters of lowercase hex is not.
    #[error("{field} must be {len} lowercase hex characters")]
    BadHex {
        /// The event field that failed.
        field: &'static str,
        /// The number of hex characters expected.
        len: usize,
    },
    /// A tag is an empty array (NIP-01: a tag is an array of one or more strings).
    #[error("tag {0} is empty; a tag has at least one string")]
    EmptyTag(usize),
    /// The id is not the sha256 of the canonical serialization.
    #[error("event id does not match its content")]
    IdMismatch,
    /// The pubkey is not a valid x-only secp256k1 key.
    #[error("pubkey is not a valid secp256k1 key")]
    BadPubKey,
    /// The BIP-340 signature does not verify.
    #[error("signature is not valid")]
    BadSignature,
}

/// Longest error detail sent back, in characters: errors never echo large inputs.
pub const MAX_ERROR_DETAIL: usize = 200;

/// At most [`MAX_ERROR_DETAIL`] characters of `s`, with an ellipsis when cut.
pub fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(MAX_ERROR_DETAIL).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

impl EventError {
    fn malformed(e: serde_json::Error) -> Self {
        EventError::Malformed(clip(&e.to_string()))
    }

    /// The NIP-01 machine-readable prefix for this rejection.
    pub fn prefix(&self) -> &'static str {
        "invalid"
    }
}

/// The value of each lowercase hex digit; 0xff for every other byte (uppercase included).
const HEX_VALUE: [u8; 256] = {
    let mut table = [0xff_u8; 256];
    let mut i = 0;
    while i < 16 {
        let digit = if i < 10 { b'0' + i } else { b'a' + i - 10 };
        table[digit as usize] = i;
        i += 1;
    }
    table
};

/// Decodes exactly `N` bytes from lowercase hex; uppercase and odd lengths are refused.
/// One pass over a lookup table: every event carries 256 hex digits (id, pubkey, sig), and
/// checking then decoding them was a visible share of the gateway's CPU.
fn decode_lower_hex<const N: usize>(s: &str, field: &'static str) -> Result<[u8; N], EventError> {
    let s = s.as_bytes();
    if s.len() != N * 2 {
        return Err(EventError::BadHex { field, len: N * 2 });
    }
    let mut out = [0u8; N];
    let mut seen = 0u8;
    for (byte, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        let (high, low) = (
            HEX_VALUE[usize::from(pair[0])],
            HEX_VALUE[usize::from(pair[1])],
        );
        seen |= high | low;
        *byte = (high << 4) | low;
    }
    // A digit's value is below 16; any other byte set the high bits.
    if seen > 0x0f {
        return Err(EventError::BadHex { field, len: N * 2 });
    }
    Ok(out)
}

/// Writes `bytes` as lowercase hex into `out` (twice as long) and returns it as text.
fn encode_lower_hex<'a>(bytes: &[u8], out: &'a mut [u8]) -> &'a str {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
    // ok: only ASCII digits were written, and `out` is exactly twice `bytes`.
    std::str::from_utf8(out).unwrap_or_default()
}

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $len:expr, $field:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; $len]);

        impl $name {
            /// Parses lowercase hex of exactly the right length.
            pub fn from_hex(s: &str) -> Result<Self, EventError> {
                decode_lower_hex::<$len>(s, $field).map(Self)
            }
            /// Wraps raw bytes (always valid).
            pub fn from_bytes(bytes: [u8; $len]) -> Self {
                Self(bytes)
            }
            /// Wraps raw bytes read from storage; `None` unless exactly the right length.
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                <[u8; $len]>::try_from(bytes).ok().map(Self)
            }
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
            /// Lowercase hex, as on the wire.
            pub fn to_hex(&self) -> String {
                self.with_hex(str::to_owned)
            }
            /// Calls `f` with the lowercase hex, encoded on the stack (no allocation).
            pub fn with_hex<R>(&self, f: impl FnOnce(&str) -> R) -> R {
                let mut buf = [0u8; $len * 2];
                f(encode_lower_hex(&self.0, &mut buf))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.with_hex(|h| f.write_str(h))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.with_hex(|h| write!(f, "{}({h})", stringify!($name)))
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.with_hex(|h| s.serialize_str(h))
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::from_hex(&s).map_err(D::Error::custom)
            }
        }
    };
}

hex_id!(
    /// A 32-byte event id: the sha256 of the event's canonical serialization.
    EventId, 32, "id"
);
hex_id!(
    /// A 32-byte x-only secp256k1 public key (the event author).
    PubKey, 32, "pubkey"
);
hex_id!(
    /// A 64-byte BIP-340 Schnorr signature.
    Signature, 64, "sig"
);

/// An event kind, 0..=65535.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Kind(pub u16);

/// How a relay treats a kind (NIP-01 "Kinds").
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KindClass {
    /// Stored, every one of them.
    Regular,
    /// Only the newest per (pubkey, kind) is kept: 0, 3, 10000–19999.
    Replaceable,
    /// Never stored, only fanned out: 20000–29999.
    Ephemeral,
    /// Only the newest per (pubkey, kind, `d` tag) is kept: 30000–39999.
    Addressable,
}

impl Kind {
    /// The storage class of this kind. Kinds NIP-01 leaves unassigned are treated as regular.
    pub fn class(self) -> KindClass {
        match self.0 {
            0 | 3 | 10000..=19999 => KindClass::Replaceable,
            20000..=29999 => KindClass::Ephemeral,
            30000..=39999 => KindClass::Addressable,
            _ => KindClass::Regular,
        }
    }

    /// Whether NIP-50 search looks at this kind's content, in stored queries and in live
    /// matching alike. Not for kinds whose content is ciphertext (NIP-04 direct messages,
    /// NIP-59 seals and gift wraps): their "words" are base64 no query means, and indexing
    /// them would cost every write and fill the search index with noise.
    pub fn is_searchable(self) -> bool {
        !matches!(self.0, 4 | 13 | 1059)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A structurally valid NIP-01 event. Its id and signature are checked by [`Event::verify`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Event {
    /// The claimed id.
    pub id: EventId,
    /// The author.
    pub pubkey: PubKey,
    /// Unix seconds, as the author claims.
    pub created_at: i64,
    /// The kind.
    pub kind: Kind,
    /// Tags: each an array of one or more strings.
    pub tags: Vec<Vec<String>>,
    /// The content, any string.
    pub content: String,
    /// The claimed signature over `id`.
    pub sig: Signature,
}

/// Declares a struct of an event's wire fields, before field checks (so that errors can
/// name the field), with the given attributes: one field list for both shapes below.
macro_rules! wire_event {
    ($(#[$meta:meta])* $name:ident) => {
        #[derive(Deserialize)]
        $(#[$meta])*
        struct $name {
            id: String,
            pubkey: String,
            created_at: serde_json::Number,
            kind: serde_json::Number,
            tags: Vec<Vec<String>>,
            content: String,
            sig: String,
        }
    };
}

wire_event!(
    /// The wire shape; fields NIP-01 does not define are ignored.
    WireEvent
);

wire_event!(
    /// [`WireEvent`] with no field beyond NIP-01's: serde skips unknown fields without
    /// validating them (lone surrogates, numbers out of range), so a reader that must refuse
    /// exactly what a full JSON parse refuses takes only this shape. See [`ExactEvent`].
    #[serde(deny_unknown_fields)]
    ExactWireEvent
);

/// An event deserialized in place (inside a larger JSON document) and checked like
/// [`Event::from_json`], but only if it has exactly NIP-01's fields. For the client
/// parser's shortcut, which leaves everything else to the general path.
#[derive(Deserialize)]
#[serde(try_from = "ExactWireEvent")]
pub struct ExactEvent(pub Event);

impl TryFrom<ExactWireEvent> for ExactEvent {
    type Error = EventError;

    fn try_from(w: ExactWireEvent) -> Result<Self, EventError> {
        Event::from_wire(WireEvent {
            id: w.id,
            pubkey: w.pubkey,
            created_at: w.created_at,
            kind: w.kind,
            tags: w.tags,
            content: w.content,
            sig: w.sig,
        })
        .map(ExactEvent)
    }
}

impl Event {
    /// Parses an event from JSON text and checks each field's shape.
    pub fn from_json(text: &str) -> Result<Self, EventError> {
        let wire: WireEvent = serde_json::from_str(text).map_err(EventError::malformed)?;
        Self::from_wire(wire)
    }

    /// Parses an event from an already-parsed JSON value.
    pub fn from_value(value: serde_json::Value) -> Result<Self, EventError> {
        let wire: WireEvent = serde_json::from_value(value).map_err(EventError::malformed)?;
        Self::from_wire(wire)
    }

    fn from_wire(w: WireEvent) -> Result<Self, EventError> {
        let created_at = w
            .created_at
            .as_u64()
            .and_then(|n| i64::try_from(n).ok())
            .ok_or_else(|| {
                EventError::Malformed("created_at must be a non-negative integer".into())
            })?;
        let kind = w
            .kind
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(|| EventError::Malformed("kind must be an integer 0..=65535".into()))?;
        if let Some(i) = w.tags.iter().position(Vec::is_empty) {
            return Err(EventError::EmptyTag(i));
        }
        Ok(Event {
            id: EventId::from_hex(&w.id)?,
            pubkey: PubKey::from_hex(&w.pubkey)?,
            created_at,
            kind: Kind(kind),
            tags: w.tags,
            content: w.content,
            sig: Signature::from_hex(&w.sig)?,
        })
    }

    /// The NIP-01 canonical serialization `[0,pubkey,created_at,kind,tags,content]`,
    /// with exactly NIP-01's escaping: `\n \" \\ \r \t \b \f`, everything else verbatim.
    pub fn canonical_json(&self) -> String {
        canonical_json(
            &self.pubkey,
            self.created_at,
            self.kind,
            &self.tags,
            &self.content,
        )
    }

    /// The id this event should have: sha256 of its canonical serialization.
    pub fn compute_id(&self) -> EventId {
        compute_id(
            &self.pubkey,
            self.created_at,
            self.kind,
            &self.tags,
            &self.content,
        )
    }

    /// Checks the id against the content and the BIP-340 signature against the id.
    pub fn verify(&self) -> Result<(), EventError> {
        if self.compute_id() != self.id {
            return Err(EventError::IdMismatch);
        }
        let key = parsed_key(&self.pubkey)?;
        let sig = secp256k1::schnorr::Signature::from_byte_array(*self.sig.as_bytes());
        secp256k1::schnorr::verify(&sig, self.id.as_bytes(), &key)
            .map_err(|_| EventError::BadSignature)
    }

    /// The event as JSON, the form stored and served to clients.
    pub fn to_json(&self) -> String {
        // ok: serializing a struct of strings and integers cannot fail.
        serde_json::to_string(self).expect("event serializes")
    }

    /// The storage class of this event's kind.
    pub fn class(&self) -> KindClass {
        self.kind.class()
    }

    /// The `d` tag value that addresses this event among its (pubkey, kind) siblings:
    /// `Some("")` for replaceable kinds, the first `d` tag's value (or `""`) for addressable
    /// kinds, and `None` for kinds that are not replaced.
    pub fn replace_key(&self) -> Option<&str> {
        match self.class() {
            KindClass::Replaceable => Some(""),
            KindClass::Addressable => Some(
                self.tags
                    .iter()
                    .find(|t| t.first().map(String::as_str) == Some("d"))
                    .and_then(|t| t.get(1))
                    .map_or("", String::as_str),
            ),
            KindClass::Regular | KindClass::Ephemeral => None,
        }
    }

    /// The values of every tag named `name` (its second element), in order.
    pub fn tag_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.tags
            .iter()
            .filter(move |t| t.first().map(String::as_str) == Some(name))
            .filter_map(|t| t.get(1).map(String::as_str))
    }

    /// NIP-13 difficulty: the number of leading zero bits of the id.
    pub fn pow_difficulty(&self) -> u32 {
        let mut bits = 0;
        for byte in self.id.as_bytes() {
            bits += byte.leading_zeros();
            if *byte != 0 {
                break;
            }
        }
        bits
    }

    /// NIP-40 expiration: the first `expiration` tag's value, when it is an integer.
    pub fn expiration(&self) -> Option<i64> {
        self.tag_values("expiration").next()?.trim().parse().ok()
    }

    /// Whether the event expired at or before `now` (NIP-40).
    pub fn is_expired(&self, now: i64) -> bool {
        self.expiration().is_some_and(|at| at <= now)
    }

    /// Whether `created_at` is at most `secs` seconds before or after `now`: the time window
    /// of signed challenges (NIP-42 `AUTH`, NIP-98 authorization).
    pub fn created_within(&self, now: i64, secs: u64) -> bool {
        self.created_at.abs_diff(now) <= secs
    }

    /// NIP-70: whether the event carries the `["-"]` tag.
    pub fn is_protected(&self) -> bool {
        self.tags.iter().any(|t| t.len() == 1 && t[0] == "-")
    }

    /// NIP-70: whether this is a repost (kind 6 or 16) whose content embeds a protected
    /// event, which "MUST NOT" be embedded, or may embed one. Only the embedded event's tags
    /// are read: any JSON object with a `["-"]` tag counts, signed or not. An object that
    /// does not parse strictly (a repeated or escaped `tags` key, tags of the wrong shape,
    /// not JSON at all) counts too: clients' more lenient parsers (JavaScript keeps the
    /// last of repeated keys) could see a protected event in it.
    pub fn embeds_protected_event(&self) -> bool {
        /// Serde refuses a repeated `tags` key, which is what makes this strict.
        #[derive(Deserialize)]
        struct Embedded {
            tags: Option<Vec<Vec<serde_json::Value>>>,
        }
        if !matches!(self.kind, Kind(6) | Kind(16)) || !self.content.trim_start().starts_with('{') {
            return false;
        }
        match serde_json::from_str::<Embedded>(&self.content) {
            Ok(Embedded { tags: Some(tags) }) => tags
                .iter()
                .any(|t| t.len() == 1 && t[0].as_str() == Some("-")),
            Ok(Embedded { tags: None }) => false,
            Err(_) => true,
        }
    }

    /// Who may read the event when its kind is read-restricted: its author, then every
    /// pubkey named in a `p` tag (decoded once each, never by re-encoding a reader's key).
    pub fn readers(&self) -> impl Iterator<Item = PubKey> + '_ {
        std::iter::once(self.pubkey).chain(
            self.tag_values("p")
                .filter_map(|p| PubKey::from_hex(p).ok()),
        )
    }

    /// Whether any of `pubkeys` is among the event's [`Event::readers`].
    pub fn involves_any(&self, pubkeys: &[PubKey]) -> bool {
        !pubkeys.is_empty() && self.readers().any(|r| pubkeys.contains(&r))
    }

    /// The indexed tags: `(letter, first value)` for every tag whose name is one ASCII letter
    /// and which has a value (NIP-01: only the first value of a tag is indexed).
    pub fn indexed_tags(&self) -> impl Iterator<Item = (char, &str)> {
        self.tags.iter().filter_map(|t| {
            let name = t.first()?;
            let value = t.get(1)?;
            let mut chars = name.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) if c.is_ascii_alphabetic() => Some((c, value.as_str())),
                _ => None,
            }
        })
    }
}

/// The canonical serialization of an unsigned event's fields.
pub fn canonical_json(
    pubkey: &PubKey,
    created_at: i64,
    kind: Kind,
    tags: &[Vec<String>],
    content: &str,
) -> String {
    let mut out = String::with_capacity(96 + content.len() + tags.len() * 80);
    out.push_str("[0,\"");
    pubkey.with_hex(|h| out.push_str(h));
    out.push_str("\",");
    // ok: writing to a String cannot fail.
    let _ = write!(out, "{created_at},{}", kind.0);
    out.push_str(",[");
    for (i, tag) in tags.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('[');
        for (j, s) in tag.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            push_escaped(&mut out, s);
        }
        out.push(']');
    }
    out.push_str("],");
    push_escaped(&mut out, content);
    out.push(']');
    out
}

/// Most parsed public keys [`parsed_key`] keeps per thread; when full it starts over.
const PARSED_KEYS_PER_THREAD: usize = 4096;

thread_local! {
    static PARSED_KEYS: RefCell<HashMap<PubKey, secp256k1::XOnlyPublicKey>> =
        RefCell::new(HashMap::new());
}

/// `pubkey` as a curve point. Parsing an x-only key takes a field square root, about a
/// tenth of a signature check, and a relay sees the same authors again and again: each
/// thread keeps the keys it parsed (at most [`PARSED_KEYS_PER_THREAD`]). Keys that are not
/// on the curve are never kept.
fn parsed_key(pubkey: &PubKey) -> Result<secp256k1::XOnlyPublicKey, EventError> {
    PARSED_KEYS.with_borrow_mut(|keys| {
        if let Some(key) = keys.get(pubkey) {
            return Ok(*key);
        }
        let key = secp256k1::XOnlyPublicKey::from_byte_array(*pubkey.as_bytes())
            .map_err(|_| EventError::BadPubKey)?;
        if keys.len() >= PARSED_KEYS_PER_THREAD {
            keys.clear();
        }
        keys.insert(*pubkey, key);
        Ok(key)
    })
}

/// sha256 of the canonical serialization.
pub fn compute_id(
    pubkey: &PubKey,
    created_at: i64,
    kind: Kind,
    tags: &[Vec<String>],
    content: &str,
) -> EventId {
    let digest = Sha256::digest(canonical_json(pubkey, created_at, kind, tags, content).as_bytes());
    let mut id = [0u8; 32];
    id.copy_from_slice(&digest);
    EventId(id)
}

/// Appends `s` as a JSON string with NIP-01's escaping rules, copying the runs between
/// escaped bytes whole.
fn push_escaped(out: &mut String, s: &str) {
    out.push('"');
    let mut run = 0;
    for (i, b) in s.bytes().enumerate() {
        let escaped = match b {
            b'\n' => "\\n",
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0C => "\\f",
            _ => continue,
        };
        // The escaped bytes are ASCII, so `i` is a character boundary.
        out.push_str(&s[run..i]);
        out.push_str(escaped);
        run = i + 1;
    }
    out.push_str(&s[run..]);
    out.push('"');
}

/// Builds and signs events: used by tests, the load generator and operator tools.
pub mod signing {
    use super::*;

    /// A secret key able to sign events.
    pub struct Keys {
        keypair: secp256k1::Keypair,
        pubkey: PubKey,
    }

    impl Keys {
        /// A fresh random key.
        pub fn generate() -> Self {
            loop {
                let bytes: [u8; 32] = rand::random();
                if let Ok(keys) = Self::from_secret_bytes(bytes) {
                    return keys;
                }
            }
        }

        /// A key from 32 secret bytes; fails for the (astronomically rare) invalid scalars.
        pub fn from_secret_bytes(bytes: [u8; 32]) -> Result<Self, EventError> {
            let sk = secp256k1::SecretKey::from_secret_bytes(bytes)
                .map_err(|_| EventError::BadPubKey)?;
            let keypair = secp256k1::Keypair::from_secret_key(&sk);
            let (xonly, _) = keypair.x_only_public_key();
            Ok(Keys {
                keypair,
                pubkey: PubKey(xonly.to_byte_array()),
            })
        }

        /// The public key.
        pub fn pubkey(&self) -> PubKey {
            self.pubkey
        }

        /// Builds, hashes and signs an event, deterministically (BIP-340 without auxiliary
        /// randomness): the same event gives the same bytes, so generated corpora are
        /// reproducible.
        pub fn sign(
            &self,
            created_at: i64,
            kind: Kind,
            tags: Vec<Vec<String>>,
            content: impl Into<String>,
        ) -> Event {
            self.sign_with(created_at, kind, tags, content.into(), None)
        }

        /// Like [`Keys::sign`], with fresh auxiliary randomness (BIP-340's recommendation,
        /// what clients do): signing the same event twice gives two signatures, so a NIP-98
        /// authorization made twice in one second is never a replay of the first.
        pub fn sign_fresh(
            &self,
            created_at: i64,
            kind: Kind,
            tags: Vec<Vec<String>>,
            content: impl Into<String>,
        ) -> Event {
            let aux: [u8; 32] = rand::random();
            self.sign_with(created_at, kind, tags, content.into(), Some(aux))
        }

        fn sign_with(
            &self,
            created_at: i64,
            kind: Kind,
            tags: Vec<Vec<String>>,
            content: String,
            aux: Option<[u8; 32]>,
        ) -> Event {
            let id = compute_id(&self.pubkey, created_at, kind, &tags, &content);
            let sig = match aux {
                Some(aux) => {
                    secp256k1::schnorr::sign_with_aux_rand(id.as_bytes(), &self.keypair, &aux)
                }
                None => secp256k1::schnorr::sign_no_aux_rand(id.as_bytes(), &self.keypair),
            };
            Event {
                id,
                pubkey: self.pubkey,
                created_at,
                kind,
                tags,
                content,
                sig: Signature(sig.to_byte_array()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::signing::Keys;
    use super::*;

    /// A real event from the network (NIP-01 kind 1), as published by a widely used client.
    const KNOWN_GOOD: &str = r#"{"id":"b9fead6eef87d8400cbc1a5621600b360438affb9760a6a043cc0bddea21dab6","pubkey":"82341f882b6eabcd2ba7f1ef90aad961cf074af15b9ef44a09f9d2a8fbfbe6a2","created_at":1676161639,"kind":1,"tags":[],"content":"this is going to work","sig":"76d19889a803236165a290fa8f3cf5365af8977ee1e002afcfd37063d1355fc755d0293d27ba0ec1c2468acfaf95b7e950e57df275bb32d7a4a3136f8862d2b7"}"#;

    #[test]
    fn known_good_event_verifies() {
        let event = Event::from_json(KNOWN_GOOD).expect("parses");
        assert_eq!(event.compute_id(), event.id);
        event.verify().expect("valid signature");
    }

    #[test]
    fn tampered_content_is_an_id_mismatch() {
        let tampered = KNOWN_GOOD.replace("going to work", "going to fail");
        let event = Event::from_json(&tampered).expect("parses");
        assert_eq!(event.verify(), Err(EventError::IdMismatch));
    }

    #[test]
    fn tampered_signature_fails() {
        let mut event = Event::from_json(KNOWN_GOOD).expect("parses");
        event.sig.0[10] ^= 1;
        assert_eq!(event.verify(), Err(EventError::BadSignature));
    }

    #[test]
    fn kept_keys_still_check_every_signature_and_bad_keys_are_never_kept() {
        let mut event = Event::from_json(KNOWN_GOOD).expect("parses");
        event.verify().expect("valid signature");
        event.sig.0[10] ^= 1;
        assert_eq!(event.verify(), Err(EventError::BadSignature));

        // An x coordinate with no point on the curve.
        let off_curve = (1..=255u8)
            .map(|x| {
                let mut bytes = [0u8; 32];
                bytes[31] = x;
                bytes
            })
            .find(|b| secp256k1::XOnlyPublicKey::from_byte_array(*b).is_err())
            .expect("an x off the curve");
        event.pubkey = PubKey(off_curve);
        event.id = event.compute_id();
        for _ in 0..2 {
            assert_eq!(event.verify(), Err(EventError::BadPubKey));
        }
    }

    #[test]
    fn canonical_escaping_follows_nip01_exactly() {
        let pk = PubKey([0xab; 32]);
        let json = canonical_json(
            &pk,
            1,
            Kind(1),
            &[vec!["t".into(), "a\"b".into()]],
            "l\n\"q\"\\\r\t\u{8}\u{c}\u{1}é/😀",
        );
        let expected = format!(
            "[0,\"{}\",1,1,[[\"t\",\"a\\\"b\"]],\"l\\n\\\"q\\\"\\\\\\r\\t\\b\\f\u{1}é/😀\"]",
            "ab".repeat(32)
        );
        assert_eq!(json, expected);
    }

    #[test]
    fn ids_and_signatures_agree_with_an_independent_implementation() {
        let keys = Keys::generate();
        let contents = [
            "plain",
            "line\nbreak \"quoted\" back\\slash\ttab",
            "ünïcødé 🎉 \u{2028}",
        ];
        for (i, content) in contents.into_iter().enumerate() {
            let ours = keys.sign(
                1_700_000_000 + i as i64,
                Kind(1),
                vec![vec!["p".into(), "x".repeat(3)], vec!["t".into()]],
                content,
            );
            let theirs = nostr::event::Event::from_json(ours.to_json()).expect("nostr parses");
            theirs
                .verify()
                .expect("nostr verifies our id and signature");
            let round = Event::from_json(&theirs.as_json()).expect("we parse theirs");
            round.verify().expect("we verify");
            assert_eq!(round, ours);
        }
    }

    #[test]
    fn shape_errors_are_named() {
        let cases = [
            (
                KNOWN_GOOD.replace("\"id\":\"b9", "\"id\":\"B9"),
                "id must be",
            ),
            (
                KNOWN_GOOD.replace("82341f882b", "82341f88"),
                "pubkey must be",
            ),
            (KNOWN_GOOD.replace("1676161639", "-5"), "created_at"),
            (KNOWN_GOOD.replace("1676161639", "1.5"), "created_at"),
            (KNOWN_GOOD.replace("\"kind\":1", "\"kind\":70000"), "kind"),
            (
                KNOWN_GOOD.replace("\"tags\":[]", "\"tags\":[[]]"),
                "tag 0 is empty",
            ),
            (
                KNOWN_GOOD.replace("\"tags\":[]", "\"tags\":[[1]]"),
                "malformed",
            ),
            (
                KNOWN_GOOD.replace(",\"content\":\"this is going to work\"", ""),
                "content",
            ),
        ];
        for (json, needle) in cases {
            let err = Event::from_json(&json).expect_err(&json).to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }

    #[test]
    fn hex_is_lowercase_digits_of_exact_length() {
        let hex = "00ff10a9".repeat(8);
        let id = EventId::from_hex(&hex).expect("lowercase hex decodes");
        assert_eq!(id.to_hex(), hex);
        assert_eq!(&id.as_bytes()[..4], &[0x00, 0xff, 0x10, 0xa9]);
        let refused = [
            hex.replacen('a', "A", 1),
            hex.replacen('0', "g", 1),
            hex.replacen('1', "/", 1),
            hex.replacen("00", "é", 1),
            hex[1..].to_owned(),
            format!("{hex}00"),
        ];
        for bad in refused {
            assert!(EventId::from_hex(&bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn pow_expiration_and_protection() {
        let mut ev = Event::from_json(KNOWN_GOOD).expect("parses");
        ev.id =
            EventId::from_hex("000006d8c378af1779d2feebc7603a125d99eca0ccf1085959b307f64e5dd358")
                .expect("hex");
        assert_eq!(ev.pow_difficulty(), 21);
        ev.id = EventId::from_hex(&format!("002f{}", "f".repeat(60))).expect("hex");
        assert_eq!(ev.pow_difficulty(), 10);
        ev.id = EventId::from_bytes([0; 32]);
        assert_eq!(ev.pow_difficulty(), 256);
        assert_eq!(ev.expiration(), None);
        ev.tags = vec![
            vec!["expiration".into(), "1600000000".into()],
            vec!["-".into()],
        ];
        assert_eq!(ev.expiration(), Some(1_600_000_000));
        assert!(ev.is_expired(1_600_000_000) && !ev.is_expired(1_599_999_999));
        assert!(ev.is_protected());
        ev.tags = vec![vec!["-".into(), "x".into()]];
        assert!(!ev.is_protected());
    }

    #[test]
    fn reposts_embedding_protected_events_are_recognized() {
        let k = Keys::generate();
        let protected = k.sign(1, Kind(1), vec![vec!["-".into()]], "members only");
        let open = k.sign(1, Kind(1), vec![], "public");
        let repost = |kind: u16, content: String| k.sign(2, Kind(kind), vec![], content);
        assert!(repost(6, protected.to_json()).embeds_protected_event());
        assert!(repost(16, protected.to_json()).embeds_protected_event());
        assert!(!repost(6, open.to_json()).embeds_protected_event());
        assert!(!repost(6, String::new()).embeds_protected_event());
        assert!(!repost(6, "not json".into()).embeds_protected_event());
        // A repeated "tags" key: JavaScript keeps the last (protected), so it is suspect.
        let twice = r#"{"kind":1,"tags":[],"content":"x","tags":[["-"]]}"#;
        assert!(repost(6, twice.into()).embeds_protected_event());
        let twice_open = r#"{"tags":[["-"]],"tags":[]}"#;
        assert!(repost(6, twice_open.into()).embeds_protected_event());
        // Not strictly parsed: suspect too; an object without tags is not.
        let surrogate = r#"{"content":"\ud800","tags":[["-"]]}"#;
        assert!(repost(6, surrogate.into()).embeds_protected_event());
        let escaped_key = r#"{"t\u0061gs":[["-"],5]}"#;
        assert!(repost(6, escaped_key.into()).embeds_protected_event());
        assert!(repost(6, "{not json".into()).embeds_protected_event());
        assert!(!repost(6, r#"{"kind":1}"#.into()).embeds_protected_event());
        // Only reposts: a note quoting the JSON is left alone.
        assert!(!repost(1, protected.to_json()).embeds_protected_event());
    }

    #[test]
    fn kind_classes() {
        for (k, class) in [
            (0, KindClass::Replaceable),
            (1, KindClass::Regular),
            (3, KindClass::Replaceable),
            (4, KindClass::Regular),
            (9999, KindClass::Regular),
            (10000, KindClass::Replaceable),
            (19999, KindClass::Replaceable),
            (20000, KindClass::Ephemeral),
            (29999, KindClass::Ephemeral),
            (30000, KindClass::Addressable),
            (39999, KindClass::Addressable),
            (40000, KindClass::Regular),
        ] {
            assert_eq!(Kind(k).class(), class, "kind {k}");
        }
    }

    #[test]
    fn replace_key_and_indexed_tags() {
        let keys = Keys::generate();
        let tags = vec![
            vec!["d".into(), "slug".into()],
            vec!["d".into(), "second".into()],
            vec!["e".into(), "x".into(), "relay".into()],
            vec!["alt".into(), "long name".into()],
            vec!["p".into()],
        ];
        let addressable = keys.sign(1, Kind(30023), tags.clone(), "");
        assert_eq!(addressable.replace_key(), Some("slug"));
        assert_eq!(
            addressable.indexed_tags().collect::<Vec<_>>(),
            vec![('d', "slug"), ('d', "second"), ('e', "x")]
        );
        assert_eq!(
            keys.sign(1, Kind(30000), vec![], "").replace_key(),
            Some("")
        );
        assert_eq!(
            keys.sign(1, Kind(10002), tags.clone(), "").replace_key(),
            Some("")
        );
        assert_eq!(keys.sign(1, Kind(1), tags, "").replace_key(), None);
    }
}
