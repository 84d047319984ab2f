//! Builds each proxy's xDS snapshot from the current translator snapshot.
//!
//! # One change, through the whole chain
//! Say an operator edits a VirtualService's weights in the config directory.
//! 1. **Sources.** `file_source` (or `kube_source`) reads the file again and hands the store one
//!    [`Change`](sluice_translator::snapshot::Change) per object that differs.
//! 2. **Snapshot delta.** `store` validates it and `admission` checks that every proxy's config
//!    can still be made from it (else the object is refused and its last good version kept);
//!    [`Snapshot::apply`](sluice_translator::snapshot::Snapshot::apply) yields a
//!    [`SnapshotDelta`]: here `routing` holds the VirtualService's hosts, nothing forces a
//!    rebuild.
//! 3. **Classes and agents.** `serve` gives the new version and the delta to
//!    [`MeshGenerator::set`]; the cached outbound half of every proxy class becomes stale, to be
//!    patched on demand: only the listeners and virtual hosts routed for those hosts are
//!    translated again ([`ProxyTranslation::outbound_listeners_routed`], [`RouteTable::affected`]).
//!    A node agent's snapshot is patched by the translator's
//!    `dataplane::patch`, which knows which kernel entries the
//!    change reaches (or says a full translation is needed).
//! 4. **xDS sets.** `XdsServer::refresh` asks this generator for each stream's snapshot; what is
//!    unchanged is the very same encoding (the [`Interner`]), so a type whose set is unchanged
//!    keeps its version and is not pushed.
//! 5. **Delta streams.** Each stream's core (sluice-xds `stream`) sees the new snapshot; a Delta
//!    stream sends the difference between the set the client holds and the new one: for a
//!    sidecar, the route configuration of the port; for an agent, the one `KernelService`
//!    entry of the host.
//! 6. **Agent maps.** The agent applies the entry (`sync::MapSync::apply_changes`): the new
//!    weights become backend slots; new backends and slots are written before the service entry
//!    publishes the new count, and what it no longer references is deleted after a grace
//!    period, so a connect never finds a slot pointing at a missing backend.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use prost::Message;
use sluice_translator::dataplane::patch::{Holder, patch};
use sluice_translator::dataplane::{
    AGENT_NODE_PREFIX, KernelService, KernelWorkload, SERVICE_TYPE, WORKLOAD_TYPE, translate_node,
};
use sluice_translator::envoy::{
    Certificates, ProxyClass, ProxyResources, ProxyTranslation, Resource, RouteTable, VIRTUAL_HOST_TYPE,
    VIRTUAL_HOSTS_FIELD, XdsClient, route_shell,
};
use sluice_translator::snapshot::{Snapshot, SnapshotDelta};
use sluice_xds::cache::{CLUSTER, ENDPOINT, LISTENER, ROUTE, SharedTypes};
use sluice_xds::resource::{Encoded, Interner};
use sluice_xds::server::{GenerateError, Generator, NodeInfo};

/// The config the generator translates from.
pub struct Current {
    /// Config version.
    pub version: u64,
    /// The translator snapshot.
    pub snapshot: Snapshot,
}

/// Config versions whose deltas are kept for patching agent snapshots: an agent further behind
/// gets a full snapshot.
const DELTA_LOG: usize = 64;

/// Hosts whose endpoints a stale class may lack before it is cheaper to translate it again.
const STALE_HOSTS: usize = 4096;

/// One outbound route configuration of a class in parts: a VirtualService change re-encodes
/// only the virtual hosts it touches and copies the rest into the new route configuration.
struct RouteParts {
    table: Arc<RouteTable>,
    /// The encoded virtual host of each of `table.hosts`, then the catch-all host.
    hosts: Vec<Arc<Encoded>>,
}

/// A class's encoded outbound half, and the parts its route configurations are made of.
#[derive(Clone)]
struct ClassOutbound {
    types: Arc<SharedTypes>,
    routes: Arc<Vec<RouteParts>>,
}

