//! The master: bind, spawn the first generation, then
//! `loop { wait → Event → State::handle → Actions → execute }`.
//!
//! Single-threaded, no async runtime, no database. Everything that touches
//! the OS lives in this file (and `spawn`, `events`, `control`); every decision
//! lives in [`state`].

pub mod control;
pub mod events;
pub mod spawn;
pub mod state;

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
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
use crate::listener::{self, ListenError, Listener, UnixOptions};
use crate::scoreboard::Scoreboard;
use crate::systemd;
use control::Control;
use events::{MasterSignal, Signals};
use spawn::{Creds, Spawner};
use state::{Action, Event, ExitHow, Level, Notify, State, WorkerSig};

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
}

impl MasterError {
    /// Exit code at the edge: conflicts with another server are usage errors (2).
    pub fn exit_code(&self) -> i32 {
        match self {
            MasterError::Listen(e) if e.is_conflict() => 2,
            MasterError::Creds(_) => 2,
            _ => 1,
        }
    }
}

/// Everything the master owns at the OS level.
struct Edge {
    listeners: Vec<Listener>,
    /// `notesd status` / `notesd reload` clients, polled with everything else.
    control: Control,
    board: Scoreboard,
    spawner: Spawner,
    channels: BTreeMap<i32, OwnedFd>,
    overrides: Overrides,
    exit: Option<i32>,
    /// Under systemd (NOTIFY_SOCKET set): STATUS= lines are worth building.
    notify: bool,
    last_status: String,
}

