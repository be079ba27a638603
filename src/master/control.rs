//! The control socket behind `notesd status`, `notesd reload` and `notesd drain`.
//!
//! Protocol, one request per connection: the client writes one line naming
//! the command (`status`, `reload`, `drain` or `undrain`); the master answers
//! with one JSON document and closes. `status` is answered at once with a
//! [`Status`]; `drain`/`undrain` at once with a [`ReloadAnswer`] once the
//! scoreboard's drain flag is set or cleared (`/readyz` answers 503
//! "draining" on every worker while it is set);
//! `reload` is answered with a [`ReloadAnswer`] once the reload it started has
//! completed, been refused or been abandoned — that wait is what makes
//! `notesd reload` (the unit's `ExecReload=`) return only when the new
//! generation serves.
//!
//! The master is single-threaded, so nothing here blocks: the listener and
//! every connection are non-blocking and sit in the master's `poll()`. An
//! answer is written as far as the socket takes it and the rest when the
//! client has read more (POLLOUT), so a slow reader gets all of it, never a
//! truncated document; a client has [`IO_DEADLINE`] to send its request and
//! to take the whole answer, and is dropped (with a log line) if it does not. At most [`MAX_CLIENTS`] are
//! served at once; more are turned away at accept.
//!
//! Who may ask: the socket file is 0660 (owner and the service's group), and
//! on top of that the peer's uid (SO_PEERCRED) must be root or the service's
//! own user; anyone else gets a refusal, whatever the file's mode.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use nix::poll::PollFlags;
use serde::{Deserialize, Serialize};

use crate::ipc;
use crate::listener::{ListenError, Listener};
use crate::master::state::{RecycleReason, ReloadOutcome, State, Ticket};
use crate::scoreboard::{Flags, Scoreboard};

/// How long a client may take to send its request line, and to read the answer.
pub const IO_DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at accept.
pub const MAX_CLIENTS: usize = 32;
/// The longest request line accepted.
const MAX_REQUEST: usize = 64;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub protocol: u32,
    pub version: String,
    pub master_pid: u32,
    pub phase: String,
    pub generation: u32,
    pub target_workers: u32,
    pub uptime_s: f64,
    pub restarts: u64,
    pub boot_failures: u64,
    pub config: String,
    /// `notesd drain` is in effect: `/readyz` answers 503 "draining".
    /// Absent from an older master's answer.
    #[serde(default)]
    pub draining: bool,
    /// `server.max_worker_memory` in bytes, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_worker_memory: Option<u64>,
    /// Workers stopped on purpose, by reason (`max_requests`, `memory`,
    /// `reload`, `scale_down`). Absent from an older master's answer.
    #[serde(default)]
    pub recycles: BTreeMap<String, u64>,
    /// The master's own CPU, memory and fds (absent from an older master's answer).
    #[serde(default)]
    pub master: Option<Resources>,
    /// Each listener's accept queue and backlog, as last sampled (≤ one tick old).
    #[serde(default)]
    pub listeners: Vec<ListenerStatus>,
    pub workers: Vec<WorkerStatus>,
}

/// A listening socket's queue: connections not yet accepted by any worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub bind: String,
    pub queued: u32,
    pub backlog: u32,
}

/// One process's resources, read from `/proc` when the status was asked for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// User + system CPU time.
    pub cpu_s: f64,
    pub rss_bytes: u64,
    /// Proportional set size: shared pages split among the processes that
    /// map them (what `max_worker_memory` is held against). None where the
    /// kernel has no `smaps_rollup` or it may not be read.
    pub pss_bytes: Option<u64>,
    pub open_fds: Option<u64>,
}

