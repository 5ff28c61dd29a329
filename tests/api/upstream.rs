//! The real adapters against a raw HTTP server on loopback that replays the byte-exact
//! fixtures of `tests/fixtures/wire`, cut where parsers break: inside a line, between CR and LF,
//! inside a multi-byte character.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use duet::{
    domain::Role,
    providers::{
        Completion, ErrorType, ModelRequest, Provider, ProviderError, ProviderEvent,
        anthropic::Anthropic,
        gemini::Gemini,
        http::{BodyLimits, redact},
        openai::OpenAi,
        pool::{PoolConfig, Upstream},
    },
};
use futures::StreamExt;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

pub(crate) const KEY: &str = "sk-test-PLANTED-key-0123456789abcdef";

/// `tests/fixtures/wire`: byte-exact provider bodies, kept in the repository.
pub(crate) fn wire(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/wire")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "wire fixture {} is missing ({e}): the fixtures live in tests/fixtures/wire",
            path.display()
        )
    })
}

/// What the server does after its chunks.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Then {
    Close,
    Hang,
}

/// One scripted answer.
#[derive(Clone, Debug)]
pub(crate) enum Reply {
    /// Accept the connection and close it without a byte.
    Drop,
    Http {
        status: u16,
        headers: Vec<(&'static str, String)>,
        chunks: Vec<Vec<u8>>,
        gap: Duration,
        then: Then,
    },
    /// A line that never ends, sent as fast as the client reads.
    Endless,
}

pub(crate) fn sse(body: Vec<u8>) -> Reply {
    Reply::Http {
        status: 200,
        headers: vec![("content-type", "text/event-stream".into())],
        chunks: vec![body],
        gap: Duration::ZERO,
        then: Then::Close,
    }
}

pub(crate) fn sse_chunks(chunks: Vec<Vec<u8>>) -> Reply {
    Reply::Http {
        status: 200,
        headers: vec![("content-type", "text/event-stream".into())],
        chunks,
        gap: Duration::from_millis(5),
        then: Then::Close,
    }
}

pub(crate) fn status(code: u16, body: Vec<u8>) -> Reply {
    Reply::Http {
        status: code,
        headers: vec![("content-type", "application/json".into())],
        chunks: vec![body],
        gap: Duration::ZERO,
        then: Then::Close,
    }
}

pub(crate) fn with_header(mut reply: Reply, name: &'static str, value: &str) -> Reply {
    if let Reply::Http { headers, .. } = &mut reply {
        headers.push((name, value.to_owned()));
    }
    reply
}

pub(crate) fn then(mut reply: Reply, next: Then) -> Reply {
    if let Reply::Http { then, .. } = &mut reply {
        *then = next;
    }
    reply
}

#[derive(Clone, Debug)]
pub(crate) struct Captured {
    pub head: String,
    pub body: serde_json::Value,
}

/// Serves the replies in order, one per connection (the last repeats), and keeps every request.
pub(crate) struct FixtureServer {
    pub addr: std::net::SocketAddr,
    pub requests: Arc<Mutex<Vec<Captured>>>,
}

impl FixtureServer {
    pub(crate) async fn start(replies: Vec<Reply>) -> FixtureServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((socket, _)) = listener.accept().await {
                let reply = replies[n.min(replies.len() - 1)].clone();
                n += 1;
                let seen = Arc::clone(&seen);
                tokio::spawn(async move { answer(socket, reply, seen).await });
            }
        });
        FixtureServer { addr, requests }
    }

    pub(crate) fn base(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub(crate) fn requests(&self) -> Vec<Captured> {
        self.requests.lock().unwrap().clone()
    }
}

