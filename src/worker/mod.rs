//! A worker: `notesd worker`, exec'd by the master.
//!
//! Boot: check the protocol, adopt the inherited fds (see [`crate::ipc`]), read
//! the boot message, start a **current-thread** tokio runtime, beat the
//! heartbeat from it, open the pool, check the schema, say READY, serve.
//! A handler that blocks the runtime also stops the heartbeat, which is
//! exactly what the master's `timeout` catches.

pub(crate) mod acceptor;
pub(crate) mod lifecycle;
pub(crate) mod server;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{MsgFlags, recv, send};

use crate::clock;
use crate::config::Config;
use crate::ipc::{self, Boot, ToMaster};
use crate::scoreboard::{Scoreboard, Slot, WorkerPhase};
use crate::store::{Purpose, Store};
use acceptor::{Acceptor, AcceptorError};
use lifecycle::{Lifecycle, Stop};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("not started by a notesd master (missing {0}); `notesd worker` is internal")]
    NotAWorker(&'static str),
    #[error("master speaks protocol {0}, this binary {min}..={max}", min = ipc::PROTOCOL_MIN, max = ipc::PROTOCOL_VERSION)]
    Protocol(u32),
    #[error("inherited fd {0} is not open")]
    Fd(RawFd),
    #[error("no boot message from the master: {0}")]
    Boot(String),
    #[error("scoreboard: {0}")]
    Scoreboard(#[from] crate::scoreboard::ScoreboardError),
}

impl WorkerError {
    pub fn exit_code(&self) -> i32 {
        match self {
            WorkerError::Protocol(_) => ipc::EXIT_PROTOCOL,
            _ => ipc::EXIT_BOOT_FAILED,
        }
    }
}

/// This worker's end of its channel to the master, for the few messages it sends.
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    pub fn send(&self, msg: &ToMaster) {
        match ipc::encode(msg) {
            Ok(bytes) => {
                if let Err(e) = send(
                    self.fd.as_raw_fd(),
                    &bytes,
                    MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                ) {
                    tracing::warn!("cannot tell the master {msg:?}: {e}");
                }
            }
            Err(e) => tracing::warn!("cannot encode {msg:?}: {e}"),
        }
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn env_u32(key: &'static str) -> Result<u32, WorkerError> {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or(WorkerError::NotAWorker(key))
}

fn take_fd(fd: RawFd) -> Result<OwnedFd, WorkerError> {
    nix::fcntl::fcntl(
        // SAFETY: probing an fd number we were told is inherited; borrowed only for the call.
        unsafe { BorrowedFd::borrow_raw(fd) },
        nix::fcntl::FcntlArg::F_GETFD,
    )
    .map_err(|_| WorkerError::Fd(fd))?;
    // SAFETY: the fd is open (checked above) and was handed to us by the master at
    // this fixed number; nothing else in this process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Not inherited by anything we might exec.
    let _ = nix::fcntl::fcntl(
        owned.as_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    Ok(owned)
}

/// Inherited resources, before logging is up.
struct Inherited {
    channel: Channel,
    board: Scoreboard,
    listeners: Vec<(bool, OwnedFd)>,
    slot: u32,
    generation: u32,
    master_pid: i32,
}

fn adopt() -> Result<Inherited, WorkerError> {
    let protocol = env_u32(ipc::ENV_PROTOCOL)?;
    if !(ipc::PROTOCOL_MIN..=ipc::PROTOCOL_VERSION).contains(&protocol) {
        return Err(WorkerError::Protocol(protocol));
    }
    let kinds = std::env::var(ipc::ENV_LISTENERS)
        .map_err(|_| WorkerError::NotAWorker(ipc::ENV_LISTENERS))?;
    let slot = env_u32(ipc::ENV_SLOT)?;
    let generation = env_u32(ipc::ENV_GENERATION)?;
    let master_pid = env_u32(ipc::ENV_MASTER_PID)? as i32;
    let channel = Channel {
        fd: take_fd(ipc::CHANNEL_FD)?,
    };
    let board = Scoreboard::open(take_fd(ipc::SCOREBOARD_FD)?)?;
    let mut listeners = Vec::new();
    for (i, kind) in kinds.split(',').filter(|k| !k.is_empty()).enumerate() {
        listeners.push((
            kind == "unix",
            take_fd(ipc::FIRST_LISTENER_FD + i as RawFd)?,
        ));
    }
    Ok(Inherited {
        channel,
        board,
        listeners,
        slot,
        generation,
        master_pid,
    })
}

fn read_boot(channel: &Channel) -> Result<Boot, WorkerError> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(channel.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(10_000u16)) {
        Ok(0) => return Err(WorkerError::Boot("timed out".into())),
        Ok(_) => {}
        Err(e) => return Err(WorkerError::Boot(e.to_string())),
    }
    let mut buf = vec![0u8; ipc::MAX_PACKET];
    let n = recv(channel.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
        .map_err(|e| WorkerError::Boot(e.to_string()))?;
    if n == 0 {
        return Err(WorkerError::Boot("the master closed the channel".into()));
    }
    ipc::decode::<Boot>(&buf[..n]).map_err(|e| WorkerError::Boot(e.to_string()))
}

/// The worker runs under `SCHED_BATCH`: woken by a request, it does not
/// preempt the task that is running (nginx writing the next requests), so
/// it finds several waiting when it runs instead of one per wake-up. It is
/// still scheduled fairly (same weight, same nice); only wake-up preemption
/// goes. Measured on 2 cores through nginx, 2 workers, `GET /healthz`
/// (interleaved A/B rounds): 1.5 → 0.6 sleeps per request, upstream
/// keepalive +40–48 % (30–34k → 43–50k req/s), a connection per request
/// +15–28 %, one worker +3–11 %, p99 no worse; database routes unchanged.
/// The master keeps the default policy where it can: its timeouts and
/// signals come first. Under the packaged unit (`CPUSchedulingPolicy=batch`,
/// since its seccomp filter refuses `sched_setscheduler`) the whole service
/// is batch already; elsewhere a refused call is said once and the worker
/// serves under the default policy.
fn batch_scheduling() {
    // SAFETY: plain syscalls on this process; `param` is valid and
    // initialized, and only read.
    if unsafe { libc::sched_getscheduler(0) } == libc::SCHED_BATCH {
        return;
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: as above.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if rc != 0 {
        tracing::info!(
            "cannot run under SCHED_BATCH ({}): serving under the default scheduling policy",
            std::io::Error::last_os_error()
        );
    }
}

/// Entry point of `notesd worker`; returns the exit code.
pub fn run() -> i32 {
    let inherited = match adopt() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("notesd worker: {e}");
            return e.exit_code();
        }
    };
    let boot = match read_boot(&inherited.channel) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("notesd worker: {e}");
            return e.exit_code();
        }
    };
    let config = Arc::new(boot.config);
    if let Err(e) = crate::log::init(&config.log) {
        eprintln!("notesd worker: logging: {e}");
    }
    let span = tracing::info_span!(
        "worker",
        pid = std::process::id(),
        generation = inherited.generation
    );
    let _entered = span.enter();
    batch_scheduling();
    // The worker's thread sleeps in the accept epoll (see `acceptor`), which
    // watches the runtime's own epoll: found by what building the runtime added.
    let accept = Arc::new(Acceptor::default());
    let epolls_before = acceptor::epoll_fds().unwrap_or_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(acceptor::hook(accept.clone()))
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot build the runtime: {e}");
            return ipc::EXIT_BOOT_FAILED;
        }
    };
    let runtime_epoll = acceptor::runtime_epoll(&epolls_before);
    let code = runtime.block_on(serve(config, inherited, accept, runtime_epoll));
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

