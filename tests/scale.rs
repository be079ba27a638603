//! Scale out, tested as the README's "Scale out" section says: three notesd
//! hosts, each in a network namespace of its own (a veth pair, an address in
//! 10.213.0.0/16 that the test makes) with a TCP bind on that address; one
//! nginx in the root namespace with an upstream of the three, configured with
//! the README's upstream block; one PostgreSQL they share (a cluster of the
//! test's own, on a unix socket, so it can be restarted). Under a GET+POST
//! load through nginx:
//!
//! a. SIGKILL of one host's master and workers: failures only among the
//!    requests in flight on it, no POST replayed, nginx stops choosing it,
//!    every 201'd note present;
//! b. a rolling reload, host by host: 0 failed requests;
//! c. read-your-writes: 10,000 POST → GET-list pairs through nginx (any host),
//!    list cache on at its default: every created note is in the page that
//!    follows its 201; also right after `notesd seed` and an INSERT by psql;
//! d. PostgreSQL restarted: every host answers 503 meanwhile and serves
//!    again within 2 s of it being back.
//!
//! Root only (namespaces, the cluster): CI runs as root; elsewhere it SKIPs
//! loudly. One test at a time (2 cores).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::hosts::{NetNs, PgBouncer, PgCluster, require_root};
use common::load::*;
use common::nginx::{Nginx, NginxOptions, TcpClient, require_nginx};
use common::notes::JSON;
use common::*;
use serde_json::{Value, json};

const HOSTS: u32 = 3;
const PORT: u16 = 8000;

static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}

/// The README's scale-out upstream block: its `server` parameters (after the
/// address) and its other directives. The test's nginx uses exactly these.
fn readme_upstream() -> (String, Vec<String>) {
    let readme = include_str!("../README.md");
    let at = readme
        .find("**Scale out**")
        .expect("the README has a Scale out section");
    let block = readme[at..]
        .split("```nginx")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the Scale out section has an nginx block");
    let mut params = None;
    let mut directives = Vec::new();
    for line in block.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let line = line.trim_end_matches(';').trim();
        if line.is_empty() || line.starts_with("upstream") || line == "}" {
            continue;
        }
        match line.strip_prefix("server ") {
            Some(rest) => {
                let p = rest.split_once(' ').map_or("", |(_, p)| p).trim();
                params = Some(p.to_string());
            }
            None => directives.push(line.to_string()),
        }
    }
    (
        params.expect("the upstream block has server lines"),
        directives,
    )
}

/// Dropped in order: nginx, the hosts, their namespaces, PgBouncer, the database.
struct Farm {
    nginx: Nginx,
    hosts: Vec<TestServer>,
    nets: Vec<NetNs>,
    _bouncer: Option<PgBouncer>,
    cluster: PgCluster,
    url: String,
}

/// Workers per host, and database connections per worker (the default
/// `database.max_connections`).
const WORKERS: u32 = 2;
const MAX_CONNECTIONS: u32 = 4;

fn farm(name: &str) -> Option<Farm> {
    farm_with(name, None)
}

