//! AuthorizationPolicy → Envoy RBAC filters, as istiod builds them: AUDIT as a `LOG` filter
//! first (so requests denied later are logged too), then DENY, then ALLOW; Istio's policy names
//! (`ns[<ns>]-policy[<name>]-rule[<i>]`); dry-run policies (`istio.io/dry-run`) as
//! `shadow_rules` with Istio's stat prefixes; one `and_rules`/`and_ids` per `to`/`from` entry,
//! one `or_rules`/`or_ids` per field.
//!
//! JWT attributes (`requestPrincipals`, `request.auth.*`) match the payload the `jwt_authn`
//! filter of [`super::jwt`] verified, in its dynamic metadata; without a verified token they
//! match nothing, as in Istio.
//!
//! CUSTOM policies go to their provider's authorizer through [`super::ext_authz`]; when the
//! provider cannot be used (unknown, several per workload, not in the mesh, a TCP port) their
//! rules deny what they match, as Istio does.
//!
//! What sluice cannot evaluate fails closed, with a warning naming the policy and field: HTTP
//! attributes on a TCP port — an ALLOW rule with them never matches, a DENY or AUDIT rule
//! matches without them, as istiod does.

use serde_json::{Map, Value, json};

use super::proxy::Proxy;
use super::typed;
use crate::diagnostic::ObjectRef;
use crate::model::IstioObject;
use crate::model::authorization_policy::{
    Action, AuthorizationPolicySpec, Condition, Operation, Rule, Source, dry_run, path_template,
};
use crate::model::mesh_config::MeshConfig;
use crate::snapshot::DOMAIN_SUFFIX;

/// Whether the filter sits in an HTTP or a TCP filter chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Layer {
    /// `envoy.filters.http.rbac`.
    Http,
    /// `envoy.filters.network.rbac`.
    Tcp,
    /// A proxyless gRPC server's `envoy.filters.http.rbac` (gRFC A41): ALLOW and DENY only, no
    /// dynamic metadata, so no JWT attributes.
    Grpc,
}

/// One RBAC filter of the chain: its Envoy action, the policy actions it holds, and the stat
/// prefix of its dry-run rules.
struct Stage {
    envoy_action: &'static str,
    actions: &'static [Action],
    shadow_stat_prefix: Option<&'static str>,
}

/// The filters in chain order (Istio's builder order).
const STAGES: [Stage; 3] = [
    Stage { envoy_action: "LOG", actions: &[Action::Audit], shadow_stat_prefix: None },
    Stage {
        envoy_action: "DENY",
        actions: &[Action::Custom, Action::Deny],
        shadow_stat_prefix: Some("istio_dry_run_deny_"),
    },
    Stage { envoy_action: "ALLOW", actions: &[Action::Allow], shadow_stat_prefix: Some("istio_dry_run_allow_") },
];

fn action_of(p: &IstioObject<AuthorizationPolicySpec>) -> Action {
    p.spec.action.unwrap_or(Action::Allow)
}

/// True for a policy of `action` that is enforced (not a dry run).
fn enforced(p: &IstioObject<AuthorizationPolicySpec>, action: Action) -> bool {
    action_of(p) == action && dry_run(&p.meta) != Ok(true)
}

/// The policies that select this proxy's workload, in name order.
fn policies<'a>(proxy: &Proxy<'a>) -> Vec<&'a IstioObject<AuthorizationPolicySpec>> {
    proxy.snapshot.authorization_policies_for(&proxy.node.namespace, proxy.workload.map(|_| &proxy.labels))
}

/// Istio's policy that never matches: what a policy without rules contributes.
fn match_never() -> Value {
    json!({"permissions": [{"not_rule": {"any": true}}], "principals": [{"not_id": {"any": true}}]})
}

