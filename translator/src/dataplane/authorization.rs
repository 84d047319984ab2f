//! AuthorizationPolicy → L4 rules the kernel evaluates for a kernel-mode workload, with Istio
//! ambient's (ztunnel's) fail-closed rule for what L4 cannot see: an ALLOW rule with HTTP-only
//! attributes does not match, a DENY rule with them matches on its L4 part alone. Each such
//! case is reported as a warning naming the policy and the field.

use std::collections::BTreeMap;

use ipnet::IpNet;

use super::{KernelAuthorization, KernelRule};
use crate::diagnostic::{Diagnostic, ObjectRef, Severity};
use crate::model::IstioObject;
use crate::model::authorization_policy::{
    Action, AuthorizationPolicySpec, Condition, Operation, Rule, Source, dry_run,
};
use crate::model::mesh_config::MeshConfig;
use crate::snapshot::Snapshot;

/// Reports for one policy rule.
struct Reporter<'a> {
    policy: &'a IstioObject<AuthorizationPolicySpec>,
    index: usize,
    deny: bool,
    diagnostics: &'a mut Vec<Diagnostic>,
}

impl Reporter<'_> {
    fn warn(&mut self, field: &str, message: String) {
        let p = self.policy;
        self.diagnostics.push(Diagnostic {
            severity: Severity::Warning,
            origin: p.origin.clone(),
            object: Some(ObjectRef::new("AuthorizationPolicy", &p.meta.namespace, &p.meta.name)),
            path: format!("spec.rules[{}]{field}", self.index),
            code: None,
            message,
        });
    }

    /// An attribute the kernel cannot evaluate, at `field`.
    fn unsupported(&mut self, field: &str, what: &str, plural: bool) {
        let effect = if self.deny {
            "this DENY rule matches without it (fail closed)"
        } else {
            "this ALLOW rule does not match in the kernel (fail closed)"
        };
        let verb = if plural { "need" } else { "needs" };
        self.warn(field, format!("{what} {verb} L7 (a sidecar or the node proxy); {effect}"));
    }
}

/// The rule that refuses the kernel path's plaintext on `w`'s STRICT mTLS ports: a DENY of
/// every caller there (kernel- and node-mode callers get EPERM at connect(); a kernel-mode
/// `w` also drops such connections from off the node, which nothing would decrypt). None
/// when no port of `w` is STRICT. Warns once per workload, naming it, the PeerAuthentication
/// and the kernel-path workloads of the mesh that are refused.
pub fn strict_mtls_rule(
    snapshot: &Snapshot,
    w: &crate::snapshot::Workload,
    mode: sluice_dataplane_api::Mode,
    clients: &KernelClients<'_>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<KernelRule> {
    use crate::model::authorization_policy::MtlsMode;
    let mtls = snapshot.workload_mtls(&w.namespace, Some(&w.labels));
    let strict = |m: &crate::snapshot::ModeFrom| m.mode == MtlsMode::Strict;
    // All ports but the non-STRICT overrides, or only the STRICT overrides.
    let (ports, not_ports): (Vec<u32>, Vec<u32>) = if strict(&mtls.workload) {
        (Vec::new(), mtls.ports.iter().filter(|(_, m)| !strict(m)).map(|(p, _)| *p).collect())
    } else {
        (mtls.ports.iter().filter(|(_, m)| strict(m)).map(|(p, _)| *p).collect(), Vec::new())
    };
    if !strict(&mtls.workload) && ports.is_empty() {
        return None;
    }
    let decided = if strict(&mtls.workload) { &mtls.workload } else { mtls.ports.values().find(|m| strict(m))? };
    let policy = decided.policy.clone()?;
    let on = match (ports.is_empty(), not_ports.is_empty()) {
        (true, true) => "every port".to_string(),
        (true, false) => format!("every port but {not_ports:?}"),
        _ => format!("ports {ports:?}"),
    };
    let (shown, others) = clients.other_than(w, mode != sluice_dataplane_api::Mode::Sidecar);
    if others > 0 {
        let more = others - shown.len();
        let more = if more > 0 { format!(" and {more} more") } else { String::new() };
        let target = if mode == sluice_dataplane_api::Mode::Kernel {
            "; as a kernel-mode workload it also drops connections from off the node there, which it cannot decrypt"
        } else {
            ""
        };
        diagnostics.push(Diagnostic {
            severity: Severity::Warning,
            origin: snapshot.peer_authentications.get(&policy).map(|p| p.origin.clone()).unwrap_or_default(),
            object: Some(policy.clone()),
            path: "spec.mtls".into(),
            code: None,
            message: format!(
                "{}/{} requires mTLS on {on}: connections to it there from kernel- or node-mode workloads ({}{more}) \
                 are refused with EPERM, as the kernel path has no mTLS (give them a sidecar){target}",
                w.namespace,
                w.name,
                shown.join(", ")
            ),
        });
    }
    Some(KernelRule {
        policy: format!("{}/{}", policy.namespace, policy.name),
        rule: 0,
        deny: true,
        ports,
        not_ports,
        ..Default::default()
    })
}

