//! The one place that forks and execs a worker.
//!
//! Everything the child needs (argv, envp, fd plan, credentials) is prepared
//! before `fork()`, so the child only makes async-signal-safe syscalls:
//! reset the signal mask, set PR_SET_PDEATHSIG, re-check its parent, move the
//! inherited fds above the target range and `dup2` them onto their fixed
//! numbers (which clears close-on-exec), drop privileges, `execve`.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};
use nix::unistd::ForkResult;

use crate::config::Config;
use crate::ipc::{self, Boot};
use crate::listener::Listener;
use crate::scoreboard::Scoreboard;

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("socketpair: {0}")]
    Channel(nix::Error),
    #[error("fork: {0}")]
    Fork(nix::Error),
    #[error("sending the boot message: {0}")]
    Boot(String),
    #[error("bad argument for exec: {0}")]
    Arg(#[from] std::ffi::NulError),
    #[error("cannot open /dev/null: {0}")]
    DevNull(std::io::Error),
}

/// Credentials a worker switches to (resolved in the master, applied in the child).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Creds {
    pub uid: u32,
    pub gid: u32,
}

pub(crate) struct Spawner {
    exe: CString,
    master_pid: i32,
    creds: Option<Creds>,
    devnull: OwnedFd,
    base_env: Vec<CString>,
}

/// Environment a worker must not inherit (it belongs to the master).
const DROP_ENV: &[&str] = &[
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

impl Spawner {
    pub(crate) fn new(exe: &Path, creds: Option<Creds>) -> Result<Spawner, SpawnError> {
        let devnull = std::fs::File::open("/dev/null").map_err(SpawnError::DevNull)?;
        let base_env = std::env::vars_os()
            .filter(|(k, _)| {
                let k = k.to_string_lossy();
                !DROP_ENV.contains(&k.as_ref()) && !ipc::ENV_ALL.contains(&k.as_ref())
            })
            .filter_map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv).ok()
            })
            .collect();
        Ok(Spawner {
            exe: CString::new(exe.as_os_str().as_bytes())?,
            master_pid: std::process::id() as i32,
            creds,
            devnull: devnull.into(),
            base_env,
        })
    }

    /// Fork+exec `notesd worker` for `slot`; returns its pid and the master's end
    /// of its channel (non-blocking), after sending the boot message.
    pub(crate) fn spawn(
        &self,
        generation: u32,
        slot: u32,
        config: &Config,
        listeners: &[std::rc::Rc<Listener>],
        board: &Scoreboard,
    ) -> Result<(i32, OwnedFd), SpawnError> {
        let (master_end, worker_end) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(SpawnError::Channel)?;
        let kinds: Vec<&str> = listeners
            .iter()
            .map(|l| if l.is_unix() { "unix" } else { "tcp" })
            .collect();
        let argv = [self.exe.clone(), CString::new("worker")?];
        let mut envp = self.base_env.clone();
        for (k, v) in [
            (ipc::ENV_PROTOCOL, ipc::PROTOCOL_VERSION.to_string()),
            (ipc::ENV_LISTENERS, kinds.join(",")),
            (ipc::ENV_SLOT, slot.to_string()),
            (ipc::ENV_GENERATION, generation.to_string()),
            (ipc::ENV_MASTER_PID, self.master_pid.to_string()),
        ] {
            envp.push(CString::new(format!("{k}={v}"))?);
        }
        // The fd plan: (source, fixed target).
        let mut plan: Vec<(RawFd, RawFd)> = vec![
            (worker_end.as_raw_fd(), ipc::CHANNEL_FD),
            (board.fd().as_raw_fd(), ipc::SCOREBOARD_FD),
        ];
        for (i, l) in listeners.iter().enumerate() {
            plan.push((l.fd.as_raw_fd(), ipc::FIRST_LISTENER_FD + i as RawFd));
        }
        let above = ipc::FIRST_LISTENER_FD + plan.len() as RawFd + 10;
        let devnull = self.devnull.as_raw_fd();
        let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_p.push(std::ptr::null());
        let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
        envp_p.push(std::ptr::null());
        let exec = Exec {
            exe: &self.exe,
            argv: &argv_p,
            envp: &envp_p,
        };

        // SAFETY: the master is single-threaded, and the child below only makes
        // async-signal-safe calls on data prepared before the fork.
        match unsafe { nix::unistd::fork() }.map_err(SpawnError::Fork)? {
            ForkResult::Child => child(&plan, above, devnull, self.master_pid, self.creds, &exec),
            ForkResult::Parent { child } => {
                drop(worker_end);
                let boot = Boot {
                    protocol: ipc::PROTOCOL_VERSION,
                    config: config.clone(),
                };
                let sent = ipc::encode(&boot)
                    .map_err(|e| SpawnError::Boot(e.to_string()))
                    .and_then(|bytes| {
                        socket::send(master_end.as_raw_fd(), &bytes, socket::MsgFlags::empty())
                            .map_err(|e| SpawnError::Boot(e.to_string()))
                    })
                    .and_then(|_| {
                        set_nonblocking(&master_end).map_err(|e| SpawnError::Boot(e.to_string()))
                    });
                if let Err(e) = sent {
                    let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                    return Err(e);
                }
                Ok((child.as_raw(), master_end))
            }
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(|_| ())
}

/// What `execve` needs, as NUL-terminated pointer arrays built before the fork.
struct Exec<'a> {
    exe: &'a CString,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
}

