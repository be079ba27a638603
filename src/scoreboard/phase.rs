//! Where a request is: the phase a worker publishes for each request it
//! serves, so that a slow one can be told apart from a stuck one, and the
//! record of a slow request says what it waits on ("waiting 2.1 s on query
//! insert_note (PostgreSQL 127.0.0.1:5432)").
//!
//! A worker is an event loop: a request waiting on the database leaves the
//! thread in `epoll_wait`, serving others, so the kernel cannot say what
//! that request waits on; only the request can. Each request carries a
//! [`PhaseCell`] (one `u64`, [`RequestPhase`] packed); the store and the
//! handlers set it through the task-local [`enter`], and the oldest request's
//! phase is copied into the worker's scoreboard slot for the master (which
//! writes the record itself when the worker's thread is stuck).
//!
//! # Layout
//!
//! - [`Step`], [`Query`]: what a request is doing and which named query.
//! - [`RequestPhase`]: a step, its query and since when; packs into a `u64`.
//! - [`PhaseCell`] + [`scope`] + [`enter`]: the request's own cell, reached
//!   from anywhere in the request's task (a no-op outside one: `notesd migrate`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::Slot;
use crate::clock;

/// What a request is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Step {
    /// Not published (an older worker, or no request).
    Unknown = 0,
    /// In notesd's own code: routing, checking, building the answer.
    Handling = 1,
    /// Reading the request body from the client.
    ReadingBody = 2,
    /// Waiting for a connection from the worker's pool.
    WaitingPool = 3,
    /// A query is running: sent, its answer not yet all read.
    Query = 4,
}

impl Step {
    fn from_u8(n: u8) -> Step {
        match n {
            1 => Step::Handling,
            2 => Step::ReadingBody,
            3 => Step::WaitingPool,
            4 => Step::Query,
            _ => Step::Unknown,
        }
    }
}

/// The store's named queries (their numbers are shared with other binaries
/// through the scoreboard: new ones go at the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Query {
    ListNotes = 1,
    GetNote = 2,
    InsertNote = 3,
    PutNote = 4,
    PatchNote = 5,
    DeleteNote = 6,
    /// The list cache's commit token (`pg_current_snapshot()`, `PRAGMA data_version`).
    CommitToken = 7,
    /// `/readyz`'s `SELECT 1`.
    SelectOne = 8,
    /// A write under an `Idempotency-Key`: claim, write and answer in one
    /// transaction (see `store::idempotency`).
    KeyedWrite = 9,
    /// A worker's purge of expired idempotency keys.
    PurgeKeys = 10,
}

impl Query {
    const ALL: [Query; 10] = [
        Query::ListNotes,
        Query::GetNote,
        Query::InsertNote,
        Query::PutNote,
        Query::PatchNote,
        Query::DeleteNote,
        Query::CommitToken,
        Query::SelectOne,
        Query::KeyedWrite,
        Query::PurgeKeys,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Query::ListNotes => "list_notes",
            Query::GetNote => "get_note",
            Query::InsertNote => "insert_note",
            Query::PutNote => "put_note",
            Query::PatchNote => "patch_note",
            Query::DeleteNote => "delete_note",
            Query::CommitToken => "commit_token",
            Query::SelectOne => "select_one",
            Query::KeyedWrite => "keyed_write",
            Query::PurgeKeys => "purge_keys",
        }
    }

    fn from_u8(n: u8) -> Option<Query> {
        Query::ALL.into_iter().find(|q| *q as u8 == n)
    }
}

/// A step, the query it runs (for [`Step::Query`]) and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestPhase {
    pub(crate) step: Step,
    pub(crate) query: Option<Query>,
    /// `CLOCK_MONOTONIC`, µs (48 bits: 8.9 years of uptime).
    pub(crate) since_us: u64,
}

const SINCE_BITS: u32 = 48;
const SINCE_MASK: u64 = (1 << SINCE_BITS) - 1;

impl RequestPhase {
    pub(crate) fn now(step: Step, query: Option<Query>) -> RequestPhase {
        RequestPhase {
            step,
            query,
            since_us: clock::coarse_now_ns() / 1_000,
        }
    }

    pub(crate) fn pack(self) -> u64 {
        (u64::from(self.step as u8) << 56)
            | (u64::from(self.query.map_or(0, |q| q as u8)) << SINCE_BITS)
            | (self.since_us & SINCE_MASK)
    }

    /// `None` for 0 (nothing published).
    pub(crate) fn unpack(word: u64) -> Option<RequestPhase> {
        (word != 0).then(|| RequestPhase {
            step: Step::from_u8((word >> 56) as u8),
            query: Query::from_u8((word >> SINCE_BITS) as u8),
            since_us: word & SINCE_MASK,
        })
    }

