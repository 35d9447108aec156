//! NIP-77 item sets: which stored events take part in a negentropy reconciliation, and how
//! they enter its storage. One rule for both sides: the query worker (responder) and
//! `relay-admin sync` (initiator) build their sets here, so an event never differs between
//! the two sets only because each side treated it differently.

use negentropy::{Id, NegentropyStorageVector};

use crate::bus::Viewer;
use crate::event::EventId;
use crate::filter::Filter;
use crate::sql::items_query;
use crate::store::StoreError;

/// One item: an event's `created_at` and id.
pub type Item = (i64, EventId);

/// The items of the events matching `filter` that `viewer` may see, at most `limit` of them
/// (in no particular order). The filter's own `limit` does not apply (NIP-77 reconciles the
/// whole set).
pub async fn load(
    client: &deadpool_postgres::Client,
    filter: &Filter,
    viewer: &Viewer,
    limit: i64,
) -> Result<Vec<Item>, StoreError> {
    let rows = items_query(filter, viewer, crate::unix_now(), limit)
        .fetch(client)
        .await?;
    rows.iter()
        .map(|row| {
            let id = EventId::from_slice(row.try_get(1)?).ok_or(StoreError::Corrupt("event id"))?;
            Ok((row.try_get(0)?, id))
        })
        .collect()
}

/// `items` as sealed negentropy storage. Negentropy's timestamps are unsigned, so an event
/// dated before 1970 cannot take part: it is left out, on both sides alike.
pub fn storage(
    items: impl IntoIterator<Item = Item>,
) -> Result<NegentropyStorageVector, negentropy::Error> {
    let items = items.into_iter();
    let mut storage = NegentropyStorageVector::with_capacity(items.size_hint().0);
    for (created_at, id) in items {
        if let Ok(created_at) = u64::try_from(created_at) {
            storage.insert(created_at, Id::from_byte_array(*id.as_bytes()))?;
        }
    }
    storage.seal()?;
    Ok(storage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_before_1970_take_no_part() {
        let id = |n: u8| EventId::from_bytes([n; 32]);
        let storage = storage([(-1, id(1)), (0, id(2)), (5, id(3))]).expect("storage");
        use negentropy::NegentropyStorageBase as _;
        assert_eq!(storage.size().expect("size"), 2);
    }
}
