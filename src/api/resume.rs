//! `Last-Event-ID` reconnects to `/query/stream` (contract §4, §8): the events after `seq` of
//! the same run, never a new run: from this process's memory (the run is live or ended
//! recently here), from the audit record, or, for a run another replica is still running,
//! after waiting for its end (see `resume::remote`).
//!
//! What belongs here: choosing among those, the owner check, and the answers that are not a
//! stream (204, 404). The frames and the waiting are `resume`'s; the response is `query`'s.

use axum::{
    http::{HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};

use super::{
    ApiError, AppState,
    error::Context,
    query::{count_refusal, event_stream, insert_ids},
};
use crate::{
    audit::{OpenRun, OpenStatus, StoredRun},
    domain::Secret,
    resume::{
        Owner, follow, parse_last_event_id, remote, send_all, stored_frames_after, stored_last_seq,
    },
    run::{AtCapacity, CHANNEL_CAPACITY, NotStarted},
};

/// A reconnect: the events after `seq` of the same run, never a new run. 204 when the run
/// has ended and nothing is left, which tells an `EventSource` to stop reconnecting.
///
/// - Only the API key that started a run may resume it; for any other caller the run does
///   not exist: the very answer an unknown id gets (404), so ids cannot be probed.
/// - A resumed stream is a stream: it takes a place under `MAX_CONCURRENT_STREAMS` (503 with
///   `Retry-After` when there is none) and counts in `duet_streams_active` until it ends.
/// - A `seq` past the last event the run has sent names no event, so it is answered like an
///   id this service cannot find (404), whether the run is live or ended; nothing at or
///   before `seq` is ever sent again.
pub(super) async fn resume(
    state: &AppState,
    last_event_id: &HeaderValue,
    caller: Option<&Secret>,
) -> Result<Response, ApiError> {
    let (run_id, seq) = last_event_id
        .to_str()
        .ok()
        .and_then(parse_last_event_id)
        // Not an id this service issued, so not one it can find (contract §4: 404).
        .ok_or_else(cannot_resume)?;
    // Taken before the run is looked for: a refusal then says nothing about whether the run
    // exists, and a request that would be refused costs no database read.
    let slot = state
        .orchestrator
        .stream_slot()
        .inspect_err(|AtCapacity| count_refusal(state, NotStarted::AtCapacity))?;
    // Another key's run in memory is looked for in the store like an unknown one, where the
    // same check refuses it: the same answer, by the same path.
    let Some(log) = state
        .orchestrator
        .registry()
        .get(&run_id)
        .filter(|log| log.allows(run_id, caller))
    else {
        return resume_from_store(state, run_id, seq, caller, slot).await;
    };
    if seq > log.issued() {
        return Err(cannot_resume());
    }
    let (rest, ended) = log.frames_after(seq);
    if ended && rest.is_empty() {
        return Ok(nothing_left(run_id));
    }
    let events = follow(
        log,
        seq,
        CHANNEL_CAPACITY,
        state.config.client_write_timeout,
        state.orchestrator.tracker(),
        slot,
    );
    Ok(event_stream(state, events, None, run_id, None))
}

/// The one answer for every `Last-Event-ID` that cannot be resumed here: malformed, unknown,
/// another key's run, or past the run's end.
fn cannot_resume() -> ApiError {
    ApiError::NotFound("no run with that id can be resumed here".into())
}

/// 204: the run has ended and the client has all of it.
fn nothing_left(run_id: uuid::Uuid) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    insert_ids(response.headers_mut(), run_id, None);
    response
}

