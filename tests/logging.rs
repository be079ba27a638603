//! The `[log]` table, black-box: `file` (and USR1 reopening it, master and
//! workers), `format = "json"`, `target = "journald"` without a journal, and
//! `access_log = false`.
//!
//! Each test spawns the real binary with its own temp dir; see tests/common.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

const LOG_WAIT: Duration = Duration::from_secs(5);

fn read_lossy(path: &Path) -> String {
    strip_ansi(&String::from_utf8_lossy(
        &fs::read(path).unwrap_or_default(),
    ))
}

/// Waits (bounded) until the file at `path` has a line satisfying `pred`.
fn wait_for_file_line(path: &Path, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let mut found = None;
    poll_until(LOG_WAIT, || {
        found = read_lossy(path)
            .lines()
            .find(|l| pred(l))
            .map(str::to_string);
        found.is_some()
    });
    found.unwrap_or_else(|| {
        panic!(
            "no line {what} in {} within {LOG_WAIT:?}; it holds:\n{}",
            path.display(),
            read_lossy(path)
        )
    })
}

/// Text-format lines of process `pid` carry its role span: `master{pid=N}` or
/// `worker{pid=N …}`.
fn from_pid(line: &str, pid: i32) -> bool {
    line.contains(&format!("{{pid={pid}}}")) || line.contains(&format!("{{pid={pid} "))
}

/// Panics on ERROR or panic lines (the harness's drop check only reads stderr).
fn assert_clean(what: &str, text: &str) {
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains("panicked"))
        .collect();
    assert!(
        bad.is_empty(),
        "{what} has ERROR/panic lines:\n{}",
        bad.join("\n")
    );
}

// 1 -------------------------------------------------------------------------

#[test]
fn log_file_gets_master_and_worker_lines_and_usr1_reopens_it() {
    let ldir = TempDir::new("logfile");
    let file = ldir.join("notesd.log");
    let rotated = ldir.join("notesd.log.1");
    let mut server = TestServer::start(
        "log_file",
        TestOptions {
            log_extra: format!("file = {}", toml_str(&file.display().to_string())),
            ..TestOptions::default()
        },
    );
    let master = server.master_pid();
    let pids = server.worker_pids();

    let resp = server.request("GET", "/", &[("X-Request-Id", "logfile-before-rotate")]);
    assert_eq!(resp.status, 200, "{resp:?}");
    let access = wait_for_file_line(
        &file,
        "with the access line of logfile-before-rotate",
        |l| l.contains("logfile-before-rotate"),
    );
    assert!(
        access.contains("GET")
            && access.contains("200")
            && pids.iter().any(|p| from_pid(&access, *p)),
        "the access line names the method, the status and a worker (workers {pids:?}): {access}"
    );
    let text = read_lossy(&file);
    assert!(
        text.lines().any(|l| from_pid(l, master)),
        "no line of the master (pid {master}) in the log file:\n{text}"
    );
    assert!(
        !server.log().contains("logfile-before-rotate"),
        "with log.file the access line must not go to stderr too; stderr:\n{}",
        server.log()
    );

    // logrotate: move the file away, USR1 the master.
    fs::rename(&file, &rotated).expect("rename the log file to notesd.log.1");
    server.signal(Signal::SIGUSR1);
    let reopened = wait_for_file_line(&file, "of the master saying it reopened the log", |l| {
        from_pid(l, master) && l.contains("reopened")
    });
    eprintln!("master: {reopened}");
    // The master forwards USR1: each worker reopens too (wait for that before
    // the request, so the access line has only one right place to go).
    for pid in &pids {
        let line = wait_for_file_line(
            &file,
            &format!("of worker {pid} saying it reopened the log"),
            |l| from_pid(l, *pid) && l.contains("reopened"),
        );
        eprintln!("worker: {line}");
    }
    let resp = server.request("GET", "/", &[("X-Request-Id", "logfile-after-rotate")]);
    assert_eq!(resp.status, 200, "{resp:?}");
    let access = wait_for_file_line(&file, "with the access line of logfile-after-rotate", |l| {
        l.contains("logfile-after-rotate")
    });
    assert!(pids.iter().any(|p| from_pid(&access, *p)), "{access}");
    let old = read_lossy(&rotated);
    assert!(
        old.contains("logfile-before-rotate") && !old.contains("logfile-after-rotate"),
        "after USR1 nothing more goes to the rotated file:\n{old}"
    );

    server.signal(Signal::SIGTERM);
    assert_eq!(server.expect_exit_code(Duration::from_secs(10)), 0);
    assert_clean("notesd.log.1", &old);
    assert_clean("notesd.log", &read_lossy(&file));
}

