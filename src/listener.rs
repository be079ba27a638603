//! Listening sockets: bind unix and TCP addresses, or adopt systemd's (LISTEN_FDS).
//!
//! The unix-socket rules (docs/design.md §4): an existing path that refuses connections
//! is stale and is unlinked; one that accepts belongs to a live server and we
//! stop (exit 2); a path that is not a socket is never touched. Mode and group
//! are set between `bind()` and `listen()`, so no client can connect through
//! wrong permissions. On exit a socket is unlinked only if its inode is still
//! the one we created.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrLike,
    SockaddrStorage, UnixAddr, sockopt,
};

use crate::config::Bind;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "{0} is already served by a live process (connect succeeded); is notesd already running?"
    )]
    Live(PathBuf),
    #[error("{0} exists and is not a socket; refusing to remove it")]
    NotSocket(PathBuf),
    #[error("{addr}: address already in use; is notesd already running?")]
    InUse { addr: String },
    #[error("{what} {addr}: {source}")]
    Io {
        what: &'static str,
        addr: String,
        source: io::Error,
    },
}

impl ListenError {
    /// Another server owns the address: a usage problem (exit 2), not a crash.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            ListenError::Live(_) | ListenError::NotSocket(_) | ListenError::InUse { .. }
        )
    }
}

/// A bound, listening socket the master owns and its workers inherit.
#[derive(Debug)]
pub struct Listener {
    pub bind: Bind,
    pub fd: OwnedFd,
    /// (dev, ino) of a unix socket we created: unlinked on exit if still ours.
    created: Option<(u64, u64)>,
}

/// A listener as a master hands it to its re-exec'd self: the fd stays open
/// across the exec, the rest is written down.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ListenerRecord {
    pub bind: String,
    pub fd: RawFd,
    pub created: Option<(u64, u64)>,
}

impl Listener {
    pub fn is_unix(&self) -> bool {
        matches!(self.bind, Bind::Unix(_))
    }

    pub fn record(&self) -> ListenerRecord {
        ListenerRecord {
            bind: self.bind.to_string(),
            fd: self.fd.as_raw_fd(),
            created: self.created,
        }
    }

    /// Take back a listener handed over across an exec (the fd is ours now).
    pub fn from_record(r: &ListenerRecord, fd: OwnedFd) -> Result<Listener, String> {
        Ok(Listener {
            bind: Bind::parse(&r.bind)?,
            fd,
            created: r.created,
        })
    }

    /// Unlink our socket file if the path still holds the inode we created.
    pub fn cleanup(&self) {
        if let (Bind::Unix(path), Some(id)) = (&self.bind, self.created) {
            unlink_if_ours(path, id);
        }
    }
}

/// Unix socket options.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UnixOptions {
    pub mode: u32,
    pub gid: Option<u32>,
    pub backlog: u32,
}

fn io_err(what: &'static str, addr: impl ToString, e: impl Into<io::Error>) -> ListenError {
    ListenError::Io {
        what,
        addr: addr.to_string(),
        source: e.into(),
    }
}

/// Bind and listen on every address.
pub(crate) fn bind_all(binds: &[Bind], unix: UnixOptions) -> Result<Vec<Listener>, ListenError> {
    binds.iter().map(|b| bind_one(b, unix)).collect()
}

/// Bind and listen on one address.
pub(crate) fn bind_one(bind: &Bind, unix: UnixOptions) -> Result<Listener, ListenError> {
    match bind {
        Bind::Unix(path) => bind_unix(path, unix),
        Bind::Tcp(addr) => bind_tcp(*addr, unix.backlog),
    }
}

/// A unix socket's mode and group (`socket_mode`, `socket_group`).
pub(crate) fn apply_unix_options(path: &Path, o: UnixOptions) -> Result<(), ListenError> {
    let shown = path.display().to_string();
    nix::sys::stat::fchmodat(
        nix::fcntl::AT_FDCWD,
        path,
        nix::sys::stat::Mode::from_bits_truncate(o.mode),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .map_err(|e| io_err("chmod", &shown, e))?;
    if let Some(gid) = o.gid {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(|e| io_err("chown", &shown, e))?;
    }
    Ok(())
}

/// Bind a unix stream socket with the stale/live rules, mode and group.
pub(crate) fn bind_unix(path: &Path, o: UnixOptions) -> Result<Listener, ListenError> {
    let shown = path.display().to_string();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ListenError::NotSocket(path.to_path_buf()));
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(ListenError::Live(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!("removing stale socket file {shown}");
                std::fs::remove_file(path).map_err(|e| io_err("removing stale", &shown, e))?;
            }
            Err(e) => return Err(io_err("probing", &shown, e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspecting", &shown, e)),
    }
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| io_err("socket", &shown, e))?;
    let addr = UnixAddr::new(path).map_err(|e| io_err("address", &shown, e))?;
    socket::bind(fd.as_raw_fd(), &addr).map_err(|e| io_err("bind", &shown, e))?;
    let meta = std::fs::metadata(path).map_err(|e| io_err("stat", &shown, e))?;
    let created = (meta.dev(), meta.ino());
    let setup = || -> Result<(), ListenError> {
        apply_unix_options(path, o)?;
        socket::listen(&fd, backlog(o.backlog)).map_err(|e| io_err("listen", &shown, e))
    };
    if let Err(e) = setup() {
        unlink_if_ours(path, created);
        return Err(e);
    }
    Ok(Listener {
        bind: Bind::Unix(path.to_path_buf()),
        fd,
        created: Some(created),
    })
}

fn bind_tcp(addr: std::net::SocketAddr, backlog_len: u32) -> Result<Listener, ListenError> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| io_err("socket", addr, e))?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)
        .map_err(|e| io_err("SO_REUSEADDR", addr, e))?;
    let bound = match addr {
        std::net::SocketAddr::V4(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn::from(a)),
        std::net::SocketAddr::V6(a) => {
            socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)
                .map_err(|e| io_err("IPV6_V6ONLY", addr, e))?;
            socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(a))
        }
    };
    match bound {
        Err(nix::Error::EADDRINUSE) => {
            return Err(ListenError::InUse {
                addr: addr.to_string(),
            });
        }
        Err(e) => return Err(io_err("bind", addr, e)),
        Ok(()) => {}
    }
    socket::listen(&fd, backlog(backlog_len)).map_err(|e| io_err("listen", addr, e))?;
    Ok(Listener {
        bind: Bind::Tcp(addr),
        fd,
        created: None,
    })
}

