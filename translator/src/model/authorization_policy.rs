//! `security.istio.io` AuthorizationPolicy and PeerAuthentication: types and Istio's validation
//! rules.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::IstioObject;
use super::common::LabelSelector;
use super::virtual_service::HTTP_METHODS;
use crate::diagnostic::Findings;

/// AuthorizationPolicy `spec`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Workloads the policy applies to; none means the namespace (or the mesh, in the root namespace).
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    /// Gateway API targets (not supported yet).
    #[serde(default)]
    pub target_ref: Option<serde_json::Value>,
    /// Gateway API targets (not supported yet).
    #[serde(default)]
    pub target_refs: Vec<serde_json::Value>,
    /// Rules, ORed. An ALLOW policy with no rules allows nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// What a match does.
    #[serde(default)]
    pub action: Option<Action>,
    /// Extension provider for CUSTOM.
    #[serde(default)]
    pub provider: Option<serde_json::Value>,
}

/// Policy action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    /// Allow matches; with any ALLOW policy present, deny the rest.
    Allow,
    /// Deny matches.
    Deny,
    /// Log matches (not enforced).
    Audit,
    /// Delegate to an external authorizer.
    Custom,
}

impl Action {
    /// The name Istio's API spells it with.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        }
    }
}

/// One rule: `from` AND `to` AND `when`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Sources, ORed.
    #[serde(default)]
    pub from: Vec<From>,
    /// Operations, ORed.
    #[serde(default)]
    pub to: Vec<To>,
    /// Conditions, ANDed.
    #[serde(default)]
    pub when: Vec<Condition>,
}

/// `from` entry.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct From {
    /// The source.
    #[serde(default)]
    pub source: Option<Source>,
}

/// `to` entry.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct To {
    /// The operation.
    #[serde(default)]
    pub operation: Option<Operation>,
}

/// Request source; fields ANDed, values ORed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Peer identities (`cluster.local/ns/<ns>/sa/<sa>`).
    #[serde(default)]
    pub principals: Vec<String>,
    /// Excluded peer identities.
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// JWT identities (`iss/sub`).
    #[serde(default)]
    pub request_principals: Vec<String>,
    /// Excluded JWT identities.
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    /// Peer namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Excluded peer namespaces.
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// Peer IPs / CIDRs.
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    /// Excluded peer IPs.
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    /// Original client IPs (X-Forwarded-For).
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    /// Excluded original client IPs.
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
    /// Service accounts (`ns/name` or `name`).
    #[serde(default)]
    pub service_accounts: Vec<String>,
    /// Excluded service accounts.
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    /// Peer trust domains (of the peer certificate's SPIFFE id).
    #[serde(default)]
    pub trust_domains: Vec<String>,
    /// Excluded peer trust domains.
    #[serde(default)]
    pub not_trust_domains: Vec<String>,
}

/// Request operation; fields ANDed, values ORed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// Host header values.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Excluded hosts.
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// Destination ports.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Excluded ports.
    #[serde(default)]
    pub not_ports: Vec<String>,
    /// HTTP methods.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Excluded methods.
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// Paths (`/a`, `/a*`, `*a`, `*`).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Excluded paths.
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// `when` condition.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Attribute name, e.g. `request.headers[x-token]`.
    #[serde(default)]
    pub key: String,
    /// Values, ORed.
    #[serde(default)]
    pub values: Vec<String>,
    /// Excluded values.
    #[serde(default)]
    pub not_values: Vec<String>,
}

