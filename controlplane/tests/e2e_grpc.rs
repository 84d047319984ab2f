//! Proxyless gRPC end to end: gRPC's own xDS client (Python `grpcio`, `xds:///` targets with
//! `GRPC_XDS_BOOTSTRAP` from `sluice bootstrap --grpc`) routed by `sluice serve` from
//! `examples/grpc`, with `xds=True` servers that take their listener and RBAC from sluice.
//! Everything runs on this run's own loopback block ([`relocate`]).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::grpc::*;
use sluice_testkit::{eventually, free_port, http_get, relocate};

fn share(counts: &BTreeMap<String, usize>, name: &str) -> f64 {
    let total: usize = counts.values().sum();
    100.0 * counts.get(name).copied().unwrap_or(0) as f64 / total.max(1) as f64
}

/// The second VirtualService: everything to v2, except a fault for `x-fault: yes` and the
/// Flaky method, which goes to every echo endpoint with `retries`.
fn edited(retries: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: grpcdemo}}
spec:
  hosts: [echo]
  http:
  - match: [{{headers: {{x-fault: {{exact: "yes"}}}}}}]
    fault: {{abort: {{grpcStatus: RESOURCE_EXHAUSTED, percentage: {{value: 100}}}}}}
    route: [{{destination: {{host: echo, subset: v1}}}}]
  - match: [{{uri: {{exact: /echo.Echo/Flaky}}}}]
    route: [{{destination: {{host: echo}}}}]
    retries: {retries}
  - route: [{{destination: {{host: echo, subset: v2}}}}]
"#
    )
}

#[test]
fn python_grpc_clients_and_servers_follow_the_mesh_config() {
    follows_the_mesh_config(Implementation::Python, 7070);
}

#[test]
fn grpc_js_clients_follow_the_mesh_config() {
    // Another port than the Python test's, which runs at the same time on the same addresses.
    follows_the_mesh_config(Implementation::Node, 7071);
}

