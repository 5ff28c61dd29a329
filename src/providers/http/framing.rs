//! Framing an upstream body for the SSE parser within limits: whole lines only, valid UTF-8,
//! a cap on one line and on the body, and the stray lines the SSE grammar ignores kept aside.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};

use super::BodyLimits;

/// Lines outside the SSE grammar are kept up to this much, to explain a broken stream.
const MAX_STRAY_BYTES: usize = 64 << 10;

/// Why [`Bounded`] stopped a body.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("transport: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("a line exceeded the limit")]
    LineTooLong,
    #[error("the body exceeded the limit")]
    BodyTooLarge,
}

/// Frames an upstream body for the SSE parser, within limits.
///
/// An SSE parser left to itself buffers an unterminated line without limit; this sits in
/// front of the parser (`super::events`) and hands over only complete lines, as valid
/// UTF-8 (invalid sequences become U+FFFD, as the SSE spec says), failing the body when one
/// line or the whole body grows past its limit. It also keeps the lines the SSE grammar
/// ignores (field names other than `data`, `event`, `id`, `retry`), which is where some
/// upstreams put their errors.
pub struct Bounded<S> {
    inner: S,
    limits: BodyLimits,
    partial: BytesMut,
    total: usize,
    stray: Arc<Mutex<String>>,
    first_line: bool,
    failed: bool,
}

impl<S> Bounded<S> {
    pub fn new(inner: S, limits: BodyLimits, stray: Arc<Mutex<String>>) -> Self {
        Bounded {
            inner,
            limits,
            partial: BytesMut::new(),
            total: 0,
            stray,
            first_line: true,
            failed: false,
        }
    }

    /// The body, for reading what is left of it unchecked (see `call::recycle`).
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Checks complete lines for length and keeps the ones outside the SSE grammar.
    fn inspect(&mut self, lines: &[u8]) -> Result<(), BodyError> {
        // Line ends found with `memchr` (whole words at a time): this runs over every byte
        // of every upstream body.
        let mut start = 0;
        let ends = memchr::memchr2_iter(b'\n', b'\r', lines).chain(std::iter::once(lines.len()));
        for end in ends {
            let line = &lines[start..end];
            start = end + 1;
            if line.len() > self.limits.line {
                return Err(BodyError::LineTooLong);
            }
            let line = if std::mem::take(&mut self.first_line) {
                line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line)
            } else {
                line
            };
            if line.is_empty() || line[0] == b':' {
                continue;
            }
            let name = line.split(|b| *b == b':').next().unwrap_or(line);
            if matches!(name, b"data" | b"event" | b"id" | b"retry") {
                continue;
            }
            if let Ok(mut stray) = self.stray.lock()
                && stray.len() + line.len() < MAX_STRAY_BYTES
            {
                stray.push_str(&String::from_utf8_lossy(line));
                stray.push('\n');
            }
        }
        Ok(())
    }
}

impl<S> Stream for Bounded<S>
where
    S: Stream<Item = reqwest::Result<Bytes>> + Unpin,
{
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        loop {
            let chunk = match this.inner.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                // What is left without a line end can never complete an event: drop it.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Err(e))) => {
                    this.failed = true;
                    return Poll::Ready(Some(Err(BodyError::Transport(e))));
                }
                Poll::Ready(Some(Ok(chunk))) => chunk,
            };
            this.total += chunk.len();
            if this.total > this.limits.body {
                this.failed = true;
                return Poll::Ready(Some(Err(BodyError::BodyTooLarge)));
            }
            let Some(last_end) = memchr::memrchr2(b'\n', b'\r', &chunk) else {
                this.partial.extend_from_slice(&chunk);
                if this.partial.len() > this.limits.line {
                    this.failed = true;
                    return Poll::Ready(Some(Err(BodyError::LineTooLong)));
                }
                continue;
            };
            let lines = if this.partial.is_empty() {
                chunk.slice(..=last_end)
            } else {
                this.partial.extend_from_slice(&chunk[..=last_end]);
                this.partial.split().freeze()
            };
            this.partial.extend_from_slice(&chunk[last_end + 1..]);
            let checked = this.inspect(&lines[..lines.len() - 1]);
            if let Err(e) = checked.and_then(|()| {
                if this.partial.len() > this.limits.line {
                    Err(BodyError::LineTooLong)
                } else {
                    Ok(())
                }
            }) {
                this.failed = true;
                return Poll::Ready(Some(Err(e)));
            }
            // Complete lines end in ASCII CR or LF, so no UTF-8 sequence is cut here. The
            // plain check first: it is much faster than the lossy one on valid text.
            let lines = if std::str::from_utf8(&lines).is_ok() {
                lines
            } else {
                Bytes::from(String::from_utf8_lossy(&lines).into_owned())
            };
            return Poll::Ready(Some(Ok(lines)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(chunks: &[&[u8]], limits: BodyLimits) -> (Vec<Result<Bytes, String>>, String) {
        let stray = Arc::new(Mutex::new(String::new()));
        let items: Vec<reqwest::Result<Bytes>> = chunks
            .iter()
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let bounded = Bounded::new(futures::stream::iter(items), limits, Arc::clone(&stray));
        let out =
            futures::executor::block_on(bounded.map(|r| r.map_err(|e| e.to_string())).collect());
        let stray = stray.lock().unwrap().clone();
        (out, stray)
    }

    #[test]
    fn bounded_hands_over_whole_lines_and_keeps_stray_ones() {
        let (out, stray) = frame(
            &[
                b"da",
                b"ta: caf\xC3",
                b"\xA9\r",
                b"\n\r\nerror: {\"code\":400}\n\n{\n  \"x\": 1\n}\ntail",
            ],
            BodyLimits::default(),
        );
        let text: Vec<String> = out
            .into_iter()
            .map(|b| String::from_utf8(b.unwrap().to_vec()).unwrap())
            .collect();
        assert_eq!(
            text.concat(),
            "data: caf\u{e9}\r\n\r\nerror: {\"code\":400}\n\n{\n  \"x\": 1\n}\n"
        );
        assert_eq!(stray, "error: {\"code\":400}\n{\n  \"x\": 1\n}\n");
    }

    #[test]
    fn bounded_limits_lines_and_bodies() {
        let limits = BodyLimits { line: 8, body: 64 };
        let (out, _) = frame(&[b"data: 0123", b"456789"], limits);
        assert_eq!(
            out.last().unwrap().as_ref().unwrap_err(),
            "a line exceeded the limit"
        );
        let (out, _) = frame(&[b"data: 0123456789\n"], limits);
        assert_eq!(
            out.last().unwrap().as_ref().unwrap_err(),
            "a line exceeded the limit"
        );
        let many: Vec<&[u8]> = std::iter::repeat_n(&b"d: 1\n\n"[..], 20).collect();
        let (out, _) = frame(&many, limits);
        assert_eq!(
            out.last().unwrap().as_ref().unwrap_err(),
            "the body exceeded the limit"
        );
    }

    #[test]
    fn invalid_utf8_becomes_replacement_characters() {
        let (out, _) = frame(&[b"data: a\xFFb\n\n"], BodyLimits::default());
        assert_eq!(
            out[0].as_ref().unwrap().as_ref(),
            "data: a\u{FFFD}b\n\n".as_bytes()
        );
    }
}
