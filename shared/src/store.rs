//! The Postgres schema, its migrations and the connection pool (workers only).
//!
//! ```text
//! events  seq (identity)  id bytea unique  pubkey bytea  kind int  created_at bigint
//!         d_tag text (NULL for kinds that are not replaced; '' for replaceable kinds;
//!                     the d tag value for addressable kinds)
//!         expires_at bigint (NIP-40)  search tsvector (NIP-50, of `search::stored_text`)
//!         json text (the event exactly as served)
//! tags    event_seq → events.seq  name text  value text  kind  created_at
//!         (deleted with their event by a trigger, version 5)
//! deleted_events (id, pubkey)   deleted_addresses (pubkey, kind, d_tag, until)
//! vanished (pubkey, until, request)
//! banned_pubkeys, allowed_pubkeys, banned_events, allowed_kinds, blocked_ips, relay_info,
//! moderation_version   (NIP-86, version 2; mirrored in Redis, see `moderation`)
//! store_regular_events(...)  function: a batch of regular events (version 3)
//! ```
//!
//! **Invariant:** at most one row per (pubkey, kind, d_tag) for replaceable and addressable
//! events, enforced by the unique index `events_replace_key`, so two ingest workers racing
//! cannot both keep a version. The ingest worker's upsert keeps the newest (ties: lowest id).

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use crate::config::DatabaseConfig;

