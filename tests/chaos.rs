//! Chaos under load, the production way: a real nginx in front of the unix
//! socket (upstream keepalive, `proxy_next_upstream error timeout`, never
//! `non_idempotent`), PostgreSQL behind, and a keep-alive load of mixed
//! `GET /api/notes` and `POST /api/notes` through nginx over TCP while the
//! test reloads, recycles, kills, freezes and cuts things:
//!
//! 1. N HUPs: 0 failed requests; the generation advances by N.
//! 2. max_requests recycling: several workers retire; 0 failed requests.
//! 3. SIGKILL of a random worker, repeatedly: each replacement ready within
//!    200 ms; only requests in flight on the killed worker may fail.
//! 4. SIGSTOP of a worker (timeout = 2): killed within timeout + 1 s; the
//!    kill is logged with the request it was serving. Its deterministic core
//!    (one worker, a long request in flight while short ones come and go):
//!    the log names the long request, not "idle".
//! 5. SIGKILL of the master: no worker alive 1 s later; `serve` restarts over
//!    the stale socket and nginx recovers without a restart.
//! 6. TERM under load (no socket activation): the only failures are nginx's
//!    502s for connects after the socket path went; nothing sent is reset.
//! 7. PostgreSQL refusing connections for 10 s: 503s (no other 5xx, no hang),
//!    no worker death, the first success ≤ 2 s after it is back.
//! 8. Every test that POSTs checks that every note acknowledged with a 201
//!    is there at the end (0 lost writes).
//! 9. During the HUPs and the recycling, `/metrics` is scraped every 10 ms
//!    on the socket: no counter ever goes backwards (Prometheus would read a
//!    reset).
//!
//! Each test prints its figures (`CHAOS <name>: …`). The tests take a global
//! lock: two load tests sharing 2 cores would make the timing checks noise.
//! Without nginx or PostgreSQL they SKIP loudly, and fail under `CI`
//! (CI needs `nginx`: `apt-get install nginx`; it is started by the test on
//! 127.0.0.1 and a free port with its own prefix, never as a service).

mod common;

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::load::*;
use common::nginx::{NginxOptions, TcpClient};
use common::notes::*;
use common::*;

/// A request that starts this soon after a worker died may still be written
/// by nginx on a cached keepalive connection to it (nginx has not processed
/// the EOF yet): it counts as in flight on the dead worker.
const GRACE: Duration = Duration::from_millis(50);

/// One chaos test at a time (see the module doc).
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

/// A tiny xorshift generator, seeded from the clock (the seed is printed).
struct Rng(u64);

impl Rng {
    fn from_clock() -> Rng {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        Rng(seed)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Scrapes `/metrics` on the socket every 10 ms until stopped; every
/// counter series (`_total`, `_count`, `_bucket`, `_sum`) must only grow.
struct Scraper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: thread::JoinHandle<(usize, Vec<String>)>,
}

impl Scraper {
    fn start(socket: &std::path::Path) -> Scraper {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, socket) = (stop.clone(), socket.to_path_buf());
        let handle = thread::spawn(move || {
            let (mut scrapes, mut backwards) = (0, Vec::new());
            let mut last = Metrics::default();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let resp = Client::connect(&socket).call("GET", "/metrics", &[], None);
                if resp.status == 200 {
                    scrapes += 1;
                    let now = Metrics::parse(&resp.body);
                    backwards.extend(now.counters_below(&last));
                    last = now;
                }
                thread::sleep(Duration::from_millis(10));
            }
            (scrapes, backwards)
        });
        Scraper { stop, handle }
    }

    /// Stop; assert no counter went backwards; the number of scrapes.
    fn finish(self, what: &str) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (scrapes, backwards) = self.handle.join().expect("the scraper");
        assert!(scrapes > 50, "{what}: only {scrapes} scrapes");
        assert!(
            backwards.is_empty(),
            "{what}: {} counter(s) went backwards over {scrapes} scrapes:\n{}",
            backwards.len(),
            backwards[..backwards.len().min(20)].join("\n")
        );
        scrapes
    }
}

/// (pid, generation, boot ms) of every "worker P (generation G) ready in N ms"
/// line in `log`.
fn ready_lines(log: &str) -> Vec<(i32, u64, u64)> {
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find("worker ")? + "worker ".len()..];
            let (pid, rest) = rest.split_once(" (generation ")?;
            let (generation, rest) = rest.split_once(") ready in ")?;
            let ms = rest.split_whitespace().next()?;
            Some((
                pid.parse().ok()?,
                generation.parse().ok()?,
                ms.parse().ok()?,
            ))
        })
        .collect()
}

