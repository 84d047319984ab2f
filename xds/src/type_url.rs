//! The Envoy resource types the server knows by name, and how each is pushed and subscribed.

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

/// True for types whose SotW responses hold every resource the client asked for (a missing
/// one is removed): listeners and clusters, in xDS the same two as [`is_wildcard_type`].
pub fn is_full_state_type(type_url: &str) -> bool {
    is_wildcard_type(type_url)
}
