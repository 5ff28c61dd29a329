//! Cost (contract §9): prices per role make `cost_usd` in the answer events, `done`, the
//! record (both tables, both backends), `/runs/{id}` and `duet_cost_usd_total`; without a
//! price it is `null` everywhere, never 0. The SQL of docs/audit.md ("Cost per day, and per
//! model") is run here, as printed there, against both backends.

use std::time::Duration;

use duet::audit::{Store, WriterOptions, replay::replay};
use serde_json::{Value, json};

use crate::{
    db::{self, count, dead_letters, ended},
    helpers::*,
};

const FLASH_IN: f64 = 0.3;
const FLASH_OUT: f64 = 2.5;
const PRO_IN: f64 = 1.25;
const PRO_OUT: f64 = 10.0;

const PRICES: &[(&str, &str)] = &[
    ("FLASH_PRICE_INPUT_PER_MTOK", "0.3"),
    ("FLASH_PRICE_OUTPUT_PER_MTOK", "2.5"),
    ("PRO_PRICE_INPUT_PER_MTOK", "1.25"),
    ("PRO_PRICE_OUTPUT_PER_MTOK", "10"),
    ("ADMIN_TOKEN", "admin-secret"),
];

/// The scripted models report 7 input tokens and one output token per delta: Flash two,
/// Pro three. The costs as duet computes them, in the same order of operations.
fn flash_cost() -> f64 {
    7.0 * FLASH_IN / 1e6 + 2.0 * FLASH_OUT / 1e6
}

fn pro_cost() -> f64 {
    7.0 * PRO_IN / 1e6 + 3.0 * PRO_OUT / 1e6
}

/// Real clock (the database answers from other threads): Flash well before Pro.
fn quick_flash() -> Vec<Step> {
    vec![
        ms(5),
        Step::Delta("flash"),
        Step::Delta(" answer"),
        Step::Finish,
    ]
}

fn quick_pro() -> Vec<Step> {
    vec![
        ms(300),
        Step::Delta("pro"),
        Step::Delta(" final"),
        Step::Delta(" answer"),
        Step::Finish,
    ]
}

/// `cost_usd` of an event: present, and a number or `null`.
fn cost_of(data: &Value) -> Option<f64> {
    let cost = data
        .get("cost_usd")
        .unwrap_or_else(|| panic!("cost_usd is always present: {data}"));
    assert!(cost.is_null() || cost.is_f64(), "{data}");
    cost.as_f64()
}

/// Equal up to JSON's decimal round trip (serde_json may be off by one unit in the last place).
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= b.abs() * 1e-15
}

/// A sample of the exposition, e.g. `duet_cost_usd_total{model="flash",...}`; `None` when absent.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

async fn priced_run_is_costed_everywhere(store: Store, dir: &std::path::Path) {
    let options = WriterOptions::new(dir.join("deadletter.jsonl"));
    let (mut app, writer) = spawn_audited(
        Scripted::new("flash-m", quick_flash()),
        Scripted::new("pro-m", quick_pro()),
        PRICES,
        store.clone(),
        options,
    )
    .await;
    let events = app.stream(json!({"query": "q"})).await;
    let run_id = check_invariants(&events);
    let flash = cost_of(event_data(&events, "flash")).unwrap();
    let pro = cost_of(event_data(&events, "pro")).unwrap();
    let done = cost_of(done(&events)).unwrap();
    assert!(close(flash, flash_cost()), "{flash}");
    assert!(close(pro, pro_cost()), "{pro}");
    assert!(close(done, flash_cost() + pro_cost()), "{done}");

    // Both tables, read back bit for bit.
    let record = ended(&store, &run_id).await;
    assert_eq!(record.flash.cost_usd, Some(flash_cost()));
    assert_eq!(record.pro.cost_usd, Some(pro_cost()));
    assert_eq!(record.cost_usd, Some(flash_cost() + pro_cost()));
    // The run's token totals, beside its cost, for whatever reads the record at run end.
    assert_eq!(record.tokens().input_tokens, Some(14));
    assert_eq!(record.tokens().output_tokens, Some(5));

    // As operators read it over HTTP.
    let shown: Value = app
        .client
        .get(app.url(&format!("/runs/{run_id}")))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        close(shown["cost_usd"].as_f64().unwrap(), flash + pro),
        "{shown}"
    );
    assert!(close(shown["flash"]["cost_usd"].as_f64().unwrap(), flash));
    assert!(close(shown["pro"]["cost_usd"].as_f64().unwrap(), pro));

    // Bounded labels: the configured provider and model names, never the upstream's version.
    let m = scrape(&app).await;
    let flash_series =
        r#"duet_cost_usd_total{model="flash",model_name="flash-m",provider="scripted"}"#;
    let pro_series = r#"duet_cost_usd_total{model="pro",model_name="pro-m",provider="scripted"}"#;
    assert!(
        close(sample(&m, flash_series).unwrap(), flash_cost()),
        "{m}"
    );
    assert!(close(sample(&m, pro_series).unwrap(), pro_cost()), "{m}");
    assert!(!m.contains("flash-m-v1"), "no upstream version in labels");

    app.stop().await;
    writer.shutdown(Duration::from_secs(10)).await;
    docs_queries_answer(&store, flash_cost(), pro_cost()).await;
}