/// Reads one request from `socket`: its head (as sent) and its `Content-Length` body. `buf`
/// holds what was read past the previous request on the connection, and keeps what is read
/// past this one. `None` when the connection ends (or fails) before the request is whole.
pub(crate) async fn read_request(
    socket: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Option<(String, Vec<u8>)> {
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf[head_end..head_end + length].to_vec();
    buf.drain(..head_end + length);
    Some((head, body))
}

async fn answer(mut socket: TcpStream, reply: Reply, seen: Arc<Mutex<Vec<Captured>>>) {
    socket.set_nodelay(true).unwrap();
    if let Reply::Drop = reply {
        return;
    }
    let Some((head, body)) = read_request(&mut socket, &mut Vec::new()).await else {
        return;
    };
    let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    seen.lock().unwrap().push(Captured { head, body });
    match reply {
        Reply::Drop => {}
        Reply::Endless => {
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\ndata: ")
                .await;
            let junk = vec![b'x'; 64 * 1024];
            while socket.write_all(&junk).await.is_ok() {}
        }
        Reply::Http {
            status,
            headers,
            chunks,
            gap,
            then,
        } => {
            let mut head = format!("HTTP/1.1 {status} X\r\nconnection: close\r\n");
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            if socket.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            for c in chunks {
                tokio::time::sleep(gap).await;
                if socket.write_all(&c).await.is_err() {
                    return;
                }
                let _ = socket.flush().await;
            }
            if let Then::Hang = then {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        }
    }
}

pub(crate) fn client() -> Upstream {
    Upstream::new(PoolConfig::single()).unwrap()
}

pub(crate) fn request(query: &str, system: Option<&str>) -> ModelRequest {
    ModelRequest {
        role: Role::Flash,
        conversation: std::sync::Arc::new(
            duet::conversation::Conversation::from_query(
                query.into(),
                system.map(Into::into),
                usize::MAX,
            )
            .unwrap(),
        ),
        params: Default::default(),
        sampling: Default::default(),
        trace: None,
    }
}

pub(crate) fn gemini(server: &FixtureServer, limits: BodyLimits) -> Gemini {
    Gemini::new(
        client(),
        &server.base("/v1beta"),
        "gemini-2.5-flash",
        KEY,
        limits,
    )
    .unwrap()
}

pub(crate) fn openai(server: &FixtureServer, limits: BodyLimits) -> OpenAi {
    OpenAi::new(client(), &server.base("/v1"), "gpt-4.1-mini", KEY, limits).unwrap()
}

pub(crate) fn anthropic(server: &FixtureServer, limits: BodyLimits) -> Anthropic {
    Anthropic::new(client(), &server.base(""), "claude-sonnet-4-5", KEY, limits).unwrap()
}

/// Runs one call to its end: the text, and the completion or the error.
pub(crate) async fn run(
    provider: &dyn Provider,
    req: &ModelRequest,
) -> (String, Result<Completion, ProviderError>) {
    let mut stream = provider.stream(req);
    let mut text = String::new();
    let result = loop {
        match stream.next().await {
            Some(Ok(ProviderEvent::Delta(t))) => text.push_str(&t),
            Some(Ok(ProviderEvent::Finished(c))) => {
                assert!(stream.next().await.is_none(), "nothing after Finished");
                break Ok(c);
            }
            Some(Err(e)) => break Err(e),
            None => panic!("the stream ended with neither Finished nor an error"),
        }
    };
    (text, result)
}

const HAIKU: &str = "Gray waves fold to foam\u{2014}\nsalt wind combs the restless tide,\nthe moon keeps its count.";

/// Cuts a body inside its first line, between its first CR and LF (or after its first LF),
/// and inside its first multi-byte character.
fn awkward_chunks(body: &[u8]) -> Vec<Vec<u8>> {
    let mut cuts = vec![7];
    if let Some(i) = body.iter().position(|b| *b == b'\r' || *b == b'\n') {
        cuts.push(i + 1);
    }
    if let Some(i) = body.iter().position(|b| *b >= 0xC0) {
        cuts.push(i + 1);
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut chunks = Vec::new();
    let mut from = 0;
    for cut in cuts {
        chunks.push(body[from..cut].to_vec());
        from = cut;
    }
    chunks.push(body[from..].to_vec());
    chunks
}

#[tokio::test]
async fn gemini_streams_the_fixture_through_awkward_chunks_and_sends_the_right_request() {
    for file in ["gemini_stream_ok.sse", "gemini_stream_ok_lf.sse"] {
        let server = FixtureServer::start(vec![sse_chunks(awkward_chunks(&wire(file)))]).await;
        let p = gemini(&server, BodyLimits::default());
        let (text, done) = run(&p, &request("Write a haiku", Some("Be concise"))).await;
        let c = done.unwrap();
        assert_eq!(text, HAIKU);
        assert_eq!(c.finish_reason.as_deref(), Some("STOP"));
        assert_eq!(c.model_version.as_deref(), Some("gemini-2.5-flash"));
        assert_eq!(
            (c.usage.input_tokens, c.usage.output_tokens),
            (Some(14), Some(390))
        );
        let req = &server.requests()[0];
        assert!(
            req.head.starts_with(
                "POST /v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse HTTP/1.1"
            ),
            "{}",
            req.head
        );
        assert!(req.head.contains(&format!("x-goog-api-key: {KEY}")));
        assert_eq!(
            req.head.matches(KEY).count(),
            1,
            "the key is only in its header"
        );
        assert_eq!(req.body["contents"][0]["parts"][0]["text"], "Write a haiku");
        assert_eq!(req.body["contents"][0]["role"], "user");
        assert_eq!(
            req.body["systemInstruction"]["parts"][0]["text"],
            "Be concise"
        );
    }
}

#[tokio::test]
async fn openai_compatible_servers_stream_and_get_the_right_request() {
    for file in [
        "openai_stream_ok.sse",
        "openai_stream_ok_2024.sse",
        "vllm_stream_ok.sse",
        "ollama_stream_ok.sse",
        "llamacpp_stream_ok.sse",
    ] {
        let server = FixtureServer::start(vec![sse_chunks(awkward_chunks(&wire(file)))]).await;
        let p = openai(&server, BodyLimits::default());
        let (text, done) = run(&p, &request("Write a haiku", Some("Be concise"))).await;
        let c = done.unwrap_or_else(|e| panic!("{file}: {e:?}"));
        assert!(!text.is_empty(), "{file}");
        assert_eq!(c.finish_reason.as_deref(), Some("stop"), "{file}");
        assert!(c.usage.output_tokens.is_some(), "{file}");
        let req = &server.requests()[0];
        assert!(req.head.starts_with("POST /v1/chat/completions HTTP/1.1"));
        assert!(req.head.contains(&format!("authorization: Bearer {KEY}")));
        assert_eq!(req.body["stream"], true);
        assert_eq!(req.body["stream_options"]["include_usage"], true);
        assert_eq!(req.body["model"], "gpt-4.1-mini");
        assert_eq!(
            req.body["messages"],
            serde_json::json!([
                {"role": "system", "content": "Be concise"},
                {"role": "user", "content": "Write a haiku"}
            ])
        );
    }
}

#[tokio::test]
async fn anthropic_streams_and_gets_the_right_request() {
    let body = wire("anthropic_stream_ok.sse");
    let server = FixtureServer::start(vec![sse_chunks(awkward_chunks(&body))]).await;
    let p = anthropic(&server, BodyLimits::default());
    let (text, done) = run(&p, &request("Write a haiku", Some("Be concise"))).await;
    let c = done.unwrap();
    assert_eq!(text, HAIKU);
    assert_eq!(c.finish_reason.as_deref(), Some("end_turn"));
    assert_eq!(
        c.model_version.as_deref(),
        Some("claude-sonnet-4-5-20250929")
    );
    assert_eq!(
        (c.usage.input_tokens, c.usage.output_tokens),
        (Some(21), Some(22))
    );
    let req = &server.requests()[0];
    assert!(req.head.starts_with("POST /v1/messages HTTP/1.1"));
    assert!(req.head.contains(&format!("x-api-key: {KEY}")));
    assert!(req.head.contains("anthropic-version: 2023-06-01"));
    assert_eq!(req.body["stream"], true);
    assert_eq!(req.body["system"], "Be concise");
    assert!(req.body["max_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        req.body["messages"],
        serde_json::json!([{"role": "user", "content": "Write a haiku"}])
    );
}

#[tokio::test]
async fn non_stream_bodies_are_read_whole() {
    let cases = [
        ("gemini", "gemini_generate_ok.json"),
        ("openai", "openai_chat_ok.json"),
        ("anthropic", "anthropic_message_ok.json"),
    ];
    for (family, file) in cases {
        let server = FixtureServer::start(vec![status(200, wire(file))]).await;
        let p: Box<dyn Provider> = match family {
            "gemini" => Box::new(gemini(&server, BodyLimits::default())),
            "openai" => Box::new(openai(&server, BodyLimits::default())),
            _ => Box::new(anthropic(&server, BodyLimits::default())),
        };
        let (text, done) = run(&*p, &request("q", None)).await;
        assert_eq!(text, HAIKU, "{file}");
        assert!(done.unwrap().usage.output_tokens.is_some(), "{file}");
    }
}

#[tokio::test]
async fn http_errors_are_classified_with_reason_but_no_body() {
    type Case = (
        &'static str,
        Reply,
        ErrorType,
        bool,
        Option<Duration>,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "gemini",
            status(429, wire("gemini_error_429.json")),
            ErrorType::RateLimited,
            true,
            Some(Duration::from_secs(41)),
            "RESOURCE_EXHAUSTED",
        ),
        (
            "gemini",
            status(503, wire("gemini_error_503.json")),
            ErrorType::ProviderError,
            true,
            None,
            "UNAVAILABLE",
        ),
        (
            "gemini",
            status(400, wire("gemini_error_400.json")),
            ErrorType::ProviderError,
            false,
            None,
            "API_KEY_INVALID",
        ),
        (
            "openai",
            with_header(
                status(429, wire("openai_error_429.json")),
                "retry-after",
                "3",
            ),
            ErrorType::RateLimited,
            true,
            Some(Duration::from_secs(3)),
            "rate_limit_exceeded",
        ),
        (
            "openai",
            status(503, wire("openai_error_503.json")),
            ErrorType::ProviderError,
            true,
            None,
            "server_is_overloaded",
        ),
        (
            "openai",
            status(400, wire("vllm_error_400.json")),
            ErrorType::ProviderError,
            false,
            None,
            "BadRequestError",
        ),
        (
            "openai",
            status(400, wire("llamacpp_error_400.json")),
            ErrorType::ProviderError,
            false,
            None,
            "exceed_context_size_error",
        ),
        (
            "anthropic",
            with_header(
                status(529, wire("anthropic_error_529.json")),
                "x-should-retry",
                "true",
            ),
            ErrorType::ProviderError,
            true,
            None,
            "overloaded_error",
        ),
        (
            "anthropic",
            status(429, wire("anthropic_error_429.json")),
            ErrorType::RateLimited,
            true,
            None,
            "rate_limit_error",
        ),
        (
            "anthropic",
            status(500, wire("anthropic_error_500.json")),
            ErrorType::ProviderError,
            true,
            None,
            "api_error",
        ),
    ];
    for (family, reply, kind, retryable, wait, reason) in cases {
        let server = FixtureServer::start(vec![reply]).await;
        let p: Box<dyn Provider> = match family {
            "gemini" => Box::new(gemini(&server, BodyLimits::default())),
            "openai" => Box::new(openai(&server, BodyLimits::default())),
            _ => Box::new(anthropic(&server, BodyLimits::default())),
        };
        let (_, done) = run(&*p, &request("q", None)).await;
        let e = done.unwrap_err();
        assert_eq!(
            (e.error_type, e.retryable, e.retry_after),
            (kind, retryable, wait),
            "{family} {reason}"
        );
        assert!(e.message.contains(reason), "{}", e.message);
        assert!(!e.message.contains("127.0.0.1"), "{}", e.message);
        assert!(!e.message.contains(" limit for") && !e.message.contains("http"));
        assert!(
            e.detail.contains(reason),
            "detail keeps the body: {}",
            e.detail
        );
    }
}

#[tokio::test]
async fn connection_failures_before_any_byte_are_retryable() {
    // A port nobody listens on: bind one, note it, close it.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let p = OpenAi::new(
        client(),
        &format!("http://{closed}/v1"),
        "m",
        KEY,
        BodyLimits::default(),
    )
    .unwrap();
    let (_, done) = run(&p, &request("q", None)).await;
    let e = done.unwrap_err();
    assert_eq!(
        (e.error_type, e.retryable),
        (ErrorType::ProviderError, true)
    );
    assert_eq!(e.message, "could not reach openai");
    assert!(!e.message.contains("127.0.0.1"));

    // Accepted, then closed without a byte: a reset before the response.
    let server = FixtureServer::start(vec![Reply::Drop]).await;
    let (_, done) = run(&gemini(&server, BodyLimits::default()), &request("q", None)).await;
    let e = done.unwrap_err();
    assert_eq!(
        (e.error_type, e.retryable),
        (ErrorType::ProviderError, true)
    );
}

#[tokio::test]
async fn midstream_errors_over_http() {
    let cases = [
        ("gemini", "gemini_stream_midstream_error_data.sse", true),
        ("gemini", "gemini_stream_midstream_error_raw.sse", false),
        ("openai", "openai_stream_midstream_error.sse", true),
        ("openai", "vllm_stream_midstream_error.sse", true),
        ("openai", "llamacpp_stream_midstream_error.sse", true),
        (
            "openai",
            "llamacpp_stream_midstream_error_legacy.sse",
            false,
        ),
        ("anthropic", "anthropic_stream_midstream_error.sse", true),
    ];
    for (family, file, retryable) in cases {
        let server = FixtureServer::start(vec![sse(wire(file))]).await;
        let p: Box<dyn Provider> = match family {
            "gemini" => Box::new(gemini(&server, BodyLimits::default())),
            "openai" => Box::new(openai(&server, BodyLimits::default())),
            _ => Box::new(anthropic(&server, BodyLimits::default())),
        };
        let (text, done) = run(&*p, &request("q", None)).await;
        assert!(text.starts_with("Gray"), "{file}: deltas came first");
        let e = done.unwrap_err();
        assert_eq!(e.error_type, ErrorType::ProviderError, "{file}");
        assert_eq!(e.retryable, retryable, "{file}");
    }
}

#[tokio::test]
async fn truncated_streams_are_invalid_and_openai_does_not_wait_for_done() {
    // Cut before the finish chunk, connection closed: a truncated answer.
    let body = wire("anthropic_stream_ok.sse");
    let cut = String::from_utf8(body).unwrap();
    let cut = cut.split("event: message_delta").next().unwrap().to_owned();
    let server = FixtureServer::start(vec![sse(cut.into_bytes())]).await;
    let (_, done) = run(
        &anthropic(&server, BodyLimits::default()),
        &request("q", None),
    )
    .await;
    assert_eq!(done.unwrap_err().error_type, ErrorType::InvalidResponse);

    // Finish and usage but no [DONE], and the connection stays open: finished at once.
    let full = String::from_utf8(wire("openai_stream_ok.sse")).unwrap();
    let no_done = full.replace("data: [DONE]\n\n", "");
    let server =
        FixtureServer::start(vec![then(sse(no_done.clone().into_bytes()), Then::Hang)]).await;
    let (text, done) = tokio::time::timeout(
        Duration::from_secs(5),
        run(&openai(&server, BodyLimits::default()), &request("q", None)),
    )
    .await
    .expect("finished without waiting for [DONE]");
    assert_eq!(text, HAIKU);
    assert_eq!(done.unwrap().usage.output_tokens, Some(20));

    // A finish chunk, then neither usage nor [DONE]: the body just ends. The answer is
    // whole, its token counts unknown; not an error.
    let usage_line = full
        .split("\n\n")
        .find(|event| event.contains("\"choices\":[]"))
        .expect("the fixture's usage chunk")
        .to_owned();
    let bare = no_done.replace(&format!("{usage_line}\n\n"), "");
    assert!(!bare.contains("prompt_tokens"), "usage removed");
    let server = FixtureServer::start(vec![sse(bare.clone().into_bytes())]).await;
    let (text, done) = run(&openai(&server, BodyLimits::default()), &request("q", None)).await;
    assert_eq!(text, HAIKU);
    let completion = done.expect("a finished answer, not a truncated one");
    assert_eq!(completion.finish_reason.as_deref(), Some("stop"));
    assert_eq!(completion.usage.output_tokens, None);

    // With no finish chunk either, the same end is a truncated answer.
    let finish_line = bare
        .split("\n\n")
        .find(|event| event.contains("\"finish_reason\":\"stop\""))
        .expect("the fixture's finish chunk")
        .to_owned();
    let cut = bare.replace(&format!("{finish_line}\n\n"), "");
    let server = FixtureServer::start(vec![sse(cut.into_bytes())]).await;
    let (_, done) = run(&openai(&server, BodyLimits::default()), &request("q", None)).await;
    assert_eq!(done.unwrap_err().error_type, ErrorType::InvalidResponse);
}

#[tokio::test]
async fn endless_upstream_lines_and_bodies_are_bounded() {
    let server = FixtureServer::start(vec![Reply::Endless]).await;
    let limits = BodyLimits {
        line: 256 * 1024,
        body: 1024 * 1024,
    };
    let (_, done) = tokio::time::timeout(
        Duration::from_secs(10),
        run(&openai(&server, limits), &request("q", None)),
    )
    .await
    .expect("bounded, not endless");
    let e = done.unwrap_err();
    assert_eq!(
        (e.error_type, e.retryable),
        (ErrorType::InvalidResponse, false)
    );
    assert_eq!(e.message, "openai answer exceeded duet's size limit");

    // Many short, complete lines: the body limit stops them.
    let line = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\n".to_vec();
    let many: Vec<Vec<u8>> = std::iter::repeat_n(line, 40_000).collect();
    let server = FixtureServer::start(vec![sse(many.concat())]).await;
    let (_, done) = run(&openai(&server, limits), &request("q", None)).await;
    assert_eq!(done.unwrap_err().error_type, ErrorType::InvalidResponse);
}

#[test]
fn redaction_removes_planted_keys() {
    let text = format!("error: key {KEY} at http://h/x?key={KEY}");
    let out = redact(&text, &[KEY]);
    assert!(!out.contains(KEY), "{out}");
}

/// A three-turn conversation with a system prompt, and parameters: what the adapters must
/// send in each provider's own shape.
fn conversation_request(
    params: duet::conversation::GenParams,
    sampling: duet::conversation::Sampling,
) -> ModelRequest {
    use duet::conversation::{Conversation, Message, Speaker};
    let m = |role, content: &str| Message {
        role,
        content: content.into(),
    };
    ModelRequest {
        role: Role::Pro,
        conversation: std::sync::Arc::new(
            Conversation::new(
                vec![
                    m(Speaker::System, "You are a concise poet."),
                    m(Speaker::User, "Write a haiku about the sea."),
                    m(Speaker::Assistant, "Gray waves fold to foam."),
                    m(Speaker::User, "Now one about the moon."),
                ],
                usize::MAX,
            )
            .unwrap(),
        ),
        params,
        sampling,
        trace: None,
    }
}

fn gen_params(
    max_tokens: Option<u32>,
    temperature: Option<f64>,
    thinking: Option<duet::conversation::Thinking>,
) -> duet::conversation::GenParams {
    duet::conversation::GenParams {
        max_tokens,
        temperature,
        thinking,
    }
}

/// The request body each adapter sent for `params`.
async fn sent_body(provider: &str, params: duet::conversation::GenParams) -> serde_json::Value {
    sent_body_with(provider, params, Default::default()).await
}

/// Every sampling field, set: `stop` with a line break, which Anthropic refuses alone.
fn all_sampling(top_p: f64) -> duet::conversation::Sampling {
    duet::conversation::Sampling {
        top_p: Some(top_p),
        seed: Some(42),
        stop: vec!["END".into(), "\n".into()],
        frequency_penalty: Some(0.5),
        presence_penalty: Some(-0.25),
    }
}

/// The request body each adapter sent for `params` and `sampling`.
async fn sent_body_with(
    provider: &str,
    params: duet::conversation::GenParams,
    sampling: duet::conversation::Sampling,
) -> serde_json::Value {
    let fixture = match provider {
        "gemini" => "gemini_stream_ok.sse",
        "openai" => "openai_stream_ok.sse",
        _ => "anthropic_stream_ok.sse",
    };
    let server = FixtureServer::start(vec![sse(wire(fixture))]).await;
    let req = conversation_request(params, sampling);
    let (_, done) = match provider {
        "gemini" => run(&gemini(&server, BodyLimits::default()), &req).await,
        "openai" => run(&openai(&server, BodyLimits::default()), &req).await,
        _ => run(&anthropic(&server, BodyLimits::default()), &req).await,
    };
    done.unwrap();
    server.requests()[0].body.clone()
}

#[tokio::test]
async fn gemini_gets_the_conversation_as_contents_and_the_params_as_generation_config() {
    use duet::conversation::Thinking;
    let body = sent_body(
        "gemini",
        gen_params(Some(512), Some(0.7), Some(Thinking::Medium)),
    )
    .await;
    assert_eq!(
        body,
        serde_json::json!({
            "systemInstruction": {"parts": [{"text": "You are a concise poet."}]},
            "contents": [
                {"role": "user", "parts": [{"text": "Write a haiku about the sea."}]},
                {"role": "model", "parts": [{"text": "Gray waves fold to foam."}]},
                {"role": "user", "parts": [{"text": "Now one about the moon."}]}
            ],
            "generationConfig": {
                "maxOutputTokens": 512,
                "temperature": 0.7,
                "thinkingConfig": {"thinkingBudget": 8192}
            }
        })
    );
    // Each level's budget; `off` is 0; nothing set sends no generationConfig at all.
    for (level, budget) in [
        (Thinking::Off, 0),
        (Thinking::Low, 1024),
        (Thinking::High, 24_576),
    ] {
        let body = sent_body("gemini", gen_params(None, None, Some(level))).await;
        assert_eq!(
            body["generationConfig"],
            serde_json::json!({"thinkingConfig": {"thinkingBudget": budget}})
        );
    }
    let body = sent_body("gemini", gen_params(None, None, None)).await;
    assert!(body.get("generationConfig").is_none(), "{body}");
    // The sampling fields, under Gemini's own names, beside the rest.
    let body = sent_body_with(
        "gemini",
        gen_params(Some(512), Some(0.7), None),
        all_sampling(0.9),
    )
    .await;
    assert_eq!(
        body["generationConfig"],
        serde_json::json!({
            "maxOutputTokens": 512,
            "temperature": 0.7,
            "topP": 0.9,
            "seed": 42,
            "stopSequences": ["END", "\n"],
            "frequencyPenalty": 0.5,
            "presencePenalty": -0.25
        })
    );
    // Alone, a sampling field is a generationConfig of its own; Gemini's seed is 32 bits, so
    // a wider one goes as its low 32 bits (the same every time).
    let seed = |seed| duet::conversation::Sampling {
        seed: Some(seed),
        ..Default::default()
    };
    let body = sent_body_with("gemini", gen_params(None, None, None), seed(1 << 32 | 7)).await;
    assert_eq!(body["generationConfig"], serde_json::json!({"seed": 7}));
    let body = sent_body_with("gemini", gen_params(None, None, None), seed(-1)).await;
    assert_eq!(body["generationConfig"], serde_json::json!({"seed": -1}));
}

#[tokio::test]
async fn openai_gets_the_conversation_as_messages_and_its_own_parameter_names() {
    use duet::conversation::Thinking;
    let body = sent_body(
        "openai",
        gen_params(Some(256), Some(0.7), Some(Thinking::Low)),
    )
    .await;
    assert_eq!(
        body,
        serde_json::json!({
            "model": "gpt-4.1-mini",
            "messages": [
                {"role": "system", "content": "You are a concise poet."},
                {"role": "user", "content": "Write a haiku about the sea."},
                {"role": "assistant", "content": "Gray waves fold to foam."},
                {"role": "user", "content": "Now one about the moon."}
            ],
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_completion_tokens": 256,
            "temperature": 0.7,
            "reasoning_effort": "low"
        })
    );
    // `off` sends no reasoning_effort (the model's default), nor does leaving it unset.
    for thinking in [Some(Thinking::Off), None] {
        let body = sent_body("openai", gen_params(None, None, thinking)).await;
        for field in ["reasoning_effort", "max_completion_tokens", "temperature"] {
            assert!(body.get(field).is_none(), "{field}: {body}");
        }
    }
    let body = sent_body("openai", gen_params(None, None, Some(Thinking::High))).await;
    assert_eq!(body["reasoning_effort"], "high");
    // The sampling fields are OpenAI's own, sent as given (a 64-bit seed too).
    let mut sampling = all_sampling(0.9);
    sampling.seed = Some(i64::MAX);
    let body = sent_body_with("openai", gen_params(None, Some(0.7), None), sampling).await;
    assert_eq!(
        body,
        serde_json::json!({
            "model": "gpt-4.1-mini",
            "messages": body["messages"],
            "stream": true,
            "stream_options": {"include_usage": true},
            "temperature": 0.7,
            "top_p": 0.9,
            "seed": i64::MAX,
            "stop": ["END", "\n"],
            "frequency_penalty": 0.5,
            "presence_penalty": -0.25
        })
    );
    assert_eq!(body["messages"].as_array().map(Vec::len), Some(4));
}

#[tokio::test]
async fn anthropic_gets_messages_with_a_top_level_system_and_its_thinking_rules() {
    use duet::conversation::Thinking;
    let messages = serde_json::json!([
        {"role": "user", "content": "Write a haiku about the sea."},
        {"role": "assistant", "content": "Gray waves fold to foam."},
        {"role": "user", "content": "Now one about the moon."}
    ]);
    let body = sent_body("anthropic", gen_params(Some(1024), Some(0.7), None)).await;
    assert_eq!(
        body,
        serde_json::json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "system": "You are a concise poet.",
            "messages": messages,
            "stream": true,
            "temperature": 0.7
        })
    );
    // Thinking with max_tokens unset: today's default for the answer plus the budget, and no
    // temperature (Anthropic takes none but 1 with thinking on).
    let body = sent_body(
        "anthropic",
        gen_params(None, Some(0.7), Some(Thinking::Medium)),
    )
    .await;
    assert_eq!(
        body,
        serde_json::json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 4096 + 4096,
            "system": "You are a concise poet.",
            "messages": messages,
            "stream": true,
            "thinking": {"type": "enabled", "budget_tokens": 4096}
        })
    );
    // A max_tokens below the level's budget: the budget shrinks under it...
    let body = sent_body(
        "anthropic",
        gen_params(Some(3000), None, Some(Thinking::High)),
    )
    .await;
    assert_eq!(body["max_tokens"], 3000);
    assert_eq!(
        body["thinking"],
        serde_json::json!({"type": "enabled", "budget_tokens": 2999})
    );
    // ...and one too small for Anthropic's least budget (1024) means no thinking.
    let body = sent_body(
        "anthropic",
        gen_params(Some(1024), Some(0.3), Some(Thinking::Low)),
    )
    .await;
    assert_eq!(body["max_tokens"], 1024);
    assert!(body.get("thinking").is_none(), "{body}");
    assert_eq!(
        body["temperature"], 0.3,
        "no thinking, so the temperature goes"
    );
    // `off` and unset send no thinking, and today's default max_tokens.
    for thinking in [Some(Thinking::Off), None] {
        let body = sent_body("anthropic", gen_params(None, None, thinking)).await;
        assert_eq!(body["max_tokens"], 4096);
        assert!(body.get("thinking").is_none(), "{body}");
        assert!(body.get("temperature").is_none(), "{body}");
    }
    // Sampling: `top_p` and `stop_sequences`; no seed or penalties (Anthropic has none), and
    // no stop sequence of only white space (Anthropic refuses those).
    let body = sent_body_with(
        "anthropic",
        gen_params(Some(1024), None, None),
        all_sampling(0.9),
    )
    .await;
    assert_eq!(
        body,
        serde_json::json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "system": "You are a concise poet.",
            "messages": messages,
            "stream": true,
            "top_p": 0.9,
            "stop_sequences": ["END"]
        })
    );
    // Recent Claude models refuse `top_p` beside `temperature`: the temperature goes alone.
    let body = sent_body_with(
        "anthropic",
        gen_params(Some(1024), Some(0.7), None),
        all_sampling(0.9),
    )
    .await;
    assert_eq!(body["temperature"], 0.7);
    assert!(body.get("top_p").is_none(), "{body}");
    // With thinking on, only a top_p from 0.95 goes (and never a temperature).
    for (top_p, sent) in [(0.9, None), (0.95, Some(0.95)), (1.0, Some(1.0))] {
        let body = sent_body_with(
            "anthropic",
            gen_params(None, Some(0.7), Some(Thinking::Low)),
            all_sampling(top_p),
        )
        .await;
        assert!(body.get("thinking").is_some(), "{body}");
        assert!(body.get("temperature").is_none(), "{body}");
        assert_eq!(body.get("top_p").and_then(|v| v.as_f64()), sent, "{body}");
    }
    // Only white-space stop strings: no stop_sequences at all.
    let only_newline = duet::conversation::Sampling {
        stop: vec!["\n".into(), " \t".into()],
        ..Default::default()
    };
    let body = sent_body_with("anthropic", gen_params(None, None, None), only_newline).await;
    assert!(body.get("stop_sequences").is_none(), "{body}");
}
