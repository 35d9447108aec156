//! Harness for the fault tests (`tests/faults/`): private Redis and Postgres that a test
//! may stop and start without touching the shared test services, a WebSocket client that
//! sees close codes, a background client ([`Agent`]), a publisher that retries and
//! reconnects within bounds, nginx as a load balancer, signals, `/readyz`, RSS and
//! database checks.
//!
//! Every wait here is bounded; nothing blocks forever.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use shared::event::signing::Keys;
use shared::event::{Event, Kind};
use shared::message::RelayMessage;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{Services, WAIT, bin_dir};

/// A port that was free a moment ago (bound on 127.0.0.1:0, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// The workspace's `target/` directory (the parent of [`bin_dir`]).
pub fn target_dir() -> PathBuf {
    bin_dir()
        .parent()
        .map(PathBuf::from)
        .expect("target/<profile> has a parent")
}

fn stack_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join("local-stack.sh")
}

/// Eight random hex digits, for names that must not collide between tests.
pub fn random_suffix() -> String {
    hex::encode(rand::random::<[u8; 4]>())
}

/// Runs `deploy/local-stack.sh <args>` (non-durable services), failing with its output.
async fn stack(args: &[&str]) -> anyhow::Result<()> {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new("bash")
            .arg(stack_script())
            .args(args)
            .env("FAST", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("local-stack.sh {args:?} timed out"))??;
    if !out.status.success() {
        bail!(
            "local-stack.sh {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A Redis and/or Postgres of one test's own (state under `target/fault-services/`), so
/// the test can stop and start them. The services not started privately are the shared
/// ones from the environment. Stopped (and their state removed) on drop; after a failed
/// test the state is kept for inspection.
pub struct PrivateServices {
    /// The state directory.
    pub state: PathBuf,
    /// The private Redis port, if this has one.
    pub redis_port: Option<u16>,
    /// The private Postgres port, if this has one.
    pub pg_port: Option<u16>,
}

impl PrivateServices {
    /// Starts a private Redis (`redis`) and/or Postgres (`postgres`) on free ports.
    pub async fn start(tag: &str, redis: bool, postgres: bool) -> anyhow::Result<Self> {
        let state = target_dir()
            .join("fault-services")
            .join(format!("{tag}-{}", random_suffix()));
        std::fs::create_dir_all(&state)?;
        let services = PrivateServices {
            state,
            redis_port: redis.then(free_port),
            pg_port: postgres.then(free_port),
        };
        if services.redis_port.is_some() {
            services.start_redis().await?;
        }
        if services.pg_port.is_some() {
            services.start_postgres().await?;
        }
        Ok(services)
    }

    fn state_arg(&self) -> String {
        self.state.to_string_lossy().into_owned()
    }

    /// The services a cluster should use: the private ones, the shared ones otherwise.
    pub fn services(&self) -> Services {
        let shared = || Services::from_env();
        Services {
            redis_url: match self.redis_port {
                Some(port) => format!("redis://127.0.0.1:{port}/"),
                None => shared().redis_url,
            },
            admin_db_url: match self.pg_port {
                Some(port) => format!("postgres://postgres@127.0.0.1:{port}/postgres"),
                None => shared().admin_db_url,
            },
        }
    }

    /// Starts (again) the private Redis, on the same port.
    pub async fn start_redis(&self) -> anyhow::Result<()> {
        let port = self.redis_port.context("no private Redis")?.to_string();
        stack(&["redis-start", &self.state_arg(), &port]).await
    }

    /// Stops the private Redis (SIGTERM; nothing is persisted).
    pub async fn stop_redis(&self) -> anyhow::Result<()> {
        self.redis_port.context("no private Redis")?;
        stack(&["redis-stop", &self.state_arg()]).await
    }

    /// Starts (again) the private Postgres, on the same port with the same data.
    pub async fn start_postgres(&self) -> anyhow::Result<()> {
        let port = self.pg_port.context("no private Postgres")?.to_string();
        stack(&["pg-start", &self.state_arg(), &port]).await
    }

    /// Stops the private Postgres (`pg_ctl stop -m fast`: sessions are cut).
    pub async fn stop_postgres(&self) -> anyhow::Result<()> {
        self.pg_port.context("no private Postgres")?;
        stack(&["pg-stop", &self.state_arg()]).await
    }
}

impl Drop for PrivateServices {
    fn drop(&mut self) {
        let cmd = if std::thread::panicking() {
            "services-down"
        } else {
            "clean"
        };
        let _ = std::process::Command::new("bash")
            .arg(stack_script())
            .arg(cmd)
            .arg(&self.state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// What a [`WsClient`] got next.
#[derive(Debug)]
pub enum Incoming {
    /// A NIP-01 relay message.
    Msg(RelayMessage),
    /// A text frame that is not a relay message.
    Other(String),
    /// A close frame, with its code if it had one.
    Closed(Option<u16>),
    /// The socket ended without a close frame (reset, end of stream, protocol error).
    Dropped(String),
    /// Nothing within the wait.
    Timeout,
}

/// A WebSocket client that reports how its socket ended (close codes included).
pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The NIP-42 challenge sent on connect.
    pub challenge: String,
    /// The `X-Upstream` response header (set by the test load balancer), if any.
    pub upstream: Option<String>,
}

impl WsClient {
    /// Connects and reads the relay's AUTH challenge, within [`WAIT`].
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let (ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .context("connect timed out")??;
        Self::finish(ws, &response).await
    }

    /// Connects with a small socket receive buffer (`rcvbuf` bytes), so that a client that
    /// stops reading makes the relay's side block quickly instead of the kernel absorbing
    /// megabytes.
    pub async fn connect_small_rcvbuf(addr: SocketAddr, rcvbuf: u32) -> anyhow::Result<Self> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(rcvbuf)?;
        let stream = tokio::time::timeout(WAIT, socket.connect(addr))
            .await
            .context("connect timed out")??;
        let (ws, response) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::client_async(format!("ws://{addr}"), MaybeTlsStream::Plain(stream)),
        )
        .await
        .context("handshake timed out")??;
        Self::finish(ws, &response).await
    }

    async fn finish(
        ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
        response: &tokio_tungstenite::tungstenite::handshake::client::Response,
    ) -> anyhow::Result<Self> {
        let upstream = response
            .headers()
            .get("x-upstream")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut client = WsClient {
            ws,
            challenge: String::new(),
            upstream,
        };
        match client.next(WAIT).await {
            Incoming::Msg(RelayMessage::Auth(challenge)) => client.challenge = challenge,
            other => bail!("expected an AUTH challenge first, got {other:?}"),
        }
        Ok(client)
    }

    /// Sends a text frame (bounded by [`WAIT`]).
    pub async fn send_text(&mut self, text: String) -> anyhow::Result<()> {
        tokio::time::timeout(WAIT, self.ws.send(Message::text(text)))
            .await
            .context("send timed out")??;
        Ok(())
    }

    /// Sends `["EVENT", ev]`.
    pub async fn send_event(&mut self, ev: &Event) -> anyhow::Result<()> {
        self.send_text(event_msg(ev)).await
    }

    /// Sends `["REQ", sub, filters...]`.
    pub async fn send_req(
        &mut self,
        sub: &str,
        filters: &[serde_json::Value],
    ) -> anyhow::Result<()> {
        self.send_text(req_msg("REQ", sub, filters)).await
    }

    /// The next message within `within` (pings and pongs are skipped).
    pub async fn next(&mut self, within: Duration) -> Incoming {
        let deadline = Instant::now() + within;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Incoming::Timeout,
                Ok(None) => return Incoming::Dropped("end of stream".into()),
                Ok(Some(Err(e))) => return Incoming::Dropped(e.to_string()),
                Ok(Some(Ok(msg))) => msg,
            };
            match msg {
                Message::Text(t) => {
                    return match RelayMessage::parse(t.as_str()) {
                        Some(m) => Incoming::Msg(m),
                        None => Incoming::Other(t.to_string()),
                    };
                }
                Message::Close(frame) => return Incoming::Closed(frame.map(|f| u16::from(f.code))),
                _ => continue,
            }
        }
    }

    /// Publishes and waits (within `within`) for the event's `OK`; `None` if none came.
    pub async fn publish(&mut self, ev: &Event, within: Duration) -> Option<(bool, String)> {
        self.send_event(ev).await.ok()?;
        let id = ev.id.to_hex();
        let deadline = Instant::now() + within;
        loop {
            match self
                .next(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Incoming::Msg(RelayMessage::Ok {
                    event_id,
                    accepted,
                    message,
                }) if event_id == id => return Some((accepted, message)),
                Incoming::Msg(_) | Incoming::Other(_) => {}
                _ => return None,
            }
        }
    }

    /// Sends a `REQ` (or `COUNT` when `verb` is "COUNT") and waits for how it ends.
    pub async fn query(
        &mut self,
        verb: &str,
        sub: &str,
        filters: &[serde_json::Value],
        within: Duration,
    ) -> QueryEnd {
        if let Err(e) = self.send_text(req_msg(verb, sub, filters)).await {
            return QueryEnd::Dropped(e.to_string());
        }
        let deadline = Instant::now() + within;
        let mut events = Vec::new();
        loop {
            match self
                .next(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Incoming::Msg(RelayMessage::Event { sub_id, event }) if sub_id == sub => {
                    events.push(*event)
                }
                Incoming::Msg(RelayMessage::Eose(s)) if s == sub => return QueryEnd::Eose(events),
                Incoming::Msg(RelayMessage::Count { query_id, count }) if query_id == sub => {
                    return QueryEnd::Count(count);
                }
                Incoming::Msg(RelayMessage::Closed { sub_id, message }) if sub_id == sub => {
                    return QueryEnd::Closed(message);
                }
                Incoming::Msg(_) | Incoming::Other(_) => {}
                Incoming::Timeout => return QueryEnd::NoAnswer,
                Incoming::Closed(code) => return QueryEnd::Dropped(format!("close {code:?}")),
                Incoming::Dropped(why) => return QueryEnd::Dropped(why),
            }
        }
    }
}

/// How a `REQ` or `COUNT` ended.
#[derive(Debug)]
pub enum QueryEnd {
    /// Stored events, then `EOSE`.
    Eose(Vec<Event>),
    /// A `COUNT` answer.
    Count(u64),
    /// `CLOSED` with this message.
    Closed(String),
    /// Nothing in time.
    NoAnswer,
    /// The socket ended.
    Dropped(String),
}

/// `["EVENT", ev]`.
pub fn event_msg(ev: &Event) -> String {
    format!("[\"EVENT\",{}]", ev.to_json())
}

/// `[verb, sub, filters...]`.
pub fn req_msg(verb: &str, sub: &str, filters: &[serde_json::Value]) -> String {
    let mut msg = vec![serde_json::json!(verb), serde_json::json!(sub)];
    msg.extend(filters.iter().cloned());
    serde_json::Value::Array(msg).to_string()
}

/// How an [`Agent`]'s socket ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// A close frame with this code.
    Close(Option<u16>),
    /// No close frame: reset or end of stream.
    Dropped(String),
}