impl Resources {
    /// `pid`'s figures, or None when it is gone or `/proc` is hidden.
    fn of(pid: i32) -> Option<Resources> {
        let u = crate::procfs::usage(pid).ok()?;
        Some(Resources {
            cpu_s: (u.cpu_seconds * 100.0).round() / 100.0,
            rss_bytes: u.rss_bytes,
            pss_bytes: u.pss_bytes,
            open_fds: u.open_fds,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub pid: i32,
    pub slot: u32,
    pub generation: u32,
    pub state: String,
    pub age_s: f64,
    pub requests: u64,
    pub active_connections: u32,
    /// Connections this worker has accepted since it started (wraps at 2³²);
    /// under load the workers' counts should be close (idle workers take
    /// connections in turn: src/worker/acceptor.rs). Absent from an older
    /// master's answer.
    #[serde(default)]
    pub accepted: u32,
    pub last_heartbeat_s: f64,
    pub current_request: Option<RequestStatus>,
    /// CPU, memory and fds (absent from an older master's answer).
    #[serde(default)]
    pub resources: Option<Resources>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestStatus {
    pub method: String,
    pub path: String,
    pub request_id: String,
    pub elapsed_ms: u64,
    /// Where it is, as the worker publishes it ("waiting 2.1 s on query
    /// insert_note (PostgreSQL 127.0.0.1:5432)"); absent when not published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

/// A control client a re-exec hands over in the middle of its request or
/// answer (see [`Control::handover_clients`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientRecord {
    /// Its connection, inherited across the exec.
    pub fd: RawFd,
    /// Its peer uid, as read at accept.
    pub uid: Option<u32>,
    /// What it sent so far of its request line (while reading it).
    pub request: Vec<u8>,
    /// What it is still owed of its answer (while writing it; else empty).
    pub answer: Vec<u8>,
}

/// The answer to `reload` (and to any refused or unknown request).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadAnswer {
    pub ok: bool,
    /// The generation now serving (when `ok`).
    pub generation: Option<u32>,
    pub message: String,
}

impl ReloadAnswer {
    fn failed(message: String) -> ReloadAnswer {
        ReloadAnswer {
            ok: false,
            generation: None,
            message,
        }
    }

    fn from_outcome(outcome: &ReloadOutcome) -> ReloadAnswer {
        match outcome {
            ReloadOutcome::Complete {
                generation,
                workers,
            } => ReloadAnswer {
                ok: true,
                generation: Some(*generation),
                message: format!(
                    "reload complete: generation {generation} serving with {workers} worker(s)"
                ),
            },
            ReloadOutcome::Refused(why) => ReloadAnswer::failed(format!("reload refused: {why}")),
            ReloadOutcome::Abandoned(why) => {
                ReloadAnswer::failed(format!("reload abandoned: {why}"))
            }
        }
    }
}

/// The commands a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Status,
    Reload,
    /// `notesd drain`: `/readyz` answers 503 from now on.
    Drain,
    /// `notesd drain --undo`.
    Undrain,
}

impl Command {
    pub fn line(self) -> &'static [u8] {
        match self {
            Command::Status => b"status\n",
            Command::Reload => b"reload\n",
            Command::Drain => b"drain\n",
            Command::Undrain => b"undrain\n",
        }
    }

    fn parse(line: &[u8]) -> Option<Command> {
        match line.trim_ascii() {
            b"status" => Some(Command::Status),
            b"reload" => Some(Command::Reload),
            b"drain" => Some(Command::Drain),
            b"undrain" => Some(Command::Undrain),
            _ => None,
        }
    }
}

/// Where one client connection is.
enum Phase {
    /// Reading the request line.
    Reading(Vec<u8>),
    /// Waiting for the reload it asked for to end: the request's ticket,
    /// once the master has started it (see [`Control::tag_waiters`]).
    AwaitingReload(Option<Ticket>),
    /// Writing the answer (`at` bytes sent so far).
    Writing {
        answer: Vec<u8>,
        at: usize,
    },
    Done,
}

struct Client {
    stream: UnixStream,
    /// The peer's uid (SO_PEERCRED), read once at accept.
    uid: Option<u32>,
    phase: Phase,
    /// When the current read or write must be over (monotonic); none while
    /// a reload is awaited (that lasts as long as the reload does).
    deadline: Option<Duration>,
}

/// The listening control socket and the clients being served.
pub struct Control {
    listener: UnixListener,
    clients: Vec<Client>,
    /// Uids obeyed besides root: the master's own and the workers' (server.user).
    allowed: Vec<u32>,
    /// Each process's figures, read at most once per [`RESOURCES_TTL`]:
    /// `smaps_rollup` costs 0.15–0.6 ms a process, on the master's loop.
    resources: ResourceCache,
}

/// How long `notesd status` reuses a process's `/proc` figures: many
/// watchers, or `--watch 0.1`, cost the master one read per process a second.
const RESOURCES_TTL: Duration = Duration::from_secs(1);

/// Per-pid [`Resources`] and when they were read.
#[derive(Default)]
pub struct ResourceCache(BTreeMap<i32, (Duration, Option<Resources>)>);

impl ResourceCache {
    fn get(&mut self, pid: i32, now: Duration) -> Option<Resources> {
        let entry = self
            .0
            .get(&pid)
            .filter(|(at, _)| now.saturating_sub(*at) < RESOURCES_TTL);
        if let Some((_, r)) = entry {
            return r.clone();
        }
        let fresh = Resources::of(pid);
        self.0.insert(pid, (now, fresh.clone()));
        fresh
    }

