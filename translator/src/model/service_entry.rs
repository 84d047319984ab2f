//! `networking.istio.io` ServiceEntry and WorkloadEntry: types and Istio's validation rules.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::common::{Protocol, WorkloadSelector, validate_export_to, validate_host, validate_port};
use crate::diagnostic::Findings;

/// ServiceEntry `spec`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    /// Host names of the service.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Virtual IPs / CIDRs.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// Inside or outside the mesh.
    #[serde(default)]
    pub location: Option<Location>,
    /// How endpoints are found.
    #[serde(default)]
    pub resolution: Option<Resolution>,
    /// Inline endpoints.
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntrySpec>,
    /// Select WorkloadEntries (and Pods) as endpoints.
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
    /// Namespaces this entry is visible to.
    #[serde(default)]
    pub export_to: Vec<String>,
    /// SANs to verify.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

/// A service port.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Port number.
    #[serde(default)]
    pub number: u32,
    /// Protocol name (HTTP, HTTP2, GRPC, HTTPS, TLS, TCP, MONGO, MYSQL, REDIS, UDP).
    #[serde(default)]
    pub protocol: Option<String>,
    /// Port name.
    #[serde(default)]
    pub name: String,
    /// Endpoint port when it differs.
    #[serde(default)]
    pub target_port: Option<u32>,
}

/// ServiceEntry location.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    /// Outside the mesh.
    MeshExternal,
    /// Inside the mesh.
    MeshInternal,
}

/// ServiceEntry resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// Forward to the original destination.
    None,
    /// Static endpoint IPs.
    Static,
    /// Resolve endpoint host names by DNS (strict DNS).
    Dns,
    /// Resolve by DNS, one address at a time (logical DNS).
    DnsRoundRobin,
}

/// WorkloadEntry `spec` (also the inline endpoints of a ServiceEntry).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntrySpec {
    /// IP, host name or `unix://` path.
    #[serde(default)]
    pub address: String,
    /// Port name → endpoint port.
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    /// Labels (for subsets and selectors).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Network.
    #[serde(default)]
    pub network: Option<String>,
    /// `region/zone/subzone`.
    #[serde(default)]
    pub locality: Option<String>,
    /// Load balancing weight.
    #[serde(default)]
    pub weight: Option<u32>,
    /// Service account of the workload.
    #[serde(default)]
    pub service_account: Option<String>,
}

