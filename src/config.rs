//! Configuration: `notesd.toml` + environment + flags → one validated [`Config`].
//!
//! Lookup order (docs/design.md §1): `-c FILE`, else `$NOTESD_CONFIG`, else
//! `/etc/notesd/notesd.toml` if it exists, else the embedded defaults.
//! `DATABASE_URL`, then `NOTESD_DATABASE_URL`, override `database.url`; flags
//! override both.
//!
//! Validation never stops at the first problem: every key is type-checked on
//! its own and every semantic rule runs, so `notesd check` lists them all.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Where the system-wide config lives.
pub const SYSTEM_CONFIG: &str = "/etc/notesd/notesd.toml";
/// Upper bound on workers (scoreboard slots are sized from it, twice over for reloads).
pub const MAX_WORKERS: u32 = 256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub bind: Vec<String>,
    pub socket_mode: String,
    pub socket_group: Option<String>,
    pub workers: u32,
    pub timeout: u64,
    pub graceful_timeout: u64,
    pub keepalive: u64,
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    pub backlog: u32,
    /// s: on TERM, `/readyz` answers 503 and the workers keep accepting this
    /// long before the stop begins (a load balancer's time to stop sending).
    /// Left out of what a master hands to workers and to its re-exec'd self
    /// while 0, so binaries from before the key still take those documents.
    #[serde(skip_serializing_if = "is_zero")]
    pub shutdown_delay: u64,
    /// Optional: a worker whose memory (PSS) stays over this for 3 samples
    /// in a row is recycled, replacement first (see `master::state`). Not
    /// sent while unset, as `shutdown_delay`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_worker_memory: Option<ByteSize>,
    pub pidfile: Option<PathBuf>,
    pub control_socket: PathBuf,
    pub user: Option<String>,
    pub group: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: vec!["unix:/run/notesd/notesd.sock".into()],
            socket_mode: "0660".into(),
            socket_group: None,
            workers: 0,
            timeout: 30,
            graceful_timeout: 30,
            keepalive: 5,
            max_requests: 0,
            max_requests_jitter: 0,
            backlog: 2048,
            shutdown_delay: 0,
            max_worker_memory: None,
            pidfile: None,
            control_socket: PathBuf::from("/run/notesd/control.sock"),
            user: None,
            group: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: String,
    pub max_connections: u32,
    /// A direct URL for `notesd migrate` (and `migrate_on_start`), when `url`
    /// goes through a pooler that cannot hold a session (PgBouncer in
    /// transaction pooling). Not sent while unset, as `shutdown_delay`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migrate_url: Option<String>,
    pub migrate_on_start: bool,
    /// ms a query may run (0 = unbounded): PostgreSQL's session
    /// `statement_timeout`, and notesd's own bound on every query, which
    /// also holds against a server that stopped answering. Not sent while
    /// it has its default, as `shutdown_delay`.
    #[serde(skip_serializing_if = "is_default_statement_timeout")]
    pub statement_timeout_ms: u64,
}

/// `database.statement_timeout_ms` when left out.
pub const DEFAULT_STATEMENT_TIMEOUT_MS: u64 = 5_000;

fn is_default_statement_timeout(n: &u64) -> bool {
    *n == DEFAULT_STATEMENT_TIMEOUT_MS
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres:///notesd?host=/run/postgresql&user=notesd".into(),
            // 8 per worker, one worker per core: the same 8 per core as the
            // earlier 4 × (2 × cores + 1), in fewer pools; enough concurrent
            // INSERTs for PostgreSQL's group commit (POST on 2 cores: 4 → 8
            // per worker, 9.1–10.9k → 13.0–13.9k req/s; docs/design.md §2).
            max_connections: 8,
            migrate_url: None,
            migrate_on_start: false,
            statement_timeout_ms: DEFAULT_STATEMENT_TIMEOUT_MS,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub max_body_bytes: u64,
    pub request_timeout: u64,
    pub max_header_bytes: u64,
    /// ms a worker may serve a `GET /api/notes` page again, as long as the
    /// database saw no commit since (0 = off; see `http::list_cache`).
    pub list_cache_ms: u64,
    /// ms after which a request still running gets one record in the log
    /// saying where it is (0 = off). Not sent while it has its default, so
    /// binaries from before the key still take the documents.
    #[serde(skip_serializing_if = "is_default_slow_request")]
    pub slow_request_ms: u64,
    /// ms: a request that already waited longer in the queue (nginx's
    /// `X-Request-Start` to now) is answered 503 "overloaded" at once (0 = off).
    #[serde(skip_serializing_if = "is_zero")]
    pub max_queue_ms: u64,
    /// s an `Idempotency-Key` and the answer it got are kept (retries with
    /// it within that time get the answer again). Not sent while it has its
    /// default, so binaries from before the key still take the documents.
    #[serde(skip_serializing_if = "is_default_idempotency_ttl")]
    pub idempotency_ttl: u64,
}

