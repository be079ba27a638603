//! The master: bind, spawn the first generation, then
//! `loop { wait → Event → State::handle → Actions → execute }`.
//!
//! Single-threaded, no async runtime, no database. Everything that touches
//! the OS lives in this file (and `spawn`, `events`, `control`); every decision
//! lives in [`state`].

pub(crate) mod backlog;
pub mod control;
pub(crate) mod events;
pub mod handover;
pub(crate) mod oom;
pub(crate) mod sockets;
pub(crate) mod spawn;
pub(crate) mod state;

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid as NixPid;

use crate::clock;
use crate::config::{self, Config, Overrides, Source};
use crate::ipc::{self, ToMaster};
use crate::listener::ListenerRecord;
use crate::listener::{self, ListenError, Listener, UnixOptions};
use crate::procfs;
use crate::scoreboard::{Flags, Scoreboard};
use crate::systemd;
use control::Control;
use events::{MasterSignal, Signals};
use handover::{ExeId, HandoverError, Record};
use sockets::Sockets;
use spawn::{Creds, Spawner};
use state::{
    Action, Event, ExitHow, Level, MEMORY_SAMPLE_EVERY, MemorySample, Notify, ReloadOutcome, State,
    Ticket, WorkerSig,
};

/// How often the master looks at heartbeats and deadlines: often enough to
/// catch a silent worker well within a second of its `timeout`, rarely enough
/// that an idle master costs nothing.
pub fn tick(config: &Config) -> Duration {
    (config.timeout() / 20).clamp(Duration::from_millis(50), Duration::from_millis(250))
}

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot create {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write pidfile {path}: {source}")]
    Pidfile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("scoreboard: {0}")]
    Scoreboard(#[from] crate::scoreboard::ScoreboardError),
    #[error("signals: {0}")]
    Signals(#[from] events::SignalError),
    #[error("spawner: {0}")]
    Spawn(#[from] spawn::SpawnError),
    #[error("cannot find the notesd binary to exec for workers: {0}")]
    Exe(std::io::Error),
    #[error("user/group {0:?} not found")]
    Creds(String),
    #[error("`notesd migrate` (migrate_on_start) failed: {0}")]
    Migrate(String),
    #[error("poll: {0}")]
    Poll(nix::Error),
    #[error("taking over from the previous image: {0}")]
    Handover(String),
}

impl MasterError {
    /// Exit code at the edge: conflicts with another server are usage errors (2).
    pub fn exit_code(&self) -> i32 {
        match self {
            MasterError::Listen(e) if e.is_conflict() => crate::exit::USAGE,
            MasterError::Creds(_) => crate::exit::USAGE,
            _ => crate::exit::FAILURE,
        }
    }
}

/// What the master leaves on disk: the socket files it created and its
/// pidfile. Dropping it removes them, if they are still ours: on a clean exit
/// and on a start that fails half-way alike. (An exec in place drops nothing.)
struct Owned {
    sockets: Sockets,
    control_socket: Listener,
    pidfile: Option<PathBuf>,
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.sockets.all().into_iter().for_each(Listener::cleanup);
        self.control_socket.cleanup();
        if let Some(p) = &self.pidfile
            && std::fs::read_to_string(p).is_ok_and(|s| s.trim() == std::process::id().to_string())
        {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Everything the master owns at the OS level.
struct Edge {
    owned: Owned,
    /// The listeners came from systemd (LISTEN_FDS), not from `server.bind`.
    activated: bool,
    /// `notesd status` / `notesd reload` clients, polled with everything else.
    control: Control,
    board: Scoreboard,
    spawner: Spawner,
    channels: BTreeMap<i32, OwnedFd>,
    overrides: Overrides,
    /// The binary workers are exec'd from (and the master re-execs), resolved
    /// once; and what the file there was when this image started, so that a
    /// reload notices an upgrade.
    exe: PathBuf,
    exe_id: Option<ExeId>,
    exit: Option<i32>,
    /// The last reload request's ticket (see [`Ticket`]).
    next_ticket: Ticket,
    /// The unix sockets a reload to this generation keeps, and the mode
    /// and group to give them once it completes.
    socket_options: Option<(u32, Vec<PathBuf>, UnixOptions)>,
    /// Under systemd (NOTIFY_SOCKET set): STATUS= lines are worth building.
    notify: bool,
    last_status: String,
    /// When the workers' memory was last sampled (`max_worker_memory`).
    last_memory_sample: Duration,
    /// The netlink socket the listen queues of unix sockets are read on.
    diag: backlog::Diag,
    /// A listen queue could not be read: said once, not every tick.
    backlog_warned: bool,
    /// After a failed read of a unix socket's queue, the next try (a unit
    /// without AF_NETLINK would otherwise cost a failed socket() per tick).
    diag_retry_at: Duration,
    /// The cgroup's OOM-kill count, to tell the OOM killer's SIGKILLs.
    oom: oom::OomWatch,
}

/// Run the master until it exits; returns the process exit code.
pub fn run(config: Config, overrides: Overrides) -> Result<i32, MasterError> {
    if config.source == Source::Embedded {
        let dir = PathBuf::from("./var");
        std::fs::create_dir_all(&dir).map_err(|source| MasterError::Dir { path: dir, source })?;
    }
    let exe = spawn::resolve_exe().map_err(MasterError::Exe)?;
    let creds = resolve_creds(&config)?;
    let (listeners, activated) = open_listeners(&config)?;
    let (control, control_socket) =
        match control::bind(&config.server.control_socket, creds.map(|c| c.gid)) {
            Ok(c) => c,
            Err(e) => {
                listeners.iter().for_each(Listener::cleanup);
                return Err(e.into());
            }
        };
    log_start(&config, &listeners, activated, &exe);
    let owned = Owned {
        sockets: Sockets::new(listeners),
        control_socket,
        pidfile: config.server.pidfile.clone(),
    };
    if config.database.migrate_on_start {
        migrate_child(&exe, &config, creds)?;
    }
    if let Some(p) = &owned.pidfile {
        write_pidfile(p)?;
    }
    let signals = Signals::register()?;
    let board = Scoreboard::create(2 * config::MAX_WORKERS + 16)?;
    let mut edge = Edge::new(owned, activated, control, board, exe, creds, overrides)?;
    let mut state = State::new(Arc::new(config), edge.board.slots(), clock::now());
    edge.execute(&mut state, Event::Started);
    edge.main_loop(state, &signals)
}

/// Carry on as the master a re-exec in place handed over to (see
/// [`handover`]): same listeners, control socket, scoreboard and workers;
/// then reload onto this binary.
pub fn resume(record: Record, fds: Vec<(RawFd, OwnedFd)>) -> Result<i32, MasterError> {
    let a = adopt(record, fds)?;
    let signals = Signals::register()?;
    handover::unblock_signals();
    let owned = Owned {
        sockets: Sockets::new(a.listeners),
        control_socket: a.control_socket,
        pidfile: a.pidfile,
    };
    let mut edge = Edge::new(
        owned,
        a.activated,
        a.control,
        a.board,
        a.exe,
        a.creds,
        a.overrides,
    )?;
    edge.channels = a.channels;
    a.waiters
        .into_iter()
        .for_each(|w| edge.control.await_reload(w));
    for (stream, record) in a.clients {
        edge.control.adopt_client(stream, &record, clock::now());
    }
    let mut state = a.state;
    tracing::info!(
        "re-exec'd in place: notesd {} took over from notesd {} as pid {} (generation {}, {} worker(s)); reloading onto {}",
        crate::VERSION,
        a.from,
        std::process::id(),
        state.generation(),
        state.workers().count(),
        edge.exe.display(),
    );
    edge.reap(&mut state);
    edge.start_reload(&mut state);
    edge.main_loop(state, &signals)
}

/// `notesd handover-check`: take over the record at `NOTESD_HANDOVER_FD`
/// and every fd it names (the probe inherits them) exactly as [`resume`]
/// would, then let go of them. What this binary could not carry through is
/// refused here, before the running master execs anything.
pub fn check_handover() -> Result<String, MasterError> {
    let (record, fds) = handover::take()
        .ok_or_else(|| {
            MasterError::Handover(format!("{} names no handover record", handover::ENV_FD))
        })?
        .map_err(|e| MasterError::Handover(e.to_string()))?;
    let (from, version) = (record.from.clone(), record.version);
    let adopted = adopt(record, fds)?;
    let workers = adopted.state.workers().count();
    drop(adopted);
    Ok(format!(
        "notesd {} can take over from notesd {from} (handover record {version}, {workers} worker(s))",
        crate::VERSION
    ))
}

/// What a handover gives the new image, taken over and checked: everything
/// [`resume`] needs before it acts on anything. Dropping it closes this
/// process's copies of the fds and unlinks nothing, so the probe
/// (`check_handover`) can build it and let it go.
struct Adopted {
    from: String,
    listeners: Vec<Listener>,
    control_socket: Listener,
    control: std::os::unix::net::UnixListener,
    board: Scoreboard,
    channels: BTreeMap<i32, OwnedFd>,
    waiters: Vec<std::os::unix::net::UnixStream>,
    clients: Vec<(std::os::unix::net::UnixStream, control::ClientRecord)>,
    creds: Option<Creds>,
    exe: PathBuf,
    activated: bool,
    overrides: Overrides,
    pidfile: Option<PathBuf>,
    state: State,
}

/// Take every fd `record` names and parse everything about it: each bind,
/// the scoreboard's layout, the credentials, the state machine's snapshot.
fn adopt(record: Record, fds: Vec<(RawFd, OwnedFd)>) -> Result<Adopted, MasterError> {
    let mut fds: BTreeMap<RawFd, OwnedFd> = fds.into_iter().collect();
    let mut take = |fd: RawFd| {
        fds.remove(&fd)
            .ok_or_else(|| MasterError::Handover(format!("fd {fd} was not handed over")))
    };
    let listener = |r: &ListenerRecord, fd| {
        Listener::from_record(r, fd)
            .map_err(|e| MasterError::Handover(format!("listener {:?}: {e}", r.bind)))
    };
    let listeners = record
        .listeners
        .iter()
        .map(|r| listener(r, take(r.fd)?))
        .collect::<Result<Vec<_>, _>>()?;
    let control_socket = listener(&record.control, take(record.control.fd)?)?;
    let control = control_socket
        .fd
        .try_clone()
        .map(std::os::unix::net::UnixListener::from)
        .map_err(|e| MasterError::Handover(format!("control socket: {e}")))?;
    let board = Scoreboard::open(take(record.scoreboard_fd)?)?;
    let mut channels = BTreeMap::new();
    for (pid, fd) in &record.channels {
        channels.insert(*pid, take(*fd)?);
    }
    let waiters = record
        .reload_waiters
        .iter()
        .map(|fd| take(*fd).map(std::os::unix::net::UnixStream::from))
        .collect::<Result<Vec<_>, _>>()?;
    let clients = record
        .control_clients
        .iter()
        .map(|c| Ok((std::os::unix::net::UnixStream::from(take(c.fd)?), c.clone())))
        .collect::<Result<Vec<_>, MasterError>>()?;
    let current = record
        .state
        .configs
        .get(&record.state.current)
        .ok_or_else(|| MasterError::Handover("no config for the current generation".into()))?;
    let creds = resolve_creds(current)?;
    let exe = spawn::resolve_exe().map_err(MasterError::Exe)?;
    let state =
        State::resume(record.state, board.slots(), clock::now()).map_err(MasterError::Handover)?;
    Ok(Adopted {
        from: record.from,
        listeners,
        control_socket,
        control,
        board,
        channels,
        waiters,
        clients,
        creds,
        exe,
        activated: record.activated,
        overrides: record.overrides,
        pidfile: record.pidfile,
        state,
    })
}

/// The listeners: systemd's (socket activation), else `server.bind`'s.
fn open_listeners(config: &Config) -> Result<(Vec<Listener>, bool), MasterError> {
    let listeners = listener::from_systemd()?;
    if !listeners.is_empty() {
        return Ok((listeners, true));
    }
    // socket_group matters only for sockets we bind (systemd's come with SocketGroup=).
    let socket_gid = match &config.server.socket_group {
        Some(g) => Some(group_gid(g)?),
        None => None,
    };
    let listeners = listener::bind_all(
        &config.binds(),
        UnixOptions {
            mode: config.socket_mode(),
            gid: socket_gid,
            backlog: config.server.backlog,
        },
    )?;
    Ok((listeners, false))
}

/// All in the message: that is what `journalctl` shows.
fn log_start(config: &Config, listeners: &[Listener], activated: bool, exe: &std::path::Path) {
    tracing::info!(
        "master starting: notesd {}, listening on {} ({}), {} worker(s), config {}, workers exec {}",
        crate::VERSION,
        listeners
            .iter()
            .map(|l| l.bind.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        if activated {
            "sockets from systemd: socket activation"
        } else {
            "bound by notesd"
        },
        config.worker_count(),
        config.source,
        exe.display(),
    );
}

impl Edge {
    fn new(
        owned: Owned,
        activated: bool,
        control: std::os::unix::net::UnixListener,
        board: Scoreboard,
        exe: PathBuf,
        creds: Option<Creds>,
        overrides: Overrides,
    ) -> Result<Edge, MasterError> {
        // Obeyed on the control socket besides root: our own user and the workers'.
        let allowed = std::iter::once(nix::unistd::geteuid().as_raw())
            .chain(creds.map(|c| c.uid))
            .collect();
        board.set_flag(Flags::ACTIVATED, activated);
        Ok(Edge {
            owned,
            activated,
            control: Control::new(control, allowed),
            board,
            spawner: Spawner::new(&exe, creds)?,
            channels: BTreeMap::new(),
            overrides,
            exe_id: ExeId::of(&exe),
            exe,
            exit: None,
            next_ticket: 0,
            socket_options: None,
            notify: std::env::var_os("NOTIFY_SOCKET").is_some(),
            last_status: String::new(),
            last_memory_sample: Duration::ZERO,
            diag: backlog::Diag::default(),
            backlog_warned: false,
            diag_retry_at: Duration::ZERO,
            oom: oom::OomWatch::new(),
        })
    }

    /// `loop { wait → handle → kill the stuck, top up }` until an exit is decided.
    fn main_loop(&mut self, mut state: State, signals: &Signals) -> Result<i32, MasterError> {
        let watchdog = systemd::watchdog_interval();
        let mut last_tick = Duration::ZERO;
        let mut last_watchdog = Duration::ZERO;
        loop {
            if let Some(code) = self.exit {
                return Ok(code);
            }
            // Sleep until the next tick or watchdog ping is due, whatever woke us last.
            let tick = tick(state.config());
            let mut due = last_tick + tick;
            if let Some(every) = watchdog {
                due = due.min(last_watchdog + every);
            }
            self.wait(signals, due.saturating_sub(clock::now()))?;
            // Reloads and upgrades come last, once every other signal of the
            // batch was handled: an upgrade execs, and what is still to do
            // then would be lost.
            let (mut reload, mut upgrade) = (false, false);
            for sig in signals.take() {
                match sig {
                    MasterSignal::Child => self.reap(&mut state),
                    MasterSignal::Hup => reload = true,
                    MasterSignal::Upgrade => upgrade = true,
                    MasterSignal::Act(s) => self.execute(&mut state, Event::Signal(s)),
                }
            }
            self.read_channels(&mut state);
            let now = clock::now();
            reload |= self.control.service(&state, &self.board, now).reload;
            if upgrade {
                let ticket = self.new_ticket();
                self.upgrade(&mut state, signals, ticket, "USR2");
            }
            if reload {
                self.reload(&mut state, signals);
            }
            if let Some(every) = watchdog
                && now.saturating_sub(last_watchdog) >= every
            {
                last_watchdog = now;
                systemd::watchdog();
            }
            if now.saturating_sub(last_tick) >= tick {
                last_tick = now;
                self.tick(&mut state);
            }
        }
    }

    /// The periodic step: heartbeats to the state machine, STATUS= to
    /// systemd, listeners no generation uses any more closed.
    fn tick(&mut self, state: &mut State) {
        for bind in self.owned.sockets.retire_unused(&state.live_generations()) {
            tracing::info!("closed the listener on {bind}: no worker uses it any more");
        }
        let heartbeats = state
            .workers()
            .filter_map(|w| {
                let s = self.board.read(w.slot).ok()?;
                (s.pid == w.pid as u32).then(|| (w.pid, Duration::from_nanos(s.heartbeat_ns)))
            })
            .collect();
        self.execute(state, Event::Tick { heartbeats });
        self.sample_memory(state);
        self.sample_listen_queues();
        self.report_stuck_slow(state);
        self.report_status(state);
    }

    /// Every tick: each listener's queue and backlog, for `/metrics`.
    fn sample_listen_queues(&mut self) {
        let now = clock::now();
        let mut depths = Vec::new();
        for l in self.owned.sockets.all() {
            let depth = match l.is_unix() {
                true if now < self.diag_retry_at => continue,
                true => self.diag.unix(l.fd.as_fd()),
                false => backlog::tcp(l.fd.as_fd()),
            };
            match depth {
                Ok(d) => depths.push((l.bind.to_string(), d.queued, d.backlog)),
                Err(e) => {
                    if l.is_unix() {
                        self.diag_retry_at = now + DIAG_RETRY;
                    }
                    if !std::mem::replace(&mut self.backlog_warned, true) {
                        tracing::warn!(
                            "cannot read the listen queue of {}: {e} (notesd_listen_queue lacks it; retried every {} s, said once)",
                            l.bind,
                            DIAG_RETRY.as_secs()
                        );
                    }
                }
            }
        }
        self.board.set_listeners(&depths);
    }

    /// Every second while a generation has `max_worker_memory`: the memory
    /// of each ready worker held to it (PSS, read only past the limit: see
    /// [`procfs::memory_against`]).
    fn sample_memory(&mut self, state: &mut State) {
        let now = clock::now();
        if now.saturating_sub(self.last_memory_sample) < MEMORY_SAMPLE_EVERY {
            return;
        }
        let limit_of = |w: &state::Worker| {
            let limit = state.config_of(w.generation)?.max_worker_memory()?;
            (w.state == state::WorkerState::Ready).then_some(limit)
        };
        let samples: Vec<MemorySample> = state
            .workers()
            .filter_map(|w| {
                let (bytes, kind) = procfs::memory_against(w.pid, limit_of(w)?).ok()?;
                Some(MemorySample {
                    pid: w.pid,
                    bytes,
                    pss: kind == procfs::MemoryKind::Pss,
                })
            })
            .collect();
        if samples.is_empty() {
            return;
        }
        self.last_memory_sample = now;
        self.execute(state, Event::Memory { samples });
    }

    /// The slow-request record of a worker whose thread is stuck (its loop
    /// cannot write one itself: see `worker::server`): its oldest request
    /// passed `slow_request_ms` and its heartbeat is late. Once per request.
    fn report_stuck_slow(&self, state: &State) {
        let now_ns = clock::now_ns();
        // A worker being killed already had its record (the kill's).
        let live = state
            .workers()
            .filter(|w| !matches!(w.state, state::WorkerState::Killing { .. }));
        for w in live {
            let config = state.config_of(w.generation).unwrap_or(state.config());
            let Some(threshold) = config.slow_request() else {
                continue;
            };
            let Some(snap) = self
                .board
                .read(w.slot)
                .ok()
                .filter(|s| s.pid == w.pid as u32)
            else {
                continue;
            };
            let Some(req) = &snap.current else { continue };
            let late = Duration::from_nanos(now_ns.saturating_sub(snap.heartbeat_ns));
            let beat = crate::worker::lifecycle::heartbeat_interval(config.timeout());
            if Duration::from_nanos(now_ns.saturating_sub(req.started_ns)) < threshold
                || late < 2 * beat + STUCK_SLACK
                || !self.board.claim_report(w.slot, req.token)
            {
                continue;
            }
            StuckRecord {
                pid: w.pid,
                what: format!("slow request, worker {} stuck", w.pid),
                snap: &snap,
                stuck: &procfs::stuck(w.pid),
                config,
                silent: late,
            }
            .log(false);
        }
    }

    /// A new reload request's ticket.
    fn new_ticket(&mut self) -> Ticket {
        self.next_ticket += 1;
        self.next_ticket
    }

    /// A reload's ticket: the control clients that asked for a reload and
    /// wait untagged wait for this one (a USR2's own ticket is nobody's).
    fn reload_ticket(&mut self) -> Ticket {
        let ticket = self.new_ticket();
        self.control.tag_waiters(ticket);
        ticket
    }

    /// HUP or `notesd reload`. When the binary at the resolved path is not
    /// the one this image started from (an upgrade replaced it), re-exec in
    /// place first: the new image then reloads onto itself.
    fn reload(&mut self, state: &mut State, signals: &Signals) {
        if ExeId::of(&self.exe) != self.exe_id {
            let ticket = self.reload_ticket();
            // Validate the config first, as any reload does: a bad one is refused here.
            if let Err(e) = config::load(&self.overrides) {
                let e = e.to_string().replace('\n', " ");
                self.execute(
                    state,
                    Event::Reload {
                        ticket,
                        config: Err(e),
                    },
                );
                return;
            }
            let why = format!("{} changed since this master started", self.exe.display());
            self.upgrade(state, signals, ticket, &why);
            return;
        }
        self.start_reload(state);
    }

    /// Re-read the config (with the same flags), put its listeners in place
    /// for the new generation, and let the state machine start it, or refuse.
    fn start_reload(&mut self, state: &mut State) {
        let ticket = self.reload_ticket();
        let reloaded = config::load(&self.overrides)
            .map_err(|e| e.to_string().replace('\n', " "))
            .and_then(|config| {
                self.reconcile_sockets(state.next_generation(), &config)?;
                Ok(Arc::new(config))
            });
        self.execute(
            state,
            Event::Reload {
                ticket,
                config: reloaded,
            },
        );
    }

    /// A changed `server.bind`, `socket_mode` or `socket_group` takes effect
    /// for generation `next` (see [`sockets`]); systemd's sockets are left alone.
    fn reconcile_sockets(&mut self, next: u32, config: &Config) -> Result<(), String> {
        if self.activated {
            let now: Vec<_> = self
                .owned
                .sockets
                .for_generation(next)
                .iter()
                .map(|l| l.bind.clone())
                .collect();
            if config.binds() != now {
                tracing::warn!(
                    "server.bind changed, but the listening sockets come from systemd (socket activation): change ListenStream= in notesd.socket instead; the sockets stay as they are"
                );
            }
            return Ok(());
        }
        let gid = match &config.server.socket_group {
            Some(g) => Some(group_gid(g).map_err(|e| e.to_string())?),
            None => None,
        };
        let unix = UnixOptions {
            mode: config.socket_mode(),
            gid,
            backlog: config.server.backlog,
        };
        let reconciled = self
            .owned
            .sockets
            .reconcile(next, config, unix)
            .map_err(|e| format!("cannot listen as the new config asks: {e}"))?;
        if let Some(changes) = reconciled.changes {
            tracing::info!(
                "server.bind changed: generation {next} listens on {}",
                changes.join(", ")
            );
        }
        self.socket_options = Some((next, reconciled.kept_unix, unix));
        Ok(())
    }

    /// A reload completed: the kept unix sockets take its `socket_mode` and
    /// `socket_group` now (not before: a refused or abandoned reload leaves
    /// them as they were).
    fn apply_socket_options(&mut self, generation: u32) {
        let Some((g, paths, unix)) = self.socket_options.take() else {
            return;
        };
        if g != generation {
            return;
        }
        for path in paths {
            if let Err(e) = listener::apply_unix_options(&path, unix) {
                tracing::warn!("cannot apply socket_mode/socket_group: {e}");
            }
        }
    }

    /// Re-exec in place from `self.exe` (see [`handover`]). Returns only when
    /// the upgrade was refused; the reload request `ticket` waiting for it is
    /// then refused too. Signals that arrived meanwhile are handled next.
    fn upgrade(&mut self, state: &mut State, signals: &Signals, ticket: Ticket, why: &str) {
        let error = self.exec_in_place(state, signals, why);
        let message = format!(
            "cannot upgrade in place ({why}): {error}; notesd {} keeps serving",
            crate::VERSION
        );
        tracing::error!("{message}");
        self.control
            .reload_done(&[ticket], &ReloadOutcome::Refused(message), clock::now());
    }

    fn exec_in_place(&mut self, state: &State, signals: &Signals, why: &str) -> HandoverError {
        if !self.owned.sockets.is_settled() {
            return HandoverError::NotNow(
                "workers from before a change of server.bind are still draining; try again once they are gone".into(),
            );
        }
        let snapshot = match state.snapshot() {
            Ok(snapshot) => snapshot,
            Err(e) => return HandoverError::NotNow(e),
        };
        // No signal may be lost from here to the exec (or the refusal, when
        // `_blocked` drops and delivers them): see `handover::Blocked`.
        let _blocked = match handover::Blocked::master_signals() {
            Ok(b) => b,
            Err(e) => return e,
        };
        let carried = signals.carry_over();
        if !carried.is_empty() {
            tracing::debug!("carried over to the new image: {carried:?}");
        }
        let record = self.handover_record(snapshot);
        let fd = match handover::write(&record) {
            Ok(fd) => fd,
            Err(e) => return e,
        };
        if let Err(e) = handover::probe(&self.exe, &fd, &record.fds()) {
            return e;
        }
        tracing::info!(
            "upgrade ({why}): {} takes the handover; re-exec'ing in place as pid {}",
            self.exe.display(),
            std::process::id()
        );
        handover::exec(&self.exe, &fd, &record.fds())
    }

    fn handover_record(&self, state: state::Snapshot) -> Record {
        let (reload_waiters, control_clients) = self.control.handover_clients();
        Record {
            version: handover::VERSION,
            from: crate::VERSION.to_string(),
            overrides: self.overrides.clone(),
            listeners: self
                .owned
                .sockets
                .for_generation(state.current)
                .iter()
                .map(|l| l.record())
                .collect(),
            activated: self.activated,
            control: self.owned.control_socket.record(),
            scoreboard_fd: self.board.fd().as_raw_fd(),
            channels: self
                .channels
                .iter()
                .map(|(pid, fd)| (*pid, fd.as_raw_fd()))
                .collect(),
            reload_waiters,
            control_clients,
            pidfile: self.owned.pidfile.clone(),
            state,
        }
    }

    /// Sleep until a signal, a worker message, a control client, or the next tick.
    fn wait(&self, signals: &Signals, tick: Duration) -> Result<(), MasterError> {
        let mut fds = vec![PollFd::new(signals.wake_fd(), PollFlags::POLLIN)];
        fds.extend(
            self.control
                .poll_fds()
                .map(|(fd, events)| PollFd::new(fd, events)),
        );
        fds.extend(
            self.channels
                .values()
                .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN)),
        );
        // Round up: waking a fraction of a millisecond early costs a second wake-up.
        let ms = tick
            .as_micros()
            .div_ceil(1000)
            .clamp(1, u128::from(u16::MAX)) as u16;
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::Error::EINTR) => Ok(()),
            Err(e) => Err(MasterError::Poll(e)),
        }
    }

    fn reap(&mut self, state: &mut State) {
        loop {
            let how = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitHow::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ExitHow::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            };
            let (pid, how) = (how.0.as_raw(), how.1);
            // Drain what the worker said before dying (e.g. its boot error).
            self.read_channel(state, pid);
            self.channels.remove(&pid);
            // Release the slot before the state machine hears of the exit: it
            // may spawn the replacement into this very slot, which must then
            // keep the replacement's pid and heartbeat.
            if let Some(slot) = state.worker(pid).map(|w| w.slot)
                && let Err(e) = self.board.release(slot)
            {
                tracing::warn!("cannot release scoreboard slot {slot} of worker {pid}: {e}");
            }
            let how = match how {
                ExitHow::Signal(9) if self.oom.rose() => ExitHow::OomKilled,
                how => how,
            };
            self.execute(state, Event::Exited { pid, how });
            self.board.set_restarts(state.restarts);
        }
    }

    fn read_channels(&mut self, state: &mut State) {
        let pids: Vec<i32> = self.channels.keys().copied().collect();
        for pid in pids {
            self.read_channel(state, pid);
        }
    }

    fn read_channel(&mut self, state: &mut State, pid: i32) {
        let mut buf = vec![0u8; ipc::MAX_PACKET];
        loop {
            let Some(fd) = self.channels.get(&pid) else {
                return;
            };
            match nix::sys::socket::recv(
                fd.as_raw_fd(),
                &mut buf,
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => {
                    // EOF: the worker is gone (or going); CHLD will tell how.
                    self.channels.remove(&pid);
                    return;
                }
                Ok(n) => match ipc::decode::<ToMaster>(&buf[..n]) {
                    Ok(msg) => self.execute(state, Event::Message { pid, msg }),
                    Err(e) => tracing::warn!("undecodable message from worker {pid}: {e}"),
                },
                Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => return,
                Err(e) => {
                    tracing::warn!("the channel to worker {pid} failed: {e}");
                    self.channels.remove(&pid);
                    return;
                }
            }
        }
    }

    /// Feed one event to the state machine and carry out what it decides.
    fn execute(&mut self, state: &mut State, event: Event) {
        let now = clock::now();
        let mut queue: VecDeque<Action> = state.handle(event, now).into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Spawn {
                    generation,
                    slot,
                    config,
                } => {
                    let result = self.spawn(generation, slot, &config);
                    queue.extend(state.spawned(slot, result, generation, clock::now()));
                }
                Action::Signal { pid, sig } => {
                    let signal = match sig {
                        WorkerSig::Term => Signal::SIGTERM,
                        WorkerSig::Quit => Signal::SIGQUIT,
                        WorkerSig::Usr1 => Signal::SIGUSR1,
                        WorkerSig::Kill => Signal::SIGKILL,
                    };
                    if let Err(e) = kill(NixPid::from_raw(pid), signal)
                        && e != nix::Error::ESRCH
                    {
                        tracing::warn!("cannot signal worker {pid}: {e}");
                    }
                }
                Action::TimeoutKill {
                    pid,
                    slot,
                    silent_for,
                } => self.timeout_kill(state, pid, slot, silent_for, now),
                Action::Notify(Notify::Ready) => systemd::ready(&status_line(state)),
                Action::Notify(Notify::Reloading) => systemd::reloading(),
                Action::Notify(Notify::Stopping) => systemd::stopping(),
                Action::ReloadDone { tickets, outcome } => {
                    self.board.count_reload(match outcome {
                        ReloadOutcome::Complete { .. } => 0,
                        ReloadOutcome::Refused(_) => 1,
                        ReloadOutcome::Abandoned(_) => 2,
                    });
                    if let ReloadOutcome::Complete { generation, .. } = outcome {
                        self.apply_socket_options(generation);
                    }
                    self.control.reload_done(&tickets, &outcome, clock::now())
                }
                Action::ShuttingDown => self.board.set_flag(Flags::STOPPING, true),
                Action::CloseListeners => self.close_listeners(),
                Action::ReopenLogs => crate::log::reopen(),
                Action::Log(level, msg) => match level {
                    Level::Info => tracing::info!("{msg}"),
                    Level::Warn => tracing::warn!("{msg}"),
                    Level::Error => tracing::error!("{msg}"),
                },
                Action::Exit(code) => self.exit = Some(code),
            }
        }
        self.board.set_recycles(state.recycles.0);
        self.board.set_generation(state.generation());
        let crashes = state
            .restarts
            .saturating_sub(state.timeout_kills + state.oom_kills);
        self.board
            .set_restart_reasons([crashes, state.timeout_kills, state.oom_kills]);
        self.board
            .set_master_log_dropped(crate::log::dropped_lines());
    }

    fn spawn(&mut self, generation: u32, slot: u32, config: &Config) -> Result<i32, String> {
        let now_ns = clock::now_ns();
        self.board
            .reset(slot, 0, now_ns)
            .map_err(|e| e.to_string())?;
        let (pid, channel) = self
            .spawner
            .spawn(
                generation,
                slot,
                config,
                self.owned.sockets.for_generation(generation),
                &self.board,
            )
            .map_err(|e| e.to_string())?;
        self.board
            .set_pid(slot, pid as u32)
            .map_err(|e| e.to_string())?;
        self.channels.insert(pid, channel);
        tracing::debug!(pid, slot, generation, "spawned worker");
        Ok(pid)
    }

    /// A graceful stop begins (see [`Action::CloseListeners`]). systemd's
    /// sockets keep their paths and queues: what is queued there waits for
    /// the next start.
    fn close_listeners(&mut self) {
        let closed = self.owned.sockets.close_all();
        if self.activated {
            tracing::info!(
                "stopping: the listeners are systemd's; what is queued on them waits for the next start"
            );
        } else {
            tracing::info!(
                "stopping: unix socket paths unlinked (no new connection reaches them) and the master's copies of {} closed; the workers serve what is queued, then close theirs",
                closed.join(", ")
            );
        }
    }

    /// A worker that stopped beating: say what it was serving and what the
    /// kernel says it is stuck in, then SIGABRT it (SIGKILL follows).
    fn timeout_kill(&self, state: &State, pid: i32, slot: u32, silent: Duration, now: Duration) {
        let age = state
            .worker(pid)
            .map(|w| now.saturating_sub(w.spawned_at).as_secs_f64())
            .unwrap_or(0.0);
        let config = state
            .worker(pid)
            .and_then(|w| state.config_of(w.generation))
            .unwrap_or(state.config());
        let stuck = procfs::stuck(pid);
        match self.board.read(slot) {
            Ok(snap) if snap.pid == pid as u32 => StuckRecord {
                pid,
                what: format!("worker {pid} timed out (age {age:.1} s)"),
                snap: &snap,
                stuck: &stuck,
                config,
                silent,
            }
            .log(true),
            _ => tracing::error!(
                worker_pid = pid,
                wchan = stuck.wchan.as_deref().unwrap_or(""),
                syscall = stuck.syscall.as_deref().unwrap_or(""),
                peer = stuck.peer.as_deref().unwrap_or(""),
                "worker {pid} timed out: no heartbeat for {:.1} s (age {age:.1} s), kernel: {}; SIGABRT, then SIGKILL",
                silent.as_secs_f64(),
                stuck.summary()
            ),
        }
        if let Err(e) = kill(NixPid::from_raw(pid), Signal::SIGABRT)
            && e != nix::Error::ESRCH
        {
            tracing::warn!("cannot SIGABRT worker {pid}: {e}");
        }
    }

    fn report_status(&mut self, state: &State) {
        if !self.notify {
            return;
        }
        let line = status_line(state);
        if line != self.last_status {
            systemd::status(&line);
            self.last_status = line;
        }
    }
}

