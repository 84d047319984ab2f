//! Workload identity end to end on the real kernel (root): `sluice serve` with its CA on the TLS
//! port and a node token, `sluice agent` serving SDS, and real Envoys started with `sluice run`.
//!
//! - Two Bookinfo Envoys (static bootstraps) ask the same SDS socket for `default` and each gets
//!   its own workload's certificate — the agent knows the caller from its cgroup, not from
//!   anything it sends; a third in a Pod's cgroup (named by its UID, as the kubelet names them)
//!   gets the Pod's.
//! - `examples/mtls` with three ADS-fed sidecars (web, api, and batch in another namespace):
//!   mesh mTLS on the wire, the caller's identity in `x-forwarded-client-cert`, STRICT /
//!   PERMISSIVE / DISABLE and a port-level override, AuthorizationPolicy by principal and by
//!   namespace, rotation under load, an agent killed and restarted, serve restarted.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_dataplane::sandbox::Sandbox;
use sluice_identity::SpiffeId;
use sluice_identity::service::certificate_identity;
use sluice_testkit::{Proc, eventually, free_port, http_get, is_root, relocate};

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

/// `sluice serve` (CA on its TLS port, one node token) and `sluice agent` for node-1 serving SDS,
/// in a sandbox cgroup of their own; both can be killed and started again on the same state.
struct Node {
    serve: Option<Proc>,
    agent: Option<Proc>,
    config: PathBuf,
    xds: u16,
    tls: u16,
    monitoring: u16,
    agent_metrics: u16,
    cert_ttl_s: Option<u64>,
    /// The agent loads no eBPF programs (`--sds-only`).
    sds_only: bool,
    sandbox: Sandbox,
    dir: tempfile::TempDir,
}

impl Node {
    /// Serves `config`; the agent asks for certificates of `cert_ttl_s` (the CA's default if None)
    /// and, if `sds_only`, loads no programs.
    fn start(tag: &str, config: &Path, cert_ttl_s: Option<u64>, sds_only: bool) -> Node {
        assert!(is_root(), "this test loads eBPF programs and creates cgroups: run it as root (CI does)");
        let sandbox = Sandbox::new(tag).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let token = "node-1-e2e-0123456789abcdef";
        std::fs::write(dir.path().join("tokens"), format!("node-1 {token}\n")).unwrap();
        std::fs::write(dir.path().join("node-token"), token).unwrap();
        let mut node = Node {
            serve: None,
            agent: None,
            config: config.to_path_buf(),
            xds: free_port(),
            tls: free_port(),
            monitoring: free_port(),
            agent_metrics: free_port(),
            cert_ttl_s,
            sds_only,
            sandbox,
            dir,
        };
        node.start_serve();
        node.start_agent();
        node
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// The logs of serve, the agent and the named others, for failure messages.
    fn logs(&self, others: &[&str]) -> String {
        let mut out = String::new();
        for name in ["serve.log", "agent.log"].iter().chain(others) {
            out += &format!("\n--- {name}\n{}", self.log(name));
        }
        out
    }

    /// The mesh root as serve publishes it (a file, with no cluster).
    fn root(&self) -> PathBuf {
        self.path("state/root-cert.pem")
    }

    fn start_serve(&mut self) {
        let serve = Proc::spawn(
            "sluice serve",
            Command::new(SLUICE)
                .args(["serve", "--debounce-ms", "0", "--config"])
                .arg(&self.config)
                .args(["--xds-addr", &format!("127.0.0.1:{}", self.xds)])
                .args(["--xds-tls-addr", &format!("127.0.0.1:{}", self.tls), "--tls-dns-name", "localhost"])
                .args(["--monitoring-addr", &format!("127.0.0.1:{}", self.monitoring)])
                .arg("--state-dir")
                .arg(self.path("state"))
                .arg("--node-tokens")
                .arg(self.path("tokens"))
                .env("RUST_LOG", "info"),
            &self.path("serve.log"),
        );
        self.serve = Some(serve);
        let monitoring = format!("127.0.0.1:{}", self.monitoring);
        let ready = eventually(Duration::from_secs(30), || {
            http_get(&monitoring, "x", "/ready", &[]).ok().filter(|(s, _)| *s == 200)
        });
        assert!(ready.is_some() && self.root().exists(), "serve is not ready:{}", self.logs(&[]));
    }

    fn start_agent(&mut self) {
        let mut cmd = Command::new(SLUICE);
        cmd.args(["agent", "--node", "node-1", "--xds-addr", &format!("127.0.0.1:{}", self.xds)])
            .arg("--cgroup")
            .arg(&self.sandbox.cgroup)
            .arg("--pin-dir")
            .arg(&self.sandbox.pin_dir)
            .arg("--socket")
            .arg(self.path("agent.sock"))
            .args(["--metrics-addr", &format!("127.0.0.1:{}", self.agent_metrics)])
            .arg("--sds-socket")
            .arg(self.path("sds.sock"))
            .args(["--ca-addr", &format!("127.0.0.1:{}", self.tls), "--ca-name", "localhost"])
            .arg("--ca-root")
            .arg(self.root())
            .arg("--node-token-file")
            .arg(self.path("node-token"))
            .env("RUST_LOG", "info");
        if let Some(ttl) = self.cert_ttl_s {
            cmd.args(["--workload-cert-ttl-s", &ttl.to_string()]);
        }
        if self.sds_only {
            cmd.arg("--sds-only");
        }
        // Appends: a restarted agent's log follows the first one's.
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.path("agent.log")).unwrap();
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("sluice agent");
        self.agent = Some(Proc { child, name: "sluice agent".into() });
        let sds = self.path("sds.sock");
        let up = eventually(Duration::from_secs(30), || std::os::unix::net::UnixStream::connect(&sds).ok().map(|_| ()));
        assert!(up.is_some(), "no SDS socket:{}", self.logs(&[]));
    }