    /// How long it has been in this step at `now_ns`.
    pub(crate) fn elapsed(&self, now_ns: u64) -> Duration {
        // Both in 48 bits: right across the wrap (8.9 years of uptime).
        Duration::from_micros(((now_ns / 1_000).wrapping_sub(self.since_us)) & SINCE_MASK)
    }

    /// `"waiting 2.1 s on query insert_note (PostgreSQL 127.0.0.1:5432)"`;
    /// `database` names the database the worker's queries go to.
    pub(crate) fn describe(&self, now_ns: u64, database: &str) -> String {
        let secs = self.elapsed(now_ns).as_secs_f64();
        match (self.step, self.query) {
            (Step::Query, Some(q)) => {
                format!("waiting {secs:.1} s on query {} ({database})", q.name())
            }
            (Step::Query, None) => format!("waiting {secs:.1} s on a query ({database})"),
            (Step::WaitingPool, _) => {
                format!("waiting {secs:.1} s for a connection from the worker's pool ({database})")
            }
            (Step::ReadingBody, _) => {
                format!("reading the request body for {secs:.1} s (the client is slow to send it)")
            }
            (Step::Handling, _) => format!("in notesd's own code for {secs:.1} s"),
            (Step::Unknown, _) => "not published".to_string(),
        }
    }

    /// The short name, for the log's PHASE field.
    pub(crate) fn name(&self) -> &'static str {
        match self.step {
            Step::Unknown => "unknown",
            Step::Handling => "handling",
            Step::ReadingBody => "reading_body",
            Step::WaitingPool => "waiting_pool",
            Step::Query => "query",
        }
    }
}

/// One request's phase. The worker is single-threaded, so the cell and the
/// slot it mirrors into are only ever written from one thread.
pub(crate) struct PhaseCell {
    word: AtomicU64,
    /// This request is the worker's oldest in flight: the one its scoreboard
    /// slot shows, so its phase is mirrored there.
    front: AtomicBool,
    slot: Slot,
}

impl PhaseCell {
    pub(crate) fn new(slot: Slot) -> Arc<PhaseCell> {
        Arc::new(PhaseCell {
            word: AtomicU64::new(RequestPhase::now(Step::Handling, None).pack()),
            front: AtomicBool::new(false),
            slot,
        })
    }

    pub(crate) fn get(&self) -> Option<RequestPhase> {
        RequestPhase::unpack(self.word.load(Ordering::Relaxed))
    }

    fn set(&self, phase: RequestPhase) {
        let word = phase.pack();
        self.word.store(word, Ordering::Relaxed);
        if self.front.load(Ordering::Relaxed) {
            self.slot.set_request_phase(word);
        }
    }

    /// This request became the one the slot shows: mirror its phase there.
    pub(crate) fn make_front(&self) {
        self.front.store(true, Ordering::Relaxed);
        self.slot
            .set_request_phase(self.word.load(Ordering::Relaxed));
    }
}

tokio::task_local! {
    static CURRENT: Arc<PhaseCell>;
}

/// `fut` (one request) with `cell` as its phase. Pass the request's future
/// pinned in place (`std::pin::pin!`): a request's future is kilobytes, and
/// wrapping it by value would copy it on every request.
pub(crate) fn scope<F: std::future::Future>(
    cell: Arc<PhaseCell>,
    fut: F,
) -> tokio::task::futures::TaskLocalFuture<Arc<PhaseCell>, F> {
    CURRENT.scope(cell, fut)
}

/// The current request enters `step` (running `query`, for [`Step::Query`]).
/// A no-op outside a request (`notesd migrate`, `seed`, boot checks).
pub(crate) fn enter(step: Step, query: Option<Query>) {
    let _ = CURRENT.try_with(|c| c.set(RequestPhase::now(step, query)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_packs_and_unpacks() {
        for q in Query::ALL {
            let p = RequestPhase {
                step: Step::Query,
                query: Some(q),
                since_us: 123_456_789,
            };
            assert_eq!(RequestPhase::unpack(p.pack()), Some(p));
        }
        assert_eq!(RequestPhase::unpack(0), None);
        // Across the 48-bit wrap of the µs clock (8.9 years of uptime).
        let late = RequestPhase {
            step: Step::WaitingPool,
            query: None,
            since_us: SINCE_MASK + 1 - 500_000,
        };
        let packed = RequestPhase::unpack(late.pack()).expect("phase");
        assert_eq!(
            packed.elapsed((SINCE_MASK + 1 + 1_500_000) * 1_000),
            Duration::from_secs(2)
        );
        let p = RequestPhase {
            step: Step::Query,
            query: Some(Query::InsertNote),
            since_us: 1_000_000,
        };
        assert_eq!(
            p.describe(3_100_000_000, "PostgreSQL 127.0.0.1:5432"),
            "waiting 2.1 s on query insert_note (PostgreSQL 127.0.0.1:5432)"
        );
    }
}
