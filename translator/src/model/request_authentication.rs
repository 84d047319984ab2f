//! `security.istio.io` RequestAuthentication: which JWTs a workload accepts, and Istio's
//! validation rules for it.

use serde::{Deserialize, Serialize};

use super::common::{Duration, LabelSelector};
use crate::diagnostic::Findings;

/// RequestAuthentication `spec`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    /// Workloads it applies to; none means the namespace (or the mesh, in the root namespace).
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    /// Gateway API targets (not supported yet).
    #[serde(default)]
    pub target_ref: Option<serde_json::Value>,
    /// Gateway API targets (not supported yet).
    #[serde(default)]
    pub target_refs: Vec<serde_json::Value>,
    /// The JWT issuers accepted, one rule each.
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
}

/// One accepted issuer.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    /// The `iss` the token must carry.
    #[serde(default)]
    pub issuer: String,
    /// Accepted `aud` values; empty accepts any.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Where the issuer's public keys are fetched from.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// The issuer's public keys inline (a JWKS document as a string).
    #[serde(default)]
    pub jwks: Option<String>,
    /// Headers the token is taken from (default: `Authorization: Bearer`).
    #[serde(default)]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters the token is taken from.
    #[serde(default)]
    pub from_params: Vec<String>,
    /// Cookies the token is taken from.
    #[serde(default)]
    pub from_cookies: Vec<String>,
    /// A header to put the verified payload in (base64url of its JSON).
    #[serde(default)]
    pub output_payload_to_header: Option<String>,
    /// Keep the token on the forwarded request.
    #[serde(default)]
    pub forward_original_token: bool,
    /// Claims copied to request headers.
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// How long fetching the JWKS may take (`5s`).
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// Claims whose string value is a space-separated list (besides `scope` and `permission`,
    /// which always are).
    #[serde(default)]
    pub space_delimited_claims: Vec<String>,
    /// Whether a token is required (not supported by sluice yet: refused, not ignored).
    #[serde(default)]
    pub presence: Option<String>,
}

/// A header a token is read from.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtHeader {
    /// The header name.
    #[serde(default)]
    pub name: String,
    /// What precedes the token in the value (`Bearer `).
    #[serde(default)]
    pub prefix: Option<String>,
}

/// A claim copied to a header.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimToHeader {
    /// The header to set.
    #[serde(default)]
    pub header: String,
    /// The claim (a top-level one).
    #[serde(default)]
    pub claim: String,
}

/// Istio's RequestAuthentication validation rules.
pub fn validate(spec: &RequestAuthenticationSpec, findings: &mut Findings) {
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        findings.error("spec.targetRefs", "targetRef(s) are not supported by sluice yet; use selector");
    }
    let mut issuers = std::collections::BTreeSet::new();
    for (i, rule) in spec.jwt_rules.iter().enumerate() {
        let path = format!("spec.jwtRules[{i}]");
        if rule.issuer.is_empty() {
            findings.error(format!("{path}.issuer"), "issuer is required");
        } else if !issuers.insert(rule.issuer.as_str()) {
            findings.error(format!("{path}.issuer"), format!("issuer {:?} is given twice", rule.issuer));
        }
        for (j, a) in rule.audiences.iter().enumerate() {
            if a.is_empty() {
                findings.error(format!("{path}.audiences[{j}]"), "audience must not be empty");
            }
        }
        match (&rule.jwks_uri, &rule.jwks) {
            (Some(_), Some(_)) => findings.error(format!("{path}.jwks"), "jwks and jwksUri cannot both be set"),
            (Some(uri), None) => {
                if jwks_uri_parts(uri).is_none() {
                    findings.error(format!("{path}.jwksUri"), format!("{uri:?} is not an http(s) URL with a host"));
                }
            }
            (None, Some(jwks)) => {
                // Envoy refuses the whole listener for a key set without a usable key.
                let set = serde_json::from_str::<serde_json::Value>(jwks).ok();
                let keys = set.as_ref().and_then(|k| k["keys"].as_array());
                match keys {
                    None => findings
                        .error(format!("{path}.jwks"), "jwks is not a JSON Web Key Set (an object with \"keys\")"),
                    Some(keys) if keys.is_empty() => findings.error(format!("{path}.jwks"), "jwks holds no key"),
                    Some(keys) => {
                        for (k, key) in keys.iter().enumerate() {
                            if !matches!(key["kty"].as_str(), Some("RSA" | "EC" | "oct" | "OKP")) {
                                findings.error(
                                    format!("{path}.jwks"),
                                    format!("key {k} has no kty of RSA, EC, oct or OKP"),
                                );
                            }
                        }
                    }
                }
            }
            // Istio would fetch the issuer's OpenID discovery document; sluice does no I/O here,
            // so the rule's tokens are refused (401) rather than trusted.
            (None, None) => findings.warn(
                format!("{path}.jwksUri"),
                "no jwksUri or jwks: sluice does not discover keys from the issuer, so its tokens are refused (401)",
            ),
        }
        for (j, h) in rule.from_headers.iter().enumerate() {
            if h.name.is_empty() {
                findings.error(format!("{path}.fromHeaders[{j}].name"), "header name must not be empty");
            }
        }
        for (field, list) in [
            ("fromParams", &rule.from_params),
            ("fromCookies", &rule.from_cookies),
            ("spaceDelimitedClaims", &rule.space_delimited_claims),
        ] {
            for (j, v) in list.iter().enumerate() {
                if v.is_empty() {
                    findings.error(format!("{path}.{field}[{j}]"), "must not be empty");
                }
            }
        }
        if let Some(presence) = &rule.presence {
            findings.error(format!("{path}.presence"), format!("presence {presence:?} is not supported by sluice yet"));
        }
        for (j, c) in rule.output_claim_to_headers.iter().enumerate() {
            let cp = format!("{path}.outputClaimToHeaders[{j}]");
            if c.claim.is_empty() {
                findings.error(format!("{cp}.claim"), "claim must not be empty");
            }
            if c.header.is_empty() || c.header.starts_with(':') || c.header.chars().any(char::is_whitespace) {
                findings.error(format!("{cp}.header"), format!("{:?} is not a header name that can be set", c.header));
            }
        }
    }
}

/// `(https, host, port)` of a JWKS URL, or None when it is not an http(s) URL with a host.
pub fn jwks_uri_parts(uri: &str) -> Option<(bool, String, u16)> {
    let (https, rest) = match uri.split_once("://")? {
        ("https", rest) => (true, rest),
        ("http", rest) => (false, rest),
        _ => return None,
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (h.to_string(), p.parse().ok()?),
        _ => (authority.to_string(), if https { 443 } else { 80 }),
    };
    (!host.is_empty()).then_some((https, host.trim_matches(['[', ']']).to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwks_urls() {
        assert_eq!(jwks_uri_parts("https://example.com/keys"), Some((true, "example.com".into(), 443)));
        assert_eq!(jwks_uri_parts("http://127.0.0.9:8080/jwks.json"), Some((false, "127.0.0.9".into(), 8080)));
        assert_eq!(jwks_uri_parts("ftp://example.com/keys"), None);
        assert_eq!(jwks_uri_parts("https:///keys"), None);
    }
}
