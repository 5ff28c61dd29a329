//! `GET /runs`: the audit trail, listed and filtered (contract §12). JSON pages with an
//! opaque keyset cursor, or every matching run as JSON lines with
//! `Accept: application/x-ndjson`, streamed from the database.

use axum::{
    Json,
    body::{Body, Bytes},
    extract::{RawQuery, State},
    http::{Extensions, HeaderMap, header},
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{
    ApiError, AppState,
    admin::{admin_auth, admin_off},
    error::Context,
};
use crate::audit::list::{Cursor, RunFilter, RunSummary, STATUSES};

/// Page size when `limit` is not given, and the most a page holds.
const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 500;

/// The query parameters as sent; every one is checked in [`parse`], which names the bad one.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Params {
    status: Option<String>,
    since: Option<String>,
    until: Option<String>,
    model_name: Option<String>,
    client_id: Option<String>,
    q: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// A page of runs.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct RunPage {
    /// Newest first.
    runs: Vec<RunSummary>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest(message.into())
}

fn time(name: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            bad(format!(
                "{name} must be an RFC 3339 time, e.g. 2026-01-31T00:00:00Z"
            ))
        })
}

fn non_empty(name: &str, value: Option<String>) -> Result<Option<String>, ApiError> {
    match value {
        Some(v) if v.is_empty() => Err(bad(format!("{name} must not be empty"))),
        // PostgreSQL text cannot hold NUL, so no stored value has one.
        Some(v) if v.contains('\0') => Err(bad(format!("{name} must not contain NUL"))),
        v => Ok(v),
    }
}

fn parse(raw: Option<&str>) -> Result<(RunFilter, u32), ApiError> {
    let params: Params = serde_urlencoded::from_str(raw.unwrap_or_default()).map_err(|e| {
        // serde says "unknown field `x`, expected one of ...": the list is said once below,
        // and to a caller of a URL these are parameters.
        let e = e.to_string();
        let what = e.split(", expected").next().unwrap_or(&e);
        bad(format!(
            "{}; the parameters are status, since, until, model_name, client_id, q, limit, cursor",
            what.replace("field", "parameter")
        ))
    })?;
    let status = match params.status {
        Some(s) if !STATUSES.contains(&s.as_str()) => {
            return Err(bad(format!(
                "status must be one of {}",
                STATUSES.join(", ")
            )));
        }
        s => s,
    };
    let since = params
        .since
        .as_deref()
        .map(|v| time("since", v))
        .transpose()?;
    let until = params
        .until
        .as_deref()
        .map(|v| time("until", v))
        .transpose()?;
    if let (Some(s), Some(u)) = (since, until)
        && s > u
    {
        return Err(bad("since must not be after until"));
    }
    let limit = match params.limit {
        None => DEFAULT_LIMIT,
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| bad(format!("limit must be an integer from 1 to {MAX_LIMIT}")))?,
    };
    let after = params
        .cursor
        .as_deref()
        .map(|c| Cursor::decode(c).ok_or_else(|| bad("cursor is not one this service returned")))
        .transpose()?;
    let filter = RunFilter {
        status,
        since,
        until,
        model_name: non_empty("model_name", params.model_name)?,
        client_id: non_empty("client_id", params.client_id)?,
        q: non_empty("q", params.q)?,
        after,
    };
    Ok((filter, limit))
}

fn wants_ndjson(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().starts_with("application/x-ndjson"))
        })
}

