//! Filters to SQL: each condition becomes an indexed predicate, values are bind parameters.

use shared::filter::Filter;
use tokio_postgres::types::ToSql;

/// A parameterized query for one filter.
pub struct FilterQuery {
    /// `SELECT id, created_at, json FROM events WHERE … ORDER BY … LIMIT …`.
    pub sql: String,
    /// Its bind parameters, in order.
    pub params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl FilterQuery {
    /// Parameters as the driver wants them.
    pub fn param_refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

/// Builds the query for `filter`, returning at most `limit` rows newest first (ties: lowest
/// id first).
pub fn filter_query(filter: &Filter, limit: i64) -> FilterQuery {
    let mut q = FilterQuery {
        sql: String::new(),
        params: Vec::new(),
    };
    let mut conds: Vec<String> = Vec::new();
    let bind = |q: &mut FilterQuery, p: Box<dyn ToSql + Sync + Send>| {
        q.params.push(p);
        format!("${}", q.params.len())
    };
    if let Some(ids) = &filter.ids {
        let v: Vec<Vec<u8>> = ids.iter().map(|i| i.as_bytes().to_vec()).collect();
        conds.push(format!("id = ANY({})", bind(&mut q, Box::new(v))));
    }
    if let Some(authors) = &filter.authors {
        let v: Vec<Vec<u8>> = authors.iter().map(|a| a.as_bytes().to_vec()).collect();
        conds.push(format!("pubkey = ANY({})", bind(&mut q, Box::new(v))));
    }
    if let Some(kinds) = &filter.kinds {
        let v: Vec<i32> = kinds.iter().map(|k| i32::from(k.0)).collect();
        conds.push(format!("kind = ANY({})", bind(&mut q, Box::new(v))));
    }
    if let Some(since) = filter.since {
        conds.push(format!("created_at >= {}", bind(&mut q, Box::new(since))));
    }
    if let Some(until) = filter.until {
        conds.push(format!("created_at <= {}", bind(&mut q, Box::new(until))));
    }
    for (letter, values) in &filter.tags {
        let name = bind(&mut q, Box::new(letter.to_string()));
        let vals = bind(&mut q, Box::new(values.clone()));
        conds.push(format!(
            "seq IN (SELECT t.event_seq FROM tags t WHERE t.name = {name} AND t.value = ANY({vals}))"
        ));
    }
    let limit = bind(&mut q, Box::new(limit));
    let where_clause = if conds.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conds.join(" AND "))
    };
    q.sql = format!(
        "SELECT id, created_at, json FROM events {where_clause} ORDER BY created_at DESC, id LIMIT {limit}"
    );
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_condition_is_a_bind_parameter() {
        let filter = Filter::from_value(&serde_json::json!({
            "ids": ["a".repeat(64)], "authors": ["b".repeat(64)], "kinds": [1],
            "#t": ["x'; drop table events; --"], "since": 1, "until": 2
        }))
        .expect("valid");
        let q = filter_query(&filter, 10);
        assert_eq!(q.params.len(), 8);
        assert!(!q.sql.contains("drop table"));
        assert!(
            q.sql.ends_with("ORDER BY created_at DESC, id LIMIT $8"),
            "{}",
            q.sql
        );
    }
}