/// The farm; with `Some(mode)`, the hosts reach PostgreSQL through a
/// PgBouncer in that pool mode, sized to the connection budget (hosts ×
/// workers × max_connections, twice that during a reload).
fn farm_with(name: &str, pgbouncer: Option<&str>) -> Option<Farm> {
    if !require_root("the multi-host test") {
        return None;
    }
    require_nginx()?;
    let cluster = PgCluster::start(&format!("{name}_pg"))?;
    cluster.sql("postgres", "CREATE DATABASE notesd");
    let bouncer = match pgbouncer {
        Some(mode) => Some(PgBouncer::start(
            &cluster,
            "notesd",
            mode,
            2 * HOSTS * WORKERS * MAX_CONNECTIONS + 2,
        )?),
        None => None,
    };
    let url = bouncer
        .as_ref()
        .map_or_else(|| cluster.url("notesd"), |b| b.url("notesd"));
    // Once, as the first host's `notesd migrate` would (the others' find it done).
    let mut migrate = notesd_cmd(["migrate"]);
    migrate.env("NOTESD_DATABASE_URL", &url);
    let out = run_with_timeout(migrate, Duration::from_secs(30));
    assert_eq!(out.code, Some(0), "migrate: {}", out.describe());
    let nets: Vec<NetNs> = (0..HOSTS).map(NetNs::create).collect();
    let hosts = nets
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            TestServer::start(
                &format!("{name}_h{i}"),
                TestOptions {
                    workers: WORKERS,
                    database_url: Some(url.clone()),
                    migrate_on_start: false,
                    wrap: ns.wrap(),
                    extra_binds: vec![format!("{}:{PORT}", ns.addr)],
                    ..TestOptions::default()
                },
            )
        })
        .collect();
    let (params, directives) = readme_upstream();
    let mut opts = NginxOptions {
        upstream_servers: nets
            .iter()
            .map(|ns| format!("{}:{PORT} {params}", ns.addr))
            .collect(),
        ..NginxOptions::default()
    };
    for d in directives {
        match d.split_once(' ') {
            Some(("keepalive", n)) => {
                opts.upstream_keepalive = n.trim().parse().expect("keepalive N")
            }
            Some(("keepalive_timeout", t)) => {
                opts.upstream_keepalive_timeout = t
                    .trim()
                    .trim_end_matches('s')
                    .parse()
                    .expect("keepalive_timeout Ns")
            }
            _ => opts.upstream_extra.push(d),
        }
    }
    let nginx = Nginx::start(name, Path::new("/nonexistent"), opts)?;
    let resp = nginx.call("GET", "/healthz", &[], None);
    assert_eq!(resp.status, 200, "through nginx: {resp:?}");
    Some(Farm {
        nginx,
        hosts,
        nets,
        _bouncer: bouncer,
        cluster,
        url,
    })
}

