//! The agent's metrics on `127.0.0.1:15020/metrics` (the port Istio's agents merge metrics on).

use std::time::Duration;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// Default metrics address.
pub const DEFAULT_ADDR: &str = "127.0.0.1:15020";

/// Resource type label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    /// `service` or `workload`.
    pub r#type: String,
}

/// All metrics of the agent.
pub struct AgentMetrics {
    registry: Registry,
    /// 1 while an xDS stream is open.
    pub connected: Gauge,
    /// Services held.
    pub services: Gauge,
    /// Workload cgroups registered.
    pub workloads: Gauge,
    /// Updates applied, by type.
    pub updates: Family<TypeLabel, Counter>,
    /// Updates rejected (NACKed).
    pub rejected: Counter,
    /// Time to write one update into the maps.
    pub apply_time: Histogram,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sluice_agent");
        let m = Self {
            registry: Registry::default(),
            connected: Gauge::default(),
            services: Gauge::default(),
            workloads: Gauge::default(),
            updates: Family::default(),
            rejected: Counter::default(),
            apply_time: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        };
        registry.register("xds_connected", "1 while the ADS stream to the control plane is open", m.connected.clone());
        registry.register("services", "Kernel services held", m.services.clone());
        registry.register("workloads", "Workload cgroups registered", m.workloads.clone());
        registry.register("updates", "xDS updates applied to the maps", m.updates.clone());
        registry.register("rejected_updates", "xDS updates rejected (NACKed)", m.rejected.clone());
        registry.register("map_apply_seconds", "Time to write one update into the maps", m.apply_time.clone());
        Self { registry, ..m }
    }
}

impl AgentMetrics {
    /// Records an applied update of `type_url`.
    pub fn applied(&self, type_url: &str, elapsed: Duration) {
        let short = if type_url.ends_with("KernelWorkload") { "workload" } else { "service" };
        self.updates.get_or_create(&TypeLabel { r#type: short.into() }).inc();
        self.apply_time.observe(elapsed.as_secs_f64());
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a string");
        out
    }
}

/// `/metrics`.
pub fn router(metrics: Arc<AgentMetrics>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let text = metrics.encode();
            async move {
                ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
                    .into_response()
            }
        }),
    )
}
