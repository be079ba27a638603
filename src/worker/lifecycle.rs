//! Every reason a worker stops ([`Stop`]), and how the first decision, made
//! wherever it is made (a signal, the master's death, the drain's end),
//! reaches every task: one [`Lifecycle`] watch channel, where a later, more
//! urgent reason may override a drain but nothing overrides `Now`.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Why a worker is leaving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// SIGTERM (reload, recycle, shutdown): stop accepting, drain, exit 0.
    Drain,
    /// SIGQUIT/SIGINT: exit now.
    Now,
    /// The master died: drain and exit (no orphan keeps the socket).
    MasterGone,
}

/// Broadcasts the first stop decision to every task.
#[derive(Clone)]
pub(crate) struct Lifecycle {
    tx: Arc<watch::Sender<Option<Stop>>>,
}

impl Lifecycle {
    pub(crate) fn new() -> Lifecycle {
        Lifecycle {
            tx: Arc::new(watch::Sender::new(None)),
        }
    }

    pub(crate) fn stop(&self, why: Stop) {
        self.tx.send_if_modified(|cur| match cur {
            // An urgent stop may override a drain; nothing overrides `Now`.
            Some(Stop::Now) => false,
            Some(_) if why != Stop::Now => false,
            _ => {
                *cur = Some(why);
                true
            }
        });
    }

    pub(crate) fn current(&self) -> Option<Stop> {
        *self.tx.borrow()
    }

    /// Resolves once any stop is decided.
    pub(crate) async fn stopped(&self) -> Stop {
        let mut rx = self.tx.subscribe();
        loop {
            if let Some(s) = *rx.borrow_and_update() {
                return s;
            }
            if rx.changed().await.is_err() {
                return Stop::Now;
            }
        }
    }

    /// Resolves on an immediate stop only.
    pub(crate) async fn stopped_now(&self) {
        let mut rx = self.tx.subscribe();
        loop {
            if *rx.borrow_and_update() == Some(Stop::Now) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle::new()
    }
}

/// Register TERM/QUIT/INT/USR1 with tokio (dispositions are never reset by
/// hand first; see docs/design.md §4) and turn them into stop decisions.
pub(crate) fn watch_signals(life: Lifecycle) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut quit = signal(SignalKind::quit())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => life.stop(Stop::Drain),
                _ = quit.recv() => life.stop(Stop::Now),
                _ = int.recv() => life.stop(Stop::Now),
                _ = usr1.recv() => crate::log::reopen(),
            }
        }
    });
    Ok(())
}

/// Is the master that spawned us still our parent?
pub(crate) fn master_alive(master_pid: i32) -> bool {
    nix::unistd::getppid().as_raw() == master_pid
}

/// Heartbeat interval: at least four beats per `timeout`, at most a second apart.
pub(crate) fn heartbeat_interval(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_beats_drain_but_not_the_reverse() {
        let l = Lifecycle::new();
        l.stop(Stop::Drain);
        assert_eq!(l.current(), Some(Stop::Drain));
        l.stop(Stop::MasterGone);
        assert_eq!(l.current(), Some(Stop::Drain));
        l.stop(Stop::Now);
        assert_eq!(l.current(), Some(Stop::Now));
        l.stop(Stop::Drain);
        assert_eq!(l.current(), Some(Stop::Now));
    }

    #[test]
    fn heartbeat_is_frequent_enough() {
        assert_eq!(
            heartbeat_interval(Duration::from_secs(30)),
            Duration::from_secs(1)
        );
        assert_eq!(
            heartbeat_interval(Duration::from_secs(2)),
            Duration::from_millis(500)
        );
    }
}
