//! `Idempotency-Key` on POST, PUT, PATCH and DELETE, black-box, on both
//! backends: the first answer is given again to a retry with the same key
//! and request (`Idempotent-Replayed: true`), another request under the key
//! is 422, a duplicate of a request still running is 409, concurrent
//! duplicates make exactly one note, bad keys are 400 and input errors do
//! not use a key up, and keys expire after `http.idempotency_ttl` and are
//! purged. (A host lost mid-POST with clients retrying by key: tests/scale.rs.)

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::notes::*;
use common::*;
use serde_json::{Value, json};

both_backends!(
    a_keyed_post_is_done_once_and_replayed,
    bad_keys_and_bad_input_do_not_use_a_key,
    put_patch_and_delete_replay_their_first_answer,
    concurrent_duplicates_make_exactly_one_note,
    keys_expire_after_the_ttl_and_are_purged,
);

const KEY: &str = "Idempotency-Key";

/// METHOD PATH with `Idempotency-Key: key` and a JSON body (if any).
fn keyed(server: &impl Api, method: &str, path: &str, key: &str, body: Option<&Value>) -> Response {
    let text = body.map(Value::to_string);
    server.call(
        method,
        path,
        &[JSON, (KEY, key)],
        text.as_deref().map(str::as_bytes),
    )
}

fn replayed(resp: &Response) -> bool {
    resp.header("idempotent-replayed") == Some("true")
}

fn count_titled(server: &NotesServer, title: &str) -> i64 {
    sql_i64(
        &server.db,
        &format!("SELECT count(*) FROM notes WHERE title = '{title}'"),
    )
}

fn a_keyed_post_is_done_once_and_replayed(backend: Backend) {
    let Some(server) = start(backend, "idem_post", |_| {}) else {
        return;
    };
    let body = json!({"title": "once", "body": "only once"});
    let first = keyed(&*server, "POST", "/api/notes", "k-1", Some(&body));
    assert_eq!(first.status, 201, "{first:?}");
    assert!(
        !replayed(&first),
        "a first answer is not a replay: {first:?}"
    );
    let id = first.json()["id"].as_i64().expect("id");
    let location = format!("/api/notes/{id}");
    assert_eq!(first.header("location"), Some(location.as_str()));

    // The same document, encoded otherwise: the same request.
    let reencoded = server.call(
        "POST",
        "/api/notes",
        &[JSON, (KEY, "\"k-1\"")],
        Some(b"{ \"body\": \"only once\",\n  \"title\": \"once\" }"),
    );
    for retry in [
        keyed(&*server, "POST", "/api/notes", "k-1", Some(&body)),
        reencoded,
    ] {
        assert_eq!(retry.status, 201, "{retry:?}");
        assert!(replayed(&retry), "{retry:?}");
        assert_eq!(retry.body, first.body, "the very same body");
        assert_eq!(retry.header("location"), Some(location.as_str()));
        assert_eq!(retry.header("content-type"), Some("application/json"));
    }
    assert_eq!(count_titled(&server, "once"), 1, "one note for three POSTs");

    // The key with another request: 422, nothing written.
    let other = keyed(
        &*server,
        "POST",
        "/api/notes",
        "k-1",
        Some(&json!({"title": "other"})),
    );
    assert_eq!(other.status, 422, "{other:?}");
    assert_eq!(
        other.error_code().as_deref(),
        Some("idempotency_key_reused")
    );
    let elsewhere = keyed(&*server, "PUT", &location, "k-1", Some(&body));
    assert_eq!(
        elsewhere.status, 422,
        "another method and path: {elsewhere:?}"
    );
    assert_eq!(count_titled(&server, "other"), 0);
    assert_eq!(server.note(id)["title"], "once", "the note is untouched");

    // Another key is another request; no key is a plain POST each time.
    let second = keyed(&*server, "POST", "/api/notes", "k-2", Some(&body));
    assert_eq!(second.status, 201);
    assert_ne!(second.json()["id"], first.json()["id"]);
    server.create(&body);
    server.create(&body);
    assert_eq!(count_titled(&server, "once"), 4);
}

