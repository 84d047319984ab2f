//! RDS: one route configuration per outbound HTTP port, a virtual host per service, routes from
//! VirtualService `http` (first match wins) or Istio's default route.

use std::collections::{BTreeSet, HashSet};

use serde_json::{Map, Value, json};

use super::cluster::{Effective, destination_rule};
use super::proxy::Proxy;
use super::{Resource, fraction, object, outbound_cluster_name, typed};
use crate::model::IstioObject;
use crate::model::common::{MatchKind, StringMatch, labels_match};
use crate::model::sidecar::{EgressListener, OutboundMode};
use crate::model::virtual_service::{
    Destination, HeaderOperations, Headers, HttpMatchRequest, HttpRoute, VirtualServiceSpec,
};
use crate::snapshot::{MeshService, host_matches, resolve_host};

/// An outbound HTTP port and the egress listener whose hosts it serves.
pub(super) struct HttpPort {
    /// Route configuration name (the port number, as Istio names it).
    pub route_name: String,
    /// The port.
    pub port: u32,
    /// Egress listener (hosts scoping; port/bind when explicit).
    pub listener: EgressListener,
}

/// The outbound HTTP ports of the proxy: explicit Sidecar egress ports first, then every HTTP
/// port of the services the catch-all egress listener imports.
pub(super) fn http_ports(proxy: &Proxy<'_>) -> Vec<HttpPort> {
    let listeners = proxy.egress_listeners();
    let mut out: Vec<HttpPort> = Vec::new();
    let mut taken = BTreeSet::new();
    for l in listeners.iter().filter(|l| l.port.is_some()) {
        let p = l.port.as_ref().expect("filtered");
        if p.protocol().is_http() && taken.insert(p.number) {
            out.push(HttpPort { route_name: p.number.to_string(), port: p.number, listener: l.clone() });
        }
    }
    if let Some(catch_all) = listeners.iter().find(|l| l.port.is_none()) {
        let ports: BTreeSet<u32> = proxy
            .services_for(catch_all)
            .iter()
            .flat_map(|s| s.ports.iter().filter(|p| p.protocol.is_http()).map(|p| p.port))
            .collect();
        for port in ports {
            if taken.insert(port) {
                out.push(HttpPort { route_name: port.to_string(), port, listener: catch_all.clone() });
            }
        }
    }
    out
}

/// All route configurations of the proxy.
pub(super) fn build(proxy: &mut Proxy<'_>) -> Vec<Resource> {
    tables(proxy)
        .into_iter()
        .map(|table| {
            let mut hosts: Vec<Value> = (0..table.hosts.len()).map(|i| virtual_host(proxy, &table, i).body).collect();
            hosts.push(catch_all_host(proxy).body);
            let mut body = shell(&table);
            body.as_object_mut()
                .expect("shell is an object")
                .insert(super::VIRTUAL_HOSTS_FIELD.into(), Value::Array(hosts));
            Resource { name: table.name, body }
        })
        .collect()
}

/// One outbound route configuration's layout: the services that get a virtual host, in order,
/// with the domains each keeps. It depends on the services and the proxy's class only, not on
/// VirtualServices, so a VirtualService change re-translates single virtual hosts within it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTable {
    /// Route configuration name (the port, as Istio names it).
    pub name: String,
    /// The port.
    pub port: u32,
    /// One entry per virtual host, in order; the catch-all host (`allow_any` or `block_all`)
    /// follows them.
    pub hosts: Vec<TableHost>,
}

/// A service's virtual host in a [`RouteTable`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableHost {
    /// The service's hostname.
    pub service: String,
    /// Its domains: a domain an earlier virtual host took is left out, as Envoy rejects a
    /// domain used by two virtual hosts of one route configuration.
    pub domains: Vec<String>,
}

impl RouteTable {
    /// Indices of the virtual hosts whose routes a change of the VirtualServices naming
    /// `hosts` (resolved, possibly wildcards) may change.
    pub fn affected<'a>(&'a self, hosts: &'a BTreeSet<String>) -> impl Iterator<Item = usize> + 'a {
        let wildcards: Vec<&String> = hosts.iter().filter(|h| h.starts_with('*')).collect();
        self.hosts.iter().enumerate().filter_map(move |(i, h)| {
            (hosts.contains(&h.service) || wildcards.iter().any(|w| host_matches(w, &h.service))).then_some(i)
        })
    }
}

