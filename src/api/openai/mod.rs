//! The OpenAI-compatible endpoints (contract §7): `POST /v1/chat/completions` and
//! `GET /v1/models`, so that OpenAI's SDKs and chat UIs can use duet unchanged.
//!
//! Every call is a whole duet run, started, guarded (API keys, rate limits, capacity) and
//! audited exactly as on `/query*`; only the shapes differ. The answer is Pro's, or Flash's
//! when Pro failed (`X-Duet-Answer: pro|flash`), and an error in OpenAI's shape only when
//! neither model answered. What belongs here: the handlers and the routes; `request` reads
//! OpenAI's request into duet's conversation and parameters, `response` holds the answer
//! shapes, `stream` turns a run's events into chunks (and decides which model answers),
//! `error` holds OpenAI's error shape. Users' documentation: docs/openai.md.

mod error;
mod request;
mod response;
mod stream;

use std::sync::OnceLock;

use axum::{
    Extension, Json,
    body::Body,
    extract::{Path, State, rejection::PathRejection},
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};

use self::{
    error::OpenAiError,
    request::{ChatRequest, MODEL},
    response::{AssistantMessage, ChatCompletion, Choice, CompletionUsage, Model, ModelList},
    stream::{ChunkHead, ChunkStream, Decision, Failure},
};
use super::{
    AppState, AuthenticatedClient,
    error::Context,
    query::{caller_key, insert_ids, start_run},
    request::{QueryParams, client_request_id},
};
use crate::audit::{Outcome, RunRecord, RunStatus};

pub(super) use self::error::{
    OpenAiBadRequest, OpenAiInternal, OpenAiNotFound, OpenAiRateLimited, OpenAiTooLarge,
    OpenAiUnauthorized, OpenAiUnsupportedMediaType, openai_errors as errors,
};
pub(super) use self::response::{Chunk, describe_stream};

/// Which model's answer a response carries.
pub(super) const X_DUET_ANSWER: &str = "x-duet-answer";

/// Answer a conversation in OpenAI's Chat Completions shape.
///
/// A whole duet run: both models, audited, `X-Run-Id`. The answer is Pro's, or Flash's when
/// Pro failed (`X-Duet-Answer`). With `stream: true`, `chat.completion.chunk` events and
/// `data: [DONE]`; the headers wait until the answering model is known (Pro's first token, or
/// Pro's failure and Flash's answer). docs/openai.md has the details.
#[utoipa::path(
    post, path = "/v1/chat/completions", tag = "openai", operation_id = "chat_completions",
    request_body(content = request::RequestBody, content_type = "application/json"),
    params(super::openapi::QueryHeaders),
    security((), ("api_key" = [])),
    responses(
        (status = 200, description = "The answer: one `chat.completion` document, or with \
            `stream: true` a stream of `data:` lines, each a `chat.completion.chunk` (or, when \
            Pro fails mid-answer, an error object), ending with `data: [DONE]`",
            content(
                (response::ChatCompletion = "application/json"),
                (String = "text/event-stream"),
            ),
            headers(
                ("X-Run-Id" = uuid::Uuid, description = "The run's id (a UUIDv7)"),
                ("X-Duet-Answer" = String, description = "`pro` or `flash`: whose answer this is"),
                ("X-Request-Id" = String, description = "The caller's X-Request-Id, when it sent one"),
            )),
        (status = 400, response = OpenAiBadRequest),
        (status = 401, response = OpenAiUnauthorized),
        (status = 404, response = OpenAiNotFound),
        (status = 413, response = OpenAiTooLarge),
        (status = 415, response = OpenAiUnsupportedMediaType),
        (status = 429, response = OpenAiRateLimited),
        (status = 500, response = OpenAiInternal),
        (status = 502, description = "Neither model answered (`code`: Pro's error type)", body = error::Body),
        (status = 503, description = "At capacity (`Retry-After`), or the service shut down \
            during the run", body = error::Body),
        (status = 504, description = "Neither model answered within its deadline", body = error::Body),
    ),
)]
pub(super) async fn chat_completions(
    State(state): State<AppState>,
    key: Option<Extension<AuthenticatedClient>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, OpenAiError> {
    let caller = caller_key(&state, key)?;
    let chat = request::parse(&headers, body, state.config.max_query_bytes).await?;
    let client_request_id = client_request_id(&headers)?;
    let ChatRequest {
        conversation,
        params,
        stream,
        include_usage,
    } = chat;
    let query = QueryParams {
        conversation,
        params,
        // Deltas only when streaming: a whole answer needs none.
        deltas: stream,
    };
    let trace = crate::telemetry::spans::incoming(&headers, "/v1/chat/completions");
    let mut handle = start_run(
        &state,
        query,
        client_request_id.clone(),
        caller.as_ref(),
        trace,
    )
    .await?;
    let id = format!("chatcmpl-{}", handle.run_id.simple());
    let created = chrono::Utc::now().timestamp();
    let with_ids = |mut response: Response, answer: Option<&'static str>| {
        let h = response.headers_mut();
        insert_ids(h, handle.run_id, client_request_id.as_deref());
        if let Some(answer) = answer {
            h.insert(X_DUET_ANSWER, HeaderValue::from_static(answer));
        }
        response
    };
    if !stream {
        // As `POST /query`: keep draining so the run never waits on a full channel; the
        // record comes after the last event. A client gone drops this, and the run cancels.
        // The failures are taken from the run's `error` events, whose messages are those
        // written for clients; the record's carry the audit's detail (upstream URLs, provider
        // bodies), which is not the caller's to read.
        let mut failures = Failures::default();
        while let Some(frame) = handle.events.recv().await {
            if let stream::RunEvent::Error { model, failure } = stream::read(&frame) {
                match model {
                    Some(true) => failures.pro = Some(failure),
                    Some(false) => failures.flash = Some(failure),
                    None => failures.run = Some(failure),
                }
            }
        }
        let record = handle
            .record
            .await
            .context(|| "the run ended without a record".into())?;
        return Ok(match completion(&record, failures, &id, created) {
            Ok((answer, completion)) => with_ids(Json(completion).into_response(), Some(answer)),
            Err(e) => with_ids(e.into_response(), None),
        });
    }
    let decision = match stream::decide(&mut handle.events).await {
        Ok(decision) => decision,
        Err(e) => return Ok(with_ids(e.into_response(), None)),
    };
    let answer = match decision {
        Decision::Flash(_) => "flash",
        Decision::ProStarted(_) | Decision::ProWhole(_) => "pro",
    };
    let head = ChunkHead {
        id: id.clone(),
        created,
        include_usage,
    };
    let chunks = ChunkStream::new(head, decision, handle.events, state.config.sse_keepalive);
    let mut response = Response::new(Body::from_stream(chunks));
    super::query::event_stream_headers(response.headers_mut());
    Ok(with_ids(response, Some(answer)))
}