fn backlog(n: u32) -> Backlog {
    Backlog::new(n.min(i32::MAX as u32) as i32).unwrap_or(Backlog::MAXCONN)
}

/// Sockets passed by systemd socket activation, if LISTEN_PID is us.
pub(crate) fn from_systemd() -> Result<Vec<Listener>, ListenError> {
    let fds = match sd_notify::listen_fds() {
        Ok(fds) => fds,
        Err(_) => return Ok(Vec::new()),
    };
    let mut out = Vec::new();
    for raw in fds {
        // SAFETY: systemd passed us this fd (LISTEN_PID matched); nothing else owns it.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        let name = format!("LISTEN_FDS fd {raw}");
        let storage: SockaddrStorage =
            socket::getsockname(raw).map_err(|e| io_err("getsockname", &name, e))?;
        let bind = if let Some(u) = storage.as_unix_addr() {
            Bind::Unix(unix_name(u).ok_or_else(|| {
                io_err(
                    "an unnamed unix socket",
                    &name,
                    io::Error::other("a listening socket needs a path or an abstract name"),
                )
            })?)
        } else if let Some(v4) = storage.as_sockaddr_in() {
            Bind::Tcp(std::net::SocketAddr::V4((*v4).into()))
        } else if let Some(v6) = storage.as_sockaddr_in6() {
            Bind::Tcp(std::net::SocketAddr::V6((*v6).into()))
        } else {
            return Err(io_err(
                "unsupported socket family",
                &name,
                io::Error::other(format!("{:?}", storage.family())),
            ));
        };
        out.push(Listener {
            bind,
            fd,
            created: None,
        });
    }
    Ok(out)
}

/// A unix socket's name as a bind path: its file's path, or `@name` for an
/// abstract one (`ListenStream=@name`), which `unix:@name` names again in a
/// handover record. notesd never binds, chmods or unlinks a socket it was
/// passed, so the `@` is only ever read back, never used as a file.
fn unix_name(u: &UnixAddr) -> Option<PathBuf> {
    if let Some(path) = u.path() {
        return Some(path.to_path_buf());
    }
    let name = u.as_abstract()?;
    let mut text = std::ffi::OsString::from("@");
    text.push(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name));
    Some(PathBuf::from(text))
}

fn unlink_if_ours(path: &Path, (dev, ino): (u64, u64)) {
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.dev() == dev
        && meta.ino() == ino
    {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> UnixOptions {
        UnixOptions {
            mode: 0o600,
            gid: None,
            backlog: 16,
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("notesd-l-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn stale_is_replaced_live_is_refused_and_cleanup_is_careful() {
        let dir = tmp("a");
        let path = dir.join("s.sock");
        let first = bind_unix(&path, opts()).expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Live: connect succeeds.
        assert!(matches!(
            bind_unix(&path, opts()),
            Err(ListenError::Live(_))
        ));
        // Stale: the listener is gone but the file stays.
        drop(first);
        let second = bind_unix(&path, opts()).expect("stale socket replaced");
        // Someone else's socket at the path is not ours to unlink.
        std::fs::remove_file(&path).expect("rm");
        let third = bind_unix(&path, opts()).expect("bind");
        second.cleanup();
        assert!(path.exists(), "second must not unlink third's socket");
        third.cleanup();
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_abstract_socket_has_a_name_that_parses_back() {
        let addr = UnixAddr::new_abstract(b"notesd-test").expect("abstract address");
        let path = unix_name(&addr).expect("a name");
        let bind = Bind::Unix(path);
        assert_eq!(bind.to_string(), "unix:@notesd-test");
        assert_eq!(Bind::parse(&bind.to_string()), Ok(bind));
        let file = UnixAddr::new("/run/x.sock").expect("path address");
        assert_eq!(unix_name(&file), Some(PathBuf::from("/run/x.sock")));
    }

    #[test]
    fn a_regular_file_is_never_removed() {
        let dir = tmp("b");
        let path = dir.join("not-a-socket");
        std::fs::write(&path, "data").expect("write");
        assert!(matches!(
            bind_unix(&path, opts()),
            Err(ListenError::NotSocket(_))
        ));
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "data");
        let _ = std::fs::remove_dir_all(dir);
    }
}
