//! Builds each proxy's xDS snapshot from the current translator snapshot.

use std::sync::{Arc, RwLock};

use prost::Message;
use sluice_translator::dataplane::{AGENT_NODE_PREFIX, SERVICE_TYPE, WORKLOAD_TYPE, translate_node};
use sluice_translator::envoy::{ProxyResources, translate_sidecar};
use sluice_translator::snapshot::Snapshot;
use sluice_xds::cache::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
use sluice_xds::resource::{Encoded, Interner};
use sluice_xds::server::{Generator, NodeInfo};

/// The config the generator translates from.
pub struct Current {
    /// Config version.
    pub version: u64,
    /// The translator snapshot.
    pub snapshot: Snapshot,
}

/// Translates per proxy and encodes once per distinct resource.
pub struct MeshGenerator {
    current: RwLock<Arc<Current>>,
    interner: Interner,
}

impl MeshGenerator {
    /// A generator starting at `current`.
    pub fn new(current: Current) -> Self {
        Self { current: RwLock::new(Arc::new(current)), interner: Interner::default() }
    }

    /// Replaces the config the next snapshots are built from.
    pub fn set(&self, current: Current) {
        *self.current.write().expect("generator lock") = Arc::new(current);
    }

    /// The config version being served.
    pub fn version(&self) -> u64 {
        self.current.read().expect("generator lock").version
    }
}

impl Generator for MeshGenerator {
    fn generate(
        &self,
        node: &NodeInfo,
        previous: Option<&sluice_xds::cache::Snapshot>,
    ) -> Result<sluice_xds::cache::Snapshot, String> {
        let current = self.current.read().expect("generator lock").clone();
        if let Some(node_name) = node.id.strip_prefix(AGENT_NODE_PREFIX) {
            return Ok(agent_snapshot(&current, node_name, previous));
        }
        let ProxyResources { listeners, routes, clusters, endpoints, .. } =
            translate_sidecar(&current.snapshot, &node.id).map_err(|e| e.to_string())?;
        let mut encoded = Vec::new();
        for (type_url, list) in [(LISTENER, listeners), (ROUTE, routes), (CLUSTER, clusters), (ENDPOINT, endpoints)] {
            for r in list {
                encoded.push(self.interner.encode(type_url, &r.name, &r.body).map_err(|e| e.to_string())?);
            }
        }
        Ok(sluice_xds::cache::Snapshot::new(current.version, encoded, previous))
    }
}

/// A node agent's snapshot: one resource per kernel service and per workload, so a Delta
/// stream carries a single entry for a single endpoint change.
fn agent_snapshot(
    current: &Current,
    node_name: &str,
    previous: Option<&sluice_xds::cache::Snapshot>,
) -> sluice_xds::cache::Snapshot {
    let (dataplane, _) = translate_node(&current.snapshot, node_name);
    let services =
        dataplane.services.iter().map(|s| Arc::new(Encoded::new(SERVICE_TYPE, &s.resource_name(), s.encode_to_vec())));
    let workloads = dataplane
        .workloads
        .iter()
        .map(|w| Arc::new(Encoded::new(WORKLOAD_TYPE, &w.resource_name(), w.encode_to_vec())));
    sluice_xds::cache::Snapshot::new(current.version, services.chain(workloads).collect::<Vec<_>>(), previous)
}
