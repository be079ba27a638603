//! `notesd`: clap dispatch. `anyhow` and exit codes live only here
//! (0 clean, 1 runtime failure, 2 bad usage or invalid config, 3 workers
//! failed to boot).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

mod cli;

use cli::{Cli, Command, ConfigArg};
use notesd::config::{self, Config, ConfigError, Overrides};
use notesd::exit;
use notesd::store::{self, Purpose, Store};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Worker => notesd::worker::run(),
        Command::Check { config } => check(config),
        Command::HandoverCheck => handover_check(),
        other => match dispatch(other) {
            Ok(code) => code,
            Err(e) => {
                let code = e
                    .downcast_ref::<Exit>()
                    .map_or(exit::FAILURE, |Exit(c, _)| *c);
                eprintln!("notesd: {}", chain(&e));
                code
            }
        },
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

/// The error and its causes on one line, skipping causes a message already quotes.
fn chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// An error that carries its own exit code.
#[derive(Debug, thiserror::Error)]
#[error("{1}")]
struct Exit(i32, String);

fn load(o: &Overrides) -> anyhow::Result<Config> {
    config::load(o).map_err(|e: ConfigError| anyhow::Error::new(Exit(exit::USAGE, e.to_string())))
}

fn overrides(c: ConfigArg) -> Overrides {
    Overrides {
        config_path: c.config,
        ..Overrides::default()
    }
}

fn check(c: ConfigArg) -> i32 {
    let o = overrides(c);
    match config::load(&o) {
        Ok(cfg) => {
            println!(
                "notesd: configuration {} is valid ({} worker(s), database {})",
                cfg.source,
                cfg.worker_count(),
                store::redact(&cfg.database.url)
            );
            for warning in cfg.warnings() {
                eprintln!("notesd: warning: {warning}");
            }
            exit::OK
        }
        Err(e) => {
            let name = config::locate(o.config_path.as_deref())
                .map_or("embedded defaults".to_string(), |p| p.display().to_string());
            eprintln!("notesd: configuration {name} is invalid:");
            for p in e.problems() {
                eprintln!("{p}");
            }
            exit::USAGE
        }
    }
}

fn handover_check() -> i32 {
    match notesd::master::check_handover() {
        Ok(message) => {
            println!("{message}");
            exit::OK
        }
        Err(e) => {
            eprintln!("notesd: {e}");
            exit::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")
}

/// Install logging; a warning about it (journald missing) is logged by the
/// caller once its span is entered, so it carries the role and pid.
fn init_log(log: &notesd::config::LogConfig) -> Option<String> {
    match notesd::log::init(log) {
        Ok(warning) => warning,
        Err(e) => {
            eprintln!("notesd: logging: {e}");
            None
        }
    }
}

fn dispatch(cmd: Command) -> anyhow::Result<i32> {
    match cmd {
        Command::Serve { .. } if std::env::var_os(notesd::master::handover::ENV_FD).is_some() => {
            resume()
        }
        Command::Serve {
            config,
            bind,
            workers,
            database_url,
        } => {
            let o = Overrides {
                config_path: config.config,
                bind,
                workers,
                database_url,
            };
            let cfg = load(&o)?;
            let log = cfg.log.clone();
            as_master(Some(&log), || notesd::master::run(cfg, o))
        }
        Command::Migrate { config, status } => {
            let cfg = load(&overrides(config))?;
            if let Some(w) = init_log(&cfg.log) {
                tracing::warn!("{w}");
            }
            runtime()?.block_on(migrate(&cfg, status))
        }
        Command::Seed { config, count } => {
            let cfg = load(&overrides(config))?;
            if let Some(w) = init_log(&cfg.log) {
                tracing::warn!("{w}");
            }
            runtime()?.block_on(async {
                let store = Store::connect(&cfg.database, Purpose::Serve, Duration::from_secs(10))
                    .await
                    .context("seed")?;
                store.check_schema().await.context("seed")?;
                let n = store.seed(count).await.context("seed")?;
                println!("notesd: inserted {n} notes");
                Ok(exit::OK)
            })
        }
        Command::Status {
            config,
            json,
            watch,
        } => {
            let cfg = load(&overrides(config))?;
            match watch {
                Some(every) => watch_status(&cfg.server.control_socket, json, every),
                None => {
                    let st = notesd::client::status(&cfg.server.control_socket)?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&st)?);
                    } else {
                        print!("{}", format_status(&st));
                    }
                    Ok(exit::OK)
                }
            }
        }
        Command::Reload { config } => {
            let cfg = load(&overrides(config))?;
            let answer = notesd::client::reload(&cfg.server.control_socket)?;
            if answer.ok {
                println!("notesd: {}", answer.message);
                Ok(exit::OK)
            } else {
                Err(Exit(exit::FAILURE, answer.message).into())
            }
        }
        Command::Drain { config, undo } => {
            let cfg = load(&overrides(config))?;
            let answer = notesd::client::drain(&cfg.server.control_socket, undo)?;
            if answer.ok {
                println!("notesd: {}", answer.message);
                Ok(exit::OK)
            } else {
                Err(Exit(exit::FAILURE, answer.message).into())
            }
        }
        Command::Healthcheck { config, socket } => {
            let socket = match socket {
                Some(s) => s,
                None => load(&overrides(config))?
                    .first_unix_socket()
                    .context("server.bind has no unix socket; pass --socket PATH")?,
            };
            notesd::client::healthcheck(&socket)?;
            println!("notesd: healthy ({})", socket.display());
            Ok(exit::OK)
        }
        Command::Worker | Command::Check { .. } | Command::HandoverCheck => {
            unreachable!("handled in main")
        }
    }
}