/// The layouts of the proxy's route configurations.
pub(super) fn tables(proxy: &Proxy<'_>) -> Vec<RouteTable> {
    http_ports(proxy).iter().map(|hp| table(proxy, hp)).collect()
}

fn table(proxy: &Proxy<'_>, hp: &HttpPort) -> RouteTable {
    let mut used = HashSet::new();
    let mut hosts = Vec::new();
    for service in proxy.services_for(&hp.listener) {
        if !service.ports.iter().any(|p| p.port == hp.port && p.protocol.is_http()) {
            continue;
        }
        let mut domains = Vec::new();
        for n in spellings(service, &proxy.node.namespace) {
            let with_port = format!("{n}:{}", hp.port);
            for d in [n, with_port] {
                if used.insert(d.clone()) {
                    domains.push(d);
                }
            }
        }
        hosts.push(TableHost { service: service.hostname.clone(), domains });
    }
    RouteTable { name: hp.route_name.clone(), port: hp.port, hosts }
}

/// The names a client in `namespace` may reach `service` by, without a port: its FQDN,
/// `<name>.<ns>.svc`, `<name>.<ns>`, the bare name from its own namespace, and its VIPs.
pub(super) fn spellings(service: &MeshService, namespace: &str) -> Vec<String> {
    let mut names = vec![service.hostname.clone()];
    if let Some(short) = service.hostname.strip_suffix(&format!(".svc.{}", crate::snapshot::DOMAIN_SUFFIX)) {
        names.push(format!("{short}.svc"));
        names.push(short.to_string());
        if service.namespace == namespace {
            names.push(short.split('.').next().unwrap_or(short).to_string());
        }
    }
    names.extend(service.addresses.iter().filter(|a| !a.contains('/')).cloned());
    names
}

/// A route configuration without its virtual hosts.
pub(super) fn shell(table: &RouteTable) -> Value {
    object([
        ("name", Value::String(table.name.clone())),
        ("validate_clusters", Value::Bool(false)),
        ("ignore_port_in_host_matching", Value::Bool(true)),
    ])
}

/// The virtual host of `table.hosts[index]`, named as Envoy names it (`<host>:<port>`): the
/// routes of the service's VirtualService, or Istio's default route.
pub(super) fn virtual_host(proxy: &mut Proxy<'_>, table: &RouteTable, index: usize) -> Resource {
    let entry = &table.hosts[index];
    // A table outlives its snapshot only while every change since is patchable, and a change
    // that removes a service is not.
    let service = proxy.snapshot.services.get(&entry.service).expect("a route table's services are in the snapshot");
    let routes = match proxy.snapshot.port_routing(service, &proxy.node.namespace).http_routes() {
        Some((vs, routes)) => vs_routes(proxy, vs, routes, service, table.port),
        None => vec![default_route(&outbound_cluster_name(table.port, "", &service.hostname), None)],
    };
    let name = format!("{}:{}", service.hostname, table.port);
    let body = object([
        ("name", Value::String(name.clone())),
        ("domains", Value::from(entry.domains.clone())),
        ("routes", Value::Array(routes)),
        ("include_request_attempt_count", Value::Bool(true)),
    ]);
    Resource { name, body }
}

/// The last virtual host of every route configuration: `*` to the passthrough cluster, or a
/// 502 under REGISTRY_ONLY.
pub(super) fn catch_all_host(proxy: &Proxy<'_>) -> Resource {
    let (name, body) = match proxy.outbound_mode() {
        OutboundMode::AllowAny => ("allow_any", {
            json!({"name": "allow_any", "domains": ["*"], "routes": [{"name": "allow_any", "match": {"prefix": "/"}, "route": {"cluster": "PassthroughCluster", "timeout": "0s", "max_stream_duration": {"max_stream_duration": "0s", "grpc_timeout_header_max": "0s"}}}], "include_request_attempt_count": true})
        }),
        OutboundMode::RegistryOnly => ("block_all", {
            json!({"name": "block_all", "domains": ["*"], "routes": [{"name": "block_all", "match": {"prefix": "/"}, "direct_response": {"status": 502}}], "include_request_attempt_count": true})
        }),
    };
    Resource { name: name.to_string(), body }
}

