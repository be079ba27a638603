//! Hostile input, sent raw over the unix socket: a generated corpus of
//! malformed and malicious requests (broken request lines, invalid methods
//! and versions, oversized and injected headers, every kind of broken
//! framing, invalid UTF-8, deep JSON, out-of-range numbers, SQL-looking
//! strings, path traversal, percent-encoding junk, garbage pipelined after a
//! valid request) and slowloris trickles.
//!
//! Each request must be answered with a 4xx, or the connection closed —
//! never a 5xx, never a hang (a few requests of the corpus are valid in
//! disguise and may succeed: they are marked so). Afterwards the workers are
//! the same processes (no crash, `restarts` 0, no `panicked` in the log) and
//! they hold no more file descriptors than before (a small tolerance for the
//! database pool, which opens its connections lazily).
//!
//! The corpus runs on both backends (SQL strings must round-trip literally on
//! each); the slowloris tests on SQLite.
//!
//! The corpus itself is built in `corpus` (tests/hostile/corpus.rs); this
//! file sends it (the raw exchanges), judges each answer, checks the workers
//! afterwards, and holds the slowloris and `Host` tests.

mod common;
#[path = "hostile/corpus.rs"]
mod corpus;

use std::collections::BTreeMap;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::notes::*;
use common::*;
use corpus::{Case, Expect, corpus, post_with, req};
use serde_json::json;

both_backends!(corpus_is_answered_4xx_or_closed_and_costs_nothing);

/// `http.max_header_bytes` of the servers under test (small, to reach it cheaply).
const MAX_HEADER: usize = 8192;
/// `http.max_body_bytes` of the servers under test.
const MAX_BODY: usize = 64 * 1024;
/// A request neither answered nor closed by then is a hang.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(4);
/// Connections sending the corpus at once.
const PARALLEL: usize = 4;

fn hostile_options(o: &mut TestOptions) {
    o.keepalive = 2;
    // No /debug routes: the corpus probes them as unknown paths.
    o.debug_routes = false;
    o.extra_toml =
        format!("[http]\nmax_header_bytes = {MAX_HEADER}\nmax_body_bytes = {MAX_BODY}\n");
}

// ---------------------------------------------------------------------------
// Raw exchanges
// ---------------------------------------------------------------------------

/// One answer, parsed loosely.
#[derive(Clone, Debug)]
struct Answer {
    status: u16,
    /// The raw head (status line and headers), for checks on what was echoed.
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.head.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// What the server did with one connection's bytes.
#[derive(Clone, Debug, Default)]
struct Exchange {
    /// Final answers in order (1xx interim answers are skipped).
    answers: Vec<Answer>,
    /// The server closed the connection (EOF or reset) before we stopped reading.
    closed: bool,
    /// Neither the answers expected nor a close came within the timeout.
    timed_out: bool,
    /// Writing failed (the server closed while we were still sending).
    write_error: Option<String>,
    /// Bytes that did not parse as an HTTP/1.1 answer.
    garbage: Option<String>,
}

impl Exchange {
    fn statuses(&self) -> Vec<u16> {
        self.answers.iter().map(|a| a.status).collect()
    }

    fn outcome(&self) -> String {
        let mut s = format!("{:?}", self.statuses());
        if self.closed {
            s.push_str(" closed");
        }
        if self.timed_out {
            s.push_str(" TIMED OUT");
        }
        if let Some(g) = &self.garbage {
            s.push_str(&format!(" garbage {g:?}"));
        }
        s
    }
}

/// Parses complete answers at the start of `buf`; returns them and the bytes
/// consumed. `eof`: no more bytes will come (a body without length ends here).
fn parse_answers(buf: &[u8], eof: bool) -> Result<(Vec<Answer>, usize), String> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let rest = &buf[pos..];
        let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
            if rest.len() > 64 * 1024 {
                return Err("an answer head over 64 KiB".to_string());
            }
            return Ok((out, pos));
        };
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        let status_line = head.split("\r\n").next().unwrap_or_default();
        let status = parse_status_line(status_line)
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let mut answer = Answer {
            status,
            head,
            body: Vec::new(),
        };
        let body_start = end + 4;
        let len = if (100..200).contains(&status) || status == 204 || status == 304 {
            Some(0)
        } else {
            answer
                .header("content-length")
                .map(|l| l.parse::<usize>().map_err(|_| format!("bad length {l:?}")))
                .transpose()?
        };
        if answer
            .header("transfer-encoding")
            .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"))
        {
            return Err("a chunked answer (not expected from notesd)".to_string());
        }
        let consumed = match len {
            Some(n) if rest.len() >= body_start + n => {
                answer.body = rest[body_start..body_start + n].to_vec();
                body_start + n
            }
            Some(_) => return Ok((out, pos)),
            None if eof => {
                answer.body = rest[body_start..].to_vec();
                rest.len()
            }
            None => return Ok((out, pos)),
        };
        pos += consumed;
        if !(100..200).contains(&status) {
            out.push(answer);
        }
    }
}

