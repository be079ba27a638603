//! Helpers for the notes API tests (`api.rs`, `storage.rs`, `outage.rs`): the
//! two storage backends, an HTTP/1.1 client that sends request bodies (the
//! harness client sends none), psql helpers and a guard that takes a test's
//! PostgreSQL database down (`Refusing`), and small parsers for the answers
//! (errors, the Link header, Prometheus text, timestamps).
//!
//! Every API test is written once as `fn name(backend: Backend)` and turned
//! into two `#[test]`s by `both_backends!`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sqlx::{AssertSqlSafe, Connection};

use super::{
    CmdOutput, HttpConn, HttpError, PgDatabase, Response, ServerPaths, TempDir, TestOptions,
    TestServer, build_request, fresh_pg_database, notesd_cmd, render_config, run_with_timeout,
};

/// Generates `sqlite::NAME` and `postgres::NAME` tests calling `NAME(Backend)`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::common::notes::Backend::Sqlite)
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::common::notes::Backend::Postgres)
                }
            )*
        }
    };
}

/// How many migrations this binary embeds (migrations/*/).
pub const MIGRATIONS: i64 = 2;

/// Bound on `notesd migrate` / `seed` runs.
pub const DB_CMD_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The database of one test: a SQLite file in its own temp dir, or a fresh
/// PostgreSQL database (dropped on drop). Also holds a config file naming it,
/// for `notesd migrate` / `seed` run outside a server.
pub struct Db {
    pub backend: Backend,
    pub url: String,
    /// The SQLite file (`None` on PostgreSQL).
    pub sqlite_path: Option<PathBuf>,
    pub pg: Option<PgDatabase>,
    /// The config for CLI commands (`migrate`, `seed`).
    pub config: PathBuf,
    dir: TempDir,
}

impl Db {
    /// A fresh, empty database; `None` when PostgreSQL is unavailable and the
    /// test is skipped (loudly, by `fresh_pg_database`; CI panics instead).
    pub fn new(backend: Backend, name: &str) -> Option<Db> {
        let dir = TempDir::new(&format!("db_{name}"));
        let (url, sqlite_path, pg) = match backend {
            Backend::Sqlite => {
                let path = dir.join("notesd.db");
                (format!("sqlite://{}", path.display()), Some(path), None)
            }
            Backend::Postgres => {
                let pg = fresh_pg_database()?;
                (pg.url.clone(), None, Some(pg))
            }
        };
        let paths = ServerPaths::in_dir(dir.path());
        let opts = TestOptions {
            database_url: Some(url.clone()),
            migrate_on_start: false,
            ..TestOptions::default()
        };
        fs::write(&paths.config, render_config(&paths, &opts)).expect("write the CLI config");
        Some(Db {
            backend,
            url,
            sqlite_path,
            pg,
            config: paths.config,
            dir,
        })
    }

    pub fn dir(&self) -> &TempDir {
        &self.dir
    }

    /// `notesd ARGS… -c CONFIG` (bounded).
    pub fn run(&self, args: &[&str]) -> CmdOutput {
        let config = self.config.display().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-c", config.as_str()]);
        run_with_timeout(notesd_cmd(&all), DB_CMD_TIMEOUT)
    }

    /// `notesd migrate`, which must exit 0.
    pub fn migrate(&self) -> CmdOutput {
        let out = self.run(&["migrate"]);
        assert_eq!(out.code, Some(0), "notesd migrate: {}", out.describe());
        out
    }

    /// `notesd seed --count N`, which must exit 0.
    pub fn seed(&self, n: u32) -> CmdOutput {
        let count = n.to_string();
        let out = self.run(&["seed", "--count", &count]);
        assert_eq!(out.code, Some(0), "notesd seed: {}", out.describe());
        out
    }

    /// Test options serving this database (2 workers, migrate_on_start).
    pub fn options(&self) -> TestOptions {
        TestOptions {
            database_url: Some(self.url.clone()),
            migrate_on_start: true,
            ..TestOptions::default()
        }
    }
}

/// A server and its database; the server is dropped first.
pub struct NotesServer {
    pub server: TestServer,
    pub db: Db,
}

impl std::ops::Deref for NotesServer {
    type Target = TestServer;
    fn deref(&self) -> &TestServer {
        &self.server
    }
}

impl std::ops::DerefMut for NotesServer {
    fn deref_mut(&mut self) -> &mut TestServer {
        &mut self.server
    }
}

/// A fresh database and a 2-worker server on it (migrate_on_start), with
/// `tweak` applied to the options; `None` when the backend is unavailable.
pub fn start(
    backend: Backend,
    name: &str,
    tweak: impl FnOnce(&mut TestOptions),
) -> Option<NotesServer> {
    let db = Db::new(backend, name)?;
    let mut opts = db.options();
    tweak(&mut opts);
    let server = TestServer::start(&format!("{name}_{}", backend_tag(backend)), opts);
    Some(NotesServer { server, db })
}

