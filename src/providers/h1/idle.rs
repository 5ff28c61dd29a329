//! Idle upstream connections, kept for the next call.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use super::Conn;

/// Idle connections kept per upstream at most (hyper's pool kept as many): past it a
/// finished call's connection is closed.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed rather than used: upstreams close their own
/// idle connections after a while (often 60–120 s), and one closed in the very moment a
/// request is sent on it fails that call.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Oldest first. No task watches them: a connection the upstream closed, or that outlived
/// [`IDLE_TIMEOUT`], is found and closed when a call would take it, and the old ones are
/// swept whenever a connection is put back; so without any calls at all, up to
/// [`MAX_IDLE`] closed sockets may wait for the next call.
#[derive(Default)]
pub(super) struct IdleList {
    conns: Mutex<Vec<(Conn, Instant)>>,
}

impl IdleList {
    pub(super) fn len(&self) -> usize {
        self.conns.lock().map_or(0, |c| c.len())
    }

    /// The most recently used connection that is still open, if any.
    pub(super) fn take(&self) -> Option<Conn> {
        loop {
            // Popped under the lock, checked and (if closed) dropped outside it.
            let (mut conn, since) = self.conns.lock().ok()?.pop()?;
            if since.elapsed() < IDLE_TIMEOUT && conn.is_usable() {
                return Some(conn);
            }
        }
    }

    pub(super) fn put(&self, conn: Conn) {
        let Ok(mut conns) = self.conns.lock() else {
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
