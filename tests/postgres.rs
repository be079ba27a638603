//! Serving on PostgreSQL: a fresh database per run on 127.0.0.1:5432 (user
//! postgres, trust auth). Skipped loudly when PostgreSQL is unreachable, except
//! under CI, where that is a failure.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[test]
fn serves_on_a_fresh_postgres_database() {
    let Some(db) = fresh_pg_database() else {
        return;
    };
    let mut server = TestServer::start(
        "postgres",
        TestOptions {
            database_url: Some(db.url.clone()),
            migrate_on_start: true,
            ..TestOptions::default()
        },
    );
    let s = server.status();
    assert_eq!(ready_pids(&s).len(), 2, "{s}");

    let resp = server.get("/healthz");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json(), json!({"ok": true}));
    let resp = server.get("/readyz");
    assert_eq!(resp.status, 200, "the database answers: {resp:?}");
    let resp = server.get("/");
    assert_eq!(resp.status, 200, "{resp:?}");

    let t0 = Instant::now();
    server.signal(Signal::SIGTERM);
    let code = server.expect_exit_code(Duration::from_secs(server.opts.graceful_timeout + 2));
    assert_eq!(code, 0, "TERM exits 0 (after {:?})", t0.elapsed());
    // The server goes before its database (drop order made explicit).
    drop(server);
    drop(db);
}
