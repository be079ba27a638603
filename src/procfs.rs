//! Per-process figures from `/proc`: CPU, memory, fds, start time, and what a
//! stuck process is blocked in.
//!
//! The master samples worker memory every second ([`memory_against`]), shows
//! [`usage`] in `notesd status`, and logs [`stuck`] before it kills a worker
//! that missed its timeout; `/metrics` turns [`usage`] into the Prometheus
//! `process_*` series. A process may exit between two reads: nothing here
//! panics on what `/proc` returns, [`usage`] and [`memory_against`] return a
//! [`ProcError`] (`ENOENT`/`ESRCH` when the process has gone) and [`stuck`]
//! leaves out what it could not read.
//!
//! # Layout
//!
//! - [`usage`], [`memory_against`]: `stat`, `statm`, `smaps_rollup` and `fd/` of one
//!   process; the clock tick and page size are read once and cached, the boot
//!   time comes from the clocks (the unit hides `/proc/stat`).
//! - [`stuck`] and [`Stuck::summary`]: `stat` (state), `wchan`, `syscall`
//!   (decoded with `libc::SYS_*`), the fd it names (→ `net/tcp`, `net/tcp6`,
//!   `net/unix` or a path) and `stack`.
//! - Pure parsers (`parse_stat`, `decode_syscall`, `tcp_peer`, `unix_peer`,
//!   `stack_frame`…) take the file's text, so the tests feed them literal lines.

use std::fmt::{self, Write as _};
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;

/// Which figure a memory sample is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MemoryKind {
    /// Proportional set size: shared pages divided among their sharers.
    Pss,
    /// Resident set size: every resident page, shared or not.
    Rss,
}

impl MemoryKind {
    /// `"PSS"` or `"RSS"`, for logs and `notesd status`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            MemoryKind::Pss => "PSS",
            MemoryKind::Rss => "RSS",
        }
    }
}

impl fmt::Display for MemoryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A `/proc` file that could not be read or made no sense.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProcError {
    /// The read failed; `ENOENT`/`ESRCH` mean the process has gone.
    #[error("reading {path}: {source}")]
    Read { path: String, source: io::Error },
    /// The file was read but `what` was missing or malformed.
    #[error("parsing {path}: {what}")]
    Parse { path: String, what: &'static str },
}

/// One process's resources.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Usage {
    /// User + system CPU time (`stat` fields 14 and 15), all threads.
    pub cpu_seconds: f64,
    /// Resident memory (`statm` field 2 × the page size).
    pub rss_bytes: u64,
    /// `Pss:` of `smaps_rollup`; `None` when it cannot be read.
    pub pss_bytes: Option<u64>,
    /// Entries of `fd/`; `None` when it cannot be read.
    pub open_fds: Option<u64>,
    /// Unix time the process started: `btime` + `stat` field 22 / `CLK_TCK`.
    pub start_time_seconds: f64,
}

/// What the kernel says a (stuck) process is doing. What could not be read
/// is `None` (or an empty `state`).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Stuck {
    /// `stat` field 3 spelled out: `"S (sleeping)"`, `"T (stopped)"`…
    pub state: String,
    /// The kernel function it sleeps in (`wchan`); `None` when running.
    pub wchan: Option<String>,
    /// `syscall` decoded: `"read(fd 12)"`, `"futex"`, `"running"`,
    /// `"not in a syscall"`, `"unknown(nr 999)"`.
    pub syscall: Option<String>,
    /// What the syscall's fd is: a TCP peer (`"127.0.0.1:5432"`,
    /// `"[::1]:5432"`, `"listening on …"`), a unix socket's path, a file's path.
    pub peer: Option<String>,
    /// Kernel stack function names, innermost first, joined with `" < "`
    /// (root only).
    pub stack: Option<String>,
}

/// `syscall`'s text for a process blocked outside any syscall (`-1 sp pc`),
/// e.g. stopped while it ran user code.
const NOT_IN_SYSCALL: &str = "not in a syscall";

