//! NIP-86 changes from the management API: each [`AdminRequest`] is applied in one Postgres
//! transaction that also bumps the moderation version, then the whole state is written as
//! the Redis snapshot (announced on the moderation channel) and the gateway is answered.
//!
//! **Invariant:** the snapshot of version N holds every change up to N: the version row is
//! locked first in each change's transaction, so changes commit in version order and each
//! reads the state after all earlier ones.

use std::net::IpAddr;
use std::time::Duration;

use deadpool_postgres::{GenericClient, Pool};
use shared::bus::{self, Entry};
use shared::event::{EventId, Kind, PubKey};
use shared::moderation::{self, AdminReply, AdminRequest, Change, Current, Moderation};
use shared::store::StoreError;
use shared::worker::Context;
use tokio_postgres::types::ToSql;

/// Applies and answers every management request among `entries` (other entries are left
/// to the event path).
pub async fn handle(ctx: &Context, current: &Current, entries: &[Entry]) {
    for payload in entries.iter().filter_map(|e| e.payload.as_deref()) {
        if !moderation::is_admin_entry(payload) {
            continue;
        }
        let request: AdminRequest = match bus::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "dropping undecodable management request");
                continue;
            }
        };
        let result = match apply(&ctx.db, &request.admin).await {
            Ok(state) => {
                let version = state.version;
                publish(ctx, current, state).await.map(|()| version)
            }
            Err(e) => {
                tracing::error!(error = %e, change = ?request.admin, "management change failed");
                Err("error: the change could not be stored; try again".to_owned())
            }
        };
        tracing::info!(change = ?request.admin, ok = result.is_ok(), "management change");
        let reply = AdminReply {
            request: request.request,
            result,
        };
        let mut redis = ctx.redis.clone();
        let sent: redis::RedisResult<()> = redis::cmd("PUBLISH")
            .arg(ctx.bus.admin_channel(&request.gateway))
            .arg(bus::encode(&reply))
            .query_async(&mut redis)
            .await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, "cannot answer a management request");
        }
    }
}

/// Writes the snapshot and takes it as this worker's own state.
async fn publish(ctx: &Context, current: &Current, state: Moderation) -> Result<(), String> {
    let mut redis = ctx.redis.clone();
    let stored = moderation::store(&mut redis, &ctx.bus, &state).await;
    current.offer(state);
    stored.map(|_| ()).map_err(|e| {
        tracing::error!(error = %e, "cannot write the moderation snapshot");
        "error: the change was stored but not yet announced; it will be at the next worker start"
            .to_owned()
    })
}

