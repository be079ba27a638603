//! Slow and growing workers, black-box: memory recycling (`max_worker_memory`)
//! under load through nginx, slow-request records naming the query and the
//! database a request waits on, what a stuck worker was blocked in before
//! its timeout kill, and the per-process CPU/memory/fds of `notesd status`
//! and `/metrics` held against `/proc`.
//!
//! A worker is made to hold memory with the debug routes (`/debug/ballast`,
//! `NOTESD_DEBUG_BALLAST_MIB`), and to block its thread with `/debug/block`.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use common::load::{CONNECTIONS, MixedLoad, rig};
use common::nginx::NginxOptions;
use common::notes::*;
use common::*;
use serde_json::Value;

/// `/debug/ballast?mib=N` on a fresh connection: the pid of the worker
/// that now holds N MiB.
fn ballast(server: &TestServer, mib: u64) -> i32 {
    let resp = server.get(&format!("/debug/ballast?mib={mib}"));
    assert_eq!(resp.status, 200, "{resp:?}");
    let v: Value = serde_json::from_str(&resp.body).expect("json");
    v["pid"].as_i64().expect("pid") as i32
}

fn metrics(server: &TestServer) -> Metrics {
    let resp = server.get("/metrics");
    assert_eq!(resp.status, 200);
    Metrics::parse(&resp.body)
}

fn memory_recycles(server: &TestServer) -> f64 {
    metrics(server).get("notesd_worker_recycles_total{reason=\"memory\"}")
}

fn states(status: &Value) -> Vec<String> {
    workers(status)
        .iter()
        .map(|w| w["state"].as_str().unwrap_or("").to_string())
        .collect()
}

fn count(states: &[String], names: &[&str]) -> usize {
    states
        .iter()
        .filter(|s| names.contains(&s.as_str()))
        .count()
}

/// A worker that grows over the limit is recycled after 3 samples, its
/// replacement first: no request through nginx fails, the other worker is
/// left alone, and the log and the counter say "memory".
#[test]
fn a_growing_worker_is_recycled_after_three_samples_with_no_failed_request() {
    let Some(rig) = rig(
        "mem_recycle",
        |o| o.server_extra = "max_worker_memory = \"32MiB\"".into(),
        NginxOptions::default(),
    ) else {
        return;
    };
    let server = &rig.server;
    let before: BTreeSet<i32> = server.worker_pids().into_iter().collect();
    let load = MixedLoad::start(rig.nginx.addr(), CONNECTIONS, "memory");
    thread::sleep(Duration::from_millis(500));
    let fat = ballast(server, 48);
    let grown = Instant::now();
    let mut min_serving = usize::MAX;
    let mut max_leaving = 0;
    let gone = poll_until(Duration::from_secs(12), || {
        if let Ok(s) = server.try_status() {
            let st = states(&s);
            min_serving = min_serving.min(count(&st, &["ready", "retiring"]));
            max_leaving = max_leaving.max(count(&st, &["retiring", "stopping"]));
        }
        !pid_alive(fat)
    });
    let took = grown.elapsed();
    thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    assert!(
        gone,
        "worker {fat} still alive 12 s after it grew: {}",
        server.log_tail()
    );
    let line = format!("worker {fat} uses ");
    let log = server.log();
    let recycled: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("for 3 s: recycling"))
        .collect();
    eprintln!(
        "MEMORY recycle: worker {fat} gone {:.1} s after growing to 48 MiB (limit 32 MiB); min serving {min_serving}, max leaving {max_leaving}; {}; {recycled:?}",
        took.as_secs_f64(),
        report.summary()
    );
    assert_eq!(recycled.len(), 1, "one memory recycle: {recycled:?}");
    assert!(
        recycled[0].contains(&line) && recycled[0].contains("MiB PSS > 32 MiB"),
        "{recycled:?}"
    );
    assert!(
        took >= Duration::from_secs(2),
        "3 samples a second apart: {took:?}"
    );
    assert!(min_serving >= 2, "capacity dipped to {min_serving}");
    assert!(max_leaving <= 1, "{max_leaving} workers leaving at once");
    let failures = report.failures(|_| false);
    assert!(
        failures.is_empty(),
        "{} failed: {}",
        failures.len(),
        common::load::list(&failures, 10)
    );
    assert_eq!(memory_recycles(server), 1.0);
    let steady = server.wait_steady(2, Duration::from_secs(10));
    let after: BTreeSet<i32> = ready_pids(&steady).into_iter().collect();
    assert_eq!(
        before.intersection(&after).count(),
        1,
        "the other worker stays: {before:?} → {after:?}"
    );
}

