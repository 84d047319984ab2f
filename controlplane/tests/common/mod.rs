//! Shared by the integration tests: the example cases and paths.

#![allow(dead_code)]

use std::path::PathBuf;

/// productpage's node id (no iptables; Sidecar binds real addresses).
pub const PRODUCTPAGE: &str = "sidecar~127.0.1.10~productpage-v1.default~default.svc.cluster.local";
/// reviews-v1's node id (iptables capture: virtual listeners).
pub const REVIEWS_V1: &str = "sidecar~127.0.1.40~reviews-v1.default~default.svc.cluster.local";

/// The node agent's node id.
pub const AGENT: &str = "agent~node-1";

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Golden cases: (name, config paths relative to the root, node id).
pub fn cases() -> Vec<(String, Vec<PathBuf>, &'static str)> {
    let base = root().join("examples/bookinfo");
    let mut out = vec![
        ("bookinfo-productpage".to_string(), vec![base.clone()], PRODUCTPAGE),
        ("bookinfo-reviews-v1".to_string(), vec![base.clone()], REVIEWS_V1),
        ("bookinfo-kernel".to_string(), vec![base.clone()], AGENT),
    ];
    let variants = root().join("examples/bookinfo-variants");
    let mut names: Vec<String> = std::fs::read_dir(&variants)
        .expect("examples/bookinfo-variants")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for v in names {
        let paths = vec![base.clone(), variants.join(&v)];
        out.push((format!("{v}-productpage"), paths.clone(), PRODUCTPAGE));
        out.push((format!("{v}-kernel"), paths.clone(), AGENT));
        if v.starts_with("allow") || v.starts_with("deny") {
            out.push((format!("{v}-reviews-v1"), paths, REVIEWS_V1));
        }
    }
    out
}