/// The encoded outbound halves of one config version, by proxy class.
#[derive(Default)]
struct OutboundCache {
    version: u64,
    classes: HashMap<ProxyClass, ClassOutbound>,
    /// Classes of an earlier version whose load assignments of `stale_hosts` may be out of date
    /// and whose listeners and routes may be for older VirtualServices of `stale_routing` (every
    /// change since changed only endpoints and VirtualServices): patched, not translated, when
    /// next asked for.
    stale: HashMap<ProxyClass, ClassOutbound>,
    stale_hosts: BTreeSet<String>,
    stale_routing: BTreeSet<String>,
    /// What proxyless gRPC clients of each class share, for this version.
    proxyless: HashMap<ProxyClass, Arc<SharedTypes>>,
    /// The same of an earlier version, to be patched like `stale` (same hosts).
    proxyless_stale: HashMap<ProxyClass, Arc<SharedTypes>>,
}

impl OutboundCache {
    /// Moves the cache to `version`, which `delta` leads to.
    fn advance(&mut self, version: u64, delta: &SnapshotDelta) {
        if delta.patchable() && self.stale_hosts.len() + delta.services.len() <= STALE_HOSTS {
            if self.stale.is_empty() && self.proxyless_stale.is_empty() {
                self.stale_hosts.clear();
                self.stale_routing.clear();
            }
            let fresh = std::mem::take(&mut self.classes);
            self.stale.extend(fresh);
            let fresh = std::mem::take(&mut self.proxyless);
            self.proxyless_stale.extend(fresh);
            self.stale_hosts.extend(delta.services.keys().cloned());
            self.stale_routing.extend(delta.routing.iter().cloned());
        } else {
            *self = OutboundCache::default();
        }
        self.version = version;
    }
}

/// Translates the outbound half once per proxy class and the inbound half per proxy, and
/// encodes once per distinct resource; after an endpoint-only change, patches what it built
/// before instead.
pub struct MeshGenerator {
    current: RwLock<Arc<Current>>,
    interner: Arc<Interner>,
    outbound: Mutex<OutboundCache>,
    /// The deltas that led to recent versions, by version.
    deltas: Mutex<VecDeque<(u64, SnapshotDelta)>>,
}

impl MeshGenerator {
    /// A generator starting at `current`.
    pub fn new(current: Current) -> Self {
        Self::with_interner(current, Arc::default())
    }

    /// A generator starting at `current` that shares encodings with others through `interner`.
    pub fn with_interner(current: Current, interner: Arc<Interner>) -> Self {
        let outbound = OutboundCache { version: current.version, ..Default::default() };
        Self {
            current: RwLock::new(Arc::new(current)),
            interner,
            outbound: Mutex::new(outbound),
            deltas: Mutex::default(),
        }
    }

    fn encode(&self, resources: ProxyResources, into: &mut Vec<Arc<Encoded>>) -> Result<(), String> {
        let ProxyResources { listeners, routes, clusters, endpoints, .. } = resources;
        for (type_url, list) in [(LISTENER, listeners), (ROUTE, routes), (CLUSTER, clusters), (ENDPOINT, endpoints)] {
            into.extend(self.intern(type_url, list)?);
        }
        Ok(())
    }

    fn intern(&self, type_url: &str, resources: Vec<Resource>) -> Result<Vec<Arc<Encoded>>, String> {
        let encoded = resources.iter().map(|r| self.interner.encode(type_url, &r.name, &r.body));
        encoded.collect::<Result<_, _>>().map_err(|e| e.to_string())
    }

    /// The route configuration `parts` make.
    fn assemble(&self, parts: &RouteParts) -> Result<Arc<Encoded>, String> {
        let shell = route_shell(&parts.table);
        let assembled =
            self.interner.encode_with_parts(ROUTE, &parts.table.name, &shell, VIRTUAL_HOSTS_FIELD, &parts.hosts);
        assembled.map_err(|e| e.to_string())
    }

    /// Every route configuration of `translation`'s class, in parts.
    fn route_parts(&self, translation: &mut ProxyTranslation<'_>) -> Result<Vec<RouteParts>, String> {
        let catch_all = self.intern(VIRTUAL_HOST_TYPE, vec![translation.catch_all_host()])?;
        let mut all = Vec::new();
        for table in translation.route_tables() {
            let hosts = (0..table.hosts.len()).map(|i| translation.virtual_host(&table, i)).collect();
            let mut hosts = self.intern(VIRTUAL_HOST_TYPE, hosts)?;
            hosts.extend(catch_all.iter().cloned());
            all.push(RouteParts { table: Arc::new(table), hosts });
        }
        Ok(all)
    }

