//! NIP-77 negentropy, initiator side: which ids only we have and which only the other
//! relay has, for one filter, without sending either set whole.
//!
//! `["NEG-OPEN", sub, filter, hex]` starts; each `["NEG-MSG", sub, hex]` answer is fed to
//! the reconciler, which either replies or is done; `["NEG-CLOSE", sub]` ends the session.
//! `["NEG-ERR", sub, reason]` means the relay gave up (the caller falls back to REQ).

use anyhow::Context as _;
use negentropy::{Id, Negentropy};
use serde_json::{Value, json};
use shared::event::EventId;
use shared::nip77::{self, Item};

use super::remote::Remote;

/// Largest negentropy message we send, in bytes before hex encoding (NIP-77 lets either
/// side bound its frames; the relay answers within what it receives).
const FRAME_LIMIT: u64 = 60_000;

/// The difference between the two sets.
#[derive(Debug, Default)]
pub struct Diff {
    /// Ids stored here and missing there.
    pub have: Vec<EventId>,
    /// Ids stored there and missing here.
    pub need: Vec<EventId>,
}

/// Reconciles `local` (`(created_at, id)` of our events matching `filter`) with the relay.
/// `Ok(Err(reason))` when the relay answered NEG-ERR.
pub async fn reconcile(
    remote: &mut Remote,
    filter: &Value,
    local: Vec<Item>,
) -> anyhow::Result<Result<Diff, String>> {
    let storage = nip77::storage(local).map_err(|e| anyhow::anyhow!("negentropy: {e}"))?;
    let mut neg = Negentropy::borrowed(&storage, FRAME_LIMIT)
        .map_err(|e| anyhow::anyhow!("negentropy: {e}"))?;
    let first = neg
        .initiate()
        .map_err(|e| anyhow::anyhow!("negentropy: {e}"))?;
    let sub = "relay-admin-neg";
    remote
        .send(json!(["NEG-OPEN", sub, filter, hex::encode(first)]).to_string())
        .await?;
    let mut have_ids = Vec::new();
    let mut need_ids = Vec::new();
    loop {
        let items = remote.recv("negentropy answer").await?;
        let verb = items.first().and_then(Value::as_str);
        if items.get(1).and_then(Value::as_str) != Some(sub) {
            continue;
        }
        match verb {
            Some("NEG-MSG") => {
                let msg = items
                    .get(2)
                    .and_then(Value::as_str)
                    .and_then(|h| hex::decode(h).ok())
                    .context("NEG-MSG without a hex message")?;
                let next = neg
                    .reconcile_with_ids(&msg, &mut have_ids, &mut need_ids)
                    .map_err(|e| anyhow::anyhow!("negentropy: {e}"))?;
                match next {
                    Some(reply) => {
                        remote
                            .send(json!(["NEG-MSG", sub, hex::encode(reply)]).to_string())
                            .await?
                    }
                    None => {
                        remote.send(json!(["NEG-CLOSE", sub]).to_string()).await?;
                        break;
                    }
                }
            }
            Some("NEG-ERR") | Some("CLOSED") => {
                let reason = items.get(2).and_then(Value::as_str).unwrap_or("");
                return Ok(Err(reason.to_owned()));
            }
            _ => {}
        }
    }
    let to_event_id = |id: Id| EventId::from_bytes(id.to_bytes());
    Ok(Ok(Diff {
        have: have_ids.into_iter().map(to_event_id).collect(),
        need: need_ids.into_iter().map(to_event_id).collect(),
    }))
}
