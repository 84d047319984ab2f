//! Istio's MeshConfig (`--mesh-config <file>`; ConfigMap `istio`, key `mesh`, in Kubernetes):
//! the fields sluice reads, with Istio's defaults. Other fields are reported as ignored, not
//! refused: a MeshConfig written for istiod keeps working.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::common::Duration;

/// The MeshConfig fields sluice reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    /// The trust domain of workload identities (`spiffe://<trustDomain>/ns/…/sa/…`).
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Other trust domains whose identities count as this one's (a migration's old domain).
    #[serde(default)]
    pub trust_domain_aliases: Vec<String>,
    /// Sidecars originate mTLS to workloads that hold certificates, unless a DestinationRule
    /// says otherwise.
    #[serde(default = "yes")]
    pub enable_auto_mtls: bool,
    /// Extension providers CUSTOM AuthorizationPolicies name (ext_authz servers).
    #[serde(default)]
    pub extension_providers: Vec<ExtensionProvider>,
}

/// One `extensionProviders` entry; of its kinds sluice reads the external authorizers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProvider {
    /// The name policies refer to it by.
    pub name: String,
    /// An HTTP authorizer.
    #[serde(default)]
    pub envoy_ext_authz_http: Option<ExtAuthzHttp>,
    /// A gRPC authorizer (Envoy's `envoy.service.auth.v3.Authorization`).
    #[serde(default)]
    pub envoy_ext_authz_grpc: Option<ExtAuthzGrpc>,
}

/// Istio's `EnvoyExternalAuthorizationHttpProvider`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtAuthzHttp {
    /// The authorizer's service: `<host>` or `<namespace>/<host>`.
    pub service: String,
    /// Its port.
    pub port: u32,
    /// How long a check may take (Istio's default 600s).
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// Prepended to the checked request's path.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Allow the request when the authorizer cannot be reached.
    #[serde(default)]
    pub fail_open: bool,
    /// The status returned when the authorizer fails (default 403).
    #[serde(default)]
    pub status_on_error: Option<String>,
    /// Request headers sent to the authorizer (exact names, or `x-*` / `*-x` patterns).
    #[serde(default)]
    pub include_request_headers_in_check: Vec<String>,
    /// The older name of `includeRequestHeadersInCheck`.
    #[serde(default)]
    pub include_headers_in_check: Vec<String>,
    /// Headers added to the check request.
    #[serde(default)]
    pub include_additional_headers_in_check: BTreeMap<String, String>,
    /// The request body sent with the check.
    #[serde(default)]
    pub include_request_body_in_check: Option<RequestBodyInCheck>,
    /// Authorizer response headers copied to the allowed request.
    #[serde(default)]
    pub headers_to_upstream_on_allow: Vec<String>,
    /// Authorizer response headers sent to the client on a denial.
    #[serde(default)]
    pub headers_to_downstream_on_deny: Vec<String>,
    /// Authorizer response headers sent to the client when allowed.
    #[serde(default)]
    pub headers_to_downstream_on_allow: Vec<String>,
}

/// Istio's `EnvoyExternalAuthorizationGrpcProvider`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtAuthzGrpc {
    /// The authorizer's service: `<host>` or `<namespace>/<host>`.
    pub service: String,
    /// Its port.
    pub port: u32,
    /// How long a check may take (Istio's default 600s).
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// Allow the request when the authorizer cannot be reached.
    #[serde(default)]
    pub fail_open: bool,
    /// The status returned when the authorizer fails (default 403).
    #[serde(default)]
    pub status_on_error: Option<String>,
    /// The request body sent with the check.
    #[serde(default)]
    pub include_request_body_in_check: Option<RequestBodyInCheck>,
}

/// How much of the request body a check carries.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestBodyInCheck {
    /// At most this many bytes.
    #[serde(default)]
    pub max_request_bytes: u32,
    /// Send what there is when the body is larger.
    #[serde(default)]
    pub allow_partial_message: bool,
    /// Send it as bytes rather than as a string.
    #[serde(default)]
    pub pack_as_bytes: bool,
}

fn default_trust_domain() -> String {
    "cluster.local".to_string()
}

fn yes() -> bool {
    true
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            trust_domain: default_trust_domain(),
            trust_domain_aliases: Vec::new(),
            enable_auto_mtls: true,
            extension_providers: Vec::new(),
        }
    }
}

/// Why a MeshConfig cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("MeshConfig {field}: {reason}")]
pub struct MeshConfigError {
    /// The field path.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

/// A DNS name as a trust domain must be: labels of letters, digits and `-`, dots between.
fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td.split('.').all(|l| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

impl MeshConfig {
    /// Parses MeshConfig YAML; returns the config and the paths of the fields sluice ignores.
    pub fn from_yaml(text: &str) -> Result<(Self, Vec<String>), MeshConfigError> {
        let mut ignored = Vec::new();
        let config: Option<MeshConfig> = if text.trim().is_empty() {
            None
        } else {
            let de = serde_yaml_ng::Deserializer::from_str(text);
            // The document may be empty but for comments: an Option, whose path prefix is `?.`.
            serde_ignored::deserialize(de, |path| {
                let path = path.to_string();
                ignored.push(path.strip_prefix("?.").map(str::to_string).unwrap_or(path));
            })
            .map_err(|e| MeshConfigError { field: "(document)".into(), reason: e.to_string() })?
        };
        let config = config.unwrap_or_default();
        let domains = std::iter::once(("trustDomain".to_string(), &config.trust_domain));
        let aliases =
            config.trust_domain_aliases.iter().enumerate().map(|(i, a)| (format!("trustDomainAliases[{i}]"), a));
        for (field, td) in domains.chain(aliases) {
            if !valid_trust_domain(td) {
                return Err(MeshConfigError { field, reason: format!("{td:?} is not a DNS name") });
            }
        }
        Ok((config, ignored))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istios_defaults_its_fields_and_the_rest_ignored() {
        assert_eq!(MeshConfig::from_yaml("").unwrap(), (MeshConfig::default(), vec![]));
        assert_eq!(MeshConfig::from_yaml("# nothing set\n").unwrap().0, MeshConfig::default());
        let (config, ignored) = MeshConfig::from_yaml(
            "trustDomain: example.org\ntrustDomainAliases: [old.example.org]\nenableAutoMtls: false\naccessLogFile: /dev/stdout\ndefaultConfig: {discoveryAddress: istiod:15012}\n",
        )
        .unwrap();
        assert_eq!(config.trust_domain, "example.org");
        assert_eq!(config.trust_domain_aliases, ["old.example.org"]);
        assert!(!config.enable_auto_mtls);
        assert_eq!(ignored, ["accessLogFile", "defaultConfig"]);
        let e = MeshConfig::from_yaml("trustDomainAliases: ['bad domain']\n").unwrap_err();
        assert_eq!(e.field, "trustDomainAliases[0]");
        assert!(MeshConfig::from_yaml("trustDomain: [1]\n").is_err());
    }
}
