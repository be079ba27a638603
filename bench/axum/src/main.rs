//! notesd-axum-peer: the notes API as a Rust developer would write it without notesd.
//!
//! The benchmark's second reference peer (bench/axum/README.md). The issue compares notesd's
//! prefork master and workers against a single-process baseline: ONE process, axum 0.8 on a tokio
//! multi-thread runtime (default worker threads, one per core), one sqlx `PgPool`. It serves
//! notesd's read/create routes on PostgreSQL with the same status codes and JSON shapes (docs/design.md
//! §5) and runs the same SQL against the same `notes` table (created by `notesd migrate`; this
//! program never creates or alters tables), so what the numbers compare is the process model
//! and the code around the queries, not the work.
//!
//! Deliberately not here: prefork, supervision, scoreboard, metrics, list cache (every list is a
//! query), request timeouts, PUT/PATCH/DELETE.
//!
//! ```text
//! notesd-axum-peer [SOCKET]
//!   SOCKET                      or env AXUM_PEER_SOCKET, default /tmp/notesd-axum/axum.sock (mode 0666)
//!   AXUM_PEER_PIDFILE           default /tmp/notesd-axum/axum.pid
//!   AXUM_PEER_DATABASE_URL      default postgres://postgres@127.0.0.1:5432/notesd_bench
//!   AXUM_PEER_MAX_CONNECTIONS   pool size, default 16
//!   AXUM_PEER_TEST_BEFORE_ACQUIRE  1 (sqlx's default: ping each connection taken from the pool) or 0
//! ```
//! SIGTERM or SIGINT: stop accepting, finish the requests in flight, close idle connections, exit 0.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::json;
use sqlx::postgres::{PgPool, PgPoolOptions, PgTypeInfo, PgValueFormat, PgValueRef};
use sqlx::{Decode, Postgres, Type};
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 200;
const TITLE_MAX_CHARS: usize = 160;
const MAX_BODY_BYTES: usize = 1 << 20; // notesd's http.max_body_bytes default

// notesd's PostgreSQL queries (src/store/notes.rs), verbatim.
const SQL_LIST: &str = "SELECT id, title, body, created_at, updated_at FROM notes \
     ORDER BY created_at DESC, id DESC LIMIT $1";
const SQL_LIST_BEFORE: &str = "SELECT id, title, body, created_at, updated_at FROM notes \
     WHERE (EXISTS (SELECT 1 FROM notes c WHERE c.id = $1) \
     AND (created_at, id) < (SELECT c.created_at, c.id FROM notes c WHERE c.id = $1)) \
     OR (NOT EXISTS (SELECT 1 FROM notes c WHERE c.id = $1) AND id < $1) \
     ORDER BY created_at DESC, id DESC LIMIT $2";
const SQL_GET: &str = "SELECT id, title, body, created_at, updated_at FROM notes WHERE id = $1";
const SQL_INSERT: &str = "INSERT INTO notes (title, body) VALUES ($1, $2) RETURNING id";

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("notesd-axum-peer: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let env = |k: &str, default: &str| std::env::var(k).unwrap_or_else(|_| default.to_string());
    let socket = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| env("AXUM_PEER_SOCKET", "/tmp/notesd-axum/axum.sock")),
    );
    let pidfile = PathBuf::from(env("AXUM_PEER_PIDFILE", "/tmp/notesd-axum/axum.pid"));
    let url = env(
        "AXUM_PEER_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/notesd_bench",
    );
    let max_connections: u32 = env("AXUM_PEER_MAX_CONNECTIONS", "16").parse()?;
    let test_before_acquire = env("AXUM_PEER_TEST_BEFORE_ACQUIRE", "1") != "0";

    // Connect once now, so a bad URL fails the start rather than the first request.
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(2)) // then 503, as notesd
        .test_before_acquire(test_before_acquire)
        .connect(&url)
        .await
        .map_err(|e| format!("database {url}: {e}"))?;

    let app = Router::new()
        .route("/", get(root))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/notes", get(list_notes).post(create_note))
        .route("/api/notes/{id}", get(get_note))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed) // axum adds the Allow header
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(pool.clone());

    let listener = bind(&socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    std::fs::write(&pidfile, format!("{}\n", std::process::id()))
        .map_err(|e| format!("pidfile {}: {e}", pidfile.display()))?;
    eprintln!(
        "notesd-axum-peer: pid {} serving unix:{} (pool max {max_connections})",
        std::process::id(),
        socket.display()
    );

    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await;
    pool.close().await;
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&pidfile);
    eprintln!("notesd-axum-peer: stopped");
    Ok(served?)
}