impl Rule {
    /// HTTP-only fields of the rule, by their path under the rule (`to[0].operation.paths`):
    /// on a TCP port (or in the kernel) an ALLOW rule with any of them never matches and a DENY
    /// rule matches without them, as Istio does (fail closed).
    pub fn http_only_fields(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (j, f) in self.from.iter().enumerate() {
            if let Some(s) = &f.source {
                if !s.request_principals.is_empty() {
                    out.push(format!("from[{j}].source.requestPrincipals"));
                }
                if !s.not_request_principals.is_empty() {
                    out.push(format!("from[{j}].source.notRequestPrincipals"));
                }
            }
        }
        for (j, t) in self.to.iter().enumerate() {
            if let Some(o) = &t.operation {
                for (field, list) in [
                    ("hosts", &o.hosts),
                    ("notHosts", &o.not_hosts),
                    ("methods", &o.methods),
                    ("notMethods", &o.not_methods),
                    ("paths", &o.paths),
                    ("notPaths", &o.not_paths),
                ] {
                    if !list.is_empty() {
                        out.push(format!("to[{j}].operation.{field}"));
                    }
                }
            }
        }
        for (j, c) in self.when.iter().enumerate() {
            if c.key.starts_with("request.") {
                out.push(format!("when[{j}].key={}", c.key));
            }
        }
        out
    }
}

/// The annotation that makes a policy a dry run: evaluated and counted, never enforced.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Whether the policy is a dry run (`istio.io/dry-run`, a Go boolean as Istio parses it), or
/// the annotation's value when it is not a boolean (Istio then enforces the policy).
pub fn dry_run(meta: &super::Meta) -> Result<bool, String> {
    match meta.annotations.get(DRY_RUN_ANNOTATION).map(String::as_str) {
        None | Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
        Some(other) => Err(other.to_string()),
    }
}

/// What stands in for a policy sluice rejected, so that the workloads it selects fail closed
/// instead of losing it: a DENY of every request, with the policy's name, selector and
/// namespace. None for AUDIT and dry-run policies, which enforce nothing.
pub fn rejected_stand_in(
    policy: &IstioObject<AuthorizationPolicySpec>,
) -> Option<IstioObject<AuthorizationPolicySpec>> {
    if policy.spec.action == Some(Action::Audit) || dry_run(&policy.meta) == Ok(true) {
        return None;
    }
    let spec = AuthorizationPolicySpec {
        selector: policy.spec.selector.clone(),
        action: Some(Action::Deny),
        rules: vec![Rule::default()],
        ..Default::default()
    };
    Some(IstioObject { meta: policy.meta.clone(), spec, origin: policy.origin.clone() })
}

const CONDITION_KEYS: &[&str] = &[
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "source.serviceAccount",
    "source.trustDomain",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "destination.ip",
    "destination.port",
    "connection.sni",
];

/// True for `when` keys with a bracketed suffix: `request.headers[...]`, `request.auth.claims[...]`.
fn is_bracket_key(key: &str) -> bool {
    ["request.headers[", "request.auth.claims[", "experimental.envoy.filters."].iter().any(|p| key.starts_with(p))
        && key.ends_with(']')
        && key.len() > key.find('[').unwrap_or(0) + 2
}

/// Istio's AuthorizationPolicy validation rules.
pub fn validate(spec: &AuthorizationPolicySpec, findings: &mut Findings) {
    let action = spec.action.unwrap_or(Action::Allow);
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        findings.error("spec.targetRefs", "targetRef(s) are not supported by sluice yet; use selector");
    }
    if spec.selector.is_some() && (spec.target_ref.is_some() || !spec.target_refs.is_empty()) {
        findings.error("spec.selector", "selector and targetRef(s) cannot both be set");
    }
    match action {
        Action::Custom => {
            if spec.provider.is_none() {
                findings.error("spec.provider", "a CUSTOM policy needs a provider");
            } else {
                findings.warn(
                    "spec.action",
                    "CUSTOM (external authorization) is not translated yet by sluice: the requests its rules match \
                     are denied (fail closed), as Istio does for a CUSTOM policy whose provider it cannot use",
                );
            }
        }
        _ if spec.provider.is_some() => findings.error("spec.provider", "provider is only allowed with action CUSTOM"),
        _ => {}
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        for (j, f) in rule.from.iter().enumerate() {
            let fp = format!("{path}.from[{j}].source");
            match &f.source {
                None => findings.error(&fp, "source is required"),
                Some(s) => validate_source(&fp, s, findings),
            }
        }
        for (j, t) in rule.to.iter().enumerate() {
            let tp = format!("{path}.to[{j}].operation");
            match &t.operation {
                None => findings.error(&tp, "operation is required"),
                Some(o) => validate_operation(&tp, o, findings),
            }
        }
        for (j, c) in rule.when.iter().enumerate() {
            let cp = format!("{path}.when[{j}]");
            if !(CONDITION_KEYS.contains(&c.key.as_str()) || is_bracket_key(&c.key)) {
                findings.error(format!("{cp}.key"), format!("unknown attribute {:?}", c.key));
            }
            if c.values.is_empty() && c.not_values.is_empty() {
                findings.error(&cp, "at least one of values or notValues is required");
            }
            let ip_key = matches!(c.key.as_str(), "source.ip" | "remote.ip" | "destination.ip");
            for (k, v) in c.values.iter().chain(&c.not_values).enumerate() {
                if ip_key && super::parse_cidr(v).is_none() {
                    findings.error(format!("{cp}.values[{k}]"), format!("{v:?} is not an IP or CIDR"));
                }
                if c.key == "destination.port" && v.parse::<u16>().map_or(true, |p| p == 0) {
                    findings.error(format!("{cp}.values[{k}]"), format!("{v:?} is not a port in 1-65535"));
                }
            }
        }
    }
}

