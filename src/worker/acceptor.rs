//! The accept path: an idle worker waits for connections in an epoll of its
//! own where the shared listeners are registered `EPOLLEXCLUSIVE`, so each
//! connection wakes **one** idle worker, and a busy worker is not woken at all.
//!
//! Why. Every worker inherits the same listening sockets. Had each runtime
//! registered them in its own epoll (what `tokio::net::UnixListener` does),
//! every connection would wake every idle worker: all call `accept4`, one
//! wins, the rest get `EAGAIN` — a context switch per worker per connection
//! (5 workers on 2 cores: 5.5 per request, a quarter of the throughput lost).
//! `EPOLLEXCLUSIVE` (Linux ≥ 4.5) wakes one waiter instead, but only a thread
//! asleep in `epoll_wait` on *that* epoll counts as a waiter: nested under
//! tokio's reactor it wakes everyone again, and a separate accept thread
//! costs a hand-off wake-up per connection.
//!
//! How. The worker's one thread sleeps here instead of in tokio's reactor:
//! tokio calls [`Acceptor::park`] (its `on_thread_park` hook) when it has
//! nothing to run, and this epoll holds the listeners (exclusive) **and
//! tokio's own epoll** (not exclusive), so the thread wakes for a connection
//! or for anything tokio waits for. What is queued on the listener is
//! accepted right here (at most [`ACCEPT_BATCH`] per wake-up) and the accept
//! task is woken; tokio
//! then polls its reactor without blocking (it does whenever the park hook
//! scheduled work: tokio-rs/tokio#8212, in the locked 1.54), so timers and
//! sockets are served as usual.
//! The hook sleeps at most [`SLICE`] so that timers (which have no descriptor
//! in tokio's epoll) are at most that late; a busy runtime, which never parks,
//! takes no connections — the idle workers do — except through the accept
//! task's own check every [`SLICE`], so even a worker that is never idle
//! cannot leave the queue unserved.
//!
//! Balance. The kernel walks a socket's wait queue from the head and stops at
//! the first exclusive entry whose epoll has a sleeping thread, so the worker
//! registered first would win whenever it is idle. After taking connections
//! the worker moves its entry to the tail (`EPOLL_CTL_DEL` + `EPOLL_CTL_ADD`):
//! idle workers take connections in turn. `notesd status` shows each worker's
//! count (the `accepted` column).
//!
//! Stop. [`Acceptor::stop`] unregisters the listeners (no more wake-ups here;
//! the other workers take the connections) and ends [`Acceptor::next`] once
//! what was accepted before is handed over: a draining worker serves every
//! connection it took.
//!
//! Layout: [`Acceptor`] (shared by the park hook and the accept task),
//! [`Accepted`] (one connection), `take` (accept from one listener),
//! [`runtime_epoll`] (finding tokio's epoll descriptor).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{SockFlag, accept4};
use tokio::sync::Notify;
use tokio::time::{Interval, MissedTickBehavior};

use crate::clock;

/// The longest the park hook sleeps: the most a timer can be late, and how
/// often a worker that never goes idle still checks the listeners.
pub(crate) const SLICE: Duration = Duration::from_millis(50);

/// The epoll key of tokio's epoll; listeners are keyed by their index.
const RUNTIME_KEY: u64 = u64::MAX;

/// The most connections one wake-up takes off a listener. Taking what is
/// queued saves a park and a re-registration per connection once they come
/// faster than one is served (connection-per-request `/healthz` through
/// nginx, three interleaved rounds: 1 worker 19.5–20.8 µs of CPU per
/// connection instead of 20.9–22.5; 2 workers no change in req/s, CPU or
/// balance); the bound keeps a burst from landing on one worker.
const ACCEPT_BATCH: usize = 8;

