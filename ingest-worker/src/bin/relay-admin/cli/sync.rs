//! `sync`: copies the events matching a filter between this relay's database and another
//! relay.
//!
//! With NIP-77 (the other relay lists 77 in `supported_nips`): one negentropy exchange finds
//! the ids missing on each side, then only those are fetched (`REQ` by ids) or sent
//! (`EVENT`). Without it: pull walks the other relay's events backwards in `until`/`limit`
//! windows, deduplicating the events at each window's edge; push sends every local match.
//! Pulled events go through [`Importer`] (verified, stored by the ingest worker's code).

use std::collections::{BTreeMap, HashSet};

use anyhow::{Context as _, bail};
use deadpool_postgres::Pool;
use serde_json::{Value, json};
use shared::bus::Viewer;
use shared::config::PublicUrl;
use shared::event::{Event, EventId};
use shared::filter::Filter;

use super::export::{self, Order, Stored};
use super::import::Importer;
use super::nip77;
use super::remote::{self, Remote};

/// Ids asked for in one `REQ` when fetching what negentropy found missing.
const IDS_PER_REQ: usize = 100;

/// Events sent before waiting for their `OK`s.
const PUSH_WINDOW: usize = 100;

/// `relay-admin sync`.
#[derive(clap::Args, Debug)]
pub struct SyncArgs {
    /// The other relay, ws:// or wss://.
    #[arg(long)]
    pub relay: String,
    /// A NIP-01 filter as JSON selecting what to sync (default: everything).
    #[arg(long, default_value = "{}")]
    pub filter: String,
    /// `pull` (theirs → ours), `push` (ours → theirs) or `both`.
    #[arg(long, value_enum, default_value_t = Direction::Pull)]
    pub direction: Direction,
    /// Seconds to wait for each answer of the other relay (connect, NIP-11, each message);
    /// past it the sync stops with exit code 3.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// Events asked for per REQ window when the other relay does not speak NIP-77.
    #[arg(long, default_value_t = 500)]
    pub page: u64,
    /// Use REQ paging even when the other relay advertises NIP-77.
    #[arg(long)]
    pub no_negentropy: bool,
    /// Certificates (PEM) to trust besides the Mozilla roots, for a wss:// relay whose
    /// certificate a private CA issued.
    #[arg(long)]
    pub ca_file: Option<std::path::PathBuf>,
}

/// Which way events go.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the other relay into this database.
    Pull,
    /// From this database to the other relay.
    Push,
    /// Pull, then push.
    Both,
}

impl Direction {
    fn pulls(self) -> bool {
        matches!(self, Direction::Pull | Direction::Both)
    }
    fn pushes(self) -> bool {
        matches!(self, Direction::Push | Direction::Both)
    }
}

/// What the other relay answered to pushed events.
#[derive(Debug, Default)]
struct PushTally {
    sent: u64,
    accepted: u64,
    duplicate: u64,
    rejected: BTreeMap<String, u64>,
}

impl PushTally {
    fn summary(&self) -> String {
        let mut out = format!(
            "push sent: {}\npush accepted: {}\npush duplicate: {}\npush rejected: {}\n",
            self.sent,
            self.accepted,
            self.duplicate,
            self.rejected.values().sum::<u64>()
        );
        for (reason, n) in &self.rejected {
            out.push_str(&format!("  {reason}: {n}\n"));
        }
        out
    }
}

