//! The proxyless gRPC back end: what gRPC's own xDS client (node metadata `GENERATOR: grpc`)
//! receives, with istiod's names. The routing decisions are the sidecar's — the same virtual
//! hosts, clusters and load assignments — reshaped into what gRPC accepts:
//!
//! * LDS: an API listener per `<spelling>:<port>` a client may dial (`xds:///<name>:<port>`),
//!   whose HttpConnectionManager takes route config `outbound|<port>||<host>` over ADS, with only
//!   the fault filter and the router; and, for `xds=True` servers (gRFC A36), a listener per
//!   inbound port under Istio's name and gRPC's default one.
//! * RDS: one route configuration per service port, holding the sidecar's virtual host of it;
//!   the VirtualService timeout as `max_stream_duration` (gRFC A31), per-route filter configs
//!   other than fault left out.
//! * CDS: EDS clusters (LOGICAL_DNS for DNS services), round robin unless ring hash is asked for
//!   (gRFC A42), outlier detection (A50), `max_requests` (A32), and mesh mTLS through the
//!   bootstrap's certificate provider (A29) where a DestinationRule asks for `ISTIO_MUTUAL`.
//! * EDS: every locality with `locality` and `load_balancing_weight`, which gRPC requires.
//!
//! gRPC subscribes by name. Every name a client of this class may ask for is generated once per
//! class and served by name, so one translation serves every client of the class.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use super::authorization::{self, Layer};
use super::cluster::{Effective, destination_rule};
use super::proxy::Proxy;
use super::route::{RouteTable, TableHost, spellings};
use super::{ProxyResources, Resource, ads_source, object, outbound_cluster_name, typed};
use crate::diagnostic::ObjectRef;
use crate::model::IstioObject;
use crate::model::authorization_policy::MtlsMode;
use crate::model::common::Protocol;
use crate::model::destination_rule::{ClientTlsMode, DestinationRuleSpec, SimpleLb};
use crate::snapshot::{MeshService, ServicePort, ServiceResolution, host_matches};

/// Istio's prefix of server-side listener names (its gRPC bootstrap template).
pub const ISTIO_SERVER_LISTENER_PREFIX: &str = "xds.istio.io/grpc/lds/inbound/";
/// gRPC's default server listener name template, without the address.
pub const GRPC_SERVER_LISTENER_PREFIX: &str = "grpc/server?xds.resource.listening_address=";

const HCM: &str = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// Route configuration name of one service port, as istiod names it for gRPC.
pub fn route_config_name(port: u32, host: &str) -> String {
    outbound_cluster_name(port, "", host)
}

/// `host:port`, with brackets for an IPv6 address.
fn join_host_port(host: &str, port: u32) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// The ports gRPC can dial (not UDP).
fn ports(service: &MeshService) -> impl Iterator<Item = &ServicePort> {
    service.ports.iter().filter(|p| p.protocol != Protocol::Udp)
}

/// The router, last in every gRPC filter chain.
fn router() -> Value {
    json!({"name": "envoy.filters.http.router", "typed_config": typed("envoy.extensions.filters.http.router.v3.Router", json!({}))})
}

/// Client LDS: an API listener per spelling and port of every service the proxy sees.
pub(super) fn client_listeners(proxy: &Proxy<'_>) -> Vec<Resource> {
    let mut out = Vec::new();
    for service in proxy.visible_services() {
        let vip = service.addresses.iter().find(|a| !a.contains('/')).map_or("0.0.0.0", String::as_str);
        for port in ports(service) {
            let hcm = object([
                (
                    "rds",
                    json!({"config_source": ads_source(), "route_config_name": route_config_name(port.port, &service.hostname)}),
                ),
                (
                    "http_filters",
                    json!([
                        {"name": "envoy.filters.http.fault", "typed_config": typed("envoy.extensions.filters.http.fault.v3.HTTPFault", json!({}))},
                        router(),
                    ]),
                ),
            ]);
            let api_listener = typed(HCM, hcm);
            for spelling in spellings(service, &proxy.node.namespace) {
                let name = join_host_port(&spelling, port.port);
                let body = json!({
                    "name": name,
                    "address": {"socket_address": {"address": vip, "port_value": port.port}},
                    "api_listener": {"api_listener": api_listener},
                });
                out.push(Resource { name, body });
            }
        }
    }
    out
}

