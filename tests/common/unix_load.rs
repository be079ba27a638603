//! Load generator: keep-alive `GET` loops over the unix socket, counting
//! what succeeds, fails and is retried. (The mixed load through nginx is
//! in `load`.)

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::{HttpConn, HttpError};

/// Upper bound on load connections: the machine has 2 cores.
pub const MAX_LOAD_CONNECTIONS: usize = 8;

#[derive(Debug, Clone, Default)]
pub struct LoadStats {
    /// Requests answered 200 (including those that succeeded on a retry).
    pub ok: u64,
    /// Connect errors, non-200 answers, errors mid-response, timeouts, failed retries.
    pub failed: u64,
    /// Requests resent once because a reused keep-alive connection was closed
    /// by the server before any byte of the response (RFC 9112 §9.3.1).
    pub retried: u64,
    /// Responses that carried `Connection: close`.
    pub closed_by_server: u64,
    /// The first few failures, for diagnostics.
    pub errors: Vec<String>,
}

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    closed_by_server: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
}

impl Counters {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if errors.len() < 20 {
            errors.push(what);
        }
    }
}

/// N threads, each looping `GET path` on its own keep-alive connection until
/// `stop()` or `max_duration`.
pub struct Load {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(socket: &Path, connections: usize, path: &str, max_duration: Duration) -> Load {
        assert!(
            (1..=MAX_LOAD_CONNECTIONS).contains(&connections),
            "load connections must be 1..={MAX_LOAD_CONNECTIONS}"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let deadline = Instant::now() + max_duration;
        let threads = (0..connections)
            .map(|i| {
                let stop = Arc::clone(&stop);
                let counters = Arc::clone(&counters);
                let socket = socket.to_path_buf();
                let path = path.to_string();
                thread::Builder::new()
                    .name(format!("load-{i}"))
                    .spawn(move || load_loop(&socket, &path, &stop, deadline, &counters))
                    .expect("spawn a load thread")
            })
            .collect();
        Load {
            stop,
            counters,
            threads,
        }
    }

    /// Requests answered 200 so far.
    pub fn ok_so_far(&self) -> u64 {
        self.counters.ok.load(Ordering::Relaxed)
    }

    /// Stops the threads (bounded: every request has a timeout) and returns the counts.
    pub fn stop(mut self) -> LoadStats {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                self.counters.fail("a load thread panicked".to_string());
            }
        }
        LoadStats {
            ok: self.counters.ok.load(Ordering::SeqCst),
            failed: self.counters.failed.load(Ordering::SeqCst),
            retried: self.counters.retried.load(Ordering::SeqCst),
            closed_by_server: self.counters.closed_by_server.load(Ordering::SeqCst),
            errors: self
                .counters
                .errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

const LOAD_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

fn load_loop(socket: &Path, path: &str, stop: &AtomicBool, deadline: Instant, c: &Counters) {
    let mut conn: Option<HttpConn> = None;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let mut current = match conn.take() {
            Some(existing) => existing,
            None => match HttpConn::connect_with_timeout(socket, LOAD_REQUEST_TIMEOUT) {
                Ok(fresh) => fresh,
                Err(e) => {
                    c.fail(format!("connect: {e:?}"));
                    thread::sleep(Duration::from_millis(20));
                    continue;
                }
            },
        };
        let reused = current.is_reused();
        let result = match current.request("GET", path, &[]) {
            Err(HttpError::ClosedBeforeResponse(why)) if reused => {
                // The server closed an idle keep-alive connection as we reused
                // it: resend once on a fresh connection, as every client does.
                c.retried.fetch_add(1, Ordering::Relaxed);
                match HttpConn::connect_with_timeout(socket, LOAD_REQUEST_TIMEOUT) {
                    Ok(mut fresh) => {
                        let r = fresh
                            .request("GET", path, &[])
                            .map_err(|e| format!("retry after ({why}) failed: {e:?}"));
                        current = fresh;
                        r
                    }
                    Err(e) => Err(format!("reconnect for a retry after ({why}): {e:?}")),
                }
            }
            other => other.map_err(|e| format!("{e:?} (connection reused: {reused})")),
        };
        match result {
            Ok(resp) => {
                if resp.status == 200 {
                    c.ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.fail(format!("status {} body {:?}", resp.status, resp.body));
                }
                if resp.connection_close() {
                    c.closed_by_server.fetch_add(1, Ordering::Relaxed);
                } else {
                    conn = Some(current);
                }
            }
            Err(e) => c.fail(e),
        }
    }
}
