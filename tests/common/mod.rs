//! Black-box test harness for `notesd`, in the spirit of zero2prod's `spawn_app`
//! and nginx-tests: every test gets its own temp dir and config, spawns the real
//! binary, talks HTTP/1.1 over the unix socket, sends real signals, and on drop
//! asserts that the server's log is clean (no panic, no ERROR line).
//!
//! Every wait in here is bounded; every failure message carries enough context
//! (status snapshot, log tail) to be debugged from the test output alone.

// Each integration test crate compiles this module and uses only part of it.
#![allow(dead_code)]

pub mod hosts;
pub mod load;
pub mod nginx;
pub mod notes;

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

pub use nix::sys::signal::Signal;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use serde_json::Value;

/// Path of the binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_notesd");

/// How long `TestServer::start` waits for the first generation to be ready.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(20);

/// Bound on one `notesd status/check/healthcheck` invocation.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(10);

/// Read/write timeout of the test HTTP client.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Lines of log shown in failure messages.
const LOG_TAIL_LINES: usize = 80;

// ---------------------------------------------------------------------------
// Temp dirs
// ---------------------------------------------------------------------------

static DIR_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory directly under /tmp (unix socket paths must stay < 108
/// bytes). Removed on drop, unless the thread is panicking (kept for post-mortem).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let n = DIR_COUNTER.fetch_add(1, Ordering::SeqCst);
        let short: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(20)
            .collect();
        let path = PathBuf::from(format!("/tmp/nd-{}-{}-{}", std::process::id(), n, short));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("(test dir kept for inspection: {})", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------

/// A `notesd` command with an environment that cannot leak into the test:
/// no journald/systemd/socket-activation variables, no config or database
/// overrides from the developer's shell, no colours in the log.
pub fn notesd_cmd<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    clean_env(&mut cmd);
    cmd
}

/// The environment hygiene of `notesd_cmd`, for any command that ends up
/// running notesd (e.g. through a `sh -c` wrapper).
fn clean_env(cmd: &mut Command) {
    for var in [
        "NOTESD_CONFIG",
        "NOTESD_DATABASE_URL",
        "DATABASE_URL",
        "NOTESD_DEBUG_ROUTES",
        "JOURNAL_STREAM",
        "NOTIFY_SOCKET",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("NO_COLOR", "1");
    cmd.stdin(Stdio::null());
}

/// What a finished (or timed-out) command produced.
#[derive(Debug)]
pub struct CmdOutput {
    /// Exit code; `None` when killed by a signal or by our timeout.
    pub code: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CmdOutput {
    pub fn describe(&self) -> String {
        format!(
            "exit code {:?} (timed out: {}) after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.timed_out, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion, at most `timeout` (then SIGKILLs it).
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> CmdOutput {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    let out_reader = spawn_pipe_reader(child.stdout.take().expect("stdout is piped"));
    let err_reader = spawn_pipe_reader(child.stderr.take().expect("stderr is piped"));
    let mut timed_out = false;
    let status = loop {
        match child.try_wait().expect("try_wait on a spawned command") {
            Some(status) => break status,
            None if start.elapsed() > timeout => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().expect("wait after kill");
            }
            None => thread::sleep(Duration::from_millis(10)),
        }
    };
    let elapsed = start.elapsed();
    // The readers end when the pipes close; a grandchild still holding them
    // must not hang the test, hence the bounded receive.
    let stdout = out_reader
        .recv_timeout(Duration::from_secs(2))
        .unwrap_or_default();
    let stderr = err_reader
        .recv_timeout(Duration::from_secs(2))
        .unwrap_or_default();
    CmdOutput {
        code: status.code(),
        timed_out,
        stdout,
        stderr,
        elapsed,
    }
}

fn spawn_pipe_reader<R: Read + Send + 'static>(mut pipe: R) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}

/// Runs `notesd ARGS…` with the default command timeout.
pub fn run_notesd(args: &[&str]) -> CmdOutput {
    run_with_timeout(notesd_cmd(args), CMD_TIMEOUT)
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------

/// Knobs of a test server. `Default` is a 2-worker server with debug routes on.
#[derive(Clone, Debug)]
pub struct TestOptions {
    pub workers: u32,
    pub timeout: u64,
    pub graceful_timeout: u64,
    pub keepalive: u64,
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    /// `None`: a SQLite file in the test dir.
    pub database_url: Option<String>,
    pub migrate_on_start: bool,
    pub log_level: String,
    /// Extra `key = value` lines placed inside `[server]`.
    pub server_extra: String,
    /// Extra TOML appended at the end of the file (whole tables, e.g. `[http]`).
    pub extra_toml: String,
    /// Extra environment for `notesd serve`.
    pub env: Vec<(String, String)>,
    /// Sets `NOTESD_DEBUG_ROUTES=1` on `notesd serve`.
    pub debug_routes: bool,
    /// `log.format`: "text" (the default) or "json".
    pub log_format: String,
    /// Extra `key = value` lines placed inside `[log]` (e.g. `file = "…"`).
    pub log_extra: String,
    /// When set, the master is started as
    /// `sh -c '<prefix> exec "$0" "$@"' notesd serve -c CONFIG`, so the prefix
    /// can use the master's own pid (`$$`), e.g. `LISTEN_PID=$$ LISTEN_FDS=1`.
    /// `master_pid()` stays right: `exec` keeps the pid.
    pub sh_prefix: Option<String>,
    /// Open fds the master inherits at fixed numbers: (fd, number), dup2'd in
    /// the child just before exec (which clears close-on-exec), as systemd
    /// passes activated sockets at fd 3. The targets must be distinct and must
    /// not be the source of a later entry.
    pub inherit_fds: Vec<(Arc<OwnedFd>, RawFd)>,
    /// The unix socket the test client talks to (`request`, `load`, the
    /// readiness probe) when it is not the configured bind path (socket
    /// activation: the test's own socket). `None`: `paths.socket`.
    pub client_socket: Option<PathBuf>,
    /// Send the master's stdout to `<dir>/stdout.log` instead of the log, so
    /// that the log (`log()`, the drop check) is its stderr alone.
    pub separate_stdout: bool,
    /// Start the master from this binary instead of `BIN` (the upgrade tests
    /// replace the file at this path, as a package upgrade does).
    pub exe: Option<PathBuf>,
    /// Run the master through this command (e.g. `ip netns exec NS`), which
    /// must exec it (the pid stays the master's).
    pub wrap: Vec<String>,
    /// More `server.bind` entries after the test's unix socket (e.g. a TCP address).
    pub extra_binds: Vec<String>,
}

impl Default for TestOptions {
    fn default() -> Self {
        TestOptions {
            workers: 2,
            timeout: 30,
            graceful_timeout: 5,
            keepalive: 5,
            max_requests: 0,
            max_requests_jitter: 0,
            database_url: None,
            migrate_on_start: true,
            log_level: "info".to_string(),
            server_extra: String::new(),
            extra_toml: String::new(),
            env: Vec::new(),
            debug_routes: true,
            log_format: "text".to_string(),
            log_extra: String::new(),
            sh_prefix: None,
            inherit_fds: Vec::new(),
            client_socket: None,
            separate_stdout: false,
            exe: None,
            wrap: Vec::new(),
            extra_binds: Vec::new(),
        }
    }
}

/// A TOML basic string literal.
pub fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Paths of one test server inside its temp dir.
#[derive(Clone, Debug)]
pub struct ServerPaths {
    pub config: PathBuf,
    pub socket: PathBuf,
    pub control: PathBuf,
    pub pidfile: PathBuf,
    pub db: PathBuf,
    pub log: PathBuf,
}

impl ServerPaths {
    pub fn in_dir(dir: &Path) -> ServerPaths {
        ServerPaths {
            config: dir.join("notesd.toml"),
            socket: dir.join("notesd.sock"),
            control: dir.join("control.sock"),
            pidfile: dir.join("notesd.pid"),
            db: dir.join("notesd.db"),
            log: dir.join("notesd.log"),
        }
    }
}

/// Renders the config file text for `opts` with the given paths.
pub fn render_config(paths: &ServerPaths, opts: &TestOptions) -> String {
    let db_url = opts
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", paths.db.display()));
    let mut text = format!(
        "[server]\n\
         bind = [{bind}]\n\
         workers = {workers}\n\
         timeout = {timeout}\n\
         graceful_timeout = {graceful}\n\
         keepalive = {keepalive}\n\
         max_requests = {max_requests}\n\
         max_requests_jitter = {jitter}\n\
         control_socket = {control}\n\
         pidfile = {pidfile}\n",
        bind = std::iter::once(format!("unix:{}", paths.socket.display()))
            .chain(opts.extra_binds.iter().cloned())
            .map(|b| toml_str(&b))
            .collect::<Vec<_>>()
            .join(", "),
        workers = opts.workers,
        timeout = opts.timeout,
        graceful = opts.graceful_timeout,
        keepalive = opts.keepalive,
        max_requests = opts.max_requests,
        jitter = opts.max_requests_jitter,
        control = toml_str(&paths.control.display().to_string()),
        pidfile = toml_str(&paths.pidfile.display().to_string()),
    );
    if !opts.server_extra.is_empty() {
        text.push_str(opts.server_extra.trim_end());
        text.push('\n');
    }
    text.push_str(&format!(
        "\n[database]\nurl = {}\nmigrate_on_start = {}\n\n[log]\nlevel = {}\nformat = {}\n",
        toml_str(&db_url),
        opts.migrate_on_start,
        toml_str(&opts.log_level),
        toml_str(&opts.log_format),
    ));
    if !opts.log_extra.is_empty() {
        text.push_str(opts.log_extra.trim_end());
        text.push('\n');
    }
    if !opts.extra_toml.is_empty() {
        text.push('\n');
        text.push_str(opts.extra_toml.trim_end());
        text.push('\n');
    }
    text
}

// ---------------------------------------------------------------------------
// TestServer
// ---------------------------------------------------------------------------

/// One `notesd serve` master with its own temp dir, config, socket and log.
pub struct TestServer {
    pub opts: TestOptions,
    pub paths: ServerPaths,
    child: Option<Child>,
    exit_status: Option<ExitStatus>,
    allow_errors: bool,
    // Declared last: dropped after the checks in `Drop for TestServer`.
    dir: TempDir,
}

impl TestServer {
    /// Spawns the server and waits (bounded) until the first generation is
    /// ready and /healthz answers 200.
    pub fn start(name: &str, opts: TestOptions) -> TestServer {
        let mut server = TestServer::spawn(name, opts);
        server.wait_ready();
        server
    }

    /// Spawns the server without waiting for anything (for boot-failure tests).
    pub fn spawn(name: &str, opts: TestOptions) -> TestServer {
        let dir = TempDir::new(name);
        let paths = ServerPaths::in_dir(dir.path());
        let mut server = TestServer {
            opts,
            paths,
            child: None,
            exit_status: None,
            allow_errors: false,
            dir,
        };
        server.write_config();
        server.spawn_master();
        server
    }

    /// Starts a new master with the same dir and config, after the previous one
    /// exited (its log is appended to). Waits until ready.
    pub fn restart(&mut self) {
        assert!(
            self.try_exit_status().is_some(),
            "restart() needs the previous master to have exited"
        );
        self.child = None;
        self.exit_status = None;
        self.spawn_master();
        self.wait_ready();
    }

    fn spawn_master(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.paths.log)
            .expect("open the server log file");
        let log2 = log.try_clone().expect("clone the log file handle");
        let config = self.paths.config.display().to_string();
        let mut cmd = match &self.opts.sh_prefix {
            None => {
                let exe = self.opts.exe.as_deref().unwrap_or(Path::new(BIN));
                let mut cmd = match self.opts.wrap.split_first() {
                    Some((first, rest)) => {
                        let mut cmd = Command::new(first);
                        cmd.args(rest).arg(exe);
                        cmd
                    }
                    None => Command::new(exe),
                };
                cmd.args(["serve", "-c", config.as_str()]);
                clean_env(&mut cmd);
                cmd
            }
            Some(prefix) => {
                let mut cmd = Command::new("/bin/sh");
                cmd.arg("-c")
                    .arg(format!("{prefix} exec \"$0\" \"$@\""))
                    .args([BIN, "serve", "-c", config.as_str()]);
                clean_env(&mut cmd);
                cmd
            }
        };
        let stdout = if self.opts.separate_stdout {
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.stdout_path())
                .expect("open the server stdout file")
        } else {
            log
        };
        cmd.stdout(stdout).stderr(log2);
        if self.opts.debug_routes {
            cmd.env("NOTESD_DEBUG_ROUTES", "1");
        }
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and
        // exec. If the test process dies abruptly, the master dies with it (and
        // its workers follow through their own PDEATHSIG).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        if !self.opts.inherit_fds.is_empty() {
            let plan: Vec<(RawFd, RawFd)> = self
                .opts
                .inherit_fds
                .iter()
                .map(|(fd, target)| (fd.as_raw_fd(), *target))
                .collect();
            // SAFETY: only dup2/fcntl (async-signal-safe) on fds that the
            // Arcs in `self.opts` keep open until after the spawn.
            unsafe {
                cmd.pre_exec(move || {
                    for &(src, target) in &plan {
                        if src == target {
                            // dup2(n, n) would keep close-on-exec: clear it.
                            let flags = libc::fcntl(src, libc::F_GETFD);
                            if flags < 0
                                || libc::fcntl(src, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                            {
                                return Err(io::Error::last_os_error());
                            }
                        } else if libc::dup2(src, target) < 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {BIN} serve: {e}"));
        self.child = Some(child);
    }

    /// (Re)writes the config file from `self.opts`.
    ///
    /// Also writes `client.toml`, the copy that `status()` and `run()` use to
    /// find the control socket: a test may put an invalid config in place (to
    /// check that a HUP rejects it) and still needs to ask the master.
    pub fn write_config(&self) {
        let text = render_config(&self.paths, &self.opts);
        self.write_raw_config(&text);
        fs::write(self.client_config_path(), &text).expect("write client.toml");
    }

    /// The last valid config written by `write_config` (see there).
    pub fn client_config_path(&self) -> PathBuf {
        self.dir.join("client.toml")
    }

    /// Replaces the config file with `text` verbatim.
    pub fn write_raw_config(&self, text: &str) {
        // Write then rename, so a reload never reads a half-written file.
        let tmp = self.paths.config.with_extension("toml.tmp");
        fs::write(&tmp, text).expect("write config");
        fs::rename(&tmp, &self.paths.config).expect("rename config into place");
    }

    /// The current config file text.
    pub fn config_text(&self) -> String {
        fs::read_to_string(&self.paths.config).expect("read config")
    }

    pub fn config_path(&self) -> &Path {
        &self.paths.config
    }

    pub fn socket_path(&self) -> &Path {
        &self.paths.socket
    }

    /// The unix socket the test client talks to: `opts.client_socket`, else
    /// the configured bind path.
    pub fn client_socket(&self) -> &Path {
        self.opts
            .client_socket
            .as_deref()
            .unwrap_or(&self.paths.socket)
    }

    /// Where the master's stdout goes with `opts.separate_stdout`.
    pub fn stdout_path(&self) -> PathBuf {
        self.dir.join("stdout.log")
    }

    pub fn dir(&self) -> &TempDir {
        &self.dir
    }

    /// The master's pid (`serve` runs in the foreground: it is our child).
    pub fn master_pid(&self) -> i32 {
        let child = self.child.as_ref().expect("the master was spawned");
        i32::try_from(child.id()).expect("pid fits in i32")
    }

    /// Sends `sig` to the master.
    pub fn signal(&self, sig: Signal) {
        send_signal(self.master_pid(), sig);
    }

    /// Don't fail the drop-time log check on ` ERROR ` lines (panics still fail it).
    pub fn allow_errors(&mut self) {
        self.allow_errors = true;
    }

    /// The whole log so far, ANSI sequences stripped.
    pub fn log(&self) -> String {
        let bytes = fs::read(&self.paths.log).unwrap_or_default();
        strip_ansi(&String::from_utf8_lossy(&bytes))
    }

    pub fn log_len(&self) -> usize {
        fs::metadata(&self.paths.log)
            .map(|m| m.len() as usize)
            .unwrap_or(0)
    }

    /// The log written after byte offset `from` (see `log_len`).
    pub fn log_since(&self, from: usize) -> String {
        let bytes = fs::read(&self.paths.log).unwrap_or_default();
        let from = from.min(bytes.len());
        strip_ansi(&String::from_utf8_lossy(&bytes[from..]))
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log(), LOG_TAIL_LINES)
    }

    /// Waits (bounded) for a line satisfying `pred` in the log written after
    /// byte offset `from` (0 = the whole log); returns it.
    pub fn wait_for_log_line(
        &self,
        from: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let mut found = None;
        poll_until(timeout, || {
            found = self
                .log_since(from)
                .lines()
                .find(|l| pred(l))
                .map(str::to_string);
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!("no log line {what} within {timeout:?} (the log tail follows)")
        })
    }

    /// The master's exit status if it has exited (reaps it).
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit_status.is_none()
            && let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            self.exit_status = Some(status);
        }
        self.exit_status
    }

    /// Waits up to `timeout` for the master to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the master to exit and returns its exit code;
    /// panics (with the log tail) when it is still running or died by a signal.
    pub fn expect_exit_code(&mut self, timeout: Duration) -> i32 {
        let status = self.wait_exit(timeout).unwrap_or_else(|| {
            panic!("master still running {timeout:?} later (the log tail follows)")
        });
        status.code().unwrap_or_else(|| {
            panic!("master died by a signal ({status:?}) (the log tail follows)")
        })
    }

    /// SIGKILLs the master and reaps it.
    pub fn kill_master(&mut self) {
        if self.try_exit_status().is_some() {
            return;
        }
        let child = self.child.as_mut().expect("the master was spawned");
        let _ = child.kill();
        if let Ok(status) = child.wait() {
            self.exit_status = Some(status);
        }
    }

    /// Runs `notesd ARGS… -c CONFIG` (bounded), with the last valid config
    /// written by `write_config`.
    pub fn run(&self, args: &[&str]) -> CmdOutput {
        let config = self.client_config_path().display().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-c", config.as_str()]);
        run_notesd(&all)
    }

    /// `notesd status --json`, parsed; Err with a description when unreachable.
    pub fn try_status(&self) -> Result<Value, String> {
        let out = self.run(&["status", "--json"]);
        if out.code != Some(0) {
            return Err(format!("status --json failed: {}", out.describe()));
        }
        serde_json::from_str(out.stdout.trim()).map_err(|e| {
            format!(
                "status --json printed invalid JSON ({e}): {}",
                out.describe()
            )
        })
    }

    /// `notesd status --json`, parsed; panics (with the log tail) on failure.
    pub fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|e| panic!("{e}\n(the log tail follows)"))
    }

    /// Polls status until `pred` holds; returns that status. Panics on timeout
    /// with the last status and the log tail.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        self.try_wait_for(timeout, pred).unwrap_or_else(|last| {
            panic!(
                "timed out after {timeout:?} waiting for {what}\nlast status: {last}\n\
                 (the log tail follows)"
            )
        })
    }

    /// Polls status until `pred` holds; Err(last status or error) on timeout.
    pub fn try_wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            match self.try_status() {
                Ok(status) if pred(&status) => return Ok(status),
                Ok(status) => last = status.to_string(),
                Err(e) => last = e,
            }
            if Instant::now() >= deadline {
                return Err(last);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until phase is running and exactly `n` workers exist, all ready
    /// (and target_workers == n).
    pub fn wait_steady(&self, n: usize, timeout: Duration) -> Value {
        self.wait_for(&format!("{n} ready workers, phase running"), timeout, |s| {
            is_steady(s, n)
        })
    }

    /// Pids of the workers in state ready, sorted.
    pub fn worker_pids(&self) -> Vec<i32> {
        ready_pids(&self.status())
    }

    /// GET `path` over a fresh connection; panics on transport errors.
    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[])
    }

    /// One request over a fresh connection; panics on transport errors.
    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
        let mut conn = HttpConn::connect(self.client_socket()).unwrap_or_else(|e| {
            panic!(
                "connect to {}: {e} (the log tail follows)",
                self.client_socket().display()
            )
        });
        conn.request(method, path, headers)
            .unwrap_or_else(|e| panic!("{method} {path} failed: {e:?} (the log tail follows)"))
    }

    /// Starts a keep-alive load generator against this server.
    pub fn load(&self, connections: usize, path: &str) -> Load {
        Load::start(
            self.client_socket(),
            connections,
            path,
            Duration::from_secs(60),
        )
    }

    /// Waits until the first generation is ready (phase running, `opts.workers`
    /// ready workers) and /healthz answers 200.
    pub fn wait_ready(&mut self) {
        let n = self.opts.workers as usize;
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let mut last;
        loop {
            if let Some(status) = self.try_exit_status() {
                panic!(
                    "notesd serve exited during boot ({status:?})\n--- log tail ---\n{}",
                    self.log_tail()
                );
            }
            match self.try_status() {
                Ok(s) if is_steady(&s, n) => {
                    if let Ok(mut conn) = HttpConn::connect(self.client_socket())
                        && let Ok(resp) = conn.request("GET", "/healthz", &[])
                        && resp.status == 200
                    {
                        return;
                    }
                    last = format!("{s} (but GET /healthz did not answer 200 yet)");
                }
                Ok(s) => last = s.to_string(),
                Err(e) => last = e,
            }
            if Instant::now() >= deadline {
                panic!(
                    "server not ready within {BOOT_TIMEOUT:?} ({n} ready workers, phase running)\n\
                     last status: {last}\n--- log tail ---\n{}",
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if self.try_exit_status().is_none() {
            let master = Pid::from_raw(self.master_pid());
            // Freeze the master (so it logs nothing about what follows), kill
            // its workers (one that a test SIGSTOPped would never act on the
            // PDEATHSIG and must not outlive the test), then the master.
            let _ = kill(master, Signal::SIGSTOP);
            for pid in children_of(master.as_raw()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            self.kill_master();
        }
        let log = self.log();
        let mut problems = Vec::new();
        for line in log.lines() {
            let error = !self.allow_errors && line.contains(" ERROR ");
            if line.contains("panicked") || error {
                problems.push(line.to_string());
            }
        }
        if thread::panicking() {
            eprintln!(
                "--- notesd log tail ({}) ---\n{}\n--- end of log ---",
                self.paths.log.display(),
                tail(&log, LOG_TAIL_LINES)
            );
        } else if !problems.is_empty() {
            panic!(
                "the server log has {} unexpected line(s) (panic or ERROR):\n{}\n--- full log ---\n{}",
                problems.len(),
                problems.join("\n"),
                log
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Status helpers
// ---------------------------------------------------------------------------

/// The `workers` array of a status (empty when absent).
pub fn workers(status: &Value) -> Vec<Value> {
    status["workers"].as_array().cloned().unwrap_or_default()
}

pub fn worker_pid(w: &Value) -> i32 {
    w["pid"]
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
        .unwrap_or(-1)
}

/// Sorted pids of the workers in state ready.
pub fn ready_pids(status: &Value) -> Vec<i32> {
    let mut pids: Vec<i32> = workers(status)
        .iter()
        .filter(|w| w["state"] == "ready")
        .map(worker_pid)
        .collect();
    pids.sort_unstable();
    pids
}

/// Sorted pids of all workers, whatever their state.
pub fn all_pids(status: &Value) -> Vec<i32> {
    let mut pids: Vec<i32> = workers(status).iter().map(worker_pid).collect();
    pids.sort_unstable();
    pids
}

pub fn generation(status: &Value) -> u64 {
    status["generation"].as_u64().unwrap_or(0)
}

/// Phase running, target_workers == n, exactly n workers, all ready.
pub fn is_steady(status: &Value, n: usize) -> bool {
    let ws = workers(status);
    status["phase"] == "running"
        && status["target_workers"].as_u64() == Some(n as u64)
        && ws.len() == n
        && ws.iter().all(|w| w["state"] == "ready")
}

/// All workers of `status` belong to its current generation.
pub fn all_of_current_generation(status: &Value) -> bool {
    let g = generation(status);
    workers(status)
        .iter()
        .all(|w| w["generation"].as_u64() == Some(g))
}

// ---------------------------------------------------------------------------
// HTTP/1.1 client over a unix socket
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// True when the server announced it will close the connection.
    pub fn connection_close(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }

    /// True when the connection cannot carry another request after this
    /// response (to a HEAD request when `head`): the server announced
    /// `Connection: close`, or the body ran until it closed.
    pub fn ends_connection(&self, head: bool) -> bool {
        self.connection_close() || matches!(Framing::of(self, head), Ok(Framing::UntilClose))
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {:?}", self.body))
    }
}

#[derive(Debug)]
pub enum HttpError {
    /// Connecting failed.
    Connect(io::Error),
    /// The server closed the connection (EOF, reset, or broken pipe on write)
    /// before any byte of the response arrived.
    ClosedBeforeResponse(String),
    /// Read or write timed out.
    Timeout(String),
    /// Anything else: a malformed or truncated response, another I/O error.
    Other(String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Connect(e) => write!(f, "connect: {e}"),
            HttpError::ClosedBeforeResponse(m) => write!(f, "closed before a response: {m}"),
            HttpError::Timeout(m) => write!(f, "timeout: {m}"),
            HttpError::Other(m) => write!(f, "{m}"),
        }
    }
}

impl HttpError {
    fn from_io(e: io::Error, got_bytes: bool, during: &str) -> HttpError {
        let msg = format!("{during}: {e}");
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HttpError::Timeout(msg),
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
                if !got_bytes =>
            {
                HttpError::ClosedBeforeResponse(msg)
            }
            _ => HttpError::Other(msg),
        }
    }
}

/// One client connection; supports keep-alive (several requests in sequence).
pub struct HttpConn {
    reader: BufReader<UnixStream>,
    /// Responses fully read on this connection.
    pub responses: usize,
}

impl HttpConn {
    pub fn connect(path: &Path) -> Result<HttpConn, HttpError> {
        HttpConn::connect_with_timeout(path, HTTP_TIMEOUT)
    }

    pub fn connect_with_timeout(path: &Path, timeout: Duration) -> Result<HttpConn, HttpError> {
        let stream = UnixStream::connect(path).map_err(HttpError::Connect)?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(HttpError::Connect)?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(HttpError::Connect)?;
        Ok(HttpConn {
            reader: BufReader::new(stream),
            responses: 0,
        })
    }

    /// True when a response was already read on this connection (it is reused).
    pub fn is_reused(&self) -> bool {
        self.responses > 0
    }

    /// Writes raw bytes; Err when the server already closed the connection.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        let stream = self.reader.get_mut();
        stream.write_all(bytes)?;
        stream.flush()
    }

    /// Sends one request without a body (keep-alive is HTTP/1.1's default).
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(), HttpError> {
        self.send_raw(&build_request(method, path, headers, None))
            .map_err(|e| HttpError::from_io(e, false, "writing the request"))
    }

    /// Reads one response (to a request other than HEAD).
    pub fn read_response(&mut self) -> Result<Response, HttpError> {
        self.read_response_to(false)
    }

    /// Reads one response; `head`: it answers a HEAD request (no body follows).
    pub fn read_response_to(&mut self, head: bool) -> Result<Response, HttpError> {
        let resp = parse_response(&mut self.reader, head)?;
        self.responses += 1;
        Ok(resp)
    }

    /// Sends a request and reads its response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Response, HttpError> {
        self.send(method, path, headers)?;
        self.read_response()
    }
}

/// The bytes of one HTTP/1.1 request: `body` gets a Content-Length unless
/// `headers` already frame it (Content-Length or Transfer-Encoding).
pub fn build_request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    let framed = headers.iter().any(|(k, _)| {
        k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding")
    });
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body
        && !framed
    {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(b);
    }
    bytes
}

/// `data` as a chunked body in chunks of `size` bytes, with the final chunk.
pub fn chunked(data: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for c in data.chunks(size) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

// ---------------------------------------------------------------------------
// HTTP/1.1 responses from any byte stream
// ---------------------------------------------------------------------------

const MAX_LINE: usize = 64 * 1024;
const MAX_BODY: usize = 16 * 1024 * 1024;
const MAX_HEADERS: usize = 200;

/// The status code of an `HTTP/1.x NNN reason` line.
pub fn parse_status_line(line: &str) -> Option<u16> {
    line.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|_| line.starts_with("HTTP/1."))
}

/// How the body of a response is delimited (RFC 9112 §6.3).
enum Framing {
    /// HEAD, 1xx, 204, 304: no body, whatever the headers say.
    Empty,
    Chunked,
    Length(usize),
    /// No length: the body runs until the server closes the connection.
    UntilClose,
}

impl Framing {
    fn of(resp: &Response, head: bool) -> Result<Framing, HttpError> {
        let status = resp.status;
        if head || status == 204 || status == 304 || (100..200).contains(&status) {
            Ok(Framing::Empty)
        } else if resp
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            Ok(Framing::Chunked)
        } else if let Some(len) = resp.header("content-length") {
            len.parse()
                .map(Framing::Length)
                .map_err(|_| HttpError::Other(format!("bad Content-Length {len:?}")))
        } else {
            Ok(Framing::UntilClose)
        }
    }
}

