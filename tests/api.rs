//! The notes API (docs/design.md §5), black-box, on both backends: every route and
//! every error status, Unicode titles at the limit, keyset pagination through
//! the Link header, request bodies framed every way (Content-Length, chunked,
//! neither, too large), request ids, HEAD, exact metrics counts, concurrent
//! creates, and hostile input that must never cost a worker.
//!
//! Each test is written once as `fn name(backend: Backend)`; `both_backends!`
//! makes `sqlite::name` and `postgres::name` of it (the PostgreSQL one skips
//! loudly without a server, and fails under CI).

mod common;

use std::collections::BTreeSet;
use std::thread;
use std::time::{Duration, Instant};

use common::notes::*;
use common::*;
use serde_json::{Value, json};

both_backends!(
    root_health_ready_head_and_request_ids,
    notes_crud_round_trip,
    invalid_notes_are_422,
    unicode_titles_count_characters,
    malformed_input_is_400,
    unknown_ids_and_routes_are_404,
    wrong_methods_are_405_with_allow,
    body_framing_411_413_415,
    pagination_walks_every_note_once,
    metrics_count_exactly_what_was_asked,
    concurrent_creates_are_all_committed,
    hostile_input_never_costs_a_worker,
    slow_requests_get_503_timeout,
    the_list_never_lags_a_write_made_here,
    writes_made_elsewhere_show_at_once,
);

/// Status of the master: (ready worker pids, restarts).
fn pids_and_restarts(server: &TestServer) -> (Vec<i32>, u64) {
    let s = server.status();
    (ready_pids(&s), s["restarts"].as_u64().unwrap_or(u64::MAX))
}

/// The workers are those of `before`, and none was restarted.
#[track_caller]
fn assert_same_workers(server: &TestServer, before: &[i32]) {
    let (pids, restarts) = pids_and_restarts(server);
    assert_eq!(pids, before, "no worker died or was replaced");
    assert_eq!(restarts, 0, "no worker restart");
    assert_eq!(server.get("/healthz").status, 200);
}