/// True when `hosts` (resolved names, possibly wildcards) names `service`; None names all.
fn named(hosts: Option<&BTreeSet<String>>, service: &MeshService) -> bool {
    hosts.is_none_or(|h| {
        h.contains(&service.hostname) || h.iter().any(|w| w.starts_with('*') && host_matches(w, &service.hostname))
    })
}

/// RDS: per service port, the sidecar's virtual host for it, reshaped for gRPC; with `hosts`,
/// only of the services they name (what a change of their VirtualServices changes).
pub(super) fn routes(proxy: &mut Proxy<'_>, hosts: Option<&BTreeSet<String>>) -> Vec<Resource> {
    let mut out = Vec::new();
    for service in proxy.visible_services().into_iter().filter(|s| named(hosts, s)) {
        let mut domains: Vec<String> = Vec::new();
        for port in ports(service) {
            domains.clear();
            for n in spellings(service, &proxy.node.namespace) {
                domains.push(join_host_port(&n, port.port));
                domains.push(n);
            }
            let name = route_config_name(port.port, &service.hostname);
            let table = RouteTable {
                name: name.clone(),
                port: port.port,
                hosts: vec![TableHost { service: service.hostname.clone(), domains: domains.clone() }],
            };
            let mut host = super::route::virtual_host(proxy, &table, 0).body;
            let vs = proxy.snapshot.port_routing(service, &proxy.node.namespace).http_routes().map(|(vs, _)| vs);
            let dropped = reshape_routes(&mut host);
            if let (Some(vs), false) = (vs, dropped.is_empty()) {
                proxy.warn(
                    ObjectRef::new("VirtualService", &vs.meta.namespace, &vs.meta.name),
                    "spec.http".into(),
                    format!(
                        "proxyless gRPC clients do not apply {} (gRPC has no such filter); their calls to {} port {} go without it",
                        dropped.join(", "),
                        service.hostname,
                        port.port
                    ),
                );
            }
            let body = object([("name", Value::String(name.clone())), ("virtual_hosts", json!([host]))]);
            out.push(Resource { name, body });
        }
    }
    out
}

/// Makes the sidecar's routes of a virtual host what gRPC reads: the route timeout becomes
/// `max_stream_duration` (gRPC ignores `timeout`), per-route configs of filters gRPC lacks go
/// (it would NACK them). Returns what was left out, for a warning.
fn reshape_routes(host: &mut Value) -> Vec<String> {
    let mut dropped = Vec::new();
    for route in host["routes"].as_array_mut().into_iter().flatten() {
        if let Some(filters) = route.get_mut("typed_per_filter_config").and_then(Value::as_object_mut) {
            filters.retain(|name, _| {
                let keep = name == "envoy.filters.http.fault";
                if !keep && !dropped.contains(name) {
                    dropped.push(name.clone());
                }
                keep
            });
        }
        if let Some(action) = route.get_mut("route").and_then(Value::as_object_mut) {
            if action.remove("request_mirror_policies").is_some() && !dropped.iter().any(|d| d == "mirror") {
                dropped.push("mirror".into());
            }
            let timeout = action.remove("timeout").filter(|t| t != "0s");
            if let Some(t) = timeout {
                action.insert("max_stream_duration".into(), json!({"max_stream_duration": t}));
            }
        }
    }
    dropped
}

/// How a proxyless client reaches one cluster's endpoints.
enum Security {
    /// Plain text.
    Plain,
    /// Mesh mTLS (`ISTIO_MUTUAL`) with the certificates of the bootstrap's provider, the peer
    /// checked against these SANs.
    Mesh(Vec<String>),
    /// TLS it cannot make (files or credentials of a DestinationRule): no endpoints (fail
    /// closed).
    Refused,
}

