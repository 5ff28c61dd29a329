//! `duet audit replay`: puts dead-lettered records back into the database.
//!
//! The file is first claimed by renaming it to `PATH.replaying` (atomic), so a running
//! service keeps appending to a fresh `PATH` meanwhile (it opens the file per append), and
//! then locked exclusively, which waits out any append still writing to the old file.
//! Every record of the claimed file is inserted idempotently; records that are now stored
//! (written, or already there: skipped) are done. Lines that cannot be parsed or written are
//! appended back to `PATH`, and the claimed file is removed. So replay removes only what it
//! has written, and running it again changes nothing. A replay that dies half-way leaves
//! `PATH.replaying`, which the next replay takes up first.
//!
//! The audit journal (`PATH.journal`, see `writer`) is replayed the same way: by
//! `duet audit replay` before the dead-letter file, and by `duet serve` at start, where what
//! the database refuses moves to the dead-letter file. The journal also holds the starts of
//! runs that began while writes failed (`start_line`): one with no record in the file
//! becomes the run's `running` row, after the records, finalized `interrupted` at once when
//! its process is known to be dead ([`Starts`]).

use std::{
    collections::HashSet,
    ffi::OsString,
    path::{Path, PathBuf},
};

use tracing::warn;

use super::{
    AuditError, Result, RunRecord, StartedRun, deadletter::Appender, start_line, store::Store,
};

/// Records per insert transaction.
const BATCH: usize = 500;

/// What replay makes of the starts of runs with no record (`start_line`): whether their
/// runs may still be going in a live process decides it, since a live run is never marked
/// `interrupted`.
#[derive(Debug, Clone, Copy)]
pub enum Starts<'a> {
    /// Written as `running` rows, left to what finalizes a dead process's runs (the lease
    /// sweep on PostgreSQL, the next start on SQLite) or to the run's own record: `duet
    /// audit replay`, which may run beside live services.
    Running,
    /// `duet serve` replaying its journal at start, before its first run: the process that
    /// journaled them is dead when it was this instance's earlier incarnation (`instance_id`),
    /// or whatever it was, on SQLite (`any`: one process owns the file). Those become
    /// `interrupted` rows; others are [`Starts::Running`].
    OfDeadProcess { instance_id: &'a str, any: bool },
}

impl Starts<'_> {
    fn interrupts(&self, run: &StartedRun) -> bool {
        match self {
            Starts::Running => false,
            Starts::OfDeadProcess { any: true, .. } => true,
            Starts::OfDeadProcess { instance_id, .. } => {
                run.instance_id.as_deref() == Some(*instance_id)
            }
        }
    }
}

/// What a replay did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplayReport {
    /// Records inserted now.
    pub written: u64,
    /// Records that were already stored.
    pub skipped: u64,
    /// Lines kept in the dead-letter file: unparsable, or the database refused them.
    pub kept: u64,
    /// Runs whose start the journal held without their record (their process died during
    /// an outage, before they ended), finalized as `interrupted` now.
    pub interrupted: u64,
    /// Starts of runs with no record whose process may still be alive, written as
    /// `running` rows (see [`Starts::Running`]).
    pub running: u64,
}

impl ReplayReport {
    /// `records` inserted, of which `written` were new (the others already stored).
    fn wrote(&mut self, records: usize, written: u64) {
        self.written += written;
        self.skipped += (records as u64).saturating_sub(written);
    }

    /// A line put back in the file.
    fn keep(&mut self, keep: &mut Vec<u8>, line: &[u8]) {
        keep.extend_from_slice(line);
        keep.push(b'\n');
        self.kept += 1;
    }
}

impl std::fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "replayed: {} written, {} skipped (already stored), {} kept in the dead-letter file",
            self.written, self.skipped, self.kept
        )?;
        if self.interrupted > 0 {
            write!(f, ", {} runs interrupted", self.interrupted)?;
        }
        if self.running > 0 {
            write!(f, ", {} runs left running", self.running)?;
        }
        Ok(())
    }
}

fn claimed_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".replaying");
    PathBuf::from(name)
}

/// Replays the dead-letter file at `path` into `store`.
pub async fn replay(store: &Store, path: &Path) -> Result<ReplayReport> {
    replay_into(store, path, path, Starts::Running).await
}

/// Replays the file at `path` into `store`; lines that cannot be written are appended to
/// `keep` (the same file, or for the journal at start-up, the dead-letter file).
pub async fn replay_into(
    store: &Store,
    path: &Path,
    keep: &Path,
    starts: Starts<'_>,
) -> Result<ReplayReport> {
    Ok(replay_found(store, path, keep, starts)
        .await?
        .unwrap_or_default())
}

/// Like [`replay`], but `None` when there was no file to read: neither `path` nor the
/// `PATH.replaying` an interrupted replay left. `duet audit replay` must tell "nothing at
/// that path" (a wrong path, most often) from "read it, nothing new".
pub async fn replay_file(store: &Store, path: &Path) -> Result<Option<ReplayReport>> {
    replay_found(store, path, path, Starts::Running).await
}

