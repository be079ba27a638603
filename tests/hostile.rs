//! Hostile input, sent raw over the unix socket: a generated corpus of
//! malformed and malicious requests (broken request lines, invalid methods
//! and versions, oversized and injected headers, every kind of broken
//! framing, invalid UTF-8, deep JSON, out-of-range numbers, SQL-looking
//! strings, path traversal, percent-encoding junk, garbage pipelined after a
//! valid request) and slowloris trickles.
//!
//! Each request must be answered with a 4xx, or the connection closed —
//! never a 5xx, never a hang (a few requests of the corpus are valid in
//! disguise and may succeed: they are marked so). Afterwards the workers are
//! the same processes (no crash, `restarts` 0, no `panicked` in the log) and
//! they hold no more file descriptors than before (a small tolerance for the
//! database pool, which opens its connections lazily).
//!
//! The corpus runs on both backends (SQL strings must round-trip literally on
//! each); the slowloris tests on SQLite.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::notes::*;
use common::*;
use serde_json::json;

both_backends!(corpus_is_answered_4xx_or_closed_and_costs_nothing);

/// `http.max_header_bytes` of the servers under test (small, to reach it cheaply).
const MAX_HEADER: usize = 8192;
/// `http.max_body_bytes` of the servers under test.
const MAX_BODY: usize = 64 * 1024;
/// A request neither answered nor closed by then is a hang.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(4);
/// Connections sending the corpus at once.
const PARALLEL: usize = 4;

fn hostile_options(o: &mut TestOptions) {
    o.keepalive = 2;
    // No /debug routes: the corpus probes them as unknown paths.
    o.debug_routes = false;
    o.extra_toml =
        format!("[http]\nmax_header_bytes = {MAX_HEADER}\nmax_body_bytes = {MAX_BODY}\n");
}

// ---------------------------------------------------------------------------
// Raw exchanges
// ---------------------------------------------------------------------------

/// One answer, parsed loosely.
#[derive(Clone, Debug)]
struct Answer {
    status: u16,
    /// The raw head (status line and headers), for checks on what was echoed.
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.head.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// What the server did with one connection's bytes.
#[derive(Clone, Debug, Default)]
struct Exchange {
    /// Final answers in order (1xx interim answers are skipped).
    answers: Vec<Answer>,
    /// The server closed the connection (EOF or reset) before we stopped reading.
    closed: bool,
    /// Neither the answers expected nor a close came within the timeout.
    timed_out: bool,
    /// Writing failed (the server closed while we were still sending).
    write_error: Option<String>,
    /// Bytes that did not parse as an HTTP/1.1 answer.
    garbage: Option<String>,
}

impl Exchange {
    fn statuses(&self) -> Vec<u16> {
        self.answers.iter().map(|a| a.status).collect()
    }

    fn outcome(&self) -> String {
        let mut s = format!("{:?}", self.statuses());
        if self.closed {
            s.push_str(" closed");
        }
        if self.timed_out {
            s.push_str(" TIMED OUT");
        }
        if let Some(g) = &self.garbage {
            s.push_str(&format!(" garbage {g:?}"));
        }
        s
    }
}

/// Parses complete answers at the start of `buf`; returns them and the bytes
/// consumed. `eof`: no more bytes will come (a body without length ends here).
fn parse_answers(buf: &[u8], eof: bool) -> Result<(Vec<Answer>, usize), String> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let rest = &buf[pos..];
        let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
            if rest.len() > 64 * 1024 {
                return Err("an answer head over 64 KiB".to_string());
            }
            return Ok((out, pos));
        };
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        let status_line = head.split("\r\n").next().unwrap_or_default();
        let status = parse_status_line(status_line)
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let mut answer = Answer {
            status,
            head,
            body: Vec::new(),
        };
        let body_start = end + 4;
        let len = if (100..200).contains(&status) || status == 204 || status == 304 {
            Some(0)
        } else {
            answer
                .header("content-length")
                .map(|l| l.parse::<usize>().map_err(|_| format!("bad length {l:?}")))
                .transpose()?
        };
        if answer
            .header("transfer-encoding")
            .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"))
        {
            return Err("a chunked answer (not expected from notesd)".to_string());
        }
        let consumed = match len {
            Some(n) if rest.len() >= body_start + n => {
                answer.body = rest[body_start..body_start + n].to_vec();
                body_start + n
            }
            Some(_) => return Ok((out, pos)),
            None if eof => {
                answer.body = rest[body_start..].to_vec();
                rest.len()
            }
            None => return Ok((out, pos)),
        };
        pos += consumed;
        if !(100..200).contains(&status) {
            out.push(answer);
        }
    }
}

/// Sends `bytes` on a fresh connection (then half-closes when `eof`) and
/// reads until `want` answers arrived, the server closed, or the timeout.
/// With `linger`, keeps reading that long after the answers, to see whether
/// the server closes the connection.
fn exchange(
    socket: &Path,
    bytes: &[u8],
    eof: bool,
    want: usize,
    linger: Option<Duration>,
) -> Exchange {
    let mut ex = Exchange::default();
    let mut stream = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
    stream
        .set_write_timeout(Some(ANSWER_TIMEOUT))
        .expect("write timeout");
    stream
        .set_read_timeout(Some(Duration::from_millis(20)))
        .expect("read timeout");
    if let Err(e) = stream.write_all(bytes).and_then(|()| stream.flush()) {
        ex.write_error = Some(e.to_string());
    }
    if eof {
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
    let mut deadline = Instant::now() + ANSWER_TIMEOUT;
    let mut answered = false;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => {
                ex.closed = true;
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted) => continue,
            Err(_) => {
                // Reset: the server closed with our bytes unread.
                ex.closed = true;
                break;
            }
        }
        if !answered {
            match parse_answers(&buf, false) {
                Ok((answers, _)) if answers.len() >= want => match linger {
                    None => break,
                    Some(l) => {
                        answered = true;
                        deadline = Instant::now() + l;
                    }
                },
                Ok(_) => {}
                Err(e) => {
                    ex.garbage = Some(e);
                    break;
                }
            }
        }
        if Instant::now() >= deadline {
            ex.timed_out = !answered;
            break;
        }
    }
    match parse_answers(&buf, ex.closed) {
        Ok((answers, used)) => {
            ex.answers = answers;
            if ex.closed && used < buf.len() && ex.garbage.is_none() {
                let tail = String::from_utf8_lossy(&buf[used..buf.len().min(used + 80)]);
                ex.garbage = Some(format!("a truncated answer: {tail:?}"));
            }
        }
        Err(e) => ex.garbage = Some(e),
    }
    ex
}

// ---------------------------------------------------------------------------
// The corpus
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// 4xx, or closed without an answer.
    Reject,
    /// Valid in disguise: anything but a 5xx (or a close).
    NoServerError,
    /// Content-Length and Transfer-Encoding together (RFC 9112 §6.3): a 4xx,
    /// or an answer after which the server closes the connection.
    CloseAfter,
    /// A valid request first (2xx), then garbage: 4xx or closed.
    ValidThenReject,
}

#[derive(Clone, Debug)]
struct Case {
    category: &'static str,
    name: String,
    bytes: Vec<u8>,
    /// Half-close after sending: the request is deliberately incomplete.
    eof: bool,
    expect: Expect,
}

fn case(category: &'static str, name: impl Into<String>, bytes: Vec<u8>, expect: Expect) -> Case {
    Case {
        category,
        name: name.into(),
        bytes,
        eof: false,
        expect,
    }
}

