//! The router: one `match` on (method, path). Handlers return
//! `Result<Response, ApiError>`; errors become JSON at [`error`]'s edge.

pub(crate) mod error;
pub(crate) mod host;
pub(crate) mod idempotency;
pub(crate) mod list_cache;
pub(crate) mod metrics;
pub(crate) mod notes;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

pub(crate) use error::ApiError;

use crate::scoreboard::{Flags, Route, Slot};
use crate::store::Store;
use crate::store::idempotency::{Claim, IdempotencyKey};

pub(crate) type Body = Full<Bytes>;

/// What handlers may use: the store, the scoreboard and a few settings.
pub(crate) struct AppState {
    pub store: Store,
    /// This worker's slot; `/metrics` reads the whole board through it.
    pub slot: Slot,
    pub max_body_bytes: u64,
    /// Pages of `GET /api/notes` until the next write (`http.list_cache_ms`).
    pub list_cache: list_cache::ListCache,
    /// `http.idempotency_ttl`, in seconds.
    pub idempotency_ttl: i64,
    /// Test-only routes under /debug (env NOTESD_DEBUG_ROUTES=1; never in production).
    pub debug_routes: bool,
}

impl AppState {
    /// Call before a write reaches the store; when the guard drops (the write
    /// finished, failed or was cut short) cached list pages are stale.
    pub(crate) fn writing(&self) -> Writing<'_> {
        Writing(self)
    }

    /// `key` standing for this request (method, path, JSON body).
    pub(crate) fn claim(
        &self,
        key: IdempotencyKey,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Claim {
        Claim {
            key,
            fingerprint: crate::store::idempotency::fingerprint(method, path, body),
            ttl_secs: self.idempotency_ttl,
        }
    }
}

/// See [`AppState::writing`].
pub(crate) struct Writing<'a>(&'a AppState);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.slot.board().bump_write_generation();
    }
}

/// The route a path counts under in `/metrics`.
pub(crate) fn metric_route(path: &str) -> Route {
    match path {
        "/" => Route::Root,
        "/healthz" => Route::Healthz,
        "/readyz" => Route::Readyz,
        "/api/notes" => Route::Notes,
        "/metrics" => Route::Metrics,
        p if p
            .strip_prefix("/api/notes/")
            .is_some_and(|id| notes::parse_id(id).is_some()) =>
        {
            Route::Note
        }
        _ => Route::Other,
    }
}

const ALLOW_READ: &str = "GET, HEAD";
const ALLOW_LIST: &str = "GET, HEAD, POST";
const ALLOW_NOTE: &str = "GET, HEAD, PUT, PATCH, DELETE";

/// Serialize straight into the response body.
pub(crate) fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    json_response(status, json_bytes(value))
}

