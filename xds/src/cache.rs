//! Per-proxy snapshots: the resources of each type with a version per type.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use crate::resource::Encoded;

/// Listener type URL.
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Route configuration type URL.
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Cluster type URL.
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Cluster load assignment type URL.
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// The order in which changed types are pushed: clusters before their endpoints, listeners
/// before their routes (Envoy's warming order).
pub const PUSH_ORDER: [&str; 4] = [CLUSTER, ENDPOINT, LISTENER, ROUTE];

/// True for types a client subscribes to as a whole (an empty SotW request means "all").
pub fn is_wildcard_type(type_url: &str) -> bool {
    type_url == LISTENER || type_url == CLUSTER
}

/// The resources of one type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypeResources {
    /// Version of this type's content (changes only when the content does).
    pub version: String,
    /// Resources by name.
    pub items: BTreeMap<String, Arc<Encoded>>,
}

impl TypeResources {
    fn content_hash(&self) -> u64 {
        let mut h = DefaultHasher::new();
        for (name, r) in &self.items {
            name.hash(&mut h);
            r.version.hash(&mut h);
        }
        h.finish()
    }
}

/// Everything one proxy (or group of proxies) receives.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The config version this snapshot was built from (monotonic, set by the caller).
    pub version: u64,
    /// Resources by type URL.
    pub types: BTreeMap<String, TypeResources>,
}

impl Snapshot {
    /// Builds a snapshot at `version` from encoded resources. A type whose content equals its
    /// content in `previous` keeps the previous version string, so unchanged types are not pushed.
    pub fn new(version: u64, resources: impl IntoIterator<Item = Arc<Encoded>>, previous: Option<&Snapshot>) -> Self {
        let mut types: BTreeMap<String, TypeResources> = BTreeMap::new();
        for r in resources {
            types.entry(r.type_url.clone()).or_default().items.insert(r.name.clone(), r);
        }
        for type_url in PUSH_ORDER {
            types.entry(type_url.to_string()).or_default();
        }
        for (type_url, t) in &mut types {
            let prior = previous.and_then(|p| p.types.get(type_url));
            t.version = match prior {
                Some(p) if p.content_hash() == t.content_hash() => p.version.clone(),
                _ => version.to_string(),
            };
        }
        Self { version, types }
    }

    /// The resources of a type (empty if none).
    pub fn of(&self, type_url: &str) -> Option<&TypeResources> {
        self.types.get(type_url)
    }
}
