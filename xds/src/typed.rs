//! The single-type services (CDS, EDS, LDS, RDS): the same streams as ADS with the type fixed.

use std::sync::Arc;

use envoy_types::pb::envoy::service::cluster::v3::cluster_discovery_service_server::{
    ClusterDiscoveryService, ClusterDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_server::{
    EndpointDiscoveryService, EndpointDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::listener::v3::listener_discovery_service_server::{
    ListenerDiscoveryService, ListenerDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::route::v3::route_discovery_service_server::{
    RouteDiscoveryService, RouteDiscoveryServiceServer,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::authorization::Gate;
use crate::shared::Shared;
use crate::transport::FramedService;
use crate::type_url::{CLUSTER, ENDPOINT, LISTENER, ROUTE};

/// One single-type service as tonic generates it: its streaming methods are served by
/// [`FramedService`] in front of it, so it holds nothing.
pub struct Typed;

macro_rules! single_type_service {
    ($trait:ident, $type_url:expr, $stream:ident, $delta:ident, $fetch:ident, $stream_ty:ident, $delta_ty:ident) => {
        #[tonic::async_trait]
        impl $trait for Typed {
            type $stream_ty = ReceiverStream<Result<DiscoveryResponse, Status>>;
            type $delta_ty = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

            async fn $stream(
                &self,
                _request: Request<Streaming<DiscoveryRequest>>,
            ) -> Result<Response<Self::$stream_ty>, Status> {
                // Never reached: `FramedService` serves this method before the generated service.
                Err(Status::internal("served by sluice's own transport"))
            }

            async fn $delta(
                &self,
                _request: Request<Streaming<DeltaDiscoveryRequest>>,
            ) -> Result<Response<Self::$delta_ty>, Status> {
                // Never reached: `FramedService` serves this method before the generated service.
                Err(Status::internal("Delta is served by sluice's own transport"))
            }

            async fn $fetch(&self, _request: Request<DiscoveryRequest>) -> Result<Response<DiscoveryResponse>, Status> {
                Err(Status::unimplemented("REST-style fetch is not served; use the streaming or delta method"))
            }
        }
    };
}

single_type_service!(
    ClusterDiscoveryService,
    CLUSTER,
    stream_clusters,
    delta_clusters,
    fetch_clusters,
    StreamClustersStream,
    DeltaClustersStream
);
single_type_service!(
    EndpointDiscoveryService,
    ENDPOINT,
    stream_endpoints,
    delta_endpoints,
    fetch_endpoints,
    StreamEndpointsStream,
    DeltaEndpointsStream
);
single_type_service!(
    ListenerDiscoveryService,
    LISTENER,
    stream_listeners,
    delta_listeners,
    fetch_listeners,
    StreamListenersStream,
    DeltaListenersStream
);
single_type_service!(
    RouteDiscoveryService,
    ROUTE,
    stream_routes,
    delta_routes,
    fetch_routes,
    StreamRoutesStream,
    DeltaRoutesStream
);

/// The four single-type services.
type Services = (
    FramedService<ClusterDiscoveryServiceServer<Typed>>,
    FramedService<EndpointDiscoveryServiceServer<Typed>>,
    FramedService<ListenerDiscoveryServiceServer<Typed>>,
    FramedService<RouteDiscoveryServiceServer<Typed>>,
);

/// CDS, EDS, LDS and RDS services sharing the server's state (their streaming methods served by
/// [`FramedService`]), their streams let through `gate`.
pub(crate) fn services(shared: &Arc<Shared>, gate: &Gate) -> Services {
    let t = || Typed;
    let s = || shared.clone();
    (
        FramedService::new(
            ClusterDiscoveryServiceServer::new(t()),
            s(),
            (
                "/envoy.service.cluster.v3.ClusterDiscoveryService/DeltaClusters",
                "/envoy.service.cluster.v3.ClusterDiscoveryService/StreamClusters",
            ),
            Some(CLUSTER),
            gate.clone(),
        ),
        FramedService::new(
            EndpointDiscoveryServiceServer::new(t()),
            s(),
            (
                "/envoy.service.endpoint.v3.EndpointDiscoveryService/DeltaEndpoints",
                "/envoy.service.endpoint.v3.EndpointDiscoveryService/StreamEndpoints",
            ),
            Some(ENDPOINT),
            gate.clone(),
        ),
        FramedService::new(
            ListenerDiscoveryServiceServer::new(t()),
            s(),
            (
                "/envoy.service.listener.v3.ListenerDiscoveryService/DeltaListeners",
                "/envoy.service.listener.v3.ListenerDiscoveryService/StreamListeners",
            ),
            Some(LISTENER),
            gate.clone(),
        ),
        FramedService::new(
            RouteDiscoveryServiceServer::new(t()),
            s(),
            (
                "/envoy.service.route.v3.RouteDiscoveryService/DeltaRoutes",
                "/envoy.service.route.v3.RouteDiscoveryService/StreamRoutes",
            ),
            Some(ROUTE),
            gate.clone(),
        ),
    )
}
