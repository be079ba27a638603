//! The master's process model, end to end: boot, reload (HUP), scaling
//! (TTIN/TTOU), supervision (dead, stopped and blocked workers), recycling
//! (max_requests), shutdown (TERM, INT, master death), the listening socket's
//! life (stale, live), boot failures, `status` and `healthcheck`.
//!
//! Each test spawns the real binary with its own temp dir; see tests/common.

mod common;

use std::collections::BTreeSet;
use std::os::unix::net::UnixListener;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn opts() -> TestOptions {
    TestOptions::default()
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

// 1 -------------------------------------------------------------------------

#[test]
fn boots_three_workers_and_serves_hello() {
    let server = TestServer::start(
        "boot3",
        TestOptions {
            workers: 3,
            ..opts()
        },
    );
    let status = server.status();
    assert_eq!(generation(&status), 1, "first generation: {status}");
    assert_eq!(status["target_workers"], 3, "{status}");
    let pids = ready_pids(&status);
    assert_eq!(pids.len(), 3, "3 ready workers: {status}");
    let distinct: BTreeSet<i32> = pids.iter().copied().collect();
    assert_eq!(distinct.len(), 3, "distinct worker pids: {status}");
    for w in workers(&status) {
        assert_eq!(w["generation"], 1, "worker of generation 1: {w}");
    }
    // Prefork: the workers are the master's children.
    let children = children_of(server.master_pid());
    for pid in &pids {
        assert!(
            children.contains(pid),
            "worker {pid} is not a child of the master {} (children: {children:?})",
            server.master_pid()
        );
    }

    let resp = server.get("/");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json(), json!({"message": "Hello, production!"}));
    let len: usize = resp
        .header("content-length")
        .expect("Content-Length header")
        .parse()
        .expect("numeric Content-Length");
    assert_eq!(len, resp.body.len(), "Content-Length matches the body");
    let id = resp.header("x-request-id").expect("X-Request-Id header");
    assert!(!id.trim().is_empty(), "X-Request-Id is not empty");

    let resp = server.request("GET", "/", &[("X-Request-Id", "abc-123")]);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        resp.header("x-request-id"),
        Some("abc-123"),
        "a sane incoming X-Request-Id is echoed: {resp:?}"
    );

    let resp = server.get("/healthz");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json(), json!({"ok": true}));

    // Workers batch their wake-ups (SCHED_BATCH); the master does not.
    for pid in &pids {
        assert_eq!(sched_policy(*pid), 3, "worker {pid} runs under SCHED_BATCH");
    }
    assert_eq!(
        sched_policy(server.master_pid()),
        0,
        "the master: SCHED_OTHER"
    );
}

/// A process's scheduling policy: field 41 of /proc/PID/stat (0 SCHED_OTHER,
/// 3 SCHED_BATCH).
fn sched_policy(pid: i32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // After the command name's closing parenthesis: field 3 onwards.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    rest.split(' ')
        .nth(41 - 3)
        .and_then(|f| f.parse().ok())
        .expect("policy field")
}

// 2 -------------------------------------------------------------------------

#[test]
fn hup_under_keepalive_load_drops_no_request() {
    let server = TestServer::start("hup_load", opts());
    let s0 = server.status();
    let gen0 = generation(&s0);
    let pids0 = ready_pids(&s0);

    let load = server.load(8, "/");
    let t0 = Instant::now();
    thread::sleep(Duration::from_millis(500));

    server.signal(Signal::SIGHUP);
    let s1 = server.wait_for(
        "the first reload to finish (new generation, 2 ready workers)",
        Duration::from_secs(20),
        |s| generation(s) > gen0 && is_steady(s, 2) && all_of_current_generation(s),
    );
    let gen1 = generation(&s1);
    let pids1 = ready_pids(&s1);
    thread::sleep(Duration::from_millis(500));

    server.signal(Signal::SIGHUP);
    let s2 = server.wait_for(
        "the second reload to finish (new generation, 2 ready workers)",
        Duration::from_secs(20),
        |s| generation(s) > gen1 && is_steady(s, 2) && all_of_current_generation(s),
    );
    let pids2 = ready_pids(&s2);

    let rest = Duration::from_secs(4).saturating_sub(t0.elapsed());
    thread::sleep(rest);
    let stats = load.stop();
    eprintln!("load during 2 HUPs: {stats:?}");

    assert_eq!(
        stats.failed, 0,
        "no request may fail across a HUP: {stats:?}"
    );
    assert!(stats.ok > 0, "the load ran: {stats:?}");
    assert_eq!(pids2.len(), 2, "same worker count: {s2}");
    for pid in &pids2 {
        assert!(
            !pids0.contains(pid) && !pids1.contains(pid),
            "worker {pid} survived a reload (before: {pids0:?}, after 1st: {pids1:?}, after 2nd: {pids2:?})"
        );
    }
    // The old generations exit once drained.
    let old: Vec<i32> = pids0.iter().chain(&pids1).copied().collect();
    assert!(
        poll_until(Duration::from_secs(7), || old
            .iter()
            .all(|p| !pid_alive(*p))),
        "old workers still alive: {:?}",
        old.iter().filter(|p| pid_alive(**p)).collect::<Vec<_>>()
    );
    assert_eq!(server.get("/").status, 200);
}

