//! Storage: one typed pool per backend (PostgreSQL or SQLite, by URL scheme),
//! and the migrations embedded in the binary.
//!
//! Runtime queries only (`sqlx::query`), no macros (docs/design.md §6). Schema state
//! is read from sqlx's `_sqlx_migrations` table and compared with the
//! embedded list, so `serve` can refuse a database that is behind (run
//! `notesd migrate`) or ahead (a newer binary migrated it) of this binary.

pub(crate) mod health;
pub(crate) mod idempotency;
pub mod migrate;
pub(crate) mod notes;
pub(crate) mod pool;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};

use crate::config::{Backend, DatabaseConfig};
use crate::scoreboard::phase::{self, Query, Step};

pub use migrate::{SchemaState, schema_state};
pub use pool::{Conn, Pool, PoolOptions};

pub type PgPool = Pool<PgConnection>;
pub type SqlitePool = Pool<SqliteConnection>;

/// SQLite writers from several worker processes wait this long for the lock.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database.url: {0}")]
    Url(String),
    #[error("cannot connect to the database ({target}): {source}")]
    Connect { target: String, source: sqlx::Error },
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Schema(String),
    #[error("migration lock {path}: {source}")]
    Lock {
        path: String,
        source: std::io::Error,
    },
    /// One failure answered to several requests (the list cache's shared
    /// commit-token query).
    #[error("{0}")]
    Shared(std::sync::Arc<StoreError>),
}

impl StoreError {
    /// Database unavailable (as opposed to a bad query): maps to 503.
    /// A query ran past `database.statement_timeout_ms`: notesd's own
    /// bound, or PostgreSQL's `statement_timeout` (57014). Maps to 503
    /// "database timed out".
    pub fn is_timeout(&self) -> bool {
        match self {
            StoreError::Timeout(_) => true,
            StoreError::Query(e) => {
                db_code(e).is_some_and(|(b, code)| b == Backend::Postgres && code == "57014")
            }
            StoreError::Shared(e) => e.is_timeout(),
            _ => false,
        }
    }

    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Connect { .. } | StoreError::Timeout(_) => true,
            StoreError::Query(e) => unavailable(e),
            StoreError::Shared(e) => e.is_unavailable(),
            _ => false,
        }
    }

    /// The database has no room for the write (SQLite `SQLITE_FULL`: the
    /// disk or file system under it is full; PostgreSQL 53100 `disk_full`):
    /// maps to 507. Nothing was committed, reads still work, and writes
    /// succeed again by themselves once there is room.
    pub fn is_storage_full(&self) -> bool {
        match self {
            StoreError::Query(e) => {
                db_code(e).is_some_and(|(backend, code)| storage_full_code(backend, &code))
            }
            StoreError::Shared(e) => e.is_storage_full(),
            _ => false,
        }
    }
}

/// `SQLITE_FULL` (13; it has no extended codes) or PostgreSQL's `disk_full`.
fn storage_full_code(backend: Backend, code: &str) -> bool {
    match backend {
        Backend::Postgres => code == "53100",
        Backend::Sqlite => code.parse::<i32>().is_ok_and(|n| n & 0xff == 13),
    }
}

/// Errors that say "the database cannot serve now", not "this query is wrong".
fn unavailable(e: &sqlx::Error) -> bool {
    if health::broken(e) {
        return true;
    }
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => true,
        _ => db_code(e).is_some_and(|(backend, code)| unavailable_code(backend, &code)),
    }
}

/// A database error's backend and code: codes are classified per backend,
/// since their spaces overlap.
fn db_code(e: &sqlx::Error) -> Option<(Backend, String)> {
    let sqlx::Error::Database(db) = e else {
        return None;
    };
    let backend = if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        Backend::Sqlite
    } else {
        Backend::Postgres
    };
    Some((backend, db.code().unwrap_or_default().into_owned()))
}

/// The backend's error code says "busy or saturated, try later" (503), as
/// opposed to a query or permission error (500). Each backend's codes mean
/// something else in the other's: SQLite's are numbers, PostgreSQL's are
/// SQLSTATEs, and 42501 (insufficient privilege) is a SQLite LOCKED by its
/// low byte.
fn unavailable_code(backend: Backend, code: &str) -> bool {
    match backend {
        // Too many connections (53300, 53400); the database not accepting
        // connections (55000, raised at connect).
        Backend::Postgres => matches!(code, "53300" | "53400" | "55000"),
        // SQLITE_BUSY / SQLITE_LOCKED (any extended code) after busy_timeout.
        Backend::Sqlite => code.parse::<i32>().is_ok_and(|n| matches!(n & 0xff, 5 | 6)),
    }
}

