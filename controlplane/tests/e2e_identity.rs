//! Workload identity end to end on the real kernel (root): `sluice serve` with its CA on the TLS
//! port and a node token, `sluice agent` serving SDS, and two real Envoys started with
//! `sluice run` as productpage and as reviews. Each Envoy asks the same SDS socket for `default`
//! and gets its own workload's certificate — the agent knows the caller from its cgroup, not
//! from anything it sends — and serves TLS with it: a client that trusts only the published root
//! sees `spiffe://cluster.local/ns/default/sa/bookinfo-productpage` on one port and
//! `…/sa/bookinfo-reviews` on the other.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sluice_identity::SpiffeId;
use sluice_identity::service::certificate_identity;
use sluice_testkit::{Proc, eventually, free_port, is_root};

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

/// An Envoy whose one listener, on `port`, serves TLS with the SDS secret `default` from the
/// agent's socket `sds`.
fn bootstrap(workload: &str, port: u16, sds: &Path) -> String {
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

/// Connects to `port` trusting only `root`; the TLS version and the server's certificate (DER,
/// hex) as Python's ssl module (OpenSSL) sees them, or why the handshake failed.
const TLS_PEER_PY: &str = r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
ctx.check_hostname = False
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as raw:
    with ctx.wrap_socket(raw) as s:
        print(s.version(), s.getpeercert(binary_form=True).hex())
"#;

fn peer(port: u16, root: &Path) -> Option<(String, SpiffeId)> {
    let out = Command::new("python3").args(["-c", TLS_PEER_PY, &port.to_string()]).arg(root).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (version, hex) = text.trim().split_once(' ')?;
    let der: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    Some((version.to_string(), certificate_identity(&der)?))
}

fn log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

#[test]
fn each_envoy_gets_its_own_workloads_certificate_from_the_agents_sds() {
    assert!(is_root(), "this test loads eBPF programs and creates cgroups: run it as root (CI does)");
    let sandbox = sluice_dataplane::sandbox::Sandbox::new("e2e-identity").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let token = "node-1-e2e-0123456789abcdef";
    std::fs::write(d.join("tokens"), format!("node-1 {token}\n")).unwrap();
    std::fs::write(d.join("node-token"), token).unwrap();
    let (xds, tls) = (free_port(), free_port());
    let state = d.join("state");
    let _serve = Proc::spawn(
        "sluice serve",
        Command::new(SLUICE)
            .args(["serve", "--debounce-ms", "0", "--config"])
            .arg(common::root().join("examples/bookinfo"))
            .args(["--xds-addr", &format!("127.0.0.1:{xds}"), "--xds-tls-addr", &format!("127.0.0.1:{tls}")])
            .args(["--tls-dns-name", "localhost", "--monitoring-addr", &format!("127.0.0.1:{}", free_port())])
            .arg("--state-dir")
            .arg(&state)
            .arg("--node-tokens")
            .arg(d.join("tokens")),
        &d.join("serve.log"),
    );
    let root = state.join("root-cert.pem");
    assert!(eventually(Duration::from_secs(30), || root.exists().then_some(())).is_some(), "{}", log(d, "serve.log"));
    let (agent_socket, sds) = (d.join("agent.sock"), d.join("sds.sock"));
    let _agent = Proc::spawn(
        "sluice agent",
        Command::new(SLUICE)
            .args(["agent", "--node", "node-1", "--xds-addr", &format!("127.0.0.1:{xds}")])
            .arg("--cgroup")
            .arg(&sandbox.cgroup)
            .arg("--pin-dir")
            .arg(&sandbox.pin_dir)
            .arg("--socket")
            .arg(&agent_socket)
            .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
            .arg("--sds-socket")
            .arg(&sds)
            .args(["--ca-addr", &format!("127.0.0.1:{tls}"), "--ca-name", "localhost"])
            .arg("--ca-root")
            .arg(&root)
            .arg("--node-token-file")
            .arg(d.join("node-token")),
        &d.join("agent.log"),
    );
    let sds_up = eventually(Duration::from_secs(30), || sds.exists().then_some(()));
    assert!(sds_up.is_some(), "no SDS socket; agent log:\n{}", log(d, "agent.log"));

    let start = |workload: &str, port: u16| -> Proc {
        let config = d.join(format!("{workload}.json"));
        std::fs::write(&config, bootstrap(workload, port, &sds)).unwrap();
        // The agent must know the workload from the config before `sluice run` can register it.
        let registered = eventually(Duration::from_secs(30), || {
            let probe = Command::new(SLUICE)
                .args(["run", "--workload", workload, "--agent-socket"])
                .arg(&agent_socket)
                .args(["--", "true"])
                .stderr(std::process::Stdio::null())
                .status()
                .ok()?;
            probe.success().then_some(())
        });
        assert!(registered.is_some(), "the agent never knew {workload}; agent log:\n{}", log(d, "agent.log"));
        Proc::spawn(
            workload,
            Command::new(SLUICE)
                .args(["run", "--workload", workload, "--agent-socket"])
                .arg(&agent_socket)
                .arg("--")
                .arg(sluice_testkit::envoy_bin())
                .arg("-c")
                .arg(&config)
                .args(["--use-dynamic-base-id", "-l", "warning"]),
            &d.join(format!("{workload}.log")),
        )
    };
    let (pp_port, reviews_port) = (free_port(), free_port());
    let _productpage = start("productpage-v1.default", pp_port);
    let _reviews = start("reviews-v1.default", reviews_port);
    for (port, workload, sa) in [
        (pp_port, "productpage-v1.default", "bookinfo-productpage"),
        (reviews_port, "reviews-v1.default", "bookinfo-reviews"),
    ] {
        let seen = eventually(Duration::from_secs(30), || peer(port, &root));
        let Some((version, identity)) = seen else {
            panic!(
                "{workload}: no TLS with a mesh certificate on {port}\nenvoy log:\n{}\nagent log:\n{}\nserve log:\n{}",
                log(d, &format!("{workload}.log")),
                log(d, "agent.log"),
                log(d, "serve.log")
            );
        };
        assert_eq!(identity, SpiffeId::new("cluster.local", "default", sa), "{workload} has its own identity");
        assert_eq!(version, "TLSv1.3", "{workload}");
    }
    let agent_log = log(d, "agent.log");
    assert!(agent_log.contains("workload certificate issued"), "{agent_log}");
}
