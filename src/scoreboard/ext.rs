//! Saturation counters in each slot's extension (see the parent module's
//! layout): queue time, shed requests, the pool, the list cache. A worker
//! writes its own slot's through [`install`]ed handle, from wherever the
//! event happens (the pool, the list cache, the request path), so nothing has
//! to thread a `Slot` through; outside a worker (`notesd migrate`) every call
//! is a no-op. `/metrics` sums them over all slots ([`Scoreboard::ext_totals`]).
//!
//! Counters are never reset (the slot's next worker counts on, as the
//! request counters); the pool's gauges are zeroed when a worker leaves.

use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::metrics::BUCKETS;
use super::{EXT, HEADER, OFF_IN_FLIGHT, OFF_PID, Scoreboard, Slot};

const N_BUCKETS: usize = 13;
/// Queue time (X-Request-Start → handling): 13 buckets, then the sum in µs.
const X_QUEUE: usize = EXT + 16;
const X_QUEUE_SUM: usize = X_QUEUE + N_BUCKETS * 8;
const X_SHED: usize = X_QUEUE_SUM + 8;
const X_CACHE_HIT: usize = X_SHED + 8;
const X_CACHE_MISS: usize = X_CACHE_HIT + 8;
const X_CACHE_VALIDATION: usize = X_CACHE_MISS + 8;
/// Gauges, written whole by the worker (zeroed when it leaves).
pub(super) const X_POOL_IN_USE: usize = X_CACHE_VALIDATION + 8;
pub(super) const X_POOL_OPEN: usize = X_POOL_IN_USE + 8;
const X_POOL_WAIT: usize = X_POOL_OPEN + 8;
const X_POOL_WAIT_SUM: usize = X_POOL_WAIT + N_BUCKETS * 8;
const X_POOL_TIMEOUTS: usize = X_POOL_WAIT_SUM + 8;
/// Database errors by class ([`ErrorClass`]).
const X_DB_ERRORS: usize = X_POOL_TIMEOUTS + 8;
const N_CLASSES: usize = 5;
/// Requests without a usable X-Request-Start (not behind the shipped nginx
/// site, or a host clock behind nginx's).
const X_QUEUE_UNKNOWN: usize = X_DB_ERRORS + N_CLASSES * 8;
/// Log lines the worker could not write to `log.file`.
const X_LOG_DROPPED: usize = X_QUEUE_UNKNOWN + 8;
const _: () = assert!(X_LOG_DROPPED + 8 <= EXT + super::EXT_BYTES);

/// This worker's slot, for the counters below.
static MINE: OnceLock<Slot> = OnceLock::new();

/// Worker boot: the counters below go to `slot` from now on.
pub(crate) fn install(slot: Slot) {
    let _ = MINE.set(slot);
}

fn add(off: usize, n: u64) {
    if let Some(s) = MINE.get()
        && s.board.has_ext()
    {
        s.board.u64_at(s.off + off).fetch_add(n, Ordering::Relaxed);
    }
}

fn set(off: usize, v: u64) {
    if let Some(s) = MINE.get()
        && s.board.has_ext()
    {
        s.board.u64_at(s.off + off).store(v, Ordering::Relaxed);
    }
}

fn bucket(d: Duration) -> usize {
    let secs = d.as_secs_f64();
    BUCKETS
        .iter()
        .position(|le| secs <= *le)
        .unwrap_or(BUCKETS.len())
}

fn observe(hist: usize, sum: usize, d: Duration) {
    add(hist + bucket(d) * 8, 1);
    add(sum, d.as_micros() as u64);
}

/// A request waited `d` between nginx taking it (X-Request-Start) and notesd handling it.
pub(crate) fn queue_time(d: Duration) {
    observe(X_QUEUE, X_QUEUE_SUM, d);
}

/// A log line could not be written (see `log::dropped_lines`).
pub(crate) fn log_dropped() {
    add(X_LOG_DROPPED, 1);
}

/// A request came without a usable X-Request-Start: its queue time is unknown.
pub(crate) fn queue_unknown() {
    add(X_QUEUE_UNKNOWN, 1);
}

/// A request was answered 503 "overloaded" (`http.max_queue_ms`).
pub(crate) fn shed() {
    add(X_SHED, 1);
}

/// What the list cache did for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CacheEvent {
    /// A page served again (its commit token unchanged).
    Hit,
    /// No usable page: the query ran.
    Miss,
    /// A commit-token query ran (one may serve many requests).
    Validation,
}

pub(crate) fn cache(event: CacheEvent) {
    add(
        match event {
            CacheEvent::Hit => X_CACHE_HIT,
            CacheEvent::Miss => X_CACHE_MISS,
            CacheEvent::Validation => X_CACHE_VALIDATION,
        },
        1,
    );
}

/// A request waited `waited` for a connection (handed out, or timed out).
pub(crate) fn pool_waited(waited: Duration) {
    observe(X_POOL_WAIT, X_POOL_WAIT_SUM, waited);
}

/// No connection within the pool's acquire timeout.
pub(crate) fn pool_timed_out() {
    add(X_POOL_TIMEOUTS, 1);
}