/// `serve` exec'd in place by a running master: take over what it handed over.
fn resume() -> anyhow::Result<i32> {
    let taken = notesd::master::handover::take()
        .context("no handover")?
        .map_err(|e| Exit(exit::FAILURE, e.to_string()))?;
    let (record, fds) = taken;
    let log = record
        .state
        .configs
        .get(&record.state.current)
        .map(|c| c.log.clone());
    as_master(log.as_ref(), || notesd::master::resume(record, fds))
}

/// Run a master with logging set up from `log`, inside the master's span; its
/// error is logged there and leaves with its exit code.
fn as_master(
    log: Option<&notesd::config::LogConfig>,
    master: impl FnOnce() -> Result<i32, notesd::master::MasterError>,
) -> anyhow::Result<i32> {
    let warning = log.and_then(init_log);
    let span = tracing::info_span!("master", pid = std::process::id());
    let _entered = span.enter();
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    master().map_err(|e| {
        tracing::error!("{e}");
        Exit(e.exit_code(), e.to_string()).into()
    })
}

async fn migrate(cfg: &Config, status_only: bool) -> anyhow::Result<i32> {
    // `database.migrate_url` when set (a direct URL beside a pooler), else `database.url`.
    let database = notesd::config::DatabaseConfig {
        url: cfg.migrate_url().to_string(),
        ..cfg.database.clone()
    };
    // SQLite: serialize with any other migrate before even connecting (held to the end).
    let _lock = match sqlite_file(&database.url) {
        Some(db) => Some(store::migrate::lock_sqlite(&db).context("migrate")?),
        None => None,
    };
    let store = Store::connect(&database, Purpose::Migrate, Duration::from_secs(10))
        .await
        .context("migrate")?;
    let target = store::redact(&database.url);
    if !status_only {
        let applied = store::migrate::run(&store).await.context("migrate")?;
        if applied.is_empty() {
            println!("notesd: {target}: schema is up to date");
        } else {
            println!("notesd: {target}: applied migrations {applied:?}");
        }
    }
    let rows = store::migrate::applied(&store).await.context("migrate")?;
    if status_only {
        // The mark is part of the recorded description: "[backward-compatible]".
        let embedded = store::migrate::migrator(store.backend());
        println!("{:<8} {:<8} description", "version", "state");
        for m in embedded.iter() {
            let state = match rows.iter().find(|r| r.0 == m.version) {
                Some((_, true, _)) => "applied",
                Some((_, false, _)) => "FAILED",
                None => "pending",
            };
            println!("{:<8} {:<8} {}", m.version, state, m.description);
        }
        for (v, _, d) in rows.iter().filter(|r| !embedded.version_exists(r.0)) {
            let served = if store::migrate::recorded_compatible(d) {
                "unknown to this binary, which serves it anyway"
            } else {
                "unknown to this binary, which refuses to serve it"
            };
            println!("{v:<8} {:<8} {d} ({served})", "newer");
        }
        let state = store::schema_state(&store).await.context("migrate")?;
        println!("notesd {}: {}", notesd::VERSION, state.problem());
    }
    store.close().await;
    Ok(exit::OK)
}