// 3 -------------------------------------------------------------------------

#[test]
fn hup_with_invalid_config_keeps_serving_then_reloads_when_fixed() {
    let mut server = TestServer::start("hup_bad", opts());
    // A rejected reload may well be logged at error level.
    server.allow_errors();
    let s0 = server.status();
    let gen0 = generation(&s0);
    let pids0 = ready_pids(&s0);
    let valid = server.config_text();

    let bad_configs = [
        (
            "an unknown key",
            valid.replacen("[server]\n", "[server]\nreload_bogus_key = 1\n", 1),
            "reload_bogus_key",
        ),
        (
            "workers = \"many\"",
            valid.replacen("workers = 2\n", "workers = \"many\"\n", 1),
            "workers",
        ),
    ];
    for (what, text, needle) in bad_configs {
        assert_ne!(text, valid, "the test did change the config ({what})");
        let mark = server.log_len();
        server.write_raw_config(&text);
        server.signal(Signal::SIGHUP);
        let line = server.wait_for_log_line(
            mark,
            &format!("mentioning {needle:?} after a HUP with {what}"),
            Duration::from_secs(5),
            |l| l.contains(needle),
        );
        eprintln!("rejected reload logged: {line}");
        // Give a (wrong) reload time to show, then check nothing changed.
        thread::sleep(Duration::from_millis(700));
        let s = server.wait_steady(2, Duration::from_secs(5));
        assert_eq!(
            generation(&s),
            gen0,
            "a bad config must not start a generation ({what}): {s}"
        );
        assert_eq!(
            ready_pids(&s),
            pids0,
            "a bad config must not replace workers ({what}): {s}"
        );
        assert_eq!(server.get("/").status, 200, "still serving ({what})");
        assert!(
            server.try_exit_status().is_none(),
            "the master must survive a bad config ({what})"
        );
    }

    server.write_raw_config(&valid);
    server.signal(Signal::SIGHUP);
    let s = server.wait_for(
        "a reload with the fixed config",
        Duration::from_secs(20),
        |s| generation(s) > gen0 && is_steady(s, 2) && all_of_current_generation(s),
    );
    for pid in ready_pids(&s) {
        assert!(!pids0.contains(&pid), "worker {pid} not replaced: {s}");
    }
    assert_eq!(server.get("/").status, 200);
}

// 4 -------------------------------------------------------------------------

#[test]
fn hup_applies_a_new_worker_count() {
    let mut server = TestServer::start("hup_count", opts());
    let s0 = server.status();
    let gen0 = generation(&s0);
    let pids0 = ready_pids(&s0);

    server.opts.workers = 4;
    server.write_config();
    server.signal(Signal::SIGHUP);
    let s = server.wait_for(
        "4 ready workers of a new generation",
        Duration::from_secs(20),
        |s| generation(s) > gen0 && is_steady(s, 4) && all_of_current_generation(s),
    );
    let pids = ready_pids(&s);
    assert_eq!(pids.len(), 4, "{s}");
    for pid in &pids {
        assert!(!pids0.contains(pid), "worker {pid} not replaced: {s}");
    }
    assert_eq!(server.get("/").status, 200);
}

// 5 -------------------------------------------------------------------------

