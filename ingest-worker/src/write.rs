//! Writing events to Postgres: one transaction per batch, with the storage rules of NIP-01
//! (keep-newest, enforced by the unique replacement key), NIP-09 (deletion), NIP-40
//! (expiration column) and NIP-62 (request to vanish).
//!
//! **Invariant:** every write of an author's events holds that author's advisory lock: shared
//! for ordinary events, exclusive for deletions and requests to vanish. So a deletion and a
//! re-publication of the deleted event, handled by two workers at once, cannot both win. A
//! gift wrap also holds its recipients' shared locks, as a request to vanish deletes the
//! wraps addressed to its author: so a wrap stored meanwhile cannot escape the deletion. A
//! wrap naming more than [`MAX_WRAP_RECIPIENT_LOCKS`] recipients holds the one
//! [`MANY_RECIPIENTS_LOCK`] instead (shared), which every request to vanish takes
//! exclusively: one event cannot make a transaction take thousands of locks.

use deadpool_postgres::{GenericClient, Pool, Transaction};
use shared::event::{Event, EventId, Kind, KindClass, PubKey};
use shared::store::StoreError;
use tokio_postgres::types::ToSql;

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
    /// Deleted earlier, by its author (NIP-09) or as a gift wrap to someone who asked to
    /// vanish (NIP-62); not stored again.
    Deleted,
    /// Its author asked this relay to vanish (NIP-62); not stored.
    Vanished,
    /// A request to vanish addressed to this relay: the author's events are gone.
    VanishedNow,
}

/// An event ready to write, with the JSON it will be served as.
pub struct Pending<'a> {
    /// The verified event.
    pub event: &'a Event,
    /// The JSON it is stored and served as (serialized once, by the gateway).
    pub json: &'a str,
    /// Whether this is a NIP-62 request to vanish addressed to this relay.
    pub vanish: bool,
}

/// Longest tag value indexed for `#x` queries, in bytes. Postgres btree entries are limited
/// to about 2.7 kB; longer values are kept in the event but cannot be queried by tag.
const MAX_INDEXED_TAG_VALUE: usize = 1024;

/// Takes the advisory locks `$1` in array order, each exclusively where `$2` says so, else
/// shared: one round trip for all of a transaction's locks.
const LOCK_ALL: &str = "SELECT count(CASE WHEN t.exclusive THEN pg_advisory_xact_lock(t.key)::text \
     ELSE pg_advisory_xact_lock_shared(t.key)::text END) \
     FROM unnest($1::bigint[], $2::bool[]) AS t(key, exclusive)";

const REFUSED: &str = "SELECT \
     EXISTS (SELECT 1 FROM deleted_events WHERE id = $1 AND pubkey = $2), \
     EXISTS (SELECT 1 FROM vanished WHERE pubkey = $2 AND until >= $3), \
     EXISTS (SELECT 1 FROM deleted_addresses WHERE pubkey = $2 AND kind = $4 AND d_tag = $5 AND until >= $3)";

/// Takes the same parameters as [`UPSERT_REPLACEABLE`] and returns the same columns; `$8`
/// (the `d` tag) is NULL for kinds that are not replaced.
const INSERT_REGULAR: &str = "INSERT INTO events (id, pubkey, kind, created_at, d_tag, expires_at, search, json) \
     VALUES ($1, $2, $3, $4, $8, $5, CASE WHEN $6::text = '' THEN NULL ELSE to_tsvector('simple', $6::text) END, $7) \
     ON CONFLICT (id) DO NOTHING RETURNING seq, true AS inserted";

const UPSERT_REPLACEABLE: &str = "INSERT INTO events (id, pubkey, kind, created_at, d_tag, expires_at, search, json) \
     VALUES ($1, $2, $3, $4, $8, $5, CASE WHEN $6::text = '' THEN NULL ELSE to_tsvector('simple', $6::text) END, $7) \
     ON CONFLICT (pubkey, kind, d_tag) WHERE d_tag IS NOT NULL DO UPDATE \
     SET id = EXCLUDED.id, created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at, \
         search = EXCLUDED.search, json = EXCLUDED.json \
     WHERE EXCLUDED.created_at > events.created_at \
        OR (EXCLUDED.created_at = events.created_at AND EXCLUDED.id < events.id) \
     RETURNING seq, (xmax = 0) AS inserted";

const ID_EXISTS: &str = "SELECT 1 FROM events WHERE id = $1";