/// `http.slow_request_ms` when left out.
pub const DEFAULT_SLOW_REQUEST_MS: u64 = 2_000;

fn is_default_slow_request(n: &u64) -> bool {
    *n == DEFAULT_SLOW_REQUEST_MS
}

/// `http.idempotency_ttl` when left out: a day, as Stripe keeps its keys.
pub const DEFAULT_IDEMPOTENCY_TTL: u64 = 86_400;

fn is_default_idempotency_ttl(n: &u64) -> bool {
    *n == DEFAULT_IDEMPOTENCY_TTL
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: 1_048_576,
            request_timeout: 30,
            max_header_bytes: 16_384,
            list_cache_ms: 250,
            slow_request_ms: DEFAULT_SLOW_REQUEST_MS,
            max_queue_ms: 0,
            idempotency_ttl: DEFAULT_IDEMPOTENCY_TTL,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub target: String,
    pub format: String,
    pub level: String,
    pub access_log: bool,
    /// Optional: append logs to this file instead of stderr/journald; USR1 reopens it.
    pub file: Option<PathBuf>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            target: "auto".into(),
            format: "text".into(),
            level: "info".into(),
            access_log: true,
            file: None,
        }
    }
}

/// Where a config came from: shown by `check`, `status` and the startup log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Source {
    File(PathBuf),
    Embedded,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Embedded => f.write_str("embedded defaults"),
        }
    }
}

/// The whole configuration, after overrides. `validate()` has passed when a
/// `Config` leaves [`load`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub source: Source,
}

/// One problem, named by its key (`server.workers`), as `notesd check` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {source_name}:\n{}", list(.problems))]
    Invalid {
        source_name: String,
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    /// The individual problems (a read error is one problem about the file).
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            ConfigError::Read { path, source } => vec![Problem {
                key: path.display().to_string(),
                message: source.to_string(),
            }],
            ConfigError::Invalid { problems, .. } => problems.clone(),
        }
    }
}

/// Command-line overrides (`serve -b … -w … --database-url …`). Kept by the
/// master so a HUP re-applies them to the re-read file, as Gunicorn does
/// (and hands them over to its re-exec'd self).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Overrides {
    pub config_path: Option<PathBuf>,
    pub bind: Vec<String>,
    pub workers: Option<u32>,
    pub database_url: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A size in bytes, written in a config as a number of bytes or a string
/// with a unit: `"512MiB"`, `"1.5GiB"`, `"800MB"` (K/M/G/T alone are
/// powers of 1024, as systemd's `MemoryMax=`; kB/MB/GB/TB powers of 1000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

const MIB: u64 = 1 << 20;

impl ByteSize {
    /// Parse `"512MiB"`, `"2G"`, `"1048576"`, with an optional space before the unit.
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, unit) = (&t[..split], t[split..].trim());
        let bad = || {
            format!(
                "{text:?} is not a size: expected bytes with a unit, e.g. \"512MiB\" or \"2GiB\""
            )
        };
        let n: f64 = number.parse().map_err(|_| bad())?;
        let scale: u64 = match unit {
            "" | "B" => 1,
            "K" | "KiB" | "k" => 1 << 10,
            "M" | "MiB" => 1 << 20,
            "G" | "GiB" => 1 << 30,
            "T" | "TiB" => 1 << 40,
            "kB" | "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => return Err(bad()),
        };
        let bytes = n * scale as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("{text:?} is too large"));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    /// In MiB, the unit the logs and `notesd status` use.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MiB", self.0 / MIB)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"512MiB\" (or a number of bytes)")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("{v} is negative")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The smallest `server.max_worker_memory`: a worker needs a few MiB to
