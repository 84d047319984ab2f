//! Incremental updates: a snapshot takes changed objects and recomputes only the services,
//! workloads and findings that read them, and says what changed so back ends can patch their
//! output instead of rebuilding it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::registry::{Dependency, slice_owner, workload_of};
use super::{HostIndex, MeshService, Objects, ServiceResolution, Snapshot, resolve_host};
use crate::diagnostic::{Diagnostic, ObjectRef, Severity};
use crate::model::{IstioObject, Loaded, Meta, Object};

/// One change to the accepted objects.
#[derive(Debug, Clone)]
pub enum Change {
    /// The object was added or replaced.
    Upsert(Arc<Loaded>),
    /// The object is gone.
    Remove(ObjectRef),
}

/// How one service changed.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceChange {
    /// The service before the change (None: it is new).
    pub before: Option<Arc<MeshService>>,
    /// It existed before and after, is discovered by EDS, and only its endpoints differ.
    pub endpoints_only: bool,
}

/// What one [`Snapshot::apply`] changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotDelta {
    /// DestinationRules, policy, Sidecars or namespaces changed: back ends rebuild rather than
    /// patch.
    pub rebuild: bool,
    /// Hosts (resolved, possibly wildcards) named by VirtualServices that changed.
    pub routing: BTreeSet<String>,
    /// Services added, removed or changed, by host.
    pub services: BTreeMap<String, ServiceChange>,
    /// Workloads (namespace, name) added, removed or changed.
    pub workloads: BTreeSet<(String, String)>,
}

impl SnapshotDelta {
    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        !self.rebuild && self.routing.is_empty() && self.services.is_empty() && self.workloads.is_empty()
    }

    /// True when back ends may patch what they built: nothing forces a rebuild and no service
    /// changed more than its endpoints (routing may have changed).
    pub fn patchable(&self) -> bool {
        !self.rebuild && self.services.values().all(|c| c.endpoints_only)
    }

    /// True when no service changed more than its endpoints, no routing changed and nothing
    /// forces a rebuild.
    pub fn endpoints_only(&self) -> bool {
        self.patchable() && self.routing.is_empty()
    }

    /// This delta followed by `next`: what changed from before this one to after `next`.
    pub fn then(&mut self, next: &SnapshotDelta) {
        self.rebuild |= next.rebuild;
        self.routing.extend(next.routing.iter().cloned());
        for (host, change) in &next.services {
            match self.services.get_mut(host) {
                Some(first) => first.endpoints_only &= change.endpoints_only,
                None => {
                    self.services.insert(host.clone(), change.clone());
                }
            }
        }
        self.workloads.extend(next.workloads.iter().cloned());
    }
}

/// What an update has yet to recompute.
#[derive(Default)]
struct Pending {
    delta: SnapshotDelta,
    /// Services and ServiceEntries to rebuild.
    sources: BTreeSet<ObjectRef>,
    /// Workloads added or removed: (namespace, name, IP, is a WorkloadEntry).
    workloads: Vec<(String, String, Option<String>, bool)>,
    /// VirtualServices and DestinationRules to re-check.
    analyze: BTreeSet<ObjectRef>,
    analyze_all: bool,
}

/// True when `a` and `b` differ at most in their endpoints, and EDS delivers those.
fn same_but_endpoints(a: &MeshService, b: &MeshService) -> bool {
    a.resolution == ServiceResolution::Eds
        && b.resolution == ServiceResolution::Eds
        && a.hostname == b.hostname
        && a.namespace == b.namespace
        && a.addresses == b.addresses
        && a.ports == b.ports
        && a.mesh_external == b.mesh_external
        && a.export_to == b.export_to
        && a.source == b.source
        && a.origin == b.origin
        // Clients verify the servers' identities in the cluster, not in its endpoints.
        && a.service_accounts() == b.service_accounts()
}

fn put<S>(map: &mut Objects<S>, r: &ObjectRef, object: &IstioObject<S>, adding: bool)
where
    S: Clone,
{
    if adding {
        map.insert(r.clone(), Arc::new(object.clone()));
    } else {
        map.remove(r);
    }
}

fn index(index: &mut HostIndex, r: &ObjectRef, hosts: impl Iterator<Item = String>, adding: bool) {
    for host in hosts {
        if adding {
            index.insert(host, r);
        } else {
            index.remove(&host, r);
        }
    }
}

