//! The dead-letter file: records the database could not take, one JSON line each (the serde
//! form of [`RunRecord`]), appended, flushed and fsynced, for `duet audit replay`.
//!
//! File writes are blocking I/O, so they run on a dedicated thread fed by a bounded channel;
//! the async writer and the request path only hand records over. When that channel is full
//! too (the disk is slower than the rate of failing records) or the thread has stopped, the
//! caller appends the records itself: that holds the caller for one write, which is better
//! than losing an audit record, and is the backpressure that keeps memory bounded. The caller
//! is often a tokio worker (a run's drop guard submits its record), so on the service's
//! multi-thread runtime that write goes through `block_in_place`: the worker's other tasks
//! move to another thread first, and no stream waits behind the fsync. If even the file
//! cannot be written, each record is logged at error level in full, so the log is the last
//! place it survives.
//!
//! The writer's journal (`PATH.journal`) is a second file of the same kind, written the
//! same way, for records whose first database write failed.

use std::{
    fs::OpenOptions,
    io::Write,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    thread::JoinHandle,
};

use prometheus::IntCounter;
use tokio::sync::oneshot;
use tracing::{error, warn};

use super::{AuditError, Result, RunRecord};

/// The audit journal that goes with a dead-letter file: `PATH.journal`. Records are written
/// there (appended, fsynced) when their first database write fails, before any retry, so a
/// crash during an outage loses none; `duet audit replay` and the next start replay it.
pub fn journal_path(deadletter: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(deadletter.as_os_str());
    name.push(".journal");
    PathBuf::from(name)
}

/// Appends records to the file. The file is opened for each append rather than held open,
/// so that `duet audit replay` can move it aside and later appends start a fresh one.
pub struct Appender {
    path: PathBuf,
    /// Serialises appends within this process, so lines from two writers never interleave.
    lock: Mutex<()>,
    written: Option<IntCounter>,
    /// Set once an append has failed. For the dead-letter file this keeps the journal at
    /// shutdown: some record may then be in no other file.
    failed: AtomicBool,
}