/// The conditions Istio retries on when a VirtualService does not say.
const DEFAULT_RETRY_ON: &str = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";

/// A retry policy of `attempts` on `retry_on`, trying other hosts than the ones that failed.
fn retry_policy(retry_on: &str, attempts: i32) -> Value {
    json!({"retry_on": retry_on, "num_retries": attempts,
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": typed("envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate", json!({}))}],
        "host_selection_retry_max_attempts": "5"})
}

/// Istio's default retry policy.
fn default_retry() -> Value {
    let mut p = retry_policy(DEFAULT_RETRY_ON, 2);
    p["retriable_status_codes"] = json!([503]);
    p
}

fn default_route(cluster: &str, hash: Option<Vec<Value>>) -> Value {
    let mut action = object([
        ("cluster", Value::from(cluster)),
        ("timeout", Value::from("0s")),
        ("retry_policy", default_retry()),
        ("max_stream_duration", json!({"max_stream_duration": "0s", "grpc_timeout_header_max": "0s"})),
    ]);
    if let Some(h) = hash {
        action["hash_policy"] = Value::Array(h);
    }
    let operation = format!("{}/*", cluster.rsplit('|').next().unwrap_or(cluster));
    object([
        ("name", Value::from("default")),
        ("match", json!({"prefix": "/"})),
        ("route", action),
        ("decorator", object([("operation", Value::String(operation))])),
    ])
}

/// True when `m` applies to this proxy on `port`.
fn applies(proxy: &Proxy<'_>, m: &HttpMatchRequest, port: u32) -> bool {
    m.port.is_none_or(|p| p == port)
        && labels_match(&m.source_labels, &proxy.labels)
        && m.source_namespace.as_ref().is_none_or(|ns| *ns == proxy.node.namespace)
        && (m.gateways.is_empty() || m.gateways.iter().any(|g| g == "mesh"))
}

/// The Envoy routes of `routes`, the HTTP routes of `vs` that apply to this proxy.
fn vs_routes(
    proxy: &mut Proxy<'_>,
    vs: &IstioObject<VirtualServiceSpec>,
    routes: &[HttpRoute],
    service: &MeshService,
    port: u32,
) -> Vec<Value> {
    let mut out = Vec::new();
    for (i, route) in routes.iter().enumerate() {
        if route.delegate.is_some() {
            continue;
        }
        let matches: Vec<Option<&HttpMatchRequest>> = if route.matches.is_empty() {
            vec![None]
        } else {
            route.matches.iter().filter(|m| applies(proxy, m, port)).map(Some).collect()
        };
        for m in matches {
            let mut r = Map::new();
            let name = match (route.name.as_deref(), m.and_then(|m| m.name.as_deref())) {
                (Some(a), Some(b)) => Some(format!("{a}.{b}")),
                (a, b) => a.or(b).map(str::to_string),
            };
            if let Some(n) = name {
                r.insert("name".into(), json!(n));
            }
            r.insert("match".into(), route_match(m));
            action(proxy, vs, i, route, service, port, &mut r);
            r.insert("decorator".into(), json!({"operation": format!("{}:{port}/*", service.hostname)}));
            out.push(Value::Object(r));
        }
    }
    out
}

fn string_matcher(m: &StringMatch, ignore_case: bool) -> Value {
    let mut v = match m.kind() {
        Some(MatchKind::Exact(s)) => json!({"exact": s}),
        Some(MatchKind::Prefix(s)) => json!({"prefix": s}),
        Some(MatchKind::Regex(s)) => json!({"safe_regex": {"regex": s}}),
        None => json!({"prefix": ""}),
    };
    if ignore_case && m.regex.is_none() {
        v["ignore_case"] = json!(true);
    }
    v
}

fn header_matcher(name: &str, m: &StringMatch, invert: bool) -> Value {
    let mut h = if m.kind().is_none() {
        json!({"name": name, "present_match": true})
    } else {
        json!({"name": name, "string_match": string_matcher(m, false)})
    };
    if invert {
        h["invert_match"] = json!(true);
    }
    h
}

