//! Idle upstream connections, kept for the next call.

use std::{
    num::NonZeroUsize,
    sync::Mutex,
    time::{Duration, Instant},
};

use super::Conn;

/// Idle connections kept at most per upstream and per list, that is per serving thread
/// (hyper's pool kept as many per upstream): past it a finished call's connection is closed.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed rather than used: upstreams close their own
/// idle connections after a while (often 60–120 s), and one closed in the very moment a
/// request is sent on it fails that call.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Idle connections, each with the time it was put back, oldest first.
type List = Vec<(Conn, Instant)>;

/// One list per serving thread (`crate::workers`), oldest first in each, plus one for every
/// other thread. A connection is registered with the reactor of the thread that opened it,
/// so it goes back to that thread's list and is taken from there: used from another thread,
/// each of its reads would wake the opener's thread first, then this one.
///
/// No task watches them: a connection the upstream closed, or that outlived
/// [`IDLE_TIMEOUT`], is found and closed when a call would take it, and the old ones are
/// swept whenever a connection is put back; so without any calls at all, up to
/// [`MAX_IDLE`] closed sockets may wait for the next call.
pub(super) struct IdleList {
    lists: Box<[Mutex<List>]>,
}

impl Default for IdleList {
    fn default() -> Self {
        // One per core (the serving threads' default) and one for the other threads; more
        // serving threads than that share lists, which is still correct.
        let threads = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        IdleList {
            lists: (0..=threads).map(|_| Mutex::default()).collect(),
        }
    }
}

impl IdleList {
    /// Connections in all lists together (each holds at most [`MAX_IDLE`]).
    pub(super) fn len(&self) -> usize {
        self.lists
            .iter()
            .map(|list| list.lock().map_or(0, |c| c.len()))
            .sum()
    }

    /// This thread's list.
    fn list(&self) -> &Mutex<List> {
        let index = crate::workers::current().map_or(0, |i| i + 1) % self.lists.len();
        &self.lists[index]
    }

    /// The most recently used connection of this thread that is still open, if any.
    pub(super) fn take(&self) -> Option<Conn> {
        let list = self.list();
        loop {
            // Popped under the lock, checked and (if closed) dropped outside it.
            let (mut conn, since) = list.lock().ok()?.pop()?;
            if since.elapsed() < IDLE_TIMEOUT && conn.is_usable() {
                return Some(conn);
            }
        }
    }

    pub(super) fn put(&self, conn: Conn) {
        let Ok(mut conns) = self.list().lock() else {
            return;
        };
        let expired = conns
            .iter()
            .take_while(|(_, since)| since.elapsed() >= IDLE_TIMEOUT)
            .count();
        let expired: Vec<_> = conns.drain(..expired).collect();
        let refused = if conns.len() < MAX_IDLE {
            conns.push((conn, Instant::now()));
            None
        } else {
            Some(conn)
        };
        drop(conns);
        // Closing sockets (a system call each) outside the lock.
        drop((expired, refused));
    }
}
