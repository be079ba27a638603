//! Upgrades no client notices: the master re-execs itself in place (same PID)
//! when its binary changed, hands over its sockets and workers, then reloads
//! onto the new binary. Against builds of this tree that differ in version and
//! in one backward-compatible migration (`tests/build-variants.sh`), under a
//! GET+POST load through a real nginx on PostgreSQL:
//!
//! 1. A → B with `notesd reload`: 0 failed requests, the master's PID kept,
//!    every process runs B, `status` says B, B's migration applied; then the
//!    rollback B → A across that migration, the same way.
//! 2. A B that exits at once, and a B that cannot take the handover: refused
//!    with the reason, A serves on, 0 failed requests.
//! 3. USR2 with the binary unchanged: same PID, new workers, 0 failed.
//!
//! Without nginx or PostgreSQL the nginx tests SKIP loudly, and fail under CI.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use common::load::*;
use common::nginx::NginxOptions;
use common::*;
use serde_json::Value;

/// The other builds of this tree, built once per test run (a few minutes the
/// first time; later runs reuse them until a source changes).
fn variants() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut cmd = Command::new("bash");
        cmd.arg("tests/build-variants.sh").current_dir(root);
        let out = run_with_timeout(cmd, Duration::from_secs(1200));
        assert_eq!(
            out.code,
            Some(0),
            "tests/build-variants.sh failed: {}",
            out.describe()
        );
        root.join(out.stdout.trim())
    })
    .clone()
}

/// A binary at a path the master runs from. `put` replaces the file the way
/// dpkg does: a new file renamed over the old one (a new inode).
struct Installed {
    path: PathBuf,
    _dir: TempDir,
}

impl Installed {
    fn new(name: &str) -> Installed {
        let dir = TempDir::new(name);
        let installed = Installed {
            path: dir.join("notesd"),
            _dir: dir,
        };
        installed.put(Path::new(BIN));
        installed
    }

    fn put(&self, from: &Path) {
        let tmp = self.path.with_extension("new");
        fs::copy(from, &tmp).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
        self.finish(&tmp);
    }

    fn put_script(&self, text: &str) {
        let tmp = self.path.with_extension("new");
        fs::write(&tmp, text).expect("write the script");
        self.finish(&tmp);
    }

