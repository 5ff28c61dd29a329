//! The real binary and the audit trail: zero-config SQLite with the drain on SIGTERM,
//! `duet migrate` (`--revert`, `--status`, the `--yes` guard, and the rollback procedure of
//! the runbook against an older release's migrations), `duet audit replay` run twice, with
//! `--file`, with only a journal, and with nothing to read. A little over 500 lines: every test
//! here drives the real binary, and the rollback helpers (an older release's migrator, a schema
//! snapshot) serve only these tests.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use duet::audit::Store;
use serde_json::json;
use sqlx::migrate::{MigrateError, Migrator};

use crate::db::{self, count};

fn duet(dir: &Path) -> Command {
    crate::helpers::duet_command(dir)
}

/// The command's stderr, once it has failed.
fn failure_of(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        !out.status.success(),
        "expected a failure, got: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn zero_config_serve_writes_runs_to_duet_db_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = duet(dir.path())
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("SIMULATED_FLASH_TTFT_S", "0.01")
        .env("SIMULATED_FLASH_TOKEN_S", "0.001")
        .env("SIMULATED_PRO_TTFT_S", "0.02")
        .env("SIMULATED_PRO_TOKEN_S", "0.001")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (addr, _log) = crate::helpers::listening(&mut child);
    let client = reqwest::Client::new();
    for i in 0..3 {
        let resp =
            crate::helpers::post_query_to(&client, &addr, json!({"query": format!("q{i}")})).await;
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(crate::helpers::terminate(child).await, Some(0));
    let url = format!("sqlite://{}", dir.path().join("duet.db").display());
    let store = duet::audit::Store::connect(&url).await.unwrap();
    assert_eq!(count(&store, "dual_runs").await, 3);
    assert_eq!(count(&store, "model_traces").await, 6);
}

#[test]
fn migrate_applies_reverts_and_reapplies() {
    let dir = tempfile::tempdir().unwrap();
    let migrate = |args: &[&str]| {
        stdout_of(
            duet(dir.path())
                .env("DATABASE_URL", "sqlite://audit.db")
                .arg("migrate")
                .args(args),
        )
    };
    // The SQLite migrations this build has (8 is the clients', 7 the cost issue's).
    let mut versions: Vec<i64> = migration_files("sqlite").iter().map(|(v, _)| *v).collect();
    versions.sort_unstable();
    versions.dedup();
    let list = |v: &[i64]| {
        v.iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (newest, older) = versions.split_last().unwrap();
    let previous = older.last().unwrap();
    let applied = format!("applied migrations [{}]\n", list(&versions));
    assert_eq!(migrate(&[]), applied);
    assert_eq!(migrate(&[]), format!("up to date at version {newest}\n"));
    assert_eq!(
        migrate(&["--revert"]),
        format!("reverted migrations [{newest}]; now at version {previous}\n")
    );
    assert_eq!(
        migrate(&["--revert", "--to", "0"]),
        format!("reverted migrations [{}]; now at version 0\n", list(older))
    );
    assert_eq!(migrate(&["--revert"]), "nothing to revert\n");
    assert_eq!(migrate(&[]), applied);
}

#[tokio::test]
async fn audit_replay_writes_then_changes_nothing() {
    let db = db::sqlite().await;
    let path = db.dir.path().join("dl.jsonl");
    let records = [db::record(1), db::record(2)];
    let lines: String = records
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    std::fs::write(&path, lines).unwrap();
    let replay = || {
        stdout_of(
            duet(db.dir.path())
                .env("DATABASE_URL", &db.url)
                .env("AUDIT_DEADLETTER_PATH", &path)
                .args(["audit", "replay"]),
        )
    };
    // Blocking here is fine: nothing else runs on this test's runtime meanwhile.
    let first = replay();
    assert_eq!(
        first,
        format!(
            "replayed {}: 2 written, 0 skipped (already stored), 0 kept in the file\n",
            path.display()
        )
    );
    // The first replay took the whole file: the second finds none, says so, changes nothing.
    let second = failure_of(
        duet(db.dir.path())
            .env("DATABASE_URL", &db.url)
            .env("AUDIT_DEADLETTER_PATH", &path)
            .args(["audit", "replay"]),
    );
    assert!(second.contains(&path.display().to_string()), "{second}");
    assert_eq!(count(&db.store, "dual_runs").await, 2);
}

fn jsonl(records: &[duet::audit::RunRecord]) -> String {
    records
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect()
}

#[test]
fn audit_replay_with_no_file_fails_with_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    // The default AUDIT_DEADLETTER_PATH is relative: the message names it absolute, so an
    // operator in the wrong directory sees where it was looked for.
    let stderr = failure_of(
        duet(dir.path())
            .env("DATABASE_URL", "sqlite://audit.db")
            .args(["audit", "replay"]),
    );
    let expected = dir.path().join("duet-deadletter.jsonl");
    assert_eq!(
        stderr,
        format!(
            "duet: no dead-letter file at {} (named by AUDIT_DEADLETTER_PATH), nor a journal \
             beside it: nothing to replay; check the path, or pass --file PATH\n",
            expected.display()
        )
    );
    // It failed before opening the database: nothing was created.
    assert!(!dir.path().join("audit.db").exists());
    let stderr = failure_of(
        duet(dir.path())
            .env("DATABASE_URL", "sqlite://audit.db")
            .args(["audit", "replay", "--file", "elsewhere.jsonl"]),
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{} (named by --file)",
            dir.path().join("elsewhere.jsonl").display()
        )),
        "{stderr}"
    );
}

