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
//! the other workers take the connections: a reload, a recycle, a quick
//! stop) and ends [`Acceptor::next`] once what was accepted before is handed
//! over: a draining worker serves every connection it took.
//! [`Acceptor::close_when_empty`] is the shutdown's stop (docs/design.md §4.12):
//! the listener is about to close for good, and closing a listening socket
//! resets every connection still in its queue, so each listener is accepted
//! from until `accept` says it is empty (`EAGAIN`), then unregistered and
//! closed at once; the worker stops accepting once all are closed.
//!
//! Errors. `EMFILE`, `ENFILE`, `ENOBUFS` and `ENOMEM` leave the connection
//! queued and the listener readable: the worker *pauses* — unregisters its
//! listeners, so that it is not woken for them and other workers take the
//! queue — and tries again after [`PAUSE`], without ever sleeping on its one
//! thread (which serves the connections it has at normal latency). One line
//! is logged when an episode starts and one when it ends, with the count.
//! The errors `accept(2)` lists for a connection that failed on its own
//! (`ECONNABORTED`, `EPROTO`, the network ones) skip that connection and go on.
//!
//! Layout: [`Acceptor`] (shared by the park hook and the accept task),
//! [`Accepted`] (one connection), `Listen` (one listener, closed when
//! emptied), `Pause` (an episode of accept errors), `take` (accept from one
//! listener), [`classify`] (what an `accept` result means),
//! [`runtime_epoll`] (finding tokio's epoll descriptor).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
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

/// How long a worker stops accepting after an error that is not the
/// client's (EMFILE, ENFILE, ENOBUFS, ENOMEM): the connection stays queued,
/// for another worker or for this one once a descriptor or memory is free.
const PAUSE: Duration = Duration::from_millis(100);

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
    /// Indexed by epoll key.
    listeners: Vec<Listen>,
    /// Accepted, not yet handed to the accept task.
    queue: Mutex<VecDeque<Accepted>>,
    /// Wakes the accept task.
    ready: Notify,
    /// No more accepting (drain).
    stopped: AtomicBool,
    /// Shutdown: accept until each listener is empty, then close it.
    closing: AtomicBool,
    /// An episode of accept errors, while it lasts.
    pause: Mutex<Option<Pause>>,
}

/// One inherited listener.
struct Listen {
    /// A unix listener (else TCP).
    unix: bool,
    /// `None` once emptied and closed (shutdown).
    fd: Mutex<Option<OwnedFd>>,
}

/// Accepting is paused after an error that is not the client's.
struct Pause {
    /// `CLOCK_MONOTONIC` time to try again.
    until: Duration,
    /// Trying again now: the listeners are watched and accepted from; an
    /// error pauses again within this episode, success ends it.
    retrying: bool,
    /// When the episode started, its first error, how many accepts failed.
    since: Duration,
    first: Errno,
    failures: u64,
}

