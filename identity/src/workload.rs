//! The node side of workload certificates: the key is made here and never leaves the node; the
//! CA is asked (as the node agent, impersonating the workload) to sign it; what comes back is
//! checked before it is used — the leaf must carry exactly the identity asked for and the key
//! made here — and renewed at about half its life, with jitter, backing off when the CA fails.

use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::api::IstioCertificateRequest;
use crate::service::{certificate_identity, create_certificate};
use crate::spiffe::SpiffeId;

/// Why a certificate could not be had.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The CA refused or could not be reached.
    #[error("the CA refused the request for {identity}: {status}")]
    Refused {
        /// The identity asked for.
        identity: SpiffeId,
        /// What the CA said.
        status: tonic::Status,
    },
    /// The CA answered with something that is not a certificate for the key and identity asked
    /// for: never used.
    #[error("the CA's answer for {identity} is not usable: {reason}")]
    BadResponse {
        /// The identity asked for.
        identity: SpiffeId,
        /// What is wrong with it.
        reason: String,
    },
    /// No key could be made.
    #[error("cannot make a key: {0}")]
    Key(String),
    /// The token to present could not be read or sent.
    #[error("cannot present the token: {0}")]
    Token(String),
}

/// A workload's key and the chain the CA signed for it.
#[derive(Clone)]
pub struct IssuedCertificate {
    /// The identity in the leaf.
    pub identity: SpiffeId,
    /// The private key (PEM), made on this node.
    pub key_pem: String,
    /// PEM certificates: the leaf first, the root last.
    pub chain: Vec<String>,
    /// The leaf's validity.
    pub not_before: SystemTime,
    /// The leaf's expiry.
    pub not_after: SystemTime,
    /// The leaf's serial number (hex), for logs and tests.
    pub serial: String,
    /// When it arrived here.
    pub received: SystemTime,
}

impl std::fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("IssuedCertificate")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish()
    }
}

fn system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 { SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64) } else { SystemTime::UNIX_EPOCH }
}

impl IssuedCertificate {
    /// Checks the CA's `chain` for the key `key` and `identity`.
    pub fn from_response(identity: &SpiffeId, key: &KeyPair, chain: Vec<String>) -> Result<Self, IssueError> {
        let bad = |reason: String| IssueError::BadResponse { identity: identity.clone(), reason };
        if chain.len() < 2 {
            return Err(bad(format!("{} certificates; a leaf and a root at least are expected", chain.len())));
        }
        let leaf_der = pem::parse(&chain[0]).map_err(|e| bad(format!("the leaf is not PEM: {e}")))?.into_contents();
        let (_, leaf) = X509Certificate::from_der(&leaf_der).map_err(|e| bad(format!("the leaf: {e}")))?;
        if leaf.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(key).as_slice() {
            return Err(bad("the leaf is not for the key made here".into()));
        }
        match certificate_identity(&leaf_der) {
            Some(got) if &got == identity => {}
            got => return Err(bad(format!("the leaf names {got:?}"))),
        }
        for (i, pair) in chain.windows(2).enumerate() {
            let der =
                |p: &str| pem::parse(p).map(pem::Pem::into_contents).map_err(|e| bad(format!("certificate {i}: {e}")));
            let (child, parent) = (der(&pair[0])?, der(&pair[1])?);
            let (_, child) = X509Certificate::from_der(&child).map_err(|e| bad(format!("certificate {i}: {e}")))?;
            let (_, parent) =
                X509Certificate::from_der(&parent).map_err(|e| bad(format!("certificate {}: {e}", i + 1)))?;
            child
                .verify_signature(Some(parent.public_key()))
                .map_err(|e| bad(format!("certificate {i} is not signed by the next one: {e}")))?;
        }
        Ok(Self {
            identity: identity.clone(),
            key_pem: key.serialize_pem(),
            not_before: system_time(leaf.validity().not_before),
            not_after: system_time(leaf.validity().not_after),
            serial: leaf.raw_serial_as_string(),
            received: SystemTime::now(),
            chain,
        })
    }

    /// The root the chain ends with (the trust bundle).
    pub fn root(&self) -> &str {
        self.chain.last().map_or("", String::as_str)
    }

    /// The chain a workload presents: the leaf and the intermediates, without the root.
    pub fn presented(&self) -> &[String] {
        &self.chain[..self.chain.len() - 1]
    }

    /// When to renew: half the remaining life after it arrived (or after `not_before`, if that
    /// is later), moved by `jitter` (in -1..=1) up to a tenth of that life either way, so a
    /// node's certificates do not all renew at once. (From arrival, not from `not_before`: the
    /// CA back-dates that by its clock skew, which would make a short-lived certificate due at
    /// once.)
    pub fn renew_at(&self, jitter: f64) -> SystemTime {
        let start = self.received.max(self.not_before);
        let life = self.not_after.duration_since(start).unwrap_or_default();
        start + life.mul_f64(0.5 + 0.1 * jitter.clamp(-1.0, 1.0))
    }
}

/// How long to wait before attempt `attempt` (from 0) after failures: 1 s doubling to 60 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.min(6)).min(Duration::from_secs(60))
}

/// Asks the CA for workload certificates as a node agent.
#[derive(Clone)]
pub struct CertificateClient {
    channel: tonic::transport::Channel,
    token: Token,
}

/// The bearer token a [`CertificateClient`] presents.
#[derive(Clone)]
enum Token {
    Fixed(String),
    /// Read again for every request: a Kubernetes projected token is rotated in place.
    File(std::path::PathBuf),
}

impl CertificateClient {
    /// A client of the CA at `channel` presenting the node token `token`.
    pub fn new(channel: tonic::transport::Channel, token: &str) -> Self {
        Self { channel, token: Token::Fixed(token.to_string()) }
    }

    /// A client of the CA at `channel` presenting the token in `path` as it is at each request.
    pub fn with_token_file(channel: tonic::transport::Channel, path: &std::path::Path) -> Self {
        Self { channel, token: Token::File(path.to_path_buf()) }
    }

    fn token(&self) -> Result<String, IssueError> {
        match &self.token {
            Token::Fixed(token) => Ok(token.clone()),
            Token::File(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|e| IssueError::Token(format!("reading {}: {e}", path.display()))),
        }
    }

    /// A new key for `identity`, signed by the CA, valid for `ttl` (None: the CA's default).
    pub async fn issue(&self, identity: &SpiffeId, ttl: Option<Duration>) -> Result<IssuedCertificate, IssueError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| IssueError::Key(e.to_string()))?;
        let csr = CertificateParams::new(Vec::<String>::new())
            .and_then(|p| p.serialize_request(&key))
            .and_then(|r| r.pem())
            .map_err(|e| IssueError::Key(e.to_string()))?;
        let body = IstioCertificateRequest {
            csr,
            validity_duration: ttl.map_or(0, |t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX)),
            metadata: None,
        }
        .impersonating(&identity.to_string());
        let mut request = tonic::Request::new(body);
        let bearer = format!("Bearer {}", self.token()?)
            .parse()
            .map_err(|_| IssueError::Token("the token is not a valid header value".into()))?;
        request.metadata_mut().insert("authorization", bearer);
        let response = create_certificate(self.channel.clone(), request)
            .await
            .map_err(|status| IssueError::Refused { identity: identity.clone(), status })?;
        IssuedCertificate::from_response(identity, &key, response.cert_chain)
    }
}
