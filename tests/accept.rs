//! The accept path under pressure, black-box: a worker out of file
//! descriptors keeps serving what it has at normal latency and accepts again
//! by itself; a graceful stop (TERM) serves every connection the kernel had
//! already queued, on unix and TCP listeners, with and without
//! `server.shutdown_delay`; `notesd drain` takes a host out of rotation
//! (`/readyz` 503) while everything keeps serving.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;

/// EMFILE used to sleep 50 ms on the worker's only thread at every park and
/// check tick (the listener stays readable): `/healthz` on an open
/// keep-alive connection went from 0.02 ms to 100 ms median. Now the worker
/// stops watching its listeners for a moment instead.
#[test]
fn out_of_descriptors_a_worker_serves_its_connections_at_normal_latency() {
    let server = TestServer::start(
        "emfile",
        TestOptions {
            workers: 1,
            keepalive: 60,
            sh_prefix: Some("ulimit -n 64;".into()),
            ..TestOptions::default()
        },
    );
    let socket = server.socket_path();
    let mut kept = HttpConn::connect(socket).expect("connect");
    assert_eq!(
        kept.request("GET", "/healthz", &[])
            .expect("healthz")
            .status,
        200
    );
    let idle: Vec<UnixStream> = (0..120)
        .map(|i| UnixStream::connect(socket).unwrap_or_else(|e| panic!("idle connection {i}: {e}")))
        .collect();
    let from = 0;
    server.wait_for_log_line(from, "about EMFILE", Duration::from_secs(10), |l| {
        l.contains("accept failed") && l.contains("EMFILE")
    });
    let mut times: Vec<Duration> = (0..200)
        .map(|_| {
            let t = Instant::now();
            let r = kept.request("GET", "/healthz", &[]).expect("healthz");
            assert_eq!(r.status, 200);
            t.elapsed()
        })
        .collect();
    times.sort();
    let median = times[times.len() / 2];
    eprintln!(
        "keep-alive /healthz at EMFILE: median {median:?}, p90 {:?}",
        times[times.len() * 9 / 10]
    );
    assert!(
        median < Duration::from_millis(1),
        "median {median:?} with the worker out of descriptors (was 100 ms)"
    );
    // Several retries (every 100 ms) fail meanwhile: still one episode.
    std::thread::sleep(Duration::from_millis(450));
    let failures_logged = server
        .log()
        .lines()
        .filter(|l| l.contains("accept failed"))
        .count();
    assert_eq!(failures_logged, 1, "one line per episode, not per failure");
    // Descriptors free again: the worker accepts by itself.
    drop(idle);
    let mut fresh = None;
    poll_until(Duration::from_secs(5), || {
        fresh = HttpConn::connect(socket)
            .and_then(|mut c| c.request("GET", "/healthz", &[]))
            .ok();
        fresh.is_some()
    });
    assert_eq!(
        fresh.map(|r| r.status),
        Some(200),
        "a new connection is served"
    );
    server.wait_for_log_line(0, "about accepting again", Duration::from_secs(5), |l| {
        l.contains("accepting again") && l.contains("EMFILE")
    });
}

/// A client queued on a listener: connected, request sent, answer not read.
enum Queued {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Queued {
    fn send(mut self) -> Queued {
        let req = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";
        let r = match &mut self {
            Queued::Unix(s) => s.write_all(req),
            Queued::Tcp(s) => s.write_all(req),
        };
        r.expect("send the request");
        self
    }