#[test]
fn ttin_adds_a_worker_and_ttou_removes_one() {
    let server = TestServer::start("ttin_ttou", opts());
    let s0 = server.status();
    let gen0 = generation(&s0);
    let pids0 = ready_pids(&s0);

    server.signal(Signal::SIGTTIN);
    let s1 = server.wait_steady(3, Duration::from_secs(10));
    let pids1 = ready_pids(&s1);
    assert_eq!(generation(&s1), gen0, "TTIN is not a reload: {s1}");
    for pid in &pids0 {
        assert!(pids1.contains(pid), "TTIN must keep worker {pid}: {s1}");
    }

    server.signal(Signal::SIGTTOU);
    let s2 = server.wait_steady(2, Duration::from_secs(10));
    let pids2 = ready_pids(&s2);
    assert_eq!(generation(&s2), gen0, "TTOU is not a reload: {s2}");
    for pid in &pids2 {
        assert!(
            pids1.contains(pid),
            "TTOU must not start worker {pid}: {s2}"
        );
    }
    let removed: Vec<i32> = pids1
        .iter()
        .filter(|p| !pids2.contains(p))
        .copied()
        .collect();
    assert_eq!(removed.len(), 1, "exactly one worker removed: {s2}");
    assert!(
        poll_until(Duration::from_secs(7), || !pid_alive(removed[0])),
        "the worker removed by TTOU ({}) exits",
        removed[0]
    );

    // USR1 (reopen logs) changes nothing else.
    server.signal(Signal::SIGUSR1);
    thread::sleep(Duration::from_millis(300));
    let s3 = server.wait_steady(2, Duration::from_secs(5));
    assert_eq!(ready_pids(&s3), pids2, "USR1 keeps the workers: {s3}");
    assert_eq!(server.get("/healthz").status, 200);
}

// 6 -------------------------------------------------------------------------

#[test]
fn a_killed_worker_is_replaced() {
    let mut server = TestServer::start("kill_worker", opts());
    // An unexpected worker death may be logged at error level.
    server.allow_errors();
    let pids0 = server.worker_pids();
    let victim = pids0[0];
    let survivor = pids0[1];

    send_signal(victim, Signal::SIGKILL);
    let t0 = Instant::now();
    let s = server.wait_for(
        "the killed worker to be replaced",
        Duration::from_secs(3),
        |s| {
            !all_pids(s).contains(&victim)
                && is_steady(s, 2)
                && s["restarts"].as_u64().is_some_and(|r| r >= 1)
        },
    );
    eprintln!("replaced after {:?}", t0.elapsed());
    let pids = ready_pids(&s);
    assert!(
        pids.contains(&survivor),
        "the other worker is untouched: {s}"
    );
    assert!(!pids.contains(&victim), "{s}");
    assert_eq!(server.get("/").status, 200);
}

// 7 -------------------------------------------------------------------------

#[test]
fn a_stopped_worker_is_killed_after_timeout() {
    let mut server = TestServer::start(
        "timeout_stop",
        TestOptions {
            timeout: 2,
            ..opts()
        },
    );
    server.allow_errors();
    let pids0 = server.worker_pids();
    let victim = pids0[0];

    send_signal(victim, Signal::SIGSTOP);
    let t0 = Instant::now();
    let gone = server.try_wait_for(Duration::from_secs(6), |s| {
        !all_pids(s).contains(&victim) && !pid_alive(victim)
    });
    let elapsed = t0.elapsed();
    if let Err(last) = &gone {
        panic!("stopped worker {victim} not killed within 6 s; last status: {last}");
    }
    eprintln!("stopped worker killed after {elapsed:?}");
    assert!(
        elapsed <= secs(3.5),
        "a worker silent for timeout (2 s) must be killed within ~3 s, took {elapsed:?}"
    );

    let s = server.wait_steady(2, Duration::from_secs(10));
    assert!(!all_pids(&s).contains(&victim), "{s}");
    assert!(
        ready_pids(&s).contains(&pids0[1]),
        "the healthy worker is untouched: {s}"
    );
    assert_eq!(server.get("/").status, 200);
}

