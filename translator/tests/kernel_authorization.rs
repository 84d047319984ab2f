//! AuthorizationPolicy → kernel L4 rules: Istio ambient's fail-closed handling of what L4
//! cannot see, and how `from`, `to` and `when` combine, one behaviour per case.

use sluice_translator::dataplane::{KernelAuthorization, translate_node};
use sluice_translator::diagnostic::Severity;
use sluice_translator::parse::parse_documents;
use sluice_translator::snapshot::Snapshot;

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop, labels: {app: api}}
spec: {containers: [{name: c}], serviceAccountName: api}
status: {podIP: 127.0.6.1}
"#;

/// The authorization of shop/api-1 and the warnings, for one policy `spec` (YAML flow style).
fn translate(action: &str, rules: &str) -> (Option<KernelAuthorization>, Vec<String>) {
    let policy = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: api}}}}\n  action: {action}\n  rules: {rules}\n"
    );
    api_authorization(&format!("{POD}---\n{policy}"))
}

/// The authorization of shop/api-1 in the mesh of `documents`, and the warnings.
fn api_authorization(documents: &str) -> (Option<KernelAuthorization>, Vec<String>) {
    let (objects, diags) = parse_documents("test.yaml", documents);
    assert!(diags.iter().all(|d| d.severity != Severity::Error), "{diags:#?}");
    let (snapshot, _) = Snapshot::build(objects);
    let (node, diagnostics) = translate_node(&snapshot, "n");
    let api = node.workloads.into_iter().find(|w| w.name == "api-1").expect("api-1");
    (api.authorization, diagnostics.iter().map(|d| d.to_string()).collect())
}

#[test]
fn allow_rule_with_http_attributes_never_matches_but_still_denies_by_default() {
    let (a, warnings) = translate("ALLOW", "[{to: [{operation: {methods: [GET]}}]}]");
    let a = a.unwrap();
    assert!(a.default_deny && a.rules.is_empty(), "{a:?}");
    assert_eq!(warnings.len(), 1);
    assert!(
        warnings[0].contains("AuthorizationPolicy/shop/p") && warnings[0].contains("spec.rules[0]"),
        "{warnings:?}"
    );
    assert!(warnings[0].contains("to[0].operation.methods") && warnings[0].contains("does not match"), "{warnings:?}");
}

#[test]
fn deny_rule_with_http_attributes_matches_on_its_l4_part() {
    let (a, warnings) =
        translate("DENY", "[{from: [{source: {namespaces: [legacy]}}], to: [{operation: {paths: [/admin]}}]}]");
    let a = a.unwrap();
    assert!(!a.default_deny);
    assert_eq!(a.rules.len(), 1);
    assert!(a.rules[0].deny && a.rules[0].namespaces == ["legacy"], "{a:?}");
    assert!(warnings[0].contains("matches without it"), "{warnings:?}");
}

#[test]
fn sources_times_operations_with_when_anded_in() {
    let rules = "[{from: [{source: {namespaces: [a, b]}}, {source: {ipBlocks: [192.0.2.0/24]}}], to: [{operation: {ports: ['80']}}, {operation: {ports: ['443']}}], when: [{key: source.namespace, values: [b, c]}]}]";
    let (a, warnings) = translate("ALLOW", rules);
    let a = a.unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    // 2 sources × 2 operations, each with the condition ANDed: namespaces {a,b} ∩ {b,c} = {b};
    // the second source had no namespaces, so the condition's {b,c} applies as is.
    assert_eq!(a.rules.len(), 4);
    assert_eq!((a.rules[0].namespaces.clone(), a.rules[0].ports.clone()), (vec!["b".to_string()], vec![80]));
    assert_eq!((a.rules[1].namespaces.clone(), a.rules[1].ports.clone()), (vec!["b".to_string()], vec![443]));
    assert_eq!(
        (a.rules[2].ip_blocks.clone(), a.rules[2].namespaces.clone()),
        (vec!["192.0.2.0/24".to_string()], vec!["b".to_string(), "c".to_string()])
    );
}

#[test]
fn principal_patterns_fail_closed_by_action() {
    let rules = "[{from: [{source: {principals: ['cluster.local/ns/shop/sa/*']}}]}]";
    let (allow, warnings) = translate("ALLOW", rules);
    assert!(allow.unwrap().rules.is_empty(), "an ALLOW pattern the kernel cannot match allows nothing");
    assert!(warnings[0].contains("ignored (fail closed)"), "{warnings:?}");
    let (deny, warnings) = translate("DENY", rules);
    assert_eq!(deny.unwrap().rules[0].principals, ["*"], "a DENY pattern widens to any identity");
    assert!(warnings[0].contains("treated as \"*\""), "{warnings:?}");
    let exact = "[{from: [{source: {principals: ['cluster.local/ns/shop/sa/web']}}, {source: {serviceAccounts: [web, other/x]}}]}]";
    let exact = translate("ALLOW", exact).0.unwrap();
    assert_eq!(exact.rules[0].principals, ["shop/web"]);
    assert_eq!(exact.rules[1].principals, ["other/x", "shop/web"]);
}

#[test]
fn destination_ip_is_decided_for_the_workload() {
    let (other, _) = translate("ALLOW", "[{when: [{key: destination.ip, values: [127.0.7.0/24]}]}]");
    assert!(other.unwrap().rules.is_empty(), "the condition can never hold for 127.0.6.1");
    let (mine, _) = translate("ALLOW", "[{when: [{key: destination.ip, values: [127.0.6.0/24]}]}]");
    assert_eq!(mine.unwrap().rules.len(), 1);
}

