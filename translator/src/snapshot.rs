//! The validated snapshot: every accepted object, plus the service registry built from Services,
//! EndpointSlices, Pods, ServiceEntries and WorkloadEntries. Cross-object problems are reported
//! here, as warnings (Istio's analyzers), never rejections — except duplicates.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::diagnostic::{Diagnostic, ObjectRef, Severity};
use crate::model::authorization_policy::{Action, AuthorizationPolicySpec, PeerAuthenticationSpec};
use crate::model::common::{Protocol, labels_match};
use crate::model::destination_rule::DestinationRuleSpec;
use crate::model::service_entry::{Location, Resolution, ServiceEntrySpec, WorkloadEntrySpec};
use crate::model::sidecar::SidecarSpec;
use crate::model::virtual_service::{Destination, VirtualServiceSpec};
use crate::model::{IstioObject, Loaded, Meta, Object};

/// The DNS suffix of Kubernetes service hosts.
pub const DOMAIN_SUFFIX: &str = "cluster.local";

/// The Istio root namespace: mesh-wide Sidecars and policies live here.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// How a service's endpoints are found by the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceResolution {
    /// Endpoints delivered by EDS.
    Eds,
    /// Endpoints are host names Envoy resolves (STRICT_DNS).
    Dns,
    /// One host name resolved at a time (LOGICAL_DNS).
    DnsRoundRobin,
    /// Forward to the original destination.
    Passthrough,
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Port name.
    pub name: String,
    /// Service port number.
    pub port: u32,
    /// Endpoint port: a number, or a named container port.
    pub target: Option<IntOrString>,
    /// Protocol.
    pub protocol: Protocol,
}

/// One endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// IP address or host name.
    pub address: String,
    /// Port name → endpoint port.
    pub ports: BTreeMap<String, u32>,
    /// Labels (from the Pod or WorkloadEntry).
    pub labels: BTreeMap<String, String>,
    /// `region/zone/subzone`, as far as known.
    pub locality: Option<String>,
    /// Load balancing weight.
    pub weight: Option<u32>,
    /// Ready to receive traffic.
    pub ready: bool,
    /// Service account of the workload behind it.
    pub service_account: Option<String>,
}

/// A service as the mesh sees it (Kubernetes Service or ServiceEntry host).
#[derive(Debug, Clone, PartialEq)]
pub struct MeshService {
    /// FQDN.
    pub hostname: String,
    /// Namespace of the defining object.
    pub namespace: String,
    /// Virtual IPs.
    pub addresses: Vec<String>,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// Endpoint discovery.
    pub resolution: ServiceResolution,
    /// Endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Outside the mesh (ServiceEntry MESH_EXTERNAL).
    pub mesh_external: bool,
    /// `exportTo` (empty = everywhere).
    pub export_to: Vec<String>,
    /// The defining object.
    pub source: ObjectRef,
    /// The file it came from.
    pub origin: String,
}

impl MeshService {
    /// The endpoint port serving service port `port` on `endpoint`.
    pub fn endpoint_port(&self, port: &ServicePort, endpoint: &Endpoint) -> u32 {
        if let Some(p) = endpoint.ports.get(&port.name) {
            return *p;
        }
        match &port.target {
            Some(IntOrString::Int(n)) if *n > 0 => *n as u32,
            _ => port.port,
        }
    }

    /// The port with this number.
    pub fn port(&self, number: u32) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == number)
    }

    /// True when a proxy in `namespace` may see this service.
    pub fn visible_to(&self, namespace: &str) -> bool {
        exported_to(&self.export_to, &self.namespace, namespace)
    }
}

/// Istio's `exportTo` rule.
pub fn exported_to(export_to: &[String], own: &str, namespace: &str) -> bool {
    export_to.is_empty() || export_to.iter().any(|e| e == "*" || (e == "." && own == namespace) || e == namespace)
}

/// A workload: a Pod or a WorkloadEntry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// IP address.
    pub ip: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// Service account.
    pub service_account: String,
    /// `region/zone/subzone`.
    pub locality: Option<String>,
    /// Named container ports → numbers (resolves named targetPorts).
    pub named_ports: BTreeMap<String, u32>,
    /// The node it runs on (`spec.nodeName`), when known.
    pub node: Option<String>,
}