/// GET, DELETE, PUT and PATCH of `path` all answer 404 `not_found`.
#[track_caller]
fn assert_not_found_everywhere(server: &impl Api, path: &str) {
    assert_error(&server.get_path(path), 404, "not_found");
    assert_error(&server.call("DELETE", path, &[], None), 404, "not_found");
    assert_error(
        &server.send_json("PUT", path, r#"{"title":"x"}"#),
        404,
        "not_found",
    );
    assert_error(
        &server.send_json("PATCH", path, r#"{"title":"x"}"#),
        404,
        "not_found",
    );
}

// ---------------------------------------------------------------------------

fn root_health_ready_head_and_request_ids(backend: Backend) {
    let Some(server) = start(backend, "basics", |_| {}) else {
        return;
    };
    let resp = server.get_path("/");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json(), json!({"message": "Hello, production!"}));
    assert!(
        resp.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{resp:?}"
    );
    let resp = server.get_path("/healthz");
    assert_eq!((resp.status, resp.json()), (200, json!({"ok": true})));
    let resp = server.get_path("/readyz");
    assert_eq!(
        (resp.status, resp.json()),
        (200, json!({"ok": true})),
        "{resp:?}"
    );

    // HEAD: the GET's status and headers, no body. Proven on one keep-alive
    // connection: a body sent after a HEAD answer would garble the next one.
    let id = server.create(&json!({"title": "head"}));
    let note_path = format!("/api/notes/{id}");
    let mut c = Client::connect(server.socket());
    for path in ["/", "/api/notes", "/healthz", note_path.as_str()] {
        let head = c.call("HEAD", path, &[], None);
        assert_eq!(head.status, 200, "HEAD {path}: {head:?}");
        assert!(head.body.is_empty(), "HEAD {path}: {head:?}");
        assert!(
            head.header("x-request-id").is_some(),
            "HEAD {path}: {head:?}"
        );
        let next = c.call("GET", "/healthz", &[], None);
        assert_eq!(
            (next.status, next.json()),
            (200, json!({"ok": true})),
            "the request after HEAD {path} on the same connection"
        );
    }

    // X-Request-Id: a sane one is echoed, on success and error alike; an
    // insane one is replaced; two requests without one get different ids.
    for (path, status) in [("/", 200), ("/api/notes/424242", 404), ("/nope", 404)] {
        let resp = server.call("GET", path, &[("X-Request-Id", "req-42.a_b")], None);
        assert_eq!(resp.status, status, "{resp:?}");
        assert_eq!(resp.header("x-request-id"), Some("req-42.a_b"), "{resp:?}");
    }
    let resp = server.send_json("POST", "/api/notes", r#"{"title":"rid"}"#);
    assert_eq!(resp.status, 201);
    assert!(resp.header("x-request-id").is_some_and(|i| !i.is_empty()));
    let resp = server.call("GET", "/", &[("X-Request-Id", "no spaces allowed!")], None);
    let id = resp.header("x-request-id").unwrap_or_default();
    assert!(!id.is_empty() && id != "no spaces allowed!", "{resp:?}");
    let a = server.get_path("/");
    let b = server.get_path("/");
    assert_ne!(a.header("x-request-id"), b.header("x-request-id"));
}

fn notes_crud_round_trip(backend: Backend) {
    let Some(server) = start(backend, "crud", |_| {}) else {
        return;
    };
    // An empty database lists nothing, without a Link.
    let resp = server.get_path("/api/notes");
    assert_eq!((resp.status, resp.json()), (200, json!([])), "{resp:?}");
    assert_eq!(resp.header("link"), None);

    // POST → 201 {"id"} + Location; GET returns it.
    let resp = server.send_json(
        "POST",
        "/api/notes",
        r#"{"title":"Groceries","body":"milk"}"#,
    );
    assert_eq!(resp.status, 201, "{resp:?}");
    let created = resp.json();
    let id = created["id"].as_i64().expect("numeric id");
    assert_eq!(created, json!({"id": id}), "the 201 body is just the id");
    assert_eq!(
        resp.header("location"),
        Some(format!("/api/notes/{id}").as_str())
    );
    let note = server.note(id);
    assert_eq!(
        (note["id"].as_i64(), &note["title"], &note["body"]),
        (Some(id), &json!("Groceries"), &json!("milk"))
    );

    // Defaults: title "Untitled", body null; explicit null body.
    let untitled = server.note(server.create(&json!({})));
    assert_eq!(
        (&untitled["title"], &untitled["body"]),
        (&json!("Untitled"), &Value::Null)
    );
    let nobody = server.note(server.create(&json!({"title": "t", "body": null})));
    assert_eq!(nobody["body"], Value::Null);
    let empty_body = server.note(server.create(&json!({"title": "t", "body": ""})));
    assert_eq!(
        empty_body["body"],
        json!(""),
        "an empty body is kept, not nulled"
    );

    // The list holds them, newest first.
    let list = server.get_path("/api/notes").json();
    let ids: Vec<i64> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|n| n["id"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(ids.len(), 4, "{list}");
    assert_eq!(ids[3], id, "the first note is the oldest: {list}");
    for n in list.as_array().expect("array") {
        assert_note_shape(n);
    }
    assert_eq!(list[3], note, "the list item equals GET's note");

    // PUT replaces the whole note: missing title → Untitled, missing body → null.
    let path = format!("/api/notes/{id}");
    let resp = server.send_json("PUT", &path, r#"{"title":"Shopping","body":"eggs"}"#);
    assert_eq!(resp.status, 200, "{resp:?}");
    let put = resp.json();
    assert_note_shape(&put);
    assert_eq!(
        (&put["title"], &put["body"], put["id"].as_i64()),
        (&json!("Shopping"), &json!("eggs"), Some(id))
    );
    assert_eq!(
        put["created_at"], note["created_at"],
        "PUT keeps created_at"
    );
    assert!(put["updated_at"].as_str() >= note["updated_at"].as_str());
    assert_eq!(server.note(id), put, "GET after PUT");
    let put = server
        .send_json("PUT", &path, r#"{"body":"only a body"}"#)
        .json();
    assert_eq!(
        (&put["title"], &put["body"]),
        (&json!("Untitled"), &json!("only a body"))
    );
    let put = server.send_json("PUT", &path, r#"{"title":"T"}"#).json();
    assert_eq!((&put["title"], &put["body"]), (&json!("T"), &Value::Null));

    // PATCH changes only what is present; body null clears; {} changes nothing.
    server.send_json("PUT", &path, r#"{"title":"A","body":"B"}"#);
    let p = server.send_json("PATCH", &path, r#"{"title":"A2"}"#);
    assert_eq!(p.status, 200, "{p:?}");
    let p = p.json();
    assert_note_shape(&p);
    assert_eq!((&p["title"], &p["body"]), (&json!("A2"), &json!("B")));
    let p = server.send_json("PATCH", &path, r#"{"body":"B2"}"#).json();
    assert_eq!((&p["title"], &p["body"]), (&json!("A2"), &json!("B2")));
    let p = server.send_json("PATCH", &path, r#"{"body":null}"#).json();
    assert_eq!((&p["title"], &p["body"]), (&json!("A2"), &Value::Null));
    let before = server.note(id);
    let resp = server.send_json("PATCH", &path, "{}");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json(), before, "PATCH {{}} returns the note unchanged");
    assert_eq!(server.note(id), before, "PATCH {{}} changes nothing");

    // DELETE → 204 with an empty body; then 404 everywhere.
    let resp = server.call("DELETE", &path, &[], None);
    assert_eq!(resp.status, 204, "{resp:?}");
    assert!(resp.body.is_empty(), "{resp:?}");
    assert!(resp.header("x-request-id").is_some());
    assert_not_found_everywhere(&server, &path);
    assert_error(&server.send_json("PATCH", &path, "{}"), 404, "not_found");
    let ids: Vec<i64> = server
        .list_all(50)
        .iter()
        .map(|n| n["id"].as_i64().unwrap_or(0))
        .collect();
    assert!(!ids.contains(&id), "a deleted note is not listed: {ids:?}");
    assert_eq!(ids.len(), 3);
}

fn invalid_notes_are_422(backend: Backend) {
    let Some(server) = start(backend, "invalid", |_| {}) else {
        return;
    };
    let pids = server.worker_pids();
    let id = server.create(&json!({"title": "keep", "body": "me"}));
    let path = format!("/api/notes/{id}");
    let original = server.note(id);
    let bad = [
        r#"{"title":""}"#,
        r#"{"title":"   "}"#,
        r#"{"title":"\t\n "}"#,
        r#"{"title":5}"#,
        r#"{"title":null}"#,
        r#"{"title":["a"]}"#,
        r#"{"title":{"a":1}}"#,
        r#"{"title":true}"#,
        r#"{"body":[]}"#,
        r#"{"body":5}"#,
        r#"{"body":{"x":"y"}}"#,
        r#"{"body":false}"#,
        r#"{"tilte":"typo"}"#,
        r#"{"title":"ok","extra":1}"#,
        r#"{"id":7}"#,
        r#"{"created_at":"2020-01-01T00:00:00.000Z"}"#,
        r#"[1]"#,
        r#"[]"#,
        r#""x""#,
        r#"1"#,
        r#"null"#,
        r#"true"#,
    ];
    let before = server.get_path("/api/notes").json();
    for body in bad {
        assert_error(
            &server.send_json("POST", "/api/notes", body),
            422,
            "validation_failed",
        );
        assert_error(
            &server.send_json("PUT", &path, body),
            422,
            "validation_failed",
        );
        // PATCH: the same rules for the fields present (title null too).
        assert_error(
            &server.send_json("PATCH", &path, body),
            422,
            "validation_failed",
        );
    }
    assert_eq!(server.note(id), original, "refused changes change nothing");
    assert_eq!(
        server.get_path("/api/notes").json(),
        before,
        "refused creates create nothing"
    );
    assert_same_workers(&server, &pids);
}

fn unicode_titles_count_characters(backend: Backend) {
    let Some(server) = start(backend, "unicode", |_| {}) else {
        return;
    };
    let pids = server.worker_pids();
    let at_limit = [
        "a".repeat(160),
        "é".repeat(160),                   // 2 bytes each: 320 bytes
        "🦀".repeat(160),                  // 4 bytes each: 640 bytes
        format!("{}🦀", "中".repeat(159)), // 3 + 4 bytes
        "e\u{301}".repeat(80),             // 160 scalar values (80 graphemes)
    ];
    let mut ids = Vec::new();
    for title in &at_limit {
        assert_eq!(title.chars().count(), 160);
        let id = server.create(&json!({"title": title, "body": title}));
        let note = server.note(id);
        assert_eq!(
            note["title"].as_str(),
            Some(title.as_str()),
            "round trip of a 160-character title"
        );
        assert_eq!(note["body"].as_str(), Some(title.as_str()));
        ids.push(id);
    }
    // PUT and PATCH accept them too.
    let target = ids[0];
    let path = format!("/api/notes/{target}");
    let resp = server.send_json("PUT", &path, &json!({"title": at_limit[2]}).to_string());
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json()["title"].as_str(), Some(at_limit[2].as_str()));
    let resp = server.send_json("PATCH", &path, &json!({"title": at_limit[1]}).to_string());
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        server.note(target)["title"].as_str(),
        Some(at_limit[1].as_str())
    );
    // And the list returns them byte for byte.
    let listed: Vec<Value> = server.list_all(200);
    for (i, id) in ids.iter().enumerate().skip(1) {
        let n = listed
            .iter()
            .find(|n| n["id"].as_i64() == Some(*id))
            .expect("listed");
        assert_eq!(n["title"].as_str(), Some(at_limit[i].as_str()));
    }
    // One more character is refused, whatever its width.
    for title in at_limit.iter().map(|t| format!("{t}x")).chain([
        "é".repeat(161),
        "🦀".repeat(161),
        "a".repeat(1000),
    ]) {
        let body = json!({"title": title}).to_string();
        assert_error(
            &server.send_json("POST", "/api/notes", &body),
            422,
            "validation_failed",
        );
        assert_error(
            &server.send_json("PUT", &path, &body),
            422,
            "validation_failed",
        );
        assert_error(
            &server.send_json("PATCH", &path, &body),
            422,
            "validation_failed",
        );
    }
    assert_eq!(
        server.note(target)["title"].as_str(),
        Some(at_limit[1].as_str())
    );
    // Escaped in JSON: still characters. "\ud83e\udd80" is one 🦀.
    let escaped = format!("{{\"title\":\"{}\"}}", "\\ud83e\\udd80".repeat(160));
    let resp = server.send_json("POST", "/api/notes", &escaped);
    assert_eq!(resp.status, 201, "{resp:?}");
    let id = resp.json()["id"].as_i64().expect("id");
    assert_eq!(
        server.note(id)["title"].as_str(),
        Some(at_limit[2].as_str())
    );
    assert_same_workers(&server, &pids);
}

fn malformed_input_is_400(backend: Backend) {
    let Some(server) = start(backend, "bad400", |_| {}) else {
        return;
    };
    let pids = server.worker_pids();
    let id = server.create(&json!({"title": "x"}));
    let path = format!("/api/notes/{id}");
    let bodies: [&[u8]; 9] = [
        b"{\"title\":",
        b"{title: \"x\"}",
        b"{\"title\":\"x\",}",
        b"not json",
        b"",
        b"{\"title\":\"\xff\xfe\"}",
        b"\xef\xbb\xbf{}\xff",
        b"{\"title\":\"x\"} trailing",
        b"{\"title\":\"\\ud800\"}",
    ];
    for body in bodies {
        for (method, p) in [
            ("POST", "/api/notes"),
            ("PUT", path.as_str()),
            ("PATCH", path.as_str()),
        ] {
            let resp = server.call(method, p, &[JSON], Some(body));
            assert_error(&resp, 400, "bad_request");
        }
    }
    // Query parameters of the list.
    for q in [
        "limit=0",
        "limit=201",
        "limit=-1",
        "limit=abc",
        "limit=",
        "limit=1.5",
        "limit=99999999999999999999",
        "before=0",
        "before=-1",
        "before=x",
        "before=",
        "before=1.0",
        "before=9223372036854775808",
        "limit=10&before=abc",
    ] {
        let resp = server.get_path(&format!("/api/notes?{q}"));
        assert_error(&resp, 400, "bad_request");
    }
    for q in [
        "limit=1",
        "limit=200",
        "before=9223372036854775807",
        "limit=5&before=1",
        "other=1",
    ] {
        let resp = server.get_path(&format!("/api/notes?{q}"));
        assert_eq!(resp.status, 200, "?{q}: {resp:?}");
    }
    assert_eq!(server.note(id)["title"], "x");
    assert_same_workers(&server, &pids);
}

fn unknown_ids_and_routes_are_404(backend: Backend) {
    let Some(server) = start(backend, "nf404", |_| {}) else {
        return;
    };
    let pids = server.worker_pids();
    let id = server.create(&json!({"title": "x"}));
    let bad_ids = [
        "abc",
        "0",
        "-1",
        "+1",
        "1.0",
        "1e3",
        " 1",
        "%31",
        "9223372036854775807", // valid, absent
        "9223372036854775808",
        "99999999999999999999999",
        "",
    ];
    for bad in bad_ids {
        let p = format!("/api/notes/{bad}");
        let p = p.replace(' ', "%20");
        assert_not_found_everywhere(&server, &p);
    }
    for p in [
        "/nope",
        "/api",
        "/api/note",
        "/api/notes/1/extra",
        &format!("/api/notes/{id}/"),
        "/api/notes//1",
    ] {
        assert_error(&server.get_path(p), 404, "not_found");
    }
    assert_eq!(server.note(id)["title"], "x", "the real note is untouched");
    assert_same_workers(&server, &pids);
}

fn wrong_methods_are_405_with_allow(backend: Backend) {
    let Some(server) = start(backend, "m405", |_| {}) else {
        return;
    };
    let id = server.create(&json!({"title": "x"}));
    let note = format!("/api/notes/{id}");
    let list = "GET, HEAD, POST";
    let one = "GET, HEAD, PUT, PATCH, DELETE";
    let read = "GET, HEAD";
    let cases: Vec<(&str, &str, &str)> = vec![
        ("DELETE", "/api/notes", list),
        ("PUT", "/api/notes", list),
        ("PATCH", "/api/notes", list),
        ("OPTIONS", "/api/notes", list),
        ("POST", &note, one),
        ("POST", "/api/notes/1", one),
        ("OPTIONS", &note, one),
        ("POST", "/healthz", read),
        ("POST", "/", read),
        ("DELETE", "/", read),
        ("PUT", "/readyz", read),
        ("POST", "/metrics", read),
    ];
    for (method, path, allow) in cases {
        let resp = server.call(method, path, &[JSON], Some(b"{}"));
        assert_error(&resp, 405, "method_not_allowed");
        assert_eq!(
            resp.header("allow"),
            Some(allow),
            "Allow of {method} {path}: {resp:?}"
        );
    }
    assert_eq!(server.note(id)["title"], "x");
}

fn body_framing_411_413_415(backend: Backend) {
    const MAX: usize = 1024;
    let Some(server) = start(backend, "framing", |o| {
        o.extra_toml = format!("[http]\nmax_body_bytes = {MAX}\n");
    }) else {
        return;
    };
    let pids = server.worker_pids();
    let id = server.create(&json!({"title": "x"}));
    let note = format!("/api/notes/{id}");
    let targets = [
        ("POST", "/api/notes"),
        ("PUT", note.as_str()),
        ("PATCH", note.as_str()),
    ];

    // 411: neither Content-Length nor Transfer-Encoding.
    for (method, path) in targets {
        let resp = server.call(method, path, &[JSON], None);
        assert_error(&resp, 411, "length_required");
    }

    // 415: missing or non-JSON Content-Type; JSON with parameters is fine.
    for (method, path) in targets {
        assert_error(
            &server.call(method, path, &[], Some(br#"{"title":"y"}"#)),
            415,
            "unsupported_media_type",
        );
        for ct in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/jsonx",
            "json",
        ] {
            let resp = server.call(
                method,
                path,
                &[("Content-Type", ct)],
                Some(br#"{"title":"y"}"#),
            );
            assert_error(&resp, 415, "unsupported_media_type");
        }
    }
    for ct in [
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/json;charset=UTF-8",
    ] {
        let resp = server.call(
            "POST",
            "/api/notes",
            &[("Content-Type", ct)],
            Some(br#"{"title":"ct"}"#),
        );
        assert_eq!(resp.status, 201, "Content-Type {ct:?}: {resp:?}");
    }

    // A body of exactly max_body_bytes is accepted, one byte more is 413.
    let exact = sized_body(MAX);
    assert_eq!(exact.len(), MAX);
    let resp = server.call("POST", "/api/notes", &[JSON], Some(exact.as_bytes()));
    assert_eq!(
        resp.status, 201,
        "a body of exactly max_body_bytes: {resp:?}"
    );
    let over = sized_body(MAX + 1);
    for (method, path) in targets {
        let resp = server.call(method, path, &[JSON], Some(over.as_bytes()));
        assert_error(&resp, 413, "payload_too_large");
    }
    // Declared far too large, body not even sent: answered at once.
    let t0 = Instant::now();
    let resp = server.call(
        "POST",
        "/api/notes",
        &[JSON, ("Content-Length", "100000000")],
        None,
    );
    assert_error(&resp, 413, "payload_too_large");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "413 without reading the body"
    );

    // Chunked: accepted under the limit, 413 once the stream passes it.
    let resp = server.call(
        "POST",
        "/api/notes",
        &[JSON, ("Transfer-Encoding", "chunked")],
        Some(&chunked(br#"{"title":"chun","body":"ked"}"#, 7)),
    );
    assert_eq!(resp.status, 201, "a small chunked body: {resp:?}");
    let cid = resp.json()["id"].as_i64().expect("id");
    assert_eq!(
        (
            server.note(cid)["title"].as_str(),
            server.note(cid)["body"].as_str()
        ),
        (Some("chun"), Some("ked"))
    );
    for (method, path) in targets {
        let big = sized_body(4 * MAX);
        let resp = server.call(
            method,
            path,
            &[JSON, ("Transfer-Encoding", "chunked")],
            Some(&chunked(big.as_bytes(), 300)),
        );
        assert_error(&resp, 413, "payload_too_large");
    }
    let resp = server.call(
        "POST",
        "/api/notes",
        &[JSON, ("Transfer-Encoding", "chunked")],
        Some(&chunked(sized_body(MAX + 1).as_bytes(), 100)),
    );
    assert_error(&resp, 413, "payload_too_large");

    assert_eq!(
        server.note(id)["title"],
        "x",
        "nothing refused changed the note"
    );
    assert_same_workers(&server, &pids);
}

/// A valid note JSON of exactly `len` bytes.
fn sized_body(len: usize) -> String {
    let shell = r#"{"title":"big","body":""}"#;
    assert!(len >= shell.len());
    format!(
        r#"{{"title":"big","body":"{}"}}"#,
        "b".repeat(len - shell.len())
    )
}

fn ids_of(page: &Value) -> Vec<i64> {
    page.as_array()
        .expect("a JSON array")
        .iter()
        .map(|n| n["id"].as_i64().expect("id"))
        .collect()
}

fn pagination_walks_every_note_once(backend: Backend) {
    const N: usize = 230;
    let Some(server) = start(backend, "pages", |_| {}) else {
        return;
    };
    let out = server.db.seed(N as u32);
    assert!(
        out.stdout.contains(&N.to_string()),
        "seed reports the count: {}",
        out.describe()
    );

    // Walk with limit 50, following Link: pages 50,50,50,50,30, the last without Link.
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut notes = Vec::new();
    let mut next = Some("/api/notes?limit=50".to_string());
    while let Some(path) = next.take() {
        assert!(sizes.len() < 10, "too many pages: {sizes:?}");
        let resp = server.get_path(&path);
        assert_eq!(resp.status, 200, "GET {path}: {resp:?}");
        let page = resp.json();
        let ids = ids_of(&page);
        sizes.push(ids.len());
        if let Some(link) = resp.header("link") {
            let last = *ids.last().expect("a page with a Link is not empty");
            assert_eq!(
                link,
                format!("</api/notes?limit=50&before={last}>; rel=\"next\""),
                "Link of {path}"
            );
            next = next_link(link);
        }
        seen.extend(ids);
        notes.extend(page.as_array().expect("array").iter().cloned());
    }
    assert_eq!(sizes, [50, 50, 50, 50, 30], "page sizes");
    let distinct: BTreeSet<i64> = seen.iter().copied().collect();
    assert_eq!(distinct.len(), N, "every note exactly once (no overlap)");
    assert_eq!(seen.len(), N, "no gaps, no repeats");
    assert_eq!(
        distinct,
        (1..=N as i64).collect(),
        "the seeded ids on a fresh database"
    );
    // Newest first: seeded in one statement, they share created_at, so the id breaks ties.
    assert!(
        seen.windows(2).all(|w| w[0] > w[1]),
        "ids strictly decreasing: {seen:?}"
    );
    for w in notes.windows(2) {
        assert!(
            w[0]["created_at"].as_str() >= w[1]["created_at"].as_str(),
            "created_at descending: {} then {}",
            w[0],
            w[1]
        );
    }
    for n in &notes {
        assert_note_shape(n);
    }
    let titles: BTreeSet<String> = notes
        .iter()
        .map(|n| n["title"].as_str().unwrap_or("").to_string())
        .collect();
    let expected: BTreeSet<String> = (1..=N).map(|i| format!("Note {i}")).collect();
    assert_eq!(titles, expected, "seed inserts Note 1…Note {N}");

    // Default limit 50, max 200, an exact fit has no Link.
    let first = server.get_path("/api/notes");
    assert_eq!(
        ids_of(&first.json()),
        seen[..50].to_vec(),
        "default limit 50"
    );
    assert_eq!(
        first.header("link").map(str::to_string),
        Some(format!(
            "</api/notes?limit=50&before={}>; rel=\"next\"",
            seen[49]
        ))
    );
    let big = server.get_path("/api/notes?limit=200");
    assert_eq!(ids_of(&big.json()), seen[..200].to_vec());
    let rest = server
        .get_path(&next_link(big.header("link").expect("Link after 200 of 230")).expect("next"));
    assert_eq!(ids_of(&rest.json()), seen[200..].to_vec());
    assert_eq!(rest.header("link"), None, "the last page has no Link");
    let half = server.get_path("/api/notes?limit=115");
    let second = server.get_path(&next_link(half.header("link").expect("Link")).expect("next"));
    assert_eq!(ids_of(&second.json()), seen[115..].to_vec());
    assert_eq!(second.header("link"), None, "exactly 115 left: no Link");
    assert_eq!(
        server
            .get_path(&format!("/api/notes?limit=200&before={}", seen[N - 1]))
            .json(),
        json!([])
    );
    let all = server.list_all(200);
    assert_eq!(all.len(), N);

    // A cursor whose note was deleted meanwhile still continues where it was.
    let page2 = server
        .get_path(&format!("/api/notes?limit=50&before={}", seen[49]))
        .json();
    assert_eq!(
        server
            .call("DELETE", &format!("/api/notes/{}", seen[49]), &[], None)
            .status,
        204
    );
    let again = server.get_path(&format!("/api/notes?limit=50&before={}", seen[49]));
    assert_eq!(again.status, 200);
    assert_eq!(
        again.json(),
        page2,
        "a deleted cursor note neither skips nor repeats"
    );

    // A new note comes first.
    let new = server.create(&json!({"title": "newest"}));
    assert_eq!(ids_of(&server.get_path("/api/notes?limit=1").json()), [new]);
}

fn metrics_count_exactly_what_was_asked(backend: Backend) {
    let Some(server) = start(backend, "metrics", |_| {}) else {
        return;
    };
    let id = server.create(&json!({"title": "m"}));
    let m0 = server.metrics();
    // Fresh connections, so both workers answer some of them.
    for i in 0..5 {
        server.create(&json!({"title": format!("m{i}")}));
    }
    for _ in 0..3 {
        assert_eq!(server.get_path("/api/notes").status, 200);
    }
    for _ in 0..2 {
        assert_eq!(server.get_path("/api/notes/999999999").status, 404);
        server.note(id);
    }
    assert_eq!(server.call("DELETE", "/api/notes", &[], None).status, 405);
    let bad = server.send_json("POST", "/api/notes", r#"{"title":5}"#);
    assert_eq!(bad.status, 422);
    let m1 = server.metrics();

    let delta = |route: &str, status: u16| m1.requests(route, status) - m0.requests(route, status);
    assert_eq!(delta("/api/notes", 201), 5.0, "201s on /api/notes");
    assert_eq!(delta("/api/notes", 200), 3.0, "200s on /api/notes");
    assert_eq!(delta("/api/notes", 405), 1.0);
    assert_eq!(delta("/api/notes", 422), 1.0);
    assert_eq!(delta("/api/notes/{id}", 404), 2.0);
    assert_eq!(delta("/api/notes/{id}", 200), 2.0);
    assert_eq!(
        delta("/metrics", 200),
        1.0,
        "the first scrape counts, once answered"
    );
    assert_eq!(
        m1.total_requests() - m0.total_requests(),
        15.0,
        "nothing else counted"
    );

    // The latency histogram: cumulative buckets, +Inf = _count, _count moved by the requests.
    for (route, n) in [("/api/notes", 10.0), ("/api/notes/{id}", 4.0)] {
        let count = |m: &Metrics| {
            m.get(&format!(
                "notesd_http_request_duration_seconds_count{{route=\"{route}\"}}"
            ))
        };
        assert_eq!(count(&m1) - count(&m0), n, "histogram count of {route}");
        let buckets: Vec<f64> = m1
            .samples
            .iter()
            .filter(|(k, _)| {
                k.starts_with(&format!(
                    "notesd_http_request_duration_seconds_bucket{{route=\"{route}\","
                ))
            })
            .map(|(_, v)| *v)
            .collect();
        assert!(buckets.len() >= 2, "buckets of {route}: {m1:?}");
        let inf = m1.get(&format!(
            "notesd_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}}"
        ));
        assert_eq!(inf, count(&m1), "+Inf bucket = _count for {route}");
        assert!(
            buckets.iter().all(|b| *b <= inf),
            "no bucket above +Inf: {buckets:?}"
        );
        let sum = |m: &Metrics| {
            m.get(&format!(
                "notesd_http_request_duration_seconds_sum{{route=\"{route}\"}}"
            ))
        };
        assert!(sum(&m1) > sum(&m0), "_sum grows for {route}");
    }
    // Cumulative: sorted by le, never decreasing.
    let mut by_le: Vec<(f64, f64)> = m1
        .samples
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix(
                "notesd_http_request_duration_seconds_bucket{route=\"/api/notes\",le=\"",
            )?;
            let le = le.strip_suffix("\"}")?;
            Some((
                if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                },
                *v,
            ))
        })
        .collect();
    by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(
        by_le.windows(2).all(|w| w[0].1 <= w[1].1),
        "cumulative buckets: {by_le:?}"
    );

    assert_eq!(
        m1.get("notesd_workers{state=\"serving\"}"),
        2.0,
        "workers serving"
    );
    assert_eq!(m1.sum("notesd_worker_restarts_total"), 0.0);
    for reason in ["crash", "timeout", "oom"] {
        let series = format!("notesd_worker_restarts_total{{reason=\"{reason}\"}}");
        assert!(m1.samples.contains_key(&series), "{series}");
    }
    assert!(
        m1.samples.contains_key("notesd_http_requests_in_flight"),
        "{m1:?}"
    );
    assert!(
        m1.get("notesd_http_requests_in_flight") <= 1.0,
        "only the scrape itself is in flight"
    );
}

fn concurrent_creates_are_all_committed(backend: Backend) {
    const CONNS: usize = 8;
    const EACH: usize = 50;
    let Some(server) = start(backend, "concurrent", |_| {}) else {
        return;
    };
    let pids = server.worker_pids();
    let socket = server.socket().to_path_buf();
    let t0 = Instant::now();
    let threads: Vec<_> = (0..CONNS)
        .map(|t| {
            let socket = socket.clone();
            thread::spawn(move || {
                let mut c = Client::connect(&socket);
                let mut made = Vec::new();
                for i in 0..EACH {
                    let title = format!("c{t}-{i}");
                    let body =
                        json!({"title": title, "body": format!("from thread {t}")}).to_string();
                    let resp = c.call("POST", "/api/notes", &[JSON], Some(body.as_bytes()));
                    assert_eq!(resp.status, 201, "POST {title}: {resp:?}");
                    let id = resp.json()["id"].as_i64().expect("id");
                    assert_eq!(
                        resp.header("location"),
                        Some(format!("/api/notes/{id}").as_str())
                    );
                    if resp.connection_close() {
                        c = Client::connect(&socket);
                    }
                    made.push((id, title));
                }
                made
            })
        })
        .collect();
    let mut made = Vec::new();
    for t in threads {
        made.extend(
            t.join()
                .expect("a client thread failed (see its panic above)"),
        );
    }
    eprintln!("{} creates in {:?}", made.len(), t0.elapsed());
    assert_eq!(made.len(), CONNS * EACH);
    let ids: BTreeSet<i64> = made.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), CONNS * EACH, "every returned id is distinct");

    let listed = server.list_all(200);
    assert_eq!(listed.len(), CONNS * EACH, "the list holds every note");
    let listed_ids: BTreeSet<i64> = listed
        .iter()
        .map(|n| n["id"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(listed_ids, ids, "the listed ids are the created ones");
    let mut c = Client::connect(server.socket());
    for (id, title) in &made {
        let resp = c.call("GET", &format!("/api/notes/{id}"), &[], None);
        assert_eq!(resp.status, 200, "GET {id}: {resp:?}");
        assert_eq!(resp.json()["title"].as_str(), Some(title.as_str()));
        if resp.connection_close() {
            c = Client::connect(server.socket());
        }
    }
    assert_same_workers(&server, &pids);
}

/// Sends raw bytes on a fresh connection (then half-closes when `eof`) and
/// reads one answer: Some(status), or None when the server just closed.
fn raw(server: &TestServer, bytes: &[u8], eof: bool) -> Option<u16> {
    let mut c = Client::connect(server.client_socket());
    if c.send_raw(bytes).is_err() {
        return None;
    }
    if eof {
        c.shutdown_write();
    }
    c.read_response(false).ok().map(|r| r.status)
}

fn hostile_input_never_costs_a_worker(backend: Backend) {
    let Some(server) = start(backend, "hostile", |_| {}) else {
        return;
    };
    let pids = server.worker_pids();
    let id = server.create(&json!({"title": "survivor"}));

    let deep_array = "[".repeat(100_000);
    let deep_title = format!("{{\"title\":{}}}", "[".repeat(50_000));
    let deep_object = format!("{{\"body\":{}}}", "{\"a\":".repeat(20_000));
    let huge_header = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    let many_headers: String = (0..2000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many_headers = format!("GET / HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n");
    let post = |body: &str| -> Vec<u8> {
        build_request("POST", "/api/notes", &[JSON], Some(body.as_bytes()))
    };
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("garbage request line", b"GARBAGE\r\n\r\n".to_vec(), false),
        ("binary junk", vec![0, 1, 2, 255, 254, 13, 10, 13, 10], false),
        ("HTTP/0.9", b"GET /\r\n\r\n".to_vec(), true),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), true),
        ("huge header", huge_header.into_bytes(), false),
        ("many headers", many_headers.into_bytes(), false),
        ("bad chunk size", b"POST /api/notes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n".to_vec(), false),
        ("CL and TE", b"POST /api/notes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n".to_vec(), false),
        ("negative CL", b"POST /api/notes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: -1\r\n\r\n{}".to_vec(), false),
        ("two CLs", b"POST /api/notes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}".to_vec(), false),
        ("truncated body", b"POST /api/notes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"title\":".to_vec(), true),
        ("truncated chunked", b"POST /api/notes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"ti".to_vec(), true),
        ("headers only, then EOF", b"POST /api/notes HTTP/1.1\r\nHost: x\r\n".to_vec(), true),
        ("deep array", post(&deep_array), false),
        ("deep title", post(&deep_title), false),
        ("deep object", post(&deep_object), false),
        ("number out of range", post(r#"{"title":"n","body":1e999}"#), false),
        ("lone surrogate", post(r#"{"title":"\udc00"}"#), false),
        ("NUL in title", post(r#"{"title":"a\u0000b"}"#), false),
        ("NUL in body", post(r#"{"title":"nul","body":"a\u0000b"}"#), false),
        ("control chars", post(r#"{"title":"\u0007\u001b[2J"}"#), false),
        ("duplicate keys", post(r#"{"title":"a","title":"b"}"#), false),
        ("10k title", post(&json!({"title": "t".repeat(10_000)}).to_string()), false),
        ("invalid UTF-8 path", b"GET /api/notes/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), false),
        ("percent path", b"GET /api/notes/%00 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), false),
        ("absolute URI", b"GET http://evil/api/notes HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), false),
        ("huge limit", b"GET /api/notes?limit=1&limit=999999999999999999999999 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), false),
        ("GET with a body", build_request("GET", "/api/notes", &[JSON], Some(b"{\"x\":1}")), false),
        ("DELETE with a body", build_request("DELETE", "/api/notes/999999", &[JSON], Some(b"{\"x\":1}")), false),
        ("Expect 100-continue", build_request("POST", "/api/notes", &[JSON, ("Expect", "100-continue")], Some(b"{}")), false),
    ];
    // Every case is tried before judging, so one run lists every problem.
    let mut problems = Vec::new();
    for (what, bytes, eof) in &cases {
        let status = raw(&server, bytes, *eof);
        eprintln!("{what}: {status:?}");
        if let Some(s) = status
            && !((200..500).contains(&s) || s == 100)
        {
            problems.push(format!("{what}: answered {s} (a 5xx for bad input)"));
        }
    }
    // Specific answers where the contract names them.
    for (what, body) in [
        ("deep nesting", deep_array.as_str()),
        ("lone surrogate", r#"{"title":"\udc00"}"#),
    ] {
        let s = raw(&server, &post(body), false);
        if s != Some(400) {
            problems.push(format!("{what}: {s:?}, expected 400 (malformed JSON)"));
        }
    }
    // A NUL character in a body: stored and returned as is, or refused with
    // 422 where the database cannot store it -- never a 500.
    let path = format!("/api/notes/{id}");
    for (method, p) in [
        ("POST", "/api/notes"),
        ("PUT", path.as_str()),
        ("PATCH", path.as_str()),
    ] {
        let resp = server.send_json(method, p, r#"{"title":"survivor","body":"a\u0000b"}"#);
        match resp.status {
            200 | 201 => {
                let nid = resp.json()["id"].as_i64().expect("id");
                let body = server.note(nid)["body"].clone();
                if body != "a\u{0}b" {
                    problems.push(format!("{method} body with NUL came back as {body}"));
                }
            }
            422 => assert_error(&resp, 422, "validation_failed"),
            s => problems.push(format!(
                "{method} {p} with a NUL in the body: {s} {} (expected 201/200 or 422)",
                resp.body
            )),
        }
    }
    if server.send_json("PATCH", &path, r#"{"body":null}"#).status != 200 {
        problems.push("PATCH body null after the NUL cases".to_string());
    }
    let long = json!({"title": "t".repeat(10_000)}).to_string();
    let s = server.send_json("POST", "/api/notes", &long).status;
    if s != 422 {
        problems.push(format!("a 10 000-character title: {s}, expected 422"));
    }

    // Pipelining: three requests in one write, three answers in order.
    let mut c = Client::connect(server.socket());
    let mut batch = build_request("POST", "/api/notes", &[JSON], Some(br#"{"title":"piped"}"#));
    batch.extend(build_request("GET", &format!("/api/notes/{id}"), &[], None));
    batch.extend(build_request("GET", "/healthz", &[], None));
    c.send_raw(&batch).expect("pipelined write");
    let r1 = c.read_response(false).expect("first pipelined answer");
    let r2 = c.read_response(false).expect("second pipelined answer");
    let r3 = c.read_response(false).expect("third pipelined answer");
    assert_eq!((r1.status, r2.status, r3.status), (201, 200, 200));
    assert_eq!(r2.json()["title"], "survivor");

    // A client that goes away mid-request does not matter either.
    for _ in 0..5 {
        let mut c = Client::connect(server.socket());
        let _ = c.send_raw(b"POST /api/notes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{\"ti");
        drop(c);
    }
    thread::sleep(Duration::from_millis(200));
    assert_eq!(server.note(id)["title"], "survivor");
    assert_same_workers(&server, &pids);
    assert!(
        problems.is_empty(),
        "bad input mishandled:\n{}",
        problems.join("\n")
    );
}

fn slow_requests_get_503_timeout(backend: Backend) {
    let Some(server) = start(backend, "timeout", |o| {
        o.extra_toml = "[http]\nrequest_timeout = 1\n".to_string();
    }) else {
        return;
    };
    let pids = server.worker_pids();
    let t0 = Instant::now();
    let resp = server.get_path("/debug/sleep?ms=5000");
    let took = t0.elapsed();
    assert_error(&resp, 503, "timeout");
    assert!(
        took < Duration::from_millis(2500),
        "answered after ~request_timeout, took {took:?}"
    );
    // The worker lives on and serves.
    let id = server.create(&json!({"title": "after"}));
    assert_eq!(server.note(id)["title"], "after");
    assert_same_workers(&server, &pids);
}

/// The first `n` ids of `GET /api/notes`, asked on a fresh connection.
fn head_ids(server: &impl Api, n: usize) -> Vec<i64> {
    let resp = server.get_path("/api/notes");
    assert_eq!(resp.status, 200, "{resp:?}");
    ids_of(&resp.json()).into_iter().take(n).collect()
}

/// List pages are cached per worker until the next write through any worker
/// (`http.list_cache_ms` set far beyond the test): every write is seen by the
/// very next list, whichever worker answers it.
fn the_list_never_lags_a_write_made_here(backend: Backend) {
    let Some(server) = start(backend, "cache_rw", |o| {
        o.workers = 3;
        o.extra_toml = "[http]\nlist_cache_ms = 60000\n".to_string();
    }) else {
        return;
    };
    let mut live: Vec<i64> = Vec::new();
    for round in 0..12 {
        let id = server.create(&json!({ "title": format!("n{round}") }));
        live.insert(0, id);
        for _ in 0..4 {
            assert_eq!(head_ids(&server, 1), [id], "round {round}: after POST");
        }
        let title = format!("patched {round}");
        let resp = server.send_json(
            "PATCH",
            &format!("/api/notes/{id}"),
            &json!({ "title": title }).to_string(),
        );
        assert_eq!(resp.status, 200, "{resp:?}");
        for _ in 0..4 {
            let page = server.get_path("/api/notes").json();
            assert_eq!(page[0]["title"], title, "round {round}: after PATCH");
        }
        let resp = server.send_json(
            "PUT",
            &format!("/api/notes/{id}"),
            r#"{"title":"put","body":"b"}"#,
        );
        assert_eq!(resp.status, 200, "{resp:?}");
        for _ in 0..4 {
            let page = server.get_path("/api/notes").json();
            assert_eq!(
                (&page[0]["title"], &page[0]["body"]),
                (&json!("put"), &json!("b")),
                "round {round}: after PUT"
            );
        }
        if round % 2 == 1 {
            let resp = server.call("DELETE", &format!("/api/notes/{id}"), &[], None);
            assert_eq!(resp.status, 204, "{resp:?}");
            live.remove(0);
            for _ in 0..4 {
                assert_eq!(
                    head_ids(&server, live.len()),
                    live,
                    "round {round}: after DELETE"
                );
            }
        }
    }
}

/// Writes that do not pass through this server (`notesd seed`, a separate
/// process; SQL straight into the database) are in the very next list page
/// every worker serves, with the list cache on: a cached page is checked
/// against the database's commit token, not trusted for a time.
fn writes_made_elsewhere_show_at_once(backend: Backend) {
    let Some(server) = start(backend, "cache_elsewhere", |o| {
        o.extra_toml = "[http]\nlist_cache_ms = 60000\n".to_string();
    }) else {
        return;
    };
    let id = server.create(&json!({"title": "mine"}));
    // Fill every worker's cache with the page that has only `id`.
    for _ in 0..6 {
        assert_eq!(head_ids(&server, 1), [id]);
    }
    server.db.seed(1);
    for _ in 0..6 {
        assert_ne!(
            head_ids(&server, 1),
            [id],
            "the seeded note is listed at once"
        );
    }
    let seeded = head_ids(&server, 1);
    sql_exec(
        &server.db,
        "INSERT INTO notes (title, body) VALUES ('from sql', NULL)",
    );
    for _ in 0..6 {
        let head = head_ids(&server, 1);
        assert_ne!(head, seeded, "the note inserted by SQL is listed at once");
        assert_eq!(
            server.note(head[0])["title"],
            "from sql",
            "the newest is the SQL one"
        );
    }
}