/// Sends `bytes` on a fresh connection (then half-closes when `eof`) and
/// reads until `want` answers arrived, the server closed, or the timeout.
/// With `linger`, keeps reading that long after the answers, to see whether
/// the server closes the connection.
fn exchange(
    socket: &Path,
    bytes: &[u8],
    eof: bool,
    want: usize,
    linger: Option<Duration>,
) -> Exchange {
    let mut ex = Exchange::default();
    let mut stream = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
    stream
        .set_write_timeout(Some(ANSWER_TIMEOUT))
        .expect("write timeout");
    stream
        .set_read_timeout(Some(Duration::from_millis(20)))
        .expect("read timeout");
    if let Err(e) = stream.write_all(bytes).and_then(|()| stream.flush()) {
        ex.write_error = Some(e.to_string());
    }
    if eof {
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
    let mut deadline = Instant::now() + ANSWER_TIMEOUT;
    let mut answered = false;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => {
                ex.closed = true;
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted) => continue,
            Err(_) => {
                // Reset: the server closed with our bytes unread.
                ex.closed = true;
                break;
            }
        }
        if !answered {
            match parse_answers(&buf, false) {
                Ok((answers, _)) if answers.len() >= want => match linger {
                    None => break,
                    Some(l) => {
                        answered = true;
                        deadline = Instant::now() + l;
                    }
                },
                Ok(_) => {}
                Err(e) => {
                    ex.garbage = Some(e);
                    break;
                }
            }
        }
        if Instant::now() >= deadline {
            ex.timed_out = !answered;
            break;
        }
    }
    match parse_answers(&buf, ex.closed) {
        Ok((answers, used)) => {
            ex.answers = answers;
            if ex.closed && used < buf.len() && ex.garbage.is_none() {
                let tail = String::from_utf8_lossy(&buf[used..buf.len().min(used + 80)]);
                ex.garbage = Some(format!("a truncated answer: {tail:?}"));
            }
        }
        Err(e) => ex.garbage = Some(e),
    }
    ex
}

// ---------------------------------------------------------------------------
// Judging an exchange
// ---------------------------------------------------------------------------

/// Why `ex` breaks the rules for `case`, if it does.
fn judge(case: &Case, ex: &Exchange) -> Option<String> {
    let statuses = ex.statuses();
    if let Some(s) = statuses.iter().find(|s| **s >= 500) {
        return Some(format!("answered {s} (a 5xx for bad input)"));
    }
    if ex.timed_out {
        return Some(format!(
            "neither answered nor closed within {ANSWER_TIMEOUT:?}"
        ));
    }
    if let Some(g) = &ex.garbage {
        return Some(format!("unparsable answer: {g}"));
    }
    for a in &ex.answers {
        if a.header("x-injected").is_some() {
            return Some(format!(
                "a header was injected into the answer: {:?}",
                a.head
            ));
        }
        if String::from_utf8_lossy(&a.body).contains("root:") {
            return Some("the answer contains /etc/passwd".to_string());
        }
    }
    let four = |s: &u16| (400..500).contains(s);
    match case.expect {
        Expect::Reject => {
            if let Some(s) = statuses.iter().find(|s| !four(s)) {
                return Some(format!("answered {s}, expected a 4xx or a close"));
            }
        }
        Expect::NoServerError => {}
        Expect::CloseAfter => {
            let ok = statuses.iter().all(four) || ex.closed;
            if !ok {
                return Some(format!(
                    "answered {statuses:?} and kept the connection open (Content-Length with \
                     Transfer-Encoding must be refused, or the connection closed after the answer)"
                ));
            }
        }
        Expect::ValidThenReject => match statuses.split_first() {
            None => return Some("the valid request was not answered".to_string()),
            Some((first, _)) if !(200..300).contains(first) => {
                return Some(format!("the valid request got {first}"));
            }
            Some((_, rest)) => {
                if let Some(s) = rest.iter().find(|s| !four(s)) {
                    return Some(format!("the garbage got {s}, expected a 4xx or a close"));
                }
            }
        },
    }
    None
}