fn truncated(category: &'static str, name: impl Into<String>, bytes: Vec<u8>) -> Case {
    Case {
        eof: true,
        ..case(category, name, bytes, Expect::Reject)
    }
}

/// Deterministic junk bytes.
fn junk(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn req(method: &str, target: &[u8], headers: &[(&str, &[u8])], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\nHost: localhost\r\n");
    for (k, v) in headers {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// A JSON POST/PUT/PATCH with a correct Content-Length.
fn json_req(method: &str, target: &str, body: &[u8]) -> Vec<u8> {
    let len = body.len().to_string();
    req(
        method,
        target.as_bytes(),
        &[
            ("Content-Type", b"application/json"),
            ("Content-Length", len.as_bytes()),
        ],
        body,
    )
}

fn post_with(headers: &[(&str, &[u8])], body: &[u8]) -> Vec<u8> {
    let mut h: Vec<(&str, &[u8])> = vec![("Content-Type", b"application/json")];
    h.extend_from_slice(headers);
    req("POST", b"/api/notes", &h, body)
}

fn request_line_cases(out: &mut Vec<Case>) {
    let methods: [&[u8]; 9] = [
        b"GET",
        b"POST",
        b"DELETE",
        b"get",
        b"GE T",
        b"G\x00T",
        b"",
        b"BREW",
        b"\xc3\xa9GET",
    ];
    let targets: [&[u8]; 9] = [
        b"/",
        b"/api/notes",
        b"*",
        b"",
        b"api/notes",
        b"//api//notes",
        b"/api/notes/\xff\xfe",
        b"/a b",
        b"http://evil.example/api/notes",
    ];
    let versions: [&[u8]; 8] = [
        b"HTTP/1.1",
        b"HTTP/1.0",
        b"HTTP/2.0",
        b"HTTP/0.9",
        b"HTTP/1.2",
        b"http/1.1",
        b"HTTP/1.1 extra",
        b"",
    ];
    for m in methods {
        for t in targets {
            for v in versions {
                let mut bytes = Vec::new();
                bytes.extend_from_slice(m);
                bytes.push(b' ');
                bytes.extend_from_slice(t);
                if !v.is_empty() {
                    bytes.push(b' ');
                    bytes.extend_from_slice(v);
                }
                bytes.extend_from_slice(b"\r\nHost: localhost\r\n\r\n");
                let name = format!(
                    "{} {} {}",
                    String::from_utf8_lossy(m),
                    String::from_utf8_lossy(t),
                    String::from_utf8_lossy(v)
                );
                // Some combinations are plain valid requests.
                out.push(case("request line", name, bytes, Expect::NoServerError));
            }
        }
    }
    // Lines that are broken whatever the rest.
    let long_method = "M".repeat(MAX_HEADER * 2);
    let long_target = format!("/{}", "a".repeat(MAX_HEADER * 2));
    for (name, line) in [
        ("no spaces", b"GET/HTTP/1.1".to_vec()),
        ("only a method", b"GET".to_vec()),
        ("three spaces", b"GET   /   HTTP/1.1".to_vec()),
        ("tab separators", b"GET\t/\tHTTP/1.1".to_vec()),
        ("leading space", b" GET / HTTP/1.1".to_vec()),
        ("NUL line", b"\x00\x00\x00".to_vec()),
        ("bare CR ending", b"GET / HTTP/1.1\rHost: x".to_vec()),
        (
            "method over the header limit",
            format!("{long_method} / HTTP/1.1").into_bytes(),
        ),
        (
            "target over the header limit",
            format!("GET {long_target} HTTP/1.1").into_bytes(),
        ),
        ("version junk", b"GET / HTTP/1.1.1".to_vec()),
        ("version negative", b"GET / HTTP/-1.1".to_vec()),
        ("HTTPS scheme as version", b"GET / HTTPS/1.1".to_vec()),
        ("PRI", b"PRI * HTTP/2.0\r\n\r\nSM".to_vec()),
    ] {
        let mut bytes = line;
        bytes.extend_from_slice(b"\r\n\r\n");
        out.push(case("request line", name, bytes, Expect::Reject));
    }
}

fn header_cases(out: &mut Vec<Case>) {
    // Over http.max_header_bytes, in a value, a name, or by count.
    for size in [MAX_HEADER + 1, MAX_HEADER * 2, 64 * 1024, 1024 * 1024] {
        let v = "v".repeat(size);
        out.push(case(
            "huge headers",
            format!("{size}-byte value"),
            req("GET", b"/", &[("X-Big", v.as_bytes())], b""),
            Expect::Reject,
        ));
        let name = format!("X-{}", "n".repeat(size));
        out.push(case(
            "huge headers",
            format!("{size}-byte name"),
            req("GET", b"/api/notes", &[(name.as_str(), b"v")], b""),
            Expect::Reject,
        ));
    }
    for count in [101, 500, 5000] {
        let mut bytes = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
        for i in 0..count {
            bytes.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        bytes.extend_from_slice(b"\r\n");
        out.push(case(
            "huge headers",
            format!("{count} headers"),
            bytes,
            Expect::Reject,
        ));
    }
    // Just under the limit: valid.
    let fits = "v".repeat(MAX_HEADER - 200);
    out.push(case(
        "huge headers",
        "a header just under max_header_bytes",
        req("GET", b"/healthz", &[("X-Fits", fits.as_bytes())], b""),
        Expect::NoServerError,
    ));

    // Injection and malformed lines, on a GET and on a POST with a valid body.
    let lines: Vec<(&str, Vec<u8>, Expect)> = vec![
        ("CRLF in X-Request-Id", b"X-Request-Id: a\r\nX-Injected: 1".to_vec(), Expect::NoServerError),
        ("bare CR in a value", b"X-A: a\rX-Injected: 1".to_vec(), Expect::Reject),
        ("bare LF in a value", b"X-A: a\nX-Injected: 1".to_vec(), Expect::NoServerError),
        ("NUL in a value", b"X-A: a\x00b".to_vec(), Expect::Reject),
        ("NUL in X-Request-Id", b"X-Request-Id: a\x00b".to_vec(), Expect::Reject),
        ("NUL in a name", b"X-\x00A: b".to_vec(), Expect::Reject),
        ("no colon", b"X-NoColon".to_vec(), Expect::Reject),
        ("space before colon", b"X-A : b".to_vec(), Expect::Reject),
        ("empty name", b": b".to_vec(), Expect::Reject),
        ("space in name", b"X A: b".to_vec(), Expect::Reject),
        ("parenthesis in name", b"X(A): b".to_vec(), Expect::Reject),
        ("control char in name", b"X\x01A: b".to_vec(), Expect::Reject),
        ("non-ASCII name", b"X-\xc3\xa9: b".to_vec(), Expect::Reject),
        ("obs-fold", b"X-A: a\r\n  folded".to_vec(), Expect::NoServerError),
        ("obs-text value", b"X-A: \x80\xff\xfe".to_vec(), Expect::NoServerError),
        ("invalid UTF-8 X-Request-Id", b"X-Request-Id: \xff\xfe".to_vec(), Expect::NoServerError),
        ("huge X-Request-Id", format!("X-Request-Id: {}", "r".repeat(4000)).into_bytes(), Expect::NoServerError),
        ("second Host", b"Host: evil.example".to_vec(), Expect::Reject),
        ("Host with CRLF", b"Host: a\r\nX-Injected: 1".to_vec(), Expect::NoServerError),
        ("Content-Type NUL", b"Content-Type: application/json\x00".to_vec(), Expect::Reject),
        ("Content-Type junk charset", b"Content-Type: application/json; charset=\xff".to_vec(), Expect::NoServerError),
        ("Expect 999", b"Expect: 999-unknown".to_vec(), Expect::NoServerError),
        ("Connection junk", b"Connection: keep-alive, \xff, close".to_vec(), Expect::NoServerError),
        ("Upgrade h2c", b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__".to_vec(), Expect::NoServerError),
        ("Upgrade websocket", b"Connection: Upgrade\r\nUpgrade: websocket".to_vec(), Expect::NoServerError),
        ("whitespace-only line", b"   ".to_vec(), Expect::Reject),
    ];
    for (name, line, expect) in lines {
        let mut get = b"GET /api/notes?limit=1 HTTP/1.1\r\nHost: x\r\n".to_vec();
        get.extend_from_slice(&line);
        get.extend_from_slice(b"\r\n\r\n");
        out.push(case(
            "header injection",
            format!("GET: {name}"),
            get,
            expect,
        ));
        let mut post = b"POST /api/notes HTTP/1.1\r\nHost: x\r\n".to_vec();
        post.extend_from_slice(&line);
        let body = br#"{"title":"hx"}"#;
        post.extend_from_slice(
            format!(
                "\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        post.extend_from_slice(body);
        out.push(case(
            "header injection",
            format!("POST: {name}"),
            post,
            expect,
        ));
    }
}

fn framing_cases(out: &mut Vec<Case>) {
    let body = br#"{"title":"f"}"#;
    // Content-Length values that are not a length.
    for cl in [
        "-1",
        "abc",
        "1e3",
        "0x10",
        "+13",
        "18446744073709551616",
        "99999999999999999999999999",
        "1,2",
        "",
        "13 13",
        "\u{0661}\u{0663}",
        "13\x00",
    ] {
        out.push(case(
            "content-length",
            format!("Content-Length {cl:?}"),
            post_with(&[("Content-Length", cl.as_bytes())], body),
            Expect::Reject,
        ));
    }
    // Valid in disguise, or refused: never a 5xx.
    for cl in ["0013", " 13", "13 ", "13, 13", "9223372036854775807", "0"] {
        out.push(case(
            "content-length",
            format!("Content-Length {cl:?}"),
            post_with(&[("Content-Length", cl.as_bytes())], body),
            Expect::NoServerError,
        ));
    }
    // Duplicates.
    for (a, b, expect) in [
        ("13", "13", Expect::NoServerError),
        ("13", "14", Expect::Reject),
        ("13", "2", Expect::Reject),
        ("13", "-13", Expect::Reject),
        ("13", "", Expect::Reject),
        ("2", "13", Expect::Reject),
    ] {
        out.push(case(
            "content-length",
            format!("Content-Length {a:?} and {b:?}"),
            post_with(
                &[
                    ("Content-Length", a.as_bytes()),
                    ("Content-Length", b.as_bytes()),
                ],
                body,
            ),
            expect,
        ));
    }
    // Declared longer than sent, then EOF; shorter than sent (the rest is
    // the next "request": garbage).
    out.push(truncated(
        "content-length",
        "declared 100, sent 13, EOF",
        post_with(&[("Content-Length", b"100")], body),
    ));
    out.push(case(
        "content-length",
        "declared 5, sent 13",
        post_with(&[("Content-Length", b"5")], body),
        Expect::Reject,
    ));

    // Transfer-Encoding variants with a chunked body.
    let good = chunked(body, 4);
    for (te, expect) in [
        ("chunked", Expect::NoServerError),
        ("Chunked", Expect::NoServerError),
        ("gzip, chunked", Expect::NoServerError),
        ("chunked, chunked", Expect::NoServerError),
        ("identity", Expect::Reject),
        ("gzip", Expect::Reject),
        ("chunked, gzip", Expect::Reject),
        ("xchunked", Expect::Reject),
        ("chunk", Expect::Reject),
        ("chunked\x00", Expect::Reject),
        ("\u{0441}hunked", Expect::Reject),
    ] {
        out.push(case(
            "transfer-encoding",
            format!("Transfer-Encoding {te:?}"),
            post_with(&[("Transfer-Encoding", te.as_bytes())], &good),
            expect,
        ));
    }
    // Content-Length and Transfer-Encoding together (request smuggling shape).
    for (cl, te) in [
        ("13", "chunked"),
        ("0", "chunked"),
        ("4", "chunked"),
        ("1000", "chunked"),
        ("13", "identity"),
    ] {
        let mut bytes = post_with(
            &[
                ("Content-Length", cl.as_bytes()),
                ("Transfer-Encoding", te.as_bytes()),
            ],
            &good,
        );
        // A smuggled second request after the chunked body.
        bytes.extend_from_slice(b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n");
        out.push(case(
            "CL + TE",
            format!("Content-Length {cl} + Transfer-Encoding {te}"),
            bytes,
            Expect::CloseAfter,
        ));
    }

    // Broken chunked bodies.
    let te: &[(&str, &[u8])] = &[("Transfer-Encoding", b"chunked")];
    let big_ext = format!("5;{}\r\n", "e=x;".repeat(20_000));
    let bad_bodies: Vec<(&str, Vec<u8>)> = vec![
        ("non-hex size", b"zz\r\n{}\r\n0\r\n\r\n".to_vec()),
        ("negative size", b"-2\r\n{}\r\n0\r\n\r\n".to_vec()),
        ("0x prefix", b"0x2\r\n{}\r\n0\r\n\r\n".to_vec()),
        ("size with space", b"2 2\r\n{}\r\n0\r\n\r\n".to_vec()),
        ("empty size line", b"\r\n{}\r\n0\r\n\r\n".to_vec()),
        (
            "overflowing size",
            b"ffffffffffffffffffffff\r\n{}\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "u64::MAX size",
            b"ffffffffffffffff\r\n{}\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "huge size, little data",
            b"7fffffffffffffff\r\n{\"title\":\"x\"}".to_vec(),
        ),
        (
            "size over max_body_bytes",
            format!("{:x}\r\n{{}}", MAX_BODY * 4).into_bytes(),
        ),
        ("missing CRLF after data", b"2\r\n{}0\r\n\r\n".to_vec()),
        ("data longer than size", b"1\r\n{}\r\n0\r\n\r\n".to_vec()),
        ("data shorter than size", b"5\r\n{}\r\n0\r\n\r\n".to_vec()),
        ("bare LF after size", b"2\n{}\n0\n\n".to_vec()),
        ("CR without LF", b"2\r{}\r0\r\r".to_vec()),
        (
            "extension flood",
            format!("{big_ext}{{}}\r\n0\r\n\r\n").into_bytes(),
        ),
        (
            "bad trailer line",
            b"2\r\n{}\r\n0\r\nno colon here\r\n\r\n".to_vec(),
        ),
        (
            "NUL in trailer",
            b"2\r\n{}\r\n0\r\nX-T: a\x00b\r\n\r\n".to_vec(),
        ),
        (
            "huge trailer",
            format!(
                "2\r\n{{}}\r\n0\r\nX-T: {}\r\n\r\n",
                "t".repeat(MAX_HEADER * 8)
            )
            .into_bytes(),
        ),
        ("many trailers", {
            let mut b = b"2\r\n{}\r\n0\r\n".to_vec();
            for i in 0..5000 {
                b.extend_from_slice(format!("X-T{i}: v\r\n").as_bytes());
            }
            b.extend_from_slice(b"\r\n");
            b
        }),
        ("no last chunk, EOF", b"2\r\n{}\r\n".to_vec()),
        ("junk instead of a chunk", junk(7, 512)),
    ];
    for (name, b) in bad_bodies {
        out.push(Case {
            eof: true,
            ..case("chunked", name, post_with(te, &b), Expect::Reject)
        });
    }
    // Valid chunked shapes: 1-byte chunks, extensions, trailers.
    for (name, b) in [
        ("1-byte chunks", chunked(br#"{"title":"tiny chunks"}"#, 1)),
        (
            "chunk extension",
            b"d;name=value\r\n{\"title\":\"f\"}\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "trailer",
            b"d\r\n{\"title\":\"f\"}\r\n0\r\nX-T: 1\r\n\r\n".to_vec(),
        ),
        (
            "uppercase hex",
            b"D\r\n{\"title\":\"f\"}\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "leading zeros",
            b"000d\r\n{\"title\":\"f\"}\r\n0000\r\n\r\n".to_vec(),
        ),
    ] {
        out.push(case(
            "chunked",
            name,
            post_with(te, &b),
            Expect::NoServerError,
        ));
    }

    // Bodies on requests that take none, Expect.
    for (name, bytes, expect) in [
        (
            "GET with a body",
            req("GET", b"/api/notes", &[("Content-Length", b"13")], body),
            Expect::NoServerError,
        ),
        (
            "DELETE with a chunked body",
            req(
                "DELETE",
                b"/api/notes/999999",
                &[("Transfer-Encoding", b"chunked")],
                &chunked(body, 5),
            ),
            Expect::Reject,
        ),
        (
            "Expect 100-continue, body sent",
            post_with(
                &[("Expect", b"100-continue"), ("Content-Length", b"13")],
                body,
            ),
            Expect::NoServerError,
        ),
        (
            "HTTP/1.0 POST without a length",
            b"POST /api/notes HTTP/1.0\r\nContent-Type: application/json\r\n\r\n{}".to_vec(),
            Expect::Reject,
        ),
    ] {
        out.push(Case {
            eof: name.starts_with("HTTP/1.0"),
            ..case("framing", name, bytes, expect)
        });
    }
}

fn body_cases(out: &mut Vec<Case>, note: i64) {
    let deep_arrays = "[".repeat(10_000) + &"]".repeat(10_000);
    let deep_objects = "{\"a\":".repeat(10_000) + "1" + &"}".repeat(10_000);
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        // Invalid UTF-8.
        ("lone 0xff", b"\xff".to_vec()),
        (
            "invalid 2-byte sequence",
            b"{\"title\":\"\xc3\x28\"}".to_vec(),
        ),
        ("overlong slash", b"{\"title\":\"\xc0\xaf\"}".to_vec()),
        ("UTF-8 surrogate", b"{\"title\":\"\xed\xa0\x80\"}".to_vec()),
        (
            "beyond U+10FFFF",
            b"{\"title\":\"a\xf4\x90\x80\x80\"}".to_vec(),
        ),
        ("truncated sequence", b"{\"title\":\"\xe2\x82\"}".to_vec()),
        ("invalid UTF-8 in a key", b"{\"\xff\":\"x\"}".to_vec()),
        (
            "invalid UTF-8 in body",
            b"{\"title\":\"t\",\"body\":\"\xfe\"}".to_vec(),
        ),
        ("Latin-1 body", b"{\"title\":\"caf\xe9\"}".to_vec()),
        ("UTF-16 body", b"\xff\xfe{\x00}\x00".to_vec()),
        // Deep nesting (10k).
        ("10k nested arrays", deep_arrays.clone().into_bytes()),
        ("10k nested objects", deep_objects.clone().into_bytes()),
        (
            "10k nested title",
            format!("{{\"title\":{deep_arrays}}}").into_bytes(),
        ),
        (
            "10k nested body",
            format!("{{\"title\":\"t\",\"body\":{deep_objects}}}").into_bytes(),
        ),
        ("10k unclosed", "[{".repeat(5_000).into_bytes()),
        // Numbers out of range, numbers where strings belong.
        ("title 1e400", br#"{"title":1e400}"#.to_vec()),
        ("body -1e400", br#"{"title":"n","body":-1e400}"#.to_vec()),
        (
            "title 30 digits",
            br#"{"title":123456789012345678901234567890}"#.to_vec(),
        ),
        ("title 1e-400", br#"{"title":1e-400}"#.to_vec()),
        ("title integer", br#"{"title":1}"#.to_vec()),
        ("title float", br#"{"title":1.5}"#.to_vec()),
        ("title true", br#"{"title":true}"#.to_vec()),
        ("title null", br#"{"title":null}"#.to_vec()),
        ("title array", br#"{"title":["a"]}"#.to_vec()),
        ("title object", br#"{"title":{"a":1}}"#.to_vec()),
        ("body number", br#"{"title":"n","body":42}"#.to_vec()),
        ("body bool", br#"{"title":"n","body":false}"#.to_vec()),
        ("NaN", br#"{"title":NaN}"#.to_vec()),
        ("Infinity", br#"{"title":"n","body":Infinity}"#.to_vec()),
        ("hex number", br#"{"title":0x41}"#.to_vec()),
        // Shapes.
        ("top-level array", b"[]".to_vec()),
        ("top-level string", b"\"title\"".to_vec()),
        ("top-level number", b"12".to_vec()),
        ("top-level null", b"null".to_vec()),
        ("empty", Vec::new()),
        ("whitespace", b"   \r\n\t ".to_vec()),
        ("unknown field", br#"{"title":"t","id":1}"#.to_vec()),
        ("__proto__", br#"{"__proto__":{"admin":true}}"#.to_vec()),
        (
            "100k key",
            format!("{{\"{}\":1}}", "k".repeat(100_000)).into_bytes(),
        ),
        ("two objects", br#"{"title":"a"}{"title":"b"}"#.to_vec()),
        ("trailing comma", br#"{"title":"a",}"#.to_vec()),
        ("single quotes", b"{'title':'a'}".to_vec()),
        ("comment", br#"{"title":"a"/* c */}"#.to_vec()),
        // Strings that must be refused.
        ("NUL in title", br#"{"title":"a\u0000b"}"#.to_vec()),
        ("lone surrogate escape", br#"{"title":"\ud800"}"#.to_vec()),
        (
            "control characters",
            br#"{"title":"\u0007\u001b[2J"}"#.to_vec(),
        ),
        (
            "161 characters",
            format!("{{\"title\":\"{}\"}}", "é".repeat(161)).into_bytes(),
        ),
        ("empty title", br#"{"title":""}"#.to_vec()),
        ("blank title", br#"{"title":"   "}"#.to_vec()),
        (
            "over max_body_bytes",
            format!("{{\"title\":\"t\",\"body\":\"{}\"}}", "b".repeat(MAX_BODY)).into_bytes(),
        ),
    ];
    let note_path = format!("/api/notes/{note}");
    for (name, body) in &bodies {
        for (method, target) in [
            ("POST", "/api/notes"),
            ("PUT", note_path.as_str()),
            ("PATCH", note_path.as_str()),
        ] {
            // PATCH {} and PATCH {"unknown"} aside, none of these is valid
            // for any of the three: all must be refused.
            out.push(case(
                "JSON body",
                format!("{method}: {name}"),
                json_req(method, target, body),
                Expect::Reject,
            ));
        }
    }
}

/// Paths: traversal, encodings, lengths.
fn path_cases(out: &mut Vec<Case>) {
    let refused: Vec<Vec<u8>> = vec![
        b"/api/notes/../../etc/passwd".to_vec(),
        b"/api/notes/..%2f..%2fetc%2fpasswd".to_vec(),
        b"/api/notes/%2e%2e/%2e%2e/etc/passwd".to_vec(),
        b"/api/notes/%252e%252e%252fetc%252fpasswd".to_vec(),
        b"/../../../../etc/passwd".to_vec(),
        b"/api/notes/....//....//etc/passwd".to_vec(),
        b"/api/notes/..\\..\\windows\\win.ini".to_vec(),
        b"/api/notes/%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd".to_vec(),
        b"/api/notes/1/..".to_vec(),
        b"/api/notes/./1".to_vec(),
        b"/%2e/api/notes".to_vec(),
        b"/api/notes/%00".to_vec(),
        b"/api/notes/1%00".to_vec(),
        b"/api/notes/%".to_vec(),
        b"/api/notes/%%".to_vec(),
        b"/api/notes/%zz".to_vec(),
        b"/api/notes/%0".to_vec(),
        b"/api/notes/%u0041".to_vec(),
        b"/api/notes/%ff%fe".to_vec(),
        b"/api/notes/%31".to_vec(),
        b"/api/notes/1;x=1".to_vec(),
        b"/api/notes/1%27%20OR%201=1".to_vec(),
        b"/api/notes/1'%20OR%20'1'='1".to_vec(),
        b"/api/notes?limit=1%27%3B%20DROP%20TABLE%20notes".to_vec(),
        b"/api/notes?before=1%20OR%201=1".to_vec(),
        b"/api/notes?limit=%ff".to_vec(),
        b"/api/notes?limit=1%00".to_vec(),
        b"/api/notes?before=%2d1".to_vec(),
        b"/api/notes?limit=99999999999999999999999999".to_vec(),
        b"/api/notes?before=-9223372036854775808".to_vec(),
        b"/api/notes/-9223372036854775808".to_vec(),
        b"/api/notes/99999999999999999999999999999".to_vec(),
        format!("/api/notes/{}", "9".repeat(5000)).into_bytes(),
        format!("/api/notes/{}", "1/".repeat(2000)).into_bytes(),
        format!("/{}", "a".repeat(MAX_HEADER - 200)).into_bytes(),
        format!("/{}", "%2e%2e/".repeat(1000)).into_bytes(),
        b"/etc/passwd".to_vec(),
        b"/debug/sleep?ms=1".to_vec(),
        b"/debug/block?ms=1".to_vec(),
        b"/metrics/../api/notes".to_vec(),
        b"/healthz%20".to_vec(),
        b"/api/notes%2f1".to_vec(),
        b"/API/NOTES".to_vec(),
        b"/api/notes/\xff\xfe".to_vec(),
        b"/api/notes/\xc3\xa9".to_vec(),
    ];
    for target in &refused {
        for method in ["GET", "DELETE"] {
            out.push(case(
                "paths",
                format!("{method} {}", String::from_utf8_lossy(target)),
                req(method, target, &[], b""),
                Expect::Reject,
            ));
        }
    }
    // Junk queries that the list ignores or refuses: never a 5xx.
    let odd: Vec<Vec<u8>> = vec![
        b"/api/notes?%%%".to_vec(),
        b"/api/notes?&&&&".to_vec(),
        b"/api/notes?a=b=c".to_vec(),
        b"/api/notes?limit=1&limit=2".to_vec(),
        b"/api/notes?%00=%00".to_vec(),
        b"/api/notes?\xff=\xfe".to_vec(),
        format!("/api/notes?{}", "&".repeat(5000)).into_bytes(),
        format!("/api/notes?{}", "a=b&".repeat(1500)).into_bytes(),
        b"/api/notes#fragment".to_vec(),
        b"/api/notes?limit=1#x".to_vec(),
    ];
    for target in &odd {
        out.push(case(
            "queries",
            format!("GET {}", String::from_utf8_lossy(target)),
            req("GET", target, &[], b""),
            Expect::NoServerError,
        ));
    }
}

/// A valid request, then garbage on the same connection.
fn pipeline_cases(out: &mut Vec<Case>) {
    let valid: Vec<(&str, Vec<u8>)> = vec![
        ("GET /healthz", req("GET", b"/healthz", &[], b"")),
        (
            "GET /api/notes",
            req("GET", b"/api/notes?limit=1", &[], b""),
        ),
        (
            "POST /api/notes",
            json_req("POST", "/api/notes", br#"{"title":"pipelined"}"#),
        ),
    ];
    let garbage: Vec<(&str, Vec<u8>, bool)> = vec![
        ("GARBAGE line", b"GARBAGE\r\n\r\n".to_vec(), false),
        ("binary", junk(42, 1024), false),
        ("NULs", vec![0; 64], false),
        (
            "HTTP/9.9",
            b"GET / HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(),
            false,
        ),
        (
            "negative length",
            b"POST /api/notes HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n".to_vec(),
            false,
        ),
        (
            "huge header",
            format!(
                "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
                "x".repeat(MAX_HEADER * 2)
            )
            .into_bytes(),
            false,
        ),
        ("half a request, EOF", b"GET /api/no".to_vec(), true),
        (
            "TLS ClientHello",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
            false,
        ),
    ];
    for (vname, v) in &valid {
        for (gname, g, eof) in &garbage {
            let mut bytes = v.clone();
            bytes.extend_from_slice(g);
            out.push(Case {
                eof: *eof,
                ..case(
                    "pipelined garbage",
                    format!("{vname} then {gname}"),
                    bytes,
                    Expect::ValidThenReject,
                )
            });
        }
    }
}

fn misc_cases(out: &mut Vec<Case>) {
    for (name, bytes) in [
        (
            "HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        ),
        (
            "TLS ClientHello",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
        ),
        ("64 KiB of junk", junk(1, 64 * 1024)),
        ("1 KiB of junk", junk(2, 1024)),
        ("CRLF only", b"\r\n".to_vec()),
        ("many CRLFs", b"\r\n".repeat(5000)),
        ("SSH banner", b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()),
        ("SMTP", b"HELO evil.example\r\n".to_vec()),
    ] {
        out.push(Case {
            eof: true,
            ..case("not HTTP", name, bytes, Expect::Reject)
        });
    }
    for (name, bytes) in [
        ("head cut in the request line", b"GET /api/no".to_vec()),
        (
            "head cut in a header",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: ".to_vec(),
        ),
        (
            "head cut before the blank line",
            b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec(),
        ),
        ("nothing at all", Vec::new()),
    ] {
        out.push(truncated("truncated", name, bytes));
    }
}

/// The whole corpus (≥ 500 requests). `note`: an existing note to PUT/PATCH.
fn corpus(note: i64) -> Vec<Case> {
    let mut out = Vec::new();
    request_line_cases(&mut out);
    header_cases(&mut out);
    framing_cases(&mut out);
    body_cases(&mut out, note);
    path_cases(&mut out);
    pipeline_cases(&mut out);
    misc_cases(&mut out);
    out
}

/// Why `ex` breaks the rules for `case`, if it does.
fn judge(case: &Case, ex: &Exchange) -> Option<String> {
    let statuses = ex.statuses();
    if let Some(s) = statuses.iter().find(|s| **s >= 500) {
        return Some(format!("answered {s} (a 5xx for bad input)"));
    }
    if ex.timed_out {
        return Some(format!(
            "neither answered nor closed within {ANSWER_TIMEOUT:?}"
        ));
    }
    if let Some(g) = &ex.garbage {
        return Some(format!("unparsable answer: {g}"));
    }
    for a in &ex.answers {
        if a.header("x-injected").is_some() {
            return Some(format!(
                "a header was injected into the answer: {:?}",
                a.head
            ));
        }
        if String::from_utf8_lossy(&a.body).contains("root:") {
            return Some("the answer contains /etc/passwd".to_string());
        }
    }
    let four = |s: &u16| (400..500).contains(s);
    match case.expect {
        Expect::Reject => {
            if let Some(s) = statuses.iter().find(|s| !four(s)) {
                return Some(format!("answered {s}, expected a 4xx or a close"));
            }
        }
        Expect::NoServerError => {}
        Expect::CloseAfter => {
            let ok = statuses.iter().all(four) || ex.closed;
            if !ok {
                return Some(format!(
                    "answered {statuses:?} and kept the connection open (Content-Length with \
                     Transfer-Encoding must be refused, or the connection closed after the answer)"
                ));
            }
        }
        Expect::ValidThenReject => match statuses.split_first() {
            None => return Some("the valid request was not answered".to_string()),
            Some((first, _)) if !(200..300).contains(first) => {
                return Some(format!("the valid request got {first}"));
            }
            Some((_, rest)) => {
                if let Some(s) = rest.iter().find(|s| !four(s)) {
                    return Some(format!("the garbage got {s}, expected a 4xx or a close"));
                }
            }
        },
    }
    None
}

// ---------------------------------------------------------------------------
// Worker file descriptors
// ---------------------------------------------------------------------------

/// The targets of `/proc/PID/fd/*` ("socket:[…]", file paths, "anon_inode:…").
fn fd_targets(pid: i32) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| fs::read_link(e.path()).ok())
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// fd count per worker pid.
fn fd_counts(pids: &[i32]) -> BTreeMap<i32, Vec<String>> {
    pids.iter().map(|p| (*p, fd_targets(*p))).collect()
}

/// Waits until no worker has an open client connection (bounded), then a
/// short settle.
fn settle(server: &TestServer) {
    let idle = server.try_wait_for(Duration::from_secs(6), |s| {
        workers(s)
            .iter()
            .all(|w| w["active_connections"].as_u64() == Some(0))
    });
    if let Err(last) = idle {
        eprintln!("(connections still open after 6 s: {last})");
    }
    thread::sleep(Duration::from_millis(300));
}

/// Open sockets and total fds of every worker did not grow beyond the pool.
#[track_caller]
fn assert_no_fd_leak(
    what: &str,
    before: &BTreeMap<i32, Vec<String>>,
    after: &BTreeMap<i32, Vec<String>>,
    tolerance: usize,
) {
    let mut problems = Vec::new();
    for (pid, b) in before {
        let a = &after[pid];
        let sockets = |v: &[String]| v.iter().filter(|t| t.starts_with("socket:")).count();
        let added: Vec<&String> = {
            let mut pool: Vec<&String> = b.iter().collect();
            a.iter()
                .filter(|t| {
                    if let Some(i) = pool.iter().position(|x| x == t) {
                        pool.remove(i);
                        false
                    } else {
                        true
                    }
                })
                .collect()
        };
        eprintln!(
            "HOSTILE {what} fds: worker {pid}: before={} after={} (sockets {} -> {}); new: {:?}",
            b.len(),
            a.len(),
            sockets(b),
            sockets(a),
            added.iter().map(|s| s.as_str()).collect::<Vec<_>>()
        );
        if a.len() > b.len() + tolerance {
            problems.push(format!(
                "worker {pid}: {} fds before, {} after (tolerance {tolerance}); new: {added:?}",
                b.len(),
                a.len()
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{what}: file descriptors leaked:\n{}",
        problems.join("\n")
    );
}

/// fds one pool connection may hold: a socket on PostgreSQL; the database,
/// its WAL and shared memory files on SQLite.
fn fds_per_db_connection(backend: Backend) -> usize {
    match backend {
        Backend::Postgres => 1,
        Backend::Sqlite => 3,
    }
}

/// `database.max_connections` (the default).
const POOL: usize = 4;

/// Opens pool connections in every worker: concurrent slow-ish DB requests
/// over several connections.
fn warm_pools(server: &NotesServer) {
    let socket = server.socket().to_path_buf();
    thread::scope(|s| {
        for _ in 0..8 {
            let socket = &socket;
            s.spawn(move || {
                for _ in 0..10 {
                    let mut c = Client::connect(socket);
                    let r = c.call("GET", "/api/notes?limit=200", &[], None);
                    assert_eq!(r.status, 200, "{r:?}");
                }
            });
        }
    });
}

// ---------------------------------------------------------------------------
// The corpus test
// ---------------------------------------------------------------------------

/// SQL-looking strings: stored and returned literally.
const SQLISH: &[&str] = &[
    "'; DROP TABLE notes; --",
    "\"; DROP TABLE notes; --",
    "Robert'); DROP TABLE notes;--",
    "1; DELETE FROM notes",
    "' OR '1'='1",
    "') OR 1=1 --",
    "' UNION SELECT id, title, body, created_at, updated_at FROM notes --",
    "$1",
    "$$; DROP TABLE notes; $$",
    "\\'; --",
    "%",
    "_",
    "/* */",
    "NULL",
    "'; ATTACH DATABASE '/tmp/pwn.db' AS pwn; --",
    "'; PRAGMA writable_schema = 1; --",
    "1' AND SLEEP(5) --",
    "'; SELECT pg_sleep(5); --",
    "\\x00\\x27",
    "🦀'; DROP TABLE notes; -- ✓",
];

fn corpus_is_answered_4xx_or_closed_and_costs_nothing(backend: Backend) {
    let Some(server) = start(backend, "hostile", hostile_options) else {
        return;
    };
    let note = server.create(&json!({"title": "survivor", "body": "intact"}));
    warm_pools(&server);
    let s0 = server.status();
    let pids = ready_pids(&s0);
    assert_eq!(s0["restarts"], 0, "{s0}");
    settle(&server);
    let fds_before = fd_counts(&pids);

    let cases = corpus(note);
    assert!(cases.len() >= 500, "corpus of {} requests", cases.len());
    let socket: PathBuf = server.socket().to_path_buf();
    let t0 = Instant::now();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Exchange)>> = Mutex::new(Vec::new());
    thread::scope(|s| {
        for _ in 0..PARALLEL {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(c) = cases.get(i) else { break };
                    let ex = match c.expect {
                        // Does the server close after answering?
                        Expect::CloseAfter => {
                            exchange(&socket, &c.bytes, c.eof, 1, Some(Duration::from_secs(2)))
                        }
                        Expect::ValidThenReject => exchange(&socket, &c.bytes, c.eof, 2, None),
                        _ => exchange(&socket, &c.bytes, c.eof, 1, None),
                    };
                    results
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((i, ex));
                }
            });
        }
    });
    let took = t0.elapsed();
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|r| r.0);

    // HOSTILE_VERBOSE=1: every case and what it got.
    let verbose = std::env::var_os("HOSTILE_VERBOSE").is_some();
    let mut problems = Vec::new();
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_category: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, ex) in &results {
        let c = &cases[*i];
        *by_category.entry(c.category).or_insert(0) += 1;
        let key = match ex.answers.first() {
            Some(a) => a.status.to_string(),
            None if ex.closed => "closed".to_string(),
            None => "none".to_string(),
        };
        *by_status.entry(key).or_insert(0) += 1;
        if verbose {
            eprintln!(
                "  [{}] {}: {}",
                c.category,
                c.name.chars().take(100).collect::<String>().escape_debug(),
                ex.outcome()
            );
        }
        if let Some(why) = judge(c, ex) {
            problems.push(format!(
                "[{}] {}: {why} (got {})",
                c.category,
                c.name.chars().take(120).collect::<String>(),
                ex.outcome()
            ));
        }
    }
    eprintln!(
        "HOSTILE corpus ({}): requests={} took_ms={} first_answer={by_status:?} categories={by_category:?} problems={}",
        backend_tag(backend),
        cases.len(),
        took.as_millis(),
        problems.len()
    );

    // SQL-looking strings round-trip literally, as title and as body.
    let mut created = Vec::new();
    for s in SQLISH {
        let resp = server.send_json(
            "POST",
            "/api/notes",
            &json!({"title": s, "body": s}).to_string(),
        );
        if resp.status != 201 {
            problems.push(format!("POST title {s:?}: {} {}", resp.status, resp.body));
            continue;
        }
        let id = resp.json()["id"].as_i64().expect("id");
        let got = server.note(id);
        if got["title"] != *s || got["body"] != *s {
            problems.push(format!("{s:?} came back as {got}"));
        }
        created.push(id);
    }
    let patched = server.send_json(
        "PATCH",
        &format!("/api/notes/{note}"),
        &json!({"body": SQLISH[0]}).to_string(),
    );
    if patched.status != 200 || patched.json()["body"] != SQLISH[0] {
        problems.push(format!("PATCH body {:?}: {patched:?}", SQLISH[0]));
    }
    let all = server.list_all(200);
    for id in &created {
        if !all.iter().any(|n| n["id"] == *id) {
            problems.push(format!("note {id} missing from the list"));
        }
    }
    assert_eq!(
        server.note(note)["title"],
        "survivor",
        "the table is intact"
    );

    settle(&server);
    let fds_after = fd_counts(&pids);
    let s1 = server.status();
    let log = server.log();
    let panics = log.lines().filter(|l| l.contains("panicked")).count();
    eprintln!(
        "HOSTILE corpus ({}): workers {:?} -> {:?} restarts={} panics_in_log={panics} sql_round_trips={}",
        backend_tag(backend),
        pids,
        ready_pids(&s1),
        s1["restarts"],
        created.len()
    );
    assert_eq!(ready_pids(&s1), pids, "the same workers (no crash): {s1}");
    assert_eq!(s1["restarts"], 0, "no restart: {s1}");
    assert_eq!(panics, 0, "no panic in the log");
    assert!(
        problems.is_empty(),
        "{} of {} hostile requests mishandled:\n{}",
        problems.len(),
        cases.len(),
        problems.join("\n")
    );
    assert_no_fd_leak(
        &format!("corpus ({})", backend_tag(backend)),
        &fds_before,
        &fds_after,
        POOL * fds_per_db_connection(backend),
    );
}

// ---------------------------------------------------------------------------
// Slowloris
// ---------------------------------------------------------------------------

/// `server.keepalive` of the slowloris tests: also the head's deadline.
const KEEPALIVE: u64 = 2;

/// What a trickling connection ended with.
#[derive(Debug)]
struct Trickle {
    /// From connect until the server closed it (None: still open at the deadline).
    closed_after: Option<Duration>,
    /// A status the server sent before closing, if any.
    status: Option<u16>,
    bytes_sent: usize,
}

/// Connects, writes `prefix`, then the bytes of `drip` (cycled) one every
/// `every`, until the server closes the connection or `limit` passes.
fn trickle(socket: &Path, prefix: &[u8], drip: &[u8], every: Duration, limit: Duration) -> Trickle {
    let t0 = Instant::now();
    let mut stream = UnixStream::connect(socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(10)))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(1)))
        .expect("write timeout");
    let mut sent = 0;
    let mut drips = 0;
    let mut got = Vec::new();
    let mut next_drip = Instant::now();
    let mut wrote_prefix = prefix.is_empty();
    let closed_after = loop {
        if t0.elapsed() > limit {
            break None;
        }
        if !wrote_prefix {
            if stream.write_all(prefix).is_err() {
                break Some(t0.elapsed());
            }
            sent += prefix.len();
            wrote_prefix = true;
        } else if Instant::now() >= next_drip && !drip.is_empty() {
            if stream.write_all(&[drip[drips % drip.len()]]).is_err() {
                break Some(t0.elapsed());
            }
            drips += 1;
            sent += 1;
            next_drip += every;
        }
        let mut buf = [0u8; 4096];
        match stream.read(&mut buf) {
            Ok(0) => break Some(t0.elapsed()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break Some(t0.elapsed()),
        }
    };
    let status = parse_answers(&got, true)
        .ok()
        .and_then(|(a, _)| a.first().map(|a| a.status));
    Trickle {
        closed_after,
        status,
        bytes_sent: sent,
    }
}

#[test]
fn slowloris_heads_are_cut_off_after_keepalive() {
    let Some(server) = start(Backend::Sqlite, "slowloris", |o| {
        hostile_options(o);
        o.keepalive = KEEPALIVE;
    }) else {
        return;
    };
    warm_pools(&server);
    let pids = server.worker_pids();
    settle(&server);
    let fds_before = fd_counts(&pids);
    let socket = server.socket().to_path_buf();
    let budget = Duration::from_secs(KEEPALIVE + 1);
    let limit = Duration::from_secs(KEEPALIVE + 5);
    let drip = Duration::from_millis(100);

    // Heads that never complete, each byte well within any per-read timeout.
    let after_one: Vec<u8> = req("GET", b"/healthz", &[], b"")
        .into_iter()
        .chain(b"GET /api/notes HTTP/1.1\r\nX-Slow: ".iter().copied())
        .collect();
    let shapes: Vec<(&str, Vec<u8>, &[u8])> = vec![
        (
            "header value",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ".to_vec(),
            b"a",
        ),
        (
            "endless headers",
            b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec(),
            b"X-A: b\r\n",
        ),
        ("request line", b"G".to_vec(), b"E"),
        (
            "POST head",
            b"POST /api/notes HTTP/1.1\r\nContent-Type: application/json\r\nX-Slow: ".to_vec(),
            b"b",
        ),
        ("silent connection", Vec::new(), b""),
        ("after one request", after_one, b"c"),
        (
            "upgrade head",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nX: ".to_vec(),
            b"u",
        ),
        ("junk drip", b"\x16\x03".to_vec(), b"\x01"),
    ];
    let t0 = Instant::now();
    let trickles: Vec<(&str, Trickle)> = thread::scope(|s| {
        let handles: Vec<_> = shapes
            .iter()
            .map(|(name, prefix, byte)| {
                let socket = &socket;
                s.spawn(move || (*name, trickle(socket, prefix, byte, drip, limit)))
            })
            .collect();
        // Meanwhile, honest clients are served at once.
        thread::sleep(Duration::from_millis(500));
        for _ in 0..5 {
            let t = Instant::now();
            let r = server.get_path("/api/notes?limit=5");
            assert_eq!(r.status, 200, "{r:?}");
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "an honest request waited {:?} behind the trickles",
                t.elapsed()
            );
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("trickle thread"))
            .collect()
    });
    let mut problems = Vec::new();
    for (name, t) in &trickles {
        eprintln!(
            "HOSTILE slowloris {name}: closed_after_ms={:?} status={:?} bytes_sent={}",
            t.closed_after.map(|d| d.as_millis()),
            t.status,
            t.bytes_sent
        );
        match t.closed_after {
            None => problems.push(format!("{name}: still open after {limit:?}")),
            Some(d) if d > budget => problems.push(format!(
                "{name}: closed after {d:?}, beyond keepalive + 1 s = {budget:?}"
            )),
            Some(_) => {}
        }
        let after_request = *name == "after one request";
        match t.status {
            Some(s) if s >= 500 => problems.push(format!("{name}: answered {s}")),
            Some(s) if !after_request && !(400..500).contains(&s) => {
                problems.push(format!("{name}: answered {s} to an incomplete head"))
            }
            _ => {}
        }
    }
    eprintln!(
        "HOSTILE slowloris: keepalive={KEEPALIVE}s connections={} took_ms={} problems={}",
        trickles.len(),
        t0.elapsed().as_millis(),
        problems.len()
    );
    settle(&server);
    let fds_after = fd_counts(&pids);
    let s = server.status();
    assert_eq!(ready_pids(&s), pids, "the same workers: {s}");
    assert_eq!(s["restarts"], 0, "{s}");
    assert!(problems.is_empty(), "slowloris:\n{}", problems.join("\n"));
    assert_no_fd_leak("slowloris", &fds_before, &fds_after, POOL * 3);
}

/// A body that stalls after its head: the client's fault, so a 4xx (408) or
/// a close — not the server's 503 — within request_timeout + 1 s.
#[test]
fn a_stalled_request_body_is_refused_as_the_clients_fault() {
    const REQUEST_TIMEOUT: u64 = 2;
    let Some(server) = start(Backend::Sqlite, "slow_body", |o| {
        hostile_options(o);
        o.keepalive = KEEPALIVE;
        o.extra_toml = format!(
            "[http]\nmax_header_bytes = {MAX_HEADER}\nmax_body_bytes = {MAX_BODY}\nrequest_timeout = {REQUEST_TIMEOUT}\n"
        );
    }) else {
        return;
    };
    let pids = server.worker_pids();
    let socket = server.socket().to_path_buf();
    let budget = Duration::from_secs(REQUEST_TIMEOUT + 1);
    let limit = Duration::from_secs(REQUEST_TIMEOUT + 5);
    let shapes: Vec<(&str, Vec<u8>)> = vec![
        (
            "Content-Length body, stalled",
            post_with(&[("Content-Length", b"100")], b"{\"title\":"),
        ),
        (
            "chunked body, stalled",
            post_with(&[("Transfer-Encoding", b"chunked")], b"10\r\n{\"ti"),
        ),
    ];
    let results: Vec<(&str, Trickle)> = thread::scope(|s| {
        let hs: Vec<_> = shapes
            .iter()
            .map(|(name, bytes)| {
                let socket = &socket;
                s.spawn(move || (*name, trickle(socket, bytes, b"", Duration::ZERO, limit)))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let mut problems = Vec::new();
    for (name, t) in &results {
        eprintln!(
            "HOSTILE slow body {name}: closed_after_ms={:?} status={:?}",
            t.closed_after.map(|d| d.as_millis()),
            t.status
        );
        if let Some(s) = t.status
            && !(400..500).contains(&s)
        {
            problems.push(format!(
                "{name}: answered {s}; a client that stops sending its body is a 408 (or a close), not a {s}"
            ));
        }
        match t.closed_after {
            None => problems.push(format!("{name}: still open after {limit:?}")),
            Some(d) if d > budget && t.status.is_none() => {
                problems.push(format!("{name}: closed only after {d:?} (> {budget:?})"))
            }
            _ => {}
        }
    }
    let s = server.status();
    assert_eq!(ready_pids(&s), pids, "the same workers: {s}");
    assert_eq!(s["restarts"], 0, "{s}");
    assert!(
        problems.is_empty(),
        "stalled bodies:\n{}",
        problems.join("\n")
    );
}

/// RFC 9112 §3.2's MUST-400s, which hyper leaves to the server: an HTTP/1.1
/// request without `Host`, with two `Host` lines, or with a `Host` that is
/// not a host[:port] gets a JSON 400 with its request id, and the connection
/// is closed (the request pipelined behind it is not answered). HTTP/1.0
/// without `Host` and unusual but valid hosts are served.
#[test]
fn host_header_violations_are_400_and_close_the_connection() {
    let Some(server) = start(Backend::Sqlite, "host_rules", hostile_options) else {
        return;
    };
    let next = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let bad: &[(&str, &[u8])] = &[
        ("no Host in HTTP/1.1", b"GET /healthz HTTP/1.1\r\n\r\n"),
        ("two Host lines", b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        ("two equal Host lines", b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"),
        ("Host with a space", b"GET /healthz HTTP/1.1\r\nHost: a b\r\n\r\n"),
        ("Host with a path", b"GET /healthz HTTP/1.1\r\nHost: a/b\r\n\r\n"),
        ("Host with userinfo", b"GET /healthz HTTP/1.1\r\nHost: u@a\r\n\r\n"),
        ("Host with a bad port", b"GET /healthz HTTP/1.1\r\nHost: a:http\r\n\r\n"),
        ("Host with an open bracket", b"GET /healthz HTTP/1.1\r\nHost: [::1\r\n\r\n"),
        ("POST without Host", b"POST /api/notes HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 14\r\n\r\n{\"title\":\"h\"}"),
    ];
    for (name, bytes) in bad {
        let mut all = bytes.to_vec();
        all.extend_from_slice(next);
        let ex = exchange(server.socket_path(), &all, false, 2, None);
        let what = format!("{name}: {}", ex.outcome());
        assert_eq!(ex.statuses(), [400], "{what}");
        assert!(ex.closed, "closed after the 400: {what}");
        let answer = &ex.answers[0];
        assert!(
            answer
                .header("x-request-id")
                .is_some_and(|id| !id.is_empty()),
            "{what}: {}",
            answer.head
        );
        let body: serde_json::Value = serde_json::from_slice(&answer.body)
            .unwrap_or_else(|e| panic!("{what}: not JSON ({e})"));
        assert_eq!(body["error"]["code"], "bad_request", "{what}: {body}");
    }
    let good: &[(&str, &[u8])] = &[
        (
            "HTTP/1.0 without Host",
            b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        ),
        (
            "IPv6 literal with port",
            b"GET /healthz HTTP/1.1\r\nHost: [::1]:8000\r\n\r\n",
        ),
        ("empty Host", b"GET /healthz HTTP/1.1\r\nHost:\r\n\r\n"),
        (
            "IPv4 with port",
            b"GET /healthz HTTP/1.1\r\nHost: 10.213.0.2:8000\r\n\r\n",
        ),
    ];
    for (name, bytes) in good {
        let mut all = bytes.to_vec();
        all.extend_from_slice(next);
        let ex = exchange(server.socket_path(), &all, false, 2, None);
        assert_eq!(ex.statuses(), [200, 200], "{name}: {}", ex.outcome());
    }
    assert!(
        !server.log().contains(" ERROR "),
        "a bad Host is the client's error, not logged as ours"
    );
}