/// A worker that was under the limit and grows past twice it is not waited
/// for: it retires at the first such sample, still replacement first.
#[test]
fn a_worker_grown_past_twice_the_limit_retires_at_the_first_sample() {
    let server = TestServer::start(
        "mem_double",
        TestOptions {
            workers: 2,
            server_extra: "max_worker_memory = \"32MiB\"".into(),
            ..TestOptions::default()
        },
    );
    thread::sleep(Duration::from_millis(1200)); // a sample under the limit
    let load = server.load(4, "/healthz");
    let fat = ballast(&server, 80);
    let grown = Instant::now();
    let mut min_serving = usize::MAX;
    let gone = poll_until(Duration::from_secs(8), || {
        if let Ok(s) = server.try_status() {
            min_serving = min_serving.min(count(&states(&s), &["ready", "retiring"]));
        }
        !pid_alive(fat)
    });
    let took = grown.elapsed();
    let stats = load.stop();
    eprintln!(
        "MEMORY twice: worker {fat} gone {took:?} after growing to 80 MiB (limit 32 MiB), min serving {min_serving}, {stats:?}"
    );
    assert!(gone, "{}", server.log_tail());
    assert!(
        took < Duration::from_millis(2600),
        "one sample, not three: {took:?}"
    );
    assert!(min_serving >= 2, "capacity dipped to {min_serving}");
    assert_eq!(stats.failed, 0, "{stats:?}");
    let log = server.log();
    assert!(
        log.contains(&format!("worker {fat} uses "))
            && log.contains("over twice the limit: recycling it now"),
        "{}",
        server.log_tail()
    );
    assert_eq!(memory_recycles(&server), 1.0);
}

/// Over the limit for fewer than 3 samples in a row: nothing happens.
#[test]
fn a_worker_briefly_over_the_limit_is_not_recycled() {
    let server = TestServer::start(
        "mem_spike",
        TestOptions {
            workers: 1,
            server_extra: "max_worker_memory = \"32MiB\"".into(),
            ..TestOptions::default()
        },
    );
    let pid = ballast(&server, 48);
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(ballast(&server, 0), pid, "one worker");
    thread::sleep(Duration::from_secs(4));
    assert_eq!(server.worker_pids(), vec![pid]);
    assert_eq!(memory_recycles(&server), 0.0);
    assert!(!server.log().contains("recycling"), "{}", server.log_tail());
}

/// Every worker needs more than the limit: they are recycled over and over,
/// but one at a time, and never fewer than `workers` serve.
#[test]
fn a_limit_below_every_workers_need_never_dips_and_recycles_one_at_a_time() {
    let server = TestServer::start(
        "mem_too_low",
        TestOptions {
            workers: 2,
            server_extra: "max_worker_memory = \"16MiB\"".into(),
            env: vec![("NOTESD_DEBUG_BALLAST_MIB".into(), "24".into())],
            ..TestOptions::default()
        },
    );
    let load = server.load(4, "/healthz");
    let (mut min_serving, mut max_leaving, mut seen) = (usize::MAX, 0, BTreeSet::new());
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(9) {
        if let Ok(s) = server.try_status() {
            let st = states(&s);
            min_serving = min_serving.min(count(&st, &["ready", "retiring"]));
            max_leaving = max_leaving.max(count(&st, &["retiring", "stopping"]));
            seen.extend(all_pids(&s));
        }
        thread::sleep(Duration::from_millis(25));
    }
    let stats = load.stop();
    let recycles = memory_recycles(&server);
    eprintln!(
        "MEMORY too low: {recycles} recycles in 9 s, {} pids, min serving {min_serving}, max leaving {max_leaving}, load {stats:?}",
        seen.len()
    );
    assert!(min_serving >= 2, "capacity dipped to {min_serving}");
    assert!(max_leaving <= 1, "{max_leaving} workers leaving at once");
    assert!(
        recycles >= 2.0,
        "the limit is below every worker's need: {recycles}"
    );
    assert_eq!(stats.failed, 0, "{stats:?}");
}

