//! The master's decisions, as a pure state machine: `handle(Event, now) -> Vec<Action>`.
//!
//! No syscalls here: time comes in as `now` (monotonic), heartbeats come in on
//! `Event::Tick`, and every effect (fork, kill, notify, exit) goes out as an
//! [`Action`] for the edge (`master::mod`) to carry out. That is what lets the
//! unit tests below drive reloads, timeouts and boot failures in microseconds.
//!
//! The one rule behind reloads, recycling and TTOU: a worker that must go
//! (older generation, asked to retire, surplus) is stopped only while the
//! workers that are *ready* still cover the target. Capacity never dips.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Config, MAX_WORKERS};
use crate::ipc::ToMaster;

/// How long a SIGABRTed worker gets before SIGKILL.
pub(crate) const ABORT_GRACE: Duration = Duration::from_millis(500);
/// How long a quick shutdown (INT/QUIT) waits before SIGKILL.
pub(crate) const QUICK_GRACE: Duration = Duration::from_secs(1);
/// Boot failures in a row, before any worker was ever ready, that end the master (exit 3).
pub(crate) const FIRST_BOOT_ATTEMPTS: u32 = 3;
/// Boot failures of a reload's new generation before it is abandoned.
pub(crate) const RELOAD_BOOT_ATTEMPTS: u32 = 3;
/// Memory samples over `server.max_worker_memory` in a row that recycle a worker.
pub(crate) const MEMORY_SAMPLES: u32 = 3;
/// How often the edge samples the workers' memory (one sample per second).
pub(crate) const MEMORY_SAMPLE_EVERY: Duration = Duration::from_secs(1);
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub(crate) type Pid = i32;

/// Names one reload request, so that its answer reaches only those who
/// asked for it (`notesd reload` clients wait for their own reload).
pub(crate) type Ticket = u64;

/// Signals the master acts on (HUP arrives as [`Event::Reload`] once the edge
/// has re-read the config; CHLD as [`Event::Exited`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    Term,
    Int,
    Quit,
    Ttin,
    Ttou,
    Usr1,
}

/// Signals the master sends to workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerSig {
    /// Drain and exit.
    Term,
    /// Exit now.
    Quit,
    /// Reopen log files.
    Usr1,
    Kill,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitHow {
    Code(i32),
    Signal(i32),
    /// SIGKILL, and the service's cgroup counted an OOM kill meanwhile
    /// (`memory.events` `oom_kill`): the kernel's OOM killer.
    OomKilled,
}

#[derive(Debug, Clone)]
pub enum Event {
    /// The master is bound and ready to spawn the first generation.
    Started,
    Signal(Sig),
    /// SIGHUP or `notesd reload`: the re-read config, or why it could not be
    /// used. `ticket` (the edge's, increasing) names this request in the
    /// [`Action::ReloadDone`] that answers it.
    Reload {
        ticket: Ticket,
        config: Result<Arc<Config>, String>,
    },
    Spawned {
        pid: Pid,
        slot: u32,
        generation: u32,
    },
    SpawnFailed {
        generation: u32,
        error: String,
    },
    Message {
        pid: Pid,
        msg: ToMaster,
    },
    Exited {
        pid: Pid,
        how: ExitHow,
    },
    /// Periodic: the heartbeat (monotonic) of every worker, from the scoreboard.
    Tick {
        heartbeats: Vec<(Pid, Duration)>,
    },
    /// Every [`MEMORY_SAMPLE_EVERY`] while a generation has
    /// `server.max_worker_memory`: what each worker uses.
    Memory {
        samples: Vec<MemorySample>,
    },
}

/// One worker's memory, as the edge read it from `/proc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySample {
    pub pid: Pid,
    pub bytes: u64,
    /// PSS (`smaps_rollup`: shared pages split between their users), or RSS
    /// where the kernel does not offer it.
    pub pss: bool,
}

/// Why a worker the master asked to go went: `notesd_worker_recycles_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecycleReason {
    /// It served `max_requests` (+ jitter).
    MaxRequests,
    /// It stayed over `max_worker_memory`.
    Memory,
    /// A reload replaced its generation.
    Reload,
    /// TTOU lowered the target.
    ScaleDown,
}

impl RecycleReason {
    pub const ALL: [RecycleReason; 4] = [
        RecycleReason::MaxRequests,
        RecycleReason::Memory,
        RecycleReason::Reload,
        RecycleReason::ScaleDown,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            RecycleReason::MaxRequests => "max_requests",
            RecycleReason::Memory => "memory",
            RecycleReason::Reload => "reload",
            RecycleReason::ScaleDown => "scale_down",
        }
    }
}

/// Workers stopped on purpose, by [`RecycleReason`] (in `ALL`'s order).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recycles(pub [u64; 4]);

impl Recycles {
    pub fn get(&self, reason: RecycleReason) -> u64 {
        self.0[reason as usize]
    }

    fn count(&mut self, reason: RecycleReason) {
        self.0[reason as usize] += 1;
    }
}

/// A worker's run of memory samples over the limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryWatch {
    /// Samples over the limit in a row.
    pub over: u32,
    /// It was once under the limit: a worker that then passes twice the
    /// limit is growing (a leak), not merely bigger than a limit set too low.
    pub was_under: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notify {
    Ready,
    /// A reload has begun (RELOADING=1); a `Ready` always follows it.
    Reloading,
    Stopping,
}