/// The pool's connections now: handed out, and open (handed out + idle).
pub(crate) fn pool_gauges(in_use: usize, open: usize) {
    set(X_POOL_IN_USE, in_use as u64);
    set(X_POOL_OPEN, open as u64);
}

/// Database errors counted apart: what an operator acts on differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    /// The connection itself failed: I/O, TLS or protocol errors (no
    /// SQLSTATE: the server is down or unreachable), SQLSTATE 08, or the
    /// server terminating it (57P01–57P03: shutdown, crash, restart).
    Connection = 0,
    /// 53: insufficient resources (disk full, too many connections).
    Resources = 1,
    /// 57014: a query canceled (statement_timeout, pg_cancel_backend).
    Canceled = 2,
    /// 40: transaction rollback (serialization, deadlock).
    Rollback = 3,
    /// Anything else (a constraint, a bad query, SQLite's own codes).
    Other = 4,
}

impl ErrorClass {
    pub(crate) const ALL: [ErrorClass; N_CLASSES] = [
        ErrorClass::Connection,
        ErrorClass::Resources,
        ErrorClass::Canceled,
        ErrorClass::Rollback,
        ErrorClass::Other,
    ];

    /// The class of an error whose connection `broke` (see
    /// `store::health::broken`) or that carries `sqlstate`.
    pub(crate) fn of(broke: bool, sqlstate: Option<&str>) -> ErrorClass {
        if broke {
            return ErrorClass::Connection;
        }
        match sqlstate {
            Some(s) if s.starts_with("53") => ErrorClass::Resources,
            Some("57014") => ErrorClass::Canceled,
            Some(s) if s.starts_with("40") => ErrorClass::Rollback,
            _ => ErrorClass::Other,
        }
    }

    /// The `class` label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            ErrorClass::Connection => "connection",
            ErrorClass::Resources => "resources",
            ErrorClass::Canceled => "canceled",
            ErrorClass::Rollback => "rollback",
            ErrorClass::Other => "other",
        }
    }
}

/// A query or connection failed (see [`ErrorClass::of`]).
pub(crate) fn db_error(class: ErrorClass) {
    add(X_DB_ERRORS + class as usize * 8, 1);
}

/// The extension counters summed over every slot, and the busy workers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtTotals {
    pub queue: [u64; N_BUCKETS],
    pub queue_sum_us: u64,
    pub queue_unknown: u64,
    pub log_dropped: u64,
    pub shed: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_validations: u64,
    pub pool_in_use: u64,
    pub pool_open: u64,
    pub pool_wait: [u64; N_BUCKETS],
    pub pool_wait_sum_us: u64,
    pub pool_timeouts: u64,
    pub db_errors: [u64; N_CLASSES],
    /// Workers with at least one request in flight.
    pub busy: u64,
}

impl Scoreboard {
    /// [`ExtTotals`] over every slot (all zero but `busy` on a board
    /// without the extension).
    pub fn ext_totals(&self) -> ExtTotals {
        let mut t = ExtTotals::default();
        for slot in 0..self.slots {
            let o = HEADER + slot as usize * self.slot_size;
            let live = self.u32_at(o + OFF_PID).load(Ordering::Relaxed) != 0;
            if live && self.u32_at(o + OFF_IN_FLIGHT).load(Ordering::Relaxed) > 0 {
                t.busy += 1;
            }
            if !self.has_ext() {
                continue;
            }
            let at = |off: usize| self.u64_at(o + off).load(Ordering::Relaxed);
            for b in 0..N_BUCKETS {
                t.queue[b] += at(X_QUEUE + b * 8);
                t.pool_wait[b] += at(X_POOL_WAIT + b * 8);
            }
            for (c, n) in t.db_errors.iter_mut().enumerate() {
                *n += at(X_DB_ERRORS + c * 8);
            }
            t.queue_sum_us += at(X_QUEUE_SUM);
            t.queue_unknown += at(X_QUEUE_UNKNOWN);
            t.log_dropped += at(X_LOG_DROPPED);
            t.shed += at(X_SHED);
            t.cache_hits += at(X_CACHE_HIT);
            t.cache_misses += at(X_CACHE_MISS);
            t.cache_validations += at(X_CACHE_VALIDATION);
            t.pool_wait_sum_us += at(X_POOL_WAIT_SUM);
            t.pool_timeouts += at(X_POOL_TIMEOUTS);
            if live {
                t.pool_in_use += at(X_POOL_IN_USE);
                t.pool_open += at(X_POOL_OPEN);
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_classes() {
        assert_eq!(ErrorClass::of(true, None), ErrorClass::Connection);
        assert_eq!(ErrorClass::of(true, Some("57P01")), ErrorClass::Connection);
        assert_eq!(ErrorClass::of(false, Some("53100")), ErrorClass::Resources);
        assert_eq!(ErrorClass::of(false, Some("57014")), ErrorClass::Canceled);
        assert_eq!(ErrorClass::of(false, Some("40001")), ErrorClass::Rollback);
        assert_eq!(ErrorClass::of(false, Some("23505")), ErrorClass::Other);
        assert_eq!(ErrorClass::of(false, None), ErrorClass::Other);
    }

    #[test]
    fn one_bucket_per_bound_and_inf() {
        assert_eq!(BUCKETS.len() + 1, N_BUCKETS);
    }
}
