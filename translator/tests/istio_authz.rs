//! Istio's AuthorizationPolicy → RBAC golden pairs (`tests/istio-authz/`, see its README),
//! compared by meaning. For each pair, sluice translates the same policies for the same workload;
//! then Istio's RBAC filters and sluice's are both evaluated — by a small RBAC evaluator here,
//! which follows Envoy's matcher semantics and reads istio-proxy's own matchers as what they
//! mean — on requests generated from the values the policies name (each value, its wildcard
//! expansions, and values that match nothing). Every request must get the same decision: allowed
//! or denied, logged or not (AUDIT), and the same dry-run results.
//!
//! A request may carry a verified JWT (its principal, audience, presenter and the claims the
//! policies name): Istio's filters read it as istio-proxy's `istio_authn` metadata, sluice's as
//! upstream Envoy's `jwt_authn` payload.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;
use sluice_translator::diagnostic::Severity;
use sluice_translator::envoy::{Certificates, translate_sidecar};
use sluice_translator::model::mesh_config::MeshConfig;
use sluice_translator::parse::parse_documents;
use sluice_translator::snapshot::Snapshot;

/// Istio's test workload: `foo/httpbin`, labels `app: httpbin, version: v1`, an HTTP port (80)
/// and a TCP port (9000).
const WORKLOAD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: foo}
spec:
  clusterIP: 127.100.7.1
  selector: {app: httpbin}
  ports: [{name: http, port: 8000, targetPort: 80}, {name: tcp, port: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: my-custom-ext-authz, namespace: foo}
spec:
  clusterIP: 127.100.7.2
  ports: [{name: http, port: 9000}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: httpbin-1, namespace: foo, labels: {kubernetes.io/service-name: httpbin}}
addressType: IPv4
ports: [{name: http, port: 80}, {name: tcp, port: 9000}]
endpoints:
- addresses: [127.0.7.1]
  targetRef: {kind: Pod, name: httpbin-v1, namespace: foo}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin-v1, namespace: foo, labels: {app: httpbin, version: v1}}
spec: {containers: [{name: c}]}
status: {podIP: 127.0.7.1}
"#;

const PROXY: &str = "sidecar~127.0.7.1~httpbin-v1.foo~foo.svc.cluster.local";

/// One pair: the input, Istio's filters in chain order, the chain, and the trust domain bundle
/// istiod built with (the trust domain, then its aliases).
struct Pair {
    input: &'static str,
    outputs: &'static [&'static str],
    tcp: bool,
    bundle: &'static [&'static str],
    /// The MeshConfig (its extension providers) istiod built with; empty for none.
    mesh: &'static str,
}

/// builder_test.go's `meshConfigHTTP`.
const MESH_HTTP: &str = r#"
extensionProviders:
- name: default
  envoyExtAuthzHttp:
    service: foo/my-custom-ext-authz.foo.svc.cluster.local
    port: 9000
    timeout: 10s
    failOpen: true
    statusOnError: "403"
    pathPrefix: /check
    includeRequestHeadersInCheck: [x-custom-id, x-prefix-*, "*-suffix"]
    includeHeadersInCheck: [should-not-include-when-IncludeRequestHeadersInCheck-is-set]
    includeAdditionalHeadersInCheck: {x-header-1: value-1, x-header-2: value-2}
    includeRequestBodyInCheck: {maxRequestBytes: 2048, allowPartialMessage: true, packAsBytes: true}
    headersToUpstreamOnAllow: [Authorization, x-prefix-*, "*-suffix"]
    headersToDownstreamOnDeny: [Set-cookie, x-prefix-*, "*-suffix"]
"#;

/// builder_test.go's `meshConfigGRPC`.
const MESH_GRPC: &str = r#"
extensionProviders:
- name: default
  envoyExtAuthzGrpc:
    service: foo/my-custom-ext-authz.foo.svc.cluster.local
    port: 9000
    timeout: 0.002s
    failOpen: true
    statusOnError: "403"
    includeRequestBodyInCheck: {maxRequestBytes: 4096, allowPartialMessage: true}
"#;

