//! `networking.istio.io` VirtualService: types and Istio's validation rules.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::common::{
    Duration, Percent, PortSelector, StringMatch, validate_export_to, validate_host, validate_percent, validate_port,
    validate_regex,
};
use crate::diagnostic::Findings;

/// VirtualService `spec`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    /// Hosts the routes apply to.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Gateways (and `mesh`) the routes apply to; empty means `mesh`.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// HTTP routes, first match wins.
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    /// TLS routes (parsed; not translated yet).
    #[serde(default)]
    pub tls: Vec<serde_json::Value>,
    /// TCP routes, first match wins.
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    /// Namespaces this VirtualService is visible to.
    #[serde(default)]
    pub export_to: Vec<String>,
}

/// One HTTP route.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    /// Route name, used in the Envoy route name.
    #[serde(default)]
    pub name: Option<String>,
    /// Match conditions, ORed; empty matches everything.
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<HttpRouteDestination>,
    /// Redirect instead of routing.
    #[serde(default)]
    pub redirect: Option<HttpRedirect>,
    /// Answer directly instead of routing.
    #[serde(default)]
    pub direct_response: Option<HttpDirectResponse>,
    /// Delegation to another VirtualService (not supported yet).
    #[serde(default)]
    pub delegate: Option<serde_json::Value>,
    /// URI / authority rewrite.
    #[serde(default)]
    pub rewrite: Option<HttpRewrite>,
    /// Request timeout.
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// Retry policy.
    #[serde(default)]
    pub retries: Option<HttpRetry>,
    /// Fault injection.
    #[serde(default)]
    pub fault: Option<HttpFaultInjection>,
    /// Mirror destination (single).
    #[serde(default)]
    pub mirror: Option<Destination>,
    /// Mirror destinations with their own percentages.
    #[serde(default)]
    pub mirrors: Vec<HttpMirrorPolicy>,
    /// Share of traffic mirrored to `mirror`.
    #[serde(default)]
    pub mirror_percentage: Option<Percent>,
    /// CORS policy.
    #[serde(default)]
    pub cors_policy: Option<CorsPolicy>,
    /// Header manipulation.
    #[serde(default)]
    pub headers: Option<Headers>,
}

impl HttpRoute {
    /// The fields of this route beyond a weighted split of connections, by their YAML names:
    /// what a back end that only balances connections (the kernel) cannot apply.
    pub fn beyond_split(&self) -> Vec<&'static str> {
        let fields = [
            ("match", !self.matches.is_empty()),
            ("redirect", self.redirect.is_some()),
            ("directResponse", self.direct_response.is_some()),
            ("rewrite", self.rewrite.is_some()),
            ("timeout", self.timeout.is_some()),
            ("retries", self.retries.is_some()),
            ("fault", self.fault.is_some()),
            ("mirror", self.mirror.is_some() || !self.mirrors.is_empty()),
            ("corsPolicy", self.cors_policy.is_some()),
            ("headers", self.headers.is_some()),
        ];
        fields.into_iter().filter(|(_, set)| *set).map(|(name, _)| name).collect()
    }

    /// True when the route applies to every request (no match conditions) and routes somewhere.
    pub fn is_catch_all(&self) -> bool {
        self.matches.is_empty() && !self.route.is_empty()
    }
}

/// Match conditions of an HTTP route; all fields must match.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatchRequest {
    /// Name, appended to the route name.
    #[serde(default)]
    pub name: Option<String>,
    /// Path match.
    #[serde(default)]
    pub uri: Option<StringMatch>,
    /// Scheme match.
    #[serde(default)]
    pub scheme: Option<StringMatch>,
    /// Method match.
    #[serde(default)]
    pub method: Option<StringMatch>,
    /// Authority (Host) match.
    #[serde(default)]
    pub authority: Option<StringMatch>,
    /// Header matches; an empty match means "present".
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    /// Destination port the route applies to.
    #[serde(default)]
    pub port: Option<u32>,
    /// Source workload labels the route applies to.
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    /// Gateways the match applies to.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Query parameter matches.
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    /// Case-insensitive URI matching.
    #[serde(default)]
    pub ignore_uri_case: bool,
    /// Headers that must not match.
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    /// Source namespace the route applies to.
    #[serde(default)]
    pub source_namespace: Option<String>,
}

/// A destination host, subset and port.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    /// Service host (short names resolve in the VirtualService's namespace).
    #[serde(default)]
    pub host: String,
    /// DestinationRule subset.
    #[serde(default)]
    pub subset: Option<String>,
    /// Service port; needed when the service has several.
    #[serde(default)]
    pub port: Option<PortSelector>,
}