/// Everything accepted, indexed for translation.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Services by FQDN (a host defined twice keeps its first definition, by namespace/name).
    pub services: BTreeMap<String, MeshService>,
    /// Workloads by (namespace, name).
    pub workloads: BTreeMap<(String, String), Workload>,
    /// Namespace labels by name.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// VirtualServices, ordered by namespace/name.
    pub virtual_services: Vec<IstioObject<VirtualServiceSpec>>,
    /// DestinationRules, ordered by namespace/name.
    pub destination_rules: Vec<IstioObject<DestinationRuleSpec>>,
    /// Sidecars, ordered by namespace/name.
    pub sidecars: Vec<IstioObject<SidecarSpec>>,
    /// AuthorizationPolicies, ordered by namespace/name.
    pub authorization_policies: Vec<IstioObject<AuthorizationPolicySpec>>,
    /// PeerAuthentications, ordered by namespace/name.
    pub peer_authentications: Vec<IstioObject<PeerAuthenticationSpec>>,
    /// Positions in `virtual_services` by the hosts they name.
    pub virtual_service_hosts: HostIndex,
    /// Positions in `destination_rules` by their host.
    pub destination_rule_hosts: HostIndex,
}

/// Positions of objects by the (resolved) hosts they name, so that finding the objects for one
/// service does not scan them all: translation stays linear in the number of services.
#[derive(Debug, Clone, Default)]
pub struct HostIndex {
    exact: std::collections::HashMap<String, Vec<usize>>,
    wildcard: Vec<usize>,
}

impl HostIndex {
    fn new(entries: impl Iterator<Item = (usize, String)>) -> Self {
        let mut index = Self::default();
        for (position, host) in entries {
            if host.starts_with('*') {
                index.wildcard.push(position);
            } else {
                index.exact.entry(host).or_default().push(position);
            }
        }
        for list in index.exact.values_mut() {
            list.dedup();
        }
        index.wildcard.dedup();
        index
    }

    /// Positions, ascending, of the objects whose hosts may cover `hostname` (callers still
    /// check the wildcard ones with [`host_matches`]).
    pub fn candidates(&self, hostname: &str) -> Vec<usize> {
        let mut out: Vec<usize> = self.exact.get(hostname).cloned().unwrap_or_default();
        out.extend(&self.wildcard);
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// Expands a short host name in `namespace` to its FQDN, as Istio does for hosts without dots.
pub fn resolve_host(host: &str, namespace: &str) -> String {
    if host.contains('.') || host.starts_with('*') {
        host.to_string()
    } else {
        format!("{host}.{namespace}.svc.{DOMAIN_SUFFIX}")
    }
}

/// True when `host` (possibly `*.suffix` or `*`) covers `name`.
pub fn host_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => name.ends_with(suffix) || (suffix.starts_with('.') && name.ends_with(suffix)),
        None => pattern == name,
    }
}