/// `relay-admin sync`.
pub async fn run(pool: &Pool, public: &PublicUrl, args: SyncArgs) -> anyhow::Result<()> {
    let filter = super::parse_filter(&args.filter)?;
    // Sent to the other relay as given (already checked to be a valid filter).
    let filter_json: Value = serde_json::from_str(&args.filter)?;
    let timeout = super::seconds(args.timeout);
    let tls = remote::tls_config(args.ca_file.as_deref())?;
    let nips = remote::supported_nips(&args.relay, timeout, &tls).await?;
    let mut remote = Remote::connect(&args.relay, timeout, tls).await?;
    let mut importer = Importer::new(pool.clone(), public);
    let mut pushed = PushTally::default();

    let mut diff = None;
    if nips.contains(&77) && !args.no_negentropy {
        let local = local_items(pool, &filter).await?;
        match nip77::reconcile(&mut remote, &filter_json, local).await? {
            Ok(d) => diff = Some(d),
            Err(reason) => eprintln!("NEG-ERR from {}: {reason}; using REQ paging", args.relay),
        }
    }
    let method = if diff.is_some() {
        "negentropy (NIP-77)"
    } else {
        "REQ paging"
    };
    eprintln!("syncing with {} by {method}", args.relay);

    let result = async {
        match &diff {
            Some(d) => {
                if args.direction.pulls() {
                    eprintln!("{} events to pull", d.need.len());
                    pull_ids(&mut remote, &d.need, &mut importer).await?;
                }
                if args.direction.pushes() {
                    eprintln!("{} events to push", d.have.len());
                    push_ids(&mut remote, pool, &d.have, &mut pushed).await?;
                }
            }
            None => {
                if args.direction.pulls() {
                    pull_pages(&mut remote, &filter_json, args.page, &mut importer).await?;
                }
                if args.direction.pushes() {
                    push_all(&mut remote, pool, &filter, &mut pushed).await?;
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    remote.close().await;
    importer.finish();
    println!("method: {method}");
    if args.direction.pulls() {
        for line in importer.tally.summary().lines() {
            match line.strip_prefix("  ") {
                Some(reason) => println!("  {reason}"),
                None => println!("pull {line}"),
            }
        }
    }
    if args.direction.pushes() {
        print!("{}", pushed.summary());
    }
    result
}

/// `(created_at, id)` of every local event matching `filter` (every kind, expired ones
/// hidden, as `export` reads them), read without their JSON.
async fn local_items(pool: &Pool, filter: &Filter) -> anyhow::Result<Vec<shared::nip77::Item>> {
    let client = pool.get().await.context("cannot reach the database")?;
    Ok(shared::nip77::load(&client, filter, &Viewer::default(), i64::MAX).await?)
}

/// Sends `REQ` and returns the events up to `EOSE`, then closes the subscription. Items
/// that are not events are counted as malformed by `importer`.
async fn req_events(
    remote: &mut Remote,
    sub: &str,
    filter: &Value,
    importer: &mut Importer,
) -> anyhow::Result<Vec<Event>> {
    remote.send(json!(["REQ", sub, filter]).to_string()).await?;
    let mut events = Vec::new();
    loop {
        let items = remote.recv("stored events (REQ)").await?;
        if items.get(1).and_then(Value::as_str) != Some(sub) {
            continue;
        }
        match items.first().and_then(Value::as_str) {
            Some("EVENT") => {
                let value = items.get(2).cloned().unwrap_or_default();
                match Event::from_value(value) {
                    Ok(event) => events.push(event),
                    Err(e) => importer.reject_malformed(&remote.url, &e.to_string()),
                }
            }
            Some("EOSE") => break,
            Some("CLOSED") => {
                let message = items.get(2).and_then(Value::as_str).unwrap_or("");
                bail!("{} refused the REQ: {message}", remote.url);
            }
            _ => {}
        }
    }
    remote.send(json!(["CLOSE", sub]).to_string()).await?;
    Ok(events)
}

/// Fetches the given ids and stores them.
async fn pull_ids(
    remote: &mut Remote,
    ids: &[EventId],
    importer: &mut Importer,
) -> anyhow::Result<()> {
    for (n, chunk) in ids.chunks(IDS_PER_REQ).enumerate() {
        let hex: Vec<String> = chunk.iter().map(EventId::to_hex).collect();
        let filter = json!({"ids": hex, "limit": chunk.len()});
        let events = req_events(remote, &format!("pull-{n}"), &filter, importer).await?;
        let url = remote.url.clone();
        importer.add_events(events, &url).await?;
    }
    Ok(())
}

/// Walks the other relay's matching events newest first, in windows of `page`: each next
/// window ends (`until`, inclusive) at the oldest `created_at` seen, and the events already
/// seen at that second are skipped. A window with nothing new moves one second further
/// back; an empty one ends the walk.
async fn pull_pages(
    remote: &mut Remote,
    filter: &Value,
    page: u64,
    importer: &mut Importer,
) -> anyhow::Result<()> {
    let base = filter.as_object().cloned().unwrap_or_default();
    let mut until: Option<i64> = base.get("until").and_then(Value::as_i64);
    let since: Option<i64> = base.get("since").and_then(Value::as_i64);
    let mut edge: HashSet<EventId> = HashSet::new();
    let mut window = 0u64;
    loop {
        if let (Some(u), Some(s)) = (until, since)
            && u < s
        {
            break;
        }
        let mut f = base.clone();
        f.insert("limit".into(), json!(page));
        if let Some(u) = until {
            f.insert("until".into(), json!(u));
        }
        window += 1;
        let events = req_events(
            remote,
            &format!("page-{window}"),
            &Value::Object(f),
            importer,
        )
        .await?;
        let Some(oldest) = events.iter().map(|e| e.created_at).min() else {
            break;
        };
        let fresh: Vec<Event> = events
            .into_iter()
            .filter(|e| !edge.contains(&e.id))
            .collect();
        if fresh.is_empty() {
            // Every event of this window was seen: more than `page` share this second, or
            // the relay ignores `until`. Step past it.
            if oldest == 0 {
                break;
            }
            until = Some(oldest - 1);
            edge.clear();
            continue;
        }
        if until != Some(oldest) {
            edge.clear();
        }
        edge.extend(
            fresh
                .iter()
                .filter(|e| e.created_at == oldest)
                .map(|e| e.id),
        );
        until = Some(oldest);
        let url = remote.url.clone();
        importer.add_events(fresh, &url).await?;
    }
    Ok(())
}

/// Sends the local events with these ids.
async fn push_ids(
    remote: &mut Remote,
    pool: &Pool,
    ids: &[EventId],
    tally: &mut PushTally,
) -> anyhow::Result<()> {
    let client = pool.get().await.context("cannot reach the database")?;
    let mut in_flight = HashSet::new();
    for chunk in ids.chunks(export::PAGE as usize) {
        let keys: Vec<Vec<u8>> = chunk.iter().map(|i| i.as_bytes().to_vec()).collect();
        let rows = client
            .query("SELECT id, json FROM events WHERE id = ANY($1)", &[&keys])
            .await?;
        for row in rows {
            let id: Vec<u8> = row.try_get(0)?;
            let Some(id) = EventId::from_slice(&id) else {
                continue;
            };
            let json: String = row.try_get(1)?;
            send_event(remote, &json, &id, &mut in_flight, tally).await?;
        }
    }
    drain_oks(remote, &mut in_flight, tally, 0).await
}

/// Sends every local event matching `filter`.
async fn push_all(
    remote: &mut Remote,
    pool: &Pool,
    filter: &Filter,
    tally: &mut PushTally,
) -> anyhow::Result<()> {
    let mut pages = export::stream(pool.clone(), filter.clone(), Order::Asc);
    let mut in_flight = HashSet::new();
    while let Some(page) = pages.recv().await {
        for Stored { id, json, .. } in page? {
            send_event(remote, &json, &id, &mut in_flight, tally).await?;
        }
    }
    drain_oks(remote, &mut in_flight, tally, 0).await
}

async fn send_event(
    remote: &mut Remote,
    json: &str,
    id: &EventId,
    in_flight: &mut HashSet<String>,
    tally: &mut PushTally,
) -> anyhow::Result<()> {
    drain_oks(remote, in_flight, tally, PUSH_WINDOW - 1).await?;
    remote.send(format!("[\"EVENT\",{json}]")).await?;
    in_flight.insert(id.to_hex());
    tally.sent += 1;
    Ok(())
}

/// Reads `OK`s until at most `keep` events await theirs.
async fn drain_oks(
    remote: &mut Remote,
    in_flight: &mut HashSet<String>,
    tally: &mut PushTally,
    keep: usize,
) -> anyhow::Result<()> {
    while in_flight.len() > keep {
        let items = remote.recv("OK for a pushed event").await?;
        if items.first().and_then(Value::as_str) != Some("OK") {
            continue;
        }
        let Some(id) = items.get(1).and_then(Value::as_str) else {
            continue;
        };
        if !in_flight.remove(id) {
            continue;
        }
        let accepted = items.get(2).and_then(Value::as_bool).unwrap_or(false);
        let message = items.get(3).and_then(Value::as_str).unwrap_or("");
        let prefix = message.split_once(':').map_or("", |(p, _)| p);
        match (accepted, prefix) {
            (true, "duplicate") => tally.duplicate += 1,
            (true, _) => tally.accepted += 1,
            (false, "duplicate") => tally.duplicate += 1,
            (false, p) => {
                let reason = if p.is_empty() { "rejected" } else { p };
                *tally.rejected.entry(reason.to_owned()).or_default() += 1;
            }
        }
    }
    Ok(())
}