/// The workloads on the kernel path (kernel- or node-mode), which a STRICT workload's warning
/// names: found once per translation, and only if some workload is STRICT (a scan of the mesh
/// per STRICT workload made an all-STRICT mesh quadratic).
pub struct KernelClients<'a> {
    snapshot: &'a Snapshot,
    /// The first six by name (five besides any one workload), and how many there are.
    found: std::cell::OnceCell<(Vec<String>, usize)>,
}

impl<'a> KernelClients<'a> {
    /// The kernel-path workloads of `snapshot`, not looked up yet.
    pub fn new(snapshot: &'a Snapshot) -> Self {
        Self { snapshot, found: std::cell::OnceCell::new() }
    }

    /// Up to five of them besides `w` (which is one of them if `w_on_kernel_path`), and how many
    /// there are besides `w`.
    fn other_than(&self, w: &crate::snapshot::Workload, w_on_kernel_path: bool) -> (Vec<&str>, usize) {
        let (first, count) = self.found.get_or_init(|| {
            let snapshot = self.snapshot;
            let mut on_path = snapshot
                .workloads
                .values()
                .filter(|c| super::mode(snapshot, &c.namespace, &c.labels) != sluice_dataplane_api::Mode::Sidecar)
                .map(|c| format!("{}/{}", c.namespace, c.name));
            let first: Vec<String> = on_path.by_ref().take(6).collect();
            let count = first.len() + on_path.count();
            (first, count)
        });
        let me = format!("{}/{}", w.namespace, w.name);
        let shown = first.iter().filter(|n| **n != me).take(5).map(String::as_str).collect();
        (shown, count - usize::from(w_on_kernel_path))
    }
}

