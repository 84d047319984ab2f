//! The core every xDS stream runs on, whatever its protocol: registration, the select loop
//! (requests, new snapshots, push-slot deadlines, shutdown), nonces, ACK/NACK bookkeeping and
//! sync reports. State-of-the-World (`sotw`) and Delta (`delta`) keep only
//! what differs: how a request changes a type's subscription and what a response holds.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::Node;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::authorization::Admission;
use crate::cache::Snapshot;
use crate::shared::{NodeInfo, Shared};
use crate::status::{Nack, ProxyStatus};
use crate::throttle::InFlight;
use crate::type_url::PUSH_ORDER;

/// Responses are queued per stream; a proxy that stops reading blocks only its own stream. One:
/// a response is built when the transport has taken the one before, so a stream holds a couple
/// of responses, not a queue of them.
pub(crate) const STREAM_BUFFER: usize = 1;

/// The client went away: the stream ends.
pub(crate) struct Gone;

/// What one stream protocol adds to the [`Core`].
pub(crate) trait Protocol: Send + 'static {
    /// A request of this protocol.
    type Request: prost::Message + Default + Send + 'static;
    /// What the stream sends (a response, or its encoding).
    type Response: Send + 'static;
    /// The protocol's name in statuses and logs.
    const NAME: &'static str;

    /// The node a request carries (the first one must).
    fn node(request: &Self::Request) -> Option<&Node>;
    /// The type a request is about (empty on ADS is an error).
    fn type_url(request: &Self::Request) -> &str;
    /// Handles `request` for `type_url`: bookkeeping, then whatever response it calls for.
    fn handle(
        &mut self,
        core: &mut Core<Self::Response>,
        type_url: String,
        request: Self::Request,
    ) -> impl Future<Output = Result<(), Gone>> + Send;
    /// After a new snapshot: sends what the client of `type_url` lacks, if anything.
    fn push(
        &mut self,
        core: &mut Core<Self::Response>,
        type_url: &str,
    ) -> impl Future<Output = Result<(), Gone>> + Send;
    /// Every type the client has asked for, with the version last sent of it.
    fn sent_versions(&self) -> impl Iterator<Item = (&str, &str)>;
}

/// A stream's state that does not depend on its protocol.
pub(crate) struct Core<R> {
    pub shared: Arc<Shared>,
    pub node: NodeInfo,
    tx: mpsc::Sender<Result<R, Status>>,
    status: Arc<Mutex<ProxyStatus>>,
    pub snapshot: Arc<Snapshot>,
    nonce: u64,
    pub in_flight: InFlight,
    synced_version: Option<u64>,
}

impl<R: Send + 'static> Core<R> {
    /// The version `type_url` has in the current snapshot (the snapshot's version if it lacks the
    /// type).
    pub fn type_version(&self, type_url: &str) -> String {
        self.snapshot.of(type_url).map_or_else(|| self.snapshot.version.to_string(), |t| t.version.clone())
    }

    /// A fresh nonce, counted as in flight.
    pub fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        self.in_flight.sent(&nonce);
        nonce
    }

    /// The client answered `nonce`: its push slot is free.
    pub fn answered(&mut self, nonce: &str) {
        if !nonce.is_empty() {
            self.in_flight.answered(nonce);
        }
    }

    /// The client rejected `version` of `type_url`.
    pub fn nacked(&self, type_url: &str, version: &str, message: &str) {
        tracing::warn!(node = %self.node.id, type_url, version, error = %message, "NACK");
        let mut status = self.status.lock().expect("status");
        let t = status.types.entry(type_url.to_string()).or_default();
        t.last_nack = Some(Nack { version: version.to_string(), message: message.to_string() });
        drop(status);
        self.shared.observer.nacked(&self.node.id, type_url, message);
    }

    /// The client accepted `version` of `type_url`.
    pub fn acked(&self, type_url: &str, version: &str) {
        let mut status = self.status.lock().expect("status");
        status.types.entry(type_url.to_string()).or_default().acked_version = version.to_string();
    }

    /// Records that the client holds `version` of `type_url` without a response: nothing it
    /// holds changed. An acknowledged type stays acknowledged.
    pub fn current_without_response(&self, type_url: &str, version: &str) {
        let mut status = self.status.lock().expect("status");
        let t = status.types.entry(type_url.to_string()).or_default();
        if t.acked_version == t.sent_version {
            t.acked_version = version.to_string();
        }
        t.sent_version = version.to_string();
    }

    /// Records a complete response of `type_url`: its version, nonce and the resources the
    /// client then holds.
    pub fn record_sent(&self, type_url: &str, version: &str, nonce: &str, resources: usize) {
        let mut status = self.status.lock().expect("status");
        let t = status.types.entry(type_url.to_string()).or_default();
        t.sent_version = version.to_string();
        t.sent_nonce = nonce.to_string();
        t.resources = resources;
    }

    /// Queues `response`; fails when the client is gone.
    pub async fn send(&self, response: R) -> Result<(), Gone> {
        self.tx.send(Ok(response)).await.map_err(|_| Gone)
    }

    /// Reports a response of `type_url` whose building began at `start`.
    pub fn pushed(&self, type_url: &str, start: Instant) {
        self.shared.observer.pushed(&self.node.id, type_url, start.elapsed());
    }

    /// Ends the stream with `status`.
    async fn fail(&self, status: Status) {
        let _ = self.tx.send(Err(status)).await;
    }

    /// Reports the snapshot as synced once every type the client asked for was sent at its
    /// current version and acknowledged.
    fn report_sync<'a>(&mut self, mut sent: impl Iterator<Item = (&'a str, &'a str)>) {
        let version = self.snapshot.version;
        if self.synced_version == Some(version) {
            return;
        }
        let all_current = sent.all(|(t, v)| v == self.type_version(t));
        if all_current && self.status.lock().expect("status").in_sync() {
            self.synced_version = Some(version);
            self.shared.observer.synced(&self.node.id, version);
        }
    }
}

