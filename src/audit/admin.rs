//! The operator commands on the audit store: `duet migrate [--status | --revert [--to VERSION]
//! [--yes]]`, `duet audit replay [--file PATH]` and `duet audit purge --older-than DAYS`. Each opens the database named by
//! `DATABASE_URL`, does one thing, and returns a short report for the terminal, or an
//! [`AdminError`] whose message is one line saying what to do.
//!
//! Two guards live here because only an operator at a terminal meets them: a revert that would
//! drop tables holding rows needs `--yes` (what it would drop is read from the down scripts
//! and counted first), and a replay with no file to read fails instead of reporting
//! "0 written" (which looked the same as a wrong path).

use std::path::{Path, PathBuf};

use super::{
    AuditError,
    deadletter::journal_path,
    replay::{self, ReplayReport},
    store::{self, Store},
};
use crate::config::Config;

/// Why an operator command did not do its job. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(
        "no dead-letter file at {} (named by {named_by}), nor a journal beside it: nothing \
         to replay; check the path, or pass --file PATH",
        path.display()
    )]
    NothingToReplay {
        path: PathBuf,
        named_by: &'static str,
    },
    #[error(
        "reverting to version {target} would drop {}; nothing was changed: pass --yes to \
         drop them",
        tables_with_rows(tables)
    )]
    WouldDrop {
        target: i64,
        /// Each table that would go, with the rows it holds now.
        tables: Vec<(String, i64)>,
    },
}

/// What `duet migrate` was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrateAction {
    /// Apply pending migrations (the default).
    Apply,
    /// Report the schema version, change nothing.
    Status,
    /// Revert to `to` (default: one step back); `yes` allows dropping tables with rows.
    Revert { to: Option<i64>, yes: bool },
}

/// `duet migrate`: applies pending migrations, reports where the schema stands, or reverts.
pub async fn migrate(config: &Config, action: MigrateAction) -> Result<String, AdminError> {
    let store = Store::connect(&config.database_url).await?;
    let report = match action {
        MigrateAction::Apply => apply(&store).await,
        MigrateAction::Status => status(&store).await,
        MigrateAction::Revert { to, yes } => revert(&store, to, yes).await,
    };
    store.close().await;
    report
}

async fn apply(store: &Store) -> Result<String, AdminError> {
    let before = store.applied().await?;
    store.migrate().await?;
    let after = store.applied().await?;
    let new: Vec<i64> = after.into_iter().filter(|v| !before.contains(v)).collect();
    Ok(if new.is_empty() {
        format!("up to date at version {}", store.latest_known())
    } else {
        format!("applied migrations {new:?}")
    })
}

async fn status(store: &Store) -> Result<String, AdminError> {
    let applied = store.applied().await?;
    let known = store.latest_known();
    let at = applied.last().copied().unwrap_or(0);
    let pending = store
        .migrator()
        .iter()
        .filter(|m| m.migration_type.is_up_migration() && !applied.contains(&m.version))
        .count();
    Ok(if at > known {
        format!(
            "database at version {at}, newer than this build knows ({known}): a newer duet \
             migrated it; to run this build, revert with that one (`duet migrate --revert \
             --to {known}`)"
        )
    } else if pending > 0 {
        format!(
            "database at version {at}; this build knows up to {known} \
             ({pending} pending: `duet migrate` applies them)"
        )
    } else {
        format!("database at version {at}; this build knows up to {known}")
    })
}

async fn revert(store: &Store, to: Option<i64>, yes: bool) -> Result<String, AdminError> {
    let applied = store.applied().await?;
    // Without --to, step back one migration: the one the latest release added.
    let target = match to {
        Some(v) => v,
        None => applied.iter().rev().nth(1).copied().unwrap_or(0),
    };
    let reverting: Vec<i64> = applied.iter().copied().filter(|v| *v > target).collect();
    if reverting.is_empty() {
        return Ok("nothing to revert".to_owned());
    }
    // A database a newer build migrated: only that build can undo its migrations.
    if let Some(&newest) = reverting.last()
        && newest > store.latest_known()
    {
        return Err(AuditError::SchemaNewer {
            applied: newest,
            known: store.latest_known(),
        }
        .into());
    }
    // In the order a revert runs them: newest first.
    let mut downs: Vec<_> = store
        .migrator()
        .iter()
        .filter(|m| m.migration_type.is_down_migration() && reverting.contains(&m.version))
        .collect();
    downs.sort_by_key(|m| std::cmp::Reverse(m.version));
    let down_sql = downs.into_iter().map(|m| m.sql.as_ref());
    let mut dropping = Vec::new();
    for table in dropped_tables(down_sql) {
        if let Some(rows) = row_count(store, &table).await?
            && rows > 0
        {
            dropping.push((table, rows));
        }
    }
    if !dropping.is_empty() && !yes {
        return Err(AdminError::WouldDrop {
            target,
            tables: dropping,
        });
    }
    let reverted = store.revert_to(target).await?;
    let mut report = format!("reverted migrations {reverted:?}; now at version {target}");
    if !dropping.is_empty() {
        report.push_str(&format!(" (dropped {})", tables_with_rows(&dropping)));
    }
    Ok(report)
}

