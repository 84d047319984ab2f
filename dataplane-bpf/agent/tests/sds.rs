//! The agent's SDS over a real Unix socket: the caller is known by its pid (SO_PEERCRED), gets
//! its own workload's key and chain (`default`) and the trust bundle (`ROOTCA`), a new one when
//! the certificate is renewed, and nothing when its process is no workload's.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{Node, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use prost::Message;
use sluice_dataplane::sds::{Certificates, ROOT_SECRET, Resolver, Sds, WORKLOAD_SECRET, cgroup_of};
use sluice_identity::service::{AuthError, Authenticator, BoxFuture, Caller, CertificateService, Credentials};
use sluice_identity::workload::CertificateClient;
use sluice_identity::{CertificateAuthority, SpiffeId};

fn productpage() -> SpiffeId {
    SpiffeId::new("cluster.local", "default", "bookinfo-productpage")
}

/// node-1's agent (token `node-1-token`) may have productpage's certificate.
struct NodeOne;

impl Authenticator for NodeOne {
    fn authenticate<'a>(&'a self, credentials: &'a Credentials) -> BoxFuture<'a, Result<Caller, AuthError>> {
        Box::pin(async move {
            match credentials.bearer_token.as_deref() {
                Some("node-1-token") => Ok(Caller::NodeAgent("node-1".into())),
                _ => Err(AuthError("unknown token".into())),
            }
        })
    }
    fn may_impersonate(&self, node: &str, identity: &SpiffeId) -> bool {
        node == "node-1" && identity == &productpage()
    }
}

/// This test process is productpage; any other pid is nobody.
struct ThisProcess;

impl Resolver for ThisProcess {
    fn identity_of(&self, pid: i32) -> Result<SpiffeId, String> {
        if pid == std::process::id() as i32 {
            Ok(productpage())
        } else {
            Err("in no registered workload's cgroup".into())
        }
    }
}

struct Nobody;

impl Resolver for Nobody {
    fn identity_of(&self, _pid: i32) -> Result<SpiffeId, String> {
        Err("in no registered workload's cgroup".into())
    }
}

/// A CA on an OS-chosen loopback port.
async fn ca(dir: &std::path::Path) -> tonic::transport::Channel {
    let ca = CertificateAuthority::self_signed(dir, "cluster.local").unwrap();
    let service = CertificateService::new(Arc::new(ca), Arc::new(NodeOne), "cluster.local");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

async fn sds_client(path: PathBuf) -> SecretDiscoveryServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_static("http://sds")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(hyper_util::rt::TokioIo::new) }
        }))
        .await
        .unwrap();
    SecretDiscoveryServiceClient::new(channel)
}

/// Waits (without blocking the runtime the server runs on) for `socket` to appear.
async fn wait_for(socket: &std::path::Path) {
    for _ in 0..500 {
        if socket.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never appeared", socket.display());
}

/// Serves `sds` on `socket` until the returned sender is used; returns once the socket is there.
async fn serve(
    sds: Sds,
    socket: &std::path::Path,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<std::io::Result<()>>) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let path = socket.to_path_buf();
    let serving = tokio::spawn(async move {
        sds.serve(&path, async {
            let _ = stopped.await;
        })
        .await
    });
    wait_for(socket).await;
    (stop, serving)
}

fn request(name: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node {
            id: "sidecar~127.0.1.10~productpage-v1.default~default.svc.cluster.local".into(),
            ..Default::default()
        }),
        resource_names: vec![name.to_string()],
        type_url: sluice_dataplane::sds::SECRET_TYPE.into(),
        ..Default::default()
    }
}

fn inline(source: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>) -> String {
    match source.as_ref().and_then(|s| s.specifier.as_ref()) {
        Some(Specifier::InlineString(s)) => s.clone(),
        other => panic!("not an inline string: {other:?}"),
    }
}

#[tokio::test]
async fn a_process_gets_its_own_workloads_certificate_and_its_renewals_and_a_stranger_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let channel = ca(&dir.path().join("ca")).await;
    // Four seconds: renewed after about two.
    let certificates = Certificates::new(CertificateClient::new(channel, "node-1-token"), Some(Duration::from_secs(4)));
    let socket = dir.path().join("sds.sock");
    let (stop, serving) = serve(Sds::new(Arc::new(ThisProcess), certificates.clone()), &socket).await;

    // `default`: the key and the chain without the root, for productpage.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(request(WORKLOAD_SECRET)).await.unwrap();
    let mut client = sds_client(socket.clone()).await;
    let mut stream = client.stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
    let secret = Secret::decode(first.resources[0].value.as_slice()).unwrap();
    assert_eq!(secret.name, WORKLOAD_SECRET);
    let Some(secret::Type::TlsCertificate(tls)) = secret.r#type else { panic!("a TLS certificate") };
    let chain = inline(&tls.certificate_chain);
    assert!(inline(&tls.private_key).contains("PRIVATE KEY"));
    let leaf = pem::parse_many(&chain).unwrap();
    assert_eq!(leaf.len(), 1, "the leaf without the root");
    assert_eq!(sluice_identity::service::certificate_identity(leaf[0].contents()), Some(productpage()));
    // ACK, then the renewal arrives on the same stream with a new version.
    tx.send(DiscoveryRequest {
        version_info: first.version_info.clone(),
        response_nonce: first.nonce.clone(),
        ..request(WORKLOAD_SECRET)
    })
    .await
    .unwrap();
    let renewed = tokio::time::timeout(Duration::from_secs(15), stream.message())
        .await
        .expect("renewed in time")
        .unwrap()
        .unwrap();
    assert_ne!(renewed.version_info, first.version_info, "a new serial");

    // `ROOTCA`: the trust bundle.
    let (tx2, rx2) = tokio::sync::mpsc::channel(4);
    tx2.send(request(ROOT_SECRET)).await.unwrap();
    let mut roots = client.stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx2)).await.unwrap().into_inner();
    let root = tokio::time::timeout(Duration::from_secs(10), roots.message()).await.unwrap().unwrap().unwrap();
    let secret = Secret::decode(root.resources[0].value.as_slice()).unwrap();
    let Some(secret::Type::ValidationContext(validation)) = secret.r#type else { panic!("a validation context") };
    let ca_root = std::fs::read_to_string(dir.path().join("ca/ca-cert.pem")).unwrap();
    assert_eq!(inline(&validation.trusted_ca), ca_root);
    assert_eq!(certificates.watched(), 1, "one identity, renewed while its streams are open");
    drop((tx, tx2, stream, roots, client));
    let _ = stop.send(());
    serving.await.unwrap().unwrap();
    for _ in 0..500 {
        if certificates.watched() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(certificates.watched(), 0, "no stream left: the renewal stopped");

    // A process that is no workload's gets nothing.
    let socket = dir.path().join("sds-nobody.sock");
    let (stop, serving) = serve(Sds::new(Arc::new(Nobody), certificates), &socket).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(request(WORKLOAD_SECRET)).await.unwrap();
    let refused =
        sds_client(socket).await.stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains(&std::process::id().to_string()), "{refused:?}");
    let _ = stop.send(());
    serving.await.unwrap().unwrap();
}

#[test]
fn a_process_cgroup_is_read_from_proc() {
    let own = cgroup_of(std::process::id() as i32).expect("this process's cgroup");
    assert!(own.is_absolute(), "{own:?}");
    assert!(cgroup_of(i32::MAX).is_err(), "no such process");
}