impl Appender {
    /// `written` counts records appended (`duet_audit_writes_total{outcome="deadletter"}`).
    pub fn new(path: impl Into<PathBuf>, written: Option<IntCounter>) -> Appender {
        Appender {
            path: path.into(),
            lock: Mutex::new(()),
            written,
            failed: AtomicBool::new(false),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when some append of this process failed.
    pub fn ever_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Appends each record as one JSON line, then flushes and syncs to disk.
    pub fn append(&self, records: &[RunRecord]) -> Result<()> {
        self.append_after(Vec::new(), records)
    }

    /// Appends `lines` (whole lines, as they are), then each record as one JSON line, in one
    /// write and one sync.
    fn append_after(&self, lines: Vec<u8>, records: &[RunRecord]) -> Result<()> {
        if records.is_empty() && lines.is_empty() {
            return Ok(());
        }
        let mut buf = lines;
        buf.reserve(records.len() * 1024);
        for record in records {
            serde_json::to_writer(&mut buf, record).map_err(|e| self.error(e.into()))?;
            buf.push(b'\n');
        }
        if let Err(e) = self.append_bytes(&buf) {
            self.failed.store(true, Ordering::Relaxed);
            return Err(e);
        }
        if let Some(counter) = &self.written {
            counter.inc_by(records.len() as u64);
        }
        Ok(())
    }

    /// Appends whole lines as they are (replay puts back lines it could not use).
    pub fn append_bytes(&self, bytes: &[u8]) -> Result<()> {
        // A poisoned lock guards nothing but ordering; keep appending.
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut file = self.open_locked().map_err(|e| self.error(e))?;
        // A line cut short (a full disk mid-write, a crash) would swallow the first record
        // appended after it: both on one line, which replay cannot parse. Start on a fresh
        // line instead, leaving only the cut one unreadable.
        let joined;
        let bytes = if ends_mid_line(&file) {
            joined = [b"\n".as_slice(), bytes].concat();
            joined.as_slice()
        } else {
            bytes
        };
        // One write of whole lines: with O_APPEND, another process's appends (a second duet
        // on the same path) land before or after it, not inside it.
        file.write_all(bytes).map_err(|e| self.error(e))?;
        file.flush().map_err(|e| self.error(e))?;
        file.sync_data().map_err(|e| self.error(e))
    }

    /// Opens the file for appending under a shared advisory lock, making sure the lock is on
    /// the file that is at the path now. `duet audit replay` renames the file away and then
    /// takes an exclusive lock on it before reading: an append that opened the old file
    /// either finishes under its shared lock before replay reads, or sees the rename here
    /// and opens the new file. No line can land in a file replay has already read.
    fn open_locked(&self) -> std::io::Result<std::fs::File> {
        loop {
            // Readable too when it is a regular file (or not there yet), to check how it
            // ends (`ends_mid_line`); not otherwise: opening a FIFO for reading as well would
            // change when its open blocks.
            let regular = std::fs::metadata(&self.path).map_or(true, |m| m.is_file());
            let open = |read: bool| {
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .read(read)
                    .open(&self.path)
            };
            // A file made write-only for duet (a log shipper's) is appended to unread.
            let file = match open(regular) {
                Err(e) if regular && e.kind() == std::io::ErrorKind::PermissionDenied => {
                    open(false)?
                }
                opened => opened?,
            };
            file.lock_shared()?;
            let same = match std::fs::metadata(&self.path) {
                Ok(at_path) => same_file(&file.metadata()?, &at_path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => return Err(e),
            };
            if same {
                return Ok(file);
            }
            // Renamed away by a replay between our open and our lock: use the new file.
        }
    }

    /// Appends, and when even that fails, logs every record in full: the last place left.
    /// True when the records reached the file.
    pub fn append_or_log(&self, records: &[RunRecord]) -> bool {
        self.append_or_log_after(Vec::new(), records)
    }

    /// [`Appender::append_or_log`] with whole `lines` first, in the same write (start lines,
    /// which are not logged: a run's start is in the log already, `run` span).
    fn append_or_log_after(&self, lines: Vec<u8>, records: &[RunRecord]) -> bool {
        let had_lines = !lines.is_empty();
        let Err(e) = self.append_after(lines, records) else {
            return true;
        };
        if had_lines {
            error!(error = %e, path = %self.path.display(),
                "cannot append runs' starts; those runs are in memory only until they end");
        }
        for record in records {
            let json = serde_json::to_string(record).unwrap_or_default();
            error!(error = %e, run_id = %record.run_id, record = %json,
                "cannot write the dead-letter file; the record survives only in this log line");
        }
        false
    }

    fn error(&self, source: std::io::Error) -> AuditError {
        AuditError::DeadLetter {
            path: self.path.clone(),
            source,
        }
    }
}

/// True when `file`, a regular file opened for reading too (see `open_locked`), is not
/// empty and its last byte is not a newline. Read through the same handle: the path may
/// already name another file (a replay claims the file by renaming it, then waits for this
/// append's lock). A file that cannot be read back is appended to as it is: the check must
/// never cost a record its append.
fn ends_mid_line(file: &std::fs::File) -> bool {
    let Ok(meta) = file.metadata() else {
        return false;
    };
    if !meta.is_file() || meta.len() == 0 {
        return false;
    }
    let mut last = [0u8; 1];
    read_at(file, &mut last, meta.len() - 1).is_ok() && last[0] != b'\n'
}

#[cfg(unix)]
fn read_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(not(unix))]
fn read_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = file;
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

/// Called once records are appended and fsynced (or the append failed and was logged).
pub type Then = Box<dyn FnOnce(bool) + Send>;

enum Msg {
    /// Records and their [`RunRecord::approx_bytes`], released once appended, and what to
    /// call then.
    Records(Vec<RunRecord>, usize, Option<Then>),
    /// Lines ready to append as they are (a run's start in the journal, `start_line`), and
    /// who to tell once they are on disk.
    Line(Vec<u8>, Option<oneshot::Sender<()>>),
    Stop,
}

/// Bytes of records that may wait for the thread, besides the count of hand-overs: records
/// can be megabytes each. Past it senders append themselves, as when the queue is full.
const MAX_PENDING_BYTES: usize = 16 << 20;

/// The dead-letter thread and its queue.
pub struct DeadLetter {
    tx: SyncSender<Msg>,
    file: Arc<Appender>,
    pending_bytes: Arc<AtomicUsize>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl DeadLetter {
    /// Starts the thread; `capacity` is how many hand-overs (each a batch) may wait for it.
    pub fn start(file: Appender, capacity: usize) -> Result<DeadLetter> {
        let (tx, rx) = sync_channel(capacity);
        let file = Arc::new(file);
        let thread_file = Arc::clone(&file);
        let pending_bytes = Arc::new(AtomicUsize::new(0));
        let thread_pending = Arc::clone(&pending_bytes);
        let thread = std::thread::Builder::new()
            .name("duet-deadletter".into())
            .spawn(move || run(&rx, &thread_file, &thread_pending))
            .map_err(AuditError::Thread)?;
        Ok(DeadLetter {
            tx,
            file,
            pending_bytes,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// True when some append to this file failed.
    pub fn ever_failed(&self) -> bool {
        self.file.ever_failed()
    }

    /// Appends records now and waits until they are on disk (on a blocking thread; the
    /// lock in [`Appender`] orders this with the thread's own appends).
    pub async fn append_now(&self, records: Vec<RunRecord>) -> Result<()> {
        self.blocking(move |file| file.append(&records)).await
    }

    /// Appends whole lines now and waits until they are on disk.
    pub async fn append_line_now(&self, line: Vec<u8>) -> Result<()> {
        self.blocking(move |file| file.append_bytes(&line)).await
    }

    /// Runs an append on tokio's blocking pool and waits for it.
    async fn blocking(
        &self,
        append: impl FnOnce(&Appender) -> Result<()> + Send + 'static,
    ) -> Result<()> {
        let file = Arc::clone(&self.file);
        let path = file.path().to_owned();
        tokio::task::spawn_blocking(move || append(&file))
            .await
            .map_err(|e| AuditError::DeadLetter {
                path,
                source: std::io::Error::other(e),
            })?
    }

    /// Hands whole lines to the thread without waiting, and never appends on the caller's
    /// thread: false, and nothing written, when its queue is full or it has stopped. For
    /// what is worth keeping but not worth holding a request for (a run's start).
    pub fn try_send_line(&self, line: Vec<u8>, synced: Option<oneshot::Sender<()>>) -> bool {
        let bytes = line.len();
        if !self.reserve(bytes) {
            return false;
        }
        if self.tx.try_send(Msg::Line(line, synced)).is_ok() {
            return true;
        }
        self.pending_bytes.fetch_sub(bytes, Ordering::AcqRel);
        false
    }

    /// Reserves `bytes` under [`MAX_PENDING_BYTES`]. An empty queue takes any amount,
    /// however large: the writer must not block on it.
    fn reserve(&self, bytes: usize) -> bool {
        self.pending_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |pending| {
                (pending == 0 || pending.saturating_add(bytes) <= MAX_PENDING_BYTES)
                    .then(|| pending.saturating_add(bytes))
            })
            .is_ok()
    }

    /// Hands records to the thread without waiting. If its queue is full or it has stopped,
    /// appends them here and now (see `append_here`), since dropping them is not an option.
    pub fn send(&self, records: Vec<RunRecord>) {
        self.send_then(records, None);
    }

    /// As [`DeadLetter::send`], then calls `then` with whether the append reached the disk,
    /// on whichever thread appended: for bookkeeping that must wait for durability.
    pub fn send_then(&self, records: Vec<RunRecord>, then: Option<Then>) {
        if records.is_empty() {
            if let Some(then) = then {
                then(true);
            }
            return;
        }
        let bytes: usize = records.iter().map(RunRecord::approx_bytes).sum();
        if !self.reserve(bytes) {
            warn!(
                records = records.len(),
                "dead-letter queue full (bytes); appending on the caller's thread"
            );
            let ok = append_here(&self.file, &records);
            if let Some(then) = then {
                then(ok);
            }
            return;
        }
        let (records, then) = match self.tx.try_send(Msg::Records(records, bytes, then)) {
            Ok(()) => return,
            Err(TrySendError::Full(Msg::Records(r, _, then))) => {
                warn!(
                    records = r.len(),
                    "dead-letter queue full; appending on the caller's thread"
                );
                (r, then)
            }
            Err(TrySendError::Disconnected(Msg::Records(r, _, then))) => (r, then),
            Err(
                TrySendError::Full(Msg::Stop | Msg::Line(..))
                | TrySendError::Disconnected(Msg::Stop | Msg::Line(..)),
            ) => return,
        };
        self.pending_bytes.fetch_sub(bytes, Ordering::AcqRel);
        let ok = append_here(&self.file, &records);
        if let Some(then) = then {
            then(ok);
        }
    }

    /// Writes what is queued, then stops the thread and waits for it. Blocks: call it from
    /// `spawn_blocking`. Records sent afterwards are appended by their sender.
    pub fn stop_blocking(&self) {
        // Fails only if the thread is gone already, which is what we want anyway.
        let _ = self.tx.send(Msg::Stop);
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            error!("the dead-letter thread panicked");
        }
    }
}

/// Appends on the caller's thread, for when the dead-letter thread cannot take the records.
///
/// On a worker of a multi-thread runtime (the service's), inside `block_in_place`: tokio hands
/// the worker's queued tasks to a new worker thread before the write starts, so only the
/// caller's own task waits for the disk. Anywhere else it is a plain call: a thread outside
/// any runtime (or the blocking pool) may block, and a current-thread runtime (tests, tools)
/// does not allow `block_in_place`; its single thread waits, as it always has.
fn append_here(file: &Appender, records: &[RunRecord]) -> bool {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(runtime) if runtime.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| file.append_or_log(records))
        }
        _ => file.append_or_log(records),
    }
}

fn run(rx: &Receiver<Msg>, file: &Appender, pending_bytes: &AtomicUsize) {
    while let Ok(first) = rx.recv() {
        let mut records = Vec::new();
        let mut bytes = 0;
        let mut thens: Vec<Then> = Vec::new();
        let mut lines = Vec::new();
        let mut synced = Vec::new();
        let mut stop = false;
        // Whatever queued up meanwhile shares one fsync.
        let mut next = Some(first);
        while let Some(msg) = next.take().or_else(|| rx.try_recv().ok()) {
            match msg {
                Msg::Records(r, b, then) => {
                    records.extend(r);
                    bytes += b;
                    thens.extend(then);
                }
                Msg::Line(line, then) => {
                    bytes += line.len();
                    lines.extend_from_slice(&line);
                    synced.extend(then);
                }
                Msg::Stop => {
                    stop = true;
                    break;
                }
            }
        }
        // One write and one sync for all of it.
        let ok = file.append_or_log_after(lines, &records);
        pending_bytes.fetch_sub(bytes, Ordering::AcqRel);
        for then in thens {
            then(ok);
        }
        if ok {
            for tell in synced {
                // Whoever waited may have stopped waiting.
                let _ = tell.send(());
            }
        }
        if stop {
            return;
        }
    }
}

#[cfg(unix)]
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(_: &std::fs::Metadata, _: &std::fs::Metadata) -> bool {
    true
}

#[cfg(all(test, unix))]
mod tests {
    use std::{io::BufRead, time::Duration};

