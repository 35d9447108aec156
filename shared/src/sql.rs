//! Filters to SQL: each condition becomes an indexed predicate, values are bind parameters.
//!
//! Every query also hides what no client may see: expired events (NIP-40), and events of
//! read-restricted kinds unless the viewer is their author or a `p`-tagged recipient.

use crate::bus::Viewer;
use crate::filter::Filter;
use crate::search::{SEARCH_CONFIG, Search};
use tokio_postgres::types::ToSql;

/// A parameterized query.
#[derive(Default)]
pub struct Query {
    /// The SQL text.
    pub sql: String,
    /// Its bind parameters, in order.
    pub params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Query {
    /// Runs the query on `client` (a prepared, cached statement), traced as a database
    /// client span.
    pub async fn fetch(
        &self,
        client: &impl deadpool_postgres::GenericClient,
    ) -> Result<Vec<tokio_postgres::Row>, crate::store::StoreError> {
        use tracing::Instrument;
        let span = crate::trace_span!(
            "SELECT events",
            otel.kind = "client",
            db.system.name = "postgresql",
            db.operation.name = "SELECT",
            db.collection.name = "events",
        );
        async {
            let stmt = client.prepare_cached(&self.sql).await?;
            Ok(client.query(&stmt, &self.param_refs()).await?)
        }
        .instrument(span)
        .await
    }

    /// Parameters as the driver wants them.
    pub fn param_refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }

    /// Adds a parameter and returns its placeholder (`$n`).
    fn bind(&mut self, p: impl ToSql + Sync + Send + 'static) -> String {
        self.params.push(Box::new(p));
        format!("${}", self.params.len())
    }
}

/// The words of a filter's NIP-50 search, as one text for `websearch_to_tsquery`.
fn search_words(filter: &Filter) -> Option<String> {
    filter.search.as_ref().and_then(Search::words)
}

/// Tag values that can match something stored: Postgres text cannot hold NUL and values
/// with NUL are never indexed, so those are left out (an empty list matches nothing).
fn storable_values(values: &[String]) -> Vec<String> {
    values
        .iter()
        .filter(|v| !v.contains('\0'))
        .cloned()
        .collect()
}

/// The conditions of one filter, ANDed.
fn filter_predicate(q: &mut Query, filter: &Filter) -> String {
    filter_predicate_except(q, filter, None).0
}

/// [`filter_predicate`] without the condition on tag `skip` (it drives the query instead),
/// and the bind parameter holding the filter's [`search_words`] if it has any (bound first,
/// so a ranking can use it too).
fn filter_predicate_except(
    q: &mut Query,
    filter: &Filter,
    skip: Option<char>,
) -> (String, Option<String>) {
    let search = search_words(filter).map(|text| q.bind(text));
    let mut conds: Vec<String> = Vec::new();
    if let Some(ids) = &filter.ids {
        let v: Vec<Vec<u8>> = ids.iter().map(|i| i.as_bytes().to_vec()).collect();
        conds.push(format!("e.id = ANY({})", q.bind(v)));
    }
    if let Some(authors) = &filter.authors {
        let v: Vec<Vec<u8>> = authors.iter().map(|a| a.as_bytes().to_vec()).collect();
        conds.push(format!("e.pubkey = ANY({})", q.bind(v)));
    }
    if let Some(kinds) = &filter.kinds {
        let v: Vec<i32> = kinds.iter().map(|k| i32::from(k.0)).collect();
        conds.push(format!("e.kind = ANY({})", q.bind(v)));
    }
    if let Some(since) = filter.since {
        conds.push(format!("e.created_at >= {}", q.bind(since)));
    }
    if let Some(until) = filter.until {
        conds.push(format!("e.created_at <= {}", q.bind(until)));
    }
    for (letter, values) in filter.tags.iter().filter(|(l, _)| Some(**l) != skip) {
        let name = q.bind(letter.to_string());
        let vals = q.bind(storable_values(values));
        conds.push(format!(
            "e.seq IN (SELECT t.event_seq FROM tags t WHERE t.name = {name} AND t.value = ANY({vals}))"
        ));
    }
    match (&search, &filter.search) {
        (Some(text), _) => conds.push(format!(
            "e.search @@ websearch_to_tsquery('{SEARCH_CONFIG}', {text})"
        )),
        // Extensions only: still only events with search text, as live matching does.
        (None, Some(_)) => conds.push("e.search IS NOT NULL".to_owned()),
        (None, None) => {}
    }
    let pred = if conds.is_empty() {
        "TRUE".to_owned()
    } else {
        conds.join(" AND ")
    };
    (pred, search)
}