// 2 -------------------------------------------------------------------------

#[test]
fn json_format_every_stderr_line_is_json_with_access_fields() {
    let mut server = TestServer::start(
        "log_json",
        TestOptions {
            log_format: "json".to_string(),
            // stdout is not the log stream; keep `log()` to stderr alone.
            separate_stdout: true,
            ..TestOptions::default()
        },
    );
    let master = i64::from(server.master_pid());
    let pids = server.worker_pids();
    let resp = server.request("GET", "/healthz", &[("X-Request-Id", "json-req-1")]);
    assert_eq!(resp.status, 200, "{resp:?}");
    server.wait_for_log_line(0, "with json-req-1", LOG_WAIT, |l| l.contains("json-req-1"));
    server.signal(Signal::SIGTERM);
    assert_eq!(server.expect_exit_code(Duration::from_secs(10)), 0);

    let log = server.log();
    let mut access = Vec::new();
    let mut errors = Vec::new();
    let mut from_master = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
            panic!("a stderr line is not JSON ({e}): {line}\n--- stderr ---\n{log}")
        });
        let level = v["level"]
            .as_str()
            .unwrap_or_else(|| panic!("no \"level\": {line}"));
        assert!(
            v["fields"].is_object() || v["message"].is_string(),
            "no \"fields\" or \"message\": {line}"
        );
        if level == "ERROR" {
            errors.push(line.to_string());
        }
        if v["span"]["pid"].as_i64() == Some(master) {
            from_master += 1;
        }
        if line.contains("json-req-1") {
            access.push(v);
        }
    }
    assert!(errors.is_empty(), "ERROR lines:\n{}", errors.join("\n"));
    assert!(
        from_master > 0,
        "no JSON line of the master (pid {master} in its span):\n{log}"
    );
    assert_eq!(access.len(), 1, "one access line for json-req-1:\n{log}");
    let a = &access[0];
    let f = &a["fields"];
    assert_eq!(f["method"], "GET", "{a}");
    assert_eq!(f["path"], "/healthz", "{a}");
    assert!(
        f["status"] == 200 || f["status"] == "200",
        "status 200 in {a}"
    );
    assert_eq!(f["request_id"], "json-req-1", "{a}");
    let pid = f["pid"]
        .as_i64()
        .or_else(|| a["span"]["pid"].as_i64())
        .unwrap_or_else(|| panic!("the access line names no worker pid: {a}"));
    assert!(
        pids.contains(&(pid as i32)),
        "the access line's pid {pid} is a worker ({pids:?}): {a}"
    );
}

// 3 -------------------------------------------------------------------------

#[test]
fn journald_target_without_a_journal_falls_back_to_stderr_with_a_warning() {
    let journal = Path::new("/run/systemd/journal/socket");
    if journal.exists() {
        eprintln!(
            "\n==================== SKIP ====================\n\
             {} exists: this machine has a journal, so the fallback \
             cannot be tested here\nthis test did NOT run\n\
             ==============================================\n",
            journal.display()
        );
        return;
    }
    let server = TestServer::start(
        "log_journald",
        TestOptions {
            log_extra: "target = \"journald\"".to_string(),
            ..TestOptions::default()
        },
    );
    let warning = server.wait_for_log_line(0, "warning about journald", LOG_WAIT, |l| {
        l.contains(" WARN ") && l.to_ascii_lowercase().contains("journald")
    });
    eprintln!("{warning}");
    let resp = server.request("GET", "/", &[("X-Request-Id", "journald-fallback-1")]);
    assert_eq!(resp.status, 200, "{resp:?}");
    server.wait_for_log_line(0, "with the access line on stderr", LOG_WAIT, |l| {
        l.contains("journald-fallback-1")
    });
}

// 4 -------------------------------------------------------------------------

#[test]
fn access_log_false_logs_no_request() {
    let mut server = TestServer::start(
        "log_noaccess",
        TestOptions {
            log_extra: "access_log = false".to_string(),
            ..TestOptions::default()
        },
    );
    for i in 0..3 {
        let id = format!("no-access-{i}");
        let resp = server.request("GET", "/", &[("X-Request-Id", id.as_str())]);
        assert_eq!(resp.status, 200, "{resp:?}");
    }
    // Stop the server, so everything the workers would log is in the log.
    server.signal(Signal::SIGTERM);
    assert_eq!(server.expect_exit_code(Duration::from_secs(10)), 0);
    let log = server.log();
    let access: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("no-access-") || l.contains(" access: ") || l.contains("method=GET"))
        .collect();
    assert!(
        access.is_empty(),
        "access_log = false, yet requests were logged:\n{}",
        access.join("\n")
    );
}
