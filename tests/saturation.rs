//! Saturation an operator can see and shed, black-box: queue time from
//! nginx's `X-Request-Start`, load shedding on it (`http.max_queue_ms`), busy
//! workers, the pool at its limit (a locked table), the list cache, reloads
//! and the build on `/metrics`.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::nginx::{Nginx, NginxOptions, TcpClient};
use common::notes::*;
use common::*;

fn metrics(server: &TestServer) -> Metrics {
    let resp = server.get("/metrics");
    assert_eq!(resp.status, 200);
    Metrics::parse(&resp.body)
}

/// What a client thread saw: (status, latency, code of a JSON error).
type Seen = Vec<(u16, Duration, Option<String>)>;

/// `clients` threads sending `path` through nginx back to back for `secs`.
fn hammer(nginx: &Nginx, clients: usize, path: &'static str, secs: u64) -> Seen {
    let stop = Arc::new(AtomicBool::new(false));
    let addr = nginx.addr();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut seen = Seen::new();
                let mut client = None;
                while !stop.load(Ordering::Relaxed) {
                    let c = match client.take() {
                        Some(c) => c,
                        None => match TcpClient::connect(addr, Duration::from_secs(10)) {
                            Ok(c) => c,
                            Err(_) => continue,
                        },
                    };
                    let mut c = c;
                    let t0 = Instant::now();
                    match c.request("GET", path, &[], None) {
                        Ok(r) => {
                            let code = r.error_code();
                            let retry = r.header("retry-after").map(str::to_string);
                            if code.as_deref() == Some("overloaded") {
                                assert_eq!(
                                    retry.as_deref(),
                                    Some("1"),
                                    "Retry-After on a shed request"
                                );
                            }
                            seen.push((r.status, t0.elapsed(), code));
                            if !c.closed {
                                client = Some(c);
                            }
                        }
                        Err(e) => seen.push((0, t0.elapsed(), Some(e.to_string()))),
                    }
                }
                seen
            })
        })
        .collect();
    thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    threads
        .into_iter()
        .flat_map(|t| t.join().expect("client"))
        .collect()
}

/// Until `on` goes false: the highest listen queue of the server's unix
/// socket seen in `notesd status` and in `ss`, polled side by side.
fn sample_listen_queue(server: &TestServer, on: Arc<AtomicBool>) -> thread::JoinHandle<(u64, u64)> {
    let path = server.socket_path().to_path_buf();
    let bind = format!("unix:{}", path.display());
    let config = server.client_config_path().display().to_string();
    thread::spawn(move || {
        let (mut status_max, mut ss_max) = (0, 0);
        while on.load(Ordering::Relaxed) {
            let out = notesd_cmd(["status", "--json", "-c", config.as_str()]).output();
            if let Ok(Ok(v)) = out.map(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout)) {
                let queued = v["listeners"]
                    .as_array()
                    .and_then(|ls| ls.iter().find(|l| l["bind"] == bind.as_str()))
                    .and_then(|l| l["queued"].as_u64());
                status_max = status_max.max(queued.unwrap_or(0));
            }
            ss_max = ss_max.max(ss_unix(&path).map_or(0, |(q, _)| u64::from(q)));
            thread::sleep(Duration::from_millis(50));
        }
        (status_max, ss_max)
    })
}

fn p99(mut d: Vec<Duration>) -> Duration {
    d.sort();
    d.get(d.len().saturating_sub(1) * 99 / 100)
        .copied()
        .unwrap_or_default()
}