#[test]
fn no_policy_means_nothing_to_enforce() {
    let (objects, _) = parse_documents("test.yaml", POD);
    let (snapshot, _) = Snapshot::build(objects);
    let (node, _) = translate_node(&snapshot, "n");
    assert!(node.workloads[0].authorization.is_none());
    assert!(node.workloads[0].local, "a pod without nodeName belongs to every node");
}

/// shop/api-1's authorization with `peer_authentications` (YAML documents), its own mode
/// `mode` (a `sluice.io/dataplane` value), and a kernel-mode caller in the mesh.
fn translate_mtls(peer_authentications: &str, mode: &str) -> (Option<KernelAuthorization>, Vec<String>) {
    let pod = POD.replace("labels: {app: api}", &format!("labels: {{app: api, sluice.io/dataplane: {mode}}}"));
    let caller = POD.replace("api-1", "web-1").replace("app: api", "app: web").replace("127.0.6.1", "127.0.6.2");
    api_authorization(&format!("{pod}---\n{caller}---\n{peer_authentications}"))
}

#[test]
fn strict_mtls_ports_refuse_the_kernel_paths_plaintext_on_exactly_those_ports() {
    let pa = |spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: pa, namespace: shop}}\nspec: {spec}\n"
        )
    };
    // A sidecar workload STRICT but on 8080: kernel callers are refused on every other port.
    let (auth, warnings) = translate_mtls(
        &pa("{selector: {matchLabels: {app: api}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}}"),
        "sidecar",
    );
    let auth = auth.expect("a set holding the STRICT rule");
    assert!(!auth.default_deny);
    let rule = &auth.rules[0];
    assert!(rule.deny && rule.ports.is_empty() && rule.not_ports == [8080] && rule.principals.is_empty(), "{rule:?}");
    assert_eq!(rule.policy, "shop/pa");
    let warning = warnings.iter().find(|w| w.contains("requires mTLS")).expect("a warning");
    assert!(
        warning.contains("shop/api-1 requires mTLS on every port but [8080]") && warning.contains("shop/web-1"),
        "{warning}"
    );
    // PERMISSIVE but STRICT on 9090: refused there only.
    let (auth, _) =
        translate_mtls(&pa("{selector: {matchLabels: {app: api}}, portLevelMtls: {9090: {mode: STRICT}}}"), "sidecar");
    let rule = &auth.unwrap().rules[0];
    assert!(rule.deny && rule.ports == [9090] && rule.not_ports.is_empty(), "{rule:?}");
    // Nothing STRICT: nothing to enforce for a sidecar workload.
    assert_eq!(translate_mtls(&pa("{mtls: {mode: PERMISSIVE}}"), "sidecar").0, None);
    // A kernel-mode workload STRICT: the rule comes first, before its policies' rules.
    let (auth, warnings) = translate_mtls(&pa("{mtls: {mode: STRICT}}"), "kernel");
    assert!(auth.unwrap().rules[0].deny);
    assert!(warnings.iter().any(|w| w.contains("drops connections from off the node")), "{warnings:?}");
}

#[test]
fn custom_fails_closed_audit_and_dry_runs_enforce_nothing() {
    // CUSTOM: what its rules match is refused, as a DENY would (no ext_authz in the kernel).
    let custom = format!(
        "{POD}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ext, namespace: shop}}\n\
         spec: {{selector: {{matchLabels: {{app: api}}}}, action: CUSTOM, provider: {{name: x}}, rules: [{{to: [{{operation: {{ports: [\"8080\"]}}}}]}}]}}\n"
    );
    let (a, warnings) = api_authorization(&custom);
    let a = a.expect("enforced");
    assert!(!a.default_deny && a.rules.len() == 1 && a.rules[0].deny && a.rules[0].ports == [8080], "{a:?}");
    assert!(warnings.iter().any(|w| w.contains("CUSTOM") && w.contains("refused (fail closed)")), "{warnings:?}");
    // AUDIT: nothing enforced, and said.
    let (a, warnings) = translate("AUDIT", "[{to: [{operation: {ports: [\"8080\"]}}]}]");
    assert!(a.is_none(), "{a:?}");
    assert!(warnings.iter().any(|w| w.contains("AUDIT is not logged by the kernel path")), "{warnings:?}");
    // A dry-run ALLOW does not turn on default deny.
    let dry = format!(
        "{POD}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: d, namespace: shop, annotations: {{istio.io/dry-run: \"true\"}}}}\n\
         spec: {{selector: {{matchLabels: {{app: api}}}}, rules: [{{to: [{{operation: {{ports: [\"8080\"]}}}}]}}]}}\n"
    );
    assert!(api_authorization(&dry).0.is_none());
}

#[test]
fn trust_domains_are_decided_against_the_meshs() {
    // Every kernel-path peer is a workload of this mesh (cluster.local).
    let (a, _) = translate("ALLOW", "[{from: [{source: {trustDomains: [cluster.local]}}]}]");
    assert_eq!(a.unwrap().rules.len(), 1, "our trust domain: the rule holds");
    let (a, _) = translate("ALLOW", "[{from: [{source: {trustDomains: [partner.example]}}]}]");
    let a = a.unwrap();
    assert!(a.default_deny && a.rules.is_empty(), "another trust domain: nobody on the kernel path: {a:?}");
    let (a, _) = translate("DENY", "[{from: [{source: {notTrustDomains: [\"cluster.*\"]}}]}]");
    assert!(a.unwrap().rules.is_empty(), "a DENY of other trust domains matches no kernel-path peer");
    let (a, _) = translate("DENY", "[{when: [{key: source.trustDomain, values: [\"*.local\"]}]}]");
    assert_eq!(a.unwrap().rules.len(), 1);
}
