//! Every metric family of contract §6 moves when the thing it counts happens.

use serde_json::json;

use crate::helpers::*;

/// The value of one sample, e.g. `duet_tokens_total{direction="input",model="flash"}`
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
            r#"duet_model_latency_seconds_count{model="flash",outcome="ok"}"#
        ),
        1.0
    );
    assert!(
        (sample(
            &after,
            r#"duet_model_latency_seconds_sum{model="pro",outcome="ok"}"#
        ) - 2.04)
            .abs()
            < 1e-9
    );
    assert_eq!(
        sample(&after, r#"duet_model_ttft_seconds_count{model="pro"}"#),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            r#"duet_tokens_total{direction="input",model="flash"}"#
        ),
        7.0
    );
    assert_eq!(
        sample(
            &after,
            r#"duet_tokens_total{direction="output",model="pro"}"#
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
            r#"duet_model_timeouts_total{kind="total",model="flash"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            r#"duet_model_errors_total{error_type="rate_limited",model="pro"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            r#"duet_model_latency_seconds_count{model="flash",outcome="timeout"}"#
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
    let app = spawn_app(
        vec![Step::Hang],
        vec![ms(100), Step::Delta("x"), Step::Finish],
        &[],
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

/// The alert rules in docs/operations.md are valid Prometheus rules.
#[test]
fn documented_alert_rules_pass_promtool() {
    let Ok(promtool) = which("promtool") else {
        skip("promtool is not installed, so the alert rules check cannot run");
        return;
    };
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    let start = doc.find("```yaml\n").expect("a yaml block") + "```yaml\n".len();
    let end = start + doc[start..].find("```").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yml");
    std::fs::write(&rules, &doc[start..end]).unwrap();
    let out = std::process::Command::new(promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
