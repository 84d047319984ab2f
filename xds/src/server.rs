//! The xDS server: per-stream snapshots from a caller-supplied generator, fan-out on refresh,
//! sync status, and the gRPC services (ADS and the per-type CDS/EDS/LDS/RDS).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::authorization::{Authorizer, Gate};
use crate::cache::Snapshot;
use crate::shared::Shared;
use crate::status::ProxyStatus;
use crate::transport::FramedService;

pub use crate::shared::{GenerateError, Generator, NoObserver, NodeInfo, Observer};

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
                identifier: DEFAULT_IDENTIFIER.to_string(),
                next_stream: AtomicU64::new(1),
                closed: AtomicU64::new(0),
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

    /// This server with `identifier` as the `control_plane.identifier` of its responses (Envoy
    /// shows it in its config dump; istiod sends its own pod name and version). Set before
    /// serving.
    pub fn with_identifier(self, identifier: impl Into<String>) -> Self {
        let mut shared = Arc::try_unwrap(self.shared).ok().expect("set before the server is shared");
        shared.identifier = identifier.into();
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
            let error = generated.as_ref().err().map(ToString::to_string);
            status.lock().expect("status").generate_error = error;
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

    /// Number of streams that have ended since the server started.
    pub fn closed(&self) -> u64 {
        self.shared.closed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Ends every stream (they return UNAVAILABLE) so a graceful transport shutdown completes.
    pub fn close_streams(&self) {
        self.shared.shutdown.send_replace(true);
    }

    /// The ADS gRPC service, serving every caller.
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
        self.ads_behind(Gate::default())
    }

    /// The ADS gRPC service, its streams let through `gate`.
    fn ads_behind(
        &self,
        gate: Gate,
    ) -> impl tonic::server::NamedService
    + tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone
    + Send
    + 'static {
        let generated = AggregatedDiscoveryServiceServer::new(Ads)
            .max_decoding_message_size(16 * 1024 * 1024)
            .max_encoding_message_size(256 * 1024 * 1024);
        FramedService::new(generated, self.shared.clone(), (ADS_DELTA_PATH, ADS_SOTW_PATH), None, gate)
    }

    /// Serves ADS and the per-type services on `listener` until `shutdown` resolves, then closes
    /// the streams and waits for the transport to finish.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        self.serve_with(tonic::transport::Server::builder(), listener, Default::default(), Gate::default(), shutdown)
            .await
    }

    /// As [`XdsServer::serve`], over TLS (mutual TLS when `tls` names a client CA), with the
    /// application's `extra` services beside xDS on the same port (istiod's 15012 also serves
    /// the CSR API); `authorizer` decides which caller may have which node's config (None:
    /// any).
    pub async fn serve_tls(
        &self,
        listener: tokio::net::TcpListener,
        tls: tonic::transport::ServerTlsConfig,
        extra: tonic::service::Routes,
        authorizer: Option<Arc<dyn Authorizer>>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        let builder = tonic::transport::Server::builder().tls_config(tls)?;
        self.serve_with(builder, listener, extra, Gate(authorizer), shutdown).await
    }

    async fn serve_with(
        &self,
        builder: tonic::transport::Server,
        listener: tokio::net::TcpListener,
        extra: tonic::service::Routes,
        gate: Gate,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        let this = self.clone();
        let signal = async move {
            shutdown.await;
            this.close_streams();
        };
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let typed = crate::typed::services(&self.shared, &gate);
        builder
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_routes(extra)
            .add_service(self.ads_behind(gate))
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

/// `control_plane.identifier` unless [`XdsServer::with_identifier`] sets another.
pub const DEFAULT_IDENTIFIER: &str = "sluice";

/// The Delta ADS method's path.
const ADS_DELTA_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// The State-of-the-World ADS method's path.
const ADS_SOTW_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";

/// The default split of large Delta responses (see [`XdsServer::with_delta_chunk_bytes`]): an
/// initial sync of a large mesh then builds and encodes 64 KiB at a time per stream instead of
/// the whole config at once (twice: the response and its encoding).
pub const DELTA_CHUNK_BYTES: usize = 64 * 1024;

/// The Aggregated Discovery Service as tonic generates it: every streaming method is served
/// by [`FramedService`] in front of it, so it holds nothing.
pub struct Ads;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        // Never reached: `FramedService` serves this method before the generated service.
        Err(Status::internal("ADS is served by sluice's own transport"))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        // Never reached: `FramedService` serves this method before the generated service.
        Err(Status::internal("Delta ADS is served by sluice's own transport"))
    }
}
