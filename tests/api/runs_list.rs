//! `GET /runs` (contract §12): filters, keyset pages that stay stable while runs arrive, the
//! JSON lines export, the admin gate, and `EXPLAIN` showing every filter uses an index, on
//! SQLite and on PostgreSQL.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use duet::audit::{
    AuditWriter, RunStatus, Store, WriterOptions,
    list::{Flavour, RunFilter, list_sql},
};
use serde_json::Value;
use uuid::Uuid;

use crate::{
    db::{self, execute, record},
    helpers::*,
};

const TOKEN: &str = "runs-admin-token";

/// A fixed past instant: the seeded runs are `BASE + i seconds`.
fn base() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-10T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

/// What differs between the seeded runs.
struct Seed {
    at: DateTime<Utc>,
    status: RunStatus,
    client: Option<&'static str>,
    flash_model: &'static str,
    query: String,
}

async fn seed(store: &Store, seeds: &[Seed]) -> Vec<Uuid> {
    let records: Vec<_> = seeds
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut r = record(i);
            r.created_at = s.at;
            r.status = s.status;
            r.client_id = s.client.map(str::to_owned);
            r.flash.model = s.flash_model.to_owned();
            r.query = s.query.clone();
            r
        })
        .collect();
    store.insert(&records).await.unwrap();
    records.iter().map(|r| r.run_id).collect()
}

/// A `running` row, as the writer stores it when a run starts.
async fn seed_running(store: &Store, at: DateTime<Utc>) -> Uuid {
    let id = Uuid::now_v7();
    let at = at.format("%Y-%m-%dT%H:%M:%S%.6fZ");
    execute(
        store,
        &format!(
            "INSERT INTO dual_runs (run_id, created_at, query, status, total_ms, \
             service_version) VALUES ('{id}', '{at}', 'still going', 'running', 0, 't')"
        ),
    )
    .await;
    id
}

async fn app(store: &Store, dir: &std::path::Path, token: bool) -> (TestApp, AuditWriter) {
    let overrides: &[(&str, &str)] = if token {
        &[("ADMIN_TOKEN", TOKEN)]
    } else {
        &[]
    };
    spawn_audited(
        Scripted::new("flash-m", vec![Step::Finish]),
        Scripted::new("pro-m", vec![Step::Finish]),
        overrides,
        store.clone(),
        WriterOptions::new(dir.join("deadletter.jsonl")),
    )
    .await
}

async fn get(app: &TestApp, path_and_query: &str) -> (u16, Value) {
    let resp = app
        .client
        .get(app.url(path_and_query))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

fn ids(page: &Value) -> Vec<String> {
    page["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run_id"].as_str().unwrap().to_owned())
        .collect()
}

fn strs(ids: &[Uuid]) -> Vec<String> {
    ids.iter().map(Uuid::to_string).collect()
}