// ---------------------------------------------------------------------------
// Worker file descriptors
// ---------------------------------------------------------------------------

/// The targets of `/proc/PID/fd/*` ("socket:[…]", file paths, "anon_inode:…").
fn fd_targets(pid: i32) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| fs::read_link(e.path()).ok())
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// fd count per worker pid.
fn fd_counts(pids: &[i32]) -> BTreeMap<i32, Vec<String>> {
    pids.iter().map(|p| (*p, fd_targets(*p))).collect()
}

/// Waits until no worker has an open client connection (bounded), then a
/// short settle.
fn settle(server: &TestServer) {
    let idle = server.try_wait_for(Duration::from_secs(6), |s| {
        workers(s)
            .iter()
            .all(|w| w["active_connections"].as_u64() == Some(0))
    });
    if let Err(last) = idle {
        eprintln!("(connections still open after 6 s: {last})");
    }
    thread::sleep(Duration::from_millis(300));
}

/// Open sockets and total fds of every worker did not grow beyond the pool.
#[track_caller]
fn assert_no_fd_leak(
    what: &str,
    before: &BTreeMap<i32, Vec<String>>,
    after: &BTreeMap<i32, Vec<String>>,
    tolerance: usize,
) {
    let mut problems = Vec::new();
    for (pid, b) in before {
        let a = &after[pid];
        let sockets = |v: &[String]| v.iter().filter(|t| t.starts_with("socket:")).count();
        let added: Vec<&String> = {
            let mut pool: Vec<&String> = b.iter().collect();
            a.iter()
                .filter(|t| {
                    if let Some(i) = pool.iter().position(|x| x == t) {
                        pool.remove(i);
                        false
                    } else {
                        true
                    }
                })
                .collect()
        };
        eprintln!(
            "HOSTILE {what} fds: worker {pid}: before={} after={} (sockets {} -> {}); new: {:?}",
            b.len(),
            a.len(),
            sockets(b),
            sockets(a),
            added.iter().map(|s| s.as_str()).collect::<Vec<_>>()
        );
        if a.len() > b.len() + tolerance {
            problems.push(format!(
                "worker {pid}: {} fds before, {} after (tolerance {tolerance}); new: {added:?}",
                b.len(),
                a.len()
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{what}: file descriptors leaked:\n{}",
        problems.join("\n")
    );
}

/// fds one pool connection may hold: a socket on PostgreSQL; the database,
/// its WAL and shared memory files on SQLite.
fn fds_per_db_connection(backend: Backend) -> usize {
    match backend {
        Backend::Postgres => 1,
        Backend::Sqlite => 3,
    }
}

/// `database.max_connections` (the default).
const POOL: usize = 8;

/// Opens pool connections in every worker: concurrent slow-ish DB requests
/// over several connections.
fn warm_pools(server: &NotesServer) {
    let socket = server.socket().to_path_buf();
    thread::scope(|s| {
        for _ in 0..8 {
            let socket = &socket;
            s.spawn(move || {
                for _ in 0..10 {
                    let mut c = Client::connect(socket);
                    let r = c.call("GET", "/api/notes?limit=200", &[], None);
                    assert_eq!(r.status, 200, "{r:?}");
                }
            });
        }
    });
}

// ---------------------------------------------------------------------------
// The corpus test
// ---------------------------------------------------------------------------

/// SQL-looking strings: stored and returned literally.
const SQLISH: &[&str] = &[
    "'; DROP TABLE notes; --",
    "\"; DROP TABLE notes; --",
    "Robert'); DROP TABLE notes;--",
    "1; DELETE FROM notes",
    "' OR '1'='1",
    "') OR 1=1 --",
    "' UNION SELECT id, title, body, created_at, updated_at FROM notes --",
    "$1",
    "$$; DROP TABLE notes; $$",
    "\\'; --",
    "%",
    "_",
    "/* */",
    "NULL",
    "'; ATTACH DATABASE '/tmp/pwn.db' AS pwn; --",
    "'; PRAGMA writable_schema = 1; --",
    "1' AND SLEEP(5) --",
    "'; SELECT pg_sleep(5); --",
    "\\x00\\x27",
    "🦀'; DROP TABLE notes; -- ✓",
];

fn corpus_is_answered_4xx_or_closed_and_costs_nothing(backend: Backend) {
    let Some(server) = start(backend, "hostile", hostile_options) else {
        return;
    };
    let note = server.create(&json!({"title": "survivor", "body": "intact"}));
    warm_pools(&server);
    let s0 = server.status();
    let pids = ready_pids(&s0);
    assert_eq!(s0["restarts"], 0, "{s0}");
    settle(&server);
    let fds_before = fd_counts(&pids);

    let cases = corpus(note);
    assert!(cases.len() >= 500, "corpus of {} requests", cases.len());
    let socket: PathBuf = server.socket().to_path_buf();
    let t0 = Instant::now();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Exchange)>> = Mutex::new(Vec::new());
    thread::scope(|s| {
        for _ in 0..PARALLEL {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(c) = cases.get(i) else { break };
                    let ex = match c.expect {
                        // Does the server close after answering?
                        Expect::CloseAfter => {
                            exchange(&socket, &c.bytes, c.eof, 1, Some(Duration::from_secs(2)))
                        }
                        Expect::ValidThenReject => exchange(&socket, &c.bytes, c.eof, 2, None),
                        _ => exchange(&socket, &c.bytes, c.eof, 1, None),
                    };
                    results
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((i, ex));
                }
            });
        }
    });
    let took = t0.elapsed();
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|r| r.0);

    // HOSTILE_VERBOSE=1: every case and what it got.
    let verbose = std::env::var_os("HOSTILE_VERBOSE").is_some();
    let mut problems = Vec::new();
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_category: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, ex) in &results {
        let c = &cases[*i];
        *by_category.entry(c.category).or_insert(0) += 1;
        let key = match ex.answers.first() {
            Some(a) => a.status.to_string(),
            None if ex.closed => "closed".to_string(),
            None => "none".to_string(),
        };
        *by_status.entry(key).or_insert(0) += 1;
        if verbose {
            eprintln!(
                "  [{}] {}: {}",
                c.category,
                c.name.chars().take(100).collect::<String>().escape_debug(),
                ex.outcome()
            );
        }
        if let Some(why) = judge(c, ex) {
            problems.push(format!(
                "[{}] {}: {why} (got {})",
                c.category,
                c.name.chars().take(120).collect::<String>(),
                ex.outcome()
            ));
        }
    }
    eprintln!(
        "HOSTILE corpus ({}): requests={} took_ms={} first_answer={by_status:?} categories={by_category:?} problems={}",
        backend_tag(backend),
        cases.len(),
        took.as_millis(),
        problems.len()
    );

    // SQL-looking strings round-trip literally, as title and as body.
    let mut created = Vec::new();
    for s in SQLISH {
        let resp = server.send_json(
            "POST",
            "/api/notes",
            &json!({"title": s, "body": s}).to_string(),
        );
        if resp.status != 201 {
            problems.push(format!("POST title {s:?}: {} {}", resp.status, resp.body));
            continue;
        }
        let id = resp.json()["id"].as_i64().expect("id");
        let got = server.note(id);
        if got["title"] != *s || got["body"] != *s {
            problems.push(format!("{s:?} came back as {got}"));
        }
        created.push(id);
    }
    let patched = server.send_json(
        "PATCH",
        &format!("/api/notes/{note}"),
        &json!({"body": SQLISH[0]}).to_string(),
    );
    if patched.status != 200 || patched.json()["body"] != SQLISH[0] {
        problems.push(format!("PATCH body {:?}: {patched:?}", SQLISH[0]));
    }
    let all = server.list_all(200);
    for id in &created {
        if !all.iter().any(|n| n["id"] == *id) {
            problems.push(format!("note {id} missing from the list"));
        }
    }
    assert_eq!(
        server.note(note)["title"],
        "survivor",
        "the table is intact"
    );

    settle(&server);
    let fds_after = fd_counts(&pids);
    let s1 = server.status();
    let log = server.log();
    let panics = log.lines().filter(|l| l.contains("panicked")).count();
    eprintln!(
        "HOSTILE corpus ({}): workers {:?} -> {:?} restarts={} panics_in_log={panics} sql_round_trips={}",
        backend_tag(backend),
        pids,
        ready_pids(&s1),
        s1["restarts"],
        created.len()
    );
    assert_eq!(ready_pids(&s1), pids, "the same workers (no crash): {s1}");
    assert_eq!(s1["restarts"], 0, "no restart: {s1}");
    assert_eq!(panics, 0, "no panic in the log");
    assert!(
        problems.is_empty(),
        "{} of {} hostile requests mishandled:\n{}",
        problems.len(),
        cases.len(),
        problems.join("\n")
    );
    assert_no_fd_leak(
        &format!("corpus ({})", backend_tag(backend)),
        &fds_before,
        &fds_after,
        POOL * fds_per_db_connection(backend),
    );
}

