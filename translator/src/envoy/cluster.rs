//! CDS: outbound clusters per service port and subset with DestinationRule traffic policy,
//! inbound clusters for the proxy's own workload, and Istio's passthrough/blackhole clusters.

use serde_json::{Map, Value, json};

use super::proxy::Proxy;
use super::{Resource, address, ads_source, inbound_cluster_name, object, outbound_cluster_name, typed};
use crate::diagnostic::ObjectRef;
use crate::model::IstioObject;
use crate::model::common::Protocol;
use crate::model::destination_rule::{
    ClientTlsMode, ClientTlsSettings, ConnectionPoolSettings, DestinationRuleSpec, LoadBalancerSettings,
    OutlierDetection, SimpleLb, TrafficPolicy,
};
use crate::snapshot::{
    MeshService, ROOT_NAMESPACE, ServicePort, ServiceResolution, exported_to, host_matches, resolve_host,
};

/// Istio's default connect timeout.
const CONNECT_TIMEOUT: &str = "10s";
/// "No limit" as Istio writes circuit breaker thresholds.
const UNLIMITED: u64 = 4_294_967_295;

/// The DestinationRule that applies to `fqdn` for this proxy: Istio looks in the proxy's
/// namespace, then the service's, then the root namespace; an exact host beats a wildcard.
pub(super) fn destination_rule<'a>(
    proxy: &Proxy<'a>,
    service: &MeshService,
) -> Option<&'a IstioObject<DestinationRuleSpec>> {
    let ns = &proxy.node.namespace;
    let candidates: Vec<_> = proxy
        .snapshot
        .destination_rules_for_host(&service.hostname)
        .filter(|dr| exported_to(&dr.spec.export_to, &dr.meta.namespace, ns))
        .filter(|dr| {
            dr.spec
                .workload_selector
                .as_ref()
                .is_none_or(|s| crate::model::common::labels_match(&s.labels, &proxy.labels))
        })
        .filter(|dr| host_matches(&resolve_host(&dr.spec.host, &dr.meta.namespace), &service.hostname))
        .collect();
    for scope in [ns.as_str(), service.namespace.as_str(), ROOT_NAMESPACE] {
        let in_scope = candidates.iter().filter(|dr| dr.meta.namespace == scope);
        let exact = in_scope.clone().find(|dr| resolve_host(&dr.spec.host, &dr.meta.namespace) == service.hostname);
        if let Some(dr) = exact.or_else(|| in_scope.clone().next()) {
            return Some(dr);
        }
    }
    None
}

/// The policy settings in force for one port of one subset.
#[derive(Debug, Default, Clone)]
pub(super) struct Effective {
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
    /// Client TLS and the field path it was written at.
    pub tls: Option<(ClientTlsSettings, String)>,
}

impl Effective {
    /// Applies `policy` at `path` (and its matching port-level settings) over what is set so far.
    fn apply(&mut self, policy: &TrafficPolicy, path: &str, port: u32) {
        if let Some(tls) = &policy.tls {
            self.tls = Some((tls.clone(), format!("{path}.tls")));
        }
        if policy.load_balancer.is_some() {
            self.load_balancer = policy.load_balancer.clone();
        }
        if policy.connection_pool.is_some() {
            self.connection_pool = policy.connection_pool.clone();
        }
        if policy.outlier_detection.is_some() {
            self.outlier_detection = policy.outlier_detection.clone();
        }
        let at_port =
            policy.port_level_settings.iter().enumerate().find(|(_, p)| p.port.is_some_and(|n| n.number == port));
        if let Some((i, p)) = at_port {
            if let Some(tls) = &p.tls {
                self.tls = Some((tls.clone(), format!("{path}.portLevelSettings[{i}].tls")));
            }
            if p.load_balancer.is_some() {
                self.load_balancer = p.load_balancer.clone();
            }
            if p.connection_pool.is_some() {
                self.connection_pool = p.connection_pool.clone();
            }
            if p.outlier_detection.is_some() {
                self.outlier_detection = p.outlier_detection.clone();
            }
        }
    }