    /// Starts `command` as `workload` (`<pod>.<ns>`) with `sluice run`, once the agent knows the
    /// workload from the config; output into `<workload>.log`.
    fn run(&self, workload: &str, command: &[&str]) -> Proc {
        let socket = self.path("agent.sock");
        let registered = eventually(Duration::from_secs(30), || {
            let probe = Command::new(SLUICE)
                .args(["run", "--workload", workload, "--agent-socket"])
                .arg(&socket)
                .args(["--", "true"])
                .stderr(std::process::Stdio::null())
                .status()
                .ok()?;
            probe.success().then_some(())
        });
        assert!(registered.is_some(), "the agent never knew {workload}:{}", self.logs(&[]));
        Proc::spawn(
            workload,
            Command::new(SLUICE)
                .args(["run", "--workload", workload, "--agent-socket"])
                .arg(&socket)
                .arg("--")
                .args(command),
            &self.path(&format!("{workload}.log")),
        )
    }

    /// `sluice run` as `workload` (once the agent knows it) keeping the workload's certificate
    /// files in `certs-<workload>` from the agent's SDS, as a command prefix; and that directory.
    fn with_certificate_files(&self, workload: &str) -> (Vec<String>, PathBuf) {
        drop(self.run(workload, &["true"]));
        let certs = self.path(&format!("certs-{workload}"));
        let mut prefix: Vec<String> = vec![SLUICE.into(), "run".into(), "--workload".into(), workload.into()];
        for (flag, path) in [
            ("--agent-socket", self.path("agent.sock")),
            ("--cert-dir", certs.clone()),
            ("--sds-socket", self.path("sds.sock")),
        ] {
            prefix.push(flag.into());
            prefix.push(path.display().to_string());
        }
        prefix.push("--".into());
        (prefix, certs)
    }

    /// `examples/grpc`'s v3 on `port`: an `xds=True` server with its certificate files from the
    /// agent; and where they are.
    fn proxyless_v3(&self, port: u16) -> (Proc, PathBuf) {
        use common::grpc::{ECHO_V3, echo_py, grpc_bootstrap};
        let (prefix, certs) = self.with_certificate_files("echo-v3.grpcdemo");
        let bootstrap = grpc_bootstrap(self.dir.path(), "v3-bootstrap", ECHO_V3, self.xds, Some(&certs));
        let addr = relocate("127.0.3.13:7070").replace(":7070", &format!(":{port}"));
        let mut server = Command::new(&prefix[0]);
        server.args(&prefix[1..]).arg(sluice_testkit::python_bin()).arg(echo_py());
        server.args(["serve", "v3", &addr, "--xds"]).env("GRPC_XDS_BOOTSTRAP", &bootstrap);
        (Proc::spawn("v3", &mut server, &self.path("v3.log")), certs)
    }

    /// An Envoy as `workload`, configured by `config` (a bootstrap).
    fn envoy(&self, workload: &str, config: &Path) -> Proc {
        let config = config.display().to_string();
        let envoy = sluice_testkit::envoy_bin();
        // Connections on a replaced filter chain (a PeerAuthentication changed) are drained in
        // 1 s instead of Envoy's 600 (Istio's agent passes 45), so a test sees the new mode soon.
        self.run(workload, &[&envoy, "-c", &config, "--use-dynamic-base-id", "-l", "warning", "--drain-time-s", "1"])
    }
}

/// Connects to `addr` trusting only `root`; the TLS version and the server's certificate (DER,
/// hex) as Python's ssl module (OpenSSL) sees them, or why the handshake failed.
const TLS_PEER_PY: &str = r#"
import socket, ssl, sys
host, port = sys.argv[1].rsplit(":", 1)
ctx = ssl.create_default_context(cafile=sys.argv[2])
ctx.check_hostname = False
with socket.create_connection((host, int(port)), timeout=5) as raw:
    with ctx.wrap_socket(raw) as s:
        print(s.version(), s.getpeercert(binary_form=True).hex())
"#;

