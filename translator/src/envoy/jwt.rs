//! RequestAuthentication → upstream Envoy's `envoy.filters.http.jwt_authn`, as istiod uses it:
//! one provider per JWT rule, and a requirement that any provider verifies the token or that
//! there is none — a request with an invalid token is refused (401), one without a token goes
//! on to be judged by AuthorizationPolicy. The verified payload is written to the filter's
//! dynamic metadata (`envoy.filters.http.jwt_authn` / [`PAYLOAD_KEY`]), where the RBAC
//! matchers of [`super::authorization`] read `requestPrincipals` and `request.auth.*`.

use serde_json::{Value, json};

use super::proxy::Proxy;
use super::typed;
use crate::model::IstioObject;
use crate::model::request_authentication::{JwtRule, RequestAuthenticationSpec, jwks_uri_parts};

/// The dynamic metadata namespace the verified payload is in.
pub(super) const METADATA_NAMESPACE: &str = "envoy.filters.http.jwt_authn";

/// The key of the verified payload in [`METADATA_NAMESPACE`] (every provider writes the same
/// one: a request is verified by one of them).
pub(super) const PAYLOAD_KEY: &str = "jwt_payload";

/// How long a fetched JWKS is kept (Istio's default refresh is 20 minutes; Envoy's default 5).
const JWKS_CACHE: &str = "1200s";

/// Envoy's default JWKS fetch timeout, which Istio keeps.
const JWKS_TIMEOUT: &str = "5s";

/// A P-256 public key whose private half was discarded when it was made: it verifies no token.
const UNUSABLE_JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","alg":"ES256","x":"mOJYHcpmskZdJBf35hXo-Sqks8wlD_RPKLDbqT0xZ2s","y":"QFsven1OqOxhaPsjv65dx4AH6qPVMutsEzczNgHFlQQ"}]}"#;

/// The RequestAuthentications that select this proxy's workload, in name order.
fn selected<'a>(proxy: &Proxy<'a>) -> Vec<&'a IstioObject<RequestAuthenticationSpec>> {
    proxy.snapshot.request_authentications_for(&proxy.node.namespace, proxy.workload.map(|_| &proxy.labels))
}

/// The cluster a JWKS URL is fetched through.
fn jwks_cluster_name(https: bool, host: &str, port: u16) -> String {
    format!("jwks|{}|{host}|{port}", if https { "https" } else { "http" })
}

fn provider(rule: &JwtRule) -> Value {
    let mut p =
        json!({"issuer": rule.issuer, "payload_in_metadata": PAYLOAD_KEY, "forward": rule.forward_original_token});
    if !rule.audiences.is_empty() {
        p["audiences"] = json!(rule.audiences);
    }
    match (&rule.jwks, rule.jwks_uri.as_deref().and_then(|u| Some((u, jwks_uri_parts(u)?)))) {
        (Some(jwks), _) => p["local_jwks"] = json!({"inline_string": jwks}),
        (None, Some((uri, (https, host, port)))) => {
            let timeout = rule.timeout.as_ref().map_or(JWKS_TIMEOUT.to_string(), |t| t.to_proto_json());
            p["remote_jwks"] = json!({
                "http_uri": {"uri": uri, "cluster": jwks_cluster_name(https, &host, port), "timeout": timeout},
                "cache_duration": JWKS_CACHE,
            });
        }
        // Validation requires one of them; if neither is there, a key nobody holds the private
        // half of verifies nothing (fail closed; an empty key set would make Envoy refuse the
        // listener).
        (None, None) => p["local_jwks"] = json!({"inline_string": UNUSABLE_JWKS}),
    }
    if !rule.from_headers.is_empty() {
        p["from_headers"] = rule
            .from_headers
            .iter()
            .map(|h| {
                let mut header = json!({"name": h.name});
                if let Some(prefix) = &h.prefix {
                    header["value_prefix"] = json!(prefix);
                }
                header
            })
            .collect();
    }
    if !rule.from_params.is_empty() {
        p["from_params"] = json!(rule.from_params);
    }
    if !rule.from_cookies.is_empty() {
        p["from_cookies"] = json!(rule.from_cookies);
    }
    if let Some(header) = &rule.output_payload_to_header {
        p["forward_payload_header"] = json!(header);
    }
    // Istio's default space-delimited claims, then the rule's: a claim holding "a b" is the list
    // [a, b] in the metadata the policies match.
    let mut spaced: Vec<&str> = vec!["scope", "permission"];
    spaced.extend(
        rule.space_delimited_claims.iter().map(String::as_str).filter(|c| !["scope", "permission"].contains(c)),
    );
    p["normalize_payload_in_metadata"] = json!({"space_delimited_claims": spaced});
    if !rule.output_claim_to_headers.is_empty() {
        p["claim_to_headers"] = rule
            .output_claim_to_headers
            .iter()
            .map(|c| json!({"header_name": c.header, "claim_name": c.claim}))
            .collect();
    }
    p
}

/// The `jwt_authn` filter of an inbound HTTP chain, or None when no RequestAuthentication (with
/// rules) selects the workload.
pub(super) fn filter(proxy: &Proxy<'_>) -> Option<Value> {
    let mut providers = serde_json::Map::new();
    for ra in selected(proxy) {
        for (i, rule) in ra.spec.jwt_rules.iter().enumerate() {
            providers.insert(format!("{}/{}/{i}", ra.meta.namespace, ra.meta.name), provider(rule));
        }
    }
    if providers.is_empty() {
        return None;
    }
    let mut requirements: Vec<Value> = providers.keys().map(|name| json!({"provider_name": name})).collect();
    requirements.push(json!({"allow_missing": {}}));
    Some(json!({
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": typed("envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication", json!({
            "providers": providers,
            "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": requirements}}}],
            "bypass_cors_preflight": true,
        })),
    }))
}

/// The clusters the JWKS URLs of the workload's RequestAuthentications are fetched through
/// (DNS for a host name, TLS with the system's roots for https).
pub(super) fn jwks_clusters(proxy: &Proxy<'_>) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = Vec::new();
    let rules = selected(proxy).into_iter().flat_map(|ra| ra.spec.jwt_rules.iter());
    for uri in rules.filter(|r| r.jwks.is_none()).filter_map(|r| r.jwks_uri.as_deref()) {
        let Some((https, host, port)) = jwks_uri_parts(uri) else { continue };
        let name = jwks_cluster_name(https, &host, port);
        if out.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let ip = host.parse::<std::net::IpAddr>().is_ok();
        let mut body = json!({
            "name": name, "type": if ip { "STATIC" } else { "STRICT_DNS" }, "connect_timeout": "10s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}]},
        });
        if https {
            body["transport_socket"] = json!({"name": "envoy.transport_sockets.tls", "typed_config": typed(
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                json!({"sni": host, "common_tls_context": {"validation_context": {
                    "trusted_ca": {"filename": "/etc/ssl/certs/ca-certificates.crt"},
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": host}}],
                }}}),
            )});
        }
        out.push((name, body));
    }
    out
}
