//! LDS: `virtualOutbound` (15001), per-port outbound listeners (HTTP → RDS, TCP → tcp_proxy),
//! `virtualInbound` (15006) with a chain per inbound port, and the bound listeners that Sidecar
//! `captureMode: NONE` asks for.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::authorization::{self, Layer};
use super::proxy::{InboundPort, Proxy};
use super::route::http_ports;
use super::tls::Certificates;
use super::{Resource, ads_source, inbound_cluster_name, outbound_cluster_name, typed};
use crate::model::authorization_policy::MtlsMode;
use crate::model::common::Protocol;
use crate::model::sidecar::OutboundMode;
use crate::model::virtual_service::Client;
use crate::snapshot::{MeshService, ModeFrom, host_matches, resolve_host};

/// Port of `virtualOutbound`.
pub const VIRTUAL_OUTBOUND_PORT: u32 = 15001;
/// Port of `virtualInbound`.
pub const VIRTUAL_INBOUND_PORT: u32 = 15006;

/// Appends `r` unless a listener of that name is already there (the first one wins).
fn push(out: &mut Vec<Resource>, names: &mut BTreeSet<String>, r: Resource) {
    if names.insert(r.name.clone()) {
        out.push(r);
    }
}

/// The outbound listeners: the same for every proxy of a class.
pub(super) fn build_outbound(proxy: &mut Proxy<'_>) -> Vec<Resource> {
    outbound(proxy, None)
}

/// The outbound listeners whose content a change of the VirtualServices naming `hosts`
/// (resolved, possibly wildcards) may change: the TCP listeners of the services they cover.
/// Listener names are claimed as in [`build_outbound`], so a listener another service's
/// listener shadows is not returned.
pub(super) fn build_outbound_routed(proxy: &mut Proxy<'_>, hosts: &BTreeSet<String>) -> Vec<Resource> {
    outbound(proxy, Some(hosts))
}

fn outbound(proxy: &mut Proxy<'_>, routed: Option<&BTreeSet<String>>) -> Vec<Resource> {
    let mut out = Vec::new();
    let names = &mut BTreeSet::new();
    let mut http_taken = BTreeSet::new();
    // HTTP listeners and virtualOutbound do not depend on VirtualServices: with `routed`, their
    // names are claimed but they are not built.
    let covered =
        |service: &MeshService| routed.is_none_or(|hosts| hosts.iter().any(|h| host_matches(h, &service.hostname)));
    for hp in http_ports(proxy) {
        let explicit = hp.listener.port.is_some();
        if !explicit && proxy.interception_none {
            continue;
        }
        let binds = explicit && proxy.binds(hp.listener.capture_mode);
        let addr =
            hp.listener.bind.clone().unwrap_or_else(|| if binds { "127.0.0.1".into() } else { "0.0.0.0".into() });
        if addr == "0.0.0.0" {
            http_taken.insert(hp.port);
        }
        let name = format!("{addr}_{}", hp.port);
        if routed.is_some() {
            names.insert(name);
            continue;
        }
        let hcm = hcm(
            &format!("outbound_{name}"),
            json!({"rds": {"config_source": ads_source(), "route_config_name": hp.route_name}}),
            outbound_http_filters(),
        );
        push(&mut out, names, listener(&name, &addr, hp.port, binds, "OUTBOUND", vec![json!({"filters": [hcm]})]));
    }
    for l in proxy.egress_listeners() {
        let explicit = l.port.clone();
        if explicit.is_none() && proxy.interception_none {
            continue;
        }
        if explicit.as_ref().is_some_and(|p| p.protocol().is_http() || p.protocol() == Protocol::Udp) {
            continue;
        }
        let binds = explicit.is_some() && proxy.binds(l.capture_mode);
        for service in proxy.services_for(&l) {
            for port in service.ports.iter().filter(|p| !p.protocol.is_http() && p.protocol != Protocol::Udp) {
                if explicit.as_ref().is_some_and(|p| p.number != port.port) {
                    continue;
                }
                let addr = match (&l.bind, binds, service.addresses.first()) {
                    (Some(b), _, _) => b.clone(),
                    (None, true, _) => "127.0.0.1".into(),
                    (None, false, Some(vip)) if !vip.contains('/') => vip.clone(),
                    _ if http_taken.contains(&port.port) => continue,
                    _ => "0.0.0.0".into(),
                };
                let name = format!("{addr}_{}", port.port);
                if !covered(service) {
                    names.insert(name);
                    continue;
                }
                let tcp =
                    tcp_proxy(proxy, service, port.port, &format!("outbound|{}||{}", port.port, service.hostname));
                push(
                    &mut out,
                    names,
                    listener(&name, &addr, port.port, binds, "OUTBOUND", vec![json!({"filters": [tcp]})]),
                );
            }
        }
    }
    if !proxy.interception_none && routed.is_none() {
        let catch_all = match proxy.outbound_mode() {
            OutboundMode::AllowAny => "PassthroughCluster",
            OutboundMode::RegistryOnly => "BlackHoleCluster",
        };
        let mut l = listener(
            "virtualOutbound",
            "0.0.0.0",
            VIRTUAL_OUTBOUND_PORT,
            true,
            "OUTBOUND",
            vec![json!({
                "name": "virtualOutbound-catchall-tcp",
                "filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": typed("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", json!({"stat_prefix": catch_all, "cluster": catch_all}))}],
            })],
        );
        l.body["use_original_dst"] = json!(true);
        push(&mut out, names, l);
    }
    out
}

