//! Server-Sent Events on the wire: event encoding and the response body with keep-alives.
//!
//! Events are encoded once, by the run that produces them, into one `Bytes` each: the same
//! bytes go to the live client and into the replay buffer, and the response body only moves
//! them. Data is always one line of JSON (serde escapes CR and LF), so no text from a user or
//! a model can end an event early or forge another one.

use std::{
    convert::Infallible,
    io::Write,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::Stream;
use prometheus::Histogram;
use serde::Serialize;
use tokio::{
    sync::mpsc,
    time::{Instant, Sleep},
};

use crate::{domain::Role, events::EventKind, run::Quiet};

/// The comment sent after a period of silence, so proxies keep the connection open.
pub const KEEPALIVE: &[u8] = b": keep-alive\n\n";

/// Encodes one event: `event:`, `id: {run_id}:{seq}`, one `data:` line of JSON, blank line.
pub fn encode(event: EventKind, run_id: &str, seq: u32, data: &impl Serialize) -> Bytes {
    let mut buf = BytesMut::with_capacity(128).writer();
    // Writing to a BytesMut cannot fail, and our data types serialize without error (plain
    // structs of strings and numbers); a failure would be a bug, which we still turn into a
    // valid, empty JSON object rather than a broken stream.
    let _ = write!(buf, "event: {}\nid: {run_id}:{seq}\ndata: ", event.as_str());
    if serde_json::to_writer(&mut buf, data).is_err() {
        let _ = buf.write_all(b"{}");
    }
    let _ = buf.write_all(b"\n\n");
    buf.into_inner().freeze()
}

/// The `data` of an event, encoded ahead of its frame: a run needs an event's size before it
/// may take the event's number (see `run::emitter::Emitter::emit`).
pub fn encode_data(data: &impl Serialize) -> Vec<u8> {
    // As in `encode`: a failure would be a bug; keep the stream valid anyway.
    serde_json::to_vec(data).unwrap_or_else(|_| b"{}".to_vec())
}

/// The frame [`encode`] would make, from data already encoded by [`encode_data`].
pub fn frame(event: EventKind, run_id: &str, seq: u32, json: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(frame_len(event, run_id, json.len()));
    buf.put_slice(b"event: ");
    buf.put_slice(event.as_str().as_bytes());
    buf.put_slice(b"\nid: ");
    buf.put_slice(run_id.as_bytes());
    buf.put_slice(format!(":{seq}\ndata: ").as_bytes());
    buf.put_slice(json);
    buf.put_slice(b"\n\n");
    buf.freeze()
}

/// An event's frame in the making, in one buffer: the data is encoded first (its size
/// decides the event's share of the run's byte budget, see `run::emitter`), then the header
/// is written in front of it once the event's number is known. The same bytes as [`encode`],
/// with one allocation instead of one for the data, one for the number and one for the frame.
pub struct Draft {
    /// Room for the longest header, the data, the blank line; the header goes at the end of
    /// its room and the unused front is skipped.
    buf: BytesMut,
    head: usize,
}

/// `event: ` + name + `\nid: ` + run id + `:` + seq + `\ndata: `, without the name, run id
/// and seq.
const HEAD_FIXED: usize = "event: \nid: :\ndata: ".len();
/// The digits of the longest `seq`.
const SEQ_DIGITS: usize = 10;

impl Draft {
    /// Encodes `data` for an event `event` of run `run_id`; `hint` is about how long the
    /// data will be, to size the buffer once.
    pub fn new(event: EventKind, run_id: &str, data: &impl Serialize, hint: usize) -> Draft {
        let head = HEAD_FIXED + event.as_str().len() + run_id.len() + SEQ_DIGITS;
        let mut buf = BytesMut::with_capacity(head + hint + 2);
        buf.resize(head, 0);
        let mut w = buf.writer();
        // As in `encode`: a failure would be a bug; keep the stream valid anyway.
        if serde_json::to_writer(&mut w, data).is_err() {
            let mut buf = w.into_inner();
            buf.truncate(head);
            buf.put_slice(b"{}");
            w = buf.writer();
        }
        let mut buf = w.into_inner();
        buf.put_slice(b"\n\n");
        Draft { buf, head }
    }

    /// A `delta` event's draft: the same bytes as [`Draft::new`] of a
    /// `crate::events::DeltaEvent`, written directly. The general path goes through serde's
    /// writer a few bytes per call; a delta is most of a run's events, and all of its data
    /// but the text is the same for every delta of a run's model, so it is encoded once
    /// ([`DeltaPrefix`]) and copied.
    pub fn delta(prefix: &DeltaPrefix, text: &str) -> Draft {
        let head = prefix.head;
        // Room for a few escapes; a text full of them grows the buffer once or twice.
        let mut buf = BytesMut::with_capacity(head + prefix.json.len() + text.len() * 9 / 8 + 5);
        buf.resize(head, 0);
        buf.put_slice(&prefix.json);
        put_json_str(&mut buf, text);
        buf.put_slice(b"}\n\n");
        Draft { buf, head }
    }

    /// The frame's size at most (its `seq` at its longest): [`frame_len`] of its data.
    pub fn max_len(&self) -> usize {
        self.buf.len()
    }

    /// The length of the encoded data.
    pub fn data_len(&self) -> usize {
        self.buf.len() - self.head - 2
    }

    /// The frame, numbered `seq`.
    pub fn finish(mut self, event: EventKind, run_id: &str, seq: u32) -> BytesMut {
        let mut digits = [0u8; SEQ_DIGITS];
        let mut n = seq;
        let mut at = SEQ_DIGITS;
        loop {
            at -= 1;
            // n % 10 < 10: the cast keeps it.
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let digits = &digits[at..];
        let parts: [&[u8]; 7] = [
            b"event: ",
            event.as_str().as_bytes(),
            b"\nid: ",
            run_id.as_bytes(),
            b":",
            digits,
            b"\ndata: ",
        ];
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let start = self.head - len;
        let mut at = start;
        for part in parts {
            self.buf[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        self.buf.advance(start);
        self.buf
    }
}

/// The `data` of a run's model's deltas up to their text, `{"run_id":"…","model":"…","text":`,
/// and the room their frames keep for the header: made once per run and model, for
/// [`Draft::delta`].
pub struct DeltaPrefix {
    json: Vec<u8>,
    head: usize,
}

impl DeltaPrefix {
    pub fn new(run_id: &str, role: Role) -> DeltaPrefix {
        let mut json = BytesMut::with_capacity(48 + run_id.len());
        json.put_slice(b"{\"run_id\":");
        put_json_str(&mut json, run_id);
        json.put_slice(b",\"model\":\"");
        json.put_slice(role.as_str().as_bytes());
        json.put_slice(b"\",\"text\":");
        DeltaPrefix {
            json: json.to_vec(),
            head: HEAD_FIXED + EventKind::Delta.as_str().len() + run_id.len() + SEQ_DIGITS,
        }
    }
}

/// `s` as a JSON string, escaped exactly as `serde_json` escapes it: `"` and `\\`, the
/// control characters below U+0020 (short forms where JSON has them, else `\u00xx`), and
/// nothing else. Runs of plain bytes are copied whole.
fn put_json_str(buf: &mut BytesMut, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    buf.put_u8(b'"');
    let mut plain = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0C => b"\\f",
            0x00..=0x1F => b"",
            _ => continue,
        };
        buf.put_slice(&bytes[plain..i]);
        plain = i + 1;
        if short.is_empty() {
            buf.put_slice(b"\\u00");
            buf.put_u8(HEX[usize::from(b >> 4)]);
            buf.put_u8(HEX[usize::from(b & 0xF)]);
        } else {
            buf.put_slice(short);
        }
    }
    buf.put_slice(&bytes[plain..]);
    buf.put_u8(b'"');
}

/// The `data` of a [`frame`] whose data is `data_len` bytes long, without copying: it is
/// what comes before the blank line that ends the frame. Empty for anything shorter.
pub fn data_of(frame: &Bytes, data_len: usize) -> Bytes {
    let end = frame.len().saturating_sub(2);
    match end.checked_sub(data_len) {
        Some(start) => frame.slice(start..end),
        None => Bytes::new(),
    }
}

/// The size of a [`frame`] at most (its `seq` at its longest).
pub fn frame_len(event: EventKind, run_id: &str, json_len: usize) -> usize {
    const FIXED: usize = "event: \nid: :4294967295\ndata: \n\n".len();
    FIXED + event.as_str().len() + run_id.len() + json_len
}

/// The `retry:` field that tells a browser how long to wait before reconnecting.
pub fn retry_field(after: Duration) -> Bytes {
    let mut buf = BytesMut::with_capacity(16);
    buf.put_slice(format!("retry: {}\n\n", after.as_millis()).as_bytes());
    buf.freeze()
}

/// Measures `duet_overhead_seconds` for one run: the time from an upstream chunk reaching the
/// run (the provider's stream yielding it to the model driver) to the event it made leaving
/// the [`EventBody`] for hyper.
///
/// Why this shape: the frames travel as plain `Bytes` through the run's channel, which has no
/// room for a timestamp, and widening that channel's item would touch every reader of it. The
/// channel is first in, first out and the body yields frames in `seq` order, so the body's
/// count of frames *is* the `seq` of the frame it yields. The run stores (seq, arrival) of its
/// newest upstream-made event in one atomic word before sending it; the body, yielding frame
/// number n, reads the word and observes when its seq is n. Per event that is one relaxed
/// store and one relaxed load (the channel's send and receive order them), one clock read in
/// the driver (the body already reads the clock per frame), no allocation and no lock.
///
/// When several such events wait in the channel at once (a slow reader), only the newest is
/// measured: the histogram then samples, and undercounts waiting in the queue. That is
/// backpressure from the client, not duet's overhead, and `duet_streams_active` and the write
/// timeout already show it.
pub struct OverheadProbe {
    /// `seq` (low 24 bits) above the arrival time in nanoseconds since `base` (40 bits, about 18
    /// minutes, compared modulo 2^40 so a longer run still measures right); `EMPTY` before the
    /// first event.
    slot: AtomicU64,
    base: Instant,
    histogram: Histogram,
}

const ARRIVAL_BITS: u32 = 40;
const ARRIVAL_MASK: u64 = (1 << ARRIVAL_BITS) - 1;
const SEQ_MASK: u64 = (1 << 24) - 1;
const EMPTY: u64 = u64::MAX;

impl OverheadProbe {
    pub fn new(histogram: Histogram) -> Arc<OverheadProbe> {
        Arc::new(OverheadProbe {
            slot: AtomicU64::new(EMPTY),
            base: Instant::now(),
            histogram,
        })
    }

    fn nanos(&self, at: Instant) -> u64 {
        // Truncation is the point: only the low 40 bits are kept (see `slot`).
        at.saturating_duration_since(self.base).as_nanos() as u64 & ARRIVAL_MASK
    }

    /// The event numbered `seq`, about to be sent, was made from an upstream chunk that
    /// reached the run at `arrived`.
    pub fn sent(&self, seq: u32, arrived: Instant) {
        let word = ((u64::from(seq) & SEQ_MASK) << ARRIVAL_BITS) | self.nanos(arrived);
        self.slot.store(word, Ordering::Relaxed);
    }

    /// The body yields the frame numbered `seq` at `now`.
    fn yielded(&self, seq: u32, now: Instant) {
        let word = self.slot.load(Ordering::Relaxed);
        if word == EMPTY || word >> ARRIVAL_BITS != u64::from(seq) & SEQ_MASK {
            return;
        }
        let nanos = self.nanos(now).wrapping_sub(word & ARRIVAL_MASK) & ARRIVAL_MASK;
        // Nanoseconds to seconds; below 2^40 the conversion to f64 is exact.
        self.histogram.observe(nanos as f64 / 1e9);
    }
}

/// A response body fed by a run's bounded channel, sending [`KEEPALIVE`] whenever nothing has
/// gone out for `interval`. It ends when the run drops its sender (after `done`); dropping it
/// (the client went away) closes the channel, which the run notices and cancels itself.
pub struct EventBody {
    prefix: Option<Bytes>,
    rx: mpsc::Receiver<Bytes>,
    /// Polled only when it fires or is reset ([`Quiet`]), not after every frame.
    keepalive: Quiet<Pin<Box<Sleep>>>,
    interval: Duration,
    /// When the last frame went out. Kept instead of re-arming the timer on every frame: a
    /// timer-wheel update per delta costs more than a clock read, and the timer only needs
    /// to be right when it fires.
    last_sent: Instant,
    /// Measures `duet_overhead_seconds`, for a run's own stream (not a resumed one).
    overhead: Option<Arc<OverheadProbe>>,
    /// Frames taken from the channel so far: the `seq` of the next one, for `overhead`.
    received: u32,
}

impl EventBody {
    pub fn new(prefix: Option<Bytes>, rx: mpsc::Receiver<Bytes>, interval: Duration) -> Self {
        EventBody {
            prefix,
            rx,
            keepalive: Quiet::new(Box::pin(tokio::time::sleep(interval))),
            interval,
            last_sent: Instant::now(),
            overhead: None,
            received: 0,
        }
    }

    /// Measures the run's overhead as its frames leave (see [`OverheadProbe`]); only for a
    /// channel that carries the run's frames from `seq` 0 on.
    pub fn with_overhead(mut self, probe: Arc<OverheadProbe>) -> Self {
        self.overhead = Some(probe);
        self
    }
}

impl Stream for EventBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(prefix)));
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(frame)) => {
                this.last_sent = Instant::now();
                if let Some(probe) = &this.overhead {
                    probe.yielded(this.received, this.last_sent);
                }
                this.received = this.received.wrapping_add(1);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => loop {
                match Pin::new(&mut this.keepalive).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) => {
                        let due = this.last_sent + this.interval;
                        let now = Instant::now();
                        if now >= due {
                            this.last_sent = now;
                            this.keepalive.get_mut().as_mut().reset(now + this.interval);
                            return Poll::Ready(Some(Ok(Bytes::from_static(KEEPALIVE))));
                        }
                        // Frames went out since the timer was armed: wait out the rest of
                        // the silence (polling again registers the new deadline).
                        this.keepalive.get_mut().as_mut().reset(due);
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_one_escaped_line() {
        let data = serde_json::json!({"text": "a\n\nevent: done\ndata: {}\r\n"});
        let bytes = encode(EventKind::Flash, "r1", 3, &data);
        let text = std::str::from_utf8(&bytes).unwrap();
        assert_eq!(
            text,
            "event: flash\nid: r1:3\ndata: {\"text\":\"a\\n\\nevent: done\\ndata: {}\\r\\n\"}\n\n"
        );
        assert_eq!(text.matches('\n').count(), 4);
    }

    #[test]
    fn a_frame_from_encoded_data_is_the_same_bytes() {
        let data = serde_json::json!({"run_id": "r1", "text": "h\u{e9}\"llo\n"});
        for seq in [0, 7, u32::MAX] {
            let json = encode_data(&data);
            let framed = frame(EventKind::Delta, "r1", seq, &json);
            assert_eq!(framed, encode(EventKind::Delta, "r1", seq, &data));
            assert_eq!(data_of(&framed, json.len()), json);
            assert!(framed.len() <= frame_len(EventKind::Delta, "r1", json.len()));
        }
        assert_eq!(
            frame_len(EventKind::Delta, "r1", 3),
            frame(EventKind::Delta, "r1", u32::MAX, b"{ }").len()
        );
    }

    #[test]
    fn a_draft_is_the_same_bytes_as_encode() {
        let data = serde_json::json!({"run_id": "r1", "text": "h\u{e9}\"llo\n"});
        for seq in [0, 7, 10, 99, 12_345, u32::MAX] {
            for event in EventKind::ALL {
                let draft = Draft::new(event, "run-1", &data, 4);
                let max = draft.max_len();
                let data_len = draft.data_len();
                assert_eq!(max, frame_len(event, "run-1", data_len));
                let framed = draft.finish(event, "run-1", seq).freeze();
                assert_eq!(framed, encode(event, "run-1", seq, &data));
                assert_eq!(data_of(&framed, data_len), encode_data(&data));
                assert!(framed.len() <= max);
            }
        }
    }

    #[test]
    fn a_delta_draft_is_what_serde_makes_of_the_event() {
        let mut texts: Vec<String> = (0u8..128).map(|b| format!("a{}b", b as char)).collect();
        texts.extend(
            [
                "",
                "plain words",
                "caf\u{e9} \u{1F30A} \u{2028}\u{7f}",
                "\"\\\"\n\r\t\u{8}\u{c}\u{0}\u{1f}",
            ]
            .map(String::from),
        );
        texts.push((0u8..128).map(char::from).collect());
        for text in &texts {
            for role in [Role::Flash, Role::Pro] {
                let event = crate::events::DeltaEvent {
                    run_id: "0190a5b8-3c1e-7d2a-9f00-123456789abc",
                    model: role,
                    text,
                };
                let ours = Draft::delta(&DeltaPrefix::new(event.run_id, role), text);
                let theirs = Draft::new(EventKind::Delta, event.run_id, &event, 0);
                assert_eq!(ours.max_len(), theirs.max_len(), "{text:?}");
                assert_eq!(ours.data_len(), theirs.data_len(), "{text:?}");
                assert_eq!(
                    ours.finish(EventKind::Delta, event.run_id, 42),
                    theirs.finish(EventKind::Delta, event.run_id, 42),
                    "{text:?}"
                );
            }
        }
    }

    #[test]
    fn the_probe_measures_the_frame_it_was_told_about_and_no_other() {
        let histogram = Histogram::with_opts(prometheus::HistogramOpts::new("t", "t")).unwrap();
        let probe = OverheadProbe::new(histogram.clone());
        let at = probe.base + Duration::from_millis(3);
        probe.sent(7, at);
        // Another frame (an earlier one still queued, or `done`) is not measured.
        probe.yielded(6, at + Duration::from_micros(100));
        assert_eq!(histogram.get_sample_count(), 0);
        probe.yielded(7, at + Duration::from_micros(250));
        assert_eq!(histogram.get_sample_count(), 1);
        assert!((histogram.get_sample_sum() - 0.000_25).abs() < 1e-12);
        // Past 2^40 ns (about 18 minutes) into the run, differences still come out right.
        let late = probe.base + Duration::from_nanos((1 << ARRIVAL_BITS) - 1_000);
        probe.sent(8, late);
        probe.yielded(8, late + Duration::from_micros(40));
        assert_eq!(histogram.get_sample_count(), 2);
        assert!((histogram.get_sample_sum() - 0.000_29).abs() < 1e-12);
        // A `seq` past 24 bits compares by its low bits, as stored.
        probe.sent(u32::MAX, at);
        probe.yielded(u32::MAX, at);
        assert_eq!(histogram.get_sample_count(), 3);
    }
}
