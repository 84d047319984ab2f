//! The xDS server: per-stream snapshots from a caller-supplied generator, fan-out on refresh,
//! sync status, and the gRPC services (ADS and the per-type CDS/EDS/LDS/RDS).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::cache::Snapshot;
use crate::delta_transport::DeltaService;
use crate::status::ProxyStatus;

/// The identity a proxy presents in its first request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// `node.id`.
    pub id: String,
    /// `node.cluster`.
    pub cluster: String,
    /// String-valued fields of `node.metadata`.
    pub metadata: std::collections::BTreeMap<String, String>,
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

/// Builds a proxy's snapshot. Implemented by the application (sluice's control plane).
pub trait Generator: Send + Sync + 'static {
    /// The snapshot for `node`; `previous` is what its stream holds now, so unchanged types can
    /// keep their versions. An error refuses the stream with that message.
    fn generate(&self, node: &NodeInfo, previous: Option<&Snapshot>) -> Result<Snapshot, String>;
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
    fn generate_failed(&self, _node: &str, _error: &str) {}
    /// Number of streams whose latest regeneration failed, after each refresh.
    fn stale(&self, _streams: usize) {}
}

/// An observer that does nothing.
pub struct NoObserver;
impl Observer for NoObserver {}

pub(crate) struct StreamEntry {
    pub node: NodeInfo,
    pub snapshot: watch::Sender<Arc<Snapshot>>,
    pub status: Arc<Mutex<ProxyStatus>>,
}

pub(crate) struct Shared {
    pub generator: Arc<dyn Generator>,
    pub observer: Arc<dyn Observer>,
    pub streams: Mutex<HashMap<u64, StreamEntry>>,
    /// The push throttle's slots.
    pub pushes: crate::throttle::Lanes,
    /// Delta responses are split into responses of about this many bytes
    /// (0: never split).
    pub delta_chunk_bytes: usize,
    next_stream: AtomicU64,
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
        let snapshot = self.generator.generate(&node, None).map_err(Status::failed_precondition)?;
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

/// The xDS server. Cheap to clone.
#[derive(Clone)]
pub struct XdsServer {
    shared: Arc<Shared>,
}

impl XdsServer {
    /// A server that asks `generator` for each proxy's snapshot and reports to `observer`.
    pub fn new(generator: Arc<dyn Generator>, observer: Arc<dyn Observer>) -> Self {
        let (shutdown, _) = watch::channel(false);
        Self {
            shared: Arc::new(Shared {
                generator,
                observer,
                streams: Mutex::new(HashMap::new()),
                pushes: crate::throttle::Lanes::default(),
                delta_chunk_bytes: DELTA_CHUNK_BYTES,
                next_stream: AtomicU64::new(1),
                shutdown,
            }),
        }
    }

    /// This server with Delta responses split at about `bytes` (0: never split). Set before
    /// serving.
    pub fn with_delta_chunk_bytes(self, bytes: usize) -> Self {
        let mut shared = Arc::try_unwrap(self.shared).ok().expect("set before the server is shared");
        shared.delta_chunk_bytes = bytes;
        Self { shared: Arc::new(shared) }
    }

    /// Regenerates every connected proxy's snapshot; streams push only the types that changed.
    /// Returns the number of proxies whose snapshot changed.
    pub fn refresh(&self) -> usize {
        type Target = (NodeInfo, watch::Sender<Arc<Snapshot>>, Arc<Mutex<ProxyStatus>>);
        let targets: Vec<Target> = self
            .shared
            .streams
            .lock()
            .expect("streams lock")
            .values()
            .map(|e| (e.node.clone(), e.snapshot.clone(), e.status.clone()))
            .collect();
        let mut changed = 0;
        let mut stale = 0;
        for (node, tx, status) in targets {
            let current = tx.borrow().clone();
            let generated = self.shared.generator.generate(&node, Some(&current));
            let error = generated.as_ref().err().cloned();
            status.lock().expect("status").generate_error.clone_from(&error);
            match generated {
                Ok(next) => {
                    let differs = next
                        .types
                        .iter()
                        .map(|(t, r)| (t, &r.version))
                        .ne(current.types.iter().map(|(t, r)| (t, &r.version)));
                    if differs {
                        changed += 1;
                        tx.send_replace(Arc::new(next));
                    }
                }
                Err(e) => {
                    stale += 1;
                    self.shared.observer.generate_failed(&node.id, &e);
                    tracing::error!(node = %node.id, error = %e, "cannot regenerate snapshot; the proxy keeps its current config, which is now stale")
                }
            }
        }
        self.shared.observer.stale(stale);
        changed
    }