/// Sends `GET /debug/sleep?ms=8000` with `X-Request-Id: request_id` straight
/// to the server's socket from a thread, then waits (3 s) until a worker shows
/// it as its current request (`what`: the wait's name in a failure). Returns
/// that status and where the request's outcome arrives.
fn long_request_in_flight(
    server: &TestServer,
    request_id: &'static str,
    what: &str,
) -> (
    serde_json::Value,
    mpsc::Receiver<Result<Response, HttpError>>,
) {
    let socket = server.socket().to_path_buf();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let r =
            HttpConn::connect_with_timeout(&socket, Duration::from_secs(15)).and_then(|mut c| {
                c.request(
                    "GET",
                    "/debug/sleep?ms=8000",
                    &[("X-Request-Id", request_id)],
                )
            });
        let _ = tx.send(r);
    });
    let s = server.wait_for(what, Duration::from_secs(3), |s| {
        workers(s)
            .iter()
            .any(|w| w["current_request"]["request_id"] == request_id)
    });
    (s, rx)
}

// ---------------------------------------------------------------------------
// 1. HUPs under load
// ---------------------------------------------------------------------------

#[test]
fn hups_under_load_fail_no_request() {
    const HUPS: u64 = 8;
    let _heavy = heavy();
    let Some(rig) = rig("chaos_hup", |_| {}, NginxOptions::default()) else {
        return;
    };
    let server = &rig.server;
    let gen0 = generation(&server.status());

    let load = MixedLoad::start(rig.nginx.addr(), CONNECTIONS, "hup");
    let scraper = Scraper::start(server.socket_path());
    thread::sleep(Duration::from_millis(500));
    for _ in 0..HUPS {
        server.signal(Signal::SIGHUP);
        thread::sleep(Duration::from_millis(500));
    }
    let s = server.wait_for("the last reload to finish", Duration::from_secs(15), |s| {
        generation(s) == gen0 + HUPS && is_steady(s, 2) && all_of_current_generation(s)
    });
    thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    let scrapes = scraper.finish("hup");

    let failures = report.failures(|_| false);
    eprintln!(
        "CHAOS hup: hups={HUPS} generation={}->{} failed={} scrapes={scrapes} {} {}",
        gen0,
        generation(&s),
        failures.len(),
        report.summary(),
        nginx_figures(&rig.nginx)
    );
    assert_eq!(
        generation(&s),
        gen0 + HUPS,
        "each HUP starts a generation: {s}"
    );
    assert!(report.ok() > 100, "the load ran: {}", report.summary());
    assert!(
        failures.is_empty(),
        "{} request(s) failed across {HUPS} HUPs (0 allowed):\n{}",
        failures.len(),
        list(&failures, 20)
    );
    assert_no_lost_writes("hup", server, &report.created());
}

// ---------------------------------------------------------------------------
// 2. max_requests recycling under load
// ---------------------------------------------------------------------------

#[test]
fn max_requests_recycling_under_load_fails_no_request() {
    let _heavy = heavy();
    let Some(rig) = rig(
        "chaos_maxreq",
        |o| {
            o.max_requests = 200;
            o.max_requests_jitter = 50;
        },
        NginxOptions::default(),
    ) else {
        return;
    };
    let server = &rig.server;
    let initial: BTreeSet<i32> = server.worker_pids().into_iter().collect();

    let load = MixedLoad::start(rig.nginx.addr(), CONNECTIONS, "maxreq");
    let scraper = Scraper::start(server.socket_path());
    let mut seen = initial.clone();
    let mut generations = BTreeSet::new();
    while load.now() < Duration::from_secs(6) {
        if let Ok(s) = server.try_status() {
            generations.insert(generation(&s));
            seen.extend(all_pids(&s));
        }
        thread::sleep(Duration::from_millis(100));
    }
    let report = load.stop();
    let scrapes = scraper.finish("max_requests");
    let s = server.wait_steady(2, Duration::from_secs(15));
    let current: BTreeSet<i32> = all_pids(&s).into_iter().collect();
    seen.extend(&current);
    let retired: Vec<i32> = seen.difference(&current).copied().collect();
    let ready_logged = ready_lines(&server.log()).len();

    let failures = report.failures(|_| false);
    eprintln!(
        "CHAOS max_requests: max_requests=200+0..=50 workers_seen={} retired={} workers_ready_logged={} restarts={} failed={} scrapes={scrapes} {} {}",
        seen.len(),
        retired.len(),
        ready_logged,
        s["restarts"],
        failures.len(),
        report.summary(),
        nginx_figures(&rig.nginx)
    );
    assert!(
        retired.len() >= 3,
        "workers recycle several times under load: retired {retired:?} (seen {seen:?}, now {current:?})"
    );
    assert_eq!(
        generations.into_iter().collect::<Vec<_>>(),
        vec![1],
        "recycling is not a reload"
    );
    assert!(
        failures.is_empty(),
        "{} request(s) failed while workers recycled (0 allowed):\n{}",
        failures.len(),
        list(&failures, 20)
    );
    assert_no_lost_writes("max_requests", server, &report.created());
}

