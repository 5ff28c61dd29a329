//! HTTP/1.1 calls to plain `http://` upstreams, read by the task that relays them.
//!
//! Why not hyper's client here: hyper drives each HTTP/1.1 connection from a task of its
//! own and hands every body chunk to the caller through a channel. For a model's answer that
//! is two task wake-ups per token (the connection's task reads the socket, then the run's
//! task reads the channel), a spawned task and a dispatch channel per connection, and an
//! 8 KiB write buffer per connection that is kept for its whole life though a request is
//! written once. Here the run's own task reads the socket, in place, when it polls the body:
//! one wake-up per read, and a connection is only its socket and a small read buffer (see
//! docs/benchmarks.md, "Relay, own HTTP/1.1 client").
//!
//! What it speaks: one request at a time per connection, its body sent whole with a
//! `Content-Length`; a response head parsed by `httparse` (hyper's own parser), interim
//! `1xx` responses skipped; the body framed by `Content-Length`, `chunked` or the
//! connection's close (`framing.rs`). A connection whose response was read to its end, and
//! that neither side asked to close, goes back to an idle list and serves the next call.
//!
//! `https://` upstreams (which negotiate HTTP/2 with real providers) and HTTP/2 with prior
//! knowledge stay on hyper's client (`super::pool`).

mod body;
mod framing;
mod idle;

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::BytesMut;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version, header};
use tokio::{io::AsyncWrite, net::TcpStream};
use tower::Service;

pub use body::Body;
use framing::Framing;
use idle::IdleList;

use super::proxy::ProxyConnector;

/// What one read from an upstream connection takes at most: a token's SSE event is 100–400
/// bytes (see `pool::HTTP1_READ_BUF_BYTES`, the same size for hyper's connections).
const READ_BYTES: usize = super::pool::HTTP1_READ_BUF_BYTES;
/// Largest response head accepted (hyper's client allows about as much per header line,
/// 100 headers).
const MAX_HEAD_BYTES: usize = 64 << 10;
const MAX_HEADERS: usize = 100;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a call over HTTP/1.1 failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connect: {0}")]
    Connect(BoxError),
    #[error("connect timed out after {0:?}")]
    ConnectTimedOut(Duration),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the connection closed before a complete response head")]
    ClosedBeforeHead,
    #[error("the connection closed before the end of the response body")]
    ClosedInBody,
    #[error("invalid response head: {0}")]
    Head(&'static str),
    #[error("invalid response body: {0}")]
    Framing(&'static str),
    #[error("a request body that is not in memory")]
    StreamingRequestBody,
}

/// The HTTP/1.1 connections of one upstream (one provider): idle ones kept for the next
/// call, new ones made through the proxy the environment names, if any.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    connector: ProxyConnector,
    connect_timeout: Duration,
    idle: IdleList,
}

/// One upstream connection: the socket and what was read from it but not yet used.
struct Conn {
    io: TcpStream,
    buf: BytesMut,
}

impl Client {
    pub fn new(connector: ProxyConnector, connect_timeout: Duration) -> Self {
        Client {
            inner: Arc::new(Inner {
                connector,
                connect_timeout,
                idle: IdleList::default(),
            }),
        }
    }

    /// Idle connections kept now.
    pub fn idle(&self) -> usize {
        self.inner.idle.len()
    }

    /// Sends `request` (its body whole) on an idle connection or a new one and reads the
    /// response's head; the body is read as the returned [`Body`] is polled.
    pub async fn send(
        &self,
        request: http::Request<reqwest::Body>,
    ) -> Result<http::Response<Body>, Error> {
        let wire = encode_request(&request)?;
        let mut conn = match self.inner.idle.take() {
            Some(conn) => conn,
            None => self.connect(request.uri().clone()).await?,
        };
        let written = match conn.write_request(&wire).await {
            Ok(whole) => whole,
            // An upstream may answer a request it will not take (a 413 for one too large)
            // and close before reading all of it; writing then fails (EPIPE, or ECONNRESET
            // once its close turns into a reset), though its answer may already be here.
            // That answer, not the write error, says why the call failed.
            Err(write) => match conn.read_head().await {
                Ok(head) => return self.response(head, conn, false),
                Err(_) => return Err(Error::Io(write)),
            },
        };
        drop(wire);
        let head = conn.read_head().await?;
        // A request the upstream answered before reading all of it leaves the rest of it
        // unread on the connection: never reused.
        let reuse = written && !wants_close(request.headers());
        self.response(head, conn, reuse)
    }

