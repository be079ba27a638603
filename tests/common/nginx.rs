//! A real nginx in front of a test server, as in production
//! (`conf/nginx/notesd.conf`): an `upstream` to the unix socket with
//! `keepalive`, `proxy_http_version 1.1`, `Connection ""`, and
//! `proxy_next_upstream error timeout` (never `non_idempotent`), listening on
//! 127.0.0.1 on a free high port, with its own prefix in a temp dir and an
//! access log of every request (`$status` and `$upstream_status`) so a test
//! can count the 502/504s nginx produced itself.
//!
//! Also a small HTTP/1.1 keep-alive client over TCP (`TcpClient`) to talk to it.
//!
//! nginx missing: under CI (env `CI` set) `Nginx::start` panics; otherwise it
//! prints a loud SKIP and returns `None` (the same rule as PostgreSQL).

use std::fs;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::kill;
use nix::unistd::Pid;

use super::{
    HttpError, Response, Signal, TempDir, build_request, children_of, parse_response, pid_alive,
    poll_until, skip_unless_ci, tail,
};

/// How long `Nginx::start` waits for nginx to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The nginx binary: `$NGINX`, else `nginx` on PATH, else /usr/sbin/nginx.
pub fn nginx_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NGINX") {
        return Some(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nginx");
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    [
        "/usr/sbin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/nginx/sbin/nginx",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// The nginx binary, when it runs (`nginx -v`). When it does not: panics
/// under CI (env `CI` set), else prints a loud SKIP and returns `None`.
pub fn require_nginx() -> Option<PathBuf> {
    let found = nginx_binary().filter(|b| {
        Command::new(b)
            .arg("-v")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if found.is_none() {
        let msg = "nginx is not installed (looked at $NGINX, PATH, /usr/sbin/nginx)";
        skip_unless_ci("nginx", msg, "; apt-get install nginx");
    }
    found
}

/// Tunables of the test nginx (defaults: the production site's values, with
/// timeouts shortened where a test needs them).
#[derive(Clone, Debug)]
pub struct NginxOptions {
    /// `proxy_read_timeout` (s). Keep it above notesd's `http.request_timeout`,
    /// so a slow answer is notesd's 503, not nginx's 504.
    pub read_timeout: u64,
    /// `keepalive` connections cached per nginx worker in the upstream block.
    pub upstream_keepalive: u32,
    /// Upstream `keepalive_timeout` (s): below notesd's `server.keepalive`, so
    /// nginx closes an idle upstream connection before notesd does.
    pub upstream_keepalive_timeout: u64,
    /// `worker_processes`.
    pub workers: u32,
    /// The upstream's `server` lines (e.g. `10.0.0.11:8000 max_fails=3`) and
    /// further directives, instead of the one unix socket: several hosts.
    pub upstream_servers: Vec<String>,
    pub upstream_extra: Vec<String>,
}

impl Default for NginxOptions {
    fn default() -> Self {
        NginxOptions {
            read_timeout: 35,
            upstream_keepalive: 32,
            upstream_keepalive_timeout: 4,
            workers: 1,
            upstream_servers: Vec::new(),
            upstream_extra: Vec::new(),
        }
    }
}

/// One line of the access log (`log_format chaos`).
#[derive(Clone, Debug)]
pub struct AccessEntry {
    /// `$msec`: seconds since the epoch, millisecond resolution.
    pub msec: f64,
    /// `$status`: what nginx answered the client.
    pub status: u16,
    /// `$upstream_status`: one entry per upstream attempt ("502, 200" when
    /// nginx retried), "-" when notesd was never asked.
    pub upstream_status: String,
    /// `$request_time` (s).
    pub request_time: f64,
    pub method: String,
    pub uri: String,
    /// `$upstream_addr`: every address tried, in order ("a, b" when retried).
    pub upstream_addr: String,
}

impl AccessEntry {
    /// nginx tried notesd more than once for this request (proxy_next_upstream).
    pub fn retried(&self) -> bool {
        self.upstream_status.contains(',')
    }

    fn parse(line: &str) -> Option<AccessEntry> {
        // 1700000000.123 200 "200" 0.004 "GET /api/notes"
        let mut quoted = line.split('"');
        let head = quoted.next()?;
        let upstream_status = quoted.next()?.to_string();
        let mid = quoted.next()?;
        let request = quoted.next()?;
        let _ = quoted.next();
        let upstream_addr = quoted.next().unwrap_or_default().to_string();
        let mut h = head.split_whitespace();
        let msec = h.next()?.parse().ok()?;
        let status = h.next()?.parse().ok()?;
        let request_time = mid.trim().parse().ok()?;
        let (method, uri) = request.split_once(' ').unwrap_or((request, ""));
        Some(AccessEntry {
            msec,
            status,
            upstream_status,
            request_time,
            method: method.to_string(),
            uri: uri.to_string(),
            upstream_addr,
        })
    }
}

/// A running nginx (master `daemon off`, our child); stopped on drop.
pub struct Nginx {
    child: Option<Child>,
    pub port: u16,
    pub upstream: PathBuf,
    pub access_log: PathBuf,
    pub error_log: PathBuf,
    pub conf: PathBuf,
    // Declared last: removed after nginx stopped.
    dir: TempDir,
}

impl Nginx {
    /// Starts nginx proxying to the unix socket `upstream`. `None` (after a
    /// loud SKIP) when nginx is not installed and `CI` is unset; panics when
    /// it is missing under CI, or when it does not start.
    pub fn start(name: &str, upstream: &Path, opts: NginxOptions) -> Option<Nginx> {
        let bin = require_nginx()?;
        let dir = TempDir::new(&format!("nginx_{name}"));
        let mut last_error = String::new();
        // A free port can be taken between our probe and nginx's bind: retry.
        for _attempt in 0..5 {
            let port = free_port();
            match Nginx::try_start(&bin, &dir, upstream, port, &opts) {
                Ok(child) => {
                    return Some(Nginx {
                        child: Some(child),
                        port,
                        upstream: upstream.to_path_buf(),
                        access_log: dir.join("access.log"),
                        error_log: dir.join("error.log"),
                        conf: dir.join("nginx.conf"),
                        dir,
                    });
                }
                Err(e) => last_error = e,
            }
        }
        panic!("nginx did not start: {last_error}");
    }

    fn try_start(
        bin: &Path,
        dir: &TempDir,
        upstream: &Path,
        port: u16,
        opts: &NginxOptions,
    ) -> Result<Child, String> {
        let prefix = dir.path();
        for sub in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            fs::create_dir_all(prefix.join(sub)).map_err(|e| format!("mkdir {sub}: {e}"))?;
        }
        let conf = render_conf(prefix, upstream, port, opts);
        let conf_path = prefix.join("nginx.conf");
        fs::write(&conf_path, conf).map_err(|e| format!("write nginx.conf: {e}"))?;
        let _ = fs::remove_file(prefix.join("error.log"));
        let out = fs::File::create(prefix.join("nginx.out")).map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(bin);
        cmd.arg("-p")
            .arg(format!("{}/", prefix.display()))
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(prefix.join("error.log"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // If the test thread dies, nginx's master gets SIGTERM (fast
        // shutdown: it stops its workers too).
        super::die_with_parent(&mut cmd, super::Signal::SIGTERM);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = fs::read_to_string(prefix.join("error.log")).unwrap_or_default();
                let out = fs::read_to_string(prefix.join("nginx.out")).unwrap_or_default();
                return Err(format!(
                    "nginx exited at start ({status}) on port {port}\n--- error.log ---\n{}\n--- output ---\n{}",
                    tail(&log, 30),
                    tail(&out, 30)
                ));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(child);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "nginx not listening on {addr} within {START_TIMEOUT:?}"
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn master_pid(&self) -> i32 {
        let child = self.child.as_ref().expect("nginx is running");
        i32::try_from(child.id()).expect("pid fits in i32")
    }

    pub fn dir(&self) -> &TempDir {
        &self.dir
    }

    /// Every access log line so far, parsed (unparsable lines are skipped).
    pub fn access_entries(&self) -> Vec<AccessEntry> {
        fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .filter_map(AccessEntry::parse)
            .collect()
    }

    pub fn error_log_text(&self) -> String {
        fs::read_to_string(&self.error_log).unwrap_or_default()
    }

    /// One request over a fresh connection (panics on transport errors).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Response {
        let mut c = TcpClient::connect(self.addr(), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect to nginx at {}: {e}", self.addr()));
        c.request(method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path} through nginx: {e}"))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let master = i32::try_from(child.id()).expect("pid fits in i32");
        let workers = children_of(master);
        // TERM = fast shutdown: the master stops its workers, then exits.
        let _ = kill(Pid::from_raw(master), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        if !matches!(child.try_wait(), Ok(Some(_))) {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Workers of a master that died abruptly would keep the port.
        poll_until(Duration::from_secs(2), || {
            workers.iter().all(|w| !pid_alive(*w))
        });
        for w in workers {
            if pid_alive(w) {
                let _ = kill(Pid::from_raw(w), Signal::SIGKILL);
            }
        }
        if thread::panicking() {
            eprintln!(
                "--- nginx error.log tail ({}) ---\n{}\n--- end ---",
                self.error_log.display(),
                tail(&self.error_log_text(), 40)
            );
        }
    }
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// The `server` lines (and extra directives) of the upstream block.
fn upstream_lines(upstream: &Path, o: &NginxOptions) -> String {
    if o.upstream_servers.is_empty() {
        return format!("        server unix:{} max_fails=0;", upstream.display());
    }
    o.upstream_servers
        .iter()
        .map(|s| format!("        server {s};"))
        .chain(o.upstream_extra.iter().map(|d| format!("        {d};")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The config: production's proxying directives, a test's paths and port.
fn render_conf(prefix: &Path, upstream: &Path, port: u16, o: &NginxOptions) -> String {
    let p = prefix.display();
    // As root, nginx workers would run as `nobody`, who may not connect to a
    // 0660 socket: keep them root (a test instance on 127.0.0.1 only).
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root root;\n"
    } else {
        ""
    };
    format!(
        r#"# Test nginx: generated by tests/common/nginx.rs
{user}daemon off;
master_process on;
worker_processes {workers};
pid {p}/nginx.pid;
error_log {p}/error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    default_type application/octet-stream;
    client_body_temp_path {p}/client_body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;

    log_format chaos '$msec $status "$upstream_status" $request_time "$request_method $request_uri" "$upstream_addr"';
    access_log {p}/access.log chaos;

    keepalive_timeout 75s;
    keepalive_requests 1000000;

    upstream notesd {{
{servers}
        keepalive {keepalive};
        keepalive_timeout {ka_timeout}s;
        keepalive_requests 10000;
    }}

    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        client_max_body_size 1m;
        client_body_timeout 10s;
        client_header_timeout 10s;

        location / {{
            proxy_pass http://notesd;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Request-Id $request_id;
            proxy_set_header X-Request-Start "t=${{msec}}";
            proxy_connect_timeout 5s;
            proxy_send_timeout {read_timeout}s;
            proxy_read_timeout {read_timeout}s;
            # Idempotent requests only: a POST is never replayed.
            proxy_next_upstream error timeout;
            proxy_next_upstream_tries 2;
            proxy_next_upstream_timeout 10s;
        }}
    }}
}}
"#,
        workers = o.workers,
        servers = upstream_lines(upstream, o),
        keepalive = o.upstream_keepalive,
        ka_timeout = o.upstream_keepalive_timeout,
        read_timeout = o.read_timeout,
    )
}

// ---------------------------------------------------------------------------
// HTTP/1.1 keep-alive client over TCP
// ---------------------------------------------------------------------------

/// One keep-alive TCP connection (to nginx).
pub struct TcpClient {
    reader: BufReader<TcpStream>,
    /// Responses fully read on this connection.
    pub responses: usize,
    /// The server announced `Connection: close` (or closed): don't reuse.
    pub closed: bool,
}

impl TcpClient {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpClient, HttpError> {
        let stream = TcpStream::connect_timeout(&addr, timeout).map_err(HttpError::Connect)?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(HttpError::Connect)?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(HttpError::Connect)?;
        let _ = stream.set_nodelay(true);
        Ok(TcpClient {
            reader: BufReader::new(stream),
            responses: 0,
            closed: false,
        })
    }

    /// True when a response was already read on this connection.
    pub fn is_reused(&self) -> bool {
        self.responses > 0
    }

    /// Sends one request (a body gets a Content-Length) and reads its answer.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response, HttpError> {
        let bytes = build_request(method, path, headers, body);
        let stream = self.reader.get_mut();
        stream
            .write_all(&bytes)
            .and_then(|()| stream.flush())
            .map_err(|e| HttpError::from_io(e, false, "writing the request"))?;
        let head = method == "HEAD";
        match parse_response(&mut self.reader, head) {
            Ok(resp) => {
                self.closed |= resp.ends_connection(head);
                self.responses += 1;
                Ok(resp)
            }
            Err(e) => {
                self.closed = true;
                Err(e)
            }
        }
    }
}