/// A run that has left this process's memory (or ran on another replica): replay its stored
/// events after `seq`. The deltas are not stored; the answer events carry the whole texts.
/// A run whose row is not final is [`resume_open`]'s.
async fn resume_from_store(
    state: &AppState,
    run_id: uuid::Uuid,
    seq: u32,
    caller: Option<&Secret>,
    slot: crate::run::StreamSlot,
) -> Result<Response, ApiError> {
    let store = state.store.as_ref().ok_or_else(cannot_resume)?;
    // The owner first, alone: another key's run is refused after the same one small read
    // as an unknown id, before its record is read, so the time of the 404 does not tell
    // whether the run exists.
    let owner = store
        .fetch_owner(run_id)
        .await
        .context(|| format!("reading the owner of run {run_id} to resume it"))?;
    let allowed = Owner::allows_stored(owner.as_ref().and_then(Option::as_deref), run_id, caller);
    if owner.is_none() || !allowed {
        return Err(cannot_resume());
    }
    let stored = store
        .fetch_stored(run_id)
        .await
        .context(|| format!("reading run {run_id} to resume it"))?
        .ok_or_else(cannot_resume)?;
    let record = match stored {
        StoredRun::Ended(ended) => ended.record,
        StoredRun::Open(open) => return resume_open(state, open, seq, caller, slot),
    };
    // Read again with the record: an owner that changed in between (it cannot, short of an
    // operator's UPDATE) is still refused.
    if !Owner::allows_stored(record.owner_fingerprint.as_deref(), run_id, caller) {
        return Err(cannot_resume());
    }
    // No events stored (a record from before they were kept), or `seq` past the last one.
    if stored_last_seq(&record).is_none_or(|last| seq > last) {
        return Err(cannot_resume());
    }
    let frames = stored_frames_after(&record, seq);
    if frames.is_empty() {
        return Ok(nothing_left(run_id));
    }
    let events = send_all(
        frames,
        state.config.client_write_timeout,
        state.orchestrator.tracker(),
        slot,
    );
    Ok(event_stream(state, events, None, run_id, None))
}

/// A run with a row but no record (contract §8): `interrupted` (its process died) ends the
/// stream with `error` and `done` saying so; `running` on PostgreSQL is another replica's
/// (or this one's, its record still queued), and the stream waits for its end. On SQLite
/// (one process: a running run is in memory) a `running` row not in memory is not
/// resumable, as before. The owner check applies as to a record.
fn resume_open(
    state: &AppState,
    open: OpenRun,
    seq: u32,
    caller: Option<&Secret>,
    slot: crate::run::StreamSlot,
) -> Result<Response, ApiError> {
    let run_id = open.run_id;
    if !Owner::allows_stored(open.owner_fingerprint.as_deref(), run_id, caller) {
        return Err(cannot_resume());
    }
    let tracker = state.orchestrator.tracker();
    let write_timeout = state.config.client_write_timeout;
    let events = match (open.status, state.run_ends.as_ref(), state.store.as_ref()) {
        (OpenStatus::Interrupted, ..) => send_all(
            remote::interrupted(run_id, seq),
            write_timeout,
            tracker,
            slot,
        ),
        // Registered before the wait's first read of the row (at once), so an end committed
        // after that read still wakes it.
        (OpenStatus::Running, Some(ends), Some(store)) => remote::wait_then_send(
            store.clone(),
            ends.wait_for(run_id),
            std::sync::Arc::clone(ends),
            run_id,
            seq,
            remote::Bounds {
                until: wait_until(state, open.created_at),
                write_timeout,
            },
            tracker,
            slot,
        ),
        (OpenStatus::Running, ..) => return Err(cannot_resume()),
    };
    Ok(event_stream(state, events, None, run_id, None))
}

/// Past this, the audit record of a run that ended (or the `interrupted` mark of one whose
/// replica died) has had time to be written: the batching, a retry or two.
const AUDIT_MARGIN: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a resume waits for another replica's run: until its longest model deadline has
/// passed (counted from the run's start), then until a dead owner would have been found out
/// (`INSTANCE_LEASE_S` plus a heartbeat), plus [`AUDIT_MARGIN`].
fn wait_until(state: &AppState, created_at: chrono::DateTime<chrono::Utc>) -> tokio::time::Instant {
    let config = &state.config;
    let lease = config.instance_lease;
    let bound = config
        .flash
        .timeout
        .max(config.pro.timeout)
        .saturating_add(lease)
        .saturating_add(crate::audit::instance::heartbeat_every(lease))
        .saturating_add(AUDIT_MARGIN);
    // The run's age by this replica's clock; a clock ahead of ours counts as a new run.
    let age = (chrono::Utc::now() - created_at)
        .to_std()
        .unwrap_or_default();
    tokio::time::Instant::now() + bound.saturating_sub(age)
}
