//! `networking.istio.io` DestinationRule: types and Istio's validation rules.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::common::{Duration, PortSelector, WorkloadSelector, validate_export_to, validate_host, validate_port};
use crate::diagnostic::Findings;

/// DestinationRule `spec`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    /// The service host the rule applies to.
    #[serde(default)]
    pub host: String,
    /// Policy for all subsets and ports.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    /// Named subsets by endpoint labels.
    #[serde(default)]
    pub subsets: Vec<Subset>,
    /// Namespaces this rule is visible to.
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Workloads the rule applies to (as a client).
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
}

/// A subset of a service's endpoints.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    /// Subset name, used in cluster names.
    #[serde(default)]
    pub name: String,
    /// Endpoint labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Overrides of the top-level policy.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// Load balancing, connection pool, outlier detection and TLS settings.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// Load balancer.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Connection limits.
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// Outlier detection.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// Client TLS to the destination.
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
    /// Per-port overrides.
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

/// Per-port policy.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    /// The port.
    #[serde(default)]
    pub port: Option<PortSelector>,
    /// Load balancer.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Connection limits.
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// Outlier detection.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// Client TLS to the destination.
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
}

/// DestinationRule `tls`: how a client connects to the destination.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientTlsSettings {
    /// The TLS mode.
    #[serde(default)]
    pub mode: Option<ClientTlsMode>,
    /// Client certificate file (MUTUAL).
    #[serde(default)]
    pub client_certificate: Option<String>,
    /// Client private key file (MUTUAL).
    #[serde(default)]
    pub private_key: Option<String>,
    /// CA bundle file that verifies the server.
    #[serde(default)]
    pub ca_certificates: Option<String>,
    /// Certificate revocation list file.
    #[serde(default)]
    pub ca_crl: Option<String>,
    /// A Secret with the client certificate, key and CA (not supported by sluice yet).
    #[serde(default)]
    pub credential_name: Option<String>,
    /// Names the server certificate must carry (URI or DNS SANs).
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// SNI sent in the handshake.
    #[serde(default)]
    pub sni: Option<String>,
    /// Do not verify the server certificate.
    #[serde(default)]
    pub insecure_skip_verify: Option<bool>,
}

/// DestinationRule TLS modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ClientTlsMode {
    /// Plain text.
    Disable,
    /// TLS that verifies the server.
    Simple,
    /// TLS with a client certificate from files.
    Mutual,
    /// Mesh mTLS with the workload's own certificate.
    IstioMutual,
}

/// Load balancer settings: `simple` or `consistentHash`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSettings {
    /// A standard algorithm.
    #[serde(default)]
    pub simple: Option<SimpleLb>,
    /// Session affinity by hash.
    #[serde(default)]
    pub consistent_hash: Option<ConsistentHashLb>,
    /// Locality settings (parsed; not translated yet).
    #[serde(default)]
    pub locality_lb_setting: Option<serde_json::Value>,
    /// Slow start window (deprecated for `warmup`).
    #[serde(default)]
    pub warmup_duration_secs: Option<Duration>,
    /// Slow start: new endpoints' share grows over `duration`.
    #[serde(default)]
    pub warmup: Option<WarmupConfiguration>,
}

/// Istio's `WarmupConfiguration` (Envoy's slow start for round robin and least request).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmupConfiguration {
    /// The window over which traffic grows (required).
    #[serde(default)]
    pub duration: Option<Duration>,
    /// The share a new endpoint starts at, in percent (Istio's default 10).
    #[serde(default)]
    pub minimum_percent: Option<f64>,
    /// How fast it grows: 1 is linear (the default), more is faster at first.
    #[serde(default)]
    pub aggression: Option<f64>,
}

/// Istio's simple load balancers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    /// Envoy's default (LEAST_REQUEST in current Istio).
    Unspecified,
    /// Deprecated alias of LEAST_REQUEST.
    LeastConn,
    /// Random.
    Random,
    /// Forward to the original destination.
    Passthrough,
    /// Round robin.
    RoundRobin,
    /// Least request.
    LeastRequest,
}

/// Consistent hashing.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHashLb {
    /// Hash on a header.
    #[serde(default)]
    pub http_header_name: Option<String>,
    /// Hash on a cookie (generated if absent).
    #[serde(default)]
    pub http_cookie: Option<HttpCookie>,
    /// Hash on the source IP.
    #[serde(default)]
    pub use_source_ip: Option<bool>,
    /// Hash on a query parameter.
    #[serde(default)]
    pub http_query_parameter_name: Option<String>,
    /// Ring hash settings.
    #[serde(default)]
    pub ring_hash: Option<RingHash>,
    /// Maglev settings.
    #[serde(default)]
    pub maglev: Option<Maglev>,
    /// Deprecated ring size.
    #[serde(default)]
    pub minimum_ring_size: Option<u64>,
}

