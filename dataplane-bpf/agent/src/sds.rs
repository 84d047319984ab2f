//! The agent's SDS server (Envoy's `SecretDiscoveryService`, SotW `StreamSecrets`) on a Unix
//! socket, with Istio's secret names: `default` (the workload's key and chain) and `ROOTCA`
//! (the trust bundle). Who is asking is read from the kernel, never from the request: the socket
//! peer's pid → its cgroup → the workload registered there → its service account. A process
//! only ever gets its own workload's certificate. Keys are made here ([`Certificates`]) and
//! never leave the node except to the workload they belong to.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use sluice_identity::SpiffeId;
use sluice_identity::workload::{CertificateClient, IssuedCertificate, backoff};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Istio's name of the workload's own certificate.
pub const WORKLOAD_SECRET: &str = "default";
/// Istio's name of the trust bundle.
pub const ROOT_SECRET: &str = "ROOTCA";
/// Type URL of `envoy.extensions.transport_sockets.tls.v3.Secret`.
pub const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Who is behind a pid: the identity of the workload whose cgroup the process is in.
pub trait Resolver: Send + Sync + 'static {
    /// The identity of process `pid`, or why it has none.
    fn identity_of(&self, pid: i32) -> Result<SpiffeId, String>;
}

/// The cgroup (relative to the cgroup2 mount, as `/proc/<pid>/cgroup` has it) of process `pid`.
pub fn cgroup_of(pid: i32) -> std::io::Result<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| PathBuf::from(p.trim()))
        .ok_or_else(|| std::io::Error::other(format!("process {pid} is in no cgroup2 cgroup")))
}

/// The cgroup2 path `cgroup` (as [`cgroup_of`] gives it) under `mount`.
pub fn under_mount(mount: &Path, cgroup: &Path) -> PathBuf {
    mount.join(cgroup.strip_prefix("/").unwrap_or(cgroup))
}

/// A certificate as it is renewed: None until the first one arrives.
type Watched = watch::Sender<Option<Arc<IssuedCertificate>>>;

/// The workloads' certificates, issued on first use and renewed at about half their life for as
/// long as some stream watches them.
pub struct Certificates {
    client: CertificateClient,
    ttl: Option<Duration>,
    /// The identities some stream watches; only the streams hold receivers, so a renewal task
    /// sees when the last one is gone.
    watched: Mutex<HashMap<SpiffeId, Arc<Watched>>>,
}

/// A number in -1..=1 from the system's randomness (renewal jitter).
fn jitter() -> f64 {
    let mut b = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) * 2.0 - 1.0
}

impl Certificates {
    /// Certificates from the CA behind `client`, `ttl` long (None: the CA's default).
    pub fn new(client: CertificateClient, ttl: Option<Duration>) -> Arc<Self> {
        Arc::new(Self { client, ttl, watched: Mutex::new(HashMap::new()) })
    }

    /// The certificate of `identity` as it is renewed: None until the first one arrives.
    pub fn watch(self: &Arc<Self>, identity: &SpiffeId) -> watch::Receiver<Option<Arc<IssuedCertificate>>> {
        let mut watched = self.watched.lock().expect("certificates lock");
        if let Some(tx) = watched.get(identity) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(None);
        let tx = Arc::new(tx);
        watched.insert(identity.clone(), tx.clone());
        tokio::spawn(self.clone().renew(identity.clone(), tx));
        rx
    }

    /// Identities whose certificates are kept renewed now.
    pub fn watched(&self) -> usize {
        self.watched.lock().expect("certificates lock").len()
    }

