//! `AUDIT_STORE_TEXT=none` (contract §10): taking a run's texts out of what the audit trail
//! keeps, before the record or start row is queued.
//!
//! Stripping happens at the sink's door ([`super::AuditWriter`]'s `submit` and `started`),
//! not in the SQL: the queue feeds the database, the journal and the dead-letter file alike,
//! so a text stripped there reaches none of them. The run itself (its live stream and the
//! in-memory copy that answers resumes while it is fresh) keeps its texts: memory is not a
//! durable place.
//!
//! Each text is replaced, in the same field, by [`redact`]'s placeholder holding its length
//! and SHA-256, so the columns keep their types (no migration) and an operator can still tell
//! two runs with the same query apart from two with different ones. What is stripped: the
//! query, the system prompt, every `content` of the conversation `messages` (contract §7; their
//! roles stay), both answers, both error messages (they may quote an upstream body), and the
//! `message` inside stored `error` events, and the `stop` strings of the generation `params`
//! (a client's text too; the other parameters are numbers and words of duet's and stay). A
//! future field holding user or model text must be added here.
//!
//! The hash is unsalted, as the contract asks: a short, guessable query can be found again by
//! hashing candidates. Operators who need more than that should not rely on the hash.

use serde_json::{Value, value::RawValue};
use sha2::{Digest, Sha256};

use super::{ModelTrace, RunRecord, StartedRun, StoredEvent};
use crate::conversation::RunParams;

/// What every placeholder starts with, so readers (and tests) can tell one from a text.
pub const PLACEHOLDER_PREFIX: &str = "[not stored: ";

/// The placeholder kept instead of `text`: `[not stored: N bytes, sha256 HEX]`.
pub fn redact(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    format!(
        "{PLACEHOLDER_PREFIX}{} bytes, sha256 {digest:x}]",
        text.len()
    )
}

/// Whether `text` is exactly a placeholder [`redact`] wrote: `[not stored: N bytes, sha256
/// HEX]` with 64 lower-case hex digits. A text that only starts like one (a user's query, or
/// an answer a prompt steered) is stripped like any other.
fn is_placeholder(text: &str) -> bool {
    let Some(rest) = text.strip_prefix(PLACEHOLDER_PREFIX) else {
        return false;
    };
    let Some((len, rest)) = rest.split_once(" bytes, sha256 ") else {
        return false;
    };
    let Some(hex) = rest.strip_suffix(']') else {
        return false;
    };
    !len.is_empty()
        && len.bytes().all(|b| b.is_ascii_digit())
        && hex.len() == 64
        && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn redact_in_place(text: &mut String) {
    // Idempotent: a record replayed from a file written under `none` is already stripped.
    if !is_placeholder(text) {
        *text = redact(text);
    }
}

fn redact_trace(trace: &mut ModelTrace) {
    redact_in_place(&mut trace.text);
    if let Some(message) = &mut trace.error_message {
        redact_in_place(message);
    }
}

/// An `error` event's `message`, stripped; other events carry no user or model text (the
/// answer events are stored without data, see `audit::events`).
fn redact_event(event: &mut StoredEvent) {
    if event.event != "error" {
        return;
    }
    let Some(data) = &event.data else { return };
    let Ok(mut value) = serde_json::from_str::<Value>(data.get()) else {
        // Not JSON (an old record's unreadable data): keep nothing rather than the text.
        event.data = None;
        return;
    };
    if let Some(Value::String(message)) = value.get_mut("message") {
        redact_in_place(message);
    }
    event.data = serde_json::to_string(&value)
        .ok()
        .and_then(|json| RawValue::from_string(json).ok());
}

/// The `stop` strings of the parameters, the one text they may hold.
fn redact_params(params: &mut Option<RunParams>) {
    for stop in params.iter_mut().flat_map(|p| p.sampling.stop.iter_mut()) {
        redact_in_place(stop);
    }
}

/// Takes every text out of a record (see the module's doc).
pub fn strip_record(record: &mut RunRecord) {
    redact_in_place(&mut record.query);
    if let Some(system) = &mut record.system {
        redact_in_place(system);
    }
    for message in record.messages.iter_mut().flatten() {
        redact_in_place(&mut message.content);
    }
    redact_trace(&mut record.flash);
    redact_trace(&mut record.pro);
    redact_params(&mut record.params);
    record.events.iter_mut().for_each(redact_event);
}

/// Takes the query, system prompt and conversation out of a start row.
pub fn strip_started(run: &mut StartedRun) {
    if !is_placeholder(&run.query) {
        run.query = redact(&run.query).into();
    }
    if let Some(system) = &run.system
        && !is_placeholder(system)
    {
        run.system = Some(redact(system).into());
    }
    if let Some(conversation) = &run.conversation {
        run.conversation = Some(std::sync::Arc::new(conversation.map_contents(|c| {
            let mut text = c.to_owned();
            redact_in_place(&mut text);
            text
        })));
    }
    redact_params(&mut run.params);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_holds_length_and_sha256_and_is_idempotent() {
        assert_eq!(
            redact("abc"),
            "[not stored: 3 bytes, sha256 \
             ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad]"
        );
        let mut once = "secret".to_owned();
        redact_in_place(&mut once);
        let mut twice = once.clone();
        redact_in_place(&mut twice);
        assert_eq!(once, twice);
    }

    #[test]
    fn a_text_that_only_looks_like_a_placeholder_is_stripped() {
        for looks_like in [
            "[not stored: my card is 4111 1111 1111 1111",
            "[not stored: 3 bytes, sha256 SECRET]",
            "[not stored: 3 bytes, sha256 ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad] SECRET",
        ] {
            let mut text = looks_like.to_owned();
            redact_in_place(&mut text);
            assert_eq!(text, redact(looks_like));
            assert!(is_placeholder(&text), "{text}");
        }
    }

    #[test]
    fn stop_strings_are_stripped_and_the_other_params_kept() {
        let mut params = Some(RunParams {
            both: crate::conversation::GenParams {
                max_tokens: Some(9),
                ..Default::default()
            },
            sampling: crate::conversation::Sampling {
                top_p: Some(0.5),
                stop: vec!["SECRET".into()],
                ..Default::default()
            },
            ..RunParams::default()
        });
        redact_params(&mut params);
        let params = params.unwrap();
        assert_eq!(params.sampling.stop, [redact("SECRET")]);
        assert_eq!(params.sampling.top_p, Some(0.5));
        assert_eq!(params.both.max_tokens, Some(9));
        let mut none = None;
        redact_params(&mut none);
        assert!(none.is_none());
    }

    #[test]
    fn error_event_message_is_stripped_and_the_rest_kept() {
        let mut e = StoredEvent {
            seq: 3,
            event: "error".into(),
            data: RawValue::from_string(
                r#"{"run_id":"x","model":"pro","error_type":"provider_error","retryable":false,"message":"upstream said SECRET"}"#
                    .into(),
            )
            .ok(),
        };
        redact_event(&mut e);
        let data = e
            .data
            .as_ref()
            .map(|d| d.get().to_owned())
            .unwrap_or_default();
        assert!(!data.contains("SECRET"), "{data}");
        assert!(data.contains("\"error_type\":\"provider_error\""), "{data}");
        assert!(data.contains(PLACEHOLDER_PREFIX), "{data}");
    }
}