    /// Top-level policy, then the subset's, each with their port-level settings.
    pub fn resolve(dr: Option<&DestinationRuleSpec>, subset: Option<&str>, port: u32) -> Self {
        let mut e = Effective::default();
        if let Some(dr) = dr {
            if let Some(tp) = &dr.traffic_policy {
                e.apply(tp, "spec.trafficPolicy", port);
            }
            let subset = subset.and_then(|s| dr.subsets.iter().enumerate().find(|(_, x)| x.name == s));
            if let Some((i, tp)) = subset.and_then(|(i, s)| Some((i, s.traffic_policy.as_ref()?))) {
                e.apply(tp, &format!("spec.subsets[{i}].trafficPolicy"), port);
            }
        }
        e
    }
}

/// All clusters of the proxy.
pub(super) fn build(proxy: &mut Proxy<'_>) -> Vec<Resource> {
    let mut out = vec![
        Resource {
            name: "BlackHoleCluster".into(),
            body: json!({"name": "BlackHoleCluster", "type": "STATIC", "connect_timeout": CONNECT_TIMEOUT}),
        },
        Resource {
            name: "PassthroughCluster".into(),
            body: json!({"name": "PassthroughCluster", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": CONNECT_TIMEOUT}),
        },
    ];
    for service in proxy.visible_services() {
        let dr = destination_rule(proxy, service);
        for port in service.ports.iter().filter(|p| p.protocol != Protocol::Udp) {
            out.push(outbound(proxy, service, port, None, dr));
            for subset in dr.iter().flat_map(|d| d.spec.subsets.iter()) {
                out.push(outbound(proxy, service, port, Some(&subset.name), dr));
            }
        }
    }
    out
}

/// The proxy's own inbound clusters (and InboundPassthroughCluster when it captures), and the
/// clusters its RequestAuthentications fetch keys through.
pub(super) fn build_inbound(proxy: &Proxy<'_>) -> Vec<Resource> {
    let mut out = Vec::new();
    let inbound = proxy.inbound_ports();
    if !inbound.is_empty() && !proxy.interception_none {
        out.push(Resource {
            name: "InboundPassthroughCluster".into(),
            body: json!({"name": "InboundPassthroughCluster", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": CONNECT_TIMEOUT,
                "upstream_bind_config": {"source_address": {"address": "127.0.0.6", "port_value": 0}}}),
        });
    }
    for p in inbound {
        let name = inbound_cluster_name(p.port);
        let mut body = json!({
            "name": name, "type": "STATIC", "connect_timeout": CONNECT_TIMEOUT,
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address(&p.endpoint.0, p.endpoint.1)}}]}]},
            "circuit_breakers": {"thresholds": [thresholds(None)]},
        });
        if p.protocol.is_http2() {
            body["typed_extension_protocol_options"] = protocol_options(p.protocol, None);
        }
        if p.bind.is_none() && !proxy.interception_none {
            // As Istio: connect to the app from 127.0.0.6 so istio-init's rules let it through
            // instead of capturing it again.
            let source = if p.endpoint.0.contains(':') { "::6" } else { "127.0.0.6" };
            body["upstream_bind_config"] = json!({"source_address": {"address": source, "port_value": 0}});
        }
        out.push(Resource { name, body });
    }
    out.extend(super::jwt::jwks_clusters(proxy).into_iter().map(|(name, body)| Resource { name, body }));
    out
}

fn thresholds(pool: Option<&ConnectionPoolSettings>) -> Value {
    let tcp = pool.and_then(|p| p.tcp.as_ref());
    let http = pool.and_then(|p| p.http.as_ref());
    let limit = |v: Option<i32>| v.and_then(|v| u64::try_from(v).ok()).filter(|v| *v > 0).unwrap_or(UNLIMITED);
    json!({
        "max_connections": limit(tcp.and_then(|t| t.max_connections)),
        "max_pending_requests": limit(http.and_then(|h| h.http1_max_pending_requests)),
        "max_requests": limit(http.and_then(|h| h.http2_max_requests)),
        "max_retries": limit(http.and_then(|h| h.max_retries)),
        "track_remaining": true,
    })
}

