//! The service registry: services built from Kubernetes Services (with their EndpointSlices,
//! Pods and WorkloadEntries) and from ServiceEntries, and the record of what each definition
//! read, so that one changed Pod or slice recomputes only the services that read it.

use std::collections::BTreeMap;
use std::sync::Arc;

use imbl::{HashMap, OrdSet};

use super::small_set::SmallSet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    DOMAIN_SUFFIX, Endpoint, Location, MeshService, Resolution, ServiceEntrySpec, ServicePort, ServiceResolution,
    Snapshot, Workload, WorkloadEntrySpec,
};
use crate::diagnostic::ObjectRef;
use crate::model::common::{Protocol, labels_match};
use crate::model::{IstioObject, Loaded, Meta, Object};

/// Something a service definition read besides its own object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum Dependency {
    /// A named workload (a slice endpoint's Pod, a selected workload).
    Workload(String, String),
    /// Whichever workload has this IP in this namespace (slice endpoints without a Pod).
    Address(String, String),
    /// Every WorkloadEntry of a namespace (a Service's selector also selects them).
    WorkloadEntries(String),
    /// Every workload of a namespace (a ServiceEntry's workloadSelector).
    Workloads(String),
}

/// The inputs of the derived maps and the links between them. Persistent maps: a snapshot
/// copy shares them.
#[derive(Debug, Clone, Default)]
pub(super) struct Registry {
    /// Every accepted object.
    pub objects: imbl::OrdMap<ObjectRef, Arc<Loaded>>,
    /// EndpointSlices by the (namespace, service name) they belong to.
    pub slices: HashMap<(String, String), SmallSet<ObjectRef>>,
    /// Every definition of each host, by defining object (the first one is in force).
    pub definitions: HashMap<String, Vec<(ObjectRef, Arc<MeshService>)>>,
    /// The hosts each Service or ServiceEntry defines.
    pub hosts_of: HashMap<ObjectRef, Vec<String>>,
    /// What each Service or ServiceEntry read.
    pub dependencies_of: HashMap<ObjectRef, Vec<Dependency>>,
    /// The Services and ServiceEntries that read each workload or address (a few each).
    dependents: HashMap<Dependency, SmallSet<ObjectRef>>,
    /// The Services and ServiceEntries that read a whole namespace's workloads (possibly every
    /// Service of the namespace: a persistent set, so a change copies a path, not the set).
    namespace_dependents: HashMap<Dependency, OrdSet<ObjectRef>>,
    /// Workload names by (namespace, IP).
    pub addresses: HashMap<(String, String), SmallSet<String>>,
}

impl Registry {
    /// Records that `source` read `dependency`.
    pub fn add_reader(&mut self, dependency: &Dependency, source: &ObjectRef) {
        if dependency.is_namespace() {
            self.namespace_dependents.entry(dependency.clone()).or_default().insert(source.clone());
        } else {
            self.dependents.entry(dependency.clone()).or_default().insert(source.clone());
        }
    }

    /// Forgets that `source` read `dependency`.
    pub fn forget_reader(&mut self, dependency: &Dependency, source: &ObjectRef) {
        if dependency.is_namespace() {
            if let Some(readers) = self.namespace_dependents.get_mut(dependency) {
                readers.remove(source);
                if readers.is_empty() {
                    self.namespace_dependents.remove(dependency);
                }
            }
        } else if let Some(readers) = self.dependents.get_mut(dependency) {
            readers.remove(source);
            if readers.is_empty() {
                self.dependents.remove(dependency);
            }
        }
    }

    /// The Services and ServiceEntries that read `dependency`.
    pub fn readers(&self, dependency: &Dependency) -> Box<dyn Iterator<Item = &ObjectRef> + '_> {
        if dependency.is_namespace() {
            Box::new(self.namespace_dependents.get(dependency).into_iter().flatten())
        } else {
            Box::new(self.dependents.get(dependency).into_iter().flatten())
        }
    }
}

impl Dependency {
    fn is_namespace(&self) -> bool {
        matches!(self, Dependency::WorkloadEntries(_) | Dependency::Workloads(_))
    }
}

/// The (namespace, service) an EndpointSlice belongs to, by its `kubernetes.io/service-name`.
pub(super) fn slice_owner(slice: &EndpointSlice) -> Option<(String, String)> {
    let service = slice.metadata.labels.as_ref()?.get("kubernetes.io/service-name")?;
    Some((slice.metadata.namespace.clone().unwrap_or_else(|| "default".into()), service.clone()))
}

/// The workload a Pod or WorkloadEntry describes.
pub(super) fn workload_of(object: &Object) -> Option<Workload> {
    match object {
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
            Some(Workload {
                ip: p.status.as_ref().and_then(|s| s.pod_ip.clone()),
                service_account: spec.and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into()),
                name: meta.name,
                namespace: meta.namespace,
                labels: meta.labels,
                annotations: meta.annotations,
                locality,
                named_ports,
                node: spec.and_then(|s| s.node_name.clone()),
                pod_uid: p.metadata.uid.clone().filter(|u| !u.is_empty()),
            })
        }
        Object::WorkloadEntry(w) => {
            let mut labels = w.meta.labels.clone();
            labels.extend(w.spec.labels.clone());
            Some(Workload {
                name: w.meta.name.clone(),
                namespace: w.meta.namespace.clone(),
                ip: w.spec.address.parse::<std::net::IpAddr>().ok().map(|_| w.spec.address.clone()),
                labels,
                annotations: w.meta.annotations.clone(),
                service_account: w.spec.service_account.clone().unwrap_or_else(|| "default".into()),
                locality: w.spec.locality.clone(),
                named_ports: w.spec.ports.clone(),
                node: None,
                pod_uid: None,
            })
        }
        _ => None,
    }
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