/// serve at all, and a limit under that would recycle every worker forever.
pub const MIN_WORKER_MEMORY: u64 = 16 * MIB;

/// A parsed `server.bind` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Bind {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Bind {
    pub fn parse(s: &str) -> Result<Bind, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path".into());
            }
            if path.len() >= 108 {
                return Err(format!(
                    "unix socket path is {} bytes; the limit is 107",
                    path.len()
                ));
            }
            return Ok(Bind::Unix(PathBuf::from(path)));
        }
        match s.parse::<SocketAddr>() {
            Ok(addr) if addr.port() == 0 => Err("port 0 is not allowed".into()),
            Ok(addr) => Ok(Bind::Tcp(addr)),
            Err(_) => Err(format!(
                "{s:?} is neither \"unix:/path\" nor \"host:port\" (e.g. \"127.0.0.1:8000\", \"[::1]:8000\")"
            )),
        }
    }
}

impl fmt::Display for Bind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bind::Unix(p) => write!(f, "unix:{}", p.display()),
            Bind::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub fn from_url(url: &str) -> Result<Backend, String> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            check_postgres_url(url)?;
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            if url.contains(":memory:") || url.contains("mode=memory") {
                Err(
                    "an in-memory SQLite database would be private to each worker; use a file"
                        .into(),
                )
            } else {
                Ok(Backend::Sqlite)
            }
        } else {
            Err("must start with postgres://, postgresql:// or sqlite:".into())
        }
    }
}

/// What sqlx (built without whoami's OS support) logs in as when a URL names
/// no user and PGUSER is unset.
const SQLX_DEFAULT_ROLE: &str = "anonymous";

/// A PostgreSQL URL must parse and name its role: unlike libpq, sqlx does not
/// take the role from the OS user, so `postgres:///notesd?host=/run/postgresql`
/// logs in as "anonymous" and fails at the first start.
fn check_postgres_url(url: &str) -> Result<(), String> {
    use std::str::FromStr;
    let options = sqlx::postgres::PgConnectOptions::from_str(url)
        .map_err(|e| format!("not a valid PostgreSQL URL: {e}"))?;
    if options.get_username() == SQLX_DEFAULT_ROLE && !url.contains(SQLX_DEFAULT_ROLE) {
        return Err(format!(
            "names no database role, and sqlx does not take it from the OS user: it would log in \
             as {SQLX_DEFAULT_ROLE:?}; name it, as in postgres:///notesd?host=/run/postgresql&user=notesd \
             or postgres://notesd@db.example.internal/notesd (or set PGUSER)"
        ));
    }
    Ok(())
}

impl Config {
    /// The embedded defaults: serve at once from `./var/` (docs/design.md §2).
    pub fn embedded() -> Config {
        Config {
            server: ServerConfig {
                bind: vec!["unix:./var/notesd.sock".into(), "127.0.0.1:8000".into()],
                control_socket: PathBuf::from("./var/control.sock"),
                pidfile: Some(PathBuf::from("./var/notesd.pid")),
                ..ServerConfig::default()
            },
            database: DatabaseConfig {
                url: "sqlite:./var/notesd.db".into(),
                migrate_on_start: true,
                ..DatabaseConfig::default()
            },
            http: HttpConfig::default(),
            log: LogConfig::default(),
            source: Source::Embedded,
        }
    }

    /// Parse a TOML document. Every key is checked on its own so that all type
    /// errors and unknown keys are reported together.
    pub fn from_toml(text: &str, source: Source) -> Result<Config, Vec<Problem>> {
        match Self::parse_lenient(text, source) {
            (Some(config), problems) if problems.is_empty() => Ok(config),
            (_, problems) => Err(problems),
        }
    }