/// A weighted HTTP destination.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteDestination {
    /// Where to send.
    #[serde(default)]
    pub destination: Destination,
    /// Share of traffic (all weights of a route sum to 100).
    #[serde(default)]
    pub weight: Option<i32>,
    /// Header manipulation for this destination.
    #[serde(default)]
    pub headers: Option<Headers>,
}

/// Request and response header operations.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Headers {
    /// On the request.
    #[serde(default)]
    pub request: Option<HeaderOperations>,
    /// On the response.
    #[serde(default)]
    pub response: Option<HeaderOperations>,
}

/// Set, add and remove header operations.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderOperations {
    /// Overwrite.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Append.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// HTTP redirect.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRedirect {
    /// Replacement path.
    #[serde(default)]
    pub uri: Option<String>,
    /// Replacement authority.
    #[serde(default)]
    pub authority: Option<String>,
    /// Replacement port.
    #[serde(default)]
    pub port: Option<u32>,
    /// Replacement scheme.
    #[serde(default)]
    pub scheme: Option<String>,
    /// Status code (default 301).
    #[serde(default)]
    pub redirect_code: Option<u32>,
}

/// Direct response.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpDirectResponse {
    /// Status code.
    #[serde(default)]
    pub status: u32,
    /// Body.
    #[serde(default)]
    pub body: Option<HttpBody>,
}

/// Direct response body.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpBody {
    /// Text body.
    #[serde(default)]
    pub string: Option<String>,
    /// Base64 body.
    #[serde(default)]
    pub bytes: Option<String>,
}

/// Rewrite before forwarding.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRewrite {
    /// Replaces the matched prefix (or the whole path).
    #[serde(default)]
    pub uri: Option<String>,
    /// Replaces the authority.
    #[serde(default)]
    pub authority: Option<String>,
    /// Regex rewrite of the path.
    #[serde(default)]
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

/// Regex path rewrite.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegexRewrite {
    /// The pattern.
    #[serde(default, rename = "match")]
    pub pattern: String,
    /// The substitution.
    #[serde(default)]
    pub rewrite: String,
}

/// Retry policy.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRetry {
    /// Number of retries; 0 disables retries.
    #[serde(default)]
    pub attempts: i32,
    /// Timeout per try.
    #[serde(default)]
    pub per_try_timeout: Option<Duration>,
    /// Envoy retry conditions, comma separated; numbers are retriable status codes.
    #[serde(default)]
    pub retry_on: Option<String>,
    /// Retry on other localities.
    #[serde(default)]
    pub retry_remote_localities: Option<bool>,
}

/// Fault injection.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpFaultInjection {
    /// Delay before forwarding.
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    /// Abort with a status.
    #[serde(default)]
    pub abort: Option<FaultAbort>,
}

/// Fault delay.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    /// The delay.
    #[serde(default)]
    pub fixed_delay: Option<Duration>,
    /// Share of requests delayed.
    #[serde(default)]
    pub percentage: Option<Percent>,
    /// Deprecated integer percentage.
    #[serde(default)]
    pub percent: Option<i32>,
}

/// Fault abort.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// HTTP status to answer with.
    #[serde(default)]
    pub http_status: Option<i32>,
    /// gRPC status to answer with.
    #[serde(default)]
    pub grpc_status: Option<String>,
    /// Share of requests aborted.
    #[serde(default)]
    pub percentage: Option<Percent>,
}

/// One mirror with its percentage.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpMirrorPolicy {
    /// Mirror destination.
    #[serde(default)]
    pub destination: Destination,
    /// Share mirrored.
    #[serde(default)]
    pub percentage: Option<Percent>,
}

/// CORS policy.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CorsPolicy {
    /// Allowed origins.
    #[serde(default)]
    pub allow_origins: Vec<StringMatch>,
    /// Allowed methods.
    #[serde(default)]
    pub allow_methods: Vec<String>,
    /// Allowed request headers.
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Exposed response headers.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Preflight cache duration.
    #[serde(default)]
    pub max_age: Option<Duration>,
    /// Allow credentials.
    #[serde(default)]
    pub allow_credentials: Option<bool>,
}

/// One TCP route.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpRoute {
    /// Match conditions, ORed.
    #[serde(default, rename = "match")]
    pub matches: Vec<L4MatchAttributes>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

/// L4 match conditions.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct L4MatchAttributes {
    /// Destination subnets.
    #[serde(default)]
    pub destination_subnets: Vec<String>,
    /// Destination port.
    #[serde(default)]
    pub port: Option<u32>,
    /// Source workload labels.
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    /// Gateways.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Source namespace.
    #[serde(default)]
    pub source_namespace: Option<String>,
}

