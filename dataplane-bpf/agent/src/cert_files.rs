//! Certificate files for applications that read them, as proxyless gRPC's `file_watcher`
//! certificate provider does (gRFC A29): the workload's certificate, key and the mesh root from
//! the agent's SDS, written under Istio's file names and rewritten on every renewal. The caller
//! is known to the agent by its cgroup, as for any SDS client, so the files hold the identity
//! of the workload the calling process runs as (`sluice run --cert-dir`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;

use crate::sds::{ROOT_SECRET, SECRET_TYPE, WORKLOAD_SECRET};

/// The workload's certificate chain (leaf first), as istio-agent names it.
pub const CHAIN_FILE: &str = "cert-chain.pem";
/// The workload's private key.
pub const KEY_FILE: &str = "key.pem";
/// The mesh root.
pub const ROOT_FILE: &str = "root-cert.pem";

/// Why the files could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum CertFilesError {
    /// The agent's SDS could not be reached or refused the caller.
    #[error("SDS at {socket}: {reason}")]
    Sds {
        /// The agent's SDS socket.
        socket: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A file could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Writes `text` to `path` through a temporary file renamed over it, so a reader never sees a
/// half-written certificate; `private` files are readable by their owner only.
fn write_atomically(path: &Path, text: &str, private: bool) -> Result<(), CertFilesError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| CertFilesError::Write { path: path.to_path_buf(), source };
    let tmp = path.with_extension("tmp");
    let mode = if private { 0o600 } else { 0o644 };
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(err)?;
    file.write_all(text.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

fn inline(source: Option<&envoy_types::pb::envoy::config::core::v3::DataSource>) -> Option<String> {
    match source?.specifier.as_ref()? {
        Specifier::InlineString(s) => Some(s.clone()),
        Specifier::InlineBytes(b) => String::from_utf8(b.clone()).ok(),
        _ => None,
    }
}

/// The files of one SDS response: (chain, key, root), when it holds both secrets.
fn files_of(resources: &[envoy_types::pb::google::protobuf::Any]) -> Option<(String, String, String)> {
    let (mut identity, mut root) = (None, None);
    for any in resources {
        let s = Secret::decode(any.value.as_slice()).ok()?;
        match s.r#type? {
            secret::Type::TlsCertificate(t) if s.name == WORKLOAD_SECRET => {
                identity = Some((inline(t.certificate_chain.as_ref())?, inline(t.private_key.as_ref())?));
            }
            secret::Type::ValidationContext(v) if s.name == ROOT_SECRET => root = Some(inline(v.trusted_ca.as_ref())?),
            _ => {}
        }
    }
    let (chain, key) = identity?;
    Some((chain, key, root?))
}

/// One SDS stream: writes the files on every response until the stream ends.
async fn follow(socket: &Path, dir: &Path, node_id: &str, written: &mut u64) -> Result<(), CertFilesError> {
    let sds_err = |reason: String| CertFilesError::Sds { socket: socket.to_path_buf(), reason };
    let path = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::from_static("http://sds")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(hyper_util::rt::TokioIo::new) }
        }))
        .await
        .map_err(|e| sds_err(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let names = vec![WORKLOAD_SECRET.to_string(), ROOT_SECRET.to_string()];
    let first = DiscoveryRequest {
        node: Some(Node { id: node_id.to_string(), ..Default::default() }),
        resource_names: names.clone(),
        type_url: SECRET_TYPE.to_string(),
        ..Default::default()
    };
    tx.send(first).await.map_err(|e| sds_err(e.to_string()))?;
    let mut responses = SecretDiscoveryServiceClient::new(channel)
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .map_err(|e| sds_err(e.message().to_string()))?
        .into_inner();
    while let Some(response) = responses.message().await.map_err(|e| sds_err(e.message().to_string()))? {
        let Some((chain, key, root)) = files_of(&response.resources) else {
            return Err(sds_err("a response without the workload certificate and the root".into()));
        };
        // The key before the chain: the provider reloads when the chain changes.
        write_atomically(&dir.join(KEY_FILE), &key, true)?;
        write_atomically(&dir.join(ROOT_FILE), &root, false)?;
        write_atomically(&dir.join(CHAIN_FILE), &chain, false)?;
        *written += 1;
        tracing::info!(dir = %dir.display(), serial = %response.version_info, "certificate files written");
        let ack = DiscoveryRequest {
            version_info: response.version_info.clone(),
            response_nonce: response.nonce.clone(),
            resource_names: names.clone(),
            type_url: SECRET_TYPE.to_string(),
            ..Default::default()
        };
        if tx.send(ack).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Keeps the certificate files in `dir` (created if absent) current from the agent's SDS at
/// `socket`, reconnecting when the agent goes away, forever. `node_id` names the caller in its
/// requests (the agent knows it by its cgroup, not by this).
pub async fn keep(socket: PathBuf, dir: PathBuf, node_id: String) -> CertFilesError {
    if let Err(source) = std::fs::create_dir_all(&dir) {
        return CertFilesError::Write { path: dir, source };
    }
    let mut attempt = 0;
    loop {
        let mut written = 0;
        let ended = follow(&socket, &dir, &node_id, &mut written).await;
        if let Err(e @ CertFilesError::Write { .. }) = ended {
            return e;
        }
        if written > 0 {
            attempt = 0;
        }
        let wait = sluice_identity::workload::backoff(attempt).min(Duration::from_secs(30));
        attempt += 1;
        match ended {
            Ok(()) => tracing::warn!(retry_in = ?wait, "the agent's SDS stream ended; reconnecting"),
            Err(e) => tracing::warn!(error = %e, retry_in = ?wait, "cannot follow the workload certificate"),
        }
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_replaced_whole_and_the_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join(KEY_FILE);
        write_atomically(&key, "one", true).unwrap();
        write_atomically(&key, "two", true).unwrap();
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "two");
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!key.with_extension("tmp").exists());
    }
}
