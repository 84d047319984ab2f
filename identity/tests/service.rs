//! Istio's CSR API over real gRPC: the caller's identity decides the SAN, impersonation is for
//! node agents and their own workloads only, and bad input gets the status Istio gives.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use sluice_identity::api::IstioCertificateRequest;
use sluice_identity::service::{
    AuthError, Authenticator, BoxFuture, Caller, CertificateService, Credentials, certificate_identity,
    create_certificate,
};
use sluice_identity::{CertificateAuthority, LeafPolicy, SpiffeId};
use tonic::Code;

/// Tokens: `node-1` is node-1's agent, `productpage` is the productpage workload; node-1 runs
/// productpage only.
struct Tokens;

fn productpage() -> SpiffeId {
    SpiffeId::new("cluster.local", "default", "bookinfo-productpage")
}

impl Authenticator for Tokens {
    fn authenticate<'a>(&'a self, credentials: &'a Credentials) -> BoxFuture<'a, Result<Caller, AuthError>> {
        Box::pin(async move {
            match credentials.bearer_token.as_deref() {
                Some("node-1") => Ok(Caller::NodeAgent("node-1".into())),
                Some("productpage") => Ok(Caller::Workload(productpage())),
                _ => Err(AuthError("the token is not valid".into())),
            }
        })
    }

    fn may_impersonate(&self, node: &str, identity: &SpiffeId) -> bool {
        node == "node-1" && identity == &productpage()
    }
}

fn csr() -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(vec![]).unwrap();
    params.subject_alt_names =
        vec![SanType::URI("spiffe://cluster.local/ns/istio-system/sa/admin".try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

struct Server {
    channel: tonic::transport::Channel,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let policy = LeafPolicy { default_ttl: Duration::from_secs(3600), max_ttl: Duration::from_secs(7200) };
    let ca = CertificateAuthority::self_signed(dir.path(), "cluster.local").unwrap().with_policy(policy);
    let service = CertificateService::new(Arc::new(ca), Arc::new(Tokens), "cluster.local");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming_shutdown(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        async {
            let _ = stopped.await;
        },
    ));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    Server { channel, _dir: dir, stop: Some(stop) }
}

fn with_token(request: IstioCertificateRequest, token: &str) -> tonic::Request<IstioCertificateRequest> {
    let mut request = tonic::Request::new(request);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn leaf_identity(chain: &[String]) -> Option<SpiffeId> {
    certificate_identity(&pem::parse(&chain[0]).unwrap().into_contents())
}

#[tokio::test]
async fn the_caller_decides_the_identity_and_node_agents_impersonate_only_their_workloads() {
    let server = start().await;
    let call = |request| create_certificate(server.channel.clone(), request);
    let ask = |token: &str, impersonate: Option<&str>, ttl: i64| {
        let mut r = IstioCertificateRequest { csr: csr(), validity_duration: ttl, metadata: None };
        if let Some(id) = impersonate {
            r = r.impersonating(id);
        }
        with_token(r, token)
    };

    // A workload: its own identity, whatever the CSR asks for.
    let chain = call(ask("productpage", None, 0)).await.expect("issued").cert_chain;
    assert_eq!(chain.len(), 2, "leaf and root");
    assert_eq!(leaf_identity(&chain), Some(productpage()));

    // A node agent for a workload on its node.
    let pp = productpage().to_string();
    let chain = call(ask("node-1", Some(&pp), 1800)).await.expect("impersonation on the node").cert_chain;
    assert_eq!(leaf_identity(&chain), Some(productpage()));

    let refused =
        |result: Result<_, tonic::Status>| result.err().map(|s| (s.code(), s.message().to_string())).expect("refused");
    // A node agent for a service account not on its node.
    let (code, message) = refused(call(ask("node-1", Some("spiffe://cluster.local/ns/default/sa/reviews"), 0)).await);
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(message.contains("node-1") && message.contains("sa/reviews"), "{message}");
    // A node agent asking for nobody in particular.
    assert_eq!(refused(call(ask("node-1", None, 0)).await).0, Code::PermissionDenied);
    // A workload may not impersonate.
    let (code, message) =
        refused(call(ask("productpage", Some("spiffe://cluster.local/ns/default/sa/reviews"), 0)).await);
    assert_eq!(code, Code::PermissionDenied);
    assert!(message.contains("only node agents"), "{message}");
    // Another trust domain.
    let (code, _) =
        refused(call(ask("node-1", Some("spiffe://evil.example/ns/default/sa/bookinfo-productpage"), 0)).await);
    assert_eq!(code, Code::PermissionDenied);
    // A malformed identity.
    assert_eq!(refused(call(ask("node-1", Some("productpage"), 0)).await).0, Code::InvalidArgument);
    // Bad and missing tokens.
    let (code, message) = refused(call(ask("stolen", None, 0)).await);
    assert_eq!(code, Code::Unauthenticated, "{message}");
    let anonymous = tonic::Request::new(IstioCertificateRequest { csr: csr(), ..Default::default() });
    assert_eq!(refused(call(anonymous).await).0, Code::Unauthenticated);
    // Garbage CSR, TTL over the maximum, negative TTL.
    let garbage = with_token(IstioCertificateRequest { csr: "garbage".into(), ..Default::default() }, "productpage");
    let (code, message) = refused(call(garbage).await);
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("certificate signing request"), "{message}");
    let (code, message) = refused(call(ask("productpage", None, 7201)).await);
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("max allowed TTL"), "{message}");
    assert_eq!(refused(call(ask("productpage", None, -1)).await).0, Code::InvalidArgument);
}

