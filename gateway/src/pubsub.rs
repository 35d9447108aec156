//! The Redis subscriber: this gateway's reply channel and the live channel, dispatched into
//! the [`crate::registry::Registry`], and its admin channel (NIP-86 answers, to
//! [`crate::admin`]). Reconnects with backoff when Redis goes away or drops the
//! subscriber (its output buffer limit); what was awaited then is answered `error:` at once
//! ([`crate::registry::Registry::bus_lost`]), not left to time out.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use shared::bus::{self, GatewayId, GatewayReply, TraceContext};
use shared::event::Event;
use shared::message::{closed_frame, count_frame, ok_frame};
use tokio::sync::watch;

use crate::AppState;
use crate::registry::LiveEvent;

/// Runs until `stop` turns true.
pub async fn run(state: Arc<AppState>, mut stop: watch::Receiver<bool>) {
    let reply_channel = state.bus.gateway_channel(&state.gateway);
    let live_channel = state.bus.live_channel();
    let admin_channel = state.bus.admin_channel(&state.gateway);
    let mut backoff = Duration::from_millis(100);
    // Whether a subscription was lost (and not answered for since).
    let mut lost = false;
    loop {
        match subscribe(&state, &[&reply_channel, &live_channel, &admin_channel]).await {
            Ok(mut pubsub) => {
                // What was sent on the bus while nothing listened (since the subscription
                // was lost, including REQs registered meanwhile) cannot be answered: answer
                // it now.
                if std::mem::take(&mut lost) {
                    state.registry.bus_lost();
                }
                state.pubsub_up.store(true, Ordering::Relaxed);
                backoff = Duration::from_millis(100);
                let mut messages = pubsub.on_message();
                loop {
                    tokio::select! {
                        _ = crate::stopped(&mut stop) => return,
                        msg = messages.next() => match msg {
                            Some(msg) if msg.get_channel_name() == admin_channel => {
                                crate::admin::deliver(&state, msg.get_payload_bytes());
                            }
                            Some(msg) => {
                                let channel = msg.get_channel_name();
                                dispatch(&state, channel, channel == live_channel, msg.get_payload_bytes());
                            }
                            None => break,
                        },
                    }
                }
                state.pubsub_up.store(false, Ordering::Relaxed);
                lost = true;
                tracing::warn!(
                    "lost the Redis subscription; answering what was in flight with error: and reconnecting"
                );
                state.registry.bus_lost();
            }
            Err(e) => tracing::warn!(error = %e, "cannot subscribe to Redis; retrying"),
        }
        tokio::select! {
            _ = crate::stopped(&mut stop) => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn subscribe(state: &AppState, channels: &[&str]) -> redis::RedisResult<redis::aio::PubSub> {
    let client = redis::Client::open(state.config.bus.redis_url.as_str())?;
    let mut pubsub = client.get_async_pubsub().await?;
    for channel in channels {
        pubsub.subscribe(*channel).await?;
    }
    Ok(pubsub)
}

/// Handles one message from `channel` (the live channel when `is_live`, else this gateway's
/// reply channel): one envelope or a batch of them. The channel name comes with the message:
/// nothing is formatted per message.
fn dispatch(state: &AppState, channel: &str, is_live: bool, payload: &[u8]) {
    let Ok(text) = std::str::from_utf8(payload) else {
        tracing::warn!("dropping a bus message that is not UTF-8");
        return;
    };
    if is_live {
        if !state.registry.has_subscriptions() {
            // Nothing here can match: skip decoding and parsing the events.
            return;
        }
        for live in bus::decode_batch::<bus::LiveEvent>(text) {
            match live {
                Ok(live) => deliver_live(state, channel, live),
                Err(e) => tracing::warn!(error = %e, "dropping an undecodable live event"),
            }
        }
        return;
    }
    for reply in bus::decode_batch::<GatewayReply>(text) {
        match reply {
            Ok(reply) => deliver_reply(state, channel, reply),
            Err(e) => tracing::warn!(error = %e, "dropping an undecodable reply"),
        }
    }
}

fn deliver_live(state: &AppState, channel: &str, live: bus::LiveEvent) {
    let json = Box::<str>::from(live.event).into_string();
    match Event::from_json(&json) {
        Ok(event) => {
            let span = receive_span("deliver live", &state.gateway, channel, &live.trace);
            span.record("nostr.event.id", tracing::field::display(event.id));
            let delivered =
                span.in_scope(|| state.registry.live(Arc::new(LiveEvent { event, json })));
            span.record("nostr.deliveries", delivered);
        }
        Err(e) => tracing::warn!(error = %e, "dropping malformed live event"),
    }
}

fn deliver_reply(state: &AppState, channel: &str, reply: GatewayReply) {
    match reply {
        GatewayReply::Ok {
            conn,
            event_id,
            accepted,
            message,
            trace,
        } => {
            let span = receive_span("deliver OK", &state.gateway, channel, &trace);
            span.record("nostr.event.id", tracing::field::display(event_id));
            let frame = ok_frame(&event_id, accepted, &message);
            span.in_scope(|| state.registry.ok(conn, event_id, frame));
        }
        GatewayReply::Events {
            conn,
            req,
            sub_id,
            events,
            eose,
            trace,
        } => {
            if eose {
                let span = receive_span("deliver EOSE", &state.gateway, channel, &trace);
                span.record("nostr.subscription.id", tracing::field::display(&sub_id));
                span.in_scope(|| state.registry.stored(conn, req, &sub_id, events, eose));
            } else {
                state.registry.stored(conn, req, &sub_id, events, eose);
            }
        }
        GatewayReply::Count {
            conn,
            req,
            query_id,
            result,
        } => {
            let frame = match result {
                Ok(n) => count_frame(&query_id, n),
                Err(message) => closed_frame(&query_id, &message),
            };
            state.registry.count(conn, req, query_id, frame);
        }
        GatewayReply::Neg {
            conn,
            req,
            sub_id,
            result,
        } => state.registry.neg_reply(conn, req, &sub_id, result),
        GatewayReply::Closed {
            conn,
            req,
            sub_id,
            message,
        } => {
            state.registry.close(conn, req, &sub_id, &message);
        }
    }
}

/// A consumer span for a message that arrived on `channel`, continuing its sender's trace.
fn receive_span(
    name: &'static str,
    gateway: &GatewayId,
    channel: &str,
    trace: &TraceContext,
) -> tracing::Span {
    let span = shared::trace_span!(
        "receive",
        otel.name = name,
        otel.kind = "consumer",
        messaging.system = "redis",
        messaging.operation.type = "receive",
        messaging.destination.name = %channel,
        nostr.event.id = tracing::field::Empty,
        nostr.subscription.id = tracing::field::Empty,
        nostr.deliveries = tracing::field::Empty,
        nostr.gateway = %gateway,
        trace_id = tracing::field::Empty,
    );
    trace.parent(&span);
    span
}
