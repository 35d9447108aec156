//! NIP-50 search: the words of a query, which events are searched and by what text, and
//! the text-search configuration Postgres indexes and queries with.
//!
//! Stored events are found by Postgres full-text search (the ingest worker stores
//! [`stored_text`] as a `tsvector`, the query workers rank by it); live events are matched
//! in memory by [`Search::matches`]. Both look only at events with a [`stored_text`], so
//! they agree on which events a search can find: never the ciphertext kinds
//! ([`Kind::is_searchable`]), not even for a query of extensions only.
//!
//! They differ in how a word matches: Postgres compares whole tokens and reads
//! `websearch_to_tsquery` syntax (`or`, `-word`, quotes), while live matching splits the
//! content into words (runs of letters and digits) once per event and looks each query word
//! up as the start of one of them, so a live `relay` also matches "relays". A lookup is a
//! binary search: matching costs the same whatever the content's length, and one
//! subscription's many words cannot make every live event expensive.
//!
//! [`Kind::is_searchable`]: crate::event::Kind::is_searchable

use std::borrow::Cow;
use std::cell::OnceCell;

use crate::event::Event;

/// The text search configuration used for NIP-50 (no stemming, no stop words: works the
/// same for every language). The stored vectors were built with it, and so was the schema's
/// `store_regular_events` (migration 3): changing it takes a migration that rebuilds both.
pub const SEARCH_CONFIG: &str = "simple";

/// A filter's `search` field: the query as the client sent it, and its words, split once
/// when the filter is parsed rather than for every live event it is matched against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Search {
    query: String,
    /// Lowercased, without `key:value` extensions (which this relay does not support and
    /// ignores) and without NUL.
    terms: Vec<String>,
    /// The terms' runs of letters and digits, each once: what live matching looks up.
    parts: Vec<String>,
}

impl Search {
    /// A search for `query`.
    pub fn new(query: String) -> Self {
        let mut terms: Vec<String> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let words = query
            .split_whitespace()
            .filter(|w| !w.contains(':'))
            .map(|w| w.replace('\0', "").to_lowercase())
            .filter(|w| !w.is_empty());
        // A repeated word asks for nothing more; kept once, in the order given.
        for word in words {
            if seen.insert(word.clone()) {
                terms.push(word);
            }
        }
        let mut parts: Vec<String> = terms.iter().flat_map(|t| words_of(t)).collect();
        parts.sort_unstable();
        parts.dedup();
        Search {
            query,
            terms,
            parts,
        }
    }

    /// How many distinct words the query holds (what `FilterLimits::max_search_words`
    /// bounds).
    ///
    /// [`FilterLimits::max_search_words`]: crate::filter::FilterLimits::max_search_words
    pub fn word_count(&self) -> usize {
        self.terms.len()
    }

    /// The query as the client sent it.
    pub fn query(&self) -> &str {
        &self.query
    }

    /// The words to search for, as one text for Postgres's `websearch_to_tsquery`; `None`
    /// when the query has no words (only extensions), which searches for nothing in
    /// particular.
    pub fn words(&self) -> Option<String> {
        (!self.terms.is_empty()).then(|| self.terms.join(" "))
    }

    /// In-memory matching for live events: an event with a [`stored_text`] (as stored
    /// queries only see those) one of whose words starts with each part of each query word,
    /// ignoring case. The event comes as its [`LiveText`], shared by every search it is
    /// matched against, so its content is split into words once, not once per search.
    pub fn matches(&self, text: &LiveText<'_>) -> bool {
        if self.terms.is_empty() {
            return text.has_text();
        }
        if self.parts.is_empty() {
            // Words without letters or digits ("🎉"): Postgres finds nothing for them either.
            return false;
        }
        let words = text.words();
        !words.is_empty()
            && self.parts.iter().all(|part| {
                // The smallest word not below `part` is the one it could start.
                let at = words.partition_point(|w| w.as_str() < part.as_str());
                words.get(at).is_some_and(|w| w.starts_with(part.as_str()))
            })
    }
}

/// The runs of letters and digits of `text`, lowercased.
fn words_of(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

/// An event's [`stored_text`] as sorted lowercase words, made the first time a search
/// needs them.
pub struct LiveText<'a> {
    event: &'a Event,
    words: OnceCell<Vec<String>>,
}

impl<'a> LiveText<'a> {
    /// Nothing is computed until a search asks.
    pub fn new(event: &'a Event) -> Self {
        LiveText {
            event,
            words: OnceCell::new(),
        }
    }

    fn has_text(&self) -> bool {
        !stored_text(self.event).is_empty()
    }

    fn words(&self) -> &[String] {
        self.words.get_or_init(|| {
            let mut words: Vec<String> = words_of(&stored_text(self.event)).collect();
            words.sort_unstable();
            words.dedup();
            words
        })
    }
}

/// The text an event is indexed by: its content without NUL, which Postgres text cannot
/// hold (copied only when there is one), or `""` (nothing indexed) for kinds not searched.
pub fn stored_text(event: &Event) -> Cow<'_, str> {
    if !event.kind.is_searchable() {
        "".into()
    } else if event.content.contains('\0') {
        event.content.replace('\0', "").into()
    } else {
        event.content.as_str().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Kind;
    use crate::event::signing::Keys;

    fn finds(search: &Search, event: &Event) -> bool {
        search.matches(&LiveText::new(event))
    }

    fn note(kind: u16, content: &str) -> Event {
        Keys::generate().sign(1, Kind(kind), vec![], content.to_owned())
    }

    #[test]
    fn words_are_lowercased_without_extensions_or_nul() {
        let s = Search::new("Best  NOSTR lang:en a\0b".into());
        assert_eq!(s.query(), "Best  NOSTR lang:en a\0b");
        assert_eq!(s.words().as_deref(), Some("best nostr ab"));
        assert_eq!(Search::new("lang:en".into()).words(), None);
    }

    #[test]
    fn live_matching_needs_every_word_in_a_searched_kind() {
        let s = Search::new("Hello WORLD".into());
        assert!(finds(&s, &note(1, "hello there, big world")));
        assert!(!finds(&s, &note(1, "hello there")));
        // A word matches the start of a content word, across punctuation and case.
        let relay = Search::new("relay nostr.com".into());
        assert!(finds(&relay, &note(1, "Two RELAYS at nostr.com!")));
        assert!(!finds(&relay, &note(1, "norelay at nostr.com")));
        assert!(!finds(&relay, &note(1, "relays at nostr.org")));
        // Ciphertext kinds are not searched, even when the words happen to be in them.
        assert!(!finds(&s, &note(4, "hello world")));
        // A query of extensions only finds what has search text: not ciphertext, nor an
        // empty content (stored queries cannot find those either).
        let extensions = Search::new("lang:en".into());
        assert!(finds(&extensions, &note(1, "x")));
        assert!(!finds(&extensions, &note(4, "x")));
        assert!(!finds(&extensions, &note(1, "")));
    }

    #[test]
    fn stored_text_leaves_out_nul_and_unsearched_kinds() {
        assert_eq!(stored_text(&note(1, "a\0b")), "ab");
        assert!(matches!(stored_text(&note(1, "ab")), Cow::Borrowed("ab")));
        assert_eq!(stored_text(&note(1059, "ciphertext")), "");
    }
}
