//! Connection-level protection (issue 11): idle HTTP/2 connections, the first-request
//! deadline, the per-client connection cap, and a stalled HTTP/2 reader's run.
//!
//! The HTTP/2 client is the bare `h2` crate: it can hold a connection open (answering the
//! server's PINGs) without sending a request, and keep a stream's flow-control window shut.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};

use crate::helpers::*;

/// An HTTP/2 connection whose driver (which answers PINGs) runs on its own task; the task
/// ends when the server closes the connection.
struct H2 {
    send: h2::client::SendRequest<Bytes>,
    closed: JoinHandle<Result<(), h2::Error>>,
}

async fn h2_connect(addr: SocketAddr, stream_window: u32) -> H2 {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(stream_window)
        .initial_connection_window_size(1 << 20)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    H2 {
        send,
        closed: tokio::spawn(conn),
    }
}

impl H2 {
    async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> http::Response<h2::RecvStream> {
        let mut send = self.send.clone().ready().await.unwrap();
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://duet{path}"));
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let (resp, mut stream) = send
            .send_request(req.body(()).unwrap(), body.is_none())
            .unwrap();
        if let Some(body) = body {
            stream
                .send_data(Bytes::from(body.to_string()), true)
                .unwrap();
        }
        resp.await.unwrap()
    }

    /// Whether the server has closed the connection within `within` (test clock).
    async fn closed_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, &mut self.closed).await.is_ok()
    }
}

/// Reads a body to its end, giving back flow-control capacity as it goes.
async fn read_all(mut body: h2::RecvStream) -> Vec<u8> {
    let mut all = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        all.extend_from_slice(&chunk);
    }
    all
}

