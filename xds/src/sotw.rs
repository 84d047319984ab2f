//! State-of-the-World xDS streams: full resource lists per type, nonces, ACK/NACK.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::ControlPlane;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::cache::{PUSH_ORDER, Snapshot, is_wildcard_type};
use crate::server::{NodeInfo, Shared};
use crate::status::{Nack, ProxyStatus};
use crate::throttle::InFlight;

#[derive(Default)]
struct TypeState {
    names: BTreeSet<String>,
    wildcard: bool,
    nonce: String,
    sent_version: String,
}

struct Stream {
    shared: Arc<Shared>,
    node: NodeInfo,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    status: Arc<Mutex<ProxyStatus>>,
    snapshot: Arc<Snapshot>,
    types: HashMap<String, TypeState>,
    nonce: u64,
    in_flight: InFlight,
    fixed_type: Option<&'static str>,
    synced_version: Option<u64>,
}

/// Serves one SotW stream until the client or the server ends it. `fixed_type` serves a
/// single-type service (CDS, EDS, …) on the same logic.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut requests: Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    fixed_type: Option<&'static str>,
) {
    let first = match requests.message().await {
        Ok(Some(r)) => r,
        _ => return,
    };
    let Some(node) = NodeInfo::from_proto(first.node.as_ref()) else {
        let _ = tx.send(Err(Status::invalid_argument("the first request must carry node.id"))).await;
        return;
    };
    let (_registration, mut snapshots, status) = match shared.register(node.clone(), "sotw") {
        Ok(r) => r,
        Err(e) => {
            let _ = tx.send(Err(e)).await;
            return;
        }
    };
    let mut shutdown = shared.shutdown.subscribe();
    let snapshot = snapshots.borrow_and_update().clone();
    let mut s = Stream {
        shared,
        node,
        tx,
        status,
        snapshot,
        types: HashMap::new(),
        nonce: 0,
        in_flight: InFlight::default(),
        fixed_type,
        synced_version: None,
    };
    tracing::info!(node = %s.node.id, "sotw stream opened");
    if s.handle(first).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            msg = requests.message() => match msg {
                Ok(Some(req)) => if s.handle(req).await.is_err() { break },
                Ok(None) => break,
                Err(e) => { tracing::debug!(node = %s.node.id, error = %e, "stream error"); break }
            },
            changed = snapshots.changed() => {
                if changed.is_err() { break }
                s.snapshot = snapshots.borrow_and_update().clone();
                s.status.lock().expect("status").snapshot_version = s.snapshot.version;
                if s.push_changes().await.is_err() { break }
            },
            _ = InFlight::expired(s.in_flight.deadline()) => s.in_flight.expire(),
            _ = shutdown.changed() => {
                let _ = s.tx.send(Err(Status::unavailable("server shutting down"))).await;
                break;
            }
        }
    }
    tracing::info!(node = %s.node.id, "sotw stream closed");
}

/// The client went away.
struct Gone;

impl Stream {
    fn type_version(&self, type_url: &str) -> String {
        self.snapshot.of(type_url).map_or_else(|| self.snapshot.version.to_string(), |t| t.version.clone())
    }

    async fn handle(&mut self, req: DiscoveryRequest) -> Result<(), Gone> {
        let type_url = self.fixed_type.map_or(req.type_url.clone(), str::to_string);
        if type_url.is_empty() {
            let _ = self.tx.send(Err(Status::invalid_argument("type_url is required on ADS"))).await;
            return Err(Gone);
        }
        let current_version = self.type_version(&type_url);
        let state = self.types.entry(type_url.clone()).or_default();
        if !req.response_nonce.is_empty() {
            self.in_flight.answered(&req.response_nonce);
            if req.response_nonce != state.nonce {
                // A reply to an older response: superseded by what we sent since.
                return Ok(());
            }
            let mut status = self.status.lock().expect("status");
            let t = status.types.entry(type_url.clone()).or_default();
            match &req.error_detail {
                Some(err) => {
                    tracing::warn!(node = %self.node.id, type_url, version = %state.sent_version, error = %err.message, "NACK");
                    t.last_nack = Some(Nack { version: state.sent_version.clone(), message: err.message.clone() });
                    self.shared.observer.nacked(&self.node.id, &type_url, &err.message);
                }
                None => t.acked_version = req.version_info.clone(),
            }
        }
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        let wildcard = names.contains("*") || (names.is_empty() && is_wildcard_type(&type_url));
        let first = state.nonce.is_empty();
        let names_changed = names != state.names || wildcard != state.wildcard;
        state.names = names;
        state.wildcard = wildcard;
        let stale = state.sent_version != current_version;
        if first || names_changed || (stale && req.error_detail.is_none()) {
            self.send(&type_url).await?;
        }
        self.report_sync();
        Ok(())
    }

    async fn push_changes(&mut self) -> Result<(), Gone> {
        let mut order: Vec<String> = PUSH_ORDER.iter().map(|t| t.to_string()).collect();
        let mut rest: Vec<String> = self.types.keys().filter(|t| !order.contains(t)).cloned().collect();
        rest.sort();
        order.extend(rest);
        for t in order {
            let due =
                self.types.get(&t).is_some_and(|s| !s.nonce.is_empty() && s.sent_version != self.type_version(&t));
            if due {
                self.send(&t).await?;
            }
        }
        Ok(())
    }

    async fn send(&mut self, type_url: &str) -> Result<(), Gone> {
        // Before the response is built: it holds a copy of every resource.
        self.in_flight.acquire(&self.shared.pushes).await;
        let start = Instant::now();
        let version = self.type_version(type_url);
        let state = self.types.get_mut(type_url).expect("state exists for requested type");
        let resources: Vec<_> = match self.snapshot.of(type_url) {
            Some(t) if state.wildcard => t.items.values().map(|r| r.to_any()).collect(),
            Some(t) => state.names.iter().filter_map(|n| t.items.get(n)).map(|r| r.to_any()).collect(),
            None => Vec::new(),
        };
        self.nonce += 1;
        state.nonce = self.nonce.to_string();
        self.in_flight.sent(&state.nonce);
        state.sent_version = version.clone();
        let count = resources.len();
        let response = DiscoveryResponse {
            version_info: version.clone(),
            resources,
            type_url: type_url.to_string(),
            nonce: state.nonce.clone(),
            control_plane: Some(ControlPlane { identifier: "sluice".into() }),
            ..Default::default()
        };
        {
            let mut status = self.status.lock().expect("status");
            let t = status.types.entry(type_url.to_string()).or_default();
            t.sent_version = version;
            t.sent_nonce = state.nonce.clone();
            t.resources = count;
        }
        self.tx.send(Ok(response)).await.map_err(|_| Gone)?;
        self.shared.observer.pushed(&self.node.id, type_url, start.elapsed());
        Ok(())
    }

    fn report_sync(&mut self) {
        let version = self.snapshot.version;
        if self.synced_version == Some(version) {
            return;
        }
        let all_current = self.types.iter().all(|(t, s)| s.sent_version == self.type_version(t));
        if all_current && self.status.lock().expect("status").in_sync() {
            self.synced_version = Some(version);
            self.shared.observer.synced(&self.node.id, version);
        }
    }
}