impl Farm {
    /// Ids of every note in the database (straight from PostgreSQL).
    fn ids(&self) -> BTreeSet<i64> {
        self.cluster
            .sql("notesd", "SELECT id FROM notes")
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    #[track_caller]
    fn assert_all_acknowledged_present(&self, what: &str, report: &Report) {
        let present = self.ids();
        let missing: Vec<i64> = report.created().difference(&present).copied().collect();
        assert!(
            missing.is_empty(),
            "{what}: {} note(s) answered 201 are missing: {:?}",
            missing.len(),
            &missing[..missing.len().min(20)]
        );
    }

    /// Titles stored more than once: a POST nginx sent twice.
    /// `notesd reload` on every host in turn, `pause` apart, under a GET+POST
    /// load through nginx: not one request may fail, and every 201'd note is
    /// there afterwards.
    fn rolling_reload_under_load(&self, what: &str, pause: Duration) {
        let load = MixedLoad::start(self.nginx.addr(), CONNECTIONS, what);
        thread::sleep(Duration::from_millis(800));
        for (i, host) in self.hosts.iter().enumerate() {
            let t0 = Instant::now();
            let out = host.run(&["reload"]);
            assert_eq!(out.code, Some(0), "{what}, host {i}: {}", out.describe());
            eprintln!("SCALE {what}: host {i} reloaded in {:?}", t0.elapsed());
            thread::sleep(pause);
        }
        let report = load.stop();
        eprintln!("SCALE {what}: {}", report.summary());
        let failures = report.failures(|_| false);
        assert!(
            failures.is_empty(),
            "{what}: {} request(s) failed during the rolling reload:\n{}",
            failures.len(),
            list(&failures, 20)
        );
        self.assert_all_acknowledged_present(what, &report);
    }

    fn replayed_titles(&self) -> String {
        self.cluster.sql(
            "notesd",
            "SELECT string_agg(title, ', ') FROM (SELECT title FROM notes \
             GROUP BY title HAVING count(*) > 1) d",
        )
    }
}

fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

// a -------------------------------------------------------------------------

#[test]
fn a_killed_host_fails_only_its_in_flight_requests_and_nginx_stops_choosing_it() {
    let _heavy = heavy();
    let Some(mut farm) = farm("scale_kill") else {
        return;
    };
    let load = MixedLoad::start(farm.nginx.addr(), CONNECTIONS, "kill");
    thread::sleep(Duration::from_millis(1500));
    let victim = &mut farm.hosts[1];
    let pids: Vec<i32> = all_pids(&victim.status());
    let kill_at = load.now();
    let kill_epoch = epoch_now();
    for pid in &pids {
        send_signal(*pid, Signal::SIGKILL);
    }
    victim.kill_master();
    thread::sleep(Duration::from_secs(6));
    let report = load.stop();
    let end_epoch = epoch_now();
    eprintln!("SCALE kill: {}", report.summary());
    // In flight on the victim: sent before it died (nginx may still write on a
    // cached keepalive connection to it for a moment).
    let in_flight = |r: &Record| r.start <= kill_at + Duration::from_millis(50);
    let failures = report.failures(in_flight);
    assert!(
        failures.is_empty(),
        "failures beyond the requests in flight on the killed host:\n{}",
        list(&failures, 20)
    );
    let lost = report.failures(|_| false).len();
    eprintln!("SCALE kill: {lost} request(s) in flight on the killed host failed");
    let replayed = farm.replayed_titles();
    assert!(replayed.is_empty(), "POSTs replayed by nginx: {replayed}");
    farm.assert_all_acknowledged_present("kill", &report);
    // nginx stopped choosing it: no attempt on it from a second after the kill.
    let victim_addr = format!("{}:{PORT}", farm.nets[1].addr);
    let chosen: Vec<_> = farm
        .nginx
        .access_entries()
        .into_iter()
        .filter(|e| e.msec > kill_epoch + 1.0 && e.msec <= end_epoch)
        .filter(|e| e.upstream_addr.contains(&victim_addr))
        .collect();
    assert!(
        chosen.is_empty(),
        "nginx still tried the killed host {} time(s) a second after the kill: {:?}",
        chosen.len(),
        chosen.first()
    );
}

// b -------------------------------------------------------------------------

#[test]
fn a_rolling_reload_of_every_host_fails_no_request() {
    let _heavy = heavy();
    let Some(farm) = farm("scale_roll") else {
        return;
    };
    farm.rolling_reload_under_load("roll", Duration::from_millis(700));
}

// b2 ------------------------------------------------------------------------

const KEYED_THREADS: usize = 8;
const KEYED_ATTEMPTS: usize = 60;

/// What one client's keyed POSTs came to.
#[derive(Default)]
struct Keyed {
    /// (title = key, id of its final 201)
    done: Vec<(String, i64)>,
    /// POSTs that needed more than one attempt.
    retried: usize,
    /// Attempts answered 409 (the key's first request still running).
    conflicts: usize,
    /// Attempts that failed otherwise (502, a closed connection, 503).
    failed_attempts: usize,
    /// Final 201s that were replays.
    replays: usize,
}

/// One client: POSTs until `stop`, each with its own key (also its title),
/// retried with that key on a fresh connection (so on any host) after any
/// failure, up to [`KEYED_ATTEMPTS`] times, 100 ms apart.
fn keyed_posts(
    addr: std::net::SocketAddr,
    t: usize,
    stop: &std::sync::atomic::AtomicBool,
) -> Keyed {
    let mut out = Keyed::default();
    let mut client = None;
    let mut i = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let key = format!("key-t{t}-{i}");
        i += 1;
        let body = json!({"title": key}).to_string();
        let mut attempts = 0;
        let id = loop {
            attempts += 1;
            assert!(
                attempts <= KEYED_ATTEMPTS,
                "{key}: no 201 in {KEYED_ATTEMPTS} attempts"
            );
            let c = match client.as_mut().filter(|c: &&mut TcpClient| !c.closed) {
                Some(c) => c,
                None => match TcpClient::connect(addr, CLIENT_TIMEOUT) {
                    Ok(c) => client.insert(c),
                    Err(_) => {
                        out.failed_attempts += 1;
                        thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                },
            };
            let headers = [JSON, ("Idempotency-Key", key.as_str())];
            match c.request("POST", "/api/notes", &headers, Some(body.as_bytes())) {
                Ok(r) if r.status == 201 => {
                    if r.header("idempotent-replayed") == Some("true") {
                        out.replays += 1;
                    }
                    break serde_json::from_str::<Value>(&r.body).expect("json")["id"]
                        .as_i64()
                        .expect("an id");
                }
                Ok(r) if r.status == 409 => out.conflicts += 1,
                Ok(r) => {
                    assert!(
                        matches!(r.status, 502..=504),
                        "{key}: only 201, 409 or a gateway/unavailable error: {r:?}"
                    );
                    out.failed_attempts += 1;
                }
                Err(_) => out.failed_attempts += 1,
            }
            // Retry on a new connection: nginx may pick any host.
            client = None;
            thread::sleep(Duration::from_millis(100));
        };
        out.retried += usize::from(attempts > 1);
        out.done.push((key, id));
    }
    out
}

/// Clients POST with keys through nginx; a lock held on `notes` piles POSTs
/// up in flight on every host, and one host is SIGKILLed then. Each client
/// retries a failed POST with its key until it gets a 201: every POST ends
/// with exactly one note, the id its 201 named, 0 duplicates, 0 lost.
#[test]
fn a_host_lost_mid_post_costs_nothing_when_clients_retry_with_keys() {
    let _heavy = heavy();
    let Some(mut farm) = farm("scale_keys") else {
        return;
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr = farm.nginx.addr();
    let clients: Vec<_> = (0..KEYED_THREADS)
        .map(|t| {
            let stop = stop.clone();
            thread::spawn(move || keyed_posts(addr, t, &stop))
        })
        .collect();
    thread::sleep(Duration::from_millis(1000));
    // Hold the table for 1.5 s: the POSTs sent meanwhile wait in flight, and
    // one host is SIGKILLed with its share of them.
    let (cluster, hosts) = (&farm.cluster, &mut farm.hosts);
    thread::scope(|scope| {
        let locker = scope.spawn(|| {
            cluster.sql(
                "notesd",
                "BEGIN; LOCK TABLE notes IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(1.5); COMMIT;",
            )
        });
        thread::sleep(Duration::from_millis(700));
        let victim = &mut hosts[1];
        for pid in all_pids(&victim.status()) {
            send_signal(pid, Signal::SIGKILL);
        }
        victim.kill_master();
        locker.join().expect("the lock holder");
    });
    thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut all = Keyed::default();
    for c in clients {
        let k = c.join().expect("a keyed client (see its panic)");
        all.done.extend(k.done);
        all.retried += k.retried;
        all.conflicts += k.conflicts;
        all.failed_attempts += k.failed_attempts;
        all.replays += k.replays;
    }
    let stored: std::collections::BTreeMap<String, (i64, i64)> = farm
        .cluster
        .sql(
            "notesd",
            "SELECT title || ' ' || count(*) || ' ' || min(id) FROM notes GROUP BY title",
        )
        .lines()
        .filter_map(|l| {
            let mut w = l.split(' ');
            Some((
                w.next()?.to_string(),
                (w.next()?.parse().ok()?, w.next()?.parse().ok()?),
            ))
        })
        .collect();
    let duplicates: Vec<_> = stored.iter().filter(|(_, (n, _))| *n > 1).collect();
    let lost: Vec<_> = all
        .done
        .iter()
        .filter(|(k, _)| !stored.contains_key(k))
        .collect();
    let wrong: Vec<_> = all
        .done
        .iter()
        .filter(|(k, id)| stored.get(k).is_some_and(|(_, stored_id)| stored_id != id))
        .collect();
    eprintln!(
        "SCALE keys: {} POSTs, {} retried ({} failed attempts, {} × 409), {} answered by a \
         replay; {} notes, {} duplicated, {} lost",
        all.done.len(),
        all.retried,
        all.failed_attempts,
        all.conflicts,
        all.replays,
        stored.len(),
        duplicates.len(),
        lost.len()
    );
    assert!(
        duplicates.is_empty(),
        "POSTs that made two notes: {duplicates:?}"
    );
    assert!(lost.is_empty(), "POSTs answered 201 with no note: {lost:?}");
    assert!(
        wrong.is_empty(),
        "201s naming another note than the stored one: {wrong:?}"
    );
    assert_eq!(
        stored.len(),
        all.done.len(),
        "one note per POST, no stray note"
    );
    assert!(
        all.failed_attempts > 0,
        "the kill failed no attempt: the test did not exercise the retry"
    );
}

// c -------------------------------------------------------------------------

const PAIRS: usize = 10_000;
const PAIR_THREADS: usize = 8;

/// The ids of the first list page through nginx.
fn head_page(c: &mut TcpClient) -> Result<Vec<Value>, String> {
    let resp = c
        .request("GET", "/api/notes", &[], None)
        .map_err(|e| e.to_string())?;
    if resp.status != 200 {
        return Err(format!("GET /api/notes: {}", resp.status));
    }
    match serde_json::from_str::<Value>(&resp.body) {
        Ok(Value::Array(notes)) => Ok(notes),
        other => Err(format!("not a list: {other:?}")),
    }
}

fn fresh(addr: std::net::SocketAddr, client: &mut Option<TcpClient>) -> &mut TcpClient {
    if client.as_ref().is_none_or(|c| c.closed) {
        *client = Some(TcpClient::connect(addr, CLIENT_TIMEOUT).expect("connect to nginx"));
    }
    client.as_mut().expect("a client")
}

/// One thread's POST → GET pairs: (pairs done, misses).
fn pairs(addr: std::net::SocketAddr, t: usize, n: usize) -> (usize, Vec<String>) {
    let mut client = None;
    let mut misses = Vec::new();
    for i in 0..n {
        let body = json!({"title": format!("ryw t{t} #{i}")}).to_string();
        let c = fresh(addr, &mut client);
        let resp = c
            .request("POST", "/api/notes", &[JSON], Some(body.as_bytes()))
            .expect("POST through nginx");
        assert_eq!(resp.status, 201, "POST: {resp:?}");
        let id = serde_json::from_str::<Value>(&resp.body).expect("json")["id"]
            .as_i64()
            .expect("an id");
        let c = fresh(addr, &mut client);
        let page = head_page(c).expect("GET through nginx");
        if !page.iter().any(|n| n["id"].as_i64() == Some(id)) {
            misses.push(format!(
                "note {id} missing from the page that followed its 201"
            ));
        }
    }
    (n, misses)
}

#[track_caller]
fn assert_head_title(farm: &Farm, title: &str, what: &str) {
    // Three reads: nginx sends them to three hosts.
    for _ in 0..HOSTS {
        let resp = farm.nginx.call("GET", "/api/notes?limit=1", &[], None);
        let notes: Value = serde_json::from_str(&resp.body).expect("json");
        assert_eq!(
            notes[0]["title"], title,
            "{what}: the next page through nginx starts with it: {notes}"
        );
    }
}

#[test]
fn every_note_is_in_the_next_list_page_through_any_host() {
    let _heavy = heavy();
    let Some(farm) = farm("scale_ryw") else {
        return;
    };
    let addr = farm.nginx.addr();
    let t0 = Instant::now();
    let threads: Vec<_> = (0..PAIR_THREADS)
        .map(|t| thread::spawn(move || pairs(addr, t, PAIRS / PAIR_THREADS)))
        .collect();
    let mut done = 0;
    let mut misses = Vec::new();
    for t in threads {
        let (n, m) = t.join().expect("a pair thread");
        done += n;
        misses.extend(m);
    }
    eprintln!(
        "SCALE read-your-writes: {done} POST → GET pairs through nginx in {:?}, {} miss(es)",
        t0.elapsed(),
        misses.len()
    );
    assert!(done >= PAIRS);
    assert!(misses.is_empty(), "{:?}", &misses[..misses.len().min(10)]);

    // Writes that bypass notesd: `notesd seed`, and psql.
    let mut seed = notesd_cmd(["seed", "--count", "5"]);
    seed.env("NOTESD_DATABASE_URL", &farm.url);
    let out = run_with_timeout(seed, Duration::from_secs(30));
    assert_eq!(out.code, Some(0), "seed: {}", out.describe());
    assert_head_title(&farm, "Note 5", "after notesd seed");
    farm.cluster.sql(
        "notesd",
        "INSERT INTO notes (title, body) VALUES ('from psql', NULL)",
    );
    assert_head_title(&farm, "from psql", "after an INSERT by psql");
}

// d -------------------------------------------------------------------------

/// GET `path` over a host's own unix socket: the status, or 0 when it did not answer.
fn status_of(host: &TestServer, path: &str) -> u16 {
    let mut conn = match HttpConn::connect_with_timeout(host.socket_path(), Duration::from_secs(5))
    {
        Ok(c) => c,
        Err(_) => return 0,
    };
    conn.request("GET", path, &[]).map_or(0, |r| r.status)
}

#[test]
fn every_host_answers_503_while_postgres_restarts_and_serves_within_2s_after() {
    let _heavy = heavy();
    let Some(mut farm) = farm("scale_pgrestart") else {
        return;
    };
    for h in &mut farm.hosts {
        // Database errors during the outage may be logged at error level.
        h.allow_errors();
    }
    farm.cluster.stop_server();
    for (i, host) in farm.hosts.iter().enumerate() {
        assert!(
            poll_until(Duration::from_secs(5), || status_of(host, "/api/notes")
                == 503),
            "host {i} does not answer 503 with PostgreSQL down"
        );
        assert_eq!(status_of(host, "/readyz"), 503, "host {i}: /readyz");
        assert_eq!(status_of(host, "/healthz"), 200, "host {i}: /healthz");
    }
    thread::sleep(Duration::from_secs(1));
    farm.cluster.start_server();
    let up = Instant::now();
    let mut worst = Duration::ZERO;
    for (i, host) in farm.hosts.iter().enumerate() {
        assert!(
            poll_until(Duration::from_secs(5), || status_of(host, "/api/notes")
                == 200),
            "host {i} does not serve again within 5 s of PostgreSQL being back"
        );
        worst = worst.max(up.elapsed());
    }
    eprintln!("SCALE postgres restart: every host serving again {worst:?} after it was back");
    assert!(
        worst <= Duration::from_secs(2),
        "a host took {worst:?} to serve again (≤ 2 s)"
    );
    // And through nginx, for every host.
    for _ in 0..HOSTS {
        assert_eq!(farm.nginx.call("GET", "/api/notes", &[], None).status, 200);
    }
}

// e -------------------------------------------------------------------------

/// Debian 12's PgBouncer (1.18) cannot track prepared statements, and sqlx
/// prepares every query (Parse/Describe, then Bind/Execute, in two round
/// trips): in transaction pooling the second half may land on another server
/// connection ("prepared statement \"sqlx_s_1\" already exists"). Session
/// pooling works: the farm's rolling reload and read-your-writes through it.
#[test]
fn pgbouncer_in_session_pooling_carries_a_rolling_reload_and_read_your_writes() {
    let _heavy = heavy();
    let Some(farm) = farm_with("scale_bouncer", Some("session")) else {
        return;
    };
    farm.rolling_reload_under_load("pgbouncer (session)", Duration::from_millis(500));
    let (done, misses) = pairs(farm.nginx.addr(), 0, 500);
    assert!(
        misses.is_empty(),
        "through PgBouncer: {:?}",
        &misses[..misses.len().min(10)]
    );
    eprintln!("SCALE pgbouncer (session): {done} POST → GET pairs, 0 misses");
}