    fn finish(&self, tmp: &Path) {
        fs::set_permissions(tmp, fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::rename(tmp, &self.path).expect("rename into place");
    }

    fn ino(&self) -> u64 {
        fs::metadata(&self.path).expect("stat").ino()
    }

    /// `<this binary> ARGS… -c CONFIG`, as the unit's ExecReload= runs it.
    fn run(&self, server: &TestServer, args: &[&str]) -> CmdOutput {
        let mut cmd = Command::new(&self.path);
        cmd.args(args)
            .arg("-c")
            .arg(server.client_config_path())
            .env_remove("NOTESD_CONFIG")
            .env("NO_COLOR", "1");
        run_with_timeout(cmd, Duration::from_secs(60))
    }
}

/// The inode of the binary process `pid` runs (followed through /proc, so a
/// replaced file shows its old inode).
fn running_ino(pid: i32) -> u64 {
    fs::metadata(format!("/proc/{pid}/exe"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/exe: {e}"))
        .ino()
}

fn version(s: &Value) -> String {
    s["version"].as_str().unwrap_or_default().to_string()
}

/// The package version this tree builds (a variant adds `+name`).
const A: &str = env!("CARGO_PKG_VERSION");

/// Waits until only the newest generation is left, then checks that the
/// master and every worker run the file now at `installed`.
#[track_caller]
fn assert_all_run(server: &TestServer, installed: &Installed, what: &str) -> Value {
    let s = server.wait_for(
        &format!("{what}: the old generation to drain"),
        Duration::from_secs(20),
        |s| is_steady(s, 2) && all_of_current_generation(s),
    );
    let master = server.master_pid();
    for pid in std::iter::once(master).chain(all_pids(&s)) {
        assert_eq!(
            running_ino(pid),
            installed.ino(),
            "{what}: process {pid} does not run the installed binary: {s}"
        );
    }
    s
}

#[track_caller]
fn assert_no_failures(report: &Report, what: &str) {
    let failures = report.failures(|_| false);
    eprintln!("UPGRADE {what}: {}", report.summary());
    assert!(
        failures.is_empty(),
        "{what}: {} request(s) failed:\n{}",
        failures.len(),
        list(&failures, 20)
    );
}

fn applied_migrations(server: &Installed, ts: &TestServer) -> String {
    let out = server.run(ts, &["migrate", "--status"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    out.stdout
}

#[test]
fn upgrade_to_b_and_roll_back_under_load_fails_no_request() {
    let variants = variants();
    let installed = Installed::new("upgrade_bin");
    let exe = installed.path.clone();
    let Some(rig) = rig("upgrade", |o| o.exe = Some(exe), NginxOptions::default()) else {
        return;
    };
    let master = rig.server.master_pid();
    assert_eq!(version(&rig.server.status()), A);
    let load = MixedLoad::start(rig.nginx.addr(), CONNECTIONS, "upgrade");
    thread::sleep(Duration::from_millis(800));

    // A → B: the package's steps. Install, migrate with the new binary, reload.
    installed.put(&variants.join("notesd-b"));
    let migrate = installed.run(&rig.server, &["migrate"]);
    assert_eq!(migrate.code, Some(0), "{}", migrate.describe());
    let t0 = Instant::now();
    let reload = installed.run(&rig.server, &["reload"]);
    let reload_ms = t0.elapsed().as_millis();
    assert_eq!(reload.code, Some(0), "{}", reload.describe());
    let s = rig.server.status();
    assert_eq!(s["master_pid"], master, "the master kept its PID: {s}");
    assert_eq!(version(&s), format!("{A}+b"), "status says B at once: {s}");
    let s = assert_all_run(&rig.server, &installed, "A → B");
    eprintln!(
        "UPGRADE A → B: reload returned in {reload_ms} ms, master {master} → {}, generation {}",
        s["master_pid"],
        generation(&s)
    );
    let status = applied_migrations(&installed, &rig.server);
    assert!(
        status.lines().any(|l| l.starts_with("2 ")
            && l.contains(" applied ")
            && l.contains("[backward-compatible]")),
        "B's migration is applied, with its mark:\n{status}"
    );

    // B → A across B's (backward-compatible) migration.
    thread::sleep(Duration::from_millis(500));
    installed.put(Path::new(BIN));
    let migrate = installed.run(&rig.server, &["migrate"]);
    assert_eq!(
        migrate.code,
        Some(0),
        "A's migrate accepts B's compatible migration: {}",
        migrate.describe()
    );
    let reload = installed.run(&rig.server, &["reload"]);
    assert_eq!(reload.code, Some(0), "{}", reload.describe());
    let s = assert_all_run(&rig.server, &installed, "B → A");
    assert_eq!(s["master_pid"], master, "{s}");
    assert_eq!(version(&s), A, "{s}");
    let status = applied_migrations(&installed, &rig.server);
    assert!(
        status.contains("unknown to this binary, which serves it anyway"),
        "A lists B's migration as newer and servable:\n{status}"
    );

    thread::sleep(Duration::from_millis(800));
    let report = load.stop();
    assert_no_failures(&report, "A → B → A");
    assert_no_lost_writes("upgrade", &rig.server, &report.created());
}

/// `notesd reload` onto what is installed now is refused with `reason`, and
/// nothing changed since `s0`.
#[track_caller]
fn assert_refused(server: &TestServer, s0: &Value, what: &str, reason: &str) {
    let master = server.master_pid();
    // The client is A (the installed file may not even run).
    let out = server.run(&["reload"]);
    assert_eq!(out.code, Some(1), "{what}: {}", out.describe());
    assert!(
        out.stderr.contains("cannot upgrade in place") && out.stderr.contains(reason),
        "{what}: the refusal says why: {}",
        out.describe()
    );
    let s = server.status();
    assert_eq!(s["master_pid"], master, "{what}: {s}");
    assert_eq!(version(&s), A, "{what}: A serves on: {s}");
    assert_eq!(
        generation(&s),
        generation(s0),
        "{what}: no new generation: {s}"
    );
    assert_eq!(
        ready_pids(&s),
        ready_pids(s0),
        "{what}: the same workers: {s}"
    );
    eprintln!("UPGRADE refused ({what}): {}", out.stderr.trim());
}

#[test]
fn refused_upgrades_leave_a_serving_and_fail_no_request() {
    let variants = variants();
    let installed = Installed::new("refused_bin");
    let exe = installed.path.clone();
    let Some(mut rig) = rig(
        "upgrade_refused",
        |o| o.exe = Some(exe),
        NginxOptions::default(),
    ) else {
        return;
    };
    // A refused upgrade is logged at error level.
    rig.server.allow_errors();
    let s0 = rig.server.status();
    let load = MixedLoad::start(rig.nginx.addr(), CONNECTIONS, "refused");
    thread::sleep(Duration::from_millis(500));

    installed.put_script("#!/bin/sh\nexit 1\n");
    assert_refused(
        &rig.server,
        &s0,
        "a binary that exits at once",
        "did not take the handover (exit status: 1)",
    );
    installed.put(&variants.join("notesd-nohandover"));
    assert_refused(
        &rig.server,
        &s0,
        "a binary that cannot take the handover",
        "takes no handover",
    );
    // The operator puts A back; everything as before.
    installed.put(Path::new(BIN));
    thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    assert_no_failures(&report, "refused upgrades");
    assert_no_lost_writes("refused", &rig.server, &report.created());
}

#[test]
fn usr2_with_the_same_binary_reexecs_in_place_and_replaces_the_workers() {
    let installed = Installed::new("usr2_bin");
    let server = TestServer::start(
        "usr2",
        TestOptions {
            exe: Some(installed.path.clone()),
            ..TestOptions::default()
        },
    );
    let master = server.master_pid();
    let s0 = server.status();
    let pids0 = ready_pids(&s0);
    let load = server.load(8, "/");
    thread::sleep(Duration::from_millis(400));
    server.signal(Signal::SIGUSR2);
    let s = server.wait_for(
        "a new generation after USR2",
        Duration::from_secs(20),
        |s| generation(s) > generation(&s0) && is_steady(s, 2) && all_of_current_generation(s),
    );
    thread::sleep(Duration::from_millis(400));
    let stats = load.stop();
    eprintln!("UPGRADE USR2: {stats:?}");
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert!(stats.ok > 0, "{stats:?}");
    assert_eq!(s["master_pid"], master, "same PID: {s}");
    assert!(pid_alive(master));
    for pid in ready_pids(&s) {
        assert!(!pids0.contains(&pid), "worker {pid} was not replaced: {s}");
    }
    assert!(
        server.log().contains("re-exec'd in place"),
        "the log says what happened:\n{}",
        server.log_tail()
    );
    // The uptime counts from the first start, not from the exec.
    assert!(s["uptime_s"].as_f64() >= s0["uptime_s"].as_f64(), "{s}");
    assert_eq!(server.get("/").status, 200);
}

/// GET / over one connection to `path`; the status, or why not.
fn get_over(path: &Path) -> Result<u16, String> {
    let mut conn = HttpConn::connect(path).map_err(|e| e.to_string())?;
    conn.request("GET", "/", &[])
        .map(|r| r.status)
        .map_err(|e| e.to_string())
}

/// A test server's `original` config text (bound to the unix socket `a`)
/// with `bind` replaced by `binds` (unix paths) and `socket_mode` set.
fn with_binds(a: &Path, original: &str, binds: &[&Path], mode: &str) -> String {
    let list = binds
        .iter()
        .map(|p| toml_str(&format!("unix:{}", p.display())))
        .collect::<Vec<_>>()
        .join(", ");
    original.replacen(
        &format!("bind = [{}]\n", toml_str(&format!("unix:{}", a.display()))),
        &format!("bind = [{list}]\nsocket_mode = \"{mode}\"\n"),
        1,
    )
}

#[test]
fn a_bind_change_takes_effect_on_reload() {
    let mut server = TestServer::start("bind_change", TestOptions::default());
    let a = server.paths.socket.clone();
    let b = server.dir().join("b.sock");
    let original = server.config_text();
    let with_binds = |binds: &[&Path], mode: &str| with_binds(&a, &original, binds, mode);
    let ino = |p: &Path| fs::metadata(p).map(|m| m.ino()).ok();
    let a_ino = ino(&a);

    // a → a + b (and a new mode): b is listening once the reload returns; a is the same socket.
    server.write_raw_config(&with_binds(&[&a, &b], "0600"));
    let out = server.run(&["reload"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert_eq!(get_over(&b), Ok(200), "the new socket serves");
    assert_eq!(get_over(&a), Ok(200), "the kept socket serves");
    assert_eq!(ino(&a), a_ino, "the kept socket is the same one");
    for p in [&a, &b] {
        let mode = fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}: socket_mode applied", p.display());
    }

    // a + b → b: a is closed and unlinked once the old generation drained.
    server.write_raw_config(&with_binds(&[&b], "0600"));
    let out = server.run(&["reload"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert_eq!(get_over(&b), Ok(200));
    assert!(
        poll_until(Duration::from_secs(10), || !a.exists()),
        "{} still exists after the old generation drained",
        a.display()
    );
    assert!(
        get_over(&a).is_err(),
        "nothing listens on the removed address"
    );
    assert!(
        server.log().contains("server.bind changed"),
        "the log says what changed:\n{}",
        server.log_tail()
    );

    // A bind that cannot be had refuses the reload; b serves on.
    server.allow_errors();
    let taken = std::os::unix::net::UnixListener::bind(server.dir().join("taken.sock"))
        .expect("bind a socket of our own");
    let taken_path = server.dir().join("taken.sock");
    server.write_raw_config(&with_binds(&[&b, &taken_path], "0600"));
    let out = server.run(&["reload"]);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(out.stderr.contains("cannot listen"), "{}", out.describe());
    assert_eq!(get_over(&b), Ok(200));
    drop(taken);
    server.opts.client_socket = Some(b.clone());
}

/// Socket changes take effect only with a reload that goes through: one
/// refused because its second new address cannot be bound changes no mode
/// and leaves no file of the address it did bind; and a reload back to an
/// address an older generation still drains on reuses that very socket
/// (it used to be refused: "already served by a live process").
#[test]
fn socket_changes_apply_only_with_a_reload_that_goes_through() {
    let mut server = TestServer::start(
        "bind_atomic",
        TestOptions {
            graceful_timeout: 15,
            ..TestOptions::default()
        },
    );
    server.allow_errors();
    let a = server.paths.socket.clone();
    let b = server.dir().join("b.sock");
    let bad = server.dir().join("no/such/dir/c.sock");
    let original = server.config_text();
    let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    let a_mode = mode(&a);
    assert_ne!(a_mode, 0o600);

    server.write_raw_config(&with_binds(&a, &original, &[&a, &b, &bad], "0600"));
    let out = server.run(&["reload"]);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(out.stderr.contains("cannot listen"), "{}", out.describe());
    assert_eq!(
        mode(&a),
        a_mode,
        "a refused reload changes no socket's mode"
    );
    assert!(
        !b.exists(),
        "the address the refused reload had bound is gone"
    );
    assert_eq!(get_over(&a), Ok(200));

    // a → b while a request still runs on a generation-1 worker, then back
    // to a while that worker drains.
    let slow = {
        let a = a.clone();
        thread::spawn(move || {
            let mut c = HttpConn::connect(&a).expect("connect");
            c.request("GET", "/debug/sleep?ms=5000", &[])
                .map(|r| r.status)
        })
    };
    thread::sleep(Duration::from_millis(300));
    server.write_raw_config(&with_binds(&a, &original, &[&b], "0660"));
    let out = server.run(&["reload"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(a.exists(), "a is kept while generation 1 drains on it");
    server.write_raw_config(&with_binds(&a, &original, &[&a], "0600"));
    let out = server.run(&["reload"]);
    assert_eq!(
        out.code,
        Some(0),
        "back to a while it drains: {}",
        out.describe()
    );
    assert_eq!(get_over(&a), Ok(200));
    assert_eq!(mode(&a), 0o600, "the completed reload's mode");
    assert_eq!(slow.join().expect("slow request").ok(), Some(200));
    assert!(
        poll_until(Duration::from_secs(10), || !b.exists()),
        "b goes once its generation drained"
    );
}

// ---------------------------------------------------------------------------
// Signals and control clients across an upgrade
// ---------------------------------------------------------------------------

/// A wrapper at the master's binary path that runs this build, keeping its
/// own path as argv[0] (so the master re-execs, and spawns workers through,
/// the wrapper), with `probe_s` seconds of sleep before `handover-check`
/// and `worker_s` before each worker: a slow probe, a slow reload.
fn slow_wrapper(name: &str, probe_s: f64, worker_s: f64) -> Installed {
    let installed = Installed::new(name);
    installed.put_script(&format!(
        "#!/bin/bash\ncase \"$1\" in\n  handover-check) sleep {probe_s} ;;\n  worker) sleep {worker_s} ;;\nesac\nexec -a \"$0\" {BIN} \"$@\"\n"
    ));
    installed
}

/// A 2-worker server whose master runs from `installed`.
fn start_from(installed: &Installed, name: &str) -> TestServer {
    TestServer::start(
        name,
        TestOptions {
            exe: Some(installed.path.clone()),
            ..TestOptions::default()
        },
    )
}

/// A TERM during an upgrade used to be lost (the handler's flag went with
/// the exec'd image): 8 s later generation 2 still served. Now a stop that
/// arrives during the probe cancels the upgrade and stops the service
/// within `graceful_timeout` + 2 s.
#[test]
fn a_term_during_an_upgrade_stops_the_service() {
    let installed = slow_wrapper("term_upgrade_bin", 3.0, 0.0);
    let mut server = start_from(&installed, "term_upgrade");
    // The cancelled upgrade is logged at error level.
    server.allow_errors();
    server.signal(Signal::SIGUSR2);
    thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    server.signal(Signal::SIGTERM);
    let grace = Duration::from_secs(server.opts.graceful_timeout + 2);
    let code = server.expect_exit_code(grace);
    eprintln!(
        "UPGRADE term during the probe: exit {code} after {:?}",
        t.elapsed()
    );
    assert_eq!(code, 0);
    assert!(
        server.log().contains("arrived during the upgrade"),
        "the log says why the upgrade was cancelled:\n{}",
        server.log_tail()
    );
}

/// Other signals sent while the probe runs reach the new image: TTIN there
/// adds its worker.
#[test]
fn a_ttin_during_an_upgrade_reaches_the_new_image() {
    let installed = slow_wrapper("ttin_upgrade_bin", 2.0, 0.0);
    let server = start_from(&installed, "ttin_upgrade");
    let master = server.master_pid();
    let s0 = server.status();
    server.signal(Signal::SIGUSR2);
    thread::sleep(Duration::from_millis(700));
    server.signal(Signal::SIGTTIN);
    let s = server.wait_for(
        "the upgrade, then 3 ready workers",
        Duration::from_secs(20),
        |s| generation(s) > generation(&s0) && is_steady(s, 3) && all_of_current_generation(s),
    );
    assert_eq!(s["master_pid"], master, "{s}");
    assert!(server.log().contains("re-exec'd in place"));
}

/// A refusal goes only to the `notesd reload` it answers. A reload under way
/// (its workers boot slowly) while an invalid config is HUPed and a USR2
/// asks for an upgrade: both are refused, and the first client still gets
/// its own reload's outcome, "complete" (it used to get the refusal).
#[test]
fn each_waiting_reload_gets_the_answer_to_its_own_reload() {
    let installed = slow_wrapper("reload_answers_bin", 0.0, 2.0);
    let mut server = start_from(&installed, "reload_answers");
    // The refusals are logged at error level.
    server.allow_errors();
    let client = server.client_config_path();
    let first =
        thread::spawn(move || run_notesd(&["reload", "-c", client.to_str().expect("utf-8 path")]));
    server.wait_for("the reload under way", Duration::from_secs(5), |s| {
        s["phase"] == "reloading"
    });
    let good = server.config_text();
    server.write_raw_config("[server\nthis is not toml");
    server.signal(Signal::SIGHUP);
    server.wait_for_log_line(0, "about the refusal", Duration::from_secs(5), |l| {
        l.contains("reload refused")
    });
    server.write_raw_config(&good);
    server.signal(Signal::SIGUSR2);
    server.wait_for_log_line(
        0,
        "about the refused upgrade",
        Duration::from_secs(5),
        |l| l.contains("cannot upgrade in place") && l.contains("a reload is under way"),
    );
    let out = first.join().expect("the reload client");
    assert_eq!(
        out.code,
        Some(0),
        "its own reload completed: {}",
        out.describe()
    );
    assert!(out.stdout.contains("reload complete"), "{}", out.describe());
}

/// A control client the master had accepted, whose request had not arrived
/// when the master exec'd, is answered by the new image (it used to find its
/// connection closed); one that connects during the probe too.
#[test]
fn a_control_client_caught_by_the_exec_is_answered_by_the_new_image() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let installed = slow_wrapper("client_exec_bin", 2.0, 0.0);
    let server = start_from(&installed, "client_exec");
    let master = server.master_pid();
    let mut early = UnixStream::connect(&server.paths.control).expect("connect");
    early
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    thread::sleep(Duration::from_millis(300));
    server.signal(Signal::SIGUSR2);
    thread::sleep(Duration::from_millis(500));
    let client = server.client_config_path();
    let during = thread::spawn(move || {
        run_notesd(&[
            "status",
            "--json",
            "-c",
            client.to_str().expect("utf-8 path"),
        ])
    });
    early.write_all(b"status\n").expect("send");
    let mut answer = String::new();
    early.read_to_string(&mut answer).expect("read the answer");
    let v: Value = serde_json::from_str(&answer)
        .unwrap_or_else(|e| panic!("a status answer, not {answer:?}: {e}"));
    assert_eq!(v["master_pid"], master, "{v}");
    let out = during.join().expect("status client");
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(server.log().contains("re-exec'd in place"));
}
