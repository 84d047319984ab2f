//! Data path latency (root). Everything runs in a network namespace the benchmark creates (its
//! loopback only): an HTTP/1.1 echo backend and a load client sending 1 KiB requests at a fixed
//! rate, new connection per request or one persistent connection, over
//! (a) direct to the backend; (b) a service VIP on the sluice kernel path; (c) an iptables DNAT
//! rule (the kube-proxy way); (d) a sidecar pair, two real Envoys configured by sluice; (d′) the
//! same with mesh mTLS between them (STRICT), certificates from sluice's CA through an SDS-only
//! node agent, as Istio's published figures are.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_dataplane::loader::Dataplane;
use sluice_dataplane::policy::workload_value;
use sluice_dataplane::sync::MapSync;
use sluice_testkit::{Proc, envoy_bin, read_http_request, run_ok};
use sluice_translator::dataplane::{KernelService, KernelWorkload, NodeDataplane, WeightedBackend};

use crate::stats::{quantile, summary};
use sluice_dataplane::sandbox::Sandbox;

const BACKEND: &str = "127.0.5.1:9000";
const KERNEL_VIP: &str = "127.100.5.1:9000";
const DNAT_VIP: &str = "127.100.5.2:9000";
const SIDECAR_OUTBOUND: &str = "127.0.0.1:9000";
const MTLS_OUTBOUND: &str = "127.0.0.1:9001";
const PAYLOAD: usize = 1024;

/// Serves HTTP/1.1 echo on `addr` forever: the response body is the request body.
pub fn echo(addr: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::spawn(move || serve(conn));
    }
    Ok(())
}

fn serve(conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut writer = conn;
    while let Some((body, close)) = read_http_request(&mut reader) {
        let mut out = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
        out.extend_from_slice(&body);
        if writer.write_all(&out).is_err() || close {
            return;
        }
    }
}