    use super::*;
    use crate::audit::{ModelTrace, Outcome, RunStatus};

    fn record() -> RunRecord {
        let trace = ModelTrace {
            provider: "p".into(),
            model: "m".into(),
            model_version: None,
            outcome: Outcome::Ok,
            error_type: None,
            error_message: None,
            deadline: None,
            text: "t".into(),
            finish_reason: None,
            latency_ms: 1,
            ttft_ms: None,
            input_tokens: Some(3),
            output_tokens: Some(4),
            cost_usd: Some(0.1 + 0.2),
        };
        RunRecord {
            run_id: uuid::Uuid::now_v7(),
            client_request_id: None,
            created_at: chrono::Utc::now(),
            query: "q".into(),
            system: None,
            messages: None,
            params: None,
            status: RunStatus::Ok,
            total_ms: 1,
            service_version: "t".into(),
            flash: trace.clone(),
            pro: trace,
            events: Vec::new(),
            owner_fingerprint: None,
            client_id: None,
            cost_usd: Some((0.1 + 0.2) * 2.0),
            // Not a short decimal either: the line must keep every bit.
            agreement: Some(2.0 / 3.0),
        }
    }

    /// A line cut short by an earlier append (a full disk, a crash) does not swallow the
    /// next record: it starts on a line of its own, which replay reads.
    #[test]
    fn an_append_after_a_cut_line_starts_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deadletter.jsonl");
        let appender = Appender::new(&path, None);
        let first = record();
        appender.append(std::slice::from_ref(&first)).unwrap();
        let whole = std::fs::read(&path).unwrap();
        // A second record cut halfway, as ENOSPC leaves it.
        let cut = serde_json::to_vec(&record()).unwrap();
        let mut torn = whole.clone();
        torn.extend_from_slice(&cut[..cut.len() / 2]);
        std::fs::write(&path, &torn).unwrap();