pub fn backend_tag(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "lite",
        Backend::Postgres => "pg",
    }
}

// ---------------------------------------------------------------------------
// psql
// ---------------------------------------------------------------------------

/// Runs `sql` with psql as user postgres on database `dbname` (unaligned,
/// tuples only: `stdout` is the bare result).
pub fn psql_on(dbname: &str, sql: &str) -> CmdOutput {
    run_with_timeout(psql_command(dbname, sql), Duration::from_secs(15))
}

/// The psql command of [`psql_on`], to run (or spawn) as the caller likes.
pub fn psql_command(dbname: &str, sql: &str) -> Command {
    let mut cmd = Command::new("psql");
    cmd.args([
        "-X",
        "-q",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        "127.0.0.1",
        "-p",
        "5432",
        "-U",
        "postgres",
        "-d",
        dbname,
        "-c",
        sql,
    ])
    .env("PGCONNECT_TIMEOUT", "3")
    .env_remove("PGPASSWORD")
    .env_remove("PGDATABASE")
    .stdin(std::process::Stdio::null());
    cmd
}

/// `LOCK TABLE notes` held by psql on `dbname` for `secs` seconds, taken
/// by the time this returns (it waits 500 ms); `wait()` on it to see it go.
pub fn hold_notes_lock(dbname: &str, secs: u32) -> std::process::Child {
    let hold = format!(
        "BEGIN; LOCK TABLE notes IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep({secs}); COMMIT;"
    );
    let locker = psql_command(dbname, &hold)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("psql holding the lock");
    std::thread::sleep(Duration::from_millis(500));
    locker
}

/// `psql_on` that must succeed; returns the trimmed stdout.
pub fn psql_ok(dbname: &str, sql: &str) -> String {
    let out = psql_on(dbname, sql);
    assert_eq!(
        out.code,
        Some(0),
        "psql -d {dbname} -c {sql:?}: {}",
        out.describe()
    );
    out.stdout.trim().to_string()
}

/// Takes database `name` down (`ALLOW_CONNECTIONS false`, its backends
/// terminated); brings it back on `restore()` or drop (so that `PgDatabase`
/// can drop it even when the test fails).
pub struct Refusing {
    name: String,
    down: bool,
}

impl Refusing {
    pub fn start(name: &str) -> Refusing {
        psql_ok(
            "postgres",
            &format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"),
        );
        let outage = Refusing {
            name: name.to_string(),
            down: true,
        };
        psql_ok(
            "postgres",
            &format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = '{name}' AND pid <> pg_backend_pid()"
            ),
        );
        outage
    }

    pub fn restore(&mut self) {
        if self.down {
            psql_ok(
                "postgres",
                &format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", self.name),
            );
            self.down = false;
        }
    }
}