#[tokio::test]
async fn priced_run_is_costed_everywhere_sqlite() {
    let db = db::sqlite().await;
    priced_run_is_costed_everywhere(db.store.clone(), db.dir.path()).await;
}

#[tokio::test]
async fn priced_run_is_costed_everywhere_postgres() {
    let Some(pg) = db::postgres("priced_run_is_costed_everywhere").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    priced_run_is_costed_everywhere(pg.store.clone(), dir.path()).await;
}

/// The SQL blocks of docs/audit.md's section "9. Cost per day, and per model", in order:
/// per day (SQLite, PostgreSQL), per model (SQLite, PostgreSQL).
fn docs_queries() -> Vec<String> {
    let doc = include_str!("../../docs/audit.md");
    let section = doc
        .split("### 9. Cost per day, and per model")
        .nth(1)
        .expect("docs/audit.md has the cost queries");
    // Up to the next question.
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
    assert_eq!(
        blocks.len(),
        4,
        "four queries: per day and per model, two backends"
    );
    blocks
}

/// Runs a docs query and gives its rows as JSON objects, on either backend.
async fn rows(store: &Store, sql: &str) -> Vec<Value> {
    use sqlx::Row;
    match store {
        Store::Postgres(pool) => {
            let wrapped = format!("SELECT row_to_json(q)::text AS j FROM ({sql}) q");
            sqlx::query(&wrapped)
                .fetch_all(pool)
                .await
                .unwrap_or_else(|e| panic!("{e}: {sql}"))
                .iter()
                .map(|r| serde_json::from_str(&r.get::<String, _>("j")).unwrap())
                .collect()
        }
        Store::Sqlite(s) => {
            // SQLite's json_object names every column: wrap the query's columns by name.
            let columns = if sql.contains("GROUP BY day_utc") {
                "'day_utc', day_utc, 'runs', runs, 'priced', priced, 'cost_usd', cost_usd"
            } else {
                "'model', model, 'model_name', model_name, 'calls', calls, 'priced', priced, \
                 'input_tokens', input_tokens, 'output_tokens', output_tokens, \
                 'cost_usd', cost_usd"
            };
            let wrapped = format!("SELECT json_object({columns}) AS j FROM ({sql})");
            sqlx::query(&wrapped)
                .fetch_all(s.pool())
                .await
                .unwrap_or_else(|e| panic!("{e}: {sql}"))
                .iter()
                .map(|r| serde_json::from_str(&r.get::<String, _>("j")).unwrap())
                .collect()
        }
    }
}