/// `typed_extension_protocol_options` for HTTP upstream settings.
fn protocol_options(protocol: Protocol, pool: Option<&ConnectionPoolSettings>) -> Value {
    let http = pool.and_then(|p| p.http.as_ref());
    let tcp = pool.and_then(|p| p.tcp.as_ref());
    let mut options = Map::new();
    let mut common = Map::new();
    if let Some(n) = http.and_then(|h| h.max_requests_per_connection).filter(|n| *n > 0) {
        common.insert("max_requests_per_connection".into(), json!(n));
    }
    if let Some(d) = http.and_then(|h| h.idle_timeout) {
        common.insert("idle_timeout".into(), json!(d.to_proto_json()));
    }
    if let Some(d) = tcp.and_then(|t| t.max_connection_duration) {
        common.insert("max_connection_duration".into(), json!(d.to_proto_json()));
    }
    if !common.is_empty() {
        options.insert("common_http_protocol_options".into(), Value::Object(common));
    }
    let upgrade = http.and_then(|h| h.h2_upgrade_policy.as_deref()) == Some("UPGRADE");
    if http.and_then(|h| h.use_client_protocol) == Some(true) {
        options.insert(
            "use_downstream_protocol_config".into(),
            json!({"http_protocol_options": {}, "http2_protocol_options": {}}),
        );
    } else if protocol.is_http2() || upgrade {
        let mut h2 = Map::new();
        if let Some(n) = http.and_then(|h| h.max_concurrent_streams).filter(|n| *n > 0) {
            h2.insert("max_concurrent_streams".into(), json!(n));
        }
        if let Some(k) = http.and_then(|h| h.http2_keep_alive) {
            let mut keepalive = Map::new();
            for (field, d) in [("interval", k.interval), ("timeout", k.timeout)] {
                if let Some(d) = d {
                    keepalive.insert(field.into(), json!(d.to_proto_json()));
                }
            }
            h2.insert("connection_keepalive".into(), Value::Object(keepalive));
        }
        options.insert("explicit_http_config".into(), object([("http2_protocol_options", Value::Object(h2))]));
    } else {
        options.insert("explicit_http_config".into(), json!({"http_protocol_options": {}}));
    }
    const HTTP_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
    object([(HTTP_OPTIONS, typed(HTTP_OPTIONS, Value::Object(options)))])
}

/// How a cluster reaches its endpoints.
enum UpstreamSecurity {
    /// Plain text.
    Plain,
    /// Auto mTLS: this socket to endpoints that accept mesh mTLS, plain text to the others.
    Auto(Value),
    /// This TLS socket to every endpoint.
    Tls(Value),
    /// The TLS asked for cannot be made: the cluster has no endpoints (fail closed).
    Refuse,
}

/// Istio's SNI for mesh mTLS: `outbound_.<port>_.<subset>_.<host>`.
fn mesh_sni(port: u32, subset: Option<&str>, host: &str) -> String {
    format!("outbound_.{port}_.{}_.{host}", subset.unwrap_or(""))
}

