//! The real binary and the audit trail: zero-config SQLite with the drain on SIGTERM,
//! `duet migrate` (and `--revert`), `duet audit replay` run twice.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use serde_json::json;

use crate::db::{self, count};

fn duet(dir: &Path) -> Command {
    crate::helpers::duet_command(dir)
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
    assert_eq!(migrate(&[]), "applied migrations [1, 2, 3, 4, 5]\n");
    assert_eq!(migrate(&[]), "up to date at version 5\n");
    assert_eq!(
        migrate(&["--revert"]),
        "reverted migrations [5]; now at version 4\n"
    );
    assert_eq!(
        migrate(&["--revert", "--to", "0"]),
        "reverted migrations [1, 2, 3, 4]; now at version 0\n"
    );
    assert_eq!(migrate(&["--revert"]), "nothing to revert\n");
    assert_eq!(migrate(&[]), "applied migrations [1, 2, 3, 4, 5]\n");
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
        "replayed: 2 written, 0 skipped (already stored), 0 kept in the dead-letter file\n"
    );
    let second = replay();
    assert_eq!(
        second,
        "replayed: 0 written, 0 skipped (already stored), 0 kept in the dead-letter file\n"
    );
    assert_eq!(count(&db.store, "dual_runs").await, 2);
}