    /// The response for `head`, its body read from `conn`; `may_reuse` is whether the
    /// request side allows keeping the connection.
    fn response(
        &self,
        (status, version, headers): (StatusCode, Version, HeaderMap),
        conn: Conn,
        may_reuse: bool,
    ) -> Result<http::Response<Body>, Error> {
        let framing = Framing::of(status, &headers).map_err(|e| match e {
            Error::Framing(why) => Error::Head(why),
            other => other,
        })?;
        // Both framings named: RFC 9112 §6.3 lets Transfer-Encoding win but calls such a
        // response a likely smuggling attempt; whatever the upstream meant, the connection
        // is not trusted with another call.
        let ambiguous = headers.contains_key(header::TRANSFER_ENCODING)
            && headers.contains_key(header::CONTENT_LENGTH);
        let keep_alive = may_reuse
            && version == Version::HTTP_11
            && !ambiguous
            && !wants_close(&headers)
            && framing != Framing::Close;
        let mut response = http::Response::new(Body::new(
            conn,
            framing,
            keep_alive.then(|| Arc::clone(&self.inner)),
        ));
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        Ok(response)
    }

    async fn connect(&self, uri: http::Uri) -> Result<Conn, Error> {
        let mut connector = self.inner.connector.clone();
        let after = self.inner.connect_timeout;
        let io = tokio::time::timeout(after, connector.call(uri))
            .await
            .map_err(|_| Error::ConnectTimedOut(after))?
            .map_err(Error::Connect)?;
        Ok(Conn {
            io: io.into_inner(),
            buf: BytesMut::new(),
        })
    }
}

impl Inner {
    /// A connection whose response was read to its end, for the next call.
    fn give_back(&self, mut conn: Conn) {
        if !conn.buf.is_empty() {
            // Bytes after the response: nothing a next call could read as its own.
            return;
        }
        // An idle connection keeps no buffer: the next read reserves one.
        conn.buf = BytesMut::new();
        self.idle.put(conn);
    }
}

impl Conn {
    /// Reads from the socket into the buffer: `Ok(0)` when the upstream closed it.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_BYTES / 4 {
            self.buf.reserve(READ_BYTES);
        }
        // tokio's own read: a read that found less than it had room for emptied the socket,
        // so tokio clears its readiness and the next poll waits for the next packet instead
        // of asking the kernel once more only to hear `EAGAIN` (an earlier version read with
        // `try_read_buf` and made twice the `recvfrom` calls: scripts/relay_syscalls.sh).
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    async fn fill(&mut self) -> std::io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Writes the request. Stops writing, and says so with `Ok(false)`, when the upstream
    /// answers or closes before taking all of it: an upstream that refuses a request too
    /// large (413) often answers at once and never reads the rest, and waiting for it to
    /// read would hold the call until its deadline instead of failing it with that answer.
    async fn write_request(&mut self, wire: &[u8]) -> std::io::Result<bool> {
        let mut written = 0;
        std::future::poll_fn(|cx| {
            while written < wire.len() {
                match std::pin::Pin::new(&mut self.io).poll_write(cx, &wire[written..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                    }
                    Poll::Ready(Ok(n)) => written += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // The socket's send buffer is full: the upstream is not reading now.
                        // A final answer it sent meanwhile, or its close, ends the write; an
                        // interim `100 Continue` (sent by some servers though duet never
                        // asks with `Expect`) does not: it waits for the rest.
                        loop {
                            match std::task::ready!(self.poll_fill(cx)) {
                                Err(e) => return Poll::Ready(Err(e)),
                                Ok(0) => return Poll::Ready(Ok(false)),
                                Ok(_) => {}
                            }
                            match parse_head(&self.buf) {
                                Ok(None) if self.buf.len() < MAX_HEAD_BYTES => {}
                                Ok(Some(((status, ..), used)))
                                    if status.is_informational()
                                        && status != StatusCode::SWITCHING_PROTOCOLS =>
                                {
                                    bytes::Buf::advance(&mut self.buf, used);
                                    break;
                                }
                                // A final head, or what `read_head` will refuse.
                                _ => return Poll::Ready(Ok(false)),
                            }
                        }
                    }
                }
            }
            Poll::Ready(Ok(true))
        })
        .await
    }

    /// Reads the response head, skipping interim (`1xx`) responses.
    async fn read_head(&mut self) -> Result<(StatusCode, Version, HeaderMap), Error> {
        // Interim heads count towards the head limit too: a real server sends one or two
        // (`100 Continue`, `103 Early Hints`), and an upstream sending them without end
        // must not hold the call until its deadline.
        let mut interim = 0;
        loop {
            if let Some((head, used)) = parse_head(&self.buf)? {
                bytes::Buf::advance(&mut self.buf, used);
                if head.0.is_informational() {
                    if head.0 == StatusCode::SWITCHING_PROTOCOLS {
                        return Err(Error::Head("an unasked protocol switch"));
                    }
                    interim += used;
                    if interim >= MAX_HEAD_BYTES {
                        return Err(Error::Head("interim (1xx) heads past 64 KiB"));
                    }
                    continue;
                }
                return Ok(head);
            }
            if interim + self.buf.len() >= MAX_HEAD_BYTES {
                return Err(Error::Head("a head larger than 64 KiB"));
            }
            if self.fill().await? == 0 {
                return Err(Error::ClosedBeforeHead);
            }
        }
    }

    /// Whether an idle connection can still carry a request: the upstream has not closed it
    /// and has sent nothing unasked. Looks without waiting.
    fn is_usable(&mut self) -> bool {
        // Asks the kernel (`MSG_PEEK`, non-blocking: tokio's sockets are), not tokio's
        // cached readiness: a close the runtime's I/O driver has not processed yet (a busy
        // runtime) would otherwise go unseen, and the call would fail on it and be retried
        // after a backoff. One system call per call that takes an idle connection.
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        matches!(
            socket2::SockRef::from(&self.io).peek(&mut probe),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        )
    }
}