const DELETE_TAGS: &str = "DELETE FROM tags WHERE event_seq = $1";

const INSERT_TAGS: &str = "INSERT INTO tags (event_seq, name, value, kind, created_at) \
     SELECT $1, n, v, $4, $5 FROM unnest($2::text[], $3::text[]) AS t(n, v)";

const DELETE_BY_IDS: &str = "DELETE FROM events WHERE id = ANY($1) AND pubkey = $2 AND kind <> 5";

const TOMBSTONE_IDS: &str = "INSERT INTO deleted_events (id, pubkey) \
     SELECT unnest($1::bytea[]), $2 ON CONFLICT (id, pubkey) DO NOTHING";

/// Every version up to `$4` of the author `$1`'s addresses `($2[i], $3[i])`: one statement
/// for all of a deletion request's `a` tags, however many.
const DELETE_ADDRESSES: &str = "DELETE FROM events e \
     USING unnest($2::int[], $3::text[]) AS a(kind, d_tag) \
     WHERE e.pubkey = $1 AND e.kind = a.kind AND e.d_tag = a.d_tag AND e.created_at <= $4";

/// Remembers the addresses of [`DELETE_ADDRESSES`] (each pair once: ON CONFLICT may not
/// touch one row twice).
const TOMBSTONE_ADDRESSES: &str = "INSERT INTO deleted_addresses (pubkey, kind, d_tag, until) \
     SELECT $1, a.kind, a.d_tag, $4 FROM unnest($2::int[], $3::text[]) AS a(kind, d_tag) \
     ON CONFLICT (pubkey, kind, d_tag) DO UPDATE SET until = GREATEST(deleted_addresses.until, EXCLUDED.until)";

/// A gift wrap naming more recipients than this takes [`MANY_RECIPIENTS_LOCK`] instead of
/// one lock each (NIP-59 wraps name one).
const MAX_WRAP_RECIPIENT_LOCKS: usize = 8;

/// The advisory lock shared by gift wraps with more than [`MAX_WRAP_RECIPIENT_LOCKS`]
/// recipients and taken exclusively by every request to vanish.
const MANY_RECIPIENTS_LOCK: i64 = 0x6e6f_7374_7202;

const VANISH_EVENTS: &str = "DELETE FROM events WHERE pubkey = $1 AND created_at <= $2";

/// Deletes the gift wraps addressed to `$2` (hex) up to `$1` and tombstones them like NIP-09
/// deletions, so they cannot be published again; new wraps to the pubkey still can.
const VANISH_GIFT_WRAPS: &str = "WITH gone AS ( \
         DELETE FROM events WHERE kind = 1059 AND created_at <= $1 \
         AND seq IN (SELECT event_seq FROM tags WHERE name = 'p' AND value = $2) \
         RETURNING id, pubkey) \
     INSERT INTO deleted_events (id, pubkey) SELECT id, pubkey FROM gone \
     ON CONFLICT (id, pubkey) DO NOTHING";

const RECORD_VANISH: &str = "INSERT INTO vanished (pubkey, until, request) VALUES ($1, $2, $3) \
     ON CONFLICT (pubkey) DO UPDATE SET until = GREATEST(vanished.until, EXCLUDED.until), request = EXCLUDED.request";

/// Deletes expired events (NIP-40), at most `batch` rows; returns how many.
pub async fn purge_expired(db: &Pool, now: i64, batch: i64) -> Result<u64, StoreError> {
    let client = db.get().await?;
    let n = client
        .execute(
            "DELETE FROM events WHERE seq IN \
             (SELECT seq FROM events WHERE expires_at <= $1 LIMIT $2)",
            &[&now, &batch],
        )
        .await?;
    Ok(n)
}

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