/// The proxy's own inbound listeners (`virtualInbound` and bound ones).
pub(super) fn build_inbound(proxy: &mut Proxy<'_>) -> Vec<Resource> {
    let (mut out, names) = (Vec::new(), &mut BTreeSet::new());
    let inbound = proxy.inbound_ports();
    let mtls = proxy.mtls();
    let mut chains = Vec::new();
    for p in &inbound {
        let port = PortChains { port: p.port, protocol: p.protocol, mode: mtls.port(p.port).clone() };
        let chains_of_port = port.chains(proxy, |proxy| inbound_filters(proxy, p));
        match &p.bind {
            Some(addr) => {
                let name = format!("{addr}_{}", p.port);
                let mut l = listener(&name, addr, p.port, true, "INBOUND", strip_port(chains_of_port));
                let filters = inspectors(proxy, false);
                if !filters.is_empty() {
                    l.body["listener_filters"] = json!(filters);
                }
                push(&mut out, names, l);
            }
            None => chains.extend(chains_of_port),
        }
    }
    if !proxy.interception_none {
        // Ports the workload does not declare get the workload's own mode, as in istiod.
        let catch_all = PortChains { port: 0, protocol: Protocol::Tcp, mode: mtls.workload.clone() };
        let passthrough = |_: &mut Proxy<'_>| {
            vec![
                json!({"name": "envoy.filters.network.tcp_proxy", "typed_config": typed("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", json!({"stat_prefix": "InboundPassthroughCluster", "cluster": "InboundPassthroughCluster"}))}),
            ]
        };
        chains.extend(catch_all.chains(proxy, passthrough));
        let mut l = listener("virtualInbound", "0.0.0.0", VIRTUAL_INBOUND_PORT, true, "INBOUND", chains);
        l.body["listener_filters"] = json!(inspectors(proxy, true));
        push(&mut out, names, l);
    }
    out
}

/// The listener filters of an inbound listener: the original destination on
/// `virtualInbound`, and the TLS inspector when chains tell mTLS from plain text.
fn inspectors(proxy: &Proxy<'_>, original_dst: bool) -> Vec<Value> {
    let mut filters = Vec::new();
    if original_dst {
        filters.push(json!({"name": "envoy.filters.listener.original_dst", "typed_config": typed("envoy.extensions.filters.listener.original_dst.v3.OriginalDst", json!({}))}));
    }
    if proxy.certificates == Certificates::Sds {
        filters.push(json!({"name": "envoy.filters.listener.tls_inspector", "typed_config": typed("envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector", json!({}))}));
    }
    filters
}

/// A bound listener's chains match on nothing but the transport: it has one port.
fn strip_port(mut chains: Vec<Value>) -> Vec<Value> {
    for chain in &mut chains {
        if let Some(m) = chain.get_mut("filter_chain_match").and_then(Value::as_object_mut) {
            m.remove("destination_port");
            if m.is_empty() {
                chain.as_object_mut().expect("a chain is an object").remove("filter_chain_match");
            }
        }
    }
    chains
}

/// How a transport arrives on an inbound chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// Anything not matched otherwise (DISABLE, or a proxy without certificates).
    Any,
    /// Mesh mTLS from an Istio client (its ALPN): terminated here.
    MeshTls,
    /// Any TLS: terminated here as mesh mTLS (STRICT).
    Tls,
    /// Plain text only (PERMISSIVE beside mTLS).
    Plain,
    /// TLS that is not mesh mTLS (a client's own TLS): passed on as bytes (PERMISSIVE TCP).
    ForeignTls,
}

