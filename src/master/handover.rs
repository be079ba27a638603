//! The master's re-exec in place (USR2, or a reload onto a changed binary).
//!
//! The master execs the binary at its resolved path in its own process, so its
//! PID — systemd's MainPID, the pidfile, its workers' parent — stays valid
//! (PR_SET_PDEATHSIG does not fire on the exec of a single-threaded parent).
//! What it holds goes along: every fd it must keep (listeners, control socket,
//! scoreboard, each worker's channel, the `notesd reload` clients waiting for
//! this reload) is inherited across the exec, and a [`Record`] saying what each
//! fd is, plus the state machine's [`Snapshot`], goes in a memfd whose number
//! the new image finds in `NOTESD_HANDOVER_FD`. The new image takes over
//! (`master::resume`) and runs a normal reload onto itself.
//!
//! # Why no request is lost
//!
//! 1. Before the exec the new binary runs as a child, `notesd handover-check`,
//!    on the very record, with every fd it names inherited, and takes them
//!    over exactly as the new image will (`master::adopt`: the version, each
//!    bind, the scoreboard's layout, the credentials, the state). A binary
//!    that cannot (too old or too new, not executable, crashing, hanging, a
//!    record it cannot carry through) is refused there; nothing has happened
//!    yet and the old master serves on.
//! 2. The master's signals are blocked from before the record is written
//!    until the exec ([`Blocked`]), and those whose handlers ran since the
//!    main loop last looked are raised again (`Signals::carry_over`): every
//!    TERM, HUP, TTIN … of those moments stays pending and reaches the new
//!    image's handlers once they are in place — or this image's, if the
//!    upgrade is refused. A stop (TERM, INT, QUIT) that arrives during the
//!    probe ends it: the upgrade is cancelled and the stop proceeds at once.
//! 3. If execve itself fails, the old image is still there: it puts its fds
//!    back to close-on-exec, unblocks the signals and serves on.
//! 4. Should the new image die before taking over anyway, the master's PID is
//!    gone: the workers (PR_SET_PDEATHSIG) finish their in-flight requests and
//!    exit, systemd restarts the service, and its listening socket (held by
//!    notesd.socket) queues new connections meanwhile.
//!
//! The workers never notice: they keep their channel (the same socket), their
//! scoreboard slot and their listeners; only the generation after the reload
//! runs the new binary.

use std::ffi::{CString, OsString};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use serde::{Deserialize, Serialize};

use crate::clock;
use crate::config::Overrides;
use crate::listener::ListenerRecord;
use crate::master::control::ClientRecord;
use crate::master::events::SIGNAL_TABLE;
use crate::master::state::Snapshot;
use crate::systemd;

/// The version of [`Record`] this binary writes.
pub const VERSION: u32 = 1;
/// The oldest record version this binary can take over from.
pub const MIN_VERSION: u32 = 1;
/// The environment variable naming the record's fd in the new image.
pub const ENV_FD: &str = "NOTESD_HANDOVER_FD";
/// How long `notesd handover-check` may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("the state cannot be handed over now: {0}")]
    NotNow(String),
    #[error("cannot write the handover record: {0}")]
    Write(String),
    #[error("cannot read the handover record: {0}")]
    Read(String),
    #[error("{0}")]
    Refused(String),
    #[error("execve {path}: {source}")]
    Exec { path: PathBuf, source: nix::Error },
}

/// What the old image tells the new one. Fds are numbers valid in the new
/// image (inherited across the exec).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub version: u32,
    /// The notesd version of the image that wrote it.
    pub from: String,
    pub overrides: Overrides,
    pub listeners: Vec<ListenerRecord>,
    /// The listeners came from systemd (LISTEN_FDS), not from `server.bind`.
    pub activated: bool,
    pub control: ListenerRecord,
    pub scoreboard_fd: RawFd,
    /// (worker pid, the master's end of its channel).
    pub channels: Vec<(i32, RawFd)>,
    /// Control clients waiting for the outcome of the reload that follows.
    pub reload_waiters: Vec<RawFd>,
    /// Other control clients in the middle of their request or answer.
    /// Added within version 1: an older record has none, an older image
    /// ignores them.
    #[serde(default)]
    pub control_clients: Vec<ClientRecord>,
    pub pidfile: Option<PathBuf>,
    pub state: Snapshot,
}