/// What every query hides: expired events, and restricted kinds the viewer may not read.
fn visibility(q: &mut Query, viewer: &Viewer, now: i64) -> String {
    let mut conds = vec![format!(
        "(e.expires_at IS NULL OR e.expires_at > {})",
        q.bind(now)
    )];
    if !viewer.restricted_kinds.is_empty() {
        let kinds: Vec<i32> = viewer
            .restricted_kinds
            .iter()
            .map(|k| i32::from(k.0))
            .collect();
        let kinds = q.bind(kinds);
        if viewer.authed.is_empty() {
            conds.push(format!("e.kind <> ALL({kinds})"));
        } else {
            let keys: Vec<Vec<u8>> = viewer
                .authed
                .iter()
                .map(|p| p.as_bytes().to_vec())
                .collect();
            let hexes: Vec<String> = viewer.authed.iter().map(|p| p.to_hex()).collect();
            let keys = q.bind(keys);
            let hexes = q.bind(hexes);
            conds.push(format!(
                "(e.kind <> ALL({kinds}) OR e.pubkey = ANY({keys}) OR \
                 e.seq IN (SELECT t.event_seq FROM tags t WHERE t.name = 'p' AND t.value = ANY({hexes})))"
            ));
        }
    }
    conds.join(" AND ")
}

/// The events of one filter, at most `limit`: newest first (ties: lowest id first), or by
/// relevance when the filter has a `search`.
pub fn events_query(filter: &Filter, viewer: &Viewer, now: i64, limit: i64) -> Query {
    let mut q = Query::default();
    // A tag condition without ids or search drives the query from the tags index
    // (name, value, created_at): walked newest first, it stops after `limit` matches instead
    // of collecting every event that carries a popular tag. Each value is walked on its
    // own (a LATERAL join): Postgres 15 cannot walk `value = ANY(...)` in created_at order,
    // and sorted every match of a popular `#p` instead (40 ms on 500k events, 1.5 ms now).
    let driving = match (&filter.ids, search_words(filter)) {
        (None, None) => filter.tags.iter().next(),
        _ => None,
    };
    let Some((letter, values)) = driving else {
        // The search text is bound once and used by both the condition and the ranking.
        let (pred, search) = filter_predicate_except(&mut q, filter, None);
        let vis = visibility(&mut q, viewer, now);
        let order = match &search {
            Some(text) => format!(
                "ts_rank(e.search, websearch_to_tsquery('{SEARCH_CONFIG}', {text})) DESC, e.created_at DESC, e.id"
            ),
            None => "e.created_at DESC, e.id".to_owned(),
        };
        let limit = q.bind(limit);
        q.sql = format!(
            "SELECT e.id, e.created_at, e.json FROM events e WHERE {pred} AND {vis} ORDER BY {order} LIMIT {limit}"
        );
        return q;
    };
    let name = q.bind(letter.to_string());
    let vals = q.bind(storable_values(values));
    // Kind and time are checked on the tag row, so the walk of the tags index skips rows
    // early, and again on the event by `pred`: a tag row copies both from its event, so the
    // repeat changes no result.
    let mut tag_conds = format!("d.name = {name} AND d.value = v.value");
    if let Some(kinds) = &filter.kinds {
        let v: Vec<i32> = kinds.iter().map(|k| i32::from(k.0)).collect();
        tag_conds.push_str(&format!(" AND d.kind = ANY({})", q.bind(v)));
    }
    if let Some(since) = filter.since {
        tag_conds.push_str(&format!(" AND d.created_at >= {}", q.bind(since)));
    }
    if let Some(until) = filter.until {
        tag_conds.push_str(&format!(" AND d.created_at <= {}", q.bind(until)));
    }
    // Driving implies no search words, so nothing is bound for a ranking.
    let (pred, _) = filter_predicate_except(&mut q, filter, Some(*letter));
    let vis = visibility(&mut q, viewer, now);
    let limit = q.bind(limit);
    // An event tagged with two of the values is found twice: DISTINCT keeps one, before the
    // limit counts it.
    q.sql = format!(
        "SELECT u.id, u.created_at, u.json FROM (SELECT DISTINCT ON (m.id) m.id, m.created_at, m.json \
           FROM unnest({vals}::text[]) AS v(value) \
           CROSS JOIN LATERAL (SELECT e.id, e.created_at, e.json \
             FROM tags d JOIN events e ON e.seq = d.event_seq \
             WHERE {tag_conds} AND {pred} AND {vis} \
             ORDER BY d.created_at DESC, e.id LIMIT {limit}) AS m) AS u \
         ORDER BY u.created_at DESC, u.id LIMIT {limit}"
    );
    q
}

