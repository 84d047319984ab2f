//! The proxy being translated for: its node id, its workload, and what its Sidecar lets it see.

use std::collections::BTreeMap;

use crate::diagnostic::{Diagnostic, ObjectRef, Severity};
use crate::model::IstioObject;
use crate::model::common::labels_match;
use crate::model::sidecar::{CaptureMode, EgressListener, OutboundMode, SidecarSpec, split_egress_host};
use crate::snapshot::{MeshService, ROOT_NAMESPACE, Snapshot, Workload, host_matches};

/// A node id that is not Istio's `type~ip~pod.ns~domain`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node id {id:?}: {reason} (expected sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local)")]
pub struct NodeError {
    /// The id as given.
    pub id: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A parsed Istio node id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeId {
    /// `sidecar` or `router`.
    pub kind: String,
    /// The proxy's IP.
    pub ip: String,
    /// Pod (or WorkloadEntry) name.
    pub pod: String,
    /// Namespace.
    pub namespace: String,
}

impl NodeId {
    /// Parses `sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`.
    pub fn parse(id: &str) -> Result<Self, NodeError> {
        let err = |reason: &str| NodeError { id: id.to_string(), reason: reason.to_string() };
        let parts: Vec<&str> = id.split('~').collect();
        if parts.len() != 4 {
            return Err(err("it must have four '~'-separated parts"));
        }
        if !["sidecar", "router"].contains(&parts[0]) {
            return Err(err("the type must be sidecar or router"));
        }
        if parts[1].parse::<std::net::IpAddr>().is_err() {
            return Err(err("the second part must be the proxy's IP address"));
        }
        let (pod, namespace) =
            parts[2].rsplit_once('.').ok_or_else(|| err("the third part must be <pod>.<namespace>"))?;
        if pod.is_empty() || namespace.is_empty() {
            return Err(err("the third part must be <pod>.<namespace>"));
        }
        Ok(Self { kind: parts[0].into(), ip: parts[1].into(), pod: pod.into(), namespace: namespace.into() })
    }
}

/// The proxy's view of the snapshot.
pub struct Proxy<'a> {
    /// The whole snapshot.
    pub snapshot: &'a Snapshot,
    /// The node.
    pub node: NodeId,
    /// Its workload, if the snapshot knows it.
    pub workload: Option<&'a Workload>,
    /// Workload labels (empty when unknown).
    pub labels: BTreeMap<String, String>,
    /// The Sidecar resource that applies, if any.
    pub sidecar: Option<&'a IstioObject<SidecarSpec>>,
    /// No iptables capture (`sidecar.istio.io/interceptionMode: NONE`): no virtual listeners.
    pub interception_none: bool,
    /// Whether the proxy holds its workload's certificate (and so speaks mesh mTLS).
    pub certificates: super::tls::Certificates,
    /// Warnings found while translating.
    pub diagnostics: Vec<Diagnostic>,
}

impl<'a> Proxy<'a> {
    /// Finds the workload and the Sidecar for `node`.
    pub fn new(snapshot: &'a Snapshot, node: NodeId) -> Self {
        let workload = snapshot
            .workloads
            .get(&(node.namespace.clone(), node.pod.clone()))
            .or_else(|| snapshot.workload_at(&node.namespace, &node.ip))
            .map(|w| w.as_ref());
        let labels = workload.map(|w| w.labels.clone()).unwrap_or_default();
        let mut diagnostics = Vec::new();
        if workload.is_none() {
            diagnostics.push(Diagnostic {
                severity: Severity::Warning,
                origin: String::new(),
                object: Some(ObjectRef::new("Pod", &node.namespace, &node.pod)),
                path: String::new(),
                code: None,
                message: format!(
                    "no Pod or WorkloadEntry {}.{} (or with IP {}); the proxy gets no inbound listeners",
                    node.pod, node.namespace, node.ip
                ),
            });
        }
        let pick = |ns: &str| {
            let in_ns: Vec<&IstioObject<SidecarSpec>> =
                snapshot.sidecars.values().map(|s| s.as_ref()).filter(|s| s.meta.namespace == ns).collect();
            let selected = in_ns.iter().copied().find(|s| {
                s.spec
                    .workload_selector
                    .as_ref()
                    .is_some_and(|sel| !sel.labels.is_empty() && labels_match(&sel.labels, &labels))
            });
            selected.or_else(|| {
                in_ns
                    .iter()
                    .copied()
                    .find(|s| s.spec.workload_selector.as_ref().is_none_or(|sel| sel.labels.is_empty()))
            })
        };
        let sidecar =
            pick(&node.namespace).or_else(|| pick(ROOT_NAMESPACE).filter(|s| s.spec.workload_selector.is_none()));
        let interception_none =
            workload.and_then(|w| w.annotations.get("sidecar.istio.io/interceptionMode")).is_some_and(|m| m == "NONE");
        let certificates = super::tls::Certificates::None;
        Self { snapshot, node, workload, labels, sidecar, interception_none, certificates, diagnostics }
    }

    /// The Sidecar's egress listeners (an implicit `*/*` one when there is no Sidecar).
    pub fn egress_listeners(&self) -> Vec<EgressListener> {
        match self.sidecar {
            Some(s) if !s.spec.egress.is_empty() => s.spec.egress.clone(),
            _ => vec![EgressListener { hosts: vec!["*/*".into()], ..Default::default() }],
        }
    }

    /// True when the egress `hosts` of `listener` import `service`.
    pub fn imports(&self, listener: &EgressListener, service: &MeshService) -> bool {
        listener.hosts.iter().any(|entry| {
            let Some((ns, host)) = split_egress_host(entry) else { return false };
            let ns_ok = match ns {
                "*" => true,
                "." => service.namespace == self.node.namespace,
                "~" => false,
                other => service.namespace == other,
            };
            ns_ok && host_matches(host, &service.hostname)
        })
    }

