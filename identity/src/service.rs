//! Istio's CSR API as a gRPC service: `CreateCertificate` signs the CSR's key for the identity
//! the *caller* proved — a client certificate of the mesh (renewal), or a bearer token the
//! application's [`Authenticator`] accepts (a Kubernetes token, a node token) — and a node agent
//! may ask for the identity of a workload on its node (`ImpersonatedIdentity`), never for any
//! other. Every decision is logged with the caller and the reason.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::{Code, Status};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::api::{IstioCertificateRequest, IstioCertificateResponse, SERVICE_NAME};
use crate::authority::{CaError, CertificateAuthority};
use crate::spiffe::SpiffeId;

/// A boxed future, as the service's traits return them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a caller presented.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// `authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
    /// The `clusterid` header (Istio's multi-cluster token review).
    pub cluster_id: Option<String>,
    /// The SPIFFE identity of a client certificate the TLS layer verified against the mesh root.
    pub peer_identity: Option<SpiffeId>,
}

/// Who a caller proved to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A workload: it gets certificates for this identity only.
    Workload(SpiffeId),
    /// The node agent of this node: it may ask for the identities of workloads on the node.
    NodeAgent(String),
}

/// Why a caller could not be authenticated (the stream gets `UNAUTHENTICATED`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(pub String);

/// The application's side of authentication and impersonation.
pub trait Authenticator: Send + Sync + 'static {
    /// Who presented `credentials`. A verified client certificate is taken before any token.
    fn authenticate<'a>(&'a self, credentials: &'a Credentials) -> BoxFuture<'a, Result<Caller, AuthError>>;
    /// True when some workload of `identity` runs on node `node` (istiod's (service account,
    /// node) index): only then may that node's agent ask for its certificate.
    fn may_impersonate(&self, node: &str, identity: &SpiffeId) -> bool;
}

/// The `IstioCertificateService` gRPC service.
#[derive(Clone)]
pub struct CertificateService {
    inner: Arc<Inner>,
}

struct Inner {
    ca: Arc<CertificateAuthority>,
    authenticator: Arc<dyn Authenticator>,
    /// The mesh's trust domain: the only one certificates are issued in.
    trust_domain: String,
}

impl CertificateService {
    /// A service signing with `ca` for callers `authenticator` accepts, in `trust_domain`.
    pub fn new(ca: Arc<CertificateAuthority>, authenticator: Arc<dyn Authenticator>, trust_domain: &str) -> Self {
        Self { inner: Arc::new(Inner { ca, authenticator, trust_domain: trust_domain.to_string() }) }
    }
}

/// The SPIFFE identity in the URI SANs of a DER certificate, if it has exactly one.
pub fn certificate_identity(der: &[u8]) -> Option<SpiffeId> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
        _ => None,
    });
    let (first, second) = (uris.next()?, uris.next());
    if second.is_some() {
        return None;
    }
    first.parse().ok()
}

impl Credentials {
    /// The credentials of a request with `headers` and `extensions` (where tonic's TLS server
    /// puts the client certificates it verified): its bearer token, cluster id and certificate.
    pub fn of(headers: &http::HeaderMap, extensions: &http::Extensions) -> Self {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let bearer_token = header("authorization").and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim().to_string())
        });
        let certs = extensions.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(TlsConnectInfo::peer_certs);
        let peer_identity = certs.and_then(|certs| certs.first().and_then(|c| certificate_identity(c)));
        Self { bearer_token, cluster_id: header("clusterid"), peer_identity }
    }
}

/// Who presented `credentials`: the identity of a verified client certificate, else whom
/// `authenticator` takes the bearer token for. `what` names the request in log lines.
pub async fn authenticate(
    authenticator: &dyn Authenticator,
    credentials: &Credentials,
    what: &str,
) -> Result<Caller, Status> {
    if let Some(id) = &credentials.peer_identity {
        return Ok(Caller::Workload(id.clone()));
    }
    if credentials.bearer_token.is_none() {
        tracing::warn!("{what} refused: no client certificate and no bearer token");
        return Err(Status::unauthenticated("no client certificate and no bearer token"));
    }
    authenticator.authenticate(credentials).await.map_err(|e| {
        tracing::warn!(reason = %e, "{what} refused: not authenticated");
        Status::unauthenticated(e.0)
    })
}

