//! Accept loop, one hyper HTTP/1.1 connection per task, graceful drain.
//!
//! Drain (SIGTERM, master gone): stop accepting — after serving what the
//! listeners have queued, when they close for good (a shutdown, the master
//! gone: see `empties_the_queues`); every response from then on
//! carries `Connection: close`, so each connection ends after the request it
//! is serving or the next one that arrives; idle ones end at `keepalive`.
//! The worker exits when the last connection is gone, or at `graceful_timeout`.

use std::convert::Infallible;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::body::{Body as _, Incoming};
use hyper::header::{CONNECTION, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Notify;

use super::Channel;
use super::acceptor::{Acceptor, AcceptorError};
use super::lifecycle::{Lifecycle, Stop};
use crate::clock;
use crate::config::Config;
use crate::http::list_cache::ListCache;
use crate::http::{self, ApiError, AppState, Body};
use crate::ipc::ToMaster;
use crate::scoreboard::Route;
use crate::scoreboard::ext;
use crate::scoreboard::phase::{self, PhaseCell};
use crate::scoreboard::{Flags, Slot, WorkerPhase};
use crate::store::Store;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Seconds a client has to send its request head when `keepalive = 0`.
const HEAD_TIMEOUT_WITHOUT_KEEPALIVE: u64 = 5;

/// Everything a request needs, shared by all connections of this worker.
pub(crate) struct Shared {
    pub app: AppState,
    pub config: Arc<Config>,
    pub slot: Slot,
    pub channel: Channel,
    pid: u32,
    draining: AtomicBool,
    /// Retire after this many requests (0 = never).
    retire_at: u64,
    retire_sent: AtomicBool,
    next_token: AtomicU64,
    connections: AtomicUsize,
    idle: Notify,
    in_flight: InFlight,
}

/// Removes a request from the in-flight set when it ends, however it ends.
struct InFlightGuard<'a> {
    shared: &'a Shared,
    token: u64,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.shared.in_flight.end(&self.shared.slot, self.token);
        self.shared.slot.request_finished();
    }
}

/// A request being served, as the scoreboard shows it. Only its phase cell
/// is allocated per request: the method and URI share hyper's parsed
/// request, the id is the client's header value or one generated into a
/// small buffer.
struct InFlightRequest {
    method: hyper::Method,
    uri: hyper::Uri,
    id: HeaderValue,
    started_ns: u64,
    /// Where the request is (see `scoreboard::phase`).
    phase: Arc<PhaseCell>,
    /// Its slow-request record was written (one per request).
    reported: bool,
}

/// The requests in flight on this worker. The scoreboard slot shows the
/// **oldest** one: when the master kills a stuck worker, that is the request
/// it names (a newer request finishing must not hide an older one still running).
/// Tokens only grow, so the queue stays in age order by appending; it keeps its
/// capacity between requests.
struct InFlight {
    queue: std::sync::Mutex<std::collections::VecDeque<(u64, InFlightRequest)>>,
    /// `http.slow_request_ms` and the database's name for the records (None: off).
    slow: Option<(Duration, String)>,
}

impl InFlight {
    fn new(config: &Config) -> InFlight {
        InFlight {
            queue: Default::default(),
            slow: config.slow_request().map(|t| (t, config.database_peer())),
        }
    }

    fn publish(slot: &Slot, token: u64, r: &InFlightRequest) {
        let id = r.id.to_str().unwrap_or("");
        slot.begin_request(token, r.method.as_str(), r.uri.path(), id, r.started_ns);
        r.phase.make_front();
    }

    /// Write one record for each request running longer than the threshold
    /// that has none yet. The queue is in age order: only its slow head is read.
    fn report_slow(&self, slot: &Slot, now_ns: u64) {
        let Some((threshold, database)) = &self.slow else {
            return;
        };
        let Ok(mut queue) = self.queue.lock() else {
            return;
        };
        let limit = threshold.as_nanos() as u64;
        for (i, (token, r)) in queue.iter_mut().enumerate() {
            let elapsed = now_ns.saturating_sub(r.started_ns);
            if elapsed < limit {
                break;
            }
            if Self::claim(slot, i == 0, *token, r) {
                slow_record(r, elapsed, now_ns, database, false);
            }
        }
    }

