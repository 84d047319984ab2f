//! The kernel fast path on the real kernel (root): programs attached to a cgroup the test
//! creates, maps pinned under a test directory, everything removed at the end — also on failure.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use sluice_dataplane::cgroup;
use sluice_dataplane::loader::{Dataplane, ensure_bpffs};
use sluice_dataplane::sync::{MapSync, workload_value};
use sluice_testkit::{Backend, CONNECT_LOOP_PY, is_root, share};
use sluice_translator::dataplane::{KernelWorkload, NodeDataplane, translate_node};
use sluice_translator::parse::parse_documents;
use sluice_translator::snapshot::Snapshot;

const VIP: &str = "127.100.9.1";

fn mesh(v1: u32, v2: u32) -> String {
    format!(
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
    )
}

fn dataplane(v1: u32, v2: u32) -> NodeDataplane {
    let (objects, diags) = parse_documents("test.yaml", &mesh(v1, v2));
    assert!(diags.iter().all(|d| d.severity != sluice_translator::diagnostic::Severity::Error), "{diags:#?}");
    let (snapshot, _) = Snapshot::build(objects);
    translate_node(&snapshot, "node-1").0
}

/// Removes the test's pins and cgroups on drop, however the test ends.
struct Sandbox {
    pin_dir: PathBuf,
    cgroup: PathBuf,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = Dataplane::remove(&self.pin_dir);
        let _ = cgroup::remove(&self.cgroup);
    }
}

/// Connects `count` times to VIP:8080 from a process moved into `cgroup_dir` before its first
/// connect.
fn connect_from(cgroup_dir: &Path, count: usize) -> Vec<String> {
    let mut child = Command::new("python3")
        .args(["-c", CONNECT_LOOP_PY, VIP, "8080", &count.to_string()])
        .env("WAIT_STDIN", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let guard = KillOnDrop(child.id());
    cgroup::add_process(cgroup_dir, child.id()).expect("move into cgroup");
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let lines: Vec<String> = BufReader::new(child.stdout.take().unwrap()).lines().map(|l| l.unwrap()).collect();
    child.wait().unwrap();
    drop(guard);
    lines
}

struct KillOnDrop(u32);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-9").arg(self.0.to_string()).stderr(Stdio::null()).status();
    }
}

#[test]
fn connect_time_balancing_getpeername_and_modes() {
    assert!(is_root(), "this test loads eBPF programs and creates cgroups: run it as root (CI does)");
    ensure_bpffs().unwrap();
    let id = std::process::id();
    let root = cgroup::cgroup2_mount().unwrap().join(format!("sluice-test-{id}"));
    let sandbox = Sandbox { pin_dir: PathBuf::from(format!("/sys/fs/bpf/sluice-test-{id}")), cgroup: root.clone() };
    let (client, outside, sidecar) = (root.join("client"), root.join("outside"), root.join("sidecar"));
    for c in [&client, &outside, &sidecar] {
        cgroup::create(c).unwrap();
    }
    let _v1 = Backend::start("echo-v1", "127.0.9.1:8081".parse().unwrap());
    let _v2 = Backend::start("echo-v2", "127.0.9.2:8081".parse().unwrap());

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
        mode: mode.into(),
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
    let dump = sluice_dataplane::dump::dump(&dp.maps).unwrap();
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

    // A service without backends fails connect at once with EPERM.
    let mut empty = dataplane(50, 50);
    empty.services[0].backends.clear();
    sync.apply(&mut dp.maps, &empty, Instant::now()).unwrap();
    assert!(connect_from(&client, 2).iter().all(|l| l == "error 1"), "EPERM");
    std::thread::sleep(sluice_dataplane::sync::GRACE);
    assert!(sync.collect(&mut dp.maps, Instant::now()).unwrap() > 0, "unreferenced slots and backends are collected");
    assert_eq!(dp.maps.backends.keys().count(), 0);

    drop(dp);
    drop(sandbox);
    assert!(!PathBuf::from(format!("/sys/fs/bpf/sluice-test-{id}")).exists(), "pins removed");
    assert!(!root.exists(), "cgroups removed");
}
