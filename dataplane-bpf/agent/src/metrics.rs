//! The agent's metrics on `127.0.0.1:15020/metrics` (the port Istio's agents merge metrics on).

use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
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

/// Where the agent's programs are attached, as `/ready` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attachment {
    /// The cgroup the programs run on (and below).
    pub cgroup: String,
    /// Its id, as the kernel's links name it.
    pub cgroup_id: u64,
    /// Where links and maps are pinned.
    pub pin_dir: String,
    /// True when an earlier agent's links were adopted as they were.
    pub adopted: bool,
}

/// What `/ready` reports: where the programs are attached, or that none are loaded.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "programs", rename_all = "snake_case")]
pub enum Readiness {
    /// The programs are attached (or adopted) and checked.
    Attached(Attachment),
    /// The agent runs without eBPF programs (SDS and workload cgroups only).
    NotLoaded,
}

/// All metrics of the agent.
pub struct AgentMetrics {
    registry: Registry,
    /// Set once the agent is started (its programs attached, if any): until then `/ready` is 503.
    ready: std::sync::OnceLock<Readiness>,
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
            ready: std::sync::OnceLock::new(),
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

    /// Marks the agent ready, attached as `attachment` says (None: no programs loaded).
    pub fn set_ready(&self, attachment: Option<Attachment>) {
        let _ = self.ready.set(attachment.map_or(Readiness::NotLoaded, Readiness::Attached));
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a string");
        out
    }
}

/// `/metrics`, and `/ready`: 200 with where the programs are attached (JSON), 503 before.
pub fn router(metrics: Arc<AgentMetrics>) -> Router {
    let ready = metrics.clone();
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = metrics.encode();
                async move {
                    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
                        .into_response()
                }
            }),
        )
        .route(
            "/ready",
            get(move || {
                let answer = match ready.ready.get() {
                    Some(a) => (StatusCode::OK, axum::Json(serde_json::json!(a))).into_response(),
                    None => (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response(),
                };
                async move { answer }
            }),
        )
}
