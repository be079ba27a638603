//! PostgreSQL failover, black-box: two clusters of the test's own, a primary
//! and its synchronous standby (streaming replication, `synchronous_commit =
//! on`), and notesd (2 workers) reaching them through a proxy the test
//! switches, as a failover script or an orchestrator does.
//!
//! 1. Under a POST load, the primary is SIGKILLed (a crash), the standby
//!    promoted and the proxy switched to it: no 500 at any time (503s during
//!    the outage), 201 again within 2 s of the switch, and every note
//!    answered 201, before or after, is on the new primary with its title.
//! 2. The old primary is brought back read-only and the proxy pointed at it
//!    (a misrouted failover: a stale DNS entry, a proxy config not updated):
//!    every POST is answered 503, never 500, and nothing is written there;
//!    the proxy pointed back at the new primary: 201 within 2 s, then every
//!    POST succeeds (no pooled connection stuck on the read-only server).
//! 3. notesd logged no ERROR line (warnings for the outage are expected).
//!
//! The proxy is HAProxy in TCP mode on unix sockets, switched through its
//! runtime API (`set server … state`, `shutdown sessions server …`), rather
//! than PgBouncer and a RELOAD: the switch is one admin command, immediate
//! and complete: no new connection goes to the old server once it returns,
//! and every session on it is cut then and there, where PgBouncer keeps a
//! session-pooled server connection until its client lets go of it (and
//! notesd's pooled connections never do), waits out `server_login_retry`
//! after the failed logins of the outage, and holds clients in its queue
//! instead of refusing them. And with HAProxy, what notesd sees is what it
//! would see of the database itself: a connection closed at once while the
//! primary is down, a fresh PostgreSQL session on whichever server the proxy
//! routes to.
//!
//! Root only (the clusters run as `postgres`): CI runs as root; elsewhere it
//! SKIPs loudly. About 15 s.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::hosts::{HaProxy, PgCluster, require_root};
use common::notes::JSON;
use common::*;
use serde_json::{Value, json};

const WORKERS: u32 = 2;
/// Concurrent POST clients of the load (the machine has 2 cores).
const CLIENTS: usize = 4;
/// Serving again after the proxy is switched, at most.
const SERVE_AGAIN: Duration = Duration::from_secs(2);
/// Bound on any load, whatever happens.
const MAX_LOAD: Duration = Duration::from_secs(20);

/// One POST and its answer (`status` 0: no HTTP answer at all).
#[derive(Clone, Debug)]
struct Post {
    start: Instant,
    end: Instant,
    status: u16,
    id: Option<i64>,
    title: String,
    /// The error code of a non-201 answer, or the transport error.
    detail: String,
}

/// POST /api/notes `{"title": title}` over a fresh connection; never panics.
fn post(socket: &Path, title: &str) -> Post {
    let start = Instant::now();
    let body = json!({ "title": title }).to_string();
    let answer = HttpConn::connect(socket)
        .map_err(|e| e.to_string())
        .and_then(|mut conn| {
            conn.send_raw(&build_request(
                "POST",
                "/api/notes",
                &[JSON],
                Some(body.as_bytes()),
            ))
            .map_err(|e| format!("writing the request: {e}"))?;
            conn.read_response().map_err(|e| e.to_string())
        });
    let end = Instant::now();
    let (status, id, detail) = match answer {
        Ok(resp) => {
            let v: Value = serde_json::from_str(&resp.body).unwrap_or(Value::Null);
            let detail = v["error"]["code"]
                .as_str()
                .map_or_else(|| resp.body.chars().take(200).collect(), str::to_string);
            (resp.status, v["id"].as_i64(), detail)
        }
        Err(e) => (0, None, e),
    };
    Post {
        start,
        end,
        status,
        id,
        title: title.to_string(),
        detail,
    }
}

/// `clients` threads POSTing in a loop (each over a fresh connection) until
/// `stop` or `MAX_LOAD`; a client pauses 20 ms after a failed POST.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<Vec<Post>>>,
}

impl Load {
    fn start(socket: &Path, clients: usize, tag: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + MAX_LOAD;
        let threads = (0..clients)
            .map(|c| {
                let stop = Arc::clone(&stop);
                let socket: PathBuf = socket.to_path_buf();
                let tag = format!("{tag} c{c}");
                thread::spawn(move || {
                    let mut posts = Vec::new();
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let p = post(&socket, &format!("{tag} #{}", posts.len()));
                        let failed = p.status != 201;
                        posts.push(p);
                        if failed {
                            thread::sleep(Duration::from_millis(20));
                        }
                    }
                    posts
                })
            })
            .collect();
        Load { stop, threads }
    }

    /// Stops the clients; every POST, in order of their start.
    fn stop(self) -> Vec<Post> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all: Vec<Post> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().expect("a POST client"))
            .collect();
        all.sort_by_key(|p| p.start);
        all
    }

    /// `clients` threads POSTing for `dur`.
    fn run(socket: &Path, clients: usize, tag: &str, dur: Duration) -> Vec<Post> {
        let load = Load::start(socket, clients, tag);
        thread::sleep(dur);
        load.stop()
    }
}