/// Reads one response; returns the body length.
fn read_response(reader: &mut BufReader<TcpStream>) -> anyhow::Result<usize> {
    let mut status = String::new();
    reader.read_line(&mut status)?;
    anyhow::ensure!(status.starts_with("HTTP/1.1 200"), "bad status {status:?}");
    let mut length = 0;
    loop {
        let mut h = String::new();
        anyhow::ensure!(reader.read_line(&mut h)? > 0, "connection closed in headers");
        if h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(length)
}

/// The load client: `count` requests at `rate` per second; prints one line of latencies (µs,
/// space-separated) then the elapsed seconds.
pub fn client(target: &str, host: &str, persistent: bool, count: usize, rate: u32) -> anyhow::Result<()> {
    let body = vec![b'x'; PAYLOAD];
    let request = |close: bool| {
        let mut r = format!(
            "POST /echo HTTP/1.1\r\nhost: {host}\r\ncontent-length: {PAYLOAD}\r\n{}\r\n",
            if close { "connection: close\r\n" } else { "" }
        )
        .into_bytes();
        r.extend_from_slice(&body);
        r
    };
    let (keep, close) = (request(false), request(true));
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut latencies = Vec::with_capacity(count);
    let mut conn: Option<BufReader<TcpStream>> = None;
    let start = Instant::now();
    for i in 0..count {
        let due = start + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let t = Instant::now();
        if persistent {
            if conn.is_none() {
                let s = TcpStream::connect(target)?;
                s.set_nodelay(true)?;
                conn = Some(BufReader::new(s));
            }
            let c = conn.as_mut().expect("connected");
            c.get_mut().write_all(&keep)?;
            anyhow::ensure!(read_response(c)? == PAYLOAD, "short echo");
        } else {
            let s = TcpStream::connect(target)?;
            s.set_nodelay(true)?;
            let mut c = BufReader::new(s);
            c.get_mut().write_all(&close)?;
            anyhow::ensure!(read_response(&mut c)? == PAYLOAD, "short echo");
        }
        latencies.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!("{}", latencies.iter().map(|l| format!("{l:.1}")).collect::<Vec<_>>().join(" "));
    println!("{elapsed}");
    Ok(())
}

/// One path's result in one run.
struct Sample {
    p50: f64,
    p90: f64,
    p99: f64,
    throughput: f64,
}

fn bench_exe() -> PathBuf {
    std::env::current_exe().expect("own path")
}

/// The `sluice` binary next to this one (same target directory).
fn sluice_exe() -> PathBuf {
    bench_exe().with_file_name("sluice")
}

/// Runs the client in the namespace (and in `cgroup`, when given, before it starts).
fn measure(
    ns: &str,
    cgroup: Option<&Path>,
    target: &str,
    host: &str,
    persistent: bool,
    count: usize,
    rate: u32,
) -> anyhow::Result<Sample> {
    let exe = bench_exe();
    let mut args: Vec<String> =
        vec!["ip".into(), "netns".into(), "exec".into(), ns.into(), exe.display().to_string(), "client".into()];
    args.extend(
        ["--target", target, "--host", host, "--count", &count.to_string(), "--rate", &rate.to_string()]
            .map(String::from),
    );
    if persistent {
        args.push("--persistent".into());
    }
    let out = match cgroup {
        // The shell joins the cgroup, then becomes the client: its first connect is already in it.
        Some(cg) => Command::new("sh")
            .arg("-c")
            .arg(format!("echo $$ > {}/cgroup.procs && exec \"$@\"", cg.display()))
            .arg("sh")
            .args(&args)
            .output()?,
        None => Command::new(&args[0]).args(&args[1..]).output()?,
    };
    anyhow::ensure!(out.status.success(), "client to {target}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    let mut lines = text.lines();
    let mut lat: Vec<f64> = lines.next().unwrap_or_default().split(' ').filter_map(|v| v.parse().ok()).collect();
    let elapsed: f64 = lines.next().unwrap_or("0").parse()?;
    lat.sort_by(f64::total_cmp);
    anyhow::ensure!(lat.len() == count, "client made {} of {count} requests", lat.len());
    Ok(Sample {
        p50: quantile(&lat, 0.5),
        p90: quantile(&lat, 0.9),
        p99: quantile(&lat, 0.99),
        throughput: count as f64 / elapsed,
    })
}

/// The mesh the sidecar pair gets from sluice: the echo service behind a server sidecar
/// (inbound bound on the server's pod IP), and a client sidecar with an outbound listener on
/// 127.0.0.1:9000 (captureMode NONE both, as productpage's in the examples).
const SIDECAR_MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: bench}
spec:
  clusterIP: 127.100.5.3
  selector: {app: echo}
  ports: [{name: http, port: 9000}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-1, namespace: bench, labels: {kubernetes.io/service-name: echo}}
addressType: IPv4
ports: [{name: http, port: 9000}]
endpoints:
- {addresses: [127.0.5.10], targetRef: {kind: Pod, name: echo-1}}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-1, namespace: bench, labels: {app: echo}}
spec: {containers: [{name: c}]}
status: {podIP: 127.0.5.10}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench, labels: {app: client}}
spec: {containers: [{name: c}]}
status: {podIP: 127.0.5.20}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: echo, namespace: bench}
spec:
  workloadSelector: {labels: {app: echo}}
  ingress:
  - port: {number: 9000, protocol: HTTP, name: http}
    bind: 127.0.5.10
    captureMode: NONE
    defaultEndpoint: 127.0.5.1:9000
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: client, namespace: bench}
spec:
  workloadSelector: {labels: {app: client}}
  egress:
  - port: {number: 9000, protocol: HTTP, name: http}
    bind: 127.0.0.1
    captureMode: NONE
    hosts: ["./*"]
---
# (d′): echo-tls behind a STRICT sidecar that holds its certificate (tlsMode istio), and its
# client's sidecar on 127.0.0.1:9001.
apiVersion: v1
kind: Service
metadata: {name: echo-tls, namespace: bench}
spec:
  clusterIP: 127.100.5.4
  selector: {app: echo-tls}
  ports: [{name: http, port: 9001}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-tls-1, namespace: bench, labels: {kubernetes.io/service-name: echo-tls}}
addressType: IPv4
ports: [{name: http, port: 9001}]
endpoints:
- {addresses: [127.0.5.11], targetRef: {kind: Pod, name: echo-tls-1}}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-tls-1, namespace: bench, labels: {app: echo-tls, security.istio.io/tlsMode: istio}}
spec: {serviceAccountName: echo, containers: [{name: c}]}
status: {podIP: 127.0.5.11}
---
apiVersion: v1
kind: Pod
metadata: {name: client-tls, namespace: bench, labels: {app: client-tls, security.istio.io/tlsMode: istio}}
spec: {serviceAccountName: client, containers: [{name: c}]}
status: {podIP: 127.0.5.21}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: echo-tls, namespace: bench}
spec:
  selector: {matchLabels: {app: echo-tls}}
  mtls: {mode: STRICT}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: echo-tls, namespace: bench}
