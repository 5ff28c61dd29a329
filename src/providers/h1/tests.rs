//! The own HTTP/1.1 client against raw sockets on loopback: the upstream's bytes are
//! written by hand, so each test says exactly what the wire held.

use std::time::Duration;

use futures::StreamExt;
use http_body_util::BodyDataStream;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

use super::*;

fn client() -> Client {
    let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
    tcp.set_nodelay(true);
    let matcher = hyper_util::client::proxy::matcher::Matcher::builder().build();
    Client::new(ProxyConnector::new(tcp, matcher), Duration::from_secs(5))
}

fn post(port: u16, body: &'static str) -> http::Request<reqwest::Body> {
    http::Request::post(format!("http://user:secret@127.0.0.1:{port}/v1/chat?x=1"))
        .header("authorization", "Bearer k")
        .body(reqwest::Body::from(body))
        .unwrap()
}

/// Reads one request (head and `Content-Length` body) from `socket`; `None` at EOF.
async fn read_request(socket: &mut TcpStream) -> Option<String> {
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !seen.ends_with(b"\r\n\r\n") {
        if socket.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        seen.push(byte[0]);
    }
    let head = String::from_utf8(seen).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |n| n.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    socket.read_exact(&mut body).await.ok()?;
    Some(head + &String::from_utf8(body).unwrap())
}

/// An upstream that answers every request on a connection with the next of `answers`
/// (each written in the pieces given), reporting each request with its connection's number.
async fn upstream(
    answers: Vec<Vec<&'static [u8]>>,
) -> (u16, mpsc::UnboundedReceiver<(usize, String)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (seen, requests) = mpsc::unbounded_channel();
    #[expect(clippy::disallowed_methods, reason = "a test's upstream")]
    tokio::spawn(async move {
        let mut answers = answers.into_iter();
        let mut number = 0;
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            number += 1;
            while let Some(request) = read_request(&mut socket).await {
                seen.send((number, request)).unwrap();
                let Some(pieces) = answers.next() else {
                    return;
                };
                for piece in pieces {
                    if socket.write_all(piece).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    });
    (port, requests)
}

/// An upstream that answers one request with `answer` and closes the connection.
async fn answer_once_and_close(answer: &'static [u8]) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    #[expect(clippy::disallowed_methods, reason = "a test's upstream")]
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        read_request(&mut socket).await.unwrap();
        socket.write_all(answer).await.unwrap();
    });
    port
}

async fn read_all(response: http::Response<Body>) -> Result<String, Error> {
    let mut body = BodyDataStream::new(response.into_body());
    let mut text = Vec::new();
    while let Some(chunk) = body.next().await {
        text.extend_from_slice(&chunk?);
    }
    Ok(String::from_utf8(text).unwrap())
}

const CHUNKED_OK: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

#[tokio::test]
async fn a_request_goes_out_whole_and_a_kept_connection_serves_the_next_call() {
    let (port, mut requests) = upstream(vec![
        vec![
            CHUNKED_OK,
            b"6\r\ndata: \r\n",
            b"3\r\nhi\n\r\n",
            b"0\r\n\r\n",
        ],
        vec![b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"],
    ])
    .await;
    let client = client();
    let response = client.send(post(port, "{\"a\":1}")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(read_all(response).await.unwrap(), "data: hi\n");
    assert_eq!(client.idle(), 1, "read to its end, the connection is kept");

    let (connection, request) = requests.recv().await.unwrap();
    assert_eq!(connection, 1);
    assert!(
        request.starts_with("POST /v1/chat?x=1 HTTP/1.1\r\n"),
        "{request}"
    );
    assert!(
        request.contains(&format!("host: 127.0.0.1:{port}\r\n")),
        "{request}"
    );
    assert!(request.contains("authorization: Bearer k\r\n"));
    assert!(
        request.ends_with("content-length: 7\r\n\r\n{\"a\":1}"),
        "{request}"
    );
    assert!(
        !request.contains("secret"),
        "user information never goes out: {request}"
    );

    let response = client.send(post(port, "{}")).await.unwrap();
    assert_eq!(read_all(response).await.unwrap(), "hello");
    let (connection, _) = requests.recv().await.unwrap();
    assert_eq!(connection, 1, "the second call reused the first connection");
}

#[tokio::test]
async fn interim_responses_are_skipped() {
    let (port, _requests) = upstream(vec![vec![
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n",
        b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
    ]])
    .await;
    let response = client().send(post(port, "{}")).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(read_all(response).await.unwrap(), "ok");
}

#[tokio::test]
async fn a_connection_asked_to_close_or_read_to_close_is_not_kept() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"[..],
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ] {
        let (port, _requests) = upstream(vec![vec![answer]]).await;
        let client = client();
        let response = client.send(post(port, "{}")).await.unwrap();
        assert_eq!(read_all(response).await.unwrap(), "ok");
        assert_eq!(client.idle(), 0);
    }
}

