//! The listening sockets by generation: what a reload that changes
//! `server.bind`, `socket_mode` or `socket_group` does to them.
//!
//! A set of listeners serves the generations from its key on, up to the next
//! set's key. A reload whose binds differ binds the new addresses first (a
//! failure refuses the reload; nothing changes), keeps the sockets of the
//! addresses still wanted (the very same socket, so no connection is refused
//! or lost), and adds the set for the new generation. The old set stays open
//! while a worker of its generations lives (they accept on their inherited
//! copies anyway); once none is left it is closed, and socket files no newer
//! set shares are unlinked. Sockets from systemd (LISTEN_FDS) are systemd's:
//! changes to them belong in notesd.socket, and a reload only says so.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use crate::config::{Bind, Config};
use crate::listener::{self, ListenError, Listener, UnixOptions};

pub(crate) struct Sockets {
    /// First generation served → the listeners, in `server.bind` order (the
    /// order workers get them in). Never empty; key 0 is the first set.
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

    /// One set only: no generation from before a bind change still drains.
    pub(crate) fn is_settled(&self) -> bool {
        self.sets.len() == 1
    }

    /// The set a reload to `config` wants for generation `next` (added), or
    /// `None` when the binds are the same (the unix sockets' mode and group
    /// are applied to the kept ones either way). Binding a new address can fail;
    /// then nothing changed.
    pub(crate) fn reconcile(
        &mut self,
        next: u32,
        config: &Config,
        unix: UnixOptions,
    ) -> Result<Option<Vec<String>>, ListenError> {
        let current: Vec<Rc<Listener>> = self.for_generation(next).to_vec();
        let wanted = config.binds();
        let mut set = Vec::new();
        let mut added = Vec::new();
        for bind in &wanted {
            match current.iter().find(|l| &l.bind == bind) {
                Some(kept) => {
                    if let Bind::Unix(path) = bind {
                        listener::apply_unix_options(path, unix)?;
                    }
                    set.push(kept.clone());
                }
                None => {
                    set.push(Rc::new(listener::bind_one(bind, unix)?));
                    added.push(bind.to_string());
                }
            }
        }
        let same =
            set.len() == current.len() && set.iter().zip(&current).all(|(a, b)| Rc::ptr_eq(a, b));
        if same {
            return Ok(None);
        }
        let removed = current
            .iter()
            .filter(|l| !set.iter().any(|n| Rc::ptr_eq(n, l)))
            .map(|l| l.bind.to_string());
        let mut changes: Vec<String> = added.into_iter().map(|b| format!("+{b}")).collect();
        changes.extend(removed.map(|b| format!("-{b} (once its workers drained)")));
        // A set left for `next` by a reload that never happened goes.
        if let Some(stale) = self.sets.insert(next, set) {
            close(stale);
        }
        Ok(Some(changes))
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
                .expect("same"),
            None
        );
        assert!(sockets.is_settled());
        // a → a + b: a is the same socket, b is new.
        let changes = sockets
            .reconcile(2, &config(&[a.clone(), b.clone()]), unix())
            .expect("a+b")
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
}
