//! notesd under systemd, black-box: sd_notify (READY, RELOADING + MONOTONIC_USEC,
//! STOPPING, STATUS), the watchdog (WATCHDOG_USEC/WATCHDOG_PID) and socket
//! activation (LISTEN_FDS/LISTEN_PID), the way systemd drives them: the test
//! plays the service manager with its own notify socket and its own listening
//! socket, and inspects the processes through /proc.
//!
//! Each test spawns the real binary with its own temp dir; see tests/common.

mod common;

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// The service manager's side of sd_notify
// ---------------------------------------------------------------------------

/// One datagram received on the notify socket.
#[derive(Debug, Clone)]
struct Message {
    /// When the test received it.
    at: Instant,
    text: String,
}

impl Message {
    /// The assignments of the datagram (`KEY=value`, one per line).
    fn lines(&self) -> impl Iterator<Item = &str> {
        self.text.lines().map(str::trim).filter(|l| !l.is_empty())
    }

    /// True when one line is exactly `assignment` (e.g. `READY=1`).
    fn has(&self, assignment: &str) -> bool {
        self.lines().any(|l| l == assignment)
    }

    /// The value of `KEY=` in this datagram, if present.
    fn value(&self, key: &str) -> Option<&str> {
        self.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    }
}

/// A NOTIFY_SOCKET: a unix datagram socket the test reads, as systemd does.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    /// Everything received so far, in order.
    seen: Vec<Message>,
}

impl NotifySocket {
    fn bind(path: &Path) -> NotifySocket {
        let sock = UnixDatagram::bind(path)
            .unwrap_or_else(|e| panic!("bind the notify socket {}: {e}", path.display()));
        NotifySocket {
            sock,
            path: path.to_path_buf(),
            seen: Vec::new(),
        }
    }

    /// `NOTIFY_SOCKET=<path>` for `TestOptions::env`.
    fn env(&self) -> (String, String) {
        ("NOTIFY_SOCKET".to_string(), self.path.display().to_string())
    }

    /// The next datagram within `timeout`, if any.
    fn next(&mut self, timeout: Duration) -> Option<Message> {
        let timeout = timeout.max(Duration::from_millis(1));
        self.sock
            .set_read_timeout(Some(timeout))
            .expect("set the notify socket's read timeout");
        let mut buf = vec![0u8; 64 * 1024];
        match self.sock.recv(&mut buf) {
            Ok(n) => {
                let msg = Message {
                    at: Instant::now(),
                    text: String::from_utf8_lossy(&buf[..n]).into_owned(),
                };
                self.seen.push(msg.clone());
                Some(msg)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("recv on the notify socket: {e}"),
        }
    }

    /// Receives until a datagram satisfies `pred`; returns (the datagrams
    /// before it, it). Panics after `timeout` with everything received.
    fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Message) -> bool,
    ) -> (Vec<Message>, Message) {
        let deadline = Instant::now() + timeout;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "no sd_notify datagram {what} within {timeout:?}; received meanwhile: {:?}\n\
                     all datagrams so far: {:?}",
                    texts(&before),
                    texts(&self.seen)
                );
            }
            if let Some(msg) = self.next(left) {
                if pred(&msg) {
                    return (before, msg);
                }
                before.push(msg);
            }
        }
    }

    /// Everything that arrives within `window` (waits the whole window).
    fn collect(&mut self, window: Duration) -> Vec<Message> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return out;
            }
            if let Some(msg) = self.next(left) {
                out.push(msg);
            }
        }
    }

    /// Whatever is already queued (does not wait beyond a few ms).
    fn drain(&mut self) -> Vec<Message> {
        let mut out = Vec::new();
        while let Some(msg) = self.next(Duration::from_millis(5)) {
            out.push(msg);
        }
        out
    }
}

fn texts(msgs: &[Message]) -> Vec<&str> {
    msgs.iter().map(|m| m.text.as_str()).collect()
}

// ---------------------------------------------------------------------------
// /proc helpers
// ---------------------------------------------------------------------------

