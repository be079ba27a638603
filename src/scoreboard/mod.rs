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
//! Slot layout (little-endian, offsets in bytes):
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
//! | 252 | connections accepted by this worker (u32, wraps) |
//! | 256 | metrics: request counters by route × status, latency histogram by route ([`metrics`]) |
//! | 256 + metrics | extension (512 bytes): the oldest request's phase ([`phase`]; u64), the token whose slow-request record was written (u64), then the saturation counters of [`ext`] (queue time, shed, list cache, pool) |
//!
//! The extension came after layout 2 first shipped, so the header's slot size
//! tells whether a board has it: a board from an older master (met after an
//! upgrade in place) has none, and its workers publish no phase. An older
//! binary refuses a board with the extension (its slot size differs), as it
//! refuses any layout it does not know.
//! This module is the slot protocol (who writes what, the seqlock around the
//! current request); [`metrics`] owns the counters after byte 256 and their
//! sums for `/metrics`, which only ever grow.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

pub(crate) mod ext;
pub(crate) mod metrics;
pub(crate) mod phase;

pub(crate) use metrics::{BUCKETS, Route, Totals};

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
/// Service flags (u32, [`Flags`]): written by the master, read by workers.
/// Added within layout 2 (the word was padding): an older master's board
/// has none set, and an older worker never reads them.
const OFF_H_FLAGS: usize = 48;
const OFF_H_RETIRED: usize = 64;
/// Workers recycled, by reason (4 × u64, `master::state::RecycleReason`
/// order): written by the master. Added within layout 2 after the retired
/// totals (which end at 1984): an older master's board has them zeroed.
const OFF_H_RECYCLES: usize = 1984;
const N_RECYCLES: usize = 4;
/// The serving generation (u64), then reloads by outcome (3 × u64:
/// complete, refused, abandoned): written by the master, after the recycles.
const OFF_H_GENERATION: usize = OFF_H_RECYCLES + N_RECYCLES * 8;
const OFF_H_RELOADS: usize = OFF_H_GENERATION + 8;
pub(crate) const N_RELOAD_OUTCOMES: usize = 3;
const BASE_SLOT: usize = 256;
const _: () = assert!(OFF_H_RETIRED + metrics::METRICS_BYTES <= OFF_H_RECYCLES);
const _: () = assert!(OFF_H_RELOADS + N_RELOAD_OUTCOMES * 8 <= HEADER);
/// A slot as layout 2 first shipped it: no extension.
const SLOT_SIZE_WITHOUT_EXT: usize = BASE_SLOT + metrics::METRICS_BYTES;
const EXT: usize = SLOT_SIZE_WITHOUT_EXT;
const EXT_BYTES: usize = 512;
pub(crate) const SLOT_SIZE: usize = SLOT_SIZE_WITHOUT_EXT + EXT_BYTES;
const OFF_X_PHASE: usize = EXT;
/// After the slots: the listen queues the master samples, one entry per
/// listener (queued u32, backlog u32, seq u64, name of up to 119 bytes: a
/// unix path is at most 107), read by `/metrics`. The seq is odd while the
/// master writes the entry, 0 for no entry: a reader never pairs one
/// listener's name with another's numbers. Older binaries never look past
/// the slots.
const MAX_LISTENERS: usize = 8;
const LISTENER_BYTES: usize = 136;
/// Before the listeners: the master's own counters (restarts by reason:
/// crash, timeout, OOM; then its dropped log lines; u64 each).
const TAIL_MASTER: usize = 64;
const TAIL_BYTES: usize = TAIL_MASTER + MAX_LISTENERS * LISTENER_BYTES;
/// The token of the request whose slow-request record was written (by the
/// worker or, for a stuck worker, the master): one record per request.
const OFF_X_REPORTED: usize = EXT + 8;

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
/// Added within layout 2 (the word was padding): an older worker leaves it 0.
const OFF_ACCEPTED: usize = 252;

#[derive(Debug, thiserror::Error)]
pub enum ScoreboardError {
    #[error("memfd_create: {0}")]
    Create(nix::Error),
    #[error("sizing the scoreboard: {0}")]
    Size(nix::Error),
    #[error("mapping the scoreboard: {0}")]
    Map(nix::Error),
    #[error(
        "scoreboard layout mismatch (magic {magic:#x}, version {version}, {slot_size}-byte slots); master and worker binaries differ too much"
    )]
    Layout {
        magic: u64,
        version: u32,
        slot_size: usize,
    },
    #[error("slot {0} is outside the scoreboard")]
    NoSlot(u32),
}

