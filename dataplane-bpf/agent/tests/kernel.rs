//! The kernel fast path on the real kernel (root): programs attached to a cgroup the test
//! creates, maps pinned under a test directory, everything removed at the end — also on failure.

mod common;

use std::path::Path;
use std::time::Instant;

use common::python_in;
use sluice_dataplane::sandbox::Sandbox;

use sluice_dataplane::agent::AgentConfig;
use sluice_dataplane::cgroup;
use sluice_dataplane::loader::{Dataplane, LinkTarget, PROGRAMS, pinned_target};
use sluice_dataplane::policy::workload_value;
use sluice_dataplane::sync::MapSync;
use sluice_dataplane_common::maps;
use sluice_testkit::{Backend, CONNECT_LOOP_PY, eventually, free_port, http_get, is_root, relocate, share, unrelocate};
use sluice_translator::dataplane::{KernelService, KernelWorkload, NodeDataplane, WeightedBackend, translate_node};
use sluice_translator::parse::parse_documents;
use sluice_translator::snapshot::Snapshot;

const VIP: &str = "127.100.9.1";

/// The tests bind the same backends: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The mesh, with its addresses in this run's block (`relocate`): parallel runs do not collide.
fn mesh(v1: u32, v2: u32) -> String {
    relocate(&format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  clusterIP: {VIP}
  ports: [{{name: tcp-echo, port: 8080, targetPort: 8081}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: echo, namespace: default, labels: {{kubernetes.io/service-name: echo}}}}
addressType: IPv4
ports: [{{name: tcp-echo, port: 8081}}]
endpoints:
- {{addresses: [127.0.9.1], targetRef: {{kind: Pod, name: echo-v1}}}}
- {{addresses: [127.0.9.2], targetRef: {{kind: Pod, name: echo-v2}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: echo-v1, namespace: default, labels: {{app: echo, version: v1}}}}
spec: {{containers: [{{name: c}}]}}
status: {{podIP: 127.0.9.1}}
---
apiVersion: v1
kind: Pod
metadata: {{name: echo-v2, namespace: default, labels: {{app: echo, version: v2}}}}
spec: {{containers: [{{name: c}}]}}
status: {{podIP: 127.0.9.2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo, namespace: default}}
spec:
  host: echo
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: default}}
spec:
  hosts: [echo]
  tcp:
  - route:
    - {{destination: {{host: echo, subset: v1}}, weight: {v1}}}
    - {{destination: {{host: echo, subset: v2}}, weight: {v2}}}
"#
    ))
}

fn dataplane(v1: u32, v2: u32) -> NodeDataplane {
    let (objects, diags) = parse_documents("test.yaml", &mesh(v1, v2));
    assert!(diags.iter().all(|d| d.severity != sluice_translator::diagnostic::Severity::Error), "{diags:#?}");
    let (snapshot, _) = Snapshot::build(objects);
    translate_node(&snapshot, "node-1").0
}

/// Connects `count` times to VIP:8080 from a process moved into `cgroup_dir` before its first
/// connect.
fn connect_from(cgroup_dir: &Path, count: usize) -> Vec<String> {
    python_in(cgroup_dir, CONNECT_LOOP_PY, &[&relocate(VIP), "8080", &count.to_string()])
        .lines()
        .iter()
        .map(|l| unrelocate(l))
        .collect()
}

/// Sends `argv[3]` datagrams from one unconnected socket to `argv[1]:argv[2]`; prints
/// "<reply> <reply's source host:port>" each.
const UDP_CLIENT: &str = r#"
import os, socket, sys
if os.environ.get("WAIT_STDIN"):
    sys.stdin.readline()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
for i in range(int(sys.argv[3])):
    s.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
    data, source = s.recvfrom(100)
    print(data.decode(), "%s:%d" % source, flush=True)
"#;

/// A UDP server answering each datagram with its own address; stops when dropped.
struct UdpEcho(std::sync::Arc<std::sync::atomic::AtomicBool>, Option<std::thread::JoinHandle<()>>);