impl Record {
    /// Every fd the record names.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.listeners.iter().map(|l| l.fd).collect();
        fds.push(self.control.fd);
        fds.push(self.scoreboard_fd);
        fds.extend(self.channels.iter().map(|(_, fd)| *fd));
        fds.extend(&self.reload_waiters);
        fds.extend(self.control_clients.iter().map(|c| c.fd));
        fds
    }
}

/// What identifies the file at the binary's path: an upgrade replaces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExeId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl ExeId {
    pub fn of(path: &Path) -> Option<ExeId> {
        let m = std::fs::metadata(path).ok()?;
        Some(ExeId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// Write the record to a fresh memfd (close-on-exec until the exec).
pub fn write(record: &Record) -> Result<OwnedFd, HandoverError> {
    let err = |e: &dyn std::fmt::Display| HandoverError::Write(e.to_string());
    let bytes = serde_json::to_vec(record).map_err(|e| err(&e))?;
    let fd =
        nix::sys::memfd::memfd_create(c"notesd-handover", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(|e| err(&e))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(&bytes).map_err(|e| err(&e))?;
    file.rewind().map_err(|e| err(&e))?;
    Ok(file.into())
}

/// Read and check a record (in `handover-check` and in the new image).
/// Whether its contents can be taken over is `master::adopt`'s to say.
pub fn read(fd: BorrowedFd<'_>) -> Result<Record, HandoverError> {
    let err = |e: &dyn std::fmt::Display| HandoverError::Read(e.to_string());
    let mut file = std::fs::File::from(fd.try_clone_to_owned().map_err(|e| err(&e))?);
    file.rewind().map_err(|e| err(&e))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(|e| err(&e))?;
    let header: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| err(&e))?;
    let version = header.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    accepts(version)?;
    serde_json::from_slice(&bytes).map_err(|e| err(&e))
}

/// Can this binary take over from a record of `version`?
fn accepts(version: u64) -> Result<(), HandoverError> {
    if crate::test_variant("no-handover") {
        return Err(HandoverError::Refused(format!(
            "notesd {} takes no handover (a test build)",
            crate::VERSION
        )));
    }
    if !(u64::from(MIN_VERSION)..=u64::from(VERSION)).contains(&version) {
        return Err(HandoverError::Refused(format!(
            "notesd {} takes handover records {MIN_VERSION}..={VERSION}, not {version}",
            crate::VERSION
        )));
    }
    Ok(())
}

/// Run `exe handover-check` on the record, with every fd the record names
/// inherited, so that it takes them over exactly as the new image will
/// (`master::adopt`); Ok if it can. A stop signal (TERM, INT, QUIT) that
/// arrives meanwhile ends the probe at once: the upgrade gives way to it.
pub fn probe(exe: &Path, record: &OwnedFd, keep: &[RawFd]) -> Result<(), HandoverError> {
    use std::os::unix::process::CommandExt;
    let raw = record.as_raw_fd();
    let inherited: Vec<RawFd> = keep.iter().copied().chain([raw]).collect();
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("handover-check")
        .env(ENV_FD, raw.to_string())
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: fcntl and sigprocmask are async-signal-safe; in the child they
    // clear close-on-exec on the record and the fds it names (the probe
    // inherits them; the master's own stay close-on-exec) and give it an
    // empty signal mask (the master's signals are blocked meanwhile).
    unsafe {
        cmd.pre_exec(move || {
            for fd in &inherited {
                if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            let mut none = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(none.as_mut_ptr());
            libc::sigprocmask(libc::SIG_SETMASK, none.as_ptr(), std::ptr::null_mut());
            Ok(())
        });
    }
    let refused = |why: String| HandoverError::Refused(format!("{} {why}", exe.display()));
    let mut child = cmd
        .spawn()
        .map_err(|e| refused(format!("cannot be run: {e}")))?;
    let status = match wait_bounded(&mut child, PROBE_TIMEOUT) {
        Ok(status) => status,
        Err(Waited::Stop(sig)) => {
            return Err(HandoverError::NotNow(format!(
                "{sig} arrived during the upgrade; stopping instead"
            )));
        }
        Err(Waited::Failed(why)) => return Err(refused(why)),
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    if status.success() {
        return Ok(());
    }
    let said = stderr.trim().lines().last().unwrap_or("");
    let said = said.strip_prefix("notesd: ").unwrap_or(said).to_string();
    Err(refused(if said.is_empty() {
        format!("did not take the handover ({status})")
    } else {
        format!("did not take the handover ({status}): {said}")
    }))
}

/// Why [`wait_bounded`] gave up on a child.
enum Waited {
    Failed(String),
    /// A stop signal is pending (the master's signals are blocked).
    Stop(Signal),
}

/// Wait for a child up to `limit`, pinging the watchdog; kill it after, or
/// as soon as a stop signal is pending.
fn wait_bounded(
    child: &mut std::process::Child,
    limit: Duration,
) -> Result<std::process::ExitStatus, Waited> {
    let start = clock::now();
    let watchdog = systemd::watchdog_interval();
    let mut last_ping = start;
    let give_up = |child: &mut std::process::Child, why: Waited| {
        let _ = child.kill();
        let _ = child.wait();
        Err(why)
    };
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) => {}
            Err(e) => return Err(Waited::Failed(format!("cannot be waited for: {e}"))),
        }
        if let Some(sig) = pending_stop() {
            return give_up(child, Waited::Stop(sig));
        }
        let now = clock::now();
        if now.saturating_sub(start) > limit {
            let why = format!("did not answer within {} s", limit.as_secs());
            return give_up(child, Waited::Failed(why));
        }
        if let Some(every) = watchdog
            && now.saturating_sub(last_ping) >= every
        {
            last_ping = now;
            systemd::watchdog();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A stop signal (TERM, INT, QUIT) that is pending, blocked.
fn pending_stop() -> Option<Signal> {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initializes the set; sigpending writes into it.
    let set = unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        if libc::sigpending(set.as_mut_ptr()) != 0 {
            return None;
        }
        set.assume_init()
    };
    [Signal::SIGTERM, Signal::SIGINT, Signal::SIGQUIT]
        .into_iter()
        // SAFETY: a valid, initialized set and a valid signal number.
        .find(|s| unsafe { libc::sigismember(&set, *s as i32) } == 1)
}

/// The master's signals, blocked for as long as this lives: from before the
/// handover record is written until the exec — whose new image unblocks
/// them once its own handlers are in place — or until the upgrade is
/// refused, when dropping this delivers what arrived meanwhile. Either way
/// no signal is lost (docs/design.md §4.9).
pub struct Blocked {
    old: SigSet,
}

impl Blocked {
    pub fn master_signals() -> Result<Blocked, HandoverError> {
        let mut old = SigSet::empty();
        sigprocmask(
            SigmaskHow::SIG_BLOCK,
            Some(&master_signals()),
            Some(&mut old),
        )
        .map_err(|e| HandoverError::NotNow(format!("cannot block signals: {e}")))?;
        Ok(Blocked { old })
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&self.old), None);
    }
}

/// The signals the master handles: blocked across the exec.
fn master_signals() -> SigSet {
    let mut set = SigSet::empty();
    for (sig, _) in SIGNAL_TABLE {
        set.add(*sig);
    }
    set
}

/// In the new image, once its handlers are in place: deliver what arrived
/// during the exec.
pub fn unblock_signals() {
    let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&master_signals()), None);
}