/// The environment `pid` was exec'd with (/proc/PID/environ).
fn environ(pid: i32) -> Vec<String> {
    let raw = fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/environ: {e}"));
    raw.split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| String::from_utf8_lossy(kv).into_owned())
        .collect()
}

/// The value of `name` in `pid`'s exec-time environment.
fn environ_var(pid: i32, name: &str) -> Option<String> {
    let prefix = format!("{name}=");
    environ(pid)
        .into_iter()
        .find_map(|kv| kv.strip_prefix(&prefix).map(str::to_string))
}

/// Panics when a worker's environment carries one of `names` (they belong to
/// the master: a worker that inherits NOTIFY_SOCKET could send READY=1 or
/// WATCHDOG=1 on the master's behalf, or adopt LISTEN_FDS).
fn assert_env_not_inherited(workers: &[i32], names: &[&str]) {
    assert!(!workers.is_empty(), "no worker pids to check");
    for pid in workers {
        for name in names {
            if let Some(v) = environ_var(*pid, name) {
                panic!("worker {pid} inherited {name}={v} (it belongs to the master)");
            }
        }
    }
}

/// Socket inodes among `pid`'s open fds (from the `socket:[N]` links).
fn socket_inodes(pid: i32) -> Vec<u64> {
    let mut out = Vec::new();
    let dir = format!("/proc/{pid}/fd");
    let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {dir}: {e}"));
    for entry in entries.flatten() {
        if let Ok(target) = fs::read_link(entry.path())
            && let Some(ino) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse().ok())
        {
            out.push(ino);
        }
    }
    out
}

/// CLOCK_MONOTONIC now, in µs (the clock MONOTONIC_USEC= is measured on).
fn monotonic_usec() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("clock_gettime(CLOCK_MONOTONIC)");
    ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1_000
}

fn ready_of_generation(status: &Value, generation: u64) -> Vec<i32> {
    let mut pids: Vec<i32> = workers(status)
        .iter()
        .filter(|w| w["state"] == "ready" && w["generation"].as_u64() == Some(generation))
        .map(worker_pid)
        .collect();
    pids.sort_unstable();
    pids
}

/// Each of `pids` is logged as ready in `log_then`, the log as it was when
/// `what` arrived: the master must learn that a worker is ready (and log it)
/// before it tells systemd so. The status alone cannot show an early READY=1:
/// workers boot within milliseconds of each other, faster than `notesd status`.
fn assert_ready_logged_before(pids: &[i32], log_then: &str, what: &str) {
    for pid in pids {
        let needle = format!("worker {pid} ");
        assert!(
            log_then
                .lines()
                .any(|l| l.contains(&needle) && l.contains(" ready")),
            "{what} was sent before the master knew worker {pid} was ready: no line \
             {needle:?}…\"ready\" in its log at that moment:\n{log_then}"
        );
    }
}

const NOTIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// True when `pid` runs `notesd worker` (exec done; not the migrate child).
fn is_worker_process(pid: i32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        c.split(|b| *b == 0)
            .nth(1)
            .is_some_and(|arg| arg == b"worker")
    })
}

/// Watches the master's children closely and SIGSTOPs the first `notesd
/// worker` seen, most likely in the middle of its boot; returns its pid.
fn freeze_first_worker(master: i32, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(pid) = children_of(master)
            .into_iter()
            .find(|p| is_worker_process(*p))
        {
            send_signal(pid, Signal::SIGSTOP);
            return Some(pid);
        }
        thread::sleep(Duration::from_micros(200));
    }
    None
}

// 1 -------------------------------------------------------------------------

