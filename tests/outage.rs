//! PostgreSQL outages while serving (PostgreSQL only), without touching the
//! shared server's other databases:
//!
//! - the test's own database stops accepting connections
//!   (`ALTER DATABASE … ALLOW_CONNECTIONS false`, its backends terminated);
//! - the database becomes unreachable, then hangs: the server reaches it
//!   through a TCP proxy of the test's own, which can refuse connections or
//!   swallow every byte (a black hole).
//!
//! - every pooled connection is terminated while idle, the database staying
//!   up: no request may notice.
//!
//! While it is down the API answers 503 within `request_timeout` + 1 s,
//! `/readyz` 503 within 2 s, `/healthz` 200, and no worker dies or is killed;
//! once it is back, requests succeed again within 5 s on the same workers.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::notes::*;
use common::*;
use serde_json::json;

/// `http.request_timeout` of the servers under test.
const REQUEST_TIMEOUT: u64 = 3;

fn options(o: &mut TestOptions) {
    // The list cache off: a page cached just before the outage would be served
    // (correctly) for up to `list_cache_ms`; these tests watch the database path.
    o.extra_toml = format!("[http]\nrequest_timeout = {REQUEST_TIMEOUT}\nlist_cache_ms = 0\n");
}

// ---------------------------------------------------------------------------
// What "down" and "back" must look like
// ---------------------------------------------------------------------------

/// Why `resp` is not the documented 503 (`unavailable` or `timeout`), if it is not.
fn not_503(resp: &Response) -> Option<String> {
    let code = resp.error_code().unwrap_or_default();
    let ok = resp.status == 503
        && (code == "unavailable" || code == "timeout")
        && resp.header("x-request-id").is_some();
    (!ok).then(|| format!("{} {}", resp.status, resp.body))
}