    /// Forget the processes that are gone.
    fn keep(&mut self, live: &[i32]) {
        self.0.retain(|pid, _| live.contains(pid));
    }
}

/// What the master must do for the clients after [`Control::service`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Requests {
    /// At least one client asked for a reload, which is now awaited.
    pub reload: bool,
}

impl Control {
    pub fn new(listener: UnixListener, allowed: Vec<u32>) -> Control {
        Control {
            listener,
            clients: Vec::new(),
            allowed,
            resources: ResourceCache::default(),
        }
    }

    /// The fds to poll and what to wait for on each. A client awaiting its
    /// reload waits for nothing but a hang-up (always reported): bytes it
    /// might send are not read, and must not keep waking the master.
    pub fn poll_fds(&self) -> impl Iterator<Item = (BorrowedFd<'_>, PollFlags)> {
        let listener = (self.listener.as_fd(), PollFlags::POLLIN);
        std::iter::once(listener).chain(self.clients.iter().map(|c| {
            let events = match c.phase {
                Phase::Reading(_) => PollFlags::POLLIN,
                Phase::Writing { .. } => PollFlags::POLLOUT,
                Phase::AwaitingReload(_) | Phase::Done => PollFlags::empty(),
            };
            (c.stream.as_fd(), events)
        }))
    }

    /// Accept, read requests, answer `status`, write pending answers, drop
    /// clients past their deadline or gone. Returns what needs the master.
    pub fn service(&mut self, state: &State, board: &Scoreboard, now: Duration) -> Requests {
        self.accept(now);
        let mut requests = Requests::default();
        for i in 0..self.clients.len() {
            match self.clients[i].read_request() {
                Some(Ok(command)) => self.dispatch(i, command, state, board, now, &mut requests),
                Some(Err(unknown)) => {
                    tracing::warn!("control socket: unknown request {:?}", unknown);
                    self.clients[i].answer(
                        &ReloadAnswer::failed(format!(
                            "unknown request {unknown:?} (expected \"status\", \"reload\", \"drain\" or \"undrain\")"
                        )),
                        now,
                    );
                }
                None => {}
            }
            self.clients[i].flush();
            self.clients[i].expire(now);
        }
        self.clients.retain(|c| !matches!(c.phase, Phase::Done));
        requests
    }

