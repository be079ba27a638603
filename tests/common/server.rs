//! TestServer: one `notesd serve` master with its own temp dir, config,
//! socket and log, checked for panics and ERROR lines on drop.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::kill;
use nix::unistd::Pid;
use serde_json::Value;

use super::{
    BIN, CmdOutput, HttpConn, Load, Response, ServerPaths, Signal, TempDir, TestOptions,
    children_of, clean_env, is_steady, poll_until, ready_pids, render_config, run_notesd,
    send_signal, strip_ansi, tail,
};

/// How long `TestServer::start` waits for the first generation to be ready.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(20);

/// Lines of log shown in failure messages.
const LOG_TAIL_LINES: usize = 80;

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
        // If the test process dies abruptly, the master dies with it (and its
        // workers follow through their own PDEATHSIG).
        super::die_with_parent(&mut cmd, super::Signal::SIGKILL);
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