/// The name of rule `index` of `p` in the RBAC config: Istio's, and for CUSTOM the name Istio
/// gives the deny rules of a CUSTOM policy it cannot hand to a provider.
fn rule_name(p: &IstioObject<AuthorizationPolicySpec>, index: usize) -> String {
    let name = format!("ns[{}]-policy[{}]-rule[{index}]", p.meta.namespace, p.meta.name);
    if action_of(p) == Action::Custom { format!("istio-ext-authz-{name}-deny-due-to-bad-CUSTOM-action") } else { name }
}

/// The enforced CUSTOM policies of `selected` and the provider they name, if it can be used
/// here: Istio's rules — one provider per workload, HTTP chains (sluice has no network
/// ext_authz yet) — else why not.
fn custom_provider<'a>(
    proxy: &Proxy<'a>,
    selected: &[&IstioObject<AuthorizationPolicySpec>],
    layer: Layer,
) -> Option<Result<super::ext_authz::Usable<'a>, String>> {
    let custom: Vec<_> = selected.iter().filter(|p| enforced(p, Action::Custom)).collect();
    if custom.is_empty() {
        return None;
    }
    let names: std::collections::BTreeSet<&str> =
        custom.iter().filter_map(|p| p.spec.provider.as_ref()?.get("name")?.as_str()).collect();
    Some(match names.into_iter().collect::<Vec<_>>().as_slice() {
        _ if layer == Layer::Tcp => Err("CUSTOM on a TCP port is not translated (no network ext_authz yet)".into()),
        _ if layer == Layer::Grpc => Err("proxyless gRPC servers have no ext_authz".into()),
        [name] => super::ext_authz::provider(proxy, name),
        [] => Err("the CUSTOM policies name no provider".into()),
        several => Err(format!("the CUSTOM policies of one workload name several providers ({})", several.join(", "))),
    })
}

/// The CUSTOM policies' rules as the shadow rules that enable `ext_authz`, named as Istio names
/// them (the name is what the ext_authz filter's metadata matcher looks for).
fn custom_shadow_filter(
    proxy: &mut Proxy<'_>,
    selected: &[&IstioObject<AuthorizationPolicySpec>],
    provider: &str,
) -> Value {
    let mut policies = Map::new();
    for p in selected.iter().filter(|p| enforced(p, Action::Custom)) {
        let reference = ObjectRef::new("AuthorizationPolicy", &p.meta.namespace, &p.meta.name);
        for (i, rule) in p.spec.rules.iter().enumerate() {
            let name = format!("istio-ext-authz-{provider}-ns[{}]-policy[{}]-rule[{i}]", p.meta.namespace, p.meta.name);
            if let Some(policy) = rule_policy(proxy, &reference, i, rule, false, Layer::Http, &p.meta.namespace) {
                policies.insert(name, policy);
            }
        }
    }
    json!({"name": "envoy.filters.http.rbac", "typed_config": typed("envoy.extensions.filters.http.rbac.v3.RBAC", json!({
        "shadow_rules": {"action": "DENY", "policies": policies},
        "shadow_rules_stat_prefix": super::ext_authz::SHADOW_STAT_PREFIX,
    }))})
}

