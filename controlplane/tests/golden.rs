//! Golden tests: each Bookinfo example (base + variant) for a proxy → Envoy config dump JSON, and
//! for the node agent (`agent~node-1`) → kernel map entries, compared with `tests/golden/<case>.json`. To accept intended changes:
//! `SLUICE_UPDATE_GOLDEN=1 cargo test -p sluice-controlplane --test golden`.

mod common;

use sluice_controlplane::{load_config, translate_json};
use sluice_translator::diagnostic::Severity;
use sluice_translator::envoy::XdsClient;

#[test]
fn examples_match_golden_files() {
    let update = std::env::var_os("SLUICE_UPDATE_GOLDEN").is_some();
    let dir = common::root().join("controlplane/tests/golden");
    let mut mismatches = Vec::new();
    let envoy = common::cases()
        .into_iter()
        .map(|(name, paths, node, certificates)| (name, paths, node, certificates, XdsClient::Envoy));
    let proxyless = common::proxyless_cases()
        .into_iter()
        .map(|(name, paths, node)| (name, paths, node, Default::default(), XdsClient::ProxylessGrpc));
    for (name, paths, node, certificates, client) in envoy.chain(proxyless) {
        let loaded = load_config(&paths);
        let errors: Vec<_> = loaded.diagnostics.iter().filter(|d| d.severity == Severity::Error).collect();
        assert!(errors.is_empty(), "{name}: example config has errors: {errors:#?}");
        let (dump, _) =
            translate_json(&loaded.snapshot, node, certificates, client).unwrap_or_else(|e| panic!("{name}: {e}"));
        let text = serde_json::to_string_pretty(&dump).expect("json") + "\n";
        let file = dir.join(format!("{name}.json"));
        if update {
            std::fs::write(&file, &text).expect("write golden");
            continue;
        }
        let expected = std::fs::read_to_string(&file).unwrap_or_default();
        if expected != text {
            mismatches.push(name.clone());
            pretty_assertions::assert_eq!(expected, text, "golden mismatch for {name} ({})", file.display());
        }
    }
    assert!(mismatches.is_empty(), "golden mismatches: {mismatches:?}");
}
