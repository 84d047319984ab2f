//! xDS over mutual TLS (istiod's 15012): a client with a certificate from the configured CA gets
//! its config; one without a certificate, or with one from another CA, is turned away.

use std::path::Path;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use sluice_controlplane::serve::{ServeOptions, XdsTls, serve};
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

/// A certificate and key signed by `ca`.
fn leaf(ca: &Ca, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
    let mut params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Asks for CDS over TLS as productpage's sidecar; the number of clusters it got, or why not.
async fn clusters(addr: &str, ca: &str, identity: Option<&(String, String)>) -> Result<usize, String> {
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
        node: Some(Node {
            id: "sidecar~127.0.1.10~productpage-v1.default~default.svc.cluster.local".into(),
            ..Default::default()
        }),
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let call = async {
        let mut stream = client
            .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|e| format!("stream: {e}"))?
            .into_inner();
        let response = stream.message().await.map_err(|e| format!("response: {e}"))?.ok_or("stream ended")?;
        let identifier = response.control_plane.map(|c| c.identifier);
        assert_eq!(identifier.as_deref(), Some("sluice-test"), "the configured server identifier");
        Ok(response.resources.len())
    };
    let result = tokio::time::timeout(Duration::from_secs(10), call).await.map_err(|_| "timed out".to_string())?;
    drop(tx);
    result
}

#[test]
fn mutual_tls_admits_only_clients_of_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let mesh_ca = ca("sluice test mesh CA");
    let (server_cert, server_key) = leaf(&mesh_ca, &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let client = leaf(&mesh_ca, &["productpage.default"], ExtendedKeyUsagePurpose::ClientAuth);
    let rogue = leaf(&ca("someone else's CA"), &["productpage.default"], ExtendedKeyUsagePurpose::ClientAuth);
    let write = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let tls_addr = format!("127.0.0.1:{}", free_port());
    let monitoring = format!("127.0.0.1:{}", free_port());
    let options = ServeOptions {
        config: vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bookinfo")],
        kube: None,
        xds_addr: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        xds_tls: Some(XdsTls {
            addr: tls_addr.parse().unwrap(),
            cert: write("server.pem", &server_cert),
            key: write("server-key.pem", &server_key),
            client_ca: Some(write("ca.pem", &mesh_ca.pem)),
        }),
        monitoring_addr: monitoring.parse().unwrap(),
        state_dir: None,
        debounce: Duration::from_millis(20),
        max_debounce: Duration::from_secs(1),
        delta_chunk_bytes: sluice_xds::server::DELTA_CHUNK_BYTES,
        identifier: "sluice-test".into(),
    };
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
    });
    let _ = stop.send(());
    runtime.block_on(server).unwrap().unwrap();
}