/// D4: a worker started to replace a dead one is supervised like the
/// others. (Its scoreboard slot was once cleared right after it was spawned
/// into it, so its heartbeat was never seen and it was never timed out.)
#[test]
fn a_replacement_worker_and_an_original_both_stopped_are_both_killed_after_timeout() {
    let mut server = TestServer::start(
        "timeout_replacement",
        TestOptions {
            timeout: 2,
            ..opts()
        },
    );
    server.allow_errors();
    let pids0 = server.worker_pids();
    let (dead, original) = (pids0[0], pids0[1]);
    send_signal(dead, Signal::SIGKILL);
    let s = server.wait_for("the killed worker's replacement", secs(5.0), |s| {
        !all_pids(s).contains(&dead) && is_steady(s, 2)
    });
    let replacement = ready_pids(&s)
        .into_iter()
        .find(|p| !pids0.contains(p))
        .unwrap_or_else(|| panic!("no new worker: {s}"));
    let w = workers(&s)
        .into_iter()
        .find(|w| worker_pid(w) == replacement)
        .unwrap_or_else(|| panic!("replacement {replacement} missing: {s}"));
    assert!(
        w["last_heartbeat_s"].as_f64().is_some_and(|b| b < 2.0),
        "the replacement's heartbeat is recent: {w}"
    );

    send_signal(replacement, Signal::SIGSTOP);
    send_signal(original, Signal::SIGSTOP);
    let t0 = Instant::now();
    let gone = server.try_wait_for(secs(8.0), |s| {
        let pids = all_pids(s);
        !pids.contains(&replacement)
            && !pids.contains(&original)
            && !pid_alive(replacement)
            && !pid_alive(original)
    });
    let elapsed = t0.elapsed();
    if let Err(last) = &gone {
        panic!(
            "stopped workers {replacement} (replacement) and {original} not both killed within 8 s; last status: {last}"
        );
    }
    eprintln!("both stopped workers killed after {elapsed:?}");
    assert!(
        elapsed <= secs(3.5),
        "workers silent for timeout (2 s) must be killed within ~3 s, took {elapsed:?}"
    );
    let s = server.wait_steady(2, secs(10.0));
    for pid in [dead, replacement, original] {
        assert!(!all_pids(&s).contains(&pid), "{pid} still listed: {s}");
    }
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn a_blocked_worker_is_killed_and_its_request_logged() {
    let mut server = TestServer::start(
        "timeout_block",
        TestOptions {
            timeout: 2,
            ..opts()
        },
    );
    server.allow_errors();
    let pids0 = server.worker_pids();

    let socket = server.socket_path().to_path_buf();
    let (tx, rx) = mpsc::channel();
    let t0 = Instant::now();
    thread::spawn(move || {
        let result = HttpConn::connect_with_timeout(&socket, Duration::from_secs(15))
            .and_then(|mut c| c.request("GET", "/debug/block?ms=10000", &[]));
        let _ = tx.send(result);
    });

    let s = server.wait_for(
        "the blocked worker to be killed",
        Duration::from_secs(8),
        |s| {
            let now = all_pids(s);
            pids0.iter().any(|p| !now.contains(p))
        },
    );
    let elapsed = t0.elapsed();
    let now = all_pids(&s);
    let victims: Vec<i32> = pids0.iter().filter(|p| !now.contains(p)).copied().collect();
    eprintln!("blocked worker(s) {victims:?} killed after {elapsed:?}");
    assert_eq!(victims.len(), 1, "only the blocked worker dies: {s}");
    assert!(
        elapsed <= secs(4.0),
        "a worker blocked for 10 s with timeout = 2 must be killed within ~3 s, took {elapsed:?}"
    );

    let line = server.wait_for_log_line(
        0,
        "containing `timed out`, GET and /debug/block",
        Duration::from_secs(3),
        |l| l.contains("timed out") && l.contains("/debug/block") && l.contains("GET"),
    );
    eprintln!("timeout logged: {line}");

    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(resp)) => assert_ne!(
            resp.status, 200,
            "the blocked request cannot have completed: {resp:?}"
        ),
        Ok(Err(e)) => eprintln!("blocked request ended with {e:?} (expected)"),
        Err(_) => panic!("the blocked request's connection was not closed by the kill"),
    }

    let s = server.wait_steady(2, Duration::from_secs(10));
    assert!(!all_pids(&s).contains(&victims[0]), "{s}");
    assert!(!pid_alive(victims[0]), "the blocked worker is dead");
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn a_stopped_master_does_not_kill_healthy_workers_when_continued() {
    let server = TestServer::start(
        "master_stop",
        TestOptions {
            timeout: 2,
            ..opts()
        },
    );
    let s0 = server.status();
    let pids0 = ready_pids(&s0);

    server.signal(Signal::SIGSTOP);
    thread::sleep(Duration::from_secs(3));
    server.signal(Signal::SIGCONT);
    thread::sleep(Duration::from_millis(1500));

    let s = server.wait_steady(2, Duration::from_secs(5));
    assert_eq!(
        ready_pids(&s),
        pids0,
        "healthy workers must survive their master being stopped for > timeout: {s}"
    );
    assert_eq!(s["restarts"], s0["restarts"], "{s}");
    assert_eq!(server.get("/").status, 200);
}

