//! Storage (docs/design.md §6), black-box, on both backends: `notesd migrate` (twice,
//! two at once, `--status`), `notesd seed`, `serve` refusing a schema that is
//! missing, older or newer than the binary, and durability: a 201'd note
//! survives a reload (HUP), SIGKILLed workers and a full restart, while the
//! metrics never go backwards.
//!
//! Direct SQL (to fake an older or newer schema, and to count migration rows)
//! goes through sqlx, which is already a dependency: no sqlite3 CLI needed.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::notes::*;
use common::*;
use serde_json::{Value, json};

both_backends!(
    migrate_is_idempotent_and_reports_status,
    concurrent_migrates_apply_the_schema_once,
    seed_inserts_numbered_notes,
    serve_refuses_a_database_without_schema,
    serve_refuses_an_older_schema,
    serve_refuses_a_newer_schema,
    notes_survive_reload_worker_kill_and_restart,
);

/// Does `notes` exist? (serve must not have created it on its own.)
fn notes_table_exists(db: &Db) -> bool {
    let q = match db.backend {
        Backend::Sqlite => {
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'notes'"
        }
        Backend::Postgres => "SELECT count(*) FROM pg_tables WHERE tablename = 'notes'",
    };
    sql_i64(db, q) > 0
}

// ---------------------------------------------------------------------------
// migrate / seed
// ---------------------------------------------------------------------------

/// The `version state description` line of `migrate --status` for `version`.
fn status_line(out: &CmdOutput, version: &str) -> Option<Vec<String>> {
    out.stdout
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|w| w.first().map(String::as_str) == Some(version))
}

fn migrate_is_idempotent_and_reports_status(backend: Backend) {
    let Some(db) = Db::new(backend, "migrate2") else {
        return;
    };
    let before = db.run(&["migrate", "--status"]);
    assert_eq!(before.code, Some(0), "{}", before.describe());
    assert_eq!(
        status_line(&before, "1"),
        Some(vec![
            "1".into(),
            "pending".into(),
            "create".into(),
            "notes".into()
        ]),
        "`1 pending create notes` before: {}",
        before.describe()
    );
    if backend == Backend::Postgres {
        assert!(!notes_table_exists(&db), "--status applies nothing");
    }

    let first = db.migrate();
    assert!(
        first.stdout.contains("applied") && !first.stdout.contains("up to date"),
        "the first migrate applies: {}",
        first.describe()
    );
    assert!(notes_table_exists(&db));
    let second = db.migrate();
    assert!(
        second.stdout.contains("up to date"),
        "the second migrate is a no-op: {}",
        second.describe()
    );
    let third = db.migrate();
    assert!(third.stdout.contains("up to date"), "{}", third.describe());

    let after = db.run(&["migrate", "--status"]);
    assert_eq!(after.code, Some(0), "{}", after.describe());
    assert_eq!(
        status_line(&after, "1"),
        Some(vec![
            "1".into(),
            "applied".into(),
            "create".into(),
            "notes".into()
        ]),
        "`1 applied create notes` after: {}",
        after.describe()
    );
    assert_eq!(
        sql_i64(&db, "SELECT count(*) FROM _sqlx_migrations"),
        MIGRATIONS,
        "one row per migration"
    );
}

fn concurrent_migrates_apply_the_schema_once(backend: Backend) {
    for round in 0..3 {
        let Some(db) = Db::new(backend, &format!("migrate_race{round}")) else {
            return;
        };
        // Two processes spawned as close together as we can.
        let barrier = Arc::new(Barrier::new(2));
        let config = db.config.display().to_string();
        let runs: Vec<_> = (0..2)
            .map(|_| {
                let barrier = Arc::clone(&barrier);
                let config = config.clone();
                thread::spawn(move || {
                    let cmd = notesd_cmd(["migrate", "-c", config.as_str()]);
                    barrier.wait();
                    run_with_timeout(cmd, DB_CMD_TIMEOUT)
                })
            })
            .collect();
        let outs: Vec<CmdOutput> = runs
            .into_iter()
            .map(|t| t.join().expect("migrate thread"))
            .collect();
        for out in &outs {
            assert_eq!(
                out.code,
                Some(0),
                "round {round}: both migrates succeed: {}",
                out.describe()
            );
        }
        assert_eq!(
            sql_i64(&db, "SELECT count(*) FROM _sqlx_migrations"),
            MIGRATIONS,
            "round {round}: the schema is applied once"
        );
        let status = db.run(&["migrate", "--status"]);
        assert_eq!(
            status_line(&status, "1").map(|w| w[1].clone()),
            Some("applied".to_string()),
            "{}",
            status.describe()
        );
        assert!(db.migrate().stdout.contains("up to date"));
        // Exactly one of the two applied the migration; the other found it done.
        let applied = outs
            .iter()
            .filter(|o| o.stdout.contains("applied migrations"))
            .count();
        let up_to_date = outs
            .iter()
            .filter(|o| o.stdout.contains("up to date"))
            .count();
        assert_eq!(
            (applied, up_to_date),
            (1, 1),
            "round {round}: one migrate applies, the other reports up to date:\n{}\n{}",
            outs[0].describe(),
            outs[1].describe()
        );
    }
}

