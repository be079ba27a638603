//! `GET /metrics`: Prometheus text for all workers together, read from the
//! scoreboard (every slot's counters, which only grow: see `scoreboard`),
//! and each live process's CPU, memory and fds read from `/proc` at the
//! scrape (Prometheus' process-collector names, labelled `process` =
//! master|worker, `pid` and, for a worker, its `slot`; a dead worker's
//! series go with it).

use std::fmt::Write;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};

use crate::procfs;
use crate::scoreboard::ext::{ErrorClass, ExtTotals};
use crate::scoreboard::{BUCKETS, Route, Scoreboard, Slot, Totals};

pub(crate) async fn render(slot: &Slot) -> Response<Full<Bytes>> {
    let board = slot.board();
    let mut text = format(&board.totals());
    format_recycles(&mut text, board.recycles());
    let mut saturation = board.ext_totals();
    // This scrape is in flight on this worker: busy only if something else is.
    if slot.in_flight() <= 1 {
        saturation.busy = saturation.busy.saturating_sub(1);
    }
    format_saturation(&mut text, &saturation);
    format_lifecycle(&mut text, board, saturation.log_dropped);
    format_listen_queues(&mut text, &board.listeners());
    // Off the event loop: `smaps_rollup` costs 0.15–0.6 ms a process, and a
    // scrape reads every worker's (the worker's other connections go on).
    let pids = live_processes(board);
    let procs = tokio::task::spawn_blocking(move || read_processes(pids))
        .await
        .unwrap_or_default();
    format_processes(&mut text, &procs);
    if let Some(master) = procs.iter().find(|p| p.slot.is_none()) {
        let _ = writeln!(
            text,
            "# HELP notesd_master_start_time_seconds When the master started (Unix seconds; kept across upgrades in place).\n# TYPE notesd_master_start_time_seconds gauge\nnotesd_master_start_time_seconds {}",
            master.usage.start_time_seconds
        );
    }
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

pub(crate) fn format(t: &Totals) -> String {
    let mut out = String::with_capacity(4096);
    out.push_str(
        "# HELP notesd_http_requests_total HTTP requests answered, by route and status.\n",
    );
    out.push_str("# TYPE notesd_http_requests_total counter\n");
    for route in Route::ALL {
        let label = route.label();
        for s in 0..Totals::status_buckets() {
            let n = t.requests(route, s);
            if n == 0 {
                continue;
            }
            let status = Totals::status_label(s);
            let _ = writeln!(
                out,
                "notesd_http_requests_total{{route=\"{label}\",status=\"{status}\"}} {n}"
            );
        }
    }
    out.push_str(
        "# HELP notesd_http_request_duration_seconds Time to answer a request, by route.\n",
    );
    out.push_str("# TYPE notesd_http_request_duration_seconds histogram\n");
    for route in Route::ALL {
        let label = route.label();
        let count: u64 = (0..=BUCKETS.len()).map(|b| t.bucket(route, b)).sum();
        if count == 0 {
            continue;
        }
        let mut cumulative = 0;
        for (b, le) in BUCKETS.iter().enumerate() {
            cumulative += t.bucket(route, b);
            let _ = writeln!(
                out,
                "notesd_http_request_duration_seconds_bucket{{route=\"{label}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "notesd_http_request_duration_seconds_bucket{{route=\"{label}\",le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "notesd_http_request_duration_seconds_sum{{route=\"{label}\"}} {:.6}",
            t.sum_seconds(route)
        );
        let _ = writeln!(
            out,
            "notesd_http_request_duration_seconds_count{{route=\"{label}\"}} {count}"
        );
    }
    out.push_str("# HELP notesd_http_requests_in_flight Requests being answered now.\n");
    out.push_str("# TYPE notesd_http_requests_in_flight gauge\n");
    let _ = writeln!(out, "notesd_http_requests_in_flight {}", t.in_flight);
    out.push_str("# HELP notesd_workers Worker processes, by state.\n");
    out.push_str("# TYPE notesd_workers gauge\n");
    for (state, n) in [
        ("booting", t.workers_booting),
        ("serving", t.workers_serving),
        ("draining", t.workers_draining),
    ] {
        let _ = writeln!(out, "notesd_workers{{state=\"{state}\"}} {n}");
    }
    out
}

/// `notesd_worker_recycles_total{reason}`: workers the master stopped on purpose.
fn format_recycles(out: &mut String, counts: [u64; 4]) {
    use crate::master::state::RecycleReason;
    out.push_str(
        "# HELP notesd_worker_recycles_total Workers stopped on purpose (replacement first), by reason.\n",
    );
    out.push_str("# TYPE notesd_worker_recycles_total counter\n");
    for reason in RecycleReason::ALL {
        let _ = writeln!(
            out,
            "notesd_worker_recycles_total{{reason=\"{}\"}} {}",
            reason.label(),
            counts[reason as usize]
        );
    }
}

/// A histogram in Prometheus text: non-cumulative `buckets` (the last is
/// +Inf) and the sum in µs.
fn histogram(out: &mut String, name: &str, help: &str, buckets: &[u64], sum_us: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (b, n) in buckets.iter().enumerate() {
        cumulative += n;
        match BUCKETS.get(b) {
            Some(le) => writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}"),
            None => writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}"),
        }
        .ok();
    }
    let _ = writeln!(
        out,
        "{name}_sum {:.6}\n{name}_count {cumulative}",
        sum_us as f64 / 1e6
    );
}

/// One sample with its HELP and TYPE.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// Where requests wait and what is shed: queue time, busy workers, the
/// pool, database errors by class, the list cache.
fn format_saturation(out: &mut String, t: &ExtTotals) {
    histogram(
        out,
        "notesd_http_request_queue_seconds",
        "Time from nginx taking a request (X-Request-Start) to notesd handling it.",
        &t.queue,
        t.queue_sum_us,
    );
    single(
        out,
        "notesd_http_request_queue_unknown_total",
        "counter",
        "Requests without a usable X-Request-Start (not sent through the shipped nginx site, or this host's clock behind nginx's): their queue time is not measured, and they are never shed.",
        t.queue_unknown,
    );
    single(
        out,
        "notesd_http_shed_total",
        "counter",
        "Requests answered 503 overloaded because they waited longer than http.max_queue_ms.",
        t.shed,
    );
    single(
        out,
        "notesd_workers_busy",
        "gauge",
        "Workers with at least one request in flight.",
        t.busy,
    );
    single(
        out,
        "notesd_db_pool_connections_in_use",
        "gauge",
        "Database connections handed out, all workers together.",
        t.pool_in_use,
    );
    single(
        out,
        "notesd_db_pool_connections_open",
        "gauge",
        "Database connections open (in use + idle), all workers together.",
        t.pool_open,
    );
    histogram(
        out,
        "notesd_db_pool_acquire_seconds",
        "Time a request waited for a database connection from its worker's pool.",
        &t.pool_wait,
        t.pool_wait_sum_us,
    );
    single(
        out,
        "notesd_db_pool_acquire_timeouts_total",
        "counter",
        "Requests that got no database connection within the pool's acquire timeout (answered 503).",
        t.pool_timeouts,
    );
    let _ = writeln!(
        out,
        "# HELP notesd_db_errors_total Database errors, by class: connection (I/O, SQLSTATE 08, 57P01-57P03), resources (53), canceled (57014), rollback (40), other.\n# TYPE notesd_db_errors_total counter"
    );
    for class in ErrorClass::ALL {
        let _ = writeln!(
            out,
            "notesd_db_errors_total{{class=\"{}\"}} {}",
            class.label(),
            t.db_errors[class as usize]
        );
    }
    let _ = writeln!(
        out,
        "# HELP notesd_list_cache_requests_total GET /api/notes answered from a page read before (hit) or by the query (miss), while the cache is on.\n# TYPE notesd_list_cache_requests_total counter"
    );
    let _ = writeln!(
        out,
        "notesd_list_cache_requests_total{{result=\"hit\"}} {}",
        t.cache_hits
    );
    let _ = writeln!(
        out,
        "notesd_list_cache_requests_total{{result=\"miss\"}} {}",
        t.cache_misses
    );
    single(
        out,
        "notesd_list_cache_validations_total",
        "counter",
        "Commit-token queries run to validate cached pages (one may serve many requests).",
        t.cache_validations,
    );
}

/// Each listener's accept queue and backlog, as the master last read them
/// from the kernel (within a tick, ≤ 250 ms).
fn format_listen_queues(out: &mut String, listeners: &[(String, u32, u32)]) {
    let _ = writeln!(
        out,
        "# HELP notesd_listen_queue Connections waiting in a listening socket's accept queue (ss Recv-Q).\n# TYPE notesd_listen_queue gauge"
    );
    for (name, queued, _) in listeners {
        let _ = writeln!(
            out,
            "notesd_listen_queue{{listener=\"{}\"}} {queued}",
            label_value(name)
        );
    }
    let _ = writeln!(
        out,
        "# HELP notesd_listen_queue_max The listening socket's backlog: beyond it the kernel refuses or drops connections (ss Send-Q).\n# TYPE notesd_listen_queue_max gauge"
    );
    for (name, _, backlog) in listeners {
        let _ = writeln!(
            out,
            "notesd_listen_queue_max{{listener=\"{}\"}} {backlog}",
            label_value(name)
        );
    }
}

/// A label value escaped for the text format.
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `notesd_worker_restarts_total{reason}`: workers that died unasked,
/// killed at `timeout`, by the OOM killer, or otherwise ("crash": a
/// signal, a panic, an exit). A board from an older master does not split
/// them: all are "crash" there.
fn format_restarts(out: &mut String, restarts: u64, split: Option<[u64; 3]>) {
    let [crash, timeouts, ooms] = split.unwrap_or([restarts, 0, 0]);
    let _ = writeln!(
        out,
        "# HELP notesd_worker_restarts_total Workers that died without being asked to, by reason (timeout, oom, crash).\n# TYPE notesd_worker_restarts_total counter"
    );
    for (reason, n) in [("crash", crash), ("timeout", timeouts), ("oom", ooms)] {
        let _ = writeln!(
            out,
            "notesd_worker_restarts_total{{reason=\"{reason}\"}} {n}"
        );
    }
}

/// Build, restarts, dropped log lines (`workers_dropped`: the workers'
/// own, from the slot sums already taken), generation and reloads.
fn format_lifecycle(out: &mut String, board: &Scoreboard, workers_dropped: u64) {
    let _ = writeln!(
        out,
        "# HELP notesd_build_info The notesd version answering this scrape.\n# TYPE notesd_build_info gauge\nnotesd_build_info{{version=\"{}\"}} 1",
        crate::VERSION
    );
    format_restarts(out, board.restarts(), board.restart_reasons());
    single(
        out,
        "notesd_log_lines_dropped_total",
        "counter",
        "Log lines that could not be written to log.file (a full disk): dropped, never waited for; logging resumes by itself.",
        workers_dropped + board.master_log_dropped(),
    );
    single(
        out,
        "notesd_generation",
        "gauge",
        "The newest generation of workers (each reload starts one).",
        board.generation(),
    );
    let _ = writeln!(
        out,
        "# HELP notesd_reloads_total Reloads (HUP, notesd reload, upgrades), by outcome.\n# TYPE notesd_reloads_total counter"
    );
    for (result, n) in ["complete", "refused", "abandoned"]
        .iter()
        .zip(board.reloads())
    {
        let _ = writeln!(out, "notesd_reloads_total{{result=\"{result}\"}} {n}");
    }
}

/// A live process and its figures: `slot` is None for the master.
pub(crate) struct Process {
    slot: Option<u32>,
    /// A label too: a slot's next worker starts its CPU counter from 0, so
    /// each process is its own series (which goes when the process does).
    pid: i32,
    usage: procfs::Usage,
}

/// The master (this worker's parent) and every worker with a slot: (slot, pid).
fn live_processes(board: &Scoreboard) -> Vec<(Option<u32>, i32)> {
    let master = nix::unistd::getppid().as_raw();
    let workers = board
        .live_pids()
        .into_iter()
        .map(|(slot, pid)| (Some(slot), pid as i32));
    std::iter::once((None, master))
        .filter(|(_, pid)| *pid > 1)
        .chain(workers)
        .collect()
}

/// Each process as `/proc` shows it now; one that vanished mid-read is left out.
fn read_processes(pids: Vec<(Option<u32>, i32)>) -> Vec<Process> {
    pids.into_iter()
        .filter_map(|(slot, pid)| {
            let usage = procfs::usage(pid).ok()?;
            Some(Process { slot, pid, usage })
        })
        .collect()
}

pub(crate) fn format_processes(out: &mut String, procs: &[Process]) {
    type Figure = fn(&procfs::Usage) -> Option<f64>;
    let families: [(&str, &str, &str, Figure); 5] = [
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            |u| Some(u.cpu_seconds),
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            |u| Some(u.rss_bytes as f64),
        ),
        (
            "notesd_process_pss_bytes",
            "gauge",
            "Proportional set size in bytes (shared pages split among their users; what max_worker_memory is held against).",
            |u| u.pss_bytes.map(|b| b as f64),
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            |u| u.open_fds.map(|n| n as f64),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            |u| Some(u.start_time_seconds),
        ),
    ];
    for (name, kind, help, figure) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for p in procs {
            let Some(v) = figure(&p.usage) else { continue };
            let _ = match p.slot {
                None => writeln!(out, "{name}{{process=\"master\",pid=\"{}\"}} {v}", p.pid),
                Some(slot) => writeln!(
                    out,
                    "{name}{{process=\"worker\",slot=\"{slot}\",pid=\"{}\"}} {v}",
                    p.pid
                ),
            };
        }
    }
}