// 8 -------------------------------------------------------------------------

#[test]
fn max_requests_recycles_workers_without_failures() {
    let server = TestServer::start(
        "max_requests",
        TestOptions {
            max_requests: 50,
            max_requests_jitter: 10,
            ..opts()
        },
    );
    let s0 = server.status();
    assert_eq!(generation(&s0), 1);

    let load = server.load(4, "/");
    let t0 = Instant::now();
    let mut seen = BTreeSet::new();
    let mut generations = BTreeSet::new();
    while t0.elapsed() < Duration::from_secs(4) {
        if let Ok(s) = server.try_status() {
            generations.insert(generation(&s));
            seen.extend(all_pids(&s));
        }
        thread::sleep(Duration::from_millis(100));
    }
    let stats = load.stop();
    eprintln!("load with max_requests = 50: {stats:?}");

    let s = server.wait_steady(2, Duration::from_secs(15));
    let current = all_pids(&s);
    let retired: Vec<i32> = seen
        .iter()
        .filter(|p| !current.contains(p))
        .copied()
        .collect();
    eprintln!("seen {} worker pids, {} retired", seen.len(), retired.len());

    assert_eq!(
        stats.failed, 0,
        "recycling must not fail requests: {stats:?}"
    );
    assert!(
        stats.ok >= 180,
        "enough requests to recycle 3 workers: {stats:?}"
    );
    assert!(
        retired.len() >= 3,
        "at least 3 workers retired, saw {retired:?} (all seen: {seen:?}, now: {current:?})"
    );
    assert_eq!(
        generations.into_iter().collect::<Vec<_>>(),
        vec![1],
        "recycling is not a reload: the generation stays 1"
    );
    assert_eq!(generation(&s), 1, "{s}");
    assert!(
        workers(&s).iter().all(|w| w["generation"] == 1),
        "replacements belong to generation 1: {s}"
    );
}

// 9 -------------------------------------------------------------------------

#[test]
fn term_drains_the_in_flight_request_then_exits_0() {
    let mut server = TestServer::start("term_drain", opts());
    let socket = server.socket_path().to_path_buf();
    let pidfile = server.paths.pidfile.clone();
    assert!(pidfile.exists(), "the pidfile is written");

    let mut conn = HttpConn::connect(&socket).expect("connect");
    conn.send("GET", "/debug/sleep?ms=1500", &[])
        .expect("send the slow request");
    // Make sure it is in flight (status shows it, if it can) before TERM.
    let seen = server.try_wait_for(Duration::from_millis(700), |s| {
        workers(s).iter().any(|w| {
            w["current_request"]["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/debug/sleep"))
        })
    });
    if seen.is_err() {
        eprintln!("(status never showed the in-flight request; sending TERM anyway)");
    }

    let t0 = Instant::now();
    server.signal(Signal::SIGTERM);
    let resp = conn
        .read_response()
        .unwrap_or_else(|e| panic!("the in-flight request must complete: {e:?}"));
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json(), json!({"slept_ms": 1500}));
    assert!(
        resp.connection_close(),
        "a response drained at shutdown carries Connection: close: {resp:?}"
    );

    let budget = Duration::from_secs(server.opts.graceful_timeout + 2);
    let code = server.expect_exit_code(budget.saturating_sub(t0.elapsed()));
    assert_eq!(code, 0, "TERM exits 0");
    assert!(t0.elapsed() <= budget, "took {:?}", t0.elapsed());
    assert!(!socket.exists(), "the socket file is unlinked on exit");
    assert!(!pidfile.exists(), "the pidfile is removed on exit");
}

// 10 ------------------------------------------------------------------------

#[test]
fn workers_die_with_a_sigkilled_master() {
    let mut server = TestServer::start("master_kill", opts());
    // Workers may rightly log their master's death as an error.
    server.allow_errors();
    let pids = server.worker_pids();
    server.kill_master();
    let t0 = Instant::now();
    let all_dead = poll_until(secs(1.5), || pids.iter().all(|p| !pid_alive(*p)));
    let alive: Vec<i32> = pids.iter().filter(|p| pid_alive(**p)).copied().collect();
    assert!(
        all_dead,
        "workers {alive:?} still alive {:?} after their master was SIGKILLed",
        t0.elapsed()
    );
}