impl Snapshot {
    /// The objects of `kind` in `namespace`, in name order.
    fn objects_in<'a>(&'a self, kind: &'a str, namespace: &'a str) -> impl Iterator<Item = &'a Loaded> {
        self.registry
            .objects
            .range(ObjectRef::new(kind, namespace, "")..)
            .take_while(move |(r, _)| r.kind == kind && r.namespace == namespace)
            .map(|(_, l)| l.as_ref())
    }

    /// WorkloadEntries of `namespace`, in name order.
    fn workload_entries_in<'a>(
        &'a self,
        namespace: &'a str,
    ) -> impl Iterator<Item = &'a IstioObject<WorkloadEntrySpec>> {
        self.objects_in("WorkloadEntry", namespace).filter_map(|l| match &l.object {
            Object::WorkloadEntry(w) => Some(&**w),
            _ => None,
        })
    }

    /// The workload with `ip` in `namespace` (the first by name when several claim it).
    pub fn workload_at(&self, namespace: &str, ip: &str) -> Option<&Arc<Workload>> {
        let names = self.registry.addresses.get(&(namespace.to_string(), ip.to_string()))?;
        self.workloads.get(&(namespace.to_string(), names.first()?.clone()))
    }

    /// The services `source` (a Service or ServiceEntry) defines, recording what they read.
    pub(super) fn definitions_of(
        &self,
        source: &ObjectRef,
        loaded: &Loaded,
        read: &mut Vec<Dependency>,
    ) -> Vec<MeshService> {
        match &loaded.object {
            Object::Service(s) => self.service_from_kubernetes(s, source, &loaded.origin, read).into_iter().collect(),
            Object::ServiceEntry(se) => self.services_from_entry(se, source, read),
            _ => Vec::new(),
        }
    }

    fn service_from_kubernetes(
        &self,
        svc: &Service,
        source: &ObjectRef,
        origin: &str,
        read: &mut Vec<Dependency>,
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
        let slices = self.registry.slices.get(&(meta.namespace.clone(), meta.name.clone()));
        for slice in slices.into_iter().flatten().filter_map(|r| self.registry.objects.get(r)) {
            let Object::EndpointSlice(slice) = &slice.object else { continue };
            let slice_ns = slice.metadata.namespace.clone().unwrap_or_else(|| "default".into());
            let slice_ports: BTreeMap<String, u32> = slice
                .ports
                .iter()
                .flatten()
                .filter_map(|p| Some((p.name.clone().unwrap_or_default(), p.port? as u32)))
                .collect();
            for e in slice.endpoints.iter().flatten() {
                let named = e
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| Some((r.namespace.clone().unwrap_or_else(|| slice_ns.clone()), r.name.clone()?)));
                let mut pod = None;
                if let Some((ns, name)) = named {
                    pod = self.workloads.get(&(ns.clone(), name.clone()));
                    read.push(Dependency::Workload(ns, name));
                }
                if pod.is_none()
                    && let Some(ip) = e.addresses.first()
                {
                    pod = self.workload_at(&slice_ns, ip);
                    read.push(Dependency::Address(slice_ns.clone(), ip.clone()));
                }
                for address in &e.addresses {
                    let mut ep = match pod {
                        Some(w) => workload_endpoint(w, address.clone()),
                        None => Endpoint::at(address.clone()),
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
            read.push(Dependency::WorkloadEntries(meta.namespace.clone()));
            for we in self.workload_entries_in(&meta.namespace) {
                let Some(w) = self.workloads.get(&(we.meta.namespace.clone(), we.meta.name.clone())) else { continue };
                // An entry without an address (one on another network) has no endpoint here.
                if labels_match(selector, &w.labels) && !we.spec.address.is_empty() {
                    let mut ep = workload_endpoint(w, we.spec.address.clone());
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
            source: source.clone(),
            origin: origin.to_string(),
        })
    }

    fn services_from_entry(
        &self,
        se: &IstioObject<ServiceEntrySpec>,
        source: &ObjectRef,
        read: &mut Vec<Dependency>,
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
            .filter(|e| !e.address.is_empty())
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
            let ns = &se.meta.namespace;
            read.push(Dependency::Workloads(ns.clone()));
            let in_namespace =
                self.workloads.range((ns.clone(), String::new())..).take_while(|((n, _), _)| n == ns).map(|(_, w)| w);
            for w in in_namespace {
                if labels_match(&sel.labels, &w.labels)
                    && let Some(ip) = &w.ip
                {
                    let mut ep = workload_endpoint(w, ip.clone());
                    let entry = self.registry.objects.get(&ObjectRef::new("WorkloadEntry", &w.namespace, &w.name));
                    if let Some(Object::WorkloadEntry(we)) = entry.map(|l| &l.object) {
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
                vec![Endpoint::at(host.to_string())]
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
}
