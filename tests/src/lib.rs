//! Test harness: starts the real `gateway`, `ingest-worker` and `query-worker` binaries
//! against the Redis and Postgres named by `RELAY_TEST_REDIS_URL` and
//! `RELAY_TEST_DATABASE_URL` (`make test` starts both and sets them), and talks to the
//! gateways over WebSocket as a Nostr client does.
//!
//! Each [`Cluster`] gets a fresh database and its own Redis key prefix, so tests run in
//! parallel against one Redis and one Postgres. Processes are killed when the cluster drops;
//! their stderr goes to `target/test-logs/<cluster name>/`.

pub mod faults;
pub mod otlp;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use shared::event::Event;
use shared::message::RelayMessage;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

/// The `RELAY_PUBLIC_URL` every test cluster's gateways and ingest workers get (unless a
/// test sets its own): what NIP-42 `relay` tags, NIP-98 `u` tags and NIP-62 requests must
/// name. Gateways listen on port 0, so this is not where they listen; like a relay behind a
/// balancer, the public name and the listening address differ.
pub const PUBLIC_URL: &str = "ws://relay.test";

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// Retries `check` every 100 ms until it holds; fails the test, naming `what`, when it
/// still does not after `within`. For what the cluster does in the background (heartbeats,
/// purges, moderation reaching every process).
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The shared services, from the environment.
pub struct Services {
    /// Redis URL.
    pub redis_url: String,
    /// A Postgres URL with rights to create databases.
    pub admin_db_url: String,
}

impl Services {
    /// Reads the service URLs; panics with a hint when `make test` did not set them.
    pub fn from_env() -> Self {
        let get = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set: run the end-to-end tests with `make test`, which starts Redis and Postgres")
            })
        };
        Services {
            redis_url: get("RELAY_TEST_REDIS_URL"),
            admin_db_url: get("RELAY_TEST_DATABASE_URL"),
        }
    }
}

/// The directory holding the workspace's built binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/e2e-<hash> → target/debug
    exe.parent()
        .and_then(|deps| deps.parent())
        .map(PathBuf::from)
        .expect("test executable lives in target/<profile>/deps")
}

fn unique_name(tag: &str) -> String {
    format!("{tag}_{}", hex::encode(rand::random::<[u8; 5]>()))
}

/// How to build a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Gateways to start.
    pub gateways: usize,
    /// Ingest workers to start.
    pub ingest_workers: usize,
    /// Query workers to start.
    pub query_workers: usize,
    /// Extra environment for every process.
    pub env: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            gateways: 1,
            ingest_workers: 1,
            query_workers: 1,
            env: Vec::new(),
        }
    }
}

impl ClusterOptions {
    /// The default cluster, with extra environment for every process.
    pub fn with_env(pairs: &[(&str, &str)]) -> Self {
        ClusterOptions {
            env: env_vars(pairs),
            ..Default::default()
        }
    }
}

/// `(name, value)` pairs as [`ClusterOptions::env`] holds them.
pub fn env_vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A running gateway.
pub struct Gateway {
    /// Its bound address.
    pub addr: SocketAddr,
    /// The process.
    pub child: Child,
}

impl Gateway {
    /// `ws://<addr>`.
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// `http://<addr><path>`.
    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The process id (for signals).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// A running relay cluster with its own database and key prefix.
pub struct Cluster {
    /// The gateways, in start order.
    pub gateways: Vec<Gateway>,
    /// The workers.
    pub workers: Vec<Child>,
    /// The Redis key prefix.
    pub prefix: String,
    /// The database URL the workers use.
    pub db_url: String,
    /// Unique name (database name, log directory).
    pub name: String,
    /// The Redis and Postgres this cluster uses.
    pub services: Services,
    /// The options it was started with.
    pub options: ClusterOptions,
    /// Each worker's metrics address (`/metrics`, `/healthz`, `/readyz`), by log name.
    pub worker_http: Vec<(String, SocketAddr)>,
}

impl Cluster {
    /// Starts a cluster on the services from the environment (see [`Services::from_env`]).
    pub async fn start(options: ClusterOptions) -> anyhow::Result<Self> {
        Self::start_with(Services::from_env(), options).await
    }

