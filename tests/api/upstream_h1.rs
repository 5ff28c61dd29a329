//! duet's own HTTP/1.1 client (`src/providers/h1`) end to end, against a raw-socket upstream
//! that writes the exact bytes each case needs: what real servers send ends `ok`, what a
//! hostile one sends ends in an `error` then `done` within the deadlines, with one audit
//! record per run, and the connection pool neither reuses a tainted connection nor leaks one.
//! Real sockets, so real time: the margins are generous.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use duet::{
    audit::MemorySink,
    config::Config,
    server::{Parts, Server},
};
use serde_json::{Value, json};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};

use crate::{helpers::*, upstream::*};

/// What the upstream does once an answer is written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Waits for the next request on the connection.
    Keep,
    /// Closes the connection (FIN).
    Close,
    /// Resets the connection (RST).
    Reset,
}

/// One answer: pieces written with a pause before each, then what happens to the connection.
#[derive(Clone)]
struct Answer {
    pieces: Vec<(Duration, Vec<u8>)>,
    then: Then,
}

impl Answer {
    fn at_once(bytes: Vec<u8>, then: Then) -> Answer {
        Answer {
            pieces: vec![(Duration::ZERO, bytes)],
            then,
        }
    }
}

/// The answer to the `n`th request (from 1) on the `c`th connection (from 1); `None`
/// closes the connection without answering.
type Script = Arc<dyn Fn(usize, usize) -> Option<Answer> + Send + Sync>;

struct Raw {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Connections open now (closed by either side: counted down at EOF or error).
    open: Arc<AtomicUsize>,
}