/// One inbound port (0: the catch-all) and its mTLS mode.
struct PortChains {
    port: u32,
    protocol: Protocol,
    mode: ModeFrom,
}

impl PortChains {
    /// The port's chains as istiod lays them out per mode (`filterchain_options.go`); `filters`
    /// gives a chain's network filters (the same whether it terminates mTLS or not).
    fn chains(&self, proxy: &mut Proxy<'_>, filters: impl Fn(&mut Proxy<'_>) -> Vec<Value>) -> Vec<Value> {
        let http = self.protocol.is_http();
        let transports: &[Transport] = match (self.mode.mode, proxy.certificates) {
            (MtlsMode::Strict, Certificates::None) => {
                let policy = self.mode.policy.clone().expect("STRICT is never the default");
                let port = if self.port == 0 { "undeclared ports".to_string() } else { format!("port {}", self.port) };
                proxy.warn(
                    policy,
                    "spec.mtls.mode".into(),
                    format!(
                        "STRICT on {port} of {}.{}, whose proxy has no workload certificate (no SDS): connections are refused",
                        proxy.node.pod, proxy.node.namespace
                    ),
                );
                let refuse = json!({"name": "envoy.filters.network.tcp_proxy", "typed_config": typed("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", json!({"stat_prefix": "BlackHoleCluster", "cluster": "BlackHoleCluster"}))});
                return vec![self.chain("refused", Transport::Any, vec![refuse], None)];
            }
            (MtlsMode::Strict, Certificates::Sds) => &[Transport::Tls],
            (MtlsMode::Permissive, Certificates::Sds) if http => &[Transport::MeshTls, Transport::Plain],
            (MtlsMode::Permissive, Certificates::Sds) => &[Transport::MeshTls, Transport::Plain, Transport::ForeignTls],
            _ => &[Transport::Any],
        };
        transports
            .iter()
            .map(|t| {
                let terminates = matches!(t, Transport::MeshTls | Transport::Tls);
                let socket = terminates.then(|| super::tls::downstream_mesh(&proxy.snapshot.mesh, http));
                let suffix = match t {
                    Transport::Any | Transport::Plain => "",
                    Transport::MeshTls | Transport::Tls => "mtls",
                    Transport::ForeignTls => "tls",
                };
                let chain_filters = filters(proxy);
                self.chain(suffix, *t, chain_filters, socket)
            })
            .collect()
    }

    fn chain(&self, suffix: &str, transport: Transport, filters: Vec<Value>, socket: Option<Value>) -> Value {
        let mut name =
            if self.port == 0 { "virtualInbound-catchall-tcp".to_string() } else { format!("0.0.0.0_{}", self.port) };
        if !suffix.is_empty() {
            name = format!("{name}-{suffix}");
        }
        let mut m = serde_json::Map::new();
        if self.port != 0 {
            m.insert("destination_port".into(), json!(self.port));
        }
        match transport {
            Transport::Any => {}
            Transport::MeshTls => {
                m.insert("transport_protocol".into(), json!("tls"));
                m.insert("application_protocols".into(), json!(super::tls::MESH_ALPNS));
            }
            Transport::Tls | Transport::ForeignTls => {
                m.insert("transport_protocol".into(), json!("tls"));
            }
            Transport::Plain => {
                m.insert("transport_protocol".into(), json!("raw_buffer"));
            }
        }
        let mut chain = json!({"name": name, "filters": filters});
        if !m.is_empty() {
            chain["filter_chain_match"] = Value::Object(m);
        }
        if let Some(socket) = socket {
            chain["transport_socket"] = socket;
        }
        chain
    }
}

fn listener(name: &str, addr: &str, port: u32, bind: bool, direction: &str, chains: Vec<Value>) -> Resource {
    let mut body = super::object([
        ("name", Value::from(name)),
        ("address", super::address(addr, port)),
        ("traffic_direction", Value::from(direction)),
        ("filter_chains", Value::Array(chains)),
    ]);
    if !bind {
        body["bind_to_port"] = json!(false);
    }
    Resource { name: name.to_string(), body }
}

fn router() -> Value {
    json!({"name": "envoy.filters.http.router", "typed_config": typed("envoy.extensions.filters.http.router.v3.Router", json!({}))})
}

/// CORS and fault filters take their settings per route; the router goes last.
fn outbound_http_filters() -> Vec<Value> {
    vec![
        json!({"name": "envoy.filters.http.cors", "typed_config": typed("envoy.extensions.filters.http.cors.v3.Cors", json!({}))}),
        json!({"name": "envoy.filters.http.fault", "typed_config": typed("envoy.extensions.filters.http.fault.v3.HTTPFault", json!({}))}),
        router(),
    ]
}