    /// Parse what can be parsed: the config built from the well-typed keys (none
    /// on a syntax error) and the problems with the others.
    fn parse_lenient(text: &str, source: Source) -> (Option<Config>, Vec<Problem>) {
        let table: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                let problem = Problem {
                    key: "(syntax)".into(),
                    message: e.to_string().trim().replace('\n', " "),
                };
                return (None, vec![problem]);
            }
        };
        let mut problems = Vec::new();
        for key in table.keys() {
            if !matches!(key.as_str(), "server" | "database" | "http" | "log") {
                problems.push(Problem {
                    key: key.clone(),
                    message: "unknown section (expected server, database, http, log)".into(),
                });
            }
        }
        let config = Config {
            server: section(&table, "server", &mut problems),
            database: section(&table, "database", &mut problems),
            http: section(&table, "http", &mut problems),
            log: section(&table, "log", &mut problems),
            source,
        };
        (Some(config), problems)
    }

    /// Every semantic problem, each named by its key.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Problems::default();
        let s = &self.server;
        if s.bind.is_empty() {
            p.add("server.bind", "at least one address is needed");
        }
        let mut seen = Vec::new();
        for b in &s.bind {
            match Bind::parse(b) {
                Ok(bind) if seen.contains(&bind) => {
                    p.add("server.bind", format!("{b:?} is listed twice"))
                }
                Ok(bind) => seen.push(bind),
                Err(e) => p.add("server.bind", e),
            }
        }
        if let Err(e) = parse_mode(&s.socket_mode) {
            p.add("server.socket_mode", e);
        }
        if let Some(g) = &s.socket_group {
            check_group("server.socket_group", g, &mut p);
        }
        if s.workers > MAX_WORKERS {
            p.add(
                "server.workers",
                format!("{} is more than the limit of {MAX_WORKERS}", s.workers),
            );
        }
        p.range("server.timeout", s.timeout, 1, 86_400);
        p.range("server.graceful_timeout", s.graceful_timeout, 0, 86_400);
        p.range("server.keepalive", s.keepalive, 0, 3_600);
        p.range("server.backlog", u64::from(s.backlog), 1, 65_535);
        p.range("server.shutdown_delay", s.shutdown_delay, 0, 3_600);
        if let Some(m) = s.max_worker_memory
            && m.0 < MIN_WORKER_MEMORY
        {
            p.add(
                "server.max_worker_memory",
                format!(
                    "{} bytes is below the minimum of 16MiB (a worker needs several MiB just to serve)",
                    m.0
                ),
            );
        }
        if s.max_requests == 0 && s.max_requests_jitter > 0 {
            p.add(
                "server.max_requests_jitter",
                "has no effect while server.max_requests = 0",
            );
        }
        if s.control_socket.as_os_str().is_empty() {
            p.add("server.control_socket", "must be a path");
        } else if s.control_socket.as_os_str().len() >= 108 {
            p.add("server.control_socket", "path longer than 107 bytes");
        }
        if let Some(pf) = &s.pidfile
            && pf.as_os_str().is_empty()
        {
            p.add("server.pidfile", "must be a path (or left out)");
        }
        if let Some(u) = &s.user {
            match nix::unistd::User::from_name(u) {
                Ok(Some(_)) => {}
                Ok(None) => p.add("server.user", format!("no such user {u:?}")),
                Err(e) => p.add("server.user", format!("cannot look up {u:?}: {e}")),
            }
        }
        if let Some(g) = &s.group {
            check_group("server.group", g, &mut p);
        }
        let d = &self.database;
        if let Err(e) = Backend::from_url(&d.url) {
            p.add("database.url", e);
        }
        if let Some(m) = &d.migrate_url {
            match (Backend::from_url(m), Backend::from_url(&d.url)) {
                (Err(e), _) => p.add("database.migrate_url", e),
                (Ok(a), Ok(b)) if a != b => p.add(
                    "database.migrate_url",
                    "names another kind of database than database.url",
                ),
                _ => {}
            }
        }
        if d.statement_timeout_ms != 0 {
            p.range(
                "database.statement_timeout_ms",
                d.statement_timeout_ms,
                100,
                3_600_000,
            );
        }
        p.range(
            "database.max_connections",
            u64::from(d.max_connections),
            1,
            1_000,
        );
        let h = &self.http;
        p.range("http.max_body_bytes", h.max_body_bytes, 1, 1 << 30);
        p.range("http.request_timeout", h.request_timeout, 1, 86_400);
        p.range("http.max_header_bytes", h.max_header_bytes, 1_024, 1 << 20);
        p.range("http.list_cache_ms", h.list_cache_ms, 0, 60_000);
        p.range("http.max_queue_ms", h.max_queue_ms, 0, 3_600_000);
        // Up to a year: a key must outlive its client's retries, never forever.
        p.range("http.idempotency_ttl", h.idempotency_ttl, 1, 366 * 86_400);
        if h.slow_request_ms != 0 {
            // Below 100 ms nearly every request would get a record.
            p.range("http.slow_request_ms", h.slow_request_ms, 100, 86_400_000);
        }
        let l = &self.log;
        if !matches!(l.target.as_str(), "auto" | "stderr" | "journald") {
            p.add(
                "log.target",
                format!("{:?}: expected auto, stderr or journald", l.target),
            );
        }
        if !matches!(l.format.as_str(), "text" | "json") {
            p.add(
                "log.format",
                format!("{:?}: expected text or json", l.format),
            );
        }
        if l.level.parse::<tracing_subscriber::EnvFilter>().is_err() {
            p.add(
                "log.level",
                format!("{:?}: expected error, warn, info, debug or trace", l.level),
            );
        }
        p.0
    }

    /// Workers to run: `server.workers`, or one per core when it is 0.
    ///
    /// A worker is an event loop that never blocks on a request (gunicorn's
    /// 2 × cores + 1 is for sync workers, which do): more workers than cores
    /// only add context switches, fewer leave a core idle. Measured on 2 cores,
    /// connection-per-request through nginx: 5 workers lose about a fifth of
    /// what 2 serve (docs/design.md §2, bench/README.md). "Cores" is what the
    /// process may run on (affinity and cgroup quota, as nginx's `auto`).
    pub fn worker_count(&self) -> u32 {
        if self.server.workers > 0 {
            return self.server.workers;
        }
        let cores = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        cores.min(MAX_WORKERS)
    }

    /// The parsed binds (only call on a validated config).
    pub fn binds(&self) -> Vec<Bind> {
        self.server
            .bind
            .iter()
            .filter_map(|b| Bind::parse(b).ok())
            .collect()
    }

    pub fn socket_mode(&self) -> u32 {
        parse_mode(&self.server.socket_mode).unwrap_or(0o660)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.server.timeout)
    }

    pub fn graceful_timeout(&self) -> Duration {
        Duration::from_secs(self.server.graceful_timeout)
    }

    pub fn shutdown_delay(&self) -> Duration {
        Duration::from_secs(self.server.shutdown_delay)
    }

    /// `server.max_worker_memory` in bytes, when set.
    pub fn max_worker_memory(&self) -> Option<u64> {
        self.server.max_worker_memory.map(|m| m.0)
    }

    /// `http.slow_request_ms`, when on.
    pub fn slow_request(&self) -> Option<Duration> {
        (self.http.slow_request_ms > 0).then(|| Duration::from_millis(self.http.slow_request_ms))
    }

    /// The database the workers' queries go to, for logs: "PostgreSQL
    /// 127.0.0.1:5432", "PostgreSQL /run/postgresql/.s.PGSQL.5432", "SQLite
    /// ./var/notesd.db" (never the password).
    pub fn database_peer(&self) -> String {
        use std::str::FromStr;
        let url = &self.database.url;
        if let Some(path) = url.strip_prefix("sqlite:") {
            let path = path.trim_start_matches("//");
            return format!("SQLite {}", path.split('?').next().unwrap_or(path));
        }
        match sqlx::postgres::PgConnectOptions::from_str(url) {
            Ok(o) => match o.get_socket() {
                Some(dir) => format!("PostgreSQL {}/.s.PGSQL.{}", dir.display(), o.get_port()),
                None if o.get_host().contains(':') => {
                    format!("PostgreSQL [{}]:{}", o.get_host(), o.get_port())
                }
                None => format!("PostgreSQL {}:{}", o.get_host(), o.get_port()),
            },
            Err(_) => "PostgreSQL".into(),
        }
    }

    /// What is valid but will not do what it says on this host (`notesd
    /// check` prints them; they do not fail it).
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if let Some(max) = somaxconn
            && self.server.backlog > max
        {
            w.push(format!(
                "server.backlog = {} exceeds net.core.somaxconn = {max}: the kernel caps each listen queue at {max} (raise it with sysctl -w net.core.somaxconn={})",
                self.server.backlog, self.server.backlog
            ));
        }
        w
    }

    /// `http.max_queue_ms`, when shedding is on.
    pub fn max_queue(&self) -> Option<Duration> {
        (self.http.max_queue_ms > 0).then(|| Duration::from_millis(self.http.max_queue_ms))
    }

    /// The URL `notesd migrate` connects to: `database.migrate_url`, else `database.url`.
    pub fn migrate_url(&self) -> &str {
        self.database
            .migrate_url
            .as_deref()
            .unwrap_or(&self.database.url)
    }

    /// The unix socket `healthcheck` talks to: the first unix bind.
    pub fn first_unix_socket(&self) -> Option<PathBuf> {
        self.binds().into_iter().find_map(|b| match b {
            Bind::Unix(p) => Some(p),
            Bind::Tcp(_) => None,
        })
    }

    fn apply_overrides(&mut self, env_url: Option<String>, o: &Overrides) {
        if let Some(url) = env_url {
            self.database.url = url;
        }
        if !o.bind.is_empty() {
            self.server.bind = o.bind.clone();
        }
        if let Some(w) = o.workers {
            self.server.workers = w;
        }
        if let Some(url) = &o.database_url {
            self.database.url = url.clone();
        }
    }
}

