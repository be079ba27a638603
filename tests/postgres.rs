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

/// The `Uid:`/`Gid:`/`Groups:` lines of `/proc/PID/status`, as numbers.
fn ids(pid: i32) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let line = |key: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect()
    };
    (line("Uid:"), line("Gid:"), line("Groups:"))
}

/// `server.user` / `server.group`: a master started as root keeps root (it
/// binds, and reloads bind nothing new) and runs every worker as the user and
/// group, with no supplementary groups, also the workers a reload starts.
#[test]
fn workers_run_as_server_user_and_group_when_started_as_root() {
    use common::notes::Api;
    if !nix::unistd::geteuid().is_root() {
        skip_unless_ci(
            "root",
            "server.user/server.group can only be tested as root",
            "; run the tests as root",
        );
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .ok()
        .flatten()
        .expect("user nobody");
    let nogroup = nix::unistd::Group::from_name("nogroup")
        .ok()
        .flatten()
        .expect("group nogroup");
    let (uid, gid) = (nobody.uid.as_raw(), nogroup.gid.as_raw());
    let Some(db) = fresh_pg_database() else {
        return;
    };
    // Workers exec the master's binary as `nobody`: run a copy that nobody
    // can reach, whatever the permissions of the checkout's directories.
    let bin_dir = TempDir::new("drop_bin");
    let bin = bin_dir.join("notesd");
    std::fs::copy(env!("CARGO_BIN_EXE_notesd"), &bin).expect("copy the binary");
    for p in [bin_dir.path(), bin.as_path()] {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod 755");
    }
    let server = TestServer::start(
        "drop_privileges",
        TestOptions {
            database_url: Some(db.url.clone()),
            migrate_on_start: true,
            server_extra: "user = \"nobody\"\ngroup = \"nogroup\"".to_string(),
            sh_prefix: Some(format!("exec '{}' \"$@\";", bin.display())),
            ..TestOptions::default()
        },
    );
    let check = |server: &TestServer, when: &str| {
        let (muid, _, _) = ids(server.master_pid());
        assert_eq!(muid, vec![0; 4], "{when}: the master stays root");
        let pids = ready_pids(&server.status());
        assert_eq!(pids.len(), 2, "{when}");
        for pid in pids {
            let (u, g, groups) = ids(pid);
            assert_eq!(
                u,
                vec![uid; 4],
                "{when}: worker {pid} real/effective/saved/fs uid"
            );
            assert_eq!(g, vec![gid; 4], "{when}: worker {pid} gids");
            assert_eq!(
                groups,
                vec![gid],
                "{when}: worker {pid} supplementary groups"
            );
        }
        // The workers serve as nobody: a write commits, a read finds it.
        let id = server.create(&json!({"title": when, "body": "written as nobody"}));
        assert_eq!(server.note(id)["title"], when);
    };
    check(&server, "at boot");
    let gen0 = generation(&server.status());
    server.signal(Signal::SIGHUP);
    server.wait_for("a new generation of 2", Duration::from_secs(20), |s| {
        generation(s) > gen0 && is_steady(s, 2) && all_of_current_generation(s)
    });
    check(&server, "after a reload");
    drop(server);
    drop(db);
}

/// D1: notesd's PostgreSQL driver does not take the role from the OS user.
/// With a role named like the OS user that runs notesd (as `createuser
/// notesd` makes one for the `notesd` system user), a unix-socket URL that
/// names no role is refused by `notesd check`, with the fix in the message,
/// and the packaged shape (`?host=…&user=…`) connects and migrates.
#[test]
fn a_unix_socket_url_must_name_the_role_even_one_named_like_the_os_user() {
    use common::notes::psql_ok;
    let Some(db) = fresh_pg_database() else {
        return;
    };
    let os_user = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .expect("the current user has a name");
    let quoted = format!("\"{}\"", os_user.replace('"', "\"\""));
    let made_role = psql_ok(
        "postgres",
        &format!(
            "SELECT count(*) FROM pg_roles WHERE rolname = '{}'",
            os_user.replace('\'', "''")
        ),
    ) == "0";
    if made_role {
        psql_ok("postgres", &format!("CREATE ROLE {quoted} LOGIN"));
    }
    psql_ok(
        "postgres",
        &format!("ALTER DATABASE {} OWNER TO {quoted}", db.name),
    );
    let socket_dir = "/var/run/postgresql";
    let dir = TempDir::new("d1_role");
    let config = dir.join("notesd.toml");
    let write = |url: &str| {
        std::fs::write(&config, format!("[database]\nurl = {}\n", toml_str(url)))
            .expect("write config");
    };
    let config_arg = config.display().to_string();

    let without = format!("postgres:///{}?host={socket_dir}", db.name);
    if std::env::var_os("PGUSER").is_none() {
        write(&without);
        let out = run_notesd(&["check", "-c", &config_arg]);
        assert_eq!(out.code, Some(2), "{}", out.describe());
        assert!(
            out.stderr.contains("\"anonymous\"") && out.stderr.contains("user=notesd"),
            "the problem names what would happen and the fix: {}",
            out.describe()
        );
    }
    write(&format!("{without}&user={os_user}"));
    let check = run_notesd(&["check", "-c", &config_arg]);
    assert_eq!(check.code, Some(0), "{}", check.describe());
    let migrate = run_notesd(&["migrate", "-c", &config_arg]);
    if made_role {
        psql_ok(
            "postgres",
            &format!("ALTER DATABASE {} OWNER TO postgres", db.name),
        );
    }
    assert_eq!(migrate.code, Some(0), "{}", migrate.describe());
    assert!(
        migrate.stdout.contains("applied migrations"),
        "{}",
        migrate.describe()
    );
    drop(db);
    if made_role {
        psql_ok("postgres", &format!("DROP ROLE {quoted}"));
    }
}

/// `notesd migrate` through PgBouncer in transaction pooling (Debian 12's
/// 1.18): session state does not survive a transaction there, so a session
/// advisory lock would stay behind on some server connection and a second
/// transaction may land on another. A migrate is one transaction (its lock
/// transaction-scoped): two at once through the pooler apply the schema
/// exactly once and both exit 0, and `--status` works through it too.
/// `database.migrate_url` points migrate elsewhere: with `url` unreachable,
/// migrate still succeeds on the direct URL.
#[test]
fn migrate_through_a_transaction_pooler_and_migrate_url() {
    use common::hosts::{PgBouncer, PgCluster, require_root};
    if !require_root("a PgBouncer of the test's own") {
        return;
    }
    let Some(cluster) = PgCluster::start("pgb_migrate") else {
        return;
    };
    cluster.sql("postgres", "CREATE DATABASE notesd");
    let Some(bouncer) = PgBouncer::start(&cluster, "notesd", "transaction", 4) else {
        return;
    };
    let dir = TempDir::new("pgb_migrate");
    let config = |name: &str, url: &str, migrate_url: Option<&str>| {
        let path = dir.join(&format!("{name}.toml"));
        let extra = migrate_url
            .map(|u| format!("migrate_url = {}\n", toml_str(u)))
            .unwrap_or_default();
        let text = format!("[database]\nurl = {}\n{extra}", toml_str(url));
        std::fs::write(&path, text).expect("write config");
        path
    };
    let migrate = |cfg: &std::path::Path, status: bool| {
        let cfg = cfg.to_str().expect("utf-8").to_string();
        let mut args = vec!["migrate".to_string(), "-c".to_string(), cfg];
        if status {
            args.push("--status".into());
        }
        run_with_timeout(notesd_cmd(&args), Duration::from_secs(60))
    };
    let through = config("through", &bouncer.url("notesd"), None);
    let both: Vec<_> = (0..2)
        .map(|_| {
            let cfg = through.clone();
            std::thread::spawn(move || migrate(&cfg, false))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("migrate"))
        .collect();
    for out in &both {
        assert_eq!(out.code, Some(0), "through the pooler: {}", out.describe());
    }
    let applied = both
        .iter()
        .filter(|o| o.stdout.contains("applied migrations"))
        .count();
    assert_eq!(
        applied,
        1,
        "exactly one applied: {:?}",
        both.iter().map(|o| &o.stdout).collect::<Vec<_>>()
    );
    assert_eq!(
        cluster.sql(
            "notesd",
            "SELECT count(*) FROM _sqlx_migrations WHERE success"
        ),
        common::notes::MIGRATIONS.to_string()
    );
    assert_eq!(
        cluster.sql(
            "notesd",
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
        ),
        "0",
        "no lock left behind on a pooled server connection"
    );
    let status = migrate(&through, true);
    assert_eq!(status.code, Some(0), "{}", status.describe());
    assert!(
        status.stdout.contains("schema is current"),
        "{}",
        status.describe()
    );

    // migrate_url: what migrate connects to, whatever url says.
    let unreachable = "postgres:///notesd?host=/nonexistent&user=postgres";
    let direct = config("direct", unreachable, Some(&cluster.url("notesd")));
    let out = migrate(&direct, false);
    assert_eq!(out.code, Some(0), "migrate_url is used: {}", out.describe());
    assert!(out.stdout.contains("up to date"), "{}", out.describe());
    let bad = config("bad", unreachable, Some("mysql://x"));
    let out = run_with_timeout(
        notesd_cmd(["check", "-c", bad.to_str().expect("utf-8")]),
        Duration::from_secs(10),
    );
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(
        out.stderr.contains("database.migrate_url"),
        "{}",
        out.describe()
    );
}