fn hcm(stat_prefix: &str, routes: Value, filters: Vec<Value>) -> Value {
    let mut config = json!({
        "stat_prefix": stat_prefix,
        "http_filters": filters,
        "use_remote_address": false,
        "normalize_path": true,
        "stream_idle_timeout": "0s",
        "upgrade_configs": [{"upgrade_type": "websocket"}],
    });
    for (k, v) in routes.as_object().expect("route source is an object") {
        config[k] = v.clone();
    }
    json!({"name": "envoy.filters.network.http_connection_manager", "typed_config": typed("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", config)})
}

/// The tcp_proxy for `service` on `port`: the first TCP route of its VirtualService that applies
/// to this proxy, else the service's default cluster.
fn tcp_proxy(proxy: &Proxy<'_>, service: &MeshService, port: u32, stat_prefix: &str) -> Value {
    let client = Client::Workload { labels: &proxy.labels, namespace: &proxy.node.namespace };
    let routing = proxy.snapshot.port_routing(service, &proxy.node.namespace);
    let route = routing.tcp_route(service, port, client).map_err(|(_, i)| i).expect("a proxy's own routes are decided");
    let route = route.map(|(vs, r)| (vs.meta.namespace.as_str(), r));
    let mut config = json!({"stat_prefix": stat_prefix});
    let cluster_of = |ns: &str, d: &crate::model::virtual_service::Destination| {
        let fqdn = resolve_host(&d.host, ns);
        let p = d.port.map(|p| p.number).unwrap_or(port);
        outbound_cluster_name(p, d.subset.as_deref().unwrap_or(""), &fqdn)
    };
    match route {
        Some((ns, r)) if r.route.len() > 1 => {
            let clusters: Vec<Value> = crate::model::virtual_service::live_destinations(&r.route)
                .into_iter()
                .map(|(d, weight)| json!({"name": cluster_of(ns, &d.destination), "weight": weight}))
                .collect();
            config["weighted_clusters"] = json!({"clusters": clusters});
        }
        Some((ns, r)) => config["cluster"] = json!(cluster_of(ns, &r.route[0].destination)),
        None => config["cluster"] = json!(outbound_cluster_name(port, "", &service.hostname)),
    }
    json!({"name": "envoy.filters.network.tcp_proxy", "typed_config": typed("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", config)})
}

/// The network filters of one inbound port's chain: RBAC (after JWT verification on HTTP), then
/// the HTTP connection manager
/// (which forwards the verified client certificate in `x-forwarded-client-cert`, as Istio's
/// inbound does) or the tcp_proxy, with the audit log when an AUDIT policy applies; the same
/// whether the chain terminates mTLS or not.
fn inbound_filters(proxy: &mut Proxy<'_>, p: &InboundPort) -> Vec<Value> {
    let cluster = inbound_cluster_name(p.port);
    if p.protocol.is_http() {
        // The token is verified before the policies that read its claims.
        let mut http: Vec<Value> = super::jwt::filter(proxy).into_iter().collect();
        http.extend(authorization::filters(proxy, Layer::Http));
        http.push(router());
        let route_config = json!({
            "name": cluster,
            "virtual_hosts": [{"name": format!("inbound|http|{}", p.port), "domains": ["*"], "routes": [{
                "name": "default", "match": {"prefix": "/"},
                "route": {"cluster": cluster, "timeout": "0s", "max_stream_duration": {"max_stream_duration": "0s", "grpc_timeout_header_max": "0s"}},
                "decorator": {"operation": format!(":{}/*", p.port)},
            }]}],
            "validate_clusters": false,
        });
        let mut hcm = hcm(&format!("inbound_0.0.0.0_{}", p.port), json!({"route_config": route_config}), http);
        let config = &mut hcm["typed_config"];
        config["forward_client_cert_details"] = json!("APPEND_FORWARD");
        config["set_current_client_cert_details"] = json!({"subject": true, "dns": true, "uri": true});
        if let Some(log) = authorization::audit_log(proxy, Layer::Http) {
            config["access_log"] = json!([log]);
        }
        vec![hcm]
    } else {
        let mut tcp = authorization::filters(proxy, Layer::Tcp);
        let mut config = json!({"stat_prefix": cluster, "cluster": cluster});
        if let Some(log) = authorization::audit_log(proxy, Layer::Tcp) {
            config["access_log"] = json!([log]);
        }
        tcp.push(json!({"name": "envoy.filters.network.tcp_proxy", "typed_config": typed("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", config)}));
        tcp
    }
}
