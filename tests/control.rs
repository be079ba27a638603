//! The control socket: `notesd reload` (waits for the outcome of the reload
//! it asked for), who may ask (SO_PEERCRED, not only the file's mode), slow
//! or silent clients, and what a failed start leaves behind.
//!
//! Each test spawns the real binary with its own temp dir; see tests/common.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn ready_of_generation(s: &serde_json::Value, gen_: u64) -> usize {
    workers(s)
        .iter()
        .filter(|w| w["generation"].as_u64() == Some(gen_) && w["state"] == "ready")
        .count()
}

#[test]
fn reload_returns_once_the_new_generation_serves() {
    let server = TestServer::start("reload_ok", TestOptions::default());
    let gen0 = generation(&server.status());
    let pids0 = server.worker_pids();
    let out = server.run(&["reload"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let want = format!("generation {}", gen0 + 1);
    assert!(out.stdout.contains(&want), "{}", out.describe());
    // No waiting here: when `notesd reload` returns, the new generation serves.
    let s = server.status();
    assert_eq!(generation(&s), gen0 + 1, "{s}");
    assert_eq!(ready_of_generation(&s, gen0 + 1), 2, "{s}");
    assert_eq!(s["phase"], "running", "{s}");
    for w in workers(&s) {
        if pids0.contains(&worker_pid(&w)) {
            assert_eq!(w["state"], "stopping", "old workers drain: {s}");
        }
    }
    assert_eq!(server.get("/").status, 200);
    eprintln!("notesd reload took {:?}", out.elapsed);
}

#[test]
fn reload_of_an_invalid_config_exits_1_with_the_reason_and_changes_nothing() {
    let mut server = TestServer::start("reload_bad", TestOptions::default());
    server.allow_errors();
    let s0 = server.status();
    let valid = server.config_text();
    server.write_raw_config(&valid.replacen("[server]\n", "[server]\nbogus_key = 1\n", 1));
    // The client finds the control socket through its own (valid) copy.
    let out = server.run(&["reload"]);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("reload refused") && out.stderr.contains("bogus_key"),
        "{}",
        out.describe()
    );
    let s = server.status();
    assert_eq!(generation(&s), generation(&s0), "{s}");
    assert_eq!(ready_pids(&s), ready_pids(&s0), "{s}");

    // The same invalid file given to the client itself: exit 2, every problem listed.
    let out = run_notesd(&["reload", "-c", &server.config_path().display().to_string()]);
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(out.stderr.contains("bogus_key"), "{}", out.describe());
    assert_eq!(generation(&server.status()), generation(&s0));
}

#[test]
fn reload_whose_workers_cannot_boot_exits_1_and_the_old_generation_serves() {
    let mut server = TestServer::start("reload_noboot", TestOptions::default());
    server.allow_errors();
    let s0 = server.status();
    server.opts.database_url = Some("sqlite:///nonexistent-dir-xyz/a.db".into());
    server.opts.migrate_on_start = false;
    server.write_config();
    let out = server.run(&["reload"]);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("reload abandoned") && out.stderr.contains("keeps serving"),
        "{}",
        out.describe()
    );
    let s = server.wait_steady(2, secs(5.0));
    assert_eq!(
        ready_pids(&s),
        ready_pids(&s0),
        "the old workers serve on: {s}"
    );
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn reload_without_a_master_exits_1() {
    let dir = TempDir::new("reload_nomaster");
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ncontrol_socket = {}\n",
            toml_str(&dir.join("control.sock").display().to_string())
        ),
    )
    .expect("write config");
    let out = run_notesd(&["reload", "-c", &config.display().to_string()]);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("is notesd running"),
        "{}",
        out.describe()
    );
}

/// The control socket obeys root and the service's own user only, whatever
/// the file's mode says: a uid that can connect is still refused.
#[test]
fn the_control_socket_refuses_other_users_even_when_they_can_connect() {
    if !nix::unistd::geteuid().is_root() {
        skip_unless_ci(
            "root",
            "running a client as another uid needs root",
            "; CI runs as root",
        );
        return;
    }
    let mut server = TestServer::start("control_peercred", TestOptions::default());
    server.allow_errors();
    let gen0 = generation(&server.status());
    // Let uid 65534 reach the socket and read a client config.
    let dir = server.dir().path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    std::fs::set_permissions(
        &server.paths.control,
        std::fs::Permissions::from_mode(0o666),
    )
    .expect("chmod control socket");
    let client = server.client_config_path();
    std::fs::set_permissions(&client, std::fs::Permissions::from_mode(0o644))
        .expect("chmod client config");
    for command in ["reload", "status"] {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
            .args([command, "-c", &client.display().to_string()])
            .env("NO_COLOR", "1")
            .env_remove("NOTESD_CONFIG");
        let out = run_with_timeout(cmd, CMD_TIMEOUT);
        assert_eq!(out.code, Some(1), "{command} as nobody: {}", out.describe());
        assert!(
            out.stderr.contains("refused: uid 65534"),
            "{command} as nobody: {}",
            out.describe()
        );
    }
    let s = server.status();
    assert_eq!(generation(&s), gen0, "nobody's reload was not obeyed: {s}");
    assert!(
        server.log().contains("refused Reload from uid 65534"),
        "the refusal is logged"
    );
}

