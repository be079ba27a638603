//! Listen queue depth, read from the kernel: connections that arrived on a
//! listening socket and that no worker has accepted yet, and the socket's
//! backlog (the most the kernel queues before it refuses or drops). The
//! numbers `ss -xl` / `ss -ltn` print as Recv-Q / Send-Q.
//!
//! - Unix sockets: `sock_diag` over netlink (`UNIX_DIAG_RQLEN` of the socket
//!   with our listener's inode). A listening unix socket has no `SIOCINQ`.
//! - TCP: `TCP_INFO` on the listening socket (`tcpi_unacked` is the accept
//!   queue, `tcpi_sacked` the backlog).
//!
//! The master samples each listener every tick and publishes the figures in
//! the scoreboard for `/metrics` (`notesd_listen_queue{listener}`).

use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A listener's queue now, and its backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Depth {
    pub(crate) queued: u32,
    pub(crate) backlog: u32,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum BacklogError {
    #[error("sock_diag: {0}")]
    Netlink(std::io::Error),
    #[error("sock_diag: the kernel knows no listening socket with inode {0}")]
    NotFound(u64),
    #[error("sock_diag: {0}")]
    Answer(&'static str),
    #[error("TCP_INFO: {0}")]
    TcpInfo(std::io::Error),
    #[error("fstat: {0}")]
    Stat(nix::Error),
}

/// The depth of a TCP listening socket.
pub(crate) fn tcp(fd: BorrowedFd<'_>) -> Result<Depth, BacklogError> {
    // SAFETY: tcp_info is plain old data; getsockopt writes at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid fd, a buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(BacklogError::TcpInfo(std::io::Error::last_os_error()));
    }
    Ok(Depth {
        queued: info.tcpi_unacked,
        backlog: info.tcpi_sacked,
    })
}

/// One netlink socket for every unix-socket query (opened on first use).
#[derive(Default)]
pub(crate) struct Diag {
    sock: Option<OwnedFd>,
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_RQLEN: u16 = 4;
const TCP_LISTEN: u32 = 10;

/// `struct unix_diag_req` (linux/unix_diag.h).
#[repr(C)]
struct UnixDiagReq {
    family: u8,
    protocol: u8,
    pad: u16,
    states: u32,
    ino: u32,
    show: u32,
    cookie: [u32; 2],
}

#[repr(C)]
struct Request {
    header: libc::nlmsghdr,
    req: UnixDiagReq,
}

impl Diag {
    /// The depth of the listening unix socket `fd`.
    pub(crate) fn unix(&mut self, fd: BorrowedFd<'_>) -> Result<Depth, BacklogError> {
        let ino = nix::sys::stat::fstat(fd)
            .map_err(BacklogError::Stat)?
            .st_ino;
        let result = self.query(ino);
        if result.is_err() {
            // A broken netlink socket is opened again next time.
            self.sock = None;
        }
        result
    }

