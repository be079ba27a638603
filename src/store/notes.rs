//! Note queries: one SQL text per backend, one code path.
//!
//! Timestamps become [`Timestamp`] (Unix microseconds): PostgreSQL's binary
//! `timestamptz` is decoded directly, SQLite's RFC 3339 text is parsed. Order is newest first: `(created_at DESC, id DESC)`,
//! which the index covers; `before` is a keyset cursor on that order.

use sqlx::{ColumnIndex, Decode, Row, Type};

use super::{Store, StoreError, health};
use crate::domain::{NewNote, Note, NotePatch, NoteRef, Timestamp};
use crate::scoreboard::phase::{self, Query, Step};

struct Sql {
    list: &'static str,
    list_before: &'static str,
    get: &'static str,
    insert: &'static str,
    put: &'static str,
    patch: &'static str,
    delete: &'static str,
}

/// Columns every read returns, in `note()`'s order.
macro_rules! pg_cols {
    () => {
        "id, title, body, created_at, updated_at"
    };
}
macro_rules! lite_cols {
    () => {
        "id, title, body, created_at, updated_at"
    };
}
/// The cursor: strictly after note $1 in list order; if that note is gone, ids below it.
macro_rules! before {
    () => {
        " WHERE (EXISTS (SELECT 1 FROM notes c WHERE c.id = $1) \
             AND (created_at, id) < (SELECT c.created_at, c.id FROM notes c WHERE c.id = $1)) \
            OR (NOT EXISTS (SELECT 1 FROM notes c WHERE c.id = $1) AND id < $1)"
    };
}

const PG: Sql = Sql {
    list: concat!(
        "SELECT ",
        pg_cols!(),
        " FROM notes ORDER BY created_at DESC, id DESC LIMIT $1"
    ),
    list_before: concat!(
        "SELECT ",
        pg_cols!(),
        " FROM notes",
        before!(),
        " ORDER BY created_at DESC, id DESC LIMIT $2"
    ),
    get: concat!("SELECT ", pg_cols!(), " FROM notes WHERE id = $1"),
    insert: "INSERT INTO notes (title, body) VALUES ($1, $2) RETURNING id",
    put: concat!(
        "UPDATE notes SET title = $2, body = $3, updated_at = now() WHERE id = $1 RETURNING ",
        pg_cols!()
    ),
    patch: concat!(
        "UPDATE notes SET title = COALESCE($2, title), \
         body = CASE WHEN $3 THEN $4 ELSE body END, updated_at = now() \
         WHERE id = $1 RETURNING ",
        pg_cols!()
    ),
    delete: "DELETE FROM notes WHERE id = $1",
};

const LITE: Sql = Sql {
    list: concat!(
        "SELECT ",
        lite_cols!(),
        " FROM notes ORDER BY created_at DESC, id DESC LIMIT $1"
    ),
    list_before: concat!(
        "SELECT ",
        lite_cols!(),
        " FROM notes",
        before!(),
        " ORDER BY created_at DESC, id DESC LIMIT $2"
    ),
    get: concat!("SELECT ", lite_cols!(), " FROM notes WHERE id = $1"),
    insert: "INSERT INTO notes (title, body) VALUES ($1, $2) RETURNING id",
    put: concat!(
        "UPDATE notes SET title = $2, body = $3, \
         updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = $1 RETURNING ",
        lite_cols!()
    ),
    patch: concat!(
        "UPDATE notes SET title = COALESCE($2, title), \
         body = CASE WHEN $3 THEN $4 ELSE body END, \
         updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
         WHERE id = $1 RETURNING ",
        lite_cols!()
    ),
    delete: "DELETE FROM notes WHERE id = $1",
};