/// What an [`Agent`] has received so far.
#[derive(Debug, Default)]
pub struct Seen {
    /// Event ids received, per subscription.
    pub events: HashMap<String, HashSet<String>>,
    /// Events received again on the same subscription.
    pub repeated: usize,
    /// The first `OK` per event id.
    pub oks: HashMap<String, (bool, String)>,
    /// `OK`s beyond the first for an id.
    pub extra_oks: usize,
    /// Subscriptions that got `EOSE`.
    pub eose: HashSet<String>,
    /// Subscriptions that got `CLOSED`, with the message.
    pub closed: HashMap<String, String>,
    /// `NOTICE`s.
    pub notices: Vec<String>,
    /// How and when the socket ended, if it did.
    pub end: Option<(Instant, End)>,
}

impl Seen {
    /// Event ids received on `sub` (empty if none).
    pub fn ids(&self, sub: &str) -> HashSet<String> {
        self.events.get(sub).cloned().unwrap_or_default()
    }

    /// How many of `ids` were received on `sub`.
    pub fn count_of<'a>(&self, sub: &str, ids: impl IntoIterator<Item = &'a String>) -> usize {
        match self.events.get(sub) {
            Some(got) => ids.into_iter().filter(|id| got.contains(*id)).count(),
            None => 0,
        }
    }
}

