//! The SSE event parser behind [`Bounded`]: the HTML standard's grammar (the same events
//! `eventsource-stream` made of the same bytes), into one reused [`Event`].
//!
//! Why not `eventsource-stream`'s own stream: it copies every chunk into a new `String`,
//! allocates a new buffer for the rest of its input after every line it parses, and a new
//! `data`, `event` and `id` string per event, i.e. five or more allocations per upstream
//! token. Here [`Bounded`] already hands over whole lines of valid UTF-8, so the parser only
//! walks them: the event's strings are cleared and refilled, and after the first few events of
//! a call nothing is allocated at all. The decoders get the event by reference, as before.

use std::{
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use eventsource_stream::Event;
use futures::{Stream, StreamExt};

use super::framing::{BodyError, Bounded};

/// A body's SSE events, one at a time: [`SseEvents::poll_event`] says whether one is ready in
/// [`SseEvents::event`].
pub(super) struct SseEvents<S> {
    lines: Bounded<S>,
    /// Whole lines taken from `lines` and not parsed yet, from `at` on.
    chunk: Bytes,
    at: usize,
    /// The event being built, or the one last handed out (cleared before the next one).
    event: Event,
    handed_out: bool,
    /// The previous line ended with CR at the end of its chunk: an LF starting the next
    /// chunk is the rest of that CRLF, not an empty line.
    after_cr: bool,
    /// A byte order mark is skipped at the start of the stream only.
    started: bool,
}

impl<S> SseEvents<S>
where
    S: Stream<Item = reqwest::Result<Bytes>> + Unpin,
{
    pub(super) fn new(lines: Bounded<S>) -> Self {
        SseEvents {
            lines,
            chunk: Bytes::new(),
            at: 0,
            event: Event::default(),
            handed_out: false,
            after_cr: false,
            started: false,
        }
    }

    /// The body under the parser, for reading what is left of it (see `call::recycle`).
    pub(super) fn into_body(self) -> S {
        self.lines.into_inner()
    }

    /// The event [`SseEvents::poll_event`] last announced.
    pub(super) fn event(&self) -> &Event {
        &self.event
    }

    /// The next event (then in [`SseEvents::event`]), the body's end (`None`, with anything
    /// after the last blank line dropped, as the standard says) or its failure. Polled by
    /// the call's own stream (`call::Call`), in place.
    pub(super) fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<(), BodyError>>> {
        if std::mem::take(&mut self.handed_out) {
            // `id` carries over to later events; the rest is the next event's own.
            self.event.event.clear();
            self.event.data.clear();
            self.event.retry = None;
        }
        loop {
            if self.parse_chunk() {
                self.handed_out = true;
                return Poll::Ready(Some(Ok(())));
            }
            match self.lines.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(chunk))) => {
                    self.at = 0;
                    if !self.started && !chunk.is_empty() {
                        self.started = true;
                        if chunk.starts_with(b"\xEF\xBB\xBF") {
                            self.at = 3;
                        }
                    }
                    if std::mem::take(&mut self.after_cr) && chunk.get(self.at) == Some(&b'\n') {
                        self.at += 1;
                    }
                    self.chunk = chunk;
                }
            }
        }
    }

    /// Parses lines of the current chunk until an event is complete (true) or the chunk is
    /// used up (false).
    fn parse_chunk(&mut self) -> bool {
        // Taken out for the walk (a static empty `Bytes` in its place, no allocation), so
        // the event can be filled from it.
        let chunk = std::mem::take(&mut self.chunk);
        let complete = self.parse_lines(&chunk);
        // A used-up chunk is dropped at once, not when the next one comes: it is a slice of
        // hyper's read buffer, and while it lives hyper cannot reuse that buffer for its next
        // read but allocates a new one (and this drop frees the old one). Every event's text
        // has been copied into `event` by now.
        if self.at < chunk.len() {
            self.chunk = chunk;
        }
        complete
    }

    fn parse_lines(&mut self, chunk: &[u8]) -> bool {
        while self.at < chunk.len() {
            let rest = &chunk[self.at..];
            // Bounded's chunks end with a line end, so there always is one.
            let Some(end) = memchr::memchr2(b'\n', b'\r', rest) else {
                self.at = chunk.len();
                return false;
            };
            let line = &rest[..end];
            let mut next = self.at + end + 1;
            if rest[end] == b'\r' {
                match rest.get(end + 1) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            self.at = next;
            if line.is_empty() {
                if self.dispatch() {
                    return true;
                }
            } else if let Ok(line) = std::str::from_utf8(line) {
                // Line by line, so each byte is checked once however many times the chunk
                // is walked (once per event in it). [`Bounded`] hands over valid UTF-8 only,
                // and a line end never cuts a character, so this cannot fail; a line that did
                // (a bug) would be skipped rather than misread.
                field(&mut self.event, line);
            }
        }
        false
    }

    /// The blank line that ends an event: whether there is one to hand out.
    fn dispatch(&mut self) -> bool {
        let event = &mut self.event;
        if event.data.is_empty() {
            event.event.clear();
            event.retry = None;
            return false;
        }
        // Every `data` line added an LF; the last one is not part of the data.
        event.data.pop();
        if event.event.is_empty() {
            event.event.push_str("message");
        }
        true
    }
}

