//! Shared by the integration tests: the example cases and paths.

#![allow(dead_code)]

use std::path::PathBuf;

pub mod grpc;

pub use sluice_translator::envoy::Certificates;

/// productpage's node id (no iptables; Sidecar binds real addresses).
pub const PRODUCTPAGE: &str = "sidecar~127.0.1.10~productpage-v1.default~default.svc.cluster.local";
/// reviews-v1's node id (iptables capture: virtual listeners).
pub const REVIEWS_V1: &str = "sidecar~127.0.1.40~reviews-v1.default~default.svc.cluster.local";

/// web's and api's node ids in `examples/mtls`.
pub const WEB: &str = "sidecar~127.0.2.10~web-v1.secure~secure.svc.cluster.local";
/// api's node id in `examples/mtls`.
pub const API: &str = "sidecar~127.0.2.20~api-v1.secure~secure.svc.cluster.local";

/// The node agent's node id.
pub const AGENT: &str = "agent~node-1";

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Golden cases: (name, config paths relative to the root, node id, whether the proxy holds its
/// certificate).
pub fn cases() -> Vec<(String, Vec<PathBuf>, &'static str, Certificates)> {
    let base = root().join("examples/bookinfo");
    let mtls = vec![root().join("examples/mtls")];
    let mut out = vec![
        ("bookinfo-productpage".to_string(), vec![base.clone()], PRODUCTPAGE, Certificates::None),
        ("bookinfo-reviews-v1".to_string(), vec![base.clone()], REVIEWS_V1, Certificates::None),
        ("bookinfo-kernel".to_string(), vec![base.clone()], AGENT, Certificates::None),
        // Proxies with their workload certificates (SDS), and one without, under STRICT.
        ("mtls-web".to_string(), mtls.clone(), WEB, Certificates::Sds),
        ("mtls-api".to_string(), mtls.clone(), API, Certificates::Sds),
        ("mtls-api-without-sds".to_string(), mtls.clone(), API, Certificates::None),
        ("mtls-kernel".to_string(), mtls, AGENT, Certificates::None),
    ];
    let variants = root().join("examples/bookinfo-variants");
    let mut names: Vec<String> = std::fs::read_dir(&variants)
        .expect("examples/bookinfo-variants")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for v in names {
        let paths = vec![base.clone(), variants.join(&v)];
        out.push((format!("{v}-productpage"), paths.clone(), PRODUCTPAGE, Certificates::None));
        out.push((format!("{v}-kernel"), paths.clone(), AGENT, Certificates::None));
        if v.starts_with("allow") || v.starts_with("deny") {
            out.push((format!("{v}-reviews-v1"), paths, REVIEWS_V1, Certificates::None));
        }
    }
    out
}

/// Golden cases of proxyless gRPC nodes in `examples/grpc`: (name, config paths, node id).
pub fn proxyless_cases() -> Vec<(String, Vec<PathBuf>, &'static str)> {
    let grpc = vec![root().join("examples/grpc")];
    vec![
        // A client: API listeners, routes, clusters and endpoints, no server listeners.
        ("grpc-client".to_string(), grpc.clone(), "sidecar~127.0.3.20~client.grpcdemo~grpcdemo.svc.cluster.local"),
        // An xds=True server with a policy: its listeners carry RBAC.
        ("grpc-echo-v3".to_string(), grpc, "sidecar~127.0.3.13~echo-v3.grpcdemo~grpcdemo.svc.cluster.local"),
    ]
}
