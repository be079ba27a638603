//! Black-box test harness for `notesd`, in the spirit of zero2prod's `spawn_app`
//! and nginx-tests: every test gets its own temp dir and config, spawns the real
//! binary, talks HTTP/1.1 over the unix socket, sends real signals, and on drop
//! asserts that the server's log is clean (no panic, no ERROR line).
//!
//! Every wait in here is bounded; every failure message carries enough context
//! (status snapshot, log tail) to be debugged from the test output alone.
//!
//! Everything below is re-exported here, so a test crate needs only
//! `use common::*;`:
//!
//! - `tempdir`: `TempDir`, a fresh directory under /tmp;
//! - `command`: running `notesd` with a clean environment and a timeout;
//! - `process`: signals, /proc, polling and log-text helpers;
//! - `config`: `TestOptions`, `ServerPaths` and the rendered config file;
//! - `server`: `TestServer`, one `notesd serve` master;
//! - `status`: helpers on the JSON of `notesd status --json`;
//! - `http`: the HTTP/1.1 client over a unix socket and `Response`;
//! - `response`: the HTTP/1.1 response parser shared by every client;
//! - `unix_load`: the keep-alive load generator over the unix socket;
//! - `pg`: a fresh PostgreSQL database per test.
//!
//! The public submodules `hosts`, `load`, `nginx` and `notes` are used by path
//! (`common::notes::*`, …).

// Each integration test crate compiles this module and uses only part of it.
#![allow(dead_code)]

pub mod hosts;
pub mod load;
pub mod nginx;
pub mod notes;

mod command;
mod config;
mod http;
mod pg;
mod process;
mod response;
mod server;
mod status;
mod tempdir;
mod unix_load;

pub use command::*;
pub use config::*;
pub use http::*;
pub use pg::*;
pub use process::*;
pub use response::*;
pub use server::*;
pub use status::*;
pub use tempdir::*;
pub use unix_load::*;