impl Snapshot {
    /// Builds the snapshot from accepted objects. Returns the diagnostics found across objects.
    pub fn build(objects: Vec<Loaded>) -> (Snapshot, Vec<Diagnostic>) {
        let mut diagnostics = Vec::new();
        let mut seen: BTreeMap<(String, String, String), String> = BTreeMap::new();
        let mut unique = Vec::new();
        for l in objects {
            let key = (l.reference.kind.clone(), l.reference.namespace.clone(), l.reference.name.clone());
            if let Some(first) = seen.get(&key) {
                diagnostics.push(Diagnostic {
                    severity: Severity::Error,
                    origin: l.origin.clone(),
                    object: Some(l.reference.clone()),
                    path: "metadata.name".into(),
                    code: None,
                    message: format!("duplicate object: already defined in {first}; this copy is rejected"),
                });
                continue;
            }
            seen.insert(key, l.origin.clone());
            unique.push(l);
        }
        unique.sort_by(|a, b| a.reference.cmp(&b.reference));

        let mut snap = Snapshot::default();
        let mut services = Vec::new();
        let mut slices = Vec::new();
        let mut entries = Vec::new();
        let mut workload_entries = Vec::new();
        for l in unique {
            match l.object {
                Object::Service(s) => services.push((*s, l.reference, l.origin)),
                Object::EndpointSlice(s) => slices.push(*s),
                Object::Pod(p) => {
                    let meta = Meta::from_object_meta(&p.metadata, true);
                    let spec = p.spec.as_ref();
                    let named_ports = spec
                        .map(|s| s.containers.iter().flat_map(|c| c.ports.iter().flatten()))
                        .into_iter()
                        .flatten()
                        .filter_map(|p| Some((p.name.clone()?, p.container_port as u32)))
                        .collect();
                    let locality = meta.labels.get("istio-locality").map(|l| l.replace('.', "/")).or_else(|| {
                        let region = meta.labels.get("topology.kubernetes.io/region")?;
                        let zone = meta.labels.get("topology.kubernetes.io/zone");
                        Some(zone.map_or(region.clone(), |z| format!("{region}/{z}")))
                    });
                    snap.workloads.insert(
                        (meta.namespace.clone(), meta.name.clone()),
                        Workload {
                            ip: p.status.as_ref().and_then(|s| s.pod_ip.clone()),
                            service_account: spec
                                .and_then(|s| s.service_account_name.clone())
                                .unwrap_or_else(|| "default".into()),
                            name: meta.name,
                            namespace: meta.namespace,
                            labels: meta.labels,
                            annotations: meta.annotations,
                            locality,
                            named_ports,
                            node: spec.and_then(|s| s.node_name.clone()),
                        },
                    );
                }
                Object::Namespace(n) => {
                    let meta = Meta::from_object_meta(&n.metadata, false);
                    snap.namespaces.insert(meta.name, meta.labels);
                }
                Object::WorkloadEntry(w) => {
                    let mut labels = w.meta.labels.clone();
                    labels.extend(w.spec.labels.clone());
                    snap.workloads.insert(
                        (w.meta.namespace.clone(), w.meta.name.clone()),
                        Workload {
                            name: w.meta.name.clone(),
                            namespace: w.meta.namespace.clone(),
                            ip: w.spec.address.parse::<std::net::IpAddr>().ok().map(|_| w.spec.address.clone()),
                            labels,
                            annotations: w.meta.annotations.clone(),
                            service_account: w.spec.service_account.clone().unwrap_or_else(|| "default".into()),
                            locality: w.spec.locality.clone(),
                            named_ports: w.spec.ports.clone(),
                            node: None,
                        },
                    );
                    workload_entries.push(w);
                }
                Object::ServiceEntry(se) => entries.push((se, l.reference)),
                Object::VirtualService(o) => snap.virtual_services.push(o),
                Object::DestinationRule(o) => snap.destination_rules.push(o),
                Object::Sidecar(o) => snap.sidecars.push(o),
                Object::AuthorizationPolicy(o) => snap.authorization_policies.push(o),
                Object::PeerAuthentication(o) => snap.peer_authentications.push(o),
            }
        }
        // Slices by (namespace, service name): one pass, not one per service.
        let mut slices_of: BTreeMap<(String, String), Vec<&k8s_openapi::api::discovery::v1::EndpointSlice>> =
            BTreeMap::new();
        for slice in &slices {
            let Some(service) = slice.metadata.labels.as_ref().and_then(|l| l.get("kubernetes.io/service-name")) else {
                continue;
            };
            let ns = slice.metadata.namespace.clone().unwrap_or_else(|| "default".into());
            slices_of.entry((ns, service.clone())).or_default().push(slice);
        }
        for (svc, reference, origin) in services {
            let key = (
                svc.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
                svc.metadata.name.clone().unwrap_or_default(),
            );
            let own = slices_of.get(&key).map(Vec::as_slice).unwrap_or_default();
            if let Some(m) = snap.service_from_kubernetes(&svc, reference, origin, own, &workload_entries) {
                snap.add_service(m, &mut diagnostics);
            }
        }
        for (se, reference) in entries {
            for m in snap.services_from_entry(&se, &reference, &workload_entries) {
                snap.add_service(m, &mut diagnostics);
            }
        }
        snap.virtual_service_hosts = HostIndex::new(
            snap.virtual_services
                .iter()
                .enumerate()
                .flat_map(|(i, vs)| vs.spec.hosts.iter().map(move |h| (i, resolve_host(h, &vs.meta.namespace)))),
        );
        snap.destination_rule_hosts = HostIndex::new(
            snap.destination_rules
                .iter()
                .enumerate()
                .map(|(i, dr)| (i, resolve_host(&dr.spec.host, &dr.meta.namespace))),
        );
        snap.analyze(&mut diagnostics);
        (snap, diagnostics)
    }

    /// VirtualServices, in namespace/name order, that may name `hostname`.
    pub fn virtual_services_for_host(&self, hostname: &str) -> impl Iterator<Item = &IstioObject<VirtualServiceSpec>> {
        self.virtual_service_hosts.candidates(hostname).into_iter().map(|i| &self.virtual_services[i])
    }