/// `dual_runs (3 rows) and model_traces (6 rows)`.
fn tables_with_rows(tables: &[(String, i64)]) -> String {
    let parts: Vec<String> = tables
        .iter()
        .map(|(t, n)| format!("{t} ({n} row{})", if *n == 1 { "" } else { "s" }))
        .collect();
    match parts.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// Rows in `table`, or `None` when there is no such table (a revert of a migration whose
/// table is already gone drops nothing).
async fn row_count(store: &Store, table: &str) -> Result<Option<i64>, AdminError> {
    // `table` comes from our own migrations and `dropped_tables` keeps identifier characters
    // only, so it can be spliced into the statement.
    let sql = format!("SELECT COUNT(*) FROM {table}");
    let result = match store {
        Store::Sqlite(s) => sqlx::query_scalar(&sql).fetch_one(s.pool()).await,
        Store::Postgres(pool) => sqlx::query_scalar(&sql).fetch_one(pool).await,
    };
    match result {
        Ok(rows) => Ok(Some(rows)),
        Err(sqlx::Error::Database(e)) if store::is_missing_table(e.message()) => Ok(None),
        Err(e) => Err(AuditError::from(e).into()),
    }
}

/// The tables a sequence of down scripts (in the order they run) drops for good: those whose
/// last word in the sequence is a `DROP TABLE`, not a later create or a rename of another
/// table to their name (a table rebuilt to change a constraint, as SQLite needs, keeps its
/// rows; an older script's plain `DROP` of it afterwards still loses them). A plain word scan rather than a SQL parser:
/// it reads only our own migrations, which keep to these statement forms; dropped columns are
/// not counted (see docs/operations.md: reverting a migration that only adds columns loses
/// just those columns and needs no `--yes`).
fn dropped_tables<'a>(scripts: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    // Each table's fate in order: `true` for dropped, `false` for (re)created.
    let mut fates: Vec<(String, bool)> = Vec::new();
    for script in scripts {
        let words = words(script);
        let mut i = 0;
        while i < words.len() {
            let at = |j: usize| words.get(j).map_or("", String::as_str);
            match (at(i), at(i + 1)) {
                ("drop", "table") => {
                    i += 2;
                    if at(i) == "if" && at(i + 1) == "exists" {
                        i += 2;
                    }
                    // `DROP TABLE a, b`.
                    while let Some(name) = words.get(i).and_then(|w| identifier(w)) {
                        fates.push((name, true));
                        i += 1;
                        if words.get(i).map(String::as_str) != Some(",") {
                            break;
                        }
                        i += 1;
                    }
                }
                ("create", _) => {
                    i += 1;
                    while matches!(at(i), "temp" | "temporary" | "unlogged") {
                        i += 1;
                    }
                    if at(i) == "table" {
                        i += 1;
                        if at(i) == "if" && at(i + 1) == "not" && at(i + 2) == "exists" {
                            i += 3;
                        }
                        fates.extend(words.get(i).and_then(|w| identifier(w)).map(|n| (n, false)));
                    }
                }
                ("rename", "to") => {
                    i += 2;
                    fates.extend(words.get(i).and_then(|w| identifier(w)).map(|n| (n, false)));
                }
                _ => i += 1,
            }
        }
    }
    let mut lost: Vec<String> = Vec::new();
    for (name, dropped) in fates {
        lost.retain(|t| *t != name);
        if dropped {
            lost.push(name);
        }
    }
    lost
}

/// The script's words, lower case, without `--` comments; `,` `;` `(` `)` are words of
/// their own.
fn words(script: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in script.lines() {
        let code = line.split_once("--").map_or(line, |(code, _)| code);
        let spaced = code
            .replace(',', " , ")
            .replace(';', " ; ")
            .replace('(', " ( ")
            .replace(')', " ) ");
        out.extend(spaced.split_whitespace().map(str::to_lowercase));
    }
    out
}

