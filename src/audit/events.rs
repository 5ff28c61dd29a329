//! The events a run's client was sent, as the record keeps them: what each one was (its
//! `seq`, its name, its data as JSON), not how it was framed on the wire. A reconnect after
//! the run has left memory is answered from these (`resume::stored_frames_after`), framed
//! again as it was the first time.
//!
//! Records written before this kept the events as SSE text (`event:`/`id:`/`data:` lines);
//! [`from_sse_text`] reads that form, wherever an old record turns up: a `dual_runs.events`
//! column (which now holds a JSON array) or a dead-letter line (where `events` was a string).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, de};
use serde_json::value::RawValue;

/// One event as the record keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StoredEvent {
    /// Its number in the run's stream (`id: {run_id}:{seq}`).
    pub seq: u32,
    /// Its name (`start`, `flash`, `pro`, `error`, `done`).
    pub event: String,
    /// Its `data`, as sent. Absent for the answer events (`flash`, `pro`): their data is the
    /// model's trace, which the record holds already, and storing the texts twice would halve
    /// the writer's throughput.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub data: Option<Box<RawValue>>,
}

impl StoredEvent {
    /// About how many bytes it holds (see `RunRecord::approx_bytes`).
    pub fn approx_bytes(&self) -> usize {
        self.event.len() + self.data.as_ref().map_or(0, |d| d.get().len()) + 32
    }
}

impl PartialEq for StoredEvent {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq
            && self.event == other.event
            && self.data.as_ref().map(|d| d.get()) == other.data.as_ref().map(|d| d.get())
    }
}

/// The `dual_runs.events` column's text: a JSON array of [`StoredEvent`].
pub(super) fn to_column(events: &[StoredEvent]) -> String {
    // Cannot fail: numbers, strings and JSON that was valid when it was parsed.
    serde_json::to_string(events).unwrap_or_else(|_| "[]".to_owned())
}

/// Reads the `dual_runs.events` column: a JSON array, or the SSE text of older rows, or
/// nothing (rows written before events were kept).
pub(super) fn from_column(text: Option<&str>) -> Result<Vec<StoredEvent>, serde_json::Error> {
    match text.map(str::trim_start) {
        None | Some("") => Ok(Vec::new()),
        Some(json) if json.starts_with('[') => serde_json::from_str(json),
        Some(sse) => Ok(from_sse_text(sse)),
    }
}

/// Reads events kept as SSE text by releases before [`StoredEvent`]: frames separated by a
/// blank line, each with `event:`, `id: {run_id}:{seq}` and (except the answer events) one
/// `data:` line. A frame without a readable `id` is skipped, as replays always did; data that
/// is not JSON is dropped (the event is then sent with `{}`), which duet's own frames never
/// had.
fn from_sse_text(text: &str) -> Vec<StoredEvent> {
    text.split("\n\n")
        .filter_map(|frame| {
            let mut event = None;
            let mut seq = None;
            let mut data = None;
            for line in frame.lines() {
                if let Some(name) = line.strip_prefix("event: ") {
                    event = Some(name.to_owned());
                } else if let Some(id) = line.strip_prefix("id: ") {
                    seq = id.trim().rsplit_once(':').and_then(|(_, s)| s.parse().ok());
                } else if let Some(json) = line.strip_prefix("data: ") {
                    data = RawValue::from_string(json.to_owned()).ok();
                }
            }
            Some(StoredEvent {
                seq: seq?,
                event: event.unwrap_or_else(|| "message".to_owned()),
                data,
            })
        })
        .collect()
}

/// `RunRecord::events` from serde: the array of today, or the SSE text of records
/// dead-lettered by older releases.
pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<StoredEvent>, D::Error> {
    struct Events;

    impl<'de> de::Visitor<'de> for Events {
        type Value = Vec<StoredEvent>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of events, or events as SSE text")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            Ok(from_sse_text(text))
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut events = Vec::with_capacity(seq.size_hint().unwrap_or(6).min(64));
            while let Some(event) = seq.next_element()? {
                events.push(event);
            }
            Ok(events)
        }
    }

    // Not `#[serde(untagged)]`: it buffers the input, which `RawValue` cannot be read from.
    d.deserialize_any(Events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_sse_text_reads_as_events() {
        let id = "0192d5c4-0000-7000-8000-000000000000";
        let text = format!(
            "event: start\nid: {id}:0\ndata: {{\"run_id\":\"{id}\"}}\n\n\
             event: flash\nid: {id}:4\n\n\
             event: done\nid: {id}:9\ndata: {{\"status\":\"ok\"}}\n\n"
        );
        let events = from_sse_text(&text);
        let summary: Vec<_> = events
            .iter()
            .map(|e| (e.seq, e.event.as_str(), e.data.as_ref().map(|d| d.get())))
            .collect();
        let start = format!("{{\"run_id\":\"{id}\"}}");
        assert_eq!(
            summary,
            [
                (0, "start", Some(start.as_str())),
                (4, "flash", None),
                (9, "done", Some("{\"status\":\"ok\"}")),
            ]
        );
        assert_eq!(from_column(Some(&text)).unwrap(), events);
        // The column's new form round-trips, the data byte for byte.
        assert_eq!(from_column(Some(&to_column(&events))).unwrap(), events);
        assert!(from_column(None).unwrap().is_empty());
        assert!(from_column(Some("")).unwrap().is_empty());
    }
}
