//! Embedded migrations (`migrations/postgres/`, `migrations/sqlite/`), applied
//! with sqlx's migrator and read back for the schema check.
//!
//! Two `notesd migrate` at once: PostgreSQL serializes them with an advisory
//! lock, transaction-scoped, in the one transaction a run is (`run_pg`), so
//! that it holds through PgBouncer in transaction pooling too; SQLite has no
//! such lock, so an exclusive `flock` on
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
const MIGRATIONS: &[(i64, &str, &str, &str)] = &[
    (
        1,
        "create notes",
        include_str!("../../migrations/postgres/0001_create_notes.sql"),
        include_str!("../../migrations/sqlite/0001_create_notes.sql"),
    ),
    (
        2,
        "idempotency keys",
        include_str!("../../migrations/postgres/0002_idempotency_keys.sql"),
        include_str!("../../migrations/sqlite/0002_idempotency_keys.sql"),
    ),
];

/// A migration the test suite's "newer" build adds (a build with
/// `NOTESD_TEST_VARIANT` containing `compatible-migration`): backward-compatible,
/// so the binaries before it keep serving and a rollback across it works.
const TEST_MIGRATION: (i64, &str, &str, &str) = (
    3,
    "test: index notes by title",
    include_str!("../../tests/fixtures/migrations/postgres/0003_test_index_title.sql"),
    include_str!("../../tests/fixtures/migrations/sqlite/0003_test_index_title.sql"),
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
/// Read in one transaction with unnamed statements: on one server connection
/// even through a pooler in transaction pooling, and leaving no prepared
/// statement behind on it.
pub async fn applied(store: &Store) -> Result<Vec<(i64, bool, String)>, StoreError> {
    macro_rules! read_rows {
        ($pool:expr, $read:ident) => {{
            let mut c = $pool.acquire().await?;
            let r = async {
                let mut tx = sqlx::Connection::begin(&mut *c).await?;
                let rows = $read(&mut tx).await?;
                tx.commit().await?;
                Ok(rows)
            }
            .await;
            c.finish(&r);
            r?
        }};
    }
    let rows = match store {
        Store::Postgres(p) => read_rows!(p, applied_pg),
        Store::Sqlite(p) => read_rows!(p, applied_lite),
    };
    Ok(rows)
}

/// `applied_pg` / `applied_lite`: the rows of `_sqlx_migrations` on one
/// connection of that backend (unnamed statements).
macro_rules! applied_on {
    ($name:ident, $conn:ty, $exists:literal) => {
        async fn $name(c: &mut $conn) -> Result<Vec<(i64, bool, String)>, sqlx::Error> {
            let exists: bool = sqlx::query($exists)
                .persistent(false)
                .fetch_one(&mut *c)
                .await?
                .try_get(0)?;
            if !exists {
                return Ok(Vec::new());
            }
            sqlx::query(
                "SELECT version, success, description FROM _sqlx_migrations ORDER BY version",
            )
            .persistent(false)
            .fetch_all(&mut *c)
            .await?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
        }
    };
}

applied_on!(
    applied_pg,
    sqlx::PgConnection,
    "SELECT to_regclass('_sqlx_migrations') IS NOT NULL"
);
applied_on!(
    applied_lite,
    sqlx::SqliteConnection,
    "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations')"
);

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
    match store {
        Store::Postgres(p) => {
            // Never finished: closed afterwards, since `run_pg` deallocates
            // the statements sqlx still thinks prepared on it.
            let mut conn = p.acquire().await?;
            run_pg(&mut conn).await.map_err(|e| match e {
                StoreError::Query(q) => pooler(q),
                e => e,
            })
        }
        Store::Sqlite(p) => {
            let before = applied(store).await?;
            if let Some(done) = nothing_to_do(&before)? {
                return Ok(done);
            }
            let mut migrator = migrator(Backend::Sqlite);
            migrator.set_ignore_missing(true);
            migrator.run(&mut *p.acquire().await?).await?;
            let after = applied(store).await?;
            Ok(newly_applied(&before, &after))
        }
    }
}

/// PostgreSQL: the lock, the read, the migrations and the read back in
/// **one transaction** on one connection. The lock is transaction-scoped
/// (`pg_advisory_xact_lock`): of two concurrent migrates exactly one applies
/// and reports the migrations, and the other waits, then finds them applied.
/// One transaction is what a pooler in transaction pooling (PgBouncer) keeps
/// on one server connection — a session lock, sqlx's own included (turned
/// off), would stay behind on whichever server connection took it — and
/// the migrations apply all or nothing. Before the commit the statements
/// sqlx prepared are deallocated, so none is left on the server connection
/// for its next client to collide with.
async fn run_pg(conn: &mut sqlx::PgConnection) -> Result<Vec<i64>, StoreError> {
    use sqlx::Connection;
    let mut tx = conn.begin().await?;
    // The migrator's IF NOT EXISTS notices are noise, not news.
    sqlx::raw_sql("SET LOCAL client_min_messages = warning")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATE_LOCK_KEY)
        .persistent(false)
        .execute(&mut *tx)
        .await?;
    let before = applied_pg(&mut tx).await?;
    let done = match nothing_to_do(&before)? {
        Some(done) => done,
        None => {
            let mut migrator = migrator(Backend::Postgres);
            migrator.set_ignore_missing(true);
            migrator.set_locking(false);
            migrator.run(&mut *tx).await?;
            newly_applied(&before, &applied_pg(&mut tx).await?)
        }
    };
    sqlx::raw_sql("DEALLOCATE ALL").execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(done)
}

/// `Some(nothing applied)` when the schema needs nothing (not even the
/// migrator's CREATE TABLE IF NOT EXISTS, whose "already exists, skipping"
/// notice would end up in every start's log); an error when it is newer
/// than this binary and not all compatible; `None`: apply.
fn nothing_to_do(rows: &[(i64, bool, String)]) -> Result<Option<Vec<i64>>, StoreError> {
    match compare(rows) {
        state @ SchemaState::Ahead { .. } => Err(StoreError::Schema(state.problem())),
        SchemaState::Current | SchemaState::AheadCompatible { .. } => Ok(Some(Vec::new())),
        // Newer migrations a newer binary applied are all marked compatible
        // here (else refused above): ours apply beside them.
        _ => Ok(None),
    }
}

fn newly_applied(before: &[(i64, bool, String)], after: &[(i64, bool, String)]) -> Vec<i64> {
    after
        .iter()
        .map(|r| r.0)
        .filter(|v| !before.iter().any(|b| b.0 == *v))
        .collect()
}

/// A prepared statement lost between two transactions of one connection
/// (SQLSTATE 26000, or 42P05 when a name comes back): the connection goes
/// through a pooler in transaction pooling that does not keep prepared
/// statements (PgBouncer before 1.21, or without `max_prepared_statements`).
/// Say what to do about it.
fn pooler(e: sqlx::Error) -> StoreError {
    let code = match &e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    };
    match code.as_deref() {
        Some("26000" | "42P05") => StoreError::Schema(format!(
            "{e}: the database connection does not keep prepared statements between transactions \
             (a pooler such as PgBouncer in transaction pooling?); set database.migrate_url to a \
             direct PostgreSQL URL for migrations"
        )),
        _ => StoreError::Query(e),
    }
}

/// Our own advisory lock key (sqlx's own lock is turned off: see `run_pg`).
const MIGRATE_LOCK_KEY: i64 = 0x6e6f_7465_7364_0001;

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