/// The CPU and memory figures of `pid`: `stat` and `statm` must be readable
/// (else the process has probably gone), PSS and open fds are optional.
pub(crate) fn usage(pid: i32) -> Result<Usage, ProcError> {
    let stat = stat(pid)?;
    let rss_bytes = rss(pid)?;
    let tck = clk_tck();
    Ok(Usage {
        cpu_seconds: (stat.utime + stat.stime) as f64 / tck,
        rss_bytes,
        pss_bytes: pss(pid),
        open_fds: open_fds(pid),
        start_time_seconds: btime()? + stat.starttime as f64 / tck,
    })
}

/// Memory held against `limit`: RSS from `statm` (cheap) while it is within
/// the limit — PSS never exceeds RSS, so that worker is within it too — and
/// PSS only beyond it. `smaps_rollup` walks the process's page tables
/// (0.15–0.6 ms for a worker here), `statm` does not.
pub(crate) fn memory_against(pid: i32, limit: u64) -> Result<(u64, MemoryKind), ProcError> {
    let rss = rss(pid)?;
    if rss <= limit {
        return Ok((rss, MemoryKind::Rss));
    }
    Ok(pss(pid).map_or((rss, MemoryKind::Rss), |p| (p, MemoryKind::Pss)))
}

/// What `pid` is doing, as far as `/proc` tells; never fails.
pub(crate) fn stuck(pid: i32) -> Stuck {
    let state = read(&proc_path(pid, "stat"))
        .ok()
        .and_then(|text| parse_stat(&text).ok())
        .map(|s| state_text(s.state))
        .unwrap_or_default();
    let call = read(&proc_path(pid, "syscall"))
        .ok()
        .and_then(|text| decode_syscall(&text));
    let peer = call
        .as_ref()
        .and_then(|c| c.fd)
        .and_then(|fd| peer(pid, fd));
    Stuck {
        state,
        wchan: wchan(pid),
        syscall: call.map(|c| c.text),
        peer,
        stack: stack(pid),
    }
}

impl Stuck {
    /// One line for logs: `state S (sleeping), wchan do_epoll_wait, in
    /// epoll_wait(fd 3), peer 127.0.0.1:5432, stack do_epoll_wait < …`. A
    /// stopped process says `was in` (it left the syscall to stop and
    /// restarts it on SIGCONT).
    pub(crate) fn summary(&self) -> String {
        let state = if self.state.is_empty() {
            "unknown"
        } else {
            &self.state
        };
        let mut s = format!("state {state}");
        if let Some(w) = &self.wchan {
            let _ = write!(s, ", wchan {w}");
        }
        if let Some(call) = &self.syscall {
            let _ = write!(s, ", {}{call}", self.syscall_prefix(call));
        }
        if let Some(p) = &self.peer {
            let _ = write!(s, ", peer {p}");
        }
        if let Some(st) = &self.stack {
            let _ = write!(s, ", stack {st}");
        }
        s
    }

    fn syscall_prefix(&self, call: &str) -> &'static str {
        if call == "running" || call == NOT_IN_SYSCALL {
            ""
        } else if self.state.starts_with(['T', 't']) {
            "was in "
        } else {
            "in "
        }
    }
}

// ---- reading ----

fn proc_path(pid: i32, file: &str) -> String {
    format!("/proc/{pid}/{file}")
}

