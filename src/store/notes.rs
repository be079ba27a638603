//! Note queries: one SQL text per backend, one code path.
//!
//! Timestamps become [`Timestamp`] (Unix microseconds): PostgreSQL's binary
//! `timestamptz` is decoded directly, SQLite's RFC 3339 text is parsed. Order is newest first: `(created_at DESC, id DESC)`,
//! which the index covers; `before` is a keyset cursor on that order.

use sqlx::{ColumnIndex, Decode, Row, Type};

use super::idempotency::{Claim, Once, Stored};
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
    /// Keyed writes (`store::idempotency`): how a transaction begins, the
    /// claim, the lookup of a key already there, its answer, the purge.
    begin: &'static str,
    claim: &'static str,
    lookup: &'static str,
    answer: &'static str,
    purge: &'static str,
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
    begin: "BEGIN",
    // 0: another transaction holds the key (its request still runs);
    // 1: claimed (new, or its old answer expired); 2: answered before.
    // The advisory lock makes a duplicate answer 409 at once instead of
    // waiting on the first one's uncommitted row.
    claim: "WITH lock AS (SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0)) AS got), \
            claim AS (INSERT INTO idempotency_keys (key, fingerprint, expires_at) \
              SELECT $1, $2, now() + $3::float8 * interval '1 second' FROM lock WHERE got \
              ON CONFLICT (key) DO UPDATE SET fingerprint = excluded.fingerprint, \
                status = NULL, body = NULL, location = NULL, created_at = now(), \
                expires_at = excluded.expires_at \
              WHERE idempotency_keys.expires_at <= now() \
              RETURNING 1) \
            SELECT CASE WHEN NOT (SELECT got FROM lock) THEN 0::int8 \
              WHEN EXISTS (SELECT 1 FROM claim) THEN 1::int8 ELSE 2::int8 END",
    lookup: KEY_LOOKUP,
    answer: KEY_ANSWER,
    purge: "DELETE FROM idempotency_keys WHERE key IN (SELECT key FROM idempotency_keys \
            WHERE expires_at <= now() LIMIT $1 FOR UPDATE SKIP LOCKED)",
};

const KEY_LOOKUP: &str =
    "SELECT fingerprint, status, body, location FROM idempotency_keys WHERE key = $1";
const KEY_ANSWER: &str =
    "UPDATE idempotency_keys SET status = $2, body = $3, location = $4 WHERE key = $1";

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
    // Takes the database's write lock at once: same-key requests queue
    // behind it (busy_timeout) and the second finds the first's answer.
    begin: "BEGIN IMMEDIATE",
    // A row: claimed (1); none: answered before.
    claim: "INSERT INTO idempotency_keys (key, fingerprint, expires_at) \
            VALUES ($1, $2, CAST(strftime('%s', 'now') AS INTEGER) + $3) \
            ON CONFLICT (key) DO UPDATE SET fingerprint = excluded.fingerprint, \
              status = NULL, body = NULL, location = NULL, \
              created_at = CAST(strftime('%s', 'now') AS INTEGER), expires_at = excluded.expires_at \
            WHERE idempotency_keys.expires_at <= CAST(strftime('%s', 'now') AS INTEGER) \
            RETURNING 1",
    lookup: KEY_LOOKUP,
    answer: KEY_ANSWER,
    purge: "DELETE FROM idempotency_keys WHERE rowid IN (SELECT rowid FROM idempotency_keys \
            WHERE expires_at <= CAST(strftime('%s', 'now') AS INTEGER) LIMIT $1)",
};

