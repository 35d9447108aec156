//! NIP-77 negentropy, the responder side. A round carries everything it needs (the filter,
//! the viewer and the initiator's message), so the worker keeps no session: it loads the
//! item set, answers the message and forgets. Each round reloads the items.

use deadpool_postgres::Pool;
use negentropy::Negentropy;
use shared::bus::Viewer;
use shared::filter::Filter;
use shared::message::NegMessage;
use shared::nip77::{self, Item};

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
                if e.is_timeout() {
                    tracing::warn!("loading negentropy items ran out of time");
                    return "error: the query ran out of database time; reconcile a narrower filter".to_owned();
                }
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

/// The items of the filter's visible events: at most `max_items + 1`, so a set over the cap
/// is recognised without loading all of it.
async fn load_items(
    db: &Pool,
    filter: &Filter,
    viewer: &Viewer,
    max_items: u64,
) -> Result<Vec<Item>, shared::store::StoreError> {
    let client = db.get().await?;
    let limit = i64::try_from(max_items.saturating_add(1)).unwrap_or(i64::MAX);
    nip77::load(&client, filter, viewer, limit).await
}

/// Runs the responder over `items` (CPU-bound: sorts and hashes the whole set).
fn respond(items: Vec<Item>, query: &[u8]) -> Result<Vec<u8>, String> {
    let internal = |e: negentropy::Error| {
        tracing::error!(error = %e, "negentropy storage failed");
        "error: could not reconcile".to_owned()
    };
    let storage = nip77::storage(items).map_err(internal)?;
    let mut responder = Negentropy::owned(storage, FRAME_SIZE_LIMIT).map_err(internal)?;
    responder
        .reconcile(query)
        .map_err(|e| format!("invalid: bad negentropy message: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use negentropy::Id;
    use shared::event::EventId;

    fn id(n: u8) -> EventId {
        EventId::from_bytes([n; 32])
    }

    #[test]
    fn the_responder_tells_the_initiator_what_differs() {
        let mine = nip77::storage([(1, id(1)), (2, id(2))]).expect("storage");
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
        assert_eq!(have, vec![Id::from_byte_array([1; 32])]);
        assert_eq!(need, vec![Id::from_byte_array([3; 32])]);
    }

    #[test]
    fn garbage_is_invalid() {
        let err = respond(vec![(1, id(1))], &[0x00]).expect_err("garbage");
        assert!(err.starts_with("invalid: "), "{err}");
    }
}
