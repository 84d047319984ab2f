//! Builds each proxy's xDS snapshot from the current translator snapshot.

use std::sync::{Arc, RwLock};

use sluice_translator::envoy::{ProxyResources, translate_sidecar};
use sluice_translator::snapshot::Snapshot;
use sluice_xds::cache::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
use sluice_xds::resource::Interner;
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