/// A database failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The URL could not be parsed.
    #[error("bad database URL: {0}")]
    Url(tokio_postgres::Error),
    /// Postgres refused or the connection failed.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection could be taken from the pool.
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The pool could not be built.
    #[error("database pool setup: {0}")]
    Build(#[from] deadpool_postgres::BuildError),
    /// A stored value does not have the shape the schema promises.
    #[error("a stored {0} is malformed")]
    Corrupt(&'static str),
}

impl StoreError {
    /// Whether Postgres cancelled the statement because it ran past its statement timeout
    /// (see [`read_pool`]).
    pub fn is_timeout(&self) -> bool {
        match self {
            StoreError::Postgres(e) => {
                e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
            }
            _ => false,
        }
    }
}

/// Schema versions in order. Each runs once, in a transaction, under an advisory lock so
/// that workers starting together do not race.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
    CREATE TABLE events (
        seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id         bytea  NOT NULL,
        pubkey     bytea  NOT NULL,
        kind       integer NOT NULL,
        created_at bigint NOT NULL,
        d_tag      text,
        expires_at bigint,
        search     tsvector,
        json       text   NOT NULL
    );
    CREATE UNIQUE INDEX events_id ON events (id);
    CREATE UNIQUE INDEX events_replace_key ON events (pubkey, kind, d_tag) WHERE d_tag IS NOT NULL;
    CREATE INDEX events_created ON events (created_at DESC, id);
    CREATE INDEX events_author ON events (pubkey, created_at DESC, id);
    CREATE INDEX events_author_kind ON events (pubkey, kind, created_at DESC, id);
    CREATE INDEX events_kind ON events (kind, created_at DESC, id);
    CREATE INDEX events_expires ON events (expires_at) WHERE expires_at IS NOT NULL;
    CREATE INDEX events_search ON events USING gin (search) WHERE search IS NOT NULL;

    CREATE TABLE tags (
        event_seq  bigint  NOT NULL REFERENCES events (seq) ON DELETE CASCADE,
        name       text    NOT NULL,
        value      text    NOT NULL,
        kind       integer NOT NULL,
        created_at bigint  NOT NULL
    );
    CREATE INDEX tags_value ON tags (name, value, created_at DESC);
    CREATE INDEX tags_event ON tags (event_seq);

    -- NIP-09: ids deleted by their author (refused if published again).
    CREATE TABLE deleted_events (
        id     bytea PRIMARY KEY,
        pubkey bytea NOT NULL
    );
    -- NIP-09: addresses deleted by their author, up to a created_at.
    CREATE TABLE deleted_addresses (
        pubkey bytea   NOT NULL,
        kind   integer NOT NULL,
        d_tag  text    NOT NULL,
        until  bigint  NOT NULL,
        PRIMARY KEY (pubkey, kind, d_tag)
    );
    -- NIP-62: pubkeys that asked to vanish, up to a created_at, with the signed request.
    CREATE TABLE vanished (
        pubkey  bytea  PRIMARY KEY,
        until   bigint NOT NULL,
        request text   NOT NULL
    );
    "#,
    ),
    (
        2,
        r#"
    -- NIP-86 moderation, changed only through the management API (ingest workers).
    CREATE TABLE banned_pubkeys (pubkey bytea PRIMARY KEY, reason text NOT NULL DEFAULT '');
    CREATE TABLE allowed_pubkeys (pubkey bytea PRIMARY KEY, reason text NOT NULL DEFAULT '');
    CREATE TABLE banned_events (id bytea PRIMARY KEY, reason text NOT NULL DEFAULT '');
    CREATE TABLE allowed_kinds (kind integer PRIMARY KEY);
    CREATE TABLE blocked_ips (ip text PRIMARY KEY, reason text NOT NULL DEFAULT '');
    -- NIP-11 fields set by an admin: 'name', 'description', 'icon'.
    CREATE TABLE relay_info (field text PRIMARY KEY, value text NOT NULL);
    -- One row: bumped by every change, so snapshots in Redis can be ordered.
    CREATE TABLE moderation_version (
        only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
        version  bigint  NOT NULL
    );
    INSERT INTO moderation_version (version) VALUES (0);
    "#,
    ),
    (
        3,
        r#"
    -- A batch of regular events (kinds neither replaced, deleting nor vanishing) in one
    -- statement, so a batch costs one round trip and no BEGIN/COMMIT of its own. Arguments,
    -- one element per event unless said: $1 the authors' advisory lock keys (sorted, each
    -- once), $2 ids, $3 pubkeys, $4 kinds, $5 created_at, $6 expires_at, $7 search text ('' for
    -- none), $8 JSON; $9..$11 one element per indexed tag: its event's id, name and value.
    -- Returns the id of each event stored ('stored') or refused ('vanished', 'deleted');
    -- an event in neither was already stored.
    CREATE FUNCTION store_regular_events(
        bigint[], bytea[], bytea[], integer[], bigint[], bigint[], text[], text[],
        bytea[], text[], text[])
    RETURNS TABLE (event_id bytea, outcome text)
    LANGUAGE plpgsql AS $fn$
    BEGIN
        -- The shared locks first: under READ COMMITTED (Postgres's default) each statement
        -- of a volatile function takes a new snapshot, so the checks below see every
        -- deletion and request to vanish committed under the exclusive lock before.
        PERFORM pg_advisory_xact_lock_shared(k) FROM unnest($1) AS k;
        RETURN QUERY
        WITH t AS (
            SELECT * FROM unnest($2, $3, $4, $5, $6, $7, $8) AS t(id, pk, k, c, e, s, j)),
        refused AS (
            SELECT t.id, CASE WHEN v.pubkey IS NOT NULL THEN 'vanished' ELSE 'deleted' END AS why
            FROM t
            LEFT JOIN vanished v ON v.pubkey = t.pk AND t.c <= v.until
            LEFT JOIN deleted_events d ON d.id = t.id AND d.pubkey = t.pk
            WHERE v.pubkey IS NOT NULL OR d.id IS NOT NULL),
        ins AS (
            INSERT INTO events (id, pubkey, kind, created_at, d_tag, expires_at, search, json)
            SELECT t.id, t.pk, t.k, t.c, NULL, t.e,
                   CASE WHEN t.s = '' THEN NULL ELSE to_tsvector('simple', t.s) END, t.j
            FROM t WHERE t.id NOT IN (SELECT refused.id FROM refused)
            ON CONFLICT (id) DO NOTHING
            RETURNING events.id, events.seq, events.kind, events.created_at),
        tagged AS (
            INSERT INTO tags (event_seq, name, value, kind, created_at)
            SELECT ins.seq, g.n, g.v, ins.kind, ins.created_at
            FROM unnest($9, $10, $11) AS g(id, n, v) JOIN ins ON ins.id = g.id)
        SELECT ins.id, 'stored'::text FROM ins
        UNION ALL SELECT refused.id, refused.why FROM refused;
    END
    $fn$;
    "#,
    ),
    (
        4,
        r#"
    -- The time-ordered indexes end at created_at. The 32-byte id that followed it made each
    -- key up to twice as long, and it spread the events of one second over random leaf
    -- pages; without it Postgres deduplicates equal keys (at 10,000 events/s, one second
    -- holds thousands) and puts ties in id order with an incremental sort, as it already
    -- does for the tags index. A batch of 40 events is written 20-35% faster (pgbench).
    -- On a large database this rebuilds four indexes once, holding the table's write lock.
    DROP INDEX events_created, events_author, events_author_kind, events_kind;
    CREATE INDEX events_created ON events (created_at DESC);
    CREATE INDEX events_author ON events (pubkey, created_at DESC);
    CREATE INDEX events_author_kind ON events (pubkey, kind, created_at DESC);
    CREATE INDEX events_kind ON events (kind, created_at DESC);
    "#,
    ),
    (
        5,
        r#"
    -- A tag row goes when its event goes, through one trigger per deleting statement
    -- instead of a foreign key. The key's check ran for every tag row written and locked
    -- its event row (a WAL record each), although tags are only ever written in the
    -- statement that writes their event. A batch of 40 events with 3 tags each is written
    -- about 15% faster (pgbench).
    ALTER TABLE tags DROP CONSTRAINT tags_event_seq_fkey;
    CREATE FUNCTION delete_tags_of_deleted_events() RETURNS trigger
    LANGUAGE plpgsql AS $fn$
    BEGIN
        -- An array, so the tags_event index is used however few or many events went.
        DELETE FROM tags WHERE event_seq = ANY (ARRAY(SELECT seq FROM deleted));
        RETURN NULL;
    END
    $fn$;
    CREATE TRIGGER events_delete_tags AFTER DELETE ON events
        REFERENCING OLD TABLE AS deleted
        FOR EACH STATEMENT EXECUTE FUNCTION delete_tags_of_deleted_events();
    "#,
    ),
    (
        6,
        r#"
    -- NIP-50 no longer searches kinds whose content is ciphertext (Kind::is_searchable in
    -- shared/src/event.rs: 4, 13 and 1059); events stored before forget their search text.
    UPDATE events SET search = NULL WHERE kind IN (4, 13, 1059) AND search IS NOT NULL;
    "#,
    ),
    (
        7,
        r#"
    -- NIP-09 tombstones are kept per (id, requester). Keyed by the id alone, a stranger's
    -- request naming an event took its id first, the author's own request then recorded
    -- nothing (ON CONFLICT), and the deleted event could be published again.
    ALTER TABLE deleted_events DROP CONSTRAINT deleted_events_pkey;
    ALTER TABLE deleted_events ADD PRIMARY KEY (id, pubkey);
    "#,
    ),
    (
        8,
        r#"
    -- NIP-50's index takes new entries into a pending list, and the insert that finds the
    -- list over gin_pending_list_limit (4 MB by default) merges all of it into the index
    -- before it returns. At 12,000 events/s that was one store statement of 100-140 ms
    -- every second (Postgres's log), and the OKs of its batch waited. At 512 kB the merge
    -- comes eight times as often and no commit took over 50 ms, for the same CPU.
    ALTER INDEX events_search SET (gin_pending_list_limit = 512);
    "#,
    ),
];

