//! A cache of `GET /api/notes` pages, one per worker, that is never stale.
//!
//! The list is the hot read, and on two cores its query and its rows' JSON
//! cost more than anything else a request does. Each worker keeps the pages it
//! served with two things read *before* the page's query:
//!
//! - the **write generation**, a counter in the scoreboard header that every
//!   worker on this host bumps after each write (POST, PUT, PATCH, DELETE,
//!   whatever its outcome) and before the write's response leaves: a local,
//!   free check;
//! - the database's **commit token** ([`CommitToken`]: PostgreSQL's
//!   `pg_current_snapshot()`, SQLite's `data_version`), which moves whenever a
//!   transaction commits anywhere: another host, psql, `notesd seed`, a
//!   migration.
//!
//! A page is served again only while both are unchanged (the token is asked
//! of the database again: one `SELECT pg_current_snapshot()` round trip, or a
//! pragma), and while it is younger than `http.list_cache_ms`. Read before
//! the query, a token can only be older than the page (a commit between the
//! two makes the next check miss, never hit), so every note committed before
//! a list request started is in the page it gets: read-your-writes across
//! workers and hosts. `list_cache_ms = 0` turns the cache off.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::header::HeaderValue;

use crate::scoreboard::ext::{self, CacheEvent};
use crate::scoreboard::phase::{self, Query, Step};
use crate::store::{CommitToken, Store, StoreError};

/// Pages bigger than this are not kept (200 notes with long bodies).
const MAX_PAGE_BYTES: usize = 256 * 1024;
/// What one worker keeps at most.
const MAX_BYTES: usize = 4 * 1024 * 1024;
const MAX_PAGES: usize = 256;

/// `(limit, before)`: the query that made the page.
pub(crate) type Key = (i64, Option<i64>);

/// A page as it was served: the JSON body and its `Link` header.
#[derive(Clone, Debug)]
pub(crate) struct Page {
    pub body: Bytes,
    pub link: Option<HeaderValue>,
}

struct Entry {
    generation: u64,
    token: CommitToken,
    at: Instant,
    page: Page,
}

pub(crate) struct ListCache {
    ttl: Duration,
    pages: Mutex<Pages>,
    /// The last commit-token query: when it started and ended, and what it
    /// gave. One token query runs at a time per worker: a request reuses a
    /// token whose query started after it arrived (that token is as new as
    /// one of its own), so under load one round trip answers a whole batch
    /// of list requests; and a request reuses a *failure* that ended after it
    /// arrived, so a pool exhausted or a database down answers every waiting
    /// request at once instead of each running its own doomed query in turn
    /// (the k-th used to wait k × the pool's 2 s).
    token: tokio::sync::Mutex<Option<TokenQuery>>,
}

struct TokenQuery {
    started: Instant,
    ended: Instant,
    result: Result<CommitToken, Arc<StoreError>>,
}

impl TokenQuery {
    /// What this query says to a request that arrived at `since`, if anything.
    fn answers(&self, since: Instant) -> Option<Result<CommitToken, StoreError>> {
        match &self.result {
            Ok(token) if self.started >= since => Some(Ok(token.clone())),
            Err(e) if self.ended >= since => Some(Err(StoreError::Shared(e.clone()))),
            _ => None,
        }
    }
}

#[derive(Default)]
struct Pages {
    map: HashMap<Key, Entry>,
    bytes: usize,
}

impl ListCache {
    /// A cache keeping pages for `ttl` (zero: keeps nothing).
    pub(crate) fn new(ttl: Duration) -> ListCache {
        ListCache {
            ttl,
            pages: Mutex::new(Pages::default()),
            token: tokio::sync::Mutex::new(None),
        }
    }

    /// A commit token read after `since` (the request's arrival): every
    /// transaction committed before `since` is behind it. Or the failure of
    /// a token query that was still running when the request arrived.
    pub(crate) async fn token(
        &self,
        store: &Store,
        since: Instant,
    ) -> Result<CommitToken, StoreError> {
        // Waiting for another request's token query is waiting on that query.
        phase::enter(Step::Query, Some(Query::CommitToken));
        let mut last = self.token.lock().await;
        if let Some(answer) = last.as_ref().and_then(|q| q.answers(since)) {
            phase::enter(Step::Handling, None);
            return answer;
        }
        let started = Instant::now();
        ext::cache(CacheEvent::Validation);
        let result = store.commit_token().await.map_err(Arc::new);
        phase::enter(Step::Handling, None);
        *last = Some(TokenQuery {
            started,
            ended: Instant::now(),
            result: result.clone(),
        });
        result.map_err(StoreError::Shared)
    }

