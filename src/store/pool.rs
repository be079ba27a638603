//! One worker's connection pool.
//!
//! sqlx's `Pool` pings every connection it takes back (a second round trip to
//! the database per request), because it cannot know whether the last query
//! on it ran to the end. Without it: list +3–24 %, POST +8 % and its p99
//! halved (oha direct, bench/README.md).
//! This pool knows: the caller says so with [`Conn::finish`], and a
//! connection whose query was cut short (request timeout, dropped future) or
//! whose error says it broke is closed instead of reused. Idle and suspect
//! connections are pinged before use (see [`super::health`]).
//!
//! Connections are reused last-in first-out, so a quiet worker keeps using
//! the same one and the others age out after `idle_timeout`.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sqlx::{ConnectOptions, Connection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::health;
use crate::scoreboard::ext;

pub struct Pool<C: Connection> {
    inner: Arc<Inner<C>>,
}

struct Inner<C: Connection> {
    options: C::Options,
    /// One permit per connection, open or about to be.
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Idle<C>>>,
    acquire_timeout: Duration,
    idle_timeout: Duration,
    /// Ping idle and suspect connections before use (not for in-process SQLite).
    check: bool,
    closed: AtomicBool,
    /// The permits' number (the semaphore does not say).
    max: usize,
    statement_timeout: Option<Duration>,
    on_connect: Option<OnConnect<C>>,
}

struct Idle<C> {
    conn: C,
    opened: Instant,
    since: Instant,
}

/// Settings of a [`Pool`].
pub struct PoolOptions<C> {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    pub idle_timeout: Duration,
    pub check: bool,
    /// The bound on each query run on a connection of this pool (None: none).
    pub statement_timeout: Option<Duration>,
    /// Run on each new connection before it is first handed out (e.g.
    /// PostgreSQL's `SET statement_timeout`).
    pub on_connect: Option<OnConnect<C>>,
}

/// See [`PoolOptions::on_connect`].
pub(crate) type OnConnect<C> = Arc<
    dyn for<'c> Fn(
            &'c mut C,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(), sqlx::Error>> + Send + 'c>,
        > + Send
        + Sync,
>;

impl<C: Connection> Clone for Pool<C> {
    fn clone(&self) -> Self {
        Pool {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C: Connection> fmt::Debug for Pool<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("available", &self.inner.permits.available_permits())
            .field("idle", &self.inner.idle().len())
            .finish()
    }
}

impl<C: Connection> Inner<C> {
    fn idle(&self) -> MutexGuard<'_, Vec<Idle<C>>> {
        // A panic cannot leave the Vec half-changed: push and pop are atomic.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The gauges for `/metrics`: connections handed out, and open (handed
    /// out + idle). A permit is held by each connection handed out.
    fn publish(&self) {
        let in_use = self.max.saturating_sub(self.permits.available_permits());
        ext::pool_gauges(in_use, in_use + self.idle().len());
    }
}

impl<C: Connection> Pool<C> {
    /// A pool with one connection opened already, so a bad URL or an
    /// unreachable database shows at once.
    pub async fn connect(options: C::Options, o: PoolOptions<C>) -> Result<Pool<C>, sqlx::Error> {
        let pool = Pool {
            inner: Arc::new(Inner {
                options,
                permits: Arc::new(Semaphore::new(o.max_connections.max(1) as usize)),
                idle: Mutex::new(Vec::new()),
                acquire_timeout: o.acquire_timeout,
                idle_timeout: o.idle_timeout,
                check: o.check,
                closed: AtomicBool::new(false),
                max: o.max_connections.max(1) as usize,
                statement_timeout: o.statement_timeout,
                on_connect: o.on_connect,
            }),
        };
        let mut first = pool.acquire().await?;
        first.reusable = true;
        drop(first);
        Ok(pool)
    }

    /// The bound on each query (see [`PoolOptions::statement_timeout`]).
    pub fn statement_timeout(&self) -> Option<Duration> {
        self.inner.statement_timeout
    }

    /// A connection within `acquire_timeout`: an idle one (pinged first when
    /// idle or suspect), else a new one.
    pub async fn acquire(&self) -> Result<Conn<C>, sqlx::Error> {
        self.acquire_within(false).await
    }