/// A key for `pg_advisory_xact_lock` that serializes migrations across workers.
const MIGRATION_LOCK: i64 = 0x6e6f_7374_7201;

/// Builds the pool. Connections are opened lazily; see [`migrate`] for the first contact.
pub fn pool(config: &DatabaseConfig) -> Result<Pool, StoreError> {
    build_pool(config, None)
}

/// Like [`pool`], but each connection plans a prepared statement once and keeps the plan
/// (`plan_cache_mode = force_generic_plan`). For the ingest worker: its statements take a
/// whole batch as arrays, so no plan depends on the values, and Postgres otherwise planned
/// the batch insert anew on every execution (0.6 ms of a 3 ms publish at low load). Not for
/// queries, whose plans do depend on the filter's values.
pub fn write_pool(config: &DatabaseConfig) -> Result<Pool, StoreError> {
    build_pool(config, Some("-c plan_cache_mode=force_generic_plan"))
}

/// Like [`pool`], but every statement is cancelled by Postgres after `statement_timeout`
/// (it then fails with [`StoreError::is_timeout`]), so no query can hold a connection and a
/// core for longer. For the query workers, whose statements come from clients' filters.
pub fn read_pool(config: &DatabaseConfig, statement_timeout: Duration) -> Result<Pool, StoreError> {
    let ms = statement_timeout.as_millis().max(1);
    build_pool(config, Some(&format!("-c statement_timeout={ms}")))
}

fn build_pool(config: &DatabaseConfig, options: Option<&str>) -> Result<Pool, StoreError> {
    let mut pg = tokio_postgres::Config::from_str(&config.database_url).map_err(StoreError::Url)?;
    if let Some(options) = options {
        let options = match pg.get_options() {
            Some(given) => format!("{given} {options}"),
            None => options.to_owned(),
        };
        pg.options(&options);
    }
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(config.db_pool_size.max(1))
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()?)
}

/// Applies the migrations not applied yet, retrying while the database is unreachable until
/// `give_up_after` passes.
pub async fn migrate(pool: &Pool, give_up_after: Duration) -> Result<(), StoreError> {
    let deadline = tokio::time::Instant::now() + give_up_after;
    let mut delay = Duration::from_millis(100);
    loop {
        match try_migrate(pool).await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() + delay < deadline => {
                tracing::warn!(error = %e, "database not ready for migrations yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

async fn try_migrate(pool: &Pool) -> Result<(), StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    // A migration may take long on a big database; a read pool's statement timeout must not
    // cut it off.
    tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let applied: Option<i32> = tx
        .query_one("SELECT max(version) FROM schema_migrations", &[])
        .await?
        .get(0);
    for (version, sql) in MIGRATIONS {
        if applied.is_some_and(|a| a >= *version) {
            continue;
        }
        tracing::info!(version, "applying database migration");
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[version],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Whether the database answers a trivial query.
pub async fn ping(pool: &Pool) -> bool {
    match pool.get().await {
        Ok(client) => client.simple_query("SELECT 1").await.is_ok(),
        Err(_) => false,
    }
}