#[tokio::test]
async fn audit_replay_file_reads_another_file_and_leaves_the_configured_one() {
    let db = db::sqlite().await;
    let configured = db.dir.path().join("dl.jsonl");
    let configured_lines = jsonl(&[db::record(1)]);
    std::fs::write(&configured, &configured_lines).unwrap();
    // A dead replica's file, copied over, with its journal beside it.
    let copied = db.dir.path().join("replica-2.jsonl");
    std::fs::write(&copied, jsonl(&[db::record(2), db::record(3)])).unwrap();
    let copied_journal = db.dir.path().join("replica-2.jsonl.journal");
    std::fs::write(&copied_journal, jsonl(&[db::record(4)])).unwrap();
    let out = stdout_of(
        duet(db.dir.path())
            .env("DATABASE_URL", &db.url)
            .env("AUDIT_DEADLETTER_PATH", &configured)
            .args(["audit", "replay", "--file", "replica-2.jsonl"]),
    );
    assert_eq!(
        out,
        format!(
            "replayed {}: 1 written, 0 skipped (already stored), 0 kept in the file\n\
             replayed {}: 2 written, 0 skipped (already stored), 0 kept in the file\n",
            copied_journal.display(),
            copied.display()
        )
    );
    assert!(!copied.exists() && !copied_journal.exists());
    assert_eq!(
        std::fs::read_to_string(&configured).unwrap(),
        configured_lines
    );
    assert_eq!(count(&db.store, "dual_runs").await, 3);
}

#[tokio::test]
async fn audit_replay_with_only_a_journal_replays_it_and_says_the_file_was_absent() {
    let db = db::sqlite().await;
    let path = db.dir.path().join("dl.jsonl");
    // A replica died during an outage: its records are journaled, none dead-lettered yet;
    // one of them reached the database on a retry before the crash.
    let stored = db::record(1);
    db.store
        .insert(std::slice::from_ref(&stored))
        .await
        .unwrap();
    let journal = db.dir.path().join("dl.jsonl.journal");
    std::fs::write(&journal, jsonl(&[stored, db::record(2)])).unwrap();
    let out = stdout_of(
        duet(db.dir.path())
            .env("DATABASE_URL", &db.url)
            .env("AUDIT_DEADLETTER_PATH", &path)
            .args(["audit", "replay"]),
    );
    assert_eq!(
        out,
        format!(
            "replayed {}: 1 written, 1 skipped (already stored), 0 kept in the file\n\
             no dead-letter file at {}: nothing else to replay\n",
            journal.display(),
            path.display()
        )
    );
    assert_eq!(count(&db.store, "dual_runs").await, 2);
}