/// How long to back off after an accept error that is not the client's
/// (EMFILE, ENFILE, ENOBUFS, ENOMEM): the listener stays readable.
const ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// A connection taken off a listener.
pub(crate) struct Accepted {
    /// It came from a unix listener (else TCP).
    pub unix: bool,
    /// The connected socket, non-blocking and close-on-exec.
    pub fd: OwnedFd,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum AcceptorError {
    #[error("cannot set up the accept epoll: {0}")]
    Epoll(Errno),
    #[error("cannot make an inherited listener non-blocking: {0}")]
    Nonblocking(Errno),
    #[error("cannot find the runtime's epoll descriptor in /proc/self/fd: {0}")]
    RuntimeEpoll(String),
    #[error("the accept path was started twice")]
    Started,
}

/// Shared by the park hook and the accept task (both on the worker's thread).
#[derive(Default)]
pub(crate) struct Acceptor {
    /// Set once by `start`; until then the park hook does nothing.
    inner: OnceLock<Inner>,
}

struct Inner {
    /// The listeners (exclusive) and tokio's epoll.
    epoll: Epoll,
    /// (is unix, listener), indexed by epoll key.
    listeners: Vec<(bool, OwnedFd)>,
    /// Accepted, not yet handed to the accept task.
    queue: Mutex<VecDeque<Accepted>>,
    /// Wakes the accept task.
    ready: Notify,
    /// No more accepting (drain).
    stopped: AtomicBool,
}

impl Acceptor {
    /// Start accepting on `listeners` (already non-blocking); `runtime` is
    /// tokio's epoll descriptor (see [`runtime_epoll`]).
    pub(crate) fn start(
        &self,
        runtime: BorrowedFd<'_>,
        listeners: Vec<(bool, OwnedFd)>,
    ) -> Result<(), AcceptorError> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(AcceptorError::Epoll)?;
        for (key, (_, fd)) in listeners.iter().enumerate() {
            epoll
                .add(fd, exclusive(key as u64))
                .map_err(AcceptorError::Epoll)?;
        }
        epoll
            .add(runtime, EpollEvent::new(EpollFlags::EPOLLIN, RUNTIME_KEY))
            .map_err(AcceptorError::Epoll)?;
        let inner = Inner {
            epoll,
            listeners,
            queue: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            stopped: AtomicBool::new(false),
        };
        self.inner.set(inner).map_err(|_| AcceptorError::Started)
    }

    /// tokio's `on_thread_park`: sleep until a connection, a runtime event or
    /// [`SLICE`]; accept what came. Always wakes the accept task unless the
    /// runtime has events of its own, so tokio polls its reactor and timers.
    pub(crate) fn park(&self) {
        let Some(inner) = self.inner.get() else {
            return;
        };
        if inner.stopped.load(Ordering::Acquire) {
            return;
        }
        let mut events = [EpollEvent::empty(); 4];
        let timeout = EpollTimeout::try_from(SLICE).unwrap_or(EpollTimeout::ZERO);
        // EINTR (or any failure) counts as a timeout: tokio polls its reactor.
        let n: usize = inner.epoll.wait(&mut events, timeout).unwrap_or_default();
        let mut runtime_ready = false;
        for e in &events[..n] {
            match e.data() {
                RUNTIME_KEY => runtime_ready = true,
                key => {
                    inner.take(key as usize);
                }
            }
        }
        if !runtime_ready || !inner.queue_is_empty() {
            inner.ready.notify_one();
        }
    }

    /// The next accepted connection; `None` once stopped and all handed over.
    /// `check` ([`check_interval`]) ticks every [`SLICE`]: a worker that never
    /// parks still serves the listen queue then. It is one timer kept by the
    /// accept task, not one armed per connection.
    pub(crate) async fn next(&self, check: &mut Interval) -> Option<Accepted> {
        let inner = self.inner.get()?;
        loop {
            let notified = inner.ready.notified();
            if let Some(a) = inner.pop() {
                return Some(a);
            }
            if inner.stopped.load(Ordering::Acquire) {
                return None;
            }
            tokio::select! {
                biased;
                () = notified => {}
                _ = check.tick() => {
                    for key in 0..inner.listeners.len() {
                        inner.take(key);
                    }
                }
            }
        }
    }