/// Run `$body` with `$conn` bound to a pooled connection, `$sql` to the
/// backend's SQL set and `note` to its row decoder; errors that `?` raises in
/// `$body` are `sqlx::Error`s, and come out as [`StoreError`]s.
///
/// `read`: retried once, on another connection, when its connection broke.
/// `write`: the connection is pinged first on PostgreSQL; never retried
/// (see [`health`]).
macro_rules! with_conn {
    (read $query:ident, $store:expr, |$conn:ident, $sql:ident, $note:ident| $body:expr) => {{
        let mut retried = false;
        loop {
            match with_conn!(@run $query, acquire, $store, |$conn, $sql, $note| $body) {
                Err(Failed::Db(e)) if !retried && health::broken(&e) => {
                    use crate::scoreboard::ext::{ErrorClass, db_error};
                    db_error(ErrorClass::Connection);
                    tracing::info!("database connection broke, retrying the read: {e}");
                    health::broke();
                    retried = true;
                }
                r => break r.map_err(Failed::into_store),
            }
        }
    }};
    (write $query:ident, $store:expr, |$conn:ident, $sql:ident, $note:ident| $body:expr) => {
        with_conn!(@run $query, acquire_live, $store, |$conn, $sql, $note| $body)
            .map_err(Failed::into_store)
    };
    (@run $query:ident, $acquire:ident, $store:expr, |$conn:ident, $sql:ident, $note:ident| $body:expr) => {
        match $store {
            Store::Postgres(pool) => {
                with_conn!(@on $query, pool.$acquire(), pool.statement_timeout(), &PG,
                    note::<sqlx::postgres::PgRow>, |$conn, $sql, $note| $body)
            }
            Store::Sqlite(pool) => {
                with_conn!(@on $query, pool.$acquire(), pool.statement_timeout(), &LITE,
                    note::<sqlx::sqlite::SqliteRow>, |$conn, $sql, $note| $body)
            }
        }
    };
    // The request's phase (see `scoreboard::phase`): waiting for the pool,
    // then running the named query, then back in notesd's own code. The
    // query is bounded by `database.statement_timeout_ms`: past it, the
    // connection is closed (never reused mid-query) and the request gets 503.
    (@on $query:ident, $acquire:expr, $bound:expr, $sql_set:expr, $decoder:expr, |$conn:ident, $sql:ident, $note:ident| $body:expr) => {
        async {
            phase::enter(Step::WaitingPool, None);
            let acquired = $acquire.await;
            phase::enter(Step::Handling, None);
            let mut pooled = acquired.map_err(Failed::Db)?;
            phase::enter(Step::Query, Some(Query::$query));
            let run = async {
                let $conn = &mut *pooled;
                #[allow(unused_variables)]
                let ($sql, $note) = ($sql_set, $decoder);
                Ok::<_, sqlx::Error>($body)
            };
            let r = match $bound {
                Some(bound) => match tokio::time::timeout(bound, run).await {
                    Ok(r) => r,
                    Err(_) => {
                        phase::enter(Step::Handling, None);
                        return Err(Failed::TimedOut(bound));
                    }
                },
                None => run.await,
            };
            pooled.finish(&r);
            phase::enter(Step::Handling, None);
            r.map_err(Failed::Db)
        }
        .await
    };
}

/// How a query failed: the database said so, or it did not answer within
/// `database.statement_timeout_ms`.
enum Failed {
    Db(sqlx::Error),
    TimedOut(std::time::Duration),
}

impl Failed {
    fn into_store(self) -> StoreError {
        match self {
            Failed::Db(e) => health::observe(e),
            Failed::TimedOut(bound) => {
                use crate::scoreboard::ext::{ErrorClass, db_error};
                db_error(ErrorClass::Canceled);
                StoreError::Timeout(bound)
            }
        }
    }
}

/// The `RETURNING` row of a write that affects at most one row, taken from
/// **every** row the statement produced: the writes read their rows with
/// `fetch_all`, never `fetch_one`/`fetch_optional`, so that a 2xx only ever
/// answers a committed write (docs/design.md §6, "A write's commit").
///
/// Why: an autocommit statement commits when it runs to its end. sqlx's
/// SQLite driver stops stepping after the row `fetch_one`/`fetch_optional`
/// asked for and resets the statement, and the reset's error — the commit
/// failing with `SQLITE_FULL` or an I/O error — is dropped (sqlx #2099): the
/// row came back, the note did not persist (3,000 × 201 on a full disk, 298
/// notes kept). Stepped to the end, the failed commit is the statement's
/// error. On PostgreSQL both read up to `ReadyForQuery` (a deferred
/// constraint failing at commit is an error either way); `fetch_all` keeps
/// one rule for both backends at no extra round trip.
fn committed_row<R>(rows: Vec<R>) -> Option<R> {
    rows.into_iter().next()
}