#[tokio::test]
async fn a_body_delimited_by_close_ends_at_the_close() {
    let port = answer_once_and_close(b"HTTP/1.1 200 OK\r\n\r\nuntil the end").await;
    let client = client();
    let response = client.send(post(port, "{}")).await.unwrap();
    assert_eq!(read_all(response).await.unwrap(), "until the end");
    assert_eq!(client.idle(), 0);
}

#[tokio::test]
async fn a_close_before_the_end_is_an_error() {
    for (answer, expected) in [
        (
            &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"[..],
            "end of the response body",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
            "end of the response body",
        ),
        (b"HTTP/1.1 200 OK\r\ncontent-le", "complete response head"),
    ] {
        let port = answer_once_and_close(answer).await;
        let error = match client().send(post(port, "{}")).await {
            Ok(response) => read_all(response).await.unwrap_err(),
            Err(e) => e,
        };
        assert!(error.to_string().contains(expected), "{error}");
    }
}

#[tokio::test]
async fn broken_heads_are_refused() {
    let mut huge = b"HTTP/1.1 200 OK\r\n".to_vec();
    huge.extend_from_slice(b"x-filler: ");
    huge.resize(MAX_HEAD_BYTES + 10, b'a');
    let huge: &'static [u8] = Box::leak(huge.into_boxed_slice());
    let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..101 {
        many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let many: &'static [u8] = Box::leak(many.into_boxed_slice());
    for (answer, expected) in [
        (
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            "not an HTTP/1.x response head",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            "conflicting",
        ),
        (
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "protocol switch",
        ),
        (huge, "larger than 64 KiB"),
        (many, "more than 100 headers"),
    ] {
        let (port, _requests) = upstream(vec![vec![answer]]).await;
        let error = client().send(post(port, "{}")).await.unwrap_err();
        assert!(error.to_string().contains(expected), "{error}");
    }
}

#[tokio::test]
async fn an_idle_connection_the_upstream_closed_is_not_used() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    #[expect(clippy::disallowed_methods, reason = "a test's upstream")]
    tokio::spawn(async move {
        for n in 0..2 {
            let (mut socket, _) = listener.accept().await.unwrap();
            read_request(&mut socket).await.unwrap();
            // Keep-alive offered, then closed right after the answer, as an upstream whose
            // idle timeout is short does.
            let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n{n}");
            socket.write_all(answer.as_bytes()).await.unwrap();
            drop(socket);
        }
    });
    let client = client();
    let first = client.send(post(port, "{}")).await.unwrap();
    assert_eq!(read_all(first).await.unwrap(), "0");
    assert_eq!(client.idle(), 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = client.send(post(port, "{}")).await.unwrap();
    assert_eq!(
        read_all(second).await.unwrap(),
        "1",
        "a new connection answered"
    );
}

#[tokio::test]
async fn a_body_dropped_before_its_end_closes_the_connection() {
    let (port, mut requests) = upstream(vec![
        vec![CHUNKED_OK, b"5\r\nlast\n\r\n", b"0\r\n\r\n"],
        vec![b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nz"],
    ])
    .await;
    let client = client();
    let response = client.send(post(port, "{}")).await.unwrap();
    let mut body = BodyDataStream::new(response.into_body());
    assert_eq!(&body.next().await.unwrap().unwrap()[..], b"last\n");
    drop(body);
    assert_eq!(
        client.idle(),
        0,
        "an unfinished answer's connection is closed"
    );

    let response = client.send(post(port, "{}")).await.unwrap();
    assert_eq!(read_all(response).await.unwrap(), "z");
    let connections: Vec<usize> = std::iter::from_fn(|| requests.try_recv().ok())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(connections, [1, 2]);
}

#[test]
fn the_host_header_names_host_and_port_only() {
    let host = |uri: &str| {
        let request = http::Request::post(uri)
            .body(reqwest::Body::from(""))
            .unwrap();
        let wire = String::from_utf8(encode_request(&request).unwrap()).unwrap();
        wire.lines().nth(1).unwrap().to_owned()
    };
    assert_eq!(host("http://a:b@example.com/x"), "host: example.com");
    assert_eq!(host("http://example.com:80/x"), "host: example.com");
    assert_eq!(host("http://example.com:8000/x"), "host: example.com:8000");
    assert_eq!(host("http://[::1]:8000/x"), "host: [::1]:8000");
}

/// A request with a body of `n` bytes.
fn post_large(port: u16, n: usize) -> http::Request<reqwest::Body> {
    http::Request::post(format!("http://127.0.0.1:{port}/v1/chat"))
        .body(reqwest::Body::from(vec![b'x'; n]))
        .unwrap()
}

/// Reads a request's head and leaves its body unread.
async fn read_head_only(socket: &mut TcpStream) {
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !seen.ends_with(b"\r\n\r\n") {
        socket.read_exact(&mut byte).await.unwrap();
        seen.push(byte[0]);
    }
}

/// An upstream that reads only the request head, answers at once and then, if `close`, closes
/// with the body unread (which the kernel turns into a reset), else waits without reading.
async fn early_answer(answer: &'static [u8], close: bool) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    #[expect(clippy::disallowed_methods, reason = "a test's upstream")]
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        read_head_only(&mut socket).await;
        socket.write_all(answer).await.unwrap();
        if close {
            drop(socket);
        } else {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    });
    port
}

/// Attack: a request too large for the upstream, which answers 413 before reading it. The
/// write used to run to its end first: against an upstream that then waits, the call hung
/// until its deadline; against one that closes, it failed with the write's EPIPE/ECONNRESET
/// ("could not reach") instead of the upstream's own answer.
#[tokio::test]
async fn an_answer_before_the_request_was_read_is_the_answer() {
    const REFUSED: &[u8] = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo big!";
    for close in [false, true] {
        let port = early_answer(REFUSED, close).await;
        let client = client();
        let response = tokio::time::timeout(
            Duration::from_secs(5),
            client.send(post_large(port, 32 << 20)),
        )
        .await
        .expect("the write waits for an upstream that does not read")
        .unwrap_or_else(|e| panic!("close={close}: {e}"));
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        if !close {
            assert_eq!(read_all(response).await.unwrap(), "too big!");
        } else {
            // After the reset the body may or may not still be readable; the status is
            // what classifies the call.
            let _ = read_all(response).await;
        }
        assert_eq!(
            client.idle(),
            0,
            "a connection with a request half written is never reused"
        );
    }
}

/// Attack: `100 Continue` without end. Each interim head is small and used up, so the head
/// limit never tripped and the call waited for its deadline.
#[tokio::test]
async fn endless_interim_heads_are_refused() {
    let flood: &'static [u8] = Box::leak(
        b"HTTP/1.1 100 Continue\r\n\r\n"
            .repeat(10_000)
            .into_boxed_slice(),
    );
    let (port, _requests) = upstream(vec![vec![flood]]).await;
    let error = tokio::time::timeout(Duration::from_secs(5), client().send(post(port, "{}")))
        .await
        .expect("bounded")
        .unwrap_err();
    assert!(error.to_string().contains("interim"), "{error}");
}