impl Snapshot {
    /// Applies `changes` to the accepted objects and recomputes what they affect. Returns what
    /// changed in the snapshot.
    pub fn apply(&mut self, changes: impl IntoIterator<Item = Change>) -> SnapshotDelta {
        let mut pending = Pending::default();
        for change in changes {
            let (reference, new) = match change {
                Change::Upsert(l) => (l.reference.clone(), Some(l)),
                Change::Remove(r) => (r, None),
            };
            let old = match &new {
                Some(l) => self.registry.objects.insert(reference.clone(), l.clone()),
                None => self.registry.objects.remove(&reference),
            };
            if let (Some(o), Some(n)) = (&old, &new)
                && o.same_as(n)
            {
                continue;
            }
            if let Some(o) = &old {
                self.take(&reference, o, false, &mut pending);
            }
            if let Some(n) = &new {
                self.take(&reference, n, true, &mut pending);
            }
        }
        for (namespace, name, ip, entry) in std::mem::take(&mut pending.workloads) {
            let mut read = vec![Dependency::Workloads(namespace.clone())];
            if entry {
                read.push(Dependency::WorkloadEntries(namespace.clone()));
            }
            if let Some(ip) = ip {
                read.push(Dependency::Address(namespace.clone(), ip));
            }
            read.push(Dependency::Workload(namespace, name));
            for dependency in read {
                pending.sources.extend(self.registry.readers(&dependency).cloned());
            }
        }
        let mut hosts = BTreeSet::new();
        for source in std::mem::take(&mut pending.sources) {
            self.rebuild_source(&source, &mut hosts);
        }
        for host in hosts {
            self.settle_host(host, &mut pending);
        }
        if pending.analyze_all {
            self.reanalyze_all();
        } else {
            for r in &pending.analyze {
                self.reanalyze(r);
            }
        }
        pending.delta
    }

    /// Counts (or with `adding` false, uncounts) the label keys `object` selects proxies by.
    fn count_selector_keys(&mut self, object: &Object, adding: bool) {
        let keys: BTreeSet<&String> = match object {
            Object::VirtualService(vs) => {
                let http = vs.spec.http.iter().flat_map(|h| h.matches.iter().flat_map(|m| m.source_labels.keys()));
                let tcp = vs.spec.tcp.iter().flat_map(|t| t.matches.iter().flat_map(|m| m.source_labels.keys()));
                http.chain(tcp).collect()
            }
            Object::DestinationRule(dr) => dr.spec.workload_selector.iter().flat_map(|s| s.labels.keys()).collect(),
            Object::Sidecar(sc) => sc.spec.workload_selector.iter().flat_map(|s| s.labels.keys()).collect(),
            _ => return,
        };
        for key in keys {
            let count = self.selector_keys.entry(key.clone()).or_default();
            if adding {
                *count += 1;
            } else {
                *count -= 1;
                if *count == 0 {
                    self.selector_keys.remove(key);
                }
            }
        }
    }

    /// Adds (or with `adding` false, removes) one object's contribution.
    fn take(&mut self, r: &ObjectRef, loaded: &Loaded, adding: bool, pending: &mut Pending) {
        self.count_selector_keys(&loaded.object, adding);
        match &loaded.object {
            Object::Service(_) | Object::ServiceEntry(_) => {
                pending.sources.insert(r.clone());
            }
            Object::EndpointSlice(slice) => {
                let Some(owner) = slice_owner(slice) else { return };
                let slices = &mut self.registry.slices;
                if adding {
                    slices.entry(owner.clone()).or_default().insert(r.clone());
                } else if let Some(set) = slices.get_mut(&owner) {
                    set.remove(r);
                    if set.is_empty() {
                        slices.remove(&owner);
                    }
                }
                pending.sources.insert(ObjectRef::new("Service", &owner.0, &owner.1));
            }
            Object::Pod(_) | Object::WorkloadEntry(_) => {
                let Some(w) = workload_of(&loaded.object) else { return };
                let key = (w.namespace.clone(), w.name.clone());
                if let Some(ip) = &w.ip {
                    let at = (w.namespace.clone(), ip.clone());
                    let addresses = &mut self.registry.addresses;
                    if adding {
                        addresses.entry(at).or_default().insert(w.name.clone());
                    } else if let Some(set) = addresses.get_mut(&at) {
                        set.remove(&w.name);
                        if set.is_empty() {
                            addresses.remove(&at);
                        }
                    }
                }
                let entry = matches!(loaded.object, Object::WorkloadEntry(_));
                pending.workloads.push((w.namespace.clone(), w.name.clone(), w.ip.clone(), entry));
                pending.delta.workloads.insert(key.clone());
                if adding {
                    self.workloads.insert(key, Arc::new(w));
                } else {
                    self.workloads.remove(&key);
                }
            }
            Object::Namespace(n) => {
                let meta = Meta::from_object_meta(&n.metadata, false);
                if adding {
                    self.namespaces.insert(meta.name, meta.labels);
                } else {
                    self.namespaces.remove(&meta.name);
                }
                pending.delta.rebuild = true;
            }
            Object::VirtualService(vs) => {
                let ns = &vs.meta.namespace;
                let hosts: Vec<String> = vs.spec.hosts.iter().map(|h| resolve_host(h, ns)).collect();
                pending.delta.routing.extend(hosts.iter().cloned());
                index(&mut self.virtual_service_hosts, r, hosts.into_iter(), adding);
                let http = vs.spec.http.iter().flat_map(|h| h.route.iter().map(|d| &d.destination));
                let tcp = vs.spec.tcp.iter().flat_map(|t| t.route.iter().map(|d| &d.destination));
                let destinations: BTreeSet<String> = http.chain(tcp).map(|d| resolve_host(&d.host, ns)).collect();
                index(&mut self.virtual_service_destinations, r, destinations.into_iter(), adding);
                put(&mut self.virtual_services, r, vs, adding);
                pending.analyze.insert(r.clone());
            }
            Object::DestinationRule(dr) => {
                let host = resolve_host(&dr.spec.host, &dr.meta.namespace);
                index(&mut self.destination_rule_hosts, r, std::iter::once(host), adding);
                put(&mut self.destination_rules, r, dr, adding);
                // Subsets are what VirtualServices are checked against.
                pending.analyze_all = true;
                pending.delta.rebuild = true;
            }
            Object::Sidecar(o) => {
                put(&mut self.sidecars, r, o, adding);
                pending.delta.rebuild = true;
            }
            Object::AuthorizationPolicy(o) => {
                put(&mut self.authorization_policies, r, o, adding);
                pending.delta.rebuild = true;
            }
            Object::PeerAuthentication(o) => {
                put(&mut self.peer_authentications, r, o, adding);
                pending.delta.rebuild = true;
            }
            Object::RequestAuthentication(o) => {
                put(&mut self.request_authentications, r, o, adding);
                pending.delta.rebuild = true;
            }
        }
    }