/// `database.statement_timeout_ms`, when on.
fn statement_timeout(cfg: &DatabaseConfig) -> Option<Duration> {
    (cfg.statement_timeout_ms > 0).then(|| Duration::from_millis(cfg.statement_timeout_ms))
}

/// How long a SQLite connection waits for another's write lock: 5 s, or
/// `database.statement_timeout_ms` when that is shorter, so that SQLite gives
/// up by itself (503, the connection kept) rather than notesd's timer closing
/// a connection still waiting. `migrate` always waits the 5 s.
fn sqlite_busy_timeout(cfg: &DatabaseConfig, purpose: Purpose) -> Duration {
    match statement_timeout(cfg) {
        Some(bound) if purpose != Purpose::Migrate => bound.min(SQLITE_BUSY_TIMEOUT),
        _ => SQLITE_BUSY_TIMEOUT,
    }
}

/// PostgreSQL cancels a statement running longer than `bound` itself (57014):
/// its locks and work go with it, not only notesd's wait. A session setting,
/// sent on each new connection (a startup parameter would not pass PgBouncer).
fn pg_statement_timeout(bound: Duration) -> pool::OnConnect<sqlx::PgConnection> {
    let sql = format!("SET statement_timeout = {}", bound.as_millis());
    std::sync::Arc::new(move |conn| {
        // An integer formatted by us: safe to send as SQL text.
        let sql = sqlx::AssertSqlSafe(sql.clone());
        Box::pin(async move { sqlx::raw_sql(sql).execute(conn).await.map(|_| ()) })
    })
}

#[derive(Clone, Debug)]
pub enum Store {
    Postgres(PgPool),
    Sqlite(Lite),
}

/// SQLite: the pool, and one connection that only watches for commits
/// (see [`Store::commit_token`]).
#[derive(Clone)]
pub struct Lite {
    pool: SqlitePool,
    options: std::sync::Arc<SqliteConnectOptions>,
    /// Opened on first use; `PRAGMA data_version` on it changes whenever any
    /// other connection (any worker, `notesd seed`, the sqlite3 shell) commits.
    watcher: std::sync::Arc<tokio::sync::Mutex<Watcher>>,
}

/// The connection behind SQLite's [`CommitToken`], and how many times it
/// was opened. `data_version` is per connection and starts low again on a
/// new one, so a token is the pair (epoch, version): a token read before a
/// reopen never equals one read after it, though their versions may.
#[derive(Default)]
struct Watcher {
    conn: Option<SqliteConnection>,
    epoch: u64,
}

impl std::fmt::Debug for Lite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lite").finish_non_exhaustive()
    }
}

impl std::ops::Deref for Lite {
    type Target = SqlitePool;
    fn deref(&self) -> &SqlitePool {
        &self.pool
    }
}

/// Changes whenever a transaction commits anywhere in the database, by any
/// client: equal tokens mean nothing was committed in between. PostgreSQL:
/// `pg_current_snapshot()` (xmin:xmax:in-progress xids — any transaction
/// that wrote moves it, in this database or another of the cluster, which
/// costs at most a needless re-read). SQLite: `PRAGMA data_version` on the
/// watcher connection, with the number of times that connection was opened
/// (see `Watcher`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitToken {
    Pg(String),
    /// (the watcher connection's epoch, its `data_version`).
    Lite(u64, i64),
}

/// Who is connecting: workers never create the SQLite file; `migrate` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Serve,
    Migrate,
}

