//! NIP-01 filters: parsing with field checks, in-memory matching, and the wire form.
//!
//! A [`Filter`] is parsed once at the gateway. The same type travels to the query workers
//! (which turn it into SQL) and is matched in memory against live events
//! ([`Filter::matches`]), so the two paths cannot disagree about what a field means.

use std::collections::BTreeMap;

use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::event::{Event, EventId, Kind, PubKey};
use crate::search::{LiveText, Search};

/// Why a filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FilterError {
    /// The filter is not a JSON object.
    #[error("filter must be a JSON object")]
    NotObject,
    /// A field has the wrong JSON type or an out-of-range value.
    #[error("filter field {field}: {reason}")]
    BadField {
        /// The offending key.
        field: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A key this relay does not know (NIP-01 suggests `unsupported:` for these).
    #[error("filter contains unknown element {0:?}")]
    Unknown(String),
    /// A list or a search holds more than the relay serves ([`FilterLimits`]).
    #[error("filter field {field} has {count} values; the limit is {limit}")]
    TooBig {
        /// The offending key (`ids`, `#t`, `search`…).
        field: String,
        /// How many distinct values (or search words) it holds.
        count: usize,
        /// The limit.
        limit: usize,
    },
}

impl FilterError {
    /// The NIP-01 machine-readable prefix for this rejection.
    pub fn prefix(&self) -> &'static str {
        match self {
            FilterError::Unknown(_) => "unsupported",
            FilterError::NotObject | FilterError::BadField { .. } | FilterError::TooBig { .. } => {
                "invalid"
            }
        }
    }
}

/// How big a filter may be: what one `REQ`, `COUNT` or `NEG-OPEN` may make the relay
/// index, match and query. Past a limit the request is refused with `invalid:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterLimits {
    /// Distinct values in one list of one filter: `ids`, `authors`, `kinds`, or one `#x`.
    pub max_values: usize,
    /// Distinct words in one filter's `search`.
    pub max_search_words: usize,
}

/// One NIP-01 filter. `None` means the condition is absent; an empty list matches nothing.
///
/// Every list is sorted and holds each value once (a repeated value asks for nothing more),
/// so matching a live event looks each condition up by binary search, whatever the list's
/// length.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Event ids, any of which may match.
    pub ids: Option<Vec<EventId>>,
    /// Authors, any of which may match.
    pub authors: Option<Vec<PubKey>>,
    /// Kinds, any of which may match.
    pub kinds: Option<Vec<Kind>>,
    /// `#<letter>` conditions: the event must carry at least one of the values for each letter.
    pub tags: BTreeMap<char, Vec<String>>,
    /// Lower bound on `created_at`, inclusive.
    pub since: Option<i64>,
    /// Upper bound on `created_at`, inclusive.
    pub until: Option<i64>,
    /// How many stored events the initial query should return at most.
    pub limit: Option<u64>,
    /// NIP-50 full-text search over `content`.
    pub search: Option<Search>,
}

impl Filter {
    /// Parses a filter from a JSON value, checking every field.
    pub fn from_value(value: &Value) -> Result<Self, FilterError> {
        let obj = value.as_object().ok_or(FilterError::NotObject)?;
        Self::from_object(obj)
    }