fn bad_keys_and_bad_input_do_not_use_a_key(backend: Backend) {
    let Some(server) = start(backend, "idem_bad", |_| {}) else {
        return;
    };
    let body = json!({"title": "bad keys"});
    let text = body.to_string();
    let long = "k".repeat(256);
    for (what, headers) in [
        ("256 bytes", vec![JSON, (KEY, long.as_str())]),
        ("empty", vec![JSON, (KEY, "")]),
        ("two headers", vec![JSON, (KEY, "a"), (KEY, "b")]),
    ] {
        let resp = server.call("POST", "/api/notes", &headers, Some(text.as_bytes()));
        assert_eq!(resp.status, 400, "{what}: {resp:?}");
        assert_eq!(resp.error_code().as_deref(), Some("bad_request"), "{what}");
        assert!(
            resp.json()["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("Idempotency-Key")),
            "{what}: the message names the header: {resp:?}"
        );
    }
    let longest = "k".repeat(255);
    let ok = keyed(&*server, "POST", "/api/notes", &longest, Some(&body));
    assert_eq!(ok.status, 201, "255 bytes is a key: {ok:?}");

    // Malformed or invalid input is answered, not stored: the key is free.
    let malformed = server.call("POST", "/api/notes", &[JSON, (KEY, "k-in")], Some(b"{"));
    assert_eq!(malformed.status, 400, "{malformed:?}");
    let invalid = keyed(
        &*server,
        "POST",
        "/api/notes",
        "k-in",
        Some(&json!({"title": "x".repeat(161)})),
    );
    assert_eq!(invalid.status, 422, "{invalid:?}");
    assert_eq!(invalid.error_code().as_deref(), Some("validation_failed"));
    let fine = keyed(&*server, "POST", "/api/notes", "k-in", Some(&body));
    assert_eq!(fine.status, 201, "the key was not used up: {fine:?}");
    assert!(!replayed(&fine));
    assert_eq!(count_titled(&server, "bad keys"), 2);
    // Reads ignore the header.
    let read = server.call("GET", "/api/notes?limit=1", &[(KEY, "k-in")], None);
    assert_eq!(read.status, 200, "{read:?}");
}

fn put_patch_and_delete_replay_their_first_answer(backend: Backend) {
    let Some(server) = start(backend, "idem_write", |_| {}) else {
        return;
    };
    let id = server.create(&json!({"title": "v1"}));
    let path = format!("/api/notes/{id}");
    let v2 = json!({"title": "v2", "body": "b"});
    let put = keyed(&*server, "PUT", &path, "put-1", Some(&v2));
    assert_eq!(put.status, 200, "{put:?}");
    assert_eq!(put.json()["title"], "v2");

    // Someone else changes the note; the keyed PUT's retry still gets its
    // own first answer, and does not write again.
    let v3 = server.send_json("PATCH", &path, &json!({"title": "v3"}).to_string());
    assert_eq!(v3.status, 200);
    let again = keyed(&*server, "PUT", &path, "put-1", Some(&v2));
    assert_eq!(
        (again.status, again.body.as_str()),
        (200, put.body.as_str())
    );
    assert!(replayed(&again));
    assert_eq!(server.note(id)["title"], "v3", "the retry wrote nothing");

    let patch = json!({"body": null});
    let p1 = keyed(&*server, "PATCH", &path, "patch-1", Some(&patch));
    assert_eq!(p1.status, 200, "{p1:?}");
    let p2 = keyed(&*server, "PATCH", &path, "patch-1", Some(&patch));
    assert_eq!((p2.status, p2.body.as_str()), (200, p1.body.as_str()));
    assert!(replayed(&p2));

    // DELETE: a retry gets the 204 again, not a 404.
    for attempt in 0..2 {
        let del = server.call("DELETE", &path, &[(KEY, "del-1")], None);
        assert_eq!(del.status, 204, "attempt {attempt}: {del:?}");
        assert!(del.body.is_empty());
        assert_eq!(replayed(&del), attempt > 0, "{del:?}");
    }
    // A 404 is an answer too: given again, even once the id exists... it
    // never will; what matters is that the retry does not run the write.
    let gone = keyed(&*server, "PUT", &path, "put-gone", Some(&v2));
    assert_eq!(gone.status, 404, "{gone:?}");
    let gone_again = keyed(&*server, "PUT", &path, "put-gone", Some(&v2));
    assert_eq!(
        (gone_again.status, gone_again.body.as_str()),
        (404, gone.body.as_str())
    );
    assert!(replayed(&gone_again));
    assert_eq!(gone_again.error_code().as_deref(), Some("not_found"));
}

/// 16 clients send the same keyed POST at once, for 10 keys: each key makes
/// exactly one note; every 201 (first or replayed) carries its id; the rest
/// are 409 "still being processed" (PostgreSQL) — never a second note.
fn concurrent_duplicates_make_exactly_one_note(backend: Backend) {
    const CLIENTS: usize = 16;
    const KEYS: usize = 10;
    let Some(server) = start(backend, "idem_race", |o| o.workers = 2) else {
        return;
    };
    let socket = server.socket().to_path_buf();
    let (mut created, mut replays, mut conflicts) = (0, 0, 0);
    for k in 0..KEYS {
        let barrier = Arc::new(Barrier::new(CLIENTS));
        let title = format!("race-{k}");
        let answers: Vec<Response> = (0..CLIENTS)
            .map(|_| {
                let (barrier, socket, title) = (barrier.clone(), socket.clone(), title.clone());
                thread::spawn(move || {
                    let body = json!({"title": title}).to_string();
                    let mut c = Client::connect(&socket);
                    barrier.wait();
                    c.call(
                        "POST",
                        "/api/notes",
                        &[JSON, (KEY, title.as_str())],
                        Some(body.as_bytes()),
                    )
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().expect("client thread"))
            .collect();
        let ids: BTreeSet<i64> = answers
            .iter()
            .filter(|r| r.status == 201)
            .map(|r| r.json()["id"].as_i64().expect("id"))
            .collect();
        for r in &answers {
            match r.status {
                201 if replayed(r) => replays += 1,
                201 => created += 1,
                409 => {
                    conflicts += 1;
                    assert_eq!(r.error_code().as_deref(), Some("idempotency_key_in_use"));
                    assert_eq!(r.header("retry-after"), Some("1"));
                }
                _ => panic!("{title}: only 201 or 409: {r:?}"),
            }
        }
        assert_eq!(ids.len(), 1, "{title}: one id in every 201: {ids:?}");
        assert_eq!(
            count_titled(&server, &title),
            1,
            "{title}: exactly one note"
        );
        // Once the first is done, a retry is a replay of that id.
        let after = keyed(
            &*server,
            "POST",
            "/api/notes",
            &title,
            Some(&json!({"title": title})),
        );
        assert!(replayed(&after) && after.status == 201, "{after:?}");
        assert_eq!(after.json()["id"].as_i64(), ids.first().copied());
    }
    eprintln!(
        "IDEMPOTENCY {backend:?}: {KEYS} keys × {CLIENTS} concurrent POSTs: {created} created, \
         {replays} replayed, {conflicts} × 409"
    );
    assert_eq!(created, KEYS, "one first answer per key");
}

/// `idempotency_ttl = 2`: a key is replayed within 2 s and claimed afresh
/// after; the workers purge expired rows by themselves.
fn keys_expire_after_the_ttl_and_are_purged(backend: Backend) {
    let Some(server) = start(backend, "idem_ttl", |o| {
        o.extra_toml = "[http]\nidempotency_ttl = 2\n".into();
    }) else {
        return;
    };
    let body = json!({"title": "ttl"});
    let first = keyed(&*server, "POST", "/api/notes", "ttl-1", Some(&body));
    assert_eq!(first.status, 201);
    let soon = keyed(&*server, "POST", "/api/notes", "ttl-1", Some(&body));
    assert!(replayed(&soon), "within the ttl: {soon:?}");
    for i in 0..20 {
        keyed(
            &*server,
            "POST",
            "/api/notes",
            &format!("ttl-x{i}"),
            Some(&body),
        );
    }
    thread::sleep(Duration::from_millis(3_100));
    let later = keyed(&*server, "POST", "/api/notes", "ttl-1", Some(&body));
    assert_eq!(later.status, 201, "{later:?}");
    assert!(!replayed(&later), "expired: a new request: {later:?}");
    assert_ne!(later.json()["id"], first.json()["id"]);
    // The 20 other keys expired too and go without anyone asking.
    let t0 = Instant::now();
    assert!(
        poll_until(Duration::from_secs(10), || {
            sql_i64(&server.db, "SELECT count(*) FROM idempotency_keys") <= 1
        }),
        "expired keys are purged: {} rows left",
        sql_i64(&server.db, "SELECT count(*) FROM idempotency_keys")
    );
    eprintln!(
        "IDEMPOTENCY {backend:?}: 20 expired keys purged {:?} after the check began",
        t0.elapsed()
    );
}

/// PostgreSQL: a keyed POST waits on a locked table; its duplicate is told
/// 409 at once (the advisory lock on the key), not queued behind it; the
/// first then commits and every retry is its replay.
#[test]
fn a_duplicate_of_a_request_still_running_is_409_at_once() {
    let Some(server) = start(Backend::Postgres, "idem_busy", |o| o.workers = 2) else {
        return;
    };
    let db = server.db.pg.as_ref().expect("PostgreSQL").name.clone();
    let mut locker = hold_notes_lock(&db, 3);
    let socket = server.socket().to_path_buf();
    let body = json!({"title": "busy"});
    let first = {
        let body = body.clone();
        thread::spawn(move || {
            let text = body.to_string();
            Client::connect(&socket).call(
                "POST",
                "/api/notes",
                &[JSON, (KEY, "busy-1")],
                Some(text.as_bytes()),
            )
        })
    };
    thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let dup = keyed(&*server, "POST", "/api/notes", "busy-1", Some(&body));
    let took = t0.elapsed();
    assert_eq!(dup.status, 409, "{dup:?}");
    assert_eq!(dup.error_code().as_deref(), Some("idempotency_key_in_use"));
    assert!(
        took < Duration::from_secs(1),
        "409 at once, not after the lock: {took:?}"
    );
    let _ = locker.wait();
    let first = first.join().expect("first POST");
    assert_eq!(first.status, 201, "{first:?}");
    let retry = keyed(&*server, "POST", "/api/notes", "busy-1", Some(&body));
    assert!(replayed(&retry), "{retry:?}");
    assert_eq!(retry.body, first.body);
    assert_eq!(count_titled(&server, "busy"), 1);
    eprintln!("IDEMPOTENCY: duplicate of a running POST answered 409 in {took:?}");
}