/// Hash cookie.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpCookie {
    /// Cookie name.
    #[serde(default)]
    pub name: String,
    /// Cookie path.
    #[serde(default)]
    pub path: Option<String>,
    /// Cookie lifetime.
    #[serde(default)]
    pub ttl: Option<Duration>,
}

/// Ring hash.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RingHash {
    /// Minimum ring size.
    #[serde(default)]
    pub minimum_ring_size: Option<u64>,
}

/// Maglev.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Maglev {
    /// Table size (prime).
    #[serde(default)]
    pub table_size: Option<u64>,
}

/// Connection pool limits.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPoolSettings {
    /// TCP limits.
    #[serde(default)]
    pub tcp: Option<TcpSettings>,
    /// HTTP limits.
    #[serde(default)]
    pub http: Option<HttpSettings>,
}

/// TCP limits.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpSettings {
    /// Max connections to the service.
    #[serde(default)]
    pub max_connections: Option<i32>,
    /// Connect timeout.
    #[serde(default)]
    pub connect_timeout: Option<Duration>,
    /// Keepalive probes.
    #[serde(default)]
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// Max connection lifetime.
    #[serde(default)]
    pub max_connection_duration: Option<Duration>,
    /// Idle timeout.
    #[serde(default)]
    pub idle_timeout: Option<Duration>,
}

/// TCP keepalive.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpKeepalive {
    /// Probes before giving up.
    #[serde(default)]
    pub probes: Option<u32>,
    /// Idle time before probing.
    #[serde(default)]
    pub time: Option<Duration>,
    /// Probe interval.
    #[serde(default)]
    pub interval: Option<Duration>,
}

/// HTTP limits.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpSettings {
    /// Max pending requests.
    #[serde(default)]
    pub http1_max_pending_requests: Option<i32>,
    /// Max concurrent requests.
    #[serde(default)]
    pub http2_max_requests: Option<i32>,
    /// Requests per connection.
    #[serde(default)]
    pub max_requests_per_connection: Option<i32>,
    /// Max concurrent retries.
    #[serde(default)]
    pub max_retries: Option<i32>,
    /// Idle timeout.
    #[serde(default)]
    pub idle_timeout: Option<Duration>,
    /// Upgrade to HTTP/2.
    #[serde(default)]
    pub h2_upgrade_policy: Option<String>,
    /// Use the downstream protocol upstream.
    #[serde(default)]
    pub use_client_protocol: Option<bool>,
    /// Max concurrent streams per HTTP/2 connection.
    #[serde(default)]
    pub max_concurrent_streams: Option<i32>,
    /// HTTP/2 PING keepalive on upstream connections.
    #[serde(default)]
    pub http2_keep_alive: Option<Http2KeepAlive>,
}

/// HTTP/2 PING keepalive: a PING every `interval`, the connection closed when one is not
/// answered within `timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Http2KeepAlive {
    /// Between PINGs.
    #[serde(default)]
    pub interval: Option<Duration>,
    /// How long a PING may go unanswered.
    #[serde(default)]
    pub timeout: Option<Duration>,
}

/// Outlier detection.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Deprecated: consecutive gateway errors.
    #[serde(default)]
    pub consecutive_errors: Option<i32>,
    /// Consecutive 5xx before ejection.
    #[serde(default)]
    pub consecutive_5xx_errors: Option<u32>,
    /// Consecutive 502/503/504 before ejection.
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    /// Consecutive local-origin failures before ejection.
    #[serde(default)]
    pub consecutive_local_origin_failures: Option<u32>,
    /// Distinguish local-origin failures.
    #[serde(default)]
    pub split_external_local_origin_errors: Option<bool>,
    /// Analysis interval.
    #[serde(default)]
    pub interval: Option<Duration>,
    /// Minimum ejection duration.
    #[serde(default)]
    pub base_ejection_time: Option<Duration>,
    /// Max share of hosts ejected.
    #[serde(default)]
    pub max_ejection_percent: Option<i32>,
    /// Minimum healthy share for detection to run.
    #[serde(default)]
    pub min_health_percent: Option<i32>,
}

/// Istio's DestinationRule validation rules.
/// Envoy's largest ring for ring hash (`RingHashLbConfig.minimum_ring_size` lte).
pub const MAX_RING_SIZE: u64 = 8_388_608;
/// Envoy's bound on the Maglev table size (`MaglevLbConfig.table_size` lt).
pub const MAGLEV_TABLE_LIMIT: u64 = 5_000_011;

