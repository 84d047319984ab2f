//! AuthorizationPolicy → Envoy RBAC filters, with Istio's policy names
//! (`ns[<ns>]-policy[<name>]-rule[<i>]`), its DENY-before-ALLOW order, and its rule shape:
//! one `and_rules`/`and_ids` per `to`/`from` entry, one `or_rules`/`or_ids` per field.
//!
//! Request principals are matched on the `istio_authn` filter metadata, as Istio writes them;
//! sluice runs no JWT filter, so that metadata is never set: an ALLOW on requestPrincipals never
//! matches and a DENY on notRequestPrincipals always does — both fail closed.

use serde_json::{Map, Value, json};

use super::proxy::Proxy;
use super::typed;
use crate::diagnostic::ObjectRef;
use crate::model::IstioObject;
use crate::model::authorization_policy::{Action, AuthorizationPolicySpec, Condition, Operation, Rule, Source};
use crate::model::mesh_config::MeshConfig;
use crate::snapshot::DOMAIN_SUFFIX;

/// Whether the filter sits in an HTTP or a TCP filter chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Layer {
    /// `envoy.filters.http.rbac`.
    Http,
    /// `envoy.filters.network.rbac`.
    Tcp,
}

/// The ALLOW and DENY policies that select this proxy's workload, in name order.
fn policies<'a>(proxy: &Proxy<'a>) -> Vec<&'a IstioObject<AuthorizationPolicySpec>> {
    proxy.snapshot.authorization_policies_for(&proxy.node.namespace, proxy.workload.map(|_| &proxy.labels))
}

/// The RBAC filters (DENY first, then ALLOW) for an inbound chain at `layer`.
pub(super) fn filters(proxy: &mut Proxy<'_>, layer: Layer) -> Vec<Value> {
    let selected = policies(proxy);
    let mut out = Vec::new();
    for action in [Action::Deny, Action::Allow] {
        let of_action: Vec<_> = selected.iter().filter(|p| p.spec.action.unwrap_or(Action::Allow) == action).collect();
        if of_action.is_empty() {
            continue;
        }
        let mut named = Map::new();
        for p in of_action {
            for (i, rule) in p.spec.rules.iter().enumerate() {
                let name = format!("ns[{}]-policy[{}]-rule[{i}]", p.meta.namespace, p.meta.name);
                let reference = ObjectRef::new("AuthorizationPolicy", &p.meta.namespace, &p.meta.name);
                if let Some(policy) = rule_policy(proxy, &reference, i, rule, action, layer, &p.meta.namespace) {
                    named.insert(name, policy);
                }
            }
        }
        let action_name = if action == Action::Deny { "DENY" } else { "ALLOW" };
        let rules = json!({"action": action_name, "policies": named});
        out.push(match layer {
            Layer::Http => json!({"name": "envoy.filters.http.rbac", "typed_config": typed("envoy.extensions.filters.http.rbac.v3.RBAC", json!({"rules": rules}))}),
            Layer::Tcp => json!({"name": "envoy.filters.network.rbac", "typed_config": typed("envoy.extensions.filters.network.rbac.v3.RBAC", json!({"rules": rules, "stat_prefix": "tcp."}))}),
        });
    }
    out
}

fn rule_policy(
    proxy: &mut Proxy<'_>,
    reference: &ObjectRef,
    index: usize,
    rule: &Rule,
    action: Action,
    layer: Layer,
    ns: &str,
) -> Option<Value> {
    let http_only = rule.http_only_fields();
    if layer == Layer::Tcp && !http_only.is_empty() {
        let fields = http_only.join(", ");
        if action == Action::Allow {
            proxy.warn(
                reference.clone(),
                format!("spec.rules[{index}]"),
                format!("HTTP-only fields ({fields}) on a TCP port: this ALLOW rule never matches there (fail closed)"),
            );
            return None;
        }
        proxy.warn(reference.clone(), format!("spec.rules[{index}]"), format!("HTTP-only fields ({fields}) on a TCP port are ignored: this DENY rule matches without them (fail closed)"));
    }
    let tcp = layer == Layer::Tcp;
    let mesh = proxy.snapshot.mesh.clone();
    let mut permissions = Vec::new();
    let when_perms: Vec<Value> = rule.when.iter().filter_map(|c| condition_permission(c, tcp)).collect();
    if rule.to.is_empty() {
        permissions.push(and_or_any("and_rules", "rules", when_perms.clone()));
    }
    for t in &rule.to {
        let mut parts = t.operation.as_ref().map(|o| operation(o, tcp)).unwrap_or_default();
        parts.extend(when_perms.clone());
        permissions.push(and_or_any("and_rules", "rules", parts));
    }
    let mut principals = Vec::new();
    let when_ids: Vec<Value> = rule.when.iter().filter_map(|c| condition_principal(c, tcp, ns, &mesh)).collect();
    if rule.from.is_empty() {
        principals.push(and_or_any("and_ids", "ids", when_ids.clone()));
    }
    for f in &rule.from {
        let mut parts = f.source.as_ref().map(|s| source(s, tcp, ns, &mesh)).unwrap_or_default();
        parts.extend(when_ids.clone());
        principals.push(and_or_any("and_ids", "ids", parts));
    }
    Some(json!({"permissions": permissions, "principals": principals}))
}

