//! The monitoring files in `conf/`, held against the real thing: promtool
//! checks and unit-tests the alert rules, and Debian's Prometheus, started on
//! a loopback port, scrapes a notesd under load; then every dashboard query
//! and every alert expression (its figure, without the threshold) is run
//! through Prometheus' HTTP API and must return data — no empty panel, no
//! misspelt metric.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `promtool`/`prometheus` from Debian's prometheus package; None (after a
/// loud SKIP) outside CI when missing.
fn tool(name: &str) -> Option<PathBuf> {
    let found = Command::new(name).arg("--version").output().is_ok();
    if !found {
        skip_unless_ci(
            name,
            &format!("{name} not found (apt-get install prometheus)"),
            "; .ci/run installs it",
        );
        return None;
    }
    Some(PathBuf::from(name))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {text}");
    text
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let dir = root().join("conf/prometheus");
    let check = run_ok(
        Command::new(&promtool)
            .args(["check", "rules", "notesd-rules.yml"])
            .current_dir(&dir),
    );
    assert!(check.contains("SUCCESS: 9 rules found"), "{check}");
    run_ok(
        Command::new(&promtool)
            .args(["test", "rules", "notesd-rules.test.yml"])
            .current_dir(&dir),
    );
    run_ok(
        Command::new(&promtool)
            .args(["check", "config", "prometheus.yml"])
            .current_dir(&dir),
    );
}

/// The figure of each alert: its expression without the final `> threshold`.
fn alert_figures() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(root().join("conf/prometheus/notesd-rules.yml")).expect("rules");
    let mut out = Vec::new();
    let mut alert = String::new();
    for line in text.lines().map(str::trim) {
        if let Some(a) = line.strip_prefix("- alert: ") {
            alert = a.to_string();
        } else if let Some(expr) = line.strip_prefix("expr: ") {
            let cut = expr
                .rfind(" > ")
                .expect("every rule compares its figure with a threshold");
            out.push((alert.clone(), expr[..cut].to_string()));
        }
    }
    out
}

/// Every (panel title, query) of the dashboard.
fn panel_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("conf/grafana/notesd.json")).expect("dashboard");
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        let title = p["title"].as_str().expect("title").to_string();
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            out.push((title.clone(), t["expr"].as_str().expect("expr").to_string()));
        }
    }
    out
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A GET over loopback TCP (Prometheus' API), with the query URL-encoded.
fn api_query(port: u16, query: &str) -> Value {
    try_query(port, query).unwrap_or_else(|e| panic!("{query}: {e}"))
}

fn try_query(port: u16, query: &str) -> Result<Value, String> {
    use std::io::{Read, Write};
    let encoded: String = query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let err = |e: std::io::Error| format!("prometheus on 127.0.0.1:{port}: {e}");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(err)?;
    write!(
        s,
        "GET /api/v1/query?query={encoded} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
    )
    .map_err(err)?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(err)?;
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).map_err(|e| format!("{e}: {resp}"))
}

struct Prometheus {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prometheus(bin: &Path, target: &str) -> Prometheus {
    let dir = TempDir::new("prometheus");
    let rules = root().join("conf/prometheus/notesd-rules.yml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: notesd\n    static_configs:\n      - targets: [\"{target}\"]\n",
        rules.display()
    );
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, config).expect("write config");
    let port = free_port();
    let child = Command::new(bin)
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("log")).expect("log"),
        ))
        .spawn()
        .expect("start prometheus");
    Prometheus {
        child,
        port,
        _dir: dir,
    }
}

/// Requests with an X-Request-Start (as nginx sends it) over the unix
/// socket until stopped: lists, creates, a miss of the list cache.
fn load(socket: PathBuf, stop: Arc<AtomicBool>) -> thread::JoinHandle<usize> {
    thread::spawn(move || {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let start = format!("t={:.3}", now.as_secs_f64() - 0.002);
            let mut c = common::notes::Client::connect(&socket);
            let body = br#"{"title":"scraped"}"#;
            let headers = [
                ("Content-Type", "application/json"),
                ("X-Request-Start", start.as_str()),
            ];
            if n % 5 == 0 {
                c.call("POST", "/api/notes", &headers, Some(body));
            } else {
                c.call("GET", "/api/notes", &headers, None);
            }
            n += 1;
            thread::sleep(Duration::from_millis(5));
        }
        n
    })
}

#[test]
fn every_panel_and_alert_figure_returns_data_from_a_real_prometheus() {
    let Some(bin) = tool("prometheus") else {
        return;
    };
    let port = free_port();
    let server = TestServer::start(
        "prometheus",
        TestOptions {
            extra_binds: vec![format!("127.0.0.1:{port}")],
            ..TestOptions::default()
        },
    );
    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(server.socket_path().to_path_buf(), stop.clone());
    let prom = start_prometheus(&bin, &format!("127.0.0.1:{port}"));
    // Three scrapes at least: rate() needs two within its window.
    let t0 = Instant::now();
    let scraped = poll_until(Duration::from_secs(30), || {
        let Ok(v) = try_query(prom.port, "count_over_time(up{job=\"notesd\"}[1m])") else {
            return false;
        };
        v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .is_some_and(|n| n >= 4.0)
    });
    let up = api_query(prom.port, "up{job=\"notesd\"}");
    assert!(
        scraped,
        "Prometheus did not scrape notesd 4 times in 30 s: {up}"
    );
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    let mut empty = Vec::new();
    let queries: Vec<(String, String)> = panel_queries()
        .into_iter()
        .map(|(t, q)| (format!("panel {t}"), q))
        .chain(
            alert_figures()
                .into_iter()
                .map(|(a, q)| (format!("alert {a}"), q)),
        )
        .collect();
    for (what, q) in &queries {
        let v = api_query(prom.port, q);
        assert_eq!(v["status"], "success", "{what}: {q}: {v}");
        if v["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
            empty.push(format!("{what}: {q}"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sent = loader.join().expect("load");
    eprintln!(
        "PROMETHEUS: {} queries ({} panels' targets, {} alert figures) all returned data after {:.1} s of scraping; {sent} requests sent",
        queries.len(),
        panel_queries().len(),
        alert_figures().len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(
        empty.is_empty(),
        "queries without data:\n{}",
        empty.join("\n")
    );
    assert_eq!(alert_figures().len(), 9);
}