const PAIRS: &[Pair] = &[
    Pair {
        input: "http/allow-empty-rule-in.yaml",
        outputs: &["http/allow-empty-rule-out.yaml"],
        tcp: false,
        bundle: &[],
        mesh: "",
    },
    Pair {
        input: "http/allow-nil-rule-in.yaml",
        outputs: &["http/allow-nil-rule-out.yaml"],
        tcp: false,
        bundle: &[],
        mesh: "",
    },
    Pair {
        input: "http/allow-path-in.yaml",
        outputs: &["http/allow-path-out.yaml"],
        tcp: false,
        bundle: &[],
        mesh: "",
    },
    Pair {
        input: "http/deny-and-allow-in.yaml",
        outputs: &["http/deny-and-allow-out1.yaml", "http/deny-and-allow-out2.yaml"],
        tcp: false,
        bundle: &[],
        mesh: "",
    },
    Pair {
        input: "http/deny-empty-rule-in.yaml",
        outputs: &["http/deny-empty-rule-out.yaml"],
        tcp: false,
        bundle: &[],
        mesh: "",
    },
    Pair {
        input: "http/dry-run-allow-in.yaml",
        outputs: &["http/dry-run-allow-out.yaml"],
        tcp: false,
        bundle: &[],
        mesh: "",
    },
    Pair {
        input: "http/dry-run-allow-and-deny-in.yaml",
        outputs: &["http/dry-run-allow-and-deny-out1.yaml", "http/dry-run-allow-and-deny-out2.yaml"],
        tcp: false,
        bundle: &[],
        mesh: "",
    },
    Pair {
        input: "http/dry-run-mix-in.yaml",
        outputs: &["http/dry-run-mix-out.yaml"],
        tcp: false,
        bundle: &[],
        mesh: "",
    },
    Pair {
        input: "http/multiple-policies-in.yaml",
        outputs: &["http/multiple-policies-out.yaml"],
        tcp: false,
        bundle: &[],
        mesh: "",
    },
    Pair {
        input: "http/single-policy-in.yaml",
        outputs: &["http/single-policy-out.yaml"],
        tcp: false,
        bundle: &[],
        mesh: "",
    },
    Pair {
        input: "http/simple-policy-td-aliases-in.yaml",
        outputs: &["http/simple-policy-td-aliases-out.yaml"],
        tcp: false,
        bundle: &["td1", "cluster.local"],
        mesh: "",
    },
    Pair {
        input: "http/simple-policy-multiple-td-aliases-in.yaml",
        outputs: &["http/simple-policy-multiple-td-aliases-out.yaml"],
        tcp: false,
        bundle: &["td1", "cluster.local", "some-td"],
        mesh: "",
    },
    Pair {
        input: "http/simple-policy-principal-with-wildcard-in.yaml",
        outputs: &["http/simple-policy-principal-with-wildcard-out.yaml"],
        tcp: false,
        bundle: &["td1", "foobar"],
        mesh: "",
    },
    Pair {
        input: "http/td-aliases-source-principal-in.yaml",
        outputs: &["http/td-aliases-source-principal-out.yaml"],
        tcp: false,
        bundle: &["new-td", "old-td", "some-trustdomain"],
        mesh: "",
    },
    Pair {
        input: "http/trust-domains-in.yaml",
        outputs: &["http/extended-trust-domains-out.yaml"],
        tcp: false,
        bundle: &[],
        mesh: "",
    },
    Pair {
        input: "http/custom-simple-http-in.yaml",
        outputs: &["http/custom-bad-out.yaml"],
        tcp: false,
        bundle: &[],
        mesh: "",
    },
    Pair {
        input: "http/custom-bad-multiple-providers-in.yaml",
        outputs: &["http/custom-bad-out.yaml"],
        tcp: false,
        bundle: &[],
        mesh: MESH_HTTP,
    },
    Pair {
        input: "http/custom-simple-http-in.yaml",
        outputs: &["http/custom-http-provider-out1.yaml", "http/custom-http-provider-out2.yaml"],
        tcp: false,
        bundle: &[],
        mesh: MESH_HTTP,
    },
    Pair {
        input: "http/custom-simple-http-in.yaml",
        outputs: &["http/custom-grpc-provider-out1.yaml", "http/custom-grpc-provider-out2.yaml"],
        tcp: false,
        bundle: &[],
        mesh: MESH_GRPC,
    },
    // Not Istio's file: allow-full-rule's values one field per rule (see the files' comments).
    Pair {
        input: "derived/wildcards-in.yaml",
        outputs: &["derived/wildcards-out.yaml", "derived/wildcards-out2.yaml"],
        tcp: false,
        bundle: &["new-td", "old-td", "some-trustdomain"],
        mesh: "",
    },
    Pair {
        input: "tcp/allow-both-http-tcp-in.yaml",
        outputs: &["tcp/allow-both-http-tcp-out.yaml"],
        tcp: true,
        bundle: &[],
        mesh: "",
    },
    Pair {
        input: "tcp/allow-only-http-in.yaml",
        outputs: &["tcp/allow-only-http-out.yaml"],
        tcp: true,
        bundle: &[],
        mesh: "",
    },
    Pair {
        input: "tcp/audit-both-http-tcp-in.yaml",
        outputs: &["tcp/audit-both-http-tcp-out.yaml"],
        tcp: true,
        bundle: &[],
        mesh: "",
    },
    Pair {
        input: "tcp/deny-both-http-tcp-in.yaml",
        outputs: &["tcp/deny-both-http-tcp-out.yaml"],
        tcp: true,
        bundle: &[],
        mesh: "",
    },
    Pair { input: "tcp/dry-run-mix-in.yaml", outputs: &["tcp/dry-run-mix-out.yaml"], tcp: true, bundle: &[], mesh: "" },
];

