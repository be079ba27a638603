//! Embedded migrations (`migrations/postgres/`, `migrations/sqlite/`), applied
//! with sqlx's migrator and read back for the schema check.
//!
//! Two `notesd migrate` at once: PostgreSQL serializes them with an advisory
//! lock; SQLite has no such lock, so an exclusive `flock` on
//! `<database>.migrate.lock` beside the file does the same, taken before the
//! first connection ([`lock_sqlite`]): two processes that open a fresh file
//! and switch it to WAL at the same moment make one of them fail with
//! "database is locked" (SQLite returns BUSY there without waiting).

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{Row, SqlSafeStr};

use super::{Store, StoreError};
use crate::config::Backend;

/// (version, description, postgres sql, sqlite sql), in order.
const MIGRATIONS: &[(i64, &str, &str, &str)] = &[(
    1,
    "create notes",
    include_str!("../../migrations/postgres/0001_create_notes.sql"),
    include_str!("../../migrations/sqlite/0001_create_notes.sql"),
)];

pub fn migrator(backend: Backend) -> Migrator {
    let list = MIGRATIONS
        .iter()
        .map(|(version, description, pg, lite)| {
            let sql = match backend {
                Backend::Postgres => pg,
                Backend::Sqlite => lite,
            };
            Migration::new(
                *version,
                Cow::Borrowed(description),
                MigrationType::Simple,
                sql.into_sql_str(),
                false,
            )
        })
        .collect();
    Migrator::with_migrations(list)
}

