//! Processes: signals, liveness and children read from /proc, and the small
//! helpers every wait and failure message uses (polling, skipping, log text).

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

pub use nix::sys::signal::Signal;
use nix::sys::signal::kill;
use nix::unistd::Pid;

/// `cmd`'s process gets `sig` when the thread that spawned it dies
/// (`PR_SET_PDEATHSIG`): a test that dies abruptly leaves no server behind.
pub fn die_with_parent(cmd: &mut std::process::Command, sig: Signal) {
    use std::os::unix::process::CommandExt;
    let sig = sig as libc::c_int;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and
    // exec in this hook.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, sig);
            Ok(())
        });
    }
}

/// Sends `sig` to `pid`; panics when the process does not exist.
pub fn send_signal(pid: i32, sig: Signal) {
    kill(Pid::from_raw(pid), sig).unwrap_or_else(|e| panic!("kill({pid}, {sig:?}) failed: {e}"));
}

/// (state, ppid) from /proc/PID/stat, or None when there is no such process.
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parens: the fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// True when `pid` is a live process (not a zombie: a worker reparented to an
/// init that does not reap would otherwise look alive forever).
pub fn pid_alive(pid: i32) -> bool {
    matches!(proc_stat(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// Live children of `pid` (scans /proc).
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            if let Some((state, ppid)) = proc_stat(child)
                && ppid == pid
                && state != 'Z'
            {
                out.push(child);
            }
        }
    }
    out
}

/// `what` (PostgreSQL, nginx) is missing (`msg` says how): under CI (env
/// `CI` set) that is a failure (panics, `ci_hint` appended), else prints a
/// loud SKIP for the caller to return early.
pub fn skip_unless_ci(what: &str, msg: &str, ci_hint: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{msg}\n(CI is set: a missing {what} is a CI failure{ci_hint})");
    }
    eprintln!(
        "\n==================== SKIP ====================\n\
         {msg}\nthis {what} test did NOT run\n\
         ==============================================\n"
    );
}

/// Polls `pred` every 20 ms until it holds or `timeout` passes. Returns whether it held.
pub fn poll_until(timeout: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if pred() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Removes ANSI colour sequences, so log checks work whatever the formatter does.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters and intermediates, then one final byte in @..~
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// `promtool check metrics` (Debian's prometheus package) accepts `text`;
/// without promtool, a loud SKIP (a failure under CI).
pub fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    if Command::new("promtool").arg("--version").output().is_err() {
        skip_unless_ci(
            "promtool",
            "promtool not found (apt-get install prometheus)",
            "; .ci/run installs it",
        );
        return;
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
