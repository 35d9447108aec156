//! The NIP-86 management API: `POST /` with `Content-Type: application/nostr+json+rpc`,
//! a JSON `{"method", "params"}` body, authorized by a NIP-98 `Authorization` header signed
//! by one of `RELAY_ADMIN_PUBKEYS`.
//!
//! The URL the `u` tag must name is `RELAY_PUBLIC_URL` with `ws`/`wss` turned into
//! `http`/`https`, or `http://<Host header>/` when it is not set; both are compared
//! normalized ([`shared::nip98::normalize_url`]).
//!
//! Lists are answered from the moderation snapshot in Redis (this gateway's copy when Redis
//! is away). Changes cannot be written here (the gateway never touches Postgres): each goes
//! as an [`AdminRequest`] on ingest stream shard 0, and the handler waits, at most
//! `RELAY_REPLY_TIMEOUT_MS`, for the worker's [`shared::moderation::AdminReply`] on this
//! gateway's admin channel.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use shared::bus::{self, Role};
use shared::event::{EventId, Kind, PubKey};
use shared::moderation::{AdminReply, AdminRequest, Change, Moderation};
use shared::nip98;
use tokio::sync::oneshot;

use crate::AppState;

/// The `Content-Type` of a management request.
pub const RPC_CONTENT_TYPE: &str = "application/nostr+json+rpc";