async fn serve(
    config: Arc<Config>,
    inherited: Inherited,
    accept: Arc<Acceptor>,
    runtime_epoll: Result<RawFd, AcceptorError>,
) -> i32 {
    let Inherited {
        channel,
        board,
        listeners,
        slot,
        master_pid,
        ..
    } = inherited;
    let slot = match Slot::new(Arc::new(board), slot) {
        Ok(s) => s,
        Err(e) => {
            channel.send(&ToMaster::BootFailed {
                error: e.to_string(),
                fatal: false,
            });
            return ipc::EXIT_BOOT_FAILED;
        }
    };
    // Before the pool opens its first connection: its gauges count it.
    crate::scoreboard::ext::install(slot.clone());
    let life = Lifecycle::new();
    slot.set_phase(WorkerPhase::Booting);
    spawn_heartbeat(slot.clone(), config.timeout(), master_pid, life.clone());
    if let Err(e) = lifecycle::watch_signals(life.clone()) {
        let error = format!("cannot register signal handlers: {e}");
        channel.send(&ToMaster::BootFailed {
            error,
            fatal: false,
        });
        return ipc::EXIT_BOOT_FAILED;
    }
    // Under an outage or overload, a request waits at most this long for a connection: 503 after.
    let acquire = Duration::from_secs(config.http.request_timeout).min(Duration::from_secs(2));
    let boot = async {
        let store = Store::connect(&config.database, Purpose::Serve, acquire).await?;
        store.check_schema().await?;
        Ok::<_, crate::store::StoreError>(store)
    };
    let store = tokio::select! {
        r = boot => match r {
            Ok(s) => s,
            Err(e) => {
                let error = e.to_string();
                let fatal = matches!(e, crate::store::StoreError::Schema(_));
                tracing::error!("boot failed: {error}");
                channel.send(&ToMaster::BootFailed { error, fatal });
                return ipc::EXIT_BOOT_FAILED;
            }
        },
        why = life.stopped() => {
            tracing::info!("stopped while booting ({why:?})");
            return ipc::EXIT_OK;
        }
    };
    let started = runtime_epoll.and_then(|epoll| {
        // SAFETY: the runtime's epoll stays open while the runtime (which
        // runs this very future) lives.
        let epoll = unsafe { BorrowedFd::borrow_raw(epoll) };
        server::adopt_listeners(listeners, &accept, epoll)
    });
    match started {
        Ok(()) => {}
        Err(e) => {
            let error = format!("cannot use the inherited listeners: {e}");
            channel.send(&ToMaster::BootFailed {
                error,
                fatal: false,
            });
            return ipc::EXIT_BOOT_FAILED;
        }
    };
    let shared = Arc::new(server::Shared::new(
        config.clone(),
        store.clone(),
        slot.clone(),
        channel,
    ));
    slot.set_phase(WorkerPhase::Serving);
    shared.channel.send(&ToMaster::Ready);
    let why = server::run(shared.clone(), accept, life.clone()).await;
    store.close_bounded().await;
    tracing::debug!(?why, "worker exiting");
    ipc::EXIT_OK
}

fn spawn_heartbeat(slot: Slot, timeout: Duration, master_pid: i32, life: Lifecycle) {
    let every = lifecycle::heartbeat_interval(timeout);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            slot.heartbeat(clock::now_ns());
            if !lifecycle::master_alive(master_pid) && life.current().is_none() {
                tracing::warn!("the master is gone; draining and exiting");
                life.stop(Stop::MasterGone);
            }
        }
    });
}
