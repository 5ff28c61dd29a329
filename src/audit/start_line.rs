//! A run's start as a line of the writer's journal: `{"started": {...}}`, beside the record
//! lines (one [`RunRecord`](super::RunRecord) each).
//!
//! Why: while writes fail, a start row cannot reach the database, and a run in flight is in
//! memory only. Killed then (`kill -9`, a lost machine), it would leave no trace at all: no
//! record, and no `running` row for the next start to finalize as `interrupted` (contract
//! §8). Journaled, its start is replayed as an `interrupted` row, unless a record of the run
//! is stored by then (see `replay`).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::StartedRun;
use crate::conversation::{Conversation, Message, RunParams};

#[derive(Serialize, Deserialize)]
struct Line {
    started: Started,
}

/// What a start row holds (`StartedRun`), in a form that reads back.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Started {
    run_id: Uuid,
    client_request_id: Option<String>,
    created_at: DateTime<Utc>,
    query: String,
    system: Option<String>,
    /// The conversation as sent, when the client sent `messages`.
    messages: Option<Vec<Message>>,
    params: Option<RunParams>,
    owner_fingerprint: Option<String>,
    instance_id: Option<String>,
    client_id: Option<String>,
}

/// The journal line of a run's start, newline included.
pub(super) fn to_line(run: &StartedRun) -> Vec<u8> {
    let line = Line {
        started: Started {
            run_id: run.run_id,
            client_request_id: run.client_request_id.clone(),
            created_at: run.created_at,
            query: run.query.to_string(),
            system: run.system.as_deref().map(str::to_owned),
            messages: run.conversation.as_ref().map(|c| {
                c.messages()
                    .map(|(role, content)| Message {
                        role,
                        content: content.to_owned(),
                    })
                    .collect()
            }),
            params: run.params.clone(),
            owner_fingerprint: run.owner_fingerprint.clone(),
            instance_id: run.instance_id.clone(),
            client_id: run.client_id.as_deref().map(str::to_owned),
        },
    };
    // Cannot fail: strings, numbers, a time and an id.
    let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// The start a journal line holds, or `None` when the line is something else.
pub(super) fn parse(line: &[u8]) -> Option<StartedRun> {
    let Line { started: s } = serde_json::from_slice(line).ok()?;
    Some(StartedRun {
        run_id: s.run_id,
        client_request_id: s.client_request_id,
        created_at: s.created_at,
        query: s.query.into(),
        system: s.system.map(Into::into),
        // Validated when the run started; read back without the size limit, which was
        // checked then and may have changed since.
        conversation: s
            .messages
            .and_then(|m| Conversation::new(m, usize::MAX).ok())
            .map(Arc::new),
        params: s.params,
        owner_fingerprint: s.owner_fingerprint,
        instance_id: s.instance_id,
        client_id: s.client_id.map(Into::into),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::Speaker;

    #[test]
    fn a_start_reads_back_as_it_was_written() {
        let conversation = Conversation::new(
            vec![
                Message {
                    role: Speaker::System,
                    content: "be brief".into(),
                },
                Message {
                    role: Speaker::User,
                    content: "why \u{0} blue?".into(),
                },
            ],
            1 << 20,
        )
        .unwrap();
        let run = StartedRun {
            run_id: Uuid::now_v7(),
            client_request_id: Some("req-1".into()),
            created_at: Utc::now(),
            query: "why \u{0} blue?".into(),
            system: Some("be brief".into()),
            conversation: Some(Arc::new(conversation)),
            params: None,
            owner_fingerprint: Some("ab".repeat(32)),
            instance_id: Some("host:8080".into()),
            client_id: Some("alice".into()),
        };
        let line = to_line(&run);
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1, "one line");
        let back = parse(&line[..line.len() - 1]).expect("a start line");
        assert_eq!(back.run_id, run.run_id);
        assert_eq!(back.created_at, run.created_at);
        assert_eq!(back.query, run.query);
        assert_eq!(back.system, run.system);
        assert_eq!(back.conversation, run.conversation);
        assert_eq!(back.owner_fingerprint, run.owner_fingerprint);
        assert_eq!(back.instance_id, run.instance_id);
        assert_eq!(back.client_id, run.client_id);
        assert_eq!(back.client_request_id, run.client_request_id);
    }

    #[test]
    fn a_record_line_is_not_a_start() {
        assert!(parse(br#"{"run_id":"0190e4d2-0000-7000-8000-000000000000"}"#).is_none());
        assert!(parse(b"{\"started\": 1}").is_none());
        assert!(parse(b"not json").is_none());
    }
}
