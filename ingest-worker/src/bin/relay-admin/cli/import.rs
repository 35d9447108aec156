//! `import`: JSON lines → parse → verify (over every core) → [`write::store_batch`].
//!
//! [`Importer`] is also how `sync` stores what it pulls, so both take exactly the ingest
//! worker's storage path and its NIP-86 moderation (bans, allow lists, allowed kinds, as
//! stored when the run starts); only the fan-out to live subscribers is missing.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use deadpool_postgres::Pool;
use shared::config::{PublicUrl, RelayUrls};
use shared::event::{Event, EventError, KindClass};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};

use ingest_worker::ingest::in_parallel;
use ingest_worker::write::{self, Outcome, Pending};

/// Lines parsed, verified and written together (one transaction).
const BATCH_LINES: usize = 500;

/// At most this many bad lines are described on stderr; all are counted.
const MAX_REPORTED: u64 = 1000;

/// `relay-admin import`.
#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// The file of JSON lines; standard input when absent or `-`.
    pub file: Option<PathBuf>,
}

/// What became of the events handled so far.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Non-empty lines (or events) read.
    pub read: u64,
    /// Newly stored (NIP-62 requests to vanish included).
    pub accepted: u64,
    /// Already stored.
    pub duplicate: u64,
    /// Older versions of replaceable or addressable events already stored newer.
    pub superseded: u64,
    /// Refused, by reason.
    pub rejected: BTreeMap<&'static str, u64>,
}

impl Tally {
    /// All rejections.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    fn reject(&mut self, reason: &'static str) {
        *self.rejected.entry(reason).or_default() += 1;
    }

    /// The final report, one `name: count` per line.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "read: {}\naccepted: {}\nduplicate: {}\nsuperseded: {}\nrejected: {}\n",
            self.read,
            self.accepted,
            self.duplicate,
            self.superseded,
            self.rejected_total()
        );
        for (reason, n) in &self.rejected {
            out.push_str(&format!("  {reason}: {n}\n"));
        }
        out
    }
}

/// Why an event was not stored, as counted in the summary.
fn reason_of(e: &EventError) -> &'static str {
    match e {
        EventError::Malformed(_) | EventError::BadHex { .. } | EventError::EmptyTag(_) => {
            "malformed"
        }
        EventError::IdMismatch => "bad id",
        EventError::BadPubKey | EventError::BadSignature => "bad signature",
        _ => "invalid",
    }
}

/// Verifies and stores events through the ingest worker's write path.
pub struct Importer {
    pool: Pool,
    relay_urls: Option<RelayUrls>,
    /// The NIP-86 moderation state, read from Postgres before the first batch is stored.
    moderation: Option<std::sync::Arc<shared::moderation::Moderation>>,
    /// Counts so far.
    pub tally: Tally,
    reported: u64,
    progress: Progress,
}