/// Reads one response from `reader`: the parser behind every test client
/// (`HttpConn`, `notes::Client`, `nginx::TcpClient`). `head`: it answers a
/// HEAD request (no body follows). EOF, a reset or a broken pipe before any
/// byte is `ClosedBeforeResponse`; a timeout is `Timeout`; a malformed or
/// truncated response is `Other`.
pub fn parse_response(reader: &mut impl BufRead, head: bool) -> Result<Response, HttpError> {
    let status_line = match read_line(reader) {
        Ok(Some(line)) => line,
        Ok(None) => {
            return Err(HttpError::ClosedBeforeResponse(
                "EOF before the status line".to_string(),
            ));
        }
        Err((e, got)) => return Err(HttpError::from_io(e, got, "reading the status line")),
    };
    let status = parse_status_line(&status_line)
        .ok_or_else(|| HttpError::Other(format!("bad status line {status_line:?}")))?;

    let mut headers = Vec::new();
    loop {
        let line = read_line(reader)
            .map_err(|(e, _)| HttpError::from_io(e, true, "reading headers"))?
            .ok_or_else(|| HttpError::Other("EOF in the headers".to_string()))?;
        if line.is_empty() {
            break;
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| HttpError::Other(format!("bad header line {line:?}")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        if headers.len() > MAX_HEADERS {
            return Err(HttpError::Other("too many headers".to_string()));
        }
    }
    let mut resp = Response {
        status,
        headers,
        body: String::new(),
    };

    let body = match Framing::of(&resp, head)? {
        Framing::Empty => Vec::new(),
        Framing::Chunked => read_chunked(reader)?,
        Framing::Length(len) => {
            if len > MAX_BODY {
                return Err(HttpError::Other(format!("body too large: {len}")));
            }
            let mut body = vec![0; len];
            reader
                .read_exact(&mut body)
                .map_err(|e| HttpError::from_io(e, true, &format!("reading a {len}-byte body")))?;
            body
        }
        Framing::UntilClose => {
            let mut body = Vec::new();
            reader
                .take(MAX_BODY as u64)
                .read_to_end(&mut body)
                .map_err(|e| HttpError::from_io(e, true, "reading a body to EOF"))?;
            body
        }
    };
    resp.body = String::from_utf8_lossy(&body).into_owned();
    Ok(resp)
}

/// One CRLF-terminated line without its terminator; Ok(None) on EOF before
/// any byte. On error, also tells whether any byte was read.
fn read_line(reader: &mut impl BufRead) -> Result<Option<String>, (io::Error, bool)> {
    let mut buf = Vec::new();
    match reader.take(MAX_LINE as u64).read_until(b'\n', &mut buf) {
        Ok(0) => Ok(None),
        Ok(_) if !buf.ends_with(b"\n") => Err((
            io::Error::new(io::ErrorKind::UnexpectedEof, "line truncated or too long"),
            true,
        )),
        Ok(_) => {
            while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                buf.pop();
            }
            Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
        }
        Err(e) => {
            let got = !buf.is_empty();
            Err((e, got))
        }
    }
}

fn read_chunked(reader: &mut impl BufRead) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    loop {
        let line = read_line(reader)
            .map_err(|(e, _)| HttpError::from_io(e, true, "reading a chunk size"))?
            .ok_or_else(|| HttpError::Other("EOF in a chunked body".to_string()))?;
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| HttpError::Other(format!("bad chunk size line {line:?}")))?;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let t = read_line(reader)
                    .map_err(|(e, _)| HttpError::from_io(e, true, "reading trailers"))?
                    .ok_or_else(|| HttpError::Other("EOF in trailers".to_string()))?;
                if t.is_empty() {
                    return Ok(body);
                }
            }
        }
        if body.len() + size > MAX_BODY {
            return Err(HttpError::Other("chunked body too large".to_string()));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader
            .read_exact(&mut body[start..])
            .map_err(|e| HttpError::from_io(e, true, "reading a chunk"))?;
        let mut crlf = [0u8; 2];
        reader
            .read_exact(&mut crlf)
            .map_err(|e| HttpError::from_io(e, true, "reading a chunk's CRLF"))?;
        if &crlf != b"\r\n" {
            return Err(HttpError::Other("chunk not followed by CRLF".to_string()));
        }
    }
}