/// "N×201 M×503 (database_unavailable: M)".
fn summary(posts: &[Post]) -> String {
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut details: BTreeMap<&str, usize> = BTreeMap::new();
    for p in posts {
        *statuses.entry(p.status).or_default() += 1;
        if p.status != 201 {
            *details.entry(p.detail.as_str()).or_default() += 1;
        }
    }
    let statuses: Vec<String> = statuses.iter().map(|(s, n)| format!("{n}×{s}")).collect();
    format!("{} {details:?}", statuses.join(" "))
}

/// No 500 (nor any answer but `allowed`, nor a POST without an answer).
#[track_caller]
fn assert_only(posts: &[Post], allowed: &[u16], what: &str) {
    let five_hundreds: Vec<&Post> = posts.iter().filter(|p| p.status == 500).collect();
    assert!(
        five_hundreds.is_empty(),
        "{what}: {} POST(s) answered 500, e.g. {:?}",
        five_hundreds.len(),
        five_hundreds.first()
    );
    let other: Vec<&Post> = posts
        .iter()
        .filter(|p| !allowed.contains(&p.status))
        .collect();
    assert!(
        other.is_empty(),
        "{what}: {} POST(s) answered other than {allowed:?}, e.g. {:?}",
        other.len(),
        &other[..other.len().min(5)]
    );
}

/// Every note of `cluster`: id → title.
fn notes_on(cluster: &PgCluster) -> BTreeMap<i64, String> {
    cluster
        .sql("notesd", "SELECT id, title FROM notes")
        .lines()
        .filter_map(|l| {
            let (id, title) = l.split_once('|')?;
            Some((id.trim().parse().ok()?, title.to_string()))
        })
        .collect()
}

/// Every POST answered 201 is on `cluster`, under its id, with its title.
#[track_caller]
fn assert_all_there(cluster: &PgCluster, posts: &[Post], what: &str) -> usize {
    let there = notes_on(cluster);
    let mut missing = Vec::new();
    let mut ids = BTreeSet::new();
    for p in posts.iter().filter(|p| p.status == 201) {
        let id =
            p.id.unwrap_or_else(|| panic!("{what}: a 201 without an id: {p:?}"));
        assert!(ids.insert(id), "{what}: id {id} answered twice");
        if there.get(&id) != Some(&p.title) {
            missing.push(format!("{id} {:?} (there: {:?})", p.title, there.get(&id)));
        }
    }
    assert!(
        missing.is_empty(),
        "{what}: {} of {} note(s) answered 201 are not on the new primary: {:?}",
        missing.len(),
        ids.len(),
        &missing[..missing.len().min(10)]
    );
    ids.len()
}

/// The first POST started at or after `since` answered 201: how long after
/// `since` its answer came.
fn first_201_after(posts: &[Post], since: Instant) -> Option<Duration> {
    posts
        .iter()
        .filter(|p| p.start >= since && p.status == 201)
        .map(|p| p.end - since)
        .min()
}