    fn socket(&mut self) -> Result<BorrowedFd<'_>, BacklogError> {
        if self.sock.is_none() {
            // SAFETY: plain socket(2); the fd is owned at once.
            let fd = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                    libc::NETLINK_SOCK_DIAG,
                )
            };
            if fd < 0 {
                return Err(BacklogError::Netlink(std::io::Error::last_os_error()));
            }
            // SAFETY: a fresh fd nothing else owns.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let tv = nix::sys::time::TimeVal::new(0, 200_000);
            let _ = nix::sys::socket::setsockopt(
                &owned,
                nix::sys::socket::sockopt::ReceiveTimeout,
                &tv,
            );
            self.sock = Some(owned);
        }
        self.sock
            .as_ref()
            .map(|s| s.as_fd())
            .ok_or(BacklogError::Answer("no socket"))
    }

    fn query(&mut self, ino: u64) -> Result<Depth, BacklogError> {
        let request = Request {
            header: libc::nlmsghdr {
                nlmsg_len: size_of::<Request>() as u32,
                nlmsg_type: SOCK_DIAG_BY_FAMILY,
                nlmsg_flags: libc::NLM_F_REQUEST as u16,
                nlmsg_seq: 1,
                nlmsg_pid: 0,
            },
            req: UnixDiagReq {
                family: libc::AF_UNIX as u8,
                protocol: 0,
                pad: 0,
                states: 1 << TCP_LISTEN,
                ino: ino as u32,
                show: UDIAG_SHOW_RQLEN,
                cookie: [u32::MAX, u32::MAX],
            },
        };
        let sock = self.socket()?.as_raw_fd();
        // SAFETY: sending `size_of::<Request>()` bytes of a repr(C) value.
        let sent =
            unsafe { libc::send(sock, (&raw const request).cast(), size_of::<Request>(), 0) };
        if sent < 0 {
            return Err(BacklogError::Netlink(std::io::Error::last_os_error()));
        }
        let mut buf = [0u8; 1024];
        // SAFETY: receiving into a buffer of its own length.
        let n = unsafe { libc::recv(sock, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(BacklogError::Netlink(std::io::Error::last_os_error()));
        }
        parse_answer(&buf[..n as usize], ino)
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// The `UNIX_DIAG_RQLEN` attribute of the kernel's answer: `nlmsghdr`
/// (16 bytes), `unix_diag_msg` (16 bytes), then 4-byte aligned attributes.
fn parse_answer(b: &[u8], ino: u64) -> Result<Depth, BacklogError> {
    let kind = u16_at(b, 4).ok_or(BacklogError::Answer("short answer"))?;
    if kind == libc::NLMSG_ERROR as u16 {
        let errno = u32_at(b, 16).map_or(0, |e| (e as i32).wrapping_neg());
        return Err(if errno == libc::ENOENT {
            BacklogError::NotFound(ino)
        } else {
            BacklogError::Netlink(std::io::Error::from_raw_os_error(errno))
        });
    }
    if kind != SOCK_DIAG_BY_FAMILY {
        return Err(BacklogError::Answer("not a sock_diag answer"));
    }
    // unix_diag_msg: family, type, state, pad (1 byte each), then the inode.
    if u32_at(b, 20) != Some(ino as u32) || b.get(18) != Some(&(TCP_LISTEN as u8)) {
        return Err(BacklogError::Answer("the answer is about another socket"));
    }
    let len = (u32_at(b, 0).ok_or(BacklogError::Answer("short answer"))? as usize).min(b.len());
    let mut off = 32;
    while off + 4 <= len {
        let attr_len = u16_at(b, off).unwrap_or(0) as usize;
        let attr_type = u16_at(b, off + 2).unwrap_or(0);
        if attr_len < 4 {
            break;
        }
        if attr_type == UNIX_DIAG_RQLEN {
            return match (u32_at(b, off + 4), u32_at(b, off + 8)) {
                (Some(queued), Some(backlog)) => Ok(Depth { queued, backlog }),
                _ => Err(BacklogError::Answer("short UNIX_DIAG_RQLEN")),
            };
        }
        off += (attr_len + 3) & !3;
    }
    Err(BacklogError::Answer("no UNIX_DIAG_RQLEN in the answer"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn a_unix_listener_queue_is_what_ss_shows() {
        let dir = std::env::temp_dir().join(format!("notesd-backlog-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        let mut diag = Diag::default();
        let empty = diag.unix(listener.as_fd()).expect("sock_diag");
        assert_eq!(empty.queued, 0);
        assert!(empty.backlog > 0, "{empty:?}");
        let held: Vec<UnixStream> = (0..3)
            .map(|_| UnixStream::connect(&path).expect("connect"))
            .collect();
        assert_eq!(diag.unix(listener.as_fd()).expect("sock_diag").queued, 3);
        drop(held);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_tcp_listener_queue_is_what_ss_shows() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        assert_eq!(tcp(listener.as_fd()).expect("TCP_INFO").queued, 0);
        let held: Vec<_> = (0..2)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        let d = tcp(listener.as_fd()).expect("TCP_INFO");
        assert_eq!(d.queued, 2, "{d:?}");
        assert!(d.backlog >= 2);
        drop(held);
    }

    #[test]
    fn answers_that_are_short_or_errors_are_errors_not_panics() {
        assert!(parse_answer(&[], 1).is_err());
        assert!(parse_answer(&[0; 40], 1).is_err());
        // Another socket's answer (inode 8, asked for 7) is refused.
        let mut other = vec![0u8; 44];
        other[0..4].copy_from_slice(&44u32.to_ne_bytes());
        other[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        other[18] = TCP_LISTEN as u8;
        other[20..24].copy_from_slice(&8u32.to_ne_bytes());
        other[32..34].copy_from_slice(&12u16.to_ne_bytes());
        other[34..36].copy_from_slice(&UNIX_DIAG_RQLEN.to_ne_bytes());
        assert!(matches!(
            parse_answer(&other, 7),
            Err(BacklogError::Answer(_))
        ));
        assert_eq!(parse_answer(&other, 8).ok().map(|d| d.queued), Some(0));
        let mut err = vec![0u8; 36];
        err[0..4].copy_from_slice(&36u32.to_ne_bytes());
        err[4..6].copy_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        err[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert!(matches!(
            parse_answer(&err, 7),
            Err(BacklogError::NotFound(7))
        ));
    }
}
