//! Load through a real nginx, for the tests that change things under it
//! (chaos.rs, upgrade.rs): the rig (notesd on PostgreSQL behind nginx), a
//! mixed keep-alive GET/POST load with one record per request, and the checks
//! on what it saw (failures, lost writes).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use super::nginx::{AccessEntry, Nginx, NginxOptions, TcpClient};
use super::notes::*;
use super::*;

/// Load connections (nginx's clients). ≤ 16, and one per request in flight:
/// the in-flight bound of a kill.
pub const CONNECTIONS: usize = 8;

/// Per-request client timeout: far above any legitimate answer, so a hang is
/// seen as a failure instead of stalling the test.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// The rig: notesd on PostgreSQL, nginx in front
// ---------------------------------------------------------------------------

pub struct Rig {
    // Dropped first: nginx, then the server, then its database.
    pub nginx: Nginx,
    pub server: NotesServer,
}

/// notesd (2 workers, PostgreSQL, `tweak`ed) behind nginx; `None` (after a
/// loud SKIP) when nginx or PostgreSQL is missing outside CI.
pub fn rig(name: &str, tweak: impl FnOnce(&mut TestOptions), nginx: NginxOptions) -> Option<Rig> {
    super::nginx::require_nginx()?;
    let server = start(Backend::Postgres, name, tweak)?;
    let nginx = Nginx::start(name, server.socket(), nginx)?;
    // Through nginx end to end before any load.
    let resp = nginx.call("GET", "/healthz", &[], None);
    assert_eq!(resp.status, 200, "GET /healthz through nginx: {resp:?}");
    Some(Rig { nginx, server })
}

// ---------------------------------------------------------------------------
// Mixed load through nginx
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    List,
    Create,
}

/// One request of the load.
#[derive(Clone, Debug)]
pub struct Record {
    pub kind: Kind,
    pub conn: usize,
    /// Since the load started.
    pub start: Duration,
    pub end: Duration,
    /// The status, or the transport error.
    pub outcome: Result<u16, String>,
    /// The id of a note acknowledged with 201.
    pub id: Option<i64>,
    /// A GET resent once after its reused keep-alive connection was closed
    /// before any byte of the answer.
    pub retried: bool,
}

impl Record {
    pub fn ok(&self) -> bool {
        matches!(self.outcome, Ok(s) if (200..300).contains(&s))
    }

    pub fn describe(&self) -> String {
        let what = match &self.outcome {
            Ok(s) => format!("status {s}"),
            Err(e) => format!("error {e}"),
        };
        format!(
            "{:?} on conn {} at {:.3}s..{:.3}s: {what}{}",
            self.kind,
            self.conn,
            self.start.as_secs_f64(),
            self.end.as_secs_f64(),
            if self.retried { " (retried)" } else { "" }
        )
    }
}

/// `connections` threads, each on its own keep-alive connection to nginx,
/// sending GET /api/notes?limit=10 twice, then one POST /api/notes, round
/// and round, until stopped.
pub struct MixedLoad {
    t0: Instant,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<Vec<Record>>>,
}

impl MixedLoad {
    pub fn start(addr: SocketAddr, connections: usize, tag: &str) -> MixedLoad {
        assert!((1..=16).contains(&connections), "≤ 16 load connections");
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..connections)
            .map(|conn| {
                let stop = stop.clone();
                let tag = tag.to_string();
                thread::Builder::new()
                    .name(format!("chaos-load-{conn}"))
                    .spawn(move || load_loop(addr, conn, &tag, t0, &stop))
                    .expect("spawn a load thread")
            })
            .collect();
        MixedLoad { t0, stop, threads }
    }

    /// Time since the load started.
    pub fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    pub fn stop(mut self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        let mut records = Vec::new();
        for t in self.threads.drain(..) {
            records.extend(t.join().expect("a load thread panicked"));
        }
        records.sort_by_key(|r| r.start);
        Report {
            records,
            duration: self.t0.elapsed(),
        }
    }
}

impl Drop for MixedLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