/// How long a failed `sock_diag` read waits before the next try.
const DIAG_RETRY: Duration = Duration::from_secs(60);

/// Slack on top of two heartbeat intervals before a late heartbeat means
/// the worker's thread is stuck (not merely busy for a moment).
const STUCK_SLACK: Duration = Duration::from_millis(500);

/// The record of a stuck worker: the request its slot shows, where that
/// request was (its published phase), and what the kernel says the thread
/// is in. journald gets each as a field.
struct StuckRecord<'a> {
    pid: i32,
    /// The record's head: "worker 1234 timed out (age 3.0 s)".
    what: String,
    snap: &'a crate::scoreboard::SlotSnapshot,
    stuck: &'a procfs::Stuck,
    /// The worker's generation's config (its database, for the phase).
    config: &'a Config,
    /// How long its heartbeat has been silent.
    silent: Duration,
}

impl StuckRecord<'_> {
    /// What the worker was serving, and where that request was.
    fn doing(&self) -> String {
        let Some(r) = &self.snap.current else {
            return "while idle (no request in flight)".to_string();
        };
        let now_ns = clock::now_ns();
        let running = now_ns.saturating_sub(r.started_ns) / 1_000_000;
        let head = format!(
            "while serving {} {} (request id {}, running {running} ms",
            r.method, r.path, r.request_id
        );
        match self.snap.request_phase {
            Some(p) => format!(
                "{head}; last published: {})",
                p.describe(now_ns, &self.config.database_peer())
            ),
            None => format!("{head})"),
        }
    }

    /// Log it: WARN while the worker is only slow, ERROR with its kill.
    fn log(&self, killing: bool) {
        let (pid, stuck) = (self.pid, self.stuck);
        let current = self.snap.current.as_ref();
        let phase = self.snap.request_phase.filter(|_| current.is_some());
        let path = current.map_or("", |r| r.path.as_str());
        let elapsed_ms = current.map_or(0, |r| {
            clock::now_ns().saturating_sub(r.started_ns) / 1_000_000
        });
        let message = format!(
            "{}: no heartbeat for {:.1} s, {}; kernel: {}{}",
            self.what,
            self.silent.as_secs_f64(),
            self.doing(),
            stuck.summary(),
            if killing {
                "; SIGABRT, then SIGKILL"
            } else {
                ""
            }
        );
        // One macro call per level: tracing's level is part of the callsite.
        macro_rules! record {
            ($level:ident) => {
                tracing::$level!(
                    worker_pid = pid,
                    request_id = current.map_or("", |r| r.request_id.as_str()),
                    method = current.map_or("", |r| r.method.as_str()),
                    route = crate::http::metric_route(path).label(),
                    elapsed_ms,
                    phase = phase.map_or("", |p| p.name()),
                    query = phase.and_then(|p| p.query).map_or("", |q| q.name()),
                    state = stuck.state.as_str(),
                    wchan = stuck.wchan.as_deref().unwrap_or(""),
                    syscall = stuck.syscall.as_deref().unwrap_or(""),
                    peer = stuck.peer.as_deref().unwrap_or(""),
                    stack = stuck.stack.as_deref().unwrap_or(""),
                    "{message}"
                )
            };
        }
        if killing {
            record!(error);
        } else {
            record!(warn);
        }
    }
}