    /// The clients a re-exec hands over: those waiting for a reload (their
    /// fds; they wait for the reload the new image runs) and every other
    /// client still being served, with what it sent or is owed, so that a
    /// client that connected just before the exec is answered by the new
    /// image instead of finding its connection closed.
    pub fn handover_clients(&self) -> (Vec<RawFd>, Vec<ClientRecord>) {
        let mut waiters = Vec::new();
        let mut others = Vec::new();
        for c in &self.clients {
            let fd = c.stream.as_raw_fd();
            match &c.phase {
                Phase::AwaitingReload(_) => waiters.push(fd),
                Phase::Reading(request) => others.push(ClientRecord {
                    fd,
                    uid: c.uid,
                    request: request.clone(),
                    answer: Vec::new(),
                }),
                Phase::Writing { answer, at } => others.push(ClientRecord {
                    fd,
                    uid: c.uid,
                    request: Vec::new(),
                    answer: answer[*at..].to_vec(),
                }),
                Phase::Done => {}
            }
        }
        (waiters, others)
    }

    /// A client handed over by the previous image, waiting for the reload.
    pub fn await_reload(&mut self, stream: UnixStream) {
        self.clients.push(Client {
            stream,
            // It was checked when it asked.
            uid: Some(0),
            phase: Phase::AwaitingReload(None),
            deadline: None,
        });
    }

    /// A client handed over by the previous image in the middle of its
    /// request or its answer: it carries on here, with a fresh deadline.
    pub fn adopt_client(&mut self, stream: UnixStream, record: &ClientRecord, now: Duration) {
        let phase = if record.answer.is_empty() {
            Phase::Reading(record.request.clone())
        } else {
            Phase::Writing {
                answer: record.answer.clone(),
                at: 0,
            }
        };
        self.clients.push(Client {
            stream,
            uid: record.uid,
            phase,
            deadline: Some(now + IO_DEADLINE),
        });
    }

    /// The reload `ticket` has started: the clients that asked for one and
    /// wait untagged wait for this one.
    pub fn tag_waiters(&mut self, ticket: Ticket) {
        for c in &mut self.clients {
            if let Phase::AwaitingReload(t @ None) = &mut c.phase {
                *t = Some(ticket);
            }
        }
    }

    /// Reload requests ended: answer the clients waiting for one of `tickets`.
    pub fn reload_done(&mut self, tickets: &[Ticket], outcome: &ReloadOutcome, now: Duration) {
        let answer = ReloadAnswer::from_outcome(outcome);
        for c in &mut self.clients {
            if matches!(c.phase, Phase::AwaitingReload(Some(t)) if tickets.contains(&t)) {
                c.answer(&answer, now);
                c.flush();
            }
        }
    }

    fn accept(&mut self, now: Duration) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) if self.clients.len() >= MAX_CLIENTS => {
                    tracing::warn!(
                        "control socket: {MAX_CLIENTS} clients already being served; turning one away"
                    );
                    drop(stream);
                }
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!("control socket: cannot make a client non-blocking: {e}");
                        continue;
                    }
                    let uid = nix::sys::socket::getsockopt(
                        &stream,
                        nix::sys::socket::sockopt::PeerCredentials,
                    )
                    .ok()
                    .map(|c| c.uid());
                    self.clients.push(Client {
                        stream,
                        uid,
                        phase: Phase::Reading(Vec::new()),
                        deadline: Some(now + IO_DEADLINE),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("control socket: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn dispatch(
        &mut self,
        i: usize,
        command: Command,
        state: &State,
        board: &Scoreboard,
        now: Duration,
        requests: &mut Requests,
    ) {
        let client = &mut self.clients[i];
        if !client
            .uid
            .is_some_and(|u| u == 0 || self.allowed.contains(&u))
        {
            let who = client
                .uid
                .map_or("an unknown uid".to_string(), |u| format!("uid {u}"));
            tracing::warn!("control socket: refused {command:?} from {who}");
            client.answer(
                &ReloadAnswer::failed(format!(
                    "refused: {who} is neither root nor the service's user (uid {})",
                    self.allowed
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", uid ")
                )),
                now,
            );
            return;
        }
        match command {
            Command::Status => {
                let answer = status(state, board, now, &mut self.resources);
                client.answer(&answer, now)
            }
            Command::Drain | Command::Undrain => {
                let on = command == Command::Drain;
                board.set_flag(Flags::DRAIN, on);
                let message = if on {
                    "draining: /readyz answers 503 \"draining\" on every worker; everything else keeps serving (`notesd drain --undo` reverts)"
                } else {
                    "drain undone: /readyz answers as usual"
                };
                tracing::info!("{message} (over the control socket)");
                client.answer(
                    &ReloadAnswer {
                        ok: true,
                        generation: None,
                        message: message.to_string(),
                    },
                    now,
                );
            }
            Command::Reload => {
                tracing::info!("reload requested over the control socket");
                client.phase = Phase::AwaitingReload(None);
                client.deadline = None;
                requests.reload = true;
            }
        }
    }
}

