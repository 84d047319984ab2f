//! Incremental translation for a node agent: what a [`SnapshotDelta`] changes in the entries
//! [`super::translate_node`] made, without translating the whole node again. The rules are the
//! translator's own (which hosts a change reaches, when a wildcard or a contested (VIP, port)
//! makes a patch unsafe), kept next to the code that builds the entries, so the served path and
//! a full translation cannot drift; `backends_agree` checks the two give the same entries.

use std::collections::{BTreeMap, BTreeSet};

use super::{KernelService, KernelWorkload, kernel_service_names, kernel_services, kernel_workload};
use crate::snapshot::{Snapshot, SnapshotDelta, resolve_host};

/// Who holds an entry name in what the agent was sent before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// No entry of that name.
    Nobody,
    /// The entry of this service (by host).
    Service(String),
    /// An entry that cannot be read: only a full translation is safe.
    Unknown,
}

/// The changes to a node's entries that one delta makes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodePatch {
    /// Service entries to put (new or changed).
    pub services: Vec<KernelService>,
    /// Workload entries to put (new or changed).
    pub workloads: Vec<KernelWorkload>,
    /// Names of service entries to remove.
    pub removed_services: Vec<String>,
    /// Names of workload entries to remove.
    pub removed_workloads: Vec<String>,
}

/// The patch that brings the entries of node `node` from the snapshot before `delta` to
/// `snapshot`; `held` names the service that holds an entry name in what the agent has. None
/// when only a full translation ([`super::translate_node`]) gives the right answer: subsets or
/// policy changed (`delta.rebuild`), a wildcard VirtualService changed or routes to a changed
/// service, or a (VIP, port) is claimed by two services (the node-wide rule that the first
/// service by host keeps it needs every claimant).
///
/// The entries a change reaches: those of the changed services, of the services whose
/// VirtualServices route to a changed service, and of the hosts whose VirtualServices changed;
/// and the changed workloads.
pub fn patch(
    snapshot: &Snapshot,
    node: &str,
    delta: &SnapshotDelta,
    held: impl Fn(&str) -> Holder,
) -> Option<NodePatch> {
    if delta.rebuild {
        return None;
    }
    // Each affected host with the entry names it had.
    let mut hosts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (host, change) in &delta.services {
        hosts.insert(host.clone(), change.before.as_deref().map(kernel_service_names).unwrap_or_default());
    }
    for host in &delta.routing {
        if host.starts_with('*') {
            return None;
        }
        if let Some(service) = snapshot.services.get(host) {
            hosts.entry(host.clone()).or_insert_with(|| kernel_service_names(service));
        }
    }
    for host in delta.services.keys() {
        for vs in snapshot.virtual_services_routing_to(host) {
            for routed in vs.spec.hosts.iter().map(|h| resolve_host(h, &vs.meta.namespace)) {
                if routed.starts_with('*') {
                    return None;
                }
                if let Some(service) = snapshot.services.get(&routed) {
                    hosts.entry(routed).or_insert_with(|| kernel_service_names(service));
                }
            }
        }
    }
    let holder = |name: &str| match held(name) {
        Holder::Nobody => Some(None),
        Holder::Service(host) => Some(Some(host)),
        Holder::Unknown => None,
    };
    let mut diagnostics = Vec::new();
    let mut out = NodePatch::default();
    let mut gone = BTreeSet::new();
    let mut named = BTreeSet::new();
    for (host, before) in &hosts {
        for name in before {
            // An entry another service holds (two claim the VIP and port): translate in full.
            if holder(name)?.is_some_and(|o| &o != host) {
                return None;
            }
            gone.insert(name.clone());
        }
        let now = snapshot.services.get(host).map(|s| kernel_services(snapshot, s, &mut diagnostics));
        for k in now.unwrap_or_default() {
            let name = k.resource_name();
            let claimed = holder(&name)?.is_some_and(|o| !hosts.contains_key(&o));
            if claimed || !named.insert(name) {
                return None;
            }
            out.services.push(k);
        }
    }
    out.removed_services = gone.difference(&named).cloned().collect();
    let clients = super::authorization::KernelClients::new(snapshot);
    for key in &delta.workloads {
        match snapshot.workloads.get(key) {
            Some(w) => out.workloads.push(kernel_workload(snapshot, w, node, &clients, &mut diagnostics)),
            None => out.removed_workloads.push(KernelWorkload::name_of(&key.0, &key.1)),
        }
    }
    Some(out)
}