// ---------------------------------------------------------------------------
// 3. SIGKILL of random workers under load
// ---------------------------------------------------------------------------

#[test]
fn sigkilled_workers_are_replaced_fast_and_only_in_flight_requests_fail() {
    const KILLS: usize = 6;
    /// Kill → replacement ready.
    const REPLACEMENT_BUDGET: Duration = Duration::from_millis(200);

    let _heavy = heavy();
    let Some(mut rig) = rig("chaos_kill", |_| {}, NginxOptions::default()) else {
        return;
    };
    // An unexpected worker death may be logged at error level.
    rig.server.allow_errors();
    let server = &rig.server;
    let mut rng = Rng::from_clock();
    let seed = rng.0;

    let load = MixedLoad::start(rig.nginx.addr(), CONNECTIONS, "kill");
    thread::sleep(Duration::from_millis(500));
    // (victim, kill time since load start, replacement pid, kill → ready, boot ms)
    let mut kills: Vec<(i32, Duration, i32, Duration, u64)> = Vec::new();
    let mut problems = Vec::new();
    for k in 0..KILLS {
        let s = server.wait_steady(2, Duration::from_secs(5));
        let before = ready_pids(&s);
        let victim = before[rng.below(before.len())];
        let mark = server.log_len();
        let t_kill = Instant::now();
        let at = load.now();
        send_signal(victim, Signal::SIGKILL);
        // The master logs "worker P (generation G) ready in N ms" when the
        // replacement reports READY: poll the log fast.
        let mut found = None;
        while t_kill.elapsed() < Duration::from_secs(5) {
            if let Some(&(pid, _, boot)) = ready_lines(&server.log_since(mark))
                .iter()
                .find(|(pid, _, _)| !before.contains(pid))
            {
                found = Some((pid, t_kill.elapsed(), boot));
                break;
            }
            thread::sleep(Duration::from_millis(2));
        }
        let Some((new_pid, took, boot)) = found else {
            panic!("kill {k}: no replacement for worker {victim} became ready within 5 s");
        };
        eprintln!(
            "kill {k}: worker {victim} at {:.3}s → replacement {new_pid} ready after {} ms (boot {boot} ms)",
            at.as_secs_f64(),
            took.as_millis()
        );
        if took > REPLACEMENT_BUDGET {
            problems.push(format!(
                "kill {k}: replacement {new_pid} of {victim} ready after {took:?} (> {REPLACEMENT_BUDGET:?})"
            ));
        }
        kills.push((victim, at, new_pid, took, boot));
        // The replacement serves: it is a ready worker in status.
        let s = server.wait_for(
            "the replacement to show as ready",
            Duration::from_secs(3),
            |s| ready_pids(s).contains(&new_pid),
        );
        assert!(!all_pids(&s).contains(&victim), "{s}");
        let rest = Duration::from_millis(500).saturating_sub(t_kill.elapsed());
        thread::sleep(rest);
    }
    thread::sleep(Duration::from_millis(300));
    let report = load.stop();
    let s = server.wait_steady(2, Duration::from_secs(5));

    // Attribute each failure to the kill it was in flight at.
    let kill_of = |r: &Record| {
        kills
            .iter()
            .position(|(_, at, ..)| r.start <= *at + GRACE && *at <= r.end)
    };
    let failures = report.failures(|_| false);
    let mut per_kill = vec![(0usize, 0usize); KILLS];
    let mut unattributed = Vec::new();
    for r in &failures {
        match kill_of(r) {
            Some(k) if r.kind == Kind::List => per_kill[k].0 += 1,
            Some(k) => per_kill[k].1 += 1,
            None => unattributed.push(*r),
        }
    }
    let latencies: Vec<u128> = kills.iter().map(|k| k.3.as_millis()).collect();
    let boots: Vec<u64> = kills.iter().map(|k| k.4).collect();
    eprintln!(
        "CHAOS sigkill: seed={seed} kills={KILLS} replacement_ms={latencies:?} (max {}) boot_ms={boots:?} \
         failed={} per_kill_(get,post)={per_kill:?} unattributed={} restarts={} {} {}",
        latencies.iter().max().copied().unwrap_or(0),
        failures.len(),
        unattributed.len(),
        s["restarts"],
        report.summary(),
        nginx_figures(&rig.nginx)
    );
    if !failures.is_empty() {
        eprintln!("failed requests:\n{}", list(&failures, 50));
    }

    assert!(
        s["restarts"].as_u64().unwrap_or(0) >= KILLS as u64,
        "each kill counts as a restart: {s}"
    );
    for (k, (gets, posts)) in per_kill.iter().enumerate() {
        assert!(
            gets + posts <= CONNECTIONS,
            "kill {k}: {} failures, more than the {CONNECTIONS} requests that can be in flight",
            gets + posts
        );
    }
    assert!(
        unattributed.is_empty(),
        "{} request(s) failed that were not in flight at any kill:\n{}",
        unattributed.len(),
        list(&unattributed, 20)
    );
    assert!(
        problems.is_empty(),
        "slow replacements:\n{}",
        problems.join("\n")
    );
    assert_no_lost_writes("sigkill", server, &report.created());
}