impl Client {
    /// Read what is there. Once a whole line (or a half-close) has arrived:
    /// the command, or the unknown request as text.
    fn read_request(&mut self) -> Option<Result<Command, String>> {
        let Phase::Reading(buf) = &mut self.phase else {
            return None;
        };
        let mut chunk = [0u8; MAX_REQUEST];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.contains(&b'\n') || buf.len() > MAX_REQUEST {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "control client went away");
                    self.phase = Phase::Done;
                    return None;
                }
            }
        }
        let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = &line[..line.len().min(MAX_REQUEST)];
        Some(Command::parse(line).ok_or_else(|| String::from_utf8_lossy(line).into_owned()))
    }

    fn answer<T: Serialize>(&mut self, value: &T, now: Duration) {
        match serde_json::to_vec(value) {
            Ok(answer) => {
                self.phase = Phase::Writing { answer, at: 0 };
                self.deadline = Some(now + IO_DEADLINE);
            }
            Err(e) => {
                tracing::warn!("control socket: cannot encode the answer: {e}");
                self.phase = Phase::Done;
            }
        }
    }

    /// Write as much of the answer as the socket takes; done once all of it went.
    fn flush(&mut self) {
        let Phase::Writing { answer, at } = &mut self.phase else {
            return;
        };
        while *at < answer.len() {
            match self.stream.write(&answer[*at..]) {
                Ok(0) => break,
                Ok(n) => *at += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "control client did not take its answer");
                    break;
                }
            }
        }
        self.phase = Phase::Done;
    }

    /// Drop a client that is too slow, or one that hung up while waiting for a reload.
    fn expire(&mut self, now: Duration) {
        if matches!(self.phase, Phase::Done) {
            return;
        }
        if self.deadline.is_some_and(|d| now >= d) {
            tracing::warn!(
                "control socket: a client took longer than {} s to send its request or read its answer; dropped",
                IO_DEADLINE.as_secs()
            );
            self.phase = Phase::Done;
            return;
        }
        if matches!(self.phase, Phase::AwaitingReload(_)) && peer_hung_up(self.stream.as_fd()) {
            tracing::info!("control socket: a client stopped waiting for its reload");
            self.phase = Phase::Done;
        }
    }
}