/// The TLS version and the SPIFFE identity `addr` presents to a client trusting only `root`.
fn peer(addr: &str, root: &Path) -> Option<(String, SpiffeId)> {
    let out = Command::new("python3").args(["-c", TLS_PEER_PY, addr]).arg(root).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (version, hex) = text.trim().split_once(' ')?;
    let der: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    Some((version.to_string(), certificate_identity(&der)?))
}

/// A static bootstrap: one listener on `port` serving TLS with the SDS secret `default` from the
/// agent's socket `sds`.
fn tls_listener_bootstrap(workload: &str, port: u16, sds: &Path) -> String {
    let sds_config = serde_json::json!({
        "resource_api_version": "V3",
        "api_config_source": {"api_type": "GRPC", "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]}
    });
    serde_json::json!({
        "node": {"id": format!("sidecar~127.0.0.1~{workload}~default.svc.cluster.local"), "cluster": "default"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": free_port()}}},
        "static_resources": {
            // The cluster `sluice bootstrap --sds-socket` adds.
            "clusters": [sluice_controlplane::bootstrap::sds_cluster(&sds.display().to_string())],
            "listeners": [{
                "name": "tls", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{
                    "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "common_tls_context": {"tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": sds_config}]}}},
                    "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "tls",
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]
                }]
            }]
        }
    })
    .to_string()
}

/// A Pod of node-1 that no `sluice run` starts: the agent knows its processes by the UID the
/// kubelet names its cgroup with.
const POD_UID: &str = "0f5c8a4e-3b1d-4c2e-9a7f-6d5e4c3b2a10";

const UID_POD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: uid-test
  namespace: default
  uid: 0f5c8a4e-3b1d-4c2e-9a7f-6d5e4c3b2a10
  labels: {app: uid-test}
spec:
  nodeName: node-1
  serviceAccountName: bookinfo-ratings
  containers: [{name: app, image: example}]
status:
  podIP: 127.0.1.99
";

