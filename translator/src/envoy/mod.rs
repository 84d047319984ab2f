//! Translation of a snapshot into the Envoy v3 resources of one sidecar proxy, with Istio's names.
//!
//! Resources are produced as protobuf-JSON values (snake_case field names, `@type` on `Any`).
//! The xds crate turns them into protobuf with Envoy's descriptors, which rejects any field name
//! Envoy would not know.

mod authorization;
mod cluster;
mod endpoint;
mod listener;
mod proxy;
mod route;

use serde_json::Value;

pub use proxy::{NodeError, NodeId, Proxy};

use crate::diagnostic::Diagnostic;
use crate::snapshot::Snapshot;

/// Type URL of `envoy.config.listener.v3.Listener`.
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Type URL of `envoy.config.route.v3.RouteConfiguration`.
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
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

/// Translates `snapshot` for the sidecar proxy `node_id`
/// (`sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`).
pub fn translate_sidecar(snapshot: &Snapshot, node_id: &str) -> Result<ProxyResources, NodeError> {
    let node = NodeId::parse(node_id)?;
    let mut proxy = Proxy::new(snapshot, node);
    let mut out = ProxyResources {
        clusters: cluster::build(&proxy),
        endpoints: endpoint::build(&proxy),
        listeners: listener::build(&mut proxy),
        routes: route::build(&mut proxy),
        diagnostics: Vec::new(),
    };
    out.diagnostics = std::mem::take(&mut proxy.diagnostics);
    for list in [&mut out.listeners, &mut out.routes, &mut out.clusters, &mut out.endpoints] {
        list.sort_by(|a, b| a.name.cmp(&b.name));
    }
    Ok(out)
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

/// Cluster names as Istio writes them.
pub fn outbound_cluster_name(port: u32, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

/// Inbound cluster name as Istio writes it.
pub fn inbound_cluster_name(port: u32) -> String {
    format!("inbound|{port}||")
}
