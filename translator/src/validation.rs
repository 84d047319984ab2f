//! Per-object validation: dispatches Istio kinds to their rules (in `model::*`) and checks the
//! Kubernetes fields sluice relies on.

use crate::diagnostic::Findings;
use crate::model::common::{Protocol, validate_port};
use crate::model::{
    Object, authorization_policy, destination_rule, request_authentication, service_entry, sidecar, virtual_service,
};

/// Validates one object on its own (cross-object checks live in the snapshot).
pub fn validate_object(object: &Object, findings: &mut Findings) {
    match object {
        Object::VirtualService(o) => virtual_service::validate(&o.spec, findings),
        Object::DestinationRule(o) => destination_rule::validate(&o.spec, findings),
        Object::ServiceEntry(o) => service_entry::validate(&o.spec, findings),
        Object::WorkloadEntry(o) => service_entry::validate_workload_entry(&o.spec, findings),
        Object::Sidecar(o) => sidecar::validate(&o.spec, findings),
        Object::AuthorizationPolicy(o) => {
            authorization_policy::validate(&o.spec, findings);
            validate_dry_run(o, findings);
        }
        Object::PeerAuthentication(o) => authorization_policy::validate_peer_authentication(&o.spec, findings),
        Object::RequestAuthentication(o) => request_authentication::validate(&o.spec, findings),
        Object::Service(s) => validate_service(s, findings),
        Object::EndpointSlice(s) => validate_endpoint_slice(s, findings),
        Object::Pod(p) => validate_pod(p, findings),
        Object::Namespace(_) => {}
    }
    let labels = match object {
        Object::Pod(p) => p.metadata.labels.clone().unwrap_or_default(),
        Object::Namespace(n) => n.metadata.labels.clone().unwrap_or_default(),
        Object::WorkloadEntry(w) => w.meta.labels.clone().into_iter().chain(w.spec.labels.clone()).collect(),
        _ => Default::default(),
    };
    if let Some(mode) = labels.get(crate::DATAPLANE_LABEL)
        && crate::dataplane::Mode::from_name(mode).is_none()
    {
        findings.error(
            format!("metadata.labels.{}", crate::DATAPLANE_LABEL),
            format!("{mode:?} is not a data-plane mode (sidecar, node, kernel)"),
        );
    }
}

/// Istio's rule for `istio.io/dry-run`: a Go boolean, on ALLOW and DENY policies only.
fn validate_dry_run(
    o: &crate::model::IstioObject<authorization_policy::AuthorizationPolicySpec>,
    findings: &mut Findings,
) {
    use authorization_policy::{Action, DRY_RUN_ANNOTATION};
    let Some(value) = o.meta.annotations.get(DRY_RUN_ANNOTATION) else { return };
    let path = format!("metadata.annotations.{DRY_RUN_ANNOTATION}");
    match o.spec.action.unwrap_or(Action::Allow) {
        Action::Allow | Action::Deny => {
            if authorization_policy::dry_run(&o.meta).is_err() {
                findings.error(path, format!("{value:?} is not a boolean"));
            }
        }
        other => findings
            .error(path, format!("dry-run is only supported on ALLOW and DENY policies, not {}", other.as_str())),
    }
}

fn validate_service(s: &k8s_openapi::api::core::v1::Service, findings: &mut Findings) {
    let Some(spec) = &s.spec else {
        return findings.error("spec", "spec is required");
    };
    for (field, ips) in [
        ("spec.clusterIP", spec.cluster_ip.iter().cloned().collect::<Vec<_>>()),
        ("spec.clusterIPs", spec.cluster_ips.clone().unwrap_or_default()),
    ] {
        for ip in ips {
            if ip != "None" && !ip.is_empty() && ip.parse::<std::net::IpAddr>().is_err() {
                findings.error(field, format!("{ip:?} is not an IP address or None"));
            }
        }
    }
    let ports = spec.ports.clone().unwrap_or_default();
    let mut names = std::collections::BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        validate_port(&format!("spec.ports[{i}].port"), p.port.max(0) as u32, findings);
        if ports.len() > 1 && p.name.as_deref().unwrap_or_default().is_empty() {
            findings.error(format!("spec.ports[{i}].name"), "ports must be named when a Service has several");
        }
        if let Some(n) = &p.name
            && !names.insert(n.clone())
        {
            findings.error(format!("spec.ports[{i}].name"), format!("duplicate port name {n:?}"));
        }
        if let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(t)) = &p.target_port {
            validate_port(&format!("spec.ports[{i}].targetPort"), (*t).max(0) as u32, findings);
        }
        let proto = Protocol::from_kubernetes(p.name.as_deref(), p.app_protocol.as_deref(), p.protocol.as_deref());
        if proto == Protocol::Tcp && p.app_protocol.is_none() && p.protocol.as_deref() != Some("UDP") {
            let name = p.name.as_deref().unwrap_or_default();
            if !name.starts_with("tcp")
                && !name.is_empty()
                && Protocol::parse(name.split('-').next().unwrap_or("")).is_none()
            {
                findings.warn(
                    format!("spec.ports[{i}].name"),
                    format!("port name {name:?} names no protocol (http, grpc, tcp, ...); sluice treats it as TCP (no protocol sniffing)"),
                );
            }
        }
    }
}

fn validate_endpoint_slice(s: &k8s_openapi::api::discovery::v1::EndpointSlice, findings: &mut Findings) {
    if s.metadata.labels.as_ref().and_then(|l| l.get("kubernetes.io/service-name")).is_none() {
        findings
            .error("metadata.labels.kubernetes.io/service-name", "label is required to tie the slice to its Service");
    }
    let ip = match s.address_type.as_str() {
        "IPv4" | "IPv6" => true,
        "FQDN" => false,
        other => return findings.error("addressType", format!("{other:?} is not IPv4, IPv6 or FQDN")),
    };
    for (i, e) in s.endpoints.iter().flatten().enumerate() {
        if e.addresses.is_empty() {
            findings.error(format!("endpoints[{i}].addresses"), "at least one address is required");
        }
        for (j, a) in e.addresses.iter().enumerate() {
            let ok = match a.parse::<std::net::IpAddr>() {
                Ok(addr) => (s.address_type == "IPv4") == addr.is_ipv4(),
                Err(_) => !ip,
            };
            if !ok {
                findings.error(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{a:?} is not an {} address", s.address_type),
                );
            }
        }
    }
    for (i, p) in s.ports.iter().flatten().enumerate() {
        if let Some(port) = p.port {
            validate_port(&format!("ports[{i}].port"), port.max(0) as u32, findings);
        }
    }
}

fn validate_pod(p: &k8s_openapi::api::core::v1::Pod, findings: &mut Findings) {
    if let Some(ip) = p.status.as_ref().and_then(|s| s.pod_ip.as_ref())
        && ip.parse::<std::net::IpAddr>().is_err()
    {
        findings.error("status.podIP", format!("{ip:?} is not an IP address"));
    }
}