/// At start: writes the state from Postgres as the snapshot (kept if Redis has this version
/// already, rebuilt if Redis lost it), retrying until it works.
pub async fn rebuild_snapshot(ctx: Context, current: Current) {
    let mut delay = Duration::from_millis(200);
    loop {
        let loaded = async {
            let client = ctx.db.get().await?;
            load_state(&client).await
        }
        .await;
        match loaded {
            Ok(state) => {
                let mut redis = ctx.redis.clone();
                match moderation::store(&mut redis, &ctx.bus, &state).await {
                    Ok(written) => {
                        if written {
                            tracing::info!(
                                version = state.version,
                                "moderation snapshot rebuilt from the database"
                            );
                        }
                        current.offer(state);
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot write the moderation snapshot"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the moderation state"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Applies one change and returns the state after it.
async fn apply(db: &Pool, change: &Change) -> Result<Moderation, StoreError> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    tx.execute("UPDATE moderation_version SET version = version + 1", &[])
        .await?;
    let ip = |ip: &IpAddr| moderation::canonical_ip(*ip).to_string();
    match change {
        Change::BanPubkey { pubkey, reason } => {
            BANNED_PUBKEYS
                .add(&tx, &pubkey.as_bytes().as_slice(), reason)
                .await?
        }
        Change::UnbanPubkey { pubkey } => {
            BANNED_PUBKEYS
                .remove(&tx, &pubkey.as_bytes().as_slice())
                .await?
        }
        Change::AllowPubkey { pubkey, reason } => {
            ALLOWED_PUBKEYS
                .add(&tx, &pubkey.as_bytes().as_slice(), reason)
                .await?
        }
        Change::UnallowPubkey { pubkey } => {
            ALLOWED_PUBKEYS
                .remove(&tx, &pubkey.as_bytes().as_slice())
                .await?
        }
        Change::BanEvent { id, reason } => {
            BANNED_EVENTS
                .add(&tx, &id.as_bytes().as_slice(), reason)
                .await?;
            tx.execute(
                "DELETE FROM events WHERE id = $1",
                &[&id.as_bytes().as_slice()],
            )
            .await?;
        }
        Change::AllowEvent { id } => BANNED_EVENTS.remove(&tx, &id.as_bytes().as_slice()).await?,
        Change::AllowKind { kind } => {
            tx.execute(
                "INSERT INTO allowed_kinds (kind) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&i32::from(kind.0)],
            )
            .await?;
        }
        Change::DisallowKind { kind } => ALLOWED_KINDS.remove(&tx, &i32::from(kind.0)).await?,
        Change::BlockIp { ip: addr, reason } => BLOCKED_IPS.add(&tx, &ip(addr), reason).await?,
        Change::UnblockIp { ip: addr } => BLOCKED_IPS.remove(&tx, &ip(addr)).await?,
        Change::RelayName(value) => set_info(&tx, "name", value).await?,
        Change::RelayDescription(value) => set_info(&tx, "description", value).await?,
        Change::RelayIcon(value) => set_info(&tx, "icon", value).await?,
    }
    let state = load_state(&tx).await?;
    tx.commit().await?;
    Ok(state)
}

/// One of the moderation lists: a table keyed by `column`.
struct List {
    table: &'static str,
    column: &'static str,
}

const BANNED_PUBKEYS: List = List::new("banned_pubkeys", "pubkey");
const ALLOWED_PUBKEYS: List = List::new("allowed_pubkeys", "pubkey");
const BANNED_EVENTS: List = List::new("banned_events", "id");
const ALLOWED_KINDS: List = List::new("allowed_kinds", "kind");
const BLOCKED_IPS: List = List::new("blocked_ips", "ip");

impl List {
    const fn new(table: &'static str, column: &'static str) -> Self {
        List { table, column }
    }

    /// Adds `key` with `reason`, or updates the reason of a key already listed.
    async fn add(
        &self,
        client: &impl GenericClient,
        key: &(dyn ToSql + Sync),
        reason: &str,
    ) -> Result<(), StoreError> {
        let List { table, column } = self;
        let sql = format!(
            "INSERT INTO {table} ({column}, reason) VALUES ($1, $2) \
             ON CONFLICT ({column}) DO UPDATE SET reason = EXCLUDED.reason"
        );
        client.execute(&sql, &[key, &reason]).await?;
        Ok(())
    }

    /// Takes `key` off the list (nothing happens if it is not on it).
    async fn remove(
        &self,
        client: &impl GenericClient,
        key: &(dyn ToSql + Sync),
    ) -> Result<(), StoreError> {
        let List { table, column } = self;
        let sql = format!("DELETE FROM {table} WHERE {column} = $1");
        client.execute(&sql, &[key]).await?;
        Ok(())
    }
}

async fn set_info(client: &impl GenericClient, field: &str, value: &str) -> Result<(), StoreError> {
    client
        .execute(
            "INSERT INTO relay_info (field, value) VALUES ($1, $2) \
             ON CONFLICT (field) DO UPDATE SET value = EXCLUDED.value",
            &[&field, &value],
        )
        .await?;
    Ok(())
}

/// The whole moderation state as stored. Rows that do not parse (written by hand) are
/// skipped with a warning.
pub async fn load_state(client: &impl GenericClient) -> Result<Moderation, StoreError> {
    let version: i64 = client
        .query_one("SELECT version FROM moderation_version", &[])
        .await?
        .get(0);
    let mut state = Moderation {
        version: u64::try_from(version).unwrap_or(0),
        ..Moderation::default()
    };
    for row in client
        .query("SELECT pubkey, reason FROM banned_pubkeys", &[])
        .await?
    {
        if let Some(pk) = pubkey(row.get(0)) {
            state.banned_pubkeys.insert(pk, row.get(1));
        }
    }
    for row in client
        .query("SELECT pubkey, reason FROM allowed_pubkeys", &[])
        .await?
    {
        if let Some(pk) = pubkey(row.get(0)) {
            state.allowed_pubkeys.insert(pk, row.get(1));
        }
    }
    for row in client
        .query("SELECT id, reason FROM banned_events", &[])
        .await?
    {
        let id: &[u8] = row.get(0);
        match EventId::from_slice(id) {
            Some(id) => {
                state.banned_events.insert(id, row.get(1));
            }
            None => tracing::warn!("skipping a banned event id that is not 32 bytes"),
        }
    }
    for row in client.query("SELECT kind FROM allowed_kinds", &[]).await? {
        let kind: i32 = row.get(0);
        match u16::try_from(kind) {
            Ok(k) => {
                state.allowed_kinds.insert(Kind(k));
            }
            Err(_) => tracing::warn!(kind, "skipping an allowed kind out of range"),
        }
    }
    for row in client
        .query("SELECT ip, reason FROM blocked_ips", &[])
        .await?
    {
        let ip: &str = row.get(0);
        match ip.parse::<IpAddr>() {
            Ok(ip) => {
                state.blocked_ips.insert(ip, row.get(1));
            }
            Err(_) => tracing::warn!(ip, "skipping a blocked address that does not parse"),
        }
    }
    for row in client
        .query("SELECT field, value FROM relay_info", &[])
        .await?
    {
        let field: &str = row.get(0);
        let value: String = row.get(1);
        match field {
            "name" => state.name = Some(value),
            "description" => state.description = Some(value),
            "icon" => state.icon = Some(value),
            _ => tracing::warn!(field, "skipping an unknown relay_info field"),
        }
    }
    Ok(state)
}

fn pubkey(bytes: &[u8]) -> Option<PubKey> {
    let pubkey = PubKey::from_slice(bytes);
    if pubkey.is_none() {
        tracing::warn!("skipping a pubkey that is not 32 bytes");
    }
    pubkey
}
