//! Prometheus metrics, with Istio's names where the meaning is the same, fed by the xDS server's
//! observer hooks.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sluice_xds::server::{GenerateError, NodeInfo, Observer};

/// `type="cds"` and friends, as Istio labels xDS metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    /// Short xDS type: cds, eds, lds, rds or the full URL for others.
    pub r#type: String,
}

fn short(type_url: &str) -> String {
    match type_url.rsplit('.').next().unwrap_or(type_url) {
        "Cluster" => "cds".into(),
        "ClusterLoadAssignment" => "eds".into(),
        "Listener" => "lds".into(),
        "RouteConfiguration" => "rds".into(),
        _ => type_url.to_string(),
    }
}

/// Why an xDS stream was refused: its gRPC status code (`unauthenticated`, `permission_denied`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The status code, in snake case.
    pub code: String,
}

/// All metrics of the control plane.
pub struct Metrics {
    registry: Registry,
    connected: Gauge,
    pushes: Family<TypeLabel, Counter>,
    push_time: Family<TypeLabel, Histogram>,
    rejects: Family<TypeLabel, Counter>,
    convergence: Histogram,
    config_version: Gauge,
    rejected_objects: Gauge,
    generation_failures: Counter,
    stale_proxies: Gauge,
    refused_streams: Family<CodeLabel, Counter>,
    /// When each config version was first seen (file event time).
    version_times: Mutex<BTreeMap<u64, Instant>>,
    /// When each proxy connected: a version older than its stream is not a push it converged on.
    connected_at: Mutex<std::collections::HashMap<String, Instant>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let connected = Gauge::default();
        registry.register("pilot_xds", "Number of proxies connected to this control plane over xDS", connected.clone());
        let pushes = Family::<TypeLabel, Counter>::default();
        registry.register("pilot_xds_pushes", "xDS responses sent, by type", pushes.clone());
        let push_time = Family::<TypeLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 4.0, 10))
        });
        registry.register(
            "pilot_xds_push_time",
            "Time to build and queue one xDS response, in seconds",
            push_time.clone(),
        );
        let rejects = Family::<TypeLabel, Counter>::default();
        registry.register(
            "pilot_total_xds_rejects",
            "xDS responses rejected by proxies (NACKs), by type",
            rejects.clone(),
        );
        let convergence = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "pilot_proxy_convergence_time",
            "Time from a config change being seen to a proxy acknowledging all of it, in seconds",
            convergence.clone(),
        );
        let config_version = Gauge::default();
        registry.register("sluice_config_version", "Version of the config being served", config_version.clone());
        let rejected_objects = Gauge::default();
        registry.register(
            "sluice_config_rejected_objects",
            "Objects rejected by validation in the last load",
            rejected_objects.clone(),
        );
        let generation_failures = Counter::default();
        registry.register(
            "sluice_xds_generation_failures",
            "Times the config could not be made into a proxy's snapshot (the proxy kept a stale one)",
            generation_failures.clone(),
        );
        let stale_proxies = Gauge::default();
        registry.register(
            "sluice_xds_stale_proxies",
            "Proxies whose latest snapshot could not be generated: they are served a stale config",
            stale_proxies.clone(),
        );
        let refused_streams = Family::<CodeLabel, Counter>::default();
        registry.register(
            "sluice_xds_refused_streams",
            "xDS streams refused on the TLS port: caller not authenticated, or asking for another's node",
            refused_streams.clone(),
        );
        Self {
            registry,
            refused_streams,
            connected,
            generation_failures,
            stale_proxies,
            pushes,
            push_time,
            rejects,
            convergence,
            config_version,
            rejected_objects,
            version_times: Mutex::new(BTreeMap::new()),
            connected_at: Mutex::new(Default::default()),
        }
    }

    /// Records how many objects the last load rejected (served or not).
    pub fn loaded(&self, rejected: usize) {
        self.rejected_objects.set(rejected as i64);
    }

    /// Records that config `version` exists since `seen`.
    pub fn config_changed(&self, version: u64, seen: Instant) {
        self.config_version.set(version as i64);
        let mut times = self.version_times.lock().expect("metrics lock");
        times.insert(version, seen);
        // Keep the recent versions only; proxies converge in seconds.
        while times.len() > 64 {
            times.pop_first();
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encoding to a String cannot fail");
        out
    }
}

impl Observer for Metrics {
    fn connected(&self, node: &NodeInfo) {
        self.connected.inc();
        self.connected_at.lock().expect("metrics lock").insert(node.id.clone(), Instant::now());
    }

    fn disconnected(&self, node: &NodeInfo) {
        self.connected.dec();
        self.connected_at.lock().expect("metrics lock").remove(&node.id);
    }

    fn pushed(&self, _node: &str, type_url: &str, elapsed: Duration) {
        let label = TypeLabel { r#type: short(type_url) };
        self.pushes.get_or_create(&label).inc();
        self.push_time.get_or_create(&label).observe(elapsed.as_secs_f64());
    }

    fn generate_failed(&self, _node: &str, _error: &GenerateError) {
        self.generation_failures.inc();
    }

    fn stale(&self, streams: usize) {
        self.stale_proxies.set(i64::try_from(streams).unwrap_or(i64::MAX));
    }

    fn refused(&self, _node: &NodeInfo, status: &tonic::Status) {
        let code = match status.code() {
            tonic::Code::Unauthenticated => "unauthenticated",
            tonic::Code::PermissionDenied => "permission_denied",
            _ => "other",
        };
        self.refused_streams.get_or_create(&CodeLabel { code: code.into() }).inc();
    }

    fn nacked(&self, _node: &str, type_url: &str, _message: &str) {
        self.rejects.get_or_create(&TypeLabel { r#type: short(type_url) }).inc();
    }

    fn synced(&self, node: &str, version: u64) {
        let Some(seen) = self.version_times.lock().expect("metrics lock").get(&version).copied() else { return };
        let since = self.connected_at.lock().expect("metrics lock").get(node).copied();
        if since.is_some_and(|c| seen >= c) {
            self.convergence.observe(seen.elapsed().as_secs_f64());
        }
    }
}
