//! NIP-77 negentropy, the responder side. A round carries everything it needs (the filter,
//! the viewer and the initiator's message), so the worker keeps no session: it loads the
//! item set, answers the message and forgets. Each round reloads the items.

use deadpool_postgres::Pool;
use negentropy::{Id, Negentropy, NegentropyStorageVector};
use shared::bus::Viewer;
use shared::filter::Filter;
use shared::message::NegMessage;
use shared::sql::items_query;

/// The largest responder message, in bytes (hex on the wire doubles it). The initiator asks
/// again for what did not fit, so this bounds one reply, not what a session can learn.
const FRAME_SIZE_LIMIT: u64 = 128 * 1024;

/// Answers one negentropy round: the responder's message, or `prefix: text` for `NEG-ERR`.
/// More than `max_items` matching events is `blocked:`.
pub async fn reconcile(
    db: &Pool,
    filter: &Filter,
    viewer: &Viewer,
    message: &NegMessage,
    max_items: u64,
) -> Result<NegMessage, String> {
    let items = if filter.is_empty_set() {
        Vec::new()
    } else {
        load_items(db, filter, viewer, max_items)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "loading negentropy items failed");
                "error: could not query the database".to_owned()
            })?
    };
    tracing::Span::current().record("nostr.results", items.len());
    if items.len() as u64 > max_items {
        return Err("blocked: this query is too big".to_owned());
    }
    let query = message.to_bytes();
    let answered = tokio::task::spawn_blocking(move || respond(items, &query))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "negentropy task failed");
            "error: could not reconcile".to_owned()
        })??;
    NegMessage::from_bytes(&answered).map_err(|e| format!("error: {e}"))
}

/// The `(created_at, id)` pairs of the filter's visible events: at most `max_items + 1`, so
/// a set over the cap is recognised without loading all of it.
async fn load_items(
    db: &Pool,
    filter: &Filter,
    viewer: &Viewer,
    max_items: u64,
) -> Result<Vec<(u64, [u8; 32])>, shared::store::StoreError> {
    let client = db.get().await?;
    let limit = i64::try_from(max_items.saturating_add(1)).unwrap_or(i64::MAX);
    let q = items_query(filter, viewer, shared::unix_now(), limit);
    let rows = q.fetch(&client).await?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            // Negentropy timestamps are unsigned; an event before 1970 cannot take part.
            let created_at = u64::try_from(row.get::<_, i64>(0)).ok()?;
            let id = <[u8; 32]>::try_from(row.get::<_, &[u8]>(1)).ok()?;
            Some((created_at, id))
        })
        .collect())
}

/// Runs the responder over `items` (CPU-bound: sorts and hashes the whole set).
fn respond(items: Vec<(u64, [u8; 32])>, query: &[u8]) -> Result<Vec<u8>, String> {
    let internal = |e: negentropy::Error| {
        tracing::error!(error = %e, "negentropy storage failed");
        "error: could not reconcile".to_owned()
    };
    let mut storage = NegentropyStorageVector::with_capacity(items.len());
    for (created_at, id) in items {
        storage
            .insert(created_at, Id::from_byte_array(id))
            .map_err(internal)?;
    }
    storage.seal().map_err(internal)?;
    let mut responder = Negentropy::owned(storage, FRAME_SIZE_LIMIT).map_err(internal)?;
    responder
        .reconcile(query)
        .map_err(|e| format!("invalid: bad negentropy message: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> [u8; 32] {
        [n; 32]
    }

    #[test]
    fn the_responder_tells_the_initiator_what_differs() {
        let mut mine = NegentropyStorageVector::new();
        for (t, n) in [(1, 1), (2, 2)] {
            mine.insert(t, Id::from_byte_array(id(n))).expect("insert");
        }
        mine.seal().expect("seal");
        let mut initiator = Negentropy::owned(mine, 0).expect("initiator");
        let mut message = initiator.initiate().expect("initiate");
        let relay = vec![(2, id(2)), (3, id(3))];
        let (mut have, mut need) = (Vec::new(), Vec::new());
        loop {
            let answer = respond(relay.clone(), &message).expect("respond");
            match initiator
                .reconcile_with_ids(&answer, &mut have, &mut need)
                .expect("reconcile")
            {
                Some(next) => message = next,
                None => break,
            }
        }
        assert_eq!(have, vec![Id::from_byte_array(id(1))]);
        assert_eq!(need, vec![Id::from_byte_array(id(3))]);
    }

    #[test]
    fn garbage_is_invalid() {
        let err = respond(vec![(1, id(1))], &[0x00]).expect_err("garbage");
        assert!(err.starts_with("invalid: "), "{err}");
    }
}
