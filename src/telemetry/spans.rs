//! The span tree of a run (contract §9) and the W3C trace context in and out.
//!
//! Per run: a `duet.run` span (kind server), child of the caller's `traceparent` when it
//! sent a valid one, and under it one `chat {model}` span (kind client) per model call,
//! with the GenAI semantic-convention attributes. The upstream request of a model call
//! carries that span's `traceparent` (and the caller's `tracestate`).
//!
//! With traces off ([`super::traces::enabled`] false) every constructor here returns an
//! empty value after one atomic load: no span, no header parsed, no header sent.
//!
//! Attributes hold names, numbers and outcomes only: never a query, an answer, a key, a
//! header value or an upstream error's text.

use http::{HeaderMap, HeaderValue};
use opentelemetry::{
    Context, KeyValue,
    propagation::TextMapPropagator,
    trace::{Status, TraceContextExt},
};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Directive;
use uuid::Uuid;

use super::traces::enabled;
use crate::domain::Role;

/// The `tracing` target of the trace spans: the OpenTelemetry layer takes these and nothing
/// else, and the log layer never shows them.
pub const TARGET: &str = "duet::otel";

/// The log layer's directive that keeps the trace spans out of log lines.
pub(super) fn no_logs() -> Option<Directive> {
    format!("{TARGET}=off").parse().ok()
}

/// What a request brings to its run's trace: the route it came in on and the caller's
/// trace context.
#[derive(Debug, Clone)]
pub struct Incoming {
    route: &'static str,
    /// The caller's span, when its `traceparent` was valid; else the run starts a trace.
    parent: Option<Context>,
}

/// Reads `traceparent` and `tracestate`. A malformed `traceparent` is ignored (the run
/// starts a new trace), never refused. `None` when traces are off.
pub fn incoming(headers: &HeaderMap, route: &'static str) -> Option<Incoming> {
    if !enabled() {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let parent = cx.span().span_context().is_valid().then_some(cx);
    Some(Incoming { route, parent })
}

/// The run's span: recorded when the run ends, ended when the last handle goes (with the
/// run's guard).
#[derive(Debug, Clone)]
pub struct RunSpan(Span);

impl RunSpan {
    /// A disabled span, for runs while traces are off.
    pub fn none() -> RunSpan {
        RunSpan(Span::none())
    }

    pub fn start(run_id: Uuid, incoming: Option<&Incoming>) -> RunSpan {
        if !enabled() {
            return RunSpan::none();
        }
        let span = tracing::info_span!(
            target: TARGET,
            parent: None,
            "duet.run",
            otel.kind = "server",
            duet.run_id = %run_id,
        );
        if let Some(incoming) = incoming {
            span.set_attribute("http.route", incoming.route);
            if let Some(parent) = &incoming.parent {
                // Before any child exists, so the span has not been started yet.
                let _ = span.set_parent(parent.clone());
            }
        }
        RunSpan(span)
    }

    /// The span of one model call, a child of this one.
    pub fn model(&self, role: Role, run_id: Uuid, call: ModelCall<'_>) -> ModelSpan {
        if self.0.is_disabled() {
            return ModelSpan::none();
        }
        let span = tracing::info_span!(
            target: TARGET,
            parent: &self.0,
            "chat",
            otel.name = %format_args!("chat {}", call.model),
            otel.kind = "client",
            duet.run_id = %run_id,
            duet.model = role.as_str(),
        );
        let mut attributes = vec![
            KeyValue::new("gen_ai.operation.name", "chat"),
            KeyValue::new("gen_ai.provider.name", provider_name(call.provider)),
            KeyValue::new("gen_ai.request.model", call.model.to_owned()),
        ];
        if let Some(n) = call.max_tokens {
            attributes.push(KeyValue::new("gen_ai.request.max_tokens", i64::from(n)));
        }
        if let Some(t) = call.temperature {
            attributes.push(KeyValue::new("gen_ai.request.temperature", t));
        }
        for kv in attributes {
            span.set_attribute(kv.key, kv.value);
        }
        let headers = TraceHeaders::of(&span.context());
        ModelSpan { span, headers }
    }

    /// Records how the run ended (`ok`, `partial`, `failed`, `cancelled`); a failed run's
    /// span has status error.
    pub fn end(&self, status: &'static str) {
        if self.0.is_disabled() {
            return;
        }
        self.0.set_attribute("duet.status", status);
        if status == "failed" {
            self.0.set_status(Status::error("neither model answered"));
        }
    }
}

/// What a model span is told at its start.
#[derive(Debug, Clone, Copy)]
pub struct ModelCall<'a> {
    /// duet's name of the provider family (`gemini`, `openai`, ...).
    pub provider: &'a str,
    /// The model name sent upstream.
    pub model: &'a str,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
}