    /// Starts a cluster on the given services: a fresh database, workers, then gateways,
    /// each waited for.
    pub async fn start_with(services: Services, options: ClusterOptions) -> anyhow::Result<Self> {
        let name = unique_name("t");
        let db_url = create_database(&services.admin_db_url, &name).await?;
        let mut cluster = Cluster {
            gateways: Vec::new(),
            workers: Vec::new(),
            prefix: name.clone(),
            db_url,
            name,
            services,
            options: options.clone(),
            worker_http: Vec::new(),
        };
        for i in 0..options.ingest_workers {
            let (child, http) = cluster.spawn_worker_with_http("ingest-worker", i).await?;
            cluster.workers.push(child);
            cluster
                .worker_http
                .push((format!("ingest-worker-{i}"), http));
        }
        for i in 0..options.query_workers {
            let (child, http) = cluster.spawn_worker_with_http("query-worker", i).await?;
            cluster.workers.push(child);
            cluster
                .worker_http
                .push((format!("query-worker-{i}"), http));
        }
        for _ in 0..options.gateways {
            cluster.add_gateway().await?;
        }
        Ok(cluster)
    }

    /// A cluster with default options.
    pub async fn default_cluster() -> Self {
        Self::start(ClusterOptions::default())
            .await
            .expect("cluster starts")
    }

    fn command(&self, binary: &str, log_name: &str) -> anyhow::Result<Command> {
        let path = bin_dir().join(binary);
        if !path.exists() {
            bail!(
                "{} is missing: build the workspace first (`make test` does)",
                path.display()
            );
        }
        let log_dir = bin_dir().join("..").join("test-logs").join(&self.name);
        std::fs::create_dir_all(&log_dir)?;
        let log = std::fs::File::create(log_dir.join(format!("{log_name}.log")))?;
        let mut cmd = Command::new(path);
        cmd.env("RELAY_REDIS_URL", &self.services.redis_url)
            .env("RELAY_BUS_PREFIX", &self.prefix)
            .env("RELAY_DATABASE_URL", &self.db_url)
            .env("RELAY_PUBLIC_URL", PUBLIC_URL)
            .env("RELAY_HEARTBEAT_MS", "300")
            .env("RELAY_BLOCK_MS", "500")
            // Tests publish fast from one address; the rate-limit tests set their own limits.
            .env("RELAY_RATE_EVENTS_PER_IP", "0")
            .env("RELAY_RATE_EVENTS_PER_PUBKEY", "0")
            .env("RELAY_RATE_REQS_PER_IP", "0")
            .env("RELAY_RATE_QUERY_MS_PER_IP", "0")
            .env("RELAY_RATE_AUTHS_PER_IP", "0")
            .env(
                "RUST_LOG",
                std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(
                self.options
                    .env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        Ok(cmd)
    }

    /// Starts one worker process (`ingest-worker` or `query-worker`) and waits until ready;
    /// `index` only names its log file.
    pub async fn spawn_worker(&self, binary: &str, index: usize) -> anyhow::Result<Child> {
        Ok(self.spawn_worker_with_http(binary, index).await?.0)
    }

    /// Like [`Cluster::spawn_worker`], and returns the worker's metrics/health address.
    pub async fn spawn_worker_with_http(
        &self,
        binary: &str,
        index: usize,
    ) -> anyhow::Result<(Child, SocketAddr)> {
        let http = free_port()?;
        let mut cmd = self.command(binary, &format!("{binary}-{index}"))?;
        cmd.env("RELAY_METRICS_LISTEN", http.to_string());
        let mut child = cmd.spawn()?;
        let line = first_line(&mut child)
            .await
            .with_context(|| format!("{binary} did not start"))?;
        if line.trim() != "ready" {
            bail!("{binary} printed {line:?} instead of ready");
        }
        Ok((child, http))
    }

    /// The stderr log of a process of this cluster (e.g. `gateway-0`, `ingest-worker-0`).
    pub fn log(&self, process: &str) -> String {
        let path = bin_dir()
            .join("..")
            .join("test-logs")
            .join(&self.name)
            .join(format!("{process}.log"));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// Starts one more gateway and returns its index.
    pub async fn add_gateway(&mut self) -> anyhow::Result<usize> {
        let index = self.gateways.len();
        let mut cmd = self.command("gateway", &format!("gateway-{index}"))?;
        cmd.env("RELAY_LISTEN", "127.0.0.1:0");
        let mut child = cmd.spawn()?;
        let line = first_line(&mut child)
            .await
            .context("gateway did not start")?;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected gateway line {line:?}"))?
            .parse()?;
        self.gateways.push(Gateway { addr, child });
        Ok(index)
    }

    /// The first gateway's URL.
    pub fn url(&self) -> String {
        self.gateways[0].url()
    }

    /// A client connected to gateway `index`.
    pub async fn client(&self, index: usize) -> Client {
        let mut client = Client::connect(&self.gateways[index].url())
            .await
            .expect("client connects");
        client.relay_url = self.public_url();
        client
    }

    /// The relay's public URL: this cluster's `RELAY_PUBLIC_URL` (the first, if a test set
    /// several), else [`PUBLIC_URL`].
    pub fn public_url(&self) -> String {
        self.options
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "RELAY_PUBLIC_URL")
            .map_or(PUBLIC_URL, |(_, v)| v.split(',').next().unwrap_or(v))
            .trim()
            .to_owned()
    }

    /// A direct connection to this cluster's database, for checking what was stored.
    pub async fn db(&self) -> tokio_postgres::Client {
        connect_db(&self.db_url).await.expect("database connects")
    }
}

/// A loopback address with a port that was free a moment ago.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

async fn first_line(child: &mut Child) -> anyhow::Result<String> {
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .context("timed out waiting for the first stdout line")??
        .context("process exited before printing its first line")?;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(line)
}

async fn connect_db(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

async fn create_database(admin_url: &str, name: &str) -> anyhow::Result<String> {
    let admin = connect_db(admin_url)
        .await
        .context("cannot reach the test Postgres")?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let (base, _) = admin_url
        .rsplit_once('/')
        .context("database URL has no path")?;
    Ok(format!("{base}/{name}"))
}

/// A WebSocket client speaking NIP-01.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The NIP-42 challenge the relay sent on connect.
    pub challenge: String,
    /// The URL connected to.
    pub url: String,
    /// The relay's public URL, which [`Client::auth`] names ([`PUBLIC_URL`] unless set).
    pub relay_url: String,
}

/// What publishing an event got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The `OK` flag.
    pub accepted: bool,
    /// The `OK` message.
    pub message: String,
}

impl Client {
    /// Connects to a relay URL and reads the relay's NIP-42 challenge.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        Self::connect_request(url, url.into_client_request()?).await
    }

