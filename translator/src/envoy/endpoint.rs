//! EDS: ClusterLoadAssignments from EndpointSlices, WorkloadEntries and ServiceEntry endpoints,
//! filtered by subset labels and grouped by locality.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use super::cluster::destination_rule;
use super::proxy::Proxy;
use super::{Resource, address, object, outbound_cluster_name};
use crate::model::authorization_policy::MtlsMode;
use crate::model::common::{Protocol, labels_match};
use crate::model::destination_rule::DestinationRuleSpec;
use crate::snapshot::{MeshService, ServicePort, ServiceResolution, Snapshot};

/// Load assignments for every EDS cluster the proxy has, or with `hosts`, for those services'
/// clusters only.
pub(super) fn build(proxy: &Proxy<'_>, hosts: Option<&BTreeSet<String>>) -> Vec<Resource> {
    let mut out = Vec::new();
    let services = match hosts {
        None => proxy.visible_services(),
        Some(hosts) => hosts
            .iter()
            .filter_map(|h| proxy.snapshot.services.get(h))
            .filter(|s| proxy.sees(s))
            .map(|s| s.as_ref())
            .collect(),
    };
    for service in services.into_iter().filter(|s| s.resolution == ServiceResolution::Eds) {
        let dr = destination_rule(proxy, service).map(|d| &d.spec);
        let passthrough = |subset: Option<&str>| {
            let policy = super::cluster::Effective::resolve(dr, subset, 0);
            policy.load_balancer.and_then(|l| l.simple) == Some(crate::model::destination_rule::SimpleLb::Passthrough)
        };
        for port in service.ports.iter().filter(|p| p.protocol != Protocol::Udp) {
            let subsets =
                std::iter::once(None).chain(dr.iter().flat_map(|d| d.subsets.iter().map(|s| Some(s.name.as_str()))));
            for subset in subsets {
                if passthrough(subset) {
                    continue;
                }
                let name = outbound_cluster_name(port.port, subset.unwrap_or(""), &service.hostname);
                out.push(Resource { body: load_assignment(proxy.snapshot, &name, service, port, subset, dr), name });
            }
        }
    }
    out
}

/// The ClusterLoadAssignment of one cluster. An endpoint whose workload accepts mesh mTLS (and
/// whose PeerAuthentication does not DISABLE it on that port) carries the metadata that auto mTLS
/// matches, as istiod's endpoint builder writes it.
pub(super) fn load_assignment(
    snapshot: &Snapshot,
    name: &str,
    service: &MeshService,
    port: &ServicePort,
    subset: Option<&str>,
    dr: Option<&DestinationRuleSpec>,
) -> Value {
    let selector =
        subset.and_then(|s| dr?.subsets.iter().find(|x| x.name == s)).map(|s| s.labels.clone()).unwrap_or_default();
    let mut by_locality: BTreeMap<Option<String>, Vec<Value>> = BTreeMap::new();
    for e in service.endpoints.iter().filter(|e| labels_match(&selector, &e.labels)) {
        // A workload entry that names ports but not this one does not serve it.
        if !e.ports.is_empty() && !e.ports.contains_key(&port.name) && service.resolution != ServiceResolution::Eds {
            continue;
        }
        let endpoint_port = service.endpoint_port(port, e);
        let mut lb = object([
            ("endpoint", object([("address", address(&e.address, endpoint_port))])),
            ("health_status", Value::from(if e.ready { "HEALTHY" } else { "UNHEALTHY" })),
        ]);
        if e.accepts_mesh_tls()
            && snapshot.workload_mtls(&service.namespace, Some(&e.labels)).port(endpoint_port).mode != MtlsMode::Disable
        {
            lb["metadata"] = json!({"filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}});
        }
        if let Some(w) = e.weight.filter(|w| *w > 0) {
            lb["load_balancing_weight"] = json!(w);
        }
        by_locality.entry(e.locality.clone()).or_default().push(lb);
    }
    let groups: Vec<Value> = by_locality
        .into_iter()
        .map(|(locality, lbs)| {
            let mut g = object([("lb_endpoints", Value::Array(lbs))]);
            if let Some(l) = locality {
                let mut parts = l.split('/');
                let mut loc = serde_json::Map::new();
                for key in ["region", "zone", "sub_zone"] {
                    if let Some(v) = parts.next().filter(|v| !v.is_empty()) {
                        loc.insert(key.into(), json!(v));
                    }
                }
                g["locality"] = Value::Object(loc);
            }
            g
        })
        .collect();
    object([("cluster_name", Value::String(name.to_string())), ("endpoints", Value::Array(groups))])
}