/// The advisory lock key of an author: the first eight bytes of the pubkey.
fn author_lock(pubkey: &PubKey) -> i64 {
    let b = pubkey.as_bytes();
    i64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Whether an event takes the set-based path: a regular kind that deletes nothing. The
/// others (replaceable, addressable, deletions, requests to vanish) go one by one.
fn is_simple(p: &Pending<'_>) -> bool {
    p.event.replace_key().is_none() && p.event.kind != Kind(5) && !p.vanish
}

/// The pubkeys a gift wrap (NIP-59, kind 1059) is addressed to, as [`VANISH_GIFT_WRAPS`]
/// finds them: `p` tags whose indexed value is a pubkey in lowercase hex, each once. Empty
/// for other kinds.
fn wrap_recipients(event: &Event) -> Vec<PubKey> {
    if event.kind != GIFT_WRAP {
        return Vec::new();
    }
    let mut recipients: Vec<PubKey> = event
        .indexed_tags()
        .filter(|(name, _)| *name == 'p')
        // from_hex takes lowercase hex of the right length only.
        .filter_map(|(_, v)| PubKey::from_hex(v).ok())
        .collect();
    recipients.sort_unstable();
    recipients.dedup();
    recipients
}

/// The advisory locks an ordinary write of `event` holds (shared): its author's, and a gift
/// wrap's recipients' or, past [`MAX_WRAP_RECIPIENT_LOCKS`], [`MANY_RECIPIENTS_LOCK`].
fn write_locks(event: &Event) -> Vec<i64> {
    let recipients = wrap_recipients(event);
    let mut keys = vec![author_lock(&event.pubkey)];
    if recipients.len() > MAX_WRAP_RECIPIENT_LOCKS {
        keys.push(MANY_RECIPIENTS_LOCK);
    } else {
        keys.extend(recipients.iter().map(author_lock));
    }
    keys
}

/// NIP-59 gift wraps, deleted with their recipient's request to vanish.
const GIFT_WRAP: Kind = Kind(1059);

async fn store_in_tx(db: &Pool, batch: &[Pending<'_>]) -> Result<Vec<Outcome>, StoreError> {
    let simple: Vec<usize> = (0..batch.len()).filter(|&i| is_simple(&batch[i])).collect();
    if simple.len() == batch.len() {
        return store_all_simple(db, batch, &simple).await;
    }
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    lock_all(&tx, batch).await?;
    let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
    if !simple.is_empty() {
        for (i, outcome) in store_regular(&tx, batch, &simple).await? {
            outcomes[i] = Some(outcome);
        }
    }
    for (i, pending) in batch.iter().enumerate() {
        if outcomes[i].is_none() {
            outcomes[i] = Some(store_one(&tx, pending).await?);
        }
    }
    tx.commit().await?;
    Ok(outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Outcome::Duplicate))
        .collect())
}

/// Takes every lock the batch's events need before anything else, in key order and each in
/// the strongest mode any event needs (exclusive for deletions and requests to vanish, and
/// [`MANY_RECIPIENTS_LOCK`] for the latter; shared for the rest, see [`write_locks`]). Two
/// transactions then never wait on each other in a circle, and no lock is upgraded later.
/// `store_regular_events` takes its shared locks again, which a holder gets at once.
async fn lock_all(tx: &Transaction<'_>, batch: &[Pending<'_>]) -> Result<(), StoreError> {
    let mut exclusive: std::collections::BTreeMap<i64, bool> = std::collections::BTreeMap::new();
    for pending in batch {
        let event = pending.event;
        if pending.vanish || event.kind == Kind(5) {
            exclusive.insert(author_lock(&event.pubkey), true);
            if pending.vanish {
                exclusive.insert(MANY_RECIPIENTS_LOCK, true);
            }
        } else {
            for key in write_locks(event) {
                exclusive.entry(key).or_insert(false);
            }
        }
    }
    let (keys, modes): (Vec<i64>, Vec<bool>) = exclusive.into_iter().unzip();
    tx.execute(&tx.prepare_cached(LOCK_ALL).await?, &[&keys, &modes])
        .await?;
    Ok(())
}