    /// Connects as if from `ip`, behind a load balancer: the upgrade request carries
    /// `X-Forwarded-For: <ip>` (honoured by a gateway with `RELAY_TRUST_FORWARDED=true`),
    /// so one test can play several client addresses.
    pub async fn connect_from(url: &str, ip: &str) -> anyhow::Result<Self> {
        let mut request = url.into_client_request()?;
        request
            .headers_mut()
            .insert("x-forwarded-for", ip.parse().context("a header value")?);
        Self::connect_request(url, request).await
    }

    async fn connect_request(
        url: &str,
        request: tokio_tungstenite::tungstenite::handshake::client::Request,
    ) -> anyhow::Result<Self> {
        let (ws, _) = tokio::time::timeout(WAIT, connect_async(request)).await??;
        let mut client = Client {
            ws,
            challenge: String::new(),
            url: url.to_owned(),
            relay_url: PUBLIC_URL.to_owned(),
        };
        match RelayMessage::parse(&client.recv_text().await) {
            Some(RelayMessage::Auth(challenge)) => client.challenge = challenge,
            other => bail!("expected an AUTH challenge first, got {other:?}"),
        }
        Ok(client)
    }

    /// Authenticates as `keys` (NIP-42) and returns the relay's answer.
    pub async fn auth(&mut self, keys: &shared::event::signing::Keys) -> Ack {
        let tags = vec![
            vec!["relay".to_owned(), self.relay_url.clone()],
            vec!["challenge".to_owned(), self.challenge.clone()],
        ];
        let event = keys.sign(shared::unix_now(), shared::event::Kind(22242), tags, "");
        self.send_text(format!("[\"AUTH\",{}]", event.to_json()))
            .await;
        self.ok_for(&event.id.to_hex()).await
    }

