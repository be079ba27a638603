//! Write-invalidated cache of `GET /api/notes` pages, one per worker.
//!
//! The list is the hot read, and on two cores its database round trip costs
//! more than everything else a request does. Each worker keeps the pages it
//! served, tagged with the **write generation**: a counter in the scoreboard
//! header that a worker bumps after every write (POST, PUT, PATCH, DELETE,
//! whatever its outcome, also when the request timeout cuts it short) and
//! before the write's response leaves. A page is served from the cache only
//! while the generation is unchanged and the page is younger than
//! `http.list_cache_ms`.
//!
//! So no client reads past a write made through this server: read-your-writes
//! holds across workers and across generations (the counter lives in the
//! master's scoreboard). Writes that bypass it (another host on the same
//! database, psql, `notesd seed` while serving) show within `list_cache_ms`.
//! `list_cache_ms = 0` turns the cache off.
//!
//! The generation is read *before* the query: a page tagged `g` was read after
//! every write that had bumped the counter to `g` had committed, so it can be
//! older than a later write only if that write bumped the counter past `g`.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::header::HeaderValue;

/// Pages bigger than this are not kept (200 notes with long bodies).
const MAX_PAGE_BYTES: usize = 256 * 1024;
/// What one worker keeps at most.
const MAX_BYTES: usize = 4 * 1024 * 1024;
const MAX_PAGES: usize = 256;

/// `(limit, before)`: the query that made the page.
pub type Key = (i64, Option<i64>);

/// A page as it was served: the JSON body and its `Link` header.
#[derive(Clone, Debug)]
pub struct Page {
    pub body: Bytes,
    pub link: Option<HeaderValue>,
}

struct Entry {
    generation: u64,
    at: Instant,
    page: Page,
}

pub struct ListCache {
    ttl: Duration,
    pages: Mutex<Pages>,
}

#[derive(Default)]
struct Pages {
    map: HashMap<Key, Entry>,
    bytes: usize,
}

impl ListCache {
    /// A cache keeping pages for `ttl` (zero: keeps nothing).
    pub fn new(ttl: Duration) -> ListCache {
        ListCache {
            ttl,
            pages: Mutex::new(Pages::default()),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }

    fn pages(&self) -> MutexGuard<'_, Pages> {
        // One thread per worker: never contended; a panic mid-update leaves
        // at worst a stale byte count.
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The page for `key`, if it was read at `generation` less than the TTL ago.
    pub fn get(&self, key: Key, generation: u64, now: Instant) -> Option<Page> {
        if !self.enabled() {
            return None;
        }
        let pages = self.pages();
        let e = pages.map.get(&key)?;
        self.fresh(e, generation, now).then(|| e.page.clone())
    }

    fn fresh(&self, e: &Entry, generation: u64, now: Instant) -> bool {
        e.generation == generation && now.saturating_duration_since(e.at) < self.ttl
    }

    /// Keep `page`, read at `generation` (the counter's value *before* the query).
    pub fn put(&self, key: Key, generation: u64, now: Instant, page: Page) {
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
                at: now,
                page,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        c.put((50, None), 7, t0, page(10));
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
    fn zero_ttl_keeps_nothing() {
        let c = ListCache::new(Duration::ZERO);
        let t0 = Instant::now();
        c.put((50, None), 1, t0, page(10));
        assert!(c.get((50, None), 1, t0).is_none());
    }

    #[test]
    fn size_is_bounded() {
        let c = ListCache::new(Duration::from_secs(1));
        let t0 = Instant::now();
        c.put((1, None), 1, t0, page(MAX_PAGE_BYTES + 1));
        assert!(c.get((1, None), 1, t0).is_none(), "page too big");
        for i in 0..(MAX_PAGES as i64 + 10) {
            c.put((1, Some(i)), 1, t0, page(100));
        }
        let pages = c.pages();
        assert!(pages.map.len() <= MAX_PAGES);
        assert_eq!(pages.bytes, pages.map.len() * 100);
        drop(pages);
        for i in 0..40 {
            c.put((2, Some(i)), 1, t0, page(MAX_PAGE_BYTES));
        }
        assert!(c.pages().bytes <= MAX_BYTES);
    }
}