/// `{and_x: {list: parts}}`, or `{any: true}` when there is nothing to require.
fn and_or_any(and: &str, list: &str, parts: Vec<Value>) -> Value {
    if parts.is_empty() { json!({"any": true}) } else { json!({and: {list: parts}}) }
}

fn or_of(or: &str, list: &str, items: Vec<Value>) -> Value {
    json!({or: {list: items}})
}

fn negate(not: &str, v: Value) -> Value {
    json!({not: v})
}

/// Istio's wildcard string rule: `*` (present), `x*` (prefix), `*x` (suffix), else exact.
fn string_match(v: &str, prefix: &str, ignore_case: bool) -> Value {
    let mut m = if v == "*" {
        json!({"safe_regex": {"regex": ".+"}})
    } else if let Some(p) = v.strip_suffix('*') {
        json!({"prefix": format!("{prefix}{p}")})
    } else if let Some(s) = v.strip_prefix('*') {
        json!({"suffix": s})
    } else {
        json!({"exact": format!("{prefix}{v}")})
    };
    if ignore_case {
        m["ignore_case"] = json!(true);
    }
    m
}

fn cidr(v: &str) -> Value {
    let net = crate::model::parse_cidr(v).expect("validated CIDR");
    json!({"address_prefix": net.network().to_string(), "prefix_len": net.prefix_len()})
}

fn principal_name(m: Value) -> Value {
    json!({"authenticated": {"principal_name": m}})
}

fn namespace_id(ns: &str) -> Value {
    principal_name(json!({"safe_regex": {"regex": format!(".*/ns/{ns}/.*")}}))
}

fn request_auth(key: &str, v: &str) -> Value {
    json!({"metadata": {"filter": "istio_authn", "path": [{"key": key}], "value": {"string_match": string_match(v, "", false)}}})
}

fn header_id(name: &str, v: &str) -> Value {
    if v == "*" {
        json!({"header": {"name": name, "present_match": true}})
    } else {
        json!({"header": {"name": name, "string_match": string_match(v, "", false)}})
    }
}

/// Principals as istiod migrates trust domains: one written in the mesh's trust domain, an alias
/// or `cluster.local` (which stands for the mesh's own) is the same identity in the trust domain
/// and every alias; one in another trust domain, with a `*` one, or not of the
/// `<td>/ns/<ns>/sa/<sa>` form is kept as written.
fn with_trust_domains(mesh: &MeshConfig, principals: &[String]) -> Vec<String> {
    let domains: Vec<&str> = std::iter::once(mesh.trust_domain.as_str())
        .chain(mesh.trust_domain_aliases.iter().map(String::as_str))
        .collect();
    let mut out: Vec<String> = Vec::new();
    for principal in principals {
        let parts: Vec<&str> = principal.split('/').collect();
        let td = parts[0];
        let ours = domains.contains(&td) || td == DOMAIN_SUFFIX;
        if parts.len() != 5 || td == "*" || !ours {
            out.push(principal.clone());
            continue;
        }
        for domain in &domains {
            let replaced = format!("{domain}/{}", parts[1..].join("/"));
            if !out.contains(&replaced) {
                out.push(replaced);
            }
        }
    }
    out
}

/// `<ns>/<sa>` (or `<sa>`, in the policy's namespace `ns`) as a principal of the mesh.
fn service_account_principal(v: &str, ns: &str) -> String {
    let (sa_ns, name) = v.split_once('/').unwrap_or((ns, v));
    format!("{DOMAIN_SUFFIX}/ns/{sa_ns}/sa/{name}")
}

/// Principal fields of a source, one `or_ids` each.
fn source(s: &Source, tcp: bool, ns: &str, mesh: &MeshConfig) -> Vec<Value> {
    let mut out = Vec::new();
    let mut field = |values: &[String], negated: bool, f: &dyn Fn(&str) -> Value| {
        if values.is_empty() {
            return;
        }
        let or = or_of("or_ids", "ids", values.iter().map(|v| f(v)).collect());
        out.push(if negated { negate("not_id", or) } else { or });
    };
    let principal = |v: &str| principal_name(string_match(v, "spiffe://", false));
    field(&with_trust_domains(mesh, &s.principals), false, &principal);
    field(&with_trust_domains(mesh, &s.not_principals), true, &principal);
    let accounts = |list: &[String]| {
        let principals: Vec<String> = list.iter().map(|v| service_account_principal(v, ns)).collect();
        with_trust_domains(mesh, &principals)
    };
    let exact = |v: &str| principal_name(json!({"exact": format!("spiffe://{v}")}));
    field(&accounts(&s.service_accounts), false, &exact);
    field(&accounts(&s.not_service_accounts), true, &exact);
    if !tcp {
        let rp = |v: &str| request_auth("request.auth.principal", v);
        field(&s.request_principals, false, &rp);
        field(&s.not_request_principals, true, &rp);
    }
    field(&s.namespaces, false, &namespace_id);
    field(&s.not_namespaces, true, &namespace_id);
    field(&s.remote_ip_blocks, false, &|v| json!({"remote_ip": cidr(v)}));
    field(&s.not_remote_ip_blocks, true, &|v| json!({"remote_ip": cidr(v)}));
    field(&s.ip_blocks, false, &|v| json!({"direct_remote_ip": cidr(v)}));
    field(&s.not_ip_blocks, true, &|v| json!({"direct_remote_ip": cidr(v)}));
    out
}