    /// Stop accepting: unregister the listeners; `next` ends once the queue
    /// is empty.
    pub(crate) fn stop(&self) {
        let Some(inner) = self.inner.get() else {
            return;
        };
        inner.stopped.store(true, Ordering::Release);
        for (_, fd) in &inner.listeners {
            let _ = inner.epoll.delete(fd);
        }
        inner.ready.notify_one();
    }
}

/// The accept task's safety check for [`Acceptor::next`]: every [`SLICE`],
/// late ticks not made up.
pub(crate) fn check_interval() -> Interval {
    let mut check = tokio::time::interval(SLICE);
    check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    check
}

fn exclusive(key: u64) -> EpollEvent {
    EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE, key)
}

impl Inner {
    fn pop(&self) -> Option<Accepted> {
        self.queue.lock().ok()?.pop_front()
    }

    fn queue_is_empty(&self) -> bool {
        self.queue.lock().map(|q| q.is_empty()).unwrap_or(true)
    }

    /// Accept what is queued on listener `key`, up to [`ACCEPT_BATCH`], then
    /// move this worker to the tail of the listener's wait queue (see the
    /// module doc). More queued connections keep the listener ready: the next
    /// park takes them, unless an idle worker has taken them first.
    fn take(&self, key: usize) {
        let Some((unix, listener)) = self.listeners.get(key) else {
            return;
        };
        let mut taken = 0;
        while taken < ACCEPT_BATCH && !self.stopped.load(Ordering::Acquire) {
            let Some(fd) = accept_one(listener) else {
                break;
            };
            if let Ok(mut q) = self.queue.lock() {
                q.push_back(Accepted { unix: *unix, fd });
            }
            taken += 1;
        }
        if taken > 0 {
            let moved = self
                .epoll
                .delete(listener)
                .and_then(|()| self.epoll.add(listener, exclusive(key as u64)));
            if let Err(e) = moved {
                tracing::error!("cannot re-register a listener in the accept epoll: {e}");
            }
        }
    }
}

/// One connection off `listener`, or `None` when there is none to take now.
fn accept_one(listener: &OwnedFd) -> Option<OwnedFd> {
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    match accept4(listener.as_raw_fd(), flags) {
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        Ok(fd) => Some(unsafe { OwnedFd::from_raw_fd(fd) }),
        // Another worker was faster, or the client gave up in the queue.
        Err(Errno::EAGAIN | Errno::EINTR | Errno::ECONNABORTED) => None,
        Err(e) => {
            accept_failed(e);
            None
        }
    }
}

fn accept_failed(e: Errno) {
    static ACCEPT_FAILED: crate::log::Throttle = crate::log::Throttle::new();
    if let Some(skipped) = ACCEPT_FAILED.admit(clock::now()) {
        let note = crate::log::skipped_note(skipped);
        tracing::warn!("accept failed: {e}{note}");
    }
    std::thread::sleep(ERROR_BACKOFF);
}

/// The epoll descriptors open in this process.
pub(crate) fn epoll_fds() -> std::io::Result<Vec<RawFd>> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let is_epoll = std::fs::read_link(entry.path())
            .is_ok_and(|t| t.as_os_str() == "anon_inode:[eventpoll]");
        if let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok())
            && is_epoll
        {
            fds.push(fd);
        }
    }
    Ok(fds)
}

/// tokio's epoll: what building the runtime added (`before` = [`epoll_fds`]
/// then). tokio offers no accessor. A current-thread runtime on Linux has one
/// reactor, one epoll instance, open twice (mio's `Poll` and the duplicate
/// its registry keeps); either descriptor will do.
pub(crate) fn runtime_epoll(before: &[RawFd]) -> Result<RawFd, AcceptorError> {
    let after = epoll_fds().map_err(|e| AcceptorError::RuntimeEpoll(e.to_string()))?;
    after
        .into_iter()
        .filter(|fd| !before.contains(fd))
        .min()
        .ok_or_else(|| AcceptorError::RuntimeEpoll("building the runtime opened none".into()))
}

/// What the park hook captures.
pub(crate) fn hook(acceptor: Arc<Acceptor>) -> impl Fn() + Send + Sync + 'static {
    move || acceptor.park()
}
