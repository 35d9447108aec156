//! The gateway's Prometheus metrics (names and units by Prometheus conventions). All are
//! recorded through the `metrics` facade; `/metrics` renders them.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `nostr_gateway_connections` | gauge | |
//! | `nostr_gateway_connections_opened_total` | counter | |
//! | `nostr_gateway_messages_received_total` | counter | `type` (EVENT, REQ, CLOSE, AUTH, COUNT, invalid, binary, oversized) |
//! | `nostr_gateway_messages_sent_total` | counter | `type` (EVENT, OK, EOSE, CLOSED, NOTICE, COUNT, AUTH) |
//! | `nostr_gateway_ok_false_total` | counter | `reason` (the NIP-01 prefix) |
//! | `nostr_gateway_closed_total` | counter | `reason` (the NIP-01 prefix) |
//! | `nostr_gateway_live_deliveries_total` | counter | |
//! | `nostr_gateway_live_drops_total` | counter | `reason` (slow_client, buffer_full) |
//! | `nostr_gateway_slow_consumer_disconnects_total` | counter | |

/// A connection opened.
pub fn connection_opened() {
    metrics::counter!("nostr_gateway_connections_opened_total").increment(1);
    metrics::gauge!("nostr_gateway_connections").increment(1.0);
}

/// A connection closed.
pub fn connection_closed() {
    metrics::gauge!("nostr_gateway_connections").decrement(1.0);
}

/// A client message of this type arrived.
pub fn received(kind: &'static str) {
    metrics::counter!("nostr_gateway_messages_received_total", "type" => kind).increment(1);
}

/// A frame went to a client: counted by type, and refusals by their reason prefix.
pub fn sent(frame: &str) {
    let kind = frame_type(frame);
    metrics::counter!("nostr_gateway_messages_sent_total", "type" => kind).increment(1);
    match kind {
        "OK" => {
            // ["OK","<64 hex>",false,"prefix: ..."]
            if let Some(rest) = frame.get(73..).and_then(|r| r.strip_prefix("false,\"")) {
                metrics::counter!("nostr_gateway_ok_false_total", "reason" => prefix_of(rest))
                    .increment(1);
            }
        }
        "CLOSED" => {
            let reason = serde_json::from_str::<(String, String, String)>(frame)
                .map(|(_, _, m)| prefix_of(&m))
                .unwrap_or("other");
            metrics::counter!("nostr_gateway_closed_total", "reason" => reason).increment(1);
        }
        _ => {}
    }
}

/// Live events handed to subscriptions.
pub fn live_delivered(n: usize) {
    metrics::counter!("nostr_gateway_live_deliveries_total").increment(n as u64);
}

/// A live event that could not be delivered.
pub fn live_dropped(reason: &'static str) {
    metrics::counter!("nostr_gateway_live_drops_total", "reason" => reason).increment(1);
}

/// An upgrade refused before any session started (`per_ip`: the address's cap).
pub fn refused_connection(reason: &'static str) {
    metrics::counter!("nostr_gateway_refused_connections_total", "reason" => reason).increment(1);
}

/// A client closed for being too slow.
pub fn slow_consumer() {
    metrics::counter!("nostr_gateway_slow_consumer_disconnects_total").increment(1);
}

fn frame_type(frame: &str) -> &'static str {
    const TYPES: [&str; 7] = ["EVENT", "OK", "EOSE", "CLOSED", "NOTICE", "COUNT", "AUTH"];
    let head = frame.get(2..10).unwrap_or("");
    TYPES
        .into_iter()
        .find(|t| head.starts_with(t) && head.as_bytes().get(t.len()) == Some(&b'"'))
        .unwrap_or("other")
}

/// The NIP-01 prefix of a reason, from a fixed set (labels must stay few).
fn prefix_of(message: &str) -> &'static str {
    const PREFIXES: [&str; 10] = [
        "duplicate",
        "pow",
        "blocked",
        "rate-limited",
        "invalid",
        "restricted",
        "mute",
        "error",
        "auth-required",
        "unsupported",
    ];
    let prefix = message.split(':').next().unwrap_or("");
    PREFIXES
        .into_iter()
        .find(|p| *p == prefix)
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_classified_and_reasons_extracted() {
        let id = shared::event::EventId::from_bytes([7; 32]);
        let ok = shared::message::ok_frame(&id, false, "rate-limited: slow down");
        assert_eq!(frame_type(&ok), "OK");
        assert_eq!(
            prefix_of(
                ok.get(73..)
                    .and_then(|r| r.strip_prefix("false,\""))
                    .unwrap_or("")
            ),
            "rate-limited"
        );
        assert_eq!(frame_type("[\"EOSE\",\"s\"]"), "EOSE");
        assert_eq!(frame_type("[\"EVENT\",\"s\",{}]"), "EVENT");
        assert_eq!(frame_type("[\"COUNT\",\"s\",{}]"), "COUNT");
        assert_eq!(prefix_of("weird: x"), "other");
    }
}