/// What `tls` (the DestinationRule's, if any) and auto mTLS ask of one cluster of this proxy.
fn upstream_security(
    proxy: &mut Proxy<'_>,
    service: &MeshService,
    port: &ServicePort,
    subset: Option<&str>,
    tls: Option<&(ClientTlsSettings, String)>,
    dr: Option<&IstioObject<DestinationRuleSpec>>,
) -> UpstreamSecurity {
    let mesh = &proxy.snapshot.mesh;
    let identities = || super::tls::spiffe_ids(mesh, &service.namespace, &service.service_accounts());
    let sni = mesh_sni(port.port, subset, &service.hostname);
    let has_certificates = proxy.certificates == super::tls::Certificates::Sds;
    let Some((tls, path)) = tls else {
        let auto = mesh.enable_auto_mtls && !service.mesh_external && has_certificates;
        return if auto {
            UpstreamSecurity::Auto(super::tls::upstream_mesh(&sni, &identities(), port.protocol.is_http2()))
        } else {
            UpstreamSecurity::Plain
        };
    };
    let refuse = |proxy: &mut Proxy<'_>, why: &str| {
        if let Some(dr) = dr {
            let reference = ObjectRef::new("DestinationRule", &dr.meta.namespace, &dr.meta.name);
            proxy.warn(
                reference,
                path.clone(),
                format!(
                    "{why}: proxy {} refuses connections to {} port {}",
                    proxy.node.pod, service.hostname, port.port
                ),
            );
        }
        UpstreamSecurity::Refuse
    };
    match tls.mode() {
        ClientTlsMode::Disable => UpstreamSecurity::Plain,
        ClientTlsMode::IstioMutual if !has_certificates => {
            refuse(proxy, "ISTIO_MUTUAL needs the workload's certificate, and this proxy has no SDS (sds-grpc)")
        }
        ClientTlsMode::IstioMutual => {
            let sans = if tls.subject_alt_names.is_empty() { identities() } else { tls.subject_alt_names.clone() };
            let sni = tls.sni.clone().unwrap_or(sni);
            UpstreamSecurity::Tls(super::tls::upstream_mesh(&sni, &sans, port.protocol.is_http2()))
        }
        // Validation has said that credentialName is not read yet.
        ClientTlsMode::Simple | ClientTlsMode::Mutual if tls.credential_name.is_some() => UpstreamSecurity::Refuse,
        mode => UpstreamSecurity::Tls(super::tls::upstream_files(tls, mode == ClientTlsMode::Mutual)),
    }
}