    /// `stale` with its route configurations for the VirtualServices of `routing` as they are
    /// now: the virtual hosts they cover are translated again. Returns the new parts and the
    /// route configurations that changed.
    fn reroute(
        &self,
        translation: &mut ProxyTranslation<'_>,
        stale: &[RouteParts],
        routing: &BTreeSet<String>,
    ) -> Result<(Vec<RouteParts>, Vec<Arc<Encoded>>), String> {
        let (mut parts, mut changed) = (Vec::new(), Vec::new());
        for old in stale {
            let mut hosts = old.hosts.clone();
            let mut touched = false;
            for i in old.table.affected(routing) {
                let host = translation.virtual_host(&old.table, i);
                let host =
                    self.interner.encode(VIRTUAL_HOST_TYPE, &host.name, &host.body).map_err(|e| e.to_string())?;
                // The interner hands back the held encoding when the content did not change.
                touched |= !Arc::ptr_eq(&host, &hosts[i]);
                hosts[i] = host;
            }
            let part = RouteParts { table: old.table.clone(), hosts };
            if touched {
                changed.push(self.assemble(&part)?);
            }
            parts.push(part);
        }
        Ok((parts, changed))
    }

    /// The encoded outbound half for the class of `translation`, translated at most once per
    /// class and config version, and shared by the snapshots of every proxy of the class.
    fn outbound(&self, version: u64, translation: &mut ProxyTranslation<'_>) -> Result<Arc<SharedTypes>, String> {
        let class = translation.class();
        let mut cache = self.outbound.lock().expect("outbound cache lock");
        if cache.version == version {
            if let Some(hit) = cache.classes.get(&class) {
                return Ok(hit.types.clone());
            }
            if let Some(stale) = cache.stale.remove(&class) {
                let endpoints = self.intern(ENDPOINT, translation.endpoints_of(&cache.stale_hosts))?;
                let mut types = stale.types.with(ENDPOINT, endpoints);
                let mut routes = stale.routes;
                if !cache.stale_routing.is_empty() {
                    let listeners =
                        self.intern(LISTENER, translation.outbound_listeners_routed(&cache.stale_routing))?;
                    if !listeners.is_empty() {
                        types = types.with(LISTENER, listeners);
                    }
                    let (parts, changed) = self.reroute(translation, &routes, &cache.stale_routing)?;
                    if !changed.is_empty() {
                        types = types.with(ROUTE, changed);
                    }
                    routes = Arc::new(parts);
                }
                let patched = ClassOutbound { types: Arc::new(types), routes };
                cache.classes.insert(class, patched.clone());
                return Ok(patched.types);
            }
        }
        let routes = self.route_parts(translation)?;
        let mut encoded = self.intern(CLUSTER, translation.clusters())?;
        encoded.extend(self.intern(ENDPOINT, translation.endpoints())?);
        encoded.extend(self.intern(LISTENER, translation.outbound_listeners())?);
        for parts in &routes {
            encoded.push(self.assemble(parts)?);
        }
        let built = ClassOutbound { types: Arc::new(SharedTypes::new(encoded)), routes: Arc::new(routes) };
        // A generation for another config (racing a change) is not cached.
        if cache.version == version {
            cache.classes.insert(class, built.clone());
        }
        Ok(built.types)
    }

    /// Replaces the config the next snapshots are built from; `delta` is what changed since
    /// the config served before.
    pub fn set(&self, current: Current, delta: SnapshotDelta) {
        self.outbound.lock().expect("outbound cache lock").advance(current.version, &delta);
        {
            let mut deltas = self.deltas.lock().expect("delta log lock");
            deltas.push_back((current.version, delta));
            while deltas.len() > DELTA_LOG {
                deltas.pop_front();
            }
        }
        *self.current.write().expect("generator lock") = Arc::new(current);
    }

    /// Takes the outbound halves `other` built for the config version now served (the store's
    /// check translated them already): each class is then translated once per change, not twice.
    pub fn adopt(&self, other: &MeshGenerator) {
        let theirs = other.outbound.lock().expect("outbound cache lock");
        let mut ours = self.outbound.lock().expect("outbound cache lock");
        if theirs.version != ours.version {
            return;
        }
        for (class, built) in &theirs.classes {
            ours.classes.entry(class.clone()).or_insert_with(|| built.clone());
        }
    }