/// READY=1 only once the first generation is ready; STATUS=; RELOADING=1 with
/// MONOTONIC_USEC= then READY=1 around a HUP; STOPPING=1 on TERM; workers do
/// not inherit NOTIFY_SOCKET; no WATCHDOG=1 when systemd asked for none.
#[test]
fn sd_notify_ready_reloading_stopping() {
    let ndir = TempDir::new("notify");
    let mut notify = NotifySocket::bind(&ndir.join("notify.sock"));
    let mut server = TestServer::spawn(
        "sd_notify",
        TestOptions {
            env: vec![notify.env()],
            ..TestOptions::default()
        },
    );
    let master = server.master_pid();

    // --- boot: READY=1 only once the workers are ready -----------------------
    // Freeze one worker mid-boot: as long as it is not ready, neither is the
    // first generation, and READY=1 must wait.
    let frozen = freeze_first_worker(master, BOOT_TIMEOUT)
        .unwrap_or_else(|| panic!("no worker process appeared within {BOOT_TIMEOUT:?}"));
    let frozen_status = server.wait_for("the frozen worker in the status", NOTIFY_TIMEOUT, |s| {
        workers(s).iter().any(|w| worker_pid(w) == frozen)
    });
    if !ready_pids(&frozen_status).contains(&frozen) {
        let early = notify.collect(Duration::from_millis(700));
        let status = server.status();
        eprintln!(
            "worker {frozen} frozen mid-boot; meanwhile: {:?}; status: {status}",
            texts(&early)
        );
        assert!(
            !ready_pids(&status).contains(&frozen),
            "worker {frozen} is SIGSTOPped, yet the status says it is ready: {status}"
        );
        assert!(
            notify.seen.iter().all(|m| !m.has("READY=1")),
            "READY=1 sent while worker {frozen} of the first generation was still \
             booting (SIGSTOPped by the test); datagrams: {:?}; status: {status}",
            texts(&notify.seen)
        );
    } else {
        eprintln!(
            "(worker {frozen} was already ready when frozen: the early-READY check is \
             inconclusive this run; status: {frozen_status})"
        );
    }
    send_signal(frozen, Signal::SIGCONT);
    let (before_ready, ready) =
        notify.wait_for("READY=1 (boot)", BOOT_TIMEOUT, |m| m.has("READY=1"));
    // Snapshot at once what exists at the moment READY=1 arrived: the
    // processes, and what the master has logged (it logs each worker's
    // readiness as it learns of it).
    let children_at_ready = children_of(master);
    let log_at_ready = server.log();
    let status = server.status();
    let t_status = ready.at.elapsed();
    eprintln!(
        "before READY=1: {:?}\nREADY datagram: {:?}\nchildren then: {children_at_ready:?}\n\
         status {t_status:?} later: {status}",
        texts(&before_ready),
        ready.text
    );
    assert!(
        is_steady(&status, 2),
        "READY=1 came before the first generation was ready: the status taken \
         {t_status:?} after READY=1 is not 2 ready workers (phase running): {status}"
    );
    let pids0 = ready_pids(&status);
    for pid in &pids0 {
        assert!(
            children_at_ready.contains(pid),
            "ready worker {pid} did not exist yet when READY=1 arrived \
             (the master's children then: {children_at_ready:?}; status: {status})"
        );
    }
    assert_ready_logged_before(&pids0, &log_at_ready, "READY=1 (boot)");
    assert!(
        before_ready.iter().all(|m| !m.has("READY=1")),
        "READY=1 sent before the workers existed: {:?}",
        texts(&before_ready)
    );
    let status_line = notify
        .seen
        .iter()
        .find_map(|m| m.value("STATUS").filter(|v| !v.trim().is_empty()))
        .unwrap_or_else(|| panic!("no non-empty STATUS= line among {:?}", texts(&notify.seen)))
        .to_string();
    assert!(
        status_line.contains("worker"),
        "STATUS= should tell about the workers: {status_line:?}"
    );
    assert_eq!(server.get("/").status, 200);

    // Workers must not inherit NOTIFY_SOCKET; the master did get it (sanity).
    assert_eq!(
        environ_var(master, "NOTIFY_SOCKET").as_deref(),
        Some(notify.path.to_str().expect("utf-8 path")),
        "the master was started with NOTIFY_SOCKET"
    );
    assert_env_not_inherited(&pids0, &["NOTIFY_SOCKET"]);

    // --- HUP: RELOADING=1 + MONOTONIC_USEC, then READY=1 once the new
    // generation serves.
    let gen0 = generation(&status);
    let settled = notify.collect(Duration::from_millis(300));
    assert!(
        settled.iter().all(|m| !m.has("READY=1")),
        "a second READY=1 without any reload: {:?}",
        texts(&settled)
    );
    let t_before = monotonic_usec();
    server.signal(Signal::SIGHUP);
    let (before_reloading, reloading) =
        notify.wait_for("RELOADING=1 (after HUP)", NOTIFY_TIMEOUT, |m| {
            m.has("RELOADING=1")
        });
    let t_after = monotonic_usec();
    assert!(
        before_reloading.iter().all(|m| !m.has("READY=1")),
        "READY=1 between the HUP and RELOADING=1: {:?}",
        texts(&before_reloading)
    );
    let usec: u64 = reloading
        .value("MONOTONIC_USEC")
        .unwrap_or_else(|| {
            panic!(
                "RELOADING=1 must come with MONOTONIC_USEC= in the same datagram \
                 (Type=notify-reload): {:?}",
                reloading.text
            )
        })
        .trim()
        .parse()
        .unwrap_or_else(|e| {
            panic!(
                "MONOTONIC_USEC= is not a number ({e}): {:?}",
                reloading.text
            )
        });
    assert!(
        (t_before..=t_after).contains(&usec),
        "MONOTONIC_USEC={usec} is not CLOCK_MONOTONIC at the reload \
         (between {t_before} and {t_after} µs)"
    );

    let (_, reloaded) = notify.wait_for("READY=1 (after the reload)", NOTIFY_TIMEOUT, |m| {
        m.has("READY=1")
    });
    let log_at_reloaded = server.log();
    let status = server.status();
    let t_status = reloaded.at.elapsed();
    let gen1 = generation(&status);
    assert!(
        gen1 > gen0,
        "READY=1 after a HUP, but the status taken {t_status:?} later still shows \
         generation {gen1} (was {gen0}): {status}"
    );
    let pids1 = ready_of_generation(&status, gen1);
    assert!(
        pids1.len() >= 2,
        "READY=1 after a HUP before the new generation was serving: the status taken \
         {t_status:?} later has {} ready worker(s) of generation {gen1}: {status}",
        pids1.len()
    );
    for pid in &pids1 {
        assert!(
            !pids0.contains(pid),
            "worker {pid} of the new generation was in the old one too: {pids0:?}"
        );
    }
    assert_ready_logged_before(&pids1, &log_at_reloaded, "READY=1 (after the reload)");
    // systemctl shows this STATUS= as the unit's StatusText once the reload
    // is done: it must not still say "reloading" (old workers may still drain).
    let text = reloaded.value("STATUS").unwrap_or_default();
    assert!(
        text.starts_with("running"),
        "READY=1 after the reload carries STATUS={text:?}, not \"running …\": {:?}",
        reloaded.text
    );
    assert_eq!(server.get("/").status, 200);
    assert_env_not_inherited(&pids1, &["NOTIFY_SOCKET"]);

    // --- HUP during a graceful stop: no RELOADING=1 (nothing would follow it)
    // — checked below, with TERM.

    // --- TERM: STOPPING=1, exit 0 --------------------------------------------
    notify.drain();
    server.signal(Signal::SIGTERM);
    let (before_stopping, _) = notify.wait_for("STOPPING=1 (after TERM)", NOTIFY_TIMEOUT, |m| {
        m.has("STOPPING=1")
    });
    server.signal(Signal::SIGHUP);
    assert!(
        before_stopping.iter().all(|m| !m.has("READY=1")),
        "READY=1 after TERM: {:?}",
        texts(&before_stopping)
    );
    assert_eq!(server.expect_exit_code(Duration::from_secs(10)), 0);
    let after = notify.drain();
    assert!(
        after.iter().all(|m| !m.has("READY=1")),
        "READY=1 after STOPPING=1: {:?}",
        texts(&after)
    );
    assert!(
        after.iter().all(|m| !m.has("RELOADING=1")),
        "RELOADING=1 for a HUP during the stop, which no READY=1 follows: {:?}",
        texts(&after)
    );
    assert!(
        notify.seen.iter().all(|m| !m.has("WATCHDOG=1")),
        "WATCHDOG=1 sent although WATCHDOG_USEC was not set: {:?}",
        texts(&notify.seen)
    );
}