/// How a model call ended, as its span records it.
#[derive(Debug, Clone, Copy)]
pub struct ModelEnd<'a> {
    /// `ok`, `timeout`, `error`, `skipped` or `cancelled`.
    pub outcome: &'static str,
    /// The contract's `error_type` of a failed call.
    pub error_type: Option<&'static str>,
    /// The client-safe message of a failed call (never an upstream body).
    pub message: Option<&'a str>,
    pub model_version: Option<&'a str>,
    pub finish_reason: Option<&'a str>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
}

/// One model call's span, ended by [`ModelSpan::finish`] (or when dropped, for a run that
/// ended some other way).
#[derive(Debug)]
pub struct ModelSpan {
    span: Span,
    headers: Option<TraceHeaders>,
}

impl ModelSpan {
    pub fn none() -> ModelSpan {
        ModelSpan {
            span: Span::none(),
            headers: None,
        }
    }

    /// The headers the upstream request of this call carries.
    pub fn headers(&self) -> Option<TraceHeaders> {
        self.headers.clone()
    }

    /// Records the end of the call and ends the span.
    pub fn finish(self, end: ModelEnd<'_>) {
        let span = &self.span;
        if span.is_disabled() {
            return;
        }
        span.set_attribute("duet.outcome", end.outcome);
        if let Some(version) = end.model_version {
            span.set_attribute("gen_ai.response.model", version.to_owned());
        }
        if let Some(n) = end.input_tokens {
            span.set_attribute("gen_ai.usage.input_tokens", tokens(n));
        }
        if let Some(n) = end.output_tokens {
            span.set_attribute("gen_ai.usage.output_tokens", tokens(n));
        }
        if let Some(reason) = end.finish_reason {
            span.set_attribute(
                "gen_ai.response.finish_reasons",
                opentelemetry::Value::Array(
                    vec![opentelemetry::StringValue::from(reason.to_owned())].into(),
                ),
            );
        }
        if let Some(error_type) = end.error_type {
            span.set_attribute("error.type", error_type);
            span.set_status(Status::error(end.message.unwrap_or(error_type).to_owned()));
        }
    }
}

/// Token counts as OpenTelemetry's integer type.
fn tokens(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `gen_ai.provider.name` as the semantic conventions name duet's families; the simulated
/// provider keeps duet's own name.
fn provider_name(family: &str) -> String {
    match family {
        "gemini" => "gcp.gemini".to_owned(),
        other => other.to_owned(),
    }
}

/// The W3C trace context one upstream request carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceHeaders {
    pub traceparent: HeaderValue,
    /// The caller's `tracestate`, passed on unchanged.
    pub tracestate: Option<HeaderValue>,
}

impl TraceHeaders {
    fn of(cx: &Context) -> Option<TraceHeaders> {
        let span = cx.span();
        let sc = span.span_context();
        if !sc.is_valid() {
            return None;
        }
        let traceparent = format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        );
        let tracestate = sc.trace_state().header();
        Some(TraceHeaders {
            traceparent: HeaderValue::from_str(&traceparent).ok()?,
            tracestate: (!tracestate.is_empty())
                .then(|| HeaderValue::from_str(&tracestate).ok())
                .flatten(),
        })
    }

    /// Adds the headers to an upstream request.
    pub fn apply(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let request = request.header("traceparent", self.traceparent.clone());
        match &self.tracestate {
            Some(state) => request.header("tracestate", state.clone()),
            None => request,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_traces_off_nothing_is_read_or_made() {
        // Unit tests never install the pipeline.
        assert!(!enabled());
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        assert!(incoming(&headers, "/query").is_none());
        let run = RunSpan::start(Uuid::now_v7(), None);
        assert!(run.0.is_disabled());
        let call = ModelCall {
            provider: "gemini",
            model: "m",
            max_tokens: None,
            temperature: None,
        };
        let model = run.model(Role::Pro, Uuid::now_v7(), call);
        assert!(model.headers().is_none());
    }

    #[test]
    fn outgoing_headers_are_the_span_context_in_w3c_form() {
        let extracted = TraceContextPropagator::new().extract(&HeaderExtractor(&{
            let mut h = HeaderMap::new();
            h.insert(
                "traceparent",
                HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            );
            h.insert("tracestate", HeaderValue::from_static("vendor=x,other=y"));
            h
        }));
        let headers = TraceHeaders::of(&extracted).unwrap();
        assert_eq!(
            headers.traceparent,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(headers.tracestate.unwrap(), "vendor=x,other=y");
    }

    #[test]
    fn malformed_traceparents_give_no_parent() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            let mut h = HeaderMap::new();
            h.insert("traceparent", HeaderValue::from_str(bad).unwrap());
            let cx = TraceContextPropagator::new().extract(&HeaderExtractor(&h));
            assert!(TraceHeaders::of(&cx).is_none(), "{bad:?}");
        }
    }
}
