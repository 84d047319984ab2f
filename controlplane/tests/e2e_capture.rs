//! A sidecar that receives traffic the iptables way: istio-init's REDIRECT rules in a network
//! namespace the test creates (a "pod" joined by a veth to a "client" namespace; TEST-NET-1
//! addresses exist only inside them). Envoy runs as uid 1337, which the rules exclude.
//!
//! - outbound: the app in the pod dials the api Service VIP → nat OUTPUT → 15001 (virtualOutbound)
//!   → Envoy routes (fault on /abort) to the api pod in the client namespace;
//! - inbound: the client dials the pod IP → nat PREROUTING → 15006 (virtualInbound) → RBAC (DENY
//!   on /deny) → the app, connected from 127.0.0.6.
//!
//! Needs root, `ip`, `iptables`, `setpriv`, `curl`, `python3`. Namespaces and processes are
//! removed on drop, also when the test fails.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sluice_testkit::{NetnsPair, Proc, envoy_bin, eventually, is_root, run_ok};

const POD: &str = "192.0.2.2";
const CLIENT: &str = "192.0.2.1";

fn in_ns(ns: &str, args: &[&str]) {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    run_ok(&full);
}

/// istio-init's nat rules (REDIRECT mode), inbound capture of every port, outbound of all TCP.
const ISTIO_INIT: &[&str] = &[
    "-N ISTIO_INBOUND",
    "-N ISTIO_IN_REDIRECT",
    "-N ISTIO_OUTPUT",
    "-N ISTIO_REDIRECT",
    "-A PREROUTING -p tcp -j ISTIO_INBOUND",
    "-A OUTPUT -p tcp -j ISTIO_OUTPUT",
    "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
    "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
    "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
    "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
    "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
    "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
];

const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 192.0.2.200
  selector: {app: web}
  ports: [{name: http, port: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [192.0.2.2], targetRef: {kind: Pod, name: web-1}}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, labels: {app: web}}
spec: {containers: [{name: web}]}
status: {podIP: 192.0.2.2}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: default}
spec:
  clusterIP: 192.0.2.100
  selector: {app: api}
  ports: [{name: http, port: 8081}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-1, namespace: default, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{name: http, port: 8081}]
endpoints: [{addresses: [192.0.2.1], targetRef: {kind: Pod, name: api-1}}]
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: default, labels: {app: api}}
spec: {containers: [{name: api}]}
status: {podIP: 192.0.2.1}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: default}
spec:
  hosts: [api]
  http:
  - match: [{uri: {prefix: /abort}}]
    fault: {abort: {httpStatus: 418}}
    route: [{destination: {host: api}}]
  - route: [{destination: {host: api}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-deny, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{to: [{operation: {paths: [/deny]}}]}]
"#;

/// An HTTP server answering with its name, run with python3 inside a namespace.
const PY_BACKEND: &str = r#"
import sys, http.server, socketserver
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = sys.argv[1].encode()
        self.send_response(200); self.send_header("content-length", str(len(b))); self.end_headers(); self.wfile.write(b)
    def log_message(self, *a): pass
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer((sys.argv[2], int(sys.argv[3])), H).serve_forever()
"#;

fn curl(ns: &str, url: &str) -> Option<(u16, String)> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-s", "--max-time", "3", "-w", "\n%{http_code}", url])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.parse().ok()?, body.to_string()))
}

fn spawn_in(ns: &str, name: &str, args: &[&str], log: &Path) -> Proc {
    Proc::spawn(name, Command::new("ip").args(["netns", "exec", ns]).args(args), log)
}

