//! Translation of a snapshot into the Envoy v3 resources of one sidecar proxy, with Istio's names.
//!
//! Resources are produced as protobuf-JSON values (snake_case field names, `@type` on `Any`).
//! The xds crate turns them into protobuf with Envoy's descriptors, which rejects any field name
//! Envoy would not know.

mod authorization;
mod cluster;
mod endpoint;
mod ext_authz;
mod grpc;
mod jwt;
mod listener;
mod proxy;
mod route;
mod tls;

use serde_json::Value;

pub use grpc::{GRPC_SERVER_LISTENER_PREFIX, ISTIO_SERVER_LISTENER_PREFIX};
pub use proxy::{NodeError, NodeId, Proxy};
pub use route::{RouteTable, TableHost};
pub use tls::{Certificates, ROOT_SECRET, SDS_CLUSTER, SDS_METADATA, WORKLOAD_SECRET};

use crate::diagnostic::Diagnostic;
use crate::snapshot::Snapshot;

/// Type URL of `envoy.config.listener.v3.Listener`.
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Type URL of `envoy.config.route.v3.RouteConfiguration`.
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Type URL of `envoy.config.route.v3.VirtualHost` (a part of a route configuration).
pub const VIRTUAL_HOST_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.VirtualHost";
/// Field of a route configuration that holds its virtual hosts.
pub const VIRTUAL_HOSTS_FIELD: &str = "virtual_hosts";
/// Type URL of `envoy.config.cluster.v3.Cluster`.
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Type URL of `envoy.config.endpoint.v3.ClusterLoadAssignment`.
pub const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// One named Envoy resource as protobuf JSON (without its own `@type`).
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// The resource name (listener, route config, cluster or cluster load assignment name).
    pub name: String,
    /// The resource body.
    pub body: Value,
}

/// Everything one proxy receives, by xDS type, each list sorted by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProxyResources {
    /// LDS.
    pub listeners: Vec<Resource>,
    /// RDS.
    pub routes: Vec<Resource>,
    /// CDS.
    pub clusters: Vec<Resource>,
    /// EDS.
    pub endpoints: Vec<Resource>,
    /// Problems found while translating for this proxy (warnings only).
    pub diagnostics: Vec<Diagnostic>,
}

impl ProxyResources {
    /// The resources of one type URL.
    pub fn of_type(&self, type_url: &str) -> &[Resource] {
        match type_url {
            LISTENER_TYPE => &self.listeners,
            ROUTE_TYPE => &self.routes,
            CLUSTER_TYPE => &self.clusters,
            ENDPOINT_TYPE => &self.endpoints,
            _ => &[],
        }
    }
}

/// What a sidecar's outbound half (clusters, endpoints, routes, outbound listeners) depends on:
/// its kind, namespace, workload labels, interception mode and Sidecar resource. Proxies of one
/// class get the same outbound half; only the inbound half is per proxy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProxyClass {
    /// `sidecar` or `router`.
    pub kind: String,
    /// The proxy's namespace.
    pub namespace: String,
    /// Its workload's labels that some object selects outbound config by (others make no
    /// difference to it).
    pub labels: std::collections::BTreeMap<String, String>,
    /// No iptables capture.
    pub interception_none: bool,
    /// The Sidecar that applies (namespace, name).
    pub sidecar: Option<(String, String)>,
    /// Whether it holds a workload certificate (its clusters originate mTLS).
    pub certificates: Certificates,
}

/// One sidecar's translation, in its two halves: [`ProxyTranslation::outbound`] is shared by
/// every proxy of [`ProxyTranslation::class`], [`ProxyTranslation::inbound`] is its own.
pub struct ProxyTranslation<'a> {
    proxy: Proxy<'a>,
}

impl<'a> ProxyTranslation<'a> {
    /// Resolves the proxy `node_id` (`sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`)
    /// in `snapshot`.
    pub fn new(snapshot: &'a Snapshot, node_id: &str) -> Result<Self, NodeError> {
        Ok(Self { proxy: Proxy::new(snapshot, NodeId::parse(node_id)?) })
    }

    /// The same, for a proxy that does (or does not) hold its workload's certificate.
    pub fn with_certificates(mut self, certificates: Certificates) -> Self {
        self.proxy.certificates = certificates;
        self
    }