// ---------------------------------------------------------------------------
// 4. SIGSTOP of a worker under load
// ---------------------------------------------------------------------------

#[test]
fn a_sigstopped_worker_is_killed_within_timeout_and_logged_with_its_request() {
    const TIMEOUT: u64 = 2;
    let _heavy = heavy();
    let Some(mut rig) = rig(
        "chaos_stop",
        |o| {
            o.timeout = TIMEOUT;
            o.debug_routes = true;
        },
        NginxOptions::default(),
    ) else {
        return;
    };
    rig.server.allow_errors();
    let server = &rig.server;
    let pids0 = server.worker_pids();

    // A request we know about, straight to the socket: the worker serving it
    // shows it in status (no other request runs yet to hide it).
    let (s, rx) = long_request_in_flight(
        server,
        "chaos-stop-1",
        "the /debug/sleep request in a worker's current_request",
    );
    let victim = workers(&s)
        .iter()
        .find(|w| w["current_request"]["request_id"] == "chaos-stop-1")
        .map(worker_pid)
        .expect("the busy worker");

    let load = MixedLoad::start(rig.nginx.addr(), CONNECTIONS, "stop");
    thread::sleep(Duration::from_millis(500));
    let mark = server.log_len();
    let t_stop = Instant::now();
    let stopped_at = load.now();
    send_signal(victim, Signal::SIGSTOP);
    let killed = poll_until(Duration::from_secs(8), || !pid_alive(victim));
    let took = t_stop.elapsed();
    assert!(killed, "SIGSTOPped worker {victim} still alive 8 s later");
    let line = server.wait_for_log_line(
        mark,
        &format!("with `worker {victim} timed out`"),
        Duration::from_secs(2),
        |l| l.contains(&format!("worker {victim} timed out")),
    );
    let s = server.wait_steady(2, Duration::from_secs(10));
    thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    let slow = rx.recv_timeout(Duration::from_secs(10));

    let failures = report.failures(|_| false);
    let in_flight = failures
        .iter()
        .filter(|r| r.start <= stopped_at + took + GRACE && r.end >= stopped_at)
        .count();
    eprintln!(
        "CHAOS sigstop: timeout={TIMEOUT}s killed_after_ms={} failed={} (in flight on the stopped worker: {in_flight}) restarts={} {} {}",
        took.as_millis(),
        failures.len(),
        s["restarts"],
        report.summary(),
        nginx_figures(&rig.nginx)
    );
    eprintln!("CHAOS sigstop: kill logged: {line}");
    if !failures.is_empty() {
        eprintln!("failed requests:\n{}", list(&failures, 20));
    }
    match slow {
        Ok(Ok(resp)) => assert_ne!(resp.status, 200, "the frozen request completed? {resp:?}"),
        Ok(Err(e)) => eprintln!("the frozen /debug/sleep request ended with {e:?} (expected)"),
        Err(_) => panic!("the frozen request's connection was not closed by the kill"),
    }

    assert!(
        took <= Duration::from_secs(TIMEOUT + 1),
        "a frozen worker must be killed within timeout + 1 s = {} s, took {took:?}",
        TIMEOUT + 1
    );
    // The kill names the request it was serving: the worker was frozen while
    // the /debug/sleep request (and maybe load requests) were in flight on it.
    let serving = ["GET /debug/sleep", "GET /api/notes", "POST /api/notes"]
        .iter()
        .find(|r| line.contains(&format!("while serving {r}")));
    assert!(
        serving.is_some(),
        "the timeout kill must name the request the worker was serving (it was serving \
         GET /debug/sleep, request id chaos-stop-1, at least), got: {line}"
    );
    assert!(
        !ready_pids(&s).contains(&victim) && pids0.iter().any(|p| ready_pids(&s).contains(p)),
        "only the frozen worker was replaced: before {pids0:?}, now {s}"
    );
    assert!(
        failures.len() == in_flight && in_flight <= CONNECTIONS,
        "only requests in flight on the frozen worker may fail (≤ {CONNECTIONS}): {} failed, {in_flight} in flight\n{}",
        failures.len(),
        list(&failures, 20)
    );
    assert_no_lost_writes("sigstop", server, &report.created());
}