/// Attack: `Transfer-Encoding` and `Content-Length` both: read as chunked (as hyper does),
/// but the connection is not kept (RFC 9112 §6.3: a likely smuggling attempt).
#[tokio::test]
async fn a_response_with_both_framings_does_not_keep_its_connection() {
    let (port, _requests) = upstream(vec![vec![
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ]])
    .await;
    let client = client();
    let response = client.send(post(port, "{}")).await.unwrap();
    assert_eq!(read_all(response).await.unwrap(), "ok");
    assert_eq!(client.idle(), 0);
}

/// Attack: bytes after a `Content-Length` body, at once or a little later while the
/// connection is idle: the next call must get its own answer, never those bytes.
#[tokio::test]
async fn bytes_after_a_body_are_never_the_next_answer() {
    for pieces in [
        vec![&b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL"[..]],
        vec![
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL",
        ],
    ] {
        let (port, mut requests) = upstream(vec![
            pieces,
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ngood"],
        ])
        .await;
        let client = client();
        let response = client.send(post(port, "{}")).await.unwrap();
        assert_eq!(read_all(response).await.unwrap(), "ok");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let response = client.send(post(port, "{}")).await.unwrap();
        assert_eq!(read_all(response).await.unwrap(), "good");
        let connections: Vec<usize> = std::iter::from_fn(|| requests.try_recv().ok())
            .map(|(n, _)| n)
            .collect();
        assert_eq!(connections, [1, 2], "the tainted connection was not reused");
    }
}

/// Heads real servers send, and what hyper's client (same parser, default options) made of
/// them: accepted alike, refused alike.
#[test]
fn response_heads_as_hyper_reads_them() {
    let ok = |head: &[u8]| parse_head(head).map(|h| h.map(|((s, v, _), _)| (s.as_u16(), v)));
    assert_eq!(
        ok(b"HTTP/1.1 200\r\n\r\n").unwrap(),
        Some((200, Version::HTTP_11)),
        "no reason phrase (uvicorn, some Go servers)"
    );
    assert_eq!(
        ok(b"HTTP/1.1 200 \r\n\r\n").unwrap(),
        Some((200, Version::HTTP_11))
    );
    assert_eq!(
        ok(b"HTTP/1.1 999 Odd\r\n\r\n").unwrap(),
        Some((999, Version::HTTP_11))
    );
    assert_eq!(
        ok(b"HTTP/1.0 200 OK\r\n\r\n").unwrap(),
        Some((200, Version::HTTP_10))
    );
    assert_eq!(
        ok(b"HTTP/1.1 200 OK\nx: 1\n\n").unwrap(),
        Some((200, Version::HTTP_11)),
        "bare LF line ends"
    );
    for refused in [
        &b"http/1.1 200 OK\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nx: 1\r\n continued\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx y: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx : 1\r\n\r\n",
        b"HTTP/1.1 000 Zero\r\n\r\n",
        b"HTTP/2 200\r\n\r\n",
    ] {
        assert!(ok(refused).is_err(), "{}", String::from_utf8_lossy(refused));
    }
    // A head cut anywhere is incomplete, never an error.
    let whole = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n";
    for cut in 1..whole.len() {
        assert!(ok(&whole[..cut]).unwrap().is_none(), "cut at {cut}");
    }
}

/// A `100 Continue` while the request is still being written is not an early answer: the
/// write goes on, and the final answer comes once the upstream read everything.
#[tokio::test]
async fn an_interim_head_during_the_write_does_not_stop_it() {
    const SIZE: usize = 32 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    #[expect(clippy::disallowed_methods, reason = "a test's upstream")]
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        read_head_only(&mut socket).await;
        socket
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut body = vec![0u8; SIZE];
        socket.read_exact(&mut body).await.unwrap();
        socket
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nall")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let client = client();
    let response =
        tokio::time::timeout(Duration::from_secs(10), client.send(post_large(port, SIZE)))
            .await
            .expect("answered")
            .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(read_all(response).await.unwrap(), "all");
    assert_eq!(client.idle(), 1, "the request went out whole: kept");
}

/// A connection goes back to the idle list of the serving thread that opened it and is taken
/// only there (a socket stays with the reactor that opened it); threads outside the serving
/// threads share a list of their own.
#[tokio::test]
async fn an_idle_connection_serves_only_the_thread_that_opened_it() {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    // Every request on every connection is answered; each answer names its connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let opened = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&opened);
    #[expect(clippy::disallowed_methods, reason = "a test's upstream")]
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let number = counter.fetch_add(1, Ordering::Relaxed) + 1;
            #[expect(clippy::disallowed_methods, reason = "a test's upstream")]
            tokio::spawn(async move {
                while read_request(&mut socket).await.is_some() {
                    let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n{number}");
                    if socket.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let client = client();
    let workers = crate::workers::Workers::start(2).unwrap();
    let (first, _a) = workers.pick();
    let (second, _b) = workers.pick();
    let call = |handle: &tokio::runtime::Handle| {
        let client = client.clone();
        let call = handle.spawn(async move {
            let response = client.send(post(port, "{}")).await.unwrap();
            read_all(response).await.unwrap()
        });
        async move { call.await.unwrap() }
    };
    assert_eq!(call(first).await, "1");
    assert_eq!(client.idle(), 1);
    assert_eq!(call(second).await, "2", "not the first thread's connection");
    assert_eq!(client.idle(), 2);
    assert_eq!(call(first).await, "1");
    assert_eq!(call(second).await, "2");
    // This test's own thread is not a serving thread: a list of its own.
    let response = client.send(post(port, "{}")).await.unwrap();
    assert_eq!(read_all(response).await.unwrap(), "3");
    assert_eq!(client.idle(), 3);
    assert_eq!(opened.load(Ordering::Relaxed), 3);
    workers.stop().await;
}
