//! The metrics half of the scoreboard: request counters by [`Route`] ×
//! status and a latency histogram by route, in every slot after its first
//! 256 bytes, and their sum over all slots for `/metrics`.
//!
//! A slot's counters are never reset: the next worker in a slot counts on
//! from where the last one left, so every sum only grows, whichever worker
//! answers `/metrics` (see the parent module for the rest of the layout).

use std::sync::atomic::Ordering;

use super::{BASE_SLOT, HEADER, OFF_H_FOLD_SEQ, OFF_H_RETIRED, OFF_IN_FLIGHT, OFF_PID, OFF_STATE};
use super::{Scoreboard, Slot, WorkerPhase};

/// What `/metrics` counts a request under: the route it matched, or
/// `Other`. Its position (the discriminant) is its row in every slot's
/// counters, so new routes go at the end (8 rows are laid out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Root,
    Healthz,
    Readyz,
    Notes,
    Note,
    Metrics,
    Other,
}

impl Route {
    pub(crate) const ALL: [Route; 7] = [
        Route::Root,
        Route::Healthz,
        Route::Readyz,
        Route::Notes,
        Route::Note,
        Route::Metrics,
        Route::Other,
    ];

    /// The `route` label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Route::Root => "/",
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Notes => "/api/notes",
            Route::Note => "/api/notes/{id}",
            Route::Metrics => "/metrics",
            Route::Other => "other",
        }
    }

    fn row(self) -> usize {
        self as usize
    }
}
/// Status codes counted individually; anything else lands in the last bucket.
pub(crate) const STATUSES: &[u16] = &[
    200, 201, 204, 400, 404, 405, 408, 411, 413, 415, 422, 431, 500, 503,
];
/// Counted individually too, added after binaries of the layout shipped:
/// they come after the "other" bucket, so that every index an older binary
/// writes or reads (`0..=STATUSES.len()`) keeps its meaning.
pub(crate) const LATE_STATUSES: &[u16] = &[507];
/// Latency histogram upper bounds (seconds); a final +Inf bucket follows.
pub(crate) const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Rows laid out per slot (the layout is shared with other binaries: fixed).
const N_ROUTES: usize = 8;
const N_STATUS: usize = 16;
const N_BUCKETS: usize = 13;
const M_REQUESTS: usize = 0;
const M_HIST: usize = M_REQUESTS + N_ROUTES * N_STATUS;
const M_SUM_US: usize = M_HIST + N_ROUTES * N_BUCKETS;
const M_COUNTERS: usize = M_SUM_US + N_ROUTES;
pub(super) const METRICS_BYTES: usize = M_COUNTERS * 8;

impl Scoreboard {
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
            let o = HEADER + slot as usize * self.slot_size;
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

    /// (slot, pid) of every slot a worker holds.
    pub(crate) fn live_pids(&self) -> Vec<(u32, u32)> {
        (0..self.slots)
            .filter_map(|slot| {
                let o = HEADER + slot as usize * self.slot_size;
                let pid = self.u32_at(o + OFF_PID).load(Ordering::Relaxed);
                (pid != 0).then_some((slot, pid))
            })
            .collect()
    }