/// A batch of regular events only (the usual case): one statement, its own transaction,
/// one round trip.
async fn store_all_simple(
    db: &Pool,
    batch: &[Pending<'_>],
    simple: &[usize],
) -> Result<Vec<Outcome>, StoreError> {
    let client = db.get().await?;
    let mut outcomes = vec![Outcome::Duplicate; batch.len()];
    for (i, outcome) in store_regular(&client, batch, simple).await? {
        outcomes[i] = outcome;
    }
    Ok(outcomes)
}

/// Stores the regular events `simple` (indexes into `batch`) with one [`STORE_REGULAR`]
/// statement, which takes the authors' shared locks, then checks and inserts. Returns each
/// one's outcome, batch index first.
async fn store_regular(
    client: &impl GenericClient,
    batch: &[Pending<'_>],
    simple: &[usize],
) -> Result<Vec<(usize, Outcome)>, StoreError> {
    let columns = Columns::new(batch, simple);
    let store = client.prepare_cached(STORE_REGULAR).await?;
    let rows = client.query(&store, &columns.params()).await?;
    Ok(columns.outcomes(&rows))
}

/// Regular events and their tags, after the NIP-62 and NIP-09 checks, under the authors'
/// shared locks: the schema's `store_regular_events` (`shared::store`, migration 3) with
/// the columns of [`Columns::params`].
const STORE_REGULAR: &str = "SELECT event_id, outcome \
     FROM store_regular_events($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

/// The batch's regular events as the columns [`STORE_REGULAR`] takes, each event once.
struct Columns<'a> {
    /// The advisory lock keys of the authors and of gift wraps' recipients, sorted (locks
    /// are taken in key order), each once.
    keys: Vec<i64>,
    ids: Vec<&'a [u8]>,
    pubkeys: Vec<&'a [u8]>,
    kinds: Vec<i32>,
    created: Vec<i64>,
    expires: Vec<Option<i64>>,
    search: Vec<std::borrow::Cow<'a, str>>,
    json: Vec<&'a str>,
    tag_ids: Vec<&'a [u8]>,
    tag_names: Vec<String>,
    tag_values: Vec<&'a str>,
    /// The batch index of each row, and of the repeats left out (duplicates).
    rows: Vec<usize>,
    repeats: Vec<usize>,
}

impl<'a> Columns<'a> {
    fn new(batch: &[Pending<'a>], simple: &[usize]) -> Self {
        // The authors' keys, and the recipients' of gift wraps (see the module's invariant).
        let mut keys: Vec<i64> = simple
            .iter()
            .flat_map(|&i| write_locks(batch[i].event))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let mut c = Columns {
            keys,
            ids: vec![],
            pubkeys: vec![],
            kinds: vec![],
            created: vec![],
            expires: vec![],
            search: vec![],
            json: vec![],
            tag_ids: vec![],
            tag_names: vec![],
            tag_values: vec![],
            rows: vec![],
            repeats: vec![],
        };
        // The same event twice in one batch: the first is inserted, the second a duplicate.
        let mut seen = std::collections::HashSet::new();
        for &i in simple {
            let ev: &'a Event = batch[i].event;
            if !seen.insert(ev.id) {
                c.repeats.push(i);
                continue;
            }
            c.rows.push(i);
            c.ids.push(ev.id.as_bytes().as_slice());
            c.pubkeys.push(ev.pubkey.as_bytes().as_slice());
            c.kinds.push(i32::from(ev.kind.0));
            c.created.push(ev.created_at);
            c.expires.push(ev.expiration());
            c.search.push(shared::search::stored_text(ev));
            c.json.push(batch[i].json);
            for (name, value) in indexed(ev) {
                c.tag_ids.push(ev.id.as_bytes().as_slice());
                c.tag_names.push(name);
                c.tag_values.push(value);
            }
        }
        c
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 11] {
        [
            &self.keys,
            &self.ids,
            &self.pubkeys,
            &self.kinds,
            &self.created,
            &self.expires,
            &self.search,
            &self.json,
            &self.tag_ids,
            &self.tag_names,
            &self.tag_values,
        ]
    }

    /// Each event's outcome (batch index first) from the rows [`STORE_REGULAR`] returned.
    fn outcomes(&self, rows: &[tokio_postgres::Row]) -> Vec<(usize, Outcome)> {
        let said: std::collections::HashMap<Vec<u8>, Outcome> = rows
            .iter()
            .map(|r| {
                let outcome = match r.get::<_, &str>(1) {
                    "stored" => Outcome::Stored,
                    "vanished" => Outcome::Vanished,
                    _ => Outcome::Deleted,
                };
                (r.get::<_, Vec<u8>>(0), outcome)
            })
            .collect();
        let rows = self
            .rows
            .iter()
            .zip(&self.ids)
            .map(|(&i, id)| (i, said.get(*id).copied().unwrap_or(Outcome::Duplicate)));
        rows.chain(self.repeats.iter().map(|&i| (i, Outcome::Duplicate)))
            .collect()
    }
}

/// The tags indexed for `#x` queries: single-letter names with their first value, except
/// values Postgres cannot hold (NUL) or index (longer than [`MAX_INDEXED_TAG_VALUE`]).
fn indexed(event: &Event) -> impl Iterator<Item = (String, &str)> {
    event
        .indexed_tags()
        .filter(|(_, v)| v.len() <= MAX_INDEXED_TAG_VALUE && !v.contains('\0'))
        .map(|(n, v)| (n.to_string(), v))
}

async fn store_one(tx: &Transaction<'_>, pending: &Pending<'_>) -> Result<Outcome, StoreError> {
    let event = pending.event;
    let id = event.id.as_bytes().as_slice();
    let pubkey = event.pubkey.as_bytes().as_slice();
    let kind = i32::from(event.kind.0);
    let d_tag = event.replace_key();
    // The transaction holds this event's locks already (`lock_all`).

    let refused = tx
        .query_one(
            &tx.prepare_cached(REFUSED).await?,
            &[&id, &pubkey, &event.created_at, &kind, &d_tag],
        )
        .await?;
    if refused.get::<_, bool>(1) {
        return Ok(Outcome::Vanished);
    }
    if pending.vanish {
        vanish(tx, pending).await?;
        return Ok(Outcome::VanishedNow);
    }
    // A deletion request cannot itself be deleted (NIP-09).
    if event.kind != Kind(5) && (refused.get::<_, bool>(0) || refused.get::<_, bool>(2)) {
        return Ok(Outcome::Deleted);
    }

    let search = shared::search::stored_text(event);
    let expires_at = event.expiration();
    let statement = match d_tag {
        None => INSERT_REGULAR,
        Some(_) => UPSERT_REPLACEABLE,
    };
    let row = tx
        .query_opt(
            &tx.prepare_cached(statement).await?,
            &[
                &id,
                &pubkey,
                &kind,
                &event.created_at,
                &expires_at,
                &search,
                &pending.json,
                &d_tag,
            ],
        )
        .await?;
    // `inserted` is false when an older version was replaced (its tags go).
    let (seq, replaced) = match row {
        Some(r) => (Some(r.get::<_, i64>(0)), !r.get::<_, bool>(1)),
        None => (None, false),
    };
    let Some(seq) = seq else {
        let exists = tx
            .query_opt(&tx.prepare_cached(ID_EXISTS).await?, &[&id])
            .await?
            .is_some();
        return Ok(if exists {
            Outcome::Duplicate
        } else {
            Outcome::Superseded
        });
    };
    if replaced {
        tx.execute(&tx.prepare_cached(DELETE_TAGS).await?, &[&seq])
            .await?;
    }
    let (names, values): (Vec<String>, Vec<&str>) = indexed(event).unzip();
    if !names.is_empty() {
        tx.execute(
            &tx.prepare_cached(INSERT_TAGS).await?,
            &[&seq, &names, &values, &kind, &event.created_at],
        )
        .await?;
    }
    if event.kind == Kind(5) {
        apply_deletion(tx, event).await?;
    }
    Ok(Outcome::Stored)
}

/// NIP-09: deletes the author's own events named by `e` tags, and every version up to the
/// request's `created_at` of the author's addresses named by `a` tags; remembers both so
/// they cannot come back.
async fn apply_deletion(tx: &Transaction<'_>, request: &Event) -> Result<(), StoreError> {
    let author = request.pubkey.as_bytes().as_slice();
    let ids: Vec<Vec<u8>> = request
        .tag_values("e")
        .filter_map(|v| EventId::from_hex(v).ok())
        .map(|id| id.as_bytes().to_vec())
        .collect();
    if !ids.is_empty() {
        tx.execute(&tx.prepare_cached(DELETE_BY_IDS).await?, &[&ids, &author])
            .await?;
        tx.execute(&tx.prepare_cached(TOMBSTONE_IDS).await?, &[&ids, &author])
            .await?;
    }
    // The author's own addresses, each once. Stored d tags never hold NUL (the gateway
    // refuses them), so such an address names nothing; Postgres text could not hold it
    // either.
    let mut addresses: Vec<(i32, &str)> = request
        .tag_values("a")
        .filter_map(parse_address)
        .filter(|(_, pubkey, d)| *pubkey == request.pubkey && !d.contains('\0'))
        .map(|(kind, _, d)| (i32::from(kind.0), d))
        .collect();
    addresses.sort_unstable();
    addresses.dedup();
    if !addresses.is_empty() {
        let (kinds, d_tags): (Vec<i32>, Vec<&str>) = addresses.into_iter().unzip();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&author, &kinds, &d_tags, &request.created_at];
        tx.execute(&tx.prepare_cached(DELETE_ADDRESSES).await?, &params)
            .await?;
        tx.execute(&tx.prepare_cached(TOMBSTONE_ADDRESSES).await?, &params)
            .await?;
    }
    Ok(())
}

/// `<kind>:<pubkey>:<d>` of a replaceable or addressable event (`d` is empty for
/// replaceable kinds).
fn parse_address(address: &str) -> Option<(Kind, PubKey, &str)> {
    let mut parts = address.splitn(3, ':');
    let kind = Kind(parts.next()?.parse().ok()?);
    let pubkey = PubKey::from_hex(parts.next()?).ok()?;
    let d_tag = parts.next().unwrap_or("");
    match kind.class() {
        KindClass::Addressable => Some((kind, pubkey, d_tag)),
        KindClass::Replaceable => Some((kind, pubkey, "")),
        KindClass::Regular | KindClass::Ephemeral => None,
    }
}

/// NIP-62: deletes every event of the author up to the request's `created_at` (deletion
/// requests included), the gift wraps addressed to them, and records the request so older
/// events cannot be published again.
async fn vanish(tx: &Transaction<'_>, pending: &Pending<'_>) -> Result<(), StoreError> {
    let event = pending.event;
    let pubkey = event.pubkey.as_bytes().as_slice();
    let hex = event.pubkey.to_hex();
    let until = event.created_at;
    tx.execute(&tx.prepare_cached(VANISH_EVENTS).await?, &[&pubkey, &until])
        .await?;
    tx.execute(
        &tx.prepare_cached(VANISH_GIFT_WRAPS).await?,
        &[&until, &hex],
    )
    .await?;
    tx.execute(
        &tx.prepare_cached(RECORD_VANISH).await?,
        &[&pubkey, &until, &pending.json],
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_for_replaceable_and_addressable_kinds_only() {
        let pk = "a".repeat(64);
        let address = format!("30023:{pk}:my:slug");
        let (kind, pubkey, d) = parse_address(&address).expect("addressable");
        assert_eq!(
            (kind, pubkey.to_hex(), d),
            (Kind(30023), pk.clone(), "my:slug")
        );
        assert_eq!(parse_address(&format!("0:{pk}:")).map(|a| a.2), Some(""));
        assert!(parse_address(&format!("1:{pk}:")).is_none());
        assert!(parse_address("30023:nothex:x").is_none());
        assert!(parse_address("x:y:z").is_none());
    }

    #[test]
    fn gift_wraps_are_addressed_to_lowercase_hex_p_tags_only() {
        use shared::event::signing::Keys;
        let to = Keys::generate().pubkey();
        let p = |v: String| vec!["p".to_owned(), v];
        let tags = vec![p(to.to_hex()), p(to.to_hex().to_uppercase()), p("x".into())];
        let keys = Keys::generate();
        let wrap = keys.sign(1, GIFT_WRAP, tags.clone(), "");
        assert_eq!(wrap_recipients(&wrap), vec![to]);
        assert!(wrap_recipients(&keys.sign(1, Kind(1), tags, "")).is_empty());
    }

    #[test]
    fn a_wrap_to_thousands_takes_a_bounded_number_of_locks() {
        use shared::event::signing::Keys;
        let keys = Keys::generate();
        let p = |k: &Keys| vec!["p".to_owned(), k.pubkey().to_hex()];
        let few: Vec<Keys> = (0..3).map(|_| Keys::generate()).collect();
        let wrap = keys.sign(1, GIFT_WRAP, few.iter().map(p).collect(), "");
        assert_eq!(
            write_locks(&wrap).len(),
            4,
            "the author and three recipients"
        );
        let many: Vec<Vec<String>> = (0..2500).map(|_| p(&Keys::generate())).collect();
        let wrap = keys.sign(1, GIFT_WRAP, many, "");
        assert_eq!(
            write_locks(&wrap),
            vec![author_lock(&keys.pubkey()), MANY_RECIPIENTS_LOCK]
        );
    }

    /// The statements written here index with the configuration queries search with.
    #[test]
    fn search_vectors_use_the_search_configuration() {
        let wanted = format!("to_tsvector('{}', ", shared::search::SEARCH_CONFIG);
        for statement in [INSERT_REGULAR, UPSERT_REPLACEABLE] {
            assert!(statement.contains(&wanted), "{statement}");
        }
    }
}