// 11 ------------------------------------------------------------------------

#[test]
fn starts_over_a_stale_socket_file() {
    let mut server = TestServer::start("stale_sock", opts());
    // Workers may rightly log their master's death as an error; the log of the
    // second start is checked below.
    server.allow_errors();
    let pids = server.worker_pids();
    server.kill_master();
    assert!(
        poll_until(Duration::from_secs(3), || pids
            .iter()
            .all(|p| !pid_alive(*p))),
        "workers die with their master"
    );
    assert!(
        server.socket_path().exists(),
        "a SIGKILLed master leaves its socket file behind (the premise of this test)"
    );

    let mark = server.log_len();
    server.restart();
    let resp = server.get("/");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json(), json!({"message": "Hello, production!"}));
    let log = server.log_since(mark);
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains("panicked"))
        .collect();
    assert!(
        bad.is_empty(),
        "a stale socket is routine, not an error: {bad:#?}"
    );
}

// 12 ------------------------------------------------------------------------

#[test]
fn a_second_serve_on_a_live_socket_exits_2() {
    let server = TestServer::start("live_sock", opts());
    let pids0 = server.worker_pids();

    // Same bind address; its own control socket and pidfile, so the only
    // conflict is the live listening socket.
    let dir = server.dir();
    let paths = ServerPaths {
        config: dir.join("second.toml"),
        control: dir.join("control2.sock"),
        pidfile: dir.join("second.pid"),
        log: dir.join("second.log"),
        ..server.paths.clone()
    };
    std::fs::write(&paths.config, render_config(&paths, &server.opts)).expect("write config");
    let config = paths.config.display().to_string();
    let out = run_with_timeout(
        notesd_cmd(["serve", "-c", config.as_str()]),
        Duration::from_secs(5),
    );
    assert_eq!(
        out.code,
        Some(2),
        "a second serve on a live socket exits 2 within 5 s: {}",
        out.describe()
    );
    assert!(
        out.stderr.contains("already"),
        "stderr explains the socket is already served: {}",
        out.describe()
    );

    assert!(
        server.socket_path().exists(),
        "the live socket is untouched"
    );
    assert_eq!(server.get("/healthz").status, 200, "the first still serves");
    let s = server.wait_steady(2, Duration::from_secs(5));
    assert_eq!(ready_pids(&s), pids0, "the first keeps its workers: {s}");
}

// 13 ------------------------------------------------------------------------

#[test]
fn workers_that_cannot_boot_make_serve_exit_3() {
    let mut server = TestServer::spawn(
        "boot_fail",
        TestOptions {
            database_url: Some("sqlite:///nonexistent-dir-xyz/a.db".to_string()),
            migrate_on_start: false,
            ..opts()
        },
    );
    server.allow_errors();
    let t0 = Instant::now();
    let code = server.expect_exit_code(Duration::from_secs(15));
    eprintln!("serve exited {code} after {:?}", t0.elapsed());
    assert_eq!(code, 3, "workers failed to boot → exit 3");
    let log = server.log();
    assert!(
        log.contains("nonexistent-dir-xyz") || log.to_lowercase().contains("database"),
        "the log carries the worker's database error:\n{log}"
    );
}

// 14 ------------------------------------------------------------------------