/// The SQLite database file (for the migration lock), if the URL is SQLite.
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// `notesd status --watch`: redraw in place on a terminal (like `top`),
/// else one snapshot after another; a master that does not answer (a
/// restart) is said so, and watched for again.
fn watch_status(control: &std::path::Path, json: bool, every: f64) -> anyhow::Result<i32> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stdout().is_terminal() && !json;
    loop {
        let text = match notesd::client::status(control) {
            Ok(st) if json => format!("{}\n", serde_json::to_string(&st)?),
            Ok(st) => format_status(&st),
            Err(e) => format!("notesd: the master does not answer ({e}); watching\n"),
        };
        let mut out = std::io::stdout().lock();
        let written = if tty {
            // Home, the new table, then clear what the last one left below it.
            write!(out, "\x1b[H{}\x1b[J", text.replace('\n', "\x1b[K\n"))
        } else {
            write!(out, "{text}")
        };
        // A closed pipe (`| head`) ends the watch quietly.
        if written.and_then(|()| out.flush()).is_err() {
            return Ok(exit::OK);
        }
        drop(out);
        std::thread::sleep(Duration::from_secs_f64(every));
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}M", bytes as f64 / 1_048_576.0)
}

/// The resources columns: CPU s, RSS, PSS, fds (`-` where unknown).
fn resource_columns(r: Option<&notesd::master::control::Resources>) -> String {
    match r {
        Some(r) => format!(
            "{:>8.2} {:>8} {:>8} {:>5}",
            r.cpu_s,
            mib(r.rss_bytes),
            r.pss_bytes.map_or("-".into(), mib),
            r.open_fds.map_or("-".into(), |n| n.to_string())
        ),
        None => format!("{:>8} {:>8} {:>8} {:>5}", "-", "-", "-", "-"),
    }
}

/// `notesd status`: a summary line, then one row per process (the master
/// first), each with its resources and, for a worker, its current request.
fn format_status(st: &notesd::master::control::Status) -> String {
    use std::fmt::Write;
    let mut out = status_summary(st);
    let _ = writeln!(
        out,
        "{:>8} {:>4} {:>4} {:<9} {:>9} {:>9} {:>5} {:>9} {:>10} {:>8} {:>8} {:>8} {:>5}  current request",
        "pid",
        "slot",
        "gen",
        "state",
        "age",
        "requests",
        "conns",
        "accepted",
        "heartbeat",
        "cpu s",
        "rss",
        "pss",
        "fds"
    );
    let _ = writeln!(
        out,
        "{:>8} {:>4} {:>4} {:<9} {:>8.1}s {:>9} {:>5} {:>9} {:>10} {}  (master)",
        st.master_pid,
        "-",
        "-",
        "master",
        st.uptime_s,
        "-",
        "-",
        "-",
        "-",
        resource_columns(st.master.as_ref())
    );
    for w in &st.workers {
        out.push_str(&worker_row(w));
    }
    out
}

/// The line above the table: who, what phase, how many, restarts, recycles.
fn status_summary(st: &notesd::master::control::Status) -> String {
    let recycled: Vec<String> = st
        .recycles
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    let mut line = format!(
        "master {} ({}) — {}{} — generation {} — {}/{} workers — up {:.0} s — {} restarts — recycled: {} — config {}\n",
        st.master_pid,
        st.version,
        st.phase,
        if st.draining {
            " (drained: /readyz 503)"
        } else {
            ""
        },
        st.generation,
        st.workers.iter().filter(|w| w.state == "ready").count(),
        st.target_workers,
        st.uptime_s,
        st.restarts,
        if recycled.is_empty() {
            "none".to_string()
        } else {
            recycled.join(", ")
        },
        st.config
    );
    if let Some(limit) = st.max_worker_memory {
        line.push_str(&format!("max_worker_memory {} (PSS)\n", mib(limit)));
    }
    for l in &st.listeners {
        line.push_str(&format!(
            "listen queue {}: {} of {}\n",
            l.bind, l.queued, l.backlog
        ));
    }
    line
}

fn worker_row(w: &notesd::master::control::WorkerStatus) -> String {
    let current = w
        .current_request
        .as_ref()
        .map(|r| {
            let phase = r
                .phase
                .as_ref()
                .map(|p| format!("; {p}"))
                .unwrap_or_default();
            format!(
                "{} {} ({} ms, {}{phase})",
                r.method, r.path, r.elapsed_ms, r.request_id
            )
        })
        .unwrap_or_default();
    format!(
        "{:>8} {:>4} {:>4} {:<9} {:>8.1}s {:>9} {:>5} {:>9} {:>9.2}s {}  {}\n",
        w.pid,
        w.slot,
        w.generation,
        w.state,
        w.age_s,
        w.requests,
        w.active_connections,
        w.accepted,
        w.last_heartbeat_s,
        resource_columns(w.resources.as_ref()),
        current
    )
}
