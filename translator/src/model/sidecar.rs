//! `networking.istio.io` Sidecar: types and Istio's validation rules.

use serde::{Deserialize, Serialize};

use super::common::{Protocol, WorkloadSelector, is_dns1123_label, validate_host, validate_port};
use crate::diagnostic::Findings;

/// Sidecar `spec`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    /// Workloads this Sidecar applies to; none means the whole namespace.
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
    /// Inbound listeners.
    #[serde(default)]
    pub ingress: Vec<IngressListener>,
    /// Outbound listeners and host scoping.
    #[serde(default)]
    pub egress: Vec<EgressListener>,
    /// Outbound traffic policy.
    #[serde(default)]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
}

/// A listener port.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarPort {
    /// Port number.
    #[serde(default)]
    pub number: u32,
    /// Protocol.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Name.
    #[serde(default)]
    pub name: Option<String>,
    /// Target port (unused for sidecars).
    #[serde(default)]
    pub target_port: Option<u32>,
}

impl SidecarPort {
    /// The port's protocol, TCP when unset.
    pub fn protocol(&self) -> Protocol {
        self.protocol.as_deref().and_then(Protocol::parse).unwrap_or(Protocol::Tcp)
    }
}

/// How traffic reaches a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CaptureMode {
    /// As the proxy's interception mode.
    Default,
    /// iptables capture.
    Iptables,
    /// No capture: the listener binds its address.
    None,
}

/// Inbound listener.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressListener {
    /// Port.
    #[serde(default)]
    pub port: SidecarPort,
    /// Address to bind.
    #[serde(default)]
    pub bind: Option<String>,
    /// Capture mode.
    #[serde(default)]
    pub capture_mode: Option<CaptureMode>,
    /// Where to forward: `127.0.0.1:PORT`, `0.0.0.0:PORT` or `unix://path`.
    #[serde(default)]
    pub default_endpoint: Option<String>,
    /// TLS settings (parsed; not translated yet).
    #[serde(default)]
    pub tls: Option<serde_json::Value>,
    /// Connection pool (parsed; not translated yet).
    #[serde(default)]
    pub connection_pool: Option<serde_json::Value>,
}

/// Outbound listener and host scoping.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressListener {
    /// Port; none means the catch-all scoping entry.
    #[serde(default)]
    pub port: Option<SidecarPort>,
    /// Address to bind.
    #[serde(default)]
    pub bind: Option<String>,
    /// Capture mode.
    #[serde(default)]
    pub capture_mode: Option<CaptureMode>,
    /// `namespace/host` entries.
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// Outbound traffic policy.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboundTrafficPolicy {
    /// REGISTRY_ONLY or ALLOW_ANY.
    #[serde(default)]
    pub mode: Option<OutboundMode>,
}

/// Outbound traffic mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundMode {
    /// Only known services.
    RegistryOnly,
    /// Unknown destinations pass through.
    AllowAny,
}

/// Splits an egress `hosts` entry into its namespace part and host part.
pub fn split_egress_host(entry: &str) -> Option<(&str, &str)> {
    let (ns, host) = entry.split_once('/')?;
    (!ns.is_empty() && !host.is_empty()).then_some((ns, host))
}

/// Istio's Sidecar validation rules.
pub fn validate(spec: &SidecarSpec, findings: &mut Findings) {
    let mut ports = std::collections::BTreeSet::new();
    for (i, l) in spec.ingress.iter().enumerate() {
        let path = format!("spec.ingress[{i}]");
        validate_port(&format!("{path}.port.number"), l.port.number, findings);
        validate_protocol(&format!("{path}.port.protocol"), l.port.protocol.as_deref(), findings);
        if !ports.insert((l.bind.clone(), l.port.number)) {
            findings.error(format!("{path}.port"), format!("duplicate ingress listener for port {}", l.port.number));
        }
        if let Some(b) = &l.bind {
            validate_bind(&format!("{path}.bind"), b, findings);
        }
        if let Some(e) = &l.default_endpoint {
            validate_default_endpoint(&format!("{path}.defaultEndpoint"), e, findings);
        }
    }
    let catch_all = spec.egress.iter().filter(|e| e.port.is_none()).count();
    if catch_all > 1 {
        findings.error("spec.egress", "only one egress listener may omit the port");
    }
    if let Some(last) = spec.egress.last()
        && catch_all == 1
        && last.port.is_some()
    {
        findings.error("spec.egress", "the egress listener without a port must be the last one");
    }
    let mut eports = std::collections::BTreeSet::new();
    for (i, l) in spec.egress.iter().enumerate() {
        let path = format!("spec.egress[{i}]");
        if l.hosts.is_empty() {
            findings.error(format!("{path}.hosts"), "at least one host is required");
        }
        for (j, h) in l.hosts.iter().enumerate() {
            let hp = format!("{path}.hosts[{j}]");
            match split_egress_host(h) {
                None => findings.error(&hp, format!("{h:?} must be of the form namespace/host")),
                Some((ns, host)) => {
                    if !(ns == "*" || ns == "." || ns == "~" || is_dns1123_label(ns)) {
                        findings.error(&hp, format!("namespace {ns:?} must be '*', '.', '~' or a namespace name"));
                    }
                    validate_host(&hp, host, true, findings);
                }
            }
        }
        if let Some(p) = &l.port {
            validate_port(&format!("{path}.port.number"), p.number, findings);
            validate_protocol(&format!("{path}.port.protocol"), p.protocol.as_deref(), findings);
            if !eports.insert((l.bind.clone(), p.number)) {
                findings.error(format!("{path}.port"), format!("duplicate egress listener for port {}", p.number));
            }
        } else if l.bind.is_some() || l.capture_mode.is_some() {
            findings.error(&path, "bind and captureMode need a port");
        }
        if let Some(b) = &l.bind {
            validate_bind(&format!("{path}.bind"), b, findings);
        }
    }
}

fn validate_protocol(path: &str, protocol: Option<&str>, findings: &mut Findings) {
    if let Some(p) = protocol
        && Protocol::parse(p).is_none()
    {
        findings.error(path, format!("unknown protocol {p:?}"));
    }
}

fn validate_bind(path: &str, bind: &str, findings: &mut Findings) {
    if !bind.starts_with("unix://") && bind.parse::<std::net::IpAddr>().is_err() {
        findings.error(path, format!("{bind:?} must be an IP address or unix:// path"));
    }
}

fn validate_default_endpoint(path: &str, endpoint: &str, findings: &mut Findings) {
    if endpoint.starts_with("unix://") {
        return;
    }
    match endpoint.parse::<std::net::SocketAddr>() {
        Ok(addr) if addr.port() != 0 => {}
        _ => findings
            .error(path, format!("{endpoint:?} must be IP:PORT (127.0.0.1:PORT or 0.0.0.0:PORT) or unix://path")),
    }
}