/// The newest migration this binary knows.
pub fn latest_version() -> i64 {
    MIGRATIONS.iter().map(|m| m.0).max().unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaState {
    Current,
    /// Nothing applied yet.
    Empty,
    /// Some embedded migrations are not applied.
    Behind {
        pending: Vec<i64>,
    },
    /// Applied migrations this binary does not know (a newer binary ran migrate).
    Ahead {
        unknown: Vec<i64>,
    },
    /// A migration failed half-way.
    Dirty {
        version: i64,
    },
}

impl SchemaState {
    pub fn problem(&self) -> String {
        match self {
            SchemaState::Current => "schema is current".into(),
            SchemaState::Empty => {
                "the database has no schema yet: run `notesd migrate` first".into()
            }
            SchemaState::Behind { pending } => format!(
                "the database schema is older than this binary (pending migrations {pending:?}): run `notesd migrate`"
            ),
            SchemaState::Ahead { unknown } => format!(
                "the database schema is newer than this binary (unknown migrations {unknown:?}): upgrade notesd or restore a matching database"
            ),
            SchemaState::Dirty { version } => format!(
                "migration {version} failed part-way; fix the database by hand, then run `notesd migrate`"
            ),
        }
    }
}

/// Applied (version, success, description) rows, or none if the table is missing.
pub async fn applied(store: &Store) -> Result<Vec<(i64, bool, String)>, StoreError> {
    let exists_sql = match store {
        Store::Postgres(_) => "SELECT to_regclass('_sqlx_migrations') IS NOT NULL",
        Store::Sqlite(_) => {
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations')"
        }
    };
    let list_sql = "SELECT version, success, description FROM _sqlx_migrations ORDER BY version";
    // The same steps on either backend's connection type.
    macro_rules! read_rows {
        ($pool:expr) => {{
            let mut c = $pool.acquire().await?;
            let r = async {
                let exists: bool = sqlx::query(exists_sql)
                    .fetch_one(&mut *c)
                    .await?
                    .try_get(0)?;
                if !exists {
                    return Ok(Vec::new());
                }
                sqlx::query(list_sql)
                    .fetch_all(&mut *c)
                    .await?
                    .iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                    .collect::<Result<Vec<_>, sqlx::Error>>()
            }
            .await;
            c.finish(&r);
            r?
        }};
    }
    let rows = match store {
        Store::Postgres(p) => read_rows!(p),
        Store::Sqlite(p) => read_rows!(p),
    };
    Ok(rows)
}

pub async fn schema_state(store: &Store) -> Result<SchemaState, StoreError> {
    let rows = applied(store).await?;
    Ok(compare(&rows))
}

fn compare(rows: &[(i64, bool, String)]) -> SchemaState {
    if let Some((v, _, _)) = rows.iter().find(|r| !r.1) {
        return SchemaState::Dirty { version: *v };
    }
    let known: Vec<i64> = MIGRATIONS.iter().map(|m| m.0).collect();
    let unknown: Vec<i64> = rows
        .iter()
        .map(|r| r.0)
        .filter(|v| !known.contains(v))
        .collect();
    if !unknown.is_empty() {
        return SchemaState::Ahead { unknown };
    }
    if rows.is_empty() {
        return SchemaState::Empty;
    }
    let pending: Vec<i64> = known
        .into_iter()
        .filter(|v| !rows.iter().any(|r| r.0 == *v))
        .collect();
    if pending.is_empty() {
        SchemaState::Current
    } else {
        SchemaState::Behind { pending }
    }
}

/// Apply pending migrations; returns the versions applied by this call.
/// On SQLite the caller holds [`lock_sqlite`] from before it connected.
pub async fn run(store: &Store) -> Result<Vec<i64>, StoreError> {
    // The whole read-apply-read runs under one lock, so of two concurrent
    // migrates exactly one reports the migrations as applied by it.
    match store {
        Store::Postgres(p) => {
            let mut lock = p.acquire().await?;
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(MIGRATE_LOCK_KEY)
                .execute(&mut *lock)
                .await?;
            let result = apply(store).await;
            // Closing the session would release it too; unlock explicitly anyway.
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(MIGRATE_LOCK_KEY)
                .execute(&mut *lock)
                .await;
            result
        }
        Store::Sqlite(_) => apply(store).await,
    }
}

/// Our own advisory lock key (not sqlx's, which it takes inside `Migrator::run`).
const MIGRATE_LOCK_KEY: i64 = 0x6e6f_7465_7364_0001;

async fn apply(store: &Store) -> Result<Vec<i64>, StoreError> {
    let rows = applied(store).await?;
    match compare(&rows) {
        state @ SchemaState::Ahead { .. } => return Err(StoreError::Schema(state.problem())),
        // Nothing to do: not even the migrator's CREATE TABLE IF NOT EXISTS,
        // whose "already exists, skipping" notice would end up in every start's log.
        SchemaState::Current => return Ok(Vec::new()),
        _ => {}
    }
    let before: Vec<i64> = rows.iter().map(|r| r.0).collect();
    let migrator = migrator(store.backend());
    match store {
        Store::Postgres(p) => {
            let mut c = p.acquire().await?;
            // The migrator's IF NOT EXISTS notices are noise, not news.
            sqlx::query("SET client_min_messages = warning")
                .execute(&mut *c)
                .await?;
            migrator.run(&mut *c).await?;
        }
        Store::Sqlite(p) => migrator.run(&mut *p.acquire().await?).await?,
    }
    let after: Vec<i64> = applied(store).await?.iter().map(|r| r.0).collect();
    Ok(after.into_iter().filter(|v| !before.contains(v)).collect())
}

/// Exclusive flock on `<db>.migrate.lock`, held until the returned file drops.
pub fn lock_sqlite(db: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>, StoreError> {
    let mut name = db.as_os_str().to_owned();
    name.push(".migrate.lock");
    let path = std::path::PathBuf::from(name);
    let err = |source| StoreError::Lock {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(err)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| err(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: i64, ok: bool) -> (i64, bool, String) {
        (v, ok, String::new())
    }

    #[test]
    fn schema_states() {
        assert_eq!(compare(&[]), SchemaState::Empty);
        assert_eq!(compare(&[row(1, true)]), SchemaState::Current);
        assert_eq!(
            compare(&[row(1, true), row(99, true)]),
            SchemaState::Ahead { unknown: vec![99] }
        );
        assert_eq!(compare(&[row(1, false)]), SchemaState::Dirty { version: 1 });
        assert_eq!(latest_version(), 1);
    }
}
