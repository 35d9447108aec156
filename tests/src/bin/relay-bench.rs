//! `relay-bench`: a load generator for NIP-01 relays, and the measuring half of `make bench`.
//!
//! Every scenario signs its events before its clock starts and speaks plain NIP-01 over
//! WebSocket, so it can be pointed at any relay. Each prints a human summary and, with
//! `--json <file>`, writes its result as JSON. `seed` and `query` also talk to Postgres and
//! assume this relay's schema (`shared::store`). `report` turns the JSON results written by
//! `deploy/bench.sh` into `report.json` and `report.md`.
//!
//! Latencies are taken when a frame is read from the socket, before it is parsed. In open-loop
//! modes (`ingest --rate`, `fanout`) they are measured from the *scheduled* send time, so a
//! sender falling behind shows up as latency instead of hiding it.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use futures_util::{SinkExt, Stream};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use shared::event::signing::Keys;
use shared::event::{Event, EventId, Kind, compute_id};
use shared::filter::Filter;
use shared::message::RelayMessage;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async_with_config};

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

#[derive(Parser)]
#[command(
    name = "relay-bench",
    about = "Load generator for Nostr relays (NIP-01 over WebSocket) and the numbers behind `make bench`"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish kind-1 events and time their OKs: closed loop (each connection waits for its OK
    /// before the next event), or open loop at a fixed total rate with --rate.
    Ingest(IngestArgs),
    /// Live subscriptions (by author, kind, #p and #e) spread over one or more gateways, and
    /// publishers at a fixed rate: publish-to-delivery latency, missed and duplicate deliveries.
    Fanout(FanoutArgs),
    /// Fill the relay's Postgres directly with a realistic corpus (COPY), then VACUUM ANALYZE
    /// and CHECKPOINT.
    Seed(SeedArgs),
    /// REQ→EOSE latency of typical filters, with values picked from the relay's database.
    Query(QueryArgs),
    /// Open idle connections with one subscription each and report the gateway's RSS per
    /// connection.
    Connections(ConnectionsArgs),
    /// Single-core Schnorr verification rate of this machine (Event::verify), events/s.
    VerifyRate(VerifyArgs),
    /// Drop and recreate a database (for seeding into a fresh one each run).
    ResetDb(ResetDbArgs),
    /// Build report.json and report.md from the JSON results in a directory.
    Report(ReportArgs),
}