/// The whole file, lossily UTF-8: `comm` and socket paths may be any bytes.
fn read(path: &str) -> Result<String, ProcError> {
    let bytes = fs::read(path).map_err(|source| ProcError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(String::from_utf8(bytes)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

fn stat(pid: i32) -> Result<Stat, ProcError> {
    let path = proc_path(pid, "stat");
    let text = read(&path)?;
    parse_stat(&text).map_err(|what| ProcError::Parse { path, what })
}

fn rss(pid: i32) -> Result<u64, ProcError> {
    let path = proc_path(pid, "statm");
    let text = read(&path)?;
    let pages = parse_statm(&text).map_err(|what| ProcError::Parse { path, what })?;
    Ok(pages * page_size())
}

/// `None` when `smaps_rollup` is missing, unreadable (EACCES) or has no
/// `Pss:` line (a zombie's is empty).
fn pss(pid: i32) -> Option<u64> {
    let text = read(&proc_path(pid, "smaps_rollup")).ok()?;
    parse_pss_kb(&text).map(|kb| kb * 1024)
}

fn open_fds(pid: i32) -> Option<u64> {
    let dir = fs::read_dir(proc_path(pid, "fd")).ok()?;
    Some(dir.flatten().count() as u64)
}

fn wchan(pid: i32) -> Option<String> {
    let text = read(&proc_path(pid, "wchan")).ok()?;
    let w = text.trim();
    (!w.is_empty() && w != "0").then(|| w.to_owned())
}

fn stack(pid: i32) -> Option<String> {
    let text = read(&proc_path(pid, "stack")).ok()?;
    let mut out = String::new();
    for name in text.lines().filter_map(stack_frame) {
        if !out.is_empty() {
            out.push_str(" < ");
        }
        out.push_str(name);
    }
    (!out.is_empty()).then_some(out)
}

/// What `fd` of `pid` is: a socket's peer (or its `socket:[N]` link when no
/// table lists it), a file's path; `None` for pipes and anonymous inodes.
fn peer(pid: i32, fd: i32) -> Option<String> {
    let link = fs::read_link(proc_path(pid, &format!("fd/{fd}"))).ok()?;
    let link = link.to_string_lossy();
    if let Some(inode) = socket_inode(&link) {
        return Some(socket_peer(pid, inode).unwrap_or_else(|| link.into_owned()));
    }
    link.starts_with('/').then(|| link.into_owned())
}

fn socket_peer(pid: i32, inode: u64) -> Option<String> {
    let net = |file| proc_path(pid, &format!("net/{file}"));
    scan(&net("tcp"), |line| tcp_peer(line, inode))
        .or_else(|| scan(&net("tcp6"), |line| tcp_peer(line, inode)))
        .or_else(|| scan(&net("unix"), |line| unix_peer(line, inode)))
}

/// The first `Some` that `find` returns for a line of `path` (header skipped),
/// reading line by line into one buffer (the tables can be long).
fn scan(path: &str, mut find: impl FnMut(&str) -> Option<String>) -> Option<String> {
    let mut reader = BufReader::new(fs::File::open(path).ok()?);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).ok()?;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).ok()? == 0 {
            return None;
        }
        if let Some(found) = find(&String::from_utf8_lossy(&line)) {
            return Some(found);
        }
    }
}

// ---- cached constants ----

fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf takes an integer and touches no memory of ours.
    let v = unsafe { libc::sysconf(name) };
    u64::try_from(v).ok().filter(|&v| v > 0)
}

fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| sysconf(libc::_SC_CLK_TCK).unwrap_or(100) as f64)
}

fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| sysconf(libc::_SC_PAGESIZE).unwrap_or(4096))
}

/// When the system booted, in Unix seconds: the wall clock minus the time
/// since boot (`CLOCK_BOOTTIME`, the clock `starttime` counts on). Not
/// `/proc/stat`'s `btime`: the packaged unit's `ProcSubset=pid` hides it.
fn btime() -> Result<f64, ProcError> {
    use nix::time::{ClockId, clock_gettime};
    let clock = |id| {
        clock_gettime(id).map_err(|e| ProcError::Read {
            path: format!("clock {id}"),
            source: e.into(),
        })
    };
    let (wall, boot) = (
        clock(ClockId::CLOCK_REALTIME)?,
        clock(ClockId::CLOCK_BOOTTIME)?,
    );
    let secs = |t: nix::sys::time::TimeSpec| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9;
    Ok(secs(wall) - secs(boot))
}

// ---- pure parsers ----

/// The fields of `/proc/PID/stat` we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    state: char,
    utime: u64,
    stime: u64,
    starttime: u64,
}