pub fn load_loop(
    addr: SocketAddr,
    conn: usize,
    tag: &str,
    t0: Instant,
    stop: &AtomicBool,
) -> Vec<Record> {
    let mut records = Vec::new();
    let mut client: Option<TcpClient> = None;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let kind = if i.is_multiple_of(3) {
            Kind::Create
        } else {
            Kind::List
        };
        let title = format!("chaos {tag} c{conn} #{i}");
        let body = json!({ "title": title, "body": "load" }).to_string();
        let send = |c: &mut TcpClient| match kind {
            Kind::List => c.request("GET", "/api/notes?limit=10", &[], None),
            Kind::Create => c.request("POST", "/api/notes", &[JSON], Some(body.as_bytes())),
        };
        let start = t0.elapsed();
        let mut retried = false;
        let result = match client.take() {
            Some(mut c) => {
                let reused = c.is_reused();
                match send(&mut c) {
                    Err(HttpError::ClosedBeforeResponse(_)) if reused && kind == Kind::List => {
                        // nginx closed an idle client connection as we reused
                        // it: an idempotent request may be resent, once.
                        retried = true;
                        TcpClient::connect(addr, CLIENT_TIMEOUT)
                            .and_then(|mut fresh| send(&mut fresh).map(|r| (r, fresh)))
                    }
                    other => other.map(|r| (r, c)),
                }
            }
            None => TcpClient::connect(addr, CLIENT_TIMEOUT)
                .and_then(|mut fresh| send(&mut fresh).map(|r| (r, fresh))),
        };
        let end = t0.elapsed();
        let (outcome, id) = match result {
            Ok((resp, c)) => {
                let id = (resp.status == 201)
                    .then(|| serde_json::from_str::<serde_json::Value>(&resp.body).ok())
                    .flatten()
                    .and_then(|v| v["id"].as_i64());
                if !c.closed {
                    client = Some(c);
                }
                let outcome = if resp.status == 201 && id.is_none() {
                    Err(format!("201 without an id: {:?}", resp.body))
                } else {
                    Ok(resp.status)
                };
                (outcome, id)
            }
            Err(e) => (Err(e.to_string()), None),
        };
        let failed = outcome.is_err();
        records.push(Record {
            kind,
            conn,
            start,
            end,
            outcome,
            id,
            retried,
        });
        if failed {
            // Don't spin on a refused connect.
            thread::sleep(Duration::from_millis(5));
        }
    }
    records
}

/// What the load saw.
pub struct Report {
    pub records: Vec<Record>,
    pub duration: Duration,
}

impl Report {
    pub fn total(&self) -> usize {
        self.records.len()
    }

    pub fn ok(&self) -> usize {
        self.records.iter().filter(|r| r.ok()).count()
    }

    /// Records that are neither 2xx nor accepted by `expected`.
    pub fn failures(&self, expected: impl Fn(&Record) -> bool) -> Vec<&Record> {
        self.records
            .iter()
            .filter(|r| !r.ok() && !expected(r))
            .collect()
    }

    /// Ids acknowledged with a 201.
    pub fn created(&self) -> BTreeSet<i64> {
        self.records.iter().filter_map(|r| r.id).collect()
    }

    /// Count by outcome: "200", "201", "502", "error".
    pub fn by_outcome(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for r in &self.records {
            let k = match &r.outcome {
                Ok(s) => s.to_string(),
                Err(_) => "error".to_string(),
            };
            *m.entry(k).or_insert(0) += 1;
        }
        m
    }

    pub fn max_latency(&self) -> Duration {
        self.records
            .iter()
            .map(|r| r.end.saturating_sub(r.start))
            .max()
            .unwrap_or_default()
    }

    pub fn retried(&self) -> usize {
        self.records.iter().filter(|r| r.retried).count()
    }

    /// `requests=… ok=… rps=… outcomes={…} creates=… max_latency=…`.
    pub fn summary(&self) -> String {
        format!(
            "requests={} ok={} rps={:.0} outcomes={:?} created={} client_retries={} max_latency_ms={}",
            self.total(),
            self.ok(),
            self.total() as f64 / self.duration.as_secs_f64().max(0.001),
            self.by_outcome(),
            self.created().len(),
            self.retried(),
            self.max_latency().as_millis()
        )
    }
}

/// The first `n` failures, one per line.
pub fn list(failures: &[&Record], n: usize) -> String {
    failures
        .iter()
        .take(n)
        .map(|r| format!("  {}", r.describe()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `502=… 504=… 503=… nginx_retries=…` from nginx's access log.
pub fn nginx_figures(nginx: &Nginx) -> String {
    let entries: Vec<AccessEntry> = nginx.access_entries();
    let count = |s: u16| entries.iter().filter(|e| e.status == s).count();
    format!(
        "nginx_requests={} 502={} 503={} 504={} nginx_retries={}",
        entries.len(),
        count(502),
        count(503),
        count(504),
        entries.iter().filter(|e| e.retried()).count()
    )
}

// ---------------------------------------------------------------------------
// 8. Zero lost writes
// ---------------------------------------------------------------------------

/// Every id acknowledged with a 201 is there (one list walk over the socket).
#[track_caller]
pub fn assert_no_lost_writes(what: &str, server: &NotesServer, acknowledged: &BTreeSet<i64>) {
    let present: BTreeSet<i64> = server
        .list_all(200)
        .iter()
        .filter_map(|n| n["id"].as_i64())
        .collect();
    let missing: Vec<i64> = acknowledged.difference(&present).copied().collect();
    eprintln!(
        "CHAOS {what} writes: acknowledged={} present_in_db={} missing={} (unacknowledged but committed={})",
        acknowledged.len(),
        present.len(),
        missing.len(),
        present.difference(acknowledged).count()
    );
    assert!(
        missing.is_empty(),
        "{what}: {} note(s) acknowledged with 201 are lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
}
