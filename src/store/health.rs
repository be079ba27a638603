//! Broken connections.
//!
//! A pooled PostgreSQL connection can die while it sits idle: the server
//! restarted, `pg_terminate_backend` ended it, a proxy or firewall cut it.
//! Used as is, it fails the next request with a 503 although the database is
//! back. Three rules keep that from reaching clients:
//!
//! * before use, a connection is pinged when it sat idle longer than
//!   [`IDLE_PING`] (as pgxpool does), or when it is older than the last broken
//!   connection this process saw, for [`SUSPECT_WINDOW`] after it;
//! * a read whose connection broke is retried once, on another connection;
//! * a write pings its connection first when it sat idle longer than
//!   [`WRITE_IDLE_PING`], and is never retried (it may have committed before
//!   the connection broke).
//!
//! Under load connections are never idle for long and nothing has broken, so
//! neither reads nor writes cost an extra round trip (a ping before every
//! write cost POST a second round trip: 60 % of pgbench's INSERT rate). What
//! the short threshold leaves: a connection killed less than
//! [`WRITE_IDLE_PING`] before a write is used, and that write answers 503
//! (nothing committed); the next ones find the pool suspect and ping.
//! Health is per process: a worker has one pool.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::StoreError;
use crate::clock;

/// A connection idle longer than this is pinged before use.
pub(crate) const IDLE_PING: Duration = Duration::from_secs(1);
/// A connection idle longer than this is pinged before a write.
pub(crate) const WRITE_IDLE_PING: Duration = Duration::from_millis(20);
/// After a broken connection, older connections are suspect for this long.
pub(crate) const SUSPECT_WINDOW: Duration = Duration::from_secs(30);

/// When this process last saw a broken connection (`CLOCK_MONOTONIC` ns; 0: never).
static LAST_BROKEN_NS: AtomicU64 = AtomicU64::new(0);

/// Remember that a connection broke now.
pub(crate) fn broke() {
    LAST_BROKEN_NS.store(clock::now_ns().max(1), Ordering::Relaxed);
}

/// Ping this idle connection before use?
pub(crate) fn should_ping(age: Duration, idle_for: Duration) -> bool {
    should_ping_at(
        age,
        idle_for,
        LAST_BROKEN_NS.load(Ordering::Relaxed),
        clock::now_ns(),
    )
}

fn should_ping_at(age: Duration, idle_for: Duration, last_broken_ns: u64, now_ns: u64) -> bool {
    if idle_for > IDLE_PING {
        return true;
    }
    if last_broken_ns == 0 {
        return false;
    }
    let since = Duration::from_nanos(now_ns.saturating_sub(last_broken_ns));
    since < SUSPECT_WINDOW && age > since
}

/// The connection itself failed (not the query, not a busy or saturated
/// database): another connection may well succeed.
pub(crate) fn broken(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // connection exceptions (08…); terminated by an administrator,
            // crash or restart (57P01-57P03)
            // … and a server that became read-only under us (25006: a
            // failed-over primary back as a standby): a fresh connection
            // through the proxy finds the new primary.
            code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "25006")
        }
        _ => false,
    }
}

/// Wrap a query error, remembering a broken connection.
pub(crate) fn observe(e: sqlx::Error) -> StoreError {
    let broke_now = broken(&e);
    if broke_now {
        broke();
    }
    let code = match &e {
        sqlx::Error::Database(db) => db.code(),
        _ => None,
    };
    // A pool timeout is counted as such (notesd_db_pool_acquire_timeouts_total).
    if !matches!(e, sqlx::Error::PoolTimedOut) {
        use crate::scoreboard::ext::{ErrorClass, db_error};
        db_error(ErrorClass::of(broke_now, code.as_deref()));
    }
    StoreError::Query(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn ping(age_ms: u64, idle_ms: u64, last_broken_ns: u64, now_ns: u64) -> bool {
        should_ping_at(
            Duration::from_millis(age_ms),
            Duration::from_millis(idle_ms),
            last_broken_ns,
            now_ns,
        )
    }

    #[test]
    fn busy_healthy_connections_are_not_pinged() {
        assert!(!ping(60_000, 0, 0, 100_000 * MS));
        assert!(!ping(60_000, 999, 0, 100_000 * MS));
    }

    #[test]
    fn idle_connections_are_pinged() {
        assert!(ping(60_000, 1_001, 0, 100_000 * MS));
    }

    #[test]
    fn connections_older_than_a_recent_failure_are_pinged() {
        let now = 100_000 * MS;
        let broke = now - 500 * MS;
        assert!(ping(600, 0, broke, now), "opened before the failure");
        assert!(!ping(400, 0, broke, now), "opened after the failure");
        let long_ago = now - 31_000 * MS;
        assert!(!ping(60_000, 0, long_ago, now), "the window has passed");
    }

    #[test]
    fn broken_is_the_connection_not_the_query() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(broken(&io));
        assert!(!broken(&sqlx::Error::PoolTimedOut));
        assert!(!broken(&sqlx::Error::RowNotFound));
    }
}
