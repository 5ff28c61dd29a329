//! Preview agreement (contract §12): one number per run comparing the Flash and Pro answer
//! texts, `null` unless both answered `ok`; the same value in `done`, `POST /query`, the
//! record (both backends), `GET /runs` and `GET /runs/{id}`, the dead-letter file and its
//! replay, and `duet_preview_agreement`. The SQL of docs/audit.md ("Preview agreement by
//! model pair and day", "Runs where the preview was most wrong") runs here on both backends.

use std::time::Duration;

use duet::{
    agreement,
    audit::{Store, WriterOptions, replay::replay},
};
use serde_json::{Value, json};

use crate::{
    db::{self, dead_letters, ended},
    helpers::*,
};

const ADMIN: &[(&str, &str)] = &[("ADMIN_TOKEN", "admin-secret")];

/// Flash first, Pro well after: the real clock (the database answers from other threads).
fn flash_says(parts: &[&'static str]) -> Vec<Step> {
    let mut steps = vec![ms(5)];
    steps.extend(parts.iter().map(|p| Step::Delta(p)));
    steps.push(Step::Finish);
    steps
}

fn pro_says(parts: &[&'static str]) -> Vec<Step> {
    let mut steps = vec![ms(150)];
    steps.extend(parts.iter().map(|p| Step::Delta(p)));
    steps.push(Step::Finish);
    steps
}

/// `agreement` of a JSON object: always present, a number in [0, 1] or `null`.
fn agreement_of(v: &Value) -> Option<f64> {
    let a = v
        .get("agreement")
        .unwrap_or_else(|| panic!("agreement is always present: {v}"));
    assert!(a.is_null() || a.is_f64(), "{v}");
    let a = a.as_f64();
    assert!(a.is_none_or(|a| (0.0..=1.0).contains(&a)), "{v}");
    a
}

/// Equal up to JSON's decimal round trip: serde_json prints the shortest decimal that reads
/// back as the same double, but its default parser may land one unit in the last place off.
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= b.abs() * 1e-15
}

/// What the service computed for a stream, from the texts its answer events carried.
fn expected(events: &[Ev]) -> f64 {
    let text = |name| {
        event_data(events, name)["text"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    agreement::of(&text("flash"), &text("pro"))
}

/// `duet_preview_agreement_count` (and `_sum`) in an exposition.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

async fn get(app: &TestApp, path: &str) -> Value {
    let resp = app
        .client
        .get(app.url(path))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{path}");
    resp.json().await.unwrap()
}

/// Three runs through a real writer: two answers that agree in part, then a Pro that fails
/// (no agreement), then two answers with the same words (1.0).
async fn agreement_is_the_same_everywhere(store: Store, dir: &std::path::Path) {
    let flash = Scripted::attempts(
        "flash-m",
        vec![
            flash_says(&["Paris is", " the capital."]),
            flash_says(&["Lyon"]),
            flash_says(&["Tea, ", "or coffee?"]),
        ],
    );
    let pro = Scripted::attempts(
        "pro-m",
        vec![
            pro_says(&["The capital of France", " is Paris, of course."]),
            vec![
                ms(150),
                Step::Fail(duet::providers::ErrorType::ProviderError, false),
            ],
            pro_says(&["TEA or ", "Coffee!"]),
        ],
    );
    let (mut app, writer) = spawn_audited(
        flash,
        pro,
        ADMIN,
        store.clone(),
        WriterOptions::new(dir.join("deadletter.jsonl")),
    )
    .await;

    let first = app.stream(json!({"query": "capital?"})).await;
    let first_id = check_invariants(&first);
    let value = expected(&first);
    // 2 · |{paris, is, the, capital}| / (4 + 8) words.
    assert_eq!(value, 2.0 / 3.0);
    assert!(close(agreement_of(done(&first)).unwrap(), value));
    let partial = app.stream(json!({"query": "second?"})).await;
    let partial_id = check_invariants(&partial);
    assert_eq!(done(&partial)["status"], "partial");
    assert_eq!(agreement_of(done(&partial)), None);
    let same = app.stream(json!({"query": "drink?"})).await;
    let same_id = check_invariants(&same);
    assert_eq!(expected(&same), 1.0);
    assert_eq!(agreement_of(done(&same)), Some(1.0));

    // The record, read back from the database bit for bit.
    assert_eq!(ended(&store, &first_id).await.agreement, Some(value));
    assert_eq!(ended(&store, &partial_id).await.agreement, None);
    assert_eq!(ended(&store, &same_id).await.agreement, Some(1.0));

    // As operators read it over HTTP: the record at top level, and the list.
    let shown = get(&app, &format!("/runs/{first_id}")).await;
    assert!(close(agreement_of(&shown).unwrap(), value), "{shown}");
    let shown = get(&app, &format!("/runs/{partial_id}")).await;
    assert_eq!(agreement_of(&shown), None, "{shown}");
    let list = get(&app, "/runs").await;
    let listed: Vec<(String, Option<f64>)> = list["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["run_id"].as_str().unwrap().to_owned(), agreement_of(r)))
        .collect();
    assert_eq!(listed.len(), 3, "{list}");
    assert_eq!(listed[0], (same_id.clone(), Some(1.0)));
    assert_eq!(listed[1], (partial_id.clone(), None));
    assert_eq!(listed[2].0, first_id);
    assert!(close(listed[2].1.unwrap(), value));

    // Observed once per run that has a value: the partial run adds nothing.
    let m = scrape(&app).await;
    assert_eq!(sample(&m, "duet_preview_agreement_count"), 2.0, "{m}");
    assert!(close(sample(&m, "duet_preview_agreement_sum"), value + 1.0));
    assert_eq!(
        sample(&m, r#"duet_preview_agreement_bucket{le="0.6"}"#),
        0.0
    );
    assert_eq!(
        sample(&m, r#"duet_preview_agreement_bucket{le="0.7"}"#),
        1.0
    );
    assert_eq!(sample(&m, r#"duet_preview_agreement_bucket{le="1"}"#), 2.0);

    app.stop().await;
    writer.shutdown(Duration::from_secs(10)).await;
    docs_queries_answer(&store, &first_id, &same_id, value).await;
}

#[tokio::test]
async fn agreement_is_the_same_everywhere_sqlite() {
    let db = db::sqlite().await;
    agreement_is_the_same_everywhere(db.store.clone(), db.dir.path()).await;
}

#[tokio::test]
async fn agreement_is_the_same_everywhere_postgres() {
    let Some(pg) = db::postgres("agreement_is_the_same_everywhere").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    agreement_is_the_same_everywhere(pg.store.clone(), dir.path()).await;
}

/// The SQL blocks of docs/audit.md's question `heading`, in order (SQLite, PostgreSQL).
fn docs_queries(heading: &str) -> Vec<String> {
    let doc = include_str!("../../docs/audit.md");
    let section = doc
        .split(heading)
        .nth(1)
        .unwrap_or_else(|| panic!("docs/audit.md has {heading}"));
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
    assert_eq!(blocks.len(), 2, "{heading}: one query per backend");
    blocks
}

/// Runs a docs query and gives its rows as JSON objects (the named columns on SQLite, whose
/// `json_object` needs them spelt out).
async fn rows(store: &Store, sql: &str, columns: &[&str]) -> Vec<Value> {
    use sqlx::Row;
    let (wrapped, rows) = match store {
        Store::Postgres(pool) => {
            let wrapped = format!("SELECT row_to_json(q)::text AS j FROM ({sql}) q");
            let rows = sqlx::query(&wrapped).fetch_all(pool).await;
            (wrapped, rows.map(|r| r.iter().map(|r| r.get(0)).collect()))
        }
        Store::Sqlite(s) => {
            let pairs: Vec<String> = columns.iter().map(|c| format!("'{c}', {c}")).collect();
            let wrapped = format!("SELECT json_object({}) AS j FROM ({sql})", pairs.join(", "));
            let rows = sqlx::query(&wrapped).fetch_all(s.pool()).await;
            (wrapped, rows.map(|r| r.iter().map(|r| r.get(0)).collect()))
        }
    };
    let rows: Vec<String> = rows.unwrap_or_else(|e| panic!("{e}: {wrapped}"));
    rows.iter()
        .map(|j| serde_json::from_str(j).unwrap())
        .collect()
}

/// The docs' queries on a store holding the three runs above.
async fn docs_queries_answer(store: &Store, first_id: &str, same_id: &str, value: f64) {
    let backend = usize::from(matches!(store, Store::Postgres(_)));
    let by_day = &docs_queries("### 11. Preview agreement by model pair and day")[backend];
    let days = rows(
        store,
        by_day,
        &[
            "day_utc",
            "flash_model",
            "pro_model",
            "runs",
            "compared",
            "mean_agreement",
            "min_agreement",
            "below_half",
        ],
    )
    .await;
    assert_eq!(days.len(), 1, "{days:?}");
    let day = &days[0];
    assert_eq!(
        (&day["flash_model"], &day["pro_model"]),
        (&json!("flash-m"), &json!("pro-m"))
    );
    assert_eq!((&day["runs"], &day["compared"]), (&json!(3), &json!(2)));
    let round3 = |x: f64| (x * 1e3).round() / 1e3;
    let number = |v: &Value| v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
    assert!((number(&day["mean_agreement"]) - round3((value + 1.0) / 2.0)).abs() < 1e-9);
    assert!((number(&day["min_agreement"]) - round3(value)).abs() < 1e-9);
    assert_eq!(day["below_half"], 0);

    let worst = &docs_queries("### 12. Runs where the preview was most wrong")[backend];
    let runs = rows(
        store,
        worst,
        &[
            "created_at",
            "run_id",
            "agreement",
            "flash_model",
            "pro_model",
            "flash_text",
            "pro_text",
        ],
    )
    .await;
    // Lowest first; the partial run (no agreement) is not there.
    let ids: Vec<&str> = runs.iter().map(|r| r["run_id"].as_str().unwrap()).collect();
    assert_eq!(ids, [first_id, same_id], "{runs:?}");
    assert_eq!(runs[0]["flash_text"], "Paris is the capital.");
    assert_eq!(
        runs[0]["pro_text"],
        "The capital of France is Paris, of course."
    );
    assert!((number(&runs[0]["agreement"]) - round3(value)).abs() < 1e-9);
}

/// Answers with the same words, whatever the case and punctuation, agree fully, in the
/// stream and in `POST /query`.
#[tokio::test(start_paused = true)]
async fn the_same_words_agree_fully() {
    let mut app = spawn_app(
        vec![
            ms(300),
            Step::Delta("Measure, "),
            Step::Delta("then cut."),
            Step::Finish,
        ],
        vec![ms(900), Step::Delta("measure THEN cut"), Step::Finish],
        &[],
    )
    .await;
    let events = app.stream(json!({"query": "q"})).await;
    check_invariants(&events);
    assert_eq!(agreement_of(done(&events)), Some(1.0));
    let body: Value = app
        .post_query(json!({"query": "q"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(agreement_of(&body), Some(1.0), "{body}");
    let records = app.records(2).await;
    assert!(records.iter().all(|r| r.agreement == Some(1.0)));
    let m = scrape(&app).await;
    assert_eq!(sample(&m, "duet_preview_agreement_count"), 2.0);
    app.stop().await;
}

/// `null` unless both answers exist: a skipped Flash (Pro first), a Pro timeout, a cancelled
/// run. Nothing is observed in the histogram.
#[tokio::test(start_paused = true)]
async fn no_agreement_without_both_answers() {
    // Pro answers at about 2 s, before Flash would at 3 s: Flash is skipped.
    let skipped = vec![ms(3000), Step::Delta("late"), Step::Finish];
    let mut app = spawn_app(skipped, normal_pro(), &[]).await;
    let events = app.stream(json!({"query": "q"})).await;
    assert_eq!(done(&events)["flash"], "skipped");
    assert_eq!(agreement_of(done(&events)), None);
    assert_eq!(app.records(1).await[0].agreement, None);
    let m = scrape(&app).await;
    assert_eq!(sample(&m, "duet_preview_agreement_count"), 0.0);
    app.stop().await;

    let mut app = spawn_app(normal_flash(), vec![Step::Hang], &[("PRO_TIMEOUT_S", "1")]).await;
    let events = app.stream(json!({"query": "q"})).await;
    assert_eq!(
        (&done(&events)["status"], &done(&events)["pro"]),
        (&json!("partial"), &json!("timeout"))
    );
    assert_eq!(agreement_of(done(&events)), None);
    let body: Value = app
        .post_query(json!({"query": "q"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(agreement_of(&body), None, "{body}");
    assert!(app.records(2).await.iter().all(|r| r.agreement.is_none()));
    let m = scrape(&app).await;
    assert_eq!(sample(&m, "duet_preview_agreement_count"), 0.0);
    app.stop().await;
}

/// A run cut short by shutdown after Flash answered (Pro `cancelled`): no agreement.
#[tokio::test(start_paused = true)]
async fn a_cancelled_run_has_no_agreement() {
    let mut app = spawn_app(
        normal_flash(),
        vec![Step::Hang],
        &[("SHUTDOWN_GRACE_S", "2")],
    )
    .await;
    let resp = app.post_stream(json!({"query": "q"})).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stop = tokio::spawn({
        let server = app.server.take().unwrap();
        async move { server.stop().await }
    });
    let events = read_events(resp).await;
    let d = done(&events);
    assert_eq!(
        (d["status"].as_str(), d["flash"].as_str(), d["pro"].as_str()),
        (Some("cancelled"), Some("ok"), Some("cancelled"))
    );
    assert_eq!(agreement_of(d), None);
    stop.await.unwrap().unwrap();
    assert_eq!(app.records(1).await[0].agreement, None);
}

/// A record that could not be written keeps its agreement in the dead-letter file, and
/// `duet audit replay` stores it as it was.
#[tokio::test]
async fn dead_letter_and_replay_keep_the_agreement() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("audit.db").display());
    // Not migrated: every write fails, and the record goes to the dead-letter file.
    let unmigrated = Store::connect(&url).await.unwrap();
    let mut options = WriterOptions::new(dir.path().join("deadletter.jsonl"));
    options.retry.base = Duration::from_millis(10);
    options.retry.cap = Duration::from_millis(20);
    options.retry.retries = 1;
    let dl_path = options.deadletter_path.clone();
    let (mut app, writer) = spawn_audited(
        Scripted::new("flash-m", flash_says(&["one two three"])),
        Scripted::new("pro-m", pro_says(&["one four five six"])),
        &[],
        unmigrated.clone(),
        options,
    )
    .await;
    let events = app.stream(json!({"query": "q"})).await;
    let run_id = check_invariants(&events);
    app.stop().await;
    writer.shutdown(Duration::from_secs(10)).await;
    // 2 · 1 / (3 + 4): not a short binary fraction, so the line must keep every bit.
    let value = expected(&events);
    assert_eq!(value, 2.0 / 7.0);
    let dead = dead_letters(&dl_path);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].agreement, Some(value));

    unmigrated.migrate().await.unwrap();
    assert_eq!(replay(&unmigrated, &dl_path).await.unwrap().written, 1);
    assert_eq!(ended(&unmigrated, &run_id).await.agreement, Some(value));
    unmigrated.close().await;
}