/// The deterministic core of 4: one worker, a long request in flight, then
/// short requests on other connections that start and finish. Frozen now,
/// the worker is still serving the long one, and the kill must say so
/// (not "idle", not a request that already finished).
#[test]
fn a_frozen_worker_is_logged_with_the_request_still_in_flight() {
    let _heavy = heavy();
    let Some(mut server) = start(Backend::Sqlite, "chaos_oldest", |o| {
        o.workers = 1;
        o.timeout = 2;
        o.debug_routes = true;
    }) else {
        return;
    };
    server.allow_errors();
    let victim = server.worker_pids()[0];
    let (_, rx) = long_request_in_flight(
        &server,
        "chaos-long-1",
        "the long request in current_request",
    );
    // Short requests come and go on the same worker meanwhile.
    for _ in 0..3 {
        assert_eq!(server.get_path("/api/notes?limit=1").status, 200);
    }
    let mark = server.log_len();
    send_signal(victim, Signal::SIGSTOP);
    let line = server.wait_for_log_line(
        mark,
        &format!("with `worker {victim} timed out`"),
        Duration::from_secs(6),
        |l| l.contains(&format!("worker {victim} timed out")),
    );
    eprintln!("CHAOS frozen_with_long_request: kill logged: {line}");
    let _ = rx.recv_timeout(Duration::from_secs(5));
    assert!(
        line.contains("GET /debug/sleep") && line.contains("chaos-long-1"),
        "the worker was frozen while serving GET /debug/sleep (request id chaos-long-1, \
         still in flight); the timeout kill must name it, got: {line}"
    );
}

// ---------------------------------------------------------------------------
// 5. SIGKILL of the master under load
// ---------------------------------------------------------------------------