// ---------------------------------------------------------------------------
// Load generator
// ---------------------------------------------------------------------------

/// Upper bound on load connections: the machine has 2 cores.
pub const MAX_LOAD_CONNECTIONS: usize = 8;

#[derive(Debug, Clone, Default)]
pub struct LoadStats {
    /// Requests answered 200 (including those that succeeded on a retry).
    pub ok: u64,
    /// Connect errors, non-200 answers, errors mid-response, timeouts, failed retries.
    pub failed: u64,
    /// Requests resent once because a reused keep-alive connection was closed
    /// by the server before any byte of the response (RFC 9112 §9.3.1).
    pub retried: u64,
    /// Responses that carried `Connection: close`.
    pub closed_by_server: u64,
    /// The first few failures, for diagnostics.
    pub errors: Vec<String>,
}

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    closed_by_server: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
}

impl Counters {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if errors.len() < 20 {
            errors.push(what);
        }
    }
}

/// N threads, each looping `GET path` on its own keep-alive connection until
/// `stop()` or `max_duration`.
pub struct Load {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(socket: &Path, connections: usize, path: &str, max_duration: Duration) -> Load {
        assert!(
            (1..=MAX_LOAD_CONNECTIONS).contains(&connections),
            "load connections must be 1..={MAX_LOAD_CONNECTIONS}"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let deadline = Instant::now() + max_duration;
        let threads = (0..connections)
            .map(|i| {
                let stop = Arc::clone(&stop);
                let counters = Arc::clone(&counters);
                let socket = socket.to_path_buf();
                let path = path.to_string();
                thread::Builder::new()
                    .name(format!("load-{i}"))
                    .spawn(move || load_loop(&socket, &path, &stop, deadline, &counters))
                    .expect("spawn a load thread")
            })
            .collect();
        Load {
            stop,
            counters,
            threads,
        }
    }