/// One non-empty line: a comment (ignored) or a field of the event being built.
fn field(event: &mut Event, line: &str) {
    let (name, value) = match line.split_once(':') {
        Some(("", _)) => return,
        Some((name, value)) => (name, value.strip_prefix(' ').unwrap_or(value)),
        None => (line, ""),
    };
    match name {
        "data" => {
            event.data.push_str(value);
            event.data.push('\n');
        }
        "event" => {
            event.event.clear();
            event.event.push_str(value);
        }
        "id" if !value.contains('\0') => {
            event.id.clear();
            event.id.push_str(value);
        }
        "retry" => {
            if let Ok(ms) = value.parse::<u64>() {
                event.retry = Some(Duration::from_millis(ms));
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use eventsource_stream::Eventsource;

    use super::*;
    use crate::providers::http::BodyLimits;

    /// The chunks as a body behind [`Bounded`], as both parsers get them.
    fn bounded(chunks: &[Vec<u8>]) -> Bounded<impl Stream<Item = reqwest::Result<Bytes>> + Unpin> {
        let items: Vec<reqwest::Result<Bytes>> = chunks
            .iter()
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        Bounded::new(
            futures::stream::iter(items),
            BodyLimits::default(),
            Arc::new(Mutex::new(String::new())),
        )
    }

    /// Waits for [`SseEvents::poll_event`].
    async fn next<S>(events: &mut SseEvents<S>) -> Option<Result<(), BodyError>>
    where
        S: Stream<Item = reqwest::Result<Bytes>> + Unpin,
    {
        std::future::poll_fn(|cx| events.poll_event(cx)).await
    }

    fn ours(chunks: &[Vec<u8>]) -> Vec<Event> {
        let mut events = SseEvents::new(bounded(chunks));
        futures::executor::block_on(async {
            let mut out = Vec::new();
            while let Some(r) = next(&mut events).await {
                r.unwrap();
                out.push(events.event().clone());
            }
            out
        })
    }

    /// What `eventsource-stream` made of the same chunks, behind the same [`Bounded`].
    fn theirs(chunks: &[Vec<u8>]) -> Vec<Event> {
        futures::executor::block_on(
            bounded(chunks)
                .eventsource()
                .map(|r| r.unwrap())
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn the_same_events_as_eventsource_stream_however_the_body_is_cut() {
        let bodies: [&[u8]; 5] = [
            b"data: a\n\nevent: ping\ndata:b\ndata:  c\nid: 7\nretry: 10\n\n: comment\n\ndata\n\n",
            b"data: one\r\n\r\ndata: two\r\rdata: three\r\n\r\nevent: e\n\nid: 9\ndata: x\n\ndata: y\n\nretry: no\ndata\n\n",
            b"event: only-a-name\n\nid: a\0b\ndata: {\"k\":\"caf\xC3\xA9\"}\n\n:\n\nfield-without-colon\ndata: z\n\n",
            b"data: [DONE]\n\ndata: trailing without a blank line\n",
            b"\n\n\r\n\rdata:\tt\r\n\r\n",
        ];
        for body in bodies {
            let cuts: Vec<Vec<Vec<u8>>> = [body.len(), 1, 2, 3, 7]
                .into_iter()
                .map(|n| body.chunks(n).map(<[u8]>::to_vec).collect())
                .collect();
            let whole = theirs(&cuts[0]);
            assert!(!whole.is_empty());
            for chunks in &cuts {
                assert_eq!(ours(chunks), whole, "{:?}", String::from_utf8_lossy(body));
            }
        }
    }

    /// `eventsource-stream` panics on a leading byte order mark (it slices one byte into the
    /// three-byte character), so this one is checked on its own: skipped, however it is cut.
    #[test]
    fn a_byte_order_mark_is_skipped() {
        let body = b"\xEF\xBB\xBFdata: a\n\ndata: \xEF\xBB\xBFb\n\n";
        for n in [body.len(), 1, 2, 4] {
            let chunks: Vec<Vec<u8>> = body.chunks(n).map(<[u8]>::to_vec).collect();
            let data: Vec<String> = ours(&chunks).into_iter().map(|e| e.data).collect();
            assert_eq!(data, ["a", "\u{feff}b"], "cut every {n} bytes");
        }
    }

    #[test]
    fn events_reuse_their_strings() {
        let body = b"data: a long enough first event to size the buffer\n\ndata: b\n\n".to_vec();
        let items = vec![Ok::<_, reqwest::Error>(Bytes::from(body))];
        let bounded = Bounded::new(
            futures::stream::iter(items),
            BodyLimits::default(),
            Arc::new(Mutex::new(String::new())),
        );
        let mut events = SseEvents::new(bounded);
        futures::executor::block_on(async {
            next(&mut events).await.unwrap().unwrap();
            let first = events.event().data.as_ptr();
            next(&mut events).await.unwrap().unwrap();
            assert_eq!(events.event().data, "b");
            assert_eq!(events.event().data.as_ptr(), first);
            assert!(next(&mut events).await.is_none());
        });
    }
}
