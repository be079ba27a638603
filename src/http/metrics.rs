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
use crate::scoreboard::{BUCKETS, Route, Scoreboard, Totals};

pub(crate) async fn render(board: &Scoreboard) -> Response<Full<Bytes>> {
    let mut text = format(&board.totals());
    format_recycles(&mut text, board.recycles());
    // Off the event loop: `smaps_rollup` costs 0.15–0.6 ms a process, and a
    // scrape reads every worker's (the worker's other connections go on).
    let pids = live_processes(board);
    let procs = tokio::task::spawn_blocking(move || read_processes(pids))
        .await
        .unwrap_or_default();
    format_processes(&mut text, &procs);
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
    out.push_str("# HELP notesd_worker_restarts_total Workers that died without being asked to.\n");
    out.push_str("# TYPE notesd_worker_restarts_total counter\n");
    let _ = writeln!(out, "notesd_worker_restarts_total {}", t.restarts);
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