#[tokio::test]
async fn a_node_agent_gets_a_checked_certificate_for_a_key_made_on_the_node() {
    use sluice_identity::workload::{CertificateClient, IssueError, IssuedCertificate, backoff};
    let server = start().await;
    let client = CertificateClient::new(server.channel.clone(), "node-1");
    let issued = client.issue(&productpage(), Some(Duration::from_secs(1200))).await.expect("issued");
    assert_eq!(issued.identity, productpage());
    assert_eq!(issued.presented().len(), 1, "the leaf, without the root");
    assert!(issued.root().contains("BEGIN CERTIFICATE"));
    let life = issued.not_after.duration_since(issued.not_before).unwrap();
    assert_eq!(life, Duration::from_secs(1200 + 120), "the TTL asked for, from 2 minutes ago");
    let (early, late) = (issued.renew_at(-1.0), issued.renew_at(1.0));
    let remaining = issued.not_after.duration_since(issued.received).unwrap();
    assert!(remaining <= Duration::from_secs(1200) && remaining > Duration::from_secs(1190), "{remaining:?}");
    assert_eq!(early.duration_since(issued.received).unwrap(), remaining.mul_f64(0.4));
    assert_eq!(late.duration_since(issued.received).unwrap(), remaining.mul_f64(0.6));
    assert!(!format!("{issued:?}").contains("PRIVATE KEY"), "the key is never logged");
    // A second certificate: a new key and a new serial.
    let again = client.issue(&productpage(), None).await.unwrap();
    assert_ne!(again.serial, issued.serial);
    assert_ne!(again.key_pem, issued.key_pem);
    // Refused by the CA: for a workload not on the node.
    let reviews = SpiffeId::new("cluster.local", "default", "bookinfo-reviews");
    let refused = client.issue(&reviews, None).await.unwrap_err();
    assert!(
        matches!(&refused, IssueError::Refused { status, .. } if status.code() == Code::PermissionDenied),
        "{refused}"
    );
    assert_eq!(
        (backoff(0), backoff(3), backoff(30)),
        (Duration::from_secs(1), Duration::from_secs(8), Duration::from_secs(60))
    );

    // An answer that is not for the identity or the key asked for is never used.
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::self_signed(dir.path(), "cluster.local").unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = CertificateParams::new(vec![]).unwrap().serialize_request(&key).unwrap().pem().unwrap();
    let for_reviews = ca.sign(&csr, &reviews, None).unwrap();
    let wrong_identity = IssuedCertificate::from_response(&productpage(), &key, for_reviews.clone()).unwrap_err();
    assert!(wrong_identity.to_string().contains("names"), "{wrong_identity}");
    let other_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let wrong_key = IssuedCertificate::from_response(&reviews, &other_key, for_reviews.clone()).unwrap_err();
    assert!(wrong_key.to_string().contains("not for the key"), "{wrong_key}");
    let other_root = CertificateAuthority::ephemeral("cluster.local").unwrap().root_pem().to_string();
    let spliced = vec![for_reviews[0].clone(), other_root];
    let unsigned = IssuedCertificate::from_response(&reviews, &key, spliced).unwrap_err();
    assert!(unsigned.to_string().contains("not signed by the next"), "{unsigned}");
    assert!(IssuedCertificate::from_response(&reviews, &key, for_reviews).is_ok());
}

#[tokio::test]
async fn a_token_file_is_read_again_for_each_request() {
    use sluice_identity::workload::{CertificateClient, IssueError};
    let server = start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, "expired\n").unwrap();
    let client = CertificateClient::with_token_file(server.channel.clone(), &path);
    let refused = client.issue(&productpage(), None).await.unwrap_err();
    assert!(matches!(&refused, IssueError::Refused { status, .. } if status.code() == Code::Unauthenticated));
    // The kubelet rotates a projected token in place: the next request presents the new one.
    std::fs::write(&path, "node-1\n").unwrap();
    assert_eq!(client.issue(&productpage(), None).await.expect("the new token").identity, productpage());
    std::fs::remove_file(&path).unwrap();
    let gone = client.issue(&productpage(), None).await.unwrap_err();
    assert!(matches!(&gone, IssueError::Token(reason) if reason.contains("reading")), "{gone}");
}