fn read(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/istio-authz").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `camelCase` → `snake_case`.
fn snake(key: &str) -> String {
    let mut out = String::new();
    for c in key.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Protobuf JSON (camelCase) as Envoy's field names; policy names (the keys of `policies`) stay.
fn normalized(v: Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let v = if k == "policies" {
                        match v {
                            Value::Object(p) => Value::Object(p.into_iter().map(|(n, p)| (n, normalized(p))).collect()),
                            other => other,
                        }
                    } else {
                        normalized(v)
                    };
                    (snake(&k), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(normalized).collect()),
        other => other,
    }
}

/// Istio's filters (their `typed_config`) for a pair.
fn istio_filters(pair: &Pair) -> Vec<Value> {
    pair.outputs
        .iter()
        .map(|f| {
            let y: serde_yaml_ng::Value = serde_yaml_ng::from_str(&read(f)).expect("YAML");
            let v: Value = serde_json::to_value(y).expect("JSON");
            normalized(v)["typed_config"].clone()
        })
        .collect()
}

/// sluice's RBAC filters (their `typed_config`) on the workload's HTTP or TCP inbound chain.
fn sluice_filters(pair: &Pair) -> Vec<Value> {
    let (objects, diagnostics) = parse_documents(pair.input, &format!("{WORKLOAD}\n---\n{}", read(pair.input)));
    let errors: Vec<_> = diagnostics.iter().filter(|d| d.severity == Severity::Error).collect();
    assert!(errors.is_empty(), "{}: {errors:#?}", pair.input);
    let (mut snapshot, _) = Snapshot::build(objects);
    let mut mesh = MeshConfig::from_yaml(pair.mesh).expect("MeshConfig").0;
    if let Some((td, aliases)) = pair.bundle.split_first() {
        mesh.trust_domain = td.to_string();
        mesh.trust_domain_aliases = aliases.iter().map(|a| a.to_string()).collect();
    }
    snapshot.mesh = std::sync::Arc::new(mesh);
    let r = translate_sidecar(&snapshot, PROXY, Certificates::None).expect("translate");
    let inbound = &r.listeners.iter().find(|l| l.name == "virtualInbound").expect("virtualInbound").body;
    let port = if pair.tcp { 9000 } else { 80 };
    let chain = inbound["filter_chains"]
        .as_array()
        .expect("chains")
        .iter()
        .find(|c| c["filter_chain_match"]["destination_port"] == port)
        .unwrap_or_else(|| panic!("no inbound chain for port {port}"));
    let filters = chain["filters"].as_array().expect("filters");
    let list = match filters.iter().find(|f| f["name"] == "envoy.filters.network.http_connection_manager") {
        Some(hcm) => hcm["typed_config"]["http_filters"].as_array().expect("http filters").clone(),
        None => filters.clone(),
    };
    list.into_iter()
        .filter(|f| f["name"].as_str().is_some_and(|n| n.ends_with(".rbac") || n.ends_with(".ext_authz")))
        .map(|f| f["typed_config"].clone())
        .collect()
}

/// What a request looks like to the RBAC filters.
#[derive(Debug, Clone)]
struct Request {
    principal: Option<String>,
    direct_ip: IpAddr,
    remote_ip: IpAddr,
    destination_ip: IpAddr,
    destination_port: u32,
    sni: Option<String>,
    /// Lower-case names (with `:method`, `:authority`, `:path`).
    headers: BTreeMap<String, String>,
    /// Dynamic metadata: filter → key → value.
    metadata: BTreeMap<String, BTreeMap<String, String>>,
    /// The payload of a verified JWT, if the request carries one.
    jwt: Option<Value>,
}

thread_local! {
    static REGEXES: RefCell<HashMap<String, regex::Regex>> = RefCell::new(HashMap::new());
}

/// RE2 full match, as Envoy's `safe_regex`.
fn full_match(pattern: &str, s: &str) -> bool {
    REGEXES.with(|cache| {
        let mut cache = cache.borrow_mut();
        let re = cache
            .entry(pattern.to_string())
            .or_insert_with(|| regex::Regex::new(&format!("^(?:{pattern})$")).expect("regex"));
        re.is_match(s)
    })
}

/// `envoy.type.matcher.v3.StringMatcher`.
fn string_matches(m: &Value, s: &str) -> bool {
    let ic = m["ignore_case"].as_bool().unwrap_or(false);
    let (s, fold) = if ic { (s.to_lowercase(), true) } else { (s.to_string(), false) };
    let text = |v: &Value| {
        let t = v.as_str().expect("string").to_string();
        if fold { t.to_lowercase() } else { t }
    };
    if let Some(v) = m.get("exact") {
        return s == text(v);
    }
    if let Some(v) = m.get("prefix") {
        return s.starts_with(&text(v));
    }
    if let Some(v) = m.get("suffix") {
        return s.ends_with(&text(v));
    }
    if let Some(v) = m.get("contains") {
        return s.contains(&text(v));
    }
    if let Some(r) = m.get("safe_regex") {
        return full_match(r["regex"].as_str().expect("regex"), &s);
    }
    panic!("unknown string matcher {m}")
}

/// `envoy.config.route.v3.HeaderMatcher`, with the older direct fields.
fn header_matches(h: &Value, r: &Request) -> bool {
    let name = h["name"].as_str().expect("name").to_lowercase();
    let value = r.headers.get(&name);
    let matched = match value {
        None => false,
        Some(v) => {
            if h["present_match"] == Value::Bool(true) {
                true
            } else if let Some(m) = h.get("string_match") {
                string_matches(m, v)
            } else if let Some(x) = h.get("exact_match") {
                v == x.as_str().unwrap()
            } else if let Some(x) = h.get("prefix_match") {
                v.starts_with(x.as_str().unwrap())
            } else if let Some(x) = h.get("suffix_match") {
                v.ends_with(x.as_str().unwrap())
            } else if let Some(x) = h.get("safe_regex_match") {
                full_match(x["regex"].as_str().unwrap(), v)
            } else {
                panic!("unknown header matcher {h}")
            }
        }
    };
    matched != h["invert_match"].as_bool().unwrap_or(false)
}

fn cidr_contains(c: &Value, ip: IpAddr) -> bool {
    let net: ipnet::IpNet =
        format!("{}/{}", c["address_prefix"].as_str().unwrap(), c["prefix_len"].as_u64().unwrap_or(32))
            .parse()
            .unwrap();
    net.contains(&ip)
}

/// The JWT payload as the metadata holds it: `scope` and `permission` strings split at spaces
/// (Envoy's `normalize_payload_in_metadata`, istio-proxy's default).
fn normalized_payload(payload: &Value) -> Value {
    let mut p = payload.clone();
    for claim in ["scope", "permission"] {
        if let Some(s) = p.get(claim).and_then(Value::as_str) {
            p[claim] = s.split(' ').filter(|x| !x.is_empty()).collect();
        }
    }
    p
}

/// Dynamic metadata: istio-proxy's `istio_authn` (the peer's principal and namespace, the JWT's
/// principal, audience, presenter and claims), upstream Envoy's `jwt_authn` payload, else what
/// the request carries.
fn metadata_matches(m: &Value, r: &Request) -> bool {
    let filter = m["filter"].as_str().unwrap();
    let keys: Vec<&str> = m["path"].as_array().unwrap().iter().map(|k| k["key"].as_str().unwrap()).collect();
    let payload = r.jwt.as_ref().map(normalized_payload);
    let claim = |path: &[&str]| path.iter().try_fold(payload.as_ref()?, |v, k| v.get(*k)).cloned();
    let value: Option<Value> = match filter {
        "istio_authn" => {
            let principal = r.principal.as_deref().map(|p| p.trim_start_matches("spiffe://").to_string());
            match keys.as_slice() {
                ["source.principal"] => principal.map(Value::from),
                ["source.namespace"] => {
                    principal.and_then(|p| p.split("/ns/").nth(1).map(|n| Value::from(n.split('/').next().unwrap())))
                }
                ["request.auth.principal"] => payload.as_ref().map(|p| {
                    Value::from(format!("{}/{}", p["iss"].as_str().unwrap_or(""), p["sub"].as_str().unwrap_or("")))
                }),
                ["request.auth.audiences"] => claim(&["aud"]),
                ["request.auth.presenter"] => claim(&["azp"]),
                // istio-proxy holds every claim as a list of strings.
                ["request.auth.claims", path @ ..] => claim(path).map(|v| match v {
                    Value::Array(_) => v,
                    other => Value::Array(vec![other]),
                }),
                _ => None,
            }
        }
        "envoy.filters.http.jwt_authn" => match keys.as_slice() {
            ["jwt_payload", path @ ..] => claim(path),
            _ => None,
        },
        _ if keys.len() == 1 => r.metadata.get(filter).and_then(|m| m.get(keys[0])).cloned().map(Value::from),
        _ => None,
    };
    let matched = value.is_some_and(|v| value_matches(&m["value"], &v));
    matched != m["invert"].as_bool().unwrap_or(false)
}

/// `envoy.type.matcher.v3.ValueMatcher`.
fn value_matches(matcher: &Value, v: &Value) -> bool {
    if let Some(s) = matcher.get("string_match") {
        v.as_str().is_some_and(|v| string_matches(s, v))
    } else if let Some(l) = matcher.get("list_match") {
        v.as_array().is_some_and(|items| items.iter().any(|i| value_matches(&l["one_of"], i)))
    } else if let Some(o) = matcher.get("or_match") {
        o["value_matchers"].as_array().unwrap().iter().any(|m| value_matches(m, v))
    } else if matcher.get("present_match").is_some() {
        true
    } else {
        panic!("unknown metadata value matcher {matcher}")
    }
}

/// Envoy's URI template match: `*` one segment, `**` any number of them (last).
fn template_matches(template: &str, path: &str) -> bool {
    let t: Vec<&str> = template.trim_start_matches('/').split('/').collect();
    let p: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    fn go(t: &[&str], p: &[&str]) -> bool {
        match (t.first(), p.first()) {
            (None, None) => true,
            (Some(&"**"), _) => (0..=p.len()).any(|k| go(&t[1..], &p[k..])),
            (Some(&"*"), Some(seg)) => !seg.is_empty() && go(&t[1..], &p[1..]),
            (Some(lit), Some(seg)) => lit == seg && go(&t[1..], &p[1..]),
            _ => false,
        }
    }
    go(&t, &p)
}

fn permission(p: &Value, r: &Request) -> bool {
    let path = r.headers.get(":path").map(|p| p.split('?').next().unwrap().to_string()).unwrap_or_default();
    if p.get("any").is_some() {
        return true;
    }
    if let Some(a) = p.get("and_rules") {
        return a["rules"].as_array().unwrap().iter().all(|x| permission(x, r));
    }
    if let Some(o) = p.get("or_rules") {
        return o["rules"].as_array().unwrap().iter().any(|x| permission(x, r));
    }
    if let Some(n) = p.get("not_rule") {
        return !permission(n, r);
    }
    if let Some(h) = p.get("header") {
        return header_matches(h, r);
    }
    if let Some(u) = p.get("url_path") {
        return string_matches(&u["path"], &path);
    }
    if let Some(t) = p.get("uri_template") {
        return template_matches(t["typed_config"]["path_template"].as_str().unwrap(), &path);
    }
    if let Some(port) = p.get("destination_port") {
        return port.as_u64() == Some(u64::from(r.destination_port));
    }
    if let Some(c) = p.get("destination_ip") {
        return cidr_contains(c, r.destination_ip);
    }
    if let Some(m) = p.get("requested_server_name") {
        return r.sni.as_deref().is_some_and(|s| string_matches(m, s));
    }
    if let Some(m) = p.get("metadata") {
        return metadata_matches(m, r);
    }
    panic!("unknown permission {p}")
}

fn principal(p: &Value, r: &Request) -> bool {
    if p.get("any").is_some() {
        return true;
    }
    if let Some(a) = p.get("and_ids") {
        return a["ids"].as_array().unwrap().iter().all(|x| principal(x, r));
    }
    if let Some(o) = p.get("or_ids") {
        return o["ids"].as_array().unwrap().iter().any(|x| principal(x, r));
    }
    if let Some(n) = p.get("not_id") {
        return !principal(n, r);
    }
    if let Some(a) = p.get("authenticated") {
        return match (&r.principal, a.get("principal_name")) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(name), Some(m)) => string_matches(m, name),
        };
    }
    if let Some(c) = p.get("direct_remote_ip").or_else(|| p.get("source_ip")) {
        return cidr_contains(c, r.direct_ip);
    }
    if let Some(c) = p.get("remote_ip") {
        return cidr_contains(c, r.remote_ip);
    }
    if let Some(h) = p.get("header") {
        return header_matches(h, r);
    }
    if let Some(m) = p.get("metadata") {
        return metadata_matches(m, r);
    }
    if let Some(f) = p.get("filter_state") {
        // istio-proxy keeps the peer's principal here.
        assert_eq!(f["key"], "io.istio.peer_principal", "unknown filter state {f}");
        return r.principal.as_deref().is_some_and(|name| string_matches(&f["string_match"], name));
    }
    panic!("unknown principal {p}")
}

