//! PostgreSQL: a fresh database per test, or a loud SKIP (a failure under
//! CI) when the server is unreachable.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::{CmdOutput, notes, skip_unless_ci};

static PG_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh PostgreSQL database, dropped (best effort) on drop.
pub struct PgDatabase {
    pub name: String,
    pub url: String,
}

/// `psql -c SQL` on database `postgres` (bounded).
fn psql(sql: &str) -> CmdOutput {
    notes::psql_on("postgres", sql)
}

/// Creates `notesd_test_<pid>_<n>` on 127.0.0.1:5432 (user postgres, trust auth).
/// When PostgreSQL is unreachable: panics under CI (env `CI` set), else prints a
/// loud SKIP and returns None.
pub fn fresh_pg_database() -> Option<PgDatabase> {
    let probe = if Command::new("psql").arg("--version").output().is_ok() {
        psql("SELECT 1")
    } else {
        CmdOutput {
            code: None,
            timed_out: false,
            stdout: String::new(),
            stderr: "psql is not installed".to_string(),
            elapsed: Duration::ZERO,
        }
    };
    if probe.code != Some(0) {
        let msg = format!(
            "PostgreSQL is not reachable at 127.0.0.1:5432 as user postgres: {}",
            probe.describe()
        );
        skip_unless_ci("PostgreSQL", &msg, "");
        return None;
    }
    let name = format!(
        "notesd_test_{}_{}",
        std::process::id(),
        PG_COUNTER.fetch_add(1, Ordering::SeqCst)
    );
    let _ = psql(&format!("DROP DATABASE IF EXISTS {name}"));
    let out = psql(&format!("CREATE DATABASE {name}"));
    assert_eq!(
        out.code,
        Some(0),
        "CREATE DATABASE {name} failed: {}",
        out.describe()
    );
    Some(PgDatabase {
        url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
        name,
    })
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = psql(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{}' AND pid <> pg_backend_pid()",
            self.name
        ));
        let out = psql(&format!("DROP DATABASE IF EXISTS {}", self.name));
        if out.code != Some(0) {
            eprintln!(
                "warning: could not drop database {}: {}",
                self.name,
                out.describe()
            );
        }
    }
}
