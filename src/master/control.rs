//! The control socket behind `notesd status`.
//!
//! Protocol: connect; the master writes one JSON document ([`Status`]) and
//! closes. There is no request to read, so a slow or silent client can never
//! stall the single-threaded master: the write is non-blocking and a client
//! that cannot take it at once gets nothing.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ipc;
use crate::listener::{ListenError, Listener};
use crate::master::state::State;
use crate::scoreboard::Scoreboard;

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
    pub workers: Vec<WorkerStatus>,
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
    pub last_heartbeat_s: f64,
    pub current_request: Option<RequestStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestStatus {
    pub method: String,
    pub path: String,
    pub request_id: String,
    pub elapsed_ms: u64,
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// A snapshot of the master's view joined with the workers' own counters.
pub fn status(state: &State, board: &Scoreboard, now: Duration) -> Status {
    let now_ns = now.as_nanos() as u64;
    let workers = state
        .workers()
        .map(|w| {
            let slot = board.read(w.slot).ok().filter(|s| s.pid == w.pid as u32);
            let (requests, conns, beat, current) = match slot {
                Some(s) => (
                    s.requests,
                    s.active_connections,
                    Duration::from_nanos(now_ns.saturating_sub(s.heartbeat_ns)),
                    s.current.map(|c| RequestStatus {
                        elapsed_ms: now_ns.saturating_sub(c.started_ns) / 1_000_000,
                        method: c.method,
                        path: c.path,
                        request_id: c.request_id,
                    }),
                ),
                None => (0, 0, Duration::ZERO, None),
            };
            WorkerStatus {
                pid: w.pid,
                slot: w.slot,
                generation: w.generation,
                state: w.state.name().to_string(),
                age_s: secs(now.saturating_sub(w.spawned_at)),
                requests,
                active_connections: conns,
                last_heartbeat_s: secs(beat),
                current_request: current,
            }
        })
        .collect();
    Status {
        protocol: ipc::PROTOCOL_VERSION,
        version: env!("CARGO_PKG_VERSION").to_string(),
        master_pid: std::process::id(),
        phase: state.phase_name().to_string(),
        generation: state.generation(),
        target_workers: state.target(),
        uptime_s: secs(now.saturating_sub(state.started_at())),
        restarts: state.restarts,
        boot_failures: state.boot_failures,
        config: state.config().source.to_string(),
        workers,
    }
}

/// Answer every waiting client (the listener is non-blocking).
pub fn serve_pending(listener: &UnixListener, state: &State, board: &Scoreboard, now: Duration) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => answer(stream, state, board, now),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                return;
            }
        }
    }
}

fn answer(mut stream: UnixStream, state: &State, board: &Scoreboard, now: Duration) {
    let body = match serde_json::to_vec(&status(state, board, now)) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode status");
            return;
        }
    };
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    if let Err(e) = stream.write_all(&body) {
        tracing::debug!(error = %e, "status client did not take the answer");
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
