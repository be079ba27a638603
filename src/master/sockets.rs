//! The listening sockets by generation: what a reload that changes
//! `server.bind`, `socket_mode` or `socket_group` does to them.
//!
//! A set of listeners serves the generations from its key on, up to the next
//! set's key. A reload whose binds differ binds the new addresses first (a
//! failure refuses the reload; nothing changes, and what it had bound is
//! closed and unlinked), keeps the sockets of the addresses still wanted —
//! the very same socket, so no connection is refused or lost, also for an
//! address only an older, draining generation still holds — and adds the
//! set for the new generation. The mode and group of the kept unix sockets
//! change only once the reload completes (the edge applies them). The old set stays open
//! while a worker of its generations lives (they accept on their inherited
//! copies anyway); once none is left it is closed, and socket files no newer
//! set shares are unlinked. Sockets from systemd (LISTEN_FDS) are systemd's:
//! changes to them belong in notesd.socket, and a reload only says so.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use crate::config::{Bind, Config};
use crate::listener::{self, ListenError, Listener, UnixOptions};

/// What [`Sockets::reconcile`] did for a reload.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Reconciled {
    /// `+bind` / `-bind …` when the set changed.
    pub changes: Option<Vec<String>>,
    /// The unix socket files the new set keeps: their mode and group are
    /// applied when the reload completes.
    pub kept_unix: Vec<std::path::PathBuf>,
}

pub(crate) struct Sockets {
    /// First generation served → the listeners, in `server.bind` order (the
    /// order workers get them in). Key 0 is the first set; never empty until
    /// a graceful stop closes them all ([`Sockets::close_all`]).
    sets: BTreeMap<u32, Vec<Rc<Listener>>>,
}

impl Sockets {
    pub(crate) fn new(listeners: Vec<Listener>) -> Sockets {
        Sockets {
            sets: BTreeMap::from([(0, listeners.into_iter().map(Rc::new).collect())]),
        }
    }

    /// The listeners workers of generation `g` get.
    pub(crate) fn for_generation(&self, g: u32) -> &[Rc<Listener>] {
        self.sets
            .range(..=g)
            .next_back()
            .or_else(|| self.sets.iter().next())
            .map(|(_, set)| set.as_slice())
            .unwrap_or_default()
    }

    /// Every listener held, each once.
    pub(crate) fn all(&self) -> Vec<&Listener> {
        let mut seen = BTreeSet::new();
        self.sets
            .values()
            .flatten()
            .filter(|l| seen.insert(Rc::as_ptr(l) as usize))
            .map(|l| l.as_ref())
            .collect()
    }

    /// A graceful stop: unlink every socket file the master created (still
    /// ours), so no new connection reaches it, and close the master's copy of
    /// every listener; the workers' copies stay open until each has emptied
    /// its queue. Returns the binds closed.
    pub(crate) fn close_all(&mut self) -> Vec<String> {
        let closed = self
            .all()
            .into_iter()
            .map(|l| {
                l.cleanup();
                l.bind.to_string()
            })
            .collect();
        self.sets.clear();
        closed
    }

    /// One set only: no generation from before a bind change still drains.
    pub(crate) fn is_settled(&self) -> bool {
        self.sets.len() == 1
    }

    /// The listener held for `bind` in any set (the newest first): an
    /// address an older generation still drains on is the same socket a
    /// reload back to it wants (A → B → A while A drains).
    fn held(&self, bind: &Bind) -> Option<Rc<Listener>> {
        self.sets
            .values()
            .rev()
            .flatten()
            .find(|l| &l.bind == bind)
            .cloned()
    }

    /// The set a reload to `config` wants for generation `next` (added when
    /// it differs from the set `next` would get). Each wanted address reuses
    /// a socket held for it, else is bound now. Binding can fail; then
    /// nothing changed: the sockets this call bound are closed and unlinked.
    /// The unix sockets kept are returned, not touched: their `socket_mode`
    /// and `socket_group` are the reload's to apply once it completes.
    pub(crate) fn reconcile(
        &mut self,
        next: u32,
        config: &Config,
        unix: UnixOptions,
    ) -> Result<Reconciled, ListenError> {
        let current: Vec<Rc<Listener>> = self.for_generation(next).to_vec();
        let mut set = Vec::new();
        let mut fresh: Vec<Rc<Listener>> = Vec::new();
        let mut kept_unix = Vec::new();
        for bind in &config.binds() {
            if let Some(kept) = self.held(bind) {
                if let Bind::Unix(path) = bind {
                    kept_unix.push(path.clone());
                }
                set.push(kept);
                continue;
            }
            match listener::bind_one(bind, unix) {
                Ok(l) => {
                    let l = Rc::new(l);
                    fresh.push(l.clone());
                    set.push(l);
                }
                Err(e) => {
                    fresh.iter().for_each(|l| l.cleanup());
                    return Err(e);
                }
            }
        }
        let same =
            set.len() == current.len() && set.iter().zip(&current).all(|(a, b)| Rc::ptr_eq(a, b));
        if same {
            return Ok(Reconciled {
                changes: None,
                kept_unix,
            });
        }
        let removed = current
            .iter()
            .filter(|l| !set.iter().any(|n| Rc::ptr_eq(n, l)))
            .map(|l| l.bind.to_string());
        let mut changes: Vec<String> = set
            .iter()
            .filter(|l| !current.iter().any(|c| Rc::ptr_eq(c, l)))
            .map(|l| format!("+{}", l.bind))
            .collect();
        changes.extend(removed.map(|b| format!("-{b} (once its workers drained)")));
        // A set left for `next` by a reload that never happened goes.
        if let Some(stale) = self.sets.insert(next, set) {
            close(stale);
        }
        Ok(Reconciled {
            changes: Some(changes),
            kept_unix,
        })
    }