/// Reads one method's positional parameters into the [`Call`] it asks for.
type ReadParams = fn(&Params<'_>) -> Result<Call, String>;

/// Every method this relay answers, in the order `supportedmethods` lists them (all but
/// itself), with how its parameters are read. The only list of method names: [`parse`]
/// looks methods up here.
const METHODS: &[(&str, ReadParams)] = &[
    ("supportedmethods", |_| Ok(Call::SupportedMethods)),
    ("banpubkey", |p| {
        Ok(Call::Change(Change::BanPubkey {
            pubkey: p.pubkey()?,
            reason: p.reason()?,
        }))
    }),
    ("unbanpubkey", |p| {
        Ok(Call::Change(Change::UnbanPubkey {
            pubkey: p.pubkey()?,
        }))
    }),
    ("listbannedpubkeys", |_| Ok(Call::ListBannedPubkeys)),
    ("allowpubkey", |p| {
        Ok(Call::Change(Change::AllowPubkey {
            pubkey: p.pubkey()?,
            reason: p.reason()?,
        }))
    }),
    ("unallowpubkey", |p| {
        Ok(Call::Change(Change::UnallowPubkey {
            pubkey: p.pubkey()?,
        }))
    }),
    ("listallowedpubkeys", |_| Ok(Call::ListAllowedPubkeys)),
    ("listeventsneedingmoderation", |_| {
        Ok(Call::ListEventsNeedingModeration)
    }),
    ("allowevent", |p| {
        Ok(Call::Change(Change::AllowEvent { id: p.event_id()? }))
    }),
    ("banevent", |p| {
        Ok(Call::Change(Change::BanEvent {
            id: p.event_id()?,
            reason: p.reason()?,
        }))
    }),
    ("listbannedevents", |_| Ok(Call::ListBannedEvents)),
    ("changerelayname", |p| {
        Ok(Call::Change(Change::RelayName(p.text()?)))
    }),
    ("changerelaydescription", |p| {
        Ok(Call::Change(Change::RelayDescription(p.text()?)))
    }),
    ("changerelayicon", |p| {
        Ok(Call::Change(Change::RelayIcon(p.text()?)))
    }),
    ("allowkind", |p| {
        Ok(Call::Change(Change::AllowKind { kind: p.kind()? }))
    }),
    ("disallowkind", |p| {
        Ok(Call::Change(Change::DisallowKind { kind: p.kind()? }))
    }),
    ("listallowedkinds", |_| Ok(Call::ListAllowedKinds)),
    ("blockip", |p| {
        Ok(Call::Change(Change::BlockIp {
            ip: p.ip()?,
            reason: p.reason()?,
        }))
    }),
    ("unblockip", |p| {
        Ok(Call::Change(Change::UnblockIp { ip: p.ip()? }))
    }),
    ("listblockedips", |_| Ok(Call::ListBlockedIps)),
];

type Waiting = Mutex<HashMap<u64, oneshot::Sender<Result<u64, String>>>>;

/// Who may manage the relay, and the changes waiting for a worker's answer.
pub struct Admin {
    admins: Vec<PubKey>,
    waiting: Waiting,
}

impl Admin {
    /// Admins from the validated configuration (empty: nobody).
    pub fn new(admins: Vec<PubKey>) -> Self {
        Admin {
            admins,
            waiting: Mutex::new(HashMap::new()),
        }
    }

    fn waiting(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Result<u64, String>>>> {
        // A panic while holding this lock cannot leave the map inconsistent; keep using it.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Removes a request from the waiting map however the handler ends (answered, timed out,
/// or the client went away).
struct Wait<'a> {
    admin: &'a Admin,
    request: u64,
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        self.admin.waiting().remove(&self.request);
    }
}

/// What one RPC asks.
#[derive(Debug, PartialEq, Eq)]
enum Call {
    SupportedMethods,
    Change(Change),
    ListBannedPubkeys,
    ListAllowedPubkeys,
    ListBannedEvents,
    ListEventsNeedingModeration,
    ListAllowedKinds,
    ListBlockedIps,
}

/// `POST /` with the RPC content type.
pub async fn rpc(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let is_rpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().starts_with(RPC_CONTENT_TYPE));
    if !is_rpc {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &format!("management requests must be sent as {RPC_CONTENT_TYPE}"),
        );
    }
    // The URL the `u` tag must name is this relay's, never one taken from the request: a
    // header signed for another site must not be accepted here.
    let Some(urls) = &state.relay_urls else {
        tracing::error!("management request refused: RELAY_PUBLIC_URL is not set");
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "error: the management API needs the relay's public URL (RELAY_PUBLIC_URL), which is not set",
        );
    };
    let url = nip98::http_url(urls.canonical());
    let request = nip98::Request {
        url: &url,
        method: "POST",
        body: &body,
    };
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    // NIP-86: a missing or invalid authorization gets 401, and an authorization signed by a
    // key that is not an admin is not valid for this endpoint either.
    let unauthorized = |message: &str| {
        let mut response = error(StatusCode::UNAUTHORIZED, message);
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Nostr"),
        );
        response
    };
    let window = state.config.admin.admin_auth_window_secs;
    let authorization =
        match nip98::verify_header(authorization, &request, shared::unix_now(), window) {
            Ok(event) => event,
            Err(e) => return unauthorized(&e.to_string()),
        };
    let pubkey = authorization.pubkey;
    if !state.admin.admins.contains(&pubkey) {
        return unauthorized("this pubkey may not manage this relay");
    }
    match first_use(&state, &authorization.sig, window).await {
        Ok(true) => {}
        Ok(false) => return unauthorized("this authorization was used already; sign a new one"),
        Err(e) => {
            tracing::error!(error = %e, "cannot record a management authorization in Redis");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "error: the relay cannot check authorizations right now; try again",
            );
        }
    }
    let call = match parse(&body, state.config.admin.admin_max_text) {
        Ok(call) => call,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    tracing::info!(admin = %pubkey, call = ?call, "management request");
    match call {
        Call::SupportedMethods => {
            // "The names of all the other supported methods" (NIP-86): not itself.
            let names: Vec<&str> = METHODS
                .iter()
                .map(|(name, _)| *name)
                .filter(|name| *name != "supportedmethods")
                .collect();
            result(json!(names))
        }
        Call::Change(change) => apply(&state, change).await,
        Call::ListEventsNeedingModeration => result(json!([])),
        list => {
            let current = snapshot(&state).await;
            result(listing(&current, &list))
        }
    }
}

/// Records a NIP-98 authorization as used, in Redis (so every gateway knows), for as long as
/// its `created_at` could still pass the time window; `false` when it was used before (a
/// replay). Known by its signature: only the signer can make another for the same request
/// (two identical calls in one second have the same event id, but each its own signature).
async fn first_use(
    state: &AppState,
    sig: &shared::event::Signature,
    window_secs: u64,
) -> redis::RedisResult<bool> {
    let key = state.bus.used_authorization_key(sig);
    let mut redis = state.redis.clone();
    let set: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg(1)
        .arg("NX")
        .arg("EX")
        .arg(window_secs.saturating_mul(2).max(1))
        .query_async(&mut redis)
        .await?;
    Ok(set.is_some())
}

