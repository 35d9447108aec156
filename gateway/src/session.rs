//! One WebSocket session: a reader loop that parses and handles client messages, and a
//! writer task that drains the connection's bounded outbound queue.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket, close_code};
use futures_util::{SinkExt, StreamExt};
use shared::bus::{ConnId, Viewer};
use shared::event::PubKey;
use shared::message::{auth_frame, notice_frame};
use tokio::sync::{Notify, mpsc};

use crate::AppState;
use crate::cmd::Command;
use crate::registry::{ConnHandle, SendQueueBytes};

/// What a command handler needs: the shared state and this connection's own state.
pub struct Session {
    /// Shared gateway state.
    pub state: Arc<AppState>,
    /// This connection.
    pub conn: ConnId,
    /// The client's address (for rate limits).
    pub ip: IpAddr,
    /// The NIP-42 challenge sent on connect.
    pub challenge: String,
    /// Pubkeys this connection authenticated as (NIP-42), in order.
    pub authed: Vec<PubKey>,
}

impl Session {
    /// Queues a frame for this connection.
    pub fn send(&self, frame: String) {
        self.state.registry.send(self.conn, frame);
    }

    /// Who is asking, for read-restricted kinds.
    pub fn viewer(&self) -> Viewer {
        Viewer {
            authed: self.authed.clone(),
            restricted_kinds: self.state.restricted_kinds.clone(),
        }
    }

    /// Records a successful AUTH.
    pub fn authenticate(&mut self, pubkey: PubKey) {
        if !self.authed.contains(&pubkey) {
            self.authed.push(pubkey);
            self.state
                .registry
                .set_authed(self.conn, self.authed.clone());
        }
    }
}

/// Where a connection comes from.
pub struct Peer {
    /// The client address.
    pub ip: IpAddr,
    /// Its place among the address's connections, held while the session runs.
    pub slot: crate::connections::Slot,
}

/// The close frame owed to a client whose frame could not be read: 1009 for a message over
/// the hard size limit, 1007 for invalid UTF-8 in a text frame, nothing when the socket is
/// simply gone.
fn read_error_close(e: &axum::Error) -> Option<(u16, &'static str)> {
    let text = e.to_string();
    if text.contains("too long") || text.contains("Space limit") || text.contains("too big") {
        Some((close_code::SIZE, "message too big"))
    } else if text.contains("UTF-8") || text.contains("utf-8") || text.contains("Utf8") {
        Some((close_code::INVALID, "text frame is not valid UTF-8"))
    } else {
        None
    }
}

/// Parses a client frame: inline when small, on the blocking pool when big
/// ([`shared::message::BIG_MESSAGE_BYTES`]), so one client's big messages do not hold a
/// runtime thread that other connections' sessions are waiting for.
async fn parse(
    text: axum::extract::ws::Utf8Bytes,
) -> Result<Command, shared::message::MessageError> {
    if text.len() <= shared::message::BIG_MESSAGE_BYTES {
        return Command::parse(text.as_str());
    }
    match tokio::task::spawn_blocking(move || Command::parse(text.as_str())).await {
        Ok(parsed) => parsed,
        // Only a panic in the parser gets here; the frame is then treated as unreadable.
        Err(e) => {
            tracing::error!(error = %e, "parsing a client message failed");
            Err(shared::message::MessageError::NotJson(
                "the relay could not read this message".into(),
            ))
        }
    }
}

/// Most queued frames written before one flush.
const WRITE_BATCH: usize = 64;

/// How long a close frame may take to reach a client before the socket is dropped.
const CLOSE_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Counts a session in [`AppState::open_sessions`] until its socket is closed.
struct OpenSession<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> OpenSession<'a> {
    fn new(state: &'a AppState) -> Self {
        state
            .open_sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        OpenSession(&state.open_sessions)
    }
}

