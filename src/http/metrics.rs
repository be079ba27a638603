//! `GET /metrics`: Prometheus text for all workers together, read from the
//! scoreboard (every slot's counters, which only grow: see `scoreboard`).

use std::fmt::Write;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};

use crate::scoreboard::{BUCKETS, Route, Scoreboard, Totals};

pub(crate) fn render(board: &Scoreboard) -> Response<Full<Bytes>> {
    let text = format(&board.totals());
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
