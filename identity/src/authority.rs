//! sluice's certificate authority: a self-signed root kept in a directory of its own (created
//! once, then reused, so a restart keeps every issued certificate valid), or Istio's plug-in
//! layout (`ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`). Leaf certificates
//! follow istiod's rules: the SAN is the identity the *caller* authenticated as, never what the
//! CSR asks for; key usage digitalSignature + keyEncipherment; extended key usage serverAuth +
//! clientAuth; valid from two minutes ago (clock skew); 24 h unless asked, 90 days at most.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate, X509CertificationRequest};
use x509_parser::public_key::PublicKey;

use crate::spiffe::SpiffeId;

/// Istio's plug-in files (`--ca-dir`, Secret `cacerts`).
pub const PLUGIN_FILES: [&str; 4] = ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"];

/// How long leaf certificates live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafPolicy {
    /// When the request does not say (istiod: 24 h).
    pub default_ttl: Duration,
    /// The most a request may ask for (istiod: 90 days); more is refused.
    pub max_ttl: Duration,
}

impl Default for LeafPolicy {
    fn default() -> Self {
        Self { default_ttl: Duration::from_secs(24 * 3600), max_ttl: Duration::from_secs(90 * 24 * 3600) }
    }
}

/// A leaf's validity starts this long before it is signed, for clocks a little behind.
pub const CLOCK_SKEW: Duration = Duration::from_secs(120);

/// How long a self-signed root lives (istiod: 10 years).
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Why the CA cannot start or cannot sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file of the CA could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// A file of the CA holds something unusable.
    #[error("{path}: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The certificate signing request is malformed, badly signed or for an unaccepted key.
    #[error("invalid certificate signing request: {0}")]
    InvalidCsr(String),
    /// The request asks for a longer life than the policy allows.
    #[error("the requested TTL {requested:?} is greater than the max allowed TTL {max:?}")]
    TtlTooLong {
        /// What was asked for.
        requested: Duration,
        /// The policy's maximum.
        max: Duration,
    },
    /// A root kept by the caller ([`CertificateAuthority::from_stored_root`]) is unusable.
    #[error("{place}: {reason}")]
    BadStored {
        /// Where it is kept, and which part is wrong.
        place: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Signing failed (should not happen with a usable key).
    #[error("cannot sign: {0}")]
    Signing(String),
}

/// Where the CA's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// A root sluice made, kept in this directory.
    SelfSigned(PathBuf),
    /// Istio's plug-in layout in this directory.
    PlugIn(PathBuf),
    /// A root sluice made, kept by the caller where this names (a Kubernetes Secret).
    Stored(String),
    /// A root in memory only.
    Ephemeral,
}

/// A certificate authority that signs workload certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// The certificates that follow a leaf in a chain: the signing certificate and its
    /// intermediates (plug-in `cert-chain.pem`), then the root.
    chain: Vec<String>,
    root: String,
    policy: LeafPolicy,
    source: CaSource,
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Io { path: path.to_path_buf(), source })
}

/// Writes `contents` to `path` through a temporary file and a rename, so a crash never leaves
/// half a key; `secret` files are readable by their owner only.
fn write_atomically(path: &Path, contents: &str, secret: bool) -> Result<(), CaError> {
    let io = |source| CaError::Io { path: path.to_path_buf(), source };
    let tmp = path.with_extension("tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

/// The PEM certificates in `text`, each as its own PEM string.
fn certificates(path: &Path, text: &str) -> Result<Vec<String>, CaError> {
    let bad = |reason: String| CaError::BadFile { path: path.to_path_buf(), reason };
    let blocks = pem::parse_many(text).map_err(|e| bad(format!("not PEM: {e}")))?;
    let mut out = Vec::new();
    for block in blocks {
        if block.tag() != "CERTIFICATE" {
            return Err(bad(format!("holds a {} block where certificates are expected", block.tag())));
        }
        X509Certificate::from_der(block.contents()).map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
        out.push(pem::encode(&block));
    }
    Ok(out)
}

/// Checks that `cert_pem` is a CA certificate whose public key is `key`'s.
fn check_signing_pair(path: &Path, cert_pem: &str, key: &KeyPair) -> Result<(), CaError> {
    let bad = |reason: String| CaError::BadFile { path: path.to_path_buf(), reason };
    let block = pem::parse(cert_pem).map_err(|e| bad(format!("not PEM: {e}")))?;
    let (_, cert) = X509Certificate::from_der(block.contents()).map_err(|e| bad(format!("not a certificate: {e}")))?;
    if !cert.is_ca() {
        return Err(bad("is not a CA certificate (basicConstraints CA:TRUE)".into()));
    }
    if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(key).as_slice() {
        return Err(bad("does not belong to the key in ca-key.pem".into()));
    }
    Ok(())
}

fn load_key(path: &Path) -> Result<KeyPair, CaError> {
    KeyPair::from_pem(&read(path)?)
        .map_err(|e| CaError::BadFile { path: path.to_path_buf(), reason: format!("not a usable private key: {e}") })
}

fn issuer(path: &Path, cert_pem: &str, key: KeyPair) -> Result<Issuer<'static, KeyPair>, CaError> {
    Issuer::from_ca_cert_pem(cert_pem, key)
        .map_err(|e| CaError::BadFile { path: path.to_path_buf(), reason: format!("cannot sign with it: {e}") })
}

/// 16 random bytes with the top bit clear (a positive serial of at most 128 bits, RFC 5280).
fn serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| CaError::Signing("no randomness for a serial number".into()))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