    /// What changed from config version `from` to `to`, if the log reaches back that far.
    fn delta_between(&self, from: u64, to: u64) -> Option<SnapshotDelta> {
        let deltas = self.deltas.lock().expect("delta log lock");
        let mut merged = SnapshotDelta::default();
        let mut next = from + 1;
        for (version, delta) in deltas.iter().filter(|(v, _)| *v > from && *v <= to) {
            if *version != next {
                return None;
            }
            merged.then(delta);
            next += 1;
        }
        (next == to + 1).then_some(merged)
    }

    /// The encodings this generator shares.
    pub fn interner(&self) -> Arc<Interner> {
        self.interner.clone()
    }

    /// Generates (and encodes) the sidecar `node_id`'s outbound half, cached per class as for
    /// a push, and with `inbound` its inbound half too (else none): both halves.
    fn sidecar(
        &self,
        current: &Current,
        node_id: &str,
        certificates: Certificates,
        inbound: bool,
    ) -> Result<(Arc<SharedTypes>, Vec<Arc<Encoded>>), GenerateError> {
        let node = || node_id.to_string();
        let mut translation = ProxyTranslation::new(&current.snapshot, node_id)
            .map_err(|e| GenerateError::UnservableNode { node: node(), reason: e.to_string() })?
            .with_certificates(certificates);
        let build = |reason| GenerateError::Build { node: node(), reason };
        let outbound = self.outbound(current.version, &mut translation).map_err(build)?;
        let mut encoded = Vec::new();
        if inbound {
            self.encode(translation.inbound(), &mut encoded).map_err(build)?;
        }
        Ok((outbound, encoded))
    }

    /// What every proxyless client of `translation`'s class shares, translated at most once per
    /// class and config version, and patched as sidecar classes are (see
    /// [`MeshGenerator::outbound`]): the endpoints of the hosts whose endpoints changed, the
    /// routes of those whose VirtualServices did.
    fn proxyless_shared(
        &self,
        version: u64,
        translation: &mut ProxyTranslation<'_>,
    ) -> Result<Arc<SharedTypes>, String> {
        let class = translation.class();
        let mut cache = self.outbound.lock().expect("outbound cache lock");
        if cache.version == version {
            if let Some(hit) = cache.proxyless.get(&class) {
                return Ok(hit.clone());
            }
            if let Some(stale) = cache.proxyless_stale.remove(&class) {
                let endpoints = self.intern(ENDPOINT, translation.proxyless_endpoints_of(&cache.stale_hosts))?;
                let mut types = stale.with(ENDPOINT, endpoints);
                if !cache.stale_routing.is_empty() {
                    types =
                        types.with(ROUTE, self.intern(ROUTE, translation.proxyless_routes_of(&cache.stale_routing))?);
                }
                let patched = Arc::new(types);
                cache.proxyless.insert(class, patched.clone());
                return Ok(patched);
            }
        }
        let mut encoded = Vec::new();
        self.encode(translation.proxyless_outbound(), &mut encoded)?;
        let built = Arc::new(SharedTypes::new(encoded));
        // A generation for another config (racing a change) is not cached.
        if cache.version == version {
            cache.proxyless.insert(class, built.clone());
        }
        Ok(built)
    }

    /// The proxyless gRPC client `node_id`'s snapshot parts: what its class shares (translated
    /// once per class and version) and its own server listeners.
    fn proxyless(
        &self,
        current: &Current,
        node_id: &str,
    ) -> Result<(Arc<SharedTypes>, Vec<Arc<Encoded>>), GenerateError> {
        let node = || node_id.to_string();
        let mut translation = ProxyTranslation::new(&current.snapshot, node_id)
            .map_err(|e| GenerateError::UnservableNode { node: node(), reason: e.to_string() })?;
        let build = |reason| GenerateError::Build { node: node(), reason };
        let shared = self.proxyless_shared(current.version, &mut translation).map_err(build)?;
        let own = self.intern(LISTENER, translation.proxyless_inbound()).map_err(build)?;
        Ok((shared, own))
    }

    /// Generates `node_id`'s config as a push would, for checking only: the first error.
    pub fn check(&self, node_id: &str, inbound: bool) -> Result<(), GenerateError> {
        let current = self.current.read().expect("generator lock").clone();
        // Checked as a proxy with certificates: that config holds the TLS sockets; what a proxy
        // without them gets instead (refused clusters and chains) has a fixed shape.
        self.sidecar(&current, node_id, Certificates::Sds, inbound).map(|_| ())
    }