#[test]
fn a_sigkilled_master_takes_its_workers_and_restarts_over_the_stale_socket() {
    let _heavy = heavy();
    let Some(mut rig) = rig("chaos_master", |_| {}, NginxOptions::default()) else {
        return;
    };
    // Workers may rightly log their master's death as an error.
    rig.server.allow_errors();
    let pids = rig.server.worker_pids();

    let load = MixedLoad::start(rig.nginx.addr(), CONNECTIONS, "master");
    thread::sleep(Duration::from_millis(700));
    let t_kill = Instant::now();
    let killed_at = load.now();
    rig.server.kill_master();
    let all_dead = poll_until(Duration::from_secs(1), || {
        pids.iter().all(|p| !pid_alive(*p))
    });
    let dead_after = t_kill.elapsed();
    let alive: Vec<i32> = pids.iter().filter(|p| pid_alive(**p)).copied().collect();
    assert!(
        all_dead,
        "workers {alive:?} still alive 1 s after their master was SIGKILLed"
    );
    assert!(
        rig.server.socket_path().exists(),
        "the SIGKILLed master left its socket file (the premise)"
    );
    thread::sleep(Duration::from_millis(300));

    let t_restart = Instant::now();
    rig.server.restart();
    let restarted_in = t_restart.elapsed();
    let ready_at = load.now();
    // nginx (not restarted) reaches the new master's workers.
    let t_ready = Instant::now();
    let mut first_ok = None;
    while t_ready.elapsed() < Duration::from_secs(5) {
        if let Ok(mut c) = TcpClient::connect(rig.nginx.addr(), Duration::from_secs(5))
            && let Ok(r) = c.request("GET", "/api/notes?limit=1", &[], None)
            && r.status == 200
        {
            first_ok = Some(t_ready.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    thread::sleep(Duration::from_millis(1000));
    let report = load.stop();

    // While no worker existed nginx answered 502: expected. Before the kill
    // and once the new master is ready, nothing may fail.
    let down = |r: &Record| r.end >= killed_at && r.start <= ready_at;
    let failures = report.failures(down);
    let during = report.records.iter().filter(|r| down(r) && !r.ok()).count();
    eprintln!(
        "CHAOS master_kill: workers_dead_after_ms={} restart_ready_ms={} nginx_first_ok_after_ready_ms={:?} \
         failed_while_down={during} failed_otherwise={} {} {}",
        dead_after.as_millis(),
        restarted_in.as_millis(),
        first_ok.map(|d| d.as_millis()),
        failures.len(),
        report.summary(),
        nginx_figures(&rig.nginx)
    );
    let first_ok = first_ok.expect("nginx never reached the restarted server within 5 s");
    assert!(
        first_ok <= Duration::from_secs(1),
        "nginx serves again within 1 s of the restart being ready, took {first_ok:?}"
    );
    assert!(
        failures.is_empty(),
        "requests failed outside the downtime:\n{}",
        list(&failures, 20)
    );
    assert_no_lost_writes("master_kill", &rig.server, &report.created());
}

// ---------------------------------------------------------------------------
// 6. TERM of the master under load
// ---------------------------------------------------------------------------

/// A graceful stop (TERM, no socket activation) under load through nginx:
/// the socket path goes first, the workers serve what is queued and in
/// flight, then close. The only failures are nginx's 502s for connects that
/// found no socket any more ("No such file or directory"); nothing sent to
/// notesd is reset or cut short, and every 201'd note is there.
#[test]
fn term_under_load_fails_only_connects_after_the_path_is_gone() {
    let _heavy = heavy();
    let Some(mut rig) = rig(
        "chaos_term",
        |o| o.graceful_timeout = 10,
        NginxOptions::default(),
    ) else {
        return;
    };
    let load = MixedLoad::start(rig.nginx.addr(), CONNECTIONS, "term");
    thread::sleep(Duration::from_millis(1500));
    let term_at = load.now();
    rig.server.signal(Signal::SIGTERM);
    let code = rig.server.expect_exit_code(Duration::from_secs(20));
    let stopped_at = load.now();
    thread::sleep(Duration::from_millis(300));
    let report = load.stop();
    assert_eq!(code, 0, "TERM exits 0");

    let after_term = |r: &Record| r.end >= term_at && r.outcome == Ok(502);
    let failures = report.failures(after_term);
    let errors = rig.nginx.error_log_text();
    let not_connects: Vec<&str> = errors
        .lines()
        .filter(|l| l.contains("[error]") || l.contains("[crit]"))
        .filter(|l| {
            let refused =
                l.contains("connect() to unix:") && l.contains("No such file or directory");
            !refused && !l.contains("no live upstreams")
        })
        .collect();
    let refused = report.records.iter().filter(|r| after_term(r)).count();
    eprintln!(
        "CHAOS term: stop_took_ms={} refused_after_the_path_went={refused} other_failures={} {} {}",
        stopped_at.saturating_sub(term_at).as_millis(),
        failures.len(),
        report.summary(),
        nginx_figures(&rig.nginx)
    );
    assert!(
        failures.is_empty(),
        "requests failed other than by a refused connect after TERM:\n{}",
        list(&failures, 20)
    );
    assert!(
        not_connects.is_empty(),
        "nginx saw upstream failures other than the missing socket path:\n{}",
        not_connects.join("\n")
    );
    rig.server.restart();
    assert_no_lost_writes("term", &rig.server, &report.created());
}

// ---------------------------------------------------------------------------
// 7. PostgreSQL refusing connections for 10 s under load
// ---------------------------------------------------------------------------

/// `http.request_timeout` of the outage test.
const REQUEST_TIMEOUT: u64 = 3;

#[test]
fn postgres_down_for_10s_is_503_without_worker_deaths_and_recovers_in_2s() {
    let _heavy = heavy();
    let Some(rig) = rig(
        "chaos_pg",
        // The list cache off: a page cached just before the outage is (rightly)
        // served for up to `list_cache_ms`; this test watches the database path.
        |o| {
            o.extra_toml =
                format!("[http]\nrequest_timeout = {REQUEST_TIMEOUT}\nlist_cache_ms = 0\n")
        },
        NginxOptions {
            read_timeout: 10,
            ..NginxOptions::default()
        },
    ) else {
        return;
    };
    let server = &rig.server;
    let name = server.db.pg.as_ref().expect("PostgreSQL").name.clone();
    let s0 = server.status();
    let pids0 = ready_pids(&s0);
    assert_eq!(s0["restarts"], 0, "{s0}");

    let load = MixedLoad::start(rig.nginx.addr(), CONNECTIONS, "pg");
    thread::sleep(Duration::from_secs(1));
    let down_at = load.now();
    let mut outage = Refusing::start(&name);
    let down_done = load.now();
    thread::sleep(Duration::from_secs(10));
    let s_mid = server.status();
    let up_call = load.now();
    outage.restore();
    let restored_in = load.now() - up_call;
    thread::sleep(Duration::from_secs(3));
    let report = load.stop();
    let s = server.status();

    let hang = Duration::from_secs(REQUEST_TIMEOUT + 1);
    // Only 2xx and 503 are acceptable answers; transport errors never.
    let failures = report.failures(|r| matches!(r.outcome, Ok(503)));
    let hangs: Vec<&Record> = report
        .records
        .iter()
        .filter(|r| r.end.saturating_sub(r.start) > hang)
        .collect();
    // Entirely inside the outage: must not succeed (nothing can reach the database).
    let inside: Vec<&Record> = report
        .records
        .iter()
        .filter(|r| r.start >= down_done && r.end <= up_call)
        .collect();
    let inside_ok = inside.iter().filter(|r| r.ok()).count();
    let inside_503 = inside
        .iter()
        .filter(|r| matches!(r.outcome, Ok(503)))
        .count();
    // From the moment the test started re-allowing connections (psql's own
    // time included: conservative).
    let first_ok_after = report
        .records
        .iter()
        .filter(|r| r.ok() && r.end >= up_call)
        .map(|r| r.end - up_call)
        .min();
    eprintln!(
        "CHAOS pg_outage: down_for_ms={} restore_psql_ms={} requests_inside={} 503_inside={inside_503} ok_inside={inside_ok} \
         first_ok_after_back_ms={:?} failed={} hangs_over_{}s={} restarts={} {} {}",
        (up_call - down_at).as_millis(),
        restored_in.as_millis(),
        inside.len(),
        first_ok_after.map(|d| d.as_millis()),
        failures.len(),
        hang.as_secs(),
        hangs.len(),
        s["restarts"],
        report.summary(),
        nginx_figures(&rig.nginx)
    );

    assert_eq!(
        ready_pids(&s_mid),
        pids0,
        "no worker died during the outage: {s_mid}"
    );
    assert_eq!(ready_pids(&s), pids0, "same workers after the outage: {s}");
    assert_eq!(s["restarts"], 0, "no restart: {s}");
    assert!(
        failures.is_empty(),
        "only 2xx and 503 may be answered around a database outage:\n{}",
        list(&failures, 20)
    );
    assert!(
        hangs.is_empty(),
        "requests took longer than request_timeout + 1 s = {hang:?}:\n{}",
        list(&hangs, 20)
    );
    assert!(inside_503 > 0, "the outage was seen (503s while down)");
    assert_eq!(
        inside_ok, 0,
        "nothing can succeed while the database refuses connections"
    );
    let first_ok_after = first_ok_after.expect("no request succeeded after the database came back");
    assert!(
        first_ok_after <= Duration::from_secs(2),
        "the first success came {first_ok_after:?} after the database was back (≤ 2 s)"
    );
    assert_no_lost_writes("pg_outage", server, &report.created());
}