    /// Requests answered 200 so far.
    pub fn ok_so_far(&self) -> u64 {
        self.counters.ok.load(Ordering::Relaxed)
    }

    /// Stops the threads (bounded: every request has a timeout) and returns the counts.
    pub fn stop(mut self) -> LoadStats {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                self.counters.fail("a load thread panicked".to_string());
            }
        }
        LoadStats {
            ok: self.counters.ok.load(Ordering::SeqCst),
            failed: self.counters.failed.load(Ordering::SeqCst),
            retried: self.counters.retried.load(Ordering::SeqCst),
            closed_by_server: self.counters.closed_by_server.load(Ordering::SeqCst),
            errors: self
                .counters
                .errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

const LOAD_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

fn load_loop(socket: &Path, path: &str, stop: &AtomicBool, deadline: Instant, c: &Counters) {
    let mut conn: Option<HttpConn> = None;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let mut current = match conn.take() {
            Some(existing) => existing,
            None => match HttpConn::connect_with_timeout(socket, LOAD_REQUEST_TIMEOUT) {
                Ok(fresh) => fresh,
                Err(e) => {
                    c.fail(format!("connect: {e:?}"));
                    thread::sleep(Duration::from_millis(20));
                    continue;
                }
            },
        };
        let reused = current.is_reused();
        let result = match current.request("GET", path, &[]) {
            Err(HttpError::ClosedBeforeResponse(why)) if reused => {
                // The server closed an idle keep-alive connection as we reused
                // it: resend once on a fresh connection, as every client does.
                c.retried.fetch_add(1, Ordering::Relaxed);
                match HttpConn::connect_with_timeout(socket, LOAD_REQUEST_TIMEOUT) {
                    Ok(mut fresh) => {
                        let r = fresh
                            .request("GET", path, &[])
                            .map_err(|e| format!("retry after ({why}) failed: {e:?}"));
                        current = fresh;
                        r
                    }
                    Err(e) => Err(format!("reconnect for a retry after ({why}): {e:?}")),
                }
            }
            other => other.map_err(|e| format!("{e:?} (connection reused: {reused})")),
        };
        match result {
            Ok(resp) => {
                if resp.status == 200 {
                    c.ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.fail(format!("status {} body {:?}", resp.status, resp.body));
                }
                if resp.connection_close() {
                    c.closed_by_server.fetch_add(1, Ordering::Relaxed);
                } else {
                    conn = Some(current);
                }
            }
            Err(e) => c.fail(e),
        }
    }
}

// ---------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------

static PG_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh PostgreSQL database, dropped (best effort) on drop.
pub struct PgDatabase {
    pub name: String,
    pub url: String,
}

/// `psql -c SQL` on database `postgres` (bounded).
fn psql(sql: &str) -> CmdOutput {
    notes::psql_on("postgres", sql)
}

/// Creates `notesd_test_<pid>_<n>` on 127.0.0.1:5432 (user postgres, trust auth).
/// When PostgreSQL is unreachable: panics under CI (env `CI` set), else prints a
/// loud SKIP and returns None.
pub fn fresh_pg_database() -> Option<PgDatabase> {
    let probe = if Command::new("psql").arg("--version").output().is_ok() {
        psql("SELECT 1")
    } else {
        CmdOutput {
            code: None,
            timed_out: false,
            stdout: String::new(),
            stderr: "psql is not installed".to_string(),
            elapsed: Duration::ZERO,
        }
    };
    if probe.code != Some(0) {
        let msg = format!(
            "PostgreSQL is not reachable at 127.0.0.1:5432 as user postgres: {}",
            probe.describe()
        );
        skip_unless_ci("PostgreSQL", &msg, "");
        return None;
    }
    let name = format!(
        "notesd_test_{}_{}",
        std::process::id(),
        PG_COUNTER.fetch_add(1, Ordering::SeqCst)
    );
    let _ = psql(&format!("DROP DATABASE IF EXISTS {name}"));
    let out = psql(&format!("CREATE DATABASE {name}"));
    assert_eq!(
        out.code,
        Some(0),
        "CREATE DATABASE {name} failed: {}",
        out.describe()
    );
    Some(PgDatabase {
        url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
        name,
    })
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = psql(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{}' AND pid <> pg_backend_pid()",
            self.name
        ));
        let out = psql(&format!("DROP DATABASE IF EXISTS {}", self.name));
        if out.code != Some(0) {
            eprintln!(
                "warning: could not drop database {}: {}",
                self.name,
                out.describe()
            );
        }
    }
}