    /// The config being served.
    pub fn current(&self) -> Arc<Current> {
        self.current.read().expect("generator lock").clone()
    }

    /// The config version being served.
    pub fn version(&self) -> u64 {
        self.current.read().expect("generator lock").version
    }

    /// Proxy classes whose outbound half is cached for the config version being served.
    pub fn cached_classes(&self) -> usize {
        self.outbound.lock().expect("outbound cache lock").classes.len()
    }

    /// Proxy classes cached for an earlier version, waiting to be patched.
    #[cfg(test)]
    fn stale_classes(&self) -> usize {
        self.outbound.lock().expect("outbound cache lock").stale.len()
    }

    /// Proxyless classes cached for an earlier version, waiting to be patched.
    #[cfg(test)]
    fn stale_proxyless_classes(&self) -> usize {
        self.outbound.lock().expect("outbound cache lock").proxyless_stale.len()
    }
}

impl Generator for MeshGenerator {
    fn generate(
        &self,
        node: &NodeInfo,
        previous: Option<&sluice_xds::cache::Snapshot>,
    ) -> Result<sluice_xds::cache::Snapshot, GenerateError> {
        let current = self.current.read().expect("generator lock").clone();
        if let Some(node_name) = node.id.strip_prefix(AGENT_NODE_PREFIX) {
            let patched = previous.and_then(|p| {
                let delta = self.delta_between(p.version, current.version)?;
                patch_agent_snapshot(&current, node_name, p, &delta)
            });
            return Ok(patched.unwrap_or_else(|| agent_snapshot(&current, node_name, previous)));
        }
        let (outbound, inbound) = match XdsClient::from_metadata(&node.metadata) {
            XdsClient::ProxylessGrpc => self.proxyless(&current, &node.id)?,
            XdsClient::Envoy => {
                let certificates = Certificates::from_metadata(&node.metadata);
                self.sidecar(&current, &node.id, certificates, true)?
            }
        };
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
    let services = dataplane.services.iter().map(encode_service);
    let workloads = dataplane.workloads.iter().map(encode_workload);
    sluice_xds::cache::Snapshot::new(current.version, services.chain(workloads).collect::<Vec<_>>(), previous)
}

fn encode_service(s: &KernelService) -> Arc<Encoded> {
    Arc::new(Encoded::new(SERVICE_TYPE, &s.resource_name(), s.encode_to_vec()))
}

fn encode_workload(w: &KernelWorkload) -> Arc<Encoded> {
    Arc::new(Encoded::new(WORKLOAD_TYPE, &w.resource_name(), w.encode_to_vec()))
}

/// `previous` (an agent's snapshot) brought up to `current` through `delta`, as the
/// translator's [`patch`] says; None when it asks for a full translation.
fn patch_agent_snapshot(
    current: &Current,
    node_name: &str,
    previous: &sluice_xds::cache::Snapshot,
    delta: &SnapshotDelta,
) -> Option<sluice_xds::cache::Snapshot> {
    let held = previous.of(SERVICE_TYPE).map(|t| &t.items);
    let holder = |name: &str| match held.and_then(|h| h.get(name)) {
        None => Holder::Nobody,
        Some(e) => {
            KernelService::decode(e.bytes.clone()).map_or(Holder::Unknown, |k| Holder::Service(k.host().to_string()))
        }
    };
    let patch = patch(&current.snapshot, node_name, delta, holder)?;
    let put = patch.services.iter().map(encode_service).chain(patch.workloads.iter().map(encode_workload));
    let removed = patch.removed_services.into_iter().map(|n| (SERVICE_TYPE.to_string(), n));
    let removed = removed.chain(patch.removed_workloads.into_iter().map(|n| (WORKLOAD_TYPE.to_string(), n)));
    Some(previous.patched(current.version, put, removed))
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
    fn contents(s: &sluice_xds::cache::Snapshot) -> Vec<(String, String, bytes::Bytes)> {
        s.types
            .iter()
            .flat_map(|(t, r)| r.items.iter().map(move |(n, e)| (t.clone(), n.to_string(), e.bytes.clone())))
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
            generator
                .encode(translate_sidecar(&reference.snapshot, id, Default::default()).unwrap(), &mut want)
                .unwrap();
            let want = sluice_xds::cache::Snapshot::new(1, want, None);
            assert_eq!(contents(&got), contents(&want), "{id}");
        }
        assert_eq!(generator.cached_classes(), 3, "a and b share a class");
        generator.set(
            Current { version: 2, snapshot: reference.snapshot },
            SnapshotDelta { rebuild: true, ..Default::default() },
        );
        generator.generate(&node(ids[1]), None).unwrap();
        assert_eq!(generator.cached_classes(), 1, "a new config starts a new cache");
    }