fn number(v: &Value) -> f64 {
    // PostgreSQL's numeric comes as a JSON number; SQLite's REAL too.
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn rounded(usd: f64) -> f64 {
    (usd * 1e6).round() / 1e6
}

/// The docs' queries on a store holding the one priced run above.
async fn docs_queries_answer(store: &Store, flash: f64, pro: f64) {
    let queries = docs_queries();
    let (per_day, per_model) = match store {
        Store::Sqlite(_) => (&queries[0], &queries[2]),
        Store::Postgres(_) => (&queries[1], &queries[3]),
    };
    let days = rows(store, per_day).await;
    assert_eq!(days.len(), 1, "{days:?}");
    assert_eq!(days[0]["runs"], 1);
    assert_eq!(days[0]["priced"], 1);
    assert!((number(&days[0]["cost_usd"]) - rounded(flash + pro)).abs() < 1e-12);
    let models = rows(store, per_model).await;
    assert_eq!(models.len(), 2, "{models:?}");
    // Most expensive first: Pro.
    assert_eq!(models[0]["model"], "pro");
    assert_eq!(models[0]["model_name"], "pro-m");
    assert_eq!(models[0]["output_tokens"], 3);
    assert!((number(&models[0]["cost_usd"]) - rounded(pro)).abs() < 1e-12);
    assert_eq!(models[1]["model"], "flash");
    assert_eq!(models[1]["calls"], 1);
    assert!((number(&models[1]["cost_usd"]) - rounded(flash)).abs() < 1e-12);
}

#[tokio::test(start_paused = true)]
async fn without_prices_cost_is_null_everywhere_and_never_counted() {
    let mut app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let events = app.stream(json!({"query": "q"})).await;
    check_invariants(&events);
    assert_eq!(cost_of(event_data(&events, "flash")), None);
    assert_eq!(cost_of(event_data(&events, "pro")), None);
    assert_eq!(cost_of(done(&events)), None);
    let record = &app.records(1).await[0];
    assert_eq!(
        (record.cost_usd, record.flash.cost_usd, record.pro.cost_usd),
        (None, None, None)
    );
    // Tokens are still known: only their price is not.
    assert_eq!(record.tokens().input_tokens, Some(14));
    let m = scrape(&app).await;
    assert!(!m.contains("duet_cost_usd_total"), "{m}");
    // `POST /query` says the same.
    let body: Value = app
        .post_query(json!({"query": "q"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["cost_usd"], Value::Null, "{body}");
    assert_eq!(body["flash"]["cost_usd"], Value::Null, "{body}");
    app.stop().await;
}

#[tokio::test(start_paused = true)]
async fn one_price_of_a_pair_unset_makes_that_model_and_the_run_unknown() {
    let mut app = spawn_app(
        normal_flash(),
        normal_pro(),
        &[
            ("FLASH_PRICE_INPUT_PER_MTOK", "0.3"),
            ("FLASH_PRICE_OUTPUT_PER_MTOK", "2.5"),
            ("PRO_PRICE_INPUT_PER_MTOK", "1.25"),
        ],
    )
    .await;
    let events = app.stream(json!({"query": "q"})).await;
    check_invariants(&events);
    assert!(close(
        cost_of(event_data(&events, "flash")).unwrap(),
        flash_cost()
    ));
    assert_eq!(cost_of(event_data(&events, "pro")), None);
    // Pro's tokens are known but not priced: a sum of Flash alone would be short.
    assert_eq!(cost_of(done(&events)), None);
    let record = &app.records(1).await[0];
    assert_eq!(record.flash.cost_usd, Some(flash_cost()));
    assert_eq!((record.pro.cost_usd, record.cost_usd), (None, None));
    let m = scrape(&app).await;
    assert!(m.contains(r#"duet_cost_usd_total{model="flash""#), "{m}");
    assert!(!m.contains(r#"duet_cost_usd_total{model="pro""#), "{m}");
    app.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_skipped_flash_adds_nothing_and_the_run_costs_what_pro_did() {
    // Pro answers at about 2 s, before Flash would at 3 s: Flash is skipped, with no usage.
    let flash = vec![ms(3000), Step::Delta("late"), Step::Finish];
    let mut app = spawn_app(flash, normal_pro(), PRICES).await;
    let events = app.stream(json!({"query": "q"})).await;
    check_invariants(&events);
    assert_eq!(done(&events)["flash"], "skipped");
    assert!(close(cost_of(done(&events)).unwrap(), pro_cost()));
    let record = &app.records(1).await[0];
    assert_eq!(record.flash.cost_usd, None);
    assert_eq!(record.cost_usd, Some(pro_cost()));
    assert_eq!(record.tokens().input_tokens, Some(7));
    app.stop().await;
}

/// A record that could not be written keeps its costs in the dead-letter file, and
/// `duet audit replay` stores them as they were.
#[tokio::test]
async fn dead_letter_and_replay_keep_the_cost() {
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
        Scripted::new("flash-m", quick_flash()),
        Scripted::new("pro-m", quick_pro()),
        PRICES,
        unmigrated.clone(),
        options,
    )
    .await;
    let events = app.stream(json!({"query": "q"})).await;
    let run_id = check_invariants(&events);
    app.stop().await;
    writer.shutdown(Duration::from_secs(10)).await;
    let dead = dead_letters(&dl_path);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].cost_usd, Some(flash_cost() + pro_cost()));
    assert_eq!(dead[0].flash.cost_usd, Some(flash_cost()));

    unmigrated.migrate().await.unwrap();
    assert_eq!(replay(&unmigrated, &dl_path).await.unwrap().written, 1);
    let record = ended(&unmigrated, &run_id).await;
    // The database keeps microseconds of `created_at`; the costs come back bit for bit.
    assert_eq!(
        (record.cost_usd, record.flash.cost_usd, record.pro.cost_usd),
        (dead[0].cost_usd, Some(flash_cost()), Some(pro_cost()))
    );
    assert_eq!(count(&unmigrated, "model_traces").await, 2);
    unmigrated.close().await;
}
