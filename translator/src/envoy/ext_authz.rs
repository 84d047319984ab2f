//! CUSTOM AuthorizationPolicy → Envoy `ext_authz`, as istiod builds it: an RBAC filter whose
//! shadow rules are the CUSTOM rules (it enforces nothing; a match leaves the rule's name in the
//! `istio_ext_authz_shadow_effective_policy_id` metadata), then the `ext_authz` filter, enabled
//! only by that metadata — so only the requests the CUSTOM rules match are sent to the
//! authorizer of the MeshConfig `extensionProviders` entry the policies name.

use serde_json::{Value, json};

use super::outbound_cluster_name;
use super::proxy::Proxy;
use super::typed;
use crate::model::mesh_config::{ExtAuthzGrpc, ExtAuthzHttp, ExtensionProvider, RequestBodyInCheck};
use crate::snapshot::resolve_host;

/// The shadow rules' stat prefix, which also prefixes the metadata keys Envoy writes.
pub(super) const SHADOW_STAT_PREFIX: &str = "istio_ext_authz_";

/// Istio's default check timeout.
const DEFAULT_TIMEOUT: &str = "600s";

/// A provider that can be used: its kind and the cluster of its service.
pub(super) struct Usable<'a> {
    /// The provider's name (part of the shadow rules' names).
    pub(super) name: String,
    provider: Kind<'a>,
    cluster: String,
    host: String,
    authority: String,
}

enum Kind<'a> {
    Http(&'a ExtAuthzHttp),
    Grpc(&'a ExtAuthzGrpc),
}

/// The provider named `name` in the mesh config, or why it cannot be used (Istio then denies
/// what the CUSTOM rules match).
pub(super) fn provider<'a>(proxy: &Proxy<'a>, name: &str) -> Result<Usable<'a>, String> {
    let mesh = &proxy.snapshot.mesh;
    let Some(p) = mesh.extension_providers.iter().find(|p| p.name == name) else {
        return Err(format!("MeshConfig has no extensionProviders entry named {name:?}"));
    };
    let (kind, service, port) = kind_of(p)?;
    let (namespace, host) = service.split_once('/').unwrap_or(("", service));
    let namespace = if namespace.is_empty() { proxy.node.namespace.as_str() } else { namespace };
    let host = resolve_host(host, namespace);
    match proxy.snapshot.lookup(&host, namespace) {
        None => Err(format!("extension provider {name:?}: service {service:?} is not in the mesh")),
        Some(s) if !s.ports.iter().any(|sp| sp.port == port) => {
            Err(format!("extension provider {name:?}: service {host} has no port {port}"))
        }
        Some(_) => Ok(Usable {
            name: name.to_string(),
            provider: kind,
            cluster: outbound_cluster_name(port, "", &host),
            authority: format!("outbound_.{port}_._.{host}"),
            host,
        }),
    }
}

// Istio reads a provider arm of `extensionProviders` by which field is set; more than one is an error.
fn kind_of(p: &ExtensionProvider) -> Result<(Kind<'_>, &str, u32), String> {
    match (&p.envoy_ext_authz_http, &p.envoy_ext_authz_grpc) {
        (Some(h), None) => Ok((Kind::Http(h), &h.service, h.port)),
        (None, Some(g)) => Ok((Kind::Grpc(g), &g.service, g.port)),
        (Some(_), Some(_)) => {
            Err(format!("extension provider {:?} sets both envoyExtAuthzHttp and envoyExtAuthzGrpc", p.name))
        }
        (None, None) => Err(format!("extension provider {:?} is not an external authorizer", p.name)),
    }
}

/// A header name pattern (`x-a`, `x-*`, `*-a`) as Envoy's case-insensitive string matcher.
fn header_pattern(v: &str) -> Value {
    if let Some(p) = v.strip_suffix('*').filter(|p| !p.is_empty()) {
        json!({"prefix": p, "ignore_case": true})
    } else if let Some(s) = v.strip_prefix('*').filter(|s| !s.is_empty()) {
        json!({"suffix": s, "ignore_case": true})
    } else {
        json!({"exact": v, "ignore_case": true})
    }
}