#[test]
fn each_envoy_gets_its_own_workloads_certificate_from_an_sds_only_agent() {
    // Bookinfo, and a Pod with a UID.
    let config = tempfile::tempdir().unwrap();
    let copied = Command::new("cp").arg("-r").arg(common::root().join("examples/bookinfo")).arg(config.path()).status();
    assert!(copied.unwrap().success());
    std::fs::write(config.path().join("bookinfo/uid-pod.yaml"), UID_POD).unwrap();
    let node = Node::start("e2e-identity", &config.path().join("bookinfo"), None, true);
    // SDS without eBPF: nothing loaded, nothing pinned, and /ready says so.
    let agent = format!("127.0.0.1:{}", node.agent_metrics);
    let ready =
        eventually(Duration::from_secs(10), || http_get(&agent, "x", "/ready", &[]).ok().filter(|r| r.0 == 200));
    let ready = ready.expect("the agent is ready").1;
    assert!(ready.contains(r#""programs":"not_loaded""#), "{ready}");
    assert!(!node.sandbox.pin_dir.exists(), "an SDS-only agent pins nothing");
    let start = |workload: &str, port: u16| -> Proc {
        let config = node.path(&format!("{workload}.json"));
        std::fs::write(&config, tls_listener_bootstrap(workload, port, &node.path("sds.sock"))).unwrap();
        node.envoy(workload, &config)
    };
    let (pp_port, reviews_port) = (free_port(), free_port());
    let _productpage = start("productpage-v1.default", pp_port);
    let _reviews = start("reviews-v1.default", reviews_port);
    for (port, workload, sa) in [
        (pp_port, "productpage-v1.default", "bookinfo-productpage"),
        (reviews_port, "reviews-v1.default", "bookinfo-reviews"),
    ] {
        let seen = eventually(Duration::from_secs(30), || peer(&format!("127.0.0.1:{port}"), &node.root()));
        let Some((version, identity)) = seen else {
            panic!("{workload}: no TLS with a mesh certificate on {port}{}", node.logs(&[&format!("{workload}.log")]));
        };
        assert_eq!(identity, SpiffeId::new("cluster.local", "default", sa), "{workload} has its own identity");
        assert_eq!(version, "TLSv1.3", "{workload}");
    }
    // A process in a container cgroup of the Pod, as the kubelet (cgroupfs driver) makes them:
    // it gets the Pod's identity, with no `sluice run`.
    let container = node.sandbox.cgroup.join(format!("kubepods/burstable/pod{POD_UID}/ctr-1"));
    std::fs::create_dir_all(&container).unwrap();
    let pod_port = free_port();
    let pod_config = node.path("uid-test.json");
    std::fs::write(&pod_config, tls_listener_bootstrap("uid-test.default", pod_port, &node.path("sds.sock"))).unwrap();
    let into_pod = format!(
        "echo $$ > {} && exec {} -c {} --use-dynamic-base-id -l warning",
        container.join("cgroup.procs").display(),
        sluice_testkit::envoy_bin(),
        pod_config.display()
    );
    let _pod = Proc::spawn("uid-test", Command::new("sh").args(["-c", &into_pod]), &node.path("uid-test.log"));
    let seen = eventually(Duration::from_secs(30), || peer(&format!("127.0.0.1:{pod_port}"), &node.root()));
    let Some((_, identity)) = seen else {
        panic!("the Pod's Envoy has no certificate{}", node.logs(&["uid-test.log"]))
    };
    assert_eq!(identity, SpiffeId::new("cluster.local", "default", "bookinfo-ratings"), "the Pod's service account");
    let agent_log = node.log("agent.log");
    assert!(agent_log.contains("workload certificate issued"), "{agent_log}");
    assert!(agent_log.contains("no eBPF programs loaded"), "{agent_log}");
    assert!(!node.sandbox.pin_dir.exists(), "an SDS-only agent pins nothing");
}

/// batch's node id in `examples/mtls` (namespace `other`).
const BATCH: &str = "sidecar~127.0.2.40~batch-v1.other~other.svc.cluster.local";

/// The host api's routes answer to from any namespace.
const API_HOST: &str = "api.secure.svc.cluster.local:9090";

/// One line to a TCP echo at `addr` and the line back.
fn tcp_echo(addr: &str, line: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut back = String::new();
    BufReader::new(s).read_line(&mut back)?;
    Ok(back.trim_end().to_string())
}

/// The sum of an Envoy's counters whose names contain every one of `parts`.
fn counter(admin: u16, parts: &[&str]) -> u64 {
    let (_, body) = http_get(&format!("127.0.0.1:{admin}"), "x", "/stats", &[]).unwrap_or_default();
    body.lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(name, _)| parts.iter().all(|p| name.contains(p)))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum()
}

/// `body` as sent with `transfer-encoding: chunked` (Envoy's admin does), joined again.
fn unchunk(body: &str) -> String {
    let (mut out, mut rest) = (String::new(), body);
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { return body.to_string() };
        if n == 0 || after.len() < n {
            break;
        }
        out += &after[..n];
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// The serial numbers of the certificates (not the CA's) an Envoy serves with now (admin `/certs`).
fn serials(admin: u16) -> std::collections::BTreeSet<String> {
    let (_, body) = http_get(&format!("127.0.0.1:{admin}"), "x", "/certs", &[]).unwrap_or_default();
    let certs: serde_json::Value = serde_json::from_str(&unchunk(&body)).unwrap_or_default();
    let contexts = certs["certificates"].as_array().cloned().unwrap_or_default();
    contexts
        .iter()
        .flat_map(|c| c["cert_chain"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["serial_number"].as_str().map(str::to_string))
        .collect()
}

/// `examples/mtls` served from a directory the test edits, its three sidecars and api's app.
struct MtlsMesh {
    envoys: Vec<Proc>,
    _app: Proc,
    /// Admin ports of web's, api's and batch's Envoys.
    admin: [u16; 3],
    node: Node,
    cfg: tempfile::TempDir,
}

/// Where web's and api's Envoys are in [`MtlsMesh::admin`].
const WEB_ENVOY: usize = 0;
const API_ENVOY: usize = 1;

impl MtlsMesh {
    fn start() -> MtlsMesh {
        let cfg = tempfile::tempdir().unwrap();
        std::fs::write(cfg.path().join("mesh.yaml"), Self::mesh_text(false)).unwrap();
        // A short TTL: certificates rotate every few seconds all through the test.
        let node = Node::start("e2e-mtls", cfg.path(), Some(CERT_TTL_S), false);
        let app = Proc::spawn(
            "api app",
            Command::new("python3").arg(common::root().join("examples/mtls/apps.py")).args([
                "--http",
                &(relocate("127.0.0.1") + ":19090"),
                "--tcp",
                &(relocate("127.0.0.1") + ":17000"),
            ]),
            &node.path("app.log"),
        );
        let mut admin = [0; 3];
        let mut envoys = Vec::new();
        for (i, (workload, id)) in
            [("web-v1.secure", common::WEB), ("api-v1.secure", common::API), ("batch-v1.other", BATCH)]
                .iter()
                .enumerate()
        {
            admin[i] = free_port();
            let out = Command::new(SLUICE)
                .args(["bootstrap", "--proxy", &relocate(id), "--xds-addr", &format!("127.0.0.1:{}", node.xds)])
                .args(["--admin-port", &admin[i].to_string(), "--sds-socket"])
                .arg(node.path("sds.sock"))
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let config = node.path(&format!("{workload}.json"));
            std::fs::write(&config, &out.stdout).unwrap();
            envoys.push(node.envoy(workload, &config));
        }
        MtlsMesh { envoys, _app: app, admin, node, cfg }
    }

    /// `examples/mtls` in this run's addresses; `disable` makes api's workload mode DISABLE with
    /// port 7000 STRICT (a port-level override of the workload's mode).
    fn mesh_text(disable: bool) -> String {
        let text = std::fs::read_to_string(common::root().join("examples/mtls/mesh.yaml")).unwrap();
        let text = if disable {
            let base = "  portLevelMtls:\n    7000: {mode: PERMISSIVE}\n";
            assert!(text.contains(base), "examples/mtls changed: update this test");
            text.replace(base, "  mtls: {mode: DISABLE}\n  portLevelMtls:\n    7000: {mode: STRICT}\n")
        } else {
            text
        };
        relocate(&text)
    }

    /// Replaces `name` in the served directory (whole, by rename), or removes it.
    fn write(&self, name: &str, text: Option<&str>) {
        let path = self.cfg.path().join(name);
        match text {
            Some(t) => {
                let tmp = self.node.path("edit.tmp");
                std::fs::write(&tmp, t).unwrap();
                std::fs::rename(&tmp, &path).unwrap();
            }
            None => std::fs::remove_file(&path).unwrap(),
        }
    }

    fn logs(&self) -> String {
        self.node.logs(&["web-v1.secure.log", "api-v1.secure.log", "batch-v1.other.log", "app.log"])
    }

    /// A GET from web's app (web's outbound listener) to api, or from batch's.
    fn get(&self, from: &str, path: &str) -> std::io::Result<(u16, String)> {
        http_get(&relocate(from), API_HOST, path, &[])
    }

    /// Waits until `from`'s GET of `path` answers `status` ten times in a row; the last answer.
    fn expect(&self, from: &str, path: &str, status: u16, what: &str) -> String {
        let mut streak = 0;
        let got = eventually(Duration::from_secs(30), || {
            let answer = self.get(from, path).ok().filter(|(s, _)| *s == status);
            streak = if answer.is_some() { streak + 1 } else { 0 };
            answer.filter(|_| streak >= 10)
        });
        let Some((_, body)) = got else {
            panic!("{what}: {from}{path} never answered {status} (last: {:?}){}", self.get(from, path), self.logs());
        };
        body
    }
}

/// Workload certificates' TTL in the mTLS test: renewed about every 6 s.
const CERT_TTL_S: u64 = 12;

/// web's app calls api through web's sidecar here (the Sidecar's egress bind), as written in
/// examples/mtls: [`MtlsMesh::get`] moves it into this run's own 127.<n>.0.0/16 block, so the
/// port is fixed by the config but never bound on 127.0.0.1.
const FROM_WEB: &str = "127.0.0.1:9090";
/// batch's app calls api here.
const FROM_BATCH: &str = "127.0.2.40:9090";
/// api's sidecar, on api's pod IP.
const API_HTTP: &str = "127.0.2.20:9090";

#[test]
fn sidecars_talk_mesh_mtls_and_policies_see_the_callers_identity() {
    let mut mesh = MtlsMesh::start();
    let root = mesh.node.root();

    // web → api over mTLS: api's app sees web's identity, and api's sidecar says who it is.
    let body = mesh.expect(FROM_WEB, "/", 200, "web calls api");
    assert!(body.contains("URI=spiffe://cluster.local/ns/secure/sa/web"), "{body}");
    assert!(body.contains("By=spiffe://cluster.local/ns/secure/sa/api"), "{body}");
    assert!(
        counter(mesh.admin[API_ENVOY], &["listener.", "_9090.ssl.versions.TLSv1.3"]) > 0,
        "TLS 1.3 on api's inbound"
    );
    assert!(
        counter(mesh.admin[WEB_ENVOY], &["cluster.outbound|9090||api.", "ssl.versions.TLSv1.3"]) > 0,
        "and on web's side"
    );
    let (version, identity) =
        peer(&relocate(API_HTTP), &root).expect("api's sidecar serves TLS with a mesh certificate");
    assert_eq!((version.as_str(), identity), ("TLSv1.3", SpiffeId::new("cluster.local", "secure", "api")));

    // STRICT (the namespace): plain text to api's HTTP port is cut off without an answer.
    assert!(http_get(&relocate(API_HTTP), API_HOST, "/", &[]).is_err(), "STRICT answered plain text");

    // PERMISSIVE (api's port 7000): plain text and mTLS both reach the app.
    let api_tcp = relocate("127.0.2.20:7000");
    assert_eq!(tcp_echo(&api_tcp, "plain").unwrap(), "api-v1 tcp: plain");
    let handshakes = counter(mesh.admin[API_ENVOY], &["_7000.ssl.handshake"]);
    let via_web = eventually(Duration::from_secs(10), || tcp_echo(&(relocate("127.0.0.1") + ":7000"), "mesh").ok());
    assert_eq!(via_web.as_deref(), Some("api-v1 tcp: mesh"), "{}", mesh.logs());
    assert!(counter(mesh.admin[API_ENVOY], &["_7000.ssl.handshake"]) > handshakes, "web's TCP came over TLS");

    // ALLOW by principal: batch (namespace other) is refused, web is not.
    mesh.expect(FROM_BATCH, "/", 403, "only web's principal is allowed");
    // ALLOW by namespace: batch's namespace may call too.
    let by_namespace = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
        metadata: {name: api-from-other, namespace: secure}\n\
        spec:\n  selector: {matchLabels: {app: api}}\n  action: ALLOW\n  rules:\n  - from:\n    - source: {namespaces: [other]}\n";
    mesh.write("by-namespace.yaml", Some(by_namespace));
    let body = mesh.expect(FROM_BATCH, "/", 200, "namespace other allowed");
    assert!(body.contains("URI=spiffe://cluster.local/ns/other/sa/batch"), "{body}");
    // DENY by principal: web may no longer reach /admin; batch still may.
    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
        metadata: {name: no-admin-for-web, namespace: secure}\n\
        spec:\n  selector: {matchLabels: {app: api}}\n  action: DENY\n  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/secure/sa/web]}\n    to:\n    - operation: {paths: [/admin*]}\n";
    mesh.write("deny.yaml", Some(deny));
    mesh.expect(FROM_WEB, "/admin", 403, "DENY by principal");
    assert_eq!(mesh.get(FROM_WEB, "/").unwrap().0, 200, "the DENY rule is for /admin only");
    assert_eq!(mesh.get(FROM_BATCH, "/admin").unwrap().0, 200, "the DENY rule is for web only");
    mesh.write("deny.yaml", None);
    mesh.write("by-namespace.yaml", None);
    mesh.expect(FROM_BATCH, "/", 403, "the namespace policy removed");

    // DISABLE (api's workload mode) with port 7000 STRICT: HTTP is plain text only — web's
    // sidecar sends it without TLS, so no principal, and the principal policy refuses it; a
    // direct plain-text request gets the same answer; TLS is not spoken. Port 7000 turns mTLS only.
    mesh.write("mesh.yaml", Some(&MtlsMesh::mesh_text(true)));
    let body = mesh.expect(FROM_WEB, "/", 403, "DISABLE: web's request arrives without an identity");
    assert!(body.contains("RBAC"), "{body}");
    assert_eq!(http_get(&relocate(API_HTTP), API_HOST, "/", &[]).map(|r| r.0).ok(), Some(403), "plain text is served");
    assert!(peer(&relocate(API_HTTP), &root).is_none(), "DISABLE still speaks TLS");
    let plain_refused = eventually(Duration::from_secs(30), || tcp_echo(&api_tcp, "plain").is_err().then_some(()));
    assert!(plain_refused.is_some(), "port 7000 STRICT still takes plain text{}", mesh.logs());
    assert_eq!(tcp_echo(&(relocate("127.0.0.1") + ":7000"), "mesh").unwrap(), "api-v1 tcp: mesh");
    mesh.write("mesh.yaml", Some(&MtlsMesh::mesh_text(false)));
    mesh.expect(FROM_WEB, "/", 200, "STRICT again");

    // Rotation under a steady request loop: api's serial changes twice, no request fails.
    let mut seen = serials(mesh.admin[API_ENVOY]);
    let (mut requests, mut failures) = (0, Vec::new());
    let start = Instant::now();
    while seen.len() < 3 && start.elapsed() < Duration::from_secs(CERT_TTL_S * 4) && requests < 2000 {
        requests += 1;
        match mesh.get(FROM_WEB, "/") {
            Ok((200, _)) => {}
            other => failures.push(format!("{other:?}")),
        }
        seen.extend(serials(mesh.admin[API_ENVOY]));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        seen.len() >= 3,
        "api's certificate did not rotate twice in {:?}: {seen:?}{}",
        start.elapsed(),
        mesh.logs()
    );
    assert!(failures.is_empty(), "{} of {requests} requests failed across rotations: {failures:?}", failures.len());
    eprintln!("rotation: {} serials of api in {:?}, {requests} requests, none failed", seen.len(), start.elapsed());

    // kill -9 of the agent: the sidecars keep serving on the certificates they hold.
    mesh.node.agent.as_mut().unwrap().kill();
    let before = serials(mesh.admin[API_ENVOY]);
    for i in 0..20 {
        assert_eq!(mesh.get(FROM_WEB, "/").map(|r| r.0).ok(), Some(200), "request {i} with the agent gone");
    }
    // The restarted agent knows the running workloads again (their cgroups) and serves them:
    // api gets a new certificate, and requests keep working past the old one's expiry.
    mesh.node.start_agent();
    let renewed = eventually(Duration::from_secs(CERT_TTL_S * 2), || {
        serials(mesh.admin[API_ENVOY]).iter().any(|s| !before.contains(s)).then_some(())
    });
    assert!(renewed.is_some(), "the restarted agent served no new certificate{}", mesh.logs());
    std::thread::sleep(Duration::from_secs(CERT_TTL_S / 2));
    mesh.expect(FROM_WEB, "/", 200, "after the restarted agent's certificates");

    // serve restarted on the same state dir: the same root, so certificates issued before still
    // verify, and the agent gets new ones from the restarted CA.
    let root_before = std::fs::read(&root).unwrap();
    mesh.node.serve.as_mut().unwrap().kill();
    mesh.node.start_serve();
    assert_eq!(std::fs::read(&root).unwrap(), root_before, "serve made a new root on restart");
    assert_eq!(mesh.get(FROM_WEB, "/").map(|r| r.0).ok(), Some(200), "certificates from before the restart");
    let before = serials(mesh.admin[API_ENVOY]);
    let renewed = eventually(Duration::from_secs(CERT_TTL_S * 2), || {
        serials(mesh.admin[API_ENVOY]).iter().any(|s| !before.contains(s)).then_some(())
    });
    assert!(renewed.is_some(), "no certificate from the restarted CA{}", mesh.logs());
    mesh.expect(FROM_WEB, "/", 200, "after serve's restart");
    drop(std::mem::take(&mut mesh.envoys));
}

/// Proxyless gRPC with its certificates from the node agent: `sluice run --cert-dir` keeps the
/// workload's files (gRPC's file_watcher provider reads them) from the agent's SDS, which knows
/// the process by its cgroup. The server in grpcdemo is STRICT and open to grpcdemo only: the
/// client in grpcdemo gets in over mTLS, the one in `other` is refused, and each one's files
/// hold its own workload's identity.
#[test]
fn proxyless_grpc_takes_its_certificate_files_from_the_agent() {
    use common::grpc::{CLIENT, Client, Implementation, TARGET, grpc_bootstrap, mtls_config};
    let port = 7073;
    let config = tempfile::tempdir().unwrap();
    let (mesh, policy) = mtls_config(port);
    std::fs::write(config.path().join("mesh.yaml"), mesh).unwrap();
    std::fs::write(config.path().join("policy.yaml"), policy).unwrap();
    let node = Node::start("e2e-grpc-certs", config.path(), None, true);
    let wrapper = |workload: &str| node.with_certificate_files(workload);
    let (_v3, v3_certs) = node.proxyless_v3(port);
    let serving = eventually(Duration::from_secs(30), || node.log("v3.log").contains("start serving").then_some(()));
    assert!(serving.is_some(), "v3 never served:{}", node.logs(&["v3.log"]));
    let chain = std::fs::read_to_string(v3_certs.join("cert-chain.pem")).unwrap();
    let leaf = pem::parse_many(&chain).unwrap().remove(0);
    let identity = certificate_identity(leaf.contents());
    assert_eq!(identity, Some(SpiffeId::new("cluster.local", "grpcdemo", "echo")), "v3's own identity in its files");

    let target = TARGET.replace("7070", &port.to_string());
    let start = |workload: &str, node_id: &str, log: &str| {
        let (run, certs) = wrapper(workload);
        let bootstrap =
            grpc_bootstrap(node.dir.path(), &format!("{workload}-bootstrap"), node_id, node.xds, Some(&certs));
        Client::start_under(&run, Implementation::Python, &target, &bootstrap, &node.path(log))
    };
    let mut client = start("client.grpcdemo", CLIENT, "client.log");
    let admitted = eventually(Duration::from_secs(30), || {
        let c = client.call("/echo.Echo/Call", 5, &[]);
        (c.get("v3") == Some(&5)).then_some(c)
    });
    assert!(admitted.is_some(), "the client in grpcdemo never got through:{}", node.logs(&["v3.log", "client.log"]));
    let mut outsider =
        start("outsider.other", "sidecar~127.0.3.30~outsider.other~other.svc.cluster.local", "outsider.log");
    let refused = outsider.call("/echo.Echo/Call", 5, &[]);
    assert_eq!(
        refused,
        std::collections::BTreeMap::from([("status:PERMISSION_DENIED".to_string(), 5)]),
        "{}",
        node.logs(&["v3.log", "outsider.log"])
    );
}

/// Mesh mTLS between proxyless gRPC and Envoy sidecars, both ways: a client's sidecar (its app
/// a plain gRPC client) calls the proxyless `xds=True` server v3, and a proxyless client (files
/// from the agent) calls v1 through v1's inbound sidecar; STRICT everywhere, v3's policy by
/// namespace.
#[test]
fn proxyless_grpc_and_envoy_sidecars_talk_mesh_mtls_both_ways() {
    use common::grpc::{CLIENT, Client, Implementation, TARGET, echo_py, grpc_bootstrap, mtls_config};
    let port = 7074;
    let app_port = free_port();
    let config = tempfile::tempdir().unwrap();
    let (mesh, policy) = mtls_config(port);
    // v1 and the client get sidecars that bind real addresses (no iptables): v1's inbound on
    // its pod IP in front of its app, the client's outbound on the client's pod IP. The header
    // x-version: v1 routes to v1, the rest to v3.
    let sidecars = format!(
        r#"
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: echo-v1, namespace: grpcdemo}}
spec:
  workloadSelector: {{labels: {{version: v1}}}}
  ingress:
  - {{port: {{number: {port}, protocol: GRPC, name: grpc}}, bind: 127.0.3.11, captureMode: NONE, defaultEndpoint: "127.0.0.1:{app_port}"}}
  egress:
  - {{hosts: ["./*"]}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: client, namespace: grpcdemo}}