/// Whether some policy of an RBAC config (`rules` or `shadow_rules`) matches.
fn some_policy_matches(rules: &Value, r: &Request) -> bool {
    rules["policies"].as_object().into_iter().flatten().any(|(_, p)| {
        p["permissions"].as_array().unwrap().iter().any(|x| permission(x, r))
            && p["principals"].as_array().unwrap().iter().any(|x| principal(x, r))
    })
}

/// What a chain of RBAC filters decides for a request.
#[derive(Debug, PartialEq)]
struct Outcome {
    allowed: bool,
    logged: bool,
    /// Per dry-run config reached, in chain order (the one that enables ext_authz aside): its
    /// action and whether a policy matched.
    shadow: Vec<(String, bool)>,
    /// The authorizer the request is sent to (its cluster), if an ext_authz filter is enabled
    /// for it.
    checked_by: Option<String>,
}

/// The policy of an RBAC config that matches a request first, by name.
fn matching_policy(rules: &Value, r: &Request) -> Option<String> {
    rules["policies"].as_object().into_iter().flatten().find_map(|(name, p)| {
        let matched = p["permissions"].as_array().unwrap().iter().any(|x| permission(x, r))
            && p["principals"].as_array().unwrap().iter().any(|x| principal(x, r));
        matched.then(|| name.clone())
    })
}