// 2 -------------------------------------------------------------------------

/// Starts a server with NOTIFY_SOCKET, WATCHDOG_USEC=400000 and, when given,
/// WATCHDOG_PID (`$$` = the master's own pid, as systemd sets it).
fn start_with_watchdog(
    name: &str,
    watchdog_pid: Option<&str>,
) -> (TempDir, NotifySocket, TestServer) {
    let ndir = TempDir::new(name);
    let notify = NotifySocket::bind(&ndir.join("notify.sock"));
    let server = TestServer::start(
        name,
        TestOptions {
            env: vec![
                notify.env(),
                ("WATCHDOG_USEC".to_string(), "400000".to_string()),
            ],
            sh_prefix: watchdog_pid.map(|p| format!("WATCHDOG_PID={p}")),
            ..TestOptions::default()
        },
    );
    (ndir, notify, server)
}

/// WATCHDOG_USEC of the watchdog tests: 400 ms.
const WATCHDOG: Duration = Duration::from_millis(400);

/// Watches the notify socket for `window`; returns the number of WATCHDOG=1
/// and the gaps between them (the first and the last measured from the
/// window's edges, so they can only understate a real gap).
fn watch_pings(
    notify: &mut NotifySocket,
    window: Duration,
) -> (usize, Vec<Duration>, Vec<Message>) {
    notify.drain();
    let start = Instant::now();
    let msgs = notify.collect(window);
    let end = Instant::now();
    let pings: Vec<Instant> = msgs
        .iter()
        .filter(|m| m.has("WATCHDOG=1"))
        .map(|m| m.at)
        .collect();
    let mut gaps = Vec::new();
    let mut prev = start;
    for at in &pings {
        gaps.push(at.duration_since(prev));
        prev = *at;
    }
    gaps.push(end.duration_since(prev));
    (pings.len(), gaps, msgs)
}