/// The authorization of a kernel-mode workload, or None when no policy selects it.
pub fn workload_authorization(
    snapshot: &Snapshot,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    ip: Option<&str>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<KernelAuthorization> {
    let mut enforced = Vec::new();
    for p in snapshot.authorization_policies_for(namespace, Some(labels)) {
        let reference = ObjectRef::new("AuthorizationPolicy", &p.meta.namespace, &p.meta.name);
        let warn = |diagnostics: &mut Vec<Diagnostic>, path: &str, message: &str| {
            diagnostics.push(Diagnostic {
                severity: Severity::Warning,
                origin: p.origin.clone(),
                object: Some(reference.clone()),
                path: path.into(),
                code: None,
                message: message.into(),
            })
        };
        match p.spec.action.unwrap_or(Action::Allow) {
            // Dry runs enforce nothing; the kernel keeps no shadow rules to count them.
            _ if dry_run(&p.meta) == Ok(true) => {}
            Action::Audit => warn(
                diagnostics,
                "spec.action",
                "AUDIT is not logged by the kernel path (a sidecar or the node proxy logs it); the policy changes \
                 nothing there",
            ),
            Action::Custom => {
                warn(
                    diagnostics,
                    "spec.action",
                    "CUSTOM (external authorization) is not evaluated by the kernel path: the connections its \
                     rules match are refused (fail closed)",
                );
                enforced.push((p, true));
            }
            action => enforced.push((p, action == Action::Deny)),
        }
    }
    if enforced.is_empty() {
        return None;
    }
    let mut out = KernelAuthorization::default();
    // DENY (and CUSTOM) rules first, as the kernel evaluates them in order.
    enforced.sort_by_key(|(_, deny)| !deny);
    for (p, deny) in enforced {
        out.default_deny |= !deny;
        for (index, rule) in p.spec.rules.iter().enumerate() {
            let mut reporter = Reporter { policy: p, index, deny, diagnostics };
            out.rules.extend(rule_clauses(rule, &mut reporter, ip, &snapshot.mesh));
        }
    }
    Some(out)
}

/// A rule as kernel rules: one per (source, operation) pair, each with the `when` conditions.
fn rule_clauses(rule: &Rule, r: &mut Reporter<'_>, ip: Option<&str>, mesh: &MeshConfig) -> Vec<KernelRule> {
    let mut l7 = rule.http_only_fields();
    // What only a proxy sees: the TLS server name and Envoy filters' metadata.
    l7.extend(
        rule.when
            .iter()
            .enumerate()
            .filter(|(_, c)| c.key == "connection.sni" || c.key.starts_with("experimental.envoy.filters."))
            .map(|(j, c)| format!("when[{j}].key={}", c.key)),
    );
    if !l7.is_empty() {
        let what = format!("{} ({})", if l7.len() == 1 { "the attribute" } else { "the attributes" }, l7.join(", "));
        r.unsupported("", &what, l7.len() > 1);
        if !r.deny {
            return Vec::new();
        }
    }
    let base = KernelRule {
        policy: format!("{}/{}", r.policy.meta.namespace, r.policy.meta.name),
        rule: r.index as u32,
        deny: r.deny,
        ..Default::default()
    };
    let sources: Vec<(usize, Option<&Source>)> = if rule.from.is_empty() {
        vec![(0, None)]
    } else {
        rule.from.iter().enumerate().map(|(j, f)| (j, f.source.as_ref())).collect()
    };
    let operations: Vec<Option<&Operation>> =
        if rule.to.is_empty() { vec![None] } else { rule.to.iter().map(|t| t.operation.as_ref()).collect() };
    let mut out = Vec::new();
    for (j, source) in &sources {
        for operation in &operations {
            let mut clause = base.clone();
            let mut matches_something = true;
            if let Some(s) = source {
                matches_something &= apply_source(&mut clause, s, &format!(".from[{j}].source"), r, mesh);
            }
            if let Some(o) = operation {
                matches_something &= apply_operation(&mut clause, o);
            }
            for (w, c) in rule.when.iter().enumerate() {
                matches_something &= apply_condition(&mut clause, c, &format!(".when[{w}]"), r, ip, mesh);
            }
            if matches_something {
                out.push(clause);
            }
        }
    }
    out
}

/// `<namespace>/<sa>` from a principal (`[spiffe://]<trust domain>/ns/<ns>/sa/<sa>`), `*` for
/// `*`, None for a pattern the kernel cannot match (ids are exact).
fn principal(value: &str) -> Option<String> {
    if value == "*" {
        return Some("*".into());
    }
    let v = value.strip_prefix("spiffe://").unwrap_or(value);
    let (_, rest) = v.split_once("/ns/")?;
    let (ns, sa) = rest.split_once("/sa/")?;
    (!v.contains('*') && !ns.is_empty() && !sa.is_empty() && !sa.contains('/')).then(|| format!("{ns}/{sa}"))
}

/// `<namespace>/<sa>` from a serviceAccounts entry (`<ns>/<sa>` or `<sa>` in the policy's
/// namespace).
fn service_account(value: &str, policy_ns: &str) -> String {
    match value.split_once('/') {
        Some((ns, sa)) => format!("{ns}/{sa}"),
        None => format!("{policy_ns}/{value}"),
    }
}

fn namespace(value: &str) -> Option<String> {
    (value == "*" || !value.contains('*')).then(|| value.to_string())
}

fn cidr(value: &str) -> Option<String> {
    value
        .parse::<IpNet>()
        .or_else(|_| value.parse::<std::net::IpAddr>().map(IpNet::from))
        .ok()
        .map(|n| n.trunc().to_string())
}

/// Converts identity-like values; an unmatchable pattern is dropped from an ALLOW rule's list
/// (it cannot match) and widened to `*` in a DENY rule (fail closed). Returns false when a
/// positive list ends up empty, so the clause can never match.
fn convert(
    values: &[String],
    f: &dyn Fn(&str) -> Option<String>,
    field: &str,
    negated: bool,
    r: &mut Reporter<'_>,
) -> (Vec<String>, bool) {
    let mut out = Vec::new();
    for v in values {
        match f(v) {
            Some(x) => out.push(x),
            None => {
                // A negated list excludes: widening it in a DENY rule would match less, so
                // there the pattern's effect is the ALLOW one and vice versa.
                let widen = r.deny != negated;
                r.warn(
                    field,
                    format!(
                        "{v:?} is a pattern the kernel cannot match exactly; {}",
                        if widen { "treated as \"*\" (fail closed)" } else { "ignored (fail closed)" }
                    ),
                );
                if widen {
                    out.push("*".into());
                }
            }
        }
    }
    let possible = negated || values.is_empty() || !out.is_empty();
    out.sort();
    out.dedup();
    (out, possible)
}

/// ANDs an OR-list into a clause field: the intersection when both are set (`*` is the
/// identity element). Returns false when nothing can satisfy both.
fn and_list(into: &mut Vec<String>, values: Vec<String>) -> bool {
    if values.is_empty() {
        return true;
    }
    if into.is_empty() || into.iter().any(|v| v == "*") {
        *into = values;
    } else if !values.iter().any(|v| v == "*") {
        into.retain(|v| values.contains(v));
        return !into.is_empty();
    }
    true
}

fn and_ports(into: &mut Vec<u32>, values: Vec<u32>) -> bool {
    if values.is_empty() {
        return true;
    }
    if into.is_empty() {
        *into = values;
        return true;
    }
    into.retain(|p| values.contains(p));
    !into.is_empty()
}

fn union(into: &mut Vec<String>, values: Vec<String>) {
    into.extend(values);
    into.sort();
    into.dedup();
}

fn and_blocks(into: &mut Vec<String>, values: Vec<String>, field: &str, r: &mut Reporter<'_>) -> bool {
    if values.is_empty() {
        return true;
    }
    if into.is_empty() {
        *into = values;
        return true;
    }
    // Two address lists in one rule: their intersection is not one list of blocks.
    r.warn(field, "a second list of source addresses in one rule is not supported in the kernel; fail closed".into());
    if r.deny {
        union(into, values);
        true
    } else {
        false
    }
}

/// Whether a peer of the kernel path passes `trustDomains`/`notTrustDomains`: every such peer is
/// a workload of this mesh, so its trust domain is the mesh's.
fn in_trust_domains(values: &[String], not_values: &[String], mesh: &MeshConfig) -> bool {
    let ours = |v: &String| {
        let td = mesh.trust_domain.as_str();
        v == "*"
            || v == td
            || v.strip_suffix('*').is_some_and(|p| td.starts_with(p))
            || v.strip_prefix('*').is_some_and(|s| td.ends_with(s))
    };
    (values.is_empty() || values.iter().any(ours)) && !not_values.iter().any(ours)
}

fn apply_source(clause: &mut KernelRule, s: &Source, path: &str, r: &mut Reporter<'_>, mesh: &MeshConfig) -> bool {
    let ns = r.policy.meta.namespace.clone();
    let mut ok = in_trust_domains(&s.trust_domains, &s.not_trust_domains, mesh);
    let (p, possible) = convert(&s.principals, &principal, &format!("{path}.principals"), false, r);
    ok &= possible && and_list(&mut clause.principals, p);
    let (p, _) = convert(&s.not_principals, &principal, &format!("{path}.notPrincipals"), true, r);
    union(&mut clause.not_principals, p);
    let sa = |v: &str| Some(service_account(v, &ns));
    let (p, possible) = convert(&s.service_accounts, &sa, &format!("{path}.serviceAccounts"), false, r);
    ok &= possible && and_list(&mut clause.principals, p);
    let (p, _) = convert(&s.not_service_accounts, &sa, &format!("{path}.notServiceAccounts"), true, r);
    union(&mut clause.not_principals, p);
    let (n, possible) = convert(&s.namespaces, &namespace, &format!("{path}.namespaces"), false, r);
    ok &= possible && and_list(&mut clause.namespaces, n);
    let (n, _) = convert(&s.not_namespaces, &namespace, &format!("{path}.notNamespaces"), true, r);
    union(&mut clause.not_namespaces, n);
    // Without a proxy in between, the remote address is the direct one.
    for (list, field) in [(&s.ip_blocks, "ipBlocks"), (&s.remote_ip_blocks, "remoteIpBlocks")] {
        let (b, possible) = convert(list, &cidr, &format!("{path}.{field}"), false, r);
        ok &= possible && and_blocks(&mut clause.ip_blocks, b, &format!("{path}.{field}"), r);
    }
    for (list, field) in [(&s.not_ip_blocks, "notIpBlocks"), (&s.not_remote_ip_blocks, "notRemoteIpBlocks")] {
        let (b, _) = convert(list, &cidr, &format!("{path}.{field}"), true, r);
        union(&mut clause.not_ip_blocks, b);
    }
    ok
}

fn ports(values: &[String]) -> Vec<u32> {
    values.iter().filter_map(|p| p.parse().ok()).collect()
}

fn apply_operation(clause: &mut KernelRule, o: &Operation) -> bool {
    clause.not_ports.extend(ports(&o.not_ports));
    and_ports(&mut clause.ports, ports(&o.ports))
}

fn apply_condition(
    clause: &mut KernelRule,
    c: &Condition,
    path: &str,
    r: &mut Reporter<'_>,
    ip: Option<&str>,
    mesh: &MeshConfig,
) -> bool {
    let ns = r.policy.meta.namespace.clone();
    let field = |suffix: &str| format!("{path}.{suffix}");
    match c.key.as_str() {
        "source.ip" | "remote.ip" => {
            let (b, possible) = convert(&c.values, &cidr, &field("values"), false, r);
            let (nb, _) = convert(&c.not_values, &cidr, &field("notValues"), true, r);
            union(&mut clause.not_ip_blocks, nb);
            possible && and_blocks(&mut clause.ip_blocks, b, &field("values"), r)
        }
        "source.namespace" => {
            let (n, possible) = convert(&c.values, &namespace, &field("values"), false, r);
            let (nn, _) = convert(&c.not_values, &namespace, &field("notValues"), true, r);
            union(&mut clause.not_namespaces, nn);
            possible && and_list(&mut clause.namespaces, n)
        }
        "source.principal" | "source.serviceAccount" => {
            let f: &dyn Fn(&str) -> Option<String> =
                if c.key == "source.principal" { &principal } else { &|v: &str| Some(service_account(v, &ns)) };
            let (p, possible) = convert(&c.values, f, &field("values"), false, r);
            let (np, _) = convert(&c.not_values, f, &field("notValues"), true, r);
            union(&mut clause.not_principals, np);
            possible && and_list(&mut clause.principals, p)
        }
        "destination.port" => {
            clause.not_ports.extend(ports(&c.not_values));
            and_ports(&mut clause.ports, ports(&c.values))
        }
        "destination.ip" => {
            // The destination is this workload: decided here, once.
            let addr = ip.and_then(|i| i.parse::<std::net::IpAddr>().ok());
            let contains = |list: &[String]| {
                addr.is_some_and(|a| list.iter().filter_map(|v| cidr(v)?.parse::<IpNet>().ok()).any(|n| n.contains(&a)))
            };
            (c.values.is_empty() || contains(&c.values)) && !contains(&c.not_values)
        }
        "source.trustDomain" => in_trust_domains(&c.values, &c.not_values, mesh),
        // connection.sni, experimental.* and request.* were handled as L7 attributes before.
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_become_namespace_and_service_account() {
        assert_eq!(principal("cluster.local/ns/default/sa/sleep").as_deref(), Some("default/sleep"));
        assert_eq!(principal("spiffe://td/ns/a/sa/b").as_deref(), Some("a/b"));
        assert_eq!(principal("*").as_deref(), Some("*"));
        assert_eq!(principal("cluster.local/ns/default/sa/*"), None);
        assert_eq!(principal("*/ns/default/sa/x"), None);
        assert_eq!(service_account("sleep", "prod"), "prod/sleep");
        assert_eq!(cidr("10.1.2.3").as_deref(), Some("10.1.2.3/32"));
        assert_eq!(cidr("10.1.2.3/8").as_deref(), Some("10.0.0.0/8"));
    }

    #[test]
    fn lists_and_as_intersections() {
        let mut v = vec!["a".to_string(), "b".into()];
        assert!(and_list(&mut v, vec!["b".into(), "c".into()]));
        assert_eq!(v, vec!["b".to_string()]);
        assert!(!and_list(&mut v, vec!["c".into()]));
        let mut any = vec!["*".to_string()];
        assert!(and_list(&mut any, vec!["x".into()]));
        assert_eq!(any, vec!["x".to_string()]);
        let mut p = vec![80, 443];
        assert!(!and_ports(&mut p, vec![8080]));
    }
}