/// Checks a DestinationRule.
pub fn validate(spec: &DestinationRuleSpec, findings: &mut Findings) {
    if spec.host.is_empty() {
        findings.error("spec.host", "host is required");
    } else {
        validate_host("spec.host", &spec.host, true, findings);
    }
    validate_export_to("spec.exportTo", &spec.export_to, findings);
    if let Some(tp) = &spec.traffic_policy {
        validate_policy("spec.trafficPolicy", tp, findings);
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        let path = format!("spec.subsets[{i}]");
        if s.name.is_empty() {
            findings.error(format!("{path}.name"), "subset name is required");
        } else if !super::common::is_dns1123_label(&s.name) {
            findings.error(format!("{path}.name"), format!("subset name {:?} must be a DNS-1123 label", s.name));
        } else if !seen.insert(&s.name) {
            findings.error(format!("{path}.name"), format!("duplicate subset name {:?}", s.name));
        }
        if let Some(tp) = &s.traffic_policy {
            validate_policy(&format!("{path}.trafficPolicy"), tp, findings);
        }
    }
}

fn validate_policy(path: &str, tp: &TrafficPolicy, findings: &mut Findings) {
    validate_settings(
        path,
        tp.load_balancer.as_ref(),
        tp.connection_pool.as_ref(),
        tp.outlier_detection.as_ref(),
        findings,
    );
    if let Some(tls) = &tp.tls {
        validate_tls(&format!("{path}.tls"), tls, findings);
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, p) in tp.port_level_settings.iter().enumerate() {
        let pp = format!("{path}.portLevelSettings[{i}]");
        match p.port {
            None => findings.error(format!("{pp}.port"), "port is required"),
            Some(port) => {
                validate_port(&format!("{pp}.port.number"), port.number, findings);
                if !seen.insert(port.number) {
                    findings.error(format!("{pp}.port.number"), format!("duplicate port {}", port.number));
                }
            }
        }
        validate_settings(
            &pp,
            p.load_balancer.as_ref(),
            p.connection_pool.as_ref(),
            p.outlier_detection.as_ref(),
            findings,
        );
        if let Some(tls) = &p.tls {
            validate_tls(&format!("{pp}.tls"), tls, findings);
        }
    }
}

/// Istio's rules for `tls`, and what sluice cannot do yet.
fn validate_tls(path: &str, tls: &ClientTlsSettings, findings: &mut Findings) {
    let files = [
        ("clientCertificate", &tls.client_certificate),
        ("privateKey", &tls.private_key),
        ("caCertificates", &tls.ca_certificates),
        ("credentialName", &tls.credential_name),
    ];
    match tls.mode() {
        ClientTlsMode::IstioMutual => {
            for (field, value) in files {
                if value.is_some() {
                    findings.error(
                        format!("{path}.{field}"),
                        "ISTIO_MUTUAL uses the workload's own certificate: client certificates and CA files cannot be set",
                    );
                }
            }
        }
        ClientTlsMode::Mutual if tls.credential_name.is_none() => {
            for (field, value) in &files[..2] {
                if value.is_none() {
                    findings.error(format!("{path}.{field}"), "MUTUAL needs a client certificate and a private key");
                }
            }
        }
        _ => {}
    }
    if tls.credential_name.is_some() && matches!(tls.mode(), ClientTlsMode::Simple | ClientTlsMode::Mutual) {
        findings.warn(
            format!("{path}.credentialName"),
            "sluice does not read TLS credentials from Secrets yet: connections to this destination are refused",
        );
    }
}

impl ClientTlsSettings {
    /// The mode; unset is DISABLE, as the enum's zero value in Istio's API.
    pub fn mode(&self) -> ClientTlsMode {
        self.mode.unwrap_or(ClientTlsMode::Disable)
    }
}