/// The RBAC filters (AUDIT, DENY, ALLOW, each only if some policy has that action) for an
/// inbound chain at `layer`.
pub(super) fn filters(proxy: &mut Proxy<'_>, layer: Layer) -> Vec<Value> {
    let selected = policies(proxy);
    let mut out = Vec::new();
    // CUSTOM first, as Istio orders it: ext_authz when its provider can be used; otherwise its
    // rules join the DENY stage.
    let custom = custom_provider(proxy, &selected, layer);
    let ext_authz = match custom {
        Some(Ok(usable)) => {
            out.push(custom_shadow_filter(proxy, &selected, &usable.name));
            out.push(super::ext_authz::http_filter(&usable));
            true
        }
        Some(Err(why)) => {
            for p in selected.iter().filter(|p| enforced(p, Action::Custom)) {
                let reference = ObjectRef::new("AuthorizationPolicy", &p.meta.namespace, &p.meta.name);
                proxy.warn(
                    reference,
                    "spec.provider".into(),
                    format!("{why}: the requests its rules match are denied (fail closed), as Istio does"),
                );
            }
            false
        }
        None => false,
    };
    for stage in &STAGES {
        if layer == Layer::Grpc && stage.envoy_action == "LOG" {
            // gRPC ignores an RBAC filter whose action is LOG (gRFC A41).
            for p in selected.iter().filter(|p| enforced(p, Action::Audit)) {
                let reference = ObjectRef::new("AuthorizationPolicy", &p.meta.namespace, &p.meta.name);
                proxy.warn(
                    reference,
                    "spec.action".into(),
                    "proxyless gRPC servers do not audit: nothing is logged".into(),
                );
            }
            continue;
        }
        // Enforced and dry-run policies, each present once some policy of the stage is.
        let mut enforced: Option<Map<String, Value>> = None;
        let mut shadow: Option<Map<String, Value>> = None;
        let in_stage = |p: &&&IstioObject<AuthorizationPolicySpec>| {
            stage.actions.contains(&action_of(p)) && !(ext_authz && action_of(p) == Action::Custom)
        };
        for p in selected.iter().filter(in_stage) {
            if layer == Layer::Grpc && dry_run(&p.meta) == Ok(true) {
                // gRPC has no shadow rules; a dry run enforces nothing either way.
                continue;
            }
            let reference = ObjectRef::new("AuthorizationPolicy", &p.meta.namespace, &p.meta.name);
            let into = if dry_run(&p.meta) == Ok(true) { &mut shadow } else { &mut enforced }.get_or_insert_default();
            if p.spec.rules.is_empty() {
                into.insert(rule_name(p, 0), match_never());
            }
            for (i, rule) in p.spec.rules.iter().enumerate() {
                let narrow = action_of(p) == Action::Allow;
                let Some(policy) = rule_policy(proxy, &reference, i, rule, narrow, layer, &p.meta.namespace) else {
                    continue;
                };
                if layer == Layer::Grpc && !grpc_evaluable(&policy) {
                    let effect = if narrow {
                        "this ALLOW rule never matches (fail closed)"
                    } else {
                        "this rule matches every request (fail closed)"
                    };
                    proxy.warn(
                        reference.clone(),
                        format!("spec.rules[{i}]"),
                        format!("a proxyless gRPC server cannot evaluate JWT claims, Envoy metadata, path templates, SNI or grpc- headers: {effect}"),
                    );
                    if !narrow {
                        into.insert(
                            rule_name(p, i),
                            json!({"permissions": [{"any": true}], "principals": [{"any": true}]}),
                        );
                    }
                    continue;
                }
                into.insert(rule_name(p, i), policy);
            }
        }
        let mut config = Map::new();
        if let Some(policies) = enforced {
            config.insert("rules".into(), json!({"action": stage.envoy_action, "policies": policies}));
        }
        if let Some(policies) = shadow {
            config.insert("shadow_rules".into(), json!({"action": stage.envoy_action, "policies": policies}));
            if let Some(prefix) = stage.shadow_stat_prefix {
                config.insert("shadow_rules_stat_prefix".into(), json!(prefix));
            }
        }
        if config.is_empty() {
            continue;
        }
        out.push(match layer {
            // gRPC wants distinct filter names; these are istiod's.
            Layer::Grpc => {
                let name = if stage.envoy_action == "DENY" { "envoy.filters.http.rbac.DENY" } else { "envoy.filters.http.rbac" };
                json!({"name": name, "typed_config": typed("envoy.extensions.filters.http.rbac.v3.RBAC", Value::Object(config))})
            }
            Layer::Http => {
                json!({"name": "envoy.filters.http.rbac", "typed_config": typed("envoy.extensions.filters.http.rbac.v3.RBAC", Value::Object(config))})
            }
            Layer::Tcp => {
                config.insert("stat_prefix".into(), json!("tcp."));
                json!({"name": "envoy.filters.network.rbac", "typed_config": typed("envoy.extensions.filters.network.rbac.v3.RBAC", Value::Object(config))})
            }
        });
    }
    out
}