/// Whether the server closes a plain TCP connection within `within` (EOF or reset).
async fn tcp_closed_within(sock: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(within, async {
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    read.await.is_ok()
}

#[tokio::test(start_paused = true)]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let app = spawn_app(
        normal_flash(),
        normal_pro(),
        &[
            ("HTTP2_IDLE_TIMEOUT_S", "5"),
            ("FIRST_REQUEST_TIMEOUT_S", "30"),
        ],
    )
    .await;
    let mut conn = h2_connect(app.addr, 65_535).await;
    let resp = conn.request("GET", "/healthz", None).await;
    assert_eq!(resp.status(), 200);
    read_all(resp.into_body()).await;
    // Idle from here, but alive: the driver task answers the server's PINGs.
    assert!(
        !conn.closed_within(Duration::from_secs(4)).await,
        "closed before the idle timeout"
    );
    assert!(
        conn.closed_within(Duration::from_secs(5)).await,
        "an idle HTTP/2 connection stays open"
    );
    let m = metrics_text(&app).await;
    assert!(
        m.contains(r#"duet_connections_closed_total{reason="idle"} 1"#),
        "{m}"
    );
}

/// The idle timeout counts streams, not bytes: a stream that sends nothing for longer than
/// the idle timeout (Pro thinking) keeps its connection, and ends with `done` as usual.
#[tokio::test(start_paused = true)]
async fn a_quiet_open_stream_keeps_its_http2_connection() {
    let app = spawn_app(
        normal_flash(),
        vec![ms(12_000), Step::Delta("late"), Step::Finish],
        &[
            ("HTTP2_IDLE_TIMEOUT_S", "3"),
            ("SSE_KEEPALIVE_S", "60"),
            ("PRO_TIMEOUT_S", "30"),
        ],
    )
    .await;
    let mut conn = h2_connect(app.addr, 65_535).await;
    let resp = conn
        .request("POST", "/query/stream", Some(json!({"query": "q"})))
        .await;
    assert_eq!(resp.status(), 200);
    let text = String::from_utf8(read_all(resp.into_body()).await).unwrap();
    assert!(text.contains("event: pro"), "{text}");
    assert!(text.contains(r#""status":"ok""#), "{text}");
    // And once the stream is over, the connection is idle like any other.
    assert!(conn.closed_within(Duration::from_secs(8)).await);
}

#[tokio::test(start_paused = true)]
async fn a_connection_without_a_request_is_closed_at_the_first_request_deadline() {
    let app = spawn_app(
        normal_flash(),
        normal_pro(),
        &[
            ("FIRST_REQUEST_TIMEOUT_S", "3"),
            ("HEADER_READ_TIMEOUT_S", "30"),
            ("HTTP2_IDLE_TIMEOUT_S", "600"),
        ],
    )
    .await;
    // HTTP/2: the preface and SETTINGS, then nothing but PING answers.
    let mut conn = h2_connect(app.addr, 65_535).await;
    // HTTP/1.1: a request line trickling in, a byte at a time, never finished.
    let mut h1 = TcpStream::connect(app.addr).await.unwrap();
    let trickle = async {
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " {
            if h1.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        loop {
            if h1.write_all(b"a").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(6), trickle).await;
    assert!(
        conn.closed_within(Duration::from_millis(10)).await,
        "an HTTP/2 connection with no request stays open"
    );
    assert!(
        tcp_closed_within(&mut h1, Duration::from_millis(10)).await,
        "an HTTP/1.1 connection with no whole request stays open"
    );
    let m = metrics_text(&app).await;
    assert!(
        m.contains(r#"duet_connections_closed_total{reason="first_request"} 2"#),
        "{m}"
    );
}

#[tokio::test(start_paused = true)]
async fn connections_past_the_per_client_cap_are_closed_at_once() {
    let app = spawn_app(
        normal_flash(),
        normal_pro(),
        &[
            ("MAX_CONNECTIONS_PER_CLIENT", "5"),
            ("FIRST_REQUEST_TIMEOUT_S", "600"),
            ("HTTP2_IDLE_TIMEOUT_S", "600"),
        ],
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut conn = h2_connect(app.addr, 65_535).await;
        assert!(!conn.closed_within(Duration::from_millis(100)).await);
        held.push(conn);
    }
    // The sixth from the same address is accepted by the kernel and closed by duet at once.
    let mut sixth = TcpStream::connect(app.addr).await.unwrap();
    let _ = sixth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert!(tcp_closed_within(&mut sixth, Duration::from_millis(100)).await);
    let mut buf = Vec::new();
    let _ = sixth.read_to_end(&mut buf).await;
    assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));

    // Another address still gets in (every 127.x.y.z address is this host's loopback).
    let other = reqwest::Client::builder()
        .no_proxy()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let resp = other.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let m = other
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains(r#"duet_connections_refused_total{reason="per_client"} 1"#),
        "{m}"
    );

    // Once the five are gone, their address has its places back.
    for conn in held {
        conn.closed.abort();
    }
    let mut ok = false;
    for _ in 0..50 {
        let fresh = reqwest::Client::builder().no_proxy().build().unwrap();
        if let Ok(resp) = fresh.get(app.url("/healthz")).send().await {
            ok = resp.status() == 200;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "the address never got its places back");
}

/// A client that stops reading an HTTP/2 stream but keeps its connection (the window shut,
/// PINGs answered) is let go after `CLIENT_WRITE_TIMEOUT_S`: the run is cancelled, both
/// upstream calls dropped, the run audited `cancelled`, and when the client reads again its
/// stream still ends with `done` (`cancelled`).
#[tokio::test(start_paused = true)]
async fn a_stalled_http2_reader_is_let_go_and_still_gets_done() {
    let chunk: &'static str = "x".repeat(1000).leak();
    let mut pro = vec![ms(100)];
    for _ in 0..500 {
        pro.push(Step::Delta(chunk));
        pro.push(ms(1));
    }
    pro.push(Step::Finish);
    let app = spawn_app(
        vec![ms(50), Step::Hang],
        pro,
        &[
            ("CLIENT_WRITE_TIMEOUT_S", "2"),
            ("PRO_TIMEOUT_S", "60"),
            ("FLASH_TIMEOUT_S", "60"),
            ("STALL_TIMEOUT_S", "60"),
        ],
    )
    .await;
    // A 4 KiB window, never given back while stalled: the server can send 4 KiB of events.
    let mut conn = h2_connect(app.addr, 4096).await;
    let resp = conn
        .request(
            "POST",
            "/query/stream",
            Some(json!({"query": "q", "deltas": true})),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let body = resp.into_body();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let records = app.records(1).await;
    assert_eq!(records[0].status.as_str(), "cancelled");
    assert_eq!(app.pro.dropped(), 1, "the Pro call was not dropped");
    assert_eq!(app.flash.dropped(), 1, "the Flash call was not dropped");
    assert!(
        app.pro.yielded.load(std::sync::atomic::Ordering::SeqCst) < 100,
        "the run kept going for a reader who stopped"
    );
    // The connection is still open; reading again gets what was queued, then `done`.
    let text = String::from_utf8(read_all(body).await).unwrap();
    let last = text
        .trim_end()
        .rsplit("\n\n")
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(last.starts_with("event: done"), "{last}");
    assert!(last.contains(r#""status":"cancelled""#), "{last}");
    drop(conn);
}

async fn metrics_text(app: &TestApp) -> String {
    app.client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A stalled stream holds a bounded number of bytes, not a number of events: with 8 KiB
/// deltas and the client's window shut, the run stops producing after about
/// `STREAM_BUFFER_BYTES` (32 KiB) of events, where sixteen queued events were 128 KiB.
#[tokio::test(start_paused = true)]
async fn a_stalled_stream_buffers_a_bounded_number_of_bytes() {
    let chunk: &'static str = "y".repeat(8 * 1024).leak();
    let mut pro = vec![ms(100)];
    for _ in 0..200 {
        pro.push(Step::Delta(chunk));
    }
    pro.push(Step::Finish);
    let app = spawn_app(
        vec![ms(50), Step::Hang],
        pro,
        &[
            ("CLIENT_WRITE_TIMEOUT_S", "30"),
            ("PRO_TIMEOUT_S", "60"),
            ("FLASH_TIMEOUT_S", "60"),
        ],
    )
    .await;
    let mut conn = h2_connect(app.addr, 4096).await;
    let resp = conn
        .request(
            "POST",
            "/query/stream",
            Some(json!({"query": "q", "deltas": true})),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let _body = resp.into_body();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let produced = app.pro.yielded.load(std::sync::atomic::Ordering::SeqCst);
    // 32 KiB is four of these events; one more is in the window, one waits for room.
    assert!(
        (3..=7).contains(&produced),
        "a stalled run produced {produced} events of 8 KiB"
    );
}