fn decide(filters: &[Value], r: &Request) -> Outcome {
    let mut outcome = Outcome { allowed: true, logged: false, shadow: Vec::new(), checked_by: None };
    // The RBAC filters' metadata: `<shadow stat prefix>shadow_effective_policy_id` → policy.
    let mut rbac_metadata: BTreeMap<String, String> = BTreeMap::new();
    for f in filters {
        if let Some(service) = f.get("http_service").or_else(|| f.get("grpc_service")) {
            let enabled = &f["filter_enabled_metadata"];
            assert_eq!(enabled["filter"], "envoy.filters.http.rbac", "{f}");
            let key = enabled["path"][0]["key"].as_str().unwrap();
            if rbac_metadata.get(key).is_some_and(|id| string_matches(&enabled["value"]["string_match"], id)) {
                let cluster =
                    service["server_uri"]["cluster"].as_str().or(service["envoy_grpc"]["cluster_name"].as_str());
                outcome.checked_by = cluster.map(str::to_string);
            }
            continue;
        }
        if let Some(shadow) = f.get("shadow_rules") {
            let prefix = f["shadow_rules_stat_prefix"].as_str().unwrap_or("");
            let matched = matching_policy(shadow, r);
            if let Some(id) = &matched {
                rbac_metadata.insert(format!("{prefix}shadow_effective_policy_id"), id.clone());
            }
            // The shadow rules that only enable ext_authz are not a dry run.
            if !shadow["policies"].as_object().is_some_and(|p| p.keys().all(|n| n.starts_with("istio-ext-authz"))) {
                let action = shadow["action"].as_str().unwrap_or("ALLOW").to_string();
                outcome.shadow.push((action, matched.is_some()));
            }
        }
        let Some(rules) = f.get("rules") else { continue };
        let matched = some_policy_matches(rules, r);
        match rules["action"].as_str().unwrap_or("ALLOW") {
            "ALLOW" if !matched => outcome.allowed = false,
            "DENY" if matched => outcome.allowed = false,
            "LOG" => outcome.logged |= matched,
            _ => {}
        }
        if !outcome.allowed {
            break;
        }
    }
    outcome
}

