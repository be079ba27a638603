//! Several hosts on one machine: network namespaces the test creates (a veth
//! pair each, addresses in a private range), and a private PostgreSQL cluster
//! the test starts on a unix socket only (reachable from every namespace,
//! since unix sockets live in the file system), so it may be stopped and
//! restarted without touching the machine's own server.
//!
//! Both need root: under CI that is given; elsewhere the tests SKIP loudly.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{CmdOutput, TempDir, children_of, run_with_timeout, skip_unless_ci};

/// Root, or a loud SKIP (a failure under CI).
pub fn require_root(what: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    skip_unless_ci(
        "root",
        &format!("{what} needs root (network namespaces, a PostgreSQL cluster of its own)"),
        "; CI runs as root",
    );
    false
}

fn run(program: &str, args: &[&str]) -> CmdOutput {
    let mut cmd = Command::new(program);
    cmd.args(args);
    run_with_timeout(cmd, Duration::from_secs(30))
}

#[track_caller]
fn must(program: &str, args: &[&str]) {
    let out = run(program, args);
    assert_eq!(
        out.code,
        Some(0),
        "{program} {}: {}",
        args.join(" "),
        out.describe()
    );
}

// ---------------------------------------------------------------------------
// Network namespaces
// ---------------------------------------------------------------------------

/// A network namespace with one veth pair to the root namespace: the host's
/// end is `addr`, the root's end `peer`, a /30 of 10.213.0.0/16. Deleted on drop.
pub struct NetNs {
    pub name: String,
    pub addr: String,
    pub peer: String,
    veth: String,
}

impl NetNs {
    /// Namespace `index` (0..64) of this test process.
    pub fn create(index: u32) -> NetNs {
        assert!(index < 64, "at most 64 namespaces per test process");
        let pid = std::process::id();
        let name = format!("nd{pid}h{index}");
        let veth = format!("ndv{}x{index}", pid % 1_000_000);
        let third = pid % 250;
        let base = index * 4;
        let peer = format!("10.213.{third}.{}", base + 1);
        let addr = format!("10.213.{third}.{}", base + 2);
        let _ = run("ip", &["netns", "del", &name]);
        let _ = run("ip", &["link", "del", &veth]);
        must("ip", &["netns", "add", &name]);
        let ns = NetNs {
            name,
            addr,
            peer,
            veth,
        };
        let n = ns.name.as_str();
        must(
            "ip",
            &[
                "link", "add", &ns.veth, "type", "veth", "peer", "name", "eth0", "netns", n,
            ],
        );
        must(
            "ip",
            &["addr", "add", &format!("{}/30", ns.peer), "dev", &ns.veth],
        );
        must("ip", &["link", "set", &ns.veth, "up"]);
        must(
            "ip",
            &[
                "-n",
                n,
                "addr",
                "add",
                &format!("{}/30", ns.addr),
                "dev",
                "eth0",
            ],
        );
        must("ip", &["-n", n, "link", "set", "eth0", "up"]);
        must("ip", &["-n", n, "link", "set", "lo", "up"]);
        ns
    }

    /// The command prefix that runs a program inside.
    pub fn wrap(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Its end of the veth pair goes with it, and with that the pair.
        let _ = run("ip", &["netns", "del", &self.name]);
        let _ = run("ip", &["link", "del", &self.veth]);
    }
}

// ---------------------------------------------------------------------------
// A PostgreSQL cluster of the test's own
// ---------------------------------------------------------------------------

/// `initdb` + `pg_ctl start` in a temp dir, listening on a unix socket only
/// (trust auth, superuser `postgres`); stopped on drop.
pub struct PgCluster {
    bin: PathBuf,
    data: PathBuf,
    pub socket_dir: PathBuf,
    log: PathBuf,
    // Declared last: removed after the server stopped.
    dir: TempDir,
}

impl PgCluster {
    /// Root only (the server runs as `postgres`). `None` after a loud SKIP
    /// when PostgreSQL's server binaries are missing outside CI.
    pub fn start(name: &str) -> Option<PgCluster> {
        let bin = fs::read_dir("/usr/lib/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").is_file())
            .max();
        let Some(bin) = bin else {
            skip_unless_ci(
                "PostgreSQL server",
                "no initdb under /usr/lib/postgresql/*/bin",
                "; apt-get install postgresql",
            );
            return None;
        };
        let dir = TempDir::new(name);
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let cluster = PgCluster {
            bin,
            data: dir.join("data"),
            socket_dir: dir.join("sock"),
            log: dir.join("server.log"),
            dir,
        };
        fs::create_dir_all(&cluster.socket_dir).expect("socket dir");
        must(
            "chown",
            &[
                "-R",
                "postgres:postgres",
                &cluster.dir.path().display().to_string(),
            ],
        );
        let initdb = cluster.as_postgres(
            "initdb",
            &[
                "-D",
                &cluster.data.display().to_string(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
            ],
        );
        assert_eq!(initdb.code, Some(0), "initdb: {}", initdb.describe());
        cluster.start_server();
        Some(cluster)
    }