/// `value` as JSON bytes (a fixed error document if it cannot be encoded).
pub(crate) fn json_bytes<T: Serialize>(value: &T) -> Bytes {
    match serde_json::to_vec(value) {
        Ok(b) => Bytes::from(b),
        Err(_) => {
            Bytes::from_static(br#"{"error":{"code":"internal","message":"encoding failed"}}"#)
        }
    }
}

/// A response with a JSON body already encoded.
pub(crate) fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Route a request. The caller wraps it with the request timeout, the request
/// id and the access log.
pub(crate) async fn route(
    app: &AppState,
    req: Request<Incoming>,
    deadline: tokio::time::Instant,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/") => Ok(json_response(
            StatusCode::OK,
            Bytes::from_static(br#"{"message":"Hello, production!"}"#),
        )),
        (&Method::GET | &Method::HEAD, "/healthz") => Ok(json_response(
            StatusCode::OK,
            Bytes::from_static(br#"{"ok":true}"#),
        )),
        (&Method::GET | &Method::HEAD, "/readyz") => Ok(readyz(app).await),
        (&Method::GET | &Method::HEAD, "/metrics") => Ok(metrics::render(&app.slot).await),
        (_, "/" | "/healthz" | "/readyz" | "/metrics") => {
            Err(ApiError::MethodNotAllowed { allow: ALLOW_READ })
        }
        (&Method::GET | &Method::HEAD, "/api/notes") => notes::list(app, &req).await,
        (&Method::POST, "/api/notes") => notes::create(app, req, deadline).await,
        (_, "/api/notes") => Err(ApiError::MethodNotAllowed { allow: ALLOW_LIST }),
        (method, p) if p.starts_with("/api/notes/") => {
            let id = notes::parse_id(&p["/api/notes/".len()..])
                .ok_or_else(|| ApiError::NotFound(format!("no note at {p}")))?;
            match *method {
                Method::GET | Method::HEAD => notes::get(app, id).await,
                Method::PUT => notes::put(app, id, req, deadline).await,
                Method::PATCH => notes::patch(app, id, req, deadline).await,
                Method::DELETE => notes::delete(app, id, &req).await,
                _ => Err(ApiError::MethodNotAllowed { allow: ALLOW_NOTE }),
            }
        }
        (&Method::GET, "/debug/sleep" | "/debug/block") if app.debug_routes => {
            let ms = query_u64(req.uri().query(), "ms")
                .unwrap_or(100)
                .min(600_000);
            if path == "/debug/block" {
                // Deliberately blocks the worker's only thread: heartbeat stops.
                std::thread::sleep(Duration::from_millis(ms));
            } else {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            Ok(json(StatusCode::OK, &serde_json::json!({"slept_ms": ms})))
        }
        (&Method::GET, "/debug/ballast") if app.debug_routes => {
            let mib = query_u64(req.uri().query(), "mib").unwrap_or(0).min(4096);
            set_ballast(mib);
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({"ballast_mib": mib, "pid": std::process::id()}),
            ))
        }
        _ => Err(ApiError::NotFound(format!("no route for {path}"))),
    }
}

/// How long a request waited before notesd began on it: now (the wall
/// clock) minus nginx's `X-Request-Start: t=<epoch seconds>.<ms>` (the
/// shipped site sets it; also read: whole ms or µs since the epoch). A
/// missing or unparsable value, one in the future, or one more than an hour
/// old (a clock jump, a replayed header) gives None: never an error.
pub(crate) fn queue_time(
    header: Option<&HeaderValue>,
    now: std::time::SystemTime,
) -> Option<Duration> {
    let text = header?.to_str().ok()?.trim();
    let value = text.strip_prefix("t=").unwrap_or(text);
    let since_epoch = if value.contains('.') {
        let secs: f64 = value.parse().ok()?;
        Duration::try_from_secs_f64(secs).ok()?
    } else {
        let n: u64 = value.parse().ok()?;
        match value.len() {
            16.. => Duration::from_micros(n),
            13..=15 => Duration::from_millis(n),
            _ => Duration::from_secs(n),
        }
    };
    let started = std::time::UNIX_EPOCH.checked_add(since_epoch)?;
    let waited = now.duration_since(started).ok()?;
    (waited < Duration::from_secs(3600)).then_some(waited)
}

/// Memory a worker holds for the tests of memory recycling (`/debug/ballast`,
/// and `NOTESD_DEBUG_BALLAST_MIB` at boot): written, so it is resident.
static BALLAST: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// Hold `mib` MiB from now on (0 frees it); test-only, behind the debug routes.
pub(crate) fn set_ballast(mib: u64) {
    if let Ok(mut b) = BALLAST.lock() {
        *b = vec![0x5a; (mib as usize) << 20];
    }
}

/// Ready to take traffic: not stopping, not drained (`notesd drain`), and
/// the database answers `SELECT 1` within a second.
async fn readyz(app: &AppState) -> Response<Body> {
    let flags = app.slot.board().flags();
    let unready = if flags.has(Flags::STOPPING) {
        Some(&br#"{"ok":false,"error":"shutting down"}"#[..])
    } else if flags.has(Flags::DRAIN) {
        Some(&br#"{"ok":false,"error":"draining"}"#[..])
    } else {
        None
    };
    if let Some(body) = unready {
        return json_response(StatusCode::SERVICE_UNAVAILABLE, Bytes::from_static(body));
    }
    match app.store.ping(Duration::from_secs(1)).await {
        Ok(()) => json(StatusCode::OK, &serde_json::json!({"ok": true})),
        Err(e) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"ok": false, "error": e.to_string()}),
        ),
    }
}