/// `rounds` rounds of /readyz, list, get, create and /healthz, all of a round
/// at once (fresh connections, so both workers are hit); returns what was
/// wrong. Panics at once on the liveness checks (/healthz, /readyz shape).
fn probe_while_down(server: &NotesServer, id: i64, rounds: usize) -> Vec<String> {
    let socket: PathBuf = server.socket().to_path_buf();
    let budget = Duration::from_secs(REQUEST_TIMEOUT + 1);
    let mut problems = Vec::new();
    for round in 0..rounds {
        let note = format!("/api/notes/{id}");
        let cases: Vec<(&str, &str, String, Option<&str>)> = vec![
            ("list", "GET", "/api/notes".to_string(), None),
            ("get", "GET", note, None),
            (
                "create",
                "POST",
                "/api/notes".to_string(),
                Some(r#"{"title":"x"}"#),
            ),
        ];
        let results = thread::scope(|scope| {
            let api: Vec<_> = cases
                .iter()
                .map(|(what, method, path, body)| {
                    let socket = &socket;
                    scope.spawn(move || (*what, timed(socket, method, path, *body)))
                })
                .collect();
            let ready = scope.spawn(|| timed(&socket, "GET", "/readyz", None));
            // Liveness while API requests wait on the database.
            thread::sleep(Duration::from_millis(100));
            let (health, health_took) = timed(&socket, "GET", "/healthz", None);
            assert_eq!(health.status, 200, "/healthz needs no database: {health:?}");
            assert!(
                health_took < Duration::from_secs(1),
                "/healthz answered in {health_took:?} while the database is down"
            );
            let ready = ready.join().expect("readyz thread");
            let api: Vec<_> = api
                .into_iter()
                .map(|t| t.join().expect("request thread"))
                .collect();
            (ready, api)
        });
        let ((ready, ready_took), api) = results;
        eprintln!("round {round}: /readyz {} in {ready_took:?}", ready.status);
        assert_eq!(ready.status, 503, "round {round}: /readyz: {ready:?}");
        let body = ready.json();
        assert_eq!(body["ok"], false, "{ready:?}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "/readyz says why: {ready:?}"
        );
        assert!(
            ready_took < Duration::from_secs(2),
            "/readyz took {ready_took:?}"
        );
        for (what, (resp, took)) in api {
            eprintln!("round {round}: {what}: {} in {took:?}", resp.status);
            if let Some(why) = not_503(&resp) {
                problems.push(format!("round {round}: {what}: {why}, expected 503"));
            }
            if took >= budget {
                problems.push(format!(
                    "round {round}: {what} answered after {took:?} (budget {budget:?})"
                ));
            }
        }
    }
    let m = server.metrics();
    let (n503, n500) = (m.requests("/api/notes", 503), m.requests("/api/notes", 500));
    if n503 < (2 * rounds) as f64 || n500 > 0.0 {
        problems.push(format!(
            "metrics: {n503} 503s and {n500} 500s on /api/notes during the outage"
        ));
    }
    problems
}

/// Within 5 s reads and writes succeed again, then keep succeeding on every
/// worker (fresh connections).
fn assert_recovers(server: &NotesServer, id: i64, title: &str) {
    let t0 = Instant::now();
    let mut last = String::new();
    let recovered = poll_until(Duration::from_secs(5), || {
        let list = server.get_path("/api/notes");
        let create = server.send_json("POST", "/api/notes", r#"{"title":"after"}"#);
        last = format!("{list:?} / {create:?}");
        list.status == 200 && create.status == 201
    });
    assert!(recovered, "not recovered within 5 s: {last}");
    eprintln!("recovered after {:?}", t0.elapsed());
    for _ in 0..8 {
        assert_eq!(server.get_path("/readyz").status, 200);
        assert_eq!(server.get_path("/api/notes").status, 200);
        assert_eq!(server.note(id)["title"], title);
        server.create(&json!({"title": "after"}));
    }
}

/// The workers are `pids` and none was restarted.
#[track_caller]
fn assert_same_workers(server: &NotesServer, pids: &[i32], when: &str) {
    let s = server.status();
    assert_eq!(ready_pids(&s), pids, "{when}: the same workers: {s}");
    assert_eq!(s["restarts"], 0, "{when}: no restart: {s}");
}

/// Creates a note, warms both workers' pools; returns (note id, worker pids).
fn warm_up(server: &NotesServer, title: &str) -> (i64, Vec<i32>) {
    let id = server.create(&json!({ "title": title }));
    for _ in 0..6 {
        assert_eq!(server.get_path("/api/notes").status, 200);
    }
    let s = server.status();
    let pids = ready_pids(&s);
    assert_eq!(pids.len(), 2, "{s}");
    assert_eq!(s["restarts"], 0, "{s}");
    (id, pids)
}

// ---------------------------------------------------------------------------
// 1. The database refuses connections (ALLOW_CONNECTIONS false)
// ---------------------------------------------------------------------------

#[test]
fn database_refusing_connections_is_503_then_recovers() {
    let Some(server) = start(Backend::Postgres, "outage", options) else {
        return;
    };
    let name = server.db.pg.as_ref().expect("PostgreSQL").name.clone();
    let (id, pids) = warm_up(&server, "before the outage");

    let mut outage = Refusing::start(&name);
    // Collected rather than asserted at once, so one run shows the whole picture.
    let problems = probe_while_down(&server, id, 3);
    assert_same_workers(&server, &pids, "during the outage");

    outage.restore();
    assert_recovers(&server, id, "before the outage");
    thread::sleep(Duration::from_millis(200));
    assert_same_workers(&server, &pids, "after the outage");
    let titles: Vec<String> = server
        .list_all(200)
        .iter()
        .map(|n| n["title"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        !titles.iter().any(|t| t == "x"),
        "no create refused during the outage was committed: {titles:?}"
    );
    assert!(
        problems.is_empty(),
        "the outage was mishandled:\n{}",
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------
// 2. Pooled connections die while idle; the database stays up
// ---------------------------------------------------------------------------

/// notesd's connections to `name`, terminated; returns how many there were.
fn terminate_backends(name: &str) -> u64 {
    psql_ok(
        "postgres",
        &format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = '{name}' AND application_name = 'notesd'"
        ),
    )
    .trim()
    .parse()
    .unwrap_or(0)
}

/// `n` requests of each kind at once, each on a fresh connection; returns the
/// ones that failed.
fn burst(server: &NotesServer, id: i64, n: usize) -> Vec<String> {
    let socket: PathBuf = server.socket().to_path_buf();
    let note = format!("/api/notes/{id}");
    let cases: Vec<(&str, &str, Option<&str>, u16)> = vec![
        ("GET", "/api/notes", None, 200),
        ("GET", note.as_str(), None, 200),
        ("GET", "/readyz", None, 200),
        ("POST", "/api/notes", Some(r#"{"title":"burst"}"#), 201),
        ("PATCH", note.as_str(), Some(r#"{"body":"patched"}"#), 200),
    ];
    thread::scope(|scope| {
        let threads: Vec<_> = (0..n)
            .flat_map(|_| cases.iter())
            .map(|&(method, path, body, want)| {
                let socket = &socket;
                scope.spawn(move || {
                    let (resp, _) = timed(socket, method, path, body);
                    // A list read retried on a fresh connection is one
                    // whole page, never a page begun on the dead one.
                    let page_ok = (method, path) != ("GET", "/api/notes")
                        || serde_json::from_str::<Vec<serde_json::Value>>(&resp.body).is_ok();
                    (resp.status != want || !page_ok).then(|| format!("{method} {path}: {resp:?}"))
                })
            })
            .collect();
        threads
            .into_iter()
            .filter_map(|t| t.join().expect("request thread"))
            .collect()
    })
}

#[test]
fn connections_killed_while_idle_are_replaced_unseen() {
    let Some(server) = start(Backend::Postgres, "killed_idle", options) else {
        return;
    };
    let name = server.db.pg.as_ref().expect("PostgreSQL").name.clone();
    let (id, pids) = warm_up(&server, "survivor");
    for round in 0..3 {
        // Fill both workers' pools, then kill every connection in them.
        let failed = burst(&server, id, 4);
        assert!(failed.is_empty(), "round {round}, warm: {failed:#?}");
        let killed = terminate_backends(&name);
        eprintln!("round {round}: terminated {killed} pooled connections");
        assert!(killed >= 2, "round {round}: pools were warm ({killed})");
        // Give the terminations time to land, well under the idle-ping age.
        thread::sleep(Duration::from_millis(100));
        let failed = burst(&server, id, 4);
        assert!(
            failed.is_empty(),
            "round {round}: requests after the connections died: {failed:#?}"
        );
    }
    assert_same_workers(&server, &pids, "after the kills");
    let m = server.metrics();
    assert_eq!(m.requests("/api/notes", 503), 0.0, "no 503s");
    assert_eq!(server.list_all(200).len(), 1 + 3 * 8, "every 201 landed");
}

// ---------------------------------------------------------------------------
// 3. The database is unreachable, then hangs (through the test's TCP proxy)
// ---------------------------------------------------------------------------

const FORWARD: u8 = 0;
/// New connections are closed at once; existing ones were cut.
const REFUSE: u8 = 1;
/// New connections are accepted and never answered; bytes on existing ones
/// are swallowed in both directions.
const BLACKHOLE: u8 = 2;

/// A TCP proxy to PostgreSQL whose behaviour the test switches.
struct Proxy {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    /// Every socket it holds (both ends of each forwarded connection).
    sockets: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("proxy address");
        let mode = Arc::new(AtomicU8::new(FORWARD));
        let stop = Arc::new(AtomicBool::new(false));
        let sockets: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (m, st, so) = (mode.clone(), stop.clone(), sockets.clone());
        thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let _ = client.set_nonblocking(false);
                match m.load(Ordering::SeqCst) {
                    REFUSE => {
                        let _ = client.shutdown(Shutdown::Both);
                    }
                    BLACKHOLE => lock(&so).push(client),
                    _ => {
                        let Ok(up) = TcpStream::connect_timeout(&upstream, Duration::from_secs(3))
                        else {
                            continue;
                        };
                        for (from, to) in [(&client, &up), (&up, &client)] {
                            let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                                continue;
                            };
                            let m = m.clone();
                            thread::spawn(move || pump(from, to, &m));
                        }
                        let mut held = lock(&so);
                        held.push(client);
                        held.push(up);
                    }
                }
            }
        });
        Proxy {
            addr,
            mode,
            stop,
            sockets,
        }
    }

    /// Switches mode; leaving FORWARD for REFUSE, or BLACKHOLE for anything,
    /// cuts every connection held (the pool must reconnect).
    fn set(&self, mode: u8) {
        let old = self.mode.swap(mode, Ordering::SeqCst);
        if mode == REFUSE || old == BLACKHOLE {
            self.cut_all();
        }
    }

    fn cut_all(&self) {
        for s in lock(&self.sockets).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut_all();
    }
}

fn lock(m: &Mutex<Vec<TcpStream>>) -> std::sync::MutexGuard<'_, Vec<TcpStream>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Copies `from` → `to` until either side closes; swallows bytes while in BLACKHOLE.
fn pump(mut from: TcpStream, mut to: TcpStream, mode: &AtomicU8) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if mode.load(Ordering::SeqCst) == BLACKHOLE {
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

#[test]
fn database_unreachable_or_hanging_is_503_then_recovers() {
    let proxy = Proxy::start("127.0.0.1:5432".parse().expect("address"));
    let Some(db) = Db::new(Backend::Postgres, "proxied") else {
        return;
    };
    let name = db.pg.as_ref().expect("PostgreSQL").name.clone();
    let mut opts = TestOptions {
        database_url: Some(format!(
            "postgres://postgres@127.0.0.1:{}/{name}",
            proxy.addr.port()
        )),
        ..db.options()
    };
    options(&mut opts);
    let server = NotesServer {
        server: TestServer::start("unreachable_pg", opts),
        db,
    };
    let (id, pids) = warm_up(&server, "before the outage");
    let mut problems = Vec::new();

    // Unreachable: connections are cut and new ones closed at once.
    proxy.set(REFUSE);
    problems.extend(
        probe_while_down(&server, id, 2)
            .into_iter()
            .map(|p| format!("unreachable: {p}")),
    );
    assert_same_workers(&server, &pids, "while unreachable");
    proxy.set(FORWARD);
    assert_recovers(&server, id, "before the outage");

    // Hanging: queries and connection attempts get no answer at all.
    proxy.set(BLACKHOLE);
    problems.extend(
        probe_while_down(&server, id, 2)
            .into_iter()
            .map(|p| format!("hanging: {p}")),
    );
    assert_same_workers(&server, &pids, "while hanging");
    proxy.set(FORWARD);
    assert_recovers(&server, id, "before the outage");
    thread::sleep(Duration::from_millis(200));
    assert_same_workers(&server, &pids, "after the outages");
    assert!(
        problems.is_empty(),
        "the outages were mishandled:\n{}",
        problems.join("\n")
    );
    drop(server);
    drop(proxy);
}

// ---------------------------------------------------------------------------
// The list cache's commit-token query, when the pool is exhausted
// ---------------------------------------------------------------------------

/// The worker's one pool connection is held by a POST waiting on a table
/// lock; list requests pile up behind the list cache's commit-token query,
/// which cannot get a connection either. Its failure is shared: every list
/// request gets its 503 when that one query times out (the pool's 2 s),
/// not one after another (the k-th used to wait k × 2 s: 12 s for the 6th).
#[test]
fn list_requests_share_the_failure_of_the_token_query() {
    let Some(server) = start(Backend::Postgres, "token_failure", |o| {
        o.workers = 1;
        o.database_extra = "max_connections = 1\nstatement_timeout_ms = 30000".into();
        o.extra_toml = "[http]\nrequest_timeout = 30\n".into();
    }) else {
        return;
    };
    let db = server
        .db
        .pg
        .as_ref()
        .expect("a PostgreSQL database")
        .name
        .clone();
    let _ = server.create(&json!({"title": "warm"}));
    let mut locker = hold_notes_lock(&db, 8);
    let socket: PathBuf = server.socket().to_path_buf();
    let post = {
        let socket = socket.clone();
        thread::spawn(move || timed(&socket, "POST", "/api/notes", Some(r#"{"title":"waits"}"#)))
    };
    thread::sleep(Duration::from_millis(300));
    let lists: Vec<_> = (0..6)
        .map(|_| {
            let socket = socket.clone();
            let t = thread::spawn(move || timed(&socket, "GET", "/api/notes", None));
            thread::sleep(Duration::from_millis(20));
            t
        })
        .collect();
    let answers: Vec<(Response, Duration)> = lists
        .into_iter()
        .map(|t| t.join().expect("a list request"))
        .collect();
    let slowest = answers.iter().map(|(_, d)| *d).max().unwrap_or_default();
    eprintln!(
        "OUTAGE token query: list answers {:?}",
        answers
            .iter()
            .map(|(r, d)| (r.status, d.as_millis()))
            .collect::<Vec<_>>()
    );
    for (resp, _) in &answers {
        assert_eq!(
            not_503(resp),
            None,
            "a list request with no connection to get"
        );
    }
    assert!(
        slowest < Duration::from_millis(4500),
        "every list request answered within about one pool timeout, the slowest took {slowest:?}"
    );
    let _ = locker.wait();
    let (resp, _) = post.join().expect("the POST");
    assert_eq!(
        resp.status, 201,
        "the POST commits once the lock is gone: {resp:?}"
    );
    assert_eq!(server.get_path("/api/notes").status, 200);
}
