//! Logging, tracing and metrics setup, done once at the start of each binary, and the W3C
//! trace context that carries a trace across processes inside bus envelopes.
//!
//! - Logs: lines on stderr (text or JSON), filtered by `RUST_LOG` (default `info`). Inside a
//!   span that recorded a `trace_id` field, JSON lines carry it.
//! - Traces: OpenTelemetry over OTLP, configured by the standard `OTEL_*` variables
//!   ([`OtelConfig`]); off when no endpoint is set. The per-message spans of the hot paths
//!   are made with [`trace_span!`](crate::trace_span), which makes no span at all when
//!   traces are not exported: a span costs its fields' formatting in the log layer, about
//!   a sixth of a gateway's CPU under load, for nothing when nobody collects it.
//! - Metrics: a Prometheus recorder for the `metrics` facade; [`Telemetry::render_metrics`]
//!   gives the text exposition format.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::bus::TraceContext;
use crate::config::{LogConfig, LogFormat};

/// Whether [`init`] installed an OTLP exporter (read by [`trace_span!`](crate::trace_span)).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether traces are exported over OTLP in this process.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// An `info_span!` that exists only when traces are exported ([`exporting`]); otherwise
/// `Span::none()`, on which recording fields and entering cost nothing. For the spans made
/// per message on the hot paths; log lines inside them name what they are about themselves.
#[macro_export]
macro_rules! trace_span {
    ($($arg:tt)*) => {
        if $crate::telemetry::exporting() {
            ::tracing::info_span!($($arg)*)
        } else {
            ::tracing::Span::none()
        }
    };
}

/// OpenTelemetry settings: the standard `OTEL_*` variables.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct OtelConfig {
    /// OTLP collector endpoint (e.g. http://jaeger:4318 for HTTP, http://jaeger:4317 for
    /// gRPC). Tracing is off when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// OTLP transport: `http/protobuf` or `grpc`.
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_PROTOCOL",
        default_value = "http/protobuf"
    )]
    pub otlp_protocol: String,
    /// Service name in traces (default: the binary's name).
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub service_name: Option<String>,
    /// Sampler: always_on, always_off, traceidratio, parentbased_always_on,
    /// parentbased_always_off, parentbased_traceidratio.
    #[arg(
        long,
        env = "OTEL_TRACES_SAMPLER",
        default_value = "parentbased_always_on"
    )]
    pub sampler: String,
    /// The sampler's argument (the ratio for the *traceidratio samplers), 0.0 to 1.0.
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG")]
    pub sampler_arg: Option<f64>,
    /// Delay between two exports of finished spans, in milliseconds.
    #[arg(long, env = "OTEL_BSP_SCHEDULE_DELAY", default_value_t = 5000)]
    pub batch_delay_ms: u64,
    /// Extra resource attributes, `key=value,key2=value2`.
    #[arg(long, env = "OTEL_RESOURCE_ATTRIBUTES")]
    pub resource_attributes: Option<String>,
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// A setting has a value this build does not understand.
    #[error("{0}")]
    Config(String),
    /// The OTLP exporter could not be built.
    #[error("OTLP exporter: {0}")]
    Exporter(String),
}

impl OtelConfig {
    fn sampler(&self) -> Result<Sampler, TelemetryError> {
        let ratio = || {
            let r = self.sampler_arg.unwrap_or(1.0);
            if (0.0..=1.0).contains(&r) {
                Ok(r)
            } else {
                Err(TelemetryError::Config(format!(
                    "OTEL_TRACES_SAMPLER_ARG {r} is not between 0 and 1"
                )))
            }
        };
        Ok(match self.sampler.as_str() {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::TraceIdRatioBased(ratio()?),
            "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            "parentbased_traceidratio" => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio()?)))
            }
            other => {
                return Err(TelemetryError::Config(format!(
                    "OTEL_TRACES_SAMPLER {other:?} is not supported"
                )));
            }
        })
    }

    fn resource(&self, default_service: &str) -> opentelemetry_sdk::Resource {
        let attributes = self
            .resource_attributes
            .iter()
            .flat_map(|s| s.split(','))
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| KeyValue::new(k.trim().to_owned(), v.trim().to_owned()));
        opentelemetry_sdk::Resource::builder_empty()
            .with_attributes(attributes)
            .with_service_name(
                self.service_name
                    .clone()
                    .unwrap_or_else(|| default_service.to_owned()),
            )
            .build()
    }

    fn tracer_provider(
        &self,
        default_service: &str,
    ) -> Result<Option<SdkTracerProvider>, TelemetryError> {
        let Some(endpoint) = self.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) else {
            return Ok(None);
        };
        let exporter = match self.otlp_protocol.as_str() {
            "http/protobuf" => {
                let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_endpoint(url)
                    .with_timeout(Duration::from_secs(5))
                    .build()
            }
            "grpc" => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(Duration::from_secs(5))
                .build(),
            other => {
                return Err(TelemetryError::Config(format!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL {other:?} is not supported (use http/protobuf or grpc)"
                )));
            }
        }
        .map_err(|e| TelemetryError::Exporter(format!("{e:?}")))?;
        let batch = BatchConfigBuilder::default()
            .with_scheduled_delay(Duration::from_millis(self.batch_delay_ms.max(1)))
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch)
            .build();
        Ok(Some(
            SdkTracerProvider::builder()
                .with_span_processor(processor)
                .with_sampler(self.sampler()?)
                .with_resource(self.resource(default_service))
                .build(),
        ))
    }
}