fn validate_source(path: &str, s: &Source, findings: &mut Findings) {
    let lists = [
        &s.principals,
        &s.not_principals,
        &s.request_principals,
        &s.not_request_principals,
        &s.namespaces,
        &s.not_namespaces,
        &s.ip_blocks,
        &s.not_ip_blocks,
        &s.remote_ip_blocks,
        &s.not_remote_ip_blocks,
        &s.service_accounts,
        &s.not_service_accounts,
        &s.trust_domains,
        &s.not_trust_domains,
    ];
    if lists.iter().all(|l| l.is_empty()) {
        findings.error(path, "a source must set at least one field");
    }
    let has_accounts = !s.service_accounts.is_empty() || !s.not_service_accounts.is_empty();
    let has_principals = !s.principals.is_empty() || !s.not_principals.is_empty();
    let has_namespaces = !s.namespaces.is_empty() || !s.not_namespaces.is_empty();
    if has_accounts && has_principals {
        findings.error(path, "serviceAccounts cannot be combined with principals");
    }
    if has_accounts && has_namespaces {
        findings.error(path, "serviceAccounts cannot be combined with namespaces");
    }
    for (field, list) in [
        ("ipBlocks", &s.ip_blocks),
        ("notIpBlocks", &s.not_ip_blocks),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ] {
        for (i, v) in list.iter().enumerate() {
            if super::parse_cidr(v).is_none() {
                findings.error(format!("{path}.{field}[{i}]"), format!("{v:?} is not an IP or CIDR"));
            }
        }
    }
    for (field, list) in [
        ("principals", &s.principals),
        ("notPrincipals", &s.not_principals),
        ("namespaces", &s.namespaces),
        ("notNamespaces", &s.not_namespaces),
        ("trustDomains", &s.trust_domains),
        ("notTrustDomains", &s.not_trust_domains),
    ] {
        for (i, v) in list.iter().enumerate() {
            validate_wildcard(&format!("{path}.{field}[{i}]"), v, findings);
        }
    }
}

fn validate_operation(path: &str, o: &Operation, findings: &mut Findings) {
    let lists = [&o.hosts, &o.not_hosts, &o.ports, &o.not_ports, &o.methods, &o.not_methods, &o.paths, &o.not_paths];
    if lists.iter().all(|l| l.is_empty()) {
        findings.error(path, "an operation must set at least one field");
    }
    for (field, list) in [("ports", &o.ports), ("notPorts", &o.not_ports)] {
        for (i, p) in list.iter().enumerate() {
            if p.parse::<u16>().map_or(true, |p| p == 0) {
                findings.error(format!("{path}.{field}[{i}]"), format!("{p:?} is not a port in 1-65535"));
            }
        }
    }
    for (field, list) in [("methods", &o.methods), ("notMethods", &o.not_methods)] {
        for (i, m) in list.iter().enumerate() {
            if !HTTP_METHODS.contains(&m.as_str()) && m != "*" {
                findings
                    .warn(format!("{path}.{field}[{i}]"), format!("{m:?} is not a standard upper-case HTTP method"));
            }
        }
    }
    for (field, list) in [("paths", &o.paths), ("notPaths", &o.not_paths)] {
        for (i, v) in list.iter().enumerate() {
            match path_template(v) {
                Some(Err(why)) => findings.error(format!("{path}.{field}[{i}]"), format!("{v:?}: {why}")),
                Some(Ok(_)) => {}
                None => validate_wildcard(&format!("{path}.{field}[{i}]"), v, findings),
            }
        }
    }
    for (field, list) in [("hosts", &o.hosts), ("notHosts", &o.not_hosts)] {
        for (i, v) in list.iter().enumerate() {
            validate_wildcard(&format!("{path}.{field}[{i}]"), v, findings);
        }
    }
}

