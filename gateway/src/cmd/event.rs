//! `EVENT`: hand the event to the ingest stream; the `OK` comes back from a worker.

use shared::bus::{self, IngestRequest, TraceContext};
use shared::event::Event;
use shared::message::{ok_frame, raw_json};
use shared::telemetry::record_trace_id;
use tracing::{Instrument, field::Empty};

use crate::cmd::send_span;
use crate::policy;
use crate::ratelimit::{self, Limit};
use crate::session::Session;

/// A client publishing an event (shape already checked; id and signature are checked by
/// the ingest worker).
pub struct Publish {
    event: Event,
}

impl Publish {
    /// Wraps a parsed event.
    pub fn new(event: Event) -> Self {
        Publish { event }
    }

    /// Checks policy and rate limits, then appends the event to its ingest stream shard.
    /// Traced as the root `EVENT` span; the ingest worker continues the trace.
    pub async fn handle(self, session: &mut Session) {
        let span = shared::trace_span!(
            "EVENT",
            otel.kind = "server",
            nostr.event.id = %self.event.id,
            nostr.event.kind = self.event.kind.0,
            nostr.connection = session.conn.0,
            trace_id = Empty,
        );
        record_trace_id(&span);
        self.publish(session).instrument(span).await;
    }

    async fn publish(self, session: &mut Session) {
        let state = &session.state;
        let id = self.event.id;
        if let Err(reason) = policy::check_event(session, &self.event) {
            session.send(ok_frame(&id, false, &reason));
            return;
        }
        let rate = &state.config.rate;
        let limits = vec![
            Limit::events_from_ip(session.ip, rate.events_per_ip),
            Limit::events_from_pubkey(&self.event.pubkey, rate.events_per_pubkey),
        ];
        if let Some(limit) = ratelimit::exceeded(state, limits).await {
            session.send(ok_frame(&id, false, &limit.to_string()));
            return;
        }
        let Ok(json) = raw_json(self.event.to_json()) else {
            session.send(ok_frame(&id, false, "error: could not encode the event"));
            return;
        };
        let stream = state.bus.ingest_stream(&id);
        let send = send_span(&stream);
        let request = IngestRequest {
            gateway: state.gateway.clone(),
            conn: session.conn,
            event: json,
            trace: TraceContext::of(&send),
        };
        state.registry.expect_ok(session.conn, id);
        let added = state
            .publisher
            .publish(stream, bus::encode(&request))
            .instrument(send)
            .await;
        if let Err(e) = added {
            tracing::warn!(error = %e, %id, "cannot publish event to the ingest stream");
            let reason = "error: the relay cannot accept events right now; try again";
            state
                .registry
                .ok(session.conn, id, ok_frame(&id, false, reason));
        }
    }
}