fn outbound(
    proxy: &mut Proxy<'_>,
    service: &MeshService,
    port: &ServicePort,
    subset: Option<&str>,
    dr_object: Option<&IstioObject<DestinationRuleSpec>>,
) -> Resource {
    let dr = dr_object.map(|d| &d.spec);
    let name = outbound_cluster_name(port.port, subset.unwrap_or(""), &service.hostname);
    let policy = Effective::resolve(dr, subset, port.port);
    let mut c = Map::new();
    c.insert("name".into(), Value::String(name.clone()));
    let connect_timeout = policy
        .connection_pool
        .as_ref()
        .and_then(|p| p.tcp.as_ref())
        .and_then(|t| t.connect_timeout)
        .map_or(CONNECT_TIMEOUT.to_string(), |d| d.to_proto_json());
    c.insert("connect_timeout".into(), Value::String(connect_timeout));
    let passthrough_lb = policy.load_balancer.as_ref().and_then(|l| l.simple) == Some(SimpleLb::Passthrough);
    match service.resolution {
        ServiceResolution::Passthrough => {
            c.insert("type".into(), json!("ORIGINAL_DST"));
        }
        _ if passthrough_lb => {
            c.insert("type".into(), json!("ORIGINAL_DST"));
        }
        ServiceResolution::Eds => {
            c.insert("type".into(), json!("EDS"));
            let eds = object([("eds_config", ads_source()), ("service_name", Value::String(name.clone()))]);
            c.insert("eds_cluster_config".into(), eds);
        }
        ServiceResolution::Dns | ServiceResolution::DnsRoundRobin => {
            let kind = if service.resolution == ServiceResolution::Dns { "STRICT_DNS" } else { "LOGICAL_DNS" };
            c.insert("type".into(), json!(kind));
            c.insert("dns_lookup_family".into(), json!("V4_ONLY"));
            let mut cla = super::endpoint::load_assignment(proxy.snapshot, &name, service, port, subset, dr);
            if kind == "LOGICAL_DNS" {
                // LOGICAL_DNS clusters take exactly one endpoint.
                if let Some(groups) = cla["endpoints"].as_array_mut() {
                    groups.truncate(1);
                    if let Some(lbs) = groups.first_mut().and_then(|g| g["lb_endpoints"].as_array_mut()) {
                        lbs.truncate(1);
                    }
                }
            }
            c.insert("load_assignment".into(), cla);
        }
    }
    let original_dst = c["type"] == "ORIGINAL_DST";
    let lb = if original_dst { json!("CLUSTER_PROVIDED") } else { lb_policy(policy.load_balancer.as_ref(), &mut c) };
    c.insert("lb_policy".into(), lb);
    let thresholds = vec![thresholds(policy.connection_pool.as_ref())];
    c.insert("circuit_breakers".into(), object([("thresholds", Value::Array(thresholds))]));
    if let Some(k) = policy.connection_pool.as_ref().and_then(|p| p.tcp.as_ref()).and_then(|t| t.tcp_keepalive.as_ref())
    {
        let mut ka = Map::new();
        if let Some(p) = k.probes {
            ka.insert("keepalive_probes".into(), json!(p));
        }
        if let Some(t) = k.time {
            ka.insert("keepalive_time".into(), json!(t.0.as_secs()));
        }
        if let Some(i) = k.interval {
            ka.insert("keepalive_interval".into(), json!(i.0.as_secs()));
        }
        c.insert("upstream_connection_options".into(), json!({"tcp_keepalive": ka}));
    }
    if port.protocol.is_http() {
        c.insert(
            "typed_extension_protocol_options".into(),
            protocol_options(port.protocol, policy.connection_pool.as_ref()),
        );
    }
    if let Some(o) = &policy.outlier_detection {
        c.insert("outlier_detection".into(), outlier(o));
        if let Some(min) = o.min_health_percent {
            c.insert("common_lb_config".into(), json!({"healthy_panic_threshold": {"value": min as f64}}));
        }
    }
    let tls = policy.tls.as_ref();
    match upstream_security(proxy, service, port, subset, tls, dr_object) {
        UpstreamSecurity::Plain => {}
        // An original destination has no endpoint metadata to match on.
        UpstreamSecurity::Auto(_) if original_dst => {}
        UpstreamSecurity::Auto(socket) => {
            let raw = json!({"name": "envoy.transport_sockets.raw_buffer", "typed_config": typed("envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer", json!({}))});
            c.insert(
                "transport_socket_matches".into(),
                json!([
                    {"name": "tlsMode-istio", "match": {"tlsMode": "istio"}, "transport_socket": socket},
                    {"name": "tlsMode-disabled", "match": {}, "transport_socket": raw},
                ]),
            );
        }
        UpstreamSecurity::Tls(socket) => {
            c.insert("transport_socket".into(), socket);
        }
        UpstreamSecurity::Refuse => {
            for field in ["eds_cluster_config", "dns_lookup_family"] {
                c.remove(field);
            }
            c.insert("type".into(), json!("STATIC"));
            if original_dst {
                c.insert("lb_policy".into(), json!("ROUND_ROBIN"));
            }
            c.insert("load_assignment".into(), json!({"cluster_name": name, "endpoints": []}));
        }
    }
    let mut meta = json!({"services": [{"host": service.hostname, "name": service.source.name, "namespace": service.namespace}], "default_original_port": port.port});
    if let Some(s) = subset {
        meta["subset"] = json!(s);
    }
    c.insert("metadata".into(), object([("filter_metadata", object([("istio", meta)]))]));
    Resource { name, body: Value::Object(c) }
}