impl Raw {
    async fn start(script: Script) -> Raw {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (counted, live) = (Arc::clone(&accepted), Arc::clone(&open));
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let c = counted.fetch_add(1, Ordering::SeqCst) + 1;
                live.fetch_add(1, Ordering::SeqCst);
                let (script, live) = (Arc::clone(&script), Arc::clone(&live));
                tokio::spawn(async move {
                    serve(socket, c, &*script).await;
                    live.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Raw {
            addr,
            accepted,
            open,
        }
    }

    fn base(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

/// Serves one connection's requests until the script or the client ends it.
async fn serve(
    mut socket: TcpStream,
    c: usize,
    script: &(dyn Fn(usize, usize) -> Option<Answer> + Send + Sync),
) {
    let mut buf = Vec::new();
    let _ = socket.set_nodelay(true);
    for n in 1.. {
        if read_request(&mut socket, &mut buf).await.is_none() {
            return;
        }
        let Some(answer) = script(c, n) else {
            return;
        };
        for (pause, bytes) in answer.pieces {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            if socket.write_all(&bytes).await.is_err() {
                return;
            }
        }
        match answer.then {
            Then::Keep => {}
            Then::Close => return,
            Then::Reset => {
                #[allow(deprecated, reason = "SO_LINGER 0 is how a reset is asked for")]
                let _ = socket.set_linger(Some(Duration::ZERO));
                return;
            }
        }
    }
}

/// OpenAI's streamed answer, byte for byte.
fn sse_body() -> Vec<u8> {
    wire("openai_stream_ok.sse")
}

const SSE: &str = "content-type: text/event-stream\r\n";

fn with_length(status_line: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "{status_line}\r\n{SSE}content-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// A chunked body in pieces of `size`, each size line written by `line`.
fn chunked(body: &[u8], size: usize, line: impl Fn(usize) -> String) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in body.chunks(size) {
        out.extend_from_slice(line(piece.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

struct App {
    server: Option<Server>,
    addr: std::net::SocketAddr,
    sink: MemorySink,
    client: reqwest::Client,
}

impl App {
    /// duet with Flash (OpenAI's adapter) on `flash_base` and a fast simulated Pro.
    async fn start(flash_base: String, extra: &[(&str, &str)]) -> App {
        let mut map: HashMap<&str, &str> = HashMap::from([
            ("BIND_ADDR", "127.0.0.1:0"),
            ("LOG_FORMAT", "pretty"),
            ("FLASH_PROVIDER", "openai"),
            ("FLASH_BASE_URL", flash_base.as_str()),
            ("FLASH_API_KEY", KEY),
            ("SIMULATED_PRO_TTFT_S", "0.01"),
            ("SIMULATED_PRO_TOKEN_S", "0.001"),
            ("RATE_LIMIT_PER_MINUTE", "0"),
        ]);
        map.extend(extra.iter().copied());
        let config = Config::from_source(&map).unwrap();
        let sink = MemorySink::new();
        let parts = Parts::from_config(config, Arc::new(sink.clone())).unwrap();
        let server = Server::start(parts).await.unwrap();
        App {
            addr: server.addr,
            server: Some(server),
            sink,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    async fn run(&self) -> Vec<Ev> {
        let resp = self
            .client
            .post(format!("http://{}/query/stream", self.addr))
            .json(&json!({"query": "q"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let events = read_events(resp).await;
        check_invariants(&events);
        events
    }

    /// Waits until `n` records are stored, then checks that no more come.
    async fn exactly_records(&self, n: usize) -> Vec<duet::audit::RunRecord> {
        for _ in 0..500 {
            if self.sink.records().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let records = self.sink.records();
        assert_eq!(records.len(), n, "one record per run");
        records
    }

    async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await.unwrap();
        }
    }
}

/// The Flash error event of a run, if any.
fn flash_error(events: &[Ev]) -> Option<&Value> {
    events
        .iter()
        .find(|e| e.event == "error" && e.data["model"] == "flash")
        .map(|e| &e.data)
}

/// Responses real servers (and a careless one) send: every one ends `ok`, twice in a row on
/// the same upstream, so a connection kept after the first answer serves the second.
#[tokio::test]
async fn every_response_shape_a_real_server_sends_ends_ok() {
    let body = sse_body();
    let ok = "HTTP/1.1 200 OK";
    let mut cases: Vec<(&str, Answer)> =
        vec![
        (
            "no reason phrase (uvicorn-style status line)",
            Answer::at_once(with_length("HTTP/1.1 200", &body), Then::Keep),
        ),
        (
            "uppercase hex with leading zeros and a quoted extension",
            Answer::at_once(
                [
                    format!("{ok}\r\n{SSE}transfer-encoding: chunked\r\n\r\n").into_bytes(),
                    chunked(&body, 97, |n| format!("{n:08X};name=\"a;b c\"")),
                ]
                .concat(),
                Then::Keep,
            ),
        ),
        (
            "interim 100 and 103 first",
            Answer::at_once(
                [
                    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"
                        .to_vec(),
                    with_length(ok, &body),
                ]
                .concat(),
                Then::Keep,
            ),
        ),
        (
            "both Transfer-Encoding and Content-Length",
            Answer::at_once(
                [
                    format!("{ok}\r\n{SSE}content-length: 3\r\ntransfer-encoding: chunked\r\n\r\n")
                        .into_bytes(),
                    chunked(&body, 200, |n| format!("{n:x}")),
                ]
                .concat(),
                Then::Keep,
            ),
        ),
        (
            "Transfer-Encoding: identity, read to the close",
            Answer::at_once(
                [
                    format!("{ok}\r\n{SSE}transfer-encoding: identity\r\n\r\n").into_bytes(),
                    body.clone(),
                ]
                .concat(),
                Then::Close,
            ),
        ),
        (
            "HTTP/1.0, read to the close",
            Answer::at_once(
                [format!("HTTP/1.0 200 OK\r\n{SSE}\r\n").into_bytes(), body.clone()].concat(),
                Then::Close,
            ),
        ),
        (
            "a body going on past its Content-Length, a false answer after it",
            Answer::at_once(
                [
                    with_length(ok, &body),
                    b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL".to_vec(),
                ]
                .concat(),
                Then::Keep,
            ),
        ),
        (
            "the false answer a little later, while the connection is idle",
            Answer {
                pieces: vec![
                    (Duration::ZERO, with_length(ok, &body)),
                    (
                        Duration::from_millis(30),
                        b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL".to_vec(),
                    ),
                ],
                then: Then::Keep,
            },
        ),
        (
            "a body whose last bytes come with a reset",
            Answer::at_once(with_length(ok, &body), Then::Reset),
        ),
    ];
    // The head and body cut at every byte.
    // The head and body cut at every byte (the head's bytes 1 ms apart).
    let head = format!("{ok}\r\n{SSE}transfer-encoding: chunked\r\n\r\n").into_bytes();
    let rest = chunked(&body, 64, |n| format!("{n:x}"));
    cases.push((
        "every byte on its own",
        Answer {
            pieces: head
                .iter()
                .map(|b| (Duration::from_millis(1), vec![*b]))
                .chain(rest.iter().map(|b| (Duration::ZERO, vec![*b])))
                .collect(),
            then: Then::Keep,
        },
    ));
    // The cases at once, each with its own upstream and service: sequentially they took
    // 16 s of the suite.
    futures::future::join_all(cases.into_iter().map(|(name, answer)| async move {
        let upstream = Raw::start(Arc::new(move |_, _| Some(answer.clone()))).await;
        // Pro answers after Flash, so that Flash's answer is read to its end.
        let app = App::start(upstream.base(), &[("SIMULATED_PRO_TTFT_S", "0.5")]).await;
        for run in 1..=2 {
            let events = app.run().await;
            assert_eq!(flash_error(&events), None, "{name}, run {run}");
            assert_eq!(
                done(&events)["flash"],
                "ok",
                "{name}, run {run}: {events:?}"
            );
            // The false answer would be a 4-byte body: not an SSE stream, so not `ok`.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        app.exactly_records(2).await;
        app.stop().await;
    }))
    .await;
}

/// Hostile upstreams: each run ends in Flash's `error` then `done`, within Flash's deadlines
/// (first token 1 s, total 3 s), with one record, and the key in no event.
#[tokio::test]
async fn hostile_responses_end_in_error_then_done_within_the_deadlines() {
    let flood = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(10_000);
    let slow_head: Vec<(Duration, Vec<u8>)> = b"HTTP/1.1 200 OK\r\nx-slow: "
        .iter()
        .chain(std::iter::repeat_n(&b'a', 100))
        .map(|b| (Duration::from_millis(100), vec![*b]))
        .collect();
    let cases: Vec<(&str, Answer)> = vec![
        ("a flood of 100 Continue", Answer::at_once(flood, Then::Keep)),
        (
            "a head one byte per 100 ms",
            Answer {
                pieces: slow_head,
                then: Then::Keep,
            },
        ),
        (
            "a chunk of 2^63 bytes, then the close",
            Answer::at_once(
                format!("HTTP/1.1 200 OK\r\n{SSE}transfer-encoding: chunked\r\n\r\n8000000000000000\r\ndata: x\n\n")
                    .into_bytes(),
                Then::Close,
            ),
        ),
        (
            "an obs-fold header line",
            Answer::at_once(
                format!("HTTP/1.1 200 OK\r\n{SSE}x-a: 1\r\n folded\r\ncontent-length: 0\r\n\r\n")
                    .into_bytes(),
                Then::Keep,
            ),
        ),
        (
            "a header name with a space",
            Answer::at_once(
                format!("HTTP/1.1 200 OK\r\n{SSE}x a: 1\r\ncontent-length: 0\r\n\r\n").into_bytes(),
                Then::Keep,
            ),
        ),
        (
            "a reset in the middle of the body",
            Answer::at_once(
                format!("HTTP/1.1 200 OK\r\n{SSE}content-length: 100000\r\n\r\ndata: {{")
                    .into_bytes(),
                Then::Reset,
            ),
        ),
        (
            "status 999",
            Answer::at_once(
                b"HTTP/1.1 999 Odd\r\ncontent-length: 0\r\n\r\n".to_vec(),
                Then::Keep,
            ),
        ),
    ];
    // The cases at once, each with its own upstream and service (26 s of the suite one
    // after the other).
    futures::future::join_all(cases.into_iter().map(|(name, answer)| async move {
        let upstream = Raw::start(Arc::new(move |_, _| Some(answer.clone()))).await;
        // Pro answers after Flash's deadlines, so that Flash's end is seen.
        let app = App::start(
            upstream.base(),
            &[
                ("FLASH_TTFT_TIMEOUT_S", "1"),
                ("FLASH_TIMEOUT_S", "3"),
                ("SIMULATED_PRO_TTFT_S", "3.5"),
            ],
        )
        .await;
        let started = Instant::now();
        let events = app.run().await;
        assert!(started.elapsed() < Duration::from_secs(6), "{name}");
        let error = flash_error(&events).unwrap_or_else(|| panic!("{name}: {:?}", names(&events)));
        let text =
            serde_json::to_string(&events.iter().map(|e| &e.data).collect::<Vec<_>>()).unwrap();
        assert!(!text.contains(KEY), "{name}: the key leaked");
        assert_eq!(events.last().unwrap().event, "done", "{name}");
        let records = app.exactly_records(1).await;
        let flash = &records[0].flash;
        assert!(flash.error_message.is_some(), "{name}: {error}");
        // Within the first-token deadline (1 s), retries included.
        assert!(flash.latency_ms < 1400, "{name}: {} ms", flash.latency_ms);
        eprintln!(
            "{name}: {} after {} ms",
            error["error_type"], flash.latency_ms
        );
        app.stop().await;
    }))
    .await;
}

/// An idle kept connection that the upstream closes when the next request arrives (its idle
/// timeout struck just then): the call fails before any byte, is retried before the first
/// token on a new connection, and the run ends `ok`.
#[tokio::test]
async fn an_idle_connection_closed_as_the_next_request_arrives_is_retried() {
    let body = sse_body();
    let upstream = Raw::start(Arc::new(move |c, n| {
        (c > 1 || n == 1)
            .then(|| Answer::at_once(with_length("HTTP/1.1 200 OK", &body), Then::Keep))
    }))
    .await;
    let app = App::start(upstream.base(), &[("SIMULATED_PRO_TTFT_S", "0.5")]).await;
    for run in 1..=2 {
        let events = app.run().await;
        assert_eq!(done(&events)["flash"], "ok", "run {run}: {events:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 2);
    app.exactly_records(2).await;
    app.stop().await;
}

/// Sockets on this machine connected to `port` on 127.0.0.1 that the other side closed and
/// this side has not (`CLOSE_WAIT` in /proc/net/tcp): duet's end of upstream connections the
/// upstream closed. Counted by the upstream's own port, so tests running alongside (which
/// open and close descriptors of the same process all the time) do not disturb it.
fn close_wait_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let remote = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(2) == Some(&remote.as_str()) && fields.get(3) == Some(&"08")
        })
        .count()
}

/// An upstream that offers keep-alive and then closes every connection after its answer:
/// the closed idle connections are found and closed, so many runs leave no descriptor
/// behind (`H1_FD_RUNS` runs, 30 by default).
#[tokio::test]
async fn runs_against_an_upstream_closing_every_connection_leak_no_descriptor() {
    if !std::path::Path::new("/proc/net/tcp").exists() {
        skip("no /proc/net/tcp here");
        return;
    }
    let runs: usize = std::env::var("H1_FD_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(30);
    let body = sse_body();
    let upstream = Raw::start(Arc::new(move |_, _| {
        Some(Answer::at_once(
            with_length("HTTP/1.1 200 OK", &body),
            Then::Close,
        ))
    }))
    .await;
    let app = App::start(upstream.base(), &[("SIMULATED_PRO_TTFT_S", "0.05")]).await;
    for _ in 0..5 {
        assert_eq!(done(&app.run().await)["flash"], "ok");
    }
    for run in 0..runs {
        let events = app.run().await;
        assert_eq!(done(&events)["flash"], "ok", "run {run}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lingering = close_wait_to(upstream.addr.port());
    eprintln!("{lingering} closed connections still open after {runs} runs");
    // At most the one the idle list holds until the next call looks at it.
    assert!(lingering <= 1, "{lingering} after {runs} runs");
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), runs + 5);
    app.stop().await;
}

/// Many calls at once, then quiet: the upstream sees at most 256 connections kept open by
/// duet's idle list (the rest closed as their calls end).
#[tokio::test]
async fn after_many_concurrent_calls_at_most_256_connections_stay_idle() {
    const C: usize = 300;
    let body = sse_body();
    let upstream = Raw::start(Arc::new(move |_, _| {
        Some(Answer {
            // Long enough that all the runs' calls are open at once even on a loaded
            // machine (at 1 s, one run in twelve found 243 connections for 300 calls).
            pieces: vec![(
                Duration::from_secs(3),
                with_length("HTTP/1.1 200 OK", &body),
            )],
            then: Then::Keep,
        })
    }))
    .await;
    let app = App::start(upstream.base(), &[("SIMULATED_PRO_TTFT_S", "3.5")]).await;
    let runs = (0..C).map(|_| app.run());
    for events in futures::future::join_all(runs).await {
        assert_eq!(done(&events)["flash"], "ok");
    }
    let accepted = upstream.accepted.load(Ordering::SeqCst);
    assert!(
        accepted > 256,
        "{accepted}: not enough calls at once to fill the idle list"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let open = upstream.open.load(Ordering::SeqCst);
    eprintln!("{accepted} connections made, {open} kept");
    assert!(open <= 256, "{open} connections kept");
    assert!(open >= 200, "{open}: the idle list keeps what it may");
    app.exactly_records(C).await;
    app.stop().await;
}