    /// This request's record is ours to write (once): the oldest request's
    /// is shared with the master, which writes it when this thread is stuck
    /// (see `Slot::claim_report`).
    fn claim(slot: &Slot, front: bool, token: u64, r: &mut InFlightRequest) -> bool {
        !std::mem::replace(&mut r.reported, true) && (!front || slot.claim_report(token))
    }

    fn begin(&self, slot: &Slot, token: u64, r: InFlightRequest) {
        let Ok(mut queue) = self.queue.lock() else {
            return;
        };
        if queue.is_empty() {
            Self::publish(slot, token, &r);
        }
        queue.push_back((token, r));
    }

    /// The request ended. One that passed the threshold between two checks
    /// gets its record now.
    fn end(&self, slot: &Slot, token: u64) {
        let Ok(mut queue) = self.queue.lock() else {
            return;
        };
        let Some(at) = queue.iter().position(|(t, _)| *t == token) else {
            return;
        };
        if let (Some((threshold, database)), Some((_, r))) = (&self.slow, queue.get_mut(at)) {
            let now_ns = clock::coarse_now_ns();
            let elapsed = now_ns.saturating_sub(r.started_ns);
            if elapsed >= threshold.as_nanos() as u64 && Self::claim(slot, at == 0, token, r) {
                slow_record(r, elapsed, now_ns, database, true);
            }
        }
        queue.remove(at);
        if at == 0 {
            match queue.front() {
                Some((t, r)) => Self::publish(slot, *t, r),
                None => slot.end_request(token),
            }
        }
    }
}

impl Shared {
    pub(crate) fn new(config: Arc<Config>, store: Store, slot: Slot, channel: Channel) -> Shared {
        let in_flight = InFlight::new(&config);
        let pid = std::process::id();
        let s = &config.server;
        let retire_at = if s.max_requests == 0 {
            0
        } else {
            s.max_requests + jitter(pid, s.max_requests_jitter)
        };
        Shared {
            app: AppState {
                store,
                slot: slot.clone(),
                max_body_bytes: config.http.max_body_bytes,
                list_cache: ListCache::new(Duration::from_millis(config.http.list_cache_ms)),
                idempotency_ttl: i64::try_from(config.http.idempotency_ttl).unwrap_or(i64::MAX),
                debug_routes: debug_routes(),
            },
            config,
            slot,
            channel,
            pid,
            draining: AtomicBool::new(false),
            retire_at,
            retire_sent: AtomicBool::new(false),
            next_token: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
            idle: Notify::new(),
            in_flight,
        }
    }
}