fn seed_inserts_numbered_notes(backend: Backend) {
    let Some(db) = Db::new(backend, "seed") else {
        return;
    };
    db.migrate();
    let out = db.seed(25);
    assert!(
        out.stdout.contains("25"),
        "seed says how many: {}",
        out.describe()
    );
    assert_eq!(sql_i64(&db, "SELECT count(*) FROM notes"), 25);

    let server = TestServer::start(
        &format!("seed_{}", backend_tag(backend)),
        TestOptions {
            migrate_on_start: false,
            ..db.options()
        },
    );
    let notes = server.list_all(200);
    let titles: BTreeSet<String> = notes
        .iter()
        .map(|n| n["title"].as_str().unwrap_or_default().to_string())
        .collect();
    let expected: BTreeSet<String> = (1..=25).map(|i| format!("Note {i}")).collect();
    assert_eq!(titles, expected, "Note 1…Note 25");
    for n in &notes {
        assert_note_shape(n);
    }
    // Seeding again adds, it does not replace. (`seed` writes around the
    // server: its notes show once cached pages expire, `http.list_cache_ms`.)
    db.seed(5);
    let mut listed = 0;
    let shown = poll_until(Duration::from_secs(2), || {
        listed = server.list_all(200).len();
        listed == 30
    });
    assert!(shown, "30 notes listed after the second seed, not {listed}");
    drop(server);

    // A database without the schema is not seeded.
    let Some(empty) = Db::new(backend, "seed_empty") else {
        return;
    };
    if backend == Backend::Sqlite {
        std::fs::File::create(empty.sqlite_path.as_ref().expect("path")).expect("empty file");
    }
    let out = empty.run(&["seed", "--count", "3"]);
    assert_ne!(
        out.code,
        Some(0),
        "seed on an unmigrated database fails: {}",
        out.describe()
    );
    assert!(!notes_table_exists(&empty), "seed does not migrate");
}

// ---------------------------------------------------------------------------
// serve and the schema version
// ---------------------------------------------------------------------------

/// Spawns `serve` (migrate_on_start = false) on `db`; it must exit 1 within a
/// few seconds with a log naming `expect` (any of them). Returns the server
/// (exited) for further checks.
fn expect_refusal(db: &Db, name: &str, expect: &[&str]) -> TestServer {
    let t0 = Instant::now();
    let mut server = TestServer::spawn(
        &format!("{name}_{}", backend_tag(db.backend)),
        TestOptions {
            migrate_on_start: false,
            ..db.options()
        },
    );
    server.allow_errors();
    let code = server.expect_exit_code(Duration::from_secs(8));
    let took = t0.elapsed();
    let log = server.log();
    assert_eq!(
        code, 1,
        "serve refuses with exit 1 (after {took:?}); log:\n{log}"
    );
    assert!(
        took < Duration::from_secs(5),
        "refused within a few seconds, took {took:?}"
    );
    assert!(
        expect.iter().any(|e| log.contains(e)),
        "the log says {expect:?}:\n{log}"
    );
    server
}

fn serve_refuses_a_database_without_schema(backend: Backend) {
    let Some(db) = Db::new(backend, "noschema") else {
        return;
    };
    if let Some(path) = &db.sqlite_path {
        // An empty file is an empty SQLite database.
        std::fs::File::create(path).expect("create an empty database file");
    }
    let mut server = expect_refusal(&db, "noschema", &["notesd migrate"]);
    assert!(!notes_table_exists(&db), "serve did not migrate on its own");

    // The remedy the log names works.
    db.migrate();
    server.restart();
    let id = server.create(&json!({"title": "after migrate"}));
    assert_eq!(server.note(id)["title"], "after migrate");
}

fn serve_refuses_an_older_schema(backend: Backend) {
    let Some(db) = Db::new(backend, "oldschema") else {
        return;
    };
    db.migrate();
    // "Older" is a database where version 1 is not recorded as applied.
    sql_exec(&db, "DELETE FROM _sqlx_migrations WHERE version = 1");
    let status = db.run(&["migrate", "--status"]);
    assert_eq!(
        status_line(&status, "1").map(|w| w[1].clone()),
        Some("pending".to_string()),
        "{}",
        status.describe()
    );
    expect_refusal(&db, "oldschema", &["notesd migrate"]);
}

fn serve_refuses_a_newer_schema(backend: Backend) {
    let Some(db) = Db::new(backend, "newschema") else {
        return;
    };
    db.migrate();
    let insert = match backend {
        Backend::Sqlite => {
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (999, 'from the future', 1, x'00', 0)"
        }
        Backend::Postgres => {
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (999, 'from the future', true, '\\x00'::bytea, 0)"
        }
    };
    sql_exec(&db, insert);
    expect_refusal(&db, "newschema", &["newer"]);
    // The data is untouched: ours and the future one are still there.
    assert_eq!(
        sql_i64(&db, "SELECT count(*) FROM _sqlx_migrations"),
        MIGRATIONS + 1
    );
}

