//! Several hosts on one machine: network namespaces the test creates (a veth
//! pair each, addresses in a private range), and a private PostgreSQL cluster
//! the test starts on a unix socket only (reachable from every namespace,
//! since unix sockets live in the file system), so it may be stopped and
//! restarted without touching the machine's own server (or crashed, or
//! given a synchronous standby to promote), and the proxies put in front of
//! such clusters: PgBouncer, and HAProxy switched between clusters.
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
        let cluster = PgCluster::init(name)?;
        cluster.start_server();
        Some(cluster)
    }

    /// A primary for streaming replication (`wal_level = replica`, WAL
    /// senders, replication connections trusted over the socket); its
    /// commits wait for a standby once [`start_standby`](Self::start_standby)
    /// has given it one.
    pub fn start_primary(name: &str) -> Option<PgCluster> {
        let cluster = PgCluster::init(name)?;
        cluster.append(
            "postgresql.conf",
            "wal_level = replica\nmax_wal_senders = 4\nsynchronous_commit = on\n",
        );
        cluster.append("pg_hba.conf", "local replication all trust\n");
        cluster.start_server();
        Some(cluster)
    }

    /// A hot standby of `primary` (`pg_basebackup -R` from its socket, as
    /// `postgres`), streaming from it, made the primary's synchronous standby
    /// (`synchronous_standby_names = '*'` there, by `ALTER SYSTEM`: every
    /// commit then waits until the standby has flushed it, so a note
    /// acknowledged before a crash is on the standby). Returns once the
    /// primary counts it as such. The standby's own copy of the settings has
    /// no synchronous standby: promoted, it commits alone.
    pub fn start_standby(primary: &PgCluster, name: &str) -> Option<PgCluster> {
        let cluster = PgCluster::empty(name)?;
        let backup = cluster.as_postgres(
            "pg_basebackup",
            &[
                "-h",
                &primary.socket_dir.display().to_string(),
                "-U",
                "postgres",
                "-D",
                &cluster.data.display().to_string(),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
        );
        assert_eq!(backup.code, Some(0), "pg_basebackup: {}", backup.describe());
        cluster.start_server();
        primary.sql(
            "postgres",
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
        );
        primary.sql("postgres", "SELECT pg_reload_conf()");
        let mut state = String::new();
        let sync = super::poll_until(Duration::from_secs(15), || {
            state = primary.sql(
                "postgres",
                "SELECT coalesce(string_agg(sync_state, ','), '') FROM pg_stat_replication",
            );
            state == "sync"
        });
        assert!(
            sync,
            "the standby is not the primary's synchronous standby (sync_state {state:?}); \
             its log:\n{}",
            fs::read_to_string(&cluster.log).unwrap_or_default()
        );
        Some(cluster)
    }

    /// A cluster with its directories (owned by `postgres`) and no data yet.
    fn empty(name: &str) -> Option<PgCluster> {
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
        Some(cluster)
    }

    /// `initdb`, the server not started.
    fn init(name: &str) -> Option<PgCluster> {
        let cluster = PgCluster::empty(name)?;
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
        Some(cluster)
    }

    /// Appends `text` to the data directory's `file` (the last setting wins).
    fn append(&self, file: &str, text: &str) {
        use std::io::Write;
        let path = self.data.join(file);
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        f.write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
    }

    /// `pg_ctl -D DATA ARGS…` as the `postgres` user.
    fn pg_ctl(&self, args: &[&str]) -> CmdOutput {
        let data = self.data.display().to_string();
        let all: Vec<&str> = ["-D", data.as_str()]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        self.as_postgres("pg_ctl", &all)
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
        self.start_server_with("");
    }

    /// [`start_server`](Self::start_server) with more server options
    /// (`-c name=value …`), for this run only.
    pub fn start_server_with(&self, extra: &str) {
        let options = format!(
            "-c listen_addresses='' -k {} -c fsync=off -c max_connections=300 {extra}",
            self.socket_dir.display()
        );
        let log = self.log.display().to_string();
        let out = self.pg_ctl(&["-l", &log, "-w", "-t", "30", "-o", &options, "start"]);
        assert_eq!(out.code, Some(0), "pg_ctl start: {}", out.describe());
    }

    /// Back after a [`crash`](Self::crash), read-only: every transaction
    /// defaults to `READ ONLY`, so a write fails with SQLSTATE 25006 (as on
    /// a failed-over primary that came back as a standby), reads work.
    pub fn start_read_only(&self) {
        self.start_server_with("-c default_transaction_read_only=on");
    }

    /// `pg_ctl promote -w`: a standby becomes a primary (returns once it is).
    pub fn promote(&self) {
        let out = self.pg_ctl(&["-w", "-t", "30", "promote"]);
        assert_eq!(out.code, Some(0), "pg_ctl promote: {}", out.describe());
        assert_eq!(self.sql("postgres", "SELECT pg_is_in_recovery()"), "f");
    }

    /// A crash: SIGKILL of the postmaster and all its children at once (no
    /// shutdown checkpoint, clients cut off mid-query); returns once they
    /// are dead. The next start runs crash recovery.
    ///
    /// Then the stale lock files go (`postmaster.pid` and the socket's
    /// `.lock`): under an init that does not reap orphans (a container's,
    /// this VM's) the killed postmaster stays a zombie, which `kill(pid, 0)`
    /// (pg_ctl's and the postmaster's liveness check) takes for a running
    /// server, so neither a restart nor `pg_ctl stop` would ever go through.
    pub fn crash(&self) {
        let pids = self.pids();
        assert!(!pids.is_empty(), "crash: the server is not running");
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        assert!(
            super::poll_until(Duration::from_secs(5), || pids
                .iter()
                .all(|p| !super::pid_alive(*p))),
            "the server's processes {pids:?} outlived SIGKILL"
        );
        let _ = fs::remove_file(self.data.join("postmaster.pid"));
        let _ = fs::remove_file(self.socket_dir.join(".s.PGSQL.5432.lock"));
    }

    /// Stop the server (`-m fast`: clients are disconnected).
    pub fn stop_server(&self) {
        let out = self.pg_ctl(&["-m", "fast", "-w", "stop"]);
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
        let _ = self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
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

// ---------------------------------------------------------------------------
// HAProxy (Debian's) as a switchable TCP proxy in front of PostgreSQL
// ---------------------------------------------------------------------------

/// `haproxy -db` (foreground, as root) with one TCP listener on a unix
/// socket named as PostgreSQL's (`.s.PGSQL.5432`, so a `host=DIR` URL
/// reaches it) and one server per PostgreSQL cluster, all but one in
/// maintenance: [`route_to`](Self::route_to) switches which one through the
/// runtime API (its admin socket), at once and without a reload. Stopped on
/// drop. `None` after a loud SKIP when it is not installed outside CI.
pub struct HaProxy {
    child: std::process::Child,
    pub socket_dir: PathBuf,
    admin: PathBuf,
    pub log: PathBuf,
    servers: Vec<String>,
    _dir: TempDir,
}

pub const HAPROXY_PORT: u16 = 5432;

impl HaProxy {
    /// In front of `clusters` (server name, cluster), routing to the first.
    pub fn start(name: &str, clusters: &[(&str, &PgCluster)]) -> Option<HaProxy> {
        let Some(bin) = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
        else {
            skip_unless_ci(
                "haproxy",
                "haproxy is not installed",
                "; apt-get install haproxy",
            );
            return None;
        };
        let dir = TempDir::new(&format!("haproxy_{name}"));
        let socket_dir = dir.join("sock");
        fs::create_dir_all(&socket_dir).expect("socket dir");
        let admin = dir.join("admin.sock");
        let log = dir.join("haproxy.log");
        let cfg = dir.join("haproxy.cfg");
        let servers: Vec<String> = clusters.iter().map(|(n, _)| n.to_string()).collect();
        let server_lines: String = clusters
            .iter()
            .enumerate()
            .map(|(i, (n, c))| {
                format!(
                    "    server {n} unix@{}/.s.PGSQL.5432{}\n",
                    c.socket_dir.display(),
                    if i == 0 { "" } else { " disabled" }
                )
            })
            .collect();
        // No health checks (the test says where to route), no retries (a
        // dead server's connection is closed at once: the client sees it
        // and answers 503 instead of waiting), long idle timeouts (the
        // clients' pooled connections are not cut behind their backs).
        fs::write(
            &cfg,
            format!(
                "global\n    stats socket {admin} mode 600 level admin\n    stats timeout 10s\n\n\
                 defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 1h\n\
                 \x20   timeout server 1h\n    retries 0\n\n\
                 listen postgres\n    bind unix@{sock}/.s.PGSQL.{HAPROXY_PORT} mode 666\n\
                 \x20   balance first\n{server_lines}",
                admin = admin.display(),
                sock = socket_dir.display(),
            ),
        )
        .expect("haproxy.cfg");
        let check = run(
            &bin.display().to_string(),
            &["-c", "-q", "-f", &cfg.display().to_string()],
        );
        assert_eq!(check.code, Some(0), "haproxy -c: {}", check.describe());
        let out = fs::File::create(&log).expect("haproxy.log");
        let err = out.try_clone().expect("clone the log file handle");
        let mut cmd = Command::new(&bin);
        cmd.args(["-db", "-f"])
            .arg(&cfg)
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err);
        // If the test process dies abruptly, haproxy goes with it.
        super::die_with_parent(&mut cmd, nix::sys::signal::Signal::SIGTERM);
        let child = cmd.spawn().expect("spawn haproxy");
        let socket = socket_dir.join(format!(".s.PGSQL.{HAPROXY_PORT}"));
        let proxy = HaProxy {
            child,
            socket_dir,
            admin,
            log,
            servers,
            _dir: dir,
        };
        assert!(
            super::poll_until(Duration::from_secs(10), || socket.exists()
                && proxy.admin.exists()),
            "haproxy did not listen: {}",
            fs::read_to_string(&proxy.log).unwrap_or_default()
        );
        Some(proxy)
    }

    /// The URL of `db` through it, as role `postgres`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres:///{db}?host={}&port={HAPROXY_PORT}&user=postgres",
            self.socket_dir.display()
        )
    }

    /// One runtime API command line (`;`-separated commands); the answer.
    pub fn admin(&self, command: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.admin)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.admin.display()));
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(format!("{command}\n").as_bytes())
            .expect("write to the haproxy admin socket");
        let mut answer = String::new();
        s.read_to_string(&mut answer)
            .expect("read from the haproxy admin socket");
        answer
    }

    /// Route new connections to `server` only, and cut every session on the
    /// others (as a failover script does: `set server … state`, `shutdown
    /// sessions`), in one command line, so no connection is made to another
    /// server after it returns.
    pub fn route_to(&self, server: &str) {
        assert!(
            self.servers.iter().any(|s| s == server),
            "no server {server}"
        );
        let mut commands = Vec::new();
        for other in self.servers.iter().filter(|s| *s != server) {
            commands.push(format!("set server postgres/{other} state maint"));
        }
        commands.push(format!("set server postgres/{server} state ready"));
        for other in self.servers.iter().filter(|s| *s != server) {
            commands.push(format!("shutdown sessions server postgres/{other}"));
        }
        let answer = self.admin(&commands.join("; "));
        assert!(
            answer.trim().is_empty(),
            "haproxy runtime API: {commands:?} answered {answer:?}"
        );
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        // SIGTERM: a hard stop (every connection closed).
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}