/// Istio's ServiceEntry validation rules.
pub fn validate(spec: &ServiceEntrySpec, findings: &mut Findings) {
    if spec.hosts.is_empty() {
        findings.error("spec.hosts", "at least one host is required");
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        validate_host(&format!("spec.hosts[{i}]"), h, true, findings);
        if h == "*" {
            findings.error(format!("spec.hosts[{i}]"), "'*' is not allowed in a ServiceEntry");
        }
    }
    for (i, a) in spec.addresses.iter().enumerate() {
        if super::parse_cidr(a).is_none() {
            findings.error(format!("spec.addresses[{i}]"), format!("{a:?} is not an IP address or CIDR"));
        }
    }
    validate_export_to("spec.exportTo", &spec.export_to, findings);
    // Istio allows a ServiceEntry without ports (it then only names hosts for other objects).
    let mut names = std::collections::BTreeSet::new();
    let mut numbers = std::collections::BTreeSet::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        validate_port(&format!("{path}.number"), p.number, findings);
        if let Some(t) = p.target_port {
            validate_port(&format!("{path}.targetPort"), t, findings);
        }
        if !super::common::is_dns1123_label(&p.name) {
            findings
                .error(format!("{path}.name"), format!("invalid port name {:?}: a DNS-1123 label is required", p.name));
        } else if !names.insert(&p.name) {
            findings.error(format!("{path}.name"), format!("duplicate port name {:?}", p.name));
        }
        if !numbers.insert(p.number) {
            findings.error(format!("{path}.number"), format!("duplicate port number {}", p.number));
        }
        if let Some(proto) = &p.protocol
            && Protocol::parse(proto).is_none()
        {
            findings.error(format!("{path}.protocol"), format!("unknown protocol {proto:?}"));
        }
    }
    let resolution = spec.resolution.unwrap_or(Resolution::None);
    if !matches!(resolution, Resolution::None | Resolution::Static) {
        for (i, a) in spec.addresses.iter().enumerate().filter(|(_, a)| a.contains('/')) {
            findings.error(
                format!("spec.addresses[{i}]"),
                format!("CIDR address {a:?} is allowed only with resolution NONE or STATIC"),
            );
        }
    }
    if resolution == Resolution::DnsRoundRobin && spec.endpoints.len() > 1 {
        findings.error("spec.endpoints", "resolution DNS_ROUND_ROBIN takes at most one endpoint");
    }
    if let Some(selector) = &spec.workload_selector {
        super::common::validate_selector("spec.workloadSelector.labels", &selector.labels, findings);
    }
    if resolution == Resolution::None && !spec.endpoints.is_empty() {
        findings.error("spec.endpoints", "endpoints require resolution STATIC or DNS");
    }
    if !spec.endpoints.is_empty() && spec.workload_selector.is_some() {
        findings.error("spec.workloadSelector", "workloadSelector and endpoints cannot both be set");
    }
    if resolution == Resolution::Static && spec.endpoints.is_empty() && spec.workload_selector.is_none() {
        findings.warn(
            "spec.endpoints",
            "resolution STATIC with no endpoints and no workloadSelector: the service has no endpoints",
        );
    }
    if matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin)
        && spec.endpoints.is_empty()
        && spec.hosts.iter().any(|h| h.starts_with('*'))
    {
        findings.error("spec.hosts", "DNS resolution without endpoints needs hosts without wildcards");
    }
    for (i, e) in spec.endpoints.iter().enumerate() {
        validate_workload(&format!("spec.endpoints[{i}]"), e, resolution == Resolution::Static, findings);
        for name in e.ports.keys() {
            if !spec.ports.iter().any(|p| &p.name == name) {
                findings.error(
                    format!("spec.endpoints[{i}].ports.{name}"),
                    format!("no port named {name:?} in spec.ports"),
                );
            }
        }
    }
}

/// Checks a workload (WorkloadEntry spec or ServiceEntry endpoint) at `path`.
pub fn validate_workload(path: &str, w: &WorkloadEntrySpec, must_be_ip: bool, findings: &mut Findings) {
    if w.address.is_empty() {
        match w.network.as_deref().filter(|n| !n.is_empty()) {
            // Istio: reached through the network's gateway. sluice has no network gateways.
            Some(network) => findings.warn(
                format!("{path}.address"),
                format!(
                    "address is unset with network {network:?}: sluice has no network gateways, so it has no endpoint"
                ),
            ),
            None => findings.error(format!("{path}.address"), "address is required"),
        }
    } else if let Some(socket) = w.address.strip_prefix("unix://") {
        // Istio's rule: an absolute path to a file, or an abstract socket (`@name`); no ports.
        let absolute_file = socket.starts_with('/') && !socket.ends_with('/');
        let abstract_socket = socket.starts_with('@') && socket.len() > 1;
        if !(absolute_file || abstract_socket) {
            findings.error(format!("{path}.address"), format!("{socket:?} is not an absolute path to a file"));
        }
        if !w.ports.is_empty() {
            findings.error(format!("{path}.ports"), format!("unix endpoint {} must not include ports", w.address));
        }
    } else if w.address.parse::<std::net::IpAddr>().is_err() {
        if must_be_ip {
            findings.error(
                format!("{path}.address"),
                format!("{:?} must be an IP address for resolution STATIC", w.address),
            );
        } else {
            validate_host(&format!("{path}.address"), &w.address, false, findings);
        }
    }
    for (name, port) in &w.ports {
        if !super::common::is_dns1123_label(name) {
            findings.error(
                format!("{path}.ports.{name}"),
                format!("invalid port name {name:?}: a DNS-1123 label is required"),
            );
        }
        validate_port(&format!("{path}.ports.{name}"), *port, findings);
    }
    if let Some(l) = &w.locality
        && (l.split('/').count() > 3 || l.split('/').any(str::is_empty))
    {
        findings.error(format!("{path}.locality"), format!("{l:?} is not region/zone/subzone"));
    }
}

/// WorkloadEntry validation.
pub fn validate_workload_entry(spec: &WorkloadEntrySpec, findings: &mut Findings) {
    validate_workload("spec", spec, false, findings);
}