fn route_match(m: Option<&HttpMatchRequest>) -> Value {
    let Some(m) = m else { return json!({"prefix": "/"}) };
    let mut out = Map::new();
    match m.uri.as_ref().and_then(StringMatch::kind) {
        Some(MatchKind::Exact(p)) => out.insert("path".into(), json!(p)),
        Some(MatchKind::Prefix(p)) => out.insert("prefix".into(), json!(p)),
        Some(MatchKind::Regex(r)) => out.insert("safe_regex".into(), json!({"regex": r})),
        None => out.insert("prefix".into(), json!("/")),
    };
    if m.ignore_uri_case {
        out.insert("case_sensitive".into(), json!(false));
    }
    let mut headers = Vec::new();
    for (pseudo, sm) in [(":method", &m.method), (":authority", &m.authority), (":scheme", &m.scheme)] {
        if let Some(sm) = sm {
            headers.push(header_matcher(pseudo, sm, false));
        }
    }
    for (name, sm) in &m.headers {
        headers.push(header_matcher(name, sm, false));
    }
    for (name, sm) in &m.without_headers {
        headers.push(header_matcher(name, sm, true));
    }
    if !headers.is_empty() {
        out.insert("headers".into(), json!(headers));
    }
    if !m.query_params.is_empty() {
        let q: Vec<Value> = m
            .query_params
            .iter()
            .map(|(name, sm)| match sm.kind() {
                Some(MatchKind::Exact("")) | None => json!({"name": name, "present_match": true}),
                _ => json!({"name": name, "string_match": string_matcher(sm, false)}),
            })
            .collect();
        out.insert("query_parameters".into(), json!(q));
    }
    Value::Object(out)
}

/// The cluster a destination names, from a route on `port`.
fn cluster_for(proxy: &Proxy<'_>, vs_ns: &str, d: &Destination, port: u32) -> String {
    let fqdn = resolve_host(&d.host, vs_ns);
    let service = proxy.snapshot.services.get(&fqdn);
    let dest_port = d.port.map(|p| p.number).or_else(|| match service {
        Some(s) if s.ports.len() == 1 => Some(s.ports[0].port),
        _ => None,
    });
    outbound_cluster_name(dest_port.unwrap_or(port), d.subset.as_deref().unwrap_or(""), &fqdn)
}

/// Route-level `hash_policy` from the destination's consistentHash settings.
fn hash_policy(proxy: &Proxy<'_>, vs_ns: &str, d: &Destination, port: u32) -> Option<Vec<Value>> {
    let service = proxy.snapshot.services.get(&resolve_host(&d.host, vs_ns))?;
    let dr = destination_rule(proxy, service)?;
    let policy = Effective::resolve(Some(&dr.spec), d.subset.as_deref(), d.port.map_or(port, |p| p.number));
    let ch = policy.load_balancer?.consistent_hash?;
    let h = if let Some(name) = ch.http_header_name {
        json!({"header": {"header_name": name}})
    } else if let Some(c) = ch.http_cookie {
        let mut cookie = json!({"name": c.name});
        if let Some(p) = c.path {
            cookie["path"] = json!(p);
        }
        if let Some(t) = c.ttl {
            cookie["ttl"] = json!(t.to_proto_json());
        }
        json!({"cookie": cookie})
    } else if ch.use_source_ip == Some(true) {
        json!({"connection_properties": {"source_ip": true}})
    } else {
        json!({"query_parameter": {"name": ch.http_query_parameter_name?}})
    };
    Some(vec![h])
}