/// The client a route decision is made for: a proxy knows its own, the kernel's entries are
/// shared by every client on a node and know none.
#[derive(Debug, Clone, Copy)]
pub enum Client<'a> {
    /// One workload: its labels and namespace.
    Workload {
        /// Its labels.
        labels: &'a BTreeMap<String, String>,
        /// Its namespace.
        namespace: &'a str,
    },
    /// Any client.
    Unknown,
}

/// Which TCP route of a VirtualService a connection to `port` of a service with `addresses`
/// takes, from `client`. Ok(None): no route applies. Err(i): route `i` may apply or not
/// depending on the client (its match names source labels or a source namespace) and the
/// client is unknown, so no single answer is right.
pub fn tcp_route<'a>(
    routes: &'a [TcpRoute],
    port: u32,
    addresses: &[String],
    client: Client<'_>,
) -> Result<Option<&'a TcpRoute>, usize> {
    for (i, r) in routes.iter().enumerate() {
        if r.matches.is_empty() {
            return Ok(Some(r));
        }
        let mut undecided = false;
        for m in &r.matches {
            let here = m.port.is_none_or(|p| p == port)
                && (m.destination_subnets.is_empty()
                    || addresses.iter().any(|a| {
                        let ip = a.parse::<std::net::IpAddr>();
                        m.destination_subnets.iter().any(|s| {
                            super::parse_cidr(s).zip(ip.as_ref().ok()).is_some_and(|(net, ip)| net.contains(ip))
                        })
                    }));
            if !here {
                continue;
            }
            match client {
                Client::Workload { labels, namespace } => {
                    if super::common::labels_match(&m.source_labels, labels)
                        && m.source_namespace.as_ref().is_none_or(|ns| ns == namespace)
                    {
                        return Ok(Some(r));
                    }
                }
                Client::Unknown if m.source_labels.is_empty() && m.source_namespace.is_none() => return Ok(Some(r)),
                Client::Unknown => undecided = true,
            }
        }
        if undecided {
            return Err(i);
        }
    }
    Ok(None)
}

/// A weighted L4 destination.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteDestination {
    /// Where to send.
    #[serde(default)]
    pub destination: Destination,
    /// Share of connections.
    #[serde(default)]
    pub weight: Option<i32>,
}

/// A weighted destination of an HTTP or a TCP route.
pub trait Weighted {
    /// Where it sends.
    fn destination(&self) -> &Destination;
    /// Its weight as written.
    fn weight(&self) -> Option<i32>;
}

impl Weighted for HttpRouteDestination {
    fn destination(&self) -> &Destination {
        &self.destination
    }
    fn weight(&self) -> Option<i32> {
        self.weight
    }
}

impl Weighted for RouteDestination {
    fn destination(&self) -> &Destination {
        &self.destination
    }
    fn weight(&self) -> Option<i32> {
        self.weight
    }
}

/// The destinations of a route that get traffic, with their weights, as Istio reads them: a
/// lone destination takes everything whatever its weight says; of several, one without a weight
/// (or with 0) gets nothing. Every back end splits by this, so Envoy and the kernel agree.
pub fn live_destinations<W: Weighted>(route: &[W]) -> Vec<(&W, u32)> {
    if let [only] = route {
        return vec![(only, 100)];
    }
    route
        .iter()
        .filter_map(|d| d.weight().and_then(|w| u32::try_from(w).ok()).filter(|w| *w > 0).map(|w| (d, w)))
        .collect()
}

/// Checks a list of weighted destinations the way Istio's validation does.
fn validate_weights<'a>(
    path: &str,
    items: impl Iterator<Item = (&'a Destination, Option<i32>)>,
    findings: &mut Findings,
) {
    let items: Vec<_> = items.collect();
    let mut sum = 0i64;
    for (i, (dest, weight)) in items.iter().enumerate() {
        validate_destination(&format!("{path}[{i}].destination"), dest, findings);
        if let Some(w) = weight {
            if *w < 0 {
                findings.error(format!("{path}[{i}].weight"), format!("weight {w} must not be negative"));
            }
            // Istio's int32 weights, summed wide: a sum that wraps must never pass as 100.
            sum += i64::from(*w);
        }
    }
    if items.len() > 1 && sum != 100 {
        findings.error(path, format!("weights of {} destinations sum to {sum}; they must sum to 100", items.len()));
    }
}

