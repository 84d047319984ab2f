//! Delta (incremental) xDS streams: per-resource versions, subscribe/unsubscribe, removals.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use tonic::{Status, Streaming};

use crate::cache::{Difference, PUSH_ORDER, ResourceSet, Snapshot, is_wildcard_type};
use crate::delta_transport::{DeltaResponse, Sender, frame};
use crate::resource::Encoded;
use crate::server::{NodeInfo, Shared};
use crate::status::{Nack, ProxyStatus};
use crate::throttle::InFlight;

#[derive(Default)]
struct TypeState {
    subscribed: BTreeSet<String>,
    wildcard: bool,
    /// What the client holds: name → version (unless `held` says it).
    known: BTreeMap<String, String>,
    /// What a wildcard client holds when it is exactly a set sent to it: kept as that set, not
    /// as a copy of its names, and the next push is the difference of two sets that share
    /// everything unchanged.
    held: Option<Arc<ResourceSet>>,
    /// The nonce of the last response sent, which completes `sent_version`.
    nonce: String,
    /// The nonces of every part of the last send (one unless it was split).
    parts: Vec<String>,
    sent_version: String,
}

impl TypeState {
    /// Spells `held` out into `known`, for changes that are not a whole set.
    fn spell_out(&mut self) {
        if let Some(held) = self.held.take() {
            self.known = held.iter().map(|(n, r)| (n.to_string(), r.version.clone())).collect();
        }
    }

    /// Number of resources the client holds.
    fn holds(&self) -> usize {
        self.held.as_ref().map_or(self.known.len(), |h| h.len())
    }
}

struct Stream {
    shared: Arc<Shared>,
    node: NodeInfo,
    tx: Sender,
    status: Arc<Mutex<ProxyStatus>>,
    snapshot: Arc<Snapshot>,
    types: HashMap<String, TypeState>,
    nonce: u64,
    in_flight: InFlight,
    fixed_type: Option<&'static str>,
    synced_version: Option<u64>,
}

struct Gone;

/// `resources` in runs of about `budget` bytes each (one run when `budget` is 0). Always at
/// least one run, possibly empty (a response of removals only).
fn split(resources: &[Arc<Encoded>], budget: usize) -> Vec<&[Arc<Encoded>]> {
    let mut parts = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, r) in resources.iter().enumerate() {
        if budget > 0 && size > 0 && size + r.bytes.len() > budget {
            parts.push(&resources[start..i]);
            (start, size) = (i, 0);
        }
        size += r.bytes.len();
    }
    parts.push(&resources[start..]);
    parts
}

/// Serves one Delta stream until the client or the server ends it.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut requests: Streaming<DeltaDiscoveryRequest>,
    tx: Sender,
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
    let (_registration, mut snapshots, status) = match shared.register(node.clone(), "delta") {
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
    tracing::info!(node = %s.node.id, "delta stream opened");
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
    tracing::info!(node = %s.node.id, "delta stream closed");
}

impl Stream {
    fn type_version(&self, type_url: &str) -> String {
        self.snapshot.of(type_url).map_or_else(|| self.snapshot.version.to_string(), |t| t.version.clone())
    }