    fn sum_counters(&self) -> Vec<u64> {
        let mut counters = vec![0u64; M_COUNTERS];
        for (i, c) in counters.iter_mut().enumerate() {
            *c += self.u64_at(OFF_H_RETIRED + i * 8).load(Ordering::Relaxed);
        }
        for slot in 0..self.slots {
            let o = HEADER + slot as usize * self.slot_size;
            for (i, c) in counters.iter_mut().enumerate() {
                *c += self.u64_at(o + BASE_SLOT + i * 8).load(Ordering::Relaxed);
            }
        }
        counters
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
    /// Requests for `route` whose status falls in bucket `s` (see [`STATUSES`]; the last is "other").
    pub(crate) fn requests(&self, route: Route, s: usize) -> u64 {
        self.counters[M_REQUESTS + route.row() * N_STATUS + s]
    }

    /// Requests for `route` in latency bucket `b` (not cumulative; `BUCKETS.len()` is +Inf).
    pub(crate) fn bucket(&self, route: Route, b: usize) -> u64 {
        self.counters[M_HIST + route.row() * N_BUCKETS + b]
    }

    pub(crate) fn sum_seconds(&self, route: Route) -> f64 {
        self.counters[M_SUM_US + route.row()] as f64 / 1e6
    }

    pub const fn status_buckets() -> usize {
        STATUSES.len() + 1 + LATE_STATUSES.len()
    }

    /// The `status` label of bucket `s`.
    pub(crate) fn status_label(s: usize) -> String {
        match STATUSES.get(s) {
            Some(code) => code.to_string(),
            None if s == STATUSES.len() => "other".to_string(),
            None => LATE_STATUSES
                .get(s - STATUSES.len() - 1)
                .map_or("other".to_string(), u16::to_string),
        }
    }
}

const _: () = assert!(Totals::status_buckets() <= N_STATUS);

/// Index of a status in [`STATUSES`] or [`LATE_STATUSES`], or the "other" bucket.
pub(crate) fn status_index(status: u16) -> usize {
    if let Some(i) = STATUSES.iter().position(|s| *s == status) {
        return i;
    }
    LATE_STATUSES
        .iter()
        .position(|s| *s == status)
        .map_or(STATUSES.len(), |i| STATUSES.len() + 1 + i)
}

impl Slot {
    /// Record a finished request in the metrics.
    pub(crate) fn record(&self, route: Route, status: u16, elapsed: std::time::Duration) {
        let base = self.off + BASE_SLOT;
        let r = route.row();
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn totals_survive_a_worker_leaving() {
        let board = Arc::new(Scoreboard::create(2).expect("create"));
        board.reset(0, 10, 1).expect("reset");
        board.reset(1, 11, 1).expect("reset");
        let a = Slot::new(board.clone(), 0).expect("slot");
        let b = Slot::new(board.clone(), 1).expect("slot");
        a.set_phase(WorkerPhase::Serving);
        b.set_phase(WorkerPhase::Serving);
        a.record(Route::Notes, 200, std::time::Duration::from_millis(2));
        b.record(Route::Notes, 200, std::time::Duration::from_millis(3));
        b.record(Route::Notes, 999, std::time::Duration::from_secs(9));
        b.request_started();
        let t = board.totals();
        assert_eq!(t.requests(Route::Notes, status_index(200)), 2);
        assert_eq!(t.requests(Route::Notes, STATUSES.len()), 1);
        assert_eq!(Totals::status_label(STATUSES.len()), "other");
        assert_eq!(Totals::status_label(status_index(507)), "507");
        assert_eq!(Totals::status_label(status_index(200)), "200");
        assert_eq!(status_index(599), STATUSES.len());
        assert_eq!(
            t.bucket(Route::Notes, BUCKETS.len()),
            1,
            "9 s lands in +Inf"
        );
        assert_eq!((t.workers_serving, t.in_flight), (2, 1));
        board.release(1).expect("release");
        board.reset(1, 12, 5).expect("new worker in the slot");
        let t2 = board.totals();
        assert_eq!(
            t2.requests(Route::Notes, status_index(200)),
            2,
            "retired counts kept"
        );
        let c = Slot::new(board.clone(), 1).expect("slot");
        c.record(Route::Notes, 200, std::time::Duration::from_millis(1));
        assert_eq!(
            board.totals().requests(Route::Notes, status_index(200)),
            3,
            "the next worker in the slot counts on"
        );
        assert!((t2.sum_seconds(Route::Notes) - 9.005).abs() < 1e-9);
        assert_eq!(t2.workers_booting, 1);
        assert_eq!(t2.in_flight, 0);
    }
}
