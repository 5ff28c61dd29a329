//! [`Quiet`]: a future that is polled only after it has been woken. A run's task is woken
//! once per upstream chunk, and each wake-up polled every future its `select!`s wait on: the
//! shutdown signal, the client going away, the model's total deadline and its first-token or
//! stall timer. Those are nearly never ready, and polling one is not free (a lock in tokio's
//! `Notify`, a waker check in its timer): about 40 k instructions per run between them. The
//! response body's keep-alive timer (`crate::sse::EventBody`) is the same case, polled after
//! every frame.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
};

use futures::task::AtomicWaker;

/// Polls `F` only when `F` asked to be polled again: it is given a waker of its own, which
/// notes the wake and passes it on to the task's. Polled without such a wake, `Quiet` returns
/// `Pending` at once; that is all `F` could do too, since a future that is not ready has
/// arranged to be woken when it may be. A wake that comes while `F` is being polled (tokio's
/// cooperative budget wakes at once) is kept, so `F` is polled again next time.
pub(crate) struct Quiet<F> {
    inner: F,
    flag: Arc<Flag>,
    /// `flag` as a `Waker`, made once.
    waker: Waker,
}

struct Flag {
    woken: AtomicBool,
    /// The waker of the task polling the `Quiet`, for `inner`'s wakes.
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F> Quiet<F> {
    pub(crate) fn new(inner: F) -> Self {
        // Woken to start with: the first poll always reaches `inner`.
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Quiet {
            inner,
            waker: Waker::from(Arc::clone(&flag)),
            flag,
        }
    }

    /// The future itself, to change it (a timer's `reset`): it is polled at the next poll.
    pub(crate) fn get_mut(&mut self) -> &mut F {
        self.flag.woken.store(true, Ordering::Release);
        &mut self.inner
    }
}

impl<F: Future + Unpin> Future for Quiet<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        // Registered before the flag is read: a wake from here on reaches this task, one
        // before it left the flag set.
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Counts the wakes it gets.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Pending on its first `pending` polls; on each one it either wakes its waker at once
    /// (`wake_now`) or keeps it for the test to wake.
    struct Probe {
        polls: usize,
        pending: usize,
        wake_now: bool,
        kept: Option<Waker>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls += 1;
            if self.polls > self.pending {
                return Poll::Ready(());
            }
            if self.wake_now {
                cx.waker().wake_by_ref();
            } else {
                self.kept = Some(cx.waker().clone());
            }
            Poll::Pending
        }
    }

    fn probe(pending: usize, wake_now: bool) -> Probe {
        Probe {
            polls: 0,
            pending,
            wake_now,
            kept: None,
        }
    }

    #[test]
    fn polls_the_future_only_after_it_was_woken() {
        let count = Arc::new(Count::default());
        let task = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&task);
        let mut quiet = Quiet::new(probe(1, false));
        assert!(Pin::new(&mut quiet).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut quiet).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut quiet).poll(&mut cx).is_pending());
        assert_eq!(quiet.inner.polls, 1, "not woken: not polled again");
        quiet.inner.kept.take().unwrap().wake();
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "the wake reached the task"
        );
        assert!(Pin::new(&mut quiet).poll(&mut cx).is_ready());
        assert_eq!(quiet.inner.polls, 2);
    }

    #[test]
    fn a_wake_during_the_poll_is_kept() {
        // As tokio's cooperative budget does: wake at once, return Pending.
        let count = Arc::new(Count::default());
        let task = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&task);
        let mut quiet = Quiet::new(probe(2, true));
        assert!(Pin::new(&mut quiet).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut quiet).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut quiet).poll(&mut cx).is_ready());
        assert_eq!(quiet.inner.polls, 3);
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn changing_the_future_polls_it_again() {
        let task = Waker::from(Arc::new(Count::default()));
        let mut cx = Context::from_waker(&task);
        let mut quiet = Quiet::new(probe(1, false));
        assert!(Pin::new(&mut quiet).poll(&mut cx).is_pending());
        quiet.get_mut().pending = 0;
        assert!(Pin::new(&mut quiet).poll(&mut cx).is_ready());
    }

    #[test]
    fn a_wake_reaches_the_task_that_polled_last() {
        let first = Arc::new(Count::default());
        let second = Arc::new(Count::default());
        let mut quiet = Quiet::new(probe(1, false));
        let waker = Waker::from(Arc::clone(&first));
        assert!(
            Pin::new(&mut quiet)
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        let waker = Waker::from(Arc::clone(&second));
        assert!(
            Pin::new(&mut quiet)
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        quiet.inner.kept.take().unwrap().wake();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }
}