    /// Close the sets no generation in `live` uses (that of a refused or
    /// abandoned reload included); unlink the socket files only they held.
    /// Returns the binds closed.
    pub(crate) fn retire_unused(&mut self, live: &BTreeSet<u32>) -> Vec<String> {
        let keys: Vec<u32> = self.sets.keys().copied().collect();
        let mut closed = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let end = keys.get(i + 1).copied().unwrap_or(u32::MAX);
            if live.range(key..&end).next().is_some() || self.sets.len() == 1 {
                continue;
            }
            if let Some(set) = self.sets.remove(key) {
                closed.extend(close(set));
            }
        }
        closed
    }
}

/// Drop a set: the listeners no other set shares are closed and unlinked.
fn close(set: Vec<Rc<Listener>>) -> Vec<String> {
    set.into_iter()
        .filter_map(|l| Rc::try_unwrap(l).ok())
        .map(|last| {
            last.cleanup();
            last.bind.to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn unix() -> UnixOptions {
        UnixOptions {
            mode: 0o600,
            gid: None,
            backlog: 16,
        }
    }

    fn config(binds: &[String]) -> Config {
        let mut c = Config::embedded();
        c.server.bind = binds.to_vec();
        c
    }

    #[test]
    fn a_bind_change_adds_a_set_and_the_old_one_closes_once_unused() {
        let dir = std::env::temp_dir().join(format!("notesd-sockets-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let a = format!("unix:{}", dir.join("a.sock").display());
        let b = format!("unix:{}", dir.join("b.sock").display());
        let first =
            listener::bind_all(&config(std::slice::from_ref(&a)).binds(), unix()).expect("bind a");
        let mut sockets = Sockets::new(first);
        // Same binds: nothing new.
        assert_eq!(
            sockets
                .reconcile(2, &config(std::slice::from_ref(&a)), unix())
                .expect("same")
                .changes,
            None
        );
        assert!(sockets.is_settled());
        // a → a + b: a is the same socket, b is new.
        let changes = sockets
            .reconcile(2, &config(&[a.clone(), b.clone()]), unix())
            .expect("a+b")
            .changes
            .expect("changed");
        assert_eq!(changes, vec![format!("+{b}")]);
        assert!(Rc::ptr_eq(
            &sockets.for_generation(1)[0],
            &sockets.for_generation(2)[0]
        ));
        assert_eq!(sockets.for_generation(2).len(), 2);
        assert_eq!(sockets.for_generation(7).len(), 2);
        // a + b → b: a goes once generations before 3 are gone.
        sockets
            .reconcile(3, &config(std::slice::from_ref(&b)), unix())
            .expect("b")
            .changes
            .expect("changed");
        assert!(sockets.retire_unused(&BTreeSet::from([2, 3])).is_empty());
        assert!(dir.join("a.sock").exists(), "generation 2 still uses a");
        let closed = sockets.retire_unused(&BTreeSet::from([3]));
        assert_eq!(closed, vec![a.clone()]);
        assert!(!dir.join("a.sock").exists(), "a is unlinked once unused");
        assert!(
            dir.join("b.sock").exists(),
            "b is shared with the newest set"
        );
        assert!(sockets.is_settled());
        // A reload to generation 4 that never serves: its new socket goes again.
        let c = format!("unix:{}", dir.join("c.sock").display());
        sockets
            .reconcile(4, &config(std::slice::from_ref(&c)), unix())
            .expect("c")
            .changes
            .expect("changed");
        assert!(dir.join("c.sock").exists());
        assert_eq!(sockets.retire_unused(&BTreeSet::from([3])), vec![c.clone()]);
        assert!(
            !dir.join("c.sock").exists(),
            "the abandoned generation's socket is closed"
        );
        assert_eq!(sockets.for_generation(5)[0].bind.to_string(), b);
        for l in sockets.all() {
            l.cleanup();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_reconcile_leaves_nothing_and_a_draining_address_is_reused() {
        let dir = std::env::temp_dir().join(format!("notesd-sockets2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let a = format!("unix:{}", dir.join("a.sock").display());
        let b = format!("unix:{}", dir.join("b.sock").display());
        let bad = format!("unix:{}", dir.join("missing/dir/c.sock").display());
        let first =
            listener::bind_all(&config(std::slice::from_ref(&a)).binds(), unix()).expect("bind a");
        let mut sockets = Sockets::new(first);
        // a → a + b + (unbindable): refused; b's file does not stay behind.
        assert!(
            sockets
                .reconcile(2, &config(&[a.clone(), b.clone(), bad]), unix())
                .is_err()
        );
        assert!(!dir.join("b.sock").exists(), "the half-done bind is undone");
        assert!(sockets.is_settled());
        // a → b (generation 2), then back to a (generation 3) while
        // generation 1 still drains on a: the same socket, not "in use".
        sockets
            .reconcile(2, &config(std::slice::from_ref(&b)), unix())
            .expect("b");
        let back = sockets
            .reconcile(3, &config(std::slice::from_ref(&a)), unix())
            .expect("back to a while it drains");
        assert_eq!(back.kept_unix, vec![dir.join("a.sock")]);
        assert!(Rc::ptr_eq(
            &sockets.for_generation(1)[0],
            &sockets.for_generation(3)[0]
        ));
        for l in sockets.all() {
            l.cleanup();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