/// Permission fields of an operation, one `or_rules` each.
fn operation(o: &Operation, tcp: bool) -> Vec<Value> {
    let mut out = Vec::new();
    let mut field = |values: &[String], negated: bool, f: &dyn Fn(&str) -> Value| {
        if values.is_empty() {
            return;
        }
        let or = or_of("or_rules", "rules", values.iter().map(|v| f(v)).collect());
        out.push(if negated { negate("not_rule", or) } else { or });
    };
    if !tcp {
        let host = |v: &str| json!({"header": {"name": ":authority", "string_match": string_match(v, "", true)}});
        field(&o.hosts, false, &host);
        field(&o.not_hosts, true, &host);
        let method = |v: &str| json!({"header": {"name": ":method", "string_match": {"exact": v}}});
        field(&o.methods, false, &method);
        field(&o.not_methods, true, &method);
        let path = |v: &str| match crate::model::authorization_policy::path_template(v) {
            Some(Ok(template)) => json!({"uri_template": {
                "name": "uri-template",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig",
                    "path_template": template,
                },
            }}),
            _ => json!({"url_path": {"path": string_match(v, "", false)}}),
        };
        field(&o.paths, false, &path);
        field(&o.not_paths, true, &path);
    }
    let port = |v: &str| json!({"destination_port": v.parse::<u32>().expect("validated port")});
    field(&o.ports, false, &port);
    field(&o.not_ports, true, &port);
    out
}

fn values_or(c: &Condition, or: &str, list: &str, not: &str, f: &dyn Fn(&str) -> Value) -> Value {
    let mut parts = Vec::new();
    if !c.values.is_empty() {
        parts.push(or_of(or, list, c.values.iter().map(|v| f(v)).collect()));
    }
    if !c.not_values.is_empty() {
        parts.push(negate(not, or_of(or, list, c.not_values.iter().map(|v| f(v)).collect())));
    }
    if parts.len() == 1 {
        parts.remove(0)
    } else {
        let and = if or == "or_rules" { "and_rules" } else { "and_ids" };
        json!({and: {list: parts}})
    }
}

fn condition_permission(c: &Condition, _tcp: bool) -> Option<Value> {
    let (or, list, not) = ("or_rules", "rules", "not_rule");
    Some(match c.key.as_str() {
        "destination.ip" => values_or(c, or, list, not, &|v| json!({"destination_ip": cidr(v)})),
        "destination.port" => {
            values_or(c, or, list, not, &|v| json!({"destination_port": v.parse::<u32>().unwrap_or(0)}))
        }
        "connection.sni" => {
            values_or(c, or, list, not, &|v| json!({"requested_server_name": string_match(v, "", false)}))
        }
        _ => return None,
    })
}

fn condition_principal(c: &Condition, tcp: bool, ns: &str, mesh: &MeshConfig) -> Option<Value> {
    let (or, list, not) = ("or_ids", "ids", "not_id");
    let key = c.key.as_str();
    // Identities in the mesh's trust domain stand for the same in its aliases (see
    // [`with_trust_domains`]).
    let migrated = |to_principal: &dyn Fn(&str) -> String| Condition {
        values: with_trust_domains(mesh, &c.values.iter().map(|v| to_principal(v)).collect::<Vec<_>>()),
        not_values: with_trust_domains(mesh, &c.not_values.iter().map(|v| to_principal(v)).collect::<Vec<_>>()),
        ..c.clone()
    };
    Some(match key {
        "source.ip" => values_or(c, or, list, not, &|v| json!({"direct_remote_ip": cidr(v)})),
        "remote.ip" => values_or(c, or, list, not, &|v| json!({"remote_ip": cidr(v)})),
        "source.namespace" => values_or(c, or, list, not, &namespace_id),
        "source.principal" => values_or(&migrated(&|v| v.to_string()), or, list, not, &|v| {
            principal_name(string_match(v, "spiffe://", false))
        }),
        "source.serviceAccount" => values_or(&migrated(&|v| service_account_principal(v, ns)), or, list, not, &|v| {
            principal_name(json!({"exact": format!("spiffe://{v}")}))
        }),
        _ if tcp => return None,
        _ if key.starts_with("request.headers[") => {
            let name = &key["request.headers[".len()..key.len() - 1];
            values_or(c, or, list, not, &|v| header_id(name, v))
        }
        _ if key.starts_with("request.auth.") => values_or(c, or, list, not, &|v| request_auth(key, v)),
        _ => return None,
    })
}