        let next = record();
        appender.append(std::slice::from_ref(&next)).unwrap();
        let lines: Vec<String> = std::io::BufReader::new(std::fs::File::open(&path).unwrap())
            .lines()
            .map(Result::unwrap)
            .collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        let parsed = |line: &str| serde_json::from_str::<RunRecord>(line).map(|r| r.run_id);
        assert_eq!(parsed(&lines[0]).unwrap(), first.run_id);
        assert!(parsed(&lines[1]).is_err(), "the cut line stays unreadable");
        assert_eq!(
            parsed(&lines[2]).unwrap(),
            next.run_id,
            "the next record is whole"
        );

        // A file that ends a line gets no blank line.
        appender.append(&[record()]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert!(!text.contains("\n\n"));
    }

    /// The dead-letter "file" is a FIFO nobody reads yet, so every append blocks opening it:
    /// the thread on the first batch, the sender on the one that finds the queue full. With
    /// one worker thread, another task still runs meanwhile, and every record arrives once
    /// a reader opens the FIFO.
    #[test]
    fn a_sender_appending_itself_does_not_hold_a_runtime_worker() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deadletter.fifo");
        let made = std::process::Command::new("mkfifo").arg(&path).status();
        assert!(made.unwrap().success(), "mkfifo");
        let deadletter = Arc::new(DeadLetter::start(Appender::new(&path, None), 1).unwrap());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();

