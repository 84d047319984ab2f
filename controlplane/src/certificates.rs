//! The certificate side of `sluice serve`, as istiod's: the CA (Istio's plug-in layout from
//! `--ca-dir`, else a self-signed root kept in the state directory, else one in memory), the
//! control plane's own serving certificate for the TLS port (issued by that CA unless files are
//! given), node tokens for node agents, and who may impersonate whom.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ring::digest::{SHA256, digest};
use sluice_identity::service::{AuthError, Authenticator, BoxFuture, Caller, Credentials};
use sluice_identity::{CertificateAuthority, LeafPolicy, SpiffeId};

use crate::generator::MeshGenerator;

/// How `sluice serve` runs its CA.
#[derive(Debug, Clone)]
pub struct CaOptions {
    /// Istio's plug-in layout (`ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`).
    pub ca_dir: Option<PathBuf>,
    /// Node tokens: lines of `<node name> <token>`.
    pub node_tokens: Option<PathBuf>,
    /// With Kubernetes: the service accounts (namespace, name) of node agents, whose reviewed
    /// tokens act for their pods' nodes.
    pub node_accounts: Vec<(String, String)>,
    /// DNS names of the control plane's serving certificate.
    pub serving_names: Vec<String>,
    /// Leaf lifetimes.
    pub policy: LeafPolicy,
}

impl Default for CaOptions {
    fn default() -> Self {
        Self {
            ca_dir: None,
            node_tokens: None,
            node_accounts: Vec::new(),
            serving_names: DEFAULT_SERVING_NAMES.iter().map(|n| n.to_string()).collect(),
            policy: LeafPolicy::default(),
        }
    }
}

/// The names the serving certificate has unless told: istiod's Service (what istio-agent and
/// ztunnel dial) and localhost.
pub const DEFAULT_SERVING_NAMES: [&str; 3] = ["istiod.istio-system.svc", "sluice.sluice-system.svc", "localhost"];

/// How long the control plane's serving certificate lives; a new one is issued at every start.
pub const SERVING_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Opens the CA `options` describe, for the mesh's `trust_domain`; the self-signed root lives in
/// `<state_dir>/ca`.
pub fn open_ca(
    options: &CaOptions,
    trust_domain: &str,
    state_dir: Option<&Path>,
) -> anyhow::Result<CertificateAuthority> {
    let ca = match (&options.ca_dir, state_dir) {
        (Some(dir), _) => CertificateAuthority::plug_in(dir)
            .with_context(|| format!("loading the plug-in CA from {}", dir.display()))?,
        (None, Some(state)) => CertificateAuthority::self_signed(&state.join("ca"), trust_domain)
            .context("opening the self-signed CA in the state directory")?,
        (None, None) => {
            tracing::warn!(
                "no --state-dir and no --ca-dir: the CA's root lives in memory only, so certificates it issues \
                 stop verifying when sluice restarts"
            );
            CertificateAuthority::ephemeral(trust_domain).context("creating an in-memory CA")?
        }
    };
    tracing::info!(source = ?ca.source(), %trust_domain, "certificate authority ready");
    Ok(ca.with_policy(options.policy))
}

/// True when `dir` holds any file of Istio's plug-in layout. An optional Secret `cacerts`
/// mounted there holds none when the Secret does not exist: istiod then self-signs, and so
/// does sluice with `--ca-dir-if-present`. Any of them present means a plug-in CA, which must
/// then be complete.
pub fn plug_in_present(dir: &Path) -> bool {
    sluice_identity::authority::PLUGIN_FILES.iter().any(|f| dir.join(f).exists())
}

/// Node agents' tokens, kept as digests.
#[derive(Debug, Default, Clone)]
pub struct NodeTokens {
    nodes: HashMap<Vec<u8>, String>,
}

fn token_digest(token: &str) -> Vec<u8> {
    digest(&SHA256, token.as_bytes()).as_ref().to_vec()
}

impl NodeTokens {
    /// Reads `path`: one `<node name> <token>` per line; blank lines and `#` comments are skipped.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading node tokens {}", path.display()))?;
        Self::parse(&text).map_err(|(line, reason)| anyhow::anyhow!("{}:{line}: {reason}", path.display()))
    }

    /// Parses the lines of a node token file; an error names the line (from 1) and why.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut nodes = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [node, token] = fields.as_slice() else {
                return Err((i + 1, "expected `<node name> <token>`".into()));
            };
            if token.len() < 16 {
                return Err((i + 1, format!("the token of node {node} is shorter than 16 characters")));
            }
            if nodes.insert(token_digest(token), node.to_string()).is_some() {
                return Err((i + 1, "this token is already another node's".into()));
            }
        }
        Ok(Self { nodes })
    }

    /// The node whose token `token` is.
    pub fn node(&self, token: &str) -> Option<&str> {
        self.nodes.get(&token_digest(token)).map(String::as_str)
    }
}

