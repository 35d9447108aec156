//! Checks shared by the fuzz targets (included with `#[path]`, not a crate of its own).

use shared::event::Event;

/// An event must survive its own wire form: `to_json` re-parses to the same event, and the
/// canonical serialization decodes back to the signed fields (so no two different events
/// share one canonical form, which would let one signature cover both).
pub fn check_event(event: &Event) {
    // Either verdict is fine; it must not panic.
    let _ = event.verify();
    let json = event.to_json();
    let back = Event::from_json(&json)
        .unwrap_or_else(|e| panic!("to_json output does not re-parse: {e}\n{json}"));
    assert_eq!(&back, event, "to_json round trip changed the event\n{json}");
    assert_eq!(back.compute_id(), event.compute_id());
    let canonical = event.canonical_json();
    let decoded = decode_canonical(&canonical)
        .unwrap_or_else(|| panic!("canonical form does not decode: {canonical:?}"));
    assert_eq!(decoded.0, event.pubkey.to_hex(), "{canonical:?}");
    assert_eq!(decoded.1, event.created_at, "{canonical:?}");
    assert_eq!(decoded.2, u64::from(event.kind.0), "{canonical:?}");
    assert_eq!(decoded.3, event.tags, "{canonical:?}");
    assert_eq!(decoded.4, event.content, "{canonical:?}");
}

type Canonical = (String, i64, u64, Vec<Vec<String>>, String);

/// An independent reader for NIP-01's canonical form `[0,"<pubkey>",<created_at>,<kind>,
/// [[<str>,...],...],<str>]`, whose strings escape exactly `\n \" \\ \r \t \b \f` and carry
/// every other character verbatim. Returns `None` for anything else.
fn decode_canonical(s: &str) -> Option<Canonical> {
    let mut r = Reader { rest: s };
    r.eat("[0,")?;
    let pubkey = r.string()?;
    r.eat(",")?;
    let created_at = r.integer()?;
    r.eat(",")?;
    let kind = u64::try_from(r.integer()?).ok()?;
    r.eat(",[")?;
    let mut tags = Vec::new();
    if !r.rest.starts_with(']') {
        loop {
            r.eat("[")?;
            let mut tag = vec![r.string()?];
            while r.rest.starts_with(',') {
                r.eat(",")?;
                tag.push(r.string()?);
            }
            r.eat("]")?;
            tags.push(tag);
            if r.rest.starts_with(',') {
                r.eat(",")?;
            } else {
                break;
            }
        }
    }
    r.eat("],")?;
    let content = r.string()?;
    r.eat("]")?;
    r.rest
        .is_empty()
        .then_some((pubkey, created_at, kind, tags, content))
}

struct Reader<'a> {
    rest: &'a str,
}

impl Reader<'_> {
    fn eat(&mut self, token: &str) -> Option<()> {
        self.rest = self.rest.strip_prefix(token)?;
        Some(())
    }

    fn integer(&mut self) -> Option<i64> {
        let end = self
            .rest
            .char_indices()
            .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && c == '-')))
            .map_or(self.rest.len(), |(i, _)| i);
        let n = self.rest[..end].parse().ok()?;
        self.rest = &self.rest[end..];
        Some(n)
    }

    fn string(&mut self) -> Option<String> {
        self.eat("\"")?;
        let mut out = String::new();
        let mut chars = self.rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.rest = &self.rest[i + 1..];
                    return Some(out);
                }
                '\\' => out.push(match chars.next()?.1 {
                    'n' => '\n',
                    '"' => '"',
                    '\\' => '\\',
                    'r' => '\r',
                    't' => '\t',
                    'b' => '\u{08}',
                    'f' => '\u{0C}',
                    _ => return None,
                }),
                // These seven must always be escaped.
                '\n' | '\r' | '\t' | '\u{08}' | '\u{0C}' => return None,
                c => out.push(c),
            }
        }
        None
    }
}