/// One worker whose every request holds its thread 10 ms (capacity ~100/s),
/// 16 clients through nginx: requests queue. Without shedding the queue
/// time histogram shows it; with `max_queue_ms = 100` what waited longer is
/// answered 503 overloaded + Retry-After, counted, and the admitted ones
/// stay fast.
#[test]
fn queue_time_is_measured_and_shed_past_max_queue_ms() {
    if common::nginx::require_nginx().is_none() {
        return;
    }
    for max_queue_ms in [0u64, 100] {
        // Without shedding, no keep-alive either: each request through
        // nginx is a new connection, so the listen queue fills too.
        let server = TestServer::start(
            &format!("shed_{max_queue_ms}"),
            TestOptions {
                workers: 1,
                keepalive: if max_queue_ms == 0 { 0 } else { 5 },
                extra_toml: format!("[http]\nmax_queue_ms = {max_queue_ms}\n"),
                ..TestOptions::default()
            },
        );
        let Some(nginx) = Nginx::start("shed", server.socket_path(), NginxOptions::default())
        else {
            return;
        };
        let before = metrics(&server);
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = sample_listen_queue(&server, sampling.clone());
        let seen = hammer(&nginx, 16, "/debug/block?ms=10", 4);
        sampling.store(false, Ordering::Relaxed);
        let (status_max, ss_max) = sampler.join().expect("sampler");
        let after = metrics(&server);
        let queued = after.get("notesd_http_request_queue_seconds_count")
            - before.get("notesd_http_request_queue_seconds_count");
        let queue_sum = after.get("notesd_http_request_queue_seconds_sum")
            - before.get("notesd_http_request_queue_seconds_sum");
        let shed = after.get("notesd_http_shed_total") - before.get("notesd_http_shed_total");
        let ok: Vec<Duration> = seen.iter().filter(|s| s.0 == 200).map(|s| s.1).collect();
        let overloaded = seen
            .iter()
            .filter(|s| s.2.as_deref() == Some("overloaded"))
            .count();
        let other: Vec<_> = seen
            .iter()
            .filter(|s| s.0 != 200 && s.2.as_deref() != Some("overloaded"))
            .collect();
        let shed_latency = p99(seen
            .iter()
            .filter(|s| s.2.as_deref() == Some("overloaded"))
            .map(|s| s.1)
            .collect());
        eprintln!(
            "SATURATION max_queue_ms={max_queue_ms}: {} answered, {} ok (p99 {:?}), {overloaded} shed (p99 {shed_latency:?}), {} other; queue histogram: {queued} requests, mean {:.0} ms; shed_total {shed}",
            seen.len(),
            ok.len(),
            p99(ok.clone()),
            other.len(),
            if queued > 0.0 {
                queue_sum / queued * 1000.0
            } else {
                0.0
            }
        );
        eprintln!("SATURATION listen queue: max {status_max} in notesd status, max {ss_max} in ss");
        assert!(
            other.is_empty(),
            "no other errors: {:?}",
            &other[..other.len().min(5)]
        );
        assert!(
            queued >= ok.len() as f64,
            "every request's queue time counted"
        );
        if max_queue_ms == 0 {
            assert!(
                ss_max >= 2 && status_max >= 2,
                "the listen queue rose: status {status_max}, ss {ss_max}"
            );
            assert!(
                status_max <= ss_max + 4 && ss_max <= 2 * status_max + 4,
                "notesd's samples and ss's agree: {status_max} vs {ss_max}"
            );
            assert_eq!(overloaded, 0);
            assert_eq!(shed, 0.0);
            assert!(
                queue_sum / queued > 0.05,
                "16 clients on ~100/s queue: mean {:.3} s",
                queue_sum / queued
            );
        } else {
            assert!(overloaded > 0, "some requests shed");
            assert_eq!(
                shed, overloaded as f64,
                "shed_total counts each 503 overloaded"
            );
            assert!(
                p99(ok) < Duration::from_millis(2 * 100 + 10 + 150),
                "admitted p99 within ~2× the budget + service"
            );
            // Healthz and metrics are never shed.
            let h = nginx.call("GET", "/healthz", &[], None);
            assert_eq!(h.status, 200);
        }
    }
}