// ---------------------------------------------------------------------------
// Slowloris
// ---------------------------------------------------------------------------

/// `server.keepalive` of the slowloris tests: also the head's deadline.
const KEEPALIVE: u64 = 2;

/// What a trickling connection ended with.
#[derive(Debug)]
struct Trickle {
    /// From connect until the server closed it (None: still open at the deadline).
    closed_after: Option<Duration>,
    /// A status the server sent before closing, if any.
    status: Option<u16>,
    bytes_sent: usize,
}

/// Connects, writes `prefix`, then the bytes of `drip` (cycled) one every
/// `every`, until the server closes the connection or `limit` passes.
fn trickle(socket: &Path, prefix: &[u8], drip: &[u8], every: Duration, limit: Duration) -> Trickle {
    let t0 = Instant::now();
    let mut stream = UnixStream::connect(socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(10)))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(1)))
        .expect("write timeout");
    let mut sent = 0;
    let mut drips = 0;
    let mut got = Vec::new();
    let mut next_drip = Instant::now();
    let mut wrote_prefix = prefix.is_empty();
    let closed_after = loop {
        if t0.elapsed() > limit {
            break None;
        }
        if !wrote_prefix {
            if stream.write_all(prefix).is_err() {
                break Some(t0.elapsed());
            }
            sent += prefix.len();
            wrote_prefix = true;
        } else if Instant::now() >= next_drip && !drip.is_empty() {
            if stream.write_all(&[drip[drips % drip.len()]]).is_err() {
                break Some(t0.elapsed());
            }
            drips += 1;
            sent += 1;
            next_drip += every;
        }
        let mut buf = [0u8; 4096];
        match stream.read(&mut buf) {
            Ok(0) => break Some(t0.elapsed()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break Some(t0.elapsed()),
        }
    };
    let status = parse_answers(&got, true)
        .ok()
        .and_then(|(a, _)| a.first().map(|a| a.status));
    Trickle {
        closed_after,
        status,
        bytes_sent: sent,
    }
}

