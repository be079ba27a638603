//! notesd: a notes JSON API served by a Gunicorn-style prefork server.
//!
//! One binary is both the **master** and the **worker**. The master binds the
//! listening sockets, fork+execs `notesd worker` N times with the sockets and a
//! private channel inherited at fixed fd numbers, and supervises them: signals,
//! heartbeats through a shared-memory scoreboard, timeouts, recycling, reloads.
//! The master is single-threaded and never opens a database connection. Each
//! worker runs a current-thread tokio runtime with hyper (HTTP/1.1) and its own
//! sqlx pool.
//!
//! # Layout
//!
//! - [`config`]: TOML + env + flags → one validated [`config::Config`].
//! - [`log`]: tracing to journald or stderr (text or JSON), reopenable log file.
//! - [`listener`]: bind unix/TCP sockets (stale check, mode, group) or take LISTEN_FDS.
//! - [`ipc`]: the master↔worker contract: fd numbers, env vars, messages, exit codes.
//! - [`scoreboard`]: shared-memory slots (heartbeat, state, counters, current request).
//! - [`systemd`]: sd_notify READY/RELOADING/STOPPING/STATUS/WATCHDOG.
//! - [`master`]: the supervisor. `state` is the pure decision function
//!   (`handle(Event, now) -> Vec<Action>`), `events` turns signals, children and
//!   ticks into events, `spawn` forks+execs, `control` serves `notesd status` and
//!   `notesd reload`, `sockets` keeps the listeners per generation (bind changes
//!   on reload), `handover` re-execs the master in place (upgrades, USR2).
//! - [`worker`]: runtime, pool, READY, accept loop, graceful drain.
//! - [`http`]: router, handlers (notes, metrics) and error mapping.
//! - [`domain`]: `Note`, `NoteTitle::parse`, `NewNote`, `NotePatch`.
//! - [`store`]: our per-worker pool and broken-connection rules (PostgreSQL or
//!   SQLite), queries, embedded migrations.
//! - [`client`]: the small unix-socket clients behind `status` and `healthcheck`.
//!
//! Flow: master: signal/child/tick → `Event` → `State::handle` → `Action`s →
//! executed at the edge. Worker: accept → hyper → router → handler → store → JSON.

#![warn(unreachable_pub)]

/// This build's version: the package's, unless a test build names another
/// (the test suite builds "newer" binaries from this tree to upgrade to).
pub const VERSION: &str = match option_env!("NOTESD_BUILD_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// The flags of a test build (`NOTESD_TEST_VARIANT=flag,flag` at build time);
/// none in any other build.
const TEST_VARIANT: &str = match option_env!("NOTESD_TEST_VARIANT") {
    Some(v) => v,
    None => "",
};

/// Was this binary built by the test suite with `flag`?
pub fn test_variant(flag: &str) -> bool {
    TEST_VARIANT.split(',').any(|f| f == flag)
}

pub mod client;
pub(crate) mod clock;
pub mod config;
pub(crate) mod domain;
pub(crate) mod http;
pub(crate) mod ipc;
pub(crate) mod listener;
pub mod log;
pub mod master;
pub(crate) mod scoreboard;
pub mod store;
pub(crate) mod systemd;
pub mod worker;