/// The checks, for a client of `implementation`, with the example's port moved to `port`.
fn follows_the_mesh_config(implementation: Implementation, port: u16) {
    let at = |addr: &str| relocate(addr).replace(":7070", &format!(":{port}"));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    // The example with its VirtualService in a file of its own, which the test then edits.
    let (routing, rest): (Vec<String>, Vec<String>) =
        example(port).into_iter().partition(|d| d.contains("kind: VirtualService"));
    assert_eq!(routing.len(), 1, "examples/grpc has one VirtualService");
    std::fs::write(cfg.join("mesh.yaml"), rest.join("\n---\n")).unwrap();
    std::fs::write(cfg.join("vs.yaml"), &routing[0]).unwrap();
    let (xds_port, monitoring_port) = (free_port(), free_port());

    // v3 is an xds=True server: with no control plane yet, it does not serve.
    let v3_bootstrap = grpc_bootstrap(dir.path(), "v3-bootstrap", ECHO_V3, xds_port, None);
    let _v1 = echo_server(dir.path(), "v1", &at("127.0.3.11:7070"), &[], None);
    let _v2 = echo_server(dir.path(), "v2", &at("127.0.3.12:7070"), &["--flaky"], None);
    let _v3 = echo_server(dir.path(), "v3", &at("127.0.3.13:7070"), &["--xds"], Some(&v3_bootstrap));
    std::thread::sleep(Duration::from_secs(2));
    let before = direct_call(&at("127.0.3.13:7070"));
    assert!(!before.contains_key("v3"), "the xds server served before it had its listener: {before:?}");

    let _sluice = serve(dir.path(), xds_port, monitoring_port);
    let logs = || self::logs(dir.path());
    let ready = eventually(Duration::from_secs(20), || {
        http_get(&format!("127.0.0.1:{monitoring_port}"), "x", "/ready", &[]).ok().filter(|(s, _)| *s == 200)
    });
    assert!(ready.is_some(), "sluice did not become ready: {}", logs());
    let served = eventually(Duration::from_secs(20), || {
        direct_call(&at("127.0.3.13:7070")).get("v3").copied().filter(|n| *n == 1)
    });
    assert!(served.is_some(), "the xds server never served once sluice sent its listener: {}", logs());

    let client_bootstrap = grpc_bootstrap(dir.path(), "client-bootstrap", CLIENT, xds_port, None);
    let target = TARGET.replace("7070", &port.to_string());
    let mut client = Client::start(implementation, &target, &client_bootstrap, &dir.path().join("client.log"));
    // 75/25 over v1 and v2 on one channel.
    let split = client.call("/echo.Echo/Call", 800, &[]);
    assert_eq!(split.values().sum::<usize>(), 800, "{split:?}: {}", logs());
    assert_eq!(split.keys().filter(|k| *k != "v1" && *k != "v2").count(), 0, "{split:?}");
    let v1 = share(&split, "v1");
    assert!((68.0..=82.0).contains(&v1), "v1 got {v1:.1}% of 800 calls, want 75 ± 7: {split:?}");
    // The header match routes to v3, whose own policy (from sluice, on the server) allows
    // Call and denies Admin.
    assert_eq!(client.call("/echo.Echo/Call", 20, &["x-version=v3"]), BTreeMap::from([("v3".to_string(), 20)]));
    let denied = client.call("/echo.Echo/Admin", 5, &["x-version=v3"]);
    assert_eq!(denied, BTreeMap::from([("status:PERMISSION_DENIED".to_string(), 5)]), "{}", logs());

    // A live edit converges on the same channel: everything to v2, and Flaky (which v2 fails)
    // over all three endpoints without retries, so about a third of those calls fail.
    let write = |text: String| {
        let tmp = cfg.join("vs.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, cfg.join("vs.yaml")).unwrap();
    };
    write(edited("{attempts: 0}"));
    let converged = eventually(Duration::from_secs(20), || {
        let c = client.call("/echo.Echo/Call", 20, &[]);
        (c.get("v2") == Some(&20)).then_some(c)
    });
    assert!(converged.is_some(), "the channel never moved to v2: {}", logs());
    // /debug/syncz shows the proxyless client like any proxy: every type acknowledged.
    let (_, syncz) = http_get(&format!("127.0.0.1:{monitoring_port}"), "x", "/debug/syncz", &[]).unwrap();
    let syncz: serde_json::Value = serde_json::from_str(&syncz).unwrap();
    let proxies = syncz["proxies"].as_array().unwrap();
    let me = proxies.iter().find(|p| p["node_id"] == relocate(CLIENT)).unwrap_or_else(|| panic!("{syncz}"));
    let types = me["types"].as_object().unwrap();
    assert_eq!(types.len(), 4, "LDS, RDS, CDS and EDS: {me}");
    for (type_url, t) in types {
        assert_eq!(t["acked_version"], t["sent_version"], "{type_url} in sync: {me}");
    }
    let faulted = client.call("/echo.Echo/Call", 10, &["x-fault=yes"]);
    assert_eq!(faulted, BTreeMap::from([("status:RESOURCE_EXHAUSTED".to_string(), 10)]), "{}", logs());
    let flaky = client.call("/echo.Echo/Flaky", 30, &[]);
    let failed = flaky.get("status:UNAVAILABLE").copied().unwrap_or(0);
    assert!((5..=15).contains(&failed), "without retries about a third of 30 Flaky calls fail: {flaky:?}");

    // With retries on unavailable, the failing backend is hidden.
    write(edited("{attempts: 3, retryOn: unavailable}"));
    let hidden = eventually(Duration::from_secs(20), || {
        let c = client.call("/echo.Echo/Flaky", 30, &[]);
        (!c.contains_key("status:UNAVAILABLE")).then_some(c)
    });
    let hidden = hidden.unwrap_or_else(|| panic!("retries never hid the failing backend: {}", logs()));
    assert_eq!(hidden.get("v1").copied().unwrap_or(0) + hidden.get("v3").copied().unwrap_or(0), 30, "{hidden:?}");
}

/// A workload's certificate files as the file_watcher provider reads them (Istio's names),
/// signed by the CA in `ca_dir` — what the node agent would keep fresh — for `namespace`/`sa`.
fn write_certificates(ca: &sluice_identity::CertificateAuthority, dir: &Path, namespace: &str, sa: &str) -> PathBuf {
    let out = dir.join(format!("certs-{namespace}-{sa}"));
    std::fs::create_dir_all(&out).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap();
    let identity = sluice_identity::SpiffeId::new("cluster.local", namespace, sa);
    let chain = ca.sign(&csr.pem().unwrap(), &identity, None).unwrap().concat();
    std::fs::write(out.join("cert-chain.pem"), chain).unwrap();
    std::fs::write(out.join("key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(out.join("root-cert.pem"), ca.root_pem()).unwrap();
    out
}

/// mTLS between proxyless gRPC clients and an `xds=True` server (gRFC A29), and a policy by
/// namespace on the server: the client in grpcdemo gets in, the one in `other` is refused, and
/// plain text to the STRICT server is refused.
#[test]
fn python_grpc_mtls_and_a_policy_by_namespace() {
    const OUTSIDER: &str = "sidecar~127.0.3.30~outsider.other~other.svc.cluster.local";
    let port = 7072;
    let at = |addr: &str| relocate(addr).replace(":7070", &format!(":{port}"));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    let (mesh, policy) = mtls_config(port);
    std::fs::write(cfg.join("mesh.yaml"), mesh).unwrap();
    std::fs::write(cfg.join("policy.yaml"), policy).unwrap();

    // sluice's CA, made before serve starts so that the test can sign what the agent would.
    let state = dir.path().join("state");
    let ca = sluice_identity::CertificateAuthority::self_signed(&state.join("ca"), "cluster.local").unwrap();
    let (xds_port, monitoring_port) = (free_port(), free_port());
    let _sluice = serve(dir.path(), xds_port, monitoring_port);
    let bootstrap =
        |name: &str, node: &str, certs: &Path| grpc_bootstrap(dir.path(), name, node, xds_port, Some(certs));
    let v3_certs = write_certificates(&ca, dir.path(), "grpcdemo", "echo");
    let v3_bootstrap = bootstrap("v3", ECHO_V3, &v3_certs);
    let _v3 = echo_server(dir.path(), "v3", &at("127.0.3.13:7070"), &["--xds"], Some(&v3_bootstrap));
    let logs = || self::logs(dir.path());
    let serving = eventually(Duration::from_secs(30), || {
        std::fs::read_to_string(dir.path().join("v3.log")).ok().filter(|l| l.contains("start serving")).map(|_| ())
    });
    assert!(serving.is_some(), "v3 never got its listener: {}", logs());

    let target = TARGET.replace("7070", &port.to_string());
    let client_certs = write_certificates(&ca, dir.path(), "grpcdemo", "client");
    let mut client = Client::start(
        Implementation::Python,
        &target,
        &bootstrap("client", CLIENT, &client_certs),
        &dir.path().join("client.log"),
    );
    let admitted = eventually(Duration::from_secs(20), || {
        let c = client.call("/echo.Echo/Call", 5, &[]);
        (c.get("v3") == Some(&5)).then_some(c)
    });
    assert!(admitted.is_some(), "the client in grpcdemo never got through over mTLS: {}", logs());
    let outsider_certs = write_certificates(&ca, dir.path(), "other", "outsider");
    let mut outsider = Client::start(
        Implementation::Python,
        &target,
        &bootstrap("outsider", OUTSIDER, &outsider_certs),
        &dir.path().join("outsider.log"),
    );
    let refused = outsider.call("/echo.Echo/Call", 5, &[]);
    assert_eq!(refused, BTreeMap::from([("status:PERMISSION_DENIED".to_string(), 5)]), "{}", logs());
    // Plain text to the STRICT port: no handshake, no answer.
    let plain = direct_call(&at("127.0.3.13:7070"));
    assert!(!plain.contains_key("v3"), "plain text got through to a STRICT server: {plain:?}");
}