    /// Issues and renews `identity`'s certificate until nobody watches it.
    async fn renew(self: Arc<Self>, identity: SpiffeId, tx: Arc<Watched>) {
        let mut attempt = 0;
        loop {
            let wait = match self.client.issue(&identity, self.ttl).await {
                Ok(issued) => {
                    attempt = 0;
                    let at = issued.renew_at(jitter());
                    tracing::info!(identity = %identity, serial = %issued.serial, "workload certificate issued");
                    tx.send_replace(Some(Arc::new(issued)));
                    at.duration_since(SystemTime::now()).unwrap_or_default()
                }
                Err(e) => {
                    let wait = backoff(attempt);
                    attempt += 1;
                    // The current certificate, if any, stays in use until it expires.
                    tracing::warn!(identity = %identity, error = %e, retry_in = ?wait, "cannot get a workload certificate");
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => continue,
                _ = tx.closed() => {}
            }
            // Under the lock: a stream that subscribed since keeps the renewal going.
            let mut watched = self.watched.lock().expect("certificates lock");
            if tx.receiver_count() == 0 {
                watched.remove(&identity);
                tracing::info!(identity = %identity, "no stream watches the certificate: renewal stops");
                return;
            }
        }
    }
}

fn inline(text: String) -> Option<DataSource> {
    Some(DataSource { specifier: Some(Specifier::InlineString(text)), ..Default::default() })
}

/// The secret `name` made of `issued`, as Envoy's SDS sends it.
pub fn secret(name: &str, issued: &IssuedCertificate) -> Option<Secret> {
    let kind = match name {
        WORKLOAD_SECRET => secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(issued.presented().concat()),
            private_key: inline(issued.key_pem.clone()),
            ..Default::default()
        }),
        ROOT_SECRET => secret::Type::ValidationContext(CertificateValidationContext {
            trusted_ca: inline(issued.root().to_string()),
            ..Default::default()
        }),
        _ => return None,
    };
    Some(Secret { name: name.to_string(), r#type: Some(kind) })
}

/// The SDS service.
#[derive(Clone)]
pub struct Sds {
    resolver: Arc<dyn Resolver>,
    certificates: Arc<Certificates>,
}

impl Sds {
    /// SDS for the workloads `resolver` knows, with certificates from `certificates`.
    pub fn new(resolver: Arc<dyn Resolver>, certificates: Arc<Certificates>) -> Self {
        Self { resolver, certificates }
    }

    /// The gRPC service.
    pub fn service(self) -> SecretDiscoveryServiceServer<Self> {
        SecretDiscoveryServiceServer::new(self)
    }

    /// Binds the Unix socket `path` (replacing a stale one), open to every local user: Envoy
    /// runs as another user than the agent (uid 1337 in Istio's pods), and who asks is decided
    /// by the caller's cgroup, not by who may connect.
    pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        Ok(listener)
    }

    /// Serves on `listener` until `shutdown`.
    pub async fn serve_on(
        self,
        listener: tokio::net::UnixListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        tracing::info!(socket = ?listener.local_addr().ok(), "serving SDS");
        tonic::transport::Server::builder()
            .add_service(self.service())
            .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), shutdown)
            .await
            .map_err(std::io::Error::other)
    }

    /// Binds `path` and serves on it until `shutdown`.
    pub async fn serve(
        self,
        path: &Path,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let listener = Self::bind(path)?;
        self.serve_on(listener, shutdown).await
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaSecretsStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let info = request.extensions().get::<tonic::transport::server::UdsConnectInfo>().cloned();
        let pid = info.and_then(|i| i.peer_cred).and_then(|c| c.pid()).ok_or_else(|| {
            Status::permission_denied("SDS is served on a Unix socket only: the caller's process is unknown")
        })?;
        let identity = self.resolver.identity_of(pid).map_err(|why| {
            tracing::warn!(pid, reason = %why, "SDS refused");
            Status::permission_denied(format!("process {pid}: {why}"))
        })?;
        tracing::info!(pid, identity = %identity, "SDS stream opened");
        let certificates = self.certificates.watch(&identity);
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(stream(request.into_inner(), certificates, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented("SDS is served State-of-the-World (StreamSecrets), as istio-agent serves it"))
    }

    async fn fetch_secrets(&self, _request: Request<DiscoveryRequest>) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("use StreamSecrets"))
    }
}

/// One SDS stream: sends the secrets the client names whenever they are first available or
/// renewed.
async fn stream(
    mut requests: Streaming<DiscoveryRequest>,
    mut certificates: watch::Receiver<Option<Arc<IssuedCertificate>>>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
) {
    let mut names: Vec<String> = Vec::new();
    let mut sent: Option<String> = None;
    let mut nonce = 0u64;
    loop {
        let current = certificates.borrow_and_update().clone();
        if let Some(issued) = current.filter(|c| !names.is_empty() && sent.as_deref() != Some(c.serial.as_str())) {
            let resources: Vec<Any> = names
                .iter()
                .filter_map(|n| secret(n, &issued))
                .map(|s| Any { type_url: SECRET_TYPE.to_string(), value: s.encode_to_vec() })
                .collect();
            nonce += 1;
            let response = DiscoveryResponse {
                version_info: issued.serial.clone(),
                resources,
                type_url: SECRET_TYPE.to_string(),
                nonce: nonce.to_string(),
                ..Default::default()
            };
            if tx.send(Ok(response)).await.is_err() {
                return;
            }
            sent = Some(issued.serial.clone());
        }
        tokio::select! {
            request = requests.message() => match request {
                Ok(Some(r)) => {
                    if let Some(e) = &r.error_detail {
                        tracing::warn!(names = ?r.resource_names, error = %e.message, "SDS NACK");
                    }
                    if r.resource_names != names {
                        names = r.resource_names;
                        // Names changed: send the current secrets for them.
                        sent = None;
                    }
                }
                _ => return,
            },
            changed = certificates.changed() => if changed.is_err() { return },
        }
    }
}