/// Deserialize one section key by key: every bad key is its own problem.
fn section<T: DeserializeOwned + Default>(
    table: &toml::Table,
    name: &str,
    problems: &mut Vec<Problem>,
) -> T {
    let Some(value) = table.get(name) else {
        return T::default();
    };
    let Some(inner) = value.as_table() else {
        problems.push(Problem {
            key: name.into(),
            message: format!("must be a table ([{name}])"),
        });
        return T::default();
    };
    let mut good = toml::Table::new();
    for (k, v) in inner {
        let mut one = toml::Table::new();
        one.insert(k.clone(), v.clone());
        match toml::Value::Table(one).try_into::<T>() {
            Ok(_) => {
                good.insert(k.clone(), v.clone());
            }
            Err(e) => problems.push(Problem {
                key: format!("{name}.{k}"),
                message: clean_serde_message(&e.to_string(), k),
            }),
        }
    }
    toml::Value::Table(good).try_into::<T>().unwrap_or_default()
}

fn clean_serde_message(msg: &str, key: &str) -> String {
    let msg = msg.trim().replace('\n', " ");
    if msg.starts_with("unknown field") {
        return format!("unknown key {key:?}");
    }
    msg
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let ok = (3..=4).contains(&s.len()) && s.chars().all(|c| ('0'..='7').contains(&c));
    match u32::from_str_radix(s, 8) {
        Ok(m) if ok && m <= 0o777 => Ok(m),
        _ => Err(format!("{s:?}: expected an octal mode such as \"0660\"")),
    }
}