// ---------------------------------------------------------------------------
// Durability
// ---------------------------------------------------------------------------

/// Per-series check: no counter series went down (`Metrics::counters_below`).
#[track_caller]
fn assert_not_backwards(before: &Metrics, after: &Metrics, what: &str) {
    let backwards = after.counters_below(before);
    assert!(backwards.is_empty(), "{what}: {backwards:?}");
    assert!(
        after.total_requests() > before.total_requests(),
        "{what}: total {} then {} (the first scrape itself counts)",
        before.total_requests(),
        after.total_requests()
    );
}

fn notes_survive_reload_worker_kill_and_restart(backend: Backend) {
    let Some(mut server) = start(backend, "durable", |_| {}) else {
        return;
    };
    // SIGKILLed workers may be reported at error level.
    server.allow_errors();
    let a = server.create(&json!({"title": "A", "body": "before HUP"}));
    let note_a = server.note(a);

    // HUP: a new generation; the note is still there, metrics keep counting.
    let m0 = server.metrics();
    server.signal(Signal::SIGHUP);
    let s = server.wait_for("generation 2, steady", Duration::from_secs(8), |s| {
        generation(s) == 2 && is_steady(s, 2) && workers(s).iter().all(|w| w["generation"] == 2)
    });
    assert_eq!(server.note(a), note_a, "A after HUP");
    let m1 = server.metrics();
    assert_not_backwards(&m0, &m1, "across HUP");
    assert_eq!(
        m1.requests("/api/notes", 201),
        m0.requests("/api/notes", 201),
        "retired workers' 201s are kept across HUP"
    );
    assert_eq!(m1.requests("/api/notes", 201), 1.0);

    // SIGKILL every worker right after a 201: the note was committed.
    let b = server.create(&json!({"title": "B", "body": "before SIGKILL"}));
    let note_b = server.note(b);
    let m2 = server.metrics();
    let victims = ready_pids(&s);
    for pid in &victims {
        send_signal(*pid, Signal::SIGKILL);
    }
    let s = server.wait_for("both workers replaced", Duration::from_secs(8), |s| {
        is_steady(s, 2)
            && ready_pids(s).iter().all(|p| !victims.contains(p))
            && s["restarts"].as_u64() == Some(2)
    });
    assert_eq!(server.note(a), note_a, "A after SIGKILL");
    assert_eq!(server.note(b), note_b, "B after SIGKILL");
    let m3 = server.metrics();
    assert_not_backwards(&m2, &m3, "across a SIGKILL of every worker");
    assert_eq!(
        m3.requests("/api/notes", 201),
        2.0,
        "the killed workers' 201s are kept"
    );
    assert_eq!(
        m3.get("notesd_worker_restarts_total{reason=\"crash\"}"),
        2.0,
        "two unexpected deaths (SIGKILL, no OOM): {s}"
    );
    assert_eq!(m3.sum("notesd_worker_restarts_total"), 2.0);
    assert_eq!(m3.get("notesd_workers{state=\"serving\"}"), 2.0);

    // A full restart on the same database.
    let c = server.create(&json!({"title": "C"}));
    let note_c = server.note(c);
    server.signal(Signal::SIGTERM);
    let grace = Duration::from_secs(server.opts.graceful_timeout + 3);
    let code = server.expect_exit_code(grace);
    assert_eq!(code, 0, "TERM exits 0");
    server.restart();
    for (id, note) in [(a, &note_a), (b, &note_b), (c, &note_c)] {
        assert_eq!(&server.note(id), note, "note {id} after a restart");
    }
    let ids: Vec<i64> = server
        .list_all(50)
        .iter()
        .map(|n: &Value| n["id"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(ids, [c, b, a], "exactly the three notes, newest first");
}

/// A PostgreSQL error that is the query's fault is a 500 with an ERROR in the
/// log, not a "database unavailable" 503: 42501 (insufficient privilege) ends
/// in the byte SQLite uses for BUSY, and once was taken for it.
#[test]
fn a_permission_error_on_postgres_is_a_500_not_a_503() {
    let Some(db) = Db::new(Backend::Postgres, "privilege") else {
        return;
    };
    db.migrate();
    let pg = db.pg.as_ref().expect("a PostgreSQL database");
    let role = format!("{}_ro", pg.name);
    psql_ok(
        &pg.name,
        &format!(
            "CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA public TO {role}; \
             GRANT SELECT ON _sqlx_migrations TO {role};"
        ),
    );
    let mut opts = db.options();
    opts.migrate_on_start = false;
    opts.database_url = Some(format!("postgres://{role}@127.0.0.1:5432/{}", pg.name));
    let mut server = TestServer::start("privilege", opts);
    server.allow_errors();
    let resp = server.get("/api/notes");
    assert_eq!(resp.status, 500, "{resp:?}");
    assert_error(&resp, 500, "internal");
    assert!(
        server.log().contains("42501") || server.log().contains("permission denied"),
        "the log names the cause:\n{}",
        server.log_tail()
    );
    drop(server);
    psql_ok(
        &pg.name,
        &format!("DROP OWNED BY {role}; DROP ROLE {role};"),
    );
}