/// The response head at the front of `buf`, if it holds all of it, and its length.
///
/// A plain function so that the parser's header array lives on the stack only while it
/// parses, never in the state of the future that reads.
#[allow(clippy::type_complexity)]
fn parse_head(buf: &[u8]) -> Result<Option<((StatusCode, Version, HeaderMap), usize)>, Error> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    let used = match response.parse(buf) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::Head("more than 100 headers")),
        Err(_) => return Err(Error::Head("not an HTTP/1.x response head")),
    };
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(Error::Head("an invalid status code"))?;
    let version = match response.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    for field in response.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| Error::Head("an invalid header name"))?;
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| Error::Head("an invalid header value"))?;
        headers.append(name, value);
    }
    Ok(Some(((status, version, headers), used)))
}

/// Whether a `Connection` header asks to close after this exchange.
fn wants_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
}

/// The request as bytes on the wire: request line, `Host` (from the URI unless given),
/// the headers, `Content-Length`, the body. Framing headers of the request's own are
/// replaced by that length.
fn encode_request(request: &http::Request<reqwest::Body>) -> Result<Vec<u8>, Error> {
    let body = request
        .body()
        .as_bytes()
        .ok_or(Error::StreamingRequestBody)?;
    let uri = request.uri();
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut wire = Vec::with_capacity(256 + body.len());
    wire.extend_from_slice(request.method().as_str().as_bytes());
    wire.push(b' ');
    wire.extend_from_slice(target.as_bytes());
    wire.extend_from_slice(b" HTTP/1.1\r\n");
    let headers = request.headers();
    if !headers.contains_key(header::HOST) {
        // Host and port only: never the authority's user information.
        wire.extend_from_slice(b"host: ");
        wire.extend_from_slice(uri.host().unwrap_or_default().as_bytes());
        if let Some(port) = uri.port_u16().filter(|p| *p != 80) {
            wire.extend_from_slice(format!(":{port}").as_bytes());
        }
        wire.extend_from_slice(b"\r\n");
    }
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        wire.extend_from_slice(name.as_str().as_bytes());
        wire.extend_from_slice(b": ");
        wire.extend_from_slice(value.as_bytes());
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    wire.extend_from_slice(body);
    Ok(wire)
}

#[cfg(test)]
mod tests;