/// A locked table: POSTs hold every pool connection, the rest wait and
/// time out; `/metrics` shows the pool at its limit and the timeouts.
#[test]
fn a_locked_table_shows_the_pool_at_its_limit_and_its_timeouts() {
    let Some(server) = start(Backend::Postgres, "pool_wall", |o| {
        o.workers = 1;
        o.database_extra = "max_connections = 2".into();
    }) else {
        return;
    };
    let db = server.db.pg.as_ref().expect("PostgreSQL").name.clone();
    let mut locker = hold_notes_lock(&db, 4);
    let socket: PathBuf = server.socket_path().to_path_buf();
    let posts: Vec<_> = (0..5)
        .map(|_| {
            let socket = socket.clone();
            thread::spawn(move || {
                Client::connect(&socket)
                    .call(
                        "POST",
                        "/api/notes",
                        &[("Content-Type", "application/json")],
                        Some(br#"{"title":"waits"}"#),
                    )
                    .status
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(700));
    let during = metrics(&server);
    let statuses: Vec<u16> = posts.into_iter().map(|p| p.join().expect("POST")).collect();
    let _ = locker.wait();
    let after = metrics(&server);
    eprintln!(
        "POOL wall: in use {} open {} during the lock; statuses {statuses:?}; timeouts {}; acquire waits counted {}",
        during.get("notesd_db_pool_connections_in_use"),
        during.get("notesd_db_pool_connections_open"),
        after.get("notesd_db_pool_acquire_timeouts_total"),
        after.get("notesd_db_pool_acquire_seconds_count")
    );
    assert_eq!(during.get("notesd_db_pool_connections_in_use"), 2.0);
    assert_eq!(during.get("notesd_db_pool_connections_open"), 2.0);
    assert!(during.get("notesd_workers_busy") >= 1.0);
    let timeouts = statuses.iter().filter(|s| **s == 503).count();
    assert!(timeouts >= 1, "{statuses:?}");
    assert_eq!(
        after.get("notesd_db_pool_acquire_timeouts_total"),
        timeouts as f64
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count() + timeouts,
        5,
        "{statuses:?}"
    );
    assert_eq!(
        after.get("notesd_db_pool_connections_in_use"),
        0.0,
        "all handed back"
    );
}

/// The list cache's hits and misses, a reload's outcome and generation, the
/// build; `promtool check metrics` accepts all of it.
#[test]
fn cache_reloads_and_build_are_on_metrics() {
    let server = TestServer::start("lifecycle_metrics", TestOptions::default());
    for _ in 0..5 {
        assert_eq!(server.get("/api/notes").status, 200);
    }
    let m = metrics(&server);
    assert_eq!(
        m.get("notesd_workers_busy"),
        0.0,
        "the scrape itself is no work"
    );
    assert_eq!(
        m.get("notesd_http_request_queue_unknown_total"),
        5.0,
        "no X-Request-Start without nginx"
    );
    let hits = m.get("notesd_list_cache_requests_total{result=\"hit\"}");
    let misses = m.get("notesd_list_cache_requests_total{result=\"miss\"}");
    assert_eq!(hits + misses, 5.0, "{m:?}");
    assert!(misses >= 1.0 && m.get("notesd_list_cache_validations_total") >= 1.0);
    assert_eq!(m.get("notesd_generation"), 1.0);
    assert_eq!(
        m.get(&format!(
            "notesd_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    let out = server.run(&["reload"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let m = metrics(&server);
    assert_eq!(m.get("notesd_reloads_total{result=\"complete\"}"), 1.0);
    assert_eq!(m.get("notesd_generation"), 2.0);
    assert!(m.get("notesd_master_start_time_seconds") > 1.7e9);
    promtool_check_metrics(&server.get("/metrics").body);
}

/// `ss -xlnH` Recv-Q and Send-Q of the unix listener at `path`.
fn ss_unix(path: &std::path::Path) -> Option<(u32, u32)> {
    let out = std::process::Command::new("ss")
        .args(["-xlnH"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| {
        l.split_whitespace()
            .any(|f| f == path.to_str().unwrap_or(""))
    })?;
    let f: Vec<&str> = line.split_whitespace().collect();
    Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
}

/// Connections no worker takes (it is stopped) wait in the listen queue:
/// `notesd status` and `/metrics` show the number `ss` shows, and the backlog.
#[test]
fn the_listen_queue_matches_ss() {
    let server = TestServer::start(
        "listen_queue",
        TestOptions {
            workers: 1,
            ..TestOptions::default()
        },
    );
    let worker = server.worker_pids()[0];
    send_signal(worker, nix::sys::signal::Signal::SIGSTOP);
    let waiting: Vec<_> = (0..5)
        .map(|_| std::os::unix::net::UnixStream::connect(server.socket_path()).expect("connect"))
        .collect();
    thread::sleep(Duration::from_millis(600));
    let status = server.status();
    let ss = ss_unix(server.socket_path());
    let unix = format!("unix:{}", server.socket_path().display());
    let listed = status["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["bind"] == unix.as_str()).cloned());
    send_signal(worker, nix::sys::signal::Signal::SIGCONT);
    eprintln!("LISTEN queue: status {listed:?}, ss {ss:?}");
    let listed = listed.expect("the unix listener in notesd status");
    let (ss_queued, ss_backlog) = ss.expect("ss -xl shows the socket");
    assert_eq!(listed["queued"], 5);
    assert_eq!(listed["queued"].as_u64(), Some(u64::from(ss_queued)));
    assert_eq!(listed["backlog"].as_u64(), Some(u64::from(ss_backlog)));
    drop(waiting);
    let series = format!("notesd_listen_queue{{listener=\"{unix}\"}}");
    assert!(
        poll_until(Duration::from_secs(3), || metrics(&server)
            .samples
            .get(&series)
            == Some(&0.0)),
        "{series} back to 0 once the worker accepts: {}",
        server.get("/metrics").body
    );
    let max = metrics(&server).get(&format!("notesd_listen_queue_max{{listener=\"{unix}\"}}"));
    assert_eq!(max, f64::from(ss_backlog));
}