fn assert_status_shape(s: &Value, master_pid: i32) {
    assert_eq!(s["protocol"], 1, "protocol: {s}");
    assert_eq!(s["master_pid"].as_i64(), Some(i64::from(master_pid)), "{s}");
    assert!(
        ["starting", "running", "reloading", "stopping"]
            .contains(&s["phase"].as_str().unwrap_or("")),
        "phase: {s}"
    );
    assert!(
        s["generation"].as_u64().is_some_and(|g| g >= 1),
        "generation: {s}"
    );
    assert!(
        s["target_workers"].as_u64().is_some(),
        "target_workers: {s}"
    );
    assert!(
        s["uptime_s"].as_f64().is_some_and(|u| u >= 0.0),
        "uptime_s: {s}"
    );
    assert!(s["restarts"].as_u64().is_some(), "restarts: {s}");
    assert!(s["boot_failures"].as_u64().is_some(), "boot_failures: {s}");
    let ws = s["workers"].as_array().expect("workers is an array");
    let mut slots = BTreeSet::new();
    for w in ws {
        assert!(w["pid"].as_i64().is_some_and(|p| p > 0), "pid: {w}");
        let slot = w["slot"].as_u64().expect("slot is an unsigned integer");
        assert!(slots.insert(slot), "slots are distinct: {s}");
        assert!(w["generation"].as_u64().is_some(), "generation: {w}");
        assert!(
            ["booting", "ready", "retiring", "stopping", "killing"]
                .contains(&w["state"].as_str().unwrap_or("")),
            "state: {w}"
        );
        assert!(w["age_s"].as_f64().is_some_and(|a| a >= 0.0), "age_s: {w}");
        assert!(w["requests"].as_u64().is_some(), "requests: {w}");
        assert!(
            w["active_connections"].as_u64().is_some(),
            "active_connections: {w}"
        );
        assert!(
            w["last_heartbeat_s"].as_f64().is_some_and(|h| h >= 0.0),
            "last_heartbeat_s: {w}"
        );
        let cr = &w["current_request"];
        if !cr.is_null() {
            assert!(cr["method"].is_string(), "current_request.method: {w}");
            assert!(cr["path"].is_string(), "current_request.path: {w}");
            assert!(
                cr["request_id"].is_string(),
                "current_request.request_id: {w}"
            );
            assert!(
                cr["elapsed_ms"].is_number(),
                "current_request.elapsed_ms: {w}"
            );
        }
    }
}