impl Inner {
    async fn create(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<IstioCertificateResponse, Status> {
        let credentials = Credentials::of(request.metadata().as_ref(), request.extensions());
        let request = request.into_inner();
        let caller = authenticate(&*self.authenticator, &credentials, "certificate request").await?;
        let identity = match (request.impersonated(), &caller) {
            (None, Caller::Workload(id)) => id.clone(),
            (None, Caller::NodeAgent(node)) => {
                return Err(self.refuse(&caller, Code::PermissionDenied, format!(
                    "the node agent of {node} must name the workload identity it asks for (metadata ImpersonatedIdentity)"
                )));
            }
            (Some(asked), Caller::Workload(id)) => {
                return Err(self.refuse(
                    &caller,
                    Code::PermissionDenied,
                    format!("{id} may not ask for {asked}: only node agents may impersonate"),
                ));
            }
            (Some(asked), Caller::NodeAgent(node)) => {
                let id: SpiffeId = asked.parse().map_err(|e: crate::spiffe::SpiffeIdError| {
                    self.refuse(&caller, Code::InvalidArgument, e.to_string())
                })?;
                if !self.authenticator.may_impersonate(node, &id) {
                    return Err(self.refuse(&caller, Code::PermissionDenied, format!(
                        "the node agent of {node} may not ask for {id}: no workload of that service account runs on {node}"
                    )));
                }
                id
            }
        };
        if identity.trust_domain != self.trust_domain {
            return Err(self.refuse(
                &caller,
                Code::PermissionDenied,
                format!("{identity} is not in the mesh's trust domain {}", self.trust_domain),
            ));
        }
        let ttl = u64::try_from(request.validity_duration).map_err(|_| {
            self.refuse(
                &caller,
                Code::InvalidArgument,
                format!("validity_duration {} is negative", request.validity_duration),
            )
        })?;
        match self.ca.sign(&request.csr, &identity, Some(Duration::from_secs(ttl))) {
            Ok(cert_chain) => {
                tracing::info!(caller = ?caller, identity = %identity, ttl_s = ttl, "certificate issued");
                Ok(IstioCertificateResponse { cert_chain })
            }
            Err(e @ (CaError::InvalidCsr(_) | CaError::TtlTooLong { .. })) => {
                Err(self.refuse(&caller, Code::InvalidArgument, e.to_string()))
            }
            Err(e) => Err(self.refuse(&caller, Code::Internal, e.to_string())),
        }
    }

    fn refuse(&self, caller: &Caller, code: Code, reason: String) -> Status {
        tracing::warn!(caller = ?caller, code = ?code, reason = %reason, "certificate request refused");
        Status::new(code, reason)
    }
}

impl tonic::server::NamedService for CertificateService {
    const NAME: &'static str = SERVICE_NAME;
}

/// `CreateCertificate` as tonic's unary machinery wants it.
struct Create(Arc<Inner>);

impl tonic::server::UnaryService<IstioCertificateRequest> for Create {
    type Response = IstioCertificateResponse;
    type Future = BoxFuture<'static, Result<tonic::Response<IstioCertificateResponse>, Status>>;

    fn call(&mut self, request: tonic::Request<IstioCertificateRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.create(request).await.map(tonic::Response::new) })
    }
}

/// Requests are a CSR and a little metadata.
const MAX_REQUEST: usize = 64 * 1024;

impl tower::Service<http::Request<tonic::body::Body>> for CertificateService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != crate::api::CREATE_CERTIFICATE_PATH {
            let status = Status::unimplemented(format!("{} is not served", request.uri().path()));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let inner = self.inner.clone();
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<IstioCertificateResponse, IstioCertificateRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec).max_decoding_message_size(MAX_REQUEST);
            Ok(grpc.unary(Create(inner), request).await)
        })
    }
}

/// Calls `CreateCertificate` on `channel` (a node agent's or a test's client).
pub async fn create_certificate(
    channel: tonic::transport::Channel,
    request: tonic::Request<IstioCertificateRequest>,
) -> Result<IstioCertificateResponse, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| Status::unavailable(format!("the CA is not reachable: {e}")))?;
    let codec = tonic_prost::ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default();
    let path = http::uri::PathAndQuery::from_static(crate::api::CREATE_CERTIFICATE_PATH);
    grpc.unary(request, path, codec).await.map(tonic::Response::into_inner)
}