fn status_line(state: &State) -> String {
    let ready = state
        .workers()
        .filter(|w| w.state.name() == "ready")
        .count();
    format!(
        "{} | generation {} | {ready}/{} workers ready | {} restarts",
        state.phase_name(),
        state.generation(),
        state.target(),
        state.restarts
    )
}

fn write_pidfile(path: &std::path::Path) -> Result<(), MasterError> {
    let tmp = path.with_extension("pid.tmp");
    let err = |source| MasterError::Pidfile {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(&tmp, format!("{}\n", std::process::id())).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

fn group_gid(name: &str) -> Result<u32, MasterError> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => Err(MasterError::Creds(name.to_string())),
    }
}

/// `server.user`/`server.group`, applied to workers (and migrate) when running as root.
fn resolve_creds(config: &Config) -> Result<Option<Creds>, MasterError> {
    let Some(user) = &config.server.user else {
        return Ok(None);
    };
    if !nix::unistd::geteuid().is_root() {
        tracing::warn!(
            "server.user ({user}) is set but notesd is not running as root; ignoring it"
        );
        return Ok(None);
    }
    let u = match nix::unistd::User::from_name(user) {
        Ok(Some(u)) => u,
        _ => return Err(MasterError::Creds(user.clone())),
    };
    let gid = match &config.server.group {
        Some(g) => group_gid(g)?,
        None => u.gid.as_raw(),
    };
    Ok(Some(Creds {
        uid: u.uid.as_raw(),
        gid,
    }))
}

/// `migrate_on_start`: run `notesd migrate` as a child (the master never opens
/// a database connection itself).
fn migrate_child(
    exe: &std::path::Path,
    config: &Config,
    creds: Option<Creds>,
) -> Result<(), MasterError> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(exe);
    cmd.arg("migrate");
    if let Source::File(p) = &config.source {
        cmd.arg("-c").arg(p);
    }
    cmd.env("NOTESD_DATABASE_URL", &config.database.url)
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null());
    if let Some(c) = creds {
        cmd.uid(c.uid).gid(c.gid);
    }
    tracing::info!("migrate_on_start: running `notesd migrate`");
    let mut child = cmd
        .spawn()
        .map_err(|e| MasterError::Migrate(e.to_string()))?;
    // A long migration must not look like a hung master to systemd's watchdog.
    let watchdog = systemd::watchdog_interval();
    let mut last_ping = clock::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(MasterError::Migrate(e.to_string())),
        }
        if let Some(every) = watchdog
            && clock::now().saturating_sub(last_ping) >= every
        {
            last_ping = clock::now();
            systemd::watchdog();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if status.success() {
        Ok(())
    } else {
        Err(MasterError::Migrate(format!("it exited with {status}")))
    }
}