    /// Bookinfo with reviews split 80/20 between v1 and v2.
    fn bookinfo_80_20() -> Snapshot {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
        crate::load_config(&[root.join("bookinfo"), root.join("bookinfo-variants/reviews-80-20")]).snapshot
    }

    /// ratings moves to another address: its EndpointSlice and its Pod change.
    const RATINGS_MOVED: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ratings-abc12, namespace: default, labels: {kubernetes.io/service-name: ratings}}
addressType: IPv4
ports: [{name: http, port: 9080, protocol: TCP}]
endpoints:
- {addresses: ["127.0.1.31"], conditions: {ready: true}, targetRef: {kind: Pod, name: ratings-v1, namespace: default}}
---
apiVersion: v1
kind: Pod
metadata: {name: ratings-v1, namespace: default, labels: {app: ratings, version: v1}}
spec:
  serviceAccountName: bookinfo-ratings
  containers: [{name: ratings, image: docker.io/istio/examples-bookinfo-ratings-v1:1.20.2, ports: [{containerPort: 9080}]}]
status: {podIP: 127.0.1.31}
"#;

    #[test]
    fn an_endpoint_only_change_patches_what_was_built_and_equals_a_full_generation() {
        let mut snapshot = bookinfo_80_20();
        let generator = MeshGenerator::new(Current { version: 1, snapshot: snapshot.clone() });
        let ids = [
            "agent~node-1",
            "sidecar~127.0.1.10~productpage-v1.default~default.svc.cluster.local",
            "sidecar~127.0.9.1~a.default~default.svc.cluster.local",
        ];
        let before: Vec<_> = ids.iter().map(|id| generator.generate(&node(id), None).unwrap()).collect();
        let (moved, _) = sluice_translator::parse::parse_documents("moved.yaml", RATINGS_MOVED);
        let delta = snapshot.apply(moved.into_iter().map(|l| sluice_translator::snapshot::Change::Upsert(Arc::new(l))));
        assert!(delta.endpoints_only(), "{delta:?}");
        assert_eq!(delta.services.keys().collect::<Vec<_>>(), ["ratings.default.svc.cluster.local"]);
        generator.set(Current { version: 2, snapshot: snapshot.clone() }, delta);
        assert_eq!(generator.stale_classes(), 2, "both sidecar classes wait to be patched");
        let patched: Vec<_> =
            ids.iter().zip(&before).map(|(id, b)| generator.generate(&node(id), Some(b)).unwrap()).collect();
        assert_eq!((generator.stale_classes(), generator.cached_classes()), (0, 2), "patched, not translated");
        for ((id, b), p) in ids.iter().zip(&before).zip(&patched) {
            for (type_url, t) in &p.types {
                let changes: &[&str] =
                    if id.starts_with("agent") { &[SERVICE_TYPE, WORKLOAD_TYPE] } else { &[ENDPOINT] };
                let changed = changes.contains(&type_url.as_str());
                assert_eq!(t.version != b.types[type_url].version, changed, "{id} {type_url}");
            }
        }
        // The same config translated in full (the same interner, so equal resources are the
        // same encodings).
        generator.set(Current { version: 3, snapshot }, SnapshotDelta { rebuild: true, ..Default::default() });
        for (id, p) in ids.iter().zip(&patched) {
            let full = generator.generate(&node(id), None).unwrap();
            assert_eq!(contents(p), contents(&full), "{id}");
        }
        // The agent's snapshot was patched: an untouched entry is the very same encoding.
        let (old, new) = (&before[0].types[WORKLOAD_TYPE].items, &patched[0].types[WORKLOAD_TYPE].items);
        let untouched = "default/productpage-v1";
        assert!(Arc::ptr_eq(old.get(untouched).unwrap(), new.get(untouched).unwrap()));
        assert_ne!(old.get("default/ratings-v1"), new.get("default/ratings-v1"));
    }

    #[test]
    fn a_routing_change_patches_the_agent_entries_and_the_sidecar_routes() {
        let mut snapshot = bookinfo_80_20();
        let generator = MeshGenerator::new(Current { version: 1, snapshot: snapshot.clone() });
        let agent = node("agent~node-1");
        let before = generator.generate(&agent, None).unwrap();
        let sidecar = node("sidecar~127.0.9.1~a.default~default.svc.cluster.local");
        let sidecar_before = generator.generate(&sidecar, None).unwrap();
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let (changed, _) = crate::file_source::load(&[root.join("bookinfo-variants/reviews-50-50")]);
        let changes = changed.into_iter().map(|l| sluice_translator::snapshot::Change::Upsert(Arc::new(l)));
        let delta = snapshot.apply(changes);
        assert_eq!(delta.routing.iter().collect::<Vec<_>>(), ["reviews.default.svc.cluster.local"], "{delta:?}");
        assert!(!delta.rebuild && delta.services.is_empty());
        generator.set(Current { version: 2, snapshot: snapshot.clone() }, delta);
        assert_eq!(generator.stale_classes(), 1, "the sidecar class waits for new routes");
        let patched = generator.generate(&agent, Some(&before)).unwrap();
        let sidecar_patched = generator.generate(&sidecar, Some(&sidecar_before)).unwrap();
        assert_eq!(generator.stale_classes(), 0);
        for (type_url, t) in &sidecar_patched.types {
            let changed = t.version != sidecar_before.types[type_url].version;
            assert_eq!(changed, type_url == ROUTE, "{type_url}: only the routes changed");
        }
        let untouched = "default/productpage-v1";
        let workloads = |s: &sluice_xds::cache::Snapshot| s.types[WORKLOAD_TYPE].items.get(untouched).unwrap().clone();
        assert!(Arc::ptr_eq(&workloads(&before), &workloads(&patched)), "patched, not rebuilt");
        generator.set(Current { version: 3, snapshot }, SnapshotDelta { rebuild: true, ..Default::default() });
        let full = generator.generate(&agent, None).unwrap();
        assert_eq!(contents(&patched), contents(&full));
        assert_ne!(contents(&before), contents(&full), "the weights changed");
        assert_eq!(contents(&sidecar_patched), contents(&generator.generate(&sidecar, None).unwrap()));
    }

    #[test]
    fn proxyless_classes_are_patched_like_sidecar_classes_and_equal_a_full_generation() {
        let mut snapshot = bookinfo_80_20();
        let generator = MeshGenerator::new(Current { version: 1, snapshot: snapshot.clone() });
        let mut grpc = node("sidecar~127.0.9.1~a.default~default.svc.cluster.local");
        grpc.metadata.insert("GENERATOR".into(), "grpc".into());
        let mut previous = generator.generate(&grpc, None).unwrap();
        assert!(previous.types[LISTENER].items.get("reviews:9080").is_some(), "the proxyless listeners");
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let (routing, _) = crate::file_source::load(&[root.join("bookinfo-variants/reviews-50-50")]);
        let steps: [(Vec<sluice_translator::snapshot::Change>, &str); 2] = [
            (
                sluice_translator::parse::parse_documents("moved.yaml", RATINGS_MOVED)
                    .0
                    .into_iter()
                    .map(|l| sluice_translator::snapshot::Change::Upsert(Arc::new(l)))
                    .collect(),
                ENDPOINT,
            ),
            (routing.into_iter().map(|l| sluice_translator::snapshot::Change::Upsert(Arc::new(l))).collect(), ROUTE),
        ];
        for (version, (changes, changed)) in (2..).step_by(2).zip(steps) {
            let delta = snapshot.apply(changes);
            assert!(delta.patchable(), "{delta:?}");
            generator.set(Current { version, snapshot: snapshot.clone() }, delta);
            assert_eq!(generator.stale_proxyless_classes(), 1, "the class waits to be patched");
            let patched = generator.generate(&grpc, Some(&previous)).unwrap();
            assert_eq!(generator.stale_proxyless_classes(), 0, "patched");
            assert_eq!(changed_types(&previous, &patched), [changed], "step {version}");
            let rebuild = SnapshotDelta { rebuild: true, ..Default::default() };
            generator.set(Current { version: version + 1, snapshot: snapshot.clone() }, rebuild);
            let full = generator.generate(&grpc, None).unwrap();
            assert_eq!(contents(&patched), contents(&full), "step {version}");
            previous = full;
        }
    }

    /// Two TCP services and a VirtualService splitting one's connections between them.
    const TCP_DB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {clusterIP: 127.100.0.90, ports: [{name: tcp-db, port: 27017}]}
