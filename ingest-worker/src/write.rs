//! Writing events to Postgres: one transaction per batch, keep-newest enforced by the
//! database's unique replacement key (see `shared::store`).

use deadpool_postgres::Pool;
use shared::event::Event;
use shared::store::StoreError;

/// What happened to one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Newly committed.
    Stored,
    /// Already stored before.
    Duplicate,
    /// A replaceable or addressable event older than (or tied with a lower id than) the
    /// version already stored; not stored.
    Superseded,
}

/// An event ready to write, with the JSON it will be served as.
pub struct Pending<'a> {
    /// The verified event.
    pub event: &'a Event,
    /// `event.to_json()`, computed once.
    pub json: &'a str,
}

/// Longest tag value indexed for `#x` queries, in bytes. Postgres btree entries are limited
/// to about 2.7 kB; longer values are kept in the event but cannot be queried by tag.
const MAX_INDEXED_TAG_VALUE: usize = 1024;

const INSERT_REGULAR: &str = "INSERT INTO events (id, pubkey, kind, created_at, d_tag, json) \
     VALUES ($1, $2, $3, $4, NULL, $5) ON CONFLICT (id) DO NOTHING RETURNING seq";

const UPSERT_REPLACEABLE: &str = "INSERT INTO events (id, pubkey, kind, created_at, d_tag, json) \
     VALUES ($1, $2, $3, $4, $5, $6) \
     ON CONFLICT (pubkey, kind, d_tag) WHERE d_tag IS NOT NULL DO UPDATE \
     SET id = EXCLUDED.id, created_at = EXCLUDED.created_at, json = EXCLUDED.json \
     WHERE EXCLUDED.created_at > events.created_at \
        OR (EXCLUDED.created_at = events.created_at AND EXCLUDED.id < events.id) \
     RETURNING seq, (xmax = 0) AS inserted";

const ID_EXISTS: &str = "SELECT 1 FROM events WHERE id = $1";

const DELETE_TAGS: &str = "DELETE FROM tags WHERE event_seq = $1";

const INSERT_TAGS: &str = "INSERT INTO tags (event_seq, name, value, kind, created_at) \
     SELECT $1, n, v, $4, $5 FROM unnest($2::text[], $3::text[]) AS t(n, v)";

/// Stores a batch in one transaction. If the transaction fails as a whole (a deadlock with
/// another worker, say), each event is retried in its own transaction so one bad event
/// cannot fail its neighbours.
pub async fn store_batch(db: &Pool, batch: &[Pending<'_>]) -> Vec<Result<Outcome, StoreError>> {
    match store_in_tx(db, batch).await {
        Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
        Err(e) if batch.len() > 1 => {
            tracing::warn!(error = %e, size = batch.len(), "batch write failed; retrying events one by one");
            let mut results = Vec::with_capacity(batch.len());
            for one in batch {
                let result = store_in_tx(db, std::slice::from_ref(one)).await;
                results.push(result.map(|v| v.first().copied().unwrap_or(Outcome::Duplicate)));
            }
            results
        }
        Err(e) => vec![Err(e)],
    }
}

async fn store_in_tx(db: &Pool, batch: &[Pending<'_>]) -> Result<Vec<Outcome>, StoreError> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let insert_regular = tx.prepare_cached(INSERT_REGULAR).await?;
    let upsert_replaceable = tx.prepare_cached(UPSERT_REPLACEABLE).await?;
    let id_exists = tx.prepare_cached(ID_EXISTS).await?;
    let delete_tags = tx.prepare_cached(DELETE_TAGS).await?;
    let insert_tags = tx.prepare_cached(INSERT_TAGS).await?;

    let mut outcomes = Vec::with_capacity(batch.len());
    for Pending { event, json } in batch {
        let id = event.id.as_bytes().as_slice();
        let pubkey = event.pubkey.as_bytes().as_slice();
        let kind = i32::from(event.kind.0);
        let (seq, replaced) = match event.replace_key() {
            None => {
                let row = tx
                    .query_opt(
                        &insert_regular,
                        &[&id, &pubkey, &kind, &event.created_at, json],
                    )
                    .await?;
                (row.map(|r| r.get::<_, i64>(0)), false)
            }
            Some(d_tag) => {
                let row = tx
                    .query_opt(
                        &upsert_replaceable,
                        &[&id, &pubkey, &kind, &event.created_at, &d_tag, json],
                    )
                    .await?;
                match row {
                    Some(r) => (Some(r.get::<_, i64>(0)), !r.get::<_, bool>(1)),
                    None => (None, false),
                }
            }
        };
        let Some(seq) = seq else {
            let exists = tx.query_opt(&id_exists, &[&id]).await?.is_some();
            outcomes.push(if exists {
                Outcome::Duplicate
            } else {
                Outcome::Superseded
            });
            continue;
        };
        if replaced {
            tx.execute(&delete_tags, &[&seq]).await?;
        }
        let (names, values): (Vec<String>, Vec<&str>) = event
            .indexed_tags()
            .filter(|(_, v)| v.len() <= MAX_INDEXED_TAG_VALUE && !v.contains('\0'))
            .map(|(n, v)| (n.to_string(), v))
            .unzip();
        if !names.is_empty() {
            tx.execute(
                &insert_tags,
                &[&seq, &names, &values, &kind, &event.created_at],
            )
            .await?;
        }
        outcomes.push(Outcome::Stored);
    }
    tx.commit().await?;
    Ok(outcomes)
}