/// The number of events matching any of `filters` (NIP-45); `limit` is not applied. Each
/// filter is its own branch of a `UNION` (which drops events two filters share), so each
/// is planned on its own indexes instead of one predicate ORing them all, which Postgres
/// can only answer by scanning every event.
pub fn count_query(filters: &[&Filter], viewer: &Viewer, now: i64) -> Query {
    let mut q = Query::default();
    let vis = visibility(&mut q, viewer, now);
    let branches: Vec<String> = filters
        .iter()
        .map(|f| {
            let pred = filter_predicate(&mut q, f);
            format!("SELECT e.seq FROM events e WHERE {pred} AND {vis}")
        })
        .collect();
    q.sql = match branches.as_slice() {
        [one] => one.replacen("SELECT e.seq", "SELECT count(*)", 1),
        _ => format!(
            "SELECT count(*) FROM ({}) AS matched",
            branches.join(" UNION ")
        ),
    };
    q
}

/// The `(created_at, id)` of the events matching `filter`, at most `limit` rows, unordered:
/// a NIP-77 item set. The filter's own `limit` does not apply.
pub fn items_query(filter: &Filter, viewer: &Viewer, now: i64, limit: i64) -> Query {
    let mut q = Query::default();
    let pred = filter_predicate(&mut q, filter);
    let vis = visibility(&mut q, viewer, now);
    let limit = q.bind(limit);
    q.sql = format!("SELECT e.created_at, e.id FROM events e WHERE {pred} AND {vis} LIMIT {limit}");
    q
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Kind, PubKey};

    fn filter(v: serde_json::Value) -> Filter {
        Filter::from_value(&v).expect("valid")
    }

    #[test]
    fn every_condition_is_a_bind_parameter() {
        let f = filter(serde_json::json!({
            "ids": ["a".repeat(64)], "authors": ["b".repeat(64)], "kinds": [1],
            "#t": ["x'; drop table events; --"], "since": 1, "until": 2, "search": "it's nostr"
        }));
        let q = events_query(&f, &Viewer::default(), 100, 10);
        assert!(!q.sql.contains("drop table") && !q.sql.contains("it's"));
        assert_eq!(q.params.len(), 10);
        assert!(q.sql.ends_with("LIMIT $10"), "{}", q.sql);
        assert!(q.sql.contains("ORDER BY ts_rank"), "{}", q.sql);
        // The search text is one parameter, used by the condition and the ranking.
        assert_eq!(
            q.sql.matches("websearch_to_tsquery('simple', $1)").count(),
            2,
            "{}",
            q.sql
        );
    }

    #[test]
    fn a_search_of_extensions_only_still_needs_search_text() {
        let f = filter(serde_json::json!({"search": "lang:en", "#t": ["x"]}));
        let q = events_query(&f, &Viewer::default(), 100, 10);
        assert!(q.sql.contains("e.search IS NOT NULL"), "{}", q.sql);
        assert!(!q.sql.contains("websearch_to_tsquery"), "{}", q.sql);
    }

    #[test]
    fn restricted_kinds_depend_on_the_viewer() {
        let f = filter(serde_json::json!({}));
        let anonymous = Viewer {
            authed: vec![],
            restricted_kinds: vec![Kind(4)],
        };
        assert!(
            events_query(&f, &anonymous, 0, 1)
                .sql
                .contains("kind <> ALL($2)")
        );
        let authed = Viewer {
            authed: vec![PubKey::from_bytes([1; 32])],
            ..anonymous
        };
        assert!(
            events_query(&f, &authed, 0, 1)
                .sql
                .contains("pubkey = ANY(")
        );
        let q = count_query(&[&f, &f], &Viewer::default(), 0);
        assert!(
            q.sql.starts_with(
                "SELECT count(*) FROM (SELECT e.seq FROM events e WHERE TRUE AND (e.expires_at IS NULL OR e.expires_at > $1) UNION SELECT e.seq"
            ),
            "{}",
            q.sql
        );
        let q = count_query(&[&f], &Viewer::default(), 0);
        assert!(
            q.sql
                .starts_with("SELECT count(*) FROM events e WHERE TRUE"),
            "{}",
            q.sql
        );
        let tagged = filter(serde_json::json!({"#p": ["a".repeat(64)], "kinds": [3], "limit": 5}));
        let q = events_query(&tagged, &Viewer::default(), 0, 5);
        assert!(
            q.sql.contains(
                "CROSS JOIN LATERAL (SELECT e.id, e.created_at, e.json FROM tags d JOIN events e"
            ) && q.sql.contains("ORDER BY d.created_at DESC"),
            "a tag drives the query: {}",
            q.sql
        );
    }
}
