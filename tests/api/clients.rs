//! Named API keys (contract §11): `API_KEYS_FILE`, per-key rate limits and daily budgets
//! (also shared by two replicas on PostgreSQL), `client_id` in the audit record and never
//! the key, `GET /clients`, and reloading the file on SIGHUP with a stream open.

use std::{path::Path, process::Child, time::Duration};

use chrono::{Timelike, Utc};
use serde_json::{Value, json};

use crate::{
    db,
    helpers::{
        Step, TestApp, check_invariants, direct_client, done, duet_command, listening, read_events,
        scrape, spawn_app, terminate,
    },
};

const ADMIN: &str = "admin-token-7f3a";

fn quick(text: &'static str) -> Vec<Step> {
    vec![Step::Delta(text), Step::Finish]
}

fn write_keys(dir: &Path, text: &str) -> String {
    let path = dir.join("keys.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

async fn post_stream(app: &TestApp, key: &str) -> reqwest::Response {
    app.client
        .post(app.url("/query/stream"))
        .bearer_auth(key)
        .json(&json!({"query": "q"}))
        .send()
        .await
        .unwrap()
}

async fn clients_of(client: &reqwest::Client, base: &str) -> Value {
    let resp = client
        .get(format!("{base}/clients"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// Polls `/clients` until `name` has used at least `tokens` tokens today: a run's usage is
/// counted when its record is handed over, a moment after its `done`.
async fn wait_tokens(client: &reqwest::Client, base: &str, name: &str, tokens: u64) -> Value {
    for _ in 0..200 {
        let list = clients_of(client, base).await;
        let entry = list["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap();
        if entry["today"]["tokens"].as_u64().unwrap() >= tokens {
            return list;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{name} never reached {tokens} tokens");
}

/// Seconds from now to the next midnight UTC.
fn to_midnight() -> u64 {
    let now = Utc::now();
    86_400 - u64::from(now.num_seconds_from_midnight())
}

/// A 429 for a used-up budget: the message names it, `Retry-After` is the time to midnight.
async fn assert_over_budget(resp: reqwest::Response, budget: &str) {
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry.abs_diff(to_midnight()) <= 5, "{retry} s");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "budget_exceeded", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(budget), "{message}");
}

#[tokio::test]
async fn a_budget_crossed_mid_run_lets_the_run_finish_and_refuses_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys(
        dir.path(),
        r#"
[[key]]
name = "web"
key = "sk-web-1111"
daily_token_budget = 10

[[key]]
name = "batch"
key = "sk-batch-2222"
"#,
    );
    // Pro after Flash, so that both answers (and both usages) count.
    let app = spawn_app(
        quick("a"),
        vec![crate::helpers::ms(100), Step::Delta("b"), Step::Finish],
        &[("API_KEYS_FILE", &keys), ("ADMIN_TOKEN", ADMIN)],
    )
    .await;
    let base = format!("http://{}", app.addr);
    // The first run starts under budget (0 of 10) and uses 7 + 1 tokens per model: it
    // crosses the budget half-way and still ends normally.
    let events = read_events(post_stream(&app, "sk-web-1111").await).await;
    check_invariants(&events);
    assert_eq!(done(&events)["status"], "ok");
    let list = wait_tokens(&app.client, &base, "web", 16).await;
    assert_eq!(
        list,
        json!({"clients": [
            {"name": "web", "today": {"runs": 1, "tokens": 16, "cost_usd": null},
             "budgets": {"daily_token_budget": 10, "daily_cost_budget_usd": null}},
            {"name": "batch", "today": {"runs": 0, "tokens": 0, "cost_usd": null},
             "budgets": {"daily_token_budget": null, "daily_cost_budget_usd": null}},
        ]})
    );
    // The next run of the key is refused on every route that starts runs...
    assert_over_budget(post_stream(&app, "sk-web-1111").await, "daily_token_budget").await;
    let resp = app
        .client
        .post(app.url("/query"))
        .bearer_auth("sk-web-1111")
        .json(&json!({"query": "q"}))
        .send()
        .await
        .unwrap();
    assert_over_budget(resp, "daily_token_budget").await;
    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth("sk-web-1111")
        .json(&json!({"model": "duet", "messages": [{"role": "user", "content": "q"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "insufficient_quota", "{body}");
    assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("daily_token_budget")
    );
    // ...but not the other key's, nor what starts no run.
    let resp = post_stream(&app, "sk-batch-2222").await;
    assert_eq!(resp.status(), 200);
    read_events(resp).await;
    let models = app
        .client
        .get(app.url("/v1/models"))
        .bearer_auth("sk-web-1111")
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    // Refused runs are not runs: no record, no count.
    let records = app.records(2).await;
    let by: Vec<Option<&str>> = records.iter().map(|r| r.client_id.as_deref()).collect();
    assert_eq!(by, [Some("web"), Some("batch")]);
    let list = wait_tokens(&app.client, &base, "batch", 16).await;
    assert_eq!(list["clients"][0]["today"]["runs"], 1);
    // The request metrics name the key, never the key itself.
    let metrics = scrape(&app).await;
    assert!(
        metrics
            .contains(r#"duet_requests_total{client="web",route="/query/stream",status="429"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"duet_streams_rejected_total{reason="budget_exceeded"} 3"#));
    assert!(!metrics.contains("sk-web") && !metrics.contains("sk-batch"));
}

#[tokio::test]
async fn api_keys_and_the_file_work_together() {
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys(
        dir.path(),
        "[[key]]\nname = \"web\"\nkey = \"sk-web-1111\"\nrate_limit_per_minute = 1\nburst = 2\n",
    );
    let app = spawn_app(
        quick("a"),
        quick("b"),
        &[
            ("API_KEYS_FILE", &keys),
            ("API_KEYS", "sk-env-3333"),
            ("ADMIN_TOKEN", ADMIN),
        ],
    )
    .await;
    let get = |key: &'static str| {
        app.client
            .get(app.url("/v1/models"))
            .bearer_auth(key)
            .send()
    };
    // The named key has its own limit (2 at once, then one a minute); the unnamed key of
    // API_KEYS has the global one (off).
    assert_eq!(get("sk-web-1111").await.unwrap().status(), 200);
    assert_eq!(get("sk-web-1111").await.unwrap().status(), 200);
    let limited = get("sk-web-1111").await.unwrap();
    assert_eq!(limited.status(), 429);
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    for _ in 0..5 {
        assert_eq!(get("sk-env-3333").await.unwrap().status(), 200);
    }
    assert_eq!(get("sk-nope").await.unwrap().status(), 401);
    // A run with the unnamed key has no client_id, and is not listed.
    let resp = post_stream(&app, "sk-env-3333").await;
    read_events(resp).await;
    let records = app.records(1).await;
    assert_eq!(records[0].client_id, None);
    assert!(records[0].owner_fingerprint.is_some());
    let list = clients_of(&app.client, &format!("http://{}", app.addr)).await;
    assert_eq!(list["clients"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn clients_is_an_admin_endpoint() {
    let app = spawn_app(quick("a"), quick("b"), &[("ADMIN_TOKEN", ADMIN)]).await;
    let resp = app.client.get(app.url("/clients")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    // Without a key file: no named key.
    let list = clients_of(&app.client, &format!("http://{}", app.addr)).await;
    assert_eq!(list, json!({"clients": []}));
    let off = spawn_app(quick("a"), quick("b"), &[]).await;
    let resp = off.client.get(off.url("/clients")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        body["error"]["message"],
        "the admin API is off: set ADMIN_TOKEN to enable /runs and /clients"
    );
}

/// `duet serve` on a SQLite file in `dir`, with the simulated models quick except Pro's
/// first token (`pro_ttft_s`); returns the child, its address, and its log once it exits.
fn serve(
    dir: &Path,
    database_url: &str,
    pro_ttft_s: &str,
    extra: &[(&str, &str)],
) -> (Child, String, std::thread::JoinHandle<String>) {
    let mut child = duet_command(dir)
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("DATABASE_URL", database_url)
        .env("ADMIN_TOKEN", ADMIN)
        .env("SIMULATED_FLASH_TTFT_S", "0.01")
        .env("SIMULATED_FLASH_TOKEN_S", "0.001")
        .env("SIMULATED_PRO_TTFT_S", pro_ttft_s)
        .env("SIMULATED_PRO_TOKEN_S", "0.001")
        .env("RUST_LOG", "debug")
        .envs(extra.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (addr, log) = listening(&mut child);
    (child, format!("http://{addr}"), log)
}

fn hangup(child: &Child) {
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

async fn models_status(client: &reqwest::Client, base: &str, key: &str) -> u16 {
    client
        .get(format!("{base}/v1/models"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Waits until `key` gets `status` from the guard (a reload takes effect a moment after the
/// signal).
async fn wait_status(client: &reqwest::Client, base: &str, key: &str, status: u16) {
    for _ in 0..200 {
        if models_status(client, base, key).await == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{key} never got {status}");
}

#[tokio::test]
async fn sighup_reloads_the_key_file_without_dropping_an_open_stream() {
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys(
        dir.path(),
        "[[key]]\nname = \"alpha\"\nkey = \"sk-alpha-5555\"\n",
    );
    let url = format!("sqlite://{}", dir.path().join("duet.db").display());
    let (child, base, log) = serve(dir.path(), &url, "1.5", &[("API_KEYS_FILE", &keys)]);
    let client = direct_client();
    // A stream of alpha's, open across the reload that removes alpha.
    let stream = client
        .post(format!("{base}/query/stream"))
        .bearer_auth("sk-alpha-5555")
        .json(&json!({"query": "hello there"}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let run_id = stream.headers()["x-run-id"].to_str().unwrap().to_owned();
    let reading = tokio::spawn(read_events(stream));
    tokio::time::sleep(Duration::from_millis(200)).await;
    write_keys(
        dir.path(),
        "[[key]]\nname = \"beta\"\nkey = \"sk-beta-6666\"\n",
    );
    hangup(&child);
    wait_status(&client, &base, "sk-beta-6666", 200).await;
    assert_eq!(models_status(&client, &base, "sk-alpha-5555").await, 401);
    let events = reading.await.unwrap();
    check_invariants(&events);
    assert_eq!(done(&events)["status"], "ok");

    // A file that cannot be used keeps the keys in force.
    write_keys(
        dir.path(),
        "[[key]]\nname = \"beta\"\nkey = \"sk-beta-6666\"\n\n[[key]]\nname = \"beta\"\nkey = \"sk-gamma-7777\"\n",
    );
    hangup(&child);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(models_status(&client, &base, "sk-beta-6666").await, 200);
    assert_eq!(models_status(&client, &base, "sk-gamma-7777").await, 401);

    // The record names the client, never the key.
    let record: Value = client
        .get(format!("{base}/runs/{run_id}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(record["client_id"], "alpha", "{record}");
    assert_eq!(terminate(child).await, Some(0));
    let log = log.join().unwrap();
    assert!(log.contains("API_KEYS_FILE reloaded"), "{log}");
    let refused = log
        .lines()
        .find(|l| l.contains("the keys in force are kept"))
        .expect("the bad file is logged");
    assert!(refused.contains("\"line\":6"), "{refused}");
    assert!(refused.contains("unique"), "{refused}");
    for key in ["sk-alpha-5555", "sk-beta-6666", "sk-gamma-7777", ADMIN] {
        assert!(!log.contains(key), "the log shows {key}");
    }
    // Nor does the database, its journal or anything beside it.
    let mut stored = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != "keys.toml" {
            stored.extend(std::fs::read(&path).unwrap_or_default());
        }
    }
    let stored = String::from_utf8_lossy(&stored);
    assert!(stored.contains("alpha"), "the row names its client");
    for key in ["sk-alpha-5555", "sk-beta-6666"] {
        assert!(!stored.contains(key), "the database holds {key}");
    }
}

#[tokio::test]
async fn sighup_without_a_key_file_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("duet.db").display());
    let (child, base, log) = serve(dir.path(), &url, "0.01", &[]);
    hangup(&child);
    hangup(&child);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = direct_client();
    let resp = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "SIGHUP does not kill the process");
    assert_eq!(terminate(child).await, Some(0));
    let log = log.join().unwrap();
    assert!(log.contains("nothing to reload"), "{log}");
}

#[test]
fn a_bad_key_file_stops_the_service_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys(
        dir.path(),
        "[[key]]\nname = \"web\"\nkey = \"sk-web-8888\"\ndaily_token_budget = -1\n",
    );
    let out = duet_command(dir.path())
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("API_KEYS_FILE", &keys)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("API_KEYS_FILE") && stderr.contains("keys.toml:4:"),
        "{stderr}"
    );
    assert!(!stderr.contains("sk-web-8888"), "{stderr}");
    // A cost budget without prices can never be counted: refused too.
    let keys = write_keys(
        dir.path(),
        "[[key]]\nname = \"web\"\nkey = \"sk-web-8888\"\n\ndaily_cost_budget_usd = 5.0\n",
    );
    let out = duet_command(dir.path())
        .env("API_KEYS_FILE", &keys)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("keys.toml:5:") && stderr.contains("PRICE"),
        "{stderr}"
    );
}

/// Two replicas on one fresh PostgreSQL database share one key's rate limit and one key's
/// daily budget: what one replica counted, the other refuses.
#[tokio::test]
async fn postgres_two_replicas_share_a_keys_rate_limit_and_budget() {
    let Some(pg) = db::postgres("postgres_two_replicas_share_a_keys_rate_limit_and_budget").await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys(
        dir.path(),
        r#"
[[key]]
name = "limited"
key = "sk-limited-1010"
rate_limit_per_minute = 1
burst = 3

[[key]]
name = "budgeted"
key = "sk-budget-2020"
daily_token_budget = 5
"#,
    );
    let extra = [("API_KEYS_FILE", keys.as_str())];
    let (a, a_base, _a_log) = serve(dir.path(), &pg.url, "0.01", &extra);
    let (b, b_base, _b_log) = serve(dir.path(), &pg.url, "0.01", &extra);
    let client = direct_client();
    // Burst of 3 for the key, whichever replica is asked.
    let mut seen = Vec::new();
    for base in [&a_base, &b_base, &a_base, &b_base] {
        seen.push(models_status(&client, base, "sk-limited-1010").await);
    }
    assert_eq!(seen, [200, 200, 200, 429]);
    // A run on A takes the budgeted key over its budget...
    let resp = client
        .post(format!("{a_base}/query/stream"))
        .bearer_auth("sk-budget-2020")
        .json(&json!({"query": "a question of some words"}))
        .send()
        .await
        .unwrap();
    let events = read_events(resp).await;
    assert_eq!(done(&events)["status"], "ok");
    let list = wait_tokens(&client, &b_base, "budgeted", 5).await;
    // ...which B sees in /clients (from the shared table) and refuses.
    let budgeted = &list["clients"][1];
    assert_eq!(budgeted["name"], "budgeted");
    assert_eq!(budgeted["today"]["runs"], 1);
    assert_eq!(clients_of(&client, &a_base).await, list);
    let resp = client
        .post(format!("{b_base}/query/stream"))
        .bearer_auth("sk-budget-2020")
        .json(&json!({"query": "q"}))
        .send()
        .await
        .unwrap();
    assert_over_budget(resp, "daily_token_budget").await;
    // The shared row holds the name, the day's usage, and no key.
    let pool = sqlx::PgPool::connect(&pg.url).await.unwrap();
    let (client_name, runs, tokens): (String, i64, i64) =
        sqlx::query_as("SELECT client, runs, tokens FROM client_usage WHERE client = 'budgeted'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((client_name.as_str(), runs), ("budgeted", 1));
    assert_eq!(
        u64::try_from(tokens).unwrap(),
        budgeted["today"]["tokens"].as_u64().unwrap()
    );
    let row: (Option<String>,) = sqlx::query_as("SELECT client_id FROM dual_runs LIMIT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(row.0.as_deref(), Some("budgeted"));
    pool.close().await;
    assert_eq!(terminate(a).await, Some(0));
    assert_eq!(terminate(b).await, Some(0));
}

#[tokio::test]
async fn a_cost_budget_counts_the_runs_cost_usd() {
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys(
        dir.path(),
        "[[key]]\nname = \"priced\"\nkey = \"sk-priced-9999\"\ndaily_cost_budget_usd = 10.0\n",
    );
    // A dollar a token: each model's 7 + 1 tokens cost $8, the run $16.
    let app = spawn_app(
        quick("a"),
        vec![crate::helpers::ms(100), Step::Delta("b"), Step::Finish],
        &[
            ("API_KEYS_FILE", &keys),
            ("ADMIN_TOKEN", ADMIN),
            ("FLASH_PRICE_INPUT_PER_MTOK", "1000000"),
            ("FLASH_PRICE_OUTPUT_PER_MTOK", "1000000"),
            ("PRO_PRICE_INPUT_PER_MTOK", "1000000"),
            ("PRO_PRICE_OUTPUT_PER_MTOK", "1000000"),
        ],
    )
    .await;
    let events = read_events(post_stream(&app, "sk-priced-9999").await).await;
    assert_eq!(done(&events)["status"], "ok");
    assert_eq!(done(&events)["cost_usd"], 16.0, "{:?}", done(&events));
    let list = wait_tokens(&app.client, &format!("http://{}", app.addr), "priced", 16).await;
    assert_eq!(
        list["clients"][0],
        json!({"name": "priced", "today": {"runs": 1, "tokens": 16, "cost_usd": 16.0},
               "budgets": {"daily_token_budget": null, "daily_cost_budget_usd": 10.0}})
    );
    assert_over_budget(
        post_stream(&app, "sk-priced-9999").await,
        "daily_cost_budget_usd",
    )
    .await;
}

/// The SQL blocks of docs/audit.md's section "10. Usage by client", in order: per client and
/// day (SQLite, PostgreSQL), today's shared counts (PostgreSQL), one client's runs (SQLite).
fn usage_queries() -> Vec<String> {
    let doc = include_str!("../../docs/audit.md");
    let section = doc
        .split("### 10. Usage by client")
        .nth(1)
        .expect("docs/audit.md has the usage queries");
    let section = section.split("\n### ").next().unwrap();
    let blocks: Vec<String> = section
        .split("```sql\n")
        .skip(1)
        .map(|b| {
            b.split("```")
                .next()
                .unwrap()
                .trim()
                .trim_end_matches(';')
                .to_owned()
        })
        .collect();
    assert_eq!(blocks.len(), 4);
    blocks
}

/// Runs `sql` and gives its rows as JSON objects (`columns`: its column names, for SQLite).
async fn json_rows(store: &duet::audit::Store, sql: &str, columns: &[&str]) -> Vec<Value> {
    use duet::audit::Store;
    use sqlx::Row;
    let texts: Vec<String> = match store {
        Store::Postgres(pool) => {
            let wrapped = format!("SELECT row_to_json(q)::text AS j FROM ({sql}) q");
            sqlx::query(&wrapped)
                .fetch_all(pool)
                .await
                .unwrap_or_else(|e| panic!("{e}: {sql}"))
                .iter()
                .map(|r| r.get("j"))
                .collect()
        }
        Store::Sqlite(s) => {
            let pairs: Vec<String> = columns.iter().map(|c| format!("'{c}', {c}")).collect();
            let wrapped = format!("SELECT json_object({}) AS j FROM ({sql})", pairs.join(", "));
            sqlx::query(&wrapped)
                .fetch_all(s.pool())
                .await
                .unwrap_or_else(|e| panic!("{e}: {sql}"))
                .iter()
                .map(|r| r.get("j"))
                .collect()
        }
    };
    texts
        .iter()
        .map(|t| serde_json::from_str(t).unwrap())
        .collect()
}

async fn usage_queries_answer(store: &duet::audit::Store) {
    let postgres = matches!(store, duet::audit::Store::Postgres(_));
    let mut records: Vec<_> = (0..3).map(db::record).collect();
    records[0].client_id = Some("web-app".into());
    records[1].client_id = Some("web-app".into());
    let tokens: u64 = records[..2]
        .iter()
        .map(|r| {
            let t = r.tokens();
            t.input_tokens.unwrap_or(0) + t.output_tokens.unwrap_or(0)
        })
        .sum();
    assert!(tokens > 0);
    store.insert(&records).await.unwrap();
    let queries = usage_queries();
    let per_day = if postgres { &queries[1] } else { &queries[0] };
    let rows = json_rows(
        store,
        per_day,
        &["client_id", "day_utc", "runs", "tokens", "cost_usd"],
    )
    .await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["client_id"], "web-app");
    assert_eq!(rows[0]["runs"], 2);
    assert_eq!(rows[0]["tokens"].as_f64().unwrap(), tokens as f64);
    assert_eq!(
        rows[0]["day_utc"].as_str().unwrap(),
        Utc::now().date_naive().to_string()
    );
    if postgres {
        // Nothing counted through the service here: the shared table answers, empty.
        assert!(json_rows(store, &queries[2], &[]).await.is_empty());
    } else {
        let rows = json_rows(store, &queries[3], &["run_id", "status"]).await;
        assert_eq!(rows.len(), 2);
    }
}

#[tokio::test]
async fn docs_usage_by_client_queries_answer_on_sqlite() {
    let db = db::sqlite().await;
    usage_queries_answer(&db.store).await;
}

#[tokio::test]
async fn docs_usage_by_client_queries_answer_on_postgres() {
    let Some(db) = db::postgres("docs_usage_by_client_queries_answer").await else {
        return;
    };
    usage_queries_answer(&db.store).await;
}

/// The cost of the shared daily count on PostgreSQL: the statement at a run's start (check
/// and count) and at its end (add the usage), one at a time and from 8 tasks at once on the
/// same key (one hot client: every statement waits for the same row lock). Prints the
/// numbers; asserts nothing about time. `cargo test --release --test api -- --ignored
/// --nocapture budget_statement_cost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand"]
async fn budget_statement_cost() {
    use duet::clients::{
        KeySet,
        usage::{DayUsage, Usage},
    };
    use std::{num::NonZeroU32, sync::Arc, time::Instant};
    let Some(pg) = db::postgres("budget_statement_cost").await else {
        return;
    };
    let file = duet::config::KeyFile {
        keys: vec![duet::config::NamedKey {
            name: "hot".into(),
            key: duet::domain::Secret::new("sk-hot"),
            rate_limit_per_minute: None,
            burst: None,
            daily_token_budget: Some(u64::MAX / 2),
            daily_cost_budget_usd: None,
        }],
    };
    let keys = KeySet::new(&[], Some(&file), None, NonZeroU32::MIN);
    let client = keys.authenticate("sk-hot").unwrap();
    let usage = Arc::new(Usage::new(
        Some(&pg.store),
        tokio_util::task::TaskTracker::new(),
        duet::metrics::Metrics::new().unwrap(),
    ));
    let name = Arc::clone(client.name().unwrap());
    let used = DayUsage {
        runs: 1,
        tokens: 1234,
        cost_usd: 0.01,
    };
    let day = Utc::now().date_naive();
    fn report(what: &str, mut micros: Vec<u128>) {
        micros.sort_unstable();
        let at = |q: f64| micros[((micros.len() - 1) as f64 * q) as usize];
        eprintln!(
            "{what}: n={} p50={} µs p90={} µs p99={} µs max={} µs",
            micros.len(),
            at(0.5),
            at(0.9),
            at(0.99),
            micros[micros.len() - 1]
        );
    }
    // Warm the pool and the prepared statements.
    for _ in 0..50 {
        usage.admit(&client, Utc::now()).await.unwrap();
        usage
            .record_now(Arc::clone(&name), client.budgets, day, used)
            .await;
    }
    const N: usize = 2000;
    let (mut admits, mut records) = (Vec::with_capacity(N), Vec::with_capacity(N));
    for _ in 0..N {
        let t = Instant::now();
        usage.admit(&client, Utc::now()).await.unwrap();
        admits.push(t.elapsed().as_micros());
        let t = Instant::now();
        usage
            .record_now(Arc::clone(&name), client.budgets, day, used)
            .await;
        records.push(t.elapsed().as_micros());
    }
    report("start (check + count), serial", admits);
    report("end (add usage), serial", records);
    let started = Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (usage, client, name) =
                (Arc::clone(&usage), Arc::clone(&client), Arc::clone(&name));
            tokio::spawn(async move {
                for _ in 0..N / 8 {
                    usage.admit(&client, Utc::now()).await.unwrap();
                    usage
                        .record_now(Arc::clone(&name), client.budgets, day, used)
                        .await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    eprintln!(
        "8 tasks, one key: {N} runs (start + end) in {elapsed:?}: {:.0} runs/s",
        N as f64 / elapsed.as_secs_f64()
    );
    let today = usage.today(&[Arc::clone(&name)], Utc::now()).await.unwrap();
    assert_eq!(today[&name].runs, (2 * N + 50) as u64);
}

/// A run belongs to the key that started it, named or not: only that key resumes it. The
/// page asks for a key when only a key file is set.
#[tokio::test]
async fn a_named_keys_run_is_resumed_by_that_key_only() {
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys(
        dir.path(),
        "[[key]]\nname = \"one\"\nkey = \"sk-one-1212\"\n\n[[key]]\nname = \"two\"\nkey = \"sk-two-3434\"\n",
    );
    let app = spawn_app(quick("a"), quick("b"), &[("API_KEYS_FILE", &keys)]).await;
    let events = read_events(post_stream(&app, "sk-one-1212").await).await;
    let run_id = check_invariants(&events);
    let resume = |key: &'static str| {
        app.client
            .post(app.url("/query/stream"))
            .bearer_auth(key)
            .header("last-event-id", format!("{run_id}:0"))
            .json(&json!({"query": "q"}))
            .send()
    };
    let theirs = resume("sk-two-3434").await.unwrap();
    assert_eq!(theirs.status(), 404);
    let mine = resume("sk-one-1212").await.unwrap();
    assert_eq!(mine.status(), 200);
    let replayed = read_events(mine).await;
    assert_eq!(replayed.last().unwrap().event, "done");
    let page = app
        .client
        .get(app.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains(r#"data-auth-required="true""#));
}

/// On SQLite the counts are in memory, and a restart reads the day's usage back from the
/// audit trail: a key over its budget stays refused.
#[tokio::test]
async fn sqlite_a_restart_keeps_todays_usage() {
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys(
        dir.path(),
        "[[key]]\nname = \"web\"\nkey = \"sk-web-4545\"\ndaily_token_budget = 5\n",
    );
    let url = format!("sqlite://{}", dir.path().join("duet.db").display());
    let extra = [("API_KEYS_FILE", keys.as_str())];
    let client = direct_client();
    let (child, base, _log) = serve(dir.path(), &url, "0.01", &extra);
    let resp = client
        .post(format!("{base}/query/stream"))
        .bearer_auth("sk-web-4545")
        .json(&json!({"query": "a question of some words"}))
        .send()
        .await
        .unwrap();
    assert_eq!(done(&read_events(resp).await)["status"], "ok");
    let before = wait_tokens(&client, &base, "web", 5).await;
    assert_eq!(terminate(child).await, Some(0));

    let (child, base, _log) = serve(dir.path(), &url, "0.01", &extra);
    let resp = client
        .post(format!("{base}/query/stream"))
        .bearer_auth("sk-web-4545")
        .json(&json!({"query": "q"}))
        .send()
        .await
        .unwrap();
    assert_over_budget(resp, "daily_token_budget").await;
    assert_eq!(clients_of(&client, &base).await, before);
    assert_eq!(terminate(child).await, Some(0));
}

/// A key file replaced by something that never ends or never opens — a FIFO with no writer,
/// a link to `/dev/zero` — is refused on SIGHUP at once (the keys in force are kept), and
/// SIGTERM still stops the service: the reload must not hold the signal loop.
#[tokio::test]
async fn sighup_refuses_a_key_file_that_is_not_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys(
        dir.path(),
        "[[key]]\nname = \"alpha\"\nkey = \"sk-alpha-8888\"\n",
    );
    let url = format!("sqlite://{}", dir.path().join("duet.db").display());
    let (child, base, log) = serve(dir.path(), &url, "0.01", &[("API_KEYS_FILE", &keys)]);
    let client = direct_client();
    std::fs::remove_file(&keys).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &keys).unwrap();
    hangup(&child);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(models_status(&client, &base, "sk-alpha-8888").await, 200);
    std::fs::remove_file(&keys).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&keys)
        .status()
        .unwrap();
    assert!(made.success());
    hangup(&child);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(models_status(&client, &base, "sk-alpha-8888").await, 200);
    let pid = child.id();
    let stopped = tokio::time::timeout(Duration::from_secs(15), terminate(child)).await;
    if stopped.is_err() {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        panic!("SIGTERM did not stop the service while a reload was stuck on the key file");
    }
    assert_eq!(stopped.unwrap(), Some(0));
    let log = log.join().unwrap();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("the keys in force are kept"))
        .collect();
    assert_eq!(refused.len(), 2, "{log}");
    assert!(
        refused.iter().all(|l| l.contains("not a regular file")),
        "{refused:?}"
    );
}

/// A run refused at capacity (503) never started: it is not one of the key's runs today.
#[tokio::test]
async fn a_run_refused_at_capacity_is_not_counted_in_clients() {
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys(
        dir.path(),
        "[[key]]\nname = \"alpha\"\nkey = \"sk-alpha-9999\"\n",
    );
    let url = format!("sqlite://{}", dir.path().join("duet.db").display());
    let (child, base, _log) = serve(
        dir.path(),
        &url,
        "1.0",
        &[("API_KEYS_FILE", &keys), ("MAX_CONCURRENT_STREAMS", "1")],
    );
    let client = direct_client();
    let post = || {
        client
            .post(format!("{base}/query/stream"))
            .bearer_auth("sk-alpha-9999")
            .json(&json!({"query": "q"}))
            .send()
    };
    let open = post().await.unwrap();
    assert_eq!(open.status(), 200);
    for _ in 0..3 {
        assert_eq!(post().await.unwrap().status(), 503);
    }
    let events = read_events(open).await;
    check_invariants(&events);
    let list = wait_tokens(&client, &base, "alpha", 1).await;
    assert_eq!(list["clients"][0]["today"]["runs"], 1, "{list}");
    assert_eq!(terminate(child).await, Some(0));
}