/// Bind the unix socket: a stale socket file is replaced, a live one (or a non-socket) refused.
fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(io::ErrorKind::AddrInUse, "already served"));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    // nginx runs as another user.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

async fn shutdown_signal() {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    eprintln!("notesd-axum-peer: shutting down");
}

// ---- routes -------------------------------------------------------------------------------------

async fn root() -> Json<serde_json::Value> {
    Json(json!({"message": "Hello, production!"}))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"ok": true}))
}

async fn readyz(State(pool): State<PgPool>) -> Response {
    let ping = tokio::time::timeout(
        Duration::from_secs(1),
        sqlx::query("SELECT 1").execute(&pool),
    );
    let error = match ping.await {
        Ok(Ok(_)) => return Json(json!({"ok": true})).into_response(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "SELECT 1 took longer than 1 s".to_string(),
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"ok": false, "error": error})),
    )
        .into_response()
}

#[derive(Deserialize)]
struct ListParams {
    limit: Option<String>,
    before: Option<String>,
}

/// `GET /api/notes?limit=&before=`: newest first, `Link: …; rel="next"` when more follow.
async fn list_notes(
    State(pool): State<PgPool>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params?;
    let limit = match params.limit {
        None => DEFAULT_LIMIT,
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit must be an integer from 1 to {MAX_LIMIT}"))
            })?,
    };
    let before = match params.before {
        None => None,
        Some(s) => Some(parse_id(&s).ok_or_else(|| {
            ApiError::bad_request("before must be a note id (a positive integer)")
        })?),
    };
    // One row more than asked: is there a next page?
    let mut notes: Vec<Note> = match before {
        None => {
            sqlx::query_as::<_, NoteRow>(SQL_LIST)
                .bind(limit + 1)
                .fetch_all(&pool)
                .await?
        }
        Some(b) => {
            sqlx::query_as::<_, NoteRow>(SQL_LIST_BEFORE)
                .bind(b)
                .bind(limit + 1)
                .fetch_all(&pool)
                .await?
        }
    }
    .into_iter()
    .map(Note::from)
    .collect();
    let more = notes.len() as i64 > limit;
    notes.truncate(limit as usize);
    let next = match notes.last() {
        Some(last) if more => Some(format!(
            "</api/notes?limit={limit}&before={}>; rel=\"next\"",
            last.id
        )),
        _ => None,
    };
    let mut resp = Json(notes).into_response();
    if let Some(link) = next.and_then(|l| HeaderValue::from_str(&l).ok()) {
        resp.headers_mut().insert(header::LINK, link);
    }
    Ok(resp)
}

/// `POST /api/notes` body: both fields optional, nothing else allowed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewNote {
    title: Option<String>,
    body: Option<String>,
}

/// `POST /api/notes` → 201 `{"id": n}` + `Location`.
async fn create_note(
    State(pool): State<PgPool>,
    input: Result<Json<NewNote>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(input) = input?;
    let title = match input.title {
        None => "Untitled".to_string(),
        Some(t) => validate_title(t)?,
    };
    if input.body.as_deref().is_some_and(|b| b.contains('\0')) {
        return Err(ApiError::invalid("body: must not contain NUL characters"));
    }
    let id: i64 = sqlx::query_scalar(SQL_INSERT)
        .bind(&title)
        .bind(input.body.as_deref())
        .fetch_one(&pool)
        .await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/notes/{id}"))],
        Json(json!({"id": id})),
    )
        .into_response())
}

