//! Upstream calls through the proxy the environment names (`HTTP_PROXY`, `NO_PROXY`): a real
//! `duet serve` process (the variables are the process's own, so never set in this one),
//! a `CONNECT` proxy and `duet mock-provider` on loopback.

use std::{
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use duet::devtools::mock::MockConfig;
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

use crate::helpers::*;

/// A `CONNECT` proxy on loopback that keeps the head of every request it gets.
async fn connect_proxy() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let kept = Arc::clone(&kept);
            tokio::spawn(async move {
                let mut reader = BufReader::new(socket);
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).await.unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                kept.lock().unwrap().push(head.clone());
                let target = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                let mut client = reader.into_inner();
                let Ok(mut upstream) = TcpStream::connect(target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                let _ = client.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (port, seen)
}

async fn mock_upstream() -> std::net::SocketAddr {
    start_mock(MockConfig {
        ttft: Duration::from_millis(10),
        token_interval: Duration::from_millis(1),
        tokens: 5,
        ..MockConfig::default()
    })
    .await
}

/// One stream through a duet whose environment holds `proxy_vars`; returns `done`'s status.
async fn one_run(upstream: std::net::SocketAddr, proxy_vars: &[(&str, String)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let base = format!("http://{upstream}/v1");
    let mut child = duet_command(dir.path())
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("FLASH_PROVIDER", "openai")
        .env("PRO_PROVIDER", "openai")
        .env("FLASH_BASE_URL", &base)
        .env("PRO_BASE_URL", &base)
        .env("FLASH_API_KEY", "sk-mock-flash")
        .env("PRO_API_KEY", "sk-mock-pro")
        .envs(proxy_vars.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (addr, _log) = listening(&mut child);
    let resp = direct_client()
        .post(format!("http://{addr}/query/stream"))
        .json(&json!({"query": "q"}))
        .send()
        .await
        .unwrap();
    let events = tokio::time::timeout(Duration::from_secs(20), read_events(resp))
        .await
        .unwrap();
    check_invariants(&events);
    let status = done(&events)["status"].as_str().unwrap().to_owned();
    assert_eq!(terminate(child).await, Some(0));
    status
}

#[tokio::test]
async fn upstream_calls_go_through_the_proxy_the_environment_names() {
    let upstream = mock_upstream().await;
    let (port, seen) = connect_proxy().await;
    let proxy = format!("http://relay:pa55@127.0.0.1:{port}");
    assert_eq!(one_run(upstream, &[("HTTP_PROXY", proxy)]).await, "ok");
    let seen = seen.lock().unwrap().clone();
    // Flash and Pro: a tunnel each, to the upstream, with the proxy's credentials.
    assert_eq!(seen.len(), 2, "{seen:?}");
    for head in &seen {
        assert!(
            head.starts_with(&format!("CONNECT {upstream} HTTP/1.1\r\n")),
            "{head}"
        );
        // base64("relay:pa55")
        assert!(
            head.contains("Proxy-Authorization: Basic cmVsYXk6cGE1NQ==\r\n"),
            "{head}"
        );
        assert!(
            !head.contains("sk-mock"),
            "no API key in the tunnel's request: {head}"
        );
    }
}

#[tokio::test]
async fn no_proxy_and_https_only_proxies_leave_http_upstreams_direct() {
    let upstream = mock_upstream().await;
    let (port, seen) = connect_proxy().await;
    let proxy = format!("http://127.0.0.1:{port}");
    let exempt = [
        ("ALL_PROXY", proxy.clone()),
        ("NO_PROXY", "127.0.0.1".into()),
    ];
    assert_eq!(one_run(upstream, &exempt).await, "ok");
    assert_eq!(one_run(upstream, &[("https_proxy", proxy)]).await, "ok");
    assert!(seen.lock().unwrap().is_empty());
}