    /// The class of this proxy.
    pub fn class(&self) -> ProxyClass {
        let p = &self.proxy;
        ProxyClass {
            kind: p.node.kind.clone(),
            namespace: p.node.namespace.clone(),
            labels: p.snapshot.outbound_labels(&p.labels),
            interception_none: p.interception_none,
            sidecar: p.sidecar.map(|s| (s.meta.namespace.clone(), s.meta.name.clone())),
            certificates: p.certificates,
        }
    }

    /// Clusters, endpoints, routes and outbound listeners (no diagnostics: see
    /// [`ProxyTranslation::diagnostics`]).
    pub fn outbound(&mut self) -> ProxyResources {
        ProxyResources {
            clusters: cluster::build(&mut self.proxy),
            endpoints: endpoint::build(&self.proxy, None),
            listeners: listener::build_outbound(&mut self.proxy),
            routes: route::build(&mut self.proxy),
            diagnostics: Vec::new(),
        }
    }

    /// The outbound clusters.
    pub fn clusters(&mut self) -> Vec<Resource> {
        cluster::build(&mut self.proxy)
    }

    /// The load assignments of every outbound cluster.
    pub fn endpoints(&self) -> Vec<Resource> {
        endpoint::build(&self.proxy, None)
    }

    /// The outbound listeners.
    pub fn outbound_listeners(&mut self) -> Vec<Resource> {
        listener::build_outbound(&mut self.proxy)
    }

    /// The outbound listeners a change of the VirtualServices naming `hosts` (resolved,
    /// possibly wildcards) may change; the others stay as [`ProxyTranslation::outbound_listeners`]
    /// gave them.
    pub fn outbound_listeners_routed(&mut self, hosts: &std::collections::BTreeSet<String>) -> Vec<Resource> {
        listener::build_outbound_routed(&mut self.proxy, hosts)
    }

    /// The layouts of the outbound route configurations: a route configuration is
    /// [`route_shell`] with [`ProxyTranslation::virtual_host`] of each of its hosts, in order,
    /// then [`ProxyTranslation::catch_all_host`], as its `virtual_hosts`.
    pub fn route_tables(&self) -> Vec<RouteTable> {
        route::tables(&self.proxy)
    }

    /// The virtual host of `table.hosts[index]`, named as Envoy names it (`<host>:<port>`).
    pub fn virtual_host(&mut self, table: &RouteTable, index: usize) -> Resource {
        route::virtual_host(&mut self.proxy, table, index)
    }

    /// The virtual host that ends every route configuration (`allow_any` or `block_all`).
    pub fn catch_all_host(&self) -> Resource {
        route::catch_all_host(&self.proxy)
    }

    /// The load assignments of the outbound clusters of `hosts` (what an endpoint-only change
    /// of those services changes in the outbound half).
    pub fn endpoints_of(&self, hosts: &std::collections::BTreeSet<String>) -> Vec<Resource> {
        endpoint::build(&self.proxy, Some(hosts))
    }

    /// The proxy's own inbound clusters and listeners.
    pub fn inbound(&mut self) -> ProxyResources {
        ProxyResources {
            clusters: cluster::build_inbound(&self.proxy),
            listeners: listener::build_inbound(&mut self.proxy),
            ..Default::default()
        }
    }

    /// The warnings found so far.
    pub fn diagnostics(self) -> Vec<Diagnostic> {
        self.proxy.diagnostics
    }
}

/// The xDS client a node is, from its metadata: gRPC's own client marks itself with
/// `GENERATOR: grpc`, as for istiod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XdsClient {
    /// An Envoy proxy (sidecar or router).
    #[default]
    Envoy,
    /// A proxyless gRPC client or server.
    ProxylessGrpc,
}

impl XdsClient {
    /// Reads `GENERATOR` from a node's metadata.
    pub fn from_metadata(metadata: &std::collections::BTreeMap<String, String>) -> Self {
        if metadata.get("GENERATOR").is_some_and(|g| g == "grpc") { Self::ProxylessGrpc } else { Self::Envoy }
    }
}