    /// Sync status of every open stream, sorted by node id.
    pub fn statuses(&self) -> Vec<ProxyStatus> {
        let mut out: Vec<ProxyStatus> = self
            .shared
            .streams
            .lock()
            .expect("streams lock")
            .values()
            .map(|e| e.status.lock().expect("status").clone())
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        out
    }

    /// Free push slots: (main lane, probation lane); see [`crate::throttle::Lanes`].
    pub fn push_slots(&self) -> (usize, usize) {
        self.shared.pushes.available()
    }

    /// Number of open streams.
    pub fn connected(&self) -> usize {
        self.shared.streams.lock().expect("streams lock").len()
    }

    /// Ends every stream (they return UNAVAILABLE) so a graceful transport shutdown completes.
    pub fn close_streams(&self) {
        self.shared.shutdown.send_replace(true);
    }

    /// The ADS gRPC service.
    pub fn ads_service(
        &self,
    ) -> impl tonic::server::NamedService
    + tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone
    + Send
    + 'static {
        let generated = AggregatedDiscoveryServiceServer::new(Ads { shared: self.shared.clone() })
            .max_decoding_message_size(16 * 1024 * 1024)
            .max_encoding_message_size(256 * 1024 * 1024);
        DeltaService::new(generated, self.shared.clone(), ADS_DELTA_PATH, None)
    }

    /// Serves ADS and the per-type services on `listener` until `shutdown` resolves, then closes
    /// the streams and waits for the transport to finish.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        self.serve_with(tonic::transport::Server::builder(), listener, shutdown).await
    }

    /// As [`XdsServer::serve`], over TLS: mutual TLS when `tls` names a client CA (istiod's 15012).
    pub async fn serve_tls(
        &self,
        listener: tokio::net::TcpListener,
        tls: tonic::transport::ServerTlsConfig,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        let builder = tonic::transport::Server::builder().tls_config(tls)?;
        self.serve_with(builder, listener, shutdown).await
    }

    async fn serve_with(
        &self,
        builder: tonic::transport::Server,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        let this = self.clone();
        let signal = async move {
            shutdown.await;
            this.close_streams();
        };
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let typed = crate::typed::services(&self.shared);
        builder
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(self.ads_service())
            .add_service(typed.0)
            .add_service(typed.1)
            .add_service(typed.2)
            .add_service(typed.3)
            .serve_with_incoming_shutdown(incoming, signal)
            .await
    }

    /// Binds `addr` and serves (see [`XdsServer::serve`]).
    pub async fn bind_and_serve(
        &self,
        addr: SocketAddr,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        self.serve(listener, shutdown).await.map_err(std::io::Error::other)
    }
}

/// The Delta ADS method's path.
const ADS_DELTA_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Responses are queued per stream; a proxy that stops reading blocks only its own stream. One:
/// a response is built when the transport has taken the one before, so a stream holds a couple
/// of responses, not a queue of them.
pub(crate) const STREAM_BUFFER: usize = 1;

/// The default split of large Delta responses (see [`XdsServer::with_delta_chunk_bytes`]): an
/// initial sync of a large mesh then builds and encodes 64 KiB at a time per stream instead of
/// the whole config at once (twice: the response and its encoding).
pub const DELTA_CHUNK_BYTES: usize = 64 * 1024;

/// The Aggregated Discovery Service.
pub struct Ads {
    pub(crate) shared: Arc<Shared>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(crate::sotw::run(self.shared.clone(), request.into_inner(), tx, None));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        // Never reached: `DeltaService` serves this method before the generated service.
        Err(Status::internal("Delta ADS is served by sluice's own transport"))
    }
}