/// The values the input's policies name, by the request attribute each is about: a source or
/// operation field by its name, a `when` condition by its key.
fn values_by_attribute(input: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut add = |field: &str, values: &Value| {
        let attribute = match field.strip_prefix("not").map(|f| f[..1].to_lowercase() + &f[1..]) {
            Some(positive) if !field.starts_with("notValues") => positive,
            _ => field.to_string(),
        };
        for v in values.as_array().into_iter().flatten().filter_map(Value::as_str) {
            out.entry(attribute.clone()).or_default().insert(v.to_string());
        }
    };
    for doc in serde_yaml_ng::Deserializer::from_str(input) {
        let y = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc).expect("YAML");
        let v: Value = serde_json::to_value(y).expect("JSON");
        for rule in v["spec"]["rules"].as_array().into_iter().flatten() {
            for (list, inner) in [("from", "source"), ("to", "operation")] {
                for entry in rule[list].as_array().into_iter().flatten() {
                    for (field, values) in entry[inner].as_object().into_iter().flatten() {
                        add(field, values);
                    }
                }
            }
            for c in rule["when"].as_array().into_iter().flatten() {
                let key = c["key"].as_str().expect("key");
                add(key, &c["values"]);
                add(key, &c["notValues"]);
            }
        }
    }
    out
}

/// A value, what its wildcards and path templates stand for, and near misses (one character
/// more at either end).
fn variants(s: &str) -> Vec<String> {
    let expanded = s.replace("{**}", "a/b").replace("{*}", "seg").replace('*', "zz");
    let mut out = vec![s.to_string(), format!("{expanded}x"), format!("x{expanded}"), expanded];
    out.push(s.trim_matches('*').to_string());
    out.retain(|v| !v.is_empty());
    out.dedup();
    out
}

/// The values each attribute of a generated request is picked from: those the policies name
/// for it, their variants, and values none names.
struct Candidates {
    principals: Vec<Option<String>>,
    ips: Vec<IpAddr>,
    ports: Vec<u32>,
    methods: Vec<String>,
    hosts: Vec<String>,
    paths: Vec<String>,
    sni: Vec<Option<String>>,
    metadata: Vec<Option<String>>,
    /// Header name → its values.
    headers: Vec<(String, Vec<Option<String>>)>,
    /// JWT `iss`/`sub` pairs (None: no token).
    jwt_principals: Vec<Option<(String, String)>>,
    /// JWT `aud`, `azp`, and each claim path with its values.
    audiences: Vec<Option<String>>,
    presenters: Vec<Option<String>>,
    claims: Vec<(Vec<String>, Vec<Option<String>>)>,
}