/// At least 3 WATCHDOG=1 in 1.5 s, and never WATCHDOG_USEC without one
/// (systemd would then kill the service with SIGABRT).
fn assert_pings(what: &str, count: usize, gaps: &[Duration], msgs: &[Message]) {
    let max_gap = gaps.iter().max().copied().unwrap_or_default();
    eprintln!("{what}: {count} WATCHDOG=1 in 1.5 s; gaps {gaps:?}");
    assert!(
        count >= 3,
        "{what}: WATCHDOG_USEC=400000, expected at least 3 WATCHDOG=1 in 1.5 s, got {count} \
         (datagrams: {:?})",
        texts(msgs)
    );
    assert!(
        max_gap < WATCHDOG,
        "{what}: systemd would have killed the service: {max_gap:?} without WATCHDOG=1 \
         (WATCHDOG_USEC=400000; gaps {gaps:?})"
    );
}

#[test]
fn watchdog_pings_repeatedly() {
    let (_ndir, mut notify, server) = start_with_watchdog("watchdog", Some("$$"));
    let master = server.master_pid();
    assert_eq!(
        environ_var(master, "WATCHDOG_PID"),
        Some(master.to_string()),
        "the wrapper set WATCHDOG_PID to the master's pid (sanity)"
    );
    let (count, gaps, msgs) = watch_pings(&mut notify, Duration::from_millis(1500));
    assert_pings("idle master", count, &gaps, &msgs);
    assert_env_not_inherited(
        &server.worker_pids(),
        &["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"],
    );
}

/// How often the "monitoring agent" of the next test asks for the status.
const STATUS_EVERY: Duration = Duration::from_millis(230);

// Regression: the master once slept a whole tick from its last wake-up, so a
// status query every 230 ms deferred ticks (and WATCHDOG=1) to every 460 ms,
// past WATCHDOG_USEC=400 ms. The poll timeout is now the time left until the
// next tick or ping, whatever woke the master in between.
#[test]

