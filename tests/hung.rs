//! A database that hangs instead of refusing, black-box: a locked table and
//! a SIGSTOPped PostgreSQL. `database.statement_timeout_ms` bounds every
//! query (notesd's own timer, and PostgreSQL's session `statement_timeout`),
//! so each request is answered 503 "database timed out" in bounded time, the
//! workers live, and the service comes back by itself. And a request left
//! waiting on a lock by a client that half-closed is still served to its end.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::hosts::{PgCluster, require_root};
use common::notes::*;
use common::*;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

/// `LOCK TABLE notes` held for 6 s with a 1.5 s bound: a POST and a read of a
/// note are answered 503 `database_timeout` in 1.5–2.5 s, PostgreSQL cancels
/// the statements it was running for them (no notesd backend still waits on
/// the lock), and both work again once the lock is gone.
#[test]
fn a_locked_table_is_answered_503_within_the_statement_timeout() {
    let Some(server) = start(Backend::Postgres, "locked_bound", |o| {
        o.workers = 1;
        o.database_extra = "statement_timeout_ms = 1500".into();
    }) else {
        return;
    };
    let created = server.create(&json!({"title": "before the lock"}));
    let id = created;
    let db = server.db.pg.as_ref().expect("PostgreSQL").name.clone();
    let mut locker = hold_notes_lock(&db, 6);
    let (post, post_took) = timed(
        server.socket_path(),
        "POST",
        "/api/notes",
        Some(r#"{"title":"blocked"}"#),
    );
    let (get, get_took) = timed(
        server.socket_path(),
        "GET",
        &format!("/api/notes/{id}"),
        None,
    );
    thread::sleep(Duration::from_millis(300));
    let waiting = psql_ok(
        &db,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'notesd' AND wait_event_type = 'Lock'",
    );
    eprintln!(
        "HUNG lock: POST {} {:?} in {post_took:?}, GET {} {:?} in {get_took:?}; notesd backends still waiting on the lock: {waiting}",
        post.status,
        post.error_code(),
        get.status,
        get.error_code()
    );
    for (what, resp, took) in [("POST", &post, post_took), ("GET", &get, get_took)] {
        assert_eq!(resp.status, 503, "{what}: {resp:?}");
        assert_eq!(
            resp.error_code().as_deref(),
            Some("database_timeout"),
            "{what}: {resp:?}"
        );
        assert!(
            took >= Duration::from_millis(1400) && took < Duration::from_millis(2500),
            "{what} answered in {took:?}, not within statement_timeout_ms = 1500 (+1 s)"
        );
    }
    assert_eq!(
        waiting, "0",
        "PostgreSQL's statement_timeout cancelled the waiting statements"
    );
    let _ = locker.wait();
    assert_eq!(server.get_path(&format!("/api/notes/{id}")).status, 200);
    let after = server.create(&json!({"title": "after the lock"}));
    assert!(after > id);
    assert_eq!(server.worker_pids().len(), 1);
}

/// A SIGSTOPped PostgreSQL (all its processes): `/healthz` answers 200 all
/// along, `/readyz` 503 within 2 s, reads and writes 503 within the bound
/// plus 1 s, no worker is killed; SIGCONT → serving again within 1 s, and
/// every note acknowledged before the hang is there.
#[test]
fn a_hung_postgresql_is_answered_in_bounded_time_and_recovered_from() {
    if !require_root("a hung PostgreSQL") {
        return;
    }
    let Some(cluster) = PgCluster::start("hung_pg") else {
        return;
    };
    cluster.sql("postgres", "CREATE DATABASE notesd");
    let server = TestServer::start(
        "hung_pg",
        TestOptions {
            database_url: Some(cluster.url("notesd")),
            database_extra: "statement_timeout_ms = 2000".into(),
            ..TestOptions::default()
        },
    );
    let mut ids = Vec::new();
    for i in 0..20 {
        let (resp, _) = timed(
            server.socket_path(),
            "POST",
            "/api/notes",
            Some(&format!(r#"{{"title":"n{i}"}}"#)),
        );
        assert_eq!(resp.status, 201, "{resp:?}");
        let v: Value = serde_json::from_str(&resp.body).expect("json");
        ids.push(v["id"].as_i64().expect("id"));
    }
    let workers = server.worker_pids();
    let pids = cluster.pids();
    assert!(!pids.is_empty(), "the cluster's processes");
    for p in &pids {
        send_signal(*p, Signal::SIGSTOP);
    }
    let stopped = Instant::now();
    let readyz_503 = poll_until(Duration::from_secs(3), || {
        server.get("/readyz").status == 503
    });
    let readyz_after = stopped.elapsed();
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(timed(
            server.socket_path(),
            "POST",
            "/api/notes",
            Some(r#"{"title":"hung"}"#),
        ));
        answers.push(timed(
            server.socket_path(),
            "GET",
            &format!("/api/notes/{}", ids[0]),
            None,
        ));
        assert_eq!(
            server.get("/healthz").status,
            200,
            "/healthz while the database hangs"
        );
    }
    let hung_for = stopped.elapsed();
    for p in &pids {
        send_signal(*p, Signal::SIGCONT);
    }
    let resumed = Instant::now();
    let back = poll_until(Duration::from_secs(5), || {
        server.get(&format!("/api/notes/{}", ids[1])).status == 200
    });
    let back_after = resumed.elapsed();
    eprintln!(
        "HUNG server: /readyz 503 after {readyz_after:?}; answers while hung {:?} over {hung_for:?}; serving again {back_after:?} after SIGCONT",
        answers
            .iter()
            .map(|(r, d)| (r.status, r.error_code(), d.as_millis()))
            .collect::<Vec<_>>()
    );
    assert!(
        readyz_503 && readyz_after < Duration::from_secs(2),
        "/readyz 503 within 2 s: {readyz_after:?}"
    );
    for (resp, took) in &answers {
        assert_eq!(resp.status, 503, "{resp:?}");
        assert!(
            *took < Duration::from_millis(3000),
            "answered in {took:?}: not within statement_timeout_ms + 1 s"
        );
    }
    assert!(
        back && back_after < Duration::from_secs(1),
        "serving again {back_after:?} after SIGCONT"
    );
    assert_eq!(server.worker_pids(), workers, "no worker killed as hung");
    let (post, _) = timed(
        server.socket_path(),
        "POST",
        "/api/notes",
        Some(r#"{"title":"after"}"#),
    );
    assert_eq!(post.status, 201, "{post:?}");
    let count = cluster.sql(
        "notesd",
        &format!("SELECT count(*) FROM notes WHERE id <= {}", ids[19]),
    );
    assert_eq!(
        count.trim(),
        "20",
        "every note acknowledged before the hang is there"
    );
    let mut server = server;
    server.allow_errors();
}

/// A client that shuts its sending side while its POST waits on a locked
/// table still gets its 201, and the note is there: the request is served to
/// its end (hyper allows half-closed connections), never cancelled between
/// its query and its commit because the client's side closed.
#[test]
fn a_post_whose_client_half_closes_is_served_to_its_end() {
    let Some(server) = start(Backend::Postgres, "half_closed", |o| o.workers = 1) else {
        return;
    };
    let db = server.db.pg.as_ref().expect("PostgreSQL").name.clone();
    let mut locker = hold_notes_lock(&db, 2);
    let body = br#"{"title":"half-closed"}"#;
    let mut conn = HttpConn::connect(server.socket_path()).expect("connect");
    conn.send_raw(&build_request("POST", "/api/notes", &[JSON], Some(body)))
        .expect("send the request");
    conn.shut_write().expect("half-close");
    let t0 = Instant::now();
    let resp = conn
        .read_response()
        .expect("an answer on the half-closed connection");
    eprintln!("HALF-CLOSED: {} after {:?}", resp.status, t0.elapsed());
    assert_eq!(resp.status, 201, "{resp:?}");
    let _ = locker.wait();
    let titles: Vec<Value> = server
        .list_all(200)
        .into_iter()
        .map(|n| n["title"].clone())
        .collect();
    assert!(titles.contains(&json!("half-closed")), "{titles:?}");
}
