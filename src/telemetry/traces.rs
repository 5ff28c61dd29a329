//! The OpenTelemetry pipeline: an OTLP exporter (http/protobuf or grpc) behind the SDK's
//! batch span processor, and the `tracing` layer that turns duet's trace spans into
//! OpenTelemetry spans. Built only when an endpoint is configured; without one nothing here
//! exists and [`enabled`] is false, so runs make no span at all.
//!
//! Export never blocks a run. A span that ends goes into the batch processor's bounded
//! queue (`OTEL_BSP_MAX_QUEUE_SIZE`) with a `try_send`: when the queue is full the span is
//! dropped (the SDK logs the first drop and the total at shutdown). The processor's own
//! thread sends the batches; the HTTP and gRPC clients run on a small runtime of their own
//! (`duet-otel`), never on the service's workers, so a slow or dead collector costs that
//! thread's time and, at most once a minute, a log line — nothing on the response path.

use std::{
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    trace::{
        BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider, SpanData,
        SpanExporter,
    },
};
use tracing::{Subscriber, info, warn};
use tracing_subscriber::{Layer, registry::LookupSpan};

use crate::config::{OtlpProtocol, TracesConfig};

/// The pipeline once installed: runs make spans only while this is set.
static PIPELINE: OnceLock<Pipeline> = OnceLock::new();

/// Whether traces are on: one atomic load, the whole cost of tracing per run when they are
/// off.
pub fn enabled() -> bool {
    PIPELINE.get().is_some()
}

/// At most this often a failing export is logged; the line counts what was lost since.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The most of a collector's answer that is read (an `ExportTraceServiceResponse` is a few
/// bytes; a proxy's error page may be more, and is not worth memory).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TracesError {
    #[error("cannot start the trace export runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot create the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("cannot create the OTLP HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// The SDK's tracer provider and the runtime its clients run on.
pub struct Pipeline {
    provider: SdkTracerProvider,
    /// Kept for the life of the process: the gRPC channel's tasks and the HTTP client's
    /// connections live on it.
    _runtime: tokio::runtime::Runtime,
}

impl Pipeline {
    /// Builds the exporter and the batch processor (which starts its thread). Spans are made
    /// only once it is installed (with the layer, by `telemetry::init_with_traces`).
    pub fn start(config: &TracesConfig) -> Result<Pipeline, TracesError> {
        // One worker is plenty: it only sends a batch now and then.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("duet-otel")
            .enable_all()
            .build()
            .map_err(TracesError::Runtime)?;
        // Inside the runtime: tonic's channel starts its tasks where it is made.
        let exporter = {
            let _entered = runtime.enter();
            otlp_exporter(config)?
        };
        let exporter = Exporter {
            inner: exporter,
            runtime: runtime.handle().clone(),
            timeout: config.batch.export_timeout,
            endpoint: config.endpoint_for_log(),
            failures: Mutex::new(Failures::default()),
        };
        // OTEL_BSP_EXPORT_TIMEOUT is enforced by `Exporter` (this processor has no timeout
        // of its own).
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(config.batch.max_queue_size)
            .with_scheduled_delay(config.batch.schedule_delay)
            .with_max_export_batch_size(config.batch.max_export_batch_size)
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch)
            .build();
        // `Resource::builder` reads OTEL_RESOURCE_ATTRIBUTES; the name is decided by config
        // (OTEL_SERVICE_NAME, else the attribute, else `duet`).
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                crate::SERVICE_VERSION,
            ))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_span_processor(processor)
            .build();
        Ok(Pipeline {
            provider,
            _runtime: runtime,
        })
    }

    pub(super) fn tracer(&self) -> SdkTracer {
        self.provider.tracer("duet")
    }

    /// Makes this the process's pipeline: from now on runs make spans. Called once, at
    /// start, outside any runtime (a second pipeline would be dropped, which blocks).
    pub(super) fn install(self) {
        let _ = PIPELINE.set(self);
    }
}

/// Exports what is queued and stops the exporter, waiting at most `timeout`. Blocking: call
/// it from a blocking thread (`spawn_blocking`). Without traces it does nothing.
pub fn shutdown(timeout: Duration) {
    let Some(pipeline) = PIPELINE.get() else {
        return;
    };
    match pipeline.provider.shutdown_with_timeout(timeout) {
        Ok(()) => info!("traces flushed"),
        Err(e) => warn!(error = %e, "traces not all flushed at shutdown"),
    }
}

