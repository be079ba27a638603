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

/// A migration the test suite's "newer" build adds (a build with
/// `NOTESD_TEST_VARIANT` containing `compatible-migration`): backward-compatible,
/// so the binaries before it keep serving and a rollback across it works.
const TEST_MIGRATION: (i64, &str, &str, &str) = (
    2,
    "test: index notes by title",
    include_str!("../../tests/fixtures/migrations/postgres/0002_test_index_title.sql"),
    include_str!("../../tests/fixtures/migrations/sqlite/0002_test_index_title.sql"),
);

/// The first-line header that marks a migration backward-compatible: binaries
/// that do not know it may still serve a database it was applied to (it only
/// adds: a table, a nullable column, an index; nothing they read changes).
pub const COMPATIBLE_HEADER: &str = "-- notesd: backward-compatible";
/// What `_sqlx_migrations.description` carries for such a migration, so that a
/// binary that does not know the migration can still read its mark there.
pub const COMPATIBLE_MARK: &str = "[backward-compatible]";

/// This binary's migrations, in order.
fn migrations() -> Vec<(i64, &'static str, &'static str, &'static str)> {
    let mut list = MIGRATIONS.to_vec();
    if crate::test_variant("compatible-migration") {
        list.push(TEST_MIGRATION);
    }
    list
}

fn is_marked_compatible(sql: &str) -> bool {
    sql.lines()
        .next()
        .is_some_and(|l| l.trim() == COMPATIBLE_HEADER)
}

/// The description recorded in `_sqlx_migrations`: with the mark when compatible.
fn recorded_description(description: &str, sql: &str) -> String {
    if is_marked_compatible(sql) {
        format!("{description} {COMPATIBLE_MARK}")
    } else {
        description.to_string()
    }
}