/// The access log of the requests (or connections) an AUDIT policy marks, or None when no
/// enforced AUDIT policy selects this proxy's workload. Envoy's RBAC `LOG` action only sets the
/// `envoy.common` `access_log_hint`; this log, on the proxy's stdout, is where it shows.
pub(super) fn audit_log(proxy: &Proxy<'_>, layer: Layer) -> Option<Value> {
    let audited = policies(proxy).iter().any(|p| enforced(p, Action::Audit));
    if !audited {
        return None;
    }
    let format = match layer {
        Layer::Http | Layer::Grpc => {
            "[%START_TIME%] sluice-audit %REQ(:METHOD)% %REQ(:AUTHORITY)% %REQ(:PATH)% %RESPONSE_CODE% \
             peer=%DOWNSTREAM_PEER_URI_SAN% from=%DOWNSTREAM_REMOTE_ADDRESS%\n"
        }
        Layer::Tcp => {
            "[%START_TIME%] sluice-audit %DOWNSTREAM_LOCAL_ADDRESS% peer=%DOWNSTREAM_PEER_URI_SAN% \
             from=%DOWNSTREAM_REMOTE_ADDRESS%\n"
        }
    };
    Some(json!({
        "name": "envoy.access_loggers.stdout",
        "filter": {"metadata_filter": {"matcher": {
            "filter": "envoy.common", "path": [{"key": "access_log_hint"}], "value": {"bool_match": true},
        }}},
        "typed_config": typed("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog", json!({
            "log_format": {"text_format_source": {"inline_string": format}},
        })),
    }))
}

/// True when gRPC can evaluate every matcher of `policy` (gRFC A41): gRPC has no dynamic
/// metadata (where JWT claims and request principals live), no path templates, sees every
/// requested server name as empty, and refuses `grpc-` headers and `:scheme`.
fn grpc_evaluable(policy: &Value) -> bool {
    match policy {
        Value::Object(m) => m.iter().all(|(k, v)| {
            let header = k == "header" && v["name"].as_str().is_some_and(|n| n.starts_with("grpc-") || n == ":scheme");
            !["metadata", "uri_template", "requested_server_name"].contains(&k.as_str()) && !header && grpc_evaluable(v)
        }),
        Value::Array(items) => items.iter().all(grpc_evaluable),
        _ => true,
    }
}

