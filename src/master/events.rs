//! THE signal table, and the handlers behind it.
//!
//! Signal handlers only record that a signal arrived (an atomic flag per
//! signal) and write a byte to a self-pipe (gunicorn's "handlers only
//! enqueue"). The master's main loop (`master::Edge::main_loop`) polls that
//! pipe together with the workers' channels and the control socket, then
//! [`Signals::take`]s what arrived; everything else happens there.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::Signal;

use crate::master::state::Sig;

/// What a signal to the master means (docs/design.md §3). One table, read by both the
/// registration code and the dispatcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MasterSignal {
    Hup,
    Child,
    /// USR2: re-exec in place from the binary at the resolved path, then reload.
    Upgrade,
    Act(Sig),
}

pub(crate) const SIGNAL_TABLE: &[(Signal, MasterSignal)] = &[
    (Signal::SIGCHLD, MasterSignal::Child),
    (Signal::SIGINT, MasterSignal::Act(Sig::Int)),
    (Signal::SIGQUIT, MasterSignal::Act(Sig::Quit)),
    (Signal::SIGTERM, MasterSignal::Act(Sig::Term)),
    (Signal::SIGHUP, MasterSignal::Hup),
    (Signal::SIGTTIN, MasterSignal::Act(Sig::Ttin)),
    (Signal::SIGTTOU, MasterSignal::Act(Sig::Ttou)),
    (Signal::SIGUSR1, MasterSignal::Act(Sig::Usr1)),
    (Signal::SIGUSR2, MasterSignal::Upgrade),
];

#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("self-pipe: {0}")]
    Pipe(nix::Error),
    #[error("registering {0}: {1}")]
    Register(Signal, std::io::Error),
}

/// Registered handlers: one flag per table row, one wake-up pipe.
pub(crate) struct Signals {
    flags: Vec<Arc<AtomicBool>>,
    read: OwnedFd,
    _write: OwnedFd,
    ids: Vec<signal_hook::SigId>,
}

impl Signals {
    pub(crate) fn register() -> Result<Signals, SignalError> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(SignalError::Pipe)?;
        let mut flags = Vec::new();
        let mut ids = Vec::new();
        for (sig, _) in SIGNAL_TABLE {
            let flag = Arc::new(AtomicBool::new(false));
            let raw = *sig as i32;
            ids.push(
                signal_hook::flag::register(raw, flag.clone())
                    .map_err(|e| SignalError::Register(*sig, e))?,
            );
            let wake = write
                .try_clone()
                .map_err(|e| SignalError::Register(*sig, e))?;
            ids.push(
                signal_hook::low_level::pipe::register_raw(raw, wake)
                    .map_err(|e| SignalError::Register(*sig, e))?,
            );
            flags.push(flag);
        }
        Ok(Signals {
            flags,
            read,
            _write: write,
            ids,
        })
    }

    pub(crate) fn wake_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Before a re-exec, with the master's signals blocked (see
    /// `handover::Blocked`): the signals whose handlers ran since the last
    /// [`take`](Self::take) live only in this image's memory and would be
    /// lost with it; raise each again, so that it stays pending and reaches
    /// the new image's handlers (or these ones, should the exec not happen).
    pub(crate) fn carry_over(&self) -> Vec<Signal> {
        SIGNAL_TABLE
            .iter()
            .zip(&self.flags)
            .filter(|(_, f)| f.swap(false, Ordering::AcqRel))
            .map(|((sig, _), _)| {
                if let Err(e) = nix::sys::signal::kill(nix::unistd::getpid(), *sig) {
                    tracing::warn!("cannot keep {sig} pending across the upgrade: {e}");
                }
                *sig
            })
            .collect()
    }

    /// Signals that arrived since the last call, in table order.
    pub(crate) fn take(&self) -> Vec<MasterSignal> {
        let mut buf = [0u8; 64];
        while matches!(nix::unistd::read(&self.read, &mut buf), Ok(n) if n > 0) {}
        SIGNAL_TABLE
            .iter()
            .zip(&self.flags)
            .filter(|(_, f)| f.swap(false, Ordering::AcqRel))
            .map(|((_, m), _)| *m)
            .collect()
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_design_signal_is_in_the_table_once() {
        for s in [
            Signal::SIGHUP,
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGQUIT,
            Signal::SIGTTIN,
            Signal::SIGTTOU,
            Signal::SIGUSR1,
            Signal::SIGUSR2,
            Signal::SIGCHLD,
        ] {
            assert_eq!(
                SIGNAL_TABLE.iter().filter(|(x, _)| *x == s).count(),
                1,
                "{s}"
            );
        }
    }
}
