//! The shared-memory scoreboard (Apache prefork style): one slot per worker.
//!
//! The master creates a memfd, sizes it, maps it shared and passes it to every
//! worker at [`crate::ipc::SCOREBOARD_FD`]. A worker writes only its own slot;
//! the master reads all of them for timeouts, `notesd status` and metrics. All
//! fields are atomics, so no lock is ever held across processes and a worker
//! frozen mid-write cannot block the master. The current request is guarded by
//! a sequence counter (seqlock): readers retry or give up, writers never wait
//! (it is only shown in `notesd status`; metrics need no such guard, below).
//!
//! Slot layout (256 bytes, little-endian, offsets in bytes):
//!
//! | off | field |
//! |---|---|
//! | 0 | pid (u32, written by the master) |
//! | 4 | state (u32, the worker's own report: [`WorkerPhase`]) |
//! | 8 | heartbeat (u64, CLOCK_MONOTONIC ns) |
//! | 16 | requests served (u64) |
//! | 24 | active connections (u32) |
//! | 28 | seq (u32, odd while the current request is being written) |
//! | 32 | current request start (u64 ns; 0 = none) |
//! | 40 | current request token (u64) |
//! | 48 | method (16 bytes, NUL padded) |
//! | 64 | request id (64 bytes) |
//! | 128 | path (120 bytes, truncated) |
//! | 248 | requests in flight (u32) |
//! | 256 | metrics: request counters by route × status, latency histogram by route |
//!
//! Metrics are summed over all slots. A slot's metric counters are never
//! reset: the next worker in a slot counts on from where the last one left,
//! so every counter only ever grows and `/metrics` (answered by any worker,
//! for all of them) never goes backwards, with no lock and no retry. (Older
//! images folded a leaving worker's counters into the header's *retired*
//! totals under a header sequence counter; those totals are still added in,
//! and the sequence still checked, for a board inherited from one.)

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

const MAGIC: u64 = 0x6e6f_7465_7364_5342; // "notesdSB"
const LAYOUT_VERSION: u32 = 2;
/// Header: magic, layout, sizes, restarts, fold seq, write generation; then the
/// retired totals (written only by older images, see the module doc).
const HEADER: usize = 2048;
const OFF_H_RESTARTS: usize = 24;
const OFF_H_FOLD_SEQ: usize = 32;
/// Write generation (u64): bumped by a worker after each write, see
/// `http::list_cache`. Added within layout 2: an older master's board has it
/// zeroed, and an older worker never bumps it.
const OFF_H_WRITE_GEN: usize = 40;
const OFF_H_RETIRED: usize = 64;
const BASE_SLOT: usize = 256;
pub(crate) const SLOT_SIZE: usize = BASE_SLOT + METRICS_BYTES;

/// Route labels for metrics (index = position).
pub(crate) const ROUTES: &[&str] = &[
    "/",
    "/healthz",
    "/readyz",
    "/api/notes",
    "/api/notes/{id}",
    "/metrics",
    "other",
];
/// Status codes counted individually; anything else lands in the last bucket.
pub(crate) const STATUSES: &[u16] = &[
    200, 201, 204, 400, 404, 405, 408, 411, 413, 415, 422, 431, 500, 503,
];
/// Latency histogram upper bounds (seconds); a final +Inf bucket follows.
pub(crate) const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
const N_ROUTES: usize = 8;
const N_STATUS: usize = 16;
const N_BUCKETS: usize = 13;
const M_REQUESTS: usize = 0;
const M_HIST: usize = M_REQUESTS + N_ROUTES * N_STATUS;
const M_SUM_US: usize = M_HIST + N_ROUTES * N_BUCKETS;
const M_COUNTERS: usize = M_SUM_US + N_ROUTES;
const METRICS_BYTES: usize = M_COUNTERS * 8;

const OFF_PID: usize = 0;
const OFF_STATE: usize = 4;
const OFF_HEARTBEAT: usize = 8;
const OFF_REQUESTS: usize = 16;
const OFF_CONNS: usize = 24;
const OFF_SEQ: usize = 28;
const OFF_REQ_START: usize = 32;
const OFF_REQ_TOKEN: usize = 40;
const OFF_METHOD: usize = 48;
const LEN_METHOD: usize = 16;
const OFF_REQ_ID: usize = 64;
const LEN_REQ_ID: usize = 64;
const OFF_PATH: usize = 128;
const LEN_PATH: usize = 120;
const OFF_IN_FLIGHT: usize = 248;