    /// DestinationRules, in namespace/name order, that may name `hostname`.
    pub fn destination_rules_for_host(
        &self,
        hostname: &str,
    ) -> impl Iterator<Item = &IstioObject<DestinationRuleSpec>> {
        self.destination_rule_hosts.candidates(hostname).into_iter().map(|i| &self.destination_rules[i])
    }

    fn add_service(&mut self, service: MeshService, diagnostics: &mut Vec<Diagnostic>) {
        if let Some(existing) = self.services.get(&service.hostname) {
            diagnostics.push(Diagnostic {
                severity: Severity::Warning,
                origin: service.origin.clone(),
                object: Some(service.source.clone()),
                path: String::new(),
                code: Some("IST0109"),
                message: format!(
                    "host {} is already defined by {}; this definition is ignored",
                    service.hostname, existing.source
                ),
            });
            return;
        }
        self.services.insert(service.hostname.clone(), service);
    }

    fn workload_endpoint(w: &Workload, address: String) -> Endpoint {
        Endpoint {
            address,
            ports: w.named_ports.clone(),
            labels: w.labels.clone(),
            locality: w.locality.clone(),
            weight: None,
            ready: true,
            service_account: Some(w.service_account.clone()),
        }
    }

    fn service_from_kubernetes(
        &self,
        svc: &k8s_openapi::api::core::v1::Service,
        source: ObjectRef,
        origin: String,
        slices: &[&k8s_openapi::api::discovery::v1::EndpointSlice],
        workload_entries: &[IstioObject<WorkloadEntrySpec>],
    ) -> Option<MeshService> {
        let meta = Meta::from_object_meta(&svc.metadata, true);
        let spec = svc.spec.as_ref()?;
        let ports: Vec<ServicePort> = spec
            .ports
            .iter()
            .flatten()
            .map(|p| ServicePort {
                name: p.name.clone().unwrap_or_default(),
                port: p.port as u32,
                target: p.target_port.clone(),
                protocol: Protocol::from_kubernetes(
                    p.name.as_deref(),
                    p.app_protocol.as_deref(),
                    p.protocol.as_deref(),
                ),
            })
            .collect();
        let mut addresses: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
        if let Some(ip) = &spec.cluster_ip
            && !addresses.contains(ip)
        {
            addresses.insert(0, ip.clone());
        }
        addresses.retain(|a| a != "None" && !a.is_empty());
        let mut endpoints = Vec::new();
        for slice in slices {
            let slice_ns = slice.metadata.namespace.clone().unwrap_or_else(|| "default".into());
            let slice_ports: BTreeMap<String, u32> = slice
                .ports
                .iter()
                .flatten()
                .filter_map(|p| Some((p.name.clone().unwrap_or_default(), p.port? as u32)))
                .collect();
            for e in slice.endpoints.iter().flatten() {
                let pod = e
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| {
                        let ns = r.namespace.clone().unwrap_or_else(|| slice_ns.clone());
                        self.workloads.get(&(ns, r.name.clone()?))
                    })
                    .or_else(|| {
                        let ip = e.addresses.first()?;
                        self.workloads.values().find(|w| w.namespace == slice_ns && w.ip.as_ref() == Some(ip))
                    });
                for address in &e.addresses {
                    let mut ep = match pod {
                        Some(w) => Self::workload_endpoint(w, address.clone()),
                        None => Endpoint {
                            address: address.clone(),
                            ports: BTreeMap::new(),
                            labels: BTreeMap::new(),
                            locality: None,
                            weight: None,
                            ready: true,
                            service_account: None,
                        },
                    };
                    ep.ports = slice_ports.clone();
                    ep.ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                    // The slice knows the zone; the Pod's labels may know only the region.
                    if let Some(zone) = &e.zone {
                        ep.locality = match ep.locality.take() {
                            Some(l) if l.contains('/') => Some(l),
                            Some(region) => Some(format!("{region}/{zone}")),
                            None => Some(format!("/{zone}")),
                        };
                    }
                    endpoints.push(ep);
                }
            }
        }
        // Istio also selects WorkloadEntries with a Service's selector: VMs behind a Service.
        if let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) {
            for we in workload_entries.iter().filter(|w| w.meta.namespace == meta.namespace) {
                let w = &self.workloads[&(we.meta.namespace.clone(), we.meta.name.clone())];
                if labels_match(selector, &w.labels) {
                    let mut ep = Self::workload_endpoint(w, we.spec.address.clone());
                    ep.weight = we.spec.weight;
                    endpoints.push(ep);
                }
            }
        }
        let export_to = meta
            .annotations
            .get("networking.istio.io/exportTo")
            .map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default();
        Some(MeshService {
            hostname: format!("{}.{}.svc.{DOMAIN_SUFFIX}", meta.name, meta.namespace),
            namespace: meta.namespace,
            addresses,
            ports,
            resolution: if spec.cluster_ip.as_deref() == Some("None") && spec.selector.is_none() {
                ServiceResolution::Passthrough
            } else {
                ServiceResolution::Eds
            },
            endpoints,
            mesh_external: false,
            export_to,
            source,
            origin,
        })
    }

    fn services_from_entry(
        &self,
        se: &IstioObject<ServiceEntrySpec>,
        source: &ObjectRef,
        workload_entries: &[IstioObject<WorkloadEntrySpec>],
    ) -> Vec<MeshService> {
        let spec = &se.spec;
        let ports: Vec<ServicePort> = spec
            .ports
            .iter()
            .map(|p| ServicePort {
                name: p.name.clone(),
                port: p.number,
                target: p.target_port.map(|t| IntOrString::Int(t as i32)),
                protocol: p.protocol.as_deref().and_then(Protocol::parse).unwrap_or(Protocol::Tcp),
            })
            .collect();
        let mut endpoints: Vec<Endpoint> = spec
            .endpoints
            .iter()
            .map(|e| Endpoint {
                address: e.address.clone(),
                ports: e.ports.clone(),
                labels: e.labels.clone(),
                locality: e.locality.clone(),
                weight: e.weight,
                ready: true,
                service_account: e.service_account.clone(),
            })
            .collect();
        if let Some(sel) = &spec.workload_selector {
            for w in self.workloads.values().filter(|w| w.namespace == se.meta.namespace) {
                if labels_match(&sel.labels, &w.labels)
                    && let Some(ip) = &w.ip
                {
                    let mut ep = Self::workload_endpoint(w, ip.clone());
                    if let Some(we) =
                        workload_entries.iter().find(|e| e.meta.namespace == w.namespace && e.meta.name == w.name)
                    {
                        ep.weight = we.spec.weight;
                    }
                    endpoints.push(ep);
                }
            }
        }
        let resolution = match spec.resolution.unwrap_or(Resolution::None) {
            Resolution::None => ServiceResolution::Passthrough,
            Resolution::Static => ServiceResolution::Eds,
            Resolution::Dns => ServiceResolution::Dns,
            Resolution::DnsRoundRobin => ServiceResolution::DnsRoundRobin,
        };
        let endpoints_for_dns = |host: &str| -> Vec<Endpoint> {
            if matches!(resolution, ServiceResolution::Dns | ServiceResolution::DnsRoundRobin) && endpoints.is_empty() {
                vec![Endpoint {
                    address: host.to_string(),
                    ports: BTreeMap::new(),
                    labels: BTreeMap::new(),
                    locality: None,
                    weight: None,
                    ready: true,
                    service_account: None,
                }]
            } else {
                endpoints.clone()
            }
        };
        spec.hosts
            .iter()
            .map(|host| MeshService {
                hostname: host.clone(),
                namespace: se.meta.namespace.clone(),
                addresses: spec.addresses.clone(),
                ports: ports.clone(),
                resolution,
                endpoints: endpoints_for_dns(host),
                mesh_external: spec.location != Some(Location::MeshInternal),
                export_to: spec.export_to.clone(),
                source: source.clone(),
                origin: se.origin.clone(),
            })
            .collect()
    }

    /// The service a VirtualService or DestinationRule in `namespace` means by `host`.
    pub fn lookup(&self, host: &str, namespace: &str) -> Option<&MeshService> {
        self.services.get(&resolve_host(host, namespace))
    }

    /// Subset names defined for `fqdn` by DestinationRules visible from `namespace`.
    pub fn subsets_for(&self, fqdn: &str, namespace: &str) -> BTreeSet<String> {
        self.destination_rules_for_host(fqdn)
            .filter(|dr| resolve_host(&dr.spec.host, &dr.meta.namespace) == fqdn)
            .filter(|dr| exported_to(&dr.spec.export_to, &dr.meta.namespace, namespace))
            .flat_map(|dr| dr.spec.subsets.iter().map(|s| s.name.clone()))
            .collect()
    }

    /// Istio's analyzers, as warnings: references to unknown hosts and subsets (IST0101).
    fn analyze(&self, diagnostics: &mut Vec<Diagnostic>) {
        let mut warn = |origin: &str, object: ObjectRef, path: String, message: String| {
            diagnostics.push(Diagnostic {
                severity: Severity::Warning,
                origin: origin.to_string(),
                object: Some(object),
                path,
                code: Some("IST0101"),
                message,
            });
        };
        for vs in &self.virtual_services {
            let r = ObjectRef::new("VirtualService", &vs.meta.namespace, &vs.meta.name);
            let mut check = |path: String, d: &Destination| {
                let fqdn = resolve_host(&d.host, &vs.meta.namespace);
                if !self.services.contains_key(&fqdn) {
                    warn(
                        &vs.origin,
                        r.clone(),
                        format!("{path}.host"),
                        format!("referenced host not found: {:?}", d.host),
                    );
                } else if let Some(subset) = &d.subset
                    && !self.subsets_for(&fqdn, &vs.meta.namespace).contains(subset)
                {
                    warn(
                        &vs.origin,
                        r.clone(),
                        format!("{path}.subset"),
                        format!("referenced host+subset in destinationrule not found: \"{fqdn}+{subset}\""),
                    );
                }
            };
            for (i, h) in vs.spec.http.iter().enumerate() {
                for (j, d) in h.route.iter().enumerate() {
                    check(format!("spec.http[{i}].route[{j}].destination"), &d.destination);
                }
                if let Some(m) = &h.mirror {
                    check(format!("spec.http[{i}].mirror"), m);
                }
                for (j, m) in h.mirrors.iter().enumerate() {
                    check(format!("spec.http[{i}].mirrors[{j}].destination"), &m.destination);
                }
            }
            for (i, t) in vs.spec.tcp.iter().enumerate() {
                for (j, d) in t.route.iter().enumerate() {
                    check(format!("spec.tcp[{i}].route[{j}].destination"), &d.destination);
                }
            }
        }
        for dr in &self.destination_rules {
            let fqdn = resolve_host(&dr.spec.host, &dr.meta.namespace);
            if !fqdn.starts_with('*') && !self.services.contains_key(&fqdn) {
                warn(
                    &dr.origin,
                    ObjectRef::new("DestinationRule", &dr.meta.namespace, &dr.meta.name),
                    "spec.host".into(),
                    format!("referenced host not found: {:?}", dr.spec.host),
                );
            }
        }
    }
}