/// A client that connects and says nothing neither stalls the master nor
/// stays forever.
#[test]
fn a_silent_control_client_is_dropped_and_stalls_nobody() {
    let mut server = TestServer::start("control_silent", TestOptions::default());
    server.allow_errors();
    let mut silent = UnixStream::connect(&server.paths.control).expect("connect");
    let t0 = Instant::now();
    for _ in 0..3 {
        server.status();
    }
    assert_eq!(server.get("/").status, 200);
    silent
        .set_read_timeout(Some(secs(10.0)))
        .expect("read timeout");
    let mut buf = Vec::new();
    let n = silent.read_to_end(&mut buf).expect("EOF from the master");
    let waited = t0.elapsed();
    assert_eq!(n, 0, "nothing is sent to a client that asked nothing");
    assert!(
        (secs(4.0)..secs(7.0)).contains(&waited),
        "dropped after the 5 s deadline, not {waited:?}"
    );
}

/// A status client that reads its answer slowly, a few bytes at a time,
/// gets all of it (the master writes what the socket takes and comes back
/// for the rest), while others are answered meanwhile.
#[test]
fn a_slow_status_reader_gets_the_whole_answer() {
    let server = TestServer::start(
        "control_slow",
        TestOptions {
            workers: 12,
            ..TestOptions::default()
        },
    );
    server.wait_steady(12, secs(20.0));
    let mut slow = UnixStream::connect(&server.paths.control).expect("connect");
    slow.write_all(b"status\n").expect("send");
    std::thread::sleep(secs(1.5));
    assert_eq!(server.status()["phase"], "running", "others are answered");
    slow.set_read_timeout(Some(secs(5.0))).expect("timeout");
    let mut answer = Vec::new();
    let mut chunk = [0u8; 64];
    loop {
        let n = slow.read(&mut chunk).expect("read");
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
        std::thread::sleep(Duration::from_millis(2));
    }
    let v: serde_json::Value = serde_json::from_slice(&answer)
        .unwrap_or_else(|e| panic!("{} bytes, not whole JSON: {e}", answer.len()));
    assert_eq!(v["workers"].as_array().map(Vec::len), Some(12), "{v}");
}

/// An unknown request gets an answer saying what is understood.
#[test]
fn an_unknown_control_request_is_answered_with_what_is_understood() {
    let mut server = TestServer::start("control_unknown", TestOptions::default());
    server.allow_errors();
    let mut c = UnixStream::connect(&server.paths.control).expect("connect");
    c.set_read_timeout(Some(secs(5.0))).expect("timeout");
    c.write_all(b"shutdown\n").expect("send");
    let mut answer = String::new();
    c.read_to_string(&mut answer).expect("answer");
    let v: serde_json::Value = serde_json::from_str(&answer).expect("JSON answer");
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("\"status\", \"reload\", \"drain\" or \"undrain\"")),
        "{v}"
    );
    assert_eq!(server.status()["phase"], "running");
}

/// A start that fails removes what it had made (the control socket, the
/// listening socket, the pidfile): before the pidfile is written
/// (`migrate_on_start` cannot create the database) and after it, once the
/// workers run (they refuse a database without a schema). Both exit 1.
#[test]
fn a_failed_start_leaves_no_socket_behind() {
    let dir = TempDir::new("start_fail_db");
    let empty = format!("sqlite://{}", dir.join("empty.db").display());
    std::fs::write(dir.join("empty.db"), b"").expect("an empty database file");
    for (name, url, migrate, expect) in [
        (
            "start_fail_migrate",
            "sqlite:///nonexistent-dir-xyz/a.db",
            true,
            1,
        ),
        ("start_fail_boot", empty.as_str(), false, 1),
    ] {
        let mut server = TestServer::spawn(
            name,
            TestOptions {
                database_url: Some(url.into()),
                migrate_on_start: migrate,
                ..TestOptions::default()
            },
        );
        server.allow_errors();
        let code = server.expect_exit_code(secs(15.0));
        assert_eq!(code, expect, "{name}: {}", server.log_tail());
        for path in [
            &server.paths.control,
            &server.paths.socket,
            &server.paths.pidfile,
        ] {
            assert!(
                !path.exists(),
                "{name}: {} left behind by a failed start",
                path.display()
            );
        }
    }
}