    async fn handle(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Gone> {
        let type_url = self.fixed_type.map_or(req.type_url.clone(), str::to_string);
        if type_url.is_empty() {
            let _ = self.tx.send(Err(Status::invalid_argument("type_url is required on ADS"))).await;
            return Err(Gone);
        }
        let first = !self.types.contains_key(&type_url);
        let state = self.types.entry(type_url.clone()).or_default();
        if first {
            state.known = req.initial_resource_versions.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            state.wildcard = req.resource_names_subscribe.is_empty() && is_wildcard_type(&type_url);
        }
        if !req.response_nonce.is_empty() {
            self.in_flight.answered(&req.response_nonce);
        }
        if !req.response_nonce.is_empty() && state.parts.contains(&req.response_nonce) {
            let mut status = self.status.lock().expect("status");
            let t = status.types.entry(type_url.clone()).or_default();
            match &req.error_detail {
                Some(err) => {
                    tracing::warn!(node = %self.node.id, type_url, error = %err.message, "NACK");
                    t.last_nack = Some(Nack { version: state.sent_version.clone(), message: err.message.clone() });
                    self.shared.observer.nacked(&self.node.id, &type_url, &err.message);
                }
                // The version is acknowledged with its last part.
                None if req.response_nonce == state.nonce => t.acked_version = state.sent_version.clone(),
                None => {}
            }
        }
        for name in &req.resource_names_subscribe {
            if name == "*" {
                state.wildcard = true;
            } else {
                state.subscribed.insert(name.clone());
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == "*" {
                state.wildcard = false;
            } else {
                state.subscribed.remove(name);
                state.spell_out();
                state.known.remove(name);
            }
        }
        let changed = !req.resource_names_subscribe.is_empty();
        if first || changed || req.error_detail.is_none() {
            self.send(&type_url, first).await?;
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
            if self.types.contains_key(&t) {
                self.send(&t, false).await?;
            }
        }
        Ok(())
    }

    /// Sends what the client lacks or holds at another version, and what it holds that is gone.
    /// Sends nothing when there is no difference, unless `always` (the first request of a type).
    async fn send(&mut self, type_url: &str, always: bool) -> Result<(), Gone> {
        let start = Instant::now();
        let version = self.type_version(type_url);
        let state = self.types.get_mut(type_url).expect("state exists for requested type");
        let items = self.snapshot.of(type_url).map(|t| &t.items);
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        if !state.wildcard || items.is_none() {
            state.spell_out();
        }
        if let (true, Some(held), Some(items)) = (state.wildcard, &state.held, items) {
            for d in items.diff(held) {
                match d {
                    Difference::Put(r) => resources.push(r.clone()),
                    Difference::Removed(name) => removed.push(name.to_string()),
                }
            }
        } else if state.wildcard {
            // Everything the snapshot has that the client lacks, and everything it holds that is
            // gone: walked without collecting the names (thousands per type, per stream, per push).
            for r in items.iter().flat_map(|i| i.values()) {
                if state.known.get(r.name.as_str()) != Some(&r.version) {
                    resources.push(r.clone());
                }
            }
            removed.extend(state.known.keys().filter(|n| items.is_none_or(|i| i.get(n).is_none())).cloned());
        } else {
            for name in &state.subscribed {
                match items.and_then(|i| i.get(name)) {
                    Some(r) if state.known.get(name) != Some(&r.version) => resources.push(r.clone()),
                    None if state.known.contains_key(name) => removed.push(name.clone()),
                    _ => {}
                }
            }
        }
        if resources.is_empty() && removed.is_empty() && !always {
            // Nothing this client holds changed: it is current at the new version already.
            if state.sent_version != version {
                let mut status = self.status.lock().expect("status");
                let t = status.types.entry(type_url.to_string()).or_default();
                if t.acked_version == t.sent_version {
                    t.acked_version = version.clone();
                }
                t.sent_version = version.clone();
                state.sent_version = version;
            }
            return Ok(());
        }
        if state.wildcard {
            // The client now holds exactly the snapshot's set.
            state.held = Some(items.cloned().unwrap_or_default());
            state.known.clear();
        } else {
            for r in &resources {
                state.known.insert(r.name.to_string(), r.version.clone());
            }
            for name in &removed {
                state.known.remove(name);
            }
        }
        self.in_flight.acquire(&self.shared.pushes).await;
        state.sent_version = version.clone();
        state.parts.clear();
        let parts = split(&resources, self.shared.delta_chunk_bytes);
        let last = parts.len() - 1;
        for (i, part) in parts.into_iter().enumerate() {
            self.nonce += 1;
            let nonce = self.nonce.to_string();
            self.in_flight.sent(&nonce);
            state.parts.push(nonce.clone());
            let complete = i == last;
            let response = frame(DeltaResponse {
                // Only the last part names the version (in Delta it is for debugging only): a
                // client that reads it sees the version once all of it has arrived.
                system_version_info: if complete { version.clone() } else { String::new() },
                resources: part,
                type_url,
                removed_resources: if complete { std::mem::take(&mut removed) } else { Vec::new() },
                nonce: nonce.clone(),
            });
            if complete {
                state.nonce = nonce;
                let mut status = self.status.lock().expect("status");
                let t = status.types.entry(type_url.to_string()).or_default();
                t.sent_version = version.clone();
                t.sent_nonce = state.nonce.clone();
                t.resources = state.holds();
            }
            self.tx.send(Ok(response)).await.map_err(|_| Gone)?;
        }
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