/// Has the peer closed its end (a peek reads EOF)?
fn peer_hung_up(fd: BorrowedFd<'_>) -> bool {
    use nix::sys::socket::{MsgFlags, recv};
    let mut byte = [0u8; 1];
    matches!(
        recv(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &mut byte,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
        ),
        Ok(0) | Err(nix::Error::ECONNRESET)
    )
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// A snapshot of the master's view joined with the workers' own counters.
pub fn status(
    state: &State,
    board: &Scoreboard,
    now: Duration,
    cache: &mut ResourceCache,
) -> Status {
    let master = std::process::id() as i32;
    let live: Vec<i32> = state.workers().map(|w| w.pid).chain([master]).collect();
    cache.keep(&live);
    let now_ns = now.as_nanos() as u64;
    let database = |generation: u32| {
        state
            .config_of(generation)
            .unwrap_or(state.config())
            .database_peer()
    };
    let workers = state
        .workers()
        .map(|w| {
            let slot = board.read(w.slot).ok().filter(|s| s.pid == w.pid as u32);
            let (requests, conns, accepted, beat, current) = match slot {
                Some(s) => (
                    s.requests,
                    s.active_connections,
                    s.accepted,
                    Duration::from_nanos(now_ns.saturating_sub(s.heartbeat_ns)),
                    s.current.map(|c| RequestStatus {
                        elapsed_ms: now_ns.saturating_sub(c.started_ns) / 1_000_000,
                        method: c.method,
                        path: c.path,
                        request_id: c.request_id,
                        phase: s
                            .request_phase
                            .map(|p| p.describe(now_ns, &database(w.generation))),
                    }),
                ),
                None => (0, 0, 0, Duration::ZERO, None),
            };
            WorkerStatus {
                pid: w.pid,
                slot: w.slot,
                generation: w.generation,
                state: w.state.name().to_string(),
                age_s: secs(now.saturating_sub(w.spawned_at)),
                requests,
                active_connections: conns,
                accepted,
                last_heartbeat_s: secs(beat),
                current_request: current,
                resources: cache.get(w.pid, now),
            }
        })
        .collect();
    Status {
        protocol: ipc::PROTOCOL_VERSION,
        version: crate::VERSION.to_string(),
        master_pid: std::process::id(),
        phase: state.phase_name().to_string(),
        generation: state.generation(),
        target_workers: state.target(),
        uptime_s: secs(now.saturating_sub(state.started_at())),
        restarts: state.restarts,
        boot_failures: state.boot_failures,
        config: state.config().source.to_string(),
        draining: board.flags().has(Flags::DRAIN),
        max_worker_memory: state.config().max_worker_memory(),
        recycles: RecycleReason::ALL
            .iter()
            .map(|r| (r.label().to_string(), state.recycles.get(*r)))
            .collect(),
        master: cache.get(master, now),
        listeners: board
            .listeners()
            .into_iter()
            .map(|(bind, queued, backlog)| ListenerStatus {
                bind,
                queued,
                backlog,
            })
            .collect(),
        workers,
    }
}

/// Bind the control socket (same stale/live rules as the public socket).
/// Returns the non-blocking listener and the `Listener` that owns the path.
pub fn bind(
    path: &std::path::Path,
    gid: Option<u32>,
) -> Result<(UnixListener, Listener), ListenError> {
    let l = crate::listener::bind_unix(
        path,
        crate::listener::UnixOptions {
            mode: 0o660,
            gid,
            backlog: 64,
        },
    )?;
    let io = |source| ListenError::Io {
        what: "control socket",
        addr: path.display().to_string(),
        source,
    };
    let fd: OwnedFd = l.fd.try_clone().map_err(io)?;
    let listener = UnixListener::from(fd);
    listener.set_nonblocking(true).map_err(io)?;
    Ok((listener, l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_with_or_without_newline_and_nothing_else() {
        assert_eq!(Command::parse(b"status"), Some(Command::Status));
        assert_eq!(Command::parse(b" reload \r"), Some(Command::Reload));
        assert_eq!(Command::parse(b""), None);
        assert_eq!(Command::parse(b"reload now"), None);
        for c in [
            Command::Status,
            Command::Reload,
            Command::Drain,
            Command::Undrain,
        ] {
            assert_eq!(Command::parse(c.line()), Some(c));
        }
    }

    #[test]
    fn reload_answers_say_what_happened() {
        let ok = ReloadAnswer::from_outcome(&ReloadOutcome::Complete {
            generation: 4,
            workers: 3,
        });
        assert!(ok.ok && ok.generation == Some(4), "{ok:?}");
        let refused = ReloadAnswer::from_outcome(&ReloadOutcome::Refused("bad toml".into()));
        assert!(!refused.ok && refused.message.contains("refused: bad toml"));
        let abandoned = ReloadAnswer::from_outcome(&ReloadOutcome::Abandoned("db down".into()));
        assert!(!abandoned.ok && abandoned.message.contains("abandoned: db down"));
    }
}