fn header_ops(ops: &HeaderOperations, prefix: &str, out: &mut Map<String, Value>) {
    let mut add = Vec::new();
    for (k, v) in &ops.set {
        add.push(json!({"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}));
    }
    for (k, v) in &ops.add {
        add.push(json!({"header": {"key": k, "value": v}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}));
    }
    if !add.is_empty() {
        out.insert(format!("{prefix}_headers_to_add"), json!(add));
    }
    if !ops.remove.is_empty() {
        out.insert(format!("{prefix}_headers_to_remove"), json!(ops.remove));
    }
}

fn apply_headers(h: Option<&Headers>, out: &mut Map<String, Value>) {
    if let Some(h) = h {
        if let Some(r) = &h.request {
            header_ops(r, "request", out);
        }
        if let Some(r) = &h.response {
            header_ops(r, "response", out);
        }
    }
}

fn grpc_code(name: &str) -> Option<u32> {
    const CODES: &[&str] = &[
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    CODES.iter().position(|c| *c == name).map(|i| i as u32).or_else(|| name.parse().ok())
}

#[allow(clippy::too_many_arguments)]
fn action(
    proxy: &mut Proxy<'_>,
    vs: &IstioObject<VirtualServiceSpec>,
    index: usize,
    route: &HttpRoute,
    service: &MeshService,
    port: u32,
    r: &mut Map<String, Value>,
) {
    let ns = vs.meta.namespace.as_str();
    apply_headers(route.headers.as_ref(), r);
    let mut per_filter = Map::new();
    if let Some(fault) = &route.fault {
        let mut f = Map::new();
        if let Some(d) = &fault.delay {
            let pct = d
                .percentage
                .map(|p| fraction(p.value))
                .or_else(|| d.percent.map(|p| json!({"numerator": p, "denominator": "HUNDRED"})));
            let mut delay = json!({"fixed_delay": d.fixed_delay.unwrap_or_default().to_proto_json()});
            delay["percentage"] = pct.unwrap_or_else(|| fraction(100.0));
            f.insert("delay".into(), delay);
        }
        if let Some(a) = &fault.abort {
            let mut abort = match (a.http_status, a.grpc_status.as_deref()) {
                (Some(s), _) => json!({"http_status": s}),
                (None, Some(g)) => json!({"grpc_status": grpc_code(g).unwrap_or(2)}),
                (None, None) => json!({}),
            };
            abort["percentage"] = a.percentage.map_or_else(|| fraction(100.0), |p| fraction(p.value));
            f.insert("abort".into(), abort);
        }
        per_filter.insert(
            "envoy.filters.http.fault".into(),
            typed("envoy.extensions.filters.http.fault.v3.HTTPFault", Value::Object(f)),
        );
    }
    if let Some(c) = &route.cors_policy {
        let mut cors = Map::new();
        let origins: Vec<Value> = c.allow_origins.iter().map(|o| string_matcher(o, false)).collect();
        cors.insert("allow_origin_string_match".into(), json!(origins));
        for (field, list) in [
            ("allow_methods", &c.allow_methods),
            ("allow_headers", &c.allow_headers),
            ("expose_headers", &c.expose_headers),
        ] {
            if !list.is_empty() {
                cors.insert(field.into(), json!(list.join(",")));
            }
        }
        if let Some(m) = c.max_age {
            cors.insert("max_age".into(), json!(m.0.as_secs().to_string()));
        }
        if let Some(b) = c.allow_credentials {
            cors.insert("allow_credentials".into(), json!(b));
        }
        per_filter.insert(
            "envoy.filters.http.cors".into(),
            typed("envoy.extensions.filters.http.cors.v3.CorsPolicy", Value::Object(cors)),
        );
    }
    if !per_filter.is_empty() {
        r.insert("typed_per_filter_config".into(), Value::Object(per_filter));
    }
    if let Some(red) = &route.redirect {
        let mut v = Map::new();
        if let Some(u) = &red.uri {
            v.insert("path_redirect".into(), json!(u));
        }
        if let Some(a) = &red.authority {
            v.insert("host_redirect".into(), json!(a));
        }
        if let Some(p) = red.port {
            v.insert("port_redirect".into(), json!(p));
        }
        if let Some(s) = &red.scheme {
            v.insert("scheme_redirect".into(), json!(s));
        }
        let code = match red.redirect_code.unwrap_or(301) {
            302 => "FOUND",
            303 => "SEE_OTHER",
            307 => "TEMPORARY_REDIRECT",
            308 => "PERMANENT_REDIRECT",
            _ => "MOVED_PERMANENTLY",
        };
        v.insert("response_code".into(), json!(code));
        r.insert("redirect".into(), Value::Object(v));
        return;
    }
    if let Some(d) = &route.direct_response {
        let mut v = json!({"status": d.status});
        if let Some(b) = &d.body {
            if let Some(s) = &b.string {
                v["body"] = json!({"inline_string": s});
            } else if let Some(bytes) = &b.bytes {
                v["body"] = json!({"inline_bytes": bytes});
            }
        }
        r.insert("direct_response".into(), v);
        return;
    }
    let mut a = Map::new();
    let live = crate::model::virtual_service::live_destinations(&route.route);
    if let [(single, _)] = live.as_slice() {
        a.insert("cluster".into(), json!(cluster_for(proxy, ns, &single.destination, port)));
        apply_headers(single.headers.as_ref(), r);
    } else {
        let clusters: Vec<Value> = live
            .iter()
            .map(|(d, weight)| {
                let mut c = Map::new();
                c.insert("name".into(), json!(cluster_for(proxy, ns, &d.destination, port)));
                c.insert("weight".into(), json!(weight));
                apply_headers(d.headers.as_ref(), &mut c);
                Value::Object(c)
            })
            .collect();
        a.insert("weighted_clusters".into(), object([("clusters", Value::Array(clusters))]));
    }
    if let Some((first, _)) = live.first()
        && let Some(h) = hash_policy(proxy, ns, &first.destination, port)
    {
        a.insert("hash_policy".into(), Value::Array(h));
    }
    a.insert("timeout".into(), json!(route.timeout.map_or("0s".into(), |t| t.to_proto_json())));
    match &route.retries {
        None => {
            a.insert("retry_policy".into(), default_retry());
        }
        Some(rt) if rt.attempts > 0 => {
            let mut on = Vec::new();
            let mut codes = Vec::new();
            for c in rt.retry_on.as_deref().unwrap_or(DEFAULT_RETRY_ON).split(',') {
                let c = c.trim();
                match c.parse::<u32>() {
                    Ok(code) => codes.push(code),
                    Err(_) if !c.is_empty() => on.push(c.to_string()),
                    Err(_) => {}
                }
            }
            if !codes.is_empty() && !on.iter().any(|c| c == "retriable-status-codes") {
                on.push("retriable-status-codes".into());
            }
            let mut p = retry_policy(&on.join(","), rt.attempts);
            if !codes.is_empty() {
                p["retriable_status_codes"] = json!(codes);
            }
            if let Some(t) = rt.per_try_timeout {
                p["per_try_timeout"] = json!(t.to_proto_json());
            }
            a.insert("retry_policy".into(), p);
        }
        Some(_) => {}
    }
    if let Some(rw) = &route.rewrite {
        if let Some(u) = &rw.uri {
            a.insert("prefix_rewrite".into(), json!(u));
        }
        if let Some(rr) = &rw.uri_regex_rewrite {
            a.insert("regex_rewrite".into(), json!({"pattern": {"regex": rr.pattern}, "substitution": rr.rewrite}));
        }
        if let Some(auth) = &rw.authority {
            a.insert("host_rewrite_literal".into(), json!(auth));
        }
    }
    let mut mirrors = Vec::new();
    if let Some(m) = &route.mirror {
        let pct = route.mirror_percentage.map_or(100.0, |p| p.value);
        mirrors.push(json!({"cluster": cluster_for(proxy, ns, m, port), "runtime_fraction": {"default_value": fraction(pct)}, "trace_sampled": false}));
    }
    for m in &route.mirrors {
        let pct = m.percentage.map_or(100.0, |p| p.value);
        mirrors.push(json!({"cluster": cluster_for(proxy, ns, &m.destination, port), "runtime_fraction": {"default_value": fraction(pct)}, "trace_sampled": false}));
    }
    if !mirrors.is_empty() {
        a.insert("request_mirror_policies".into(), json!(mirrors));
    }
    a.insert("max_stream_duration".into(), json!({"max_stream_duration": "0s", "grpc_timeout_header_max": "0s"}));
    if live.is_empty() {
        proxy.warn(
            crate::diagnostic::ObjectRef::new("VirtualService", ns, &vs.meta.name),
            format!("spec.http[{index}].route"),
            format!("every destination has weight 0; requests to {} on this route get 503", service.hostname),
        );
        r.insert("direct_response".into(), json!({"status": 503}));
        return;
    }
    r.insert("route".into(), Value::Object(a));
}