    fn from_object(obj: &Map<String, Value>) -> Result<Self, FilterError> {
        let mut filter = Filter::default();
        for (key, value) in obj {
            match key.as_str() {
                "ids" => filter.ids = Some(hex_list(key, value, EventId::from_hex)?),
                "authors" => filter.authors = Some(hex_list(key, value, PubKey::from_hex)?),
                "kinds" => filter.kinds = Some(kind_list(key, value)?),
                "since" => filter.since = Some(timestamp(key, value)?),
                "until" => filter.until = Some(timestamp(key, value)?),
                "search" => {
                    filter.search = Some(Search::new(
                        value
                            .as_str()
                            .ok_or_else(|| bad(key, "must be a string"))?
                            .to_owned(),
                    ))
                }
                "limit" => {
                    filter.limit = Some(
                        value
                            .as_u64()
                            .ok_or_else(|| bad(key, "must be a non-negative integer"))?,
                    )
                }
                _ => match tag_letter(key) {
                    Some(letter) => {
                        let values = string_list(key, value)?;
                        // NIP-01: #e and #p values must be 64-char lowercase hex.
                        if matches!(letter, 'e' | 'p') {
                            for v in &values {
                                EventId::from_hex(v).map_err(|_| {
                                    bad(key, "values must be 64 lowercase hex characters")
                                })?;
                            }
                        }
                        filter.tags.insert(letter, values);
                    }
                    None => return Err(FilterError::Unknown(crate::event::clip(key))),
                },
            }
        }
        if let Some(ids) = &mut filter.ids {
            sort_dedup(ids);
        }
        if let Some(authors) = &mut filter.authors {
            sort_dedup(authors);
        }
        if let Some(kinds) = &mut filter.kinds {
            sort_dedup(kinds);
        }
        for values in filter.tags.values_mut() {
            sort_dedup(values);
        }
        Ok(filter)
    }

    /// Refuses a filter bigger than `limits` allow; the error names the field.
    pub fn check_limits(&self, limits: &FilterLimits) -> Result<(), FilterError> {
        let lists = [
            ("ids", self.ids.as_ref().map(Vec::len)),
            ("authors", self.authors.as_ref().map(Vec::len)),
            ("kinds", self.kinds.as_ref().map(Vec::len)),
        ];
        let tags = self
            .tags
            .iter()
            .map(|(letter, values)| (format!("#{letter}"), values.len()));
        let too_big = |field: String, count: usize, limit: usize| FilterError::TooBig {
            field,
            count,
            limit,
        };
        for (field, count) in lists
            .into_iter()
            .filter_map(|(f, n)| Some((f.to_owned(), n?)))
            .chain(tags)
        {
            if count > limits.max_values {
                return Err(too_big(field, count, limits.max_values));
            }
        }
        let words = self.search.as_ref().map_or(0, Search::word_count);
        if words > limits.max_search_words {
            return Err(too_big("search".into(), words, limits.max_search_words));
        }
        Ok(())
    }

    /// Distinct values in all of this filter's lists (what a `REQ`'s total is counted in).
    pub fn value_count(&self) -> usize {
        self.ids.as_ref().map_or(0, Vec::len)
            + self.authors.as_ref().map_or(0, Vec::len)
            + self.kinds.as_ref().map_or(0, Vec::len)
            + self.tags.values().map(Vec::len).sum::<usize>()
            + self.search.as_ref().map_or(0, Search::word_count)
    }

    /// About how many bytes of memory this filter holds, for bounding what one connection's
    /// subscriptions may keep in a gateway.
    pub fn approx_bytes(&self) -> usize {
        const ENTRY: usize = std::mem::size_of::<String>();
        std::mem::size_of::<Filter>()
            + self.ids.as_ref().map_or(0, |v| v.len() * 32)
            + self.authors.as_ref().map_or(0, |v| v.len() * 32)
            + self.kinds.as_ref().map_or(0, |v| v.len() * 2)
            + self
                .tags
                .values()
                .flatten()
                .map(|v| v.len() + ENTRY)
                .sum::<usize>()
            + self
                .search
                .as_ref()
                .map_or(0, |s| 2 * s.query().len() + ENTRY * s.word_count())
    }

    /// Whether `event` satisfies every condition of this filter (`limit` is ignored).
    pub fn matches(&self, event: &Event) -> bool {
        self.matches_live(event, &LiveText::new(event))
    }