impl Drop for Refusing {
    fn drop(&mut self) {
        if self.down {
            let out = psql_on(
                "postgres",
                &format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", self.name),
            );
            if out.code != Some(0) {
                eprintln!(
                    "warning: could not re-allow connections: {}",
                    out.describe()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP client with bodies
// ---------------------------------------------------------------------------

/// One connection that can send arbitrary bytes and read responses
/// (keep-alive; HEAD aware).
pub struct Client {
    conn: HttpConn,
}

impl Client {
    pub fn connect(socket: &Path) -> Client {
        let conn = HttpConn::connect(socket)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
        Client { conn }
    }

    /// Writes raw bytes; Err when the server already closed the connection.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.conn.send_raw(bytes)
    }

    /// Closes our writing side (the server sees EOF).
    pub fn shutdown_write(&mut self) {
        let _ = self
            .conn
            .reader
            .get_mut()
            .shutdown(std::net::Shutdown::Write);
    }

    /// Sends one request: `body` gets a Content-Length unless `headers`
    /// already frame it (Content-Length or Transfer-Encoding).
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) {
        let req = build_request(method, path, headers, body);
        self.send_raw(&req)
            .unwrap_or_else(|e| panic!("writing {method} {path}: {e}"));
    }

    /// One request, one response (panics on transport errors).
    pub fn call(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Response {
        self.send(method, path, headers, body);
        self.read_response(method == "HEAD")
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Reads one response; `head`: the request was HEAD (no body follows).
    pub fn read_response(&mut self, head: bool) -> Result<Response, HttpError> {
        self.conn.read_response_to(head)
    }

    /// True when the server closed the connection (EOF or reset) — waits at
    /// most `HTTP_TIMEOUT`.
    pub fn closed_by_server(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match self.conn.reader.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::UnexpectedEof
            ),
        }
    }
}

pub const JSON: (&str, &str) = ("Content-Type", "application/json");

/// One request over a fresh connection to `socket` (JSON when it has a
/// body) and how long its answer took.
pub fn timed(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (Response, Duration) {
    let t0 = std::time::Instant::now();
    let headers: &[(&str, &str)] = if body.is_some() { &[JSON] } else { &[] };
    let resp = Client::connect(socket).call(method, path, headers, body.map(str::as_bytes));
    (resp, t0.elapsed())
}

/// Requests over a fresh connection to a `TestServer`.
pub trait Api {
    fn socket(&self) -> &Path;

    /// Any request, over a fresh connection.
    fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Response {
        Client::connect(self.socket()).call(method, path, headers, body)
    }

    /// METHOD with a JSON body (`Content-Type: application/json`).
    fn send_json(&self, method: &str, path: &str, body: &str) -> Response {
        self.call(method, path, &[JSON], Some(body.as_bytes()))
    }

    fn get_path(&self, path: &str) -> Response {
        self.call("GET", path, &[], None)
    }

    /// POST /api/notes, which must answer 201; returns the id.
    fn create(&self, body: &Value) -> i64 {
        let resp = self.send_json("POST", "/api/notes", &body.to_string());
        assert_eq!(resp.status, 201, "POST /api/notes {body}: {resp:?}");
        let id = resp.json()["id"]
            .as_i64()
            .unwrap_or_else(|| panic!("201 without a numeric id: {resp:?}"));
        assert_eq!(
            resp.header("location"),
            Some(format!("/api/notes/{id}").as_str()),
            "Location of a created note: {resp:?}"
        );
        id
    }

    /// GET /api/notes/{id}, which must answer 200; the note.
    fn note(&self, id: i64) -> Value {
        let resp = self.get_path(&format!("/api/notes/{id}"));
        assert_eq!(resp.status, 200, "GET /api/notes/{id}: {resp:?}");
        let note = resp.json();
        assert_note_shape(&note);
        note
    }

    /// Every note, walking the list with `limit` and following the Link header.
    fn list_all(&self, limit: u32) -> Vec<Value> {
        let mut out = Vec::new();
        let mut next = Some(format!("/api/notes?limit={limit}"));
        let mut pages = 0;
        while let Some(path) = next {
            pages += 1;
            assert!(pages < 10_000, "the Link chain does not end");
            let resp = self.get_path(&path);
            assert_eq!(resp.status, 200, "GET {path}: {resp:?}");
            out.extend(
                resp.json()
                    .as_array()
                    .expect("a JSON array")
                    .iter()
                    .cloned(),
            );
            next = resp
                .header("link")
                .map(|l| next_link(l).unwrap_or_else(|| panic!("bad Link {l:?}")));
        }
        out
    }

    /// The current metrics, parsed.
    fn metrics(&self) -> Metrics {
        let resp = self.get_path("/metrics");
        assert_eq!(resp.status, 200, "GET /metrics: {resp:?}");
        let ct = resp.header("content-type").unwrap_or_default();
        assert!(
            ct.starts_with("text/plain; version=0.0.4"),
            "Prometheus text content type, got {ct:?}"
        );
        Metrics::parse(&resp.body)
    }
}

impl Api for TestServer {
    fn socket(&self) -> &Path {
        self.client_socket()
    }
}

impl Api for NotesServer {
    fn socket(&self) -> &Path {
        self.server.client_socket()
    }
}

/// The target of `Link: <TARGET>; rel="next"`.
pub fn next_link(link: &str) -> Option<String> {
    let (target, params) = link.split_once(';')?;
    let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
    params
        .split(';')
        .any(|p| p.trim().replace(' ', "") == "rel=\"next\"")
        .then(|| target.to_string())
}

/// Asserts `resp` is the documented error: status, JSON content type,
/// `{"error": {"code", "message"}}`, and an X-Request-Id.
#[track_caller]
pub fn assert_error(resp: &Response, status: u16, code: &str) {
    assert_eq!(
        resp.status, status,
        "expected {status} {code}, got {resp:?}"
    );
    let ct = resp.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("application/json"),
        "JSON error body, got {ct:?}: {resp:?}"
    );
    let v: Value = serde_json::from_str(&resp.body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {resp:?}"));
    assert_eq!(v["error"]["code"], code, "error code: {resp:?}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error message: {resp:?}"
    );
    assert_eq!(
        v.as_object().map(|o| o.len()),
        Some(1),
        "only `error`: {resp:?}"
    );
    assert!(
        resp.header("x-request-id").is_some_and(|id| !id.is_empty()),
        "X-Request-Id on every response: {resp:?}"
    );
}

/// `2026-11-22T00:31:31.384Z`: RFC 3339, UTC, milliseconds.
pub fn is_timestamp(s: &str) -> bool {
    let pattern = "dddd-dd-ddTdd:dd:dd.dddZ";
    s.len() == pattern.len()
        && s.bytes().zip(pattern.bytes()).all(|(c, p)| {
            if p == b'd' {
                c.is_ascii_digit()
            } else {
                c == p
            }
        })
}

/// A note has exactly id, title, body, created_at, updated_at, well typed.
#[track_caller]
pub fn assert_note_shape(note: &Value) {
    let obj = note
        .as_object()
        .unwrap_or_else(|| panic!("a note is an object: {note}"));
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["body", "created_at", "id", "title", "updated_at"],
        "{note}"
    );
    assert!(note["id"].as_i64().is_some_and(|i| i > 0), "{note}");
    assert!(note["title"].is_string(), "{note}");
    assert!(note["body"].is_string() || note["body"].is_null(), "{note}");
    for k in ["created_at", "updated_at"] {
        let t = note[k].as_str().unwrap_or_default();
        assert!(
            is_timestamp(t),
            "{k} {t:?} is RFC 3339 UTC with milliseconds: {note}"
        );
    }
    assert!(
        note["updated_at"].as_str() >= note["created_at"].as_str(),
        "updated_at ≥ created_at: {note}"
    );
}

// ---------------------------------------------------------------------------
// Prometheus text
// ---------------------------------------------------------------------------

/// Samples by full series name (`name{labels}` as printed).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: BTreeMap<String, f64>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad metrics line {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in metrics line {line:?}"));
            samples.insert(series.to_string(), value);
        }
        Metrics { samples }
    }