/// Authenticates CSR (and TLS xDS) callers by node token, or in Kubernetes by a service-account
/// token the API server reviews; lets a node agent impersonate the service accounts of the
/// workloads on its node in the config being served.
pub struct MeshAuthenticator {
    tokens: NodeTokens,
    generator: Arc<MeshGenerator>,
    /// The API server that reviews service-account tokens, and the trust domain of the
    /// identities they prove.
    reviewer: Option<(kube::Client, String)>,
    /// Service accounts (namespace, name) whose tokens are node agents' (istiod's
    /// `CA_TRUSTED_NODE_ACCOUNTS`, ztunnel's there): such a caller acts for its pod's node.
    node_accounts: std::collections::BTreeSet<(String, String)>,
}

impl MeshAuthenticator {
    /// Callers authenticated by `tokens`, impersonation decided on `generator`'s config.
    pub fn new(tokens: NodeTokens, generator: Arc<MeshGenerator>) -> Self {
        Self { tokens, generator, reviewer: None, node_accounts: Default::default() }
    }

    /// This authenticator also taking Kubernetes service-account tokens (audience `istio-ca`)
    /// that `client`'s API server reviews, as identities of `trust_domain`.
    pub fn with_token_review(mut self, client: kube::Client, trust_domain: &str) -> Self {
        self.reviewer = Some((client, trust_domain.to_string()));
        self
    }

    /// This authenticator taking the reviewed tokens of `accounts` (namespace, service
    /// account) for the node agents of their pods' nodes.
    pub fn with_node_accounts(mut self, accounts: impl IntoIterator<Item = (String, String)>) -> Self {
        self.node_accounts.extend(accounts);
        self
    }

    /// The node of a node agent's reviewed token: the API server's word, else the node the
    /// served config has its pod on.
    fn agent_node(&self, reviewed: &crate::token_review::Reviewed) -> Result<String, AuthError> {
        let account = format!("{}/{}", reviewed.namespace, reviewed.service_account);
        if let Some(node) = &reviewed.node {
            return Ok(node.clone());
        }
        let pod = reviewed.pod.as_deref().ok_or_else(|| {
            AuthError(format!("the token of node agent account {account} is bound to no pod, so to no node"))
        })?;
        let current = self.generator.current();
        let workload = current.snapshot.workloads.get(&(reviewed.namespace.clone(), pod.to_string()));
        workload.and_then(|w| w.node.clone()).ok_or_else(|| {
            AuthError(format!(
                "the pod {}/{pod} of node agent account {account} is on no known node",
                reviewed.namespace
            ))
        })
    }
}

impl Authenticator for MeshAuthenticator {
    fn authenticate<'a>(&'a self, credentials: &'a Credentials) -> BoxFuture<'a, Result<Caller, AuthError>> {
        Box::pin(async move {
            let token = credentials.bearer_token.as_deref().unwrap_or_default();
            if let Some(node) = self.tokens.node(token) {
                return Ok(Caller::NodeAgent(node.to_string()));
            }
            let Some((client, trust_domain)) = &self.reviewer else {
                return Err(AuthError("the bearer token is no node's token".into()));
            };
            let reviewed = crate::token_review::review(client, token).await.map_err(AuthError)?;
            let account = (reviewed.namespace.clone(), reviewed.service_account.clone());
            if self.node_accounts.contains(&account) {
                return self.agent_node(&reviewed).map(Caller::NodeAgent);
            }
            Ok(Caller::Workload(SpiffeId::new(trust_domain, &reviewed.namespace, &reviewed.service_account)))
        })
    }

    fn may_impersonate(&self, node: &str, identity: &SpiffeId) -> bool {
        let current = self.generator.current();
        // A workload without a node name belongs to every node (a one-machine mesh).
        current.snapshot.workloads.values().any(|w| {
            w.namespace == identity.namespace
                && w.service_account == identity.service_account
                && w.node.as_deref().is_none_or(|n| n == node)
        })
    }
}

/// xDS on the TLS port, as istiod authorizes it: the caller is authenticated as for the CSR
/// API (a client certificate of the mesh, or a node token), and may have only the config of
/// node ids that are its own.
pub struct XdsAuthorizer {
    authenticator: Arc<MeshAuthenticator>,
}

impl XdsAuthorizer {
    /// Callers authenticated by `authenticator`.
    pub fn new(authenticator: Arc<MeshAuthenticator>) -> Self {
        Self { authenticator }
    }
}

