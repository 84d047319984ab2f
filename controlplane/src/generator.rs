//! Builds each proxy's xDS snapshot from the current translator snapshot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use prost::Message;
use sluice_translator::dataplane::{AGENT_NODE_PREFIX, SERVICE_TYPE, WORKLOAD_TYPE, translate_node};
use sluice_translator::envoy::{ProxyClass, ProxyResources, ProxyTranslation};
use sluice_translator::snapshot::Snapshot;
use sluice_xds::cache::{CLUSTER, ENDPOINT, LISTENER, ROUTE, SharedTypes};
use sluice_xds::resource::{Encoded, Interner};
use sluice_xds::server::{Generator, NodeInfo};

/// The config the generator translates from.
pub struct Current {
    /// Config version.
    pub version: u64,
    /// The translator snapshot.
    pub snapshot: Snapshot,
}

/// The encoded outbound halves of one config version, by proxy class.
#[derive(Default)]
struct OutboundCache {
    version: u64,
    classes: HashMap<ProxyClass, Arc<SharedTypes>>,
}

/// Translates the outbound half once per proxy class and the inbound half per proxy, and
/// encodes once per distinct resource.
pub struct MeshGenerator {
    current: RwLock<Arc<Current>>,
    interner: Interner,
    outbound: Mutex<OutboundCache>,
}

impl MeshGenerator {
    /// A generator starting at `current`.
    pub fn new(current: Current) -> Self {
        Self { current: RwLock::new(Arc::new(current)), interner: Interner::default(), outbound: Mutex::default() }
    }

    fn encode(&self, resources: ProxyResources, into: &mut Vec<Arc<Encoded>>) -> Result<(), String> {
        let ProxyResources { listeners, routes, clusters, endpoints, .. } = resources;
        for (type_url, list) in [(LISTENER, listeners), (ROUTE, routes), (CLUSTER, clusters), (ENDPOINT, endpoints)] {
            for r in list {
                into.push(self.interner.encode(type_url, &r.name, &r.body).map_err(|e| e.to_string())?);
            }
        }
        Ok(())
    }

    /// The encoded outbound half for the class of `translation`, translated at most once per
    /// class and config version, and shared by the snapshots of every proxy of the class.
    fn outbound(&self, version: u64, translation: &mut ProxyTranslation<'_>) -> Result<Arc<SharedTypes>, String> {
        let class = translation.class();
        let mut cache = self.outbound.lock().expect("outbound cache lock");
        if cache.version < version {
            *cache = OutboundCache { version, classes: HashMap::new() };
        }
        if cache.version == version
            && let Some(hit) = cache.classes.get(&class)
        {
            return Ok(hit.clone());
        }
        let mut encoded = Vec::new();
        self.encode(translation.outbound(), &mut encoded)?;
        let encoded = Arc::new(SharedTypes::new(encoded));
        // A generation from an older config (racing a newer one) is not cached.
        if cache.version == version {
            cache.classes.insert(class, encoded.clone());
        }
        Ok(encoded)
    }

    /// Replaces the config the next snapshots are built from.
    pub fn set(&self, current: Current) {
        *self.current.write().expect("generator lock") = Arc::new(current);
    }

    /// The config version being served.
    pub fn version(&self) -> u64 {
        self.current.read().expect("generator lock").version
    }

    /// Proxy classes whose outbound half is cached for the config version being served.
    pub fn cached_classes(&self) -> usize {
        self.outbound.lock().expect("outbound cache lock").classes.len()
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
        let mut translation = ProxyTranslation::new(&current.snapshot, &node.id).map_err(|e| e.to_string())?;
        let outbound = self.outbound(current.version, &mut translation)?;
        let mut inbound = Vec::new();
        self.encode(translation.inbound(), &mut inbound)?;
        // On a name clash the snapshot keeps the outbound listener, as `translate_sidecar` does.
        Ok(sluice_xds::cache::Snapshot::layered(current.version, &outbound, inbound, previous))
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use sluice_translator::envoy::translate_sidecar;

    use super::*;

    fn node(id: &str) -> NodeInfo {
        NodeInfo { id: id.into(), cluster: String::new(), metadata: Default::default() }
    }

    /// Names and encodings per type, as a proxy would receive them.
    fn contents(s: &sluice_xds::cache::Snapshot) -> Vec<(String, String, Vec<u8>)> {
        s.types
            .iter()
            .flat_map(|(t, r)| r.items.iter().map(move |(n, e)| (t.clone(), n.clone(), e.bytes.clone())))
            .collect()
    }

    #[test]
    fn a_class_is_translated_once_and_every_proxy_gets_what_translate_sidecar_gives() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let config =
            crate::load_config(&[root.join("bookinfo"), root.join("bookinfo-variants/reviews-80-20")]).snapshot;
        let reference = crate::load_config(&[root.join("bookinfo"), root.join("bookinfo-variants/reviews-80-20")]);
        let generator = MeshGenerator::new(Current { version: 1, snapshot: config });
        let ids = [
            // productpage's own sidecar: a workload with inbound ports and a Sidecar.
            "sidecar~127.0.1.10~productpage-v1.default~default.svc.cluster.local",
            // Two proxies the config knows nothing of: one class, translated once.
            "sidecar~127.0.9.1~a.default~default.svc.cluster.local",
            "sidecar~127.0.9.2~b.default~default.svc.cluster.local",
            "sidecar~127.0.1.20~reviews-v1.default~default.svc.cluster.local",
        ];
        for id in ids {
            let got = generator.generate(&node(id), None).unwrap();
            let mut want = Vec::new();
            generator.encode(translate_sidecar(&reference.snapshot, id).unwrap(), &mut want).unwrap();
            let want = sluice_xds::cache::Snapshot::new(1, want, None);
            assert_eq!(contents(&got), contents(&want), "{id}");
        }
        assert_eq!(generator.cached_classes(), 3, "a and b share a class");
        generator.set(Current { version: 2, snapshot: reference.snapshot });
        generator.generate(&node(ids[1]), None).unwrap();
        assert_eq!(generator.cached_classes(), 1, "a new config starts a new cache");
    }
}