/// The test-only routes under /debug (`NOTESD_DEBUG_ROUTES=1`); with them,
/// `NOTESD_DEBUG_BALLAST_MIB` makes the worker hold that much memory from
/// its start (the tests of `max_worker_memory`).
fn debug_routes() -> bool {
    let on = std::env::var("NOTESD_DEBUG_ROUTES").is_ok_and(|v| v == "1");
    if on
        && let Some(mib) = std::env::var("NOTESD_DEBUG_BALLAST_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
    {
        http::set_ballast(mib);
    }
    on
}

/// A per-worker random 0..=jitter (no RNG crate needed: pid and clock suffice).
fn jitter(pid: u32, jitter: u64) -> u64 {
    if jitter == 0 {
        return 0;
    }
    let mut x = clock::now_ns() ^ (u64::from(pid) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x % (jitter + 1)
}

/// Rows one purge statement deletes at most: a short statement, so a write
/// queued behind it (SQLite's write lock) waits milliseconds, not seconds.
const PURGE_BATCH: i64 = 500;

/// How often a worker purges expired idempotency keys: every
/// `http.idempotency_ttl`, at least every second and at most every minute,
/// plus up to half that again at random, so the workers (and the hosts on
/// one database) spread their purges. Batches follow each other until one
/// finds fewer than [`PURGE_BATCH`] rows. Requests never wait for it: an
/// expired key is claimed afresh whether or not its row was purged yet.
async fn purge_keys(shared: Arc<Shared>) {
    let ttl = Duration::from_secs(shared.config.http.idempotency_ttl);
    let every = ttl.clamp(Duration::from_secs(1), Duration::from_secs(60));
    let spread = (every.as_millis() / 2) as u64;
    loop {
        tokio::time::sleep(every + Duration::from_millis(jitter(shared.pid, spread))).await;
        if shared.draining.load(Ordering::Acquire) {
            return;
        }
        let mut purged = 0;
        loop {
            match shared.app.store.purge_keys(PURGE_BATCH).await {
                Ok(n) => {
                    purged += n;
                    if n < PURGE_BATCH as u64 {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                // The requests report an outage; the next round retries.
                Err(e) if e.is_unavailable() || e.is_timeout() => break,
                Err(e) => {
                    tracing::warn!("purging expired idempotency keys: {e}");
                    break;
                }
            }
        }
        if purged > 0 {
            tracing::debug!("purged {purged} expired idempotency key(s)");
        }
    }
}

/// The inherited listeners, made non-blocking and handed to the accept path
/// (see [`super::acceptor`]), which starts taking connections at once.
pub(crate) fn adopt_listeners(
    fds: Vec<(bool, OwnedFd)>,
    acceptor: &Acceptor,
    runtime_epoll: BorrowedFd<'_>,
) -> Result<(), AcceptorError> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    for (_, fd) in &fds {
        // Keep the other status flags: add O_NONBLOCK, do not replace them.
        let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(AcceptorError::Nonblocking)?;
        let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
        fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(AcceptorError::Nonblocking)?;
    }
    acceptor.start(runtime_epoll, fds)
}

/// Serve until told to stop; returns why.
pub(crate) async fn run(shared: Arc<Shared>, acceptor: Arc<Acceptor>, life: Lifecycle) -> Stop {
    let mut builder = http1::Builder::new();
    let keepalive = shared.config.server.keepalive;
    builder
        .timer(TokioTimer::new())
        .keep_alive(keepalive > 0)
        // Also the idle keep-alive lifetime: hyper starts it when it waits for a
        // request head. Without keep-alive it only bounds the first head (slowloris).
        .header_read_timeout(Duration::from_secs(if keepalive > 0 {
            keepalive
        } else {
            HEAD_TIMEOUT_WITHOUT_KEEPALIVE
        }))
        // A request is served to its end even if the client's side closes
        // meanwhile (gunicorn's sync workers do the same): a write is never
        // cut off between its query and its commit by a client going away,
        // and hyper does not read the socket while a handler waits on the
        // database. That read cost each database request a new 8 KiB buffer
        // (the request still holds the old one).
        .half_close(true)
        .max_header_size(shared.config.http.max_header_bytes as usize)
        .max_buf_size((shared.config.http.max_header_bytes as usize).max(8192) + 8192);
    let builder = Arc::new(builder);
    let accepting = tokio::spawn(serve_accepted(acceptor.clone(), shared.clone(), builder));
    if let Some(threshold) = shared.config.slow_request() {
        tokio::spawn(watch_slow(shared.clone(), threshold));
    }
    tokio::spawn(purge_keys(shared.clone()));
    let why = life.stopped().await;
    if empties_the_queues(why, shared.slot.board().flags()) {
        acceptor.close_when_empty();
    } else {
        acceptor.stop();
    }
    shared.draining.store(true, Ordering::Release);
    shared.slot.set_phase(WorkerPhase::Draining);
    if why == Stop::Now {
        return why;
    }
    // Every connection this worker took is served (with `Connection: close`).
    let _ = accepting.await;
    let grace = shared.config.graceful_timeout();
    let open = shared.connections.load(Ordering::Acquire);
    tracing::info!("draining ({why:?}) with {open} connection(s) open");
    let drained = tokio::time::timeout(grace, async {
        loop {
            let idle = shared.idle.notified();
            if shared.connections.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    });
    tokio::select! {
        r = drained => if r.is_err() {
            tracing::warn!(
                "graceful_timeout reached with {} connection(s) still open; closing them",
                shared.connections.load(Ordering::Acquire)
            );
        },
        _ = life.stopped_now() => {}
    }
    why
}

/// Does this stop close the listeners for good, so that what is queued on
/// them must be served first? A TERM while the master is stopping, or the
/// master's death — unless the listeners are systemd's, which keeps them
/// and their queue for the next start. A reload or recycle stops accepting
/// at once: the other workers take the queue.
fn empties_the_queues(why: Stop, flags: Flags) -> bool {
    let closing = match why {
        Stop::Drain => flags.has(Flags::STOPPING),
        Stop::MasterGone => true,
        Stop::Now => false,
    };
    closing && !flags.has(Flags::ACTIVATED)
}

/// Serve what the accept path hands over until it stops (see [`super::acceptor`]).
async fn serve_accepted(
    acceptor: Arc<Acceptor>,
    shared: Arc<Shared>,
    builder: Arc<http1::Builder>,
) {
    let mut check = super::acceptor::check_interval();
    while let Some(a) = acceptor.next(&mut check).await {
        shared.slot.connection_accepted();
        let served = if a.unix {
            let s = std::os::unix::net::UnixStream::from(a.fd);
            tokio::net::UnixStream::from_std(s)
                .map(|s| spawn_conn(TokioIo::new(s), &shared, &builder))
        } else {
            let s = std::net::TcpStream::from(a.fd);
            let _ = s.set_nodelay(true);
            tokio::net::TcpStream::from_std(s)
                .map(|s| spawn_conn(TokioIo::new(s), &shared, &builder))
        };
        if let Err(e) = served {
            tracing::warn!("cannot register an accepted connection: {e}");
        }
    }
}

fn spawn_conn<I>(io: I, shared: &Arc<Shared>, builder: &Arc<http1::Builder>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let shared = shared.clone();
    let builder = builder.clone();
    shared.connections.fetch_add(1, Ordering::AcqRel);
    shared.slot.connection_opened();
    tokio::spawn(async move {
        let svc_shared = shared.clone();
        let service = service_fn(move |req| {
            let shared = svc_shared.clone();
            async move { Ok::<_, Infallible>(handle(&shared, req).await) }
        });
        // No graceful_shutdown() on drain: hyper would close a connection it
        // thinks idle even with a request already in its socket buffer, and
        // nginx never replays that request if it is a POST (502). Instead a
        // draining worker answers with `Connection: close` (see `handle`) and
        // idle connections end at `keepalive`, after nginx's shorter upstream
        // keepalive_timeout has closed them from its side. `run` bounds it
        // all by graceful_timeout; Stop::Now ends the runtime outright.
        let result = builder.serve_connection(io, service).await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
        shared.slot.connection_closed();
        if shared.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            shared.idle.notify_waiters();
        }
    });
}

/// One request: id, scoreboard, timeout, routing, counters, access log.
async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let token = shared.next_token.fetch_add(1, Ordering::Relaxed) + 1;
    let pid = shared.pid;
    let request_id = http::request_id(req.headers().get(&X_REQUEST_ID), || {
        http::generated_request_id(pid, token)
    });
    let method = req.method().clone();
    let route = http::metric_route(req.uri().path());
    // The access log's copy of the URI; the in-flight entry has its own.
    let logged_uri = shared.config.log.access_log.then(|| req.uri().clone());
    let phase = PhaseCell::new(shared.slot.clone());
    shared.in_flight.begin(
        &shared.slot,
        token,
        InFlightRequest {
            method: method.clone(),
            uri: req.uri().clone(),
            id: request_id.clone(),
            started_ns: clock::now_ns(),
            phase: phase.clone(),
            reported: false,
        },
    );
    shared.slot.request_started();
    // Ends the request in the scoreboard even if hyper drops this future
    // (the client went away mid-request).
    let in_flight = InFlightGuard { shared, token };
    // A bad Host (RFC 9112 §3.2) is answered 400 and the connection closed.
    let host = http::host::check(req.version(), req.headers());
    let bad_host = host.is_err();
    let queued = queue_time(&req, route);
    let mut resp = match host.map(|()| shed(shared, route, queued)) {
        Err(e) => ApiError::BadRequest(e.to_string()).into_response(),
        Ok(Some(overloaded)) => overloaded.into_response(),
        Ok(None) => {
            let route = std::pin::pin!(route_within_timeout(shared, req));
            phase::scope(phase, route).await
        }
    };
    resp.headers_mut()
        .insert(X_REQUEST_ID.clone(), request_id.clone());
    // Draining is read once the answer is ready: a request in flight when
    // the worker was told to stop closes its connection too.
    if bad_host || shared.draining.load(Ordering::Acquire) {
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    drop(in_flight);
    shared
        .slot
        .record(route, resp.status().as_u16(), started.elapsed());
    let served = shared.slot.count_request();
    if shared.retire_at > 0
        && served >= shared.retire_at
        && !shared.retire_sent.swap(true, Ordering::AcqRel)
    {
        shared.channel.send(&ToMaster::Retire { requests: served });
    }
    if let Some(uri) = logged_uri {
        log_access(&AccessLine {
            method: &method,
            path: uri.path(),
            status: resp.status().as_u16(),
            bytes: resp.body().size_hint().exact().unwrap_or(0),
            elapsed: started.elapsed(),
            queued,
            pid,
            request_id: request_id.to_str().unwrap_or(""),
        });
    }
    resp
}

/// The request's time in the queue (nginx's `X-Request-Start`), counted
/// for `/metrics`; None without a usable header.
fn queue_time(req: &Request<Incoming>, route: Route) -> Option<Duration> {
    static X_REQUEST_START: HeaderName = HeaderName::from_static("x-request-start");
    let waited = http::queue_time(
        req.headers().get(&X_REQUEST_START),
        std::time::SystemTime::now(),
    );
    // The probes and scrapes are not the traffic whose queue matters.
    if !matches!(route, Route::Healthz | Route::Readyz | Route::Metrics) {
        match waited {
            Some(w) => ext::queue_time(w),
            None => ext::queue_unknown(),
        }
    }
    waited
}

/// Load shedding (`http.max_queue_ms`): a request that already waited
/// longer is answered 503 "overloaded" before any work. Never a probe
/// (`/healthz`, `/readyz`) or a scrape (`/metrics`).
fn shed(shared: &Shared, route: Route, queued: Option<Duration>) -> Option<ApiError> {
    let max = shared.config.max_queue()?;
    let waited = queued.filter(|q| *q > max)?;
    if matches!(route, Route::Healthz | Route::Readyz | Route::Metrics) {
        return None;
    }
    ext::shed();
    Some(ApiError::Overloaded {
        waited_ms: waited.as_millis() as u64,
        max_ms: max.as_millis() as u64,
    })
}

/// Route the request, answering 503 once `http.request_timeout` is up.
async fn route_within_timeout(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let limit = shared.config.http.request_timeout;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(limit);
    match tokio::time::timeout_at(deadline, http::route(&shared.app, req, deadline)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => e.into_response(),
        Err(_) => ApiError::Timeout(limit).into_response(),
    }
}

/// The slow-request record (`http.slow_request_ms`) of a request still
/// running, or of one that `finished` past the threshold between two checks.
fn slow_record(r: &InFlightRequest, elapsed_ns: u64, now_ns: u64, database: &str, finished: bool) {
    let phase = r.phase.get();
    let doing = phase.map_or_else(|| "not published".into(), |p| p.describe(now_ns, database));
    let ms = elapsed_ns / 1_000_000;
    let path = r.uri.path();
    let request_id = r.id.to_str().unwrap_or("");
    let (state, last) = if finished {
        ("answered after", "; last: ")
    } else {
        ("running", ": ")
    };
    tracing::warn!(
        request_id,
        method = %r.method,
        route = http::metric_route(path).label(),
        elapsed_ms = ms,
        worker_pid = std::process::id(),
        phase = phase.map_or("unknown", |p| p.name()),
        query = phase.and_then(|p| p.query).map_or("", |q| q.name()),
        peer = database,
        "slow request: {} {path} (request id {request_id}) {state} {ms} ms{last}{doing}",
        r.method,
    );
}

/// Write the slow-request records while the worker serves (see
/// [`InFlight::report_slow`]): checked often enough to be within a tenth
/// of the threshold (at most every 250 ms). Ends with the runtime.
async fn watch_slow(shared: Arc<Shared>, threshold: Duration) {
    let every = (threshold / 10).clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        shared.in_flight.report_slow(&shared.slot, clock::now_ns());
    }
}

/// One access-log line's contents.
struct AccessLine<'a> {
    method: &'a hyper::Method,
    path: &'a str,
    status: u16,
    bytes: u64,
    elapsed: Duration,
    /// Time in the queue before notesd began (X-Request-Start), when known.
    queued: Option<Duration>,
    pid: u32,
    request_id: &'a str,
}

/// The access line: a message (what `journalctl` shows as MESSAGE) and the
/// same facts as fields (for JSON logs and journal queries).
fn log_access(a: &AccessLine<'_>) {
    let ms = a.elapsed.as_secs_f64() * 1000.0;
    let queue_ms = a.queued.map(|q| q.as_secs_f64() * 1000.0);
    tracing::info!(
        target: crate::log::ACCESS_TARGET,
        method = %a.method,
        path = a.path,
        status = a.status,
        bytes = a.bytes,
        duration_ms = format_args!("{ms:.3}"),
        queue_ms = queue_ms.map(|q| format!("{q:.3}")),
        pid = a.pid,
        request_id = a.request_id,
        "{} {} {} {ms:.3}ms",
        a.method,
        a.path,
        a.status,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every event's fields as `name=value` strings.
    struct Capture(std::sync::Arc<std::sync::Mutex<Vec<Vec<String>>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Fields(Vec<String>);
            impl tracing::field::Visit for Fields {
                fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    self.0.push(format!("{}={v:?}", f.name()));
                }
            }
            let mut fields = Fields(Vec::new());
            event.record(&mut fields);
            if let Ok(mut events) = self.0.lock() {
                events.push(fields.0);
            }
        }
    }

    /// D5: journald shows an entry's MESSAGE; an access line must have one
    /// that says what happened, not only structured fields.
    #[test]
    fn the_access_line_has_a_message_naming_method_path_and_status() {
        use tracing_subscriber::layer::SubscriberExt;
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(Capture(events.clone()));
        tracing::subscriber::with_default(subscriber, || {
            log_access(&AccessLine {
                method: &hyper::Method::POST,
                path: "/api/notes",
                status: 201,
                bytes: 9,
                elapsed: Duration::from_micros(1500),
                queued: Some(Duration::from_micros(250)),
                pid: 42,
                request_id: "rid-1",
            });
        });
        let events = events.lock().expect("lock");
        let [fields] = &events[..] else {
            panic!("one event: {events:?}")
        };
        let message = fields
            .iter()
            .find(|f| f.starts_with("message="))
            .unwrap_or_else(|| panic!("no message field: {fields:?}"));
        assert!(message.contains("POST /api/notes 201 1.500ms"), "{message}");
        for f in ["status=201", "request_id=\"rid-1\"", "pid=42"] {
            assert!(fields.iter().any(|x| x == f), "{f} in {fields:?}");
        }
    }

    #[test]
    fn only_a_final_stop_empties_the_queues_and_never_systemds() {
        let stopping = Flags(Flags::STOPPING);
        assert!(empties_the_queues(Stop::Drain, stopping));
        assert!(
            !empties_the_queues(Stop::Drain, Flags::default()),
            "reload, recycle"
        );
        assert!(empties_the_queues(Stop::MasterGone, Flags::default()));
        assert!(!empties_the_queues(Stop::Now, stopping));
        let activated = Flags(Flags::STOPPING | Flags::ACTIVATED);
        assert!(!empties_the_queues(Stop::Drain, activated));
        assert!(!empties_the_queues(Stop::MasterGone, activated));
    }

    #[test]
    fn jitter_stays_in_range() {
        for pid in 1..200 {
            assert!(jitter(pid, 10) <= 10);
        }
        assert_eq!(jitter(5, 0), 0);
    }
}