fn candidates(input: &str, bundle: &[&str]) -> Candidates {
    let named = values_by_attribute(input);
    let of = |attributes: &[&str]| -> Vec<String> {
        let mut out: BTreeSet<String> = ["other".to_string()].into();
        for a in attributes {
            for v in named.get(*a).into_iter().flatten() {
                out.extend(variants(v));
            }
        }
        out.into_iter().collect()
    };
    let optional = |values: Vec<String>| std::iter::once(None).chain(values.into_iter().map(Some)).collect::<Vec<_>>();
    let domains: Vec<&str> = bundle.iter().copied().chain(["cluster.local", "other-td"]).collect();
    let mut principals: BTreeSet<String> = BTreeSet::new();
    for x in of(&["principals", "source.principal"]) {
        principals.insert(format!("spiffe://{x}"));
        let parts: Vec<&str> = x.split('/').collect();
        if parts.len() == 5 {
            for d in &domains {
                principals.insert(format!("spiffe://{d}/{}", parts[1..].join("/")));
            }
        }
    }
    for x in of(&["namespaces", "source.namespace"]) {
        principals.insert(format!("spiffe://cluster.local/ns/{x}/sa/sa"));
    }
    for x in of(&["serviceAccounts", "source.serviceAccount"]) {
        // `ns/sa`, or `sa` in the policy's namespace, in any trust domain.
        let (ns, sa) = x.split_once('/').unwrap_or(("foo", &x));
        for d in &domains {
            principals.insert(format!("spiffe://{d}/ns/{ns}/sa/{sa}"));
        }
    }
    for x in of(&["trustDomains", "source.trustDomain"]).into_iter().chain(domains.iter().map(|d| d.to_string())) {
        principals.insert(format!("spiffe://{x}/ns/ns/sa/sa"));
    }
    let mut ips: BTreeSet<IpAddr> = ["127.0.0.1".parse().unwrap()].into();
    for v in of(&["ipBlocks", "remoteIpBlocks", "source.ip", "remote.ip", "destination.ip"]) {
        if let Ok(net) = v.parse::<ipnet::IpNet>().or_else(|_| v.parse::<IpAddr>().map(ipnet::IpNet::from)) {
            ips.insert(net.network());
            if let IpAddr::V4(a) = net.network() {
                ips.insert(IpAddr::V4((u32::from(a) + 1).into()));
            }
        }
    }
    let mut ports: BTreeSet<u32> = [12345].into();
    for v in of(&["ports", "destination.port"]) {
        if let Ok(p) = v.parse::<u32>() {
            ports.extend([p, p + 1]);
        }
    }
    let mut methods = of(&["methods", "request.headers[:method]"]);
    methods.push("GET".into());
    let paths = of(&["paths"]).into_iter().map(|p| if p.starts_with('/') { p } else { format!("/{p}") }).collect();
    let headers = named
        .keys()
        .filter_map(|k| k.strip_prefix("request.headers[")?.strip_suffix(']'))
        .filter(|name| !name.starts_with(':'))
        .map(|name| (name.to_lowercase(), optional(of(&[&format!("request.headers[{name}]")]))))
        .collect();
    // A request principal is `<iss>/<sub>`, split at the last `/`.
    let jwt_principals = std::iter::once(None)
        .chain(of(&["requestPrincipals", "request.auth.principal"]).into_iter().map(|v| {
            let (iss, sub) = v.rsplit_once('/').unwrap_or((&v, "sub"));
            Some((iss.to_string(), sub.to_string()))
        }))
        .collect();
    let claims = named
        .keys()
        .filter_map(|k| k.strip_prefix("request.auth.claims[")?.strip_suffix(']').map(|inner| (k, inner)))
        .map(|(k, inner)| (inner.split("][").map(str::to_string).collect(), optional(of(&[k]))))
        .collect();
    Candidates {
        jwt_principals,
        audiences: optional(of(&["request.auth.audiences"])),
        presenters: optional(of(&["request.auth.presenter"])),
        claims,
        principals: std::iter::once(None).chain(principals.into_iter().map(Some)).collect(),
        ips: ips.into_iter().collect(),
        ports: ports.into_iter().collect(),
        methods,
        hosts: of(&["hosts"]),
        paths,
        sni: optional(of(&["connection.sni"])),
        metadata: optional(of(&["experimental.envoy.filters.a.b[c]"])),
        headers,
    }
}

fn requests(c: &Candidates) -> impl Strategy<Value = Request> + use<> {
    let ip = prop::sample::select(c.ips.clone());
    let names: Vec<String> = c.headers.iter().map(|(n, _)| n.clone()).collect();
    let header_values: Vec<_> = c.headers.iter().map(|(_, v)| prop::sample::select(v.clone())).collect();
    let claim_paths: Vec<Vec<String>> = c.claims.iter().map(|(p, _)| p.clone()).collect();
    // A claim is a string, or a list holding it.
    let claim_values: Vec<_> = c.claims.iter().map(|(_, v)| (prop::sample::select(v.clone()), any::<bool>())).collect();
    (
        prop::sample::select(c.principals.clone()),
        (ip.clone(), ip.clone(), ip),
        prop::sample::select(c.ports.clone()),
        (
            prop::sample::select(c.methods.clone()),
            prop::sample::select(c.hosts.clone()),
            prop::sample::select(c.paths.clone()),
        ),
        prop::sample::select(c.sni.clone()),
        header_values,
        prop::sample::select(c.metadata.clone()),
        (
            prop::sample::select(c.jwt_principals.clone()),
            prop::sample::select(c.audiences.clone()),
            prop::sample::select(c.presenters.clone()),
            claim_values,
        ),
    )
        .prop_map(
            move |(
                principal,
                (direct_ip, remote_ip, destination_ip),
                destination_port,
                (method, host, path),
                sni,
                values,
                meta,
                (jwt_principal, aud, azp, claim_values),
            )| {
                let mut h: BTreeMap<String, String> =
                    [(":method".to_string(), method), (":authority".into(), host), (":path".into(), path)].into();
                for (name, v) in names.iter().zip(values) {
                    if let Some(v) = v {
                        h.insert(name.clone(), v);
                    }
                }
                let metadata = meta
                    .map(|m| ("envoy.filters.a.b".to_string(), [("c".to_string(), m)].into()))
                    .into_iter()
                    .collect();
                // A token: its principal, and any audience, presenter or claims chosen.
                let jwt = jwt_principal.map(|(iss, sub)| {
                    let mut p = serde_json::json!({"iss": iss, "sub": sub});
                    if let Some(a) = aud {
                        p["aud"] = a.into();
                    }
                    if let Some(a) = azp {
                        p["azp"] = a.into();
                    }
                    for (path, (v, listed)) in claim_paths.iter().zip(claim_values) {
                        let Some(v) = v else { continue };
                        let v = if listed { serde_json::json!(["other", v]) } else { Value::from(v) };
                        let mut at = &mut p;
                        for k in &path[..path.len() - 1] {
                            if !at[k.as_str()].is_object() {
                                at[k.as_str()] = serde_json::json!({});
                            }
                            at = &mut at[k.as_str()];
                        }
                        at[path[path.len() - 1].as_str()] = v;
                    }
                    p
                });
                Request {
                    principal,
                    direct_ip,
                    remote_ip,
                    destination_ip,
                    destination_port,
                    sni,
                    headers: h,
                    metadata,
                    jwt,
                }
            },
        )
}

