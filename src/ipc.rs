//! THE master↔worker contract: inherited fd numbers, environment, messages,
//! exit codes and the protocol version.
//!
//! A worker is `notesd worker`, exec'd by the master with:
//!
//! | fd | what |
//! |---|---|
//! | 3 | `CHANNEL_FD`: a `SOCK_SEQPACKET` socket to the master (one JSON message per packet) |
//! | 4 | `SCOREBOARD_FD`: the scoreboard memfd (see [`crate::scoreboard`]) |
//! | 5.. | `FIRST_LISTENER_FD`: the listening sockets, `NOTESD_LISTENERS` of them |
//!
//! The master sends one [`Boot`] packet right after the spawn; the worker answers
//! [`ToMaster::Ready`] once its pool is up and the schema is checked, or
//! [`ToMaster::BootFailed`] and exits with [`EXIT_BOOT_FAILED`]. Later it may send
//! [`ToMaster::Retire`] (max_requests reached). EOF on the channel means the
//! other side is gone.
//!
//! Versioning: the master puts its protocol version in `NOTESD_PROTOCOL`. A
//! worker from a newer binary speaks that version if it still can, or exits
//! with [`EXIT_PROTOCOL`] before READY, which the master treats as a boot
//! failure (the old generation keeps serving). Unknown message kinds are
//! logged and ignored by the master.

use serde::{Deserialize, Serialize};

use crate::config::Config;

pub(crate) const PROTOCOL_VERSION: u32 = 1;
/// Oldest master protocol this worker binary can still talk to.
pub(crate) const PROTOCOL_MIN: u32 = 1;

pub(crate) const CHANNEL_FD: i32 = 3;
pub(crate) const SCOREBOARD_FD: i32 = 4;
pub(crate) const FIRST_LISTENER_FD: i32 = 5;

pub(crate) const ENV_PROTOCOL: &str = "NOTESD_PROTOCOL";
pub(crate) const ENV_LISTENERS: &str = "NOTESD_LISTENERS";
pub(crate) const ENV_SLOT: &str = "NOTESD_SLOT";
pub(crate) const ENV_GENERATION: &str = "NOTESD_GENERATION";
pub(crate) const ENV_MASTER_PID: &str = "NOTESD_MASTER_PID";
/// Every variable above: set fresh for each worker, never inherited.
pub(crate) const ENV_ALL: &[&str] = &[
    ENV_PROTOCOL,
    ENV_LISTENERS,
    ENV_SLOT,
    ENV_GENERATION,
    ENV_MASTER_PID,
];

/// Worker exit codes the master understands.
pub(crate) const EXIT_OK: i32 = 0;
/// The worker could not get ready (database, schema, bad fds).
pub(crate) const EXIT_BOOT_FAILED: i32 = 3;
/// The worker does not speak the master's protocol version.
pub(crate) const EXIT_PROTOCOL: i32 = 4;

/// Largest packet either side sends or accepts.
pub(crate) const MAX_PACKET: usize = 64 * 1024;

/// Master → worker, once, right after spawn.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Boot {
    pub protocol: u32,
    pub config: Config,
}

/// Worker → master.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToMaster {
    /// Pool up, schema checked, serving.
    Ready,
    /// Could not boot; the worker exits right after with `EXIT_BOOT_FAILED`.
    /// `fatal`: retrying cannot help (e.g. the schema does not match this binary).
    BootFailed {
        error: String,
        #[serde(default)]
        fatal: bool,
    },
    /// max_requests reached: start my replacement, then stop me.
    Retire { requests: u64 },
    /// A message from a newer worker this master does not know.
    #[serde(other)]
    Unknown,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum IpcError {
    #[error("channel I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad message: {0}")]
    Decode(#[from] serde_json::Error),
}

pub(crate) fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, IpcError> {
    Ok(serde_json::to_vec(msg)?)
}

pub(crate) fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, IpcError> {
    Ok(serde_json::from_slice(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for m in [
            ToMaster::Ready,
            ToMaster::BootFailed {
                error: "db down".into(),
                fatal: false,
            },
            ToMaster::Retire { requests: 7 },
        ] {
            let bytes = encode(&m).expect("encode");
            assert_eq!(decode::<ToMaster>(&bytes).expect("decode"), m);
        }
    }

    #[test]
    fn boot_failed_from_an_older_worker_is_not_fatal() {
        let m: ToMaster = decode(br#"{"type":"boot_failed","error":"x"}"#).expect("decode");
        assert_eq!(
            m,
            ToMaster::BootFailed {
                error: "x".into(),
                fatal: false
            }
        );
    }

    #[test]
    fn unknown_messages_from_newer_workers_are_tolerated() {
        let m: ToMaster = decode(br#"{"type":"stats","x":1}"#).expect("decode");
        assert_eq!(m, ToMaster::Unknown);
    }
}