/// The order a new snapshot's types are pushed in: Envoy's (clusters before the listeners that
/// use them, …), then any other type by name.
fn push_order<'a>(types: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<String> {
    let mut order: Vec<String> = PUSH_ORDER.iter().map(|t| t.to_string()).collect();
    let mut rest: Vec<String> = types.map(|(t, _)| t).filter(|t| !PUSH_ORDER.contains(t)).map(str::to_string).collect();
    rest.sort();
    order.extend(rest);
    order
}

/// Serves one stream of protocol `P` until the client or the server ends it. `fixed_type`
/// serves a single-type service (CDS, EDS, …) on the same logic.
pub(crate) async fn run<P: Protocol>(
    shared: Arc<Shared>,
    mut requests: Streaming<P::Request>,
    tx: mpsc::Sender<Result<P::Response, Status>>,
    fixed_type: Option<&'static str>,
    admission: Option<Admission>,
    mut protocol: P,
) {
    let first = match requests.message().await {
        Ok(Some(r)) => r,
        _ => return,
    };
    let Some(node) = NodeInfo::from_proto(P::node(&first)) else {
        let _ = tx.send(Err(Status::invalid_argument("the first request must carry node.id"))).await;
        return;
    };
    if let Some(admission) = admission
        && let Err(status) = admission.check(&node).await
    {
        tracing::warn!(node = %node.id, code = ?status.code(), reason = status.message(), "xDS stream refused");
        shared.observer.refused(&node, &status);
        let _ = tx.send(Err(status)).await;
        return;
    }
    let (_registration, mut snapshots, status) = match shared.register(node.clone(), P::NAME) {
        Ok(r) => r,
        Err(e) => {
            let _ = tx.send(Err(e)).await;
            return;
        }
    };
    let mut shutdown = shared.shutdown.subscribe();
    let snapshot = snapshots.borrow_and_update().clone();
    let mut core =
        Core { shared, node, tx, status, snapshot, nonce: 0, in_flight: InFlight::default(), synced_version: None };
    tracing::info!(node = %core.node.id, protocol = P::NAME, "stream opened");
    let mut next = Some(first);
    loop {
        if let Some(request) = next.take() {
            let type_url = fixed_type.map_or_else(|| P::type_url(&request).to_string(), str::to_string);
            if type_url.is_empty() {
                core.fail(Status::invalid_argument("type_url is required on ADS")).await;
                break;
            }
            if protocol.handle(&mut core, type_url, request).await.is_err() {
                break;
            }
            core.report_sync(protocol.sent_versions());
        }
        tokio::select! {
            msg = requests.message() => match msg {
                Ok(Some(request)) => next = Some(request),
                Ok(None) => break,
                Err(e) => { tracing::debug!(node = %core.node.id, error = %e, "stream error"); break }
            },
            changed = snapshots.changed() => {
                if changed.is_err() { break }
                core.snapshot = snapshots.borrow_and_update().clone();
                core.status.lock().expect("status").snapshot_version = core.snapshot.version;
                let mut gone = false;
                for type_url in push_order(protocol.sent_versions()) {
                    if protocol.sent_versions().any(|(t, _)| t == type_url)
                        && protocol.push(&mut core, &type_url).await.is_err()
                    {
                        gone = true;
                        break;
                    }
                }
                if gone { break }
            },
            _ = InFlight::expired(core.in_flight.deadline()) => core.in_flight.expire(),
            _ = shutdown.changed() => {
                core.fail(Status::unavailable("server shutting down")).await;
                break;
            }
        }
    }
    tracing::info!(node = %core.node.id, protocol = P::NAME, "stream closed");
}