fn udp_echo(addr: &str) -> UdpEcho {
    let addr = relocate(addr);
    let socket = std::net::UdpSocket::bind(&addr).unwrap();
    socket.set_read_timeout(Some(std::time::Duration::from_millis(50))).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s, name) = (stop.clone(), addr.split(':').next().unwrap().to_string());
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 100];
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((_, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(name.as_bytes(), from);
            }
        }
    });
    UdpEcho(stop, Some(thread))
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.1.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn connect_time_balancing_getpeername_and_modes() {
    assert!(is_root(), "this test loads eBPF programs and creates cgroups: run it as root (CI does)");
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sandbox = Sandbox::new("test").unwrap();
    let root = sandbox.cgroup.clone();
    let pin_dir = sandbox.pin_dir.clone();
    let (client, outside, sidecar) = (root.join("client"), root.join("outside"), root.join("sidecar"));
    for c in [&client, &outside, &sidecar] {
        cgroup::create(c).unwrap();
    }
    let _v1 = Backend::start("echo-v1", relocate("127.0.9.1:8081").parse().unwrap());
    let _v2 = Backend::start("echo-v2", relocate("127.0.9.2:8081").parse().unwrap());

    let mut dp = Dataplane::attach(&sandbox.pin_dir, &root).unwrap();
    assert!(!dp.adopted);
    let mut sync = MapSync::adopt(&dp.maps).unwrap();
    let desired = dataplane(80, 20);
    assert_eq!(desired.services.len(), 1);
    assert_eq!(desired.services[0].backends.iter().map(|b| b.weight).collect::<Vec<_>>(), vec![4, 1]);
    sync.apply(&mut dp.maps, &desired, Instant::now()).unwrap();
    let workload = |mode: &str| KernelWorkload {
        namespace: "default".into(),
        name: "client".into(),
        ip: None,
        service_account: "default".into(),
        mode: sluice_dataplane_api::Mode::from_name(mode).expect("a mode") as i32,
        ..Default::default()
    };
    dp.maps.workloads.insert(cgroup::cgroup_id(&client).unwrap(), workload_value(&workload("kernel")), 0).unwrap();
    dp.maps.workloads.insert(cgroup::cgroup_id(&sidecar).unwrap(), workload_value(&workload("sidecar")), 0).unwrap();

    // 1000 connects from a kernel-mode workload: 80/20 within ±5 points, getpeername shows the VIP.
    let lines = connect_from(&client, 1000);
    assert_eq!(lines.len(), 1000);
    assert!(
        lines.iter().all(|l| l.ends_with(&format!("{VIP}:8080"))),
        "getpeername must show the VIP: {:?}",
        &lines[..3]
    );
    let v1 = share(&lines, "echo-v1");
    eprintln!("kernel LB 80/20 over 1000 connects: v1 share {v1:.3}");
    assert!((0.75..=0.85).contains(&v1), "v1 share {v1}");
    let dump = unrelocate(&sluice_dataplane::dump::dump(&dp.maps).unwrap());
    assert!(
        dump.contains("127.100.9.1:8080/TCP")
            && dump.contains("127.0.9.1:8081 weight 4/5")
            && dump.contains("connects=1000"),
        "{dump}"
    );

    // Not redirected: a process in an unregistered cgroup, and a sidecar-mode workload.
    for (cg, who) in [(&outside, "unregistered"), (&sidecar, "sidecar-mode")] {
        let lines = connect_from(cg, 3);
        assert!(
            lines.iter().all(|l| l.starts_with("error 111")),
            "{who} process must reach the VIP itself (refused): {lines:?}"
        );
    }

    // A new split applies to the next connects.
    let started = Instant::now();
    sync.apply(&mut dp.maps, &dataplane(50, 50), Instant::now()).unwrap();
    eprintln!("map update for a weight change: {:?}", started.elapsed());
    let v1 = share(&connect_from(&client, 1000), "echo-v1");
    assert!((0.45..=0.55).contains(&v1), "v1 share after 50/50: {v1}");

    // Restart: a new agent adopts the pinned programs and maps; connects keep working.
    drop(dp);
    let mut dp = Dataplane::attach(&sandbox.pin_dir, &root).unwrap();
    assert!(dp.adopted);
    let mut sync = MapSync::adopt(&dp.maps).unwrap();
    let stats = sync.apply(&mut dp.maps, &dataplane(50, 50), Instant::now()).unwrap();
    assert_eq!(stats.services_written, 0, "adopting reconciles without rewriting");
    assert!(connect_from(&client, 20).iter().all(|l| l.starts_with("echo-v")));

    // UDP without connect(): sendto() the VIP reaches a backend, the reply shows the VIP as its
    // source, and one socket keeps its backend.
    let udp_backends: Vec<_> = ["127.0.9.1:5354", "127.0.9.2:5354"].iter().map(|a| udp_echo(a)).collect();
    let mut with_udp = dataplane(50, 50);
    with_udp.services.push(KernelService {
        name: "dns.default.svc.cluster.local:5353".into(),
        vip: relocate("127.100.9.2"),
        port: 5353,
        protocol: sluice_dataplane_api::Protocol::Udp as i32,
        backends: ["127.0.9.1", "127.0.9.2"]
            .iter()
            .map(|a| WeightedBackend { address: relocate(a), port: 5354, weight: 1 })
            .collect(),
        needs_l7: false,
    });
    sync.apply(&mut dp.maps, &with_udp, Instant::now()).unwrap();
    let replies: Vec<String> = python_in(&client, UDP_CLIENT, &[&relocate("127.100.9.2"), "5353", "10"])
        .lines()
        .iter()
        .map(|l| unrelocate(l))
        .collect();
    assert_eq!(replies.len(), 10, "{replies:?}");
    assert!(replies.iter().all(|l| l.ends_with("127.100.9.2:5353")), "replies must come from the VIP: {replies:?}");
    let first = replies[0].split(' ').next().unwrap().to_string();
    assert!(
        first.starts_with("127.0.9.") && replies.iter().all(|l| l.starts_with(&first)),
        "one socket, one backend: {replies:?}"
    );
    drop(udp_backends);

    // A service without backends fails connect at once with EPERM.
    let mut empty = dataplane(50, 50);
    assert_eq!(empty.services.len(), 1);
    empty.services[0].backends.clear();
    sync.apply(&mut dp.maps, &empty, Instant::now()).unwrap();
    assert!(connect_from(&client, 2).iter().all(|l| l == "error 1"), "EPERM");
    std::thread::sleep(sluice_dataplane::sync::GRACE);
    assert!(sync.collect(&mut dp.maps, Instant::now()).unwrap() > 0, "unreferenced slots and backends are collected");
    assert_eq!(dp.maps.backends.keys().count(), 0);

    drop(dp);
    drop(sandbox);
    assert!(!pin_dir.exists(), "pins removed");
    assert!(!root.exists(), "cgroups removed");
}