fn watchdog_never_lapses_while_status_is_polled() {
    // A monitoring agent asking for the status now and then wakes the
    // master's loop between its ticks: the pings must keep their pace anyway.
    let (_ndir, mut notify, server) = start_with_watchdog("watchdog_polled", Some("$$"));
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let stop = Arc::clone(&stop);
        let config = server.client_config_path().display().to_string();
        thread::spawn(move || {
            let mut n = 0;
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let out = run_notesd(&["status", "-c", config.as_str()]);
                assert_eq!(out.code, Some(0), "status: {}", out.describe());
                n += 1;
                next += STATUS_EVERY;
                thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            n
        })
    };
    let (count, gaps, msgs) = watch_pings(&mut notify, Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let polls = poller.join().expect("the status poller");
    assert_pings(
        &format!("{polls} status queries meanwhile"),
        count,
        &gaps,
        &msgs,
    );
}

#[test]
fn watchdog_without_watchdog_pid_pings_too() {
    // WATCHDOG_PID unset: sd_watchdog_enabled() semantics say the watchdog is ours.
    let (_ndir, mut notify, server) = start_with_watchdog("watchdog_nopid", None);
    notify.drain();
    let msgs = notify.collect(Duration::from_millis(1500));
    let pings = msgs.iter().filter(|m| m.has("WATCHDOG=1")).count();
    assert!(
        pings >= 3,
        "WATCHDOG_USEC=400000 without WATCHDOG_PID: expected at least 3 WATCHDOG=1 in \
         1.5 s, got {pings} (datagrams: {:?})",
        texts(&msgs)
    );
    assert_env_not_inherited(&server.worker_pids(), &["WATCHDOG_USEC", "WATCHDOG_PID"]);
}

#[test]
fn watchdog_for_another_pid_is_not_ours() {
    // WATCHDOG_PID names another process (as when the variable leaked from a
    // parent): sd_watchdog_enabled() semantics say the watchdog is not ours.
    let (_ndir, mut notify, _server) = start_with_watchdog("watchdog_other", Some("1"));
    let msgs = notify.collect(Duration::from_millis(1000));
    assert!(
        notify.seen.iter().all(|m| !m.has("WATCHDOG=1")),
        "WATCHDOG=1 sent although WATCHDOG_PID=1 is another process: {:?}",
        texts(&msgs)
    );
}

// 3 -------------------------------------------------------------------------

/// LISTEN_FDS=1 with our own socket at fd 3: notesd serves on it, does not
/// bind `server.bind`, does not pass LISTEN_* on to workers, and does not
/// unlink (or stop) a socket it did not create.
#[test]
fn socket_activation_serves_on_the_passed_socket_and_leaves_it_alone() {
    let adir = TempDir::new("activation");
    let activated = adir.join("activated.sock");
    let listener = UnixListener::bind(&activated)
        .unwrap_or_else(|e| panic!("bind {}: {e}", activated.display()));
    let inode = nix::sys::stat::fstat(listener.as_fd())
        .expect("fstat our listening socket")
        .st_ino;
    let passed: OwnedFd = listener
        .try_clone()
        .expect("dup our listening socket")
        .into();
    let mut server = TestServer::start(
        "activation",
        TestOptions {
            sh_prefix: Some("LISTEN_PID=$$ LISTEN_FDS=1".to_string()),
            inherit_fds: vec![(Arc::new(passed), 3)],
            client_socket: Some(activated.clone()),
            ..TestOptions::default()
        },
    );
    let master = server.master_pid();
    let bind_path = server.socket_path().to_path_buf();
    assert_ne!(bind_path, activated);
    assert_eq!(
        environ_var(master, "LISTEN_PID"),
        Some(master.to_string()),
        "the wrapper set LISTEN_PID to the master's pid (sanity)"
    );

    let resp = server.get("/healthz");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json(), json!({"ok": true}));
    for _ in 0..10 {
        let resp = server.get("/");
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.json(), json!({"message": "Hello, production!"}));
    }
    assert!(
        !bind_path.exists(),
        "socket activation must win over server.bind, yet {} was created",
        bind_path.display()
    );

    let status = server.status();
    let pids = ready_pids(&status);
    assert_eq!(pids.len(), 2, "2 ready workers: {status}");
    for pid in &pids {
        let inodes = socket_inodes(*pid);
        assert!(
            inodes.contains(&inode),
            "worker {pid} does not hold the activated socket (inode {inode}); its sockets: {inodes:?}"
        );
    }
    assert_env_not_inherited(&pids, &["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"]);

    server.signal(Signal::SIGTERM);
    assert_eq!(server.expect_exit_code(Duration::from_secs(10)), 0);
    let meta = fs::symlink_metadata(&activated).unwrap_or_else(|e| {
        panic!(
            "notesd removed the socket systemd (here: the test) passed it: {}: {e}",
            activated.display()
        )
    });
    assert!(
        meta.file_type().is_socket(),
        "{} is still a socket",
        activated.display()
    );
    assert!(
        !bind_path.exists(),
        "{} appeared at shutdown",
        bind_path.display()
    );
    // The socket still listens (notesd must not shut it down): systemd keeps it
    // for the next activation.
    let _client = UnixStream::connect(&activated)
        .unwrap_or_else(|e| panic!("connect to the activated socket after notesd exited: {e}"));
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let accepted = poll_until(Duration::from_secs(2), || listener.accept().is_ok());
    assert!(
        accepted,
        "the activated socket no longer accepts connections"
    );
}