/// One input item after parsing and verification.
type Checked = (String, Result<Event, (&'static str, String)>);

impl Importer {
    /// An importer writing to `pool`; `public` names this relay for NIP-62 requests.
    pub fn new(pool: Pool, public: &PublicUrl) -> Self {
        Importer {
            pool,
            relay_urls: public.urls().ok().flatten(),
            moderation: None,
            tally: Tally::default(),
            reported: 0,
            progress: Progress::new(),
        }
    }

    /// Parses, verifies and stores numbered lines. Bad lines are reported and counted;
    /// only a database failure is an error.
    pub async fn add_lines(&mut self, lines: Vec<(u64, Vec<u8>)>) -> anyhow::Result<()> {
        let checked = verify_in_parallel(lines, |(n, line)| {
            let event = match std::str::from_utf8(&line) {
                Ok(text) => Event::from_json(text)
                    .and_then(|e| e.verify().map(|()| e))
                    .map_err(|e| (reason_of(&e), e.to_string())),
                Err(_) => Err(("malformed", "not UTF-8".to_owned())),
            };
            (format!("line {n}"), event)
        })
        .await?;
        self.store(checked).await
    }

    /// Verifies and stores events received from elsewhere (`origin` names it in reports).
    pub async fn add_events(&mut self, events: Vec<Event>, origin: &str) -> anyhow::Result<()> {
        let origin = origin.to_owned();
        let checked = verify_in_parallel(events, move |e| {
            let label = format!("{origin} event {}", e.id);
            let event = e
                .verify()
                .map(|()| e)
                .map_err(|e| (reason_of(&e), e.to_string()));
            (label, event)
        })
        .await?;
        self.store(checked).await
    }

    async fn store(&mut self, checked: Vec<Checked>) -> anyhow::Result<()> {
        if self.moderation.is_none() {
            let client = self
                .pool
                .get()
                .await
                .context("connecting to the database")?;
            let state = ingest_worker::admin::load_state(&client)
                .await
                .context("reading the moderation state (NIP-86)")?;
            self.moderation = Some(std::sync::Arc::new(state));
        }
        // An Arc: each batch shares the state read once, without copying its lists.
        let moderation = self.moderation.clone().unwrap_or_default();
        let now = shared::unix_now();
        let mut events = Vec::with_capacity(checked.len());
        for (label, result) in checked {
            self.tally.read += 1;
            let refusal = match &result {
                Err((reason, detail)) => Some((*reason, detail.clone())),
                Ok(e) if e.class() == KindClass::Ephemeral => {
                    Some(("ephemeral", "ephemeral kinds are never stored".to_owned()))
                }
                Ok(e) if e.is_expired(now) => Some(("expired", "expired (NIP-40)".to_owned())),
                Ok(e) => moderation
                    .refuses(e, self.relay_urls.as_ref())
                    .map(|why| ("blocked", why)),
            };
            match (refusal, result) {
                (Some((reason, detail)), _) => self.refuse(&label, reason, &detail),
                (None, Ok(event)) => events.push((label, event)),
                (None, Err(_)) => {}
            }
        }
        let jsons: Vec<String> = events.iter().map(|(_, e)| e.to_json()).collect();
        let pending: Vec<Pending<'_>> = events
            .iter()
            .zip(&jsons)
            .map(|((_, event), json)| Pending {
                event,
                json,
                vanish: shared::vanish::is_addressed_here(event, self.relay_urls.as_ref()),
            })
            .collect();
        let results = write::store_batch(&self.pool, &pending).await;
        let mut failure = None;
        for ((label, _), result) in events.iter().zip(results) {
            match result {
                Ok(Outcome::Stored | Outcome::VanishedNow) => self.tally.accepted += 1,
                Ok(Outcome::Duplicate) => self.tally.duplicate += 1,
                Ok(Outcome::Superseded) => self.tally.superseded += 1,
                Ok(Outcome::Deleted) => self.refuse(label, "deleted", "deleted (NIP-09 or NIP-62)"),
                Ok(Outcome::Vanished) => {
                    self.refuse(label, "vanished", "its author asked to vanish")
                }
                Err(e) => failure = Some(e),
            }
        }
        self.progress.tick(&self.tally);
        match failure {
            Some(e) => Err(e).context("storing events failed"),
            None => Ok(()),
        }
    }

    /// Counts and reports an item that is not an event at all.
    pub fn reject_malformed(&mut self, label: &str, detail: &str) {
        self.tally.read += 1;
        self.refuse(label, "malformed", detail);
    }

    fn refuse(&mut self, label: &str, reason: &'static str, detail: &str) {
        self.tally.reject(reason);
        self.reported += 1;
        if self.reported <= MAX_REPORTED {
            self.progress
                .message(&format!("{label}: {reason}: {detail}"));
        } else if self.reported == MAX_REPORTED + 1 {
            self.progress
                .message("more rejected lines follow; only their count is reported");
        }
    }

    /// Clears the progress line.
    pub fn finish(&mut self) {
        self.progress.finish(&self.tally);
    }
}

/// [`in_parallel`], with a failed task an error.
async fn verify_in_parallel<T, R>(
    items: Vec<T>,
    f: impl Fn(T) -> R + Clone + Send + 'static,
) -> anyhow::Result<Vec<R>>
where
    T: Send + 'static,
    R: Send + 'static,
{
    let mut out = Vec::new();
    for part in in_parallel(items, f).await {
        out.extend(part.context("verification task failed")?);
    }
    Ok(out)
}

/// A progress line on stderr: redrawn in place on a terminal, a plain line every ten
/// seconds otherwise (logs, pipes). Written by hand: one line does not need a dependency.
struct Progress {
    started: Instant,
    last: Instant,
    tty: bool,
    drawn: bool,
}

impl Progress {
    fn new() -> Self {
        let now = Instant::now();
        Progress {
            started: now,
            last: now,
            tty: std::io::stderr().is_terminal(),
            drawn: false,
        }
    }

    fn line(&self, tally: &Tally) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        format!(
            "{} events, {:.0}/s: {} accepted, {} duplicate, {} superseded, {} rejected",
            tally.read,
            tally.read as f64 / secs,
            tally.accepted,
            tally.duplicate,
            tally.superseded,
            tally.rejected_total()
        )
    }

    fn tick(&mut self, tally: &Tally) {
        let every = if self.tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(10)
        };
        if self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        if self.tty {
            eprint!("\r\x1b[2K{}", self.line(tally));
            self.drawn = true;
        } else {
            eprintln!("{}", self.line(tally));
        }
    }

    fn message(&mut self, text: &str) {
        if self.drawn {
            eprint!("\r\x1b[2K");
            self.drawn = false;
        }
        eprintln!("{text}");
    }

    fn finish(&mut self, tally: &Tally) {
        if self.drawn {
            eprint!("\r\x1b[2K");
            self.drawn = false;
        }
        eprintln!("{}", self.line(tally));
    }
}

/// `relay-admin import [FILE]`.
pub async fn run(pool: &Pool, public: &PublicUrl, args: ImportArgs) -> anyhow::Result<()> {
    let input: Box<dyn AsyncRead + Unpin + Send> = match &args.file {
        Some(path) if path.as_os_str() != "-" => Box::new(
            tokio::fs::File::open(path)
                .await
                .with_context(|| format!("cannot open {}", path.display()))?,
        ),
        _ => Box::new(tokio::io::stdin()),
    };
    let mut importer = Importer::new(pool.clone(), public);
    let result = import_lines(&mut importer, input).await;
    importer.finish();
    print!("{}", importer.tally.summary());
    result
}

/// Feeds the input to `importer` in batches; stops only on a read or database failure.
async fn import_lines(
    importer: &mut Importer,
    input: Box<dyn AsyncRead + Unpin + Send>,
) -> anyhow::Result<()> {
    let mut lines = BufReader::new(input).split(b'\n');
    let mut batch = Vec::with_capacity(BATCH_LINES);
    let mut number = 0u64;
    while let Some(mut line) = lines
        .next_segment()
        .await
        .context("reading the input failed")?
    {
        number += 1;
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        batch.push((number, line));
        if batch.len() == BATCH_LINES {
            importer.add_lines(std::mem::take(&mut batch)).await?;
        }
    }
    if !batch.is_empty() {
        importer.add_lines(batch).await?;
    }
    Ok(())
}
