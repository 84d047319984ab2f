//! Envoy admin `/config_dump`-shaped JSON for a set of resources, so the output of sluice reads
//! like what `istioctl proxy-config` users know.

use serde_json::{Value, json};

use crate::codec::{CodecError, canonical};

/// The resource types, as the cache names them.
pub use crate::type_url::{CLUSTER, ENDPOINT, LISTENER, ROUTE};

/// Named resources of one type: `(name, protobuf JSON)`.
pub type Named<'a> = &'a [(String, Value)];

/// Builds a ConfigDump (clusters, listeners, routes, endpoints — Envoy's order) with every
/// resource validated and in canonical form.
pub fn config_dump(
    version: &str,
    listeners: Named<'_>,
    routes: Named<'_>,
    clusters: Named<'_>,
    endpoints: Named<'_>,
) -> Result<Value, CodecError> {
    let each =
        |type_url: &str, items: Named<'_>, wrap: &dyn Fn(&str, Value) -> Value| -> Result<Vec<Value>, CodecError> {
            items.iter().map(|(name, body)| Ok(wrap(name, canonical(type_url, name, body)?))).collect()
        };
    let clusters = each(CLUSTER, clusters, &|_, c| json!({"version_info": version, "cluster": c}))?;
    let listeners = each(
        LISTENER,
        listeners,
        &|n, l| json!({"name": n, "active_state": {"version_info": version, "listener": l}}),
    )?;
    let routes = each(ROUTE, routes, &|_, r| json!({"version_info": version, "route_config": r}))?;
    let endpoints = each(ENDPOINT, endpoints, &|_, e| json!({"version_info": version, "endpoint_config": e}))?;
    Ok(json!({"configs": [
        {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump", "dynamic_active_clusters": clusters},
        {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump", "dynamic_listeners": listeners},
        {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump", "dynamic_route_configs": routes},
        {"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump", "dynamic_endpoint_configs": endpoints},
    ]}))
}