/// The latest snapshot: this gateway's copy, first brought up to date from Redis (so a list
/// asked for right after a change shows it); the copy as it is when Redis does not answer.
async fn snapshot(state: &AppState) -> Arc<Moderation> {
    let mut redis = state.redis.clone();
    if let Err(e) = state.moderation.refresh(&mut redis, &state.bus).await {
        tracing::warn!(error = %e, "cannot load the moderation snapshot; answering from memory");
    }
    state.moderation.get()
}

fn listing(m: &Moderation, list: &Call) -> Value {
    let pubkeys = |map: &std::collections::BTreeMap<PubKey, String>| {
        map.iter()
            .map(|(pk, reason)| json!({"pubkey": pk.to_hex(), "reason": reason}))
            .collect::<Vec<_>>()
    };
    match list {
        Call::ListBannedPubkeys => json!(pubkeys(&m.banned_pubkeys)),
        Call::ListAllowedPubkeys => json!(pubkeys(&m.allowed_pubkeys)),
        Call::ListBannedEvents => json!(
            m.banned_events
                .iter()
                .map(|(id, reason)| json!({"id": id.to_hex(), "reason": reason}))
                .collect::<Vec<_>>()
        ),
        Call::ListAllowedKinds => json!(m.allowed_kinds.iter().map(|k| k.0).collect::<Vec<_>>()),
        Call::ListBlockedIps => json!(
            m.blocked_ips
                .iter()
                .map(|(ip, reason)| json!({"ip": ip.to_string(), "reason": reason}))
                .collect::<Vec<_>>()
        ),
        _ => json!([]),
    }
}

/// Sends a change to the ingest workers and waits for it to be committed.
async fn apply(state: &AppState, change: Change) -> Response {
    let request = state.next_id();
    let (tx, rx) = oneshot::channel();
    state.admin.waiting().insert(request, tx);
    let _wait = Wait {
        admin: &state.admin,
        request,
    };
    let Some(stream) = state.bus.streams(Role::Ingest).into_iter().next() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "error: no ingest stream");
    };
    let envelope = AdminRequest {
        admin: change,
        gateway: state.gateway.clone(),
        request,
    };
    let mut redis = state.redis.clone();
    if let Err(e) = bus::add_entry(&mut redis, &stream, &bus::encode(&envelope)).await {
        tracing::warn!(error = %e, "cannot send a management change");
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "error: the relay cannot take changes right now; try again",
        );
    }
    let timeout = Duration::from_millis(state.config.limits.reply_timeout_ms);
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(Ok(_version))) => {
            // The snapshot is written before the answer: take it now, so this gateway
            // enforces the change before the client hears it is done.
            if let Err(e) = state.moderation.refresh(&mut redis, &state.bus).await {
                tracing::warn!(error = %e, "cannot load the new moderation snapshot");
            }
            result(json!(true))
        }
        Ok(Ok(Err(message))) => error(StatusCode::INTERNAL_SERVER_ERROR, &message),
        Ok(Err(_)) | Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "error: no worker confirmed the change in time; it may still be applied",
        ),
    }
}

fn result(value: Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "result": value }).to_string(),
    )
        .into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "result": null, "error": message }).to_string(),
    )
        .into_response()
}

/// A management request's body, with text parameters of at most `max_text` characters.
fn parse(body: &[u8], max_text: usize) -> Result<Call, String> {
    let request: Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid: the body is not JSON: {e}"))?;
    let method = request
        .get("method")
        .and_then(Value::as_str)
        .ok_or("invalid: the body needs a string \"method\"")?;
    let empty = Vec::new();
    let params = match request.get("params") {
        None | Some(Value::Null) => &empty,
        Some(Value::Array(p)) => p,
        Some(_) => return Err("invalid: \"params\" must be an array".into()),
    };
    let Some((_, read)) = METHODS.iter().find(|(name, _)| *name == method) else {
        let shown: String = method.chars().take(64).collect();
        return Err(format!("unsupported method {shown:?}"));
    };
    read(&Params {
        values: params,
        max_text,
    })
}

/// A method's positional parameters.
struct Params<'a> {
    values: &'a [Value],
    /// Longest text accepted, in characters (`RELAY_ADMIN_MAX_TEXT`).
    max_text: usize,
}