#[test]
fn slowloris_heads_are_cut_off_after_keepalive() {
    let Some(server) = start(Backend::Sqlite, "slowloris", |o| {
        hostile_options(o);
        o.keepalive = KEEPALIVE;
    }) else {
        return;
    };
    warm_pools(&server);
    let pids = server.worker_pids();
    settle(&server);
    let fds_before = fd_counts(&pids);
    let socket = server.socket().to_path_buf();
    let budget = Duration::from_secs(KEEPALIVE + 1);
    let limit = Duration::from_secs(KEEPALIVE + 5);
    let drip = Duration::from_millis(100);

    // Heads that never complete, each byte well within any per-read timeout.
    let after_one: Vec<u8> = req("GET", b"/healthz", &[], b"")
        .into_iter()
        .chain(b"GET /api/notes HTTP/1.1\r\nX-Slow: ".iter().copied())
        .collect();
    let shapes: Vec<(&str, Vec<u8>, &[u8])> = vec![
        (
            "header value",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ".to_vec(),
            b"a",
        ),
        (
            "endless headers",
            b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec(),
            b"X-A: b\r\n",
        ),
        ("request line", b"G".to_vec(), b"E"),
        (
            "POST head",
            b"POST /api/notes HTTP/1.1\r\nContent-Type: application/json\r\nX-Slow: ".to_vec(),
            b"b",
        ),
        ("silent connection", Vec::new(), b""),
        ("after one request", after_one, b"c"),
        (
            "upgrade head",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nX: ".to_vec(),
            b"u",
        ),
        ("junk drip", b"\x16\x03".to_vec(), b"\x01"),
    ];
    let t0 = Instant::now();
    let trickles: Vec<(&str, Trickle)> = thread::scope(|s| {
        let handles: Vec<_> = shapes
            .iter()
            .map(|(name, prefix, byte)| {
                let socket = &socket;
                s.spawn(move || (*name, trickle(socket, prefix, byte, drip, limit)))
            })
            .collect();
        // Meanwhile, honest clients are served at once.
        thread::sleep(Duration::from_millis(500));
        for _ in 0..5 {
            let t = Instant::now();
            let r = server.get_path("/api/notes?limit=5");
            assert_eq!(r.status, 200, "{r:?}");
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "an honest request waited {:?} behind the trickles",
                t.elapsed()
            );
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("trickle thread"))
            .collect()
    });
    let mut problems = Vec::new();
    for (name, t) in &trickles {
        eprintln!(
            "HOSTILE slowloris {name}: closed_after_ms={:?} status={:?} bytes_sent={}",
            t.closed_after.map(|d| d.as_millis()),
            t.status,
            t.bytes_sent
        );
        match t.closed_after {
            None => problems.push(format!("{name}: still open after {limit:?}")),
            Some(d) if d > budget => problems.push(format!(
                "{name}: closed after {d:?}, beyond keepalive + 1 s = {budget:?}"
            )),
            Some(_) => {}
        }
        let after_request = *name == "after one request";
        match t.status {
            Some(s) if s >= 500 => problems.push(format!("{name}: answered {s}")),
            Some(s) if !after_request && !(400..500).contains(&s) => {
                problems.push(format!("{name}: answered {s} to an incomplete head"))
            }
            _ => {}
        }
    }
    eprintln!(
        "HOSTILE slowloris: keepalive={KEEPALIVE}s connections={} took_ms={} problems={}",
        trickles.len(),
        t0.elapsed().as_millis(),
        problems.len()
    );
    settle(&server);
    let fds_after = fd_counts(&pids);
    let s = server.status();
    assert_eq!(ready_pids(&s), pids, "the same workers: {s}");
    assert_eq!(s["restarts"], 0, "{s}");
    assert!(problems.is_empty(), "slowloris:\n{}", problems.join("\n"));
    assert_no_fd_leak("slowloris", &fds_before, &fds_after, POOL * 3);
}