/// Whether there is anything at `path` to replay (the file, or an interrupted replay's
/// claimed copy). Answers before any database is opened.
pub async fn has_file(path: &Path) -> Result<bool> {
    let io = |source| AuditError::DeadLetter {
        path: path.to_owned(),
        source,
    };
    Ok(tokio::fs::try_exists(path).await.map_err(io)?
        || tokio::fs::try_exists(claimed_path(path))
            .await
            .map_err(io)?)
}

async fn replay_found(
    store: &Store,
    path: &Path,
    keep: &Path,
    starts: Starts<'_>,
) -> Result<Option<ReplayReport>> {
    let claimed = claimed_path(path);
    let io = |source| AuditError::DeadLetter {
        path: path.to_owned(),
        source,
    };
    let mut report = ReplayReport::default();
    let mut found = false;
    // A claimed file left by an interrupted replay comes first.
    if tokio::fs::try_exists(&claimed).await.map_err(io)? {
        found = true;
        replay_claimed(store, keep, &claimed, starts, &mut report).await?;
    }
    match tokio::fs::rename(path, &claimed).await {
        Ok(()) => {
            found = true;
            replay_claimed(store, keep, &claimed, starts, &mut report).await?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    Ok(found.then_some(report))
}

async fn replay_claimed(
    store: &Store,
    keep_path: &Path,
    claimed: &Path,
    policy: Starts<'_>,
    report: &mut ReplayReport,
) -> Result<()> {
    let path = keep_path;
    // The exclusive lock waits for any append that opened the file before the rename (they
    // hold a shared lock while writing; see `Appender`); later appends go to the new file.
    let owned = claimed.to_owned();
    let content = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        let mut file = std::fs::File::open(&owned)?;
        file.lock()?;
        let mut content = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut content)?;
        Ok(content)
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|read| read)
    .map_err(|source| AuditError::DeadLetter {
        path: claimed.to_owned(),
        source,
    })?;
    let mut keep: Vec<u8> = Vec::new();
    let mut records: Vec<(RunRecord, &[u8])> = Vec::new();
    let mut starts: Vec<(StartedRun, &[u8])> = Vec::new();
    for line in content.split(|b| *b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<RunRecord>(line) {
            Ok(record) => records.push((record, line)),
            Err(e) => match start_line::parse(line) {
                Some(start) => starts.push((start, line)),
                None => {
                    warn!(error = %e, "dead-letter line is not a run record; keeping it");
                    report.keep(&mut keep, line);
                }
            },
        }
    }
    // A start whose record is in the file too: the record says more. A start journaled
    // twice (a batch's, then the backlog's) is taken once.
    let mut seen: HashSet<uuid::Uuid> = records.iter().map(|(r, _)| r.run_id).collect();
    starts.retain(|(s, _)| seen.insert(s.run_id));
    for chunk in records.chunks(BATCH) {
        let batch: Vec<RunRecord> = chunk.iter().map(|(r, _)| r.clone()).collect();
        match store.insert(&batch).await {
            Ok(written) => report.wrote(batch.len(), written),
            // The database refused something in the batch itself (not a connection, a lock,
            // a full disk or a missing table, which would refuse each record alike): one
            // record the database cannot take must not keep the others out for good, so
            // each goes on its own.
            Err(e) if chunk.len() > 1 && e.refuses_content() => {
                warn!(error = %e, records = batch.len(), "a batch of records was refused; replaying them one by one");
                for (record, line) in chunk {
                    match store.insert(std::slice::from_ref(record)).await {
                        Ok(written) => report.wrote(1, written),
                        Err(e) => {
                            warn!(error = %e, run_id = %record.run_id, "cannot replay a record; keeping it");
                            report.keep(&mut keep, line);
                        }
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, records = batch.len(), "cannot replay records; keeping them");
                for (_, line) in chunk {
                    report.keep(&mut keep, line);
                }
            }
        }
    }
    // After the records: a run whose record is stored keeps it.
    for chunk in starts.chunks(BATCH) {
        let runs: Vec<StartedRun> = chunk.iter().map(|(s, _)| s.clone()).collect();
        let dead: Vec<bool> = runs.iter().map(|r| policy.interrupts(r)).collect();
        match store.write_journaled_starts(&runs, &dead).await {
            Ok((interrupted, running)) => {
                report.interrupted += interrupted;
                report.running += running;
            }
            Err(e) => {
                warn!(error = %e, runs = runs.len(), "cannot finalize journaled starts; keeping them");
                for (_, line) in chunk {
                    report.keep(&mut keep, line);
                }
            }
        }
    }
    // Put back what was not written before letting go of the claimed file: a crash between
    // the two repeats lines, never loses them.
    if !keep.is_empty() {
        let file = Appender::new(path, None);
        tokio::task::spawn_blocking(move || file.append_bytes(&keep))
            .await
            .map_err(|e| AuditError::DeadLetter {
                path: path.to_owned(),
                source: std::io::Error::other(e),
            })??;
    }
    tokio::fs::remove_file(claimed)
        .await
        .map_err(|source| AuditError::DeadLetter {
            path: claimed.to_owned(),
            source,
        })
}