/// Run the master until it exits; returns the process exit code.
pub fn run(config: Config, overrides: Overrides) -> Result<i32, MasterError> {
    if config.source == Source::Embedded {
        let dir = PathBuf::from("./var");
        std::fs::create_dir_all(&dir).map_err(|source| MasterError::Dir { path: dir, source })?;
    }
    let exe = spawn::resolve_exe().map_err(MasterError::Exe)?;
    let creds = resolve_creds(&config)?;
    let mut listeners = listener::from_systemd()?;
    let activated = !listeners.is_empty();
    if !activated {
        // socket_group matters only for sockets we bind (systemd's come with SocketGroup=).
        let socket_gid = match &config.server.socket_group {
            Some(g) => Some(group_gid(g)?),
            None => None,
        };
        listeners = listener::bind_all(
            &config.binds(),
            UnixOptions {
                mode: config.socket_mode(),
                gid: socket_gid,
                backlog: config.server.backlog,
            },
        )?;
    }
    let control_gid = creds.map(|c| c.gid);
    let control_socket = match control::bind(&config.server.control_socket, control_gid) {
        Ok(c) => c,
        Err(e) => {
            listeners.iter().for_each(Listener::cleanup);
            return Err(e.into());
        }
    };
    let (control, control_socket) = control_socket;
    let pidfile = config.server.pidfile.clone();
    let result = (|| {
        if config.database.migrate_on_start {
            migrate_child(&exe, &config, creds)?;
        }
        if let Some(p) = &pidfile {
            write_pidfile(p)?;
        }
        // All in the message: that is what `journalctl` shows.
        tracing::info!(
            "master starting: notesd {}, listening on {} ({}), {} worker(s), config {}, workers exec {}",
            env!("CARGO_PKG_VERSION"),
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
        let signals = Signals::register()?;
        let slots = 2 * config::MAX_WORKERS + 16;
        // Obeyed on the control socket besides root: our own user and the workers'.
        let allowed = std::iter::once(nix::unistd::geteuid().as_raw())
            .chain(creds.map(|c| c.uid))
            .collect();
        let mut edge = Edge {
            board: Scoreboard::create(slots)?,
            spawner: Spawner::new(&exe, creds)?,
            listeners: std::mem::take(&mut listeners),
            control: Control::new(control, allowed),
            channels: BTreeMap::new(),
            overrides,
            exit: None,
            notify: std::env::var_os("NOTIFY_SOCKET").is_some(),
            last_status: String::new(),
        };
        let code = edge.main_loop(config, &signals, slots);
        listeners = std::mem::take(&mut edge.listeners);
        code
    })();
    // Whether the start failed or the master ran and exited: leave nothing
    // behind that is ours (a failed start must not leave a control socket or
    // a pidfile that names a dead process).
    listeners.iter().for_each(Listener::cleanup);
    control_socket.cleanup();
    if let Some(p) = &pidfile
        && std::fs::read_to_string(p).is_ok_and(|s| s.trim() == std::process::id().to_string())
    {
        let _ = std::fs::remove_file(p);
    }
    result
}

impl Edge {
    fn main_loop(
        &mut self,
        config: Config,
        signals: &Signals,
        slots: u32,
    ) -> Result<i32, MasterError> {
        let mut state = State::new(Arc::new(config), slots, clock::now());
        self.execute(&mut state, Event::Started);
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
            for sig in signals.take() {
                match sig {
                    MasterSignal::Child => self.reap(&mut state),
                    MasterSignal::Hup => self.reload(&mut state),
                    MasterSignal::Act(s) => self.execute(&mut state, Event::Signal(s)),
                }
            }
            self.read_channels(&mut state);
            let now = clock::now();
            if self.control.service(&state, &self.board, now).reload {
                self.reload(&mut state);
            }
            if let Some(every) = watchdog
                && now.saturating_sub(last_watchdog) >= every
            {
                last_watchdog = now;
                systemd::watchdog();
            }
            if now.saturating_sub(last_tick) >= tick {
                last_tick = now;
                let heartbeats = state
                    .workers()
                    .filter_map(|w| {
                        let s = self.board.read(w.slot).ok()?;
                        (s.pid == w.pid as u32)
                            .then(|| (w.pid, Duration::from_nanos(s.heartbeat_ns)))
                    })
                    .collect();
                self.execute(&mut state, Event::Tick { heartbeats });
                self.report_status(&state);
            }
        }
    }

    /// HUP or `notesd reload`: re-read the config (with the same flags) and
    /// let the state machine start a new generation, or refuse.
    fn reload(&mut self, state: &mut State) {
        let reloaded = config::load(&self.overrides)
            .map(Arc::new)
            .map_err(|e| e.to_string().replace('\n', " "));
        self.execute(state, Event::Reload(reloaded));
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
                Action::ReloadDone(outcome) => self.control.reload_done(&outcome, clock::now()),
                Action::ReopenLogs => crate::log::reopen(),
                Action::Log(level, msg) => match level {
                    Level::Info => tracing::info!("{msg}"),
                    Level::Warn => tracing::warn!("{msg}"),
                    Level::Error => tracing::error!("{msg}"),
                },
                Action::Exit(code) => self.exit = Some(code),
            }
        }
    }

    fn spawn(&mut self, generation: u32, slot: u32, config: &Config) -> Result<i32, String> {
        let now_ns = clock::now_ns();
        self.board
            .reset(slot, 0, now_ns)
            .map_err(|e| e.to_string())?;
        let (pid, channel) = self
            .spawner
            .spawn(generation, slot, config, &self.listeners, &self.board)
            .map_err(|e| e.to_string())?;
        self.board
            .set_pid(slot, pid as u32)
            .map_err(|e| e.to_string())?;
        self.channels.insert(pid, channel);
        tracing::debug!(pid, slot, generation, "spawned worker");
        Ok(pid)
    }

    fn timeout_kill(&self, state: &State, pid: i32, slot: u32, silent: Duration, now: Duration) {
        let age = state
            .worker(pid)
            .map(|w| now.saturating_sub(w.spawned_at).as_secs_f64())
            .unwrap_or(0.0);
        let doing = match self.board.read(slot).ok().and_then(|s| s.current) {
            Some(r) => format!(
                "while serving {} {} (request id {}, running {} ms)",
                r.method,
                r.path,
                r.request_id,
                (now.as_nanos() as u64).saturating_sub(r.started_ns) / 1_000_000
            ),
            None => "while idle (no request in flight)".to_string(),
        };
        tracing::error!(
            "worker {pid} timed out: no heartbeat for {:.1} s (age {age:.1} s) {doing}; SIGABRT, then SIGKILL",
            silent.as_secs_f64()
        );
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