#[test]
fn every_golden_pair_decides_as_istio() {
    let mut failures = Vec::new();
    for pair in PAIRS {
        let istio = istio_filters(pair);
        let sluice = sluice_filters(pair);
        let c = candidates(&read(pair.input), pair.bundle);
        let mut runner = TestRunner::new_with_rng(
            Config { cases: 1500, failure_persistence: None, ..Config::default() },
            proptest::test_runner::TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
        );
        let result = runner.run(&requests(&c), |r| {
            let (want, got) = (decide(&istio, &r), decide(&sluice, &r));
            prop_assert_eq!(&want, &got, "request {:?}", r);
            Ok(())
        });
        if let Err(e) = result {
            failures.push(format!(
                "{}: {e}\nistio: {}\nsluice: {}",
                pair.input,
                Value::from(istio.clone()),
                Value::from(sluice.clone())
            ));
        }
    }
    assert!(failures.is_empty(), "{} of {} pairs differ:\n{}", failures.len(), PAIRS.len(), failures.join("\n\n"));
}

/// The evaluator itself, on the cases it must tell apart (else a pair could pass by luck).
#[test]
fn the_evaluator_tells_matches_apart() {
    let r = Request {
        principal: Some("spiffe://cluster.local/ns/foo/sa/web".into()),
        direct_ip: "127.0.0.9".parse().unwrap(),
        remote_ip: "127.0.0.9".parse().unwrap(),
        destination_ip: "127.0.0.1".parse().unwrap(),
        destination_port: 80,
        sni: None,
        headers: [(":method".to_string(), "GET".to_string()), (":path".into(), "/a/b/c".into())].into(),
        metadata: BTreeMap::new(),
        jwt: None,
    };
    let p = |v: Value| permission(&v, &r);
    let id = |v: Value| principal(&v, &r);
    assert!(p(serde_json::json!({"header": {"name": ":method", "string_match": {"prefix": "G"}}})));
    assert!(!p(serde_json::json!({"header": {"name": ":method", "exact_match": "POST"}})));
    assert!(p(serde_json::json!({"uri_template": {"typed_config": {"path_template": "/**/c"}}})));
    assert!(!p(serde_json::json!({"uri_template": {"typed_config": {"path_template": "/*/c"}}})));
    assert!(p(serde_json::json!({"not_rule": {"destination_port": 81}})));
    assert!(id(serde_json::json!({"authenticated": {"principal_name": {"safe_regex": {"regex": ".*/ns/foo/.*"}}}})));
    assert!(!id(serde_json::json!({"authenticated": {"principal_name": {"safe_regex": {"regex": "/ns/foo/"}}}})));
    assert!(id(
        serde_json::json!({"metadata": {"filter": "istio_authn", "path": [{"key": "source.principal"}], "value": {"string_match": {"exact": "cluster.local/ns/foo/sa/web"}}}})
    ));
    assert!(!id(
        serde_json::json!({"metadata": {"filter": "istio_authn", "path": [{"key": "request.auth.principal"}], "value": {"string_match": {"safe_regex": {"regex": ".+"}}}}})
    ));
    assert!(id(serde_json::json!({"direct_remote_ip": {"address_prefix": "127.0.0.0", "prefix_len": 24}})));
    let deny_all = serde_json::json!({"rules": {"action": "DENY", "policies": {"x": {"permissions": [{"any": true}], "principals": [{"any": true}]}}}});
    assert_eq!(decide(&[deny_all], &r), Outcome { allowed: false, logged: false, shadow: vec![], checked_by: None });
    let empty_allow = serde_json::json!({"rules": {}});
    assert!(!decide(&[empty_allow], &r).allowed, "an ALLOW with no policies denies");
}