/// `pid (comm) S ppid …`: comm may hold spaces and `)`, so fields are
/// counted from the last `)`.
fn parse_stat(text: &str) -> Result<Stat, &'static str> {
    let (_, rest) = text.rsplit_once(')').ok_or("no ')' after comm")?;
    let mut f = rest.split_ascii_whitespace();
    let state = f.next().and_then(|s| s.chars().next()).ok_or("no state")?;
    let utime = number(f.nth(10), "no utime (field 14)")?;
    let stime = number(f.next(), "no stime (field 15)")?;
    let starttime = number(f.nth(6), "no starttime (field 22)")?;
    Ok(Stat {
        state,
        utime,
        stime,
        starttime,
    })
}

fn number(field: Option<&str>, what: &'static str) -> Result<u64, &'static str> {
    field.and_then(|s| s.parse().ok()).ok_or(what)
}

/// Resident pages: `statm` field 2.
fn parse_statm(text: &str) -> Result<u64, &'static str> {
    number(
        text.split_ascii_whitespace().nth(1),
        "no resident (field 2)",
    )
}

/// `Pss:   1234 kB` (not `Pss_Anon:` and friends).
fn parse_pss_kb(text: &str) -> Option<u64> {
    let line = text.lines().find_map(|l| l.strip_prefix("Pss:"))?;
    line.trim().strip_suffix("kB")?.trim().parse().ok()
}

/// `stat`'s state letter as `/proc/PID/status` spells it.
fn state_text(letter: char) -> String {
    let name = match letter {
        'R' => "running",
        'S' => "sleeping",
        'D' => "disk sleep",
        'T' => "stopped",
        't' => "tracing stop",
        'Z' => "zombie",
        'X' | 'x' => "dead",
        'I' => "idle",
        'P' => "parked",
        'K' => "wakekill",
        'W' => "waking",
        _ => return letter.to_string(),
    };
    format!("{letter} ({name})")
}

/// `/proc/PID/syscall` decoded, and the fd its first argument names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Syscall {
    text: String,
    fd: Option<i32>,
}

/// `nr arg1 … arg6 sp pc` (hex args), `-1 sp pc` (blocked outside a
/// syscall), zeros (a kernel thread) or `running`.
fn decode_syscall(text: &str) -> Option<Syscall> {
    let mut f = text.split_ascii_whitespace();
    let first = f.next()?;
    if first == "running" {
        return Some(Syscall {
            text: first.to_owned(),
            fd: None,
        });
    }
    let nr: libc::c_long = first.parse().ok()?;
    if nr == -1 || no_user_context(text) {
        return Some(Syscall {
            text: NOT_IN_SYSCALL.to_owned(),
            fd: None,
        });
    }
    let Some((name, takes_fd)) = syscall_name(nr) else {
        return Some(Syscall {
            text: format!("unknown(nr {nr})"),
            fd: None,
        });
    };
    let fd = f
        .next()
        .and_then(hex)
        .filter(|_| takes_fd)
        .map(|a| a as u32 as i32);
    let text = match fd {
        Some(fd) => format!("{name}(fd {fd})"),
        None => name.to_owned(),
    };
    Some(Syscall { text, fd })
}

/// A kernel thread's line is all zeros, down to the user stack and pc
/// (which it has not): not `read(fd 0)`.
fn no_user_context(text: &str) -> bool {
    let mut tail = text.split_ascii_whitespace().rev();
    tail.next() == Some("0x0") && tail.next() == Some("0x0")
}

fn hex(arg: &str) -> Option<u64> {
    u64::from_str_radix(arg.strip_prefix("0x")?, 16).ok()
}