fn kernel_workload() -> KernelWorkload {
    KernelWorkload {
        namespace: "default".into(),
        name: "client".into(),
        ip: None,
        service_account: "default".into(),
        mode: sluice_dataplane_api::Mode::Kernel as i32,
        ..Default::default()
    }
}

/// What `sluice agent` does at start, against pins an earlier agent left: a link on a removed
/// cgroup (the agent was moved) or of another build is replaced, never adopted, and connects go
/// on while it is; only this build's links on this cgroup are adopted; pinned maps of another
/// layout are refused with the pin dir and the map named.
#[test]
fn an_agent_adopts_only_links_of_this_build_on_its_own_cgroup() {
    assert!(is_root(), "this test loads eBPF programs and creates cgroups: run it as root (CI does)");
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sandbox = Sandbox::new("adopt").unwrap();
    let pin = sandbox.pin_dir.clone();
    let (a, b) = (sandbox.cgroup.join("a"), sandbox.cgroup.join("b"));
    let client = b.join("client");
    for c in [&a, &b, &client] {
        cgroup::create(c).unwrap();
    }
    let _v1 = Backend::start("echo-v1", relocate("127.0.9.1:8081").parse().unwrap());
    let _v2 = Backend::start("echo-v2", relocate("127.0.9.2:8081").parse().unwrap());

    // An agent attached to cgroup A, with the maps programmed, is killed (pins stay); A goes.
    let mut dp = Dataplane::attach(&pin, &a).unwrap();
    let mut sync = MapSync::adopt(&dp.maps).unwrap();
    sync.apply(&mut dp.maps, &dataplane(50, 50), Instant::now()).unwrap();
    drop(dp);
    let a_id = cgroup::cgroup_id(&a).unwrap();
    cgroup::remove(&a).unwrap();
    // The links hold the removed cgroup (a zombie the kernel keeps for them): still "attached".
    assert_eq!(pinned_target(&pin, "sluice_connect4").map(|t| t.cgroup_id), Some(a_id));
    assert!(sluice_dataplane::dump::links(&pin).contains("no such cgroup"), "{}", sluice_dataplane::dump::links(&pin));

    // The next agent is told to attach to B: every link is replaced, none adopted.
    let mut dp = Dataplane::attach(&pin, &b).unwrap();
    assert!(!dp.adopted, "links on a removed cgroup must not be adopted");
    let b_id = cgroup::cgroup_id(&b).unwrap();
    for (name, hook) in PROGRAMS {
        assert_eq!(pinned_target(&pin, name), Some(LinkTarget { cgroup_id: b_id, attach_type: hook as u32 }), "{name}");
    }
    assert!(sluice_dataplane::dump::links(&pin).contains(&format!("sluice_ingress: cgroup {b_id} {}", b.display())));
    // The maps were kept: a workload in B is balanced at once.
    dp.maps.workloads.insert(cgroup::cgroup_id(&client).unwrap(), workload_value(&kernel_workload()), 0).unwrap();
    let lines = connect_from(&client, 20);
    assert!(lines.iter().all(|l| l.starts_with("echo-v")), "{lines:?}");

    // Same build, same cgroup: adopted as it is.
    drop(dp);
    assert!(Dataplane::attach(&pin, &b).unwrap().adopted);

    // Another build's programs: replaced while a client keeps connecting; no connect fails.
    std::fs::remove_file(pin.join("build")).unwrap();
    std::os::unix::fs::symlink("sluice-ebpf-0000000000000000", pin.join("build")).unwrap();
    let running = python_in(&client, CONNECT_LOOP_PY, &[&relocate(VIP), "8080", "300", "2"]);
    std::thread::sleep(std::time::Duration::from_millis(150));
    let dp = Dataplane::attach(&pin, &b).unwrap();
    assert!(!dp.adopted, "another build's links are replaced");
    let lines = running.lines();
    assert_eq!(lines.len(), 300);
    let failed: Vec<_> = lines.iter().filter(|l| !l.starts_with("echo-v")).collect();
    assert!(failed.is_empty(), "connects failed while the links were replaced: {failed:?}");
    drop(dp);

    // A pinned map of another layout (a stand-in pinned under the node-proxy map's name).
    let slots = aya::maps::MapData::from_pin(pin.join(maps::SLOTS)).unwrap();
    std::fs::remove_file(pin.join(maps::NODE_PROXY)).unwrap();
    slots.pin(pin.join(maps::NODE_PROXY)).unwrap();
    let err = Dataplane::attach(&pin, &b).err().expect("another layout is refused").to_string();
    assert!(err.contains(maps::NODE_PROXY) && err.contains(&pin.display().to_string()), "{err}");

    drop(sandbox);
    assert!(!pin.exists(), "pins removed");
}