/// A client whose socket is read continuously by a background task (so it is never a slow
/// consumer); frames to send go through a channel. Everything received is in [`Seen`].
pub struct Agent {
    tx: mpsc::UnboundedSender<String>,
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
    /// The `X-Upstream` header of the connection (load balancer tests).
    pub upstream: Option<String>,
}

impl Agent {
    /// Connects to `url` and starts reading.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        Ok(Self::spawn(WsClient::connect(url).await?))
    }

    /// Takes over a connected client.
    pub fn spawn(client: WsClient) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let upstream = client.upstream.clone();
        let mut ws = client.ws;
        let state = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            let end = loop {
                tokio::select! {
                    out = rx.recv() => match out {
                        Some(text) => {
                            if let Err(e) = ws.send(Message::text(text)).await {
                                break End::Dropped(format!("send: {e}"));
                            }
                        }
                        None => return,
                    },
                    msg = ws.next() => match msg {
                        None => break End::Dropped("end of stream".into()),
                        Some(Err(e)) => break End::Dropped(e.to_string()),
                        Some(Ok(Message::Close(frame))) => {
                            break End::Close(frame.map(|f| u16::from(f.code)));
                        }
                        Some(Ok(Message::Text(text))) => record(&state, text.as_str()),
                        Some(Ok(_)) => {}
                    },
                }
            };
            lock(&state).end = Some((Instant::now(), end));
        });
        Agent {
            tx,
            seen,
            task,
            upstream,
        }
    }

    /// Queues a text frame; false if the agent's socket is gone.
    pub fn send(&self, text: String) -> bool {
        self.tx.send(text).is_ok()
    }

    /// Queues `["EVENT", ev]`.
    pub fn publish(&self, ev: &Event) -> bool {
        self.send(event_msg(ev))
    }

    /// Queues a `REQ`.
    pub fn subscribe(&self, sub: &str, filters: &[serde_json::Value]) -> bool {
        self.send(req_msg("REQ", sub, filters))
    }

    /// Looks at what was received.
    pub fn seen<R>(&self, f: impl FnOnce(&Seen) -> R) -> R {
        f(&lock(&self.seen))
    }

    /// How the socket ended, if it did.
    pub fn end(&self) -> Option<End> {
        self.seen(|s| s.end.as_ref().map(|(_, e)| e.clone()))
    }

    /// Waits until `cond` holds (true) or `within` passes (false).
    pub async fn wait_until(&self, within: Duration, cond: impl Fn(&Seen) -> bool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if cond(&lock(&self.seen)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(seen: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(|e| e.into_inner())
}

fn record(state: &Mutex<Seen>, text: &str) {
    // Only the ids are kept: extract them without building whole events.
    let Ok(items) = serde_json::from_str::<Vec<serde_json::Value>>(text) else {
        return;
    };
    let s = |i: usize| items.get(i).and_then(|v| v.as_str()).map(str::to_owned);
    let mut seen = lock(state);
    match items.first().and_then(|v| v.as_str()) {
        Some("EVENT") => {
            let (Some(sub), Some(id)) = (
                s(1),
                items
                    .get(2)
                    .and_then(|e| e.get("id"))
                    .and_then(|v| v.as_str()),
            ) else {
                return;
            };
            if !seen.events.entry(sub).or_default().insert(id.to_owned()) {
                seen.repeated += 1;
            }
        }
        Some("OK") => {
            let (Some(id), Some(accepted)) = (s(1), items.get(2).and_then(|v| v.as_bool())) else {
                return;
            };
            let message = s(3).unwrap_or_default();
            match seen.oks.entry(id) {
                std::collections::hash_map::Entry::Occupied(_) => seen.extra_oks += 1,
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert((accepted, message));
                }
            }
        }
        Some("EOSE") => {
            if let Some(sub) = s(1) {
                seen.eose.insert(sub);
            }
        }
        Some("CLOSED") => {
            if let Some(sub) = s(1) {
                seen.closed.insert(sub, s(2).unwrap_or_default());
            }
        }
        Some("NOTICE") => {
            if let Some(n) = s(1) {
                seen.notices.push(n);
            }
        }
        _ => {}
    }
}

/// How [`publish`] behaves.
#[derive(Clone, Debug)]
pub struct PublishPlan {
    /// Events sent before waiting for their `OK`s.
    pub window: usize,
    /// How long to wait for a window's `OK`s (set above the gateway's reply timeout).
    pub answer_wait: Duration,
    /// Most sends of one event (1: never resent). Events answered `error:` or not at all are
    /// resent; other refusals are final.
    pub max_sends: usize,
    /// Pause between windows.
    pub pace: Duration,
    /// Nothing is sent after this; unsent events are reported.
    pub deadline: Instant,
}

/// One `OK` a publisher got.
#[derive(Debug, Clone)]
pub struct Answer {
    /// When it came.
    pub at: Instant,
    /// The event id.
    pub id: String,
    /// The flag.
    pub accepted: bool,
    /// The message.
    pub message: String,
    /// Time since the event was last sent.
    pub latency: Duration,
}

/// What [`publish`] got.
#[derive(Debug, Default)]
pub struct PublishReport {
    /// Distinct events handed to the publisher.
    pub events: usize,
    /// `EVENT` frames sent (resends included).
    pub sent: usize,
    /// Ids that got `OK true` (at any time, late answers included).
    pub accepted: HashSet<String>,
    /// Ids refused for good: the last `OK false` message.
    pub refused: HashMap<String, String>,
    /// Ids that never got any `OK`.
    pub unanswered: HashSet<String>,
    /// Every `OK` received, in order.
    pub answers: Vec<Answer>,
    /// Sends that got no `OK` within `answer_wait` while the socket stayed open.
    pub no_answer_in_time: usize,
    /// Sends whose answer was lost because the socket ended.
    pub cut_off: usize,
    /// Reconnects after a socket ended.
    pub reconnects: usize,
    /// Failed connection attempts.
    pub connect_failures: usize,
}

impl PublishReport {
    /// Adds another publisher's report into this one.
    pub fn merge(&mut self, other: PublishReport) {
        self.events += other.events;
        self.sent += other.sent;
        self.accepted.extend(other.accepted);
        self.refused.extend(other.refused);
        self.unanswered.extend(other.unanswered);
        self.answers.extend(other.answers);
        self.no_answer_in_time += other.no_answer_in_time;
        self.cut_off += other.cut_off;
        self.reconnects += other.reconnects;
        self.connect_failures += other.connect_failures;
    }

    /// `OK false "error: ..."` answers received.
    pub fn error_answers(&self) -> usize {
        self.answers
            .iter()
            .filter(|a| !a.accepted && a.message.starts_with("error:"))
            .count()
    }

    /// Answers received in `[from, to)`, as (OK true, `error:`, other refusals).
    pub fn answers_between(&self, from: Instant, to: Instant) -> (usize, usize, usize) {
        let mut counts = (0, 0, 0);
        for a in self.answers.iter().filter(|a| a.at >= from && a.at < to) {
            if a.accepted {
                counts.0 += 1;
            } else if a.message.starts_with("error:") {
                counts.1 += 1;
            } else {
                counts.2 += 1;
            }
        }
        counts
    }

    /// The longest time from sending an event to its answer.
    pub fn slowest(&self) -> Duration {
        self.answers
            .iter()
            .map(|a| a.latency)
            .max()
            .unwrap_or_default()
    }

    /// A few refusal messages, for reports.
    pub fn sample_refusals(&self) -> Vec<String> {
        let mut msgs: Vec<String> = self.refused.values().cloned().collect();
        msgs.sort();
        msgs.dedup();
        msgs.truncate(3);
        msgs
    }
}

/// Publishes `events` over one connection to `url` in windows, reconnecting (with backoff)
/// when the socket ends and resending what got `error:` or no answer, all bounded by
/// `plan`. `accepted_total` counts `OK true` answers as they come (to time faults).
pub async fn publish(
    url: String,
    events: Vec<Event>,
    plan: PublishPlan,
    accepted_total: Arc<AtomicUsize>,
) -> PublishReport {
    let mut report = PublishReport {
        events: events.len(),
        ..PublishReport::default()
    };
    let ours: HashSet<String> = events.iter().map(|e| e.id.to_hex()).collect();
    let mut queue: VecDeque<(Event, usize)> = events.into_iter().map(|e| (e, 0)).collect();
    let mut last_refusal: HashMap<String, String> = HashMap::new();
    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    let mut client: Option<WsClient> = None;
    let mut connected_once = false;
    let mut backoff = Duration::from_millis(100);
    while !queue.is_empty() && Instant::now() < plan.deadline {
        if client.is_none() {
            match WsClient::connect(&url).await {
                Ok(c) => {
                    if connected_once {
                        report.reconnects += 1;
                    }
                    connected_once = true;
                    client = Some(c);
                }
                Err(_) => {
                    report.connect_failures += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            }
        }
        let Some(c) = client.as_mut() else { continue };
        let n = plan.window.max(1).min(queue.len());
        let batch: Vec<(Event, usize)> = queue.drain(..n).collect();
        let mut alive = true;
        let mut sent = 0;
        for (ev, _) in &batch {
            if c.send_event(ev).await.is_err() {
                alive = false;
                break;
            }
            sent_at.insert(ev.id.to_hex(), Instant::now());
            sent += 1;
        }
        report.sent += sent;
        let waiting: HashSet<String> = batch[..sent].iter().map(|(e, _)| e.id.to_hex()).collect();
        let mut got: HashMap<String, (bool, String)> = HashMap::new();
        let until = Instant::now() + plan.answer_wait;
        while alive && got.len() < waiting.len() {
            match c
                .next(until.saturating_duration_since(Instant::now()))
                .await
            {
                Incoming::Msg(RelayMessage::Ok {
                    event_id,
                    accepted,
                    message,
                }) => {
                    if !ours.contains(&event_id) {
                        continue;
                    }
                    let at = Instant::now();
                    report.answers.push(Answer {
                        at,
                        latency: sent_at.get(&event_id).map(|t| at - *t).unwrap_or_default(),
                        id: event_id.clone(),
                        accepted,
                        message: message.clone(),
                    });
                    if accepted && report.accepted.insert(event_id.clone()) {
                        accepted_total.fetch_add(1, Ordering::Relaxed);
                    }
                    if waiting.contains(&event_id) {
                        got.entry(event_id).or_insert((accepted, message));
                    }
                }
                Incoming::Msg(_) | Incoming::Other(_) => {}
                Incoming::Timeout => break,
                Incoming::Closed(_) | Incoming::Dropped(_) => alive = false,
            }
        }
        if !alive {
            client = None;
        }
        let mut trouble = false;
        for (i, (ev, sends)) in batch.into_iter().enumerate() {
            let id = ev.id.to_hex();
            let sends = if i < sent { sends + 1 } else { sends };
            let retry = match got.remove(&id) {
                Some((true, _)) => false,
                Some((false, msg)) => {
                    let transient = msg.starts_with("error:");
                    trouble |= transient;
                    last_refusal.insert(id, msg);
                    transient
                }
                None => {
                    trouble = true;
                    if i < sent {
                        if alive {
                            report.no_answer_in_time += 1;
                        } else {
                            report.cut_off += 1;
                        }
                    }
                    true
                }
            };
            if retry && sends < plan.max_sends.max(1) {
                queue.push_back((ev, sends));
            }
        }
        if trouble {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        } else {
            backoff = Duration::from_millis(100);
            if !plan.pace.is_zero() {
                tokio::time::sleep(plan.pace).await;
            }
        }
    }
    for id in ours {
        if report.accepted.contains(&id) {
            continue;
        }
        match last_refusal.remove(&id) {
            Some(msg) => {
                report.refused.insert(id, msg);
            }
            None => {
                report.unanswered.insert(id);
            }
        }
    }
    report
}

/// Signs `n` kind-1 notes by `keys`, tagged `["t", tag]`, with content of about
/// `content_bytes` bytes (each unique).
pub fn notes(keys: &Keys, n: usize, tag: &str, content_bytes: usize) -> Vec<Event> {
    let now = shared::unix_now();
    let pad = "x".repeat(content_bytes.saturating_sub(40));
    (0..n)
        .map(|i| {
            keys.sign(
                now,
                Kind(1),
                vec![vec!["t".to_owned(), tag.to_owned()]],
                format!("{tag} #{i} {}{pad}", random_suffix()),
            )
        })
        .collect()
}

/// A random tag for one test's events.
pub fn unique_tag(prefix: &str) -> String {
    format!("{prefix}-{}", random_suffix())
}

/// What the database holds for a set of ids.
#[derive(Debug, Default, Clone)]
pub struct StoredCheck {
    /// Ids asked about.
    pub asked: usize,
    /// Of those, ids present.
    pub found: usize,
    /// Extra rows for an id (must be 0).
    pub duplicates: i64,
    /// Rows in `events`.
    pub total_rows: i64,
    /// Distinct ids in `events`.
    pub distinct_rows: i64,
    /// A few missing ids.
    pub missing_sample: Vec<String>,
}

impl StoredCheck {
    /// Ids asked about but not found.
    pub fn lost(&self) -> usize {
        self.asked - self.found
    }
}

/// Counts, in the cluster database, which of `ids` are stored and how often.
pub async fn stored(
    db: &tokio_postgres::Client,
    ids: &HashSet<String>,
) -> anyhow::Result<StoredCheck> {
    let bytes: Vec<Vec<u8>> = ids
        .iter()
        .map(|h| hex::decode(h).context("hex id"))
        .collect::<anyhow::Result<_>>()?;
    let rows = db
        .query(
            "SELECT id, count(*) FROM events WHERE id = ANY($1) GROUP BY id",
            &[&bytes],
        )
        .await?;
    let mut present = HashSet::new();
    let mut duplicates = 0;
    for row in &rows {
        let id: Vec<u8> = row.get(0);
        let n: i64 = row.get(1);
        duplicates += n - 1;
        present.insert(hex::encode(id));
    }
    let totals = db
        .query_one("SELECT count(*), count(DISTINCT id) FROM events", &[])
        .await?;
    Ok(StoredCheck {
        asked: ids.len(),
        found: present.len(),
        duplicates,
        total_rows: totals.get(0),
        distinct_rows: totals.get(1),
        missing_sample: ids
            .iter()
            .filter(|id| !present.contains(*id))
            .take(5)
            .cloned()
            .collect(),
    })
}

/// [`stored`], polled until every id is found or `within` passes (the database may have
/// been away); returns the last check.
pub async fn wait_stored(
    db_url: &str,
    ids: &HashSet<String>,
    within: Duration,
) -> anyhow::Result<StoredCheck> {
    let deadline = Instant::now() + within;
    loop {
        let check = async {
            let (client, conn) = tokio_postgres::connect(db_url, tokio_postgres::NoTls).await?;
            let driver = tokio::spawn(async move {
                let _ = conn.await;
            });
            let check = stored(&client, ids).await;
            driver.abort();
            check
        };
        let result = tokio::time::timeout(WAIT, check)
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("database check timed out")));
        match result {
            Ok(check) if check.found == check.asked => return Ok(check),
            Ok(check) if Instant::now() >= deadline => return Ok(check),
            Err(e) if Instant::now() >= deadline => return Err(e),
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// A consumer of a Redis stream group, from `XINFO CONSUMERS`.
#[derive(Debug, Clone)]
pub struct GroupConsumer {
    /// Its name.
    pub name: String,
    /// Entries it read and did not acknowledge.
    pub pending: usize,
    /// Milliseconds since it last read.
    pub idle_ms: usize,
}

/// The consumers of `group` on `stream` (empty when the stream or group does not exist).
pub async fn group_consumers(
    redis_url: &str,
    stream: &str,
    group: &str,
) -> anyhow::Result<Vec<GroupConsumer>> {
    use redis::AsyncCommands;
    let ask = async {
        let client = redis::Client::open(redis_url)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let reply: redis::RedisResult<redis::streams::StreamInfoConsumersReply> =
            conn.xinfo_consumers(stream, group).await;
        let consumers = match reply {
            Ok(reply) => reply.consumers,
            Err(e) if e.code() == Some("NOGROUP") || e.to_string().contains("no such key") => {
                Vec::new()
            }
            Err(e) => return Err(e.into()),
        };
        Ok(consumers
            .into_iter()
            .map(|c| GroupConsumer {
                name: c.name,
                pending: c.pending,
                idle_ms: c.idle,
            })
            .collect())
    };
    tokio::time::timeout(WAIT, ask)
        .await
        .context("XINFO CONSUMERS timed out")?
}

/// Sends a signal (`TERM`, `KILL`, ...) to a process with `kill(1)`.
pub fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -s {sig} {pid} failed: {status}");
    }
    Ok(())
}

/// Waits at most `within` for a child to exit.
pub async fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    tokio::time::timeout(within, child.wait()).await.ok()?.ok()
}