/// A syscall's name and whether its first argument is an fd. `poll`,
/// `select`, `epoll_wait` and `pause` exist only on x86_64 (the generic
/// table of aarch64, riscv64… has `ppoll`, `pselect6`, `epoll_pwait`).
fn syscall_name(nr: libc::c_long) -> Option<(&'static str, bool)> {
    const FD: bool = true;
    const NO: bool = false;
    Some(match nr {
        libc::SYS_read => ("read", FD),
        libc::SYS_write => ("write", FD),
        libc::SYS_readv => ("readv", FD),
        libc::SYS_writev => ("writev", FD),
        libc::SYS_pread64 => ("pread64", FD),
        libc::SYS_pwrite64 => ("pwrite64", FD),
        libc::SYS_recvfrom => ("recvfrom", FD),
        libc::SYS_sendto => ("sendto", FD),
        libc::SYS_recvmsg => ("recvmsg", FD),
        libc::SYS_sendmsg => ("sendmsg", FD),
        libc::SYS_connect => ("connect", FD),
        libc::SYS_accept => ("accept", FD),
        libc::SYS_accept4 => ("accept4", FD),
        libc::SYS_fsync => ("fsync", FD),
        libc::SYS_fdatasync => ("fdatasync", FD),
        libc::SYS_flock => ("flock", FD),
        libc::SYS_fcntl => ("fcntl", FD),
        libc::SYS_close => ("close", FD),
        #[cfg(target_arch = "x86_64")]
        libc::SYS_epoll_wait => ("epoll_wait", FD),
        libc::SYS_epoll_pwait => ("epoll_pwait", FD),
        libc::SYS_epoll_pwait2 => ("epoll_pwait2", FD),
        #[cfg(target_arch = "x86_64")]
        libc::SYS_poll => ("poll", NO),
        libc::SYS_ppoll => ("ppoll", NO),
        #[cfg(target_arch = "x86_64")]
        libc::SYS_select => ("select", NO),
        libc::SYS_pselect6 => ("pselect6", NO),
        libc::SYS_futex => ("futex", NO),
        libc::SYS_nanosleep => ("nanosleep", NO),
        libc::SYS_clock_nanosleep => ("clock_nanosleep", NO),
        libc::SYS_openat => ("openat", NO),
        libc::SYS_wait4 => ("wait4", NO),
        libc::SYS_waitid => ("waitid", NO),
        #[cfg(target_arch = "x86_64")]
        libc::SYS_pause => ("pause", NO),
        libc::SYS_rt_sigsuspend => ("rt_sigsuspend", NO),
        libc::SYS_rt_sigtimedwait => ("rt_sigtimedwait", NO),
        libc::SYS_io_uring_enter => ("io_uring_enter", NO),
        libc::SYS_sched_yield => ("sched_yield", NO),
        _ => return None,
    })
}

/// `socket:[12345]` → 12345.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// A `net/tcp` or `net/tcp6` line: `sl local rem st … uid timeout inode`.
/// The remote address, or `listening on LOCAL` for a listener (state `0A`).
fn tcp_peer(line: &str, inode: u64) -> Option<String> {
    let mut f = line.split_ascii_whitespace();
    let local = f.nth(1)?;
    let remote = f.next()?;
    let st = f.next()?;
    if f.nth(5)?.parse::<u64>().ok()? != inode {
        return None;
    }
    match st {
        "0A" => Some(format!("listening on {}", tcp_addr(local)?)),
        _ => Some(tcp_addr(remote)?.to_string()),
    }
}

/// `0100007F:1538` or 32 hex digits `:port`: each 32-bit word of the address
/// is printed as a host-order integer (so little-endian bytes on x86_64 and
/// aarch64); the port is a plain number. A v4-mapped v6 address is shown as
/// v4.
fn tcp_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip: IpAddr = match ip.len() {
        8 => Ipv4Addr::from(word(ip)?).into(),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            let v6 = Ipv6Addr::from(bytes);
            v6.to_ipv4_mapped().map_or(v6.into(), Into::into)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// One address word as printed by `%08X`, back to its bytes in memory.
fn word(hex: &str) -> Option<[u8; 4]> {
    u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes)
}

/// A `net/unix` line: `Num RefCount Protocol Flags Type St Inode [Path]`.
/// A connecting (client) socket has no path: only the server's end has.
fn unix_peer(line: &str, inode: u64) -> Option<String> {
    let mut rest = line;
    let mut field = "";
    for _ in 0..7 {
        let t = rest.trim_start();
        let end = t.find(|c: char| c.is_ascii_whitespace()).unwrap_or(t.len());
        (field, rest) = t.split_at(end);
    }
    if field.parse::<u64>().ok()? != inode {
        return None;
    }
    match rest.trim() {
        "" => Some("unix socket (no path)".to_owned()),
        path => Some(path.to_owned()),
    }
}

