//! Which mTLS mode a workload's inbound ports are in: the one PeerAuthentication resolution that
//! inbound listeners, auto-mTLS endpoint metadata and the kernel path all read.
//!
//! As istiod: the mesh policy (root namespace, no selector), then the namespace's (no
//! selector), then the workload's (a selector that matches), each replacing the mode before it
//! unless it is UNSET; port-level modes come from the workload's policy only and are keyed by
//! the workload's (target) port. Where istiod takes the oldest of several candidates, sluice
//! takes the first by name (it keeps no creation times). Nothing set means PERMISSIVE.

use std::collections::BTreeMap;

use super::{ROOT_NAMESPACE, Snapshot};
use crate::diagnostic::ObjectRef;
use crate::model::IstioObject;
use crate::model::authorization_policy::{MtlsMode, PeerAuthenticationSpec};
use crate::model::common::labels_match;

/// A resolved mode and the PeerAuthentication that set it (None: the default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeFrom {
    /// DISABLE, PERMISSIVE or STRICT (never UNSET).
    pub mode: MtlsMode,
    /// The policy that decided it.
    pub policy: Option<ObjectRef>,
}

/// The mTLS modes in force for one workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadMtls {
    /// The workload-wide mode (also what ports without a port-level mode get).
    pub workload: ModeFrom,
    /// Port-level modes by workload port.
    pub ports: BTreeMap<u32, ModeFrom>,
}

impl WorkloadMtls {
    /// The mode of inbound `port`.
    pub fn port(&self, port: u32) -> &ModeFrom {
        self.ports.get(&port).unwrap_or(&self.workload)
    }
}

fn set(current: &mut ModeFrom, policy: &IstioObject<PeerAuthenticationSpec>, mode: Option<MtlsMode>) {
    if let Some(mode) = mode.filter(|m| *m != MtlsMode::Unset) {
        *current = ModeFrom {
            mode,
            policy: Some(ObjectRef::new("PeerAuthentication", &policy.meta.namespace, &policy.meta.name)),
        };
    }
}

impl Snapshot {
    /// The mTLS modes for a workload in `namespace` with `labels` (None: a workload the
    /// snapshot does not know, which only selector-less policies reach).
    pub fn workload_mtls(&self, namespace: &str, labels: Option<&BTreeMap<String, String>>) -> WorkloadMtls {
        let mut workload = ModeFrom { mode: MtlsMode::Permissive, policy: None };
        let selects = |p: &IstioObject<PeerAuthenticationSpec>| match &p.spec.selector {
            Some(s) if !s.match_labels.is_empty() => Some(labels.is_some_and(|l| labels_match(&s.match_labels, l))),
            _ => None,
        };
        let in_namespace = |ns: &str| {
            let ns = ns.to_string();
            self.peer_authentications.values().filter(move |p| p.meta.namespace == ns)
        };
        let mode_of = |p: &IstioObject<PeerAuthenticationSpec>| p.spec.mtls.as_ref().and_then(|m| m.mode);
        if let Some(mesh) = in_namespace(ROOT_NAMESPACE).find(|p| selects(p).is_none()) {
            set(&mut workload, mesh, mode_of(mesh));
        }
        if namespace != ROOT_NAMESPACE
            && let Some(ns) = in_namespace(namespace).find(|p| selects(p).is_none())
        {
            set(&mut workload, ns, mode_of(ns));
        }
        let mut ports = BTreeMap::new();
        if let Some(own) = in_namespace(namespace).find(|p| selects(p) == Some(true)) {
            set(&mut workload, own, mode_of(own));
            for (port, m) in own.spec.port_level_mtls.iter().flatten() {
                let mut mode = workload.clone();
                set(&mut mode, own, m.mode);
                ports.insert(*port, mode);
            }
        }
        WorkloadMtls { workload, ports }
    }
}