    /// Like [`acquire`](Self::acquire), but a connection idle for longer than
    /// [`health::WRITE_IDLE_PING`] is pinged before it is handed out (when the
    /// pool checks at all): for writes, which are never retried.
    pub async fn acquire_live(&self) -> Result<Conn<C>, sqlx::Error> {
        self.acquire_within(true).await
    }

    /// Either acquire, bounded by `acquire_timeout`, and counted for
    /// `/metrics` (the wait, a timeout, the pool's gauges).
    async fn acquire_within(&self, write: bool) -> Result<Conn<C>, sqlx::Error> {
        let asked = Instant::now();
        let r = match tokio::time::timeout(self.inner.acquire_timeout, self.acquire_inner(write))
            .await
        {
            Ok(r) => r,
            Err(_) => {
                ext::pool_timed_out();
                Err(sqlx::Error::PoolTimedOut)
            }
        };
        ext::pool_waited(asked.elapsed());
        self.inner.publish();
        r
    }

    async fn acquire_inner(&self, write: bool) -> Result<Conn<C>, sqlx::Error> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(sqlx::Error::PoolClosed);
        }
        let permit = Arc::clone(&inner.permits)
            .acquire_owned()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        loop {
            let idle = inner.idle().pop();
            let Some(mut idle) = idle else {
                let mut conn = inner.options.connect().await?;
                if let Some(init) = &inner.on_connect {
                    init(&mut conn).await?;
                }
                return Ok(Conn::new(conn, Instant::now(), permit, self));
            };
            let idle_for = idle.since.elapsed();
            if idle_for > inner.idle_timeout {
                close_quietly(idle.conn);
                continue;
            }
            let ping = inner.check
                && ((write && idle_for > health::WRITE_IDLE_PING)
                    || health::should_ping(idle.opened.elapsed(), idle_for));
            if ping && let Err(e) = idle.conn.ping().await {
                // Nothing was sent on it yet: safe to try the next one, which
                // is now suspect too.
                health::broke();
                tracing::info!("discarding a broken database connection: {e}");
                continue;
            }
            return Ok(Conn::new(idle.conn, idle.opened, permit, self));
        }
    }

    /// Close every idle connection; later acquires fail with `PoolClosed`.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.permits.close();
        let idle: Vec<Idle<C>> = std::mem::take(&mut *self.inner.idle());
        for i in idle {
            let _ = i.conn.close().await;
        }
    }
}

/// Drop a connection without waiting on the server (it may be gone).
fn close_quietly<C: Connection>(conn: C) {
    drop(conn);
}

/// A connection out of the pool. Back to the pool on drop only after
/// [`finish`](Conn::finish) said its last operation completed; else closed.
pub struct Conn<C: Connection> {
    conn: Option<C>,
    opened: Instant,
    reusable: bool,
    pool: Arc<Inner<C>>,
    _permit: OwnedSemaphorePermit,
}

impl<C: Connection> Conn<C> {
    fn new(conn: C, opened: Instant, permit: OwnedSemaphorePermit, pool: &Pool<C>) -> Conn<C> {
        Conn {
            conn: Some(conn),
            opened,
            reusable: false,
            pool: Arc::clone(&pool.inner),
            _permit: permit,
        }
    }

    /// The operation on this connection returned `result`: keep the
    /// connection unless the error says the connection itself broke.
    pub fn finish<T>(&mut self, result: &Result<T, sqlx::Error>) {
        self.reusable = match result {
            Ok(_) => true,
            Err(e) => !health::broken(e),
        };
    }
}

impl<C: Connection> std::ops::Deref for Conn<C> {
    type Target = C;
    fn deref(&self) -> &C {
        // `conn` is only taken in `drop`.
        self.conn.as_ref().expect("connection present until drop")
    }
}

impl<C: Connection> std::ops::DerefMut for Conn<C> {
    fn deref_mut(&mut self) -> &mut C {
        self.conn.as_mut().expect("connection present until drop")
    }
}

impl<C: Connection> Drop for Conn<C> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.reusable && !self.pool.closed.load(Ordering::Acquire) {
            self.pool.idle().push(Idle {
                conn,
                opened: self.opened,
                since: Instant::now(),
            });
        } else {
            close_quietly(conn);
        }
        // The permit goes back after this body: count it out already.
        let in_use = self
            .pool
            .max
            .saturating_sub(self.pool.permits.available_permits() + 1);
        ext::pool_gauges(in_use, in_use + self.pool.idle().len());
    }
}