/// One rule as an RBAC policy, or None when it cannot match here. `narrow` is true for ALLOW:
/// a rule with attributes that cannot be evaluated then never matches; otherwise (DENY, AUDIT,
/// CUSTOM) it matches without them.
fn rule_policy(
    proxy: &mut Proxy<'_>,
    reference: &ObjectRef,
    index: usize,
    rule: &Rule,
    narrow: bool,
    layer: Layer,
    ns: &str,
) -> Option<Value> {
    let tcp = layer == Layer::Tcp;
    let unsupported = if tcp { rule.http_only_fields() } else { Vec::new() };
    if !unsupported.is_empty() {
        let fields = unsupported.join(", ");
        let effect = if narrow {
            "this ALLOW rule never matches here (fail closed)"
        } else {
            "this rule matches without them here (fail closed)"
        };
        proxy.warn(
            reference.clone(),
            format!("spec.rules[{index}]"),
            format!("HTTP-only fields on a TCP port ({fields}): {effect}"),
        );
        if narrow {
            return None;
        }
    }
    let mesh = proxy.snapshot.mesh.clone();
    let mut when_permissions = Vec::new();
    let mut when_principals = Vec::new();
    for (j, c) in rule.when.iter().enumerate() {
        match condition(c, tcp, ns, &mesh) {
            Some(Matcher::Permission(p)) => when_permissions.push(p),
            Some(Matcher::Principal(p)) => when_principals.push(p),
            None if unsupported.contains(&format!("when[{j}].key={}", c.key)) => {}
            None => {
                // Validation lets no such key through; if one ever comes, it fails closed too.
                proxy.warn(
                    reference.clone(),
                    format!("spec.rules[{index}].when[{j}].key"),
                    format!("{:?} is not an attribute sluice can evaluate (fail closed)", c.key),
                );
                if narrow {
                    return None;
                }
            }
        }
    }
    let mut permissions = Vec::new();
    if rule.to.is_empty() {
        permissions.push(and_or_any("and_rules", "rules", when_permissions.clone()));
    }
    for t in &rule.to {
        let mut parts = t.operation.as_ref().map(|o| operation(o, tcp)).unwrap_or_default();
        parts.extend(when_permissions.clone());
        permissions.push(and_or_any("and_rules", "rules", parts));
    }
    let mut principals = Vec::new();
    if rule.from.is_empty() {
        principals.push(and_or_any("and_ids", "ids", when_principals.clone()));
    }
    for f in &rule.from {
        let mut parts = f.source.as_ref().map(|s| source(s, tcp, ns, &mesh)).unwrap_or_default();
        parts.extend(when_principals.clone());
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

/// `v` with RE2's special characters escaped, and each `*` as `wildcard`.
fn regex_of(v: &str, wildcard: &str) -> String {
    let mut out = String::new();
    for c in v.chars() {
        match c {
            '*' => out.push_str(wildcard),
            '\\' | '.' | '+' | '?' | '(' | ')' | '|' | '[' | ']' | '{' | '}' | '^' | '$' => {
                out.push('\\');
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out
}

/// Istio's wildcard string rule: `*` (present, as `.+`), `x*` (prefix), `*x` (suffix), else
/// exact; `prefix` is prepended to what is matched, so a suffix with one becomes a regex.
fn string_match(v: &str, prefix: &str, ignore_case: bool) -> Value {
    let mut m = if v == "*" {
        json!({"safe_regex": {"regex": ".+"}})
    } else if let Some(p) = v.strip_suffix('*') {
        json!({"prefix": format!("{prefix}{p}")})
    } else if let Some(s) = v.strip_prefix('*') {
        if prefix.is_empty() {
            json!({"suffix": s})
        } else {
            json!({"safe_regex": {"regex": format!("{}.*{}", regex_of(prefix, ".*"), regex_of(s, "\\*"))}})
        }
    } else {
        json!({"exact": format!("{prefix}{v}")})
    };
    if ignore_case {
        m["ignore_case"] = json!(true);
    }
    m
}

/// Istio's header rule: `*` is presence (an empty prefix or suffix is not allowed, and
/// `ignore_case` does not go with a regex), else the wildcard string rule.
fn header_match(name: &str, v: &str, ignore_case: bool) -> Value {
    if v == "*" {
        json!({"header": {"name": name, "present_match": true}})
    } else {
        json!({"header": {"name": name, "string_match": string_match(v, "", ignore_case)}})
    }
}

fn cidr(v: &str) -> Value {
    let net = crate::model::parse_cidr(v).expect("validated CIDR");
    json!({"address_prefix": net.network().to_string(), "prefix_len": net.prefix_len()})
}

fn principal_name(m: Value) -> Value {
    json!({"authenticated": {"principal_name": m}})
}

fn regex_principal(regex: String) -> Value {
    principal_name(json!({"safe_regex": {"regex": regex}}))
}

/// A namespace (`*` anywhere in it matches any run of characters, as in Istio).
fn namespace_id(ns: &str) -> Value {
    regex_principal(format!(".*/ns/{}/.*", regex_of(ns, ".*")))
}

/// A trust domain: the peer's SPIFFE id is in it (`*` matches within the trust domain).
fn trust_domain_id(td: &str) -> Value {
    match td {
        "*" => regex_principal("spiffe://[^/]+/.*".into()),
        _ if td.contains('*') => regex_principal(format!("spiffe://{}/.*", regex_of(td, "[^/]*"))),
        _ => principal_name(json!({"prefix": format!("spiffe://{td}/")})),
    }
}

/// A service account (`<ns>/<sa>`, or `<sa>` in the policy's namespace `ns`) as Istio matches
/// it: in any trust domain, with any path segments between the namespace and the account.
fn service_account_id(v: &str, ns: &str) -> Value {
    let (sa_ns, name) = v.split_once('/').unwrap_or((ns, v));
    regex_principal(format!("spiffe://.+/ns/{}/(.+/|)sa/{}(/.+)?", regex_of(sa_ns, "\\*"), regex_of(name, "\\*")))
}

/// The mesh's trust domain and its aliases: identities in any of them are the same.
fn trust_domains(mesh: &MeshConfig) -> Vec<&str> {
    std::iter::once(mesh.trust_domain.as_str()).chain(mesh.trust_domain_aliases.iter().map(String::as_str)).collect()
}

/// Whether trust domain `td` of a principal (maybe `*x` or `x*`) names `domain`.
fn wildcard_names(td: &str, domain: &str) -> bool {
    td == domain
        || td.strip_prefix('*').is_some_and(|s| domain.ends_with(s))
        || td.strip_suffix('*').is_some_and(|p| domain.starts_with(p))
}

/// Principals as istiod migrates trust domains: one of the `<td>/ns/<ns>/sa/<sa>` form whose
/// trust domain names the mesh's, an alias, or is `cluster.local` (which stands for the mesh's
/// own) is the same identity in the trust domain and every alias — a wildcard trust domain
/// stays as written for the domains it already names. Any other principal (another trust
/// domain, a `*` one, another form) is kept as written.
fn with_trust_domains(mesh: &MeshConfig, principals: &[String]) -> Vec<String> {
    let domains = trust_domains(mesh);
    let mut out: Vec<String> = Vec::new();
    for principal in principals {
        let parts: Vec<&str> = principal.split('/').collect();
        let td = parts[0];
        let ours = td == DOMAIN_SUFFIX || domains.iter().any(|d| wildcard_names(td, d));
        if parts.len() != 5 || td == "*" || !ours {
            out.push(principal.clone());
            continue;
        }
        for domain in &domains {
            let named = td.starts_with('*') && wildcard_names(td, domain);
            let replaced = if named { principal.clone() } else { format!("{domain}/{}", parts[1..].join("/")) };
            if !out.contains(&replaced) {
                out.push(replaced);
            }
        }
    }
    out
}

/// `trustDomains` values as istiod expands them: the mesh's trust domain or an alias stands for
/// all of them.
fn with_aliases(mesh: &MeshConfig, values: &[String]) -> Vec<String> {
    let domains = trust_domains(mesh);
    let mut out: Vec<String> = Vec::new();
    for v in values {
        let expanded: Vec<String> = if domains.contains(&v.as_str()) {
            domains.iter().map(|d| d.to_string()).collect()
        } else {
            vec![v.clone()]
        };
        for e in expanded {
            if !out.contains(&e) {
                out.push(e);
            }
        }
    }
    out
}

fn source_principal(v: &str) -> Value {
    principal_name(string_match(v, "spiffe://", false))
}

/// A claim of the verified JWT payload (`[iss]`, `[groups]`, `[a, b]` for a nested one) against
/// a string: the claim is that string, or a list holding it.
fn claim_id(path: &[&str], m: Value) -> Value {
    let mut keys = vec![json!({"key": super::jwt::PAYLOAD_KEY})];
    keys.extend(path.iter().map(|k| json!({"key": k})));
    json!({"metadata": {"filter": super::jwt::METADATA_NAMESPACE, "path": keys, "value": {"or_match": {"value_matchers": [
        {"string_match": m.clone()},
        {"list_match": {"one_of": {"string_match": m}}},
    ]}}}})
}

fn any_string() -> Value {
    json!({"safe_regex": {"regex": ".+"}})
}

/// A request principal (`<iss>/<sub>`, split at the last `/`) as Istio matches it: `*` any
/// verified token, `*x` and `x*` a suffix of the issuer or a prefix of the subject (or of the
/// whole value without a `/`).
fn request_principal_id(v: &str) -> Value {
    let exact = |x: &str| json!({"exact": x});
    let (iss, sub) = match v.rsplit_once('/') {
        _ if v == "*" => (any_string(), any_string()),
        Some((iss, sub)) if v.starts_with('*') => {
            (if iss == "*" { any_string() } else { json!({"suffix": &iss[1..]}) }, exact(sub))
        }
        None if v.starts_with('*') => (any_string(), json!({"suffix": &v[1..]})),
        Some((iss, sub)) if v.ends_with('*') => {
            (exact(iss), if sub == "*" { any_string() } else { json!({"prefix": &sub[..sub.len() - 1]}) })
        }
        None if v.ends_with('*') => (json!({"prefix": &v[..v.len() - 1]}), any_string()),
        Some((iss, sub)) => (exact(iss), exact(sub)),
        None => (exact(v), exact("")),
    };
    json!({"and_ids": {"ids": [claim_id(&["iss"], iss), claim_id(&["sub"], sub)]}})
}

/// The claim path of a `request.auth.claims[a][b]` key (`[a, b]`), or None when it is not one.
fn claim_path(key: &str) -> Option<Vec<&str>> {
    let inner = key.strip_prefix("request.auth.claims[")?.strip_suffix(']')?;
    let path: Vec<&str> = inner.split("][").collect();
    path.iter().all(|k| !k.is_empty() && !k.contains(['[', ']'])).then_some(path)
}

/// Principal fields of a source, one `or_ids` each (request principals only on HTTP, where a
/// JWT can be verified).
fn source(s: &Source, tcp: bool, ns: &str, mesh: &MeshConfig) -> Vec<Value> {
    let mut out = Vec::new();
    let mut field = |values: &[String], negated: bool, f: &dyn Fn(&str) -> Value| {
        if values.is_empty() {
            return;
        }
        let or = or_of("or_ids", "ids", values.iter().map(|v| f(v)).collect());
        out.push(if negated { negate("not_id", or) } else { or });
    };
    field(&with_trust_domains(mesh, &s.principals), false, &source_principal);
    field(&with_trust_domains(mesh, &s.not_principals), true, &source_principal);
    let account = |v: &str| service_account_id(v, ns);
    field(&s.service_accounts, false, &account);
    field(&s.not_service_accounts, true, &account);
    if !tcp {
        field(&s.request_principals, false, &request_principal_id);
        field(&s.not_request_principals, true, &request_principal_id);
    }
    field(&s.namespaces, false, &namespace_id);
    field(&s.not_namespaces, true, &namespace_id);
    field(&with_aliases(mesh, &s.trust_domains), false, &trust_domain_id);
    field(&with_aliases(mesh, &s.not_trust_domains), true, &trust_domain_id);
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
        let host = |v: &str| header_match(":authority", v, true);
        field(&o.hosts, false, &host);
        field(&o.not_hosts, true, &host);
        let method = |v: &str| header_match(":method", v, false);
        field(&o.methods, false, &method);
        field(&o.not_methods, true, &method);
        let path = |v: &str| match path_template(v) {
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

/// A `when` condition: a permission (about the destination) or a principal (about the source).
enum Matcher {
    Permission(Value),
    Principal(Value),
}

fn values_or(c: &Condition, principal: bool, f: &dyn Fn(&str) -> Value) -> Value {
    let (or, list, not, and) =
        if principal { ("or_ids", "ids", "not_id", "and_ids") } else { ("or_rules", "rules", "not_rule", "and_rules") };
    let mut parts = Vec::new();
    if !c.values.is_empty() {
        parts.push(or_of(or, list, c.values.iter().map(|v| f(v)).collect()));
    }
    if !c.not_values.is_empty() {
        parts.push(negate(not, or_of(or, list, c.not_values.iter().map(|v| f(v)).collect())));
    }
    if parts.len() == 1 { parts.remove(0) } else { json!({and: {list: parts}}) }
}

/// `experimental.envoy.filters.<filter>[<key>]` against the filter's dynamic metadata, as
/// Istio reads it: a value `[v]` is an element of a list there, any other a string.
fn envoy_filter_metadata(key: &str, v: &str) -> Value {
    let inner = key.trim_start_matches("experimental.").trim_end_matches(']');
    let (filter, path) = inner.split_once('[').unwrap_or((inner, ""));
    let value = match v.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        Some(element) => json!({"list_match": {"one_of": {"string_match": string_match(element, "", false)}}}),
        None => json!({"string_match": string_match(v, "", false)}),
    };
    json!({"metadata": {"filter": filter, "path": [{"key": path}], "value": value}})
}

/// The matcher of a `when` condition, or None for one that cannot be evaluated here (HTTP
/// attributes on TCP; a key validation would have refused).
fn condition(c: &Condition, tcp: bool, ns: &str, mesh: &MeshConfig) -> Option<Matcher> {
    let key = c.key.as_str();
    // Identities in the mesh's trust domain stand for the same in its aliases (see
    // [`with_trust_domains`]).
    let migrated = Condition {
        values: with_trust_domains(mesh, &c.values),
        not_values: with_trust_domains(mesh, &c.not_values),
        ..c.clone()
    };
    Some(match key {
        "destination.ip" => Matcher::Permission(values_or(c, false, &|v| json!({"destination_ip": cidr(v)}))),
        "destination.port" => Matcher::Permission(values_or(
            c,
            false,
            &|v| json!({"destination_port": v.parse::<u32>().expect("validated port")}),
        )),
        "connection.sni" => {
            Matcher::Permission(values_or(c, false, &|v| json!({"requested_server_name": string_match(v, "", false)})))
        }
        _ if key.starts_with("experimental.envoy.filters.") && key.contains('[') && key.ends_with(']') => {
            Matcher::Permission(values_or(c, false, &|v| envoy_filter_metadata(key, v)))
        }
        "source.ip" => Matcher::Principal(values_or(c, true, &|v| json!({"direct_remote_ip": cidr(v)}))),
        "remote.ip" => Matcher::Principal(values_or(c, true, &|v| json!({"remote_ip": cidr(v)}))),
        "source.namespace" => Matcher::Principal(values_or(c, true, &namespace_id)),
        "source.principal" => Matcher::Principal(values_or(&migrated, true, &source_principal)),
        "source.serviceAccount" => Matcher::Principal(values_or(c, true, &|v| service_account_id(v, ns))),
        "source.trustDomain" => {
            let expanded = Condition {
                values: with_aliases(mesh, &c.values),
                not_values: with_aliases(mesh, &c.not_values),
                ..c.clone()
            };
            Matcher::Principal(values_or(&expanded, true, &trust_domain_id))
        }
        _ if tcp => return None,
        "request.auth.principal" => Matcher::Principal(values_or(c, true, &request_principal_id)),
        "request.auth.audiences" => {
            Matcher::Principal(values_or(c, true, &|v| claim_id(&["aud"], string_match(v, "", false))))
        }
        "request.auth.presenter" => {
            Matcher::Principal(values_or(c, true, &|v| claim_id(&["azp"], string_match(v, "", false))))
        }
        _ if claim_path(key).is_some() => {
            let path = claim_path(key).expect("a claim path");
            Matcher::Principal(values_or(c, true, &|v| claim_id(&path, string_match(v, "", false))))
        }
        _ if key.starts_with("request.headers[") && key.ends_with(']') => {
            let name = &key["request.headers[".len()..key.len() - 1];
            Matcher::Principal(values_or(c, true, &|v| header_match(name, v, false)))
        }
        _ => return None,
    })
}