    /// A bin/ program as the `postgres` user.
    fn as_postgres(&self, program: &str, args: &[&str]) -> CmdOutput {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"])
            .arg(self.bin.join(program))
            .args(args);
        run_with_timeout(cmd, Duration::from_secs(60))
    }

    /// (Re)start the server; returns once it accepts connections.
    pub fn start_server(&self) {
        let options = format!(
            "-c listen_addresses='' -k {} -c fsync=off -c max_connections=300",
            self.socket_dir.display()
        );
        let out = self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data.display().to_string(),
                "-l",
                &self.log.display().to_string(),
                "-w",
                "-t",
                "30",
                "-o",
                &options,
                "start",
            ],
        );
        assert_eq!(out.code, Some(0), "pg_ctl start: {}", out.describe());
    }

    /// Stop the server (`-m fast`: clients are disconnected).
    pub fn stop_server(&self) {
        let out = self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data.display().to_string(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
        assert_eq!(out.code, Some(0), "pg_ctl stop: {}", out.describe());
    }

    /// The server's processes: the postmaster (from `postmaster.pid`) and
    /// its children (to SIGSTOP the whole server: a hung database).
    pub fn pids(&self) -> Vec<i32> {
        let pidfile = fs::read_to_string(self.data.join("postmaster.pid")).unwrap_or_default();
        let Some(main) = pidfile
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
        else {
            return Vec::new();
        };
        std::iter::once(main).chain(children_of(main)).collect()
    }

    /// The URL of database `db`, over the socket, as role `postgres`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres:///{db}?host={}&user=postgres",
            self.socket_dir.display()
        )
    }

    /// `psql -d DB -c SQL` over the socket; the output.
    pub fn psql(&self, db: &str, sql: &str) -> CmdOutput {
        let mut cmd = Command::new(self.bin.join("psql"));
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket_dir)
            .args(["-U", "postgres", "-d", db, "-c", sql]);
        run_with_timeout(cmd, Duration::from_secs(30))
    }

    /// `psql` that must succeed; the trimmed output.
    #[track_caller]
    pub fn sql(&self, db: &str, sql: &str) -> String {
        let out = self.psql(db, sql);
        assert_eq!(out.code, Some(0), "psql {sql:?}: {}", out.describe());
        out.stdout.trim().to_string()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data.display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

// ---------------------------------------------------------------------------
// PgBouncer (Debian's) in front of the cluster
// ---------------------------------------------------------------------------

/// `pgbouncer` (as `postgres`) on a unix socket in its own dir, in front of
/// `cluster`'s database `db`, with `pool_mode` and `pool_size` server
/// connections; stopped on drop. `None` after a loud SKIP when it is not
/// installed outside CI.
pub struct PgBouncer {
    child: std::process::Child,
    pub socket_dir: PathBuf,
    pub log: PathBuf,
    _dir: TempDir,
}

pub const PGBOUNCER_PORT: u16 = 6432;

impl PgBouncer {
    pub fn start(
        cluster: &PgCluster,
        db: &str,
        pool_mode: &str,
        pool_size: u32,
    ) -> Option<PgBouncer> {
        let Some(bin) = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
        else {
            skip_unless_ci(
                "pgbouncer",
                "pgbouncer is not installed",
                "; apt-get install pgbouncer",
            );
            return None;
        };
        let dir = TempDir::new("pgbouncer");
        let socket_dir = dir.join("sock");
        fs::create_dir_all(&socket_dir).expect("socket dir");
        let ini = dir.join("pgbouncer.ini");
        let log = dir.join("pgbouncer.log");
        fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").expect("users");
        fs::write(
            &ini,
            format!(
                "[databases]\n{db} = host={cluster_sock} dbname={db}\n\n\
                 [pgbouncer]\nlisten_addr =\nlisten_port = {PGBOUNCER_PORT}\n\
                 unix_socket_dir = {sock}\nauth_type = trust\nauth_file = {users}\n\
                 pool_mode = {pool_mode}\ndefault_pool_size = {pool_size}\nmax_client_conn = 1000\n\
                 logfile = {log}\npidfile = {pid}\nadmin_users = postgres\n\
                 ignore_startup_parameters = extra_float_digits\n",
                cluster_sock = cluster.socket_dir.display(),
                sock = socket_dir.display(),
                users = dir.join("users.txt").display(),
                log = log.display(),
                pid = dir.join("pgbouncer.pid").display(),
            ),
        )
        .expect("pgbouncer.ini");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        must(
            "chown",
            &["-R", "postgres:postgres", &dir.path().display().to_string()],
        );
        let child = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(&bin)
            .arg(&ini)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn pgbouncer");
        let socket = socket_dir.join(format!(".s.PGSQL.{PGBOUNCER_PORT}"));
        assert!(
            super::poll_until(Duration::from_secs(10), || socket.exists()),
            "pgbouncer did not listen: {}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        Some(PgBouncer {
            child,
            socket_dir,
            log,
            _dir: dir,
        })
    }

    /// The URL of `db` through it, as role `postgres`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres:///{db}?host={}&port={PGBOUNCER_PORT}&user=postgres",
            self.socket_dir.display()
        )
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // runuser forwards the signal to pgbouncer, which exits on it.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}