/// How a reload ended: what `notesd reload` waits for and reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The new generation is ready and the old one has been told to stop.
    Complete { generation: u32, workers: u32 },
    /// Nothing was started: the new config is invalid, or the master is stopping.
    Refused(String),
    /// The new generation was started but will not serve; the old one keeps serving.
    Abandoned(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

#[derive(Debug, Clone)]
pub enum Action {
    Spawn {
        generation: u32,
        slot: u32,
        config: Arc<Config>,
    },
    Signal {
        pid: Pid,
        sig: WorkerSig,
    },
    /// Heartbeat timeout: log what the worker was doing, then SIGABRT it.
    TimeoutKill {
        pid: Pid,
        slot: u32,
        silent_for: Duration,
    },
    Notify(Notify),
    /// Reload requests ended: answer whoever waits for one of `tickets`
    /// (`notesd reload`). A request superseded by a newer one ends with it.
    ReloadDone {
        tickets: Vec<Ticket>,
        outcome: ReloadOutcome,
    },
    /// The service is stopping: tell the workers (`/readyz` answers 503
    /// "shutting down"; a worker told to stop empties its listeners' queues
    /// first).
    ShuttingDown,
    /// A graceful stop begins: stop new connections from reaching the
    /// listeners the master bound (unlink the unix paths) and close the
    /// master's copies, so that each socket closes with the last worker that
    /// emptied it (docs/design.md §4.12). Sent before the workers' TERM.
    CloseListeners,
    ReopenLogs,
    Log(Level, String),
    Exit(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerState {
    Booting,
    Ready,
    /// Asked to retire (max_requests); keeps serving until its replacement is ready.
    Retiring,
    /// SIGTERM sent at `since`: draining.
    Stopping {
        since: Duration,
    },
    /// SIGABRT (then SIGKILL) sent at `since`.
    Killing {
        since: Duration,
        kill_sent: bool,
    },
}

impl WorkerState {
    pub fn name(&self) -> &'static str {
        match self {
            WorkerState::Booting => "booting",
            WorkerState::Ready => "ready",
            WorkerState::Retiring => "retiring",
            WorkerState::Stopping { .. } => "stopping",
            WorkerState::Killing { .. } => "killing",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Worker {
    pub pid: Pid,
    pub slot: u32,
    pub generation: u32,
    pub state: WorkerState,
    pub spawned_at: Duration,
    pub ready_at: Option<Duration>,
    pub boot_error: Option<String>,
    /// The worker said retrying cannot help.
    pub boot_fatal: bool,
    /// Why it was asked to retire or stop, once it was (absent in a handover
    /// from an image before memory recycling: serde's default).
    #[serde(default)]
    pub recycle: Option<RecycleReason>,
    #[serde(default)]
    pub memory: MemoryWatch,
}

/// The master's lifecycle: `Starting` → `Running` (reloads within it) →
/// [`ShutdownDelay`](Phase::ShutdownDelay) (TERM with `server.shutdown_delay`)
/// → `Stopping` → exit. `notesd status` shows [`State::phase_name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The first generation is booting.
    Starting,
    Running,
    /// TERM arrived and `server.shutdown_delay` runs until `until`: `/readyz`
    /// answers 503 while everything keeps serving (and dead workers are
    /// still replaced), so that a load balancer stops sending first.
    ShutdownDelay {
        until: Duration,
    },
    /// Workers were told to stop; every one is killed at `deadline`.
    Stopping {
        deadline: Duration,
        quick: bool,
    },
}

/// A reload whose generation has not yet produced a ready worker.
#[derive(Debug, Clone)]
struct Pending {
    generation: u32,
    failures: u32,
}

pub struct State {
    phase: Phase,
    /// The config of every generation still alive (with a worker, spawning,
    /// serving or starting); the others are forgotten, so a master reloaded
    /// every day for a year holds a handful, not 365.
    configs: BTreeMap<u32, Arc<Config>>,
    /// The newest generation number handed out (the next reload's is + 1).
    last_generation: u32,
    /// The generation that serves and that top-ups follow.
    current: u32,
    pending: Option<Pending>,
    /// Workers wanted, for the newest generation (pending or current).
    target: u32,
    workers: BTreeMap<Pid, Worker>,
    /// Slots handed out in `Action::Spawn` whose outcome has not come back yet.
    spawning: BTreeMap<u32, u32>,
    slots: u32,
    /// A reload started; READY is due once it completes.
    reload_in_progress: bool,
    /// The requests the reload under way answers: its own and those it
    /// superseded.
    reload_tickets: Vec<Ticket>,
    ever_ready: bool,
    failures_in_row: u32,
    backoff_until: Duration,
    last_tick: Option<Duration>,
    resumed_at: Duration,
    retire_queue: VecDeque<Pid>,
    kill_all_sent: bool,
    exit_code: i32,
    started_at: Duration,
    /// Workers that died without being asked to (crash, kill, timeout).
    pub restarts: u64,
    /// Of those, the ones killed for missing their heartbeat.
    pub timeout_kills: u64,
    /// Of those, the ones the kernel's OOM killer took.
    pub oom_kills: u64,
    /// Workers stopped on purpose, by reason.
    pub recycles: Recycles,
    pub boot_failures: u64,
}

/// What a master hands over to its re-exec'd self (see `master::handover`):
/// the state of a settled master, enough to carry on where it left off.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// The config of every generation that still has a worker, and the current one.
    pub configs: BTreeMap<u32, Config>,
    pub current: u32,
    /// The newest generation number handed out (the next one is + 1).
    pub last_generation: u32,
    pub target: u32,
    pub workers: Vec<Worker>,
    pub retire_queue: Vec<Pid>,
    pub ever_ready: bool,
    pub started_at: Duration,
    pub resumed_at: Duration,
    pub restarts: u64,
    pub boot_failures: u64,
    #[serde(default)]
    pub recycles: Recycles,
    #[serde(default)]
    pub timeout_kills: u64,
    #[serde(default)]
    pub oom_kills: u64,
}

impl State {
    /// The state to hand over, or why this is not the moment: only a master
    /// that is running with no start, reload or shutdown under way hands over.
    pub fn snapshot(&self) -> Result<Snapshot, String> {
        match self.phase {
            Phase::Starting => return Err("the first generation is still starting".into()),
            Phase::Stopping { .. } | Phase::ShutdownDelay { .. } => {
                return Err("the master is shutting down".into());
            }
            Phase::Running if self.reloading() => {
                return Err("a reload is under way; try again once it completes".into());
            }
            Phase::Running => {}
        }
        let mut gens: Vec<u32> = self.workers.values().map(|w| w.generation).collect();
        gens.push(self.current);
        let configs = self
            .configs
            .iter()
            .filter(|(g, _)| gens.contains(g))
            .map(|(g, c)| (*g, (**c).clone()))
            .collect();
        Ok(Snapshot {
            configs,
            current: self.current,
            last_generation: self.last_generation,
            target: self.target,
            workers: self.workers.values().cloned().collect(),
            retire_queue: self.retire_queue.iter().copied().collect(),
            ever_ready: self.ever_ready,
            started_at: self.started_at,
            resumed_at: self.resumed_at,
            restarts: self.restarts,
            boot_failures: self.boot_failures,
            recycles: self.recycles,
            timeout_kills: self.timeout_kills,
            oom_kills: self.oom_kills,
        })
    }

    /// Carry on from a snapshot (in the re-exec'd master). Generations whose
    /// config did not come along get the current one's.
    pub fn resume(snapshot: Snapshot, slots: u32, now: Duration) -> Result<State, String> {
        let current_config = snapshot
            .configs
            .get(&snapshot.current)
            .cloned()
            .map(Arc::new)
            .ok_or_else(|| format!("no config for generation {}", snapshot.current))?;
        let mut configs: BTreeMap<u32, Arc<Config>> = snapshot
            .configs
            .into_iter()
            .map(|(g, c)| (g, Arc::new(c)))
            .collect();
        for w in &snapshot.workers {
            configs
                .entry(w.generation)
                .or_insert_with(|| current_config.clone());
        }
        Ok(State {
            phase: Phase::Running,
            configs,
            // Generation numbers keep counting up from where the old image was.
            last_generation: snapshot.last_generation.max(snapshot.current),
            current: snapshot.current,
            pending: None,
            target: snapshot.target,
            workers: snapshot.workers.into_iter().map(|w| (w.pid, w)).collect(),
            spawning: BTreeMap::new(),
            slots,
            reload_in_progress: false,
            reload_tickets: Vec::new(),
            ever_ready: snapshot.ever_ready,
            failures_in_row: 0,
            backoff_until: Duration::ZERO,
            // The exec took a moment: that is no stall of the master.
            last_tick: Some(now),
            resumed_at: snapshot.resumed_at,
            retire_queue: snapshot.retire_queue.into_iter().collect(),
            kill_all_sent: false,
            exit_code: crate::exit::OK,
            started_at: snapshot.started_at,
            restarts: snapshot.restarts,
            recycles: snapshot.recycles,
            timeout_kills: snapshot.timeout_kills,
            oom_kills: snapshot.oom_kills,
            boot_failures: snapshot.boot_failures,
        })
    }

    pub fn new(config: Arc<Config>, slots: u32, now: Duration) -> State {
        let target = config.worker_count();
        let mut configs = BTreeMap::new();
        configs.insert(1, config);
        State {
            phase: Phase::Starting,
            configs,
            last_generation: 1,
            current: 1,
            pending: None,
            target,
            workers: BTreeMap::new(),
            spawning: BTreeMap::new(),
            slots,
            reload_in_progress: false,
            reload_tickets: Vec::new(),
            ever_ready: false,
            failures_in_row: 0,
            backoff_until: Duration::ZERO,
            last_tick: None,
            resumed_at: Duration::ZERO,
            retire_queue: VecDeque::new(),
            kill_all_sent: false,
            exit_code: crate::exit::OK,
            started_at: now,
            restarts: 0,
            recycles: Recycles::default(),
            timeout_kills: 0,
            oom_kills: 0,
            boot_failures: 0,
        }
    }

    // ---- read-only views (status, tests) ----

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::Starting => "starting",
            Phase::ShutdownDelay { .. } => "shutdown-delay",
            Phase::Stopping { .. } => "stopping",
            Phase::Running if self.reloading() => "reloading",
            Phase::Running => "running",
        }
    }

    /// The newest generation (the pending one during a reload).
    pub fn generation(&self) -> u32 {
        self.pending.as_ref().map_or(self.current, |p| p.generation)
    }

    pub fn target(&self) -> u32 {
        self.target
    }

    /// The number the next reload's generation gets.
    pub fn next_generation(&self) -> u32 {
        self.last_generation + 1
    }

    /// Every generation that has a worker, serves, or is starting.
    pub fn live_generations(&self) -> std::collections::BTreeSet<u32> {
        self.workers
            .values()
            .map(|w| w.generation)
            .chain([self.current, self.generation()])
            .collect()
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.configs[&self.generation()]
    }

    /// The config of `generation`, while it is alive.
    pub fn config_of(&self, generation: u32) -> Option<&Arc<Config>> {
        self.configs.get(&generation)
    }

    pub fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.workers.values()
    }

    pub fn worker(&self, pid: Pid) -> Option<&Worker> {
        self.workers.get(&pid)
    }

    pub fn started_at(&self) -> Duration {
        self.started_at
    }

    /// The new generation has taken over: nothing outdated still serves or boots.
    fn swap_done(&self) -> bool {
        self.pending.is_none()
            && !self.workers.values().any(|w| {
                w.generation != self.current
                    && matches!(
                        w.state,
                        WorkerState::Booting | WorkerState::Ready | WorkerState::Retiring
                    )
            })
    }

    /// A reload has started and not yet completed (or been abandoned). Old
    /// workers still draining after it completed do not count: the service
    /// is running again (and systemd has had its READY=1).
    fn reloading(&self) -> bool {
        self.pending.is_some() || self.reload_in_progress
    }

    // ---- the decision function ----

    pub fn handle(&mut self, event: Event, now: Duration) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Started => {}
            Event::Signal(sig) => self.on_signal(sig, now, &mut out),
            Event::Reload { ticket, config } => self.on_reload(ticket, config, &mut out),
            Event::Spawned {
                pid,
                slot,
                generation,
            } => {
                self.workers.insert(
                    pid,
                    Worker {
                        pid,
                        slot,
                        generation,
                        state: WorkerState::Booting,
                        spawned_at: now,
                        ready_at: None,
                        boot_error: None,
                        boot_fatal: false,
                        recycle: None,
                        memory: MemoryWatch::default(),
                    },
                );
                if matches!(self.phase, Phase::Stopping { .. }) {
                    self.stop(pid, now, &mut out);
                }
            }
            Event::SpawnFailed { generation, error } => {
                out.push(Action::Log(
                    Level::Error,
                    format!("cannot spawn a worker of generation {generation}: {error}"),
                ));
                self.boot_failed(generation, error, false, now, &mut out);
            }
            Event::Message { pid, msg } => self.on_message(pid, msg, now, &mut out),
            Event::Exited { pid, how } => self.on_exit(pid, how, now, &mut out),
            Event::Tick { heartbeats } => self.on_tick(&heartbeats, now, &mut out),
            Event::Memory { samples } => self.on_memory(&samples, &mut out),
        }
        self.manage(now, &mut out);
        self.forget_dead_configs();
        out
    }

    /// Drop the configs of generations that can no longer have a worker.
    fn forget_dead_configs(&mut self) {
        let mut live = self.live_generations();
        live.extend(self.spawning.values().copied());
        self.configs.retain(|g, _| live.contains(g));
    }

    fn on_signal(&mut self, sig: Sig, now: Duration, out: &mut Vec<Action>) {
        match sig {
            Sig::Term | Sig::Int | Sig::Quit => self.on_stop(sig != Sig::Term, now, out),
            Sig::Ttin => {
                if self.target < MAX_WORKERS {
                    self.target += 1;
                }
                out.push(Action::Log(
                    Level::Info,
                    format!("TTIN: target is now {} worker(s)", self.target),
                ));
            }
            Sig::Ttou => {
                self.target = self.target.saturating_sub(1).max(1);
                out.push(Action::Log(
                    Level::Info,
                    format!("TTOU: target is now {} worker(s)", self.target),
                ));
            }
            Sig::Usr1 => {
                out.push(Action::ReopenLogs);
                for pid in self.workers.keys() {
                    out.push(Action::Signal {
                        pid: *pid,
                        sig: WorkerSig::Usr1,
                    });
                }
            }
        }
    }

    /// TERM (graceful) or INT/QUIT (quick). A graceful stop of a running
    /// service waits `server.shutdown_delay` first; INT/QUIT escalate a
    /// graceful stop, never the reverse.
    fn on_stop(&mut self, quick: bool, now: Duration, out: &mut Vec<Action>) {
        match self.phase {
            Phase::Stopping {
                quick: was_quick, ..
            } if was_quick || !quick => return,
            Phase::ShutdownDelay { .. } if !quick => return,
            Phase::Stopping { .. } | Phase::ShutdownDelay { .. } => {
                return self.begin_stop(quick, now, out);
            }
            Phase::Starting | Phase::Running => {}
        }
        out.push(Action::Notify(Notify::Stopping));
        out.push(Action::ShuttingDown);
        self.cancel_reload(out);
        let delay = self.configs[&self.current].shutdown_delay();
        if quick || delay.is_zero() || self.phase != Phase::Running {
            return self.begin_stop(quick, now, out);
        }
        out.push(Action::Log(
            Level::Info,
            format!(
                "graceful shutdown: /readyz answers 503 and {} worker(s) keep serving for shutdown_delay = {} s; then the listeners close once emptied",
                self.workers.len(),
                delay.as_secs()
            ),
        ));
        self.phase = Phase::ShutdownDelay { until: now + delay };
    }

    /// A reload under way when the stop came will not complete.
    fn cancel_reload(&mut self, out: &mut Vec<Action>) {
        if std::mem::take(&mut self.reload_in_progress) {
            out.push(self.reload_done(ReloadOutcome::Abandoned(
                "the master is shutting down".into(),
            )));
        }
        if self.pending.take().is_some() {
            self.target = self.configs[&self.current].worker_count();
        }
    }

    /// The stop proper: the listeners close behind the workers (graceful),
    /// every worker is told to stop, and all are killed at the deadline.
    fn begin_stop(&mut self, quick: bool, now: Duration, out: &mut Vec<Action>) {
        let grace = if quick {
            QUICK_GRACE
        } else {
            self.configs[&self.current].graceful_timeout()
        };
        out.push(Action::Log(
            Level::Info,
            format!(
                "{} shutdown: {} worker(s) to stop within {:?}",
                if quick { "quick" } else { "graceful" },
                self.workers.len(),
                grace
            ),
        ));
        self.phase = Phase::Stopping {
            deadline: now + grace,
            quick,
        };
        if !quick {
            out.push(Action::CloseListeners);
        }
        let pids: Vec<Pid> = self.workers.keys().copied().collect();
        for pid in pids {
            if quick {
                self.send(pid, WorkerSig::Quit, now, out);
            } else {
                self.stop(pid, now, out);
            }
        }
    }

    /// The reload under way ended: answer its requests.
    fn reload_done(&mut self, outcome: ReloadOutcome) -> Action {
        Action::ReloadDone {
            tickets: std::mem::take(&mut self.reload_tickets),
            outcome,
        }
    }

    fn on_reload(
        &mut self,
        ticket: Ticket,
        result: Result<Arc<Config>, String>,
        out: &mut Vec<Action>,
    ) {
        let refuse = |why: String| Action::ReloadDone {
            tickets: vec![ticket],
            outcome: ReloadOutcome::Refused(why),
        };
        if matches!(
            self.phase,
            Phase::Stopping { .. } | Phase::ShutdownDelay { .. }
        ) {
            // No RELOADING=1 either: systemd is already waiting for the stop.
            out.push(Action::Log(
                Level::Warn,
                "reload ignored: the master is shutting down".into(),
            ));
            out.push(refuse("the master is shutting down".into()));
            return;
        }
        out.push(Action::Notify(Notify::Reloading));
        let config = match result {
            Ok(c) => c,
            Err(e) => {
                out.push(Action::Log(
                    Level::Error,
                    format!(
                        "reload refused, generation {} keeps serving: {e}",
                        self.current
                    ),
                ));
                out.push(Action::Notify(Notify::Ready));
                out.push(refuse(format!("invalid configuration: {e}")));
                return;
            }
        };
        if let Some(p) = self.pending.take() {
            out.push(Action::Log(
                Level::Info,
                format!("generation {} superseded before it was ready", p.generation),
            ));
        }
        let generation = self.next_generation();
        self.target = config.worker_count();
        out.push(Action::Log(
            Level::Info,
            format!(
                "reload: starting generation {generation} with {} worker(s) ({})",
                self.target, config.source
            ),
        ));
        self.configs.insert(generation, config);
        self.last_generation = generation;
        self.pending = Some(Pending {
            generation,
            failures: 0,
        });
        self.reload_in_progress = true;
        self.reload_tickets.push(ticket);
        // A new generation deserves a fresh start, not the old one's backoff.
        self.failures_in_row = 0;
        self.backoff_until = Duration::ZERO;
    }

    fn on_message(&mut self, pid: Pid, msg: ToMaster, now: Duration, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get_mut(&pid) else {
            return;
        };
        match msg {
            ToMaster::Ready => {
                if w.state != WorkerState::Booting {
                    return;
                }
                w.state = WorkerState::Ready;
                w.ready_at = Some(now);
                let (generation, boot) = (w.generation, now.saturating_sub(w.spawned_at));
                out.push(Action::Log(
                    Level::Info,
                    format!(
                        "worker {pid} (generation {generation}) ready in {} ms",
                        boot.as_millis()
                    ),
                ));
                if matches!(self.phase, Phase::Stopping { .. }) {
                    self.stop(pid, now, out);
                    return;
                }
                self.failures_in_row = 0;
                self.ever_ready = true;
                if self
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.generation == generation)
                {
                    self.pending = None;
                    self.current = generation;
                    out.push(Action::Log(
                        Level::Info,
                        format!("generation {generation} is serving; retiring older workers as new ones get ready"),
                    ));
                }
            }
            ToMaster::BootFailed { error, fatal } => {
                out.push(Action::Log(
                    Level::Error,
                    format!("worker {pid} failed to boot: {error}"),
                ));
                w.boot_error = Some(error);
                w.boot_fatal = fatal;
            }
            ToMaster::Retire { requests } => {
                if w.state != WorkerState::Ready || self.retire_queue.contains(&pid) {
                    return;
                }
                if w.recycle.is_some() {
                    return;
                }
                w.recycle = Some(RecycleReason::MaxRequests);
                out.push(Action::Log(
                    Level::Info,
                    format!("worker {pid} served {requests} requests: recycling it"),
                ));
                self.retire_queue.push_back(pid);
            }
            ToMaster::Unknown => out.push(Action::Log(
                Level::Warn,
                format!("worker {pid} sent a message this master does not know; ignored"),
            )),
        }
    }

    fn on_exit(&mut self, pid: Pid, how: ExitHow, now: Duration, out: &mut Vec<Action>) {
        let Some(w) = self.workers.remove(&pid) else {
            return;
        };
        self.retire_queue.retain(|p| *p != pid);
        let how_text = match how {
            ExitHow::Code(c) => format!("exit code {c}"),
            ExitHow::Signal(s) => format!("signal {s}"),
            ExitHow::OomKilled => {
                "killed by the kernel's OOM killer (SIGKILL; the cgroup's memory.events oom_kill rose)"
                    .to_string()
            }
        };
        match w.state {
            WorkerState::Booting => {
                let error = w
                    .boot_error
                    .unwrap_or_else(|| format!("exited before it was ready ({how_text})"));
                if !matches!(self.phase, Phase::Stopping { .. }) {
                    self.boot_failed(w.generation, error, w.boot_fatal, now, out);
                }
            }
            WorkerState::Stopping { .. } | WorkerState::Killing { .. } => {
                let level = if matches!(how, ExitHow::Code(0)) {
                    Level::Info
                } else {
                    Level::Warn
                };
                out.push(Action::Log(
                    level,
                    format!("worker {pid} stopped ({how_text})"),
                ));
            }
            WorkerState::Ready | WorkerState::Retiring => {
                if !matches!(self.phase, Phase::Stopping { .. }) {
                    self.restarts += 1;
                    if how == ExitHow::OomKilled {
                        self.oom_kills += 1;
                    }
                    out.push(Action::Log(
                        Level::Warn,
                        format!("worker {pid} died unexpectedly ({how_text}); replacing it"),
                    ));
                }
            }
        }
        if let Phase::Stopping { .. } = self.phase
            && self.workers.is_empty()
        {
            out.push(Action::Log(
                Level::Info,
                "all workers stopped; exiting".into(),
            ));
            out.push(Action::Exit(self.exit_code));
        }
    }

    /// A worker of `generation` could not boot: back off, then either
    /// abandon the reload it belongs to, give up the first start, or retry.
    fn boot_failed(
        &mut self,
        generation: u32,
        error: String,
        fatal: bool,
        now: Duration,
        out: &mut Vec<Action>,
    ) {
        self.boot_failures += 1;
        self.failures_in_row += 1;
        self.backoff_until = now + backoff(self.failures_in_row);
        if let Some(p) = self.pending.as_mut()
            && p.generation == generation
        {
            p.failures += 1;
            let spawned = self.configs[&generation].worker_count();
            if fatal || p.failures >= RELOAD_BOOT_ATTEMPTS.min(spawned.max(1)) {
                self.abandon_reload(generation, &error, now, out);
            }
            return;
        }
        if !self.ever_ready && (fatal || self.failures_in_row >= FIRST_BOOT_ATTEMPTS) {
            self.give_up_first_start(fatal, &error, now, out);
        } else {
            out.push(Action::Log(
                Level::Warn,
                format!(
                    "boot failure {} in a row; next attempt in {} ms",
                    self.failures_in_row,
                    backoff(self.failures_in_row).as_millis()
                ),
            ));
        }
    }

    /// The pending generation cannot boot: stop its workers, keep the
    /// current one serving, and say so to systemd and to `notesd reload`.
    fn abandon_reload(
        &mut self,
        generation: u32,
        error: &str,
        now: Duration,
        out: &mut Vec<Action>,
    ) {
        let why = format!(
            "generation {generation} cannot boot ({error}); generation {} keeps serving",
            self.current
        );
        out.push(Action::Log(
            Level::Error,
            format!("reload abandoned: {why}"),
        ));
        self.pending = None;
        self.reload_in_progress = false;
        self.target = self.configs[&self.current].worker_count();
        self.failures_in_row = 0;
        self.backoff_until = Duration::ZERO;
        let doomed: Vec<Pid> = self
            .workers
            .values()
            .filter(|w| w.generation == generation)
            .map(|w| w.pid)
            .collect();
        for pid in doomed {
            self.send(pid, WorkerSig::Quit, now, out);
        }
        out.push(Action::Notify(Notify::Ready));
        out.push(self.reload_done(ReloadOutcome::Abandoned(why)));
    }

    /// No worker of the first generation ever got ready: exit. A fatal cause
    /// (the schema does not match) is a runtime failure; workers that keep
    /// failing to boot are Gunicorn's 3.
    fn give_up_first_start(
        &mut self,
        fatal: bool,
        error: &str,
        now: Duration,
        out: &mut Vec<Action>,
    ) {
        self.exit_code = if fatal {
            crate::exit::FAILURE
        } else {
            crate::exit::NO_WORKER_BOOTED
        };
        out.push(Action::Log(
            Level::Error,
            format!(
                "no worker could boot ({} attempt(s)); last error: {error}; exiting with code {}",
                self.failures_in_row, self.exit_code
            ),
        ));
        for pid in self.workers.keys() {
            out.push(Action::Signal {
                pid: *pid,
                sig: WorkerSig::Kill,
            });
        }
        out.push(Action::Exit(self.exit_code));
        self.phase = Phase::Stopping {
            deadline: now,
            quick: true,
        };
    }

    /// "Kill the stuck": a stalled master forgives, silent workers are
    /// aborted, aborted or lingering ones are killed.
    fn on_tick(&mut self, heartbeats: &[(Pid, Duration)], now: Duration, out: &mut Vec<Action>) {
        if let Phase::ShutdownDelay { until } = self.phase
            && now >= until
        {
            self.begin_stop(false, now, out);
        }
        self.notice_master_stall(now, out);
        self.abort_silent(heartbeats, now, out);
        self.escalate_kills(now, out);
    }

    /// Memory recycling (`server.max_worker_memory`): a serving worker over
    /// the limit for [`MEMORY_SAMPLES`] samples in a row is queued to retire
    /// as `max_requests` retires one (replacement first); one that grew past
    /// twice the limit is not waited for: it retires at once, ahead of the
    /// queue (still replacement first: a boot takes milliseconds). Either
    /// way, one memory recycle at a time per generation, so a limit set too
    /// low cannot churn them all, and capacity never dips.
    fn on_memory(&mut self, samples: &[MemorySample], out: &mut Vec<Action>) {
        for s in samples {
            let Some(w) = self.workers.get_mut(&s.pid) else {
                continue;
            };
            let limit = self.configs[&w.generation].max_worker_memory();
            let Some(limit) = limit.filter(|_| w.state == WorkerState::Ready) else {
                w.memory = MemoryWatch::default();
                continue;
            };
            if s.bytes <= limit {
                w.memory.over = 0;
                w.memory.was_under = true;
                continue;
            }
            w.memory.over += 1;
            let (over, was_under, generation) = (w.memory.over, w.memory.was_under, w.generation);
            if w.recycle.is_some() || self.memory_recycle_under_way(generation) {
                continue;
            }
            let figures = format!(
                "worker {} uses {} MiB {} > {} MiB",
                s.pid,
                s.bytes >> 20,
                if s.pss { "PSS" } else { "RSS" },
                limit >> 20
            );
            if was_under && s.bytes > 2 * limit {
                out.push(Action::Log(
                    Level::Warn,
                    format!("{figures}, over twice the limit: recycling it now"),
                ));
                self.set_recycle(s.pid, RecycleReason::Memory);
                self.retire_queue.push_front(s.pid);
            } else if over >= MEMORY_SAMPLES {
                out.push(Action::Log(
                    Level::Warn,
                    format!(
                        "{figures} for {} s: recycling",
                        (MEMORY_SAMPLE_EVERY * over).as_secs()
                    ),
                ));
                self.set_recycle(s.pid, RecycleReason::Memory);
                self.retire_queue.push_back(s.pid);
            }
        }
    }

    /// A worker of `generation` is being recycled for its memory: queued,
    /// retiring, or still draining.
    fn memory_recycle_under_way(&self, generation: u32) -> bool {
        self.workers.values().any(|w| {
            w.generation == generation
                && w.recycle == Some(RecycleReason::Memory)
                && !matches!(w.state, WorkerState::Killing { .. })
        })
    }

    /// Mark why `pid` goes; a stop it causes is counted then (see [`Self::stop`]).
    fn set_recycle(&mut self, pid: Pid, reason: RecycleReason) {
        if let Some(w) = self.workers.get_mut(&pid) {
            w.recycle = Some(reason);
        }
    }

    /// A master that was itself stopped (SIGSTOP, a frozen VM) gives every
    /// worker a fresh timeout instead of mass-killing them on resume.
    fn notice_master_stall(&mut self, now: Duration, out: &mut Vec<Action>) {
        if let Some(last) = self.last_tick {
            let stall = now.saturating_sub(last);
            let limit = (self.configs[&self.current].timeout() / 2).max(Duration::from_secs(2));
            if stall > limit {
                self.resumed_at = now;
                out.push(Action::Log(
                    Level::Warn,
                    format!(
                        "the master itself was not running for {:.1} s; giving every worker a fresh timeout",
                        stall.as_secs_f64()
                    ),
                ));
            }
        }
        self.last_tick = Some(now);
    }

    /// SIGABRT every worker whose heartbeat is older than its timeout.
    fn abort_silent(
        &mut self,
        heartbeats: &[(Pid, Duration)],
        now: Duration,
        out: &mut Vec<Action>,
    ) {
        // Every worker is judged, not only those with a heartbeat: one whose
        // scoreboard slot shows no beat (it never wrote one, or the slot is
        // not its own) has been silent since it was spawned.
        let beats: BTreeMap<Pid, Duration> = heartbeats.iter().copied().collect();
        let silent: Vec<(Pid, u32, Duration)> = self
            .workers
            .values()
            .filter(|w| !matches!(w.state, WorkerState::Killing { .. }))
            .filter_map(|w| {
                let beat = beats.get(&w.pid).copied().unwrap_or(Duration::ZERO);
                let seen = beat.max(self.resumed_at).max(w.spawned_at);
                let silent = now.saturating_sub(seen);
                (silent > self.configs[&w.generation].timeout()).then_some((w.pid, w.slot, silent))
            })
            .collect();
        for (pid, slot, silent_for) in silent {
            // Killed for its silence, not asked to stop: counted here, since
            // its exit (as `Killing`) is not.
            if !matches!(self.phase, Phase::Stopping { .. }) {
                self.restarts += 1;
                self.timeout_kills += 1;
            }
            out.push(Action::TimeoutKill {
                pid,
                slot,
                silent_for,
            });
            self.set_state(
                pid,
                WorkerState::Killing {
                    since: now,
                    kill_sent: false,
                },
            );
        }
    }

    /// SIGKILL what did not exit after SIGABRT, what drained past
    /// `graceful_timeout`, and everything once a shutdown's deadline passed.
    fn escalate_kills(&mut self, now: Duration, out: &mut Vec<Action>) {
        let graceful =
            |w: &Worker, cfgs: &BTreeMap<u32, Arc<Config>>| cfgs[&w.generation].graceful_timeout();
        let mut kills = Vec::new();
        for w in self.workers.values_mut() {
            match w.state {
                WorkerState::Killing {
                    since,
                    kill_sent: false,
                } if now.saturating_sub(since) >= ABORT_GRACE => {
                    w.state = WorkerState::Killing {
                        since,
                        kill_sent: true,
                    };
                    kills.push((w.pid, "did not exit after SIGABRT".to_string()));
                }
                WorkerState::Stopping { since }
                    if now.saturating_sub(since) > graceful(w, &self.configs) =>
                {
                    w.state = WorkerState::Killing {
                        since: now,
                        kill_sent: true,
                    };
                    kills.push((w.pid, "still draining after graceful_timeout".to_string()));
                }
                _ => {}
            }
        }
        if let Phase::Stopping { deadline, .. } = self.phase
            && now >= deadline
            && !self.kill_all_sent
        {
            self.kill_all_sent = true;
            for w in self.workers.values_mut() {
                if !matches!(
                    w.state,
                    WorkerState::Killing {
                        kill_sent: true,
                        ..
                    }
                ) {
                    w.state = WorkerState::Killing {
                        since: now,
                        kill_sent: true,
                    };
                    kills.push((w.pid, "shutdown deadline passed".to_string()));
                }
            }
        }
        for (pid, why) in kills {
            out.push(Action::Log(
                Level::Warn,
                format!("worker {pid}: {why}; SIGKILL"),
            ));
            out.push(Action::Signal {
                pid,
                sig: WorkerSig::Kill,
            });
        }
    }

    /// Top up, retire, trim: the "kill the stuck, top up" half of every tick.
    fn manage(&mut self, now: Duration, out: &mut Vec<Action>) {
        if matches!(self.phase, Phase::Stopping { .. }) {
            return;
        }
        self.start_queued_retirement();
        self.top_up(now, out);
        while let Some((victim, reason)) = self.next_to_go() {
            self.set_recycle(victim, reason);
            self.stop(victim, now, out);
        }
        self.announce_readiness(out);
    }

    /// Start a queued retirement (max_requests), one at a time.
    fn start_queued_retirement(&mut self) {
        if self
            .workers
            .values()
            .any(|w| w.state == WorkerState::Retiring)
        {
            return;
        }
        while let Some(pid) = self.retire_queue.pop_front() {
            if self
                .workers
                .get(&pid)
                .is_some_and(|w| w.state == WorkerState::Ready)
            {
                self.set_state(pid, WorkerState::Retiring);
                return;
            }
        }
    }

    /// Spawn the newest generation up to its target (retirees don't count);
    /// after a boot failure, one probe at a time once the backoff is over.
    fn top_up(&mut self, now: Duration, out: &mut Vec<Action>) {
        let newest = self.generation();
        let unconfirmed = self.spawning.values().filter(|g| **g == newest).count() as u32;
        let of_newest = |s: WorkerState| {
            self.workers
                .values()
                .filter(|w| w.generation == newest && w.state == s)
                .count() as u32
        };
        let booting = of_newest(WorkerState::Booting) + unconfirmed;
        let active = booting + of_newest(WorkerState::Ready);
        if active >= self.target || now < self.backoff_until {
            return;
        }
        let want = if self.failures_in_row > 0 {
            u32::from(booting == 0)
        } else {
            self.target - active
        };
        for _ in 0..want {
            let Some(slot) = self.free_slot(out) else {
                break;
            };
            self.spawning.insert(slot, newest);
            out.push(Action::Spawn {
                generation: newest,
                slot,
                config: self.configs[&newest].clone(),
            });
        }
    }

    /// READY to systemd once the first start, or a reload, is complete.
    fn announce_readiness(&mut self, out: &mut Vec<Action>) {
        let ready = self.ready_count();
        if self.phase == Phase::Starting
            && ready > 0
            && (ready >= self.target || self.failures_in_row > 0)
        {
            self.phase = Phase::Running;
            out.push(Action::Log(
                Level::Info,
                format!(
                    "ready: {ready} worker(s) serving (generation {})",
                    self.current
                ),
            ));
            out.push(Action::Notify(Notify::Ready));
        }
        if self.reload_in_progress && self.swap_done() && ready >= self.target {
            self.reload_in_progress = false;
            out.push(Action::Log(
                Level::Info,
                format!(
                    "reload complete: generation {} serving with {ready} worker(s)",
                    self.current
                ),
            ));
            out.push(Action::Notify(Notify::Ready));
            let done = self.reload_done(ReloadOutcome::Complete {
                generation: self.current,
                workers: ready,
            });
            out.push(done);
        }
    }

    /// The next worker that must go now without letting capacity dip below the target.
    ///
    /// Must go: workers of an outdated generation, a retiree, surplus after
    /// TTOU. A not-yet-ready one goes at once (it serves nobody); a serving one
    /// only while the others that serve still cover the target.
    fn next_to_go(&self) -> Option<(Pid, RecycleReason)> {
        let pending = self.pending.as_ref().map(|p| p.generation);
        let stale = |w: &Worker| w.generation != self.current && Some(w.generation) != pending;
        let serving = self
            .workers
            .values()
            .filter(|w| matches!(w.state, WorkerState::Ready | WorkerState::Retiring))
            .count() as u32;
        let can_lose_one = serving > self.target;
        let mut candidates: Vec<&Worker> = self
            .workers
            .values()
            .filter(|w| {
                matches!(
                    w.state,
                    WorkerState::Booting | WorkerState::Ready | WorkerState::Retiring
                )
            })
            .collect();
        // Outdated generations first (oldest first), then retirees.
        candidates.sort_by_key(|w| (w.generation, w.spawned_at));
        if let Some(w) = candidates
            .iter()
            .find(|w| stale(w) && w.state == WorkerState::Booting)
        {
            return Some((w.pid, RecycleReason::Reload));
        }
        if let Some(w) = candidates.iter().find(|w| stale(w)) {
            return can_lose_one.then_some((w.pid, RecycleReason::Reload));
        }
        if let Some(w) = candidates.iter().find(|w| w.state == WorkerState::Retiring) {
            let reason = w.recycle.unwrap_or(RecycleReason::MaxRequests);
            return can_lose_one.then_some((w.pid, reason));
        }
        if pending.is_some() {
            return None;
        }
        // Surplus after TTOU: a booting one first, else the oldest ready one.
        let active: Vec<&&Worker> = candidates
            .iter()
            .filter(|w| matches!(w.state, WorkerState::Booting | WorkerState::Ready))
            .collect();
        if active.len() as u32 + self.spawning.len() as u32 > self.target {
            if let Some(w) = active
                .iter()
                .rev()
                .find(|w| w.state == WorkerState::Booting)
            {
                return Some((w.pid, RecycleReason::ScaleDown));
            }
            return active.first().map(|w| (w.pid, RecycleReason::ScaleDown));
        }
        None
    }

    fn ready_count(&self) -> u32 {
        self.workers
            .values()
            .filter(|w| w.generation == self.current && w.state == WorkerState::Ready)
            .count() as u32
    }

    fn free_slot(&self, out: &mut Vec<Action>) -> Option<u32> {
        let used: std::collections::BTreeSet<u32> = self
            .workers
            .values()
            .map(|w| w.slot)
            .chain(self.spawning.keys().copied())
            .collect();
        let slot = (0..self.slots).find(|s| !used.contains(s));
        if slot.is_none() {
            out.push(Action::Log(
                Level::Error,
                "no free scoreboard slot; not spawning".into(),
            ));
        }
        slot
    }

    /// The outcome of an `Action::Spawn`: the edge calls this once it has
    /// forked (or failed to), and it goes on as a `Spawned` or `SpawnFailed`
    /// event through [`State::handle`].
    pub fn spawned(
        &mut self,
        slot: u32,
        result: Result<Pid, String>,
        generation: u32,
        now: Duration,
    ) -> Vec<Action> {
        self.spawning.remove(&slot);
        match result {
            Ok(pid) => self.handle(
                Event::Spawned {
                    pid,
                    slot,
                    generation,
                },
                now,
            ),
            Err(error) => self.handle(Event::SpawnFailed { generation, error }, now),
        }
    }

    fn stop(&mut self, pid: Pid, now: Duration, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get(&pid) else {
            return;
        };
        if matches!(
            w.state,
            WorkerState::Stopping { .. } | WorkerState::Killing { .. }
        ) {
            return;
        }
        // A stop the service asked for (a shutdown, an abandoned reload)
        // is no recycle; one with a reason is counted under it.
        if let Some(reason) = w.recycle
            && !matches!(self.phase, Phase::Stopping { .. })
        {
            self.recycles.count(reason);
        }
        self.set_state(pid, WorkerState::Stopping { since: now });
        out.push(Action::Signal {
            pid,
            sig: WorkerSig::Term,
        });
    }

    fn send(&mut self, pid: Pid, sig: WorkerSig, now: Duration, out: &mut Vec<Action>) {
        if sig == WorkerSig::Quit {
            self.set_state(pid, WorkerState::Stopping { since: now });
        }
        out.push(Action::Signal { pid, sig });
    }

    fn set_state(&mut self, pid: Pid, state: WorkerState) {
        if let Some(w) = self.workers.get_mut(&pid) {
            w.state = state;
        }
    }
}

/// Exponential backoff after the n-th boot failure in a row.
pub(crate) fn backoff(n: u32) -> Duration {
    let exp = n.saturating_sub(1).min(16);
    (BACKOFF_BASE * 2u32.pow(exp)).min(BACKOFF_MAX)
}

#[cfg(test)]
mod tests;
