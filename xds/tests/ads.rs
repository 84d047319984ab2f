//! ADS protocol behaviour against a real gRPC client on loopback: SotW and Delta, versions,
//! nonces, ACK/NACK bookkeeping, EDS-only pushes, named subscriptions, removals, bad clients and
//! shutdown.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use serde_json::{Value, json};
use sluice_xds::cache::{CLUSTER, ENDPOINT, Snapshot};
use sluice_xds::resource::Interner;
use sluice_xds::server::{GenerateError, Generator, NoObserver, NodeInfo, Observer, XdsServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// (type URL, name, protobuf JSON).
type Json = (&'static str, String, Value);

/// A generator serving whatever the test set, at the test's version.
#[derive(Default)]
struct Fixed {
    state: Mutex<(u64, Vec<Json>)>,
    interner: Interner,
}

impl Fixed {
    fn set(&self, version: u64, resources: Vec<Json>) {
        *self.state.lock().unwrap() = (version, resources);
    }
}

impl Generator for Fixed {
    fn generate(&self, node: &NodeInfo, previous: Option<&Snapshot>) -> Result<Snapshot, GenerateError> {
        if node.id == "refuse-me" {
            return Err(GenerateError::UnservableNode { node: node.id.clone(), reason: "unknown proxy".into() });
        }
        let (version, resources) = self.state.lock().unwrap().clone();
        let encoded: Result<Vec<_>, _> = resources.iter().map(|(t, n, j)| self.interner.encode(t, n, j)).collect();
        let encoded = encoded.map_err(|e| GenerateError::Build { node: node.id.clone(), reason: e.to_string() })?;
        Ok(Snapshot::new(version, encoded, previous))
    }
}

fn cluster(name: &str, eds: bool) -> Json {
    let body = if eds {
        json!({"name": name, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}})
    } else {
        json!({"name": name, "type": "STATIC"})
    };
    (CLUSTER, name.to_string(), body)
}

fn endpoints(name: &str, port: u32) -> Json {
    (
        ENDPOINT,
        name.to_string(),
        json!({"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}),
    )
}

#[derive(Default)]
struct Synced(Mutex<Vec<(String, u64)>>, Mutex<Vec<String>>, std::sync::atomic::AtomicUsize);
impl Observer for Synced {
    fn synced(&self, node: &str, version: u64) {
        self.0.lock().unwrap().push((node.to_string(), version));
    }
    fn generate_failed(&self, node: &str, error: &GenerateError) {
        self.1.lock().unwrap().push(format!("{node}: {error}"));
    }
    fn stale(&self, streams: usize) {
        self.2.store(streams, std::sync::atomic::Ordering::Relaxed);
    }
}

struct Harness {
    server: XdsServer,
    generator: Arc<Fixed>,
    synced: Arc<Synced>,
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with(|s| s).await
    }

    async fn start_with(configure: impl FnOnce(XdsServer) -> XdsServer) -> Self {
        let generator = Arc::new(Fixed::default());
        generator.set(1, vec![cluster("a", true), endpoints("a", 1000), cluster("b", false)]);
        let synced = Arc::new(Synced::default());
        let server = configure(XdsServer::new(generator.clone(), synced.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let s = server.clone();
        let task = tokio::spawn(async move {
            s.serve(listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self { server, generator, synced, addr, stop: Some(stop), task }
    }

    async fn client(&self) -> AggregatedDiscoveryServiceClient<tonic::transport::Channel> {
        AggregatedDiscoveryServiceClient::connect(self.addr.clone()).await.unwrap()
    }
}

fn node(id: &str) -> Option<Node> {
    Some(Node { id: id.into(), ..Default::default() })
}

async fn next<T>(s: &mut Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("response in time")
        .expect("stream ok")
        .expect("message")
}

async fn nothing<T: std::fmt::Debug>(s: &mut Streaming<T>) {
    if let Ok(m) = tokio::time::timeout(Duration::from_millis(300), s.message()).await {
        panic!("unexpected message: {m:?}");
    }
}

async fn sotw(h: &Harness, id: &str) -> (mpsc::Sender<DiscoveryRequest>, Streaming<DiscoveryResponse>) {
    let (tx, rx) = mpsc::channel(8);
    tx.send(DiscoveryRequest { node: node(id), type_url: CLUSTER.into(), ..Default::default() }).await.unwrap();
    let stream = h.client().await.stream_aggregated_resources(ReceiverStream::new(rx)).await.unwrap().into_inner();
    (tx, stream)
}

fn ack(r: &DiscoveryResponse, names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: r.type_url.clone(),
        version_info: r.version_info.clone(),
        response_nonce: r.nonce.clone(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn sotw_wildcard_named_ack_and_eds_only_push() {
    let h = Harness::start().await;
    let (tx, mut rx) = sotw(&h, "p1").await;
    let cds = next(&mut rx).await;
    assert_eq!((cds.type_url.as_str(), cds.version_info.as_str(), cds.resources.len()), (CLUSTER, "1", 2));
    tx.send(ack(&cds, &[])).await.unwrap();
    nothing(&mut rx).await;
    // Named EDS subscription: only what was asked for.
    tx.send(DiscoveryRequest { type_url: ENDPOINT.into(), resource_names: vec!["a".into()], ..Default::default() })
        .await
        .unwrap();
    let eds = next(&mut rx).await;
    assert_eq!(eds.resources.len(), 1);
    tx.send(ack(&eds, &["a"])).await.unwrap();
    nothing(&mut rx).await;
    let status = &h.server.statuses()[0];
    assert_eq!(status.types[CLUSTER].acked_version, "1");
    assert_eq!(status.types[ENDPOINT].acked_version, "1");
    assert!(h.synced.0.lock().unwrap().contains(&("p1".to_string(), 1)));
    // An endpoint-only change pushes EDS and nothing else.
    h.generator.set(2, vec![cluster("a", true), endpoints("a", 2000), cluster("b", false)]);
    assert_eq!(h.server.refresh(), 1);
    let eds2 = next(&mut rx).await;
    assert_eq!((eds2.type_url.as_str(), eds2.version_info.as_str()), (ENDPOINT, "2"));
    tx.send(ack(&eds2, &["a"])).await.unwrap();
    nothing(&mut rx).await;
    assert_eq!(h.server.statuses()[0].types[CLUSTER].sent_version, "1", "CDS version kept");
    // A refresh with nothing new pushes nothing.
    assert_eq!(h.server.refresh(), 0);
    nothing(&mut rx).await;
    // When every type changes, clusters go before their endpoints (Envoy's warming order).
    tx.send(DiscoveryRequest { type_url: sluice_xds::cache::LISTENER.into(), ..Default::default() }).await.unwrap();
    let lds = next(&mut rx).await;
    tx.send(ack(&lds, &[])).await.unwrap();
    h.generator.set(5, vec![cluster("a", false), endpoints("a", 4000)]);
    h.server.refresh();
    let order = [next(&mut rx).await.type_url, next(&mut rx).await.type_url];
    assert_eq!(order, [CLUSTER.to_string(), ENDPOINT.to_string()]);
}

#[tokio::test]
async fn sotw_named_subscriptions_hear_only_of_changes_to_their_names() {
    let h = Harness::start().await;
    h.generator.set(1, vec![cluster("a", true), endpoints("a", 1000), endpoints("b", 1000)]);
    let (tx, mut rx) = sotw(&h, "grpc").await;
    let cds = next(&mut rx).await;
    tx.send(ack(&cds, &[])).await.unwrap();
    tx.send(DiscoveryRequest { type_url: ENDPOINT.into(), resource_names: vec!["a".into()], ..Default::default() })
        .await
        .unwrap();
    let eds = next(&mut rx).await;
    tx.send(ack(&eds, &["a"])).await.unwrap();
    nothing(&mut rx).await;
    // Only b's endpoints change: the EDS type has a new version, and this client, which asked
    // for a only, hears nothing of it but is current.
    h.generator.set(2, vec![cluster("a", true), endpoints("a", 1000), endpoints("b", 2000)]);
    assert_eq!(h.server.refresh(), 1);
    nothing(&mut rx).await;
    assert_eq!(h.server.statuses()[0].types[ENDPOINT].acked_version, "2", "current without a response");
    // a's endpoints change: pushed.
    h.generator.set(3, vec![cluster("a", true), endpoints("a", 3000), endpoints("b", 2000)]);
    h.server.refresh();
    let eds3 = next(&mut rx).await;
    assert_eq!((eds3.type_url.as_str(), eds3.version_info.as_str(), eds3.resources.len()), (ENDPOINT, "3", 1));
    tx.send(ack(&eds3, &["a"])).await.unwrap();
    // Asking for b too: only b comes (the client holds a), and then, of a change to both
    // names' type, only what changed (xDS lets a server group endpoints and routes so; not
    // listeners and clusters, which the next check shows).
    tx.send(ack(&eds3, &["a", "b"])).await.unwrap();
    let eds_b = next(&mut rx).await;
    let names = |r: &DiscoveryResponse| {
        r.resources
            .iter()
            .map(|a| {
                use prost::Message;
                envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(a.value.as_slice())
                    .unwrap()
                    .cluster_name
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&eds_b), ["b"]);
    tx.send(ack(&eds_b, &["a", "b"])).await.unwrap();
    h.generator.set(4, vec![cluster("a", true), cluster("c", false), endpoints("a", 4000), endpoints("b", 2000)]);
    h.server.refresh();
    let (first, second) = (next(&mut rx).await, next(&mut rx).await);
    let (cds, eds) = if first.type_url == CLUSTER { (first, second) } else { (second, first) };
    assert_eq!(names(&eds), ["a"], "only the changed load assignment");
    assert_eq!(cds.resources.len(), 2, "clusters: every one asked for (wildcard here), as their absence removes them");
}

#[tokio::test]
async fn single_type_services_serve_their_type() {
    use envoy_types::pb::envoy::service::cluster::v3::cluster_discovery_service_client::ClusterDiscoveryServiceClient;
    use envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_client::EndpointDiscoveryServiceClient;
    let h = Harness::start().await;
    let (tx, rx) = mpsc::channel(4);
    // No type_url on a CDS stream: the service fixes it.
    tx.send(DiscoveryRequest { node: node("cds"), ..Default::default() }).await.unwrap();
    let mut cds = ClusterDiscoveryServiceClient::connect(h.addr.clone())
        .await
        .unwrap()
        .stream_clusters(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let r = next(&mut cds).await;
    assert_eq!((r.type_url.as_str(), r.resources.len()), (CLUSTER, 2));
    let (tx2, rx2) = mpsc::channel(4);
    tx2.send(DeltaDiscoveryRequest {
        node: node("eds"),
        resource_names_subscribe: vec!["a".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut eds = EndpointDiscoveryServiceClient::connect(h.addr.clone())
        .await
        .unwrap()
        .delta_endpoints(ReceiverStream::new(rx2))
        .await
        .unwrap()
        .into_inner();
    let r = next(&mut eds).await;
    assert_eq!((r.type_url.as_str(), r.resources.len()), (ENDPOINT, 1));
    drop((tx, tx2));
}

#[tokio::test]
async fn sotw_nack_is_recorded_and_not_retried_then_fixed_version_is_acked() {
    let h = Harness::start().await;
    let (tx, mut rx) = sotw(&h, "p2").await;
    let cds = next(&mut rx).await;
    let mut nack = ack(&cds, &[]);
    nack.version_info = String::new();
    nack.error_detail = Some(RpcStatus { code: 3, message: "cluster b: bad thing".into(), details: vec![] });
    tx.send(nack).await.unwrap();
    nothing(&mut rx).await;
    let st = h.server.statuses()[0].types[CLUSTER].clone();
    assert_eq!(
        st.last_nack.as_ref().map(|n| (n.version.as_str(), n.message.as_str())),
        Some(("1", "cluster b: bad thing"))
    );
    assert_eq!(st.acked_version, "");
    // A stale nonce is ignored.
    tx.send(DiscoveryRequest { type_url: CLUSTER.into(), response_nonce: "999".into(), ..Default::default() })
        .await
        .unwrap();
    nothing(&mut rx).await;
    h.generator.set(3, vec![cluster("a", true), endpoints("a", 1000)]);
    h.server.refresh();
    let fixed = next(&mut rx).await;
    assert_eq!((fixed.version_info.as_str(), fixed.resources.len()), ("3", 1));
    tx.send(ack(&fixed, &[])).await.unwrap();
    nothing(&mut rx).await;
    assert_eq!(h.server.statuses()[0].types[CLUSTER].acked_version, "3");
}

#[tokio::test]
async fn delta_sends_differences_and_removals() {
    let h = Harness::start().await;
    let (tx, rx) = mpsc::channel(8);
    tx.send(DeltaDiscoveryRequest { node: node("d1"), type_url: CLUSTER.into(), ..Default::default() }).await.unwrap();
    let mut stream = h.client().await.delta_aggregated_resources(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let first: DeltaDiscoveryResponse = next(&mut stream).await;
    let mut names: Vec<_> = first.resources.iter().map(|r| r.name.clone()).collect();
    names.sort();
    assert_eq!(names, vec!["a", "b"]);
    tx.send(DeltaDiscoveryRequest {
        type_url: CLUSTER.into(),
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    tx.send(DeltaDiscoveryRequest {
        type_url: ENDPOINT.into(),
        resource_names_subscribe: vec!["a".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let eds = next(&mut stream).await;
    assert_eq!(eds.resources.len(), 1);
    tx.send(DeltaDiscoveryRequest {
        type_url: ENDPOINT.into(),
        response_nonce: eds.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    nothing(&mut stream).await;
    // One endpoint changes: one resource on the wire. Cluster b goes away: a removal.
    h.generator.set(4, vec![cluster("a", true), endpoints("a", 3000)]);
    h.server.refresh();
    let cds = next(&mut stream).await;
    assert_eq!(
        (cds.type_url.as_str(), cds.resources.len(), cds.removed_resources.clone()),
        (CLUSTER, 0, vec!["b".to_string()])
    );
    let eds = next(&mut stream).await;
    assert_eq!((eds.type_url.as_str(), eds.resources.len()), (ENDPOINT, 1));
    for r in [&cds, &eds] {
        tx.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    nothing(&mut stream).await;
    assert!(h.server.statuses()[0].in_sync());
    // Unsubscribing and resubscribing resends the resource.
    tx.send(DeltaDiscoveryRequest {
        type_url: ENDPOINT.into(),
        resource_names_unsubscribe: vec!["a".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    tx.send(DeltaDiscoveryRequest {
        type_url: ENDPOINT.into(),
        resource_names_subscribe: vec!["a".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(next(&mut stream).await.resources.len(), 1);
}

#[tokio::test]
async fn a_large_delta_response_is_sent_in_parts_and_its_version_with_the_last() {
    // Parts of about one cluster each.
    let h = Harness::start_with(|s| s.with_delta_chunk_bytes(40)).await;
    let names: Vec<String> = (0..5).map(|i| format!("cluster-{i}")).collect();
    h.generator.set(2, names.iter().map(|n| cluster(n, false)).collect());
    let (tx, rx) = mpsc::channel(8);
    tx.send(DeltaDiscoveryRequest { node: node("d2"), type_url: CLUSTER.into(), ..Default::default() }).await.unwrap();
    let mut stream = h.client().await.delta_aggregated_resources(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let mut got = Vec::new();
    let mut parts = Vec::new();
    while got.len() < names.len() {
        let r: DeltaDiscoveryResponse = next(&mut stream).await;
        got.extend(r.resources.iter().map(|r| r.name.clone()));
        parts.push((r.system_version_info.clone(), r.nonce.clone()));
    }
    got.sort();
    assert_eq!(got, names, "every resource once");
    assert!(parts.len() > 1, "split: {parts:?}");
    let versions: Vec<&str> = parts.iter().map(|(v, _)| v.as_str()).collect();
    assert!(versions[..versions.len() - 1].iter().all(|v| v.is_empty()), "{versions:?}");
    assert_eq!(versions.last(), Some(&"2"), "the last part names the version");
    // A NACK of an earlier part is recorded; the version is ACKed only with the last part.
    let nack = DeltaDiscoveryRequest {
        type_url: CLUSTER.into(),
        response_nonce: parts[0].1.clone(),
        error_detail: Some(RpcStatus { message: "cluster-0 is bad".into(), ..Default::default() }),
        ..Default::default()
    };
    tx.send(nack).await.unwrap();
    for (_, nonce) in &parts[1..] {
        let ack =
            DeltaDiscoveryRequest { type_url: CLUSTER.into(), response_nonce: nonce.clone(), ..Default::default() };
        tx.send(ack).await.unwrap();
    }
    nothing(&mut stream).await;
    let status = &h.server.statuses()[0];
    let cds = &status.types[CLUSTER];
    assert_eq!(cds.last_nack.as_ref().map(|n| n.message.as_str()), Some("cluster-0 is bad"));
    assert_eq!(cds.acked_version, "2");
}

#[tokio::test]
async fn bad_clients_and_shutdown() {
    let mut h = Harness::start().await;
    // No node: refused.
    let (tx, rx) = mpsc::channel(1);
    tx.send(DiscoveryRequest { type_url: CLUSTER.into(), ..Default::default() }).await.unwrap();
    let mut s = h.client().await.stream_aggregated_resources(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let err = tokio::time::timeout(Duration::from_secs(5), s.message()).await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // The generator refuses the node: the stream ends with its message.
    let (_tx2, mut s2) = sotw(&h, "refuse-me").await;
    let err = tokio::time::timeout(Duration::from_secs(5), s2.message()).await.unwrap().unwrap_err();
    assert!(err.message().contains("unknown proxy"));
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "an unservable node is a bad argument: {err:?}");
    // Garbage bytes on the gRPC port: the server survives.
    {
        use tokio::io::AsyncWriteExt;
        let mut raw = tokio::net::TcpStream::connect(h.addr.trim_start_matches("http://")).await.unwrap();
        raw.write_all(b"this is not http/2 at all\r\n\r\n").await.unwrap();
    }
    // A client that never ACKs keeps its stream; closing it unregisters it.
    let (tx3, mut s3) = sotw(&h, "silent").await;
    next(&mut s3).await;
    assert_eq!(h.server.connected(), 1);
    drop(tx3);
    drop(s3);
    for _ in 0..50 {
        if h.server.connected() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.server.connected(), 0, "closed streams are unregistered");
    // Shutdown ends open streams with UNAVAILABLE and the server task finishes.
    let (_tx4, mut s4) = sotw(&h, "p4").await;
    next(&mut s4).await;
    h.stop.take().unwrap().send(()).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), s4.message()).await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    tokio::time::timeout(Duration::from_secs(5), h.task).await.expect("server stops").unwrap();
    let _ = NoObserver;
}

/// A listener on `port` answering every request with `body`; `duplicate_chain` makes it one
/// Envoy rejects (two filter chains with the same match) although every field is valid.
fn listener(port: u16, body: &str, duplicate_chain: bool) -> Json {
    let chain = json!({"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "test",
        "route_config": {"name": "r", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": body}}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]});
    let chains = if duplicate_chain { vec![chain.clone(), chain] } else { vec![chain] };
    (
        sluice_xds::cache::LISTENER,
        "l".into(),
        json!({"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}, "filter_chains": chains}),
    )
}

/// Envoy rejects a resource: the NACK and Envoy's message land in the sync status, Envoy keeps
/// serving its last accepted config, and a later good snapshot is ACKed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_envoy_nack_keeps_last_good_config() {
    use sluice_testkit::{Proc, envoy_bin, free_port, http_get};
    let h = Harness::start().await;
    let port = free_port();
    h.generator.set(1, vec![cluster("b", false), listener(port, "v1", false)]);
    let dir = tempfile::tempdir().unwrap();
    let xds_port: u16 = h.addr.rsplit(':').next().unwrap().parse().unwrap();
    let bootstrap = json!({
        "node": {"id": "nack-test", "cluster": "test"},
        "dynamic_resources": {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3", "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"}},
        "static_resources": {"clusters": [{"name": "xds", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": xds_port}}}}]}]},
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions", "explicit_http_config": {"http2_protocol_options": {}}}}}]},
    });
    let file = dir.path().join("bootstrap.json");
    std::fs::write(&file, bootstrap.to_string()).unwrap();
    let _envoy = Proc::spawn(
        "envoy",
        std::process::Command::new(envoy_bin()).arg("-c").arg(&file).args([
            "--use-dynamic-base-id",
            "--log-level",
            "warn",
        ]),
        &dir.path().join("envoy.log"),
    );
    let addr = format!("127.0.0.1:{port}");
    let get = move || {
        let addr = addr.clone();
        async move { tokio::task::spawn_blocking(move || http_get(&addr, "x", "/", &[]).ok()).await.unwrap() }
    };
    let wait_body = |want: &'static str| {
        let get = get.clone();
        async move {
            for _ in 0..400 {
                if get().await.is_some_and(|(_, b)| b == want) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("Envoy never answered {want}");
        }
    };
    wait_body("v1").await;

    h.generator.set(2, vec![cluster("b", false), listener(port, "v2", true)]);
    h.server.refresh();
    let mut nack = None;
    for _ in 0..400 {
        nack = h
            .server
            .statuses()
            .first()
            .and_then(|s| s.types.get(sluice_xds::cache::LISTENER).and_then(|t| t.last_nack.clone()));
        if nack.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let nack = nack.expect("Envoy did not NACK the bad listener");
    assert_eq!(nack.version, "2");
    assert!(nack.message.contains("filter chain"), "Envoy's message is recorded: {}", nack.message);
    assert_eq!(h.server.statuses()[0].types[sluice_xds::cache::LISTENER].acked_version, "1");
    for _ in 0..10 {
        assert_eq!(get().await.map(|r| r.1).as_deref(), Some("v1"), "the last accepted listener keeps serving");
    }

    h.generator.set(3, vec![cluster("b", false), listener(port, "v3", false)]);
    h.server.refresh();
    wait_body("v3").await;
    for _ in 0..100 {
        if h.server.statuses()[0].types[sluice_xds::cache::LISTENER].acked_version == "3" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the good snapshot was not ACKed: {:?}", h.server.statuses());
}

/// A config that cannot be made into a proxy's snapshot (here a port past u32) leaves the proxy
/// on its last snapshot, and says so: in its status (`/debug/syncz`), to the observer (metrics),
/// and until a good config comes.
#[tokio::test]
async fn a_snapshot_that_cannot_be_generated_is_reported_and_the_proxy_keeps_its_own() {
    let h = Harness::start().await;
    let (tx, mut rx) = sotw(&h, "p1").await;
    let cds = next(&mut rx).await;
    tx.send(ack(&cds, &[])).await.unwrap();
    let mut bad = endpoints("a", 1);
    bad.2["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] =
        json!(99_999_999_999u64);
    h.generator.set(2, vec![cluster("a", true), bad, cluster("b", false)]);
    assert_eq!(h.server.refresh(), 0, "nothing new is pushed");
    nothing(&mut rx).await;
    let status = &h.server.statuses()[0];
    assert_eq!(status.snapshot_version, 1, "the proxy keeps its snapshot");
    let error = status.generate_error.clone().expect("the failure is in the status");
    assert!(error.contains("port_value") || error.contains("range"), "{error}");
    assert_eq!(h.synced.1.lock().unwrap().len(), 1, "the observer heard of it");
    assert_eq!(h.synced.2.load(std::sync::atomic::Ordering::Relaxed), 1, "one stale stream");
    let syncz = serde_json::to_value(h.server.statuses()).unwrap();
    assert!(syncz[0]["generate_error"].is_string(), "{syncz}");
    // A good config: pushed, and the failure clears.
    h.generator.set(3, vec![cluster("a", true), endpoints("a", 3000), cluster("c", false)]);
    assert_eq!(h.server.refresh(), 1);
    assert_eq!(next(&mut rx).await.version_info, "3");
    assert!(h.server.statuses()[0].generate_error.is_none());
    assert_eq!(h.synced.2.load(std::sync::atomic::Ordering::Relaxed), 0);
}

/// Streams that never answer (hostile or stuck clients) wait in the probation lane: a push to a
/// proxy that answers is not queued behind them, however many there are.
#[tokio::test]
async fn silent_streams_do_not_delay_a_proxy_that_answers() {
    let h = Harness::start().await;
    let (tx, mut rx) = sotw(&h, "healthy").await;
    let cds = next(&mut rx).await;
    tx.send(ack(&cds, &[])).await.unwrap();
    nothing(&mut rx).await;
    // More silent clients than there are slots: each gets its first response and never answers.
    let mut silent = Vec::new();
    for i in 0..(2 * sluice_xds::throttle::PUSH_CONCURRENCY + 50) {
        silent.push(sotw(&h, &format!("silent-{i}")).await);
    }
    let full = async {
        while h.server.push_slots().1 > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), full).await.expect("the silent clients fill the probation lane");
    h.generator.set(2, vec![cluster("a", true), endpoints("a", 1000), cluster("c", false)]);
    h.server.refresh();
    let pushed = next(&mut rx).await;
    assert_eq!(pushed.version_info, "2");
    let (main, probation) = h.server.push_slots();
    assert_eq!(probation, 0, "the silent clients still hold the probation lane when the healthy one is served");
    assert!(main >= sluice_xds::throttle::PUSH_CONCURRENCY - 1, "{main}");
    tx.send(ack(&pushed, &[])).await.unwrap();
    drop(silent);
}