/// What [`init`] set up; flush traces with [`Telemetry::shutdown`] before exiting.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl Telemetry {
    /// The Prometheus text exposition of every metric recorded so far.
    pub fn render_metrics(&self) -> String {
        self.metrics
            .as_ref()
            .map(|h| h.render())
            .unwrap_or_default()
    }

    /// A cheap handle for rendering metrics from another task.
    pub fn metrics_handle(&self) -> Option<metrics_exporter_prometheus::PrometheusHandle> {
        self.metrics.clone()
    }

    /// Exports the spans not yet sent.
    pub fn shutdown(&self) {
        if let Some(p) = &self.provider
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "flushing traces failed");
        }
    }
}

/// Installs logging, tracing (when an OTLP endpoint is set) and the metrics recorder, once
/// per process. `service` names the binary in traces unless `OTEL_SERVICE_NAME` is set.
pub fn init(
    service: &str,
    log: &LogConfig,
    otel: &OtelConfig,
) -> Result<Telemetry, TelemetryError> {
    let provider = otel.tracer_provider(service)?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = match log.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let otel_layer = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service.to_owned())));
    // A second init in one process (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel_layer)
        .try_init();
    if let Some(p) = &provider {
        EXPORTING.store(true, Ordering::Relaxed);
        opentelemetry::global::set_tracer_provider(p.clone());
        tracing::info!(endpoint = ?otel.otlp_endpoint, protocol = %otel.otlp_protocol, "exporting traces over OTLP");
    }
    // Latencies in seconds; sizes (`*_size`) in counts.
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ])
        .and_then(|b| {
            b.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Suffix("_size".into()),
                &[
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
                ],
            )
        })
        .ok()
        .and_then(|b| b.install_recorder().ok());
    Ok(Telemetry { provider, metrics })
}

impl TraceContext {
    /// The context of `span`, to send along with a message. Empty when the span is not
    /// recorded (tracing off or not sampled).
    pub fn of(span: &tracing::Span) -> Self {
        let cx = span.context();
        if !cx.span().span_context().is_valid() {
            return TraceContext::default();
        }
        let mut carrier: HashMap<String, String> = HashMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
        TraceContext {
            traceparent: carrier.remove("traceparent"),
            tracestate: carrier.remove("tracestate").filter(|s| !s.is_empty()),
        }
    }

    /// Makes `span` a child of the remote span this context names (no-op when empty).
    pub fn parent(&self, span: &tracing::Span) {
        let Some(traceparent) = &self.traceparent else {
            return;
        };
        let mut carrier = HashMap::new();
        carrier.insert("traceparent".to_owned(), traceparent.clone());
        if let Some(state) = &self.tracestate {
            carrier.insert("tracestate".to_owned(), state.clone());
        }
        let cx: Context = TraceContextPropagator::new().extract(&carrier);
        let _ = span.set_parent(cx);
        record_trace_id(span);
    }

    /// Adds a link from `span` to the span this context names (for batch work that
    /// serves many traces).
    pub fn link(&self, span: &tracing::Span) {
        let Some(traceparent) = &self.traceparent else {
            return;
        };
        let mut carrier = HashMap::new();
        carrier.insert("traceparent".to_owned(), traceparent.clone());
        let cx: Context = TraceContextPropagator::new().extract(&carrier);
        span.add_link(cx.span().span_context().clone());
    }
}

/// Records the span's OpenTelemetry trace id in its `trace_id` field (declare the field
/// as `trace_id = tracing::field::Empty`), so log lines inside it carry the id.
pub fn record_trace_id(span: &tracing::Span) {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_parse_like_the_specification_says() {
        let mut c = OtelConfig {
            sampler: "parentbased_traceidratio".into(),
            sampler_arg: Some(0.25),
            ..Default::default()
        };
        assert!(matches!(c.sampler(), Ok(Sampler::ParentBased(_))));
        c.sampler = "traceidratio".into();
        assert!(matches!(c.sampler(), Ok(Sampler::TraceIdRatioBased(r)) if r == 0.25));
        c.sampler_arg = Some(2.0);
        assert!(c.sampler().is_err());
        c.sampler = "sometimes".into();
        assert!(c.sampler().is_err());
    }

    #[test]
    fn tracing_is_off_without_an_endpoint_and_protocols_are_checked() {
        let mut c = OtelConfig {
            otlp_protocol: "http/protobuf".into(),
            sampler: "always_on".into(),
            ..Default::default()
        };
        assert!(matches!(c.tracer_provider("t"), Ok(None)));
        c.otlp_endpoint = Some("http://127.0.0.1:4318".into());
        c.otlp_protocol = "carrier-pigeon".into();
        assert!(c.tracer_provider("t").is_err());
    }

    #[test]
    fn empty_context_is_a_no_op() {
        let ctx = TraceContext::of(&tracing::Span::none());
        assert_eq!(ctx, TraceContext::default());
        ctx.parent(&tracing::Span::none());
    }
}
