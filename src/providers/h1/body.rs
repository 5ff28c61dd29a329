//! A response body read from its connection by whoever polls it.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::Frame;

use super::{
    Conn, Error, Inner,
    framing::{Decoded, Framing},
};

/// The body of one response. Read to its end, its connection goes back to the idle list
/// (when it may be kept); dropped before that, the connection is closed, which is how an
/// upstream learns that an answer is no longer wanted. (A call that finished reads the rest
/// itself: `http::call::recycle`.)
pub struct Body {
    conn: Option<Conn>,
    framing: Framing,
    /// Where the connection goes back to at the end; `None` when it must not be kept.
    reuse: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("framing", &self.framing)
            .field("open", &self.conn.is_some())
            .finish()
    }
}

impl Body {
    pub(super) fn new(conn: Conn, framing: Framing, reuse: Option<Arc<Inner>>) -> Self {
        Body {
            conn: Some(conn),
            framing,
            reuse,
        }
    }

    /// The body ended: the connection is kept or closed.
    fn end(&mut self) {
        if let (Some(conn), Some(client)) = (self.conn.take(), self.reuse.take()) {
            client.give_back(conn);
        }
        self.conn = None;
    }

    fn fail(&mut self, error: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.conn = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let body = &mut *self;
        loop {
            let Some(conn) = body.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match body.framing.decode(&mut conn.buf) {
                Err(e) => return body.fail(e),
                Ok(Decoded::Data(bytes)) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Ok(Decoded::End) => {
                    body.end();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => {}
            }
            match ready!(conn.poll_fill(cx)) {
                Err(e) => return body.fail(Error::Io(e)),
                Ok(0) if body.framing.complete_at_close() => {
                    // Nothing to keep: the upstream closed the connection.
                    body.reuse = None;
                    body.end();
                    return Poll::Ready(None);
                }
                Ok(0) => return body.fail(Error::ClosedInBody),
                Ok(_) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none()
    }
}