/// The policy in force for one cluster, and what its DestinationRule asks of the connection.
/// As istiod, only an explicit `ISTIO_MUTUAL` makes a proxyless client speak mTLS: whether it
/// uses xDS credentials is the application's choice, and gRPC has no permissive mode. A
/// refusal is warned of when `warn`.
fn policy(
    proxy: &mut Proxy<'_>,
    service: &MeshService,
    dr: Option<&IstioObject<DestinationRuleSpec>>,
    port: u32,
    subset: Option<&str>,
    warn: bool,
) -> (Effective, Security) {
    let policy = Effective::resolve(dr.map(|d| &d.spec), subset, port);
    let security = match &policy.tls {
        None => Security::Plain,
        Some((tls, _)) => match tls.mode() {
            ClientTlsMode::Disable => Security::Plain,
            ClientTlsMode::IstioMutual if !tls.subject_alt_names.is_empty() => {
                Security::Mesh(tls.subject_alt_names.clone())
            }
            ClientTlsMode::IstioMutual => Security::Mesh(super::tls::spiffe_ids(
                &proxy.snapshot.mesh,
                &service.namespace,
                &service.service_accounts(),
            )),
            _ => Security::Refused,
        },
    };
    if let (Security::Refused, true, Some(dr), Some((_, path))) = (&security, warn, dr, &policy.tls) {
        proxy.warn(
            ObjectRef::new("DestinationRule", &dr.meta.namespace, &dr.meta.name),
            path.clone(),
            format!(
                "proxyless gRPC clients speak only mesh mTLS (ISTIO_MUTUAL): their calls to {} port {port} fail (UNAVAILABLE) instead of going without this TLS",
                service.hostname
            ),
        );
    }
    (policy, security)
}

/// gRPC's TLS context (gRFC A29): the workload's certificate and the mesh root from the
/// bootstrap's certificate provider `default` (`file_watcher`, as `sluice bootstrap --grpc
/// --cert-dir` writes it), as certificates `default` and `ROOTCA`, as istiod names them.
fn tls_socket(context: &str, sans: &[String], require_client_certificate: bool) -> Value {
    let mut validation =
        json!({"ca_certificate_provider_instance": {"instance_name": "default", "certificate_name": "ROOTCA"}});
    if !sans.is_empty() {
        validation["match_subject_alt_names"] = sans.iter().map(|s| json!({"exact": s})).collect();
    }
    let mut body = json!({"common_tls_context": {
        "tls_certificate_provider_instance": {"instance_name": "default", "certificate_name": "default"},
        "validation_context": validation,
    }});
    if require_client_certificate {
        body["require_client_certificate"] = json!(true);
    }
    json!({"name": "envoy.transport_sockets.tls", "typed_config": typed(&format!("envoy.extensions.transport_sockets.tls.v3.{context}"), body)})
}

/// The subsets of a service's DestinationRule `dr`, after the default (None).
fn subsets(dr: Option<&IstioObject<DestinationRuleSpec>>) -> impl Iterator<Item = Option<&str>> {
    std::iter::once(None).chain(dr.into_iter().flat_map(|d| d.spec.subsets.iter().map(|s| Some(s.name.as_str()))))
}

/// CDS: a cluster per service port and subset.
pub(super) fn clusters(proxy: &mut Proxy<'_>) -> Vec<Resource> {
    let mut out = Vec::new();
    for service in proxy.visible_services() {
        if service.resolution == ServiceResolution::Passthrough {
            continue;
        }
        let dr = destination_rule(proxy, service);
        for port in ports(service) {
            for subset in subsets(dr) {
                let name = outbound_cluster_name(port.port, subset.unwrap_or(""), &service.hostname);
                let (policy, security) = policy(proxy, service, dr, port.port, subset, true);
                let mut c = Map::new();
                c.insert("name".into(), json!(name));
                match service.resolution {
                    ServiceResolution::Eds => {
                        c.insert("type".into(), json!("EDS"));
                        c.insert(
                            "eds_cluster_config".into(),
                            json!({"eds_config": ads_source(), "service_name": name}),
                        );
                    }
                    _ => {
                        // gRPC resolves a DNS cluster itself, from one host name (gRFC A37).
                        let Some(e) = service.endpoints.first() else { continue };
                        c.insert("type".into(), json!("LOGICAL_DNS"));
                        let address = json!({"socket_address": {"address": e.address, "port_value": service.endpoint_port(port, e)}});
                        c.insert(
                            "load_assignment".into(),
                            json!({"cluster_name": name, "endpoints": [{"locality": {}, "load_balancing_weight": 1, "lb_endpoints": [{"endpoint": {"address": address}}]}]}),
                        );
                    }
                }
                lb_policy(proxy, service, dr, &policy, &mut c);
                let max_requests = policy.connection_pool.as_ref().and_then(|p| p.http.as_ref()?.http2_max_requests);
                if let Some(n) = max_requests.filter(|n| *n > 0) {
                    c.insert("circuit_breakers".into(), json!({"thresholds": [{"max_requests": n}]}));
                }
                if let Some(o) = &policy.outlier_detection {
                    c.insert("outlier_detection".into(), outlier(o));
                }
                if let Security::Mesh(sans) = &security {
                    c.insert("transport_socket".into(), tls_socket("UpstreamTlsContext", sans, false));
                }
                out.push(Resource { name, body: Value::Object(c) });
            }
        }
    }
    out
}