/// Istio's path template operators: one path segment, and any number of them.
const MATCH_ONE: &str = "{*}";
const MATCH_ANY: &str = "{**}";

/// For a path with template operators (`/a/{*}/b`, `/{**}/x`), Envoy's URI template
/// (`/a/*/b`, `/**/x`, rooted at `/`), or why Istio refuses it: `{**}` at most once with no operator after
/// it, no other braces, and every other segment a literal of RFC 3986 path characters. None
/// for a path without operators.
pub fn path_template(path: &str) -> Option<Result<String, String>> {
    if !path.contains(MATCH_ONE) && !path.contains(MATCH_ANY) {
        return None;
    }
    let mut any = false;
    for segment in path.trim_matches('/').split('/') {
        match segment {
            MATCH_ONE | MATCH_ANY if any => return Some(Err("{**} must be the last operator".into())),
            MATCH_ONE => {}
            MATCH_ANY => any = true,
            _ if segment.contains(['{', '}']) => {
                return Some(Err("'{' and '}' are allowed only as the operators {*} and {**}".into()));
            }
            _ if !segment.chars().all(|c| c.is_ascii_alphanumeric() || "-._~%!$&'()+,;:@=".contains(c)) => {
                return Some(Err(format!("segment {segment:?} is not a literal of path characters")));
            }
            _ => {}
        }
    }
    // Envoy's templates start at the root; `{**}/x` means the same as `/{**}/x`.
    let rooted = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
    Some(Ok(rooted.replace(MATCH_ANY, "**").replace(MATCH_ONE, "*")))
}

/// Istio allows `*` only as a whole value, a prefix or a suffix.
fn validate_wildcard(path: &str, v: &str, findings: &mut Findings) {
    if v.is_empty() {
        findings.error(path, "value must not be empty");
    } else if v.len() > 1 && v[1..v.len() - 1].contains('*') {
        findings.error(path, format!("{v:?}: '*' is only allowed at the start or end"));
    }
}

/// PeerAuthentication `spec`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Workloads the policy applies to.
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    /// mTLS mode for all ports.
    #[serde(default)]
    pub mtls: Option<MutualTls>,
    /// Per-port modes (written but empty is an error, as the CRD's `minProperties: 1` says).
    #[serde(default)]
    pub port_level_mtls: Option<BTreeMap<u32, MutualTls>>,
}

/// mTLS setting.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MutualTls {
    /// The mode.
    #[serde(default)]
    pub mode: Option<MtlsMode>,
}

/// mTLS modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the parent.
    Unset,
    /// Plain text only.
    Disable,
    /// Both.
    Permissive,
    /// mTLS only.
    Strict,
}

/// Istio's PeerAuthentication validation rules.
pub fn validate_peer_authentication(spec: &PeerAuthenticationSpec, findings: &mut Findings) {
    let port_level = spec.port_level_mtls.clone().unwrap_or_default();
    if spec.port_level_mtls.as_ref().is_some_and(BTreeMap::is_empty) {
        findings.error("spec.portLevelMtls", "portLevelMtls must name at least one port when set");
    }
    if !port_level.is_empty() && spec.selector.as_ref().is_none_or(|s| s.match_labels.is_empty()) {
        findings.error("spec.portLevelMtls", "portLevelMtls requires a workload selector");
    }
    for port in port_level.keys() {
        super::common::validate_port(&format!("spec.portLevelMtls.{port}"), *port, findings);
    }
}
