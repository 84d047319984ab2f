//! The TLS port (istiod's 15012): xDS over mutual TLS with a configured CA (a client with a
//! certificate from it gets its config; one without, or with another CA's, is turned away), and
//! by default a port whose certificate sluice's own CA issues, serving xDS and Istio's CSR API.
//! On both, a caller has only the config of its own proxies (istiod's rule): a workload's
//! identity must be of the proxy's namespace, a node agent's token of its node. In Kubernetes
//! a pod's service-account token (audience `istio-ca`, reviewed by the API server) proves its
//! identity too.

// Shared by the tests that talk to an API server; each uses a part of it.
#[allow(dead_code)]
mod fake_apiserver;

use std::path::Path;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use sluice_controlplane::certificates::CaOptions;
use sluice_controlplane::serve::{ServeOptions, XdsTls, serve};
use sluice_identity::SpiffeId;
use sluice_identity::api::IstioCertificateRequest;
use sluice_identity::service::{certificate_identity, create_certificate};
use sluice_testkit::free_port;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { pem, issuer: Issuer::new(params, key) }
}

/// A certificate and key signed by `ca` for `names` (DNS names, or SPIFFE URIs).
fn leaf(ca: &Ca, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
    let (uris, dns): (Vec<&str>, Vec<&str>) = names.iter().partition(|n| n.starts_with("spiffe://"));
    let mut params = CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    for uri in uris {
        params.subject_alt_names.push(rcgen::SanType::URI(uri.try_into().unwrap()));
    }
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Asks for CDS over TLS as productpage's sidecar; the number of clusters it got, or why not.
async fn clusters(addr: &str, ca: &str, identity: Option<&(String, String)>) -> Result<usize, String> {
    discover(PRODUCTPAGE, CLUSTER_TYPE, addr, ca, identity, None).await
}

/// productpage's sidecar in Bookinfo.
const PRODUCTPAGE: &str = "sidecar~127.0.1.10~productpage-v1.default~default.svc.cluster.local";

const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

/// Asks for `type_url` over TLS as `node`, with a client certificate and a bearer token if
/// given; the number of resources it got, or why not.
async fn discover(
    node: &str,
    type_url: &str,
    addr: &str,
    ca: &str,
    identity: Option<&(String, String)>,
    token: Option<&str>,
) -> Result<usize, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(DiscoveryRequest {
        node: Some(Node { id: node.into(), ..Default::default() }),
        type_url: type_url.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let call = async {
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(token) = token {
            request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let mut stream = client
            .stream_aggregated_resources(request)
            .await
            .map_err(|e| format!("stream: {:?}: {}", e.code(), e.message()))?
            .into_inner();
        let response = stream
            .message()
            .await
            .map_err(|e| format!("response: {:?}: {}", e.code(), e.message()))?
            .ok_or("stream ended")?;
        let identifier = response.control_plane.map(|c| c.identifier);
        assert_eq!(identifier.as_deref(), Some("sluice-test"), "the configured server identifier");
        Ok(response.resources.len())
    };
    let result = tokio::time::timeout(Duration::from_secs(10), call).await.map_err(|_| "timed out".to_string())?;
    drop(tx);
    result
}

/// `sluice serve` on Bookinfo with the TLS port `tls` and the CA `ca`.
fn serve_options(tls: XdsTls, ca: CaOptions, monitoring: &str, state_dir: Option<std::path::PathBuf>) -> ServeOptions {
    ServeOptions {
        config: vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bookinfo")],
        kube: None,
        xds_addr: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        xds_tls: Some(tls),
        ca,
        mesh: Default::default(),
        monitoring_addr: monitoring.parse().unwrap(),
        state_dir,
        debounce: Duration::from_millis(20),
        max_debounce: Duration::from_secs(1),
        delta_chunk_bytes: sluice_xds::server::DELTA_CHUNK_BYTES,
        identifier: "sluice-test".into(),
    }
}

#[test]
fn mutual_tls_admits_only_clients_of_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let mesh_ca = ca("sluice test mesh CA");
    let (server_cert, server_key) = leaf(&mesh_ca, &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let productpage = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
    let client = leaf(&mesh_ca, &[productpage], ExtendedKeyUsagePurpose::ClientAuth);
    let no_identity = leaf(&mesh_ca, &["productpage.default"], ExtendedKeyUsagePurpose::ClientAuth);
    let elsewhere = leaf(
        &mesh_ca,
        &["spiffe://cluster.local/ns/other/sa/bookinfo-productpage"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let rogue = leaf(&ca("someone else's CA"), &["productpage.default"], ExtendedKeyUsagePurpose::ClientAuth);
    let write = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let tls_addr = format!("127.0.0.1:{}", free_port());
    let monitoring = format!("127.0.0.1:{}", free_port());
    let tls = XdsTls {
        addr: tls_addr.parse().unwrap(),
        identity: Some((write("server.pem", &server_cert), write("server-key.pem", &server_key))),
        client_ca: Some(write("ca.pem", &mesh_ca.pem)),
    };
    let options = serve_options(tls, CaOptions::default(), &monitoring, None);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(serve(options, async move {
        let _ = stopped.await;
    }));
    runtime.block_on(async {
        let ready = sluice_testkit::eventually(Duration::from_secs(20), || {
            std::net::TcpStream::connect(&tls_addr).ok().map(|_| ())
        });
        assert!(ready.is_some(), "the TLS port never opened");
        // The port opens before the first load; a proxy asking earlier would get an empty config.
        let loaded = sluice_testkit::eventually(Duration::from_secs(60), || {
            sluice_testkit::http_get(&monitoring, "x", "/ready", &[]).ok().filter(|(code, _)| *code == 200)
        });
        assert!(loaded.is_some(), "the config never loaded");
        let got = clusters(&tls_addr, &mesh_ca.pem, Some(&client)).await.expect("a mesh client is served");
        assert!(got > 5, "productpage's sidecar gets Bookinfo's clusters, got {got}");
        let anonymous = clusters(&tls_addr, &mesh_ca.pem, None).await;
        assert!(anonymous.is_err(), "a client without a certificate is refused: {anonymous:?}");
        let stranger = clusters(&tls_addr, &mesh_ca.pem, Some(&rogue)).await;
        assert!(stranger.is_err(), "a certificate from another CA is refused: {stranger:?}");
        // Of the CA but naming nobody: whose config it may have is unknown.
        let nobody = clusters(&tls_addr, &mesh_ca.pem, Some(&no_identity)).await.unwrap_err();
        assert!(nobody.contains("Unauthenticated"), "{nobody}");
        // Another namespace's identity: not productpage's config.
        let other = clusters(&tls_addr, &mesh_ca.pem, Some(&elsewhere)).await.unwrap_err();
        assert!(other.contains("PermissionDenied") && other.contains("namespace default"), "{other}");
        let refused = sluice_testkit::http_get(&monitoring, "x", "/metrics", &[]).unwrap().1;
        for code in ["unauthenticated", "permission_denied"] {
            let line = format!("sluice_xds_refused_streams_total{{code=\"{code}\"}} 1");
            assert!(refused.contains(&line), "{line} in:\n{refused}");
        }
    });
    let _ = stop.send(());
    runtime.block_on(server).unwrap().unwrap();
}

/// A CSR for a new key: the key (PEM) and the request (PEM).
/// Serves `options` on `runtime` until the sender is used or dropped; returns once the config
/// is loaded (`/ready` on `monitoring`).
fn serve_loaded(
    runtime: &tokio::runtime::Runtime,
    options: ServeOptions,
    monitoring: &str,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(serve(options, async move {
        let _ = stopped.await;
    }));
    let loaded = sluice_testkit::eventually(Duration::from_secs(60), || {
        sluice_testkit::http_get(monitoring, "x", "/ready", &[]).ok().filter(|(code, _)| *code == 200)
    });
    assert!(loaded.is_some(), "the config never loaded");
    (stop, server)
}

fn new_csr() -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap().pem().unwrap();
    (key.serialize_pem(), csr)
}

async fn tls_channel(addr: &str, root: &str, identity: Option<&(String, String)>) -> tonic::transport::Channel {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root)).domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("TLS to the CA")
}

#[test]
fn by_default_the_ca_issues_the_ports_certificate_and_signs_for_node_agents_and_renewals() {
    let state = tempfile::tempdir().unwrap();
    let tokens = state.path().join("node-tokens");
    let token = "node-1-0123456789abcdef";
    std::fs::write(&tokens, format!("node-1 {token}\n")).unwrap();
    let tls_addr = format!("127.0.0.1:{}", free_port());
    let monitoring = format!("127.0.0.1:{}", free_port());
    let tls = XdsTls { addr: tls_addr.parse().unwrap(), identity: None, client_ca: None };
    let ca = CaOptions { node_tokens: Some(tokens), ..CaOptions::default() };
    let options = serve_options(tls, ca, &monitoring, Some(state.path().join("state")));
    let start = |options: ServeOptions| {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (stop, server) = serve_loaded(&runtime, options, &monitoring);
        (runtime, stop, server)
    };
    let root_file = state.path().join("state/root-cert.pem");
    let productpage = SpiffeId::new("cluster.local", "default", "bookinfo-productpage");

    let (runtime, stop, server) = start(options.clone());
    let root = std::fs::read_to_string(&root_file).expect("the root is published");
    let (leaf, key) = runtime.block_on(async {
        // xDS over TLS, no client certificate and no token: nobody's config.
        let anonymous = clusters(&tls_addr, &root, None).await.unwrap_err();
        assert!(anonymous.contains("Unauthenticated"), "{anonymous}");
        // The node agent's token: its own agent stream, not a sidecar's.
        let workloads = sluice_translator::dataplane::WORKLOAD_TYPE;
        let agent = discover("agent~node-1", workloads, &tls_addr, &root, None, Some(token)).await;
        assert!(agent.is_ok(), "the agent's stream is answered, not refused: {agent:?}");
        // Delta streams pass the same check.
        let mut ads = AggregatedDiscoveryServiceClient::new(tls_channel(&tls_addr, &root, None).await);
        let request = DeltaDiscoveryRequest {
            node: Some(Node { id: PRODUCTPAGE.into(), ..Default::default() }),
            type_url: CLUSTER_TYPE.into(),
            ..Default::default()
        };
        let delta =
            async { ads.delta_aggregated_resources(tokio_stream::iter([request])).await?.into_inner().message().await };
        let refused = tokio::time::timeout(Duration::from_secs(10), delta).await.expect("answered").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        let sidecar = discover(PRODUCTPAGE, CLUSTER_TYPE, &tls_addr, &root, None, Some(token)).await.unwrap_err();
        assert!(sidecar.contains("PermissionDenied") && sidecar.contains("agent~node-1"), "{sidecar}");
        // The node agent asks for productpage's certificate (productpage has no node name, so it
        // is on every node).
        let (key, csr) = new_csr();
        let mut request = tonic::Request::new(
            IstioCertificateRequest { csr, ..Default::default() }.impersonating(&productpage.to_string()),
        );
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        let chain =
            create_certificate(tls_channel(&tls_addr, &root, None).await, request).await.expect("issued").cert_chain;
        assert_eq!(chain.last(), Some(&root), "the chain ends with the published root");
        let leaf_der = pem::parse(&chain[0]).unwrap().into_contents();
        assert_eq!(certificate_identity(&leaf_der), Some(productpage.clone()));
        // A service account with no workload: refused.
        let (_, csr) = new_csr();
        let mut request = tonic::Request::new(
            IstioCertificateRequest { csr, ..Default::default() }
                .impersonating("spiffe://cluster.local/ns/default/sa/nobody"),
        );
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        let refused = create_certificate(tls_channel(&tls_addr, &root, None).await, request).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        // No token, no certificate: unauthenticated.
        let (_, csr) = new_csr();
        let anonymous = tonic::Request::new(IstioCertificateRequest { csr, ..Default::default() });
        let refused = create_certificate(tls_channel(&tls_addr, &root, None).await, anonymous).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        (chain.concat(), key)
    });
    let _ = stop.send(());
    runtime.block_on(server).unwrap().unwrap();
    drop(runtime);

    // Restarted on the same state directory: the same root; the workload renews with the
    // certificate it holds (no token).
    let (runtime, stop, server) = start(options);
    assert_eq!(std::fs::read_to_string(&root_file).unwrap(), root, "the root survives a restart");
    runtime.block_on(async {
        let (_, csr) = new_csr();
        let renewal = tonic::Request::new(IstioCertificateRequest { csr, ..Default::default() });
        let channel = tls_channel(&tls_addr, &root, Some(&(leaf.clone(), key.clone()))).await;
        let chain = create_certificate(channel, renewal).await.expect("renewed by client certificate").cert_chain;
        let leaf_der = pem::parse(&chain[0]).unwrap().into_contents();
        assert_eq!(certificate_identity(&leaf_der), Some(productpage));
        // xDS with the workload's certificate: productpage's own config.
        let got = clusters(&tls_addr, &root, Some(&(leaf, key))).await.expect("xDS by the workload's certificate");
        assert!(got > 5, "{got}");
    });
    let _ = stop.send(());
    runtime.block_on(server).unwrap().unwrap();
}

#[test]
fn in_kubernetes_a_pods_token_gets_its_own_certificate_and_config_and_an_agents_token_acts_for_its_node() {
    let fake = fake_apiserver::FakeApiServer::new();
    // A projected token for the CA, and the legacy kind (for the API server only).
    fake.add_token("productpage-projected-token", "default", "bookinfo-productpage", &["istio-ca"]);
    fake.add_token("productpage-legacy-token", "default", "bookinfo-productpage", &["https://kubernetes.default.svc"]);
    let state = tempfile::tempdir().unwrap();
    let tls_addr = format!("127.0.0.1:{}", free_port());
    let monitoring = format!("127.0.0.1:{}", free_port());
    let tls = XdsTls { addr: tls_addr.parse().unwrap(), identity: None, client_ca: None };
    // The node agents' DaemonSet account: its pod-bound token acts for the pod's node.
    fake.add_token("agent-token", "sluice-system", "sluice-agent", &["istio-ca"]);
    fake.bind_token("agent-token", "sluice-agent-x7", Some("node-1"));
    fake.add_token("unbound-agent-token", "sluice-system", "sluice-agent", &["istio-ca"]);
    let node_accounts = vec![("sluice-system".to_string(), "sluice-agent".to_string())];
    let ca = CaOptions { node_accounts, ..CaOptions::default() };
    let mut options = serve_options(tls, ca, &monitoring, Some(state.path().join("state")));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let client = runtime.block_on(async { fake.client() });
    options.kube = Some(sluice_controlplane::serve::KubeServe {
        client,
        watch: Default::default(),
        lease: None,
        own_namespace: "default".into(),
    });
    let (stop, server) = serve_loaded(&runtime, options, &monitoring);
    let root = std::fs::read_to_string(state.path().join("state/root-cert.pem")).unwrap();
    let csr_with = |token: &str| {
        let (_, csr) = new_csr();
        let mut request = tonic::Request::new(IstioCertificateRequest { csr, ..Default::default() });
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    };
    runtime.block_on(async {
        let chain =
            create_certificate(tls_channel(&tls_addr, &root, None).await, csr_with("productpage-projected-token"))
                .await
                .expect("a pod's projected token is taken")
                .cert_chain;
        let leaf = pem::parse(&chain[0]).unwrap().into_contents();
        let productpage = SpiffeId::new("cluster.local", "default", "bookinfo-productpage");
        assert_eq!(certificate_identity(&leaf), Some(productpage));
        for token in ["productpage-legacy-token", "no-such-token"] {
            let refused = create_certificate(tls_channel(&tls_addr, &root, None).await, csr_with(token)).await;
            let refused = refused.expect_err(token);
            assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{token}: {refused:?}");
            assert!(refused.message().contains("the token is not valid"), "{token}: {}", refused.message());
        }
        // xDS with the token: its own proxy's config, not another namespace's.
        let token = Some("productpage-projected-token");
        let own = discover(PRODUCTPAGE, CLUSTER_TYPE, &tls_addr, &root, None, token).await;
        assert!(own.expect("productpage's sidecar by its token") > 5);
        let other = "sidecar~127.0.2.40~batch-v1.other~other.svc.cluster.local";
        let refused = discover(other, CLUSTER_TYPE, &tls_addr, &root, None, token).await.unwrap_err();
        assert!(refused.contains("PermissionDenied"), "{refused}");

        // The node agent's token: certificates for the workloads of its node, its own stream.
        let (_, csr) = new_csr();
        let for_productpage = IstioCertificateRequest { csr, ..Default::default() }
            .impersonating("spiffe://cluster.local/ns/default/sa/bookinfo-productpage");
        let mut request = tonic::Request::new(for_productpage);
        request.metadata_mut().insert("authorization", "Bearer agent-token".parse().unwrap());
        let chain =
            create_certificate(tls_channel(&tls_addr, &root, None).await, request).await.expect("impersonation");
        let leaf = pem::parse(&chain.cert_chain[0]).unwrap().into_contents();
        assert_eq!(
            certificate_identity(&leaf),
            Some(SpiffeId::new("cluster.local", "default", "bookinfo-productpage"))
        );
        let workloads = sluice_translator::dataplane::WORKLOAD_TYPE;
        let own = discover("agent~node-1", workloads, &tls_addr, &root, None, Some("agent-token")).await;
        assert!(own.is_ok(), "node-1's agent stream: {own:?}");
        let other = discover("agent~node-2", workloads, &tls_addr, &root, None, Some("agent-token")).await;
        assert!(other.unwrap_err().contains("PermissionDenied"));
        // Its account's token bound to no pod names no node: refused.
        let unbound = discover("agent~node-1", workloads, &tls_addr, &root, None, Some("unbound-agent-token")).await;
        let unbound = unbound.unwrap_err();
        assert!(unbound.contains("Unauthenticated") && unbound.contains("bound to no pod"), "{unbound}");
    });
    let reviews = fake.requests().iter().filter(|r| r.path.ends_with("/tokenreviews")).count();
    assert!(reviews >= 4, "every token went to the API server: {reviews}");
    let _ = stop.send(());
    runtime.block_on(server).unwrap().unwrap();
}