/// What the master tells every worker about the service as a whole (the
/// scoreboard header's flags word).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Flags(pub(crate) u32);

impl Flags {
    /// `notesd drain`: `/readyz` answers 503 "draining"; everything serves.
    pub(crate) const DRAIN: u32 = 1;
    /// The master is stopping (TERM): `/readyz` answers 503 "shutting down",
    /// and a worker told to stop empties its listeners' queues before it
    /// closes them (docs/design.md §4.12) — unless they are systemd's.
    pub(crate) const STOPPING: u32 = 2;
    /// The listeners are systemd's (socket activation): what is queued on
    /// them waits there for the next start; a stopping worker leaves it.
    pub(crate) const ACTIVATED: u32 = 4;

    pub(crate) fn has(self, flag: u32) -> bool {
        self.0 & flag != 0
    }
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
    /// Bytes per slot: [`SLOT_SIZE`], or less on an older master's board.
    slot_size: usize,
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
        let len = HEADER + slots as usize * SLOT_SIZE + TAIL_BYTES;
        nix::unistd::ftruncate(&fd, len as i64).map_err(ScoreboardError::Size)?;
        let mut board = Self::map(fd, len, slots)?;
        board.slot_size = SLOT_SIZE;
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
                slot_size: 0,
            });
        }
        let mut board = Self::map(fd, len, 0)?;
        let magic = board.u64_at(0).load(Ordering::Relaxed);
        let version = board.u32_at(8).load(Ordering::Relaxed);
        let slot_size = board.u32_at(12).load(Ordering::Relaxed) as usize;
        let slots = board.u32_at(16).load(Ordering::Acquire);
        if magic != MAGIC
            || version != LAYOUT_VERSION
            || !(slot_size == SLOT_SIZE || slot_size == SLOT_SIZE_WITHOUT_EXT)
            || HEADER + slots as usize * slot_size > len
        {
            return Err(ScoreboardError::Layout {
                magic,
                version,
                slot_size,
            });
        }
        board.slots = slots;
        board.slot_size = slot_size;
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
            slot_size: SLOT_SIZE,
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
            Ok(HEADER + slot as usize * self.slot_size)
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
        // The extension's counters carry on (as the request counters);
        // what described the worker that left goes.
        if self.has_ext() {
            for off in [
                OFF_X_PHASE,
                OFF_X_REPORTED,
                ext::X_POOL_IN_USE,
                ext::X_POOL_OPEN,
            ] {
                self.u64_at(o + off).store(0, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Claim the slow-request record of the request `token` in `slot` (the
    /// one the slot shows): true for the first caller only, worker or
    /// master. On a board without the extension, always true.
    pub(crate) fn claim_report(&self, slot: u32, token: u64) -> bool {
        match self.slot_off(slot) {
            Ok(o) if self.has_ext() => {
                self.u64_at(o + OFF_X_REPORTED)
                    .swap(token, Ordering::AcqRel)
                    != token
            }
            Ok(_) => true,
            Err(_) => false,
        }
    }

    /// The listen queues (see [`Self::set_listeners`]); none on an older
    /// master's board.
    fn tail(&self) -> Option<usize> {
        let at = HEADER + self.slots as usize * self.slot_size;
        (at + TAIL_BYTES <= self.len).then_some(at)
    }

    /// Master: the workers that died unasked, by reason: (crash, timeout,
    /// OOM). Each word only grows, so each series does.
    pub(crate) fn set_restart_reasons(&self, counts: [u64; 3]) {
        if let Some(tail) = self.tail() {
            for (i, n) in counts.iter().enumerate() {
                self.u64_at(tail + i * 8).store(*n, Ordering::Relaxed);
            }
        }
    }

    /// Master: log lines it could not write (its own; workers count theirs
    /// in their slots).
    pub(crate) fn set_master_log_dropped(&self, n: u64) {
        if let Some(tail) = self.tail() {
            self.u64_at(tail + 24).store(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn master_log_dropped(&self) -> u64 {
        self.tail()
            .map_or(0, |tail| self.u64_at(tail + 24).load(Ordering::Relaxed))
    }

    /// See [`Self::set_restart_reasons`]; None on an older master's board.
    pub(crate) fn restart_reasons(&self) -> Option<[u64; 3]> {
        let tail = self.tail()?;
        Some(std::array::from_fn(|i| {
            self.u64_at(tail + i * 8).load(Ordering::Relaxed)
        }))
    }

    /// Master: each listener's name (its bind) and queue, in the board's tail.
    pub(crate) fn set_listeners(&self, listeners: &[(String, u32, u32)]) {
        let Some(tail) = self.tail() else { return };
        for i in 0..MAX_LISTENERS {
            let e = tail + TAIL_MASTER + i * LISTENER_BYTES;
            let seq = self.u64_at(e + 8);
            match listeners.get(i) {
                Some((name, queued, backlog)) => {
                    // Odd while writing; the next even value once done.
                    let next = (seq.load(Ordering::Relaxed) | 1) + 1;
                    seq.store(next - 1, Ordering::Release);
                    std::sync::atomic::fence(Ordering::Release);
                    self.write_str(e + 16, LISTENER_BYTES - 16, name);
                    self.u32_at(e).store(*queued, Ordering::Relaxed);
                    self.u32_at(e + 4).store(*backlog, Ordering::Relaxed);
                    seq.store(next, Ordering::Release);
                }
                None => seq.store(0, Ordering::Release),
            }
        }
    }

    /// (name, queued, backlog) of each listener the master published.
    pub(crate) fn listeners(&self) -> Vec<(String, u32, u32)> {
        let Some(tail) = self.tail() else {
            return Vec::new();
        };
        (0..MAX_LISTENERS)
            .map(|i| tail + TAIL_MASTER + i * LISTENER_BYTES)
            .filter_map(|e| self.read_listener(e))
            .collect()
    }

    /// One listener entry, consistent (a few tries while the master writes it).
    fn read_listener(&self, e: usize) -> Option<(String, u32, u32)> {
        let seq = self.u64_at(e + 8);
        for _ in 0..16 {
            let s1 = seq.load(Ordering::Acquire);
            if s1 == 0 {
                return None;
            }
            if s1 % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let entry = (
                self.read_str(e + 16, LISTENER_BYTES - 16),
                self.u32_at(e).load(Ordering::Relaxed),
                self.u32_at(e + 4).load(Ordering::Relaxed),
            );
            std::sync::atomic::fence(Ordering::Acquire);
            if seq.load(Ordering::Relaxed) == s1 {
                return Some(entry);
            }
        }
        None
    }

    /// The slots have the extension (see the module doc).
    fn has_ext(&self) -> bool {
        self.slot_size >= SLOT_SIZE
    }

    /// Master: worker deaths the master did not ask for.
    pub fn set_restarts(&self, n: u64) {
        self.u64_at(OFF_H_RESTARTS).store(n, Ordering::Relaxed);
    }

    /// The write generation (see `http::list_cache`).
    pub fn write_generation(&self) -> u64 {
        self.u64_at(OFF_H_WRITE_GEN).load(Ordering::SeqCst)
    }

    /// The service flags (see [`Flags`]).
    pub(crate) fn flags(&self) -> Flags {
        Flags(self.u32_at(OFF_H_FLAGS).load(Ordering::Acquire))
    }

    /// Master: set (`on`) or clear `flag`.
    pub(crate) fn set_flag(&self, flag: u32, on: bool) {
        let word = self.u32_at(OFF_H_FLAGS);
        if on {
            word.fetch_or(flag, Ordering::AcqRel);
        } else {
            word.fetch_and(!flag, Ordering::AcqRel);
        }
    }

    /// A write has finished (or was cut short): pages read before are stale.
    pub fn bump_write_generation(&self) {
        self.u64_at(OFF_H_WRITE_GEN).fetch_add(1, Ordering::SeqCst);
    }

    /// Master: workers recycled so far, by reason.
    pub fn set_recycles(&self, counts: [u64; N_RECYCLES]) {
        for (i, n) in counts.iter().enumerate() {
            self.u64_at(OFF_H_RECYCLES + i * 8)
                .store(*n, Ordering::Relaxed);
        }
    }

    /// Workers recycled so far, by reason (see [`Self::set_recycles`]).
    pub fn recycles(&self) -> [u64; N_RECYCLES] {
        std::array::from_fn(|i| self.u64_at(OFF_H_RECYCLES + i * 8).load(Ordering::Relaxed))
    }

    /// Master: the generation that serves now.
    pub fn set_generation(&self, generation: u32) {
        self.u64_at(OFF_H_GENERATION)
            .store(u64::from(generation), Ordering::Relaxed);
    }

    pub fn generation(&self) -> u64 {
        self.u64_at(OFF_H_GENERATION).load(Ordering::Relaxed)
    }

    /// Master: a reload ended with outcome `i` (complete, refused, abandoned).
    /// Kept in the board, so a re-exec'd master counts on.
    pub fn count_reload(&self, i: usize) {
        if i < N_RELOAD_OUTCOMES {
            self.u64_at(OFF_H_RELOADS + i * 8)
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn reloads(&self) -> [u64; N_RELOAD_OUTCOMES] {
        std::array::from_fn(|i| self.u64_at(OFF_H_RELOADS + i * 8).load(Ordering::Relaxed))
    }

    pub fn restarts(&self) -> u64 {
        self.u64_at(OFF_H_RESTARTS).load(Ordering::Relaxed)
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
                token: self.u64_at(o + OFF_REQ_TOKEN).load(Ordering::Relaxed),
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
            accepted: self.u32_at(o + OFF_ACCEPTED).load(Ordering::Relaxed),
            request_phase: if self.has_ext() {
                phase::RequestPhase::unpack(self.u64_at(o + OFF_X_PHASE).load(Ordering::Relaxed))
            } else {
                None
            },
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

/// The request a worker is busy with, as the master sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentRequest {
    pub started_ns: u64,
    /// The worker's number for it (see [`Scoreboard::claim_report`]).
    pub(crate) token: u64,
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
    /// Connections this worker has accepted (wraps at 2³²; see `worker::acceptor`).
    pub accepted: u32,
    /// The phase of `current`, when the worker publishes it.
    pub(crate) request_phase: Option<phase::RequestPhase>,
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

    /// Claim the slow-request record of the request `token`, the one this
    /// slot shows (see [`Scoreboard::claim_report`]).
    pub(crate) fn claim_report(&self, token: u64) -> bool {
        if !self.board.has_ext() {
            return true;
        }
        self.board
            .u64_at(self.off + OFF_X_REPORTED)
            .swap(token, Ordering::AcqRel)
            != token
    }

    /// The oldest request's phase (a packed [`phase::RequestPhase`]).
    pub(crate) fn set_request_phase(&self, word: u64) {
        if self.board.has_ext() {
            self.board
                .u64_at(self.off + OFF_X_PHASE)
                .store(word, Ordering::Relaxed);
        }
    }

    /// Requests this worker has in flight now.
    pub(crate) fn in_flight(&self) -> u32 {
        self.board
            .u32_at(self.off + OFF_IN_FLIGHT)
            .load(Ordering::Relaxed)
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

    /// This worker accepted a connection.
    pub(crate) fn connection_accepted(&self) {
        self.board
            .u32_at(self.off + OFF_ACCEPTED)
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

    /// A board from a master before the slot extension (met after an
    /// upgrade in place): opened, served, no phases.
    #[test]
    fn a_board_without_the_extension_is_opened_and_publishes_no_phase() {
        let slots = 2;
        let fd = nix::sys::memfd::memfd_create(c"old", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .expect("memfd");
        let len = HEADER + slots * SLOT_SIZE_WITHOUT_EXT;
        nix::unistd::ftruncate(&fd, len as i64).expect("size");
        let mut old = Scoreboard::map(fd, len, slots as u32).expect("map");
        old.slot_size = SLOT_SIZE_WITHOUT_EXT;
        old.u64_at(0).store(MAGIC, Ordering::Relaxed);
        old.u32_at(8).store(LAYOUT_VERSION, Ordering::Relaxed);
        old.u32_at(12)
            .store(SLOT_SIZE_WITHOUT_EXT as u32, Ordering::Relaxed);
        old.u32_at(16).store(slots as u32, Ordering::Release);
        old.reset(1, 77, 5).expect("reset");
        let dup = nix::unistd::dup(old.fd()).expect("dup");
        let board = Arc::new(Scoreboard::open(dup).expect("an older master's board opens"));
        let slot = Slot::new(board.clone(), 1).expect("slot");
        slot.begin_request(1, "GET", "/", "id", 9);
        slot.set_request_phase(u64::MAX);
        slot.record(Route::Root, 200, std::time::Duration::from_millis(1));
        let snap = old.read(1).expect("read");
        assert_eq!((snap.pid, snap.request_phase), (77, None));
        assert!(snap.current.is_some());
        assert_eq!(old.totals().requests(Route::Root, 0), 1);
        assert_eq!(
            old.read(0).expect("slot 0").pid,
            0,
            "slot 1 did not spill into slot 0"
        );
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