/// A table name as written in a migration (`dual_runs`, `"dual_runs"`, `public.dual_runs`),
/// or `None` for anything else.
fn identifier(word: &str) -> Option<String> {
    let name = word.replace('"', "");
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    ok.then_some(name)
}

/// `duet audit replay`: puts the journal's and the dead-letter file's records back,
/// idempotently (the journal's are mostly stored already: they are skipped). `file` is
/// `--file`; by default the dead-letter file is `AUDIT_DEADLETTER_PATH`.
///
/// Fails before opening the database when neither the dead-letter file nor its journal is
/// there: that is most often a wrong path (a shell without the service's environment reads
/// the default, relative to its own directory), and "0 written" would hide it. A journal
/// without a dead-letter file is a normal state (records in retry when a replica died, not
/// yet dead-lettered): it is replayed, and the report says the dead-letter file was absent.
pub async fn replay(config: &Config, file: Option<&Path>) -> Result<String, AdminError> {
    let (given, named_by) = match file {
        Some(path) => (path, "--file"),
        None => (
            config.audit_deadletter_path.as_path(),
            "AUDIT_DEADLETTER_PATH",
        ),
    };
    // Absolute, so that the report and the error say where the file was looked for.
    let deadletter = std::path::absolute(given).unwrap_or_else(|_| given.to_owned());
    let journal = journal_path(&deadletter);
    if !replay::has_file(&deadletter).await? && !replay::has_file(&journal).await? {
        return Err(AdminError::NothingToReplay {
            path: deadletter,
            named_by,
        });
    }
    let store = Store::connect(&config.database_url).await?;
    // Replay may run before the service ever started on this database.
    let report = async {
        store.migrate().await?;
        let mut lines = Vec::new();
        if let Some(r) = replay::replay_file(&store, &journal).await? {
            lines.push(file_line(&journal, r));
        }
        match replay::replay_file(&store, &deadletter).await? {
            Some(r) => lines.push(file_line(&deadletter, r)),
            None => lines.push(format!(
                "no dead-letter file at {}: nothing else to replay",
                deadletter.display()
            )),
        }
        Ok::<_, AdminError>(lines.join("\n"))
    }
    .await;
    store.close().await;
    report
}

fn file_line(path: &Path, r: ReplayReport) -> String {
    let mut line = format!(
        "replayed {}: {} written, {} skipped (already stored), {} kept in the file",
        path.display(),
        r.written,
        r.skipped,
        r.kept
    );
    if r.interrupted > 0 {
        line.push_str(&format!(", {} runs interrupted", r.interrupted));
    }
    if r.running > 0 {
        line.push_str(&format!(", {} runs left running", r.running));
    }
    line
}

/// `duet audit purge --older-than DAYS`: deletes the ended runs created more than `days`
/// days ago (0: every ended run), in the same small batches as the background job.
pub async fn purge(config: &Config, days: u32) -> Result<String, AdminError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tables_dropped_for_good() {
        let ours = include_str!("../../migrations/sqlite/0001_audit.down.sql");
        assert_eq!(dropped_tables([ours]), ["model_traces", "dual_runs"]);
        let column = include_str!("../../migrations/sqlite/0002_run_events.down.sql");
        assert!(dropped_tables([column]).is_empty());
        assert_eq!(
            dropped_tables(["drop table if exists \"a\", b; DROP TABLE public.c;"]),
            ["a", "b", "public.c"]
        );
    }

    #[test]
    fn a_rebuilt_table_is_not_lost() {
        let rebuild = "CREATE TABLE dual_runs_old (run_id TEXT); -- DROP TABLE x\n\
                       INSERT INTO dual_runs_old SELECT run_id FROM dual_runs;\n\
                       DROP TABLE dual_runs;\n\
                       ALTER TABLE dual_runs_old RENAME TO dual_runs;";
        assert!(dropped_tables([rebuild]).is_empty());
        let recreated = "DROP TABLE t; CREATE TABLE IF NOT EXISTS t (a INT);";
        assert!(dropped_tables([recreated]).is_empty());
        // Reverting a rebuild and then the migration that made the table loses it.
        assert_eq!(
            dropped_tables([rebuild, "DROP TABLE dual_runs;"]),
            ["dual_runs"]
        );
    }

    #[test]
    fn lists_tables_in_a_sentence() {
        let one = [("dual_runs".to_owned(), 1)];
        assert_eq!(tables_with_rows(&one), "dual_runs (1 row)");
        let three = [
            ("a".to_owned(), 2),
            ("b".to_owned(), 0),
            ("c".to_owned(), 5),
        ];
        assert_eq!(
            tables_with_rows(&three),
            "a (2 rows), b (0 rows) and c (5 rows)"
        );
    }
}