/// Checks one destination.
pub fn validate_destination(path: &str, dest: &Destination, findings: &mut Findings) {
    if dest.host.is_empty() {
        findings.error(format!("{path}.host"), "destination host is required");
    } else {
        validate_host(&format!("{path}.host"), &dest.host, false, findings);
    }
    if let Some(p) = dest.port {
        validate_port(&format!("{path}.port.number"), p.number, findings);
    }
    if let Some(s) = &dest.subset
        && s.is_empty()
    {
        findings.error(format!("{path}.subset"), "subset name must not be empty");
    }
}

/// Istio's VirtualService validation rules.
pub fn validate(spec: &VirtualServiceSpec, findings: &mut Findings) {
    if spec.hosts.is_empty() {
        findings.error("spec.hosts", "at least one host is required");
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        validate_host(&format!("spec.hosts[{i}]"), h, true, findings);
    }
    let mesh_only = spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == "mesh");
    if mesh_only && spec.hosts.iter().any(|h| h == "*") {
        findings.error("spec.hosts", "'*' is only allowed when the VirtualService is bound to gateways, not mesh");
    }
    validate_export_to("spec.exportTo", &spec.export_to, findings);
    if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
        findings.error("spec", "at least one of http, tcp or tls routes is required");
    }
    if !spec.tls.is_empty() {
        findings.warn("spec.tls", "TLS routes are parsed but not translated yet by sluice; they are ignored");
    }
    for (i, route) in spec.http.iter().enumerate() {
        validate_http_route(&format!("spec.http[{i}]"), route, findings);
    }
    for (i, route) in spec.tcp.iter().enumerate() {
        let path = format!("spec.tcp[{i}]");
        if route.route.is_empty() {
            findings.error(format!("{path}.route"), "a TCP route needs at least one destination");
        }
        validate_weights(&format!("{path}.route"), route.route.iter().map(|d| (&d.destination, d.weight)), findings);
        for (j, m) in route.matches.iter().enumerate() {
            if let Some(p) = m.port {
                validate_port(&format!("{path}.match[{j}].port"), p, findings);
            }
            for (k, subnet) in m.destination_subnets.iter().enumerate() {
                if super::parse_cidr(subnet).is_none() {
                    findings.error(
                        format!("{path}.match[{j}].destinationSubnets[{k}]"),
                        format!("{subnet:?} is not an IP or CIDR"),
                    );
                }
            }
        }
    }
}