pub fn migrator(backend: Backend) -> Migrator {
    let list = migrations()
        .into_iter()
        .map(|(version, description, pg, lite)| {
            let sql = match backend {
                Backend::Postgres => pg,
                Backend::Sqlite => lite,
            };
            Migration::new(
                version,
                Cow::Owned(recorded_description(description, sql)),
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
    migrations().iter().map(|m| m.0).max().unwrap_or(0)
}

/// Whether a recorded description carries the backward-compatible mark.
pub fn recorded_compatible(description: &str) -> bool {
    description.contains(COMPATIBLE_MARK)
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
    /// Applied migrations this binary does not know (a newer binary ran
    /// migrate), at least one of them not marked backward-compatible.
    Ahead {
        unknown: Vec<i64>,
    },
    /// Every migration this binary knows is applied, and the newer ones are
    /// all marked backward-compatible: this binary serves it.
    AheadCompatible {
        unknown: Vec<i64>,
    },
    /// A migration failed half-way.
    Dirty {
        version: i64,
    },
}

impl SchemaState {
    /// Can this binary serve the database?
    pub fn servable(&self) -> bool {
        matches!(
            self,
            SchemaState::Current | SchemaState::AheadCompatible { .. }
        )
    }

    pub fn problem(&self) -> String {
        match self {
            SchemaState::Current => "schema is current".into(),
            SchemaState::AheadCompatible { unknown } => {
                format!("schema is current, plus newer backward-compatible migrations {unknown:?}")
            }
            SchemaState::Empty => {
                "the database has no schema yet: run `notesd migrate` first".into()
            }
            SchemaState::Behind { pending } => format!(
                "the database schema is older than this binary (pending migrations {pending:?}): run `notesd migrate`"
            ),
            SchemaState::Ahead { unknown } => format!(
                "the database schema is newer than this binary (unknown migrations {unknown:?}, not all marked backward-compatible): upgrade notesd or restore a matching database"
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
    compare_with(rows, &migrations().iter().map(|m| m.0).collect::<Vec<_>>())
}

/// `rows` (version, success, recorded description) against the versions this
/// binary knows.
fn compare_with(rows: &[(i64, bool, String)], known: &[i64]) -> SchemaState {
    if let Some((v, _, _)) = rows.iter().find(|r| !r.1) {
        return SchemaState::Dirty { version: *v };
    }
    if rows.is_empty() {
        return SchemaState::Empty;
    }
    let pending: Vec<i64> = known
        .iter()
        .copied()
        .filter(|v| !rows.iter().any(|r| r.0 == *v))
        .collect();
    let newer: Vec<&(i64, bool, String)> = rows.iter().filter(|r| !known.contains(&r.0)).collect();
    let unknown: Vec<i64> = newer.iter().map(|r| r.0).collect();
    if newer.iter().any(|r| !recorded_compatible(&r.2)) {
        return SchemaState::Ahead { unknown };
    }
    if !pending.is_empty() {
        return SchemaState::Behind { pending };
    }
    if unknown.is_empty() {
        SchemaState::Current
    } else {
        SchemaState::AheadCompatible { unknown }
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
        SchemaState::Current | SchemaState::AheadCompatible { .. } => return Ok(Vec::new()),
        _ => {}
    }
    let before: Vec<i64> = rows.iter().map(|r| r.0).collect();
    let mut migrator = migrator(store.backend());
    // Newer migrations a newer binary applied are all marked compatible here
    // (else `compare` refused above): apply ours beside them.
    migrator.set_ignore_missing(true);
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

    fn marked(v: i64) -> (i64, bool, String) {
        (v, true, format!("add something {COMPATIBLE_MARK}"))
    }

    #[test]
    fn schema_states() {
        let known = [1, 2];
        let cmp = |rows: &[(i64, bool, String)]| compare_with(rows, &known);
        assert_eq!(cmp(&[]), SchemaState::Empty);
        assert_eq!(cmp(&[row(1, true), row(2, true)]), SchemaState::Current);
        assert_eq!(
            cmp(&[row(1, true), row(2, true), row(99, true)]),
            SchemaState::Ahead { unknown: vec![99] }
        );
        assert_eq!(cmp(&[row(1, false)]), SchemaState::Dirty { version: 1 });
        assert_eq!(
            cmp(&[row(1, true)]),
            SchemaState::Behind { pending: vec![2] }
        );
    }

    #[test]
    fn newer_migrations_all_marked_compatible_are_served() {
        let known = [1];
        let cmp = |rows: &[(i64, bool, String)]| compare_with(rows, &known);
        let state = cmp(&[row(1, true), marked(2), marked(3)]);
        assert_eq!(
            state,
            SchemaState::AheadCompatible {
                unknown: vec![2, 3]
            }
        );
        assert!(state.servable());
        let state = cmp(&[row(1, true), marked(2), row(3, true)]);
        assert_eq!(
            state,
            SchemaState::Ahead {
                unknown: vec![2, 3]
            }
        );
        assert!(!state.servable());
        // Ours must be applied too: a newer compatible one does not excuse a gap.
        assert_eq!(
            compare_with(&[row(1, true), marked(3)], &[1, 2]),
            SchemaState::Behind { pending: vec![2] }
        );
    }

    #[test]
    fn marks_come_from_the_header_and_both_backends_agree() {
        for (v, _, pg, lite) in MIGRATIONS.iter().chain([&TEST_MIGRATION]) {
            assert_eq!(
                is_marked_compatible(pg),
                is_marked_compatible(lite),
                "migration {v}: the PostgreSQL and SQLite files disagree on the mark"
            );
        }
        assert!(is_marked_compatible(TEST_MIGRATION.2));
        assert!(!is_marked_compatible(MIGRATIONS[0].2));
        assert_eq!(
            recorded_description(
                "x",
                &format!("{COMPATIBLE_HEADER}\nCREATE INDEX i ON t (c);")
            ),
            format!("x {COMPATIBLE_MARK}")
        );
    }
}