spec:
  workloadSelector: {{labels: {{app: client}}}}
  egress:
  - {{port: {{number: {port}, protocol: GRPC, name: grpc}}, bind: 127.0.3.20, captureMode: NONE, hosts: ["./*"]}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: grpcdemo}}
spec:
  hosts: [echo]
  http:
  - match: [{{headers: {{x-version: {{exact: v1}}}}}}]
    route: [{{destination: {{host: echo, subset: v1}}}}]
  - route: [{{destination: {{host: echo, subset: v3}}}}]
"#
    );
    let policy: Vec<&str> = policy.split("\n---\n").filter(|d| !d.contains("kind: VirtualService")).collect();
    // v1 is labelled for mesh TLS, as Istio's injector labels a pod with a sidecar.
    let mesh = mesh.replace(
        "  name: echo-v1\n  namespace: grpcdemo\n  labels: {app: echo, version: v1}",
        "  name: echo-v1\n  namespace: grpcdemo\n  labels: {app: echo, version: v1, security.istio.io/tlsMode: istio}",
    );
    assert!(mesh.contains("tlsMode: istio"), "the example's echo-v1 Pod changed shape");
    std::fs::write(config.path().join("mesh.yaml"), mesh).unwrap();
    std::fs::write(config.path().join("policy.yaml"), policy.join("\n---\n")).unwrap();
    std::fs::write(config.path().join("sidecars.yaml"), relocate(&sidecars)).unwrap();
    let node = Node::start("e2e-grpc-sidecars", config.path(), None, true);
    let logs = |extra: &[&str]| node.logs(extra);
    let wrapper = |workload: &str| node.with_certificate_files(workload);
    let sidecar = |workload: &str, node_id: &str| {
        let out = Command::new(SLUICE)
            .args(["bootstrap", "--proxy", &relocate(node_id), "--xds-addr", &format!("127.0.0.1:{}", node.xds)])
            .args(["--admin-port", &free_port().to_string()])
            .arg("--sds-socket")
            .arg(node.path("sds.sock"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let path = node.path(&format!("{workload}-envoy.json"));
        std::fs::write(&path, out.stdout).unwrap();
        node.envoy(workload, &path)
    };
    // v3, proxyless, with its files from the agent.
    let (_v3, _) = node.proxyless_v3(port);
    // v1: a plain gRPC server behind its sidecar.
    let app = relocate(&format!("127.0.0.1:{app_port}"));
    let _v1_app = Proc::spawn(
        "v1",
        Command::new(sluice_testkit::python_bin()).arg(echo_py()).args(["serve", "v1", &app]),
        &node.path("v1.log"),
    );
    let _v1_sidecar = sidecar("echo-v1.grpcdemo", "sidecar~127.0.3.11~echo-v1.grpcdemo~grpcdemo.svc.cluster.local");
    let _client_sidecar = sidecar("client.grpcdemo", CLIENT);

    // Sidecar → proxyless: the client's app calls its sidecar in plain text, which speaks mesh
    // mTLS to v3 with the client's certificate; v3's policy lets grpcdemo in.
    let outbound = relocate("127.0.3.20:7070").replace(":7070", &format!(":{port}"));
    let mut through_sidecar = {
        let authority = format!("echo.grpcdemo.svc.cluster.local:{port}");
        let wrapper = vec!["env".to_string(), format!("ECHO_AUTHORITY={authority}")];
        Client::start_under(&wrapper, Implementation::Python, &outbound, Path::new("/dev/null"), &node.path("app.log"))
    };
    let to_v3 = eventually(Duration::from_secs(30), || {
        let c = through_sidecar.call("/echo.Echo/Call", 3, &[]);
        (c.get("v3") == Some(&3)).then_some(c)
    });
    assert!(to_v3.is_some(), "sidecar → proxyless over mTLS:{}", logs(&["v3.log", "app.log", "client.grpcdemo.log"]));
    // Proxyless → sidecar: a proxyless client in grpcdemo with the header for v1.
    let (client_run, client_certs) = wrapper("client.grpcdemo");
    let bootstrap = grpc_bootstrap(node.dir.path(), "client-bootstrap", CLIENT, node.xds, Some(&client_certs));
    let target = TARGET.replace("7070", &port.to_string());
    let mut proxyless =
        Client::start_under(&client_run, Implementation::Python, &target, &bootstrap, &node.path("client.log"));
    let to_v1 = eventually(Duration::from_secs(30), || {
        let c = proxyless.call("/echo.Echo/Call", 3, &["x-version=v1"]);
        (c.get("v1") == Some(&3)).then_some(c)
    });
    assert!(
        to_v1.is_some(),
        "proxyless → sidecar over mTLS:{}",
        logs(&["client.log", "echo-v1.grpcdemo.log", "v1.log"])
    );
    // v1's port is STRICT: plain text to its sidecar is refused.
    let plain = common::grpc::direct_call(&relocate("127.0.3.11:7070").replace(":7070", &format!(":{port}")));
    assert!(!plain.contains_key("v1"), "plain text through a STRICT sidecar: {plain:?}");
}