/// notesd's title rules: 1–160 characters, not blank, no control characters but tab.
fn validate_title(t: String) -> Result<String, ApiError> {
    let chars = t.chars().count();
    if t.trim().is_empty() {
        Err(ApiError::invalid("title: must not be empty"))
    } else if chars > TITLE_MAX_CHARS {
        Err(ApiError::invalid(format!(
            "title: is {chars} characters long; the limit is {TITLE_MAX_CHARS}"
        )))
    } else if t.chars().any(|c| c.is_control() && c != '\t') {
        Err(ApiError::invalid(
            "title: must not contain control characters",
        ))
    } else {
        Ok(t)
    }
}

/// `GET /api/notes/{id}`; an id that is not a positive i64 is a 404, as in notesd.
async fn get_note(
    State(pool): State<PgPool>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Note>, ApiError> {
    let id =
        parse_id(&id).ok_or_else(|| ApiError::not_found(format!("no note at /api/notes/{id}")))?;
    sqlx::query_as::<_, NoteRow>(SQL_GET)
        .bind(id)
        .fetch_optional(&pool)
        .await?
        .map(|row| Json(Note::from(row)))
        .ok_or_else(|| ApiError::not_found(format!("note {id} does not exist")))
}

async fn no_route(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed",
    )
}

/// A positive integer that fits in i64 (digits only: no sign, no spaces).
fn parse_id(s: &str) -> Option<i64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<i64>().ok().filter(|n| *n > 0)
}

// ---- notes ----------------------------------------------------------------------------------------

/// A row of `id, title, body, created_at, updated_at`.
type NoteRow = (i64, String, Option<String>, Timestamp, Timestamp);

#[derive(Serialize)]
struct Note {
    id: i64,
    title: String,
    body: Option<String>,
    created_at: Timestamp,
    updated_at: Timestamp,
}

impl From<NoteRow> for Note {
    fn from((id, title, body, created_at, updated_at): NoteRow) -> Note {
        Note {
            id,
            title,
            body,
            created_at,
            updated_at,
        }
    }
}

/// A `timestamptz`, kept as microseconds since the Unix epoch; JSON `2026-11-22T00:31:31.384Z`
/// (RFC 3339, UTC, milliseconds), as notesd writes it.
///
/// sqlx decodes `timestamptz` into chrono/time types only with its `chrono`/`time` features;
/// without them, this reads PostgreSQL's binary form (i64 µs since 2000-01-01) itself.
struct Timestamp(i64);

const PG_EPOCH_MICROS: i64 = 946_684_800 * 1_000_000;

impl Type<Postgres> for Timestamp {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_name("timestamptz")
    }
}

impl<'r> Decode<'r, Postgres> for Timestamp {
    fn decode(value: PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        match value.format() {
            PgValueFormat::Binary => {
                let micros = i64::from_be_bytes(value.as_bytes()?.try_into()?);
                Ok(Timestamp(micros.saturating_add(PG_EPOCH_MICROS)))
            }
            PgValueFormat::Text => Err("timestamptz in text format".into()),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1000)
            .map_err(serde::ser::Error::custom)?;
        s.collect_str(&format_args!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ))
    }
}

// ---- errors: {"error": {"code", "message"}}, notesd's codes -------------------------------------

struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            message,
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

/// axum's own statuses (400 malformed JSON, 413, 415, 422 wrong fields or types), notesd's codes.
impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        let code = match r.status() {
            StatusCode::BAD_REQUEST => "bad_request",
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::UNPROCESSABLE_ENTITY => "validation_failed",
            _ => "internal",
        };
        ApiError::new(r.status(), code, r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> ApiError {
        ApiError::bad_request(r.body_text())
    }
}

/// Database unreachable or saturated → 503 `unavailable`; anything else → 500 `internal`.
impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> ApiError {
        eprintln!("notesd-axum-peer: database error: {e}");
        let outage = match &e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => true,
            // connection exception, too many connections, shutting down / starting up
            sqlx::Error::Database(d) => d
                .code()
                .is_some_and(|c| c.starts_with("08") || c == "53300" || c.starts_with("57P0")),
            _ => false,
        };
        if outage {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the database is unavailable",
            )
        } else {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
        }
    }
}
