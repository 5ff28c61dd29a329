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
    task::{Context, Poll},
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use futures::Stream;
use serde::Serialize;
use tokio::{
    sync::mpsc,
    time::{Instant, Sleep},
};

use crate::events::EventKind;

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

/// A response body fed by a run's bounded channel, sending [`KEEPALIVE`] whenever nothing has
/// gone out for `interval`. It ends when the run drops its sender (after `done`); dropping it
/// (the client went away) closes the channel, which the run notices and cancels itself.
pub struct EventBody {
    prefix: Option<Bytes>,
    rx: mpsc::Receiver<Bytes>,
    keepalive: Pin<Box<Sleep>>,
    interval: Duration,
    /// When the last frame went out. Kept instead of re-arming the timer on every frame: a
    /// timer-wheel update per delta costs more than a clock read, and the timer only needs
    /// to be right when it fires.
    last_sent: Instant,
}

impl EventBody {
    pub fn new(prefix: Option<Bytes>, rx: mpsc::Receiver<Bytes>, interval: Duration) -> Self {
        EventBody {
            prefix,
            rx,
            keepalive: Box::pin(tokio::time::sleep(interval)),
            interval,
            last_sent: Instant::now(),
        }
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
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => loop {
                match this.keepalive.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) => {
                        let due = this.last_sent + this.interval;
                        let now = Instant::now();
                        if now >= due {
                            this.last_sent = now;
                            this.keepalive.as_mut().reset(now + this.interval);
                            return Poll::Ready(Some(Ok(Bytes::from_static(KEEPALIVE))));
                        }
                        // Frames went out since the timer was armed: wait out the rest of
                        // the silence (polling again registers the new deadline).
                        this.keepalive.as_mut().reset(due);
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
}