impl ProxyTranslation<'_> {
    /// What every proxyless gRPC client of this class gets: API listeners for every name it
    /// may dial, route configurations per service port, clusters and load assignments.
    pub fn proxyless_outbound(&mut self) -> ProxyResources {
        grpc::outbound(&mut self.proxy)
    }

    /// The proxyless route configurations a change of the VirtualServices naming `hosts`
    /// (resolved, possibly wildcards) may change.
    pub fn proxyless_routes_of(&mut self, hosts: &std::collections::BTreeSet<String>) -> Vec<Resource> {
        grpc::routes(&mut self.proxy, Some(hosts))
    }

    /// The proxyless load assignments of the services `hosts` (what an endpoint-only change
    /// of them changes).
    pub fn proxyless_endpoints_of(&mut self, hosts: &std::collections::BTreeSet<String>) -> Vec<Resource> {
        grpc::endpoints(&mut self.proxy, Some(hosts))
    }

    /// A proxyless gRPC server's own listeners (gRFC A36), one per inbound port and name.
    pub fn proxyless_inbound(&mut self) -> Vec<Resource> {
        grpc::server_listeners(&mut self.proxy)
    }
}

/// Translates `snapshot` for the proxyless gRPC node `node_id` (a sidecar-form id): both
/// halves, each list sorted by name.
pub fn translate_proxyless(snapshot: &Snapshot, node_id: &str) -> Result<ProxyResources, NodeError> {
    let mut t = ProxyTranslation::new(snapshot, node_id)?;
    let mut out = grpc::translate(&mut t.proxy);
    out.diagnostics = t.diagnostics();
    Ok(out)
}

/// Translates `snapshot` for the sidecar proxy `node_id`
/// (`sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`): both halves, a listener
/// name taken by the outbound half winning over an inbound one.
pub fn translate_sidecar(
    snapshot: &Snapshot,
    node_id: &str,
    certificates: Certificates,
) -> Result<ProxyResources, NodeError> {
    let mut t = ProxyTranslation::new(snapshot, node_id)?.with_certificates(certificates);
    let mut out = t.outbound();
    let inbound = t.inbound();
    out.clusters.extend(inbound.clusters);
    let taken: std::collections::HashSet<String> = out.listeners.iter().map(|l| l.name.clone()).collect();
    out.listeners.extend(inbound.listeners.into_iter().filter(|l| !taken.contains(&l.name)));
    out.diagnostics = t.diagnostics();
    for list in [&mut out.listeners, &mut out.routes, &mut out.clusters, &mut out.endpoints] {
        list.sort_by(|a, b| a.name.cmp(&b.name));
    }
    Ok(out)
}

/// A JSON object from owned fields. `json!` copies every interpolated value (it passes each
/// expression through `serde_json::to_value`), which for a route configuration of 10 000
/// virtual hosts is a deep copy of the whole tree; this moves them.
fn object<const N: usize>(fields: [(&str, Value); N]) -> Value {
    Value::Object(fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// An `Any` with its type URL.
fn typed(type_name: &str, mut body: Value) -> Value {
    body.as_object_mut()
        .expect("typed config bodies are objects")
        .insert("@type".into(), Value::String(format!("type.googleapis.com/{type_name}")));
    body
}

/// ADS config source, as Istio's sidecars use.
fn ads_source() -> Value {
    serde_json::json!({"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"})
}

/// A socket address, or a pipe for `unix://` paths.
fn address(host: &str, port: u32) -> Value {
    match host.strip_prefix("unix://") {
        Some(path) => serde_json::json!({"pipe": {"path": path}}),
        None => serde_json::json!({"socket_address": {"address": host, "port_value": port}}),
    }
}

/// A fractional percentage with denominator MILLION from an Istio percent value.
fn fraction(percent: f64) -> Value {
    serde_json::json!({"numerator": (percent * 10_000.0).round() as u64, "denominator": "MILLION"})
}

/// A route configuration of `table` without its virtual hosts.
pub fn route_shell(table: &RouteTable) -> Value {
    route::shell(table)
}

/// Cluster names as Istio writes them.
pub fn outbound_cluster_name(port: u32, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

/// Inbound cluster name as Istio writes it.
pub fn inbound_cluster_name(port: u32) -> String {
    format!("inbound|{port}||")
}