fn query_u64(query: Option<&str>, key: &str) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

/// A request id: the client's if it is sane (1–64 of `[A-Za-z0-9._-]`), else ours.
pub(crate) fn request_id(
    incoming: Option<&HeaderValue>,
    generate: impl FnOnce() -> HeaderValue,
) -> HeaderValue {
    incoming
        .filter(|v| {
            let s = v.as_bytes();
            !s.is_empty()
                && s.len() <= 64
                && s.iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        })
        .cloned()
        .unwrap_or_else(generate)
}

/// Our request id: `<pid hex>-<per-worker counter hex>`, unique per host.
pub(crate) fn generated_request_id(pid: u32, token: u64) -> HeaderValue {
    fn push_hex(buf: &mut [u8; 25], len: &mut usize, v: u64) {
        let digits = (64 - (v | 1).leading_zeros()).div_ceil(4) as usize;
        for i in (0..digits).rev() {
            buf[*len] = b"0123456789abcdef"[((v >> (i * 4)) & 0xf) as usize];
            *len += 1;
        }
    }
    let mut buf = [0u8; 25];
    let mut len = 0;
    push_hex(&mut buf, &mut len, u64::from(pid));
    buf[len] = b'-';
    len += 1;
    push_hex(&mut buf, &mut len, token);
    HeaderValue::from_bytes(&buf[..len]).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_time_reads_nginx_msec_and_ignores_garbage() {
        let now = std::time::UNIX_EPOCH + Duration::from_millis(1_796_546_558_500);
        let q = |v: &str| queue_time(Some(&HeaderValue::from_str(v).expect("header")), now);
        assert_eq!(q("t=1796546558.250"), Some(Duration::from_millis(250)));
        assert_eq!(q("1796546558.000"), Some(Duration::from_millis(500)));
        assert_eq!(q("t=1796546558400"), Some(Duration::from_millis(100)));
        assert_eq!(q("t=1796546558450000"), Some(Duration::from_millis(50)));
        assert_eq!(q("t=1796546559.000"), None, "the future");
        assert_eq!(q("t=1000000000.000"), None, "years ago");
        for bad in [
            "",
            "t=",
            "t=abc",
            "t=-5.0",
            "t=1e9",
            "t=NaN",
            "t=..",
            "t=99999999999999999999999",
            "t=100000000000000000000.0",
            "t=1.0e20",
            "t=inf",
            "t=0.0",
        ] {
            assert_eq!(q(bad), None, "{bad:?}");
        }
        assert_eq!(queue_time(None, now), None);
    }

    #[test]
    fn request_ids_are_echoed_only_when_sane() {
        let generate = || HeaderValue::from_static("generated");
        let ok = HeaderValue::from_static("abc-123.x_y");
        assert_eq!(request_id(Some(&ok), generate), "abc-123.x_y");
        let bad = HeaderValue::from_static("a b");
        assert_eq!(request_id(Some(&bad), generate), "generated");
        let long = HeaderValue::from_str(&"a".repeat(65)).expect("header");
        assert_eq!(request_id(Some(&long), generate), "generated");
        assert_eq!(request_id(None, generate), "generated");
    }

    #[test]
    fn generated_ids_are_pid_and_counter_in_hex() {
        assert_eq!(generated_request_id(0x1f2e, 1), "1f2e-1");
        assert_eq!(generated_request_id(1, 0), "1-0");
        assert_eq!(
            generated_request_id(u32::MAX, u64::MAX),
            "ffffffff-ffffffffffffffff"
        );
        assert_eq!(
            generated_request_id(4096, 255),
            format!("{:x}-{:x}", 4096, 255)
        );
    }

    #[test]
    fn query_parsing() {
        assert_eq!(query_u64(Some("a=1&ms=250"), "ms"), Some(250));
        assert_eq!(query_u64(Some("ms=x"), "ms"), None);
        assert_eq!(query_u64(None, "ms"), None);
    }

    #[test]
    fn errors_have_the_documented_shape() {
        let r = ApiError::MethodNotAllowed { allow: "GET, HEAD" }.into_response();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[hyper::header::ALLOW], "GET, HEAD");
    }
}