fn validate_http_route(path: &str, route: &HttpRoute, findings: &mut Findings) {
    let actions =
        [!route.route.is_empty(), route.redirect.is_some(), route.direct_response.is_some(), route.delegate.is_some()]
            .iter()
            .filter(|x| **x)
            .count();
    if actions == 0 {
        findings.error(path, "one of route, redirect, directResponse or delegate is required");
    } else if actions > 1 {
        findings.error(path, "only one of route, redirect, directResponse or delegate may be set");
    }
    if route.delegate.is_some() {
        findings.warn(format!("{path}.delegate"), "delegation is not supported yet by sluice; this route is ignored");
    }
    if route.redirect.is_some() && route.rewrite.is_some() {
        findings.error(format!("{path}.rewrite"), "rewrite cannot be combined with redirect");
    }
    for (i, m) in route.matches.iter().enumerate() {
        let mp = format!("{path}.match[{i}]");
        for (field, sm) in [("uri", &m.uri), ("scheme", &m.scheme), ("method", &m.method), ("authority", &m.authority)]
        {
            if let Some(sm) = sm {
                sm.validate(&format!("{mp}.{field}"), findings);
            }
        }
        for (field, map) in
            [("headers", &m.headers), ("queryParams", &m.query_params), ("withoutHeaders", &m.without_headers)]
        {
            for (name, sm) in map {
                if name.is_empty() || name.chars().any(|c| c.is_ascii_uppercase()) && field != "queryParams" {
                    findings.error(format!("{mp}.{field}.{name}"), "header names must be non-empty and lowercase");
                }
                // An empty match object means "present" for headers, so only check set ones.
                if sm.exact.is_some() || sm.prefix.is_some() || sm.regex.is_some() {
                    sm.validate(&format!("{mp}.{field}.{name}"), findings);
                } else if field == "queryParams" {
                    findings.error(format!("{mp}.{field}.{name}"), "exactly one of exact, prefix or regex must be set");
                }
            }
        }
        if let Some(p) = m.port {
            validate_port(&format!("{mp}.port"), p, findings);
        }
    }
    validate_weights(&format!("{path}.route"), route.route.iter().map(|d| (&d.destination, d.weight)), findings);
    if let Some(r) = &route.redirect {
        if r.uri.is_none() && r.authority.is_none() && r.port.is_none() && r.scheme.is_none() {
            findings
                .error(format!("{path}.redirect"), "redirect must set at least one of uri, authority, port or scheme");
        }
        if let Some(code) = r.redirect_code
            && ![301, 302, 303, 307, 308].contains(&code)
        {
            findings.error(
                format!("{path}.redirect.redirectCode"),
                format!("{code} is not a redirect status (301, 302, 303, 307, 308)"),
            );
        }
    }
    if let Some(d) = &route.direct_response
        && !(200..=599).contains(&d.status)
    {
        findings
            .error(format!("{path}.directResponse.status"), format!("status {} must be between 200 and 599", d.status));
    }
    if let Some(rw) = &route.rewrite {
        if rw.uri.is_some() && rw.uri_regex_rewrite.is_some() {
            findings.error(format!("{path}.rewrite"), "uri and uriRegexRewrite cannot both be set");
        }
        if let Some(rr) = &rw.uri_regex_rewrite {
            validate_regex(&format!("{path}.rewrite.uriRegexRewrite.match"), &rr.pattern, findings);
        }
    }
    if let Some(r) = &route.retries {
        if r.attempts < 0 {
            findings.error(format!("{path}.retries.attempts"), "attempts must not be negative");
        }
        if let Some(on) = &r.retry_on {
            for cond in on.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                let known = RETRY_ON.contains(&cond) || cond.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c));
                if !known {
                    findings.error(
                        format!("{path}.retries.retryOn"),
                        format!("{cond:?} is not an Envoy retry condition or HTTP status"),
                    );
                }
            }
        }
    }
    if let Some(fault) = &route.fault {
        let fp = format!("{path}.fault");
        if fault.delay.is_none() && fault.abort.is_none() {
            findings.error(&fp, "fault must set delay or abort");
        }
        if let Some(d) = &fault.delay {
            if d.fixed_delay.is_none() {
                findings.error(format!("{fp}.delay.fixedDelay"), "fixedDelay is required");
            } else if d.fixed_delay.is_some_and(|d| d.0.as_millis() < 1) {
                findings.error(format!("{fp}.delay.fixedDelay"), "fixedDelay must be at least 1ms");
            }
            if let Some(p) = d.percentage {
                validate_percent(&format!("{fp}.delay.percentage.value"), p.value, findings);
            }
            if let Some(p) = d.percent {
                validate_percent(&format!("{fp}.delay.percent"), p as f64, findings);
            }
        }
        if let Some(a) = &fault.abort {
            match (a.http_status, &a.grpc_status) {
                (Some(s), None) if !(200..=599).contains(&s) => {
                    findings.error(format!("{fp}.abort.httpStatus"), format!("status {s} must be between 200 and 599"))
                }
                (None, None) => findings.error(format!("{fp}.abort"), "httpStatus or grpcStatus is required"),
                (Some(_), Some(_)) => {
                    findings.error(format!("{fp}.abort"), "only one of httpStatus or grpcStatus may be set")
                }
                _ => {}
            }
            if let Some(p) = a.percentage {
                validate_percent(&format!("{fp}.abort.percentage.value"), p.value, findings);
            }
        }
    }
    if let Some(m) = &route.mirror {
        validate_destination(&format!("{path}.mirror"), m, findings);
        if !route.mirrors.is_empty() {
            findings.error(format!("{path}.mirrors"), "mirror and mirrors cannot both be set");
        }
    }
    if let Some(p) = route.mirror_percentage {
        validate_percent(&format!("{path}.mirrorPercentage.value"), p.value, findings);
    }
    for (i, m) in route.mirrors.iter().enumerate() {
        validate_destination(&format!("{path}.mirrors[{i}].destination"), &m.destination, findings);
        if let Some(p) = m.percentage {
            validate_percent(&format!("{path}.mirrors[{i}].percentage.value"), p.value, findings);
        }
    }
    if let Some(c) = &route.cors_policy {
        for (i, o) in c.allow_origins.iter().enumerate() {
            o.validate(&format!("{path}.corsPolicy.allowOrigins[{i}]"), findings);
        }
        for (i, m) in c.allow_methods.iter().enumerate() {
            if !HTTP_METHODS.contains(&m.as_str()) {
                findings.error(format!("{path}.corsPolicy.allowMethods[{i}]"), format!("{m:?} is not an HTTP method"));
            }
        }
    }
}

/// Envoy's `retry_on` conditions (router and gRPC).
const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// HTTP methods accepted in CORS and authorization rules.
pub const HTTP_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];