/// A body that stalls after its head: the client's fault, so a 4xx (408) or
/// a close — not the server's 503 — within request_timeout + 1 s.
#[test]
fn a_stalled_request_body_is_refused_as_the_clients_fault() {
    const REQUEST_TIMEOUT: u64 = 2;
    let Some(server) = start(Backend::Sqlite, "slow_body", |o| {
        hostile_options(o);
        o.keepalive = KEEPALIVE;
        o.extra_toml = format!(
            "[http]\nmax_header_bytes = {MAX_HEADER}\nmax_body_bytes = {MAX_BODY}\nrequest_timeout = {REQUEST_TIMEOUT}\n"
        );
    }) else {
        return;
    };
    let pids = server.worker_pids();
    let socket = server.socket().to_path_buf();
    let budget = Duration::from_secs(REQUEST_TIMEOUT + 1);
    let limit = Duration::from_secs(REQUEST_TIMEOUT + 5);
    let shapes: Vec<(&str, Vec<u8>)> = vec![
        (
            "Content-Length body, stalled",
            post_with(&[("Content-Length", b"100")], b"{\"title\":"),
        ),
        (
            "chunked body, stalled",
            post_with(&[("Transfer-Encoding", b"chunked")], b"10\r\n{\"ti"),
        ),
    ];
    let results: Vec<(&str, Trickle)> = thread::scope(|s| {
        let hs: Vec<_> = shapes
            .iter()
            .map(|(name, bytes)| {
                let socket = &socket;
                s.spawn(move || (*name, trickle(socket, bytes, b"", Duration::ZERO, limit)))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let mut problems = Vec::new();
    for (name, t) in &results {
        eprintln!(
            "HOSTILE slow body {name}: closed_after_ms={:?} status={:?}",
            t.closed_after.map(|d| d.as_millis()),
            t.status
        );
        if let Some(s) = t.status
            && !(400..500).contains(&s)
        {
            problems.push(format!(
                "{name}: answered {s}; a client that stops sending its body is a 408 (or a close), not a {s}"
            ));
        }
        match t.closed_after {
            None => problems.push(format!("{name}: still open after {limit:?}")),
            Some(d) if d > budget && t.status.is_none() => {
                problems.push(format!("{name}: closed only after {d:?} (> {budget:?})"))
            }
            _ => {}
        }
    }
    let s = server.status();
    assert_eq!(ready_pids(&s), pids, "the same workers: {s}");
    assert_eq!(s["restarts"], 0, "{s}");
    assert!(
        problems.is_empty(),
        "stalled bodies:\n{}",
        problems.join("\n")
    );
}

/// RFC 9112 §3.2's MUST-400s, which hyper leaves to the server: an HTTP/1.1
/// request without `Host`, with two `Host` lines, or with a `Host` that is
/// not a host[:port] gets a JSON 400 with its request id, and the connection
/// is closed (the request pipelined behind it is not answered). HTTP/1.0
/// without `Host` and unusual but valid hosts are served.
#[test]
fn host_header_violations_are_400_and_close_the_connection() {
    let Some(server) = start(Backend::Sqlite, "host_rules", hostile_options) else {
        return;
    };
    let next = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let bad: &[(&str, &[u8])] = &[
        ("no Host in HTTP/1.1", b"GET /healthz HTTP/1.1\r\n\r\n"),
        ("two Host lines", b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        ("two equal Host lines", b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"),
        ("Host with a space", b"GET /healthz HTTP/1.1\r\nHost: a b\r\n\r\n"),
        ("Host with a path", b"GET /healthz HTTP/1.1\r\nHost: a/b\r\n\r\n"),
        ("Host with userinfo", b"GET /healthz HTTP/1.1\r\nHost: u@a\r\n\r\n"),
        ("Host with a bad port", b"GET /healthz HTTP/1.1\r\nHost: a:http\r\n\r\n"),
        ("Host with an open bracket", b"GET /healthz HTTP/1.1\r\nHost: [::1\r\n\r\n"),
        ("POST without Host", b"POST /api/notes HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 14\r\n\r\n{\"title\":\"h\"}"),
    ];
    for (name, bytes) in bad {
        let mut all = bytes.to_vec();
        all.extend_from_slice(next);
        let ex = exchange(server.socket_path(), &all, false, 2, None);
        let what = format!("{name}: {}", ex.outcome());
        assert_eq!(ex.statuses(), [400], "{what}");
        assert!(ex.closed, "closed after the 400: {what}");
        let answer = &ex.answers[0];
        assert!(
            answer
                .header("x-request-id")
                .is_some_and(|id| !id.is_empty()),
            "{what}: {}",
            answer.head
        );
        let body: serde_json::Value = serde_json::from_slice(&answer.body)
            .unwrap_or_else(|e| panic!("{what}: not JSON ({e})"));
        assert_eq!(body["error"]["code"], "bad_request", "{what}: {body}");
    }
    let good: &[(&str, &[u8])] = &[
        (
            "HTTP/1.0 without Host",
            b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        ),
        (
            "IPv6 literal with port",
            b"GET /healthz HTTP/1.1\r\nHost: [::1]:8000\r\n\r\n",
        ),
        ("empty Host", b"GET /healthz HTTP/1.1\r\nHost:\r\n\r\n"),
        (
            "IPv4 with port",
            b"GET /healthz HTTP/1.1\r\nHost: 10.213.0.2:8000\r\n\r\n",
        ),
    ];
    for (name, bytes) in good {
        let mut all = bytes.to_vec();
        all.extend_from_slice(next);
        let ex = exchange(server.socket_path(), &all, false, 2, None);
        assert_eq!(ex.statuses(), [200, 200], "{name}: {}", ex.outcome());
    }
    assert!(
        !server.log().contains(" ERROR "),
        "a bad Host is the client's error, not logged as ours"
    );
}