/// What one `accept4` call means for the loop around it.
#[derive(Debug)]
enum Outcome {
    /// A connection.
    Conn(OwnedFd),
    /// Nothing is queued (or another worker was faster).
    Empty,
    /// This connection failed on its own (the client gave up, a network
    /// error; or the call was interrupted): go on with the next one.
    Skip,
    /// Out of descriptors, buffers or memory: the connection stays queued.
    Exhausted(Errno),
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
            listeners: listeners
                .into_iter()
                .map(|(unix, fd)| Listen {
                    unix,
                    fd: Mutex::new(Some(fd)),
                })
                .collect(),
            queue: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            stopped: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            pause: Mutex::new(None),
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
                key => inner.take(key as usize),
            }
        }
        inner.resume_if_due();
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
                    inner.resume_if_due();
                    inner.take_all();
                }
            }
        }
    }

    /// Stop accepting: unregister the listeners; `next` ends once the queue
    /// is empty. What is still queued on them is left to the other workers
    /// (reload, recycle) or to whoever holds the socket (systemd).
    pub(crate) fn stop(&self) {
        let Some(inner) = self.inner.get() else {
            return;
        };
        inner.stopped.store(true, Ordering::Release);
        for l in &inner.listeners {
            if let Some(fd) = lock(&l.fd).as_ref() {
                let _ = inner.epoll.delete(fd);
            }
        }
        inner.ready.notify_one();
    }

    /// Shutdown: accept what each listener has queued until it is empty,
    /// closing each as it empties; `next` ends once all are closed and what
    /// they held is handed over. Nothing the kernel queued is reset by our
    /// close (a connection racing the last close can be refused).
    pub(crate) fn close_when_empty(&self) {
        let Some(inner) = self.inner.get() else {
            return;
        };
        if inner.stopped.load(Ordering::Acquire) {
            return;
        }
        inner.closing.store(true, Ordering::Release);
        inner.take_all();
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

/// Every lock here is taken and released on the worker's one thread, never
/// across an await: a poisoned one still holds consistent data.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn pop(&self) -> Option<Accepted> {
        lock(&self.queue).pop_front()
    }

    fn queue_is_empty(&self) -> bool {
        lock(&self.queue).is_empty()
    }

    fn take_all(&self) {
        for key in 0..self.listeners.len() {
            self.take(key);
        }
    }

    /// Accept what is queued on listener `key` — up to [`ACCEPT_BATCH`], or
    /// all of it when closing — then move this worker to the tail of the
    /// listener's wait queue (see the module doc). More queued connections
    /// keep the listener ready: the next park takes them, unless an idle
    /// worker has taken them first.
    fn take(&self, key: usize) {
        let Some(listen) = self.listeners.get(key) else {
            return;
        };
        let mut fd = lock(&listen.fd);
        let Some(listener) = fd.as_ref() else {
            return;
        };
        let closing = self.closing.load(Ordering::Acquire);
        let batch = if closing { usize::MAX } else { ACCEPT_BATCH };
        let mut taken = 0;
        while taken < batch && !self.stopped.load(Ordering::Acquire) && !self.paused() {
            match accept_one(listener) {
                Outcome::Conn(conn) => {
                    lock(&self.queue).push_back(Accepted {
                        unix: listen.unix,
                        fd: conn,
                    });
                    taken += 1;
                }
                Outcome::Skip => {}
                Outcome::Exhausted(e) => {
                    drop(fd);
                    return self.pause_for(e);
                }
                Outcome::Empty if closing => {
                    // Emptied: close it now, so that nothing queues on it
                    // behind our back (the kernel would reset that).
                    let _ = self.epoll.delete(listener);
                    *fd = None;
                    drop(fd);
                    return self.closed_one();
                }
                Outcome::Empty => break,
            }
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

    /// A listener was emptied and closed; once all are, accepting is over.
    fn closed_one(&self) {
        if self.listeners.iter().all(|l| lock(&l.fd).is_none()) {
            tracing::debug!("every listener emptied and closed");
            self.stopped.store(true, Ordering::Release);
            self.ready.notify_one();
        }
    }

    /// Not accepting now (an episode is on, and this is not its retry).
    fn paused(&self) -> bool {
        lock(&self.pause).as_ref().is_some_and(|p| !p.retrying)
    }

    /// Out of descriptors or memory: stop watching the listeners for
    /// [`PAUSE`] (the queue waits, or goes to another worker). The first
    /// failure of an episode is logged; the others are counted.
    fn pause_for(&self, e: Errno) {
        let now = clock::now();
        {
            let mut pause = lock(&self.pause);
            match pause.as_mut() {
                Some(p) => {
                    p.failures += 1;
                    p.until = now + PAUSE;
                    p.retrying = false;
                }
                None => {
                    tracing::warn!(
                        "accept failed: {e}; not accepting for now (retrying every {} ms), the open connections are served as usual",
                        PAUSE.as_millis()
                    );
                    *pause = Some(Pause {
                        until: now + PAUSE,
                        retrying: false,
                        since: now,
                        first: e,
                        failures: 1,
                    });
                }
            }
        }
        self.watch(false);
    }

    /// (Un)register every open listener in this worker's epoll.
    fn watch(&self, on: bool) {
        for (key, l) in self.listeners.iter().enumerate() {
            let fd = lock(&l.fd);
            let Some(fd) = fd.as_ref() else { continue };
            let done = if on {
                self.epoll.add(fd, exclusive(key as u64))
            } else {
                self.epoll.delete(fd)
            };
            if let Err(e) = done
                && on
            {
                tracing::error!("cannot watch a listener again after a pause: {e}");
            }
        }
    }

    /// A pause whose time is up: watch the listeners again and take what
    /// they queued meanwhile. Another error pauses again within the same
    /// episode; otherwise the episode ends, with one line saying how long it
    /// lasted and how many accepts failed.
    fn resume_if_due(&self) {
        {
            let mut pause = lock(&self.pause);
            match pause.as_mut() {
                Some(p) if !p.retrying && clock::now() >= p.until => p.retrying = true,
                _ => return,
            }
        }
        if !self.stopped.load(Ordering::Acquire) {
            self.watch(true);
        }
        self.take_all();
        let mut pause = lock(&self.pause);
        if let Some(episode) = pause.take_if(|p| p.retrying) {
            tracing::warn!(
                "accepting again: {} accept(s) failed with {} (first) over {:.1} s",
                episode.failures,
                episode.first,
                clock::now().saturating_sub(episode.since).as_secs_f64()
            );
        }
    }
}

/// One `accept4` on `listener`.
fn accept_one(listener: &OwnedFd) -> Outcome {
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    match accept4(listener.as_raw_fd(), flags) {
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        Ok(fd) => Outcome::Conn(unsafe { OwnedFd::from_raw_fd(fd) }),
        Err(e) => classify(e),
    }
}

/// What an `accept4` error means (accept(2), "Error handling": the network
/// errors of a pending connection are reported by accept and are to be
/// treated like EAGAIN by retrying).
fn classify(e: Errno) -> Outcome {
    match e {
        Errno::EAGAIN => Outcome::Empty,
        // Interrupted before it took anything: simply again.
        Errno::EINTR => Outcome::Skip,
        Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM => Outcome::Exhausted(e),
        Errno::ECONNABORTED
        | Errno::EPROTO
        | Errno::EPERM
        | Errno::ENETDOWN
        | Errno::ENOPROTOOPT
        | Errno::EHOSTDOWN
        | Errno::ENONET
        | Errno::EHOSTUNREACH
        | Errno::EOPNOTSUPP
        | Errno::ENETUNREACH
        | Errno::ETIMEDOUT => Outcome::Skip,
        // EBADF, EINVAL, ENOTSOCK: not a listener any more; nothing to take.
        e => {
            static ODD: crate::log::Throttle = crate::log::Throttle::new();
            if let Some(skipped) = ODD.admit(clock::now()) {
                let note = crate::log::skipped_note(skipped);
                tracing::warn!("accept failed: {e}{note}");
            }
            Outcome::Empty
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_are_sorted_by_whose_they_are() {
        assert!(matches!(classify(Errno::EAGAIN), Outcome::Empty));
        for e in [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM] {
            assert!(
                matches!(classify(e), Outcome::Exhausted(x) if x == e),
                "{e}"
            );
        }
        for e in [
            Errno::ECONNABORTED,
            Errno::EPROTO,
            Errno::ENETUNREACH,
            Errno::EPERM,
        ] {
            assert!(matches!(classify(e), Outcome::Skip), "{e}");
        }
    }
}