/// Round robin, or ring hash for `consistentHash` (gRFC A42); what gRPC lacks is said and
/// falls back to round robin, as istiod does.
fn lb_policy(
    proxy: &mut Proxy<'_>,
    service: &MeshService,
    dr: Option<&IstioObject<DestinationRuleSpec>>,
    policy: &Effective,
    c: &mut Map<String, Value>,
) {
    let lb = policy.load_balancer.as_ref();
    if let Some(ch) = lb.and_then(|l| l.consistent_hash.as_ref()) {
        c.insert("lb_policy".into(), json!("RING_HASH"));
        let size = ch.ring_hash.as_ref().and_then(|r| r.minimum_ring_size).or(ch.minimum_ring_size);
        if let Some(size) = size {
            c.insert("ring_hash_lb_config".into(), json!({"minimum_ring_size": size}));
        }
        return;
    }
    c.insert("lb_policy".into(), json!("ROUND_ROBIN"));
    let simple = lb.and_then(|l| l.simple);
    if let Some(other) = simple.filter(|s| !matches!(s, SimpleLb::RoundRobin | SimpleLb::Unspecified))
        && let Some(dr) = dr
    {
        proxy.warn(
            ObjectRef::new("DestinationRule", &dr.meta.namespace, &dr.meta.name),
            "spec.trafficPolicy.loadBalancer.simple".into(),
            format!("proxyless gRPC clients balance {} by round robin: gRPC has no {other:?}", service.hostname),
        );
    }
}

/// gRPC's outlier detection (gRFC A50) ejects by success rate or failure percentage, not by
/// consecutive errors: the ejection settings carry over, and Istio's consecutive-error counts
/// become a failure-percentage ejection that takes every failing host out.
fn outlier(o: &crate::model::destination_rule::OutlierDetection) -> Value {
    let mut m = Map::new();
    super::cluster::ejection(o, &mut m);
    let counts = o.consecutive_5xx_errors.is_some_and(|n| n > 0)
        || o.consecutive_gateway_errors.is_some_and(|n| n > 0)
        || o.consecutive_errors.is_some_and(|n| n > 0);
    if counts {
        m.insert("failure_percentage_threshold".into(), json!(50));
        m.insert("enforcing_failure_percentage".into(), json!(100));
        m.insert("failure_percentage_request_volume".into(), json!(5));
        m.insert("failure_percentage_minimum_hosts".into(), json!(1));
    }
    Value::Object(m)
}

/// EDS: the sidecar's load assignments, every locality named and weighted; with `hosts`, only
/// of those services (what an endpoint-only change of them changes).
pub(super) fn endpoints(proxy: &mut Proxy<'_>, hosts: Option<&BTreeSet<String>>) -> Vec<Resource> {
    let mut out = Vec::new();
    let eds = |s: &&MeshService| s.resolution == ServiceResolution::Eds && named(hosts, s);
    for service in proxy.visible_services().into_iter().filter(eds) {
        let dr = destination_rule(proxy, service);
        for port in ports(service) {
            for subset in subsets(dr) {
                let name = outbound_cluster_name(port.port, subset.unwrap_or(""), &service.hostname);
                let (_, security) = policy(proxy, service, dr, port.port, subset, false);
                let spec = dr.map(|d| &d.spec);
                let mut cla = super::endpoint::load_assignment(proxy.snapshot, &name, service, port, subset, spec);
                if matches!(security, Security::Refused) {
                    cla["endpoints"] = json!([]);
                } else {
                    weigh_localities(&mut cla);
                }
                out.push(Resource { name, body: cla });
            }
        }
    }
    out
}

