//! The operator commands on the audit store: `duet migrate [--revert [--to VERSION]]`,
//! `duet audit replay` and `duet audit purge --older-than DAYS`. Each opens the database named by `DATABASE_URL`, does one thing,
//! and returns a one-line report for the terminal.

use super::{Result, replay::ReplayReport, store::Store};
use crate::config::Config;

/// `duet migrate`: applies pending migrations, or with `revert` rolls back the newest one
/// (or all newer than `to`).
pub async fn migrate(config: &Config, revert: bool, to: Option<i64>) -> Result<String> {
    let store = Store::connect(&config.database_url).await?;
    let report = if revert {
        let applied = store.applied().await?;
        // Without --to, step back one migration: the one the latest release added.
        let target = match to {
            Some(v) => v,
            None => applied.iter().rev().nth(1).copied().unwrap_or(0),
        };
        let reverted = store.revert_to(target).await?;
        if reverted.is_empty() {
            "nothing to revert".to_owned()
        } else {
            format!("reverted migrations {reverted:?}; now at version {target}")
        }
    } else {
        let before = store.applied().await?;
        store.migrate().await?;
        let after = store.applied().await?;
        let new: Vec<i64> = after.into_iter().filter(|v| !before.contains(v)).collect();
        if new.is_empty() {
            format!("up to date at version {}", store.latest_known())
        } else {
            format!("applied migrations {new:?}")
        }
    };
    store.close().await;
    Ok(report)
}

/// `duet audit replay`: puts the journal's and the dead-letter file's records back,
/// idempotently (the journal's are mostly stored already: they are skipped).
pub async fn replay(config: &Config) -> Result<ReplayReport> {
    let store = Store::connect(&config.database_url).await?;
    // Replay may run before the service ever started on this database.
    store.migrate().await?;
    let journal = super::deadletter::journal_path(&config.audit_deadletter_path);
    let report = async {
        let j = super::replay::replay(&store, &journal).await?;
        let d = super::replay::replay(&store, &config.audit_deadletter_path).await?;
        Ok(ReplayReport {
            written: j.written + d.written,
            skipped: j.skipped + d.skipped,
            kept: j.kept + d.kept,
        })
    }
    .await;
    store.close().await;
    report
}

/// `duet audit purge --older-than DAYS`: deletes the ended runs created more than `days`
/// days ago (0: every ended run), in the same small batches as the background job.
pub async fn purge(config: &Config, days: u32) -> Result<String> {
    let store = Store::connect(&config.database_url).await?;
    let cutoff = super::purge::cutoff(days);
    let stop = tokio_util::sync::CancellationToken::new();
    let deleted = super::purge::purge_older_than(&store, cutoff, &stop, |_| {}).await;
    store.close().await;
    let deleted = deleted?;
    Ok(format!(
        "purged: {deleted} runs created before {}",
        cutoff.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    ))
}
