//! Running the binary: `notesd` commands with a clean environment, bounded
//! by a timeout.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Path of the binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_notesd");

/// Bound on one `notesd status/check/healthcheck` invocation.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(10);

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
pub(super) fn clean_env(cmd: &mut Command) {
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