fn patterns(list: &[String]) -> Value {
    json!({"patterns": list.iter().map(|h| header_pattern(h)).collect::<Vec<_>>()})
}

fn status(code: &Option<String>) -> Value {
    json!({"code": code.as_deref().and_then(|c| c.parse::<u32>().ok()).unwrap_or(403)})
}

fn with_body(body: &RequestBodyInCheck) -> Value {
    json!({"max_request_bytes": body.max_request_bytes, "allow_partial_message": body.allow_partial_message, "pack_as_bytes": body.pack_as_bytes})
}

/// The `ext_authz` HTTP filter for `usable`, enabled by the CUSTOM rules' shadow match.
pub(super) fn http_filter(usable: &Usable<'_>) -> Value {
    let enabled = json!({
        "filter": "envoy.filters.http.rbac",
        "path": [{"key": format!("{SHADOW_STAT_PREFIX}shadow_effective_policy_id")}],
        "value": {"string_match": {"prefix": "istio-ext-authz"}},
    });
    let timeout = |t: &Option<crate::model::common::Duration>| {
        t.as_ref().map_or(DEFAULT_TIMEOUT.to_string(), |t| t.to_proto_json())
    };
    let mut config = match &usable.provider {
        Kind::Http(h) => {
            let mut service = json!({
                "server_uri": {"uri": format!("http://{}", usable.host), "cluster": usable.cluster, "timeout": timeout(&h.timeout)},
                "authorization_request": {},
                "authorization_response": {},
            });
            if let Some(prefix) = &h.path_prefix {
                service["path_prefix"] = json!(prefix);
            }
            if !h.include_additional_headers_in_check.is_empty() {
                service["authorization_request"]["headers_to_add"] =
                    h.include_additional_headers_in_check.iter().map(|(k, v)| json!({"key": k, "value": v})).collect();
            }
            if !h.headers_to_upstream_on_allow.is_empty() {
                service["authorization_response"]["allowed_upstream_headers"] =
                    patterns(&h.headers_to_upstream_on_allow);
            }
            if !h.headers_to_downstream_on_deny.is_empty() {
                service["authorization_response"]["allowed_client_headers"] =
                    patterns(&h.headers_to_downstream_on_deny);
            }
            if !h.headers_to_downstream_on_allow.is_empty() {
                service["authorization_response"]["allowed_client_headers_on_success"] =
                    patterns(&h.headers_to_downstream_on_allow);
            }
            let mut config = json!({
                "http_service": service, "transport_api_version": "V3",
                "failure_mode_allow": h.fail_open, "status_on_error": status(&h.status_on_error),
            });
            // Istio takes the older field when the newer one is not set.
            let headers = if h.include_request_headers_in_check.is_empty() {
                &h.include_headers_in_check
            } else {
                &h.include_request_headers_in_check
            };
            if !headers.is_empty() {
                config["allowed_headers"] = patterns(headers);
            }
            if let Some(body) = &h.include_request_body_in_check {
                config["with_request_body"] = with_body(body);
            }
            config
        }
        Kind::Grpc(g) => {
            let mut config = json!({
                // Istio's authority: the cluster's SNI form.
                "grpc_service": {"envoy_grpc": {"cluster_name": usable.cluster, "authority": usable.authority}, "timeout": timeout(&g.timeout)},
                "transport_api_version": "V3", "clear_route_cache": true,
                "failure_mode_allow": g.fail_open, "status_on_error": status(&g.status_on_error),
            });
            if let Some(body) = &g.include_request_body_in_check {
                config["with_request_body"] = with_body(body);
            }
            config
        }
    };
    config["filter_enabled_metadata"] = enabled;
    json!({"name": "envoy.filters.http.ext_authz", "typed_config": typed("envoy.extensions.filters.http.ext_authz.v3.ExtAuthz", config)})
}