/// `GET /runs`: runs newest first, filtered.
#[utoipa::path(
    get, path = "/runs", tag = "admin", operation_id = "list_runs",
    summary = "List and filter runs",
    description = "Runs newest first, in pages of `limit` (default 50, at most 500); pass \
        `next_cursor` as `cursor` for the next page. Pages never repeat or skip a run while \
        new runs arrive. Running runs are listed (status `running`, `flash` and `pro` null). \
        With `Accept: application/x-ndjson`, every matching run is sent as one JSON line, \
        without pages (`cursor` still sets where it starts; `limit` is checked, not applied). Without ADMIN_TOKEN configured this \
        answers 404 saying the admin API is off.",
    params(
        ("status" = Option<String>, Query, description = "ok, partial, failed, cancelled, running or interrupted",
            pattern = "^(ok|partial|failed|cancelled|running|interrupted)$"),
        ("since" = Option<String>, Query, format = DateTime, description = "Runs created at or after this RFC 3339 time"),
        ("until" = Option<String>, Query, format = DateTime, description = "Runs created before this RFC 3339 time"),
        ("model_name" = Option<String>, Query, description = "Either model's name, exactly", min_length = 1),
        ("client_id" = Option<String>, Query, description = "The named key that started the run", min_length = 1),
        ("q" = Option<String>, Query, description = "A case-sensitive substring of the stored query", min_length = 1),
        ("limit" = Option<u32>, Query, description = "Runs per page", minimum = 1, maximum = 500),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "A page of runs, or with Accept: application/x-ndjson \
            every matching run, one RunSummary per line",
            content(
                (RunPage = "application/json"),
                (RunSummary = "application/x-ndjson"),
            )),
        (status = 400, response = super::openapi::BadRequest),
        (status = 401, response = super::openapi::Unauthorized),
        (status = 404, response = super::openapi::NotFound),
        (status = 429, response = super::openapi::RateLimited),
        (status = 500, response = super::openapi::Internal),
    ),
)]
pub(super) async fn list(
    State(state): State<AppState>,
    extensions: Extensions,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let Some(token) = &state.config.admin_token else {
        return Err(admin_off());
    };
    admin_auth(&state, &extensions, &headers, token)?;
    let (filter, limit) = parse(raw.as_deref())?;
    let ndjson = wants_ndjson(&headers);
    let Some(store) = &state.store else {
        // Records kept in memory only: nothing is stored to list.
        if ndjson {
            return Ok(ndjson_response(Body::empty()));
        }
        return Ok(Json(RunPage {
            runs: Vec::new(),
            next_cursor: None,
        })
        .into_response());
    };
    if ndjson {
        let lines = store.stream_runs(&filter).map(|item| match item {
            Ok(run) => {
                let mut line = serde_json::to_vec(&run).map_err(std::io::Error::other)?;
                line.push(b'\n');
                Ok(Bytes::from(line))
            }
            Err(e) => {
                // Headers are sent: all that is left is to cut the body short.
                warn!(error = %e, "listing runs failed mid-stream");
                Err(std::io::Error::other("listing runs failed"))
            }
        });
        return Ok(ndjson_response(Body::from_stream(lines)));
    }
    let runs = store
        .list_runs(&filter, limit)
        .await
        .context(|| "listing runs".into())?;
    let next_cursor = (runs.len() == limit as usize)
        .then(|| runs.last())
        .flatten()
        .map(|last| {
            Cursor {
                created_at: last.created_at,
                run_id: last.run_id,
            }
            .encode()
        });
    Ok(Json(RunPage { runs, next_cursor }).into_response())
}

fn ndjson_response(body: Body) -> Response {
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_bad_filter() {
        for (query, word) in [
            ("status=done", "status"),
            ("since=yesterday", "since"),
            ("until=2026-13-01T00:00:00Z", "until"),
            ("limit=0", "limit"),
            ("limit=501", "limit"),
            ("cursor=xyz", "cursor"),
            ("q=", "q"),
            ("colour=red", "colour"),
        ] {
            let Err(ApiError::BadRequest(message)) = parse(Some(query)) else {
                panic!("{query} was accepted");
            };
            assert!(message.contains(word), "{query}: {message}");
        }
    }

    #[test]
    fn cursor_round_trips() {
        let c = Cursor {
            created_at: DateTime::parse_from_rfc3339("2026-01-31T12:34:56.123456Z")
                .unwrap()
                .with_timezone(&Utc),
            run_id: uuid::Uuid::now_v7(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        let (filter, limit) = parse(Some(&format!("cursor={}&limit=7", c.encode()))).unwrap();
        assert_eq!((filter.after, limit), (Some(c), 7));
    }
}
