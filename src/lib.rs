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
//! - `main.rs` + `cli.rs` (the binary): clap definitions and dispatch; `anyhow`
//!   and exit codes live only there. `build.rs` renders `cli.rs` into man pages.
//! - [`config`]: TOML + env + flags → one validated [`config::Config`].
//! - [`log`]: tracing to journald or stderr (text or JSON), reopenable log file.
//! - `clock`: `CLOCK_MONOTONIC` as a `Duration` (the master's and scoreboard's time).
//! - `listener`: bind unix/TCP sockets (stale check, mode, group) or take LISTEN_FDS.
//! - `ipc`: the master↔worker contract: fd numbers, env vars, messages, exit codes.
//! - `scoreboard`: shared-memory slots (heartbeat, state, current request) and
//!   the metric counters `/metrics` sums.
//! - `systemd`: sd_notify READY/RELOADING/STOPPING/STATUS/WATCHDOG.
//! - [`master`]: the supervisor. `state` is the pure decision function
//!   (`handle(Event, now) -> Vec<Action>`), `events` is the signal table,
//!   `spawn` forks+execs, `control` serves `notesd status` and `notesd
//!   reload`, `sockets` keeps the listeners per generation (bind changes on
//!   reload), `handover` re-execs the master in place (upgrades, USR2); the
//!   module itself is the edge that executes actions.
//! - [`worker`]: boot (runtime, pool, READY), `server` (accept loop, hyper,
//!   graceful drain), `lifecycle` (why and how a worker stops).
//! - `http`: router, `notes` handlers, `list_cache`, `metrics`, `host` (RFC
//!   9112 Host rules), `error` (ApiError → status + JSON).
//! - `domain`: `Note`, `NoteTitle::parse`, `NewNote`, `NotePatch`.
//! - [`store`]: our per-worker pool and broken-connection rules (PostgreSQL or
//!   SQLite), queries, the commit token, embedded migrations.
//! - [`client`]: the small unix-socket clients behind `status`, `reload` and
//!   `healthcheck`.
//!
//! Flow: master: signal/child/tick → `Event` → `State::handle` → `Action`s →
//! executed at the edge. Worker: accept → hyper → router → handler → store → JSON.

#![warn(unreachable_pub)]

/// The process exit codes of `notesd` (docs/design.md §1), named once.
pub mod exit {
    /// A clean exit.
    pub const OK: i32 = 0;
    /// A runtime failure: the database, the OS, a refused reload, a schema
    /// this binary cannot serve.
    pub const FAILURE: i32 = 1;
    /// Bad usage or an invalid config; an address another server holds.
    pub const USAGE: i32 = 2;
    /// The first generation's workers kept failing to boot (Gunicorn's 3).
    pub const NO_WORKER_BOOTED: i32 = 3;
}

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
pub(crate) mod procfs;
pub(crate) mod scoreboard;
pub mod store;
pub(crate) mod systemd;
pub mod worker;