    /// True when this proxy may reach `service`: see [`Proxy::visible_services`].
    pub fn sees(&self, service: &MeshService) -> bool {
        service.visible_to(&self.node.namespace) && self.egress_listeners().iter().any(|l| self.imports(l, service))
    }

    /// Every service this proxy may reach: exported to its namespace and imported by its Sidecar.
    pub fn visible_services(&self) -> Vec<&'a MeshService> {
        let listeners = self.egress_listeners();
        self.snapshot
            .services
            .values()
            .map(|s| s.as_ref())
            .filter(|s| s.visible_to(&self.node.namespace))
            .filter(|s| listeners.iter().any(|l| self.imports(l, s)))
            .collect()
    }

    /// Services imported by one egress listener.
    pub fn services_for(&self, listener: &EgressListener) -> Vec<&'a MeshService> {
        self.snapshot
            .services
            .values()
            .map(|s| s.as_ref())
            .filter(|s| s.visible_to(&self.node.namespace) && self.imports(listener, s))
            .collect()
    }

    /// REGISTRY_ONLY or ALLOW_ANY (the mesh default).
    pub fn outbound_mode(&self) -> OutboundMode {
        self.sidecar
            .and_then(|s| s.spec.outbound_traffic_policy.as_ref())
            .and_then(|p| p.mode)
            .unwrap_or(OutboundMode::AllowAny)
    }

    /// True when a listener with `capture` binds its own address.
    pub fn binds(&self, capture: Option<CaptureMode>) -> bool {
        capture == Some(CaptureMode::None) || (self.interception_none && capture != Some(CaptureMode::Iptables))
    }

    /// The mTLS modes of the proxy's own workload (what its inbound listeners enforce).
    pub fn mtls(&self) -> crate::snapshot::WorkloadMtls {
        self.snapshot.workload_mtls(&self.node.namespace, self.workload.map(|_| &self.labels))
    }

    /// Records a warning about `object`.
    pub fn warn(&mut self, object: ObjectRef, path: String, message: String) {
        self.diagnostics.push(Diagnostic {
            severity: Severity::Warning,
            origin: String::new(),
            object: Some(object),
            path,
            code: None,
            message,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids() {
        let n = NodeId::parse("sidecar~127.0.1.1~productpage-v1.default~default.svc.cluster.local").unwrap();
        assert_eq!((n.ip.as_str(), n.pod.as_str(), n.namespace.as_str()), ("127.0.1.1", "productpage-v1", "default"));
        assert!(NodeId::parse("sidecar~x~a.b~c").unwrap_err().reason.contains("IP"));
        assert!(NodeId::parse("sidecar~127.0.0.1~ab~c").is_err());
        assert!(NodeId::parse("gateway~127.0.0.1~a.b~c").is_err());
        assert!(NodeId::parse("a~b").is_err());
    }
}

/// One port the proxy's workload serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundPort {
    /// The port traffic arrives on (the workload's target port).
    pub port: u32,
    /// Protocol.
    pub protocol: crate::model::common::Protocol,
    /// Where the proxy forwards: the application's address (`IP` or `unix://path`) and port.
    pub endpoint: (String, u32),
    /// Some(address) when the listener binds the address itself (no capture).
    pub bind: Option<String>,
}

impl Proxy<'_> {
    /// The inbound ports: from the Sidecar's `ingress` if it has any, else from the services
    /// that select this workload.
    pub fn inbound_ports(&self) -> Vec<InboundPort> {
        let Some(workload) = self.workload else { return Vec::new() };
        let ip = workload.ip.clone().unwrap_or_else(|| self.node.ip.clone());
        if let Some(sc) = self.sidecar.filter(|s| !s.spec.ingress.is_empty()) {
            return sc
                .spec
                .ingress
                .iter()
                .map(|l| {
                    let endpoint = match l.default_endpoint.as_deref() {
                        Some(e) if e.starts_with("unix://") => (e.to_string(), 0),
                        Some(e) => {
                            let addr: std::net::SocketAddr = e.parse().expect("validated defaultEndpoint");
                            // 0.0.0.0 means "the workload's own address", as in Istio.
                            let host = if addr.ip().is_unspecified() { ip.clone() } else { addr.ip().to_string() };
                            (host, u32::from(addr.port()))
                        }
                        None => (ip.clone(), l.port.number),
                    };
                    InboundPort {
                        port: l.port.number,
                        protocol: l.port.protocol(),
                        endpoint,
                        bind: self.binds(l.capture_mode).then(|| l.bind.clone().unwrap_or_else(|| ip.clone())),
                    }
                })
                .collect();
        }
        if self.interception_none {
            return Vec::new();
        }
        let mut ports: BTreeMap<u32, InboundPort> = BTreeMap::new();
        for service in self.snapshot.services_at(&ip) {
            for endpoint in service.endpoints.iter().filter(|e| e.address == ip) {
                for port in &service.ports {
                    if port.protocol == crate::model::common::Protocol::Udp {
                        continue;
                    }
                    let target = match &port.target {
                        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name)) => workload
                            .named_ports
                            .get(name)
                            .copied()
                            .unwrap_or_else(|| service.endpoint_port(port, endpoint)),
                        _ => service.endpoint_port(port, endpoint),
                    };
                    ports.entry(target).or_insert(InboundPort {
                        port: target,
                        protocol: port.protocol,
                        endpoint: (ip.clone(), target),
                        bind: None,
                    });
                }
            }
        }
        ports.into_values().collect()
    }
}