/// A start that fails (its metrics port is taken) pins nothing; the next start attaches, and
/// `/ready` names the cgroup the programs run on.
#[test]
fn a_failed_start_leaves_nothing_to_adopt_and_ready_names_the_cgroup() {
    assert!(is_root(), "this test loads eBPF programs and creates cgroups: run it as root (CI does)");
    let sandbox = Sandbox::new("start").unwrap();
    let socket = std::env::temp_dir().join(format!("sluice-start-{}.sock", std::process::id()));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = AgentConfig {
        xds_addr: format!("http://127.0.0.1:{}", free_port()),
        node: "node-1".into(),
        cgroup: sandbox.cgroup.clone(),
        pin_dir: sandbox.pin_dir.clone(),
        metrics_addr: taken.local_addr().unwrap(),
        socket: socket.clone(),
        node_proxy: None,
        sds: None,
        programs: sluice_dataplane::agent::Programs::Load,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let err = runtime.block_on(sluice_dataplane::agent::run(config.clone())).unwrap_err().to_string();
    assert!(err.contains("binding"), "{err}");
    assert!(!sandbox.pin_dir.exists(), "a failed start pins nothing");
    // SDS whose token file is missing: refused before anything is pinned, no socket left.
    let sds_socket = std::env::temp_dir().join(format!("sluice-start-sds-{}.sock", std::process::id()));
    let with_sds = AgentConfig {
        metrics_addr: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        sds: Some(sluice_dataplane::agent::SdsConfig {
            socket: sds_socket.clone(),
            ca_addr: "https://127.0.0.1:1".into(),
            ca_root: std::env::temp_dir().join("sluice-no-such-root.pem"),
            ca_name: "localhost".into(),
            token_file: std::env::temp_dir().join("sluice-no-such-token"),
            trust_domain: "cluster.local".into(),
            ttl: None,
        }),
        ..config.clone()
    };
    let err = runtime.block_on(sluice_dataplane::agent::run(with_sds)).unwrap_err().to_string();
    assert!(err.contains("sluice-no-such-token"), "{err}");
    assert!(!sandbox.pin_dir.exists(), "a failed SDS start pins nothing");
    assert!(!socket.exists() && !sds_socket.exists(), "and leaves no socket");

    config.metrics_addr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics = config.metrics_addr.to_string();
    let agent = runtime.spawn(sluice_dataplane::agent::run(config));
    let ready = eventually(std::time::Duration::from_secs(20), || {
        http_get(&metrics, "x", "/ready", &[]).ok().filter(|(code, _)| *code == 200)
    });
    agent.abort();
    drop(runtime);
    let _ = std::fs::remove_file(&socket);
    let (_, body) = ready.expect("the agent became ready");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["programs"], "attached", "{ready}");
    assert_eq!(ready["cgroup"], sandbox.cgroup.display().to_string(), "{ready}");
    assert_eq!(ready["cgroup_id"], cgroup::cgroup_id(&sandbox.cgroup).unwrap(), "{ready}");
    assert_eq!(ready["adopted"], false, "{ready}");
}