#[test]
fn status_reports_the_master_and_its_workers() {
    let mut server = TestServer::start("status", opts());
    let master = server.master_pid();
    let pidfile = std::fs::read_to_string(&server.paths.pidfile).expect("read the pidfile");
    assert_eq!(
        pidfile.trim(),
        master.to_string(),
        "the pidfile holds the master pid"
    );

    for _ in 0..5 {
        assert_eq!(server.get("/").status, 200);
    }
    let s = server.status();
    assert_status_shape(&s, master);
    assert_eq!(s["phase"], "running", "{s}");
    assert_eq!(s["target_workers"], 2, "{s}");
    assert_eq!(workers(&s).len(), 2, "{s}");
    let served: u64 = workers(&s)
        .iter()
        .filter_map(|w| w["requests"].as_u64())
        .sum();
    assert!(served >= 5, "requests are counted: {s}");

    // An in-flight request shows as current_request.
    let mut conn = HttpConn::connect(server.socket_path()).expect("connect");
    conn.send(
        "GET",
        "/debug/sleep?ms=1500",
        &[("X-Request-Id", "status-test-1")],
    )
    .expect("send");
    let busy = server.wait_for(
        "current_request of the in-flight /debug/sleep",
        Duration::from_secs(2),
        |s| {
            workers(s).iter().any(|w| {
                w["current_request"]["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("/debug/sleep"))
            })
        },
    );
    assert_status_shape(&busy, master);
    let w = workers(&busy)
        .into_iter()
        .find(|w| !w["current_request"].is_null())
        .expect("a busy worker");
    assert_eq!(w["current_request"]["method"], "GET", "{w}");
    assert_eq!(w["current_request"]["request_id"], "status-test-1", "{w}");
    assert!(
        w["active_connections"].as_u64().is_some_and(|n| n >= 1),
        "the busy worker has an active connection: {w}"
    );
    let resp = conn.read_response().expect("the slow response");
    assert_eq!(resp.status, 200);

    // Human output.
    let out = server.run(&["status"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(!out.stdout.trim().is_empty(), "{}", out.describe());
    for pid in ready_pids(&server.status()) {
        assert!(
            out.stdout.contains(&pid.to_string()),
            "the table lists worker {pid}: {}",
            out.describe()
        );
    }

    server.signal(Signal::SIGTERM);
    assert_eq!(server.expect_exit_code(Duration::from_secs(7)), 0);
    for args in [&["status", "--json"][..], &["status"][..]] {
        let out = server.run(args);
        assert_eq!(
            out.code,
            Some(1),
            "{args:?} without a master exits 1: {}",
            out.describe()
        );
    }
}

// 15 ------------------------------------------------------------------------

#[test]
fn int_stops_quickly_with_exit_0() {
    let mut server = TestServer::start("int_stop", opts());
    let pids = server.worker_pids();
    let t0 = Instant::now();
    server.signal(Signal::SIGINT);
    let code = server.expect_exit_code(Duration::from_secs(3));
    eprintln!("INT: exited after {:?}", t0.elapsed());
    assert_eq!(code, 0, "INT exits 0");
    assert!(
        poll_until(Duration::from_secs(1), || pids
            .iter()
            .all(|p| !pid_alive(*p))),
        "no worker outlives a quick stop"
    );
}

// 16 ------------------------------------------------------------------------

#[test]
fn healthcheck_exit_codes() {
    let mut server = TestServer::start("healthcheck", opts());
    let out = server.run(&["healthcheck"]);
    assert_eq!(out.code, Some(0), "healthy by config: {}", out.describe());
    let socket = server.socket_path().display().to_string();
    let out = run_notesd(&["healthcheck", "--socket", socket.as_str()]);
    assert_eq!(out.code, Some(0), "healthy by --socket: {}", out.describe());

    let missing = server.dir().join("missing.sock").display().to_string();
    let out = run_notesd(&["healthcheck", "--socket", missing.as_str()]);
    assert_eq!(out.code, Some(1), "no socket file: {}", out.describe());

    let stale = server.dir().join("stale.sock");
    drop(UnixListener::bind(&stale).expect("bind a socket to leave stale"));
    let stale = stale.display().to_string();
    let out = run_notesd(&["healthcheck", "--socket", stale.as_str()]);
    assert_eq!(out.code, Some(1), "stale socket: {}", out.describe());

    server.signal(Signal::SIGTERM);
    assert_eq!(server.expect_exit_code(Duration::from_secs(7)), 0);
    let out = server.run(&["healthcheck"]);
    assert_eq!(out.code, Some(1), "stopped server: {}", out.describe());
}

// Accept path -----------------------------------------------------------------

/// The connections each worker has accepted, by pid.
fn accepted(status: &Value) -> std::collections::BTreeMap<i32, u64> {
    workers(status)
        .iter()
        .map(|w| (worker_pid(w), w["accepted"].as_u64().unwrap_or(0)))
        .collect()
}

/// A connection wakes one idle worker, idle workers take connections in
/// turn, and a worker whose thread is busy takes none (src/worker/acceptor.rs).
#[test]
fn idle_workers_take_connections_in_turn_and_a_busy_one_takes_none() {
    let server = TestServer::start(
        "accept_turns",
        TestOptions {
            workers: 3,
            ..opts()
        },
    );
    let socket = server.socket_path().to_path_buf();
    let blocker = thread::spawn(move || {
        HttpConn::connect_with_timeout(&socket, Duration::from_secs(15))
            .and_then(|mut c| c.request("GET", "/debug/block?ms=4000", &[]))
    });
    let s = server.wait_for("a worker blocked", secs(3.0), |s| {
        workers(s)
            .iter()
            .any(|w| w["current_request"]["path"] == "/debug/block")
    });
    let blocked = workers(&s)
        .iter()
        .find(|w| w["current_request"]["path"] == "/debug/block")
        .map(worker_pid)
        .expect("the blocked worker");
    let before = accepted(&s);
    const N: u64 = 60;
    let t0 = Instant::now();
    for _ in 0..N {
        assert_eq!(server.get("/healthz").status, 200);
    }
    assert!(
        t0.elapsed() < secs(3.5),
        "60 requests took {:?}",
        t0.elapsed()
    );
    let after = accepted(&server.status());
    let took: Vec<(i32, u64)> = after
        .iter()
        .map(|(pid, n)| (*pid, n - before.get(pid).copied().unwrap_or(0)))
        .collect();
    let total: u64 = took.iter().map(|(_, n)| n).sum();
    // The status requests themselves go to the control socket, not here.
    assert_eq!(total, N, "every connection accepted once: {took:?}");
    for (pid, n) in &took {
        if *pid == blocked {
            assert_eq!(*n, 0, "the blocked worker {pid} took connections: {took:?}");
        } else {
            assert!(*n >= N / 4, "worker {pid} took {n} of {N}: {took:?}");
        }
    }
    let r = blocker
        .join()
        .expect("blocker thread")
        .expect("blocked request");
    assert_eq!(r.status, 200);
    // The text status has the column too.
    let text = server.run(&["status"]);
    assert!(text.stdout.contains("accepted"), "{}", text.stdout);
}