/// The URL without its password, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl Store {
    pub async fn connect(
        cfg: &DatabaseConfig,
        purpose: Purpose,
        acquire_timeout: Duration,
    ) -> Result<Store, StoreError> {
        let backend = Backend::from_url(&cfg.url).map_err(StoreError::Url)?;
        let target = redact(&cfg.url);
        let connect_err = |source| StoreError::Connect {
            target: target.clone(),
            source,
        };
        // Migrate: one connection at a time (on PostgreSQL the lock and the
        // migrations share one transaction: `migrate::run_pg`).
        let max = if purpose == Purpose::Migrate {
            1
        } else {
            cfg.max_connections
        };
        match backend {
            Backend::Postgres => {
                let opts = PgConnectOptions::from_str(&cfg.url)
                    .map_err(|e| StoreError::Url(e.to_string()))?
                    .application_name("notesd");
                // Migrations run as long as they need.
                let bound = statement_timeout(cfg).filter(|_| purpose != Purpose::Migrate);
                let pool = PgPool::connect(
                    opts,
                    PoolOptions {
                        max_connections: max,
                        acquire_timeout,
                        idle_timeout: Duration::from_secs(600),
                        check: true,
                        statement_timeout: bound,
                        on_connect: bound.map(pg_statement_timeout),
                    },
                )
                .await
                .map_err(connect_err)?;
                Ok(Store::Postgres(pool))
            }
            Backend::Sqlite => {
                let opts = SqliteConnectOptions::from_str(&cfg.url)
                    .map_err(|e| StoreError::Url(e.to_string()))?
                    .create_if_missing(purpose == Purpose::Migrate)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(sqlite_busy_timeout(cfg, purpose))
                    .foreign_keys(true);
                let opts_for_watcher = opts.clone();
                let pool = SqlitePool::connect(
                    opts,
                    PoolOptions {
                        max_connections: max,
                        acquire_timeout,
                        idle_timeout: Duration::from_secs(600),
                        // In-process: a SQLite connection does not break while idle.
                        check: false,
                        statement_timeout: statement_timeout(cfg)
                            .filter(|_| purpose != Purpose::Migrate),
                        on_connect: None,
                    },
                )
                .await
                .map_err(connect_err)?;
                Ok(Store::Sqlite(Lite {
                    pool,
                    options: std::sync::Arc::new(opts_for_watcher),
                    watcher: Default::default(),
                }))
            }
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Store::Postgres(_) => Backend::Postgres,
            Store::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// `SELECT 1` within `deadline` (for /readyz).
    pub async fn ping(&self, deadline: Duration) -> Result<(), StoreError> {
        match tokio::time::timeout(deadline, self.select_one()).await {
            Ok(r) => r,
            Err(_) => {
                // No answer at all: the connection may hang for good.
                health::broke();
                Err(StoreError::Timeout(deadline))
            }
        }
    }

    pub async fn close(&self) {
        match self {
            Store::Postgres(p) => p.close().await,
            Store::Sqlite(p) => p.close().await,
        }
    }

    /// Close the pool, but never hang a stopping worker on it.
    pub async fn close_bounded(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.close()).await;
    }

    /// Insert `Note 1` … `Note N` in one statement (one transaction).
    pub async fn seed(&self, count: u32) -> Result<u64, StoreError> {
        let n = i64::from(count);
        let done = match self {
            Store::Postgres(p) => sqlx::query(
                "INSERT INTO notes (title, body) \
                 SELECT 'Note ' || g, 'Sample note ' || g FROM generate_series(1, $1::bigint) AS g",
            )
            .bind(n)
            .execute(&mut *p.acquire_live().await?)
            .await?
            .rows_affected(),
            Store::Sqlite(p) => sqlx::query(
                "WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < $1) \
                 INSERT INTO notes (title, body) SELECT 'Note ' || i, 'Sample note ' || i FROM seq",
            )
            .bind(n)
            .execute(&mut *p.acquire_live().await?)
            .await?
            .rows_affected(),
        };
        Ok(done)
    }

    /// The database's [`CommitToken`] now (one round trip on PostgreSQL, a
    /// pragma on SQLite).
    pub async fn commit_token(&self) -> Result<CommitToken, StoreError> {
        match self {
            Store::Postgres(_) => Ok(CommitToken::Pg(self.pg_snapshot().await?)),
            Store::Sqlite(lite) => {
                use sqlx::Connection;
                // (PostgreSQL's goes through the pool, which says so itself.)
                phase::enter(Step::Query, Some(Query::CommitToken));
                let mut watcher = lite.watcher.lock().await;
                if watcher.conn.is_none() {
                    watcher.conn = Some(SqliteConnection::connect_with(&lite.options).await?);
                    watcher.epoch += 1;
                }
                let epoch = watcher.epoch;
                let Some(conn) = watcher.conn.as_mut() else {
                    return Err(StoreError::Query(sqlx::Error::PoolClosed));
                };
                let version: Result<i64, sqlx::Error> = sqlx::query_scalar("PRAGMA data_version")
                    .fetch_one(&mut *conn)
                    .await;
                phase::enter(Step::Handling, None);
                if version.is_err() {
                    // Reopened (a new epoch) on the next call.
                    watcher.conn = None;
                }
                Ok(CommitToken::Lite(epoch, version?))
            }
        }
    }

    /// Refuse a schema this binary cannot serve: behind (run migrate), or
    /// ahead with a migration not marked backward-compatible.
    pub async fn check_schema(&self) -> Result<(), StoreError> {
        match schema_state(self).await? {
            state if state.servable() => Ok(()),
            state => Err(StoreError::Schema(state.problem())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_waits_for_a_lock_no_longer_than_the_statement_bound() {
        let mut cfg = DatabaseConfig::default();
        let busy = |cfg: &DatabaseConfig, p| sqlite_busy_timeout(cfg, p);
        assert_eq!(busy(&cfg, Purpose::Serve), SQLITE_BUSY_TIMEOUT);
        cfg.statement_timeout_ms = 1_500;
        assert_eq!(busy(&cfg, Purpose::Serve), Duration::from_millis(1_500));
        assert_eq!(busy(&cfg, Purpose::Migrate), SQLITE_BUSY_TIMEOUT);
        cfg.statement_timeout_ms = 0;
        assert_eq!(busy(&cfg, Purpose::Serve), SQLITE_BUSY_TIMEOUT);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@db:5432/x"),
            "postgres://u:***@db:5432/x"
        );
        assert_eq!(redact("postgres://u@db/x"), "postgres://u@db/x");
        assert_eq!(redact("sqlite:./var/a.db"), "sqlite:./var/a.db");
    }

    #[test]
    fn busy_is_classified_per_backend() {
        use Backend::*;
        for code in ["53300", "53400", "55000"] {
            assert!(unavailable_code(Postgres, code), "{code}");
        }
        // Insufficient privilege, invalid escape characters, ...: bad queries,
        // although their low bytes are SQLite's BUSY (5) and LOCKED (6).
        for code in ["42501", "22021", "22022", "42P01", "23505"] {
            assert!(!unavailable_code(Postgres, code), "{code}");
        }
        for code in ["5", "6", "261", "517", "262"] {
            assert!(unavailable_code(Sqlite, code), "{code}");
        }
        for code in ["1", "19", "2067", "53300"] {
            assert!(!unavailable_code(Sqlite, code), "{code}");
        }
    }

    /// A reopened watcher starts `data_version` low again: a token from
    /// before the reopen must not match one from after it.
    #[tokio::test]
    async fn a_reopened_watcher_never_repeats_a_token() {
        let dir = std::env::temp_dir().join(format!("notesd-watcher-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let cfg = DatabaseConfig {
            url: format!("sqlite://{}", dir.join("w.db").display()),
            ..DatabaseConfig::default()
        };
        let store = Store::connect(&cfg, Purpose::Migrate, Duration::from_secs(5))
            .await
            .expect("open");
        let first = store.commit_token().await.expect("token");
        assert_eq!(
            store.commit_token().await.expect("token"),
            first,
            "nothing committed"
        );
        let Store::Sqlite(lite) = &store else {
            panic!("a SQLite store")
        };
        // What an error on the watcher does: the next call reopens it.
        lite.watcher.lock().await.conn = None;
        let after = store.commit_token().await.expect("token");
        let (CommitToken::Lite(e1, v1), CommitToken::Lite(e2, v2)) = (&first, &after) else {
            panic!("SQLite tokens")
        };
        assert_eq!(
            v1, v2,
            "the premise: a new connection's data_version starts over"
        );
        assert_ne!(e1, e2);
        assert_ne!(first, after);
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_full_disk_is_classified_per_backend() {
        use Backend::*;
        assert!(storage_full_code(Sqlite, "13"));
        assert!(storage_full_code(Postgres, "53100"));
        // 13 is not a SQLSTATE; 53100 is not a SQLite code (its low byte is 76).
        assert!(!storage_full_code(Postgres, "13"));
        assert!(!storage_full_code(Sqlite, "53100"));
        for code in ["5", "10", "266", "19"] {
            assert!(!storage_full_code(Sqlite, code), "{code}");
        }
    }
}