/// The newest migration version in the source tree for a backend (`sqlite`, `postgres`).
fn latest_version(backend: &str) -> i64 {
    migration_files(backend)
        .iter()
        .map(|(v, _)| *v)
        .max()
        .unwrap()
}

fn migration_files(backend: &str) -> Vec<(i64, std::path::PathBuf)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(backend);
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let name = p.file_name().unwrap().to_str().unwrap().to_owned();
            (name.split('_').next().unwrap().parse().unwrap(), p)
        })
        .collect()
}

/// What an older release's binary embeds: the migrations up to `version`, nothing newer.
async fn release_migrator(backend: &str, version: i64) -> (tempfile::TempDir, Migrator) {
    let dir = tempfile::tempdir().unwrap();
    for (v, path) in migration_files(backend) {
        if v <= version {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let migrator = Migrator::new(dir.path()).await.unwrap();
    (dir, migrator)
}

/// What an older release's `duet serve` or `duet migrate` does first, on a connection of its
/// own that is closed after, as that process's would be: sqlx keeps its PostgreSQL advisory
/// lock on a connection whose run failed, which, left in a pool, would block every later
/// migration.
async fn run_migrator(migrator: &Migrator, url: &str) -> Result<(), MigrateError> {
    use sqlx::Connection;
    if url.starts_with("postgres") {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        let result = migrator.run(&mut conn).await;
        conn.close().await.unwrap();
        result
    } else {
        let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
        let result = migrator.run(&mut conn).await;
        conn.close().await.unwrap();
        result
    }
}

async fn schema_version(store: &Store) -> i64 {
    let sql = "SELECT MAX(version) FROM _sqlx_migrations WHERE success";
    match store {
        Store::Sqlite(s) => sqlx::query_scalar(sql).fetch_one(s.pool()).await.unwrap(),
        Store::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
    }
}

/// Every column (name, type, nullability, key) and index of the audit tables, in one sorted
/// list: two databases with equal lists have the same schema as far as duet can tell.
async fn schema(store: &Store) -> Vec<String> {
    let queries: &[&str] = match store {
        Store::Sqlite(_) => &[
            "SELECT m.name || '.' || p.name || ' ' || p.type || ' ' || p.\"notnull\" || ' ' \
             || p.pk FROM sqlite_master m, pragma_table_info(m.name) p \
             WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' \
             AND m.name <> '_sqlx_migrations'",
            "SELECT 'index ' || name FROM sqlite_master WHERE type = 'index' \
             AND name NOT LIKE 'sqlite_%'",
        ],
        Store::Postgres(_) => &[
            "SELECT table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable \
             FROM information_schema.columns WHERE table_schema = 'public' \
             AND table_name <> '_sqlx_migrations'",
            "SELECT 'index ' || indexname FROM pg_indexes WHERE schemaname = 'public' \
             AND tablename <> '_sqlx_migrations'",
            "SELECT 'constraint ' || conrelid::regclass || ' ' || pg_get_constraintdef(oid) \
             FROM pg_constraint WHERE connamespace = 'public'::regnamespace \
             AND conrelid::regclass::text <> '_sqlx_migrations'",
        ],
    };
    let mut all = Vec::new();
    for sql in queries {
        let rows: Vec<String> = match store {
            Store::Sqlite(s) => sqlx::query_scalar(sql).fetch_all(s.pool()).await.unwrap(),
            Store::Postgres(pool) => sqlx::query_scalar(sql).fetch_all(pool).await.unwrap(),
        };
        all.extend(rows);
    }
    all.sort();
    all
}

/// The runbook's rollback, step by step, against a database the current release migrated and
/// wrote to; `reference` is an empty database of the same backend, to be migrated by the
/// older release alone.
async fn rollback_to_the_previous_release(
    backend: &str,
    url: &str,
    store: &Store,
    reference_url: &str,
    reference: &Store,
) {
    let dir = tempfile::tempdir().unwrap();
    let migrate = |args: &[&str]| {
        let out = stdout_of(
            duet(dir.path())
                .env("DATABASE_URL", url)
                .arg("migrate")
                .args(args),
        );
        // Logs share stdout (JSON lines here): on PostgreSQL sqlx logs the server's notice
        // that its bookkeeping table already exists.
        out.lines()
            .filter(|l| !l.starts_with('{'))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    };
    let latest = latest_version(backend);
    // The release before: the newest version below the latest (versions may skip a number
    // kept for another change).
    let previous = migration_files(backend)
        .iter()
        .map(|(v, _)| *v)
        .filter(|&v| v < latest)
        .max()
        .unwrap();
    assert_eq!(
        migrate(&["--status"]),
        format!("database at version {latest}; this build knows up to {latest}\n")
    );
    store.insert(&[db::record(1)]).await.unwrap();
    let (_files, old) = release_migrator(backend, previous).await;

    // What the runbook used to say: start the old binary (or run its `duet migrate`). It
    // cannot: the database has a migration it does not know.
    let refused = run_migrator(&old, url).await.unwrap_err();
    assert!(
        matches!(refused, MigrateError::VersionMissing(v) if v == latest),
        "{refused}"
    );

    // What works: the new binary reverts to the old release's version (no --yes: only what
    // the newest migration added goes, the runs stay)...
    assert_eq!(
        migrate(&["--revert", "--to", &previous.to_string()]),
        format!("reverted migrations [{latest}]; now at version {previous}\n")
    );
    assert_eq!(schema_version(store).await, previous);
    assert_eq!(
        migrate(&["--status"]),
        format!(
            "database at version {previous}; this build knows up to {latest} \
             (1 pending: `duet migrate` applies them)\n"
        )
    );
    // ...and the old release starts on it, finding nothing to do, on the very schema it
    // would have made itself, with the runs still there.
    run_migrator(&old, url).await.unwrap();
    assert_eq!(schema_version(store).await, previous);
    run_migrator(&old, reference_url).await.unwrap();
    assert_eq!(schema(store).await, schema(reference).await);
    assert_eq!(count(store, "dual_runs").await, 1);

    // Rolling forward again is a plain `duet migrate`.
    assert_eq!(migrate(&[]), format!("applied migrations [{latest}]\n"));
    assert_eq!(schema_version(store).await, latest);
}

#[tokio::test]
async fn rollback_procedure_reverts_with_the_new_binary_then_the_old_release_starts_sqlite() {
    let db = db::sqlite().await;
    let reference_url = format!("sqlite://{}", db.dir.path().join("old.db").display());
    let reference = Store::connect(&reference_url).await.unwrap();
    rollback_to_the_previous_release("sqlite", &db.url, &db.store, &reference_url, &reference)
        .await;
}

#[tokio::test]
async fn rollback_procedure_reverts_with_the_new_binary_then_the_old_release_starts_postgres() {
    let Some(db) = db::postgres("rollback_procedure").await else {
        return;
    };
    let Some(reference) = db::postgres("rollback_procedure").await else {
        return;
    };
    // An empty database for the old release: the helper migrated it to the latest.
    db::execute(&reference.store, "DROP SCHEMA public CASCADE").await;
    db::execute(&reference.store, "CREATE SCHEMA public").await;
    rollback_to_the_previous_release(
        "postgres",
        &db.url,
        &db.store,
        &reference.url,
        &reference.store,
    )
    .await;
}

#[tokio::test]
async fn revert_that_would_drop_rows_needs_yes_and_says_what_it_would_drop() {
    let db = db::sqlite().await;
    db.store.insert(&[db::record(1)]).await.unwrap();
    let latest = latest_version("sqlite");
    let revert = |args: &[&str]| {
        let mut cmd = duet(db.dir.path());
        cmd.env("DATABASE_URL", &db.url)
            .args(["migrate", "--revert"])
            .args(args);
        cmd
    };
    let stderr = failure_of(&mut revert(&["--to", "0"]));
    assert_eq!(
        stderr,
        "duet: reverting to version 0 would drop model_traces (2 rows) and dual_runs (1 row); \
         nothing was changed: pass --yes to drop them\n"
    );
    assert_eq!(schema_version(&db.store).await, latest);
    assert_eq!(count(&db.store, "dual_runs").await, 1);

    let out = stdout_of(&mut revert(&["--to", "0", "--yes"]));
    let mut all: Vec<i64> = migration_files("sqlite").iter().map(|(v, _)| *v).collect();
    all.sort_unstable();
    all.dedup();
    let all: Vec<String> = all.iter().map(|v| v.to_string()).collect();
    assert_eq!(
        out,
        format!(
            "reverted migrations [{}]; now at version 0 \
             (dropped model_traces (2 rows) and dual_runs (1 row))\n",
            all.join(", ")
        )
    );
    let tables: i64 = match &db.store {
        Store::Sqlite(s) => sqlx::query_scalar(
            "SELECT COUNT(*) FROM sqlite_master WHERE name IN ('dual_runs', 'model_traces')",
        )
        .fetch_one(s.pool())
        .await
        .unwrap(),
        Store::Postgres(_) => unreachable!(),
    };
    assert_eq!(tables, 0);
    // --yes without --revert is refused by the command line itself.
    let usage = failure_of(
        duet(db.dir.path())
            .env("DATABASE_URL", &db.url)
            .args(["migrate", "--yes"]),
    );
    assert!(usage.contains("--revert"), "{usage}");
}

#[tokio::test]
async fn an_older_build_on_a_newer_database_says_how_to_roll_back() {
    let db = db::sqlite().await;
    let latest = latest_version("sqlite");
    let future = latest + 1;
    // What a newer release's migration leaves in the bookkeeping table.
    db::execute(
        &db.store,
        &format!(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
             execution_time) VALUES ({future}, 'from a newer release', TRUE, x'00', 0)"
        ),
    )
    .await;
    let run = |args: &[&str]| {
        let mut cmd = duet(db.dir.path());
        cmd.env("DATABASE_URL", &db.url).arg("migrate").args(args);
        cmd
    };
    let advice = format!(
        "duet: the audit database has migration {future}, newer than this build of duet knows \
         (up to {latest}): a newer duet migrated it. To run this build, revert with the newer \
         binary first: `duet migrate --revert --to {latest}` (RUNBOOK_DUAL_MODEL.md, \
         \"Rolling back a release\")\n"
    );
    assert_eq!(failure_of(&mut run(&[])), advice);
    assert_eq!(failure_of(&mut run(&["--revert"])), advice);
    assert_eq!(
        stdout_of(&mut run(&["--status"])),
        format!(
            "database at version {future}, newer than this build knows ({latest}): a newer \
             duet migrated it; to run this build, revert with that one (`duet migrate --revert \
             --to {latest}`)\n"
        )
    );
    // `duet serve` stops at start with the same advice.
    let serve = failure_of(&mut {
        let mut cmd = duet(db.dir.path());
        cmd.env("DATABASE_URL", &db.url)
            .env("BIND_ADDR", "127.0.0.1:0")
            .stdout(Stdio::null());
        cmd
    });
    assert!(
        serve.contains(&format!("--revert --to {latest}")),
        "{serve}"
    );
}