impl Snapshot {
    /// The ALLOW and DENY policies that apply to a workload in `namespace` with `labels`, in name
    /// order: the root namespace's and the workload namespace's, selector-less or selecting it.
    /// `labels` is None for a proxy whose workload is unknown (only selector-less ones apply).
    pub fn authorization_policies_for(
        &self,
        namespace: &str,
        labels: Option<&BTreeMap<String, String>>,
    ) -> Vec<&IstioObject<AuthorizationPolicySpec>> {
        self.authorization_policies
            .iter()
            .filter(|p| p.meta.namespace == ROOT_NAMESPACE || p.meta.namespace == namespace)
            .filter(|p| match &p.spec.selector {
                Some(s) if !s.match_labels.is_empty() => labels.is_some_and(|l| labels_match(&s.match_labels, l)),
                _ => true,
            })
            .filter(|p| matches!(p.spec.action.unwrap_or(Action::Allow), Action::Allow | Action::Deny))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_resolve_in_namespace() {
        assert_eq!(resolve_host("reviews", "default"), "reviews.default.svc.cluster.local");
        assert_eq!(resolve_host("reviews.default.svc.cluster.local", "x"), "reviews.default.svc.cluster.local");
        assert_eq!(resolve_host("*.example.com", "x"), "*.example.com");
    }

    #[test]
    fn wildcard_hosts() {
        assert!(host_matches("*", "a.b"));
        assert!(host_matches("*.example.com", "api.example.com"));
        assert!(!host_matches("*.example.com", "example.org"));
        assert!(host_matches("a.b", "a.b"));
    }

    #[test]
    fn export_to() {
        assert!(exported_to(&[], "a", "b"));
        assert!(exported_to(&[".".into()], "a", "a"));
        assert!(!exported_to(&[".".into()], "a", "b"));
        assert!(exported_to(&["b".into()], "a", "b"));
        assert!(!exported_to(&["~".into()], "a", "a"));
    }
}