/// The failures a run's `error` events reported, by whom.
#[derive(Default)]
struct Failures {
    pro: Option<Failure>,
    flash: Option<Failure>,
    run: Option<Failure>,
}

/// The whole answer of a run that has ended: Pro's, else Flash's, else the error.
fn completion<'a>(
    record: &'a RunRecord,
    failures: Failures,
    id: &'a str,
    created: i64,
) -> Result<(&'static str, ChatCompletion<'a>), OpenAiError> {
    // A shutdown that cancelled Pro after Flash answered is Pro failing: Flash's answer.
    let (answer, trace) = match (record.status, record.pro.outcome, record.flash.outcome) {
        (_, Outcome::Ok, _) => ("pro", &record.pro),
        (_, _, Outcome::Ok) => ("flash", &record.flash),
        (RunStatus::Cancelled, ..) => {
            return Err(OpenAiError::RunFailed {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "cancelled".into(),
                message: "the run was cancelled before an answer: the service is shutting down"
                    .into(),
            });
        }
        _ => {
            return Err(stream::failure(failures.pro, failures.flash, failures.run));
        }
    };
    Ok((
        answer,
        ChatCompletion {
            id,
            object: "chat.completion",
            created,
            model: MODEL,
            choices: [Choice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: &trace.text,
                    refusal: None,
                },
                finish_reason: response::finish_reason(trace.finish_reason.as_deref()),
                logprobs: None,
            }],
            usage: CompletionUsage::of(trace.input_tokens, trace.output_tokens),
            system_fingerprint: None,
        },
    ))
}

/// When `duet` was first listed by this process (OpenAI's `created`, Unix seconds).
fn model() -> Model {
    static CREATED: OnceLock<i64> = OnceLock::new();
    Model {
        id: MODEL,
        object: "model",
        created: *CREATED.get_or_init(|| chrono::Utc::now().timestamp()),
        owned_by: "duet",
    }
}

/// List the models: `duet`, the only one.
#[utoipa::path(
    get, path = "/v1/models", tag = "openai", operation_id = "list_models",
    security((), ("api_key" = [])),
    responses(
        (status = 200, description = "The models this service serves: `duet`", body = ModelList),
        (status = 401, response = OpenAiUnauthorized),
        (status = 429, response = OpenAiRateLimited),
    ),
)]
pub(super) async fn list_models() -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: [model()],
    })
}

/// One model: `duet`; any other is 404.
#[utoipa::path(
    get, path = "/v1/models/{model}", tag = "openai", operation_id = "get_model",
    params(("model" = String, Path, description = "The model's id: `duet`")),
    security((), ("api_key" = [])),
    responses(
        (status = 200, description = "The model", body = Model),
        (status = 401, response = OpenAiUnauthorized),
        (status = 404, response = OpenAiNotFound),
        (status = 429, response = OpenAiRateLimited),
    ),
)]
pub(super) async fn get_model(
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Model>, OpenAiError> {
    // axum's own rejection (a name that is not UTF-8) is plain text, not OpenAI's shape.
    let Ok(Path(name)) = name else {
        return Err(OpenAiError::invalid(
            "model",
            "the model's name in the path must be UTF-8",
        ));
    };
    if name != MODEL {
        return Err(OpenAiError::ModelNotFound(name.chars().take(64).collect()));
    }
    Ok(Json(model()))
}