    /// The whole answer (the server closes after it: it is stopping), or the error.
    fn answer(self) -> Result<String, std::io::Error> {
        let mut out = Vec::new();
        match self {
            Queued::Unix(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(20)))?;
                s.read_to_end(&mut out)?;
            }
            Queued::Tcp(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(20)))?;
                s.read_to_end(&mut out)?;
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// 1 worker on a unix socket and a TCP port, `shutdown_delay` seconds.
fn server_with_tcp(name: &str, shutdown_delay: u64) -> (TestServer, SocketAddr) {
    let port = free_tcp_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let server = TestServer::start(
        name,
        TestOptions {
            workers: 1,
            extra_binds: vec![addr.to_string()],
            server_extra: format!("shutdown_delay = {shutdown_delay}"),
            ..TestOptions::default()
        },
    );
    (server, addr)
}

/// `n` unix and `n` TCP clients that connect and send while the worker is
/// stopped: everything they send waits in the listeners' queues.
fn queue_clients(server: &TestServer, addr: SocketAddr, n: usize) -> Vec<Queued> {
    let mut clients = Vec::new();
    for i in 0..n {
        let u = UnixStream::connect(server.socket_path())
            .unwrap_or_else(|e| panic!("unix client {i}: {e}"));
        clients.push(Queued::Unix(u).send());
        let t = TcpStream::connect(addr).unwrap_or_else(|e| panic!("tcp client {i}: {e}"));
        clients.push(Queued::Tcp(t).send());
    }
    clients
}

/// Every queued client got a 200 (with `Connection: close`): none was reset.
fn assert_all_answered(clients: Vec<Queued>) {
    let n = clients.len();
    let mut failed = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        match c.answer() {
            Ok(text) if text.starts_with("HTTP/1.1 200") => {
                assert!(
                    text.to_ascii_lowercase().contains("connection: close"),
                    "a stopping worker closes after the answer: {text}"
                );
            }
            Ok(text) => failed.push(format!("client {i}: {text:?}")),
            Err(e) => failed.push(format!("client {i}: {e}")),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {n} queued clients were not answered: {failed:#?}",
        failed.len()
    );
}

/// TERM used to reset what the kernel had queued (1 worker stopped, 50
/// clients queued: 8 answered, 42 `ECONNRESET`). Now the unix path goes at
/// once, and the worker serves every queued connection before it closes.
#[test]
fn term_serves_every_connection_queued_on_unix_and_tcp() {
    let (mut server, addr) = server_with_tcp("term_backlog", 0);
    let worker = server.worker_pids()[0];
    send_signal(worker, Signal::SIGSTOP);
    let clients = queue_clients(&server, addr, 50);
    let from = server.log_len();
    server.signal(Signal::SIGTERM);
    server.wait_for_log_line(from, "about closing", Duration::from_secs(10), |l| {
        l.contains("the workers serve what is queued")
    });
    assert!(
        !server.socket_path().exists(),
        "the socket path is gone at once: no new connection reaches it"
    );
    let refused = UnixStream::connect(server.socket_path());
    assert!(refused.is_err(), "a new unix client is refused");
    send_signal(worker, Signal::SIGCONT);
    assert_all_answered(clients);
    assert_eq!(server.expect_exit_code(Duration::from_secs(20)), 0);
}

/// With `shutdown_delay`, TERM first makes `/readyz` answer 503 while
/// everything keeps serving (the unix path stays too); then the stop proper
/// serves what is queued.
#[test]
fn shutdown_delay_answers_readyz_503_keeps_serving_then_serves_the_queue() {
    let (mut server, addr) = server_with_tcp("term_delay", 2);
    let t0 = Instant::now();
    server.signal(Signal::SIGTERM);
    server.wait_for("phase shutdown-delay", Duration::from_secs(5), |s| {
        s["phase"] == "shutdown-delay"
    });
    let ready = server.get("/readyz");
    assert_eq!(ready.status, 503, "{ready:?}");
    assert_eq!(ready.json()["error"], "shutting down");
    assert_eq!(server.get("/healthz").status, 200);
    let mut tcp = TcpStream::connect(addr).expect("TCP still accepts");
    tcp.write_all(b"GET /api/notes HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).expect("read");
    assert_eq!(&head, b"HTTP/1.1 200");
    // The stop proper: queue clients behind a stopped worker as it begins.
    let worker = server.worker_pids()[0];
    send_signal(worker, Signal::SIGSTOP);
    let clients = queue_clients(&server, addr, 50);
    server.wait_for_log_line(0, "about closing", Duration::from_secs(10), |l| {
        l.contains("the workers serve what is queued")
    });
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "not before the delay"
    );
    send_signal(worker, Signal::SIGCONT);
    assert_all_answered(clients);
    assert_eq!(server.expect_exit_code(Duration::from_secs(20)), 0);
}

/// `notesd drain`: `/readyz` 503 "draining" on every worker while the API
/// and `/healthz` serve; `--undo` reverts; the flag survives a reload.
#[test]
fn drain_takes_the_host_out_of_rotation_and_undo_puts_it_back() {
    let server = TestServer::start("drain", TestOptions::default());
    assert_eq!(server.get("/readyz").status, 200);
    let out = server.run(&["drain"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(out.stdout.contains("draining"), "{}", out.describe());
    for _ in 0..6 {
        let r = server.get("/readyz");
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(
            r.json(),
            serde_json::json!({"ok": false, "error": "draining"})
        );
        assert_eq!(server.get("/api/notes").status, 200);
        assert_eq!(server.get("/healthz").status, 200);
    }
    assert_eq!(server.status()["draining"], true);
    let out = server.run(&["status"]);
    assert!(out.stdout.contains("drained"), "{}", out.describe());
    let out = server.run(&["reload"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert_eq!(
        server.get("/readyz").status,
        503,
        "still drained after a reload"
    );
    let out = server.run(&["drain", "--undo"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert_eq!(server.get("/readyz").status, 200);
    assert_eq!(server.status()["draining"], false);
}