        let sender = Arc::clone(&deadletter);
        let sent = runtime.spawn(async move {
            for _ in 0..3 {
                sender.send(vec![record()]);
            }
        });
        // Time for the sender to reach the append it has to make itself, and block in it.
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !sent.is_finished(),
            "the third send appends, and waits for a reader"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            tokio::task::yield_now().await;
            let _ = tx.send(());
        });
        let other_task_ran = rx.recv_timeout(Duration::from_secs(5)).is_ok();

        let reader = std::thread::spawn({
            let path = path.clone();
            // Each append opens and closes the FIFO. Opened for reading and writing, it always
            // has a writer: it never reads as ended between two appends, and no append can
            // open it in the instant a reader that saw the end has not yet closed it — that
            // append's write would fail (EPIPE), its line never come, and this loop, which
            // reopened the FIFO after each end, waited for it forever (it hung so once).
            move || {
                let fifo = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .unwrap();
                let mut lines = std::io::BufReader::new(fifo).lines();
                let mut text = String::new();
                for _ in 0..3 {
                    text.push_str(&lines.next().unwrap().unwrap());
                    text.push('\n');
                }
                text
            }
        });
        // Unblocked first, so that a failure is a failed assertion rather than a hang.
        assert!(
            other_task_ran,
            "another task ran while the sender waited for the disk"
        );
        runtime.block_on(sent).unwrap();
        deadletter.stop_blocking();
        // A FIFO cannot be fsynced, so the appends report failures (and log the records),
        // but every line went through it.
        let text = reader.join().unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
    }
}