/// An abstract unix socket from systemd (`ListenStream=@name`), here passed
/// by `systemd-socket-activate` beside a path one: USR2 used to kill the
/// master (its handover record named the socket `unix:`, which the new image
/// could not parse). Now the upgrade goes through, both sockets serve on,
/// and the probe checks everything the new image will take over.
#[test]
fn an_upgrade_keeps_an_abstract_socket_from_systemd() {
    let Some(activate) = [
        "/usr/bin/systemd-socket-activate",
        "/bin/systemd-socket-activate",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists()) else {
        skip_unless_ci(
            "systemd-socket-activate",
            "systemd-socket-activate is not installed",
            "; apt-get install systemd",
        );
        return;
    };
    let dir = TempDir::new("abstract");
    let path = dir.join("act.sock");
    let name = format!("notesd-test-{}", std::process::id());
    let mut server = TestServer::spawn(
        "abstract",
        TestOptions {
            wrap: vec![
                activate.to_string(),
                format!("--listen=@{name}"),
                format!("--listen={}", path.display()),
            ],
            client_socket: Some(path.clone()),
            ..TestOptions::default()
        },
    );
    // systemd-socket-activate execs notesd at the first connection.
    let trigger = poll_until(Duration::from_secs(5), || {
        UnixStream::connect(&path).is_ok()
    });
    assert!(
        trigger,
        "systemd-socket-activate listens on {}",
        path.display()
    );
    server.wait_ready();
    let master = server.master_pid();
    let s0 = server.status();
    let get_abstract = || -> Result<String, std::io::Error> {
        use std::io::{Read, Write};
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        let mut c = UnixStream::connect_addr(&addr)?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        c.read_to_string(&mut text)?;
        Ok(text)
    };
    let before = get_abstract().expect("GET over the abstract socket");
    assert!(before.starts_with("HTTP/1.1 200"), "{before}");
    assert!(
        server.log().contains(&format!("unix:@{name}")),
        "the log names the abstract socket:\n{}",
        server.log_tail()
    );

    server.signal(Signal::SIGUSR2);
    let s = server.wait_for(
        "the upgrade's new generation",
        Duration::from_secs(20),
        |s| generation(s) > generation(&s0) && is_steady(s, 2) && all_of_current_generation(s),
    );
    assert!(server.try_exit_status().is_none(), "the master lives");
    assert_eq!(s["master_pid"], master, "{s}");
    assert!(server.log().contains("re-exec'd in place"));
    let after = get_abstract().expect("GET over the abstract socket after the upgrade");
    assert!(after.starts_with("HTTP/1.1 200"), "{after}");
    assert_eq!(server.get("/healthz").status, 200);
    server.signal(Signal::SIGTERM);
    assert_eq!(server.expect_exit_code(Duration::from_secs(10)), 0);
    assert!(path.exists(), "systemd's socket path is left alone");
}