    pub(crate) fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }

    fn pages(&self) -> MutexGuard<'_, Pages> {
        // One thread per worker: never contended; a panic mid-update leaves
        // at worst a stale byte count.
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The page for `key`, if it was read at `generation` less than the TTL
    /// ago, with the commit token it was read at: the caller serves it only if
    /// the database's token is still that one.
    pub(crate) fn get(
        &self,
        key: Key,
        generation: u64,
        now: Instant,
    ) -> Option<(Page, CommitToken)> {
        if !self.enabled() {
            return None;
        }
        let pages = self.pages();
        let e = pages.map.get(&key)?;
        self.fresh(e, generation, now)
            .then(|| (e.page.clone(), e.token.clone()))
    }

    fn fresh(&self, e: &Entry, generation: u64, now: Instant) -> bool {
        e.generation == generation && now.saturating_duration_since(e.at) < self.ttl
    }

    /// Keep `page`, read at `generation` and `token` (both taken *before* the query).
    pub(crate) fn put(
        &self,
        key: Key,
        generation: u64,
        token: CommitToken,
        now: Instant,
        page: Page,
    ) {
        let size = page.body.len();
        if !self.enabled() || size > MAX_PAGE_BYTES {
            return;
        }
        let mut pages = self.pages();
        if let Some(old) = pages.map.remove(&key) {
            pages.bytes -= old.page.body.len();
        }
        if pages.map.len() >= MAX_PAGES || pages.bytes + size > MAX_BYTES {
            pages.map.retain(|_, e| self.fresh(e, generation, now));
            pages.bytes = pages.map.values().map(|e| e.page.body.len()).sum();
            if pages.map.len() >= MAX_PAGES || pages.bytes + size > MAX_BYTES {
                pages.map.clear();
                pages.bytes = 0;
            }
        }
        pages.bytes += size;
        pages.map.insert(
            key,
            Entry {
                generation,
                token,
                at: now,
                page,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: CommitToken = CommitToken::Lite(1, 1);

    fn page(n: usize) -> Page {
        Page {
            body: Bytes::from(vec![b'x'; n]),
            link: None,
        }
    }

    #[test]
    fn a_page_is_served_while_nothing_was_written_and_it_is_young() {
        let c = ListCache::new(Duration::from_millis(250));
        let t0 = Instant::now();
        c.put((50, None), 7, T, t0, page(10));
        assert!(
            c.get((50, None), 7, t0 + Duration::from_millis(100))
                .is_some()
        );
        assert!(c.get((50, Some(3)), 7, t0).is_none(), "another key");
        assert!(c.get((50, None), 8, t0).is_none(), "a write since");
        assert!(
            c.get((50, None), 7, t0 + Duration::from_millis(250))
                .is_none(),
            "too old"
        );
    }

    #[test]
    fn a_token_serves_later_requests_only_a_failure_serves_those_it_kept_waiting() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let ok = TokenQuery {
            started: ms(100),
            ended: ms(300),
            result: Ok(T),
        };
        assert!(matches!(ok.answers(ms(100)), Some(Ok(_))));
        assert!(ok.answers(ms(150)).is_none(), "arrived after it started");
        let failed = TokenQuery {
            started: ms(100),
            ended: ms(2100),
            result: Err(Arc::new(StoreError::Query(sqlx::Error::PoolTimedOut))),
        };
        let shared = failed.answers(ms(1500)).expect("kept waiting by it");
        assert!(shared.is_err_and(|e| e.is_unavailable()));
        assert!(failed.answers(ms(2200)).is_none(), "arrived after it ended");
    }

    #[test]
    fn zero_ttl_keeps_nothing() {
        let c = ListCache::new(Duration::ZERO);
        let t0 = Instant::now();
        c.put((50, None), 1, T, t0, page(10));
        assert!(c.get((50, None), 1, t0).is_none());
    }

    #[test]
    fn size_is_bounded() {
        let c = ListCache::new(Duration::from_secs(1));
        let t0 = Instant::now();
        c.put((1, None), 1, T, t0, page(MAX_PAGE_BYTES + 1));
        assert!(c.get((1, None), 1, t0).is_none(), "page too big");
        for i in 0..(MAX_PAGES as i64 + 10) {
            c.put((1, Some(i)), 1, T, t0, page(100));
        }
        let pages = c.pages();
        assert!(pages.map.len() <= MAX_PAGES);
        assert_eq!(pages.bytes, pages.map.len() * 100);
        drop(pages);
        for i in 0..40 {
            c.put((2, Some(i)), 1, T, t0, page(MAX_PAGE_BYTES));
        }
        assert!(c.pages().bytes <= MAX_BYTES);
    }
}
