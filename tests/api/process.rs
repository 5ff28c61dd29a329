//! The real binary: start-up errors, port 0, SIGTERM ending open streams with `done`, and
//! secrets kept out of the logs.

use std::{process::Stdio, time::Duration};

use serde_json::json;

use crate::helpers::*;

/// The binary in a fresh directory of its own (kept: the process may outlive the test body).
fn duet() -> std::process::Command {
    duet_command(&tempfile::tempdir().unwrap().keep())
}

#[test]
fn bad_config_stops_with_one_line_naming_the_variable() {
    let out = duet().env("PRO_TIMEOUT_S", "soon").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("PRO_TIMEOUT_S"), "{stderr}");

    let out = duet().env("FLASH_PROVIDER", "anthropic").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("FLASH_API_KEY") && stderr.contains("ANTHROPIC_API_KEY"),
        "{stderr}"
    );
}

/// An origin that could never match a browser's `Origin` header stops the service at start;
/// before, it was dropped without a word and the browser page was refused.
#[test]
fn bad_cors_origin_stops_with_one_line_naming_it() {
    let out = duet()
        .env(
            "CORS_ALLOWED_ORIGINS",
            "https://ok.example, https://app.example/",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("CORS_ALLOWED_ORIGINS") && stderr.contains("\"https://app.example/\""),
        "{stderr}"
    );
}

#[tokio::test]
async fn sigterm_ends_open_streams_with_done_and_exits_zero() {
    sigterm_with_an_open_stream("0").await;
}

#[tokio::test]
async fn sigterm_ends_open_streams_on_serving_threads_too() {
    sigterm_with_an_open_stream("2").await;
}

/// One stream still waiting for Pro when SIGTERM comes, with `SERVE_THREADS` = `threads`.
async fn sigterm_with_an_open_stream(threads: &str) {
    let mut child = duet()
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("SERVE_THREADS", threads)
        .env("SIMULATED_PRO_TTFT_S", "60")
        .env("PRO_TIMEOUT_S", "120")
        .env("SHUTDOWN_GRACE_S", "0.5")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Port 0: the chosen address is in the "listening" log line, which is what this checks.
    let (addr, _log) = listening(&mut child);
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("http://{addr}/query/stream"))
        .json(&json!({"query": "q"}))
        .send()
        .await
        .unwrap();
    let reader = tokio::spawn(read_events(resp));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let exit = terminate(child).await;
    let events = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .unwrap()
        .unwrap();
    check_invariants(&events);
    assert_eq!(names(&events), ["start", "flash", "error", "done"]);
    assert_eq!(done(&events)["status"], "cancelled");
    assert_eq!(exit, Some(0));
}

#[tokio::test]
async fn secrets_never_reach_the_logs() {
    const KEY: &str = "planted-client-key-7f3a9c";
    const ADMIN: &str = "planted-admin-token-51be0d";
    let mut child = duet()
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "trace")
        .env("API_KEYS", KEY)
        .env("ADMIN_TOKEN", ADMIN)
        .env("SIMULATED_FLASH_TTFT_S", "0.01")
        .env("SIMULATED_PRO_TTFT_S", "0.02")
        .env("SIMULATED_FLASH_TOKEN_S", "0.001")
        .env("SIMULATED_PRO_TOKEN_S", "0.001")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, log) = listening(&mut child);
    let client = reqwest::Client::new();
    for (token, expected) in [(KEY, 200), ("wrong-key", 401)] {
        let resp = client
            .post(format!("http://{addr}/query/stream"))
            .bearer_auth(token)
            .json(&json!({"query": "q", "deltas": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), expected, "key {token:?}");
        let body = resp.text().await.unwrap();
        assert!(!body.contains(KEY) && !body.contains(ADMIN));
    }
    assert_eq!(terminate(child).await, Some(0));
    let log = log.join().unwrap();
    assert!(log.contains("run ended"), "the run was logged: {log}");
    assert!(!log.contains(KEY), "client key leaked into logs");
    assert!(!log.contains(ADMIN), "admin token leaked into logs");
}

/// `duet serve` relaying a real HTTP/1.1 upstream (`duet mock-provider`, OpenAI format) with
/// `SERVE_THREADS` = `threads`: three rounds of 24 streams at once over kept client
/// connections, each stream whole and `ok`, one `ok` row per run, then SIGTERM and exit 0.
/// Returns the process's log.
async fn relay_rounds(threads: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("duet.db").display());
    let store = duet::audit::Store::connect_lazy(&url).unwrap();
    relay_rounds_into(threads, dir.path(), &url, &store).await
}

/// [`relay_rounds`] with the audit database at `url`, whose rows `store` reads.
async fn relay_rounds_into(
    threads: &str,
    dir: &std::path::Path,
    url: &str,
    store: &duet::audit::Store,
) -> String {
    let mock = start_mock(duet::devtools::mock::MockConfig {
        ttft: Duration::from_millis(20),
        token_interval: Duration::from_millis(2),
        tokens: 8,
        ..Default::default()
    })
    .await;
    let base = format!("http://{mock}/v1");
    let mut child = duet_command(dir)
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("DATABASE_URL", url)
        .env("SERVE_THREADS", threads)
        .env("FLASH_PROVIDER", "openai")
        .env("PRO_PROVIDER", "openai")
        .env("FLASH_BASE_URL", &base)
        .env("PRO_BASE_URL", &base)
        .env("FLASH_API_KEY", "mock")
        .env("PRO_API_KEY", "mock")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (addr, log) = listening(&mut child);
    // The audit writer runs on a thread of its own, on either backend.
    #[cfg(target_os = "linux")]
    {
        let names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", child.id()))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .collect();
        assert!(
            names.iter().any(|n| n.trim() == "duet-audit-0"),
            "{names:?}"
        );
    }
    let client = reqwest::Client::new();
    for round in 0..3 {
        let streams = (0..24).map(|i| {
            let request = client
                .post(format!("http://{addr}/query/stream"))
                .json(&json!({"query": format!("q{round}-{i}"), "deltas": true}))
                .send();
            async move { read_events(request.await.unwrap()).await }
        });
        for events in futures::future::join_all(streams).await {
            check_invariants(&events);
            assert_eq!(done(&events)["status"], "ok", "{events:?}");
        }
    }
    assert_eq!(terminate(child).await, Some(0));
    assert_eq!(crate::db::count(store, "dual_runs").await, 72);
    let ok = crate::db::text(
        store,
        "SELECT CAST(COUNT(*) AS TEXT) FROM dual_runs WHERE status = 'ok'",
    )
    .await;
    assert_eq!(ok.as_deref(), Some("72"), "one ok row per run");
    log.join().unwrap()
}

#[tokio::test]
async fn serving_threads_relay_concurrent_streams_and_stop_on_sigterm() {
    let log = relay_rounds("3").await;
    assert!(log.contains("\"serving_threads\":3"), "{log}");
}

/// On PostgreSQL the writer has a thread and a pool of its own (its connections opened on
/// that thread): every run's row is written, and SIGTERM still drains it and exits 0.
#[tokio::test]
async fn the_postgres_writer_on_its_own_thread_writes_every_run_and_stops() {
    let Some(db) = crate::db::postgres("postgres_writer_own_thread").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let log = relay_rounds_into("0", dir.path(), &db.url, &db.store).await;
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("\"backend\":\"postgres\""), "{log}");
}

#[tokio::test]
async fn without_serving_threads_the_main_runtime_serves() {
    let log = relay_rounds("0").await;
    assert!(log.contains("\"serving_threads\":0"), "{log}");
}