    /// A sample, 0 when absent (counters that never moved are not printed).
    pub fn get(&self, series: &str) -> f64 {
        self.samples.get(series).copied().unwrap_or(0.0)
    }

    /// `notesd_http_requests_total{route, status}`.
    pub fn requests(&self, route: &str, status: u16) -> f64 {
        self.get(&format!(
            "notesd_http_requests_total{{route=\"{route}\",status=\"{status}\"}}"
        ))
    }

    /// The sum over every series of `name` (any labels).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(k, _)| k.as_str() == name || k.starts_with(&format!("{name}{{")))
            .map(|(_, v)| v)
            .sum()
    }

    pub fn total_requests(&self) -> f64 {
        self.sum("notesd_http_requests_total")
    }

    /// Every counter series (`_total`, `_count`, `_bucket`, `_sum`) of
    /// `before` that is lower here, as `series: before → now`. Prometheus
    /// reads a counter that goes down as a reset.
    pub fn counters_below(&self, before: &Metrics) -> Vec<String> {
        before
            .samples
            .iter()
            .filter(|(series, _)| {
                let name = series.split('{').next().unwrap_or("");
                ["_total", "_count", "_bucket", "_sum"]
                    .iter()
                    .any(|s| name.ends_with(s))
            })
            // A process's own series (`process_*{process, slot}`) go when
            // the process does: that is no counter going down.
            .filter(|(series, _)| {
                !series.starts_with("process_") || self.samples.contains_key(*series)
            })
            .filter(|(series, v)| self.get(series) < **v)
            .map(|(series, v)| format!("{series}: {v} → {}", self.get(series)))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Direct SQL (bypassing notesd): sqlx is a dependency already, no CLI needed
// ---------------------------------------------------------------------------

pub fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(15), f)
                .await
                .expect("direct SQL took over 15 s")
        })
}

/// Evaluates `$body` with `$c` connected straight to the test database
/// (bypassing notesd), whichever the backend; the connection is closed after.
macro_rules! with_conn {
    ($db:expr, |$c:ident| $body:expr) => {
        block_on(async {
            match $db.backend {
                Backend::Sqlite => {
                    with_conn!(@on sqlx::SqliteConnection, "connect to SQLite", $db, $c, $body)
                }
                Backend::Postgres => {
                    with_conn!(@on sqlx::PgConnection, "connect to PostgreSQL", $db, $c, $body)
                }
            }
        })
    };
    (@on $conn:ty, $what:literal, $db:expr, $c:ident, $body:expr) => {{
        let mut $c = <$conn>::connect(&$db.url).await.expect($what);
        let out = $body;
        let _ = $c.close().await;
        out
    }};
}

/// Runs `statements` on the test database, bypassing notesd.
pub fn sql_exec(db: &Db, statements: &str) {
    let sql = AssertSqlSafe(statements.to_string());
    with_conn!(db, |c| {
        sqlx::raw_sql(sql)
            .execute(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{statements}: {e}"));
    });
}

/// One integer from `query` on the test database, bypassing notesd.
pub fn sql_i64(db: &Db, query: &str) -> i64 {
    let sql = AssertSqlSafe(query.to_string());
    with_conn!(db, |c| {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"))
    })
}