fn check_group(key: &str, g: &str, p: &mut Problems) {
    match nix::unistd::Group::from_name(g) {
        Ok(Some(_)) => {}
        Ok(None) => p.add(key, format!("no such group {g:?}")),
        Err(e) => p.add(key, format!("cannot look up {g:?}: {e}")),
    }
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, key: &str, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn range(&mut self, key: &str, v: u64, lo: u64, hi: u64) {
        if v < lo || v > hi {
            self.add(key, format!("{v} is out of range {lo}..={hi}"));
        }
    }
}

/// Which file to read, following docs/design.md §1 (`None` = embedded defaults).
pub fn locate(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("NOTESD_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let system = Path::new(SYSTEM_CONFIG);
    system.exists().then(|| system.to_path_buf())
}

/// The database URL from the environment: `NOTESD_DATABASE_URL` beats `DATABASE_URL`.
fn env_database_url() -> Option<String> {
    ["NOTESD_DATABASE_URL", "DATABASE_URL"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
}

/// Locate, read, parse, override and validate.
pub fn load(o: &Overrides) -> Result<Config, ConfigError> {
    let (mut config, name, problems) = match locate(o.config_path.as_deref()) {
        Some(path) => {
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            let name = path.display().to_string();
            match Config::parse_lenient(&text, Source::File(path)) {
                (Some(config), problems) => (config, name, problems),
                (None, problems) => {
                    return Err(ConfigError::Invalid {
                        source_name: name,
                        problems,
                    });
                }
            }
        }
        None => (
            Config::embedded(),
            "embedded defaults".to_string(),
            Vec::new(),
        ),
    };
    config.apply_overrides(env_database_url(), o);
    // Semantic rules run on the well-typed keys too, so every problem is listed at once.
    let mut problems = problems;
    problems.extend(config.validate());
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid {
            source_name: name,
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, Vec<Problem>> {
        Config::from_toml(s, Source::Embedded)
    }

    #[test]
    fn empty_file_takes_documented_defaults() {
        let c = parse("").expect("empty file is valid");
        assert_eq!(c.server, ServerConfig::default());
        assert_eq!(
            c.database.url,
            "postgres:///notesd?host=/run/postgresql&user=notesd"
        );
        assert!(!c.database.migrate_on_start);
        assert!(c.validate().is_empty(), "{:?}", c.validate());
    }

    #[test]
    fn embedded_defaults_are_valid_and_local() {
        let c = Config::embedded();
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        assert!(c.database.migrate_on_start);
        assert_eq!(
            c.binds(),
            vec![
                Bind::Unix("./var/notesd.sock".into()),
                Bind::Tcp("127.0.0.1:8000".parse().expect("addr"))
            ]
        );
    }

    #[test]
    fn every_type_error_and_unknown_key_is_listed() {
        let err = parse(
            "[server]\nworkers = -1\nbogus = 1\ntimeout = \"x\"\n[log]\nformat = 3\n[extra]\n",
        )
        .expect_err("invalid");
        let keys: Vec<_> = err.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "server.workers",
            "server.bogus",
            "server.timeout",
            "log.format",
            "extra",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn semantic_problems_are_all_listed() {
        let c = parse(
            "[server]\nbind = [\"nope\", \"unix:\"]\nsocket_mode = \"999\"\ntimeout = 0\n\
             [database]\nurl = \"mysql://x\"\n[http]\nlist_cache_ms = 60001\n\
             [log]\nformat = \"xml\"\ntarget = \"file\"\n",
        )
        .expect("types ok");
        let keys: Vec<_> = c.validate().into_iter().map(|p| p.key).collect();
        for k in [
            "server.bind",
            "server.socket_mode",
            "server.timeout",
            "database.url",
            "http.list_cache_ms",
            "log.format",
            "log.target",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
        }
        assert_eq!(keys.iter().filter(|k| *k == "server.bind").count(), 2);
    }

    #[test]
    fn sizes_parse_with_units_and_nonsense_is_named() {
        for (text, bytes) in [
            ("512MiB", 512 << 20),
            ("512M", 512 << 20),
            ("1.5GiB", 3 << 29),
            ("800MB", 800_000_000),
            ("64 KiB", 64 << 10),
            ("1048576", 1 << 20),
        ] {
            assert_eq!(ByteSize::parse(text), Ok(ByteSize(bytes)), "{text}");
        }
        for bad in ["", "MiB", "12 parsecs", "-5MiB", "1e999GiB", "5 Mib"] {
            assert!(ByteSize::parse(bad).is_err(), "{bad:?} accepted");
        }
        let c = parse("[server]\nmax_worker_memory = \"512MiB\"\n").expect("valid");
        assert_eq!(c.max_worker_memory(), Some(512 << 20));
        let c = parse("[server]\nmax_worker_memory = 33554432\n").expect("bytes");
        assert_eq!(c.max_worker_memory(), Some(32 << 20));
        let problems = parse("[server]\nmax_worker_memory = \"lots\"\n").expect_err("nonsense");
        assert!(problems[0].message.contains("not a size"), "{problems:?}");
        let small = parse("[server]\nmax_worker_memory = \"8MiB\"\n").expect("parses");
        let problems = small.validate();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "server.max_worker_memory");
        assert!(problems[0].message.contains("16MiB"), "{problems:?}");
    }

    #[test]
    fn new_keys_are_left_out_of_documents_while_at_their_defaults() {
        let c = Config::embedded();
        let json = serde_json::to_string(&c).expect("json");
        assert!(!json.contains("max_worker_memory") && !json.contains("slow_request_ms"));
        assert_eq!(c.slow_request(), Some(Duration::from_secs(2)));
        let mut c2 = c.clone();
        c2.server.max_worker_memory = Some(ByteSize(64 << 20));
        c2.http.slow_request_ms = 0;
        let back: Config =
            serde_json::from_str(&serde_json::to_string(&c2).expect("json")).expect("parse");
        assert_eq!(back, c2);
        assert_eq!(back.slow_request(), None);
        let fast = parse("[http]\nslow_request_ms = 50\n").expect("parses");
        assert_eq!(fast.validate()[0].key, "http.slow_request_ms");
    }

    #[test]
    fn syntax_error_is_one_problem() {
        let err = parse("[server\n").expect_err("syntax");
        assert_eq!(err.len(), 1);
        assert_eq!(err[0].key, "(syntax)");
    }

    #[test]
    fn binds_parse() {
        assert_eq!(
            Bind::parse("[::1]:8000"),
            Ok(Bind::Tcp("[::1]:8000".parse().expect("addr")))
        );
        assert!(Bind::parse("127.0.0.1:0").is_err());
        assert!(Bind::parse(&format!("unix:/{}", "a".repeat(120))).is_err());
    }

    #[test]
    fn modes_parse() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert!(parse_mode("0668").is_err());
        assert!(parse_mode("rw").is_err());
        assert!(parse_mode("07777").is_err());
    }

    #[test]
    fn backends() {
        assert_eq!(Backend::from_url("postgres://u@x/y"), Ok(Backend::Postgres));
        assert_eq!(
            Backend::from_url("postgresql:///y?host=/run/postgresql&user=u"),
            Ok(Backend::Postgres)
        );
        assert!(Backend::from_url("postgres://x:notaport/y").is_err());
        assert_eq!(Backend::from_url("sqlite:./a.db"), Ok(Backend::Sqlite));
        assert!(Backend::from_url("sqlite::memory:").is_err());
        assert!(Backend::from_url("mysql://x").is_err());
    }

    /// D1: a PostgreSQL URL without a role logs in as "anonymous" with sqlx,
    /// which no `createuser` ever made; `check` says so instead of the first start failing.
    #[test]
    fn a_postgres_url_without_a_role_is_a_problem_naming_the_fix() {
        if std::env::var_os("PGUSER").is_some() {
            eprintln!("SKIP: PGUSER is set, so a URL without a user is fine here");
            return;
        }
        for url in [
            "postgres:///notesd?host=/run/postgresql",
            "postgres://db.example.internal/notesd",
        ] {
            let e = Backend::from_url(url).expect_err(url);
            assert!(
                e.contains("\"anonymous\"") && e.contains("user=notesd"),
                "{url}: {e}"
            );
        }
    }

    /// D1: the packaged production config names the role the package's
    /// system user maps to (the README's `createuser notesd`).
    #[test]
    fn the_packaged_config_is_valid_and_names_the_notesd_role() {
        use std::str::FromStr;
        let packaged = include_str!("../conf/notesd.toml");
        let c = parse(packaged).expect("conf/notesd.toml parses");
        assert_eq!(c.database.url, DatabaseConfig::default().url);
        let problems = c.validate();
        let own = problems.iter().filter(|p| p.key.starts_with("database."));
        assert_eq!(own.count(), 0, "{problems:?}");
        let options = sqlx::postgres::PgConnectOptions::from_str(&c.database.url).expect("url");
        assert_eq!(options.get_username(), "notesd");
        let sysusers = include_str!("../packaging/notesd.sysusers");
        assert!(
            sysusers.lines().any(|l| l.starts_with("u notesd ")),
            "the package's system user is notesd: {sysusers}"
        );
    }

    #[test]
    fn overrides_beat_file() {
        let mut c = parse("[database]\nurl = \"sqlite:a.db\"\n").expect("ok");
        c.apply_overrides(
            Some("sqlite:env.db".into()),
            &Overrides {
                workers: Some(7),
                bind: vec!["127.0.0.1:9000".into()],
                ..Overrides::default()
            },
        );
        assert_eq!(c.database.url, "sqlite:env.db");
        assert_eq!(c.worker_count(), 7);
        assert_eq!(c.server.bind, vec!["127.0.0.1:9000".to_string()]);
        c.apply_overrides(
            None,
            &Overrides {
                database_url: Some("sqlite:flag.db".into()),
                ..Overrides::default()
            },
        );
        assert_eq!(c.database.url, "sqlite:flag.db");
    }
}