#[derive(Debug, thiserror::Error)]
pub enum ScoreboardError {
    #[error("memfd_create: {0}")]
    Create(nix::Error),
    #[error("sizing the scoreboard: {0}")]
    Size(nix::Error),
    #[error("mapping the scoreboard: {0}")]
    Map(nix::Error),
    #[error(
        "scoreboard layout mismatch (magic {magic:#x}, version {version}); master and worker binaries differ too much"
    )]
    Layout { magic: u64, version: u32 },
    #[error("slot {0} is outside the scoreboard")]
    NoSlot(u32),
}

/// What a worker says it is doing (its own view; the master keeps its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum WorkerPhase {
    Booting = 1,
    Serving = 2,
    Draining = 3,
}

pub struct Scoreboard {
    base: NonNull<u8>,
    len: usize,
    slots: u32,
    fd: OwnedFd,
}

// SAFETY: the mapping is only accessed through atomics; the pointer stays valid
// until Drop unmaps it, and Drop needs `&mut self`.
unsafe impl Send for Scoreboard {}
unsafe impl Sync for Scoreboard {}

impl Scoreboard {
    /// Master side: a fresh, zeroed scoreboard with `slots` slots.
    pub fn create(slots: u32) -> Result<Scoreboard, ScoreboardError> {
        let fd = nix::sys::memfd::memfd_create(
            c"notesd-scoreboard",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .map_err(ScoreboardError::Create)?;
        let len = HEADER + slots as usize * SLOT_SIZE;
        nix::unistd::ftruncate(&fd, len as i64).map_err(ScoreboardError::Size)?;
        let board = Self::map(fd, len, slots)?;
        board.u64_at(0).store(MAGIC, Ordering::Relaxed);
        board.u32_at(8).store(LAYOUT_VERSION, Ordering::Relaxed);
        board.u32_at(12).store(SLOT_SIZE as u32, Ordering::Relaxed);
        board.u32_at(16).store(slots, Ordering::Release);
        Ok(board)
    }

    /// Worker side: map the inherited memfd and check its layout.
    pub fn open(fd: OwnedFd) -> Result<Scoreboard, ScoreboardError> {
        let stat = nix::sys::stat::fstat(&fd).map_err(ScoreboardError::Map)?;
        let len = stat.st_size as usize;
        if len < HEADER {
            return Err(ScoreboardError::Layout {
                magic: 0,
                version: 0,
            });
        }
        let mut board = Self::map(fd, len, 0)?;
        let magic = board.u64_at(0).load(Ordering::Relaxed);
        let version = board.u32_at(8).load(Ordering::Relaxed);
        let slot_size = board.u32_at(12).load(Ordering::Relaxed) as usize;
        let slots = board.u32_at(16).load(Ordering::Acquire);
        if magic != MAGIC
            || version != LAYOUT_VERSION
            || slot_size != SLOT_SIZE
            || HEADER + slots as usize * SLOT_SIZE > len
        {
            return Err(ScoreboardError::Layout { magic, version });
        }
        board.slots = slots;
        Ok(board)
    }

    fn map(fd: OwnedFd, len: usize, slots: u32) -> Result<Scoreboard, ScoreboardError> {
        let size = std::num::NonZeroUsize::new(len).ok_or(ScoreboardError::NoSlot(0))?;
        // SAFETY: a fresh shared mapping of a file we own; nothing else aliases it
        // in this process.
        let ptr = unsafe {
            mmap(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }
        .map_err(ScoreboardError::Map)?;
        Ok(Scoreboard {
            base: ptr.cast(),
            len,
            slots,
            fd,
        })
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        assert!(off + 4 <= self.len && off.is_multiple_of(4));
        // SAFETY: in bounds, aligned (mmap is page aligned), shared memory only
        // ever accessed atomically.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(off).cast()) }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(off + 8 <= self.len && off.is_multiple_of(8));
        // SAFETY: as above.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(off).cast()) }
    }

    fn slot_off(&self, slot: u32) -> Result<usize, ScoreboardError> {
        if slot < self.slots {
            Ok(HEADER + slot as usize * SLOT_SIZE)
        } else {
            Err(ScoreboardError::NoSlot(slot))
        }
    }

    /// Master: a worker left; free its slot (pid 0). Its metric counters
    /// stay: the slot's next worker counts on from them.
    pub fn release(&self, slot: u32) -> Result<(), ScoreboardError> {
        let o = self.slot_off(slot)?;
        for i in (0..BASE_SLOT).step_by(8) {
            self.u64_at(o + i).store(0, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Master: worker deaths the master did not ask for.
    pub fn set_restarts(&self, n: u64) {
        self.u64_at(OFF_H_RESTARTS).store(n, Ordering::Relaxed);
    }

    /// The write generation (see `http::list_cache`).
    pub fn write_generation(&self) -> u64 {
        self.u64_at(OFF_H_WRITE_GEN).load(Ordering::SeqCst)
    }

    /// A write has finished (or was cut short): pages read before are stale.
    pub fn bump_write_generation(&self) {
        self.u64_at(OFF_H_WRITE_GEN).fetch_add(1, Ordering::SeqCst);
    }

    pub fn restarts(&self) -> u64 {
        self.u64_at(OFF_H_RESTARTS).load(Ordering::Relaxed)
    }

    /// All counters, summed over every slot (and the retired totals of a
    /// board inherited from an older image). Each counter only grows, so a
    /// later call never returns less than an earlier one, in any process.
    pub fn totals(&self) -> Totals {
        // Only an older image's master folds (see the module doc): wait out a
        // fold in progress (microseconds) rather than return a partial sum;
        // if that master froze mid-fold, a partial sum after 1,000 tries.
        let mut tries = 0;
        let counters = loop {
            tries += 1;
            let s1 = self.u32_at(OFF_H_FOLD_SEQ).load(Ordering::Acquire);
            if !s1.is_multiple_of(2) && tries < 1000 {
                std::thread::yield_now();
                continue;
            }
            let counters = self.sum_counters();
            std::sync::atomic::fence(Ordering::Acquire);
            if self.u32_at(OFF_H_FOLD_SEQ).load(Ordering::Relaxed) == s1 || tries >= 1000 {
                break counters;
            }
        };
        let mut workers = [0u64; 4];
        let mut in_flight = 0u64;
        for slot in 0..self.slots {
            let o = HEADER + slot as usize * SLOT_SIZE;
            if self.u32_at(o + OFF_PID).load(Ordering::Relaxed) == 0 {
                continue;
            }
            let phase = self.u32_at(o + OFF_STATE).load(Ordering::Relaxed) as usize;
            workers[phase.min(3)] += 1;
            in_flight += u64::from(self.u32_at(o + OFF_IN_FLIGHT).load(Ordering::Relaxed));
        }
        Totals {
            counters,
            workers_booting: workers[WorkerPhase::Booting as usize],
            workers_serving: workers[WorkerPhase::Serving as usize],
            workers_draining: workers[WorkerPhase::Draining as usize],
            in_flight,
            restarts: self.restarts(),
        }
    }

    fn sum_counters(&self) -> Vec<u64> {
        let mut counters = vec![0u64; M_COUNTERS];
        for (i, c) in counters.iter_mut().enumerate() {
            *c += self.u64_at(OFF_H_RETIRED + i * 8).load(Ordering::Relaxed);
        }
        for slot in 0..self.slots {
            let o = HEADER + slot as usize * SLOT_SIZE;
            for (i, c) in counters.iter_mut().enumerate() {
                *c += self.u64_at(o + BASE_SLOT + i * 8).load(Ordering::Relaxed);
            }
        }
        counters
    }

    /// Master: record the pid of the worker just forked into `slot`.
    pub fn set_pid(&self, slot: u32, pid: u32) -> Result<(), ScoreboardError> {
        let o = self.slot_off(slot)?;
        self.u32_at(o + OFF_PID).store(pid, Ordering::Release);
        Ok(())
    }

    /// Master: wipe a slot for a new worker (before the fork) and stamp its pid
    /// and a fresh heartbeat (its metric counters carry on).
    pub fn reset(&self, slot: u32, pid: u32, now_ns: u64) -> Result<(), ScoreboardError> {
        let o = self.slot_off(slot)?;
        self.release(slot)?;
        self.u32_at(o + OFF_STATE)
            .store(WorkerPhase::Booting as u32, Ordering::Relaxed);
        self.u64_at(o + OFF_HEARTBEAT)
            .store(now_ns, Ordering::Relaxed);
        self.u32_at(o + OFF_PID).store(pid, Ordering::Release);
        Ok(())
    }

    /// Master: a consistent-enough copy of one slot.
    pub fn read(&self, slot: u32) -> Result<SlotSnapshot, ScoreboardError> {
        let o = self.slot_off(slot)?;
        let mut current = None;
        for _ in 0..16 {
            let s1 = self.u32_at(o + OFF_SEQ).load(Ordering::Acquire);
            if !s1.is_multiple_of(2) {
                std::hint::spin_loop();
                continue;
            }
            let start = self.u64_at(o + OFF_REQ_START).load(Ordering::Relaxed);
            let req = (start != 0).then(|| CurrentRequest {
                started_ns: start,
                method: self.read_str(o + OFF_METHOD, LEN_METHOD),
                request_id: self.read_str(o + OFF_REQ_ID, LEN_REQ_ID),
                path: self.read_str(o + OFF_PATH, LEN_PATH),
            });
            std::sync::atomic::fence(Ordering::Acquire);
            if self.u32_at(o + OFF_SEQ).load(Ordering::Relaxed) == s1 {
                current = req;
                break;
            }
        }
        Ok(SlotSnapshot {
            pid: self.u32_at(o + OFF_PID).load(Ordering::Acquire),
            phase: self.u32_at(o + OFF_STATE).load(Ordering::Relaxed),
            heartbeat_ns: self.u64_at(o + OFF_HEARTBEAT).load(Ordering::Relaxed),
            requests: self.u64_at(o + OFF_REQUESTS).load(Ordering::Relaxed),
            active_connections: self.u32_at(o + OFF_CONNS).load(Ordering::Relaxed),
            current,
        })
    }

    /// Read a NUL-terminated string field, a word at a time.
    fn read_str(&self, off: usize, len: usize) -> String {
        let mut bytes = Vec::with_capacity(len);
        for w in (0..len).step_by(8) {
            let word = self.u64_at(off + w).load(Ordering::Relaxed).to_le_bytes();
            match word.iter().position(|b| *b == 0) {
                Some(n) => {
                    bytes.extend_from_slice(&word[..n]);
                    break;
                }
                None => bytes.extend_from_slice(&word),
            }
        }
        bytes.truncate(len - 1);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Write a string field truncated to `len - 1` bytes plus its NUL, a word at a
    /// time, stopping after the word that holds the NUL (readers stop there).
    fn write_str(&self, off: usize, len: usize, s: &str) {
        let bytes = &s.as_bytes()[..s.len().min(len - 1)];
        for w in (0..len).step_by(8) {
            let mut word = [0u8; 8];
            let chunk = bytes.get(w..).unwrap_or(&[]);
            let n = chunk.len().min(8);
            word[..n].copy_from_slice(&chunk[..n]);
            self.u64_at(off + w)
                .store(u64::from_le_bytes(word), Ordering::Relaxed);
            if n < 8 {
                break;
            }
        }
    }
}

impl Drop for Scoreboard {
    fn drop(&mut self) {
        // SAFETY: unmapping the region mapped in `map`; no references outlive self.
        let _ = unsafe { munmap(self.base.cast(), self.len) };
    }
}

/// Metric totals for `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Totals {
    counters: Vec<u64>,
    pub workers_booting: u64,
    pub workers_serving: u64,
    pub workers_draining: u64,
    pub in_flight: u64,
    pub restarts: u64,
}

impl Totals {
    /// Requests for route `r` whose status falls in bucket `s` (see [`STATUSES`]; the last is "other").
    pub fn requests(&self, r: usize, s: usize) -> u64 {
        self.counters[M_REQUESTS + r * N_STATUS + s]
    }

    /// Requests for route `r` in latency bucket `b` (not cumulative; `BUCKETS.len()` is +Inf).
    pub fn bucket(&self, r: usize, b: usize) -> u64 {
        self.counters[M_HIST + r * N_BUCKETS + b]
    }

    pub fn sum_seconds(&self, r: usize) -> f64 {
        self.counters[M_SUM_US + r] as f64 / 1e6
    }

    pub const fn status_buckets() -> usize {
        STATUSES.len() + 1
    }
}

/// Index of a status in [`STATUSES`], or the "other" bucket.
pub(crate) fn status_index(status: u16) -> usize {
    STATUSES
        .iter()
        .position(|s| *s == status)
        .unwrap_or(STATUSES.len())
}

/// The request a worker is busy with, as the master sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentRequest {
    pub started_ns: u64,
    pub method: String,
    pub path: String,
    pub request_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotSnapshot {
    pub pid: u32,
    pub phase: u32,
    pub heartbeat_ns: u64,
    pub requests: u64,
    pub active_connections: u32,
    pub current: Option<CurrentRequest>,
}

/// A worker's handle on its own slot.
#[derive(Clone)]
pub(crate) struct Slot {
    board: Arc<Scoreboard>,
    off: usize,
}

impl Slot {
    pub(crate) fn new(board: Arc<Scoreboard>, slot: u32) -> Result<Slot, ScoreboardError> {
        let off = board.slot_off(slot)?;
        Ok(Slot { board, off })
    }

    pub(crate) fn heartbeat(&self, now_ns: u64) {
        self.board
            .u64_at(self.off + OFF_HEARTBEAT)
            .store(now_ns, Ordering::Relaxed);
    }

    pub(crate) fn set_phase(&self, phase: WorkerPhase) {
        self.board
            .u32_at(self.off + OFF_STATE)
            .store(phase as u32, Ordering::Relaxed);
    }

    /// Record a finished request in the metrics.
    pub(crate) fn record(&self, route: usize, status: u16, elapsed: std::time::Duration) {
        let base = self.off + BASE_SLOT;
        let r = route.min(ROUTES.len() - 1);
        let b = &self.board;
        b.u64_at(base + (M_REQUESTS + r * N_STATUS + status_index(status)) * 8)
            .fetch_add(1, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(BUCKETS.len());
        b.u64_at(base + (M_HIST + r * N_BUCKETS + bucket) * 8)
            .fetch_add(1, Ordering::Relaxed);
        b.u64_at(base + (M_SUM_US + r) * 8)
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    pub(crate) fn request_started(&self) {
        self.board
            .u32_at(self.off + OFF_IN_FLIGHT)
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn request_finished(&self) {
        self.board
            .u32_at(self.off + OFF_IN_FLIGHT)
            .fetch_sub(1, Ordering::Relaxed);
    }

    /// The whole scoreboard (for `/metrics`, which reports all workers).
    pub(crate) fn board(&self) -> &Scoreboard {
        &self.board
    }

    /// Count one request; returns the new total.
    pub(crate) fn count_request(&self) -> u64 {
        self.board
            .u64_at(self.off + OFF_REQUESTS)
            .fetch_add(1, Ordering::Relaxed)
            + 1
    }

    pub(crate) fn connection_opened(&self) {
        self.board
            .u32_at(self.off + OFF_CONNS)
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.board
            .u32_at(self.off + OFF_CONNS)
            .fetch_sub(1, Ordering::Relaxed);
    }

    /// Record the request now being served; `token` identifies it for `end_request`.
    pub(crate) fn begin_request(
        &self,
        token: u64,
        method: &str,
        path: &str,
        id: &str,
        now_ns: u64,
    ) {
        let b = &self.board;
        let seq = b.u32_at(self.off + OFF_SEQ);
        seq.fetch_add(1, Ordering::AcqRel);
        b.u64_at(self.off + OFF_REQ_START)
            .store(now_ns.max(1), Ordering::Relaxed);
        b.u64_at(self.off + OFF_REQ_TOKEN)
            .store(token, Ordering::Relaxed);
        b.write_str(self.off + OFF_METHOD, LEN_METHOD, method);
        b.write_str(self.off + OFF_REQ_ID, LEN_REQ_ID, id);
        b.write_str(self.off + OFF_PATH, LEN_PATH, path);
        seq.fetch_add(1, Ordering::Release);
    }

    /// Clear the current request if it is still the one `token` started.
    pub(crate) fn end_request(&self, token: u64) {
        let b = &self.board;
        if b.u64_at(self.off + OFF_REQ_TOKEN).load(Ordering::Relaxed) != token {
            return;
        }
        let seq = b.u32_at(self.off + OFF_SEQ);
        seq.fetch_add(1, Ordering::AcqRel);
        b.u64_at(self.off + OFF_REQ_START)
            .store(0, Ordering::Relaxed);
        seq.fetch_add(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn master_sees_what_the_worker_writes() {
        let board = Scoreboard::create(4).expect("create");
        board.reset(2, 1234, 10).expect("reset");
        // A second mapping of the same memfd, as a worker has after exec.
        let dup = nix::unistd::dup(board.fd()).expect("dup");
        let worker_board = Arc::new(Scoreboard::open(dup).expect("open"));
        assert_eq!(worker_board.slots(), 4);
        let slot = Slot::new(worker_board, 2).expect("slot");
        slot.heartbeat(99);
        slot.set_phase(WorkerPhase::Serving);
        assert_eq!(slot.count_request(), 1);
        slot.connection_opened();
        slot.begin_request(7, "GET", "/api/notes", "req-1", 50);
        let snap = board.read(2).expect("read");
        assert_eq!(snap.pid, 1234);
        assert_eq!(snap.heartbeat_ns, 99);
        assert_eq!(snap.phase, WorkerPhase::Serving as u32);
        assert_eq!(snap.requests, 1);
        assert_eq!(snap.active_connections, 1);
        let cur = snap.current.expect("current request");
        assert_eq!(
            (
                cur.method.as_str(),
                cur.path.as_str(),
                cur.request_id.as_str()
            ),
            ("GET", "/api/notes", "req-1")
        );
        slot.end_request(6); // someone else's token: no effect
        assert!(board.read(2).expect("read").current.is_some());
        slot.end_request(7);
        assert!(board.read(2).expect("read").current.is_none());
        assert!(board.read(4).is_err());
        assert!(board.fd().as_raw_fd() > 2);
    }

    #[test]
    fn totals_survive_a_worker_leaving() {
        let board = Arc::new(Scoreboard::create(2).expect("create"));
        board.reset(0, 10, 1).expect("reset");
        board.reset(1, 11, 1).expect("reset");
        let a = Slot::new(board.clone(), 0).expect("slot");
        let b = Slot::new(board.clone(), 1).expect("slot");
        a.set_phase(WorkerPhase::Serving);
        b.set_phase(WorkerPhase::Serving);
        a.record(3, 200, std::time::Duration::from_millis(2));
        b.record(3, 200, std::time::Duration::from_millis(3));
        b.record(3, 999, std::time::Duration::from_secs(9));
        b.request_started();
        let t = board.totals();
        assert_eq!(t.requests(3, status_index(200)), 2);
        assert_eq!(t.requests(3, STATUSES.len()), 1);
        assert_eq!(t.bucket(3, BUCKETS.len()), 1, "9 s lands in +Inf");
        assert_eq!((t.workers_serving, t.in_flight), (2, 1));
        board.release(1).expect("release");
        board.reset(1, 12, 5).expect("new worker in the slot");
        let t2 = board.totals();
        assert_eq!(t2.requests(3, status_index(200)), 2, "retired counts kept");
        let c = Slot::new(board.clone(), 1).expect("slot");
        c.record(3, 200, std::time::Duration::from_millis(1));
        assert_eq!(
            board.totals().requests(3, status_index(200)),
            3,
            "the next worker in the slot counts on"
        );
        assert!((t2.sum_seconds(3) - 9.005).abs() < 1e-9);
        assert_eq!(t2.workers_booting, 1);
        assert_eq!(t2.in_flight, 0);
    }

    #[test]
    fn long_paths_are_truncated_not_overflowed() {
        let board = Arc::new(Scoreboard::create(1).expect("create"));
        board.reset(0, 1, 1).expect("reset");
        let slot = Slot::new(board.clone(), 0).expect("slot");
        slot.begin_request(1, "GET", &"/x".repeat(500), "id", 5);
        let cur = board.read(0).expect("read").current.expect("cur");
        assert_eq!(cur.path.len(), LEN_PATH - 1);
    }

    #[test]
    fn string_fields_round_trip_at_every_word_boundary() {
        let board = Arc::new(Scoreboard::create(1).expect("create"));
        board.reset(0, 1, 1).expect("reset");
        let slot = Slot::new(board.clone(), 0).expect("slot");
        // A long path first, so shorter ones must not show its leftovers.
        for n in [200, 0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 118, 119, 120, 121] {
            let path = "p".repeat(n);
            slot.begin_request(n as u64 + 1, "DELETE", &path, &"i".repeat(n), 5);
            let cur = board.read(0).expect("read").current.expect("cur");
            assert_eq!(cur.path, "p".repeat(n.min(LEN_PATH - 1)), "path of {n}");
            assert_eq!(
                cur.request_id,
                "i".repeat(n.min(LEN_REQ_ID - 1)),
                "id of {n}"
            );
            assert_eq!(cur.method, "DELETE");
        }
    }

    #[test]
    fn foreign_memfd_is_refused() {
        let fd = nix::sys::memfd::memfd_create(c"x", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .expect("memfd");
        nix::unistd::ftruncate(&fd, 4096).expect("size");
        assert!(matches!(
            Scoreboard::open(fd),
            Err(ScoreboardError::Layout { .. })
        ));
    }
}
