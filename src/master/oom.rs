//! Telling the kernel's OOM killer from other SIGKILLs: the service's cgroup
//! (cgroup v2) counts every process of it an OOM killer took, in
//! `memory.events` (`oom_kill N`). A worker that died of SIGKILL while that
//! count rose was OOM-killed. Without cgroup v2 or the memory controller
//! (a cgroup v1 host, some containers) there is no count: every SIGKILL is
//! then just a SIGKILL.

use std::path::PathBuf;

/// The count of the master's cgroup, and the last value seen.
pub(crate) struct OomWatch {
    events: Option<PathBuf>,
    last: u64,
}

impl OomWatch {
    /// The master's own cgroup (its workers share it), as now.
    pub(crate) fn new() -> OomWatch {
        let events = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|text| cgroup_dir(&text))
            .map(|dir| {
                PathBuf::from("/sys/fs/cgroup")
                    .join(dir)
                    .join("memory.events")
            })
            .filter(|p| p.is_file());
        let mut watch = OomWatch { events, last: 0 };
        watch.last = watch.count().unwrap_or(0);
        watch
    }

    fn count(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.events.as_ref()?).ok()?;
        oom_kills(&text)
    }

    /// The count rose since the last call (a SIGKILL just reaped was the
    /// OOM killer's).
    pub(crate) fn rose(&mut self) -> bool {
        match self.count() {
            Some(n) if n > self.last => {
                self.last = n;
                true
            }
            _ => false,
        }
    }
}

/// The cgroup v2 path of `/proc/self/cgroup` (`0::/system.slice/notesd.service`),
/// relative to the cgroup root.
fn cgroup_dir(proc_self_cgroup: &str) -> Option<String> {
    proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().trim_start_matches('/').to_string())
}

/// `oom_kill N` of a `memory.events` file.
fn oom_kills(memory_events: &str) -> Option<u64> {
    memory_events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oom_kill_count_is_read_from_memory_events() {
        let events = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(oom_kills(events), Some(2));
        assert_eq!(oom_kills("low 0\nhigh 0\n"), None);
        assert_eq!(oom_kills("oom_kill x\n"), None);
        assert_eq!(
            cgroup_dir("0::/system.slice/notesd.service\n").as_deref(),
            Some("system.slice/notesd.service")
        );
        // cgroup v1: no unified line.
        assert_eq!(
            cgroup_dir("12:memory:/user.slice\n1:name=systemd:/user.slice\n"),
            None
        );
    }

    #[test]
    fn a_rising_count_is_an_oom_kill_once() {
        let dir = std::env::temp_dir().join(format!("notesd-oom-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let events = dir.join("memory.events");
        std::fs::write(&events, "oom 0\noom_kill 4\n").expect("write");
        let mut w = OomWatch {
            events: Some(events.clone()),
            last: 4,
        };
        assert!(!w.rose(), "a plain SIGKILL");
        std::fs::write(&events, "oom 1\noom_kill 5\n").expect("write");
        assert!(w.rose(), "the OOM killer's");
        assert!(!w.rose(), "counted once");
        let mut none = OomWatch {
            events: None,
            last: 0,
        };
        assert!(!none.rose(), "no cgroup v2: never");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