#[test]
fn a_crashed_primary_is_failed_over_without_a_lost_note_or_a_500() {
    if !require_root("the failover test") {
        return;
    }
    let t0 = Instant::now();
    let Some(primary) = PgCluster::start_primary("fo_primary") else {
        return;
    };
    primary.sql("postgres", "CREATE DATABASE notesd");
    let Some(standby) = PgCluster::start_standby(&primary, "fo_standby") else {
        return;
    };
    let Some(proxy) = HaProxy::start("failover", &[("a", &primary), ("b", &standby)]) else {
        return;
    };
    let url = proxy.url("notesd");
    let mut migrate = notesd_cmd(["migrate"]);
    migrate.env("NOTESD_DATABASE_URL", &url);
    let out = run_with_timeout(migrate, Duration::from_secs(30));
    assert_eq!(out.code, Some(0), "notesd migrate: {}", out.describe());
    let server = TestServer::start(
        "failover",
        TestOptions {
            workers: WORKERS,
            database_url: Some(url),
            migrate_on_start: false,
            // Bounds every query, should anything hang.
            database_extra: "statement_timeout_ms = 2000".into(),
            ..TestOptions::default()
        },
    );
    let socket = server.socket_path().to_path_buf();
    eprintln!(
        "FAILOVER setup: primary + synchronous standby, HAProxy, notesd in {:?}",
        t0.elapsed()
    );

    // 1. The primary crashes under a POST load; the standby takes over. ----
    let load = Load::start(&socket, CLIENTS, "load");
    thread::sleep(Duration::from_millis(1500));
    let crashing = Instant::now();
    primary.crash();
    // Every process of the old primary is dead from here on.
    let crashed = Instant::now();
    standby.promote();
    let promoted = crashed.elapsed();
    let switching = Instant::now();
    proxy.route_to("b");
    let switched = Instant::now();
    thread::sleep(Duration::from_millis(2500));
    let posts = load.stop();
    // In flight at the crash: answered 201 (committed and replicated before
    // the kill) or 503 (connection cut), either way. Sent and answered
    // while the primary was dead and the proxy still routed to it: 503.
    let before: Vec<Post> = posts
        .iter()
        .filter(|p| p.start < crashed)
        .cloned()
        .collect();
    let outage: Vec<Post> = posts
        .iter()
        .filter(|p| p.start >= crashed && p.end < switching)
        .cloned()
        .collect();
    let after: Vec<Post> = posts
        .iter()
        .filter(|p| p.start >= switched)
        .cloned()
        .collect();
    let serving_again = first_201_after(&posts, switched);
    let slowest = posts.iter().map(|p| p.end - p.start).max();
    eprintln!(
        "FAILOVER crash: {} POSTs; started before the primary was dead (SIGKILL took {:?}) {}; \
         then until the switch ({:?}, promoted in {promoted:?}) {}; after the switch {}; \
         first 201 {serving_again:?} after the switch; slowest answer {slowest:?}",
        posts.len(),
        crashed - crashing,
        summary(&before),
        switched - crashed,
        summary(&outage),
        summary(&after),
    );
    assert_only(&posts, &[201, 503], "through the failover");
    assert_only(
        &outage,
        &[503],
        "the primary dead, the proxy not switched yet",
    );
    assert!(
        before.iter().filter(|p| p.status == 201).count() > 0,
        "no note created before the crash: {}",
        summary(&before)
    );
    assert!(
        serving_again.is_some_and(|d| d <= SERVE_AGAIN),
        "notesd answered 201 {serving_again:?} after the switch to the new primary (≤ {SERVE_AGAIN:?})"
    );
    let verified = assert_all_there(&standby, &posts, "after the failover");
    eprintln!("FAILOVER crash: all {verified} notes answered 201 are on the new primary");

    // 2. The old primary back read-only, and the proxy misrouted to it. ----
    primary.start_read_only();
    let stale = notes_on(&primary);
    let stale_before = stale.len();
    // Committed on the old primary, not acknowledged: a 503 does not say
    // that nothing was written.
    let acked: BTreeSet<i64> = posts.iter().filter_map(|p| p.id).collect();
    let new_primary = notes_on(&standby);
    let unacked: Vec<i64> = stale
        .keys()
        .filter(|id| !acked.contains(id))
        .copied()
        .collect();
    eprintln!(
        "FAILOVER old primary back read-only: {stale_before} notes, {} of them not answered 201 \
         ({} of those on the new primary too)",
        unacked.len(),
        unacked
            .iter()
            .filter(|id| new_primary.contains_key(id))
            .count()
    );
    proxy.route_to("a");
    let misrouted = Load::run(&socket, 2, "stale", Duration::from_millis(1000));
    let stale_after = notes_on(&primary).len();
    eprintln!(
        "FAILOVER misrouted to the old primary (read-only): {}; notes there {stale_before} → {stale_after}",
        summary(&misrouted)
    );
    assert!(!misrouted.is_empty());
    assert_only(&misrouted, &[503], "misrouted to the read-only old primary");
    assert_eq!(
        stale_before, stale_after,
        "nothing is written on the read-only old primary"
    );

    proxy.route_to("b");
    let back = Instant::now();
    let mut first = None;
    let mut probes = Vec::new();
    while first.is_none() && back.elapsed() < Duration::from_secs(5) {
        let p = post(&socket, &format!("probe #{}", probes.len()));
        if p.status == 201 {
            first = Some(p.end - back);
        } else {
            thread::sleep(Duration::from_millis(20));
        }
        probes.push(p);
    }
    let settled = Load::run(&socket, CLIENTS, "settled", Duration::from_millis(1500));
    eprintln!(
        "FAILOVER routed back to the new primary: first 201 {first:?} after the switch ({}); then {}",
        summary(&probes),
        summary(&settled)
    );
    assert_only(&probes, &[201, 503], "routed back to the new primary");
    assert!(
        first.is_some_and(|d| d <= SERVE_AGAIN),
        "notesd answered 201 {first:?} after the switch back to the new primary (≤ {SERVE_AGAIN:?})"
    );
    assert!(!settled.is_empty());
    assert_only(&settled, &[201], "once routed back to the new primary");
    let verified_after = assert_all_there(
        &standby,
        &probes.iter().chain(&settled).cloned().collect::<Vec<_>>(),
        "routed back",
    );

    // 3. notesd's log: warnings for the outage, no ERROR. ------------------
    let log = server.log();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    let warnings = log.lines().filter(|l| l.contains(" WARN ")).count();
    eprintln!(
        "FAILOVER done in {:?}: {verified} + {verified_after} notes verified on the new primary; \
         notesd log: {warnings} WARN, {} ERROR line(s)",
        t0.elapsed(),
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "notesd logged {} ERROR line(s), e.g.:\n{}",
        errors.len(),
        errors[..errors.len().min(10)].join("\n")
    );
}