/// In the forked child: never returns.
fn child(
    plan: &[(RawFd, RawFd)],
    above: RawFd,
    devnull: RawFd,
    master_pid: i32,
    creds: Option<Creds>,
    exec: &Exec<'_>,
) -> ! {
    // SAFETY (whole block): raw async-signal-safe syscalls on plain integers,
    // in a child of a single-threaded process, ending in execve or _exit.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
            libc::_exit(ipc::EXIT_BOOT_FAILED);
        }
        // The master may have died between fork and prctl.
        if libc::getppid() != master_pid {
            libc::_exit(ipc::EXIT_BOOT_FAILED);
        }
        let mut high = [0 as RawFd; 64];
        for (i, (src, _)) in plan.iter().enumerate().take(high.len()) {
            let fd = libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, above);
            if fd < 0 {
                libc::_exit(ipc::EXIT_BOOT_FAILED);
            }
            high[i] = fd;
        }
        for (i, (_, dst)) in plan.iter().enumerate().take(high.len()) {
            if libc::dup2(high[i], *dst) < 0 {
                libc::_exit(ipc::EXIT_BOOT_FAILED);
            }
        }
        libc::dup2(devnull, 0);
        if let Some(c) = creds
            && libc::geteuid() == 0
            && (libc::setgroups(1, &c.gid) != 0
                || libc::setgid(c.gid) != 0
                || libc::setuid(c.uid) != 0)
        {
            libc::_exit(ipc::EXIT_BOOT_FAILED);
        }
        libc::execve(exec.exe.as_ptr(), exec.argv.as_ptr(), exec.envp.as_ptr());
        libc::_exit(127);
    }
}

/// The binary to exec for workers: resolved once, when the master starts, so a
/// HUP after `apt upgrade` runs the new file at the same path (docs/design.md §4).
pub(crate) fn resolve_exe() -> std::io::Result<PathBuf> {
    let arg0 = std::env::args_os().next().unwrap_or_default();
    let arg0 = PathBuf::from(arg0);
    // Absolute, but symlinks kept: the path is what an upgrade replaces.
    let candidate = if arg0.components().count() > 1 {
        std::path::absolute(&arg0)?
    } else {
        // Invoked through $PATH: find it there.
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|d| d.join(&arg0))
            .find(|p| p.is_file())
            .map_or_else(std::env::current_exe, Ok)?
    };
    Ok(candidate)
}
