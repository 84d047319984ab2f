//! What every stream shares with the server: the application's generator and observer, the
//! registry of open streams and the push throttle. A leaf: the stream modules and the server
//! both build on it, and it on neither.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tonic::Status;

use crate::cache::Snapshot;
use crate::status::ProxyStatus;

/// The identity a proxy presents in its first request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// `node.id`.
    pub id: String,
    /// `node.cluster`.
    pub cluster: String,
    /// String-valued fields of `node.metadata`.
    pub metadata: BTreeMap<String, String>,
}

impl NodeInfo {
    /// Reads the node from a request, if it carries one.
    pub fn from_proto(node: Option<&envoy_types::pb::envoy::config::core::v3::Node>) -> Option<Self> {
        use envoy_types::pb::google::protobuf::value::Kind;
        let node = node?;
        if node.id.is_empty() {
            return None;
        }
        let metadata = node
            .metadata
            .as_ref()
            .map(|m| {
                m.fields
                    .iter()
                    .filter_map(|(k, v)| match &v.kind {
                        Some(Kind::StringValue(s)) => Some((k.clone(), s.clone())),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(Self { id: node.id.clone(), cluster: node.cluster.clone(), metadata })
    }
}

/// Why a generator could not make a proxy's snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenerateError {
    /// The node is not one this server can serve (e.g. its id is malformed): a new stream is
    /// refused with `INVALID_ARGUMENT`.
    #[error("node {node:?} cannot be served: {reason}")]
    UnservableNode {
        /// The node id.
        node: String,
        /// Why.
        reason: String,
    },
    /// The config could not be made into this node's resources: a new stream is refused with
    /// `FAILED_PRECONDITION`, an open one keeps what it has.
    #[error("cannot build the config of node {node:?}: {reason}")]
    Build {
        /// The node id.
        node: String,
        /// What failed, naming the resource.
        reason: String,
    },
}

impl GenerateError {
    /// Why, without the node.
    pub fn reason(&self) -> &str {
        match self {
            GenerateError::UnservableNode { reason, .. } | GenerateError::Build { reason, .. } => reason,
        }
    }

    /// The gRPC status that refuses a stream for this error.
    pub fn status(&self) -> Status {
        match self {
            GenerateError::UnservableNode { .. } => Status::invalid_argument(self.to_string()),
            GenerateError::Build { .. } => Status::failed_precondition(self.to_string()),
        }
    }
}

/// Builds a proxy's snapshot. Implemented by the application (sluice's control plane).
pub trait Generator: Send + Sync + 'static {
    /// The snapshot for `node`; `previous` is what its stream holds now, so unchanged types can
    /// keep their versions. An error refuses a new stream and leaves an open one as it is.
    fn generate(&self, node: &NodeInfo, previous: Option<&Snapshot>) -> Result<Snapshot, GenerateError>;
}

/// Hooks for metrics and logs. Every method has a no-op default.
pub trait Observer: Send + Sync + 'static {
    /// A stream opened.
    fn connected(&self, _node: &NodeInfo) {}
    /// A stream closed.
    fn disconnected(&self, _node: &NodeInfo) {}
    /// A response was sent; `elapsed` is the time to build and queue it.
    fn pushed(&self, _node: &str, _type_url: &str, _elapsed: Duration) {}
    /// A response was rejected.
    fn nacked(&self, _node: &str, _type_url: &str, _message: &str) {}
    /// The stream acknowledged everything of snapshot `version`.
    fn synced(&self, _node: &str, _version: u64) {}
    /// The latest config could not be made into `node`'s snapshot: it keeps its current one.
    fn generate_failed(&self, _node: &str, _error: &GenerateError) {}
    /// Number of streams whose latest regeneration failed, after each refresh.
    fn stale(&self, _streams: usize) {}
    /// A stream for `node` was refused by the listener's authorizer with `status`.
    fn refused(&self, _node: &NodeInfo, _status: &tonic::Status) {}
}

/// An observer that does nothing.
pub struct NoObserver;
impl Observer for NoObserver {}

/// An open stream as the server sees it.
pub(crate) struct StreamEntry {
    pub node: NodeInfo,
    pub snapshot: watch::Sender<Arc<Snapshot>>,
    pub status: Arc<Mutex<ProxyStatus>>,
}

/// The server's state, shared by every stream.
pub(crate) struct Shared {
    pub generator: Arc<dyn Generator>,
    pub observer: Arc<dyn Observer>,
    pub streams: Mutex<HashMap<u64, StreamEntry>>,
    /// The push throttle's slots.
    pub pushes: crate::throttle::Lanes,
    /// Delta responses are split into responses of about this many bytes
    /// (0: never split).
    pub delta_chunk_bytes: usize,
    /// `control_plane.identifier` of every response.
    pub identifier: String,
    pub next_stream: AtomicU64,
    /// Streams that have ended since the server started.
    pub closed: AtomicU64,
    pub shutdown: watch::Sender<bool>,
}

/// Removes a stream from the registry when its task ends, however it ends.
pub(crate) struct Registration {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let removed = self.shared.streams.lock().expect("streams lock").remove(&self.id);
        self.shared.closed.fetch_add(1, Ordering::Relaxed);
        if let Some(entry) = removed {
            self.shared.observer.disconnected(&entry.node);
        }
    }
}

/// A registered stream: its registry guard, its snapshot channel and its status.
pub(crate) type Registered = (Registration, watch::Receiver<Arc<Snapshot>>, Arc<Mutex<ProxyStatus>>);

impl Shared {
    /// Registers a stream for `node` with its first snapshot.
    pub fn register(self: &Arc<Self>, node: NodeInfo, protocol: &str) -> Result<Registered, Status> {
        // Generate and insert under the streams lock: a refresh for a config set meanwhile
        // then either sees this stream or ran before its snapshot was generated. Without it a
        // stream generated from the old config but inserted after the refresh kept the old
        // config until the next change.
        let mut streams = self.streams.lock().expect("streams lock");
        let snapshot = self.generator.generate(&node, None).map_err(|e| e.status())?;
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let status = Arc::new(Mutex::new(ProxyStatus {
            node_id: node.id.clone(),
            protocol: protocol.to_string(),
            snapshot_version: snapshot.version,
            types: Default::default(),
            generate_error: None,
        }));
        let (tx, rx) = watch::channel(Arc::new(snapshot));
        self.observer.connected(&node);
        streams.insert(id, StreamEntry { node, snapshot: tx, status: status.clone() });
        drop(streams);
        Ok((Registration { shared: self.clone(), id }, rx, status))
    }
}