fn set_cloexec(fd: RawFd, on: bool) -> nix::Result<()> {
    // SAFETY: only for the fcntl call; the fd is one of ours and stays open.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let flags = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(fd, FcntlArg::F_SETFD(flags)).map(|_| ())
}

/// Exec `exe` in place with the record and `keep` inherited, the master's
/// signals blocked (see [`Blocked`]). Returns only if the exec failed,
/// having put the fds back as they were.
pub fn exec(exe: &Path, record: &OwnedFd, keep: &[RawFd]) -> HandoverError {
    let exec_err = |source| HandoverError::Exec {
        path: exe.to_path_buf(),
        source,
    };
    let prepared = (|| {
        let path = CString::new(exe.as_os_str().as_bytes()).map_err(|_| nix::Error::EINVAL)?;
        let argv = std::env::args_os()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| nix::Error::EINVAL)?;
        let env = exec_env(record.as_raw_fd())?;
        Ok((path, argv, env))
    })();
    let (path, argv, env) = match prepared {
        Ok(p) => p,
        Err(e) => return exec_err(e),
    };
    let all: Vec<RawFd> = keep.iter().copied().chain([record.as_raw_fd()]).collect();
    let mut result = all.iter().try_for_each(|fd| set_cloexec(*fd, false));
    if result.is_ok() {
        // Only returns on failure.
        result = nix::unistd::execve(&path, &argv, &env).map(|_| ());
    }
    for fd in &all {
        let _ = set_cloexec(*fd, true);
    }
    match result {
        Err(e) => exec_err(e),
        Ok(()) => exec_err(nix::Error::EINVAL),
    }
}