fn validate_settings(
    path: &str,
    lb: Option<&LoadBalancerSettings>,
    pool: Option<&ConnectionPoolSettings>,
    outlier: Option<&OutlierDetection>,
    findings: &mut Findings,
) {
    if let Some(lb) = lb {
        if let Some(w) = &lb.warmup {
            let wp = format!("{path}.loadBalancer.warmup");
            if w.duration.is_none() {
                findings.error(format!("{wp}.duration"), "duration is required");
            }
            if let Some(m) = w.minimum_percent
                && !(0.0..=100.0).contains(&m)
            {
                findings.error(format!("{wp}.minimumPercent"), format!("{m} must be between 0 and 100"));
            }
            if w.aggression.is_some_and(|a| a.is_nan() || a < 1.0) {
                findings.error(format!("{wp}.aggression"), "aggression must be at least 1");
            }
            if lb.warmup_duration_secs.is_some() {
                findings.error(&wp, "only one of warmup or warmupDurationSecs may be set");
            }
        }
        if lb.simple.is_some() && lb.consistent_hash.is_some() {
            findings.error(format!("{path}.loadBalancer"), "only one of simple or consistentHash may be set");
        }
        if let Some(ch) = &lb.consistent_hash {
            let cp = format!("{path}.loadBalancer.consistentHash");
            let keys = [
                ch.http_header_name.is_some(),
                ch.http_cookie.is_some(),
                ch.use_source_ip == Some(true),
                ch.http_query_parameter_name.is_some(),
            ]
            .iter()
            .filter(|x| **x)
            .count();
            if keys != 1 {
                findings.error(
                    &cp,
                    "exactly one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName must be set",
                );
            }
            if let Some(c) = &ch.http_cookie
                && c.name.is_empty()
            {
                findings.error(format!("{cp}.httpCookie.name"), "cookie name is required");
            }
            if ch.ring_hash.is_some() && ch.maglev.is_some() {
                findings.error(&cp, "only one of ringHash or maglev may be set");
            }
            // Envoy's bounds (RingHashLbConfig.minimum_ring_size, MaglevLbConfig.table_size):
            // past them Envoy refuses the whole cluster update.
            let ring = [
                ("ringHash.minimumRingSize", ch.ring_hash.as_ref().and_then(|r| r.minimum_ring_size)),
                ("minimumRingSize", ch.minimum_ring_size),
            ];
            for (field, size) in ring {
                if let Some(size) = size
                    && size > MAX_RING_SIZE
                {
                    findings.error(format!("{cp}.{field}"), format!("{size} is more than Envoy's {MAX_RING_SIZE}"));
                }
            }
            if let Some(size) = ch.maglev.as_ref().and_then(|m| m.table_size)
                && size >= MAGLEV_TABLE_LIMIT
            {
                findings.error(
                    format!("{cp}.maglev.tableSize"),
                    format!("{size} must be below Envoy's limit of {MAGLEV_TABLE_LIMIT}"),
                );
            }
        }
    }
    if let Some(pool) = pool {
        let pp = format!("{path}.connectionPool");
        let checks = [
            ("tcp.maxConnections", pool.tcp.as_ref().and_then(|t| t.max_connections)),
            ("http.http1MaxPendingRequests", pool.http.as_ref().and_then(|h| h.http1_max_pending_requests)),
            ("http.http2MaxRequests", pool.http.as_ref().and_then(|h| h.http2_max_requests)),
            ("http.maxRequestsPerConnection", pool.http.as_ref().and_then(|h| h.max_requests_per_connection)),
            ("http.maxRetries", pool.http.as_ref().and_then(|h| h.max_retries)),
            ("http.maxConcurrentStreams", pool.http.as_ref().and_then(|h| h.max_concurrent_streams)),
        ];
        for (field, v) in checks {
            if let Some(v) = v
                && v < 0
            {
                findings.error(format!("{pp}.{field}"), format!("{v} must not be negative"));
            }
        }
        if let Some(h) = pool.http.as_ref().and_then(|h| h.h2_upgrade_policy.as_deref())
            && !["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"].contains(&h)
        {
            findings.error(
                format!("{pp}.http.h2UpgradePolicy"),
                format!("{h:?} is not one of DEFAULT, DO_NOT_UPGRADE, UPGRADE"),
            );
        }
    }
    if let Some(o) = outlier {
        let op = format!("{path}.outlierDetection");
        for (field, v) in [("maxEjectionPercent", o.max_ejection_percent), ("minHealthPercent", o.min_health_percent)] {
            if let Some(v) = v
                && !(0..=100).contains(&v)
            {
                findings.error(format!("{op}.{field}"), format!("{v} must be between 0 and 100"));
            }
        }
        // The others are unsigned (UInt32Value in Istio's API): the parser refuses negatives.
        if let Some(v) = o.consecutive_errors
            && v < 0
        {
            findings.error(format!("{op}.consecutiveErrors"), format!("{v} must not be negative"));
        }
        if o.interval.is_some_and(|d| d.as_millis() < 1) {
            findings.error(format!("{op}.interval"), "interval must be at least 1ms");
        }
        if o.base_ejection_time.is_some_and(|d| d.as_millis() < 1) {
            findings.error(format!("{op}.baseEjectionTime"), "baseEjectionTime must be at least 1ms");
        }
    }
}