impl Params<'_> {
    fn string(&self, at: usize, what: &str) -> Result<&str, String> {
        self.values
            .get(at)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("invalid: parameter {} must be {what}", at + 1))
    }

    /// A free-text parameter, at most `max_text` characters (keys, ids and addresses are
    /// bounded by their own syntax).
    fn bounded_text(&self, at: usize) -> Result<String, String> {
        let s = self.string(at, "a string")?;
        if s.chars().count() > self.max_text {
            return Err(format!(
                "invalid: parameter {} is longer than {} characters",
                at + 1,
                self.max_text
            ));
        }
        Ok(s.to_owned())
    }

    fn pubkey(&self) -> Result<PubKey, String> {
        PubKey::from_hex(self.string(0, "a 64-character hex pubkey")?)
            .map_err(|_| "invalid: parameter 1 must be a 64-character lowercase hex pubkey".into())
    }

    fn event_id(&self) -> Result<EventId, String> {
        EventId::from_hex(self.string(0, "a 64-character hex event id")?).map_err(|_| {
            "invalid: parameter 1 must be a 64-character lowercase hex event id".into()
        })
    }

    fn kind(&self) -> Result<Kind, String> {
        self.values
            .first()
            .and_then(Value::as_u64)
            .and_then(|k| u16::try_from(k).ok())
            .map(Kind)
            .ok_or_else(|| "invalid: parameter 1 must be a kind number (0 to 65535)".into())
    }

    fn ip(&self) -> Result<IpAddr, String> {
        self.string(0, "an IP address")?
            .trim()
            .parse()
            .map_err(|_| "invalid: parameter 1 must be an IP address".into())
    }

    fn text(&self) -> Result<String, String> {
        self.bounded_text(0)
    }

    /// The optional reason, parameter 2.
    fn reason(&self) -> Result<String, String> {
        match self.values.get(1) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(_) => self.bounded_text(1),
        }
    }
}

/// Routes a worker's answer (from this gateway's admin channel, see [`crate::pubsub`]) to
/// the waiting handler.
pub fn deliver(state: &AppState, payload: &[u8]) {
    let reply = std::str::from_utf8(payload)
        .map_err(|e| e.to_string())
        .and_then(|text| bus::decode::<AdminReply>(text).map_err(|e| e.to_string()));
    match reply {
        Ok(reply) => {
            if let Some(tx) = state.admin.waiting().remove(&reply.request) {
                let _ = tx.send(reply.result);
            }
        }
        Err(e) => tracing::warn!(error = %e, "dropping undecodable admin reply"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_and_params_parse() {
        let parse = |body: &[u8]| super::parse(body, 4096);
        let pk = "a".repeat(64);
        assert_eq!(
            parse(br#"{"method":"supportedmethods","params":[]}"#),
            Ok(Call::SupportedMethods)
        );
        let ban = format!(r#"{{"method":"banpubkey","params":["{pk}","spam"]}}"#);
        assert!(matches!(
            parse(ban.as_bytes()),
            Ok(Call::Change(Change::BanPubkey { reason, .. })) if reason == "spam"
        ));
        let unban = format!(r#"{{"method":"unbanpubkey","params":["{pk}"]}}"#);
        assert!(matches!(
            parse(unban.as_bytes()),
            Ok(Call::Change(Change::UnbanPubkey { .. }))
        ));
        assert_eq!(
            parse(br#"{"method":"allowkind","params":[1]}"#),
            Ok(Call::Change(Change::AllowKind { kind: Kind(1) }))
        );
        assert!(parse(br#"{"method":"allowkind","params":[70000]}"#).is_err());
        assert!(parse(br#"{"method":"blockip","params":["not an ip"]}"#).is_err());
        assert!(parse(br#"{"method":"banpubkey","params":["xyz"]}"#).is_err());
        assert!(parse(br#"{"method":"createrole","params":[]}"#).is_err());
        assert!(parse(b"not json").is_err());
        for (method, _) in METHODS {
            let body = format!(r#"{{"method":"{method}","params":[]}}"#);
            let parsed = parse(body.as_bytes());
            assert!(
                !matches!(&parsed, Err(e) if e.starts_with("unsupported")),
                "{method} is known"
            );
        }
    }

    #[test]
    fn text_parameters_are_bounded_by_the_setting() {
        let pk = "a".repeat(64);
        let ban =
            |reason: &str| format!(r#"{{"method":"banpubkey","params":["{pk}","{reason}"]}}"#);
        assert!(parse(ban("ten chars!").as_bytes(), 10).is_ok());
        let refused = parse(ban("eleven char").as_bytes(), 10);
        assert_eq!(
            refused,
            Err("invalid: parameter 2 is longer than 10 characters".into())
        );
    }
}