/// This process' environment for the new image: no socket-activation
/// variables (the listeners travel in the record), the record's fd.
fn exec_env(record_fd: RawFd) -> nix::Result<Vec<CString>> {
    const DROP: &[&str] = &["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", ENV_FD];
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !DROP.iter().any(|d| k == d))
        .map(|(k, v)| {
            let mut kv: OsString = k;
            kv.push("=");
            kv.push(v);
            CString::new(kv.as_bytes()).map_err(|_| nix::Error::EINVAL)
        })
        .collect::<Result<_, _>>()?;
    env.push(CString::new(format!("{ENV_FD}={record_fd}")).map_err(|_| nix::Error::EINVAL)?);
    Ok(env)
}

/// A handover taken by the new image: the record and the fds it names.
pub type Taken = (Record, Vec<(RawFd, OwnedFd)>);

/// In a freshly exec'd `serve`: the handover, if this image is one. Takes the
/// record's fds (close-on-exec again, owned from now on) and removes the
/// variable, so nothing this image starts inherits either.
pub fn take() -> Option<Result<Taken, HandoverError>> {
    let raw = std::env::var(ENV_FD).ok()?;
    // SAFETY: single-threaded at this point (before any runtime or thread).
    unsafe { std::env::remove_var(ENV_FD) };
    Some((|| {
        let raw: RawFd = raw
            .parse()
            .map_err(|_| HandoverError::Read(format!("{ENV_FD}={raw} is not an fd")))?;
        set_cloexec(raw, true).map_err(|e| HandoverError::Read(format!("fd {raw}: {e}")))?;
        // SAFETY: the old image left this fd open for us; nothing else owns it.
        let record_fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let record = read(record_fd.as_fd())?;
        let mut owned = Vec::new();
        for fd in record.fds() {
            set_cloexec(fd, true)
                .map_err(|e| HandoverError::Read(format!("handed-over fd {fd}: {e}")))?;
            // SAFETY: as above: inherited for us, named by the record once.
            owned.push((fd, unsafe { OwnedFd::from_raw_fd(fd) }));
        }
        Ok((record, owned))
    })())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_outside_the_range_are_refused() {
        assert!(accepts(u64::from(VERSION)).is_ok());
        assert!(accepts(u64::from(MIN_VERSION)).is_ok());
        assert!(accepts(0).is_err());
        let e = accepts(u64::from(VERSION) + 1).expect_err("newer");
        assert!(e.to_string().contains("takes handover records"), "{e}");
    }
}
