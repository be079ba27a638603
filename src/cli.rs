//! The command line, as clap sees it: `main.rs` parses it, and `build.rs`
//! includes this very file to write the man pages and shell completions
//! (`target/assets/`, packaged by `cargo deb`), so they never drift from it.
//! Only `std` and `clap` here: the build script has nothing else.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// What `--version` says: the package's version, unless a test build names
/// another (the same rule as `notesd::VERSION`).
pub(crate) const VERSION: &str = match option_env!("NOTESD_BUILD_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

#[derive(Parser)]
#[command(
    name = "notesd",
    version = VERSION,
    about = "Notes JSON API on a Gunicorn-style prefork server",
    long_about = "Notes JSON API on a Gunicorn-style prefork server.\n\n\
        `notesd serve` runs the master: it binds the sockets, forks the workers and supervises \
        them. Signals to the master: HUP reload (new workers first, then the old ones drain), \
        TERM graceful stop, INT/QUIT quick stop, TTIN/TTOU one worker more/fewer, USR1 reopen \
        log files, USR2 re-exec the master in place from its binary (same PID), then reload. \
        `notesd reload` does what HUP does (re-exec'ing first when the binary changed) and \
        waits until it is done.\n\n\
        Configuration: -c FILE, else $NOTESD_CONFIG, else /etc/notesd/notesd.toml, else the \
        embedded defaults. Exit codes: 0 clean, 1 runtime failure, 2 bad usage or invalid \
        config, 3 workers failed to boot."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(clap::Args, Clone)]
pub(crate) struct ConfigArg {
    /// Config file (default: $NOTESD_CONFIG, else /etc/notesd/notesd.toml if it exists, else the embedded defaults)
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run the master in the foreground (bind, fork workers, supervise)
    Serve {
        #[command(flatten)]
        config: ConfigArg,
        /// Address to listen on, replacing server.bind (repeatable): unix:/path, 127.0.0.1:8000, [::1]:8000
        #[arg(short = 'b', long = "bind", value_name = "BIND")]
        bind: Vec<String>,
        /// Number of workers (0 = one per core)
        #[arg(short = 'w', long = "workers", value_name = "N")]
        workers: Option<u32>,
        /// Database URL (overrides database.url, DATABASE_URL and NOTESD_DATABASE_URL)
        #[arg(long = "database-url", value_name = "URL")]
        database_url: Option<String>,
    },
    /// Apply the embedded migrations (or list applied/pending with --status)
    Migrate {
        #[command(flatten)]
        config: ConfigArg,
        /// Only show which migrations are applied and which are pending
        #[arg(long)]
        status: bool,
    },
    /// Insert N sample notes ("Note 1" … "Note N") in one transaction
    Seed {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        count: u32,
    },
    /// Validate the configuration (like nginx -t): exit 0, or 2 listing every problem
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Ask the running master for its workers (over the control socket)
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
        /// Redraw every SECONDS (default 1) until interrupted, like top; plain
        /// lines when stdout is not a terminal (one JSON document per line with --json)
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "1",
              value_parser = watch_interval)]
        watch: Option<f64>,
    },
    /// Reload gracefully (as SIGHUP) and wait: exit 0 once the new generation serves, 1 with the reason if the reload was refused or abandoned
    Reload {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Take this host out of rotation: /readyz answers 503 "draining" from now on while everything keeps serving (--undo reverts)
    Drain {
        #[command(flatten)]
        config: ConfigArg,
        /// Revert: /readyz answers as usual again
        #[arg(long)]
        undo: bool,
    },
    /// GET /healthz over the unix socket: exit 0 healthy, 1 not
    Healthcheck {
        #[command(flatten)]
        config: ConfigArg,
        /// Unix socket to probe (default: the first unix address in server.bind)
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Internal: a worker process, exec'd by the master
    #[command(hide = true)]
    Worker,
    /// Internal: can this binary take over the running master's handover
    /// (the record at $NOTESD_HANDOVER_FD)? Asked before a re-exec in place.
    #[command(hide = true)]
    HandoverCheck,
}

/// `--watch SECONDS`: at least 0.1 s (a master answers status in well under that).
fn watch_interval(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if (0.1..=86_400.0).contains(&s) => Ok(s),
        _ => Err(format!("{text:?}: expected seconds between 0.1 and 86400")),
    }
}