#[test]
fn iptables_capture_inbound_and_outbound() {
    assert!(is_root(), "this test creates network namespaces and iptables rules: run it as root (CI does)");
    let netns = NetnsPair::create("capture", POD, CLIENT);
    let (pod, client) = (netns.a.clone(), netns.b.clone());
    for rule in ISTIO_INIT {
        let mut args = vec!["iptables", "-t", "nat"];
        args.extend(rule.split(' '));
        in_ns(&pod, &args);
    }

    // Files Envoy reads as uid 1337.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    run_ok(&["chmod", "755", root.to_str().unwrap()]);
    std::fs::create_dir(root.join("cfg")).unwrap();
    std::fs::write(root.join("cfg/mesh.yaml"), MESH).unwrap();
    let envoy = root.join("envoy");
    std::fs::copy(envoy_bin_path(), &envoy).expect("copy envoy");
    run_ok(&["chmod", "755", envoy.to_str().unwrap()]);

    let sluice = env!("CARGO_BIN_EXE_sluice");
    let node = format!("sidecar~{POD}~web-1.default~default.svc.cluster.local");
    let _sluice = spawn_in(
        &pod,
        "sluice",
        &[
            sluice,
            "serve",
            "--config",
            root.join("cfg").to_str().unwrap(),
            "--xds-addr",
            &format!("127.0.0.1:{NETNS_XDS_PORT}"),
            "--monitoring-addr",
            &format!("127.0.0.1:{NETNS_MONITORING_PORT}"),
        ],
        &root.join("sluice.log"),
    );
    let out = Command::new(sluice)
        .args(["bootstrap", "--proxy", &node, "--xds-addr", &format!("127.0.0.1:{NETNS_XDS_PORT}")])
        .args(["--admin-port", "15000"])
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(root.join("bootstrap.json"), &out.stdout).unwrap();
    run_ok(&["chmod", "644", root.join("bootstrap.json").to_str().unwrap()]);
    let _web = spawn_in(&pod, "web", &["python3", "-c", PY_BACKEND, "web-1", POD, "8080"], &root.join("web.log"));
    let _api = spawn_in(&client, "api", &["python3", "-c", PY_BACKEND, "api-1", CLIENT, "8081"], &root.join("api.log"));
    let _envoy = spawn_in(
        &pod,
        "envoy",
        &[
            "setpriv",
            "--reuid=1337",
            "--regid=1337",
            "--clear-groups",
            envoy.to_str().unwrap(),
            "-c",
            root.join("bootstrap.json").to_str().unwrap(),
            "--use-dynamic-base-id",
            "--log-level",
            "warn",
        ],
        &root.join("envoy.log"),
    );
    let logs = || {
        ["sluice.log", "envoy.log"]
            .iter()
            .map(|f| format!("--- {f}\n{}", std::fs::read_to_string(root.join(f)).unwrap_or_default()))
            .collect::<String>()
    };

    // Outbound: the app's connection to the VIP is captured and routed by Envoy.
    let vip = "http://192.0.2.100:8081";
    let ok = eventually(Duration::from_secs(30), || curl(&pod, &format!("{vip}/")).filter(|(s, _)| *s == 200));
    assert_eq!(ok, Some((200, "api-1".to_string())), "outbound capture failed\n{}", logs());
    assert_eq!(
        curl(&pod, &format!("{vip}/abort")).map(|r| r.0),
        Some(418),
        "the VirtualService fault proves Envoy routed it"
    );

    // Inbound: a connection from outside the pod is captured into virtualInbound.
    let web = format!("http://{POD}:8080");
    let ok = eventually(Duration::from_secs(10), || curl(&client, &format!("{web}/")).filter(|(s, _)| *s == 200));
    assert_eq!(ok, Some((200, "web-1".to_string())), "inbound capture failed\n{}", logs());
    assert_eq!(
        curl(&client, &format!("{web}/deny")).map(|r| r.0),
        Some(403),
        "the DENY policy proves Envoy received it"
    );
}

/// The real Envoy binary (not a wrapper script), so it can be copied where uid 1337 can run it.
/// istiod's ports, on the loopback of the pod's own network namespace (no other program there).
const NETNS_XDS_PORT: u16 = 15010;
const NETNS_MONITORING_PORT: u16 = 15014;

fn envoy_bin_path() -> std::path::PathBuf {
    let bin = envoy_bin();
    let path = if bin.contains('/') {
        std::path::PathBuf::from(bin)
    } else {
        let out = Command::new("python3")
            .args(["-c", "import envoy._bin, os; print(os.path.join(os.path.dirname(envoy._bin.__file__), 'envoy'))"])
            .output()
            .expect("python3");
        std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    };
    assert!(path.is_file(), "Envoy binary not found at {} (set ENVOY_BIN)", path.display());
    path
}