    /// Recomputes the definitions of one Service or ServiceEntry; `hosts` gains every host it
    /// defined before or defines now.
    fn rebuild_source(&mut self, source: &ObjectRef, hosts: &mut BTreeSet<String>) {
        let registry = &mut self.registry;
        for host in registry.hosts_of.remove(source).unwrap_or_default() {
            if let Some(defs) = registry.definitions.get_mut(&host) {
                defs.retain(|(r, _)| r != source);
                if defs.is_empty() {
                    registry.definitions.remove(&host);
                }
            }
            hosts.insert(host);
        }
        for dependency in registry.dependencies_of.remove(source).unwrap_or_default() {
            registry.forget_reader(&dependency, source);
        }
        let Some(loaded) = registry.objects.get(source).cloned() else { return };
        let mut read = Vec::new();
        let definitions = self.definitions_of(source, &loaded, &mut read);
        let registry = &mut self.registry;
        read.sort();
        read.dedup();
        for dependency in &read {
            registry.add_reader(dependency, source);
        }
        if !read.is_empty() {
            registry.dependencies_of.insert(source.clone(), read);
        }
        let mut defined = Vec::new();
        for service in definitions {
            let host = service.hostname.clone();
            let defs = registry.definitions.entry(host.clone()).or_default();
            let at = defs.partition_point(|(r, _)| r < source);
            // A host listed twice by one ServiceEntry is one definition.
            if defs.get(at).is_none_or(|(r, _)| r != source) {
                defs.insert(at, (source.clone(), Arc::new(service)));
            }
            hosts.insert(host.clone());
            defined.push(host);
        }
        if !defined.is_empty() {
            registry.hosts_of.insert(source.clone(), defined);
        }
    }

    /// Puts the first definition of `host` in force, records the others as conflicts (IST0109)
    /// and the change in the delta.
    fn settle_host(&mut self, host: String, pending: &mut Pending) {
        let definitions = self.registry.definitions.get(&host);
        let winner = definitions.and_then(|d| d.first()).map(|(_, s)| s.clone());
        let conflicts: Vec<Diagnostic> = match (definitions, &winner) {
            (Some(defs), Some(first)) => defs
                .iter()
                .skip(1)
                .map(|(_, lost)| Diagnostic {
                    severity: Severity::Warning,
                    origin: lost.origin.clone(),
                    object: Some(lost.source.clone()),
                    path: String::new(),
                    code: Some("IST0109"),
                    message: format!("host {host} is already defined by {}; this definition is ignored", first.source),
                })
                .collect(),
            _ => Vec::new(),
        };
        if conflicts.is_empty() {
            self.conflicts.remove(&host);
        } else {
            self.conflicts.insert(host.clone(), conflicts);
        }
        let before = self.services.get(&host).cloned();
        let endpoints_only = match (&before, &winner) {
            (Some(a), Some(b)) if Arc::ptr_eq(a, b) || a == b => return,
            (Some(a), Some(b)) => same_but_endpoints(a, b),
            (None, None) => return,
            _ => false,
        };
        if before.is_none() || winner.is_none() {
            // Whether a host exists is what VirtualServices and DestinationRules are checked against.
            pending.analyze_all = true;
        }
        for e in before.iter().flat_map(|s| s.endpoints.iter()) {
            if let Some(hosts) = self.endpoint_hosts.get_mut(&e.address) {
                hosts.remove(&host);
                if hosts.is_empty() {
                    self.endpoint_hosts.remove(&e.address);
                }
            }
        }
        for e in winner.iter().flat_map(|s| s.endpoints.iter()) {
            self.endpoint_hosts.entry(e.address.clone()).or_default().insert(host.clone());
        }
        match winner {
            Some(w) => self.services.insert(host.clone(), w),
            None => self.services.remove(&host),
        };
        pending.delta.services.insert(host, ServiceChange { before, endpoints_only });
    }
}