/// Requests waiting on a locked table get one record each, naming the query
/// and the PostgreSQL they wait on; they commit once the lock goes.
#[test]
fn each_request_waiting_on_a_locked_table_gets_one_record_naming_its_query() {
    let Some(server) = start(Backend::Postgres, "slow_lock", |o| {
        o.workers = 1;
        o.extra_toml = "[http]\nslow_request_ms = 500\n".into();
    }) else {
        return;
    };
    let db = server.db.pg.as_ref().expect("PostgreSQL").name.clone();
    let mut locker = hold_notes_lock(&db, 3);
    let socket: PathBuf = server.socket_path().to_path_buf();
    let posts: Vec<_> = (0..3)
        .map(|i| {
            let socket = socket.clone();
            thread::spawn(move || {
                let id = format!("locked-{i}");
                Client::connect(&socket).call(
                    "POST",
                    "/api/notes",
                    &[("Content-Type", "application/json"), ("X-Request-Id", &id)],
                    Some(br#"{"title":"waits"}"#),
                )
            })
        })
        .collect();
    for p in posts {
        let resp = p.join().expect("a POST");
        assert_eq!(resp.status, 201, "{resp:?}");
    }
    let _ = locker.wait();
    let log = server.log();
    for i in 0..3 {
        let id = format!("request id locked-{i}");
        let records: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("slow request") && l.contains(&id))
            .collect();
        assert_eq!(records.len(), 1, "one record for {id}: {records:?}");
        let r = records[0];
        assert!(
            r.contains("on query insert_note (PostgreSQL 127.0.0.1:5432)")
                && r.contains("route=\"/api/notes\"")
                && r.contains("phase=\"query\""),
            "{r}"
        );
        eprintln!("SLOW record: {r}");
    }
}

/// A request that passes the threshold while nothing can check it (here the
/// thread itself is blocked for a moment) gets its record when it ends:
/// one record per slow request, never none.
#[test]
fn a_request_slow_between_two_checks_gets_its_record_when_it_ends() {
    let server = TestServer::start(
        "slow_between",
        TestOptions {
            workers: 1,
            extra_toml: "[http]\nslow_request_ms = 300\n".into(),
            ..TestOptions::default()
        },
    );
    let resp = server.request(
        "GET",
        "/debug/block?ms=450",
        &[("X-Request-Id", "between-1")],
    );
    assert_eq!(resp.status, 200);
    let quick = server.request("GET", "/debug/sleep?ms=50", &[("X-Request-Id", "quick-1")]);
    assert_eq!(quick.status, 200);
    thread::sleep(Duration::from_millis(200));
    let log = server.log();
    let records: Vec<&str> = log.lines().filter(|l| l.contains("slow request")).collect();
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(
        records[0].contains("request id between-1") && records[0].contains("answered after"),
        "{}",
        records[0]
    );
}

/// A worker whose thread is stuck gets a record of what the kernel says it
/// is in (while slow, then at its timeout kill): wchan and syscall.
#[test]
fn a_stuck_worker_is_recorded_with_its_wchan_and_syscall_before_its_kill() {
    let mut server = TestServer::start(
        "slow_stuck",
        TestOptions {
            workers: 1,
            timeout: 3,
            extra_toml: "[http]\nslow_request_ms = 500\n".into(),
            ..TestOptions::default()
        },
    );
    server.allow_errors();
    let pid = server.worker_pids()[0];
    let socket = server.socket_path().to_path_buf();
    let blocked = thread::spawn(move || {
        if let Ok(mut c) = common::HttpConn::connect(&socket) {
            let _ = c.request(
                "GET",
                "/debug/block?ms=10000",
                &[("X-Request-Id", "stuck-1")],
            );
        }
    });
    assert!(
        poll_until(Duration::from_secs(10), || !pid_alive(pid)),
        "worker {pid} not killed: {}",
        server.log_tail()
    );
    let log = server.log();
    let slow: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("slow request, worker {pid} stuck")))
        .collect();
    let kill: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("worker {pid} timed out")))
        .collect();
    eprintln!("STUCK records: {slow:?} {kill:?}");
    assert_eq!(slow.len(), 1, "{}", server.log_tail());
    assert_eq!(kill.len(), 1, "{}", server.log_tail());
    for r in [slow[0], kill[0]] {
        assert!(
            r.contains("request id stuck-1")
                && r.contains("wchan=\"hrtimer_nanosleep\"")
                && r.contains("syscall=\"clock_nanosleep\""),
            "{r}"
        );
    }
    let _ = blocked.join();
}

/// `/proc/PID/stat` utime + stime in seconds, and `statm` resident bytes.
fn proc_figures(pid: i32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    let tck = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .expect("resident")
        .parse()
        .expect("pages");
    (ticks as f64 / tck, pages * 4096)
}