---
apiVersion: v1
kind: Service
metadata: {name: db2, namespace: default}
spec: {clusterIP: 127.100.0.91, ports: [{name: tcp-db, port: 27017}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: default}
spec:
  hosts: [db]
  tcp:
  - route:
    - {destination: {host: db}, weight: 70}
    - {destination: {host: db2}, weight: 30}
"#;

    /// Applies the objects of `yaml` to `snapshot` and returns what changed.
    fn apply(snapshot: &mut Snapshot, yaml: &str) -> SnapshotDelta {
        let (objects, diagnostics) = sluice_translator::parse::parse_documents("change.yaml", yaml);
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        snapshot.apply(objects.into_iter().map(|l| sluice_translator::snapshot::Change::Upsert(Arc::new(l))))
    }

    /// The types whose version differs between two snapshots of one proxy.
    fn changed_types(before: &sluice_xds::cache::Snapshot, after: &sluice_xds::cache::Snapshot) -> Vec<String> {
        let changed = after.types.iter().filter(|(t, r)| before.types.get(*t).is_none_or(|b| b.version != r.version));
        changed.map(|(t, _)| t.clone()).collect()
    }

    #[test]
    fn tcp_and_wildcard_routing_changes_patch_single_listeners_and_virtual_hosts() {
        let mut snapshot = bookinfo_80_20();
        apply(&mut snapshot, TCP_DB);
        let generator = MeshGenerator::new(Current { version: 1, snapshot: snapshot.clone() });
        let sidecar = node("sidecar~127.0.9.1~a.default~default.svc.cluster.local");
        let mut previous = generator.generate(&sidecar, None).unwrap();
        let steps = [
            // New TCP weights: the db listener changes, nothing else.
            (TCP_DB.replace("weight: 70", "weight: 50").replace("weight: 30", "weight: 50"), vec![LISTENER]),
            // A wildcard VirtualService that comes first by name takes every default host's routes.
            (
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: aaa, namespace: default}\nspec:\n  hosts: ['*.default.svc.cluster.local']\n  http:\n  - route: [{destination: {host: details}}]\n".to_string(),
                vec![ROUTE],
            ),
        ];
        for (version, (yaml, expected)) in (2..).step_by(2).zip(steps) {
            let delta = apply(&mut snapshot, &yaml);
            assert!(delta.patchable() && !delta.routing.is_empty(), "{delta:?}");
            generator.set(Current { version, snapshot: snapshot.clone() }, delta);
            assert_eq!(generator.stale_classes(), 1, "the class waits to be patched");
            let patched = generator.generate(&sidecar, Some(&previous)).unwrap();
            assert_eq!((generator.stale_classes(), generator.cached_classes()), (0, 1), "patched");
            assert_eq!(changed_types(&previous, &patched), expected, "step {version}");
            // The same config translated in full by the same interner (equal resources are the
            // same encodings: protobuf maps have no fixed order).
            let rebuild = SnapshotDelta { rebuild: true, ..Default::default() };
            generator.set(Current { version: version + 1, snapshot: snapshot.clone() }, rebuild);
            let full = generator.generate(&sidecar, None).unwrap();
            let (p, f) = (contents(&patched), contents(&full));
            let differ: Vec<_> =
                p.iter().chain(&f).filter(|e| !p.contains(e) || !f.contains(e)).map(|e| &e.1).collect();
            assert!(differ.is_empty(), "step {version}: patched differs from a full generation in {differ:?}");
            previous = full;
        }
        // The wildcard host replaced the routes of every HTTP service's virtual host.
        let routes = &previous.types[ROUTE].items;
        let dump = String::from_utf8_lossy(&routes.get("9080").unwrap().bytes).to_string();
        assert!(!dump.contains("outbound|9080|v1|reviews"), "reviews' own VirtualService no longer applies");
    }
}