#[derive(Args, Clone)]
struct Common {
    /// Write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Give up after this many seconds (the scenario reports what it measured until then).
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

#[derive(Args)]
struct IngestArgs {
    /// Relay URL (ws://host:port).
    #[arg(long)]
    url: String,
    /// WebSocket connections publishing concurrently.
    #[arg(long, default_value_t = 20)]
    connections: usize,
    /// Events to publish in total.
    #[arg(long, default_value_t = 10_000)]
    events: usize,
    /// Open loop: publish at this total rate (events/s) regardless of OKs.
    #[arg(long)]
    rate: Option<f64>,
    /// Distinct signing keys (default: one per connection).
    #[arg(long)]
    keys: Option<usize>,
    /// Seconds to wait for one OK before counting it as a timeout.
    #[arg(long, default_value_t = 10)]
    ok_timeout: u64,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct FanoutArgs {
    /// Gateway URLs, comma separated; subscriptions and publishers are spread round-robin.
    #[arg(long, value_delimiter = ',', required = true)]
    url: Vec<String>,
    /// Live subscriptions in total.
    #[arg(long, default_value_t = 1000)]
    subs: usize,
    /// Subscriptions per WebSocket connection.
    #[arg(long, default_value_t = 50)]
    subs_per_conn: usize,
    /// Publishing connections.
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Total publish rate, events/s.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Subscriptions watching each author, kind, #p value and #e value (each event matches
    /// about 4× this many subscriptions).
    #[arg(long, default_value_t = 5)]
    watchers: usize,
    /// Seconds to wait for the last deliveries after the last publish.
    #[arg(long, default_value_t = 10)]
    drain: u64,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct SeedArgs {
    /// Postgres URL of the relay's database (migrations are applied first if needed).
    #[arg(long)]
    db_url: String,
    /// Events to insert.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Distinct authors (popularity follows a Zipf law).
    #[arg(long, default_value_t = 10_000)]
    authors: usize,
    /// Zipf exponent of the author distribution.
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// created_at is spread over this many days before now.
    #[arg(long, default_value_t = 365)]
    days: i64,
    /// RNG seed (default: random). Keys are derived from it, so seeding the same database
    /// twice with one seed collides on the replaceable events.
    #[arg(long)]
    rng_seed: Option<u64>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct QueryArgs {
    /// Relay URL.
    #[arg(long)]
    url: String,
    /// Postgres URL of the relay's database, to pick realistic filter values.
    #[arg(long)]
    db_url: String,
    /// Measured requests per filter.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Connections sending requests concurrently (each waits for EOSE before its next REQ).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct ConnectionsArgs {
    /// Relay URL.
    #[arg(long)]
    url: String,
    /// Idle connections to open.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Process id of the gateway behind --url, to read its VmRSS before and after.
    #[arg(long)]
    pid: Option<u32>,
    /// Connections being opened (and waiting for EOSE) at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Seconds to hold all connections open before reading the RSS.
    #[arg(long, default_value_t = 2)]
    hold: u64,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct VerifyArgs {
    /// Events to verify per round.
    #[arg(long, default_value_t = 5000)]
    events: usize,
    /// Rounds; the best one is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct ResetDbArgs {
    /// URL of the database to drop and create again (its server's `postgres` database is
    /// used for the DDL).
    #[arg(long)]
    db_url: String,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Profile {
    Short,
    Full,
}

#[derive(Args)]
struct ReportArgs {
    /// Directory holding `<scenario>.json` results (and `<scenario>.error` for failures).
    #[arg(long)]
    results: PathBuf,
    /// Where to write report.json and report.md.
    #[arg(long)]
    out: PathBuf,
    /// Which profile produced the results (only shown in the report).
    #[arg(long, value_enum, default_value_t = Profile::Short)]
    profile: Profile,
}

fn main() -> std::process::ExitCode {
    // One line, without a backtrace: deploy/bench.sh puts it in the report.
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::VerifyRate(a) => finish(&a.common, verify_rate(&a)),
        Command::Report(a) => report(&a),
        command => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(run_async(command))
        }
    }
}

async fn run_async(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Ingest(a) => {
            let common = a.common.clone();
            finish(&common, bounded(&common, ingest(a)).await)
        }
        Command::Fanout(a) => {
            let common = a.common.clone();
            finish(&common, bounded(&common, fanout(a)).await)
        }
        Command::Seed(a) => {
            let common = a.common.clone();
            finish(&common, bounded(&common, seed(a)).await)
        }
        Command::Query(a) => {
            let common = a.common.clone();
            finish(&common, bounded(&common, query(a)).await)
        }
        Command::Connections(a) => {
            let common = a.common.clone();
            finish(&common, bounded(&common, connections(a)).await)
        }
        Command::ResetDb(a) => reset_db(&a.db_url).await,
        Command::VerifyRate(_) | Command::Report(_) => Ok(()),
    }
}

/// Runs a scenario under a hard limit a little past its own `--timeout` (scenarios stop
/// themselves at `--timeout` and report; this only catches a stuck setup step).
async fn bounded<F>(common: &Common, scenario: F) -> anyhow::Result<Value>
where
    F: std::future::Future<Output = anyhow::Result<Value>>,
{
    let limit = Duration::from_secs(common.timeout + 30);
    tokio::time::timeout(limit, scenario)
        .await
        .with_context(|| format!("gave up after {}s", limit.as_secs()))?
}

/// Prints the summary and writes the JSON result.
fn finish(common: &Common, result: anyhow::Result<Value>) -> anyhow::Result<()> {
    let value = result?;
    if let Some(path) = &common.json {
        write_json(path, &value)?;
        println!("result written to {}", path.display());
    }
    Ok(())
}

fn write_json(path: &Path, value: &Value) -> anyhow::Result<()> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

/// Latency samples in microseconds.
#[derive(Default)]
struct Samples(Vec<u64>);

impl Samples {
    fn push(&mut self, d: Duration) {
        self.0
            .push(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    fn append(&mut self, other: &mut Samples) {
        self.0.append(&mut other.0);
    }

    fn summary(&mut self) -> Summary {
        self.0.sort_unstable();
        let v = &self.0;
        let ms = |us: u64| us as f64 / 1000.0;
        let pct = |p: f64| {
            if v.is_empty() {
                return 0.0;
            }
            let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
            ms(v[rank.clamp(1, v.len()) - 1])
        };
        Summary {
            count: v.len(),
            p50: pct(50.0),
            p90: pct(90.0),
            p99: pct(99.0),
            max: v.last().copied().map_or(0.0, ms),
            mean: if v.is_empty() {
                0.0
            } else {
                ms(v.iter().sum::<u64>() / v.len() as u64)
            },
        }
    }
}

/// Percentiles in milliseconds.
#[derive(Clone, Copy, Default)]
struct Summary {
    count: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

impl Summary {
    fn json(&self) -> Value {
        json!({
            "count": self.count,
            "p50_ms": round3(self.p50),
            "p90_ms": round3(self.p90),
            "p99_ms": round3(self.p99),
            "max_ms": round3(self.max),
            "mean_ms": round3(self.mean),
        })
    }

    fn line(&self) -> String {
        format!(
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n={})",
            self.p50, self.p90, self.p99, self.max, self.count
        )
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn per_sec(n: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 { n as f64 / s } else { 0.0 }
}

// ---------------------------------------------------------------------------------------------
// Signing and WebSocket helpers
// ---------------------------------------------------------------------------------------------

/// Maps `f` over `0..n` on every core, keeping the order.
fn par_map<T, F>(n: usize, f: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize) -> T + Sync,
{
    let threads = std::thread::available_parallelism()
        .map_or(1, |p| p.get())
        .clamp(1, n.max(1));
    let chunk = n.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                s.spawn(move || {
                    (t * chunk..((t + 1) * chunk).min(n))
                        .map(f)
                        .collect::<Vec<T>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a signing thread panicked"))
            .collect()
    })
}

/// A short random tag so events of different runs never share an id.
fn run_nonce() -> String {
    hex::encode(rand::random::<[u8; 4]>())
}

fn random_hex32() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

fn generate_keys(n: usize) -> Vec<Keys> {
    (0..n.max(1)).map(|_| Keys::generate()).collect()
}

/// `n` kind-1 notes signed round-robin by `keys`, each with distinct content.
fn sign_notes(n: usize, keys: &[Keys], label: &str) -> Vec<Event> {
    let nonce = run_nonce();
    let now = shared::unix_now();
    par_map(n, |i| {
        keys[i % keys.len()].sign(
            now,
            Kind(1),
            vec![],
            format!("{label} {nonce} #{i}: a benchmark note of ordinary length, about one tweet long, nothing more"),
        )
    })
}

fn event_frame(event: &Event) -> String {
    format!("[\"EVENT\",{}]", event.to_json())
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Bytes read from a socket at a time (larger messages span reads). tungstenite zeroes this
/// much buffer on every read: at its default of 128 KiB that was half of the load
/// generator's CPU, reading 100-byte `OK`s.
const READ_CHUNK: usize = 4096;

/// Connects with TCP_NODELAY (latency benchmarks must not wait for Nagle). `small` also
/// turns off the client's write buffer, for when thousands of connections are held.
async fn connect(url: &str, small: bool) -> anyhow::Result<Ws> {
    let mut config = WebSocketConfig::default().read_buffer_size(READ_CHUNK);
    if small {
        config = config.write_buffer_size(0);
    }
    let (ws, _) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        connect_async_with_config(url, Some(config), true),
    )
    .await
    .with_context(|| format!("connecting to {url} timed out"))?
    .with_context(|| format!("cannot connect to {url}"))?;
    Ok(ws)
}

/// Opens `n` connections, connection `i` to `urls[i % urls.len()]`, `concurrency` at a time.
async fn connect_many(
    urls: &[String],
    n: usize,
    concurrency: usize,
    small: bool,
) -> anyhow::Result<Vec<Ws>> {
    stream::iter(0..n)
        .map(|i| connect(&urls[i % urls.len()], small))
        .buffered(concurrency.max(1))
        .try_collect()
        .await
}

enum Incoming {
    Text(String, Instant),
    Closed(String),
    Timeout,
}

/// The next text frame before `deadline`, stamped when it was read.
async fn next_text<S>(rx: &mut S, deadline: Instant) -> Incoming
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    loop {
        match tokio::time::timeout_at(deadline, rx.next()).await {
            Err(_) => return Incoming::Timeout,
            Ok(None) => return Incoming::Closed("connection closed".into()),
            Ok(Some(Err(e))) => return Incoming::Closed(format!("connection error: {e}")),
            Ok(Some(Ok(Message::Text(t)))) => return Incoming::Text(t.to_string(), Instant::now()),
            Ok(Some(Ok(Message::Close(frame)))) => {
                return Incoming::Closed(format!(
                    "closed by the relay: {}",
                    frame.map_or_else(
                        || "no reason".into(),
                        |f| format!("{} {}", f.code, f.reason)
                    )
                ));
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

fn req_frame(sub_id: &str, filter: &Value) -> String {
    json!(["REQ", sub_id, filter]).to_string()
}

// ---------------------------------------------------------------------------------------------
// verify-rate
// ---------------------------------------------------------------------------------------------

fn verify_rate(a: &VerifyArgs) -> anyhow::Result<Value> {
    let n = a.events.max(1);
    let rounds = a.rounds.max(1);
    let keys = generate_keys(100);
    let events = sign_notes(n, &keys, "verify");
    let texts: Vec<String> = events.iter().map(Event::to_json).collect();

    // Best of several rounds: the machine may be busy with something else for a moment, and
    // the question is what one core can do.
    let mut verify_rates = Vec::new();
    let mut parse_verify_rates = Vec::new();
    let mut sign_rates = Vec::new();
    for _ in 0..rounds {
        let start = std::time::Instant::now();
        for event in &events {
            event
                .verify()
                .context("a freshly signed event does not verify")?;
        }
        verify_rates.push(per_sec(n as u64, start.elapsed()));

        let start = std::time::Instant::now();
        for text in &texts {
            Event::from_json(text)
                .context("a freshly signed event does not parse")?
                .verify()
                .context("a freshly signed event does not verify")?;
        }
        parse_verify_rates.push(per_sec(n as u64, start.elapsed()));

        let start = std::time::Instant::now();
        for (i, event) in events.iter().enumerate() {
            std::hint::black_box(keys[i % keys.len()].sign(
                event.created_at,
                event.kind,
                event.tags.clone(),
                event.content.clone(),
            ));
        }
        sign_rates.push(per_sec(n as u64, start.elapsed()));
    }
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let (verify_rate, parse_verify_rate, sign_rate) = (
        best(&verify_rates),
        best(&parse_verify_rates),
        best(&sign_rates),
    );
    println!("verify-rate: {n} events on one thread, best of {rounds} rounds");
    println!("  Event::verify:              {verify_rate:>10.0} events/s");
    println!("  Event::from_json + verify:  {parse_verify_rate:>10.0} events/s");
    println!("  Keys::sign:                 {sign_rate:>10.0} events/s");
    let rounded = |v: &[f64]| v.iter().map(|x| x.round()).collect::<Vec<_>>();
    Ok(json!({
        "scenario": "verify-rate",
        "events": n,
        "rounds": rounds,
        "verify_per_s": verify_rate.round(),
        "parse_verify_per_s": parse_verify_rate.round(),
        "sign_per_s": sign_rate.round(),
        "verify_per_s_rounds": rounded(&verify_rates),
        "parse_verify_per_s_rounds": rounded(&parse_verify_rates),
    }))
}

// ---------------------------------------------------------------------------------------------
// ingest
// ---------------------------------------------------------------------------------------------

/// What one or more publishing connections saw.
#[derive(Default)]
struct IngestTally {
    latency: Samples,
    ok_true: u64,
    ok_false: u64,
    timeouts: u64,
    errors: u64,
    not_sent: u64,
    sent: u64,
    max_send_lag: Duration,
    last_ok: Option<Instant>,
    first_rejection: Option<String>,
    first_error: Option<String>,
}

impl IngestTally {
    fn ok(&mut self, accepted: bool, message: String, latency: Duration, at: Instant) {
        self.latency.push(latency);
        if accepted {
            self.ok_true += 1;
        } else {
            self.ok_false += 1;
            self.first_rejection.get_or_insert(message);
        }
        self.last_ok = Some(self.last_ok.map_or(at, |t| t.max(at)));
    }

    fn error(&mut self, why: String) {
        self.errors += 1;
        self.first_error.get_or_insert(why);
    }

    fn merge(&mut self, mut o: IngestTally) {
        self.latency.append(&mut o.latency);
        self.ok_true += o.ok_true;
        self.ok_false += o.ok_false;
        self.timeouts += o.timeouts;
        self.errors += o.errors;
        self.not_sent += o.not_sent;
        self.sent += o.sent;
        self.max_send_lag = self.max_send_lag.max(o.max_send_lag);
        self.last_ok = match (self.last_ok, o.last_ok) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if self.first_rejection.is_none() {
            self.first_rejection = o.first_rejection;
        }
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }
}

/// An event ready to send: its id (as OKs name it), its frame and its scheduled offset.
struct Outgoing {
    id: String,
    frame: String,
    offset: Duration,
}

/// Closed loop: send one event, wait for its OK, repeat.
async fn publish_closed(
    mut ws: Ws,
    events: Vec<Outgoing>,
    ok_timeout: Duration,
    deadline: Instant,
) -> IngestTally {
    let mut t = IngestTally::default();
    let total = events.len() as u64;
    for (k, out) in events.into_iter().enumerate() {
        let k = k as u64;
        if Instant::now() >= deadline {
            t.not_sent += total - k;
            break;
        }
        let sent = Instant::now();
        if let Err(e) = ws.send(Message::text(out.frame)).await {
            t.error(format!("send failed: {e}"));
            t.not_sent += total - k;
            break;
        }
        t.sent += 1;
        let wait = (sent + ok_timeout).min(deadline);
        let closed = loop {
            match next_text(&mut ws, wait).await {
                Incoming::Timeout => {
                    t.timeouts += 1;
                    break false;
                }
                Incoming::Closed(why) => {
                    t.error(why);
                    break true;
                }
                Incoming::Text(text, at) => {
                    if let Some(RelayMessage::Ok {
                        event_id,
                        accepted,
                        message,
                    }) = RelayMessage::parse(&text)
                        && event_id == out.id
                    {
                        t.ok(accepted, message, at - sent, at);
                        break false;
                    }
                }
            }
        };
        if closed {
            t.not_sent += total - k - 1;
            break;
        }
    }
    t
}

/// Open loop: send each event at `start + offset` whatever the OKs do; match OKs by id and
/// time them from the scheduled send.
async fn publish_open(
    ws: Ws,
    events: Vec<Outgoing>,
    start: Instant,
    ok_timeout: Duration,
    deadline: Instant,
) -> IngestTally {
    let (mut tx, mut rx) = ws.split();
    let schedule: HashMap<String, Duration> =
        events.iter().map(|o| (o.id.clone(), o.offset)).collect();
    let expected = events.len();
    let last_offset = events.last().map_or(Duration::ZERO, |o| o.offset);
    let reader_deadline = (start + last_offset + ok_timeout).min(deadline);

    let writer = async move {
        let mut sent = 0u64;
        let mut lag = Duration::ZERO;
        let mut error = None;
        for out in events {
            let at = start + out.offset;
            if at >= deadline {
                break;
            }
            tokio::time::sleep_until(at).await;
            lag = lag.max(at.elapsed());
            if let Err(e) = tx.send(Message::text(out.frame)).await {
                error = Some(format!("send failed: {e}"));
                break;
            }
            sent += 1;
        }
        (sent, lag, error, tx)
    };
    let reader = async {
        let mut t = IngestTally::default();
        let mut answered = 0usize;
        while answered < expected {
            match next_text(&mut rx, reader_deadline).await {
                Incoming::Timeout => break,
                Incoming::Closed(why) => {
                    t.error(why);
                    break;
                }
                Incoming::Text(text, at) => {
                    if let Some(RelayMessage::Ok {
                        event_id,
                        accepted,
                        message,
                    }) = RelayMessage::parse(&text)
                        && let Some(offset) = schedule.get(&event_id)
                    {
                        answered += 1;
                        t.ok(
                            accepted,
                            message,
                            at.saturating_duration_since(start + *offset),
                            at,
                        );
                    }
                }
            }
        }
        t
    };
    let ((sent, lag, error, _tx), mut t) = tokio::join!(writer, reader);
    t.sent = sent;
    t.max_send_lag = lag;
    t.not_sent = expected as u64 - sent;
    t.timeouts = sent.saturating_sub(t.ok_true + t.ok_false);
    if let Some(e) = error {
        t.error(e);
    }
    t
}

async fn ingest(a: IngestArgs) -> anyhow::Result<Value> {
    let conns = a.connections.max(1);
    let n = a.events.max(1);
    let keys = generate_keys(a.keys.unwrap_or(conns));
    let mode = if a.rate.is_some() { "open" } else { "closed" };
    println!(
        "ingest ({mode} loop): {n} events over {conns} connections to {}{}",
        a.url,
        a.rate
            .map_or(String::new(), |r| format!(" at {r} events/s"))
    );

    let t = std::time::Instant::now();
    let events = sign_notes(n, &keys, "ingest");
    let sign_s = t.elapsed().as_secs_f64();
    println!("  signed {n} events in {sign_s:.1}s (before the clock)");

    let rate = a.rate.unwrap_or(0.0);
    if a.rate.is_some() && rate <= 0.0 {
        bail!("--rate must be positive");
    }
    let mut per_conn: Vec<Vec<Outgoing>> = (0..conns).map(|_| Vec::new()).collect();
    for (i, event) in events.iter().enumerate() {
        per_conn[i % conns].push(Outgoing {
            id: event.id.to_hex(),
            frame: event_frame(event),
            offset: if rate > 0.0 {
                Duration::from_secs_f64(i as f64 / rate)
            } else {
                Duration::ZERO
            },
        });
    }
    drop(events);

    let sockets = connect_many(std::slice::from_ref(&a.url), conns, 50, false).await?;
    println!("  {conns} connections open; starting the clock");

    let ok_timeout = Duration::from_secs(a.ok_timeout.max(1));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.common.timeout);
    let tasks: Vec<_> = sockets
        .into_iter()
        .zip(per_conn)
        .map(|(ws, evs)| {
            if rate > 0.0 {
                tokio::spawn(publish_open(ws, evs, start, ok_timeout, deadline))
            } else {
                tokio::spawn(publish_closed(ws, evs, ok_timeout, deadline))
            }
        })
        .collect();
    let mut tally = IngestTally::default();
    for task in tasks {
        tally.merge(task.await.context("a publishing task panicked")?);
    }
    let end = tally.last_ok.unwrap_or_else(Instant::now);
    let elapsed = end.saturating_duration_since(start);
    let throughput = per_sec(tally.ok_true, elapsed);
    let lat = tally.latency.summary();

    println!(
        "  elapsed {:.2}s, {throughput:.0} events/s accepted",
        elapsed.as_secs_f64()
    );
    println!("  OK latency: {}", lat.line());
    println!(
        "  OK true {}, OK false {}, timeouts {}, connection errors {}, not sent {}",
        tally.ok_true, tally.ok_false, tally.timeouts, tally.errors, tally.not_sent
    );
    if rate > 0.0 {
        println!(
            "  largest send lag behind schedule: {:.1} ms",
            tally.max_send_lag.as_secs_f64() * 1e3
        );
    }
    if let Some(r) = &tally.first_rejection {
        println!("  first rejection: {r}");
    }
    if let Some(e) = &tally.first_error {
        println!("  first error: {e}");
    }
    Ok(json!({
        "scenario": "ingest",
        "mode": mode,
        "url": a.url,
        "connections": conns,
        "events": n,
        "rate": a.rate,
        "sign_s": round3(sign_s),
        "elapsed_s": round3(elapsed.as_secs_f64()),
        "events_per_s": throughput.round(),
        "ok_latency": lat.json(),
        "ok_true": tally.ok_true,
        "ok_false": tally.ok_false,
        "timeouts": tally.timeouts,
        "errors": tally.errors,
        "not_sent": tally.not_sent,
        "max_send_lag_ms": round3(tally.max_send_lag.as_secs_f64() * 1e3),
        "first_rejection": tally.first_rejection,
        "first_error": tally.first_error,
    }))
}

// ---------------------------------------------------------------------------------------------
// fanout
// ---------------------------------------------------------------------------------------------

/// Kinds used by fan-out events: regular, and unlikely to be used by anything else.
const FANOUT_KIND_BASE: u16 = 41_000;

/// The values fan-out events and subscriptions are built from.
struct FanoutPools {
    authors: Vec<Keys>,
    kinds: Vec<u16>,
    p: Vec<String>,
    e: Vec<String>,
}

impl FanoutPools {
    /// Pool size of sub type `t`: enough values that each is watched by about `watchers` subs.
    fn sizes(subs: usize, watchers: usize) -> [usize; 4] {
        std::array::from_fn(|t| count_of_type(subs, t).div_ceil(watchers.max(1)).max(1))
    }

    fn len(&self, t: usize) -> usize {
        match t {
            0 => self.authors.len(),
            1 => self.kinds.len(),
            2 => self.p.len(),
            _ => self.e.len(),
        }
    }

    /// Subscription `s` (type `s % 4`, index `s / 4` within its type) watches value
    /// `(s / 4) % len`.
    fn filter(&self, s: usize, since: i64) -> Value {
        let t = s % 4;
        let v = (s / 4) % self.len(t);
        match t {
            0 => {
                json!({"authors": [self.authors[v].pubkey().to_hex()], "since": since, "limit": 0})
            }
            1 => json!({"kinds": [self.kinds[v]], "since": since, "limit": 0}),
            2 => json!({"#p": [self.p[v]], "since": since, "limit": 0}),
            _ => json!({"#e": [self.e[v]], "since": since, "limit": 0}),
        }
    }

    /// Event `j` uses value `j % len` of every pool.
    fn event(&self, j: usize, created_at: i64, nonce: &str) -> Event {
        let pick = |t: usize| j % self.len(t);
        self.authors[pick(0)].sign(
            created_at,
            Kind(self.kinds[pick(1)]),
            vec![
                vec!["p".into(), self.p[pick(2)].clone()],
                vec!["e".into(), self.e[pick(3)].clone()],
            ],
            format!("fanout {nonce} #{j}"),
        )
    }

    /// The subscriptions event `j` is built to match (see `filter` and `event`).
    fn designed_matches(&self, j: usize, subs: usize) -> Vec<usize> {
        let mut out = Vec::new();
        for t in 0..4 {
            let len = self.len(t);
            let mut k = j % len;
            while 4 * k + t < subs {
                out.push(4 * k + t);
                k += len;
            }
        }
        out
    }
}

fn count_of_type(subs: usize, t: usize) -> usize {
    (subs + 3 - t) / 4
}

/// What the subscribers of one connection saw.
#[derive(Default)]
struct FanoutTally {
    latency: Samples,
    delivered: u64,
    duplicates: u64,
    unexpected: u64,
    missed: u64,
    closed_subs: u64,
    errors: u64,
    last_delivery: Option<Instant>,
    first_problem: Option<String>,
}

impl FanoutTally {
    fn problem(&mut self, why: String) {
        self.first_problem.get_or_insert(why);
    }

    fn merge(&mut self, mut o: FanoutTally) {
        self.latency.append(&mut o.latency);
        self.delivered += o.delivered;
        self.duplicates += o.duplicates;
        self.unexpected += o.unexpected;
        self.missed += o.missed;
        self.closed_subs += o.closed_subs;
        self.errors += o.errors;
        self.last_delivery = match (self.last_delivery, o.last_delivery) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if self.first_problem.is_none() {
            self.first_problem = o.first_problem;
        }
    }
}

/// Sends every subscription of a connection, then waits for all their EOSEs.
async fn open_subscriptions(
    ws: &mut Ws,
    subs: std::ops::Range<usize>,
    filters: &[Value],
    deadline: Instant,
) -> anyhow::Result<()> {
    for s in subs.clone() {
        ws.send(Message::text(req_frame(&format!("f{s}"), &filters[s])))
            .await
            .context("sending REQ")?;
    }
    let mut waiting: HashSet<String> = subs.map(|s| format!("f{s}")).collect();
    while !waiting.is_empty() {
        match next_text(ws, deadline).await {
            Incoming::Timeout => bail!("{} subscriptions got no EOSE in time", waiting.len()),
            Incoming::Closed(why) => bail!("while subscribing: {why}"),
            Incoming::Text(text, _) => match RelayMessage::parse(&text) {
                Some(RelayMessage::Eose(sub)) => {
                    waiting.remove(&sub);
                }
                Some(RelayMessage::Closed { sub_id, message }) => {
                    bail!("subscription {sub_id} was closed: {message}")
                }
                _ => {}
            },
        }
    }
    Ok(())
}

/// Counts deliveries on one subscriber connection until told to stop.
struct Receiver {
    /// `(sub << 32) | event index` → times received, for every expected delivery.
    expected: HashMap<u64, u32>,
    ids: Arc<HashMap<EventId, u32>>,
    start: Instant,
    rate: f64,
    progress: Arc<AtomicU64>,
}

impl Receiver {
    async fn run(
        mut self,
        mut ws: Ws,
        mut stop: watch::Receiver<bool>,
        deadline: Instant,
    ) -> FanoutTally {
        let mut t = FanoutTally::default();
        loop {
            let incoming = tokio::select! {
                _ = stop.changed() => break,
                incoming = next_text(&mut ws, deadline) => incoming,
            };
            match incoming {
                Incoming::Timeout => break,
                Incoming::Closed(why) => {
                    t.errors += 1;
                    t.problem(why);
                    break;
                }
                Incoming::Text(text, at) => match RelayMessage::parse(&text) {
                    Some(RelayMessage::Event { sub_id, event }) => {
                        self.delivery(&mut t, &sub_id, &event.id, at)
                    }
                    Some(RelayMessage::Closed { sub_id, message }) => {
                        t.closed_subs += 1;
                        t.problem(format!("subscription {sub_id} closed: {message}"));
                    }
                    Some(RelayMessage::Notice(m)) => t.problem(format!("NOTICE {m}")),
                    _ => {}
                },
            }
        }
        t.missed = self.expected.values().filter(|&&c| c == 0).count() as u64;
        t
    }

    fn delivery(&mut self, t: &mut FanoutTally, sub_id: &str, id: &EventId, at: Instant) {
        let sub = sub_id.strip_prefix('f').and_then(|s| s.parse::<u64>().ok());
        let (Some(sub), Some(&j)) = (sub, self.ids.get(id)) else {
            t.unexpected += 1;
            return;
        };
        match self.expected.get_mut(&((sub << 32) | u64::from(j))) {
            None => t.unexpected += 1,
            Some(count) => {
                *count += 1;
                if *count > 1 {
                    t.duplicates += 1;
                    return;
                }
                t.delivered += 1;
                self.progress.fetch_add(1, Ordering::Relaxed);
                let scheduled = self.start + Duration::from_secs_f64(f64::from(j) / self.rate);
                t.latency.push(at.saturating_duration_since(scheduled));
                t.last_delivery = Some(t.last_delivery.map_or(at, |l| l.max(at)));
            }
        }
    }
}

async fn fanout(a: FanoutArgs) -> anyhow::Result<Value> {
    if a.rate <= 0.0 || a.duration <= 0.0 {
        bail!("--rate and --duration must be positive");
    }
    let urls = a.url.clone();
    let subs = a.subs.max(1);
    let spc = a.subs_per_conn.max(1);
    let sub_conns = subs.div_ceil(spc);
    let publishers = a.publishers.max(1);
    let n = ((a.rate * a.duration).round() as usize).max(1);
    println!(
        "fanout: {subs} subscriptions ({spc} per connection, {sub_conns} connections) over {} gateway(s), {publishers} publishers, {} events/s for {}s ({n} events)",
        urls.len(),
        a.rate,
        a.duration
    );

    // Pools, filters and events, all before the clock.
    let since = shared::unix_now();
    let sizes = FanoutPools::sizes(subs, a.watchers);
    let pools = FanoutPools {
        authors: generate_keys(sizes[0]),
        kinds: (0..sizes[1])
            .map(|k| FANOUT_KIND_BASE + (k % 20_000) as u16)
            .collect(),
        p: (0..sizes[2]).map(|_| random_hex32()).collect(),
        e: (0..sizes[3]).map(|_| random_hex32()).collect(),
    };
    let filters: Vec<Value> = (0..subs).map(|s| pools.filter(s, since)).collect();
    let parsed: Vec<Filter> = filters
        .iter()
        .map(Filter::from_value)
        .collect::<Result<_, _>>()
        .context("a fan-out filter does not parse")?;
    let nonce = run_nonce();
    let t = std::time::Instant::now();
    let events = par_map(n, |j| pools.event(j, since, &nonce));
    let sign_s = t.elapsed().as_secs_f64();

    // Expected deliveries: the designed set, each confirmed with Filter::matches; the design
    // is checked against a full scan of every filter for the first events.
    let mut expected: Vec<HashMap<u64, u32>> = (0..sub_conns).map(|_| HashMap::new()).collect();
    let mut total_expected = 0u64;
    for (j, event) in events.iter().enumerate() {
        let designed = pools.designed_matches(j, subs);
        if j < 20 {
            let scanned: Vec<usize> = (0..subs).filter(|&s| parsed[s].matches(event)).collect();
            let mut sorted = designed.clone();
            sorted.sort_unstable();
            if scanned != sorted {
                bail!("internal: event {j} matches {scanned:?} but was designed for {sorted:?}");
            }
        }
        for s in designed {
            if !parsed[s].matches(event) {
                bail!("internal: event {j} was designed to match subscription {s} but does not");
            }
            expected[s / spc].insert(((s as u64) << 32) | j as u64, 0);
            total_expected += 1;
        }
    }
    let ids: Arc<HashMap<EventId, u32>> = Arc::new(
        events
            .iter()
            .enumerate()
            .map(|(j, e)| (e.id, j as u32))
            .collect(),
    );
    println!(
        "  signed {n} events in {sign_s:.1}s; {total_expected} deliveries expected ({:.1} per event)",
        total_expected as f64 / n as f64
    );

    // Subscribers.
    let setup_deadline = Instant::now() + Duration::from_secs(a.common.timeout.min(180));
    let t = std::time::Instant::now();
    let mut sockets = connect_many(&urls, sub_conns, 100, false).await?;
    let filters = Arc::new(filters);
    let setups: Vec<_> = sockets
        .drain(..)
        .enumerate()
        .map(|(c, mut ws)| {
            let filters = filters.clone();
            let range = c * spc..((c + 1) * spc).min(subs);
            tokio::spawn(async move {
                open_subscriptions(&mut ws, range, &filters, setup_deadline)
                    .await
                    .map(|()| ws)
            })
        })
        .collect();
    let mut sockets = Vec::with_capacity(sub_conns);
    for task in setups {
        sockets.push(task.await.context("a subscribing task panicked")??);
    }
    let setup_s = t.elapsed().as_secs_f64();
    println!("  {subs} subscriptions open (all EOSE) in {setup_s:.1}s");

    // Publishers: event j goes out on connection j % publishers at j / rate seconds.
    let mut per_pub: Vec<Vec<Outgoing>> = (0..publishers).map(|_| Vec::new()).collect();
    for (j, event) in events.iter().enumerate() {
        per_pub[j % publishers].push(Outgoing {
            id: event.id.to_hex(),
            frame: event_frame(event),
            offset: Duration::from_secs_f64(j as f64 / a.rate),
        });
    }
    drop(events);
    let pub_sockets = connect_many(&urls, publishers, 50, false).await?;

    let progress = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let start = Instant::now();
    let publish_end = start + Duration::from_secs_f64(a.duration);
    let hard_deadline = start + Duration::from_secs(a.common.timeout);
    let receivers: Vec<_> = sockets
        .into_iter()
        .zip(expected)
        .map(|(ws, expected)| {
            let r = Receiver {
                expected,
                ids: ids.clone(),
                start,
                rate: a.rate,
                progress: progress.clone(),
            };
            tokio::spawn(r.run(ws, stop_rx.clone(), hard_deadline))
        })
        .collect();
    let pub_tasks: Vec<_> = pub_sockets
        .into_iter()
        .zip(per_pub)
        .map(|(ws, evs)| {
            tokio::spawn(publish_open(
                ws,
                evs,
                start,
                Duration::from_secs(a.drain.max(1)),
                hard_deadline,
            ))
        })
        .collect();
    let mut published = IngestTally::default();
    for task in pub_tasks {
        published.merge(task.await.context("a publishing task panicked")?);
    }
    // Drain: wait for the remaining deliveries, at most --drain seconds past the last publish.
    let drain_deadline =
        (publish_end.max(Instant::now()) + Duration::from_secs(a.drain)).min(hard_deadline);
    while progress.load(Ordering::Relaxed) < total_expected && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    let mut tally = FanoutTally::default();
    for task in receivers {
        tally.merge(task.await.context("a receiving task panicked")?);
    }

    let elapsed = tally
        .last_delivery
        .unwrap_or_else(Instant::now)
        .saturating_duration_since(start);
    let deliveries_per_s = per_sec(tally.delivered, elapsed);
    let lat = tally.latency.summary();
    let ok_lat = published.latency.summary();
    println!(
        "  published {} (OK true {}, false {}, no OK {}), largest send lag {:.1} ms",
        published.sent,
        published.ok_true,
        published.ok_false,
        published.timeouts,
        published.max_send_lag.as_secs_f64() * 1e3
    );
    println!(
        "  delivered {} of {total_expected}: missed {}, duplicates {}, unexpected {}, closed subscriptions {}, connection errors {}",
        tally.delivered,
        tally.missed,
        tally.duplicates,
        tally.unexpected,
        tally.closed_subs,
        tally.errors
    );
    println!("  delivery latency: {}", lat.line());
    println!("  {deliveries_per_s:.0} deliveries/s");
    println!("  publish OK latency: {}", ok_lat.line());
    if let Some(p) = &tally.first_problem {
        println!("  first problem: {p}");
    }
    if let Some(r) = &published.first_rejection {
        println!("  first rejection: {r}");
    }
    Ok(json!({
        "scenario": "fanout",
        "urls": urls,
        "subs": subs,
        "subs_per_conn": spc,
        "sub_connections": sub_conns,
        "publishers": publishers,
        "rate": a.rate,
        "duration_s": a.duration,
        "watchers": a.watchers,
        "events": n,
        "sign_s": round3(sign_s),
        "setup_s": round3(setup_s),
        "published": published.sent,
        "publish_ok_true": published.ok_true,
        "publish_ok_false": published.ok_false,
        "publish_no_ok": published.timeouts,
        "publish_ok_latency": ok_lat.json(),
        "max_send_lag_ms": round3(published.max_send_lag.as_secs_f64() * 1e3),
        "expected_deliveries": total_expected,
        "delivered": tally.delivered,
        "missed": tally.missed,
        "duplicates": tally.duplicates,
        "unexpected": tally.unexpected,
        "closed_subs": tally.closed_subs,
        "connection_errors": tally.errors,
        "deliveries_per_s": deliveries_per_s.round(),
        "delivery_latency": lat.json(),
        "first_problem": tally.first_problem,
        "first_rejection": published.first_rejection,
    }))
}

// ---------------------------------------------------------------------------------------------
// seed
// ---------------------------------------------------------------------------------------------

/// An event to be signed: its author and everything but the signature.
struct Plan {
    author: u32,
    created_at: i64,
    kind: u16,
    tags: Vec<Vec<String>>,
    content: String,
}

/// Draws indices `0..n` with probability proportional to `1 / (i + 1)^s`.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut total = 0.0;
        let cdf = (0..n.max(1))
            .map(|i| {
                total += 1.0 / ((i + 1) as f64).powf(s);
                total
            })
            .collect();
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut SmallRng) -> usize {
        let total = self.cdf.last().copied().unwrap_or(1.0);
        let u = rng.random::<f64>() * total;
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

const WORDS: &[&str] = &[
    "nostr", "relay", "today", "coffee", "bitcoin", "zap", "good", "morning", "the", "a", "is",
    "of", "and", "to", "in", "this", "that", "just", "shipped", "new", "client", "notes", "keys",
    "signal", "freedom", "build", "weekend", "music", "photo", "thread", "gm", "pv", "why", "how",
    "open", "source", "protocol", "servers", "scale", "fast",
];

fn words(rng: &mut SmallRng, min: usize, max: usize) -> String {
    let n = rng.random_range(min..=max);
    let mut out = String::new();
    for i in 0..n {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    out
}

/// The corpus, planned in one thread (ids are computed so later events can reference
/// earlier ones); signing happens afterwards on every core.
fn plan_corpus(a: &SeedArgs, rng: &mut SmallRng, pubkeys: &[String]) -> Vec<Plan> {
    let authors = pubkeys.len();
    let now = shared::unix_now();
    let span = a.days.max(1) * 86_400;
    let zipf = Zipf::new(authors, a.zipf);
    let hashtags = Zipf::new(500, 1.0);
    let mut plans = Vec::with_capacity(a.events);

    // One profile (kind 0) and one contact list (kind 3) per author: replaceable, so exactly
    // one of each per (pubkey, kind).
    for (i, _) in pubkeys.iter().enumerate() {
        if plans.len() + 2 > a.events {
            break;
        }
        plans.push(Plan {
            author: i as u32,
            created_at: now - rng.random_range(0..span),
            kind: 0,
            tags: vec![],
            content: format!(r#"{{"name":"bench{i}","about":"{}"}}"#, words(rng, 3, 12)),
        });
        let follows = rng
            .random_range(10..=150usize)
            .min(authors.saturating_sub(1));
        let mut seen = HashSet::new();
        let mut tags = Vec::with_capacity(follows);
        for _ in 0..follows * 3 {
            if tags.len() >= follows {
                break;
            }
            let f = zipf.sample(rng);
            if f != i && seen.insert(f) {
                tags.push(vec!["p".to_string(), pubkeys[f].clone()]);
            }
        }
        plans.push(Plan {
            author: i as u32,
            created_at: now - rng.random_range(0..span),
            kind: 3,
            tags,
            content: String::new(),
        });
    }

    // Notes (kind 1) and reactions (kind 7), in time order so that replies and reactions
    // point at earlier notes, mostly notes of popular authors.
    let rest = a.events - plans.len();
    let mut times: Vec<i64> = (0..rest).map(|_| now - rng.random_range(0..span)).collect();
    times.sort_unstable();
    let mut notes: Vec<(u32, String)> = Vec::new();
    let mut notes_by_author: Vec<Vec<u32>> = vec![Vec::new(); authors];
    let pick_note = |rng: &mut SmallRng, notes: &[(u32, String)], by: &[Vec<u32>]| -> usize {
        let b = zipf.sample(rng);
        match by[b].len() {
            0 => rng.random_range(notes.len().saturating_sub(1000)..notes.len()),
            len => by[b][rng.random_range(len.saturating_sub(50)..len)] as usize,
        }
    };
    for created_at in times {
        let author = zipf.sample(rng) as u32;
        let reaction = !notes.is_empty() && rng.random_bool(0.4);
        let (kind, tags, content) = if reaction {
            let target = pick_note(rng, &notes, &notes_by_author);
            let (target_author, target_id) = &notes[target];
            let content = match rng.random_range(0..10) {
                0 => "🤙",
                1 => "❤️",
                _ => "+",
            };
            let tags = vec![
                vec!["e".to_string(), target_id.clone()],
                vec!["p".to_string(), pubkeys[*target_author as usize].clone()],
            ];
            (7u16, tags, content.to_string())
        } else {
            let mut tags = Vec::new();
            if !notes.is_empty() && rng.random_bool(0.3) {
                let target = pick_note(rng, &notes, &notes_by_author);
                let (target_author, target_id) = &notes[target];
                tags.push(vec![
                    "e".to_string(),
                    target_id.clone(),
                    String::new(),
                    "root".to_string(),
                ]);
                tags.push(vec![
                    "p".to_string(),
                    pubkeys[*target_author as usize].clone(),
                ]);
            }
            if rng.random_bool(0.1) {
                tags.push(vec!["p".to_string(), pubkeys[zipf.sample(rng)].clone()]);
            }
            if rng.random_bool(0.2) {
                for _ in 0..rng.random_range(1..=3) {
                    tags.push(vec![
                        "t".to_string(),
                        format!("topic{}", hashtags.sample(rng)),
                    ]);
                }
            }
            (1u16, tags, words(rng, 5, 45))
        };
        if kind == 1 {
            // The id is needed now so that later events can reference this note.
            let pubkey = shared::event::PubKey::from_hex(&pubkeys[author as usize]);
            if let Ok(pubkey) = pubkey {
                let id = compute_id(&pubkey, created_at, Kind(kind), &tags, &content);
                notes_by_author[author as usize].push(notes.len() as u32);
                notes.push((author, id.to_hex()));
            }
        }
        plans.push(Plan {
            author,
            created_at,
            kind,
            tags,
            content,
        });
    }
    plans
}

/// A signed event with its stored JSON.
struct Signed {
    event: Event,
    json: String,
}

/// Longest tag value the relay indexes (see the ingest worker), in bytes.
const MAX_INDEXED_TAG_VALUE: usize = 1024;

async fn seed(a: SeedArgs) -> anyhow::Result<Value> {
    if a.events == 0 {
        bail!("--events must be positive");
    }
    let mut rng = match a.rng_seed {
        Some(s) => SmallRng::seed_from_u64(s),
        None => SmallRng::seed_from_u64(rand::random()),
    };
    let authors = a.authors.clamp(1, (a.events / 10).max(1));
    println!(
        "seed: {} events from {authors} authors (Zipf s={}) over {} days into {}",
        a.events,
        a.zipf,
        a.days,
        shared::config::mask_url(&a.db_url)
    );
    let keys: Vec<Keys> = (0..authors)
        .map(|_| {
            loop {
                if let Ok(k) = Keys::from_secret_bytes(rng.random()) {
                    break k;
                }
            }
        })
        .collect();
    let pubkeys: Vec<String> = keys.iter().map(|k| k.pubkey().to_hex()).collect();

    let t = std::time::Instant::now();
    let plans = plan_corpus(&a, &mut rng, &pubkeys);
    let plan_s = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let mut signed = par_map(plans.len(), |i| {
        let p = &plans[i];
        let event = keys[p.author as usize].sign(
            p.created_at,
            Kind(p.kind),
            p.tags.clone(),
            p.content.clone(),
        );
        let json = event.to_json();
        Signed { event, json }
    });
    drop(plans);
    let sign_s = t.elapsed().as_secs_f64();
    // Identical plans (same author, time, kind, tags and content) would share an id; keep one.
    let mut seen = HashSet::with_capacity(signed.len());
    signed.retain(|s| seen.insert(s.event.id));
    drop(seen);
    println!(
        "  planned in {plan_s:.1}s, signed {} events in {sign_s:.1}s ({:.0}/s on {} threads)",
        signed.len(),
        signed.len() as f64 / sign_s.max(1e-9),
        std::thread::available_parallelism().map_or(1, |p| p.get())
    );

    // The schema: the relay's own migrations.
    let pool = shared::store::pool(&shared::config::DatabaseConfig {
        database_url: a.db_url.clone(),
        db_pool_size: 1,
    })?;
    shared::store::migrate(&pool, Duration::from_secs(30))
        .await
        .context("applying the relay's migrations")?;
    drop(pool);

    let (mut client, conn) = tokio_postgres::connect(&a.db_url, tokio_postgres::NoTls)
        .await
        .context("connecting to Postgres")?;
    let conn_task = tokio::spawn(conn);
    let t = std::time::Instant::now();
    let (event_rows, tag_rows) = copy_corpus(&mut client, &signed).await?;
    let copy_s = t.elapsed().as_secs_f64();
    println!("  copied {event_rows} events and {tag_rows} tag rows in {copy_s:.1}s");

    let t = std::time::Instant::now();
    client.batch_execute("VACUUM (ANALYZE) events").await?;
    client.batch_execute("VACUUM (ANALYZE) tags").await?;
    let analyze_s = t.elapsed().as_secs_f64();
    let total: i64 = client
        .query_one("SELECT count(*) FROM events", &[])
        .await?
        .get(0);
    println!("  VACUUM ANALYZE in {analyze_s:.1}s; the database now holds {total} events");
    // The copy leaves gigabytes of dirty pages. Written out later, they would compete for
    // the disk with whichever scenario runs next and be billed to it: write them now.
    let t = std::time::Instant::now();
    let checkpoint_s = match client.batch_execute("CHECKPOINT").await {
        Ok(()) => {
            let s = t.elapsed().as_secs_f64();
            println!("  CHECKPOINT in {s:.1}s");
            Some(round3(s))
        }
        Err(e) => {
            println!("  no CHECKPOINT ({e}); the next scenario may share the disk with its writes");
            None
        }
    };
    drop(client);
    let _ = conn_task.await;

    let mut by_kind: HashMap<u16, u64> = HashMap::new();
    for s in &signed {
        *by_kind.entry(s.event.kind.0).or_default() += 1;
    }
    let mut kinds: Vec<_> = by_kind.into_iter().collect();
    kinds.sort_unstable();
    Ok(json!({
        "scenario": "seed",
        "events": event_rows,
        "tag_rows": tag_rows,
        "authors": authors,
        "zipf": a.zipf,
        "days": a.days,
        "kinds": kinds.into_iter().map(|(k, n)| (k.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "plan_s": round3(plan_s),
        "sign_s": round3(sign_s),
        "sign_per_s": (signed.len() as f64 / sign_s.max(1e-9)).round(),
        "copy_s": round3(copy_s),
        "vacuum_analyze_s": round3(analyze_s),
        "checkpoint_s": checkpoint_s,
        "events_in_db": total,
    }))
}

/// Writes the corpus in one transaction. Events go through a temporary table (COPY) and one
/// `INSERT … SELECT`, so columns the relay derives in SQL (the NIP-50 `search` vector, when
/// the schema has it) are filled the way the ingest worker fills them. Tag rows are copied
/// straight in, pointing at the `seq` numbers chosen here; the identity sequence is moved
/// past them at the end.
async fn copy_corpus(
    client: &mut tokio_postgres::Client,
    signed: &[Signed],
) -> anyhow::Result<(u64, u64)> {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::Type;

    let tx = client.transaction().await?;
    tx.batch_execute(
        "LOCK TABLE events IN EXCLUSIVE MODE;
         CREATE TEMP TABLE bench_seed (seq bigint, id bytea, pubkey bytea, kind integer,
             created_at bigint, d_tag text, search text, json text) ON COMMIT DROP",
    )
    .await?;
    let base: i64 = tx
        .query_one("SELECT COALESCE(max(seq), 0) FROM events", &[])
        .await?
        .get(0);
    let has_search = tx
        .query_opt(
            "SELECT 1 FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = 'events' AND column_name = 'search'",
            &[],
        )
        .await?
        .is_some();

    let sink = tx
        .copy_in("COPY bench_seed FROM STDIN (FORMAT binary)")
        .await?;
    let writer = BinaryCopyInWriter::new(
        sink,
        &[
            Type::INT8,
            Type::BYTEA,
            Type::BYTEA,
            Type::INT4,
            Type::INT8,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
        ],
    );
    let mut writer = std::pin::pin!(writer);
    for (i, s) in signed.iter().enumerate() {
        let e = &s.event;
        let seq = base + 1 + i as i64;
        let id: &[u8] = e.id.as_bytes();
        let pubkey: &[u8] = e.pubkey.as_bytes();
        let kind = i32::from(e.kind.0);
        let d_tag = e.replace_key();
        let search = shared::search::stored_text(e);
        writer
            .as_mut()
            .write(&[
                &seq,
                &id,
                &pubkey,
                &kind,
                &e.created_at,
                &d_tag,
                &search,
                &s.json,
            ])
            .await?;
    }
    writer.as_mut().finish().await?;
    let (search_col, search_val) = if has_search {
        (
            ", search",
            format!(
                ", CASE WHEN search = '' THEN NULL ELSE to_tsvector('{}', search) END",
                shared::search::SEARCH_CONFIG
            ),
        )
    } else {
        ("", String::new())
    };
    let event_rows = tx
        .execute(
            &format!(
                "INSERT INTO events (seq, id, pubkey, kind, created_at, d_tag, json{search_col}) \
                 OVERRIDING SYSTEM VALUE \
                 SELECT seq, id, pubkey, kind, created_at, d_tag, json{search_val} FROM bench_seed"
            ),
            &[],
        )
        .await?;

    let sink = tx
        .copy_in("COPY tags (event_seq, name, value, kind, created_at) FROM STDIN (FORMAT binary)")
        .await?;
    let writer = BinaryCopyInWriter::new(
        sink,
        &[Type::INT8, Type::TEXT, Type::TEXT, Type::INT4, Type::INT8],
    );
    let mut writer = std::pin::pin!(writer);
    for (i, s) in signed.iter().enumerate() {
        let e = &s.event;
        let seq = base + 1 + i as i64;
        let kind = i32::from(e.kind.0);
        for (letter, value) in e.indexed_tags() {
            if value.len() > MAX_INDEXED_TAG_VALUE || value.contains('\0') {
                continue;
            }
            let name = letter.to_string();
            writer
                .as_mut()
                .write(&[&seq, &name, &value, &kind, &e.created_at])
                .await?;
        }
    }
    let tag_rows = writer.as_mut().finish().await?;
    tx.query_one(
        "SELECT setval(pg_get_serial_sequence('events', 'seq'), (SELECT max(seq) FROM events))",
        &[],
    )
    .await?;
    tx.commit().await?;
    Ok((event_rows, tag_rows))
}

async fn reset_db(db_url: &str) -> anyhow::Result<()> {
    let (base, name) = db_url
        .rsplit_once('/')
        .context("the database URL has no database name")?;
    let name = name.split('?').next().unwrap_or(name);
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        bail!("refusing to drop database {name:?}: use letters, digits and _ only");
    }
    if name == "postgres" {
        bail!("refusing to drop the postgres database");
    }
    let (client, conn) =
        tokio_postgres::connect(&format!("{base}/postgres"), tokio_postgres::NoTls)
            .await
            .context("connecting to Postgres")?;
    let conn_task = tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await?;
    client
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await?;
    drop(client);
    let _ = conn_task.await;
    println!("database {name} dropped and created again");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// query
// ---------------------------------------------------------------------------------------------

/// One REQ, timed until its EOSE. EVENT frames are only counted while the clock runs (their
/// full parse would add the client's cost to the relay's latency) and checked afterwards.
async fn timed_req(
    ws: &mut Ws,
    sub: &str,
    filter: &Value,
    deadline: Instant,
) -> anyhow::Result<(Duration, usize)> {
    let sent = Instant::now();
    ws.send(Message::text(req_frame(sub, filter))).await?;
    let mut frames = Vec::new();
    let latency = loop {
        match next_text(ws, deadline).await {
            Incoming::Timeout => bail!("no EOSE for {filter} in time"),
            Incoming::Closed(why) => bail!("{why}"),
            Incoming::Text(text, at) => {
                if text.starts_with("[\"EVENT\"") {
                    frames.push(text);
                    continue;
                }
                match RelayMessage::parse(&text) {
                    Some(RelayMessage::Eose(s)) if s == sub => break at - sent,
                    Some(RelayMessage::Closed { sub_id, message }) if sub_id == sub => {
                        bail!("{filter} was closed: {message}")
                    }
                    _ => {}
                }
            }
        }
    };
    ws.send(Message::text(json!(["CLOSE", sub]).to_string()))
        .await?;
    let mut events = 0;
    for text in &frames {
        match RelayMessage::parse(text) {
            Some(RelayMessage::Event { sub_id, .. }) if sub_id == sub => events += 1,
            Some(RelayMessage::Event { .. }) => {}
            _ => bail!("not a NIP-01 EVENT frame: {:.200}", text),
        }
    }
    Ok((latency, events))
}

/// Filter values picked from the database.
struct Picks {
    popular_author: String,
    median_author: String,
    ids: Vec<String>,
    e_value: String,
    p_value: String,
    follows: Vec<String>,
    window_start: i64,
}

async fn pick_values(db_url: &str) -> anyhow::Result<Picks> {
    let (client, conn) = tokio_postgres::connect(db_url, tokio_postgres::NoTls)
        .await
        .context("connecting to Postgres")?;
    let conn_task = tokio::spawn(conn);
    let authors = client
        .query(
            "SELECT pubkey, count(*) AS n FROM events GROUP BY pubkey ORDER BY n DESC, pubkey",
            &[],
        )
        .await?;
    if authors.is_empty() {
        bail!("the database holds no events: seed it first");
    }
    let hex_of = |row: &tokio_postgres::Row| hex::encode(row.get::<_, Vec<u8>>(0));
    let popular_author = hex_of(&authors[0]);
    let median_author = hex_of(&authors[authors.len() / 2]);
    let ids: Vec<String> = client
        .query(
            "SELECT id FROM events TABLESAMPLE SYSTEM (1) WHERE kind = 1 LIMIT 1000",
            &[],
        )
        .await?
        .iter()
        .map(hex_of)
        .collect();
    let ids = if ids.is_empty() {
        client
            .query("SELECT id FROM events ORDER BY random() LIMIT 100", &[])
            .await?
            .iter()
            .map(hex_of)
            .collect()
    } else {
        ids
    };
    let top_value = |name: &'static str| {
        let client = &client;
        async move {
            let row = client
                .query_opt(
                    "SELECT value FROM tags WHERE name = $1 GROUP BY value ORDER BY count(*) DESC LIMIT 1",
                    &[&name],
                )
                .await?;
            Ok::<_, anyhow::Error>(row.map(|r| r.get::<_, String>(0)))
        }
    };
    let e_value = top_value("e").await?.unwrap_or_else(random_hex32);
    let p_value = top_value("p")
        .await?
        .unwrap_or_else(|| popular_author.clone());
    // A follow set: the longest contact list's first 50 follows, topped up with top authors.
    let mut follows: Vec<String> = Vec::new();
    if let Some(row) = client
        .query_opt(
            "SELECT json FROM events WHERE kind = 3 ORDER BY length(json) DESC LIMIT 1",
            &[],
        )
        .await?
    {
        let json: String = row.get(0);
        if let Ok(event) = Event::from_json(&json) {
            follows.extend(
                event
                    .indexed_tags()
                    .filter(|(l, _)| *l == 'p')
                    .map(|(_, v)| v.to_string())
                    .take(50),
            );
        }
    }
    for row in &authors {
        if follows.len() >= 50 {
            break;
        }
        let a = hex_of(row);
        if !follows.contains(&a) {
            follows.push(a);
        }
    }
    let (min, max): (Option<i64>, Option<i64>) = {
        let row = client
            .query_one("SELECT min(created_at), max(created_at) FROM events", &[])
            .await?;
        (row.get(0), row.get(1))
    };
    let window_start = match (min, max) {
        (Some(lo), Some(hi)) => lo + (hi - lo) / 2,
        _ => shared::unix_now() - 3600,
    };
    drop(client);
    let _ = conn_task.await;
    Ok(Picks {
        popular_author,
        median_author,
        ids,
        e_value,
        p_value,
        follows,
        window_start,
    })
}

async fn query(a: QueryArgs) -> anyhow::Result<Value> {
    let picks = pick_values(&a.db_url).await?;
    let requests = a.requests.max(1);
    let concurrency = a.concurrency.clamp(1, requests);
    let w = picks.window_start;
    type MakeFilter = Box<dyn Fn(usize) -> Value + Send + Sync>;
    let ids = picks.ids.clone();
    let unknown = random_hex32();
    let (popular, median) = (picks.popular_author.clone(), picks.median_author.clone());
    let (e, p, follows) = (
        picks.e_value.clone(),
        picks.p_value.clone(),
        picks.follows.clone(),
    );
    let filters: Vec<(&str, MakeFilter)> = vec![
        (
            "ids",
            Box::new(move |i| json!({"ids": [ids[i % ids.len()]]})),
        ),
        // Control: the same path with nothing stored to return (EOSE is the only frame).
        ("ids_unknown", Box::new(move |_| json!({"ids": [unknown]}))),
        (
            "author_kind_popular",
            Box::new(move |_| json!({"authors": [popular], "kinds": [1], "limit": 50})),
        ),
        (
            "author_kind_median",
            Box::new(move |_| json!({"authors": [median], "kinds": [1], "limit": 50})),
        ),
        ("tag_e", Box::new(move |_| json!({"#e": [e], "limit": 100}))),
        (
            "tag_p_kind",
            Box::new(move |_| json!({"#p": [p], "kinds": [1, 7], "limit": 100})),
        ),
        (
            "since_until_1h",
            Box::new(move |_| json!({"since": w, "until": w + 3600})),
        ),
        (
            "follow_feed_50",
            Box::new(move |_| json!({"authors": follows, "kinds": [1], "limit": 50})),
        ),
    ];
    println!(
        "query: {requests} requests per filter, {concurrency} connection(s), to {}",
        a.url
    );
    println!(
        "  picked: popular author {}…, median author {}…, {} ids, #e {}…, #p {}…, {} follows, window from {}",
        &picks.popular_author[..12],
        &picks.median_author[..12],
        picks.ids.len(),
        &picks.e_value[..12.min(picks.e_value.len())],
        &picks.p_value[..12.min(picks.p_value.len())],
        picks.follows.len(),
        picks.window_start
    );
    let mut sockets = connect_many(
        std::slice::from_ref(&a.url),
        concurrency,
        concurrency,
        false,
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(a.common.timeout);
    let warmup = (requests / 10).clamp(1, 20);
    let mut results = serde_json::Map::new();
    let mut counter = 0usize;
    for (name, make) in &filters {
        // Warm up (not measured) on the first connection.
        for i in 0..warmup {
            counter += 1;
            timed_req(&mut sockets[0], &format!("w{counter}"), &make(i), deadline)
                .await
                .with_context(|| format!("{name} (warm-up)"))?;
        }
        let make = &**make;
        let per_conn: Vec<Vec<usize>> = (0..concurrency)
            .map(|c| (c..requests).step_by(concurrency).collect())
            .collect();
        let outcomes =
            futures_util::future::join_all(sockets.iter_mut().zip(per_conn).enumerate().map(
                |(c, (ws, mine))| async move {
                    let mut lat = Samples::default();
                    let mut events = 0usize;
                    for i in mine {
                        let (d, n) =
                            timed_req(ws, &format!("q{c}_{i}"), &make(i), deadline).await?;
                        lat.push(d);
                        events += n;
                    }
                    Ok::<_, anyhow::Error>((lat, events))
                },
            ))
            .await;
        let mut lat = Samples::default();
        let mut events = 0usize;
        for outcome in outcomes {
            let (mut l, n) = outcome.with_context(|| format!("filter {name}"))?;
            lat.append(&mut l);
            events += n;
        }
        let s = lat.summary();
        let example = make(0);
        let mean_events = events as f64 / s.count.max(1) as f64;
        println!("  {name:<20} {}  ({mean_events:.0} events/req)", s.line());
        results.insert(
            (*name).to_string(),
            json!({"filter": example, "latency": s.json(), "mean_events": round3(mean_events)}),
        );
    }
    Ok(json!({
        "scenario": "query",
        "url": a.url,
        "requests": requests,
        "concurrency": concurrency,
        "order": filters.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
        "filters": results,
    }))
}

// ---------------------------------------------------------------------------------------------
// connections
// ---------------------------------------------------------------------------------------------

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}

/// The soft limit on open files of this process (None if it cannot be read).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        Some(u64::MAX)
    } else {
        soft.parse().ok()
    }
}

async fn connections(a: ConnectionsArgs) -> anyhow::Result<Value> {
    let count = a.count.max(1);
    if let Some(limit) = open_files_limit()
        && limit < count as u64 + 64
    {
        bail!(
            "this process may open {limit} files but needs about {}: raise it first (ulimit -n {})",
            count + 64,
            count + 1024
        );
    }
    println!(
        "connections: {count} idle connections to {} with one subscription each",
        a.url
    );
    let rss_before = a.pid.map(rss_kib).transpose()?;
    let deadline = Instant::now() + Duration::from_secs(a.common.timeout);
    let (stop_tx, stop_rx) = watch::channel(false);
    let gate = Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
    let (ready_tx, mut ready_rx) =
        tokio::sync::mpsc::unbounded_channel::<Result<Duration, String>>();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let url = a.url.clone();
        let gate = gate.clone();
        let ready = ready_tx.clone();
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let opened = async {
                let _permit = gate.acquire().await.context("semaphore closed")?;
                let t = Instant::now();
                let mut ws = connect(&url, true).await?;
                let filter = json!({"#p": [random_hex32()], "kinds": [1, 7], "limit": 10});
                ws.send(Message::text(req_frame(&format!("idle{i}"), &filter)))
                    .await?;
                loop {
                    match next_text(&mut ws, deadline).await {
                        Incoming::Timeout => bail!("no EOSE in time"),
                        Incoming::Closed(why) => bail!("{why}"),
                        Incoming::Text(text, _) => match RelayMessage::parse(&text) {
                            Some(RelayMessage::Eose(_)) => break,
                            Some(RelayMessage::Closed { message, .. }) => {
                                bail!("subscription closed: {message}")
                            }
                            _ => {}
                        },
                    }
                }
                Ok::<_, anyhow::Error>((ws, t.elapsed()))
            }
            .await;
            match opened {
                Ok((mut ws, took)) => {
                    let _ = ready.send(Ok(took));
                    // Stay idle (reading answers the relay's pings) until told to stop.
                    loop {
                        tokio::select! {
                            _ = stop.changed() => break,
                            incoming = next_text(&mut ws, deadline) => {
                                if !matches!(incoming, Incoming::Text(..)) {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = ws.close(None).await;
                }
                Err(e) => {
                    let _ = ready.send(Err(format!("{e:#}")));
                }
            }
        }));
    }
    drop(ready_tx);
    let mut ok = 0u64;
    let mut failed = 0u64;
    let mut first_error = None;
    let mut setup = Samples::default();
    while let Some(r) = ready_rx.recv().await {
        match r {
            Ok(took) => {
                ok += 1;
                setup.push(took);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
        if ok + failed == count as u64 {
            break;
        }
    }
    let open_s = start.elapsed().as_secs_f64();
    println!("  {ok} connections subscribed in {open_s:.1}s ({failed} failed)");
    tokio::time::sleep(Duration::from_secs(a.hold)).await;
    let rss_after = a.pid.map(rss_kib).transpose()?;
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) if ok > 0 => Some(a.saturating_sub(b) as f64 / ok as f64),
        _ => None,
    };
    if let (Some(b), Some(after)) = (rss_before, rss_after) {
        println!(
            "  gateway RSS {b} KiB before, {after} KiB after: {:.1} KiB per connection",
            per_conn.unwrap_or(0.0)
        );
    }
    let setup = setup.summary();
    println!("  connect+REQ→EOSE per connection: {}", setup.line());
    if let Some(e) = &first_error {
        println!("  first error: {e}");
    }
    Ok(json!({
        "scenario": "connections",
        "url": a.url,
        "count": count,
        "subscribed": ok,
        "failed": failed,
        "open_s": round3(open_s),
        "setup_latency": setup.json(),
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "rss_per_conn_kib": per_conn.map(|v| (v * 10.0).round() / 10.0),
        "first_error": first_error,
    }))
}

// ---------------------------------------------------------------------------------------------
// report
// ---------------------------------------------------------------------------------------------

/// One line of the report.
struct Row {
    scenario: String,
    metric: String,
    value: String,
    target: String,
    met: String,
}

fn row(scenario: &str, metric: &str, value: String, target: &str, met: String) -> Row {
    Row {
        scenario: scenario.into(),
        metric: metric.into(),
        value,
        target: target.into(),
        met,
    }
}

/// "yes"/"no", starred when the run was smaller than the target's scale.
fn verdict(ok: bool, at_scale: bool) -> String {
    match (ok, at_scale) {
        (true, true) => "yes".into(),
        (false, true) => "**no**".into(),
        (true, false) => "yes*".into(),
        (false, false) => "**no***".into(),
    }
}

fn f(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_f64()
}

fn fmt_num(x: f64) -> String {
    let s = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 { format!("-{out}") } else { out }
}

fn report(a: &ReportArgs) -> anyhow::Result<()> {
    let load = |name: &str| -> Option<Value> {
        let text = std::fs::read_to_string(a.results.join(format!("{name}.json"))).ok()?;
        serde_json::from_str(&text).ok()
    };
    let failure = |name: &str| -> Option<String> {
        std::fs::read_to_string(a.results.join(format!("{name}.error")))
            .ok()
            .map(|s| s.trim().to_string())
    };
    let names = [
        "verify-rate",
        "seed",
        "query",
        "ingest-c200",
        "ingest-c20",
        "ingest-open",
        "fanout",
        "connections",
    ];
    let mut results = serde_json::Map::new();
    let mut rows: Vec<Row> = Vec::new();
    let mut small = false;
    for name in names {
        if let Some(why) = failure(name) {
            rows.push(row(
                name,
                "run",
                format!("FAILED: {why}"),
                "runs",
                "**no**".into(),
            ));
        }
        let Some(v) = load(name) else { continue };
        results.insert(name.into(), v);
    }
    let get = |name: &str| results.get(name);

    let verify = get("verify-rate").and_then(|v| f(v, &["verify_per_s"]));
    if let Some(vr) = verify {
        rows.push(row(
            "verify-rate",
            "Schnorr verify, 1 core",
            format!("{} ev/s", fmt_num(vr)),
            "–",
            "–".into(),
        ));
        if let Some(pv) = get("verify-rate").and_then(|v| f(v, &["parse_verify_per_s"])) {
            rows.push(row(
                "verify-rate",
                "parse + verify, 1 core",
                format!("{} ev/s", fmt_num(pv)),
                "–",
                "–".into(),
            ));
        }
    }
    if let Some(v) = get("seed") {
        rows.push(row(
            "seed",
            "events seeded (sign / copy / vacuum analyze / checkpoint)",
            format!(
                "{} ({:.1} s / {:.1} s / {:.1} s / {})",
                fmt_num(f(v, &["events"]).unwrap_or(0.0)),
                f(v, &["sign_s"]).unwrap_or(0.0),
                f(v, &["copy_s"]).unwrap_or(0.0),
                f(v, &["vacuum_analyze_s"]).unwrap_or(0.0),
                f(v, &["checkpoint_s"]).map_or("none".into(), |s| format!("{s:.1} s"))
            ),
            "–",
            "–".into(),
        ));
    }
    for (name, label) in [
        ("ingest-c200", "closed loop"),
        ("ingest-c20", "closed loop"),
        ("ingest-open", "open loop"),
    ] {
        let Some(v) = get(name) else { continue };
        let conns = f(v, &["connections"]).unwrap_or(0.0);
        let scen = match f(v, &["rate"]) {
            Some(r) => format!("ingest, {label}, {} conn @ {} ev/s", conns, fmt_num(r)),
            None => format!("ingest, {label}, {conns} conn"),
        };
        let eps = f(v, &["events_per_s"]).unwrap_or(0.0);
        let (target, met) = if name == "ingest-c200" {
            let at_scale = conns >= 200.0;
            small |= !at_scale;
            ("≥ 10,000 ev/s", verdict(eps >= 10_000.0, at_scale))
        } else {
            ("–", "–".into())
        };
        rows.push(row(
            &scen,
            "throughput (OK true)",
            format!("{} ev/s", fmt_num(eps)),
            target,
            met,
        ));
        if let Some(vr) = verify
            && vr > 0.0
        {
            rows.push(row(
                &scen,
                "throughput / 1-core verify rate",
                format!("{:.2}", eps / vr),
                "–",
                "–".into(),
            ));
        }
        let p50 = f(v, &["ok_latency", "p50_ms"]).unwrap_or(f64::NAN);
        let (target, met) = if name == "ingest-c20" {
            let at_scale = (conns - 20.0).abs() < 0.5;
            small |= !at_scale;
            ("< 5 ms", verdict(p50 < 5.0, at_scale))
        } else {
            ("–", "–".into())
        };
        rows.push(row(
            &scen,
            "OK latency p50",
            format!("{p50:.2} ms"),
            target,
            met,
        ));
        rows.push(row(
            &scen,
            "OK latency p90 / p99 / max",
            format!(
                "{:.2} / {:.2} / {:.2} ms",
                f(v, &["ok_latency", "p90_ms"]).unwrap_or(f64::NAN),
                f(v, &["ok_latency", "p99_ms"]).unwrap_or(f64::NAN),
                f(v, &["ok_latency", "max_ms"]).unwrap_or(f64::NAN)
            ),
            "–",
            "–".into(),
        ));
        let bad = f(v, &["ok_false"]).unwrap_or(0.0)
            + f(v, &["timeouts"]).unwrap_or(0.0)
            + f(v, &["errors"]).unwrap_or(0.0)
            + f(v, &["not_sent"]).unwrap_or(0.0);
        rows.push(row(
            &scen,
            "OK true / false / timeouts / errors / not sent",
            format!(
                "{} / {} / {} / {} / {}",
                fmt_num(f(v, &["ok_true"]).unwrap_or(0.0)),
                fmt_num(f(v, &["ok_false"]).unwrap_or(0.0)),
                fmt_num(f(v, &["timeouts"]).unwrap_or(0.0)),
                fmt_num(f(v, &["errors"]).unwrap_or(0.0)),
                fmt_num(f(v, &["not_sent"]).unwrap_or(0.0))
            ),
            "all OK true",
            verdict(bad == 0.0, true),
        ));
    }
    if let Some(v) = get("fanout") {
        let subs = f(v, &["subs"]).unwrap_or(0.0);
        let rate = f(v, &["rate"]).unwrap_or(0.0);
        let gws = v.get("urls").and_then(Value::as_array).map_or(0, Vec::len);
        let scen = format!(
            "fan-out, {} subs over {gws} gateways @ {} ev/s",
            fmt_num(subs),
            fmt_num(rate)
        );
        let at_scale = subs >= 10_000.0 && rate >= 1000.0 && gws >= 2;
        small |= !at_scale;
        let p99 = f(v, &["delivery_latency", "p99_ms"]).unwrap_or(f64::NAN);
        rows.push(row(
            &scen,
            "delivery latency p50",
            format!(
                "{:.2} ms",
                f(v, &["delivery_latency", "p50_ms"]).unwrap_or(f64::NAN)
            ),
            "–",
            "–".into(),
        ));
        rows.push(row(
            &scen,
            "delivery latency p99",
            format!("{p99:.2} ms"),
            "< 50 ms",
            verdict(p99 < 50.0, at_scale),
        ));
        let missed = f(v, &["missed"]).unwrap_or(f64::NAN);
        rows.push(row(
            &scen,
            "missed deliveries",
            format!(
                "{} of {}",
                fmt_num(missed),
                fmt_num(f(v, &["expected_deliveries"]).unwrap_or(0.0))
            ),
            "0",
            verdict(missed == 0.0, at_scale),
        ));
        let dups = f(v, &["duplicates"]).unwrap_or(f64::NAN);
        rows.push(row(
            &scen,
            "duplicate deliveries",
            fmt_num(dups),
            "0",
            verdict(dups == 0.0, at_scale),
        ));
        rows.push(row(
            &scen,
            "deliveries/s",
            fmt_num(f(v, &["deliveries_per_s"]).unwrap_or(0.0)),
            "–",
            "–".into(),
        ));
        rows.push(row(
            &scen,
            "publish OK true / false / none",
            format!(
                "{} / {} / {}",
                fmt_num(f(v, &["publish_ok_true"]).unwrap_or(0.0)),
                fmt_num(f(v, &["publish_ok_false"]).unwrap_or(0.0)),
                fmt_num(f(v, &["publish_no_ok"]).unwrap_or(0.0))
            ),
            "–",
            "–".into(),
        ));
    }
    if let Some(v) = get("query") {
        let seeded = get("seed")
            .and_then(|s| f(s, &["events_in_db"]))
            .unwrap_or(0.0);
        let at_scale = seeded >= 1_000_000.0;
        small |= !at_scale;
        if let Some(filters) = v.get("filters").and_then(Value::as_object) {
            // In the order they ran (the JSON object itself is sorted by name).
            let mut names: Vec<&str> = v
                .get("order")
                .and_then(Value::as_array)
                .map(|o| o.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if names.is_empty() {
                names = filters.keys().map(String::as_str).collect();
            }
            for name in names {
                let Some(fv) = filters.get(name) else {
                    continue;
                };
                let p99 = f(fv, &["latency", "p99_ms"]).unwrap_or(f64::NAN);
                let control = name == "ids_unknown";
                rows.push(row(
                    &format!("query on {} events", fmt_num(seeded)),
                    &format!(
                        "{name}: REQ→EOSE p50 / p99 ({:.0} events/req)",
                        f(fv, &["mean_events"]).unwrap_or(0.0)
                    ),
                    format!(
                        "{:.2} / {p99:.2} ms",
                        f(fv, &["latency", "p50_ms"]).unwrap_or(f64::NAN)
                    ),
                    if control {
                        "control: nothing stored matches"
                    } else {
                        "p99 < 10 ms"
                    },
                    if control {
                        "–".into()
                    } else {
                        verdict(p99 < 10.0, at_scale)
                    },
                ));
            }
        }
    }
    if let Some(v) = get("connections") {
        let count = f(v, &["subscribed"]).unwrap_or(0.0);
        let scen = format!("connections, {} idle", fmt_num(count));
        let at_scale = count >= 10_000.0;
        small |= !at_scale;
        match f(v, &["rss_per_conn_kib"]) {
            Some(kib) => rows.push(row(
                &scen,
                "gateway RSS per connection",
                format!("{kib:.1} KiB"),
                "< 64 KiB",
                verdict(kib < 64.0, at_scale),
            )),
            None => rows.push(row(
                &scen,
                "gateway RSS per connection",
                "not measured (no --pid)".into(),
                "< 64 KiB",
                "–".into(),
            )),
        }
        rows.push(row(
            &scen,
            "failed to connect/subscribe",
            fmt_num(f(v, &["failed"]).unwrap_or(0.0)),
            "0",
            verdict(f(v, &["failed"]) == Some(0.0), true),
        ));
    }

    let profile = match a.profile {
        Profile::Short => "short",
        Profile::Full => "full",
    };
    let mut md = String::new();
    let _ = writeln!(md, "# Relay benchmark ({profile} profile)\n");
    let _ = writeln!(
        md,
        "Machine: {} cores; the load generator runs on the same machine as the relay, Redis and Postgres.\n",
        std::thread::available_parallelism().map_or(1, |p| p.get())
    );
    let _ = writeln!(md, "| scenario | metric | value | target | met? |");
    let _ = writeln!(md, "|---|---|---|---|---|");
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            r.scenario,
            r.metric,
            r.value.replace('|', "/"),
            r.target,
            r.met
        );
    }
    if small {
        let _ = writeln!(
            md,
            "\n\\* measured at a smaller scale than the target is stated for (short profile); run `make bench BENCH=full` for the real sizes."
        );
    }
    // Where the CPU went (deploy/bench.sh writes <scenario>.cpu.json).
    let mut cpu = serde_json::Map::new();
    let mut cpu_lines = Vec::new();
    for name in names {
        let Ok(text) = std::fs::read_to_string(a.results.join(format!("{name}.cpu.json"))) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let wall = f(&v, &["wall_s"]).unwrap_or(0.0);
        let busy = f(&v, &["machine_busy_s"]).unwrap_or(0.0);
        let total = f(&v, &["machine_total_s"]).unwrap_or(0.0);
        let mut parts = Vec::new();
        let mut ours = 0.0;
        if let Some(procs) = v.get("cpu_s").and_then(Value::as_object) {
            for (proc_name, secs) in procs {
                let secs = secs.as_f64().unwrap_or(0.0);
                ours += secs;
                parts.push(format!("{proc_name} {secs:.1}"));
            }
        }
        parts.push(format!("everything else {:.1}", (busy - ours).max(0.0)));
        let seconds = |key: &str| f(&v, &[key]).map_or("–".into(), |s| format!("{s:.1} s"));
        let disk = match (
            f(&v, &["disk", "written_mb"]),
            f(&v, &["disk", "write_wait_s"]),
        ) {
            (Some(mb), Some(wait)) => format!("{mb:.0} MB written, {wait:.1} s waited"),
            _ => "–".into(),
        };
        cpu_lines.push(format!(
            "| {name} | {wall:.1} s | {busy:.1} of {total:.1} s ({:.0}%) | {} / {} | {disk} | {} |",
            if total > 0.0 {
                busy / total * 100.0
            } else {
                0.0
            },
            seconds("iowait_s"),
            seconds("steal_s"),
            parts.join(", ")
        ));
        cpu.insert(name.into(), v);
    }
    if !cpu_lines.is_empty() {
        let _ = writeln!(
            md,
            "\n## Where the CPU went\n\nCPU seconds used by each process while a scenario ran (its whole run: signing and setup included). \
             `relay-bench` is the load generator; \"everything else\" is the rest of the machine (other work on it distorts the numbers above). \
             iowait is CPU time idle while a disk request was pending, steal the time the VM's host gave the cores to others (part of \"machine busy\"); the disk column is what the disk holding Redis's and Postgres's files wrote, \
             and the seconds its write requests waited (summed over requests): a scenario that is slow with the CPU not busy is waiting on the disk.\n"
        );
        let _ = writeln!(
            md,
            "| scenario | wall | machine busy | iowait / steal | disk | CPU seconds |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|");
        for line in cpu_lines {
            let _ = writeln!(md, "{line}");
        }
    }
    let rows_json: Vec<Value> = rows
        .iter()
        .map(|r| json!({"scenario": r.scenario, "metric": r.metric, "value": r.value, "target": r.target, "met": r.met}))
        .collect();
    let report = json!({
        "profile": profile,
        "generated_at": shared::unix_now(),
        "cores": std::thread::available_parallelism().map_or(1, |p| p.get()),
        "results": results,
        "cpu": cpu,
        "rows": rows_json,
    });
    std::fs::create_dir_all(&a.out)?;
    write_json(&a.out.join("report.json"), &report)?;
    std::fs::write(a.out.join("report.md"), &md)?;
    print!("{md}");
    Ok(())
}