fn within(what: &str, got: f64, lo: f64, hi: f64) {
    let (lo, hi) = (lo * 0.95 - 0.02, hi * 1.05 + 0.02);
    assert!(
        got >= lo && got <= hi,
        "{what}: {got} not within [{lo}, {hi}]"
    );
}

/// CPU and RSS in `notesd status --json` and on `/metrics`, under load,
/// agree with `/proc` read just before and just after (within 5 %); and
/// promtool accepts `/metrics`.
#[test]
fn status_and_metrics_resources_agree_with_proc_under_load() {
    let server = TestServer::start("resources", TestOptions::default());
    let load = server.load(4, "/api/notes");
    thread::sleep(Duration::from_secs(2));
    let pids: Vec<i32> = std::iter::once(server.master_pid())
        .chain(server.worker_pids())
        .collect();
    let before: Vec<(f64, u64)> = pids.iter().map(|p| proc_figures(*p)).collect();
    let status = server.status();
    let scrape = server.get("/metrics").body;
    let after: Vec<(f64, u64)> = pids.iter().map(|p| proc_figures(*p)).collect();
    let stats = load.stop();
    assert_eq!(stats.failed, 0);
    let m = Metrics::parse(&scrape);
    for (i, pid) in pids.iter().enumerate() {
        let (r, slot) = if i == 0 {
            (status["master"].clone(), None)
        } else {
            let w = workers(&status)
                .into_iter()
                .find(|w| worker_pid(w) == *pid)
                .expect("worker");
            (
                w["resources"].clone(),
                Some(w["slot"].as_u64().expect("slot")),
            )
        };
        let (cpu0, rss0) = before[i];
        let (cpu1, rss1) = after[i];
        let (lo_rss, hi_rss) = (rss0.min(rss1) as f64, rss0.max(rss1) as f64);
        within(
            &format!("status cpu of {pid}"),
            r["cpu_s"].as_f64().expect("cpu"),
            cpu0,
            cpu1,
        );
        within(
            &format!("status rss of {pid}"),
            r["rss_bytes"].as_f64().expect("rss"),
            lo_rss,
            hi_rss,
        );
        assert!(
            r["pss_bytes"]
                .as_f64()
                .is_some_and(|p| p > 0.0 && p <= hi_rss * 1.05),
            "{r}"
        );
        assert!(r["open_fds"].as_u64().is_some_and(|n| n >= 3), "{r}");
        let labels = match slot {
            None => format!("process=\"master\",pid=\"{pid}\""),
            Some(s) => format!("process=\"worker\",slot=\"{s}\",pid=\"{pid}\""),
        };
        let series = |name: &str| m.samples.get(&format!("{name}{{{labels}}}")).copied();
        within(
            &format!("metrics cpu of {pid}"),
            series("process_cpu_seconds_total").expect("cpu series"),
            cpu0,
            cpu1,
        );
        within(
            &format!("metrics rss of {pid}"),
            series("process_resident_memory_bytes").expect("rss series"),
            lo_rss,
            hi_rss,
        );
        assert!(
            series("process_open_fds").is_some() && series("process_start_time_seconds").is_some()
        );
    }
    let workers_in_metrics = m
        .samples
        .keys()
        .filter(|k| k.starts_with("process_cpu_seconds_total{process=\"worker\""))
        .count();
    assert_eq!(
        workers_in_metrics, 2,
        "no series of a dead worker: {scrape}"
    );
    promtool_check_metrics(&scrape);
}

/// `notesd status --watch` prints one table after another when stdout is
/// not a terminal, with the resources columns, until it is stopped.
#[test]
fn status_watch_prints_a_table_per_interval() {
    let server = TestServer::start("watch", TestOptions::default());
    let config = server.client_config_path();
    let mut child = notesd_cmd([
        "status",
        "--watch",
        "0.2",
        "-c",
        &config.display().to_string(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("notesd status --watch");
    thread::sleep(Duration::from_millis(1100));
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    let text = String::from_utf8_lossy(&out.stdout);
    let tables = text.matches("cpu s").count();
    assert!(
        (3..=7).contains(&tables),
        "{tables} tables in 1.1 s: {text}"
    );
    assert!(!text.contains('\x1b'), "no escape codes into a pipe");
    assert!(text.contains("(master)"), "{text}");
    let bad = notesd_cmd([
        "status",
        "--watch",
        "0",
        "-c",
        &config.display().to_string(),
    ])
    .output()
    .expect("run");
    assert_eq!(
        bad.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
