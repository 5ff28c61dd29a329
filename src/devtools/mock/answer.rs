//! One request to the mock: its family, model and directives fixed as a [`Plan`], the faults
//! that come before any answer, and the response (streamed or whole).

use std::{sync::Arc, time::Duration};

use super::{
    Directives, HOLD_MAX, MockConfig, answer_text, json_str,
    stream::MockBody,
    whole::{anthropic_whole, error_body, gemini_error, gemini_whole, openai_whole},
};
use axum::{
    body::{Body, Bytes},
    extract::{Path, RawQuery, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Family {
    Gemini,
    OpenAi,
    Anthropic,
}

/// Everything one answer needs, fixed when the request arrives.
pub(super) struct Plan {
    pub(super) family: Family,
    /// The model as a JSON string literal.
    pub(super) model: String,
    pub(super) input_tokens: usize,
    pub(super) tokens: usize,
    pub(super) ttft: Duration,
    pub(super) token_interval: Duration,
    pub(super) d: Directives,
}

impl Plan {
    pub(super) fn new(family: Family, model: &str, body: &[u8], config: &MockConfig) -> Plan {
        let d = Directives::parse(body);
        Plan {
            family,
            model: json_str(model),
            // About four bytes a token, as for English; the envelope counts too, which is
            // fine for a mock.
            input_tokens: body.len().div_ceil(4).max(1),
            tokens: d.tokens.unwrap_or(config.tokens).max(1),
            ttft: d.ttft_ms.map_or(config.ttft, Duration::from_millis),
            token_interval: d
                .token_ms
                .map_or(config.token_interval, Duration::from_millis),
            d,
        }
    }

    pub(super) fn output_text(&self) -> String {
        answer_text(self.tokens)
    }
}

pub(super) async fn gemini(
    State(config): State<Arc<MockConfig>>,
    Path(rest): Path<String>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let (model, action) = rest.rsplit_once(':').unwrap_or((&rest, ""));
    let plan = Plan::new(Family::Gemini, model, &body, &config);
    let sse = query
        .as_deref()
        .is_some_and(|q| q.split('&').any(|p| p == "alt=sse"));
    match action {
        "streamGenerateContent" if sse => respond(plan, true).await,
        "streamGenerateContent" | "generateContent" => {
            let array = action == "streamGenerateContent";
            if let Some(early) = before_answer(&plan).await {
                return early;
            }
            let mut out = gemini_whole(&plan);
            if array {
                out = format!("[{}]", out.trim_end());
            }
            json_response(StatusCode::OK, out)
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            gemini_error(404, "NOT_FOUND", "Method not found."),
        ),
    }
}

pub(super) async fn openai(State(config): State<Arc<MockConfig>>, body: Bytes) -> Response {
    let (model, stream) = model_and_stream(&body, "gpt-4.1-mini");
    respond(Plan::new(Family::OpenAi, &model, &body, &config), stream).await
}

pub(super) async fn anthropic(State(config): State<Arc<MockConfig>>, body: Bytes) -> Response {
    let (model, stream) = model_and_stream(&body, "claude-sonnet-4-5");
    respond(Plan::new(Family::Anthropic, &model, &body, &config), stream).await
}

fn model_and_stream(body: &[u8], default: &str) -> (String, bool) {
    #[derive(serde::Deserialize)]
    struct Head {
        model: Option<String>,
        #[serde(default)]
        stream: bool,
    }
    match serde_json::from_slice::<Head>(body) {
        Ok(h) => (h.model.unwrap_or_else(|| default.to_owned()), h.stream),
        Err(_) => (default.to_owned(), false),
    }
}

/// Hang and status faults, common to streamed and whole answers.
async fn before_answer(plan: &Plan) -> Option<Response> {
    if plan.d.hang {
        tokio::time::sleep(HOLD_MAX).await;
        return Some(StatusCode::GATEWAY_TIMEOUT.into_response());
    }
    let status = plan.d.status.and_then(|s| StatusCode::from_u16(s).ok())?;
    let mut response = json_response(status, error_body(plan.family, status.as_u16()));
    let retry_after = plan
        .d
        .retry_after
        .or((status == StatusCode::TOO_MANY_REQUESTS).then_some(1.0));
    if let Some(secs) = retry_after
        && let Ok(v) = HeaderValue::from_str(&secs.to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    if plan.family == Family::Anthropic && matches!(status.as_u16(), 429 | 500..=599) {
        response
            .headers_mut()
            .insert("x-should-retry", HeaderValue::from_static("true"));
    }
    Some(response)
}

async fn respond(plan: Plan, stream: bool) -> Response {
    if let Some(early) = before_answer(&plan).await {
        return early;
    }
    if !stream {
        tokio::time::sleep(
            plan.ttft + plan.token_interval * (plan.tokens.saturating_sub(1) as u32),
        )
        .await;
        let body = match plan.family {
            Family::Gemini => gemini_whole(&plan),
            Family::OpenAi => openai_whole(&plan),
            Family::Anthropic => anthropic_whole(&plan),
        };
        return json_response(StatusCode::OK, body);
    }
    let content_type = match plan.family {
        Family::Gemini => "text/event-stream",
        Family::OpenAi | Family::Anthropic => "text/event-stream; charset=utf-8",
    };
    let body = MockBody::new(plan);
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}
