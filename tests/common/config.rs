//! Config: the knobs of a test server (`TestOptions`), its paths, and the
//! config file rendered from them.

use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Knobs of a test server. `Default` is a 2-worker server with debug routes on.
#[derive(Clone, Debug)]
pub struct TestOptions {
    pub workers: u32,
    pub timeout: u64,
    pub graceful_timeout: u64,
    pub keepalive: u64,
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    /// `None`: a SQLite file in the test dir.
    pub database_url: Option<String>,
    pub migrate_on_start: bool,
    pub log_level: String,
    /// Extra `key = value` lines placed inside `[server]`.
    pub server_extra: String,
    /// Extra `key = value` lines placed inside `[database]`.
    pub database_extra: String,
    /// Extra TOML appended at the end of the file (whole tables, e.g. `[http]`).
    pub extra_toml: String,
    /// Extra environment for `notesd serve`.
    pub env: Vec<(String, String)>,
    /// Sets `NOTESD_DEBUG_ROUTES=1` on `notesd serve`.
    pub debug_routes: bool,
    /// `log.format`: "text" (the default) or "json".
    pub log_format: String,
    /// Extra `key = value` lines placed inside `[log]` (e.g. `file = "…"`).
    pub log_extra: String,
    /// When set, the master is started as
    /// `sh -c '<prefix> exec "$0" "$@"' notesd serve -c CONFIG`, so the prefix
    /// can use the master's own pid (`$$`), e.g. `LISTEN_PID=$$ LISTEN_FDS=1`.
    /// `master_pid()` stays right: `exec` keeps the pid.
    pub sh_prefix: Option<String>,
    /// Open fds the master inherits at fixed numbers: (fd, number), dup2'd in
    /// the child just before exec (which clears close-on-exec), as systemd
    /// passes activated sockets at fd 3. The targets must be distinct and must
    /// not be the source of a later entry.
    pub inherit_fds: Vec<(Arc<OwnedFd>, RawFd)>,
    /// The unix socket the test client talks to (`request`, `load`, the
    /// readiness probe) when it is not the configured bind path (socket
    /// activation: the test's own socket). `None`: `paths.socket`.
    pub client_socket: Option<PathBuf>,
    /// Send the master's stdout to `<dir>/stdout.log` instead of the log, so
    /// that the log (`log()`, the drop check) is its stderr alone.
    pub separate_stdout: bool,
    /// Start the master from this binary instead of `BIN` (the upgrade tests
    /// replace the file at this path, as a package upgrade does).
    pub exe: Option<PathBuf>,
    /// Run the master through this command (e.g. `ip netns exec NS`), which
    /// must exec it (the pid stays the master's).
    pub wrap: Vec<String>,
    /// More `server.bind` entries after the test's unix socket (e.g. a TCP address).
    pub extra_binds: Vec<String>,
}

impl Default for TestOptions {
    fn default() -> Self {
        TestOptions {
            workers: 2,
            timeout: 30,
            graceful_timeout: 5,
            keepalive: 5,
            max_requests: 0,
            max_requests_jitter: 0,
            database_url: None,
            migrate_on_start: true,
            log_level: "info".to_string(),
            server_extra: String::new(),
            database_extra: String::new(),
            extra_toml: String::new(),
            env: Vec::new(),
            debug_routes: true,
            log_format: "text".to_string(),
            log_extra: String::new(),
            sh_prefix: None,
            inherit_fds: Vec::new(),
            client_socket: None,
            separate_stdout: false,
            exe: None,
            wrap: Vec::new(),
            extra_binds: Vec::new(),
        }
    }
}

/// A TOML basic string literal.
pub fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Paths of one test server inside its temp dir.
#[derive(Clone, Debug)]
pub struct ServerPaths {
    pub config: PathBuf,
    pub socket: PathBuf,
    pub control: PathBuf,
    pub pidfile: PathBuf,
    pub db: PathBuf,
    pub log: PathBuf,
}

impl ServerPaths {
    pub fn in_dir(dir: &Path) -> ServerPaths {
        ServerPaths {
            config: dir.join("notesd.toml"),
            socket: dir.join("notesd.sock"),
            control: dir.join("control.sock"),
            pidfile: dir.join("notesd.pid"),
            db: dir.join("notesd.db"),
            log: dir.join("notesd.log"),
        }
    }
}

/// Renders the config file text for `opts` with the given paths.
pub fn render_config(paths: &ServerPaths, opts: &TestOptions) -> String {
    let db_url = opts
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", paths.db.display()));
    let mut text = format!(
        "[server]\n\
         bind = [{bind}]\n\
         workers = {workers}\n\
         timeout = {timeout}\n\
         graceful_timeout = {graceful}\n\
         keepalive = {keepalive}\n\
         max_requests = {max_requests}\n\
         max_requests_jitter = {jitter}\n\
         control_socket = {control}\n\
         pidfile = {pidfile}\n",
        bind = std::iter::once(format!("unix:{}", paths.socket.display()))
            .chain(opts.extra_binds.iter().cloned())
            .map(|b| toml_str(&b))
            .collect::<Vec<_>>()
            .join(", "),
        workers = opts.workers,
        timeout = opts.timeout,
        graceful = opts.graceful_timeout,
        keepalive = opts.keepalive,
        max_requests = opts.max_requests,
        jitter = opts.max_requests_jitter,
        control = toml_str(&paths.control.display().to_string()),
        pidfile = toml_str(&paths.pidfile.display().to_string()),
    );
    if !opts.server_extra.is_empty() {
        text.push_str(opts.server_extra.trim_end());
        text.push('\n');
    }
    text.push_str(&format!(
        "\n[database]\nurl = {}\nmigrate_on_start = {}\n",
        toml_str(&db_url),
        opts.migrate_on_start,
    ));
    if !opts.database_extra.is_empty() {
        text.push_str(opts.database_extra.trim_end());
        text.push('\n');
    }
    text.push_str(&format!(
        "\n[log]\nlevel = {}\nformat = {}\n",
        toml_str(&opts.log_level),
        toml_str(&opts.log_format),
    ));
    if !opts.log_extra.is_empty() {
        text.push_str(opts.log_extra.trim_end());
        text.push('\n');
    }
    if !opts.extra_toml.is_empty() {
        text.push('\n');
        text.push_str(opts.extra_toml.trim_end());
        text.push('\n');
    }
    text
}