fn lb_policy(lb: Option<&LoadBalancerSettings>, cluster: &mut Map<String, Value>) -> Value {
    let Some(lb) = lb else { return json!("LEAST_REQUEST") };
    if let Some(ch) = &lb.consistent_hash {
        if let Some(m) = &ch.maglev {
            if let Some(size) = m.table_size {
                cluster.insert("maglev_lb_config".into(), json!({"table_size": size}));
            }
            return json!("MAGLEV");
        }
        let size = ch.ring_hash.as_ref().and_then(|r| r.minimum_ring_size).or(ch.minimum_ring_size);
        if let Some(size) = size {
            cluster.insert("ring_hash_lb_config".into(), json!({"minimum_ring_size": size}));
        }
        return json!("RING_HASH");
    }
    let policy = match lb.simple {
        Some(SimpleLb::RoundRobin) => "ROUND_ROBIN",
        Some(SimpleLb::Random) => "RANDOM",
        _ => "LEAST_REQUEST",
    };
    // Slow start is a setting of the round robin and least request balancers (Envoy has none
    // for random); Istio's defaults: linear, from 10%. The aggression's runtime key is one no
    // runtime layer can hold, so the value is the one written.
    let slow_start = match (&lb.warmup, lb.warmup_duration_secs) {
        (Some(w), _) => w.duration.map(|d| {
            json!({
                "slow_start_window": d.to_proto_json(),
                "aggression": {"default_value": w.aggression.unwrap_or(1.0), "runtime_key": "("},
                "min_weight_percent": {"value": w.minimum_percent.unwrap_or(10.0)},
            })
        }),
        (None, Some(d)) => Some(json!({"slow_start_window": d.to_proto_json()})),
        (None, None) => None,
    };
    let config = match policy {
        "ROUND_ROBIN" => Some("round_robin_lb_config"),
        "LEAST_REQUEST" => Some("least_request_lb_config"),
        _ => None,
    };
    if let (Some(slow_start), Some(config)) = (slow_start, config) {
        cluster.insert(config.into(), json!({"slow_start_config": slow_start}));
    }
    json!(policy)
}

fn outlier(o: &OutlierDetection) -> Value {
    let mut m = Map::new();
    let five_xx = o.consecutive_5xx_errors;
    // The deprecated int32 field; validation refuses a negative one.
    let gateway = o.consecutive_gateway_errors.or(o.consecutive_errors.and_then(|n| u32::try_from(n).ok()));
    if let Some(n) = five_xx {
        m.insert("consecutive_5xx".into(), json!(n));
        m.insert("enforcing_consecutive_5xx".into(), json!(if n > 0 { 100 } else { 0 }));
    } else {
        // Istio turns 5xx detection off unless it is asked for.
        m.insert("enforcing_consecutive_5xx".into(), json!(0));
    }
    if let Some(n) = gateway {
        m.insert("consecutive_gateway_failure".into(), json!(n));
        m.insert("enforcing_consecutive_gateway_failure".into(), json!(if n > 0 { 100 } else { 0 }));
    }
    if let Some(n) = o.consecutive_local_origin_failures {
        m.insert("consecutive_local_origin_failure".into(), json!(n));
        m.insert("enforcing_consecutive_local_origin_failure".into(), json!(100));
    }
    if let Some(b) = o.split_external_local_origin_errors {
        m.insert("split_external_local_origin_errors".into(), json!(b));
    }
    ejection(o, &mut m);
    Value::Object(m)
}

/// How often hosts are judged and for how long they are ejected, with success-rate ejection
/// off (Istio never turns it on): what Envoy's and gRPC's outlier detection share.
pub(super) fn ejection(o: &OutlierDetection, m: &mut Map<String, Value>) {
    if let Some(d) = o.interval {
        m.insert("interval".into(), json!(d.to_proto_json()));
    }
    if let Some(d) = o.base_ejection_time {
        m.insert("base_ejection_time".into(), json!(d.to_proto_json()));
    }
    if let Some(p) = o.max_ejection_percent {
        m.insert("max_ejection_percent".into(), json!(p));
    }
    m.insert("enforcing_success_rate".into(), json!(0));
}