/// A note, owned: what the by-id read and the writes return (checked).
fn note<'r, R>(r: &'r R) -> Result<Note, sqlx::Error>
where
    R: NoteRow,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    &'r str: Decode<'r, R::Database> + Type<R::Database>,
{
    note_ref(r, true).map(Note::from)
}

/// A backend's row, and how it stores timestamps.
trait NoteRow: Row {
    type Ts: for<'r> Decode<'r, Self::Database> + Type<Self::Database> + Into<Timestamp>;
}

impl NoteRow for sqlx::postgres::PgRow {
    type Ts = PgTimestamp;
}

impl NoteRow for sqlx::sqlite::SqliteRow {
    type Ts = LiteTimestamp;
}

/// A note borrowed from its row. With `checked`, each column's SQL type is
/// checked against the Rust type it decodes to; every row of one result has
/// the same columns, so the list checks its first row only (sqlx's per-cell
/// check was a sixth of the list's CPU).
fn note_ref<'r, R>(r: &'r R, checked: bool) -> Result<NoteRef<'r>, sqlx::Error>
where
    R: NoteRow,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    &'r str: Decode<'r, R::Database> + Type<R::Database>,
{
    fn get<'r, R, T>(r: &'r R, i: usize, checked: bool) -> Result<T, sqlx::Error>
    where
        R: Row,
        usize: ColumnIndex<R>,
        T: Decode<'r, R::Database> + Type<R::Database>,
    {
        if checked {
            r.try_get(i)
        } else {
            r.try_get_unchecked(i)
        }
    }
    Ok(NoteRef {
        id: get(r, 0, checked)?,
        title: get(r, 1, checked)?,
        body: get::<R, Option<&'r str>>(r, 2, checked)?,
        created_at: get::<R, R::Ts>(r, 3, checked)?.into(),
        updated_at: get::<R, R::Ts>(r, 4, checked)?.into(),
    })
}

/// PostgreSQL `timestamptz` in binary form: microseconds since 2000-01-01 UTC.
/// Formatting it here instead of `to_char` in SQL took a third off the
/// database's CPU per list query.
struct PgTimestamp(i64);

const PG_EPOCH_MICROS: i64 = 946_684_800 * 1_000_000;

impl Type<sqlx::Postgres> for PgTimestamp {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        sqlx::postgres::PgTypeInfo::with_name("timestamptz")
    }
}

impl<'r> Decode<'r, sqlx::Postgres> for PgTimestamp {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        use sqlx::ValueRef;
        if value.is_null() {
            return Err("timestamp is NULL".into());
        }
        match value.format() {
            sqlx::postgres::PgValueFormat::Binary => {
                let bytes: [u8; 8] = value.as_bytes()?.try_into()?;
                Ok(PgTimestamp(i64::from_be_bytes(bytes) + PG_EPOCH_MICROS))
            }
            sqlx::postgres::PgValueFormat::Text => Err("timestamptz in text format".into()),
        }
    }
}

impl From<PgTimestamp> for Timestamp {
    fn from(t: PgTimestamp) -> Timestamp {
        Timestamp(t.0)
    }
}

/// SQLite stores the RFC 3339 text the API shows (see the migration's defaults).
struct LiteTimestamp(Timestamp);

impl Type<sqlx::Sqlite> for LiteTimestamp {
    fn type_info() -> sqlx::sqlite::SqliteTypeInfo {
        <String as Type<sqlx::Sqlite>>::type_info()
    }
}

impl<'r> Decode<'r, sqlx::Sqlite> for LiteTimestamp {
    fn decode(value: sqlx::sqlite::SqliteValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let text = <&str as Decode<sqlx::Sqlite>>::decode(value)?;
        Timestamp::parse_rfc3339_ms(text)
            .map(LiteTimestamp)
            .ok_or_else(|| format!("unexpected timestamp {text:?}").into())
    }
}

impl From<LiteTimestamp> for Timestamp {
    fn from(t: LiteTimestamp) -> Timestamp {
        t.0
    }
}

/// What a list query found, besides the notes it handed over.
pub struct ListSummary {
    /// More notes follow (the query fetched `limit + 1`).
    pub more: bool,
    /// The id of the last note handed over: the next page's cursor.
    pub last_id: Option<i64>,
}

