//! Every metric family of contract §6 moves when the thing it counts happens.

use serde_json::json;

use crate::helpers::*;

/// The value of one sample, e.g. `duet_tokens_total{direction="input",model="flash",...}`
/// (labels in the alphabetical order the exposition uses); 0 when absent.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

async fn scrape(app: &TestApp) -> String {
    let resp = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    resp.text().await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn run_metrics_move() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let before = scrape(&app).await;
    // Labelled families appear with their first sample (asserted below); these have no
    // labels and are there from the start.
    for family in [
        "duet_streams_active",
        "duet_client_disconnects_total",
        "duet_flash_skipped_total",
        "duet_audit_queue_depth",
        "duet_audit_write_seconds",
        "process_resident_memory_bytes",
    ] {
        assert!(
            before.contains(&format!("# TYPE {family} ")),
            "{family} is exposed"
        );
    }

    let resp = app.post_stream(json!({"query": "q", "deltas": true})).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let during = scrape(&app).await;
    assert_eq!(sample(&during, "duet_streams_active"), 1.0);
    read_events(resp).await;
    let after = scrape(&app).await;
    assert_eq!(sample(&after, "duet_streams_active"), 0.0);
    assert_eq!(
        sample(
            &after,
            r#"duet_requests_total{client="",route="/query/stream",status="200"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            r#"duet_model_latency_seconds_count{model="flash",model_name="flash-m",outcome="ok",provider="scripted"}"#
        ),
        1.0
    );
    assert!(
        (sample(
            &after,
            r#"duet_model_latency_seconds_sum{model="pro",model_name="pro-m",outcome="ok",provider="scripted"}"#
        ) - 2.04)
            .abs()
            < 1e-9
    );
    assert_eq!(
        sample(
            &after,
            r#"duet_model_ttft_seconds_count{model="pro",model_name="pro-m",provider="scripted"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            r#"duet_tokens_total{direction="input",model="flash",model_name="flash-m",provider="scripted"}"#
        ),
        7.0
    );
    assert_eq!(
        sample(
            &after,
            r#"duet_tokens_total{direction="output",model="pro",model_name="pro-m",provider="scripted"}"#
        ),
        3.0
    );
    assert_eq!(
        sample(&after, r#"duet_sse_events_total{event="start"}"#),
        1.0
    );
    assert_eq!(
        sample(&after, r#"duet_sse_events_total{event="delta"}"#),
        5.0
    );
    assert_eq!(
        sample(&after, r#"duet_sse_events_total{event="done"}"#),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn failure_metrics_move() {
    let flash = vec![ms(9000), Step::Finish];
    let pro = vec![
        ms(100),
        Step::Fail(duet::providers::ErrorType::RateLimited, false),
    ];
    let app = spawn_app(flash, pro, &[]).await;
    app.stream(json!({"query": "q"})).await;
    let m = scrape(&app).await;
    assert_eq!(
        sample(
            &m,
            r#"duet_model_timeouts_total{kind="total",model="flash",model_name="flash-m",provider="scripted"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            r#"duet_model_errors_total{error_type="rate_limited",model="pro",model_name="pro-m",provider="scripted"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            r#"duet_model_latency_seconds_count{model="flash",model_name="flash-m",outcome="timeout",provider="scripted"}"#
        ),
        1.0
    );
    assert_eq!(sample(&m, r#"duet_sse_events_total{event="error"}"#), 2.0);

    let app = spawn_app(
        vec![ms(5000), Step::Finish],
        vec![ms(10), Step::Finish],
        &[],
    )
    .await;
    app.stream(json!({"query": "q"})).await;
    let m = scrape(&app).await;
    assert_eq!(sample(&m, "duet_flash_skipped_total"), 1.0);

    let resp = app
        .client
        .post(app.url("/query/stream"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    let m = scrape(&app).await;
    assert_eq!(
        sample(
            &m,
            r#"duet_requests_total{client="",route="/query/stream",status="415"}"#
        ),
        1.0
    );
}

/// `promtool check metrics` (Debian's `prometheus` package, installed by `.ci/run`) on a
/// scrape in which every family has samples.
#[tokio::test(start_paused = true)]
async fn exposition_passes_promtool() {
    let Ok(promtool) = which("promtool") else {
        skip("promtool is not installed, so the exposition check cannot run");
        return;
    };
    // Priced, so that `duet_cost_usd_total` has samples too.
    let app = spawn_app(
        vec![Step::Hang],
        vec![ms(100), Step::Delta("x"), Step::Finish],
        &[
            ("PRO_PRICE_INPUT_PER_MTOK", "1.25"),
            ("PRO_PRICE_OUTPUT_PER_MTOK", "10"),
        ],
    )
    .await;
    app.stream(json!({"query": "q", "deltas": true})).await;
    let slow = spawn_app(
        vec![Step::Hang],
        vec![Step::Hang],
        &[("PRO_TIMEOUT_S", "1")],
    )
    .await;
    slow.stream(json!({"query": "q"})).await;
    for text in [scrape(&app).await, scrape(&slow).await] {
        let mut child = std::process::Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(name))
                .find(|p| p.is_file())
        })
        .ok_or(())
}

/// The model families carry the configured provider and model name of each role, resolved at
/// start: whatever model version an upstream answers with (however odd), the series stay the
/// same four per family. `duet_build_info` names this build.
#[tokio::test(start_paused = true)]
async fn model_labels_are_the_configured_names_never_the_upstream_version() {
    const ODD: &str = "gpt-4.1-2025-04-14\"} evil{x=\"1";
    let flash = Scripted::attempts(
        "flash-m",
        vec![vec![ms(300), Step::Delta("a"), Step::FinishAs(ODD)]],
    );
    let pro = Scripted::attempts(
        "pro-m",
        vec![vec![
            ms(400),
            Step::Delta("b"),
            Step::FinishAs("pro-other-version"),
        ]],
    );
    let app = spawn_with(flash, pro, &[]).await;
    for _ in 0..3 {
        app.stream(json!({"query": "q"})).await;
    }
    let m = scrape(&app).await;
    assert!(
        !m.contains("2025-04-14"),
        "no upstream version in /metrics: {m}"
    );
    assert!(!m.contains("pro-other-version"), "{m}");
    let tokens: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("duet_tokens_total{"))
        .collect();
    assert_eq!(tokens.len(), 4, "two roles, two directions: {tokens:?}");
    for family in [
        "duet_tokens_total{",
        "duet_model_latency_seconds_count{",
        "duet_model_ttft_seconds_count{",
        "duet_model_timeouts_total{",
        "duet_model_errors_total{",
    ] {
        for line in m.lines().filter(|l| l.starts_with(family)) {
            let flash = line.contains(r#"model="flash",model_name="flash-m","#);
            let pro = line.contains(r#"model="pro",model_name="pro-m","#);
            assert!(flash || pro, "{line}");
            assert!(line.contains(r#"provider="scripted""#), "{line}");
        }
    }
    assert_eq!(
        sample(
            &m,
            r#"duet_tokens_total{direction="output",model="flash",model_name="flash-m",provider="scripted"}"#
        ),
        3.0
    );
    // Resolved at start: counters that nothing has moved are there, at 0.
    assert_eq!(
        sample(
            &m,
            r#"duet_model_timeouts_total{kind="stall",model="pro",model_name="pro-m",provider="scripted"}"#
        ),
        0.0
    );
    assert!(
        m.contains(r#"duet_model_timeouts_total{kind="stall",model="pro",model_name="pro-m",provider="scripted"} 0"#),
        "{m}"
    );
    // No price set: no cost series at all, rather than a cost of 0.
    assert!(!m.contains("duet_cost_usd_total"), "{m}");
    let build = format!(
        "duet_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    assert!(m.contains(&build), "{m}");
    assert!(m.contains("# TYPE duet_ready gauge"), "{m}");
}

/// `duet_overhead_seconds` observes the events made from upstream chunks (deltas, answers) as
/// they leave the stream's body; `start`, errors and `done` are not measured.
#[tokio::test(start_paused = true)]
async fn overhead_is_observed_for_events_made_from_upstream_chunks() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let before = scrape(&app).await;
    assert!(
        before.contains("# TYPE duet_overhead_seconds histogram"),
        "{before}"
    );
    assert_eq!(sample(&before, "duet_overhead_seconds_count"), 0.0);
    let events = app.stream(json!({"query": "q", "deltas": true})).await;
    // Flash: 2 deltas and its answer; Pro: 3 deltas and its answer.
    let made_from_chunks = events
        .iter()
        .filter(|e| matches!(e.event.as_str(), "delta" | "flash" | "pro"))
        .count();
    assert_eq!(made_from_chunks, 7);
    let after = scrape(&app).await;
    let observed = sample(&after, "duet_overhead_seconds_count");
    // Every one when the reader keeps up; fewer only when events wait in the channel.
    assert!(
        (1.0..=made_from_chunks as f64).contains(&observed),
        "{observed} of {made_from_chunks}"
    );
    // The paused clock stands still: duet's own time is 0 here, in the first bucket.
    assert_eq!(
        sample(&after, r#"duet_overhead_seconds_bucket{le="0.00001"}"#),
        observed
    );
}

/// With METRICS_TOKEN set, the exposition (which names each key file's client and counts
/// its requests) is for the scraper that has the token: 401 without it or with another,
/// wrong guesses counted and throttled like any other secret's.
#[tokio::test(start_paused = true)]
async fn metrics_token_closes_the_exposition_to_everyone_else() {
    let app = spawn_app(
        normal_flash(),
        normal_pro(),
        &[("METRICS_TOKEN", "scrape-me"), ("AUTH_FAILURE_LIMIT", "3")],
    )
    .await;
    let get = |token: Option<&str>| {
        let mut req = app.client.get(app.url("/metrics"));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req.send()
    };
    let resp = get(None).await.unwrap();
    assert_eq!(resp.status(), 401);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "unauthorized");
    assert_eq!(get(Some("guess")).await.unwrap().status(), 401);
    let resp = get(Some("scrape-me")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert_eq!(
        sample(&text, "duet_auth_failures_total{endpoint=\"metrics\"}"),
        1.0,
        "the wrong guess is counted; a request without a token is not a guess"
    );
    // Past the limit the address is refused, even with the right token.
    for _ in 0..2 {
        assert_eq!(get(Some("guess")).await.unwrap().status(), 401);
    }
    assert_eq!(get(Some("scrape-me")).await.unwrap().status(), 429);
}
