//! The monitoring port (istiod's 15014): `/ready`, `/healthz` (is every proxy's config current),
//! `/metrics`, `/debug/syncz`, `/debug/configz`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use sluice_translator::diagnostic::Severity;
use sluice_xds::server::XdsServer;

use crate::metrics::Metrics;
use crate::store::ConfigStore;

/// What the endpoints read.
pub struct Monitor {
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// The xDS server (sync status).
    pub xds: XdsServer,
    /// The config store (objects and diagnostics).
    pub store: Arc<Mutex<ConfigStore>>,
    /// True once a config is being served (from the state directory or the sources).
    pub ready: Arc<AtomicBool>,
}

/// The router of the monitoring port.
pub fn router(monitor: Arc<Monitor>) -> Router {
    Router::new()
        .route("/ready", get(ready))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/debug/syncz", get(syncz))
        .route("/debug/configz", get(configz))
        .with_state(monitor)
}

async fn ready(State(m): State<Arc<Monitor>>) -> Response {
    if m.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no config loaded yet\n").into_response()
    }
}

/// 200 while every connected proxy holds the latest config; 503 with the proxies whose latest
/// snapshot could not be generated (they are served a stale config) and why. `/ready` stays 200
/// then: the proxies can still connect and get their last good config.
async fn healthz(State(m): State<Arc<Monitor>>) -> Response {
    let stale: Vec<_> = m
        .xds
        .statuses()
        .into_iter()
        .filter_map(|s| {
            s.generate_error
                .map(|e| serde_json::json!({"node_id": s.node_id, "snapshot_version": s.snapshot_version, "error": e}))
        })
        .collect();
    if stale.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({"stale": stale}))).into_response()
    }
}

async fn metrics(State(m): State<Arc<Monitor>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], m.metrics.encode())
        .into_response()
}

async fn syncz(State(m): State<Arc<Monitor>>) -> Response {
    axum::Json(json!({"proxies": m.xds.statuses()})).into_response()
}

async fn configz(State(m): State<Arc<Monitor>>) -> Response {
    let store = m.store.lock().expect("store lock");
    let mut accepted: Vec<_> = store.objects().collect();
    accepted.sort_by(|a, b| a.reference.cmp(&b.reference));
    let objects: Vec<_> = accepted
        .into_iter()
        .map(|l| json!({"kind": l.reference.kind, "namespace": l.reference.namespace, "name": l.reference.name, "origin": l.origin}))
        .collect();
    let (rejected, warnings): (Vec<_>, Vec<_>) =
        store.diagnostics().into_iter().partition(|d| d.severity == Severity::Error);
    let text =
        |list: Vec<sluice_translator::diagnostic::Diagnostic>| list.iter().map(|d| d.to_string()).collect::<Vec<_>>();
    axum::Json(json!({
        "version": store.version(),
        "objects": objects,
        "rejected": text(rejected),
        "warnings": text(warnings),
    }))
    .into_response()
}