impl Store {
    /// Newest first; `before` = id cursor; `limit` already validated (1..=200).
    /// Each note of the page goes to `each`, borrowed from its row, in order;
    /// `each` runs only once every row has decoded (never for a failed query).
    pub async fn list_notes<F>(
        &self,
        limit: i64,
        before: Option<i64>,
        mut each: F,
    ) -> Result<ListSummary, StoreError>
    where
        F: FnMut(NoteRef<'_>),
    {
        let fetch = limit + 1;
        with_conn!(read ListNotes, self, |p, sql, note| {
            let rows = match before {
                Some(b) => {
                    sqlx::query(sql.list_before)
                        .bind(b)
                        .bind(fetch)
                        .fetch_all(p)
                        .await?
                }
                None => sqlx::query(sql.list).bind(fetch).fetch_all(p).await?,
            };
            // The extra row only says that more follow: it is not decoded.
            let more = rows.len() as i64 > limit;
            let page = rows
                .iter()
                .take(limit as usize)
                .enumerate()
                .map(|(i, r)| note_ref(r, i == 0))
                .collect::<Result<Vec<_>, _>>()?;
            page.iter().for_each(|n| each(*n));
            ListSummary {
                more,
                last_id: page.last().map(|n| n.id),
            }
        })
    }

    /// `pg_current_snapshot()` as text (see [`super::CommitToken`]).
    pub(super) async fn pg_snapshot(&self) -> Result<String, StoreError> {
        with_conn!(read CommitToken, self, |p, sql, note| {
            sqlx::query_scalar::<_, String>("SELECT pg_current_snapshot()::text")
                .fetch_one(p)
                .await?
        })
    }

    pub async fn get_note(&self, id: i64) -> Result<Option<Note>, StoreError> {
        with_conn!(read GetNote, self, |p, sql, note| {
            let row = sqlx::query(sql.get).bind(id).fetch_optional(p).await?;
            row.as_ref().map(note).transpose()?
        })
    }

    /// Insert and commit; returns the new id.
    pub async fn create_note(&self, n: &NewNote) -> Result<i64, StoreError> {
        with_conn!(write InsertNote, self, |p, sql, note| {
            let rows = sqlx::query(sql.insert)
                .bind(n.title.as_str())
                .bind(n.body.as_deref())
                .fetch_all(p)
                .await?;
            committed_row(rows)
                .ok_or(sqlx::Error::RowNotFound)?
                .try_get::<i64, _>(0)?
        })
    }

    /// Replace title and body; `None` when the note does not exist.
    pub async fn put_note(&self, id: i64, n: &NewNote) -> Result<Option<Note>, StoreError> {
        with_conn!(write PutNote, self, |p, sql, note| {
            let rows = sqlx::query(sql.put)
                .bind(id)
                .bind(n.title.as_str())
                .bind(n.body.as_deref())
                .fetch_all(p)
                .await?;
            committed_row(rows).as_ref().map(note).transpose()?
        })
    }

    pub async fn patch_note(&self, id: i64, patch: &NotePatch) -> Result<Option<Note>, StoreError> {
        let title = patch.title.as_ref().map(|t| t.as_str());
        let set_body = patch.body.is_some();
        let body = patch.body.clone().flatten();
        with_conn!(write PatchNote, self, |p, sql, note| {
            let rows = sqlx::query(sql.patch)
                .bind(id)
                .bind(title)
                .bind(set_body)
                .bind(body.as_deref())
                .fetch_all(p)
                .await?;
            committed_row(rows).as_ref().map(note).transpose()?
        })
    }

    /// `true` when a note was deleted. `execute` steps the statement to its
    /// end, so the commit's outcome is its result.
    pub async fn delete_note(&self, id: i64) -> Result<bool, StoreError> {
        with_conn!(write DeleteNote, self, |p, sql, note| {
            sqlx::query(sql.delete)
                .bind(id)
                .execute(p)
                .await?
                .rows_affected()
                > 0
        })
    }

    /// `SELECT 1` (readiness).
    pub(super) async fn select_one(&self) -> Result<(), StoreError> {
        with_conn!(read SelectOne, self, |p, sql, note| {
            sqlx::query("SELECT 1").execute(p).await.map(|_| ())?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_LITE: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

    #[test]
    fn sqlite_now_matches_the_schema_default() {
        assert!(LITE.put.contains(NOW_LITE));
        assert!(include_str!("../../migrations/sqlite/0001_create_notes.sql").contains(NOW_LITE));
    }
}