/// The layer that makes OpenTelemetry spans of duet's trace spans, and of nothing else: no
/// log line (they may quote upstream errors) and no other library's span becomes part of a
/// trace.
pub(super) fn layer<S>(tracer: SdkTracer) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // No code locations, thread names, levels or targets as attributes; no busy/idle
        // timing (a clock read per poll) and no OpenTelemetry context switch per poll: the
        // spans are never entered, their contexts are passed on explicitly.
        .with_location(false)
        .with_threads(false)
        .with_level(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            meta.is_span() && meta.target() == super::spans::TARGET
        }))
}

fn otlp_exporter(config: &TracesConfig) -> Result<opentelemetry_otlp::SpanExporter, TracesError> {
    let builder = opentelemetry_otlp::SpanExporter::builder();
    // The headers (OTEL_EXPORTER_OTLP_HEADERS and its traces variant), the request timeout
    // (OTEL_EXPORTER_OTLP_TIMEOUT) and compression are read by the exporter itself, from
    // the environment: duet never holds the headers' values.
    let exporter = match config.protocol {
        OtlpProtocol::HttpProtobuf => {
            let client = reqwest::Client::builder()
                .timeout(config.batch.export_timeout)
                .build()?;
            builder
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(config.endpoint.clone())
                .with_http_client(OtlpHttp(client))
                .build()?
        }
        OtlpProtocol::Grpc => {
            let builder = builder
                .with_tonic()
                .with_protocol(opentelemetry_otlp::Protocol::Grpc)
                .with_endpoint(config.endpoint.clone());
            // TLS with the public web roots, as reqwest does for the providers.
            let builder = if config.endpoint.starts_with("https://") {
                builder.with_tls_config(
                    opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new()
                        .with_webpki_roots(),
                )
            } else {
                builder
            };
            builder.build()?
        }
    };
    Ok(exporter)
}

/// The OTLP exporter as the batch processor's thread calls it: the export runs on the
/// pipeline's runtime under `OTEL_BSP_EXPORT_TIMEOUT`, and a failure is logged here, at most
/// once a minute, instead of once per batch by the SDK.
#[derive(Debug)]
struct Exporter {
    inner: opentelemetry_otlp::SpanExporter,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
    /// Scheme, host and port of the collector, for the log line.
    endpoint: String,
    failures: Mutex<Failures>,
}

/// Failed exports since the last line about them.
#[derive(Debug, Default)]
struct Failures {
    batches: u64,
    spans: u64,
    last_logged: Option<Instant>,
}

impl SpanExporter for Exporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        // The processor's own thread, outside any runtime: blocking here is its job, and the
        // clients' futures need the pipeline's reactor.
        // (The timer is made inside: it needs the runtime too.)
        let result = self
            .runtime
            .block_on(async { tokio::time::timeout(self.timeout, self.inner.export(batch)).await });
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_elapsed) => Some(format!(
                "no answer within OTEL_BSP_EXPORT_TIMEOUT ({} ms)",
                self.timeout.as_millis()
            )),
        };
        self.note(error, spans);
        // The batch is gone either way; telling the SDK would only make it log per batch.
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl Exporter {
    fn note(&self, error: Option<String>, spans: u64) {
        // Only the processor's thread calls this, so the lock is never contended.
        let Ok(mut failures) = self.failures.lock() else {
            return;
        };
        match error {
            None if failures.batches > 0 => {
                info!(
                    endpoint = %self.endpoint,
                    batches_lost = failures.batches,
                    spans_lost = failures.spans,
                    "trace export works again"
                );
                *failures = Failures::default();
            }
            None => {}
            Some(error) => {
                failures.batches += 1;
                failures.spans += spans;
                let due = failures
                    .last_logged
                    .is_none_or(|at| at.elapsed() >= FAILURE_LOG_INTERVAL);
                if due {
                    warn!(
                        endpoint = %self.endpoint,
                        error,
                        batches_lost = failures.batches,
                        spans_lost = failures.spans,
                        "trace export failed; spans are dropped until the collector answers \
                         (logged at most once a minute)"
                    );
                    failures.last_logged = Some(Instant::now());
                }
            }
        }
    }
}

/// OTLP/HTTP over duet's own reqwest (the exporter's built-in clients would bring a second
/// reqwest, or a blocking one). Runs inside the pipeline's runtime (see [`Exporter`]).
#[derive(Debug)]
struct OtlpHttp(reqwest::Client);

#[async_trait]
impl HttpClient for OtlpHttp {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let mut response = self.0.execute(request).await?;
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            let room = MAX_RESPONSE_BYTES.saturating_sub(body.len());
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if room <= chunk.len() {
                break;
            }
        }
        let mut answer = http::Response::new(Bytes::from(body));
        *answer.status_mut() = status;
        *answer.headers_mut() = headers;
        Ok(answer)
    }
}