impl sluice_xds::authorization::Authorizer for XdsAuthorizer {
    fn authorize<'a>(
        &'a self,
        caller: &'a sluice_xds::authorization::StreamCaller,
        node: &'a sluice_xds::server::NodeInfo,
    ) -> BoxFuture<'a, Result<(), tonic::Status>> {
        Box::pin(async move {
            let credentials = Credentials::of(&caller.headers, &caller.extensions);
            let who = sluice_identity::service::authenticate(&*self.authenticator, &credentials, "xDS stream").await?;
            may_have(&who, &node.id, node.metadata.get(SERVICE_ACCOUNT_METADATA).map(String::as_str))
                .map_err(tonic::Status::permission_denied)
        })
    }
}

/// The node metadata field istiod checks a workload identity's service account against.
const SERVICE_ACCOUNT_METADATA: &str = "SERVICE_ACCOUNT";

/// Whether `caller` may have the config of node `node_id` (whose metadata names
/// `service_account`, if any). A workload: a sidecar or router of its namespace, and of its
/// service account when the node says which (istiod's rule). A node agent: its own node's
/// agent stream only.
pub fn may_have(caller: &Caller, node_id: &str, service_account: Option<&str>) -> Result<(), String> {
    let agent_of = node_id.strip_prefix(sluice_translator::dataplane::AGENT_NODE_PREFIX);
    match (caller, agent_of) {
        (Caller::NodeAgent(node), Some(of)) if of == node => Ok(()),
        (Caller::NodeAgent(node), _) => Err(format!(
            "the node agent of {node} may have only the config of {}{node}, not of {node_id}",
            sluice_translator::dataplane::AGENT_NODE_PREFIX
        )),
        (Caller::Workload(id), Some(_)) => Err(format!("{id} may not have a node agent's config ({node_id})")),
        (Caller::Workload(id), None) => {
            let node = sluice_translator::envoy::NodeId::parse(node_id).map_err(|e| e.to_string())?;
            if node.namespace != id.namespace {
                return Err(format!(
                    "{id} may not have the config of {node_id}: the proxy is in namespace {}, the identity in {}",
                    node.namespace, id.namespace
                ));
            }
            match service_account {
                Some(sa) if !sa.is_empty() && sa != id.service_account => Err(format!(
                    "{id} may not have the config of {node_id}: its metadata {SERVICE_ACCOUNT_METADATA} is {sa}"
                )),
                _ => Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_has_only_its_own_proxies_config() {
        let web = Caller::Workload(SpiffeId::new("cluster.local", "secure", "web"));
        let sidecar = "sidecar~127.0.2.10~web-v1.secure~secure.svc.cluster.local";
        assert_eq!(may_have(&web, sidecar, None), Ok(()));
        assert_eq!(may_have(&web, sidecar, Some("web")), Ok(()));
        let other_sa = may_have(&web, sidecar, Some("api")).unwrap_err();
        assert!(other_sa.contains("SERVICE_ACCOUNT is api"), "{other_sa}");
        let other_ns = may_have(&web, "sidecar~127.0.2.40~batch-v1.other~other.svc.cluster.local", None).unwrap_err();
        assert!(other_ns.contains("namespace other") && other_ns.contains("in secure"), "{other_ns}");
        assert!(may_have(&web, "agent~node-1", None).unwrap_err().contains("node agent's config"));
        assert!(may_have(&web, "nonsense", None).unwrap_err().contains("four"));
        let agent = Caller::NodeAgent("node-1".into());
        assert_eq!(may_have(&agent, "agent~node-1", None), Ok(()));
        assert!(may_have(&agent, "agent~node-2", None).unwrap_err().contains("only the config of agent~node-1"));
        assert!(may_have(&agent, sidecar, None).is_err());
    }

    #[test]
    fn a_plug_in_directory_is_present_when_any_of_its_files_is() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!plug_in_present(dir.path()), "an empty mount of a Secret that does not exist");
        std::fs::write(dir.path().join("ca-cert.pem"), "x").unwrap();
        assert!(plug_in_present(dir.path()), "half a plug-in CA is one (and refused as incomplete)");
        assert!(!plug_in_present(&dir.path().join("absent")));
    }

    #[test]
    fn node_tokens_are_parsed_strictly_and_looked_up_by_token() {
        let tokens = NodeTokens::parse("# nodes\nnode-1 0123456789abcdef0\n\nnode-2   fedcba98765432100\n").unwrap();
        assert_eq!(tokens.node("0123456789abcdef0"), Some("node-1"));
        assert_eq!(tokens.node("fedcba98765432100"), Some("node-2"));
        assert_eq!(tokens.node("nope"), None);
        assert_eq!(NodeTokens::parse("node-1\n").unwrap_err().0, 1);
        assert!(NodeTokens::parse("a 0123456789abcdef0\nb short\n").unwrap_err().1.contains("shorter"));
        assert!(NodeTokens::parse("a 0123456789abcdef0\nb 0123456789abcdef0\n").unwrap_err().1.contains("already"));
    }
}