    /// Sends `COUNT` and returns the count, or the `CLOSED` message as an error.
    pub async fn count(
        &mut self,
        query_id: &str,
        filters: &[serde_json::Value],
    ) -> Result<u64, String> {
        let mut msg = vec![serde_json::json!("COUNT"), serde_json::json!(query_id)];
        msg.extend(filters.iter().cloned());
        self.send_json(serde_json::Value::Array(msg)).await;
        loop {
            match self.recv().await {
                RelayMessage::Count { query_id: q, count } if q == query_id => return Ok(count),
                RelayMessage::Closed { sub_id, message } if sub_id == query_id => {
                    return Err(message);
                }
                _ => {}
            }
        }
    }

    /// Sends `REQ` and returns the `CLOSED` message it must get.
    pub async fn req_closed(&mut self, sub_id: &str, filters: &[serde_json::Value]) -> String {
        self.send_req(sub_id, filters).await;
        loop {
            match self.recv().await {
                RelayMessage::Closed { sub_id: s, message } if s == sub_id => return message,
                RelayMessage::Eose(s) if s == sub_id => {
                    panic!("{sub_id} got EOSE; expected CLOSED")
                }
                _ => {}
            }
        }
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: impl Into<String>) {
        let text: String = text.into();
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// Sends a raw WebSocket message.
    pub async fn send_raw(&mut self, msg: Message) {
        self.ws.send(msg).await.expect("send");
    }

    /// Sends a JSON value as text.
    pub async fn send_json(&mut self, value: serde_json::Value) {
        self.send_text(value.to_string()).await;
    }

    /// The next text frame, or `None` if none comes within `wait` (or the socket closed).
    pub async fn recv_text_within(&mut self, wait: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??
                .ok()?;
            match msg {
                Message::Text(t) => return Some(t.to_string()),
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// The next text frame; fails the test after [`WAIT`].
    pub async fn recv_text(&mut self) -> String {
        self.recv_text_within(WAIT)
            .await
            .expect("a message from the relay in time")
    }

    /// The next relay message; fails the test after [`WAIT`] or on a non-NIP-01 frame.
    pub async fn recv(&mut self) -> RelayMessage {
        let text = self.recv_text().await;
        RelayMessage::parse(&text).unwrap_or_else(|| panic!("not a relay message: {text}"))
    }

    /// Publishes an event and waits for its `OK`.
    pub async fn publish(&mut self, event: &Event) -> Ack {
        self.send_text(format!("[\"EVENT\",{}]", event.to_json()))
            .await;
        self.ok_for(&event.id.to_hex()).await
    }

    /// Sends every event, then waits for all their `OK`s (in whatever order they come).
    pub async fn publish_all(
        &mut self,
        events: &[Event],
    ) -> std::collections::HashMap<String, Ack> {
        for ev in events {
            self.send_text(format!("[\"EVENT\",{}]", ev.to_json()))
                .await;
        }
        let mut acks = std::collections::HashMap::new();
        while acks.len() < events.len() {
            if let RelayMessage::Ok {
                event_id,
                accepted,
                message,
            } = self.recv().await
            {
                acks.insert(event_id, Ack { accepted, message });
            }
        }
        acks
    }

    /// Waits for the `OK` of `id`, skipping other messages.
    pub async fn ok_for(&mut self, id: &str) -> Ack {
        loop {
            if let RelayMessage::Ok {
                event_id,
                accepted,
                message,
            } = self.recv().await
                && event_id == id
            {
                return Ack { accepted, message };
            }
        }
    }

    /// Sends `REQ` and collects the stored events until `EOSE`; panics on `CLOSED`.
    pub async fn req(&mut self, sub_id: &str, filters: &[serde_json::Value]) -> Vec<Event> {
        self.send_req(sub_id, filters).await;
        self.until_eose(sub_id).await
    }

    /// Sends `REQ` without waiting.
    pub async fn send_req(&mut self, sub_id: &str, filters: &[serde_json::Value]) {
        let mut msg = vec![serde_json::json!("REQ"), serde_json::json!(sub_id)];
        msg.extend(filters.iter().cloned());
        self.send_json(serde_json::Value::Array(msg)).await;
    }

    /// Collects `EVENT`s for `sub_id` until its `EOSE`.
    pub async fn until_eose(&mut self, sub_id: &str) -> Vec<Event> {
        let mut events = Vec::new();
        loop {
            match self.recv().await {
                RelayMessage::Event { sub_id: s, event } if s == sub_id => events.push(*event),
                RelayMessage::Eose(s) if s == sub_id => return events,
                RelayMessage::Closed { sub_id: s, message } if s == sub_id => {
                    panic!("subscription {sub_id} closed: {message}")
                }
                _ => {}
            }
        }
    }

    /// The next `EVENT` for `sub_id` within `wait`, or `None`.
    pub async fn next_event_within(&mut self, sub_id: &str, wait: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let text = self.recv_text_within(left).await?;
            if let Some(RelayMessage::Event { sub_id: s, event }) = RelayMessage::parse(&text)
                && s == sub_id
            {
                return Some(*event);
            }
        }
    }

    /// The next `EVENT` for `sub_id`; fails the test after [`WAIT`].
    pub async fn next_event(&mut self, sub_id: &str) -> Event {
        self.next_event_within(sub_id, WAIT)
            .await
            .expect("a live event in time")
    }
}

/// How quickly a [`Bystander`] must be served while an attack runs on its gateway.
pub const BYSTANDER_BOUND: Duration = Duration::from_millis(500);

/// A well-behaved client sharing a gateway with an attack: each [`Bystander::served`]
/// round publishes a note and must get its `OK`, the note live on its own subscription,
/// and a query for it answered with `EOSE`, each within [`BYSTANDER_BOUND`].
pub struct Bystander {
    client: Client,
    keys: shared::event::signing::Keys,
    rounds: i64,
}

impl Bystander {
    /// Connects (from `ip`, when given: see [`Client::connect_from`]) and subscribes to its
    /// own notes.
    pub async fn connect(url: &str, ip: Option<&str>) -> Self {
        let client = match ip {
            Some(ip) => Client::connect_from(url, ip).await,
            None => Client::connect(url).await,
        };
        let mut client = client.expect("bystander connects");
        let keys = shared::event::signing::Keys::generate();
        let mine = serde_json::json!({"authors": [keys.pubkey().to_hex()], "limit": 0});
        client.send_req("bystander-live", &[mine]).await;
        client.until_eose("bystander-live").await;
        Bystander {
            client,
            keys,
            rounds: 0,
        }
    }

    /// One round; panics naming the step that was late.
    pub async fn served(&mut self) {
        self.rounds += 1;
        let note = self.keys.sign(
            shared::unix_now(),
            shared::event::Kind(1),
            vec![],
            format!("bystander round {}", self.rounds),
        );
        let id = note.id.to_hex();
        let started = tokio::time::Instant::now();
        self.client
            .send_text(format!("[\"EVENT\",{}]", note.to_json()))
            .await;
        let (mut ok, mut live) = (false, false);
        while !(ok && live) {
            let left = BYSTANDER_BOUND.saturating_sub(started.elapsed());
            let Some(text) = self.client.recv_text_within(left).await else {
                panic!(
                    "bystander round {}: OK {ok}, live event {live} after {:?}",
                    self.rounds,
                    started.elapsed()
                );
            };
            match RelayMessage::parse(&text) {
                Some(RelayMessage::Ok {
                    event_id,
                    accepted,
                    message,
                }) if event_id == id => {
                    assert!(accepted, "bystander's note refused: {message}");
                    ok = true;
                }
                Some(RelayMessage::Event { sub_id, event })
                    if sub_id == "bystander-live" && event.id == note.id =>
                {
                    live = true;
                }
                _ => {}
            }
        }
        let query = serde_json::json!({"ids": [id]});
        self.client.send_req("bystander-query", &[query]).await;
        let found =
            tokio::time::timeout(BYSTANDER_BOUND, self.client.until_eose("bystander-query"))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "bystander round {}: no EOSE within {BYSTANDER_BOUND:?}",
                        self.rounds
                    )
                });
        assert_eq!(found.len(), 1, "the bystander's note is stored");
        self.client
            .send_json(serde_json::json!(["CLOSE", "bystander-query"]))
            .await;
    }
}
