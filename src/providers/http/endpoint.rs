//! The part of a call that every adapter makes the same way: where it goes (the URL), what it
//! carries (the key and the fixed headers), which connection it takes (a lease on the
//! adapter's [`Upstream`]) and how it runs ([`call`]). An adapter adds its request body and
//! its [`Decoder`].

use std::sync::Arc;

use bytes::Bytes;
use reqwest::header::{self, HeaderName, HeaderValue};
use serde::Serialize;

use super::{BodyLimits, CallContext, Decoder, call};
use crate::{
    providers::{ErrorType, ProviderError, ProviderStream, pool::Upstream},
    telemetry::spans::TraceHeaders,
};

/// One adapter's upstream endpoint.
pub struct Endpoint {
    url: reqwest::Url,
    /// Sent in this order on every call, before `Accept` and `Content-Type`.
    headers: Arc<[(HeaderName, HeaderValue)]>,
    upstream: Upstream,
    ctx: CallContext,
}

impl Endpoint {
    /// `url` is the full URL of a call; `key` is kept only to be redacted from what the
    /// upstream echoes back (the adapter sends it with [`Endpoint::key_header`]).
    pub fn new(
        family: &'static str,
        upstream: Upstream,
        url: &str,
        key: &str,
        limits: BodyLimits,
    ) -> Result<Self, String> {
        let url = reqwest::Url::parse(url)
            .map_err(|e| format!("base URL does not make a valid URL: {e}"))?;
        let target = Arc::from(super::redact::target_of(&url, false));
        Ok(Endpoint {
            url,
            headers: Arc::from([]),
            upstream,
            ctx: CallContext {
                family,
                secret: Arc::from(key),
                target,
                limits,
            },
        })
    }

    /// Adds the header that carries the key, marked sensitive so that no debug output shows
    /// it.
    pub fn key_header(self, name: HeaderName, value: &str) -> Result<Self, String> {
        let mut value = HeaderValue::from_str(value)
            .map_err(|_| "the API key has characters a header cannot carry".to_owned())?;
        value.set_sensitive(true);
        Ok(self.push(name, value))
    }

    /// Adds a fixed header every call sends (an API version).
    pub fn header(self, name: HeaderName, value: &'static str) -> Self {
        self.push(name, HeaderValue::from_static(value))
    }

    fn push(mut self, name: HeaderName, value: HeaderValue) -> Self {
        let mut headers = self.headers.to_vec();
        headers.push((name, value));
        self.headers = Arc::from(headers);
        self
    }

    /// The family name: `gemini`, `openai` or `anthropic`.
    pub fn family(&self) -> &'static str {
        self.ctx.family
    }

    /// Starts one streaming call with `body` as its JSON request, carrying the model span's
    /// `traceparent` when traces are on. Does not block: the body is encoded here,
    /// everything else happens when the stream is polled.
    pub fn call<D: Decoder>(
        &self,
        body: &impl Serialize,
        trace: Option<&TraceHeaders>,
        decoder: D,
    ) -> ProviderStream {
        let body = match serde_json::to_vec(body) {
            Ok(body) => Bytes::from(body),
            // The adapters' bodies are plain structs of strings and numbers, which always
            // encode; this keeps the impossible case an error rather than a panic.
            Err(e) => {
                let error = ProviderError::new(
                    ErrorType::Internal,
                    false,
                    format!("could not encode the {} request", self.ctx.family),
                )
                .with_detail(format!("{} request body: {e}", self.ctx.family));
                return Box::pin(futures::stream::once(std::future::ready(Err(error))));
            }
        };
        let url = self.url.clone();
        let headers = Arc::clone(&self.headers);
        let trace = trace.cloned();
        let build: call::Build = Box::new(move |client: &reqwest::Client| {
            let mut request = client.post(url);
            for (name, value) in headers.iter() {
                request = request.header(name, value.clone());
            }
            if let Some(trace) = &trace {
                request = trace.apply(request);
            }
            // As `RequestBuilder::json` would: the body, and its content type.
            request
                .header(header::ACCEPT, "text/event-stream")
                .header(header::CONTENT_TYPE, "application/json")
                .body(body)
        });
        call::call(self.ctx.clone(), self.upstream.clone(), build, decoder)
    }
}