async fn filters(store: &Store, dir: &std::path::Path) {
    let t = |s: i64| base() + TimeDelta::seconds(s);
    let seeds = vec![
        Seed {
            at: t(0),
            status: RunStatus::Ok,
            client: Some("alpha"),
            flash_model: "flash-a",
            query: "Why is the sky blue?".into(),
        },
        Seed {
            at: t(10),
            status: RunStatus::Failed,
            client: Some("beta"),
            flash_model: "flash-b",
            query: "100% sure_thing".into(),
        },
        Seed {
            at: t(20),
            status: RunStatus::Ok,
            client: None,
            flash_model: "flash-a",
            query: "why so serious".into(),
        },
        Seed {
            at: t(30),
            status: RunStatus::Partial,
            client: Some("alpha"),
            flash_model: "flash-b",
            query: "100 percent".into(),
        },
    ];
    let id = seed(store, &seeds).await;
    let running = seed_running(store, t(40)).await;
    let (mut app, writer) = app(store, dir, true).await;

    let (status, all) = get(&app, "/runs").await;
    assert_eq!(status, 200, "{all}");
    let mut newest_first = strs(&[running, id[3], id[2], id[1], id[0]]);
    assert_eq!(ids(&all), newest_first);
    assert_eq!(all["next_cursor"], Value::Null);
    // The summary of a finished run and of a running one.
    let first = &all["runs"][4];
    assert_eq!(first["status"], "ok");
    assert_eq!(first["query"], "Why is the sky blue?");
    assert_eq!(first["client_id"], "alpha");
    assert_eq!(first["created_at"], "2026-01-10T00:00:00Z");
    assert_eq!(first["total_ms"], 2040);
    assert_eq!(first["agreement"], Value::Null);
    assert_eq!(first["flash"]["model_name"], "flash-a");
    assert_eq!(first["flash"]["outcome"], "ok");
    assert_eq!(first["pro"]["model_name"], "pro-m");
    assert_eq!(first["pro"]["outcome"], "timeout");
    assert!(first["cost_usd"].as_f64().unwrap() > 0.0);
    let open = &all["runs"][0];
    assert_eq!(
        (open["status"].as_str(), open["flash"].is_null()),
        (Some("running"), true)
    );

    newest_first.remove(0);
    for (query, expected) in [
        ("status=ok", vec![id[2], id[0]]),
        ("status=running", vec![running]),
        ("status=cancelled", vec![]),
        (
            "since=2026-01-10T00:00:10Z",
            vec![running, id[3], id[2], id[1]],
        ),
        ("until=2026-01-10T00:00:10Z", vec![id[0]]),
        (
            "since=2026-01-10T01:00:10%2B01:00&until=2026-01-10T00:00:30Z",
            vec![id[2], id[1]],
        ),
        ("model_name=flash-b", vec![id[3], id[1]]),
        ("model_name=pro-m", vec![id[3], id[2], id[1], id[0]]),
        ("client_id=alpha", vec![id[3], id[0]]),
        ("q=why", vec![id[2]]),
        ("q=Why", vec![id[0]]),
        // A running run is found by its text too, alone and with ended ones.
        ("q=still", vec![running]),
        ("q=o", vec![running, id[2]]),
        ("status=running&q=going", vec![running]),
        // Wildcards mean themselves.
        ("q=100%25", vec![id[1]]),
        ("q=e_t", vec![id[1]]),
        ("q=%25", vec![id[1]]),
        (
            "status=ok&client_id=alpha&model_name=flash-a&q=sky",
            vec![id[0]],
        ),
    ] {
        let (status, page) = get(&app, &format!("/runs?{query}")).await;
        assert_eq!(status, 200, "{query}: {page}");
        assert_eq!(ids(&page), strs(&expected), "{query}");
    }

    for (query, word) in [
        ("status=done", "status"),
        ("since=tuesday", "since"),
        ("until=2026-01-10", "until"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("cursor=bm9wZQ", "cursor"),
        ("client_id=", "client_id"),
        ("sort=asc", "sort"),
    ] {
        let (status, body) = get(&app, &format!("/runs?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(word), "{query}: {message}");
    }
    let (_, body) = get(&app, "/runs?sort=asc").await;
    assert_eq!(
        body["error"]["message"],
        "unknown parameter `sort`; the parameters are status, since, until, model_name, \
         client_id, q, limit, cursor"
    );
    app.stop().await;
    writer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn each_filter_on_sqlite() {
    let db = db::sqlite().await;
    filters(&db.store, db.dir.path()).await;
}

#[tokio::test]
async fn each_filter_on_postgres() {
    let Some(db) = db::postgres("each_filter_on_postgres").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    filters(&db.store, dir.path()).await;
}

/// Pages of 7 while new runs keep arriving between fetches, some at the same instant as
/// runs already listed: every run that was there at the start is listed exactly once.
async fn pages_under_inserts(store: &Store, dir: &std::path::Path) {
    let t = |s: i64| base() + TimeDelta::seconds(s);
    // Pairs at the same instant: the run id breaks the tie.
    let seeds: Vec<Seed> = (0..30)
        .map(|i| Seed {
            at: t(i / 2),
            status: RunStatus::Ok,
            client: None,
            flash_model: "flash-m",
            query: format!("q{i}"),
        })
        .collect();
    let mut expected = strs(&seed(store, &seeds).await);
    expected.reverse();
    let (mut app, writer) = app(store, dir, true).await;
    let mut listed = Vec::new();
    let mut path = "/runs?limit=7&status=ok".to_owned();
    let mut pages = 0;
    loop {
        let (status, page) = get(&app, &path).await;
        assert_eq!(status, 200, "{page}");
        listed.extend(ids(&page));
        pages += 1;
        // Runs arrive: newer than all, and at the instant of the run the page ended on.
        let newer = [Seed {
            at: Utc::now(),
            status: RunStatus::Ok,
            client: None,
            flash_model: "flash-m",
            query: "new".into(),
        }];
        seed(store, &newer).await;
        let Some(cursor) = page["next_cursor"].as_str() else {
            break;
        };
        path = format!("/runs?limit=7&status=ok&cursor={cursor}");
    }
    assert_eq!(pages, 5);
    assert_eq!(listed, expected);
    app.stop().await;
    writer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn pages_are_stable_while_runs_arrive_on_sqlite() {
    let db = db::sqlite().await;
    pages_under_inserts(&db.store, db.dir.path()).await;
}

#[tokio::test]
async fn pages_are_stable_while_runs_arrive_on_postgres() {
    let Some(db) = db::postgres("pages_are_stable_while_runs_arrive_on_postgres").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    pages_under_inserts(&db.store, dir.path()).await;
}

async fn ndjson(store: &Store, dir: &std::path::Path) {
    let seeds: Vec<Seed> = (0..700)
        .map(|i| Seed {
            at: base() + TimeDelta::milliseconds(i),
            status: RunStatus::Ok,
            client: Some(if i % 2 == 0 { "even" } else { "odd" }),
            flash_model: "flash-m",
            query: format!("q{i}"),
        })
        .collect();
    let mut expected = strs(&seed(store, &seeds).await);
    expected.reverse();
    let (mut app, writer) = app(store, dir, true).await;
    let resp = app
        .client
        .get(app.url("/runs"))
        .bearer_auth(TOKEN)
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let body = resp.text().await.unwrap();
    assert!(body.ends_with('\n'));
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // More than the largest page: no page limit.
    let got: Vec<String> = lines
        .iter()
        .map(|r| r["run_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, expected);
    assert_eq!(lines[0]["flash"]["model_name"], "flash-m");

    let resp = app
        .client
        .get(app.url("/runs?client_id=odd&q=q1"))
        .bearer_auth(TOKEN)
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap();
    let body = resp.text().await.unwrap();
    let odd_q1 = (0..700)
        .filter(|i| i % 2 == 1 && format!("q{i}").contains("q1"))
        .count();
    assert_eq!(body.lines().count(), odd_q1);
    app.stop().await;
    writer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn ndjson_exports_every_run_on_sqlite() {
    let db = db::sqlite().await;
    ndjson(&db.store, db.dir.path()).await;
}

#[tokio::test]
async fn ndjson_exports_every_run_on_postgres() {
    let Some(db) = db::postgres("ndjson_exports_every_run_on_postgres").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    ndjson(&db.store, dir.path()).await;
}

#[tokio::test]
async fn the_admin_api_says_it_is_off_and_wants_the_token() {
    let db = db::sqlite().await;
    let (mut off, writer) = app(&db.store, db.dir.path(), false).await;
    for path in ["/runs", "/runs?status=ok", "/runs/abc"] {
        let (status, body) = get(&off, path).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["error"]["type"], "not_found");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("admin API is off"), "{path}: {message}");
    }
    off.stop().await;
    writer.shutdown(Duration::from_secs(5)).await;

    let (mut on, writer) = app(&db.store, db.dir.path(), true).await;
    for token in [None, Some("wrong")] {
        let mut req = on.client.get(on.url("/runs?status=nonsense"));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.unwrap();
        // Authentication comes before the filters are read.
        assert_eq!(resp.status(), 401, "{token:?}");
        assert!(resp.headers().contains_key("www-authenticate"));
    }
    on.stop().await;
    writer.shutdown(Duration::from_secs(5)).await;
}

/// One filter at a time (and the cursor), as the list asks for them.
fn each_filter() -> Vec<(&'static str, RunFilter)> {
    let cursor = duet::audit::list::Cursor {
        created_at: base(),
        run_id: Uuid::now_v7(),
    };
    vec![
        (
            "status",
            RunFilter {
                status: Some("failed".into()),
                ..RunFilter::default()
            },
        ),
        (
            "since",
            RunFilter {
                since: Some(base()),
                ..RunFilter::default()
            },
        ),
        (
            "until",
            RunFilter {
                until: Some(base()),
                ..RunFilter::default()
            },
        ),
        (
            "model_name",
            RunFilter {
                model_name: Some("flash-x".into()),
                ..RunFilter::default()
            },
        ),
        (
            "client_id",
            RunFilter {
                client_id: Some("alpha".into()),
                ..RunFilter::default()
            },
        ),
        (
            "cursor",
            RunFilter {
                after: Some(cursor),
                ..RunFilter::default()
            },
        ),
    ]
}

#[tokio::test]
async fn every_filter_uses_an_index_on_sqlite() {
    let db = db::sqlite().await;
    let Store::Sqlite(s) = &db.store else {
        unreachable!()
    };
    for (name, filter) in each_filter() {
        let (sql, binds) = list_sql(Flavour::Sqlite, &filter, Some(50));
        let explain = format!("EXPLAIN QUERY PLAN {sql}");
        let mut query = sqlx::query_as::<_, (i64, i64, i64, String)>(&explain);
        for b in binds {
            query = query.bind(b);
        }
        let plan: Vec<String> = query
            .fetch_all(s.pool())
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.3)
            .collect();
        let plan = plan.join("\n");
        // A bare `SCAN d` reads every run; `SEARCH` seeks to the filter's range.
        assert!(
            !plan.lines().any(|l| l.trim() == "SCAN d"),
            "{name}:\n{plan}"
        );
        let sought = match name {
            "status" => "SEARCH d USING INDEX dual_runs_status_created_at",
            "since" | "until" | "cursor" => "SEARCH d USING INDEX dual_runs_created_at",
            "model_name" => "USING COVERING INDEX model_traces_model_name",
            "client_id" => "SEARCH d USING INDEX dual_runs_client_created",
            _ => unreachable!(),
        };
        assert!(plan.contains(sought), "{name}:\n{plan}");
    }
}

#[tokio::test]
async fn every_filter_uses_an_index_on_postgres() {
    let Some(db) = db::postgres("every_filter_uses_an_index_on_postgres").await else {
        return;
    };
    let Store::Postgres(pool) = &db.store else {
        unreachable!()
    };
    let trigram = db::text(
        &db.store,
        "SELECT indexdef::text FROM pg_indexes WHERE indexname = 'dual_runs_query_trgm' \
         UNION ALL SELECT NULL LIMIT 1",
    )
    .await;
    let mut filters = each_filter();
    if let Some(definition) = trigram {
        // Over ended runs only (migration 0014): a start row costs the index nothing.
        assert!(
            definition.ends_with("WHERE (status <> 'running'::text)"),
            "{definition}"
        );
        filters.push((
            "q",
            RunFilter {
                q: Some("sky blue".into()),
                ..RunFilter::default()
            },
        ));
    }
    let mut conn = pool.acquire().await.unwrap();
    // An empty table is cheapest read whole: turning that off shows whether an index
    // could serve the filter at all.
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    for (name, filter) in filters {
        if name == "q" {
            // Walking `dual_runs_created_at` newest first and testing each row is a plan for
            // any filter (and the cheapest for a common substring); without it, what is left
            // shows whether the trigram index can answer `q` over ended and running runs.
            sqlx::query("SET enable_indexscan = off")
                .execute(&mut *conn)
                .await
                .unwrap();
        }
        let (sql, binds) = list_sql(Flavour::Postgres, &filter, Some(50));
        let explain = format!("EXPLAIN {sql}");
        let mut query = sqlx::query_scalar::<_, String>(&explain);
        for b in binds {
            query = query.bind(b);
        }
        let plan = query.fetch_all(&mut *conn).await.unwrap().join("\n");
        assert!(!plan.contains("Seq Scan on dual_runs"), "{name}:\n{plan}");
        let index = match name {
            "status" => "dual_runs_status_created_at",
            "since" | "until" | "cursor" => "dual_runs_created_at",
            "model_name" => "model_traces_model_name",
            "client_id" => "dual_runs_client_created",
            "q" => "dual_runs_query_trgm",
            _ => unreachable!(),
        };
        assert!(plan.contains(index), "{name}:\n{plan}");
        if name == "q" {
            // The runs in flight, which the trigram index leaves out, by their own index.
            assert!(plan.contains("dual_runs_running"), "{name}:\n{plan}");
        }
    }
}