spec:
  workloadSelector: {labels: {app: echo-tls}}
  ingress:
  - port: {number: 9001, protocol: HTTP, name: http}
    bind: 127.0.5.11
    captureMode: NONE
    defaultEndpoint: 127.0.5.1:9000
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: client-tls, namespace: bench}
spec:
  workloadSelector: {labels: {app: client-tls}}
  egress:
  - port: {number: 9001, protocol: HTTP, name: http}
    bind: 127.0.0.1
    captureMode: NONE
    hosts: ["./*"]
"#;

/// Waits until `addr` accepts connections inside the namespace.
fn wait_listening(ns: &str, addr: &str) -> anyhow::Result<()> {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    for _ in 0..300 {
        let probe = format!("import socket; socket.create_connection(('{host}', {port}), timeout=1)");
        if Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", &probe])
            .stderr(Stdio::null())
            .status()?
            .success()
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("{addr} never listened in {ns}")
}

/// Network namespace deleted on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs the whole comparison `runs` times and prints the tables.
pub fn run(count: usize, rate: u32, runs: usize) -> anyhow::Result<()> {
    let ns = Netns(format!("sluice-bench-{}", std::process::id()));
    run_ok(&["ip", "netns", "add", &ns.0]);
    run_ok(&["ip", "-n", &ns.0, "link", "set", "lo", "up"]);
    let dir = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("config"))?;
    let in_ns = |name: &str, args: &[&str], log: &str| {
        Proc::spawn(name, Command::new("ip").args(["netns", "exec", &ns.0]).args(args), &dir.join(log))
    };
    let exe = bench_exe().display().to_string();
    let _backend = in_ns("echo backend", &[&exe, "echo", "--addr", BACKEND], "echo.log");
    wait_listening(&ns.0, BACKEND)?;

    // (b) the kernel path: programs on a cgroup of ours, the client in a registered workload.
    let sandbox = Sandbox::new("bench-datapath")?;
    let client_cgroup = sandbox.cgroup.join("client");
    sluice_dataplane::cgroup::create(&client_cgroup)?;
    let mut dp = Dataplane::attach(&sandbox.pin_dir, &sandbox.cgroup)?;
    let (vip, vport) = KERNEL_VIP.rsplit_once(':').expect("vip");
    let (bip, bport) = BACKEND.rsplit_once(':').expect("backend");
    let desired = NodeDataplane {
        services: vec![KernelService {
            name: "echo".into(),
            vip: vip.into(),
            port: vport.parse()?,
            protocol: sluice_translator::dataplane::KernelProtocol::Tcp as i32,
            backends: vec![WeightedBackend { address: bip.into(), port: bport.parse()?, weight: 1 }],
            needs_l7: false,
        }],
        workloads: Vec::new(),
    };
    MapSync::adopt(&dp.maps)?.apply(&mut dp.maps, &desired, Instant::now())?;
    let client = KernelWorkload {
        namespace: "bench".into(),
        name: "client".into(),
        mode: sluice_translator::dataplane::Mode::Kernel as i32,
        ..Default::default()
    };
    dp.maps.workloads.insert(sluice_dataplane::cgroup::cgroup_id(&client_cgroup)?, workload_value(&client), 0)?;

    // (c) iptables DNAT in the namespace.
    let (dip, dport) = DNAT_VIP.rsplit_once(':').expect("dnat");
    run_ok(&[
        "ip",
        "netns",
        "exec",
        &ns.0,
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        dip,
        "-p",
        "tcp",
        "--dport",
        dport,
        "-j",
        "DNAT",
        "--to-destination",
        BACKEND,
    ]);

    // (d) the sidecar pair, configured by sluice serving in the namespace, which also runs the
    // CA on its TLS port for (d′) (the ports are the namespace's own).
    std::fs::write(dir.join("config/mesh.yaml"), SIDECAR_MESH)?;
    let sluice = sluice_exe().display().to_string();
    let config = dir.join("config").display().to_string();
    let token = format!("node-1-{:016x}", std::process::id() as u64 * 0x9e37_79b9);
    std::fs::write(dir.join("tokens"), format!("node-1 {token}\n"))?;
    std::fs::write(dir.join("node-token"), &token)?;
    let path = |name: &str| dir.join(name).display().to_string();
    let _serve = in_ns(
        "sluice serve",
        &[
            &sluice,
            "serve",
            "--config",
            &config,
            "--xds-addr",
            "127.0.0.1:15010",
            "--monitoring-addr",
            "127.0.0.1:15014",
            "--xds-tls-addr",
            "127.0.0.1:15012",
            "--tls-dns-name",
            "localhost",
            "--state-dir",
            &path("state"),
            "--node-tokens",
            &path("tokens"),
        ],
        "serve.log",
    );
    wait_listening(&ns.0, "127.0.0.1:15010")?;
    wait_listening(&ns.0, "127.0.0.1:15012")?;
    // (d′)'s node agent: SDS only, its workload cgroups under ours. `nsenter --net` keeps the
    // host's mounts (`ip netns exec` remounts /sys, hiding the cgroup2 mount it needs).
    let netns = format!("--net=/run/netns/{}", ns.0);
    let agent_cgroup = sandbox.cgroup.join("sds-agent");
    let _agent = Proc::spawn(
        "sluice agent",
        Command::new("nsenter").arg(&netns).args([&sluice, "agent", "--sds-only", "--node", "node-1"]).args([
            "--cgroup",
            &agent_cgroup.display().to_string(),
            "--socket",
            &path("agent.sock"),
            "--metrics-addr",
            "127.0.0.1:15020",
            "--sds-socket",
            &path("sds.sock"),
            "--ca-addr",
            "127.0.0.1:15012",
            "--ca-name",
            "localhost",
            "--ca-root",
            &path("state/root-cert.pem"),
            "--node-token-file",
            &path("node-token"),
        ]),
        &dir.join("agent.log"),
    );
    let mut envoys = Vec::new();
    for (who, node, admin, sds) in [
        ("client", "sidecar~127.0.5.20~client.bench~bench.svc.cluster.local", "19000", false),
        ("server", "sidecar~127.0.5.10~echo-1.bench~bench.svc.cluster.local", "19001", false),
        ("client-tls", "sidecar~127.0.5.21~client-tls.bench~bench.svc.cluster.local", "19002", true),
        ("server-tls", "sidecar~127.0.5.11~echo-tls-1.bench~bench.svc.cluster.local", "19003", true),
    ] {
        let mut bootstrap = Command::new(&sluice);
        bootstrap.args(["bootstrap", "--proxy", node, "--admin-port", admin]);
        if sds {
            bootstrap.args(["--sds-socket", &path("sds.sock")]);
        }
        let out = bootstrap.output()?;
        anyhow::ensure!(out.status.success(), "bootstrap: {}", String::from_utf8_lossy(&out.stderr));
        let file = dir.join(format!("{who}.json"));
        std::fs::write(&file, out.stdout)?;
        let envoy = envoy_bin();
        let file = file.display().to_string();
        let envoy_args = [&envoy, "-c", &file, "--use-dynamic-base-id", "--log-level", "error", "--concurrency", "1"];
        if !sds {
            envoys.push(in_ns(who, &envoy_args, &format!("envoy-{who}.log")));
            continue;
        }
        // As its pod's workload: `sluice run` (once the agent knows the pod) puts it in the
        // workload's cgroup, whose identity SDS serves it.
        let pod = node.split('~').nth(2).expect("pod.ns");
        let run = |tail: &[&str]| {
            let mut c = Command::new(&sluice);
            c.args(["run", "--workload", pod, "--agent-socket", &path("agent.sock"), "--"]).args(tail);
            c
        };
        let known = (0..300).any(|_| {
            let ok = run(&["true"]).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
            if !ok {
                std::thread::sleep(Duration::from_millis(100));
            }
            ok
        });
        anyhow::ensure!(known, "the agent never knew {pod} (see {})", dir.join("agent.log").display());
        let mut command = run(&["nsenter", &netns]);
        command.args(envoy_args);
        envoys.push(Proc::spawn(who, &mut command, &dir.join(format!("envoy-{who}.log"))));
    }
    wait_listening(&ns.0, "127.0.5.10:9000")?;
    wait_listening(&ns.0, SIDECAR_OUTBOUND)?;
    wait_listening(&ns.0, "127.0.5.11:9001")?;
    wait_listening(&ns.0, MTLS_OUTBOUND)?;

    // Per-program run counts and run time (kernel.bpf_stats_enabled), to see what the kernel path
    // costs per call; restored afterwards.
    let stats_before = std::fs::read_to_string(BPF_STATS).unwrap_or_else(|_| "0".into());
    std::fs::write(BPF_STATS, "1")?;
    let paths: [(&str, &str, Option<&Path>, &str); 5] = [
        ("(a) direct", BACKEND, None, "echo"),
        ("(b) sluice kernel VIP", KERNEL_VIP, Some(client_cgroup.as_path()), "echo"),
        ("(c) iptables DNAT", DNAT_VIP, None, "echo"),
        ("(d) sidecar pair (2 Envoys)", SIDECAR_OUTBOUND, None, "echo:9000"),
        ("(d′) sidecar pair with mTLS", MTLS_OUTBOUND, None, "echo-tls:9001"),
    ];
    for persistent in [false, true] {
        // results[path][run]
        let mut results: Vec<Vec<Sample>> = (0..paths.len()).map(|_| Vec::new()).collect();
        for run in 0..runs {
            // Every path once per run, so each run compares like with like; the starting path
            // rotates so no path always runs first. Each measurement follows a short warm-up.
            for k in 0..paths.len() {
                let i = (run + k) % paths.len();
                let (_, target, cgroup, host) = paths[i];
                measure(&ns.0, cgroup, target, host, persistent, count / 10, rate)?;
                results[i].push(measure(&ns.0, cgroup, target, host, persistent, count, rate)?);
            }
        }
        let pattern = if persistent { "persistent connection" } else { "new connection per request" };
        println!(
            "\nData path, {pattern}: {count} requests of 1 KiB at {rate}/s, {runs} runs (min / median / max over runs)\n"
        );
        println!("| path | p50 µs | p90 µs | p99 µs | req/s | p50 ÷ (a) | added p50 µs |");
        println!("|---|---|---|---|---|---|---|");
        for (i, (name, ..)) in paths.iter().enumerate() {
            let col = |f: &dyn Fn(&Sample) -> f64| {
                let (lo, mid, hi) = summary(&results[i].iter().map(f).collect::<Vec<_>>());
                format!("{lo:.0} / {mid:.0} / {hi:.0}")
            };
            let ratio: Vec<f64> = results[i].iter().zip(&results[0]).map(|(s, a)| s.p50 / a.p50).collect();
            let added: Vec<f64> = results[i].iter().zip(&results[0]).map(|(s, a)| s.p50 - a.p50).collect();
            let (rlo, rmid, rhi) = summary(&ratio);
            let (alo, amid, ahi) = summary(&added);
            println!(
                "| {name} | {} | {} | {} | {} | {rlo:.3} / {rmid:.3} / {rhi:.3} | {alo:.0} / {amid:.0} / {ahi:.0} |",
                col(&|s| s.p50),
                col(&|s| s.p90),
                col(&|s| s.p99),
                col(&|s| s.throughput)
            );
        }
    }
    print_program_stats();
    std::fs::write(BPF_STATS, stats_before.trim())?;
    // (d′) was mTLS: the client sidecar's cluster to echo-tls made TLS connections upstream
    // (pooled: a few handshakes carry every request), and the server's listener accepted them.
    let stat = |admin: &str, filter: &str| -> anyhow::Result<u64> {
        let url = format!("http://127.0.0.1:{admin}/stats?filter={filter}");
        let out = Command::new("ip").args(["netns", "exec", &ns.0, "curl", "-s", &url]).output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        Ok(text.lines().filter_map(|l| l.rsplit_once(": ")?.1.trim().parse::<u64>().ok()).sum())
    };
    let upstream = stat("19002", "echo-tls.*ssl.handshake")?;
    let requests = stat("19002", "echo-tls.*upstream_rq_total")?;
    let accepted = stat("19003", "^listener.*ssl.handshake")?;
    println!(
        "\n(d′): the client sidecar sent {requests} requests to echo-tls over {upstream} TLS connections; \
         the server sidecar's listener completed {accepted} TLS handshakes"
    );
    anyhow::ensure!(upstream > 0 && accepted > 0 && requests > 0, "(d′) ran without mTLS");
    drop(envoys);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Average run time of sluice's programs over the benchmark (from their fdinfo).
fn print_program_stats() {
    use std::os::fd::{AsFd, AsRawFd};
    println!("\nsluice's programs during the runs (kernel.bpf_stats_enabled=1)\n");
    println!("| program | runs | mean ns per run |");
    println!("|---|---|---|");
    for info in aya::programs::loaded_programs().flatten() {
        let Some(name) = info.name_as_str().filter(|n| n.starts_with("sluice_")).map(str::to_string) else { continue };
        let Ok(fd) = info.fd() else { continue };
        let Ok(text) = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd())) else {
            continue;
        };
        let field = |key: &str| text.lines().find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok()).unwrap_or(0);
        let (runs, time) = (field("run_cnt:"), field("run_time_ns:"));
        if runs > 0 {
            println!("| {name} | {runs} | {:.0} |", time as f64 / runs as f64);
        }
    }
}