/// `[<0>] do_epoll_wait+0x4e8/0x520` → `do_epoll_wait`.
fn stack_frame(line: &str) -> Option<&str> {
    let (_, frame) = line.split_once("] ")?;
    let name = frame.split('+').next()?.trim();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    /// A child process, killed and reaped however the test ends.
    struct Kid(Child);

    impl Kid {
        fn spawn(program: &str, args: &[&str]) -> Kid {
            let child = Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn");
            Kid(child)
        }

        fn pid(&self) -> i32 {
            self.0.id() as i32
        }
    }

    impl Drop for Kid {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// `stuck(pid)` once `done` holds for it, or the last one after 5 s.
    fn stuck_when(pid: i32, done: impl Fn(&Stuck) -> bool) -> Stuck {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = stuck(pid);
            if done(&s) || Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn in_nanosleep(s: &Stuck) -> bool {
        s.syscall
            .as_deref()
            .is_some_and(|c| c.contains("nanosleep"))
    }

    #[test]
    fn usage_of_this_process() {
        let u = usage(std::process::id() as i32).unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(u.cpu_seconds >= 0.0, "{u:?}");
        assert!(u.rss_bytes > 1 << 20, "{u:?}");
        assert!(u.pss_bytes.is_some_and(|p| p > 0), "{u:?}");
        assert!(u.open_fds.is_some_and(|n| n >= 3), "{u:?}");
        let age = now - u.start_time_seconds;
        assert!((-5.0..3600.0).contains(&age), "started {age} s ago: {u:?}");
    }

    #[test]
    fn memory_is_rss_within_the_limit_and_pss_beyond_it() {
        let me = std::process::id() as i32;
        let (rss, kind) = memory_against(me, u64::MAX).unwrap();
        assert_eq!(kind, MemoryKind::Rss);
        let (bytes, kind) = memory_against(me, 1).unwrap();
        assert_eq!(kind, MemoryKind::Pss);
        assert!(bytes <= rss + (1 << 20), "PSS {bytes} ≤ RSS {rss}");
        assert_eq!(kind.label(), "PSS");
        assert_eq!(MemoryKind::Rss.to_string(), "RSS");
        assert!(bytes > 0);
    }

    #[test]
    fn a_gone_process_is_an_error_and_an_empty_stuck() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        let gone = |e: ProcError| match e {
            ProcError::Read { source, .. } => source.kind() == io::ErrorKind::NotFound,
            ProcError::Parse { .. } => false,
        };
        assert!(gone(usage(pid).unwrap_err()));
        assert!(gone(memory_against(pid, 1).unwrap_err()));
        let s = stuck(pid);
        assert_eq!(s, Stuck::default());
        assert_eq!(s.summary(), "state unknown");
    }

    #[test]
    fn stuck_in_sleep() {
        let kid = Kid::spawn("sleep", &["5"]);
        let s = stuck_when(kid.pid(), in_nanosleep);
        assert!(in_nanosleep(&s), "{s:?}");
        assert_eq!(s.state, "S (sleeping)");
        assert!(s.wchan.is_some(), "{s:?}");
        assert_eq!(s.peer, None);
        assert!(
            s.summary().starts_with("state S (sleeping), wchan "),
            "{}",
            s.summary()
        );
    }

    #[test]
    fn stuck_when_stopped() {
        let kid = Kid::spawn("sleep", &["100"]);
        let pid = kid.pid();
        stuck_when(pid, in_nanosleep);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGSTOP).unwrap();
        let s = stuck_when(pid, |s| s.state.starts_with('T'));
        println!("stopped sleep: {}", s.summary());
        assert_eq!(s.state, "T (stopped)");
        assert!(in_nanosleep(&s), "{s:?}");
        assert!(s.summary().contains(", was in "), "{}", s.summary());
    }

    #[test]
    fn stuck_in_read_on_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let script = format!("exec 3<>/dev/tcp/127.0.0.1/{port}; read -u 3 x");
        let kid = Kid::spawn("bash", &["-c", &script]);
        let (_conn, _) = listener.accept().unwrap();
        let s = stuck_when(kid.pid(), |s| s.syscall.as_deref() == Some("read(fd 3)"));
        println!("bash reading: {}", s.summary());
        assert_eq!(s.syscall.as_deref(), Some("read(fd 3)"), "{s:?}");
        assert_eq!(s.peer, Some(format!("127.0.0.1:{port}")));
    }

    #[test]
    fn stat_lines() {
        let tail = "1 1 0 -1 4194304 98 0 0 0 7 3 0 0 20 0 1 0 22222 3133440 412";
        let cases = [
            (format!("14676 (cat) R 1 {tail}"), 'R'),
            (format!("1 (a) (b) c) S 1 {tail}"), 'S'),
            (format!("2 (x y ) T 1 {tail}"), 'T'),
        ];
        for (line, state) in cases {
            let s = parse_stat(&line).unwrap();
            let want = Stat {
                state,
                utime: 7,
                stime: 3,
                starttime: 22222,
            };
            assert_eq!(s, want, "{line}");
        }
        assert!(parse_stat("1 (cut short) S 1 2").is_err());
        let file = std::env::temp_dir().join(format!("procfs-stat-{}", std::process::id()));
        fs::write(
            &file,
            [b"9 (a\xff) D 1 ".as_slice(), tail.as_bytes()].concat(),
        )
        .unwrap();
        let text = read(file.to_str().unwrap());
        let _ = fs::remove_file(&file);
        assert_eq!(parse_stat(&text.unwrap()).map(|s| s.state), Ok('D'));
        assert!(parse_stat("no parenthesis").is_err());
        assert_eq!(parse_statm("765 409 381 5 0 123 0\n"), Ok(409));
        assert_eq!(state_text('D'), "D (disk sleep)");
        assert_eq!(state_text('?'), "?");
    }

    #[test]
    fn smaps_rollup_and_the_boot_time() {
        let rollup = "5645de2dd000-7fffbd9ea000 ---p 00000000 00:00 0  [rollup]\n\
                      Rss:                1764 kB\nPss:                 308 kB\n\
                      Pss_Anon:            148 kB\n";
        assert_eq!(parse_pss_kb(rollup), Some(308));
        assert_eq!(parse_pss_kb("Pss_Anon: 148 kB\n"), None);
        assert_eq!(parse_pss_kb(""), None);
        let proc_stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
        let line = proc_stat.lines().find_map(|l| l.strip_prefix("btime "));
        let kernel: f64 = line.and_then(|b| b.trim().parse().ok()).expect("btime");
        assert!(
            (btime().expect("clocks") - kernel).abs() < 2.0,
            "boot time as the kernel says"
        );
    }

    #[test]
    fn syscall_lines() {
        let read = libc::SYS_read;
        let futex = libc::SYS_futex;
        let pwait = libc::SYS_epoll_pwait;
        let cases = [
            ("running\n".to_owned(), Some(("running", None))),
            (
                "-1 0x7ffd6250c810 0x7f3e66ef01c3\n".to_owned(),
                Some((NOT_IN_SYSCALL, None)),
            ),
            (
                format!("{read} 0xc 0x7ff4 0x1 0x0 0x0 0x0 0x7ff 0x7ff\n"),
                Some(("read(fd 12)", Some(12))),
            ),
            (
                format!("{pwait} 0x7 0x7ff4 0x400 0xffffffff 0x0 0x8 0x7ff 0x7ff"),
                Some(("epoll_pwait(fd 7)", Some(7))),
            ),
            (
                format!("{futex} 0x7f00 0x80 0x2 0x0 0x0 0x0 0x1 0x2"),
                Some(("futex", None)),
            ),
            (
                "999 0x0 0x0 0x0 0x0 0x0 0x0 0x7ffd6250 0x7f3e66ef".to_owned(),
                Some(("unknown(nr 999)", None)),
            ),
            (
                "0 0x0 0x0 0x0 0x0 0x0 0x0 0x0 0x0\n".to_owned(),
                Some((NOT_IN_SYSCALL, None)),
            ),
            ("".to_owned(), None),
            ("garbage".to_owned(), None),
        ];
        for (line, want) in cases {
            let got = decode_syscall(&line);
            let got = got.as_ref().map(|s| (s.text.as_str(), s.fd));
            assert_eq!(got, want, "{line}");
        }
    }

    #[test]
    fn stopped_summary_says_was_in() {
        let s = Stuck {
            state: "T (stopped)".into(),
            wchan: Some("do_signal_stop".into()),
            syscall: Some("clock_nanosleep".into()),
            peer: None,
            stack: Some("do_signal_stop < get_signal".into()),
        };
        let want = "state T (stopped), wchan do_signal_stop, was in clock_nanosleep, \
                    stack do_signal_stop < get_signal";
        assert_eq!(s.summary(), want);
        let s = Stuck {
            state: "S (sleeping)".into(),
            syscall: Some("epoll_wait(fd 3)".into()),
            peer: Some("127.0.0.1:5432".into()),
            ..Stuck::default()
        };
        assert_eq!(
            s.summary(),
            "state S (sleeping), in epoll_wait(fd 3), peer 127.0.0.1:5432"
        );
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn tcp_addresses() {
        let cases = [
            ("0100007F:1538", "127.0.0.1:5432"),
            ("0A01A8C0:0050", "192.168.1.10:80"),
            ("00000000:0000", "0.0.0.0:0"),
            ("00000000000000000000000001000000:1538", "[::1]:5432"),
            ("0000000000000000FFFF00000100007F:1538", "127.0.0.1:5432"),
            ("B80D0120000000000000000001000000:01BB", "[2001:db8::1]:443"),
            (
                "000080FE00000000FF005452123456FE:0016",
                "[fe80::5254:ff:fe56:3412]:22",
            ),
        ];
        for (hex, want) in cases {
            assert_eq!(
                tcp_addr(hex).map(|a| a.to_string()).as_deref(),
                Some(want),
                "{hex}"
            );
        }
        assert_eq!(tcp_addr("0100007F"), None);
        assert_eq!(tcp_addr("0100007:1538"), None);
        let split_char = format!("{}é{}:1538", "0".repeat(7), "0".repeat(23));
        assert_eq!(tcp_addr(&split_char), None);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn tcp_and_unix_lines() {
        let est = "   3: 0100007F:A2C4 0100007F:1538 01 00000000:00000000 00:00000000 \
                   00000000     0        0 98765 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(tcp_peer(est, 98765).as_deref(), Some("127.0.0.1:5432"));
        assert_eq!(tcp_peer(est, 98766), None);
        let listen = "   0: 0100007F:6448 00000000:0000 0A 00000000:00000000 00:00000000 \
                      00000000   106        0 5638 1 00000000e2f4f06b 100 0 0 10 0\n";
        assert_eq!(
            tcp_peer(listen, 5638).as_deref(),
            Some("listening on 127.0.0.1:25672")
        );
        let unix = "00000000e830a71e: 00000002 00000000 00010000 0001 01  4788 /run/a b.sock\n";
        assert_eq!(unix_peer(unix, 4788).as_deref(), Some("/run/a b.sock"));
        assert_eq!(unix_peer(unix, 478), None);
        let anon = "00000000c8049941: 00000003 00000000 00000000 0001 03 10285\n";
        assert_eq!(
            unix_peer(anon, 10285).as_deref(),
            Some("unix socket (no path)")
        );
        assert_eq!(socket_inode("socket:[10285]"), Some(10285));
        assert_eq!(socket_inode("pipe:[10285]"), None);
    }

    #[test]
    fn stack_lines() {
        let cases = [
            ("[<0>] do_epoll_wait+0x4e8/0x520", Some("do_epoll_wait")),
            (
                "[<0>] entry_SYSCALL_64_after_hwframe+0x76/0x7e\n",
                Some("entry_SYSCALL_64_after_hwframe"),
            ),
            (
                "[<ffffffff8107>] hrtimer_nanosleep",
                Some("hrtimer_nanosleep"),
            ),
            ("[<0>] ", None),
            ("", None),
        ];
        for (line, want) in cases {
            assert_eq!(stack_frame(line), want, "{line:?}");
        }
    }
}