impl CertificateAuthority {
    /// A new self-signed root (ECDSA P-256, 10 years, organization `trust_domain`, as istiod's):
    /// its key and its certificate, PEM.
    fn new_root(trust_domain: &str) -> Result<(KeyPair, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Signing(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, trust_domain);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        // One instant for both ends: the life is exactly the TTL plus the skew.
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + ROOT_TTL;
        params.serial_number = Some(serial()?);
        let cert = params.self_signed(&key).map_err(|e| CaError::Signing(e.to_string()))?;
        Ok((key, cert.pem()))
    }

    /// A CA whose root is `root` signed by `key`.
    fn rooted(path: &Path, root: String, key: KeyPair, source: CaSource) -> Result<Self, CaError> {
        check_signing_pair(path, &root, &key)?;
        Ok(Self {
            issuer: issuer(path, &root, key)?,
            chain: vec![root.clone()],
            root,
            policy: LeafPolicy::default(),
            source,
        })
    }

    /// The self-signed root in `dir`, created if the directory holds none yet.
    pub fn self_signed(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let (cert_path, key_path) = (dir.join("ca-cert.pem"), dir.join("ca-key.pem"));
        if !cert_path.exists() || !key_path.exists() {
            fs::create_dir_all(dir).map_err(|source| CaError::Io { path: dir.to_path_buf(), source })?;
            let (key, root) = Self::new_root(trust_domain)?;
            // The key first: a root certificate without its key would be taken for a complete CA.
            write_atomically(&key_path, &key.serialize_pem(), true)?;
            write_atomically(&cert_path, &root, false)?;
            tracing::info!(dir = %dir.display(), trust_domain, "created a self-signed root CA");
        }
        let (root, key) = (read(&cert_path)?, load_key(&key_path)?);
        Self::rooted(&cert_path, root, key, CaSource::SelfSigned(dir.to_path_buf()))
    }

    /// A new self-signed root for a caller that keeps it itself: its certificate and key, PEM.
    pub fn new_root_pem(trust_domain: &str) -> Result<(String, String), CaError> {
        let (key, root) = Self::new_root(trust_domain)?;
        Ok((root, key.serialize_pem()))
    }