impl Drop for OpenSession<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs a session until the client leaves, it is too slow, or the gateway stops.
pub async fn run(state: Arc<AppState>, socket: WebSocket, peer: Peer) {
    let _open = OpenSession::new(&state);
    let conn = ConnId(state.next_id());
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Message>(state.config.limits.send_queue.max(1));
    let kill = Arc::new(Notify::new());
    let queued = Arc::new(SendQueueBytes::new(state.config.limits.send_queue_bytes));
    state.registry.add_conn(
        conn,
        ConnHandle {
            tx: tx.clone(),
            kill: Arc::clone(&kill),
            queued: Arc::clone(&queued),
        },
    );
    crate::metrics::connection_opened();
    let opened = std::time::Instant::now();
    tracing::info!(conn = conn.0, ip = %peer.ip, "connection opened");

    // The close frame has its own path, so it goes out even when the queue is full (a slow
    // client is told 1008 instead of being reset); what is still queued is dropped.
    let (close_tx, mut close_rx) = tokio::sync::oneshot::channel::<CloseFrame>();
    let writer = tokio::spawn(async move {
        let mut sent: u64 = 0;
        loop {
            tokio::select! {
                biased;
                frame = &mut close_rx => {
                    if let Ok(frame) = frame {
                        let send = sink.send(Message::Close(Some(frame)));
                        let _ = tokio::time::timeout(CLOSE_SEND_TIMEOUT, send).await;
                    }
                    break;
                }
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    // Everything already queued goes out with one flush.
                    let mut batch = vec![msg];
                    while batch.len() < WRITE_BATCH {
                        match rx.try_recv() {
                            Ok(more) => batch.push(more),
                            Err(_) => break,
                        }
                    }
                    let mut failed = false;
                    for msg in batch {
                        // Counted off the queue's bytes once the socket took it (a frame
                        // waiting on a slow socket still counts).
                        let text_len = match &msg {
                            Message::Text(text) => {
                                crate::metrics::sent(text.as_str());
                                sent += 1;
                                text.len()
                            }
                            _ => 0,
                        };
                        let fed = sink.feed(msg).await;
                        queued.sent(text_len);
                        if fed.is_err() {
                            failed = true;
                            break;
                        }
                    }
                    if failed || sink.flush().await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tokio::time::timeout(CLOSE_SEND_TIMEOUT, sink.close()).await;
        sent
    });

    let challenge = hex::encode(rand::random::<[u8; 16]>());
    let mut session = Session {
        state: Arc::clone(&state),
        conn,
        ip: peer.ip,
        challenge,
        authed: Vec::new(),
    };
    // Without a public URL no AUTH can succeed: no challenge is offered.
    if state.relay_urls.is_some() {
        session.send(auth_frame(&session.challenge));
    }
    let max_message = state.config.limits.max_message_bytes;
    let mut stopping = state.stopping.clone();
    let mut moderation = state.moderation.subscribe();
    let mut received: u64 = 0;
    let close = loop {
        tokio::select! {
            _ = kill.notified() => {
                crate::metrics::slow_consumer();
                break Some((close_code::POLICY, "too slow: send queue full"));
            }
            _ = crate::stopped(&mut stopping) => break Some((close_code::AWAY, "relay shutting down")),
            Ok(()) = moderation.changed() => {
                if moderation.borrow_and_update().blocks_ip(peer.ip) {
                    break Some((close_code::POLICY, "blocked: this address may not connect"));
                }
            }
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(text))) if text.len() > max_message => {
                    received += 1;
                    crate::metrics::received("oversized");
                    session.send(notice_frame(&format!(
                        "invalid: message is {} bytes; the limit is {max_message}", text.len()
                    )));
                }
                Some(Ok(Message::Text(text))) => {
                    received += 1;
                    match parse(text).await {
                        Ok(cmd) => {
                            crate::metrics::received(cmd.verb());
                            cmd.handle(&mut session).await;
                        }
                        Err(err) => {
                            crate::metrics::received("invalid");
                            crate::cmd::reject(&session, err);
                        }
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    received += 1;
                    crate::metrics::received("binary");
                    session.send(notice_frame("invalid: binary messages are not supported; send JSON text"));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | None => break None,
                Some(Err(e)) => {
                    tracing::debug!(conn = conn.0, error = %e, "websocket error");
                    break read_error_close(&e);
                }
            },
        }
    };
    state.registry.remove_conn(conn);
    if let Some((code, reason)) = close {
        let _ = close_tx.send(CloseFrame {
            code,
            reason: reason.into(),
        });
    }
    drop(tx);
    let sent = writer.await.unwrap_or(0);
    if close.is_some() {
        // The closing handshake: read until the client answers our close frame (or goes),
        // so the socket ends with a FIN, not a reset with the answer unread, which can
        // make the client lose the close frame itself.
        let _ = tokio::time::timeout(CLOSE_SEND_TIMEOUT, async {
            while let Some(Ok(msg)) = stream.next().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
    crate::metrics::connection_closed();
    tracing::info!(
        conn = conn.0,
        ip = %peer.ip,
        seconds = opened.elapsed().as_secs_f64(),
        received,
        sent,
        authed = session.authed.len(),
        reason = close.map_or("client", |(_, r)| r),
        "connection closed"
    );
}