/// Run `$body` with `$conn` bound to a pooled connection, `$sql` to the
/// backend's SQL set and `note` to its row decoder; errors that `?` raises in
/// `$body` are `sqlx::Error`s, and come out as [`StoreError`]s.
///
/// `read`: retried once, on another connection, when its connection broke.
/// `write`: the connection is pinged first on PostgreSQL; never retried
/// (see [`health`]).
macro_rules! with_conn {
    (read $query:expr, $store:expr, |$conn:ident, $sql:ident, $note:ident| $body:expr) => {{
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
    (write $query:expr, $store:expr, |$conn:ident, $sql:ident, $note:ident| $body:expr) => {
        with_conn!(@run $query, acquire_live, $store, |$conn, $sql, $note| $body)
            .map_err(Failed::into_store)
    };
    (@run $query:expr, $acquire:ident, $store:expr, |$conn:ident, $sql:ident, $note:ident| $body:expr) => {
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
    (@on $query:expr, $acquire:expr, $bound:expr, $sql_set:expr, $decoder:expr, |$conn:ident, $sql:ident, $note:ident| $body:expr) => {
        async {
            phase::enter(Step::WaitingPool, None);
            let acquired = $acquire.await;
            phase::enter(Step::Handling, None);
            let mut pooled = acquired.map_err(Failed::Db)?;
            phase::enter(Step::Query, Some($query));
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

/// The next row of a streamed result (`None` after its last). Reading the
/// rows one by one as sqlx decodes each message keeps none of them: the
/// list used to collect its 51 rows (`fetch_all`) and then decode them.
async fn next_row<S, R>(rows: &mut S) -> Result<Option<R>, sqlx::Error>
where
    S: futures_core::Stream<Item = Result<R, sqlx::Error>> + Unpin,
{
    std::future::poll_fn(|cx| std::pin::Pin::new(&mut *rows).poll_next(cx))
        .await
        .transpose()
}

/// A write to a note, as a handler asks for it: plain ([`Store::write`]) or
/// under an `Idempotency-Key` ([`Store::write_once`]), the same statements.
#[derive(Clone, Copy)]
pub(crate) enum Write<'a> {
    Create(&'a NewNote),
    Put(i64, &'a NewNote),
    /// An empty patch changes nothing: the note is only read.
    Patch(i64, &'a NotePatch),
    Delete(i64),
}

impl Write<'_> {
    fn query(&self) -> Query {
        match self {
            Write::Create(_) => Query::InsertNote,
            Write::Put(..) => Query::PutNote,
            Write::Patch(..) => Query::PatchNote,
            Write::Delete(_) => Query::DeleteNote,
        }
    }
}

/// What a write did.
#[derive(Debug)]
pub(crate) enum Written {
    /// The new note's id.
    Created(i64),
    /// The note after a put or patch; `None`: there is no such note.
    Note(Option<Note>),
    /// Whether a note was deleted.
    Deleted(bool),
}

/// Run write `$w` on `$exec` (a connection or a transaction); the
/// [`Written`]. `?` raises `sqlx::Error`s. Every write reads all its rows
/// (see [`committed_row`]); `execute` steps a DELETE to its end.
macro_rules! run_write {
    ($w:expr, $exec:expr, $sql:ident, $note:ident) => {
        match $w {
            Write::Create(n) => {
                let rows = sqlx::query($sql.insert)
                    .bind(n.title.as_str())
                    .bind(n.body.as_deref())
                    .fetch_all($exec)
                    .await?;
                Written::Created(
                    committed_row(rows)
                        .ok_or(sqlx::Error::RowNotFound)?
                        .try_get::<i64, _>(0)?,
                )
            }
            Write::Put(id, n) => {
                let rows = sqlx::query($sql.put)
                    .bind(id)
                    .bind(n.title.as_str())
                    .bind(n.body.as_deref())
                    .fetch_all($exec)
                    .await?;
                Written::Note(committed_row(rows).as_ref().map($note).transpose()?)
            }
            Write::Patch(id, patch) if patch.is_empty() => {
                let row = sqlx::query($sql.get).bind(id).fetch_optional($exec).await?;
                Written::Note(row.as_ref().map($note).transpose()?)
            }
            Write::Patch(id, patch) => {
                let rows = sqlx::query($sql.patch)
                    .bind(id)
                    .bind(patch.title.as_ref().map(|t| t.as_str()))
                    .bind(patch.body.is_some())
                    .bind(patch.body.as_ref().and_then(|b| b.as_deref()))
                    .fetch_all($exec)
                    .await?;
                Written::Note(committed_row(rows).as_ref().map($note).transpose()?)
            }
            Write::Delete(id) => Written::Deleted(
                sqlx::query($sql.delete)
                    .bind(id)
                    .execute($exec)
                    .await?
                    .rows_affected()
                    > 0,
            ),
        }
    };
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
    /// Appends the page to `out` as a JSON array, each note written as its
    /// row arrives: no row is kept once written. A read retried on another
    /// connection (see `with_conn!`) starts the array again; on an error
    /// `out` holds a partial array, which the caller throws away.
    pub async fn list_page(
        &self,
        limit: i64,
        before: Option<i64>,
        out: &mut Vec<u8>,
    ) -> Result<ListSummary, StoreError> {
        let fetch = limit + 1;
        let mark = out.len();
        with_conn!(read Query::ListNotes, self, |p, sql, note| {
            out.truncate(mark);
            out.push(b'[');
            let query = match before {
                Some(b) => sqlx::query(sql.list_before).bind(b).bind(fetch),
                None => sqlx::query(sql.list).bind(fetch),
            };
            let mut rows = query.fetch(p);
            let mut found = ListSummary {
                more: false,
                last_id: None,
            };
            let mut seen: i64 = 0;
            while let Some(row) = next_row(&mut rows).await? {
                // The extra row only says that more follow: it is not decoded.
                if seen == limit {
                    found.more = true;
                    continue;
                }
                let n = note_ref(&row, seen == 0)?;
                if seen > 0 {
                    out.push(b',');
                }
                n.write_json(out);
                found.last_id = Some(n.id);
                seen += 1;
            }
            out.push(b']');
            found
        })
    }

    /// `pg_current_snapshot()` as text (see [`super::CommitToken`]).
    pub(super) async fn pg_snapshot(&self) -> Result<String, StoreError> {
        with_conn!(read Query::CommitToken, self, |p, sql, note| {
            sqlx::query_scalar::<_, String>("SELECT pg_current_snapshot()::text")
                .fetch_one(p)
                .await?
        })
    }

    pub async fn get_note(&self, id: i64) -> Result<Option<Note>, StoreError> {
        with_conn!(read Query::GetNote, self, |p, sql, note| {
            let row = sqlx::query(sql.get).bind(id).fetch_optional(p).await?;
            row.as_ref().map(note).transpose()?
        })
    }

    /// A write to a note, committed when it returns Ok (see
    /// [`committed_row`]).
    pub(crate) async fn write(&self, w: Write<'_>) -> Result<Written, StoreError> {
        with_conn!(write w.query(), self, |p, sql, note| run_write!(w, p, sql, note))
    }

    /// A write under an `Idempotency-Key`, done at most once per key: the
    /// key is claimed, the write runs and `answer` (its HTTP answer, made
    /// by the caller) is stored with the key, all in one transaction. So a
    /// key's note and its answer commit together or not at all; a worker
    /// or host lost midway leaves neither, and the retry starts afresh.
    pub(crate) async fn write_once<F>(
        &self,
        claim: &Claim,
        w: Write<'_>,
        answer: F,
    ) -> Result<Once, StoreError>
    where
        F: FnOnce(&Written) -> Stored,
    {
        with_conn!(write Query::KeyedWrite, self, |p, sql, note| {
            let mut tx = sqlx::Connection::begin_with(p, sql.begin).await?;
            let claimed = sqlx::query(sql.claim)
                .bind(claim.key.as_str())
                .bind(&claim.fingerprint[..])
                .bind(claim.ttl_secs)
                .fetch_all(&mut *tx)
                .await?
                .first()
                .map(|r| r.try_get::<i64, _>(0))
                .transpose()?
                .unwrap_or(2);
            match claimed {
                1 => {
                    let written = run_write!(w, &mut *tx, sql, note);
                    let stored = answer(&written);
                    sqlx::query(sql.answer)
                        .bind(claim.key.as_str())
                        .bind(i32::from(stored.status))
                        .bind(&stored.body[..])
                        .bind(stored.location.as_deref())
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    Once::Done(stored)
                }
                0 => {
                    tx.rollback().await?;
                    Once::InProgress
                }
                _ => {
                    let row = sqlx::query(sql.lookup)
                        .bind(claim.key.as_str())
                        .fetch_optional(&mut *tx)
                        .await?;
                    tx.rollback().await?;
                    match row {
                        Some(r) => claim.compare(
                            r.try_get::<Vec<u8>, _>(0)?,
                            r.try_get::<Option<i32>, _>(1)?,
                            r.try_get::<Option<Vec<u8>>, _>(2)?,
                            r.try_get::<Option<String>, _>(3)?,
                        ),
                        // Purged between the claim and the lookup: the
                        // client retries and claims it afresh.
                        None => Once::InProgress,
                    }
                }
            }
        })
    }

    /// Delete up to `batch` expired idempotency keys; how many went.
    pub(crate) async fn purge_keys(&self, batch: i64) -> Result<u64, StoreError> {
        with_conn!(write Query::PurgeKeys, self, |p, sql, note| {
            sqlx::query(sql.purge)
                .bind(batch)
                .execute(p)
                .await?
                .rows_affected()
        })
    }
    /// `SELECT 1` (readiness).
    pub(super) async fn select_one(&self) -> Result<(), StoreError> {
        with_conn!(read Query::SelectOne, self, |p, sql, note| {
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