    /// The self-signed root `cert_pem` with its key `key_pem`, kept by the caller at `place`
    /// (named in errors, with the part that is wrong).
    pub fn from_stored_root(place: &str, cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let part = |i: usize| format!("{place}, {}", PLUGIN_FILES[i]);
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| CaError::BadStored { place: part(1), reason: format!("not a usable private key: {e}") })?;
        let source = CaSource::Stored(place.to_string());
        Self::rooted(Path::new(place), cert_pem.to_string(), key, source).map_err(|e| match e {
            CaError::BadFile { reason, .. } => CaError::BadStored { place: part(0), reason },
            other => other,
        })
    }

    /// A self-signed root that lives in memory only: every start makes a new one, so what it
    /// signed does not verify after a restart (for a control plane without a state directory).
    pub fn ephemeral(trust_domain: &str) -> Result<Self, CaError> {
        let (key, root) = Self::new_root(trust_domain)?;
        Self::rooted(Path::new("(in memory)"), root, key, CaSource::Ephemeral)
    }

    /// Istio's plug-in layout in `dir`: `ca-key.pem` signs as `ca-cert.pem`, `cert-chain.pem`
    /// is the chain from it up to (not always including) the root in `root-cert.pem`.
    pub fn plug_in(dir: &Path) -> Result<Self, CaError> {
        let [cert_path, key_path, chain_path, root_path] = PLUGIN_FILES.map(|f| dir.join(f));
        let signing = read(&cert_path)?;
        let key = load_key(&key_path)?;
        check_signing_pair(&cert_path, &signing, &key)?;
        let mut chain = certificates(&chain_path, &read(&chain_path)?)?;
        let roots = certificates(&root_path, &read(&root_path)?)?;
        let root = roots
            .first()
            .cloned()
            .ok_or_else(|| CaError::BadFile { path: root_path.clone(), reason: "holds no certificate".into() })?;
        let signing_cert = certificates(&cert_path, &signing)?;
        if chain.is_empty() {
            chain = signing_cert;
        } else if chain.first() != signing_cert.first() {
            return Err(CaError::BadFile { path: chain_path, reason: "does not start with ca-cert.pem".into() });
        }
        if chain.last() != Some(&root) {
            chain.push(root.clone());
        }
        Ok(Self {
            issuer: issuer(&cert_path, &signing, key)?,
            chain,
            root,
            policy: LeafPolicy::default(),
            source: CaSource::PlugIn(dir.to_path_buf()),
        })
    }

    /// This CA with leaves living as `policy` says.
    pub fn with_policy(mut self, policy: LeafPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Where the keys come from.
    pub fn source(&self) -> &CaSource {
        &self.source
    }

    /// The root certificate (PEM): the trust bundle workloads verify peers with.
    pub fn root_pem(&self) -> &str {
        &self.root
    }

    /// The leaf policy.
    pub fn policy(&self) -> LeafPolicy {
        self.policy
    }

    /// Signs the key of `csr_pem` for `identity` (the caller's authenticated identity; whatever
    /// names the CSR asks for are ignored), valid for `ttl` (None or zero: the policy's
    /// default). Returns the chain: the leaf first, the root last.
    pub fn sign(&self, csr_pem: &str, identity: &SpiffeId, ttl: Option<Duration>) -> Result<Vec<String>, CaError> {
        let ttl = ttl.filter(|t| !t.is_zero()).unwrap_or(self.policy.default_ttl);
        if ttl > self.policy.max_ttl {
            return Err(CaError::TtlTooLong { requested: ttl, max: self.policy.max_ttl });
        }
        let csr = parse_csr(csr_pem)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = identity.to_string().try_into().map_err(|e| CaError::Signing(format!("{identity}: {e}")))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + ttl;
        params.serial_number = Some(serial()?);
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&csr.public_key, &self.issuer).map_err(|e| CaError::Signing(e.to_string()))?;
        let mut chain = vec![leaf.pem()];
        chain.extend(self.chain.iter().cloned());
        Ok(chain)
    }
}

impl CertificateAuthority {
    /// A serving certificate for `dns_names` with a key made here (the control plane's own TLS
    /// port): the chain (leaf first) and the key, PEM.
    pub fn serving_certificate(&self, dns_names: &[String], ttl: Duration) -> Result<(Vec<String>, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Signing(e.to_string()))?;
        let mut params = CertificateParams::new(dns_names.to_vec()).map_err(|e| CaError::Signing(e.to_string()))?;
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + ttl;
        params.serial_number = Some(serial()?);
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&key, &self.issuer).map_err(|e| CaError::Signing(e.to_string()))?;
        let mut chain = vec![leaf.pem()];
        chain.extend(self.chain.iter().cloned());
        Ok((chain, key.serialize_pem()))
    }
}

/// Parses and verifies a CSR, and checks its key is one Istio accepts: ECDSA P-256 or P-384,
/// or RSA of at least 2048 bits.
fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, CaError> {
    let invalid = |reason: String| CaError::InvalidCsr(reason);
    let block = pem::parse(csr_pem).map_err(|e| invalid(format!("not PEM: {e}")))?;
    if block.tag() != "CERTIFICATE REQUEST" {
        return Err(invalid(format!("a {} block, not a CERTIFICATE REQUEST", block.tag())));
    }
    let (_, request) = X509CertificationRequest::from_der(block.contents())
        .map_err(|e| invalid(format!("not a PKCS#10 request: {e}")))?;
    let key = request.certification_request_info.subject_pki.parsed().map_err(|e| invalid(format!("its key: {e}")))?;
    match &key {
        PublicKey::EC(_) if matches!(key.key_size(), 256 | 384) => {}
        PublicKey::RSA(_) if key.key_size() >= 2048 => {}
        other => {
            return Err(invalid(format!(
                "a {}-bit {} key; ECDSA P-256/P-384 or RSA of 2048 bits or more is required",
                other.key_size(),
                match other {
                    PublicKey::EC(_) => "EC",
                    PublicKey::RSA(_) => "RSA",
                    _ => "unsupported",
                }
            )));
        }
    }
    CertificateSigningRequestParams::from_der(&block.contents().to_vec().into())
        .map_err(|e| invalid(format!("cannot be verified: {e}")))
}