/// gRPC skips a locality without `load_balancing_weight` and NACKs one without `locality`:
/// every group gets both, its weight the sum of its endpoints' (each 1 unless weighted).
fn weigh_localities(cla: &mut Value) {
    for group in cla["endpoints"].as_array_mut().into_iter().flatten() {
        let weight: u64 = group["lb_endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["load_balancing_weight"].as_u64().unwrap_or(1))
            .sum();
        group["load_balancing_weight"] = json!(weight.max(1));
        if group.get("locality").is_none() {
            group["locality"] = json!({});
        }
    }
}

/// Server LDS (gRFC A36): per inbound port of the proxy's workload, a listener under Istio's
/// name and gRPC's default one, for the workload's address and the unspecified ones a server
/// may bind; one filter chain — mTLS where the port is STRICT (or PERMISSIVE on a workload
/// labelled for mesh TLS: gRPC cannot serve both, and its clients then speak mTLS), else plain
/// text — whose inline route config only lets calls through to the server
/// (`non_forwarding_action`), after RBAC DENY then ALLOW.
pub(super) fn server_listeners(proxy: &mut Proxy<'_>) -> Vec<Resource> {
    let inbound = proxy.inbound_ports();
    if inbound.is_empty() {
        return Vec::new();
    }
    let mut http = authorization::filters(proxy, Layer::Grpc);
    http.push(router());
    let hcm = object([
        ("stat_prefix", json!("inbound")),
        (
            "route_config",
            json!({"name": "inbound", "virtual_hosts": [{"name": "inbound", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "non_forwarding_action": {}},
            ]}]}),
        ),
        ("http_filters", Value::Array(http)),
    ]);
    let mtls = proxy.mtls();
    let labelled = proxy.labels.get("security.istio.io/tlsMode").is_some_and(|m| m == "istio");
    let ip = proxy.workload.and_then(|w| w.ip.clone()).unwrap_or_else(|| proxy.node.ip.clone());
    let mut out = Vec::new();
    for p in &inbound {
        let strict = match mtls.port(p.port).mode {
            MtlsMode::Strict => true,
            MtlsMode::Permissive => labelled,
            MtlsMode::Disable | MtlsMode::Unset => false,
        };
        let suffix = if strict { "mtls" } else { "plaintext" };
        let mut chain = json!({
            "name": format!("inbound-{suffix}"),
            "filters": [{"name": format!("inbound-hcm-{suffix}"), "typed_config": typed(HCM, hcm.clone())}],
        });
        if strict {
            chain["transport_socket"] = tls_socket("DownstreamTlsContext", &[], true);
        }
        for host in [ip.as_str(), "0.0.0.0", "::"] {
            let address = join_host_port(host, p.port);
            for prefix in [ISTIO_SERVER_LISTENER_PREFIX, GRPC_SERVER_LISTENER_PREFIX] {
                let name = format!("{prefix}{address}");
                let body = json!({
                    "name": name,
                    "address": {"socket_address": {"address": host, "port_value": p.port}},
                    "filter_chains": [chain],
                });
                out.push(Resource { name, body });
            }
        }
    }
    out
}

/// Both halves for one proxyless client, each list sorted by name.
pub(super) fn translate(proxy: &mut Proxy<'_>) -> ProxyResources {
    let mut out = outbound(proxy);
    out.listeners.extend(server_listeners(proxy));
    out.listeners.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The half shared by every client of a class: client listeners, routes, clusters, endpoints.
pub(super) fn outbound(proxy: &mut Proxy<'_>) -> ProxyResources {
    let mut out = ProxyResources {
        listeners: client_listeners(proxy),
        routes: routes(proxy, None),
        clusters: clusters(proxy),
        endpoints: endpoints(proxy, None),
        diagnostics: Vec::new(),
    };
    for list in [&mut out.listeners, &mut out.routes, &mut out.clusters, &mut out.endpoints] {
        list.sort_by(|a, b| a.name.cmp(&b.name));
    }
    out
}