/// The resident set size of a process, in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// `GET <path>` on a gateway; the HTTP status, or `None` if it did not answer in 3 s.
pub async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        text.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .ok()
        .flatten()
}

/// Polls `/readyz` until it answers `want` or `within` passes; returns how long it took,
/// or the last status seen.
pub async fn wait_readyz(
    addr: SocketAddr,
    want: u16,
    within: Duration,
) -> Result<Duration, Option<u16>> {
    let start = Instant::now();
    loop {
        let status = http_status(addr, "/readyz").await;
        if status == Some(want) {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= within {
            return Err(status);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// nginx in front of some gateways, run by the test (one process, `daemon off`,
/// everything under `target/fault-nginx/<name>/`); killed on drop.
pub struct Nginx {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    /// Its directory (config, error log).
    pub dir: PathBuf,
    /// Whether it terminates TLS.
    tls: bool,
    child: Child,
}

/// A certificate for `127.0.0.1` issued by a throwaway CA, made with the `openssl` command
/// in `dir`: the paths of the CA certificate, the server certificate and its key (PEM).
pub fn local_tls_certificate(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let (ca, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (cert, key, csr) = (
        dir.join("cert.pem"),
        dir.join("cert.key"),
        dir.join("cert.csr"),
    );
    let ext = dir.join("cert.ext");
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )?;
    let run = |cmd: &mut std::process::Command| -> anyhow::Result<()> {
        let out = cmd
            .output()
            .context("running openssl (apt-get install openssl)")?;
        if !out.status.success() {
            bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let openssl = || std::process::Command::new("openssl");
    const EC_KEY: [&str; 5] = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(openssl()
        .args(["req", "-x509", "-days", "2", "-subj", "/CN=relay test CA"])
        .args(EC_KEY)
        .arg("-keyout")
        .arg(&ca_key)
        .arg("-out")
        .arg(&ca))?;
    run(openssl()
        .args(["req", "-subj", "/CN=127.0.0.1"])
        .args(EC_KEY)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr))?;
    run(openssl()
        .args(["x509", "-req", "-days", "2", "-set_serial", "1", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(&ca)
        .arg("-CAkey")
        .arg(&ca_key)
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(&cert))?;
    Ok((ca, cert, key))
}

/// The nginx binary: `$NGINX`, else `nginx` on `PATH`, else the Debian location.
pub fn nginx_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("NGINX") {
        return Ok(PathBuf::from(path));
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("nginx"))
        .find(|p| p.is_file())
        .context(
            "nginx is not installed: run `deploy/local-stack.sh ensure-nginx` (make test does)",
        )
}

impl Nginx {
    /// Starts nginx balancing over `upstreams` (round robin, WebSocket upgrades, long read
    /// timeout, next upstream on error or timeout). Each upgrade response carries the
    /// chosen gateway in `X-Upstream`.
    pub async fn start(upstreams: &[SocketAddr]) -> anyhow::Result<Self> {
        Self::start_with(upstreams, None).await
    }

    /// Like [`Nginx::start`], terminating TLS with `cert` and `key` (PEM files): clients
    /// speak `wss://` and `https://` to it, the gateways behind it plain HTTP.
    pub async fn start_tls(
        upstreams: &[SocketAddr],
        cert: &Path,
        key: &Path,
    ) -> anyhow::Result<Self> {
        Self::start_with(upstreams, Some((cert, key))).await
    }

    async fn start_with(
        upstreams: &[SocketAddr],
        tls: Option<(&Path, &Path)>,
    ) -> anyhow::Result<Self> {
        let binary = nginx_binary()?;
        let dir = target_dir()
            .join("fault-nginx")
            .join(format!("lb-{}", random_suffix()));
        std::fs::create_dir_all(&dir)?;
        let port = free_port();
        let d = dir.display();
        let servers: String = upstreams
            .iter()
            .map(|a| format!("        server {a} max_fails=1 fail_timeout=30s;\n"))
            .collect();
        let listen = match tls {
            Some((cert, key)) => format!(
                "listen 127.0.0.1:{port} ssl;\n        ssl_certificate {};\n        ssl_certificate_key {};",
                cert.display(),
                key.display()
            ),
            None => format!("listen 127.0.0.1:{port};"),
        };
        let conf = format!(
            r#"# Generated by the fault tests (relay-tests faults harness).
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{
    worker_connections 1024;
}}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}
    upstream gateways {{
{servers}    }}
    server {{
        {listen}
        location / {{
            proxy_pass http://gateways;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_connect_timeout 2s;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_buffering off;
            proxy_next_upstream error timeout;
            add_header X-Upstream $upstream_addr always;
        }}
    }}
}}
"#
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let log = std::fs::File::create(dir.join("stderr.log"))?;
        let child = Command::new(binary)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("starting nginx")?;
        let mut nginx = Nginx {
            port,
            dir,
            tls: tls.is_some(),
            child,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(nginx);
            }
            if let Ok(Some(status)) = nginx.child.try_wait() {
                let log = std::fs::read_to_string(nginx.dir.join("error.log")).unwrap_or_default();
                let err = std::fs::read_to_string(nginx.dir.join("stderr.log")).unwrap_or_default();
                bail!("nginx exited ({status}):\n{err}\n{log}");
            }
            if Instant::now() >= deadline {
                bail!("nginx is not listening on {port} after {WAIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `ws://127.0.0.1:<port>`, or `wss://` when it terminates TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        // Keep the config and logs of a failed test.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