    /// [`Filter::matches`] with the event's [`LiveText`], shared by every filter the event
    /// is matched against (live delivery), so a search lowercases the content only once.
    pub fn matches_live(&self, event: &Event, text: &LiveText<'_>) -> bool {
        if let Some(ids) = &self.ids
            && ids.binary_search(&event.id).is_err()
        {
            return false;
        }
        if let Some(authors) = &self.authors
            && authors.binary_search(&event.pubkey).is_err()
        {
            return false;
        }
        if let Some(kinds) = &self.kinds
            && kinds.binary_search(&event.kind).is_err()
        {
            return false;
        }
        if self.since.is_some_and(|since| event.created_at < since) {
            return false;
        }
        if self.until.is_some_and(|until| event.created_at > until) {
            return false;
        }
        let tags_match = self.tags.iter().all(|(letter, wanted)| {
            event.indexed_tags().any(|(l, v)| {
                l == *letter && wanted.binary_search_by(|w| w.as_str().cmp(v)).is_ok()
            })
        });
        // Last: it lowercases the content (once per event).
        tags_match
            && self
                .search
                .as_ref()
                .is_none_or(|search| search.matches(text))
    }

    /// Whether this filter can match nothing at all (an empty list in some condition, or
    /// `since` after `until`), so no query needs to run for it.
    pub fn is_empty_set(&self) -> bool {
        self.ids.as_ref().is_some_and(Vec::is_empty)
            || self.authors.as_ref().is_some_and(Vec::is_empty)
            || self.kinds.as_ref().is_some_and(Vec::is_empty)
            || self.tags.values().any(Vec::is_empty)
            || matches!((self.since, self.until), (Some(s), Some(u)) if s > u)
    }
}

/// Sorts a list and drops repeated values.
fn sort_dedup<T: Ord>(list: &mut Vec<T>) {
    list.sort_unstable();
    list.dedup();
}

fn bad(key: &str, reason: &'static str) -> FilterError {
    FilterError::BadField {
        field: crate::event::clip(key),
        reason,
    }
}

/// `#x` with one ASCII letter x gives `Some('x')`.
fn tag_letter(key: &str) -> Option<char> {
    let rest = key.strip_prefix('#')?;
    let mut chars = rest.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) if c.is_ascii_alphabetic() => Some(c),
        _ => None,
    }
}

fn array<'a>(key: &str, value: &'a Value) -> Result<&'a Vec<Value>, FilterError> {
    value.as_array().ok_or_else(|| bad(key, "must be an array"))
}

fn hex_list<T>(
    key: &str,
    value: &Value,
    parse: impl Fn(&str) -> Result<T, crate::event::EventError>,
) -> Result<Vec<T>, FilterError> {
    array(key, value)?
        .iter()
        .map(|v| {
            v.as_str()
                .and_then(|s| parse(s).ok())
                .ok_or_else(|| bad(key, "values must be 64 lowercase hex characters"))
        })
        .collect()
}

fn kind_list(key: &str, value: &Value) -> Result<Vec<Kind>, FilterError> {
    array(key, value)?
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .map(Kind)
                .ok_or_else(|| bad(key, "values must be integers 0..=65535"))
        })
        .collect()
}

fn string_list(key: &str, value: &Value) -> Result<Vec<String>, FilterError> {
    array(key, value)?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| bad(key, "values must be strings"))
        })
        .collect()
}

fn timestamp(key: &str, value: &Value) -> Result<i64, FilterError> {
    value
        .as_i64()
        .ok_or_else(|| bad(key, "must be an integer unix timestamp"))
}

