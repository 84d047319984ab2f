//! Test support shared by sluice's crates: child processes killed on drop, free ports, a tiny
//! HTTP/1.1 backend and client, polling, and generated routes for property tests
//! ([`weights`]). Everything started here stops on drop.

pub mod weights;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A child process killed (by its pid) and reaped on drop.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// What it is, for messages.
    pub name: String,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr into `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &std::path::Path) -> Proc {
        let out = std::fs::File::create(log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { child, name: name.to_string() }
    }

    /// Waits for the process to exit and returns what it wrote to its (piped) stdout.
    pub fn wait_for_stdout(&mut self) -> String {
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            let _ = stdout.read_to_string(&mut out);
        }
        let _ = self.child.wait();
        out
    }

    /// SIGKILL now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Envoy from `$ENVOY_BIN`, else `envoy` on PATH.
pub fn envoy_bin() -> String {
    std::env::var("ENVOY_BIN").unwrap_or_else(|_| "envoy".into())
}

/// Python with grpcio (the proxyless gRPC tests' client and servers) from `$SLUICE_PYTHON`,
/// else the venv `./test` makes, else `python3` on PATH.
pub fn python_bin() -> String {
    if let Ok(p) = std::env::var("SLUICE_PYTHON") {
        return p;
    }
    let cached = std::env::var("HOME").map(|h| format!("{h}/.cache/sluice/venv/bin/python")).unwrap_or_default();
    if std::path::Path::new(&cached).exists() { cached } else { "python3".into() }
}

/// helm (v4) from `$SLUICE_HELM`, else where `.ci/run` unpacks it, else `helm` on PATH.
pub fn helm_bin() -> String {
    if let Ok(h) = std::env::var("SLUICE_HELM") {
        return h;
    }
    let cached = std::env::var("HOME").map(|h| format!("{h}/.cache/sluice/helm/helm/helm")).unwrap_or_default();
    if std::path::Path::new(&cached).exists() { cached } else { "helm".into() }
}

/// A port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// The port of the listener that holds a run's address block (see [`run_block`]).
const BLOCK_LOCK_PORT: u16 = 47_999;

/// This process's own `127.<n>.0.0/16`, for tests that must bind fixed-looking addresses (pod
/// IPs, service VIPs, a Sidecar's bind address): chosen at random once per process and held by
/// a listener on `127.<n>.255.254`, so two test runs on one machine (or another program that
/// does the same) never get the same block. Never 127.0.x.x.
pub fn run_block() -> u8 {
    static BLOCK: std::sync::OnceLock<(u8, TcpListener)> = std::sync::OnceLock::new();
    BLOCK
        .get_or_init(|| {
            use std::hash::{BuildHasher, Hasher};
            let mut seed = std::collections::hash_map::RandomState::new().build_hasher();
            seed.write_u32(std::process::id());
            let start = seed.finish();
            (0..240u64)
                .map(|i| 10 + ((start + i) % 240) as u8)
                // 100 stays out: relocate's targets must not look like its sources.
                .filter(|n| *n != 100)
                .find_map(|n| TcpListener::bind((format!("127.{n}.255.254"), BLOCK_LOCK_PORT)).ok().map(|l| (n, l)))
                .expect("a free 127.<n>.0.0/16 block")
        })
        .0
}

/// Moves the loopback addresses that examples and tests write into this run's block:
/// `127.0.x.*` → `127.<n>.x.*` and `127.100.x.*` → `127.<n>.(100+x).*` (x < 100), and
/// `127.0.0.1` → `127.<n>.0.1`. For config text, node ids and commands alike; [`unrelocate`]
/// maps what comes back (dumps, client output) to the written addresses again.
pub fn relocate(text: &str) -> String {
    let n = run_block();
    let mut out = text.replace("127.0.0.1", &format!("127.{n}.0.1"));
    out = out.replace("127.100.0.", &format!("127.{n}.100."));
    for x in 1..100 {
        out = out
            .replace(&format!("127.0.{x}."), &format!("127.{n}.{x}."))
            .replace(&format!("127.100.{x}."), &format!("127.{n}.{}.", 100 + x));
    }
    out
}

/// [`relocate`] undone.
pub fn unrelocate(text: &str) -> String {
    let n = run_block();
    let mut out = text.to_string();
    for x in 1..100 {
        out = out
            .replace(&format!("127.{n}.{}.", 100 + x), &format!("127.100.{x}."))
            .replace(&format!("127.{n}.{x}."), &format!("127.0.{x}."));
    }
    out.replace(&format!("127.{n}.100."), "127.100.0.").replace(&format!("127.{n}.0.1"), "127.0.0.1")
}

/// An HTTP/1.1 server answering every request with its name (and the request path).
pub struct Backend {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    /// Serves on `addr` until dropped.
    pub fn start(name: &str, addr: SocketAddr) -> Backend {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("backend {name} on {addr}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let (s, name) = (stop.clone(), name.to_string());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let name = name.clone();
                        std::thread::spawn(move || serve_conn(conn, &name));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Backend { stop, thread: Some(thread) }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One HTTP/1.1 request read from `reader`: its body and whether it asked to close the
/// connection; None at end of stream or on a malformed request.
pub fn read_http_request(reader: &mut impl BufRead) -> Option<(Vec<u8>, bool)> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let (mut length, mut close) = (0usize, false);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        if h == "\r\n" {
            break;
        }
        let h = h.to_ascii_lowercase();
        if let Some(v) = h.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        close |= h.strip_prefix("connection:").is_some_and(|v| v.trim() == "close");
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some((body, close))
}

fn serve_conn(conn: TcpStream, name: &str) {
    conn.set_nonblocking(false).ok();
    conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut writer = conn;
    while let Some((_, close)) = read_http_request(&mut reader) {
        let reply = name.as_bytes();
        let head = format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n", reply.len());
        if writer.write_all(head.as_bytes()).and_then(|_| writer.write_all(reply)).is_err() || close {
            return;
        }
    }
}

/// One HTTP/1.1 GET on a new connection: (status, body).
pub fn http_get(addr: &str, host: &str, path: &str, headers: &[(&str, &str)]) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", host, path, headers)
}

/// One HTTP/1.1 request (without a body) on a new connection: (status, body).
pub fn http_request(
    addr: &str,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response {raw:?}")))?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// Polls `f` until it returns Some or `timeout` passes.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    None
}

/// True when the test runs as root (uid 0), which tests touching namespaces, iptables or eBPF need.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// A Python client for `python3 -c`: connects `argv[3]` times to `argv[1]:argv[2]` (pausing
/// `argv[4]` ms between connects, default 0), sends one HTTP/1.1 request each time and prints
/// "<response body> <getpeername host:port>" or "error <errno>" per connect. With
/// `WAIT_STDIN=1` it first waits for a line on stdin (so a test can move it into a cgroup).
pub const CONNECT_LOOP_PY: &str = r#"
import os, socket, sys, time
if os.environ.get("WAIT_STDIN"):
    sys.stdin.readline()
pause = int(sys.argv[4]) / 1000.0 if len(sys.argv) > 4 else 0
for _ in range(int(sys.argv[3])):
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
        peer = "%s:%d" % s.getpeername()[:2]
        s.sendall(b"GET / HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        print(data.split(b"\r\n\r\n", 1)[-1].decode(), peer, flush=True)
    except OSError as e:
        print("error", e.errno, flush=True)
    if pause:
        time.sleep(pause)
"#;

/// The share of `lines` (from [`CONNECT_LOOP_PY`]) answered by `backend`.
pub fn share(lines: &[String], backend: &str) -> f64 {
    lines.iter().filter(|l| l.starts_with(backend)).count() as f64 / lines.len().max(1) as f64
}

/// Runs a command and panics with its stderr unless it succeeds.
pub fn run_ok(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Two network namespaces joined by a veth pair, with no route out; deleted on drop (root).
pub struct NetnsPair {
    /// First namespace.
    pub a: String,
    /// Second namespace.
    pub b: String,
}

impl NetnsPair {
    /// Creates `sluice-<tag>-<pid>-a` and `-b`, with `addr_a` and `addr_b` (/24) on the veth ends
    /// and loopback up in both.
    pub fn create(tag: &str, addr_a: &str, addr_b: &str) -> NetnsPair {
        let id = std::process::id();
        let pair = NetnsPair { a: format!("sluice-{tag}-{id}-a"), b: format!("sluice-{tag}-{id}-b") };
        run_ok(&["ip", "netns", "add", &pair.a]);
        run_ok(&["ip", "netns", "add", &pair.b]);
        // Interface names are limited to 15 bytes.
        let (veth_a, veth_b) = (format!("va{}{id}", &tag[..1]), format!("vb{}{id}", &tag[..1]));
        run_ok(&[
            "ip", "link", "add", &veth_a, "netns", &pair.a, "type", "veth", "peer", "name", &veth_b, "netns", &pair.b,
        ]);
        for (ns, dev, addr) in [(&pair.a, &veth_a, addr_a), (&pair.b, &veth_b, addr_b)] {
            run_ok(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            run_ok(&["ip", "-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            run_ok(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        pair
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