impl Serialize for Filter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        if let Some(ids) = &self.ids {
            map.serialize_entry("ids", ids)?;
        }
        if let Some(authors) = &self.authors {
            map.serialize_entry("authors", authors)?;
        }
        if let Some(kinds) = &self.kinds {
            map.serialize_entry("kinds", kinds)?;
        }
        for (letter, values) in &self.tags {
            map.serialize_entry(&format!("#{letter}"), values)?;
        }
        if let Some(since) = self.since {
            map.serialize_entry("since", &since)?;
        }
        if let Some(until) = self.until {
            map.serialize_entry("until", &until)?;
        }
        if let Some(limit) = self.limit {
            map.serialize_entry("limit", &limit)?;
        }
        if let Some(search) = &self.search {
            map.serialize_entry("search", search.query())?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Filter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        Filter::from_value(&value).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::signing::Keys;
    use serde_json::json;

    fn parse(v: Value) -> Result<Filter, FilterError> {
        Filter::from_value(&v)
    }

    #[test]
    fn parses_every_field_and_round_trips() {
        let hex = "a".repeat(64);
        let v = json!({"ids":[hex],"authors":[hex],"kinds":[1,30023],"#e":[hex],"#t":["nostr"],
                       "#T":["x"],"since":10,"until":20,"limit":5,"search":"best nostr"});
        let f = parse(v.clone()).expect("valid");
        assert_eq!(f.kinds, Some(vec![Kind(1), Kind(30023)]));
        assert_eq!(f.tags.len(), 3);
        assert_eq!(serde_json::to_value(&f).expect("serializes"), v);
    }

    #[test]
    fn refuses_bad_fields_with_the_right_prefix() {
        let cases = [
            (json!([]), "invalid"),
            (json!({"ids":["ABC"]}), "invalid"),
            (json!({"authors":"x"}), "invalid"),
            (json!({"#e":["nothex"]}), "invalid"),
            (json!({"#p":[1]}), "invalid"),
            (json!({"kinds":[70000]}), "invalid"),
            (json!({"kinds":[-1]}), "invalid"),
            (json!({"limit":-1}), "invalid"),
            (json!({"since":"yesterday"}), "invalid"),
            (json!({"#emoji":["x"]}), "unsupported"),
            (json!({"foo":1}), "unsupported"),
            (json!({"search":5}), "invalid"),
        ];
        for (v, prefix) in cases {
            let err = parse(v.clone()).expect_err(&v.to_string());
            assert_eq!(err.prefix(), prefix, "{v}: {err}");
        }
    }

    #[test]
    fn matching_follows_every_condition() {
        let keys = Keys::generate();
        let other = Keys::generate();
        let ev = keys.sign(
            100,
            Kind(1),
            vec![
                vec!["t".into(), "nostr".into()],
                vec!["e".into(), "b".repeat(64), "wss://x".into()],
                vec!["t".into(), "second".into()],
                vec!["subject".into(), "nostr".into()],
            ],
            "hi",
        );
        let pk = keys.pubkey().to_hex();
        let id = ev.id.to_hex();
        let cases = [
            (json!({}), true),
            (json!({"ids":[id]}), true),
            (json!({"ids":["c".repeat(64)]}), false),
            (json!({"ids":[]}), false),
            (json!({"authors":[other.pubkey().to_hex(), pk]}), true),
            (json!({"authors":[other.pubkey().to_hex()]}), false),
            (json!({"kinds":[0,1]}), true),
            (json!({"kinds":[7]}), false),
            (json!({"since":100,"until":100}), true),
            (json!({"since":101}), false),
            (json!({"until":99}), false),
            (json!({"#t":["second"]}), true),
            (json!({"#t":["other"]}), false),
            (json!({"#e":["b".repeat(64)]}), true),
            (json!({"#s":["nostr"]}), false),
            (
                json!({"#t":["nostr"],"kinds":[1],"authors":[pk],"limit":0}),
                true,
            ),
            (json!({"#t":["nostr"],"kinds":[2]}), false),
            (json!({"search":"HI"}), true),
            (json!({"search":"hi there"}), false),
            (json!({"search":"hi lang:en"}), true),
        ];
        for (v, expected) in cases {
            assert_eq!(
                parse(v.clone()).expect("valid").matches(&ev),
                expected,
                "{v}"
            );
        }
        // Ciphertext is not searched, even when a query happens to be in it.
        let dm = keys.sign(100, Kind(4), vec![], "hi?iv=abc");
        assert!(!parse(json!({"search":"hi"})).expect("valid").matches(&dm));
        assert!(parse(json!({"kinds":[4]})).expect("valid").matches(&dm));
    }

    #[test]
    fn empty_sets_are_recognised() {
        assert!(parse(json!({"authors":[]})).expect("valid").is_empty_set());
        assert!(
            parse(json!({"since":5,"until":4}))
                .expect("valid")
                .is_empty_set()
        );
        assert!(
            !parse(json!({"since":5,"until":5}))
                .expect("valid")
                .is_empty_set()
        );
    }
}
