//! Transport sockets, as istiod builds them (`cluster_tls.go`, `authn/`): the workload's own
//! certificate and the mesh root come by SDS (`default`, `ROOTCA`) from the node agent through
//! the static `sds-grpc` cluster; DestinationRule SIMPLE/MUTUAL read files.
//!
//! Two choices differ from istio-proxy because sluice drives upstream Envoy: clients offer ALPN
//! `istio` (istiod's inbound chains accept it for HTTP and TCP), never `istio-peer-exchange`,
//! which would ask a real Istio sidecar for a metadata exchange nobody answers; and the HTTP
//! ALPN override (`istio-http/1.1`, `istio-h2`) is not sent, because upstream Envoy can only
//! set it per listener, which would also replace the ALPN of SIMPLE/MUTUAL destinations.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::typed;
use crate::model::destination_rule::ClientTlsSettings;
use crate::model::mesh_config::MeshConfig;

/// The static cluster (in the bootstrap) that reaches the node agent's SDS socket.
pub const SDS_CLUSTER: &str = "sds-grpc";
/// The SDS secret with the workload's key and certificate chain.
pub const WORKLOAD_SECRET: &str = "default";
/// The SDS secret with the mesh's trust bundle.
pub const ROOT_SECRET: &str = "ROOTCA";
/// Node metadata by which a proxy says it has the `sds-grpc` cluster (`sluice bootstrap
/// --sds-socket` writes it); a proxy started by Istio's pilot-agent says so by `ISTIO_VERSION`.
pub const SDS_METADATA: &str = "SLUICE_SDS";
/// Where Envoy finds the system's CA bundle when a SIMPLE/MUTUAL rule names none.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Whether a proxy can hold its workload's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Certificates {
    /// No `sds-grpc` cluster: the proxy speaks plain text in the mesh.
    #[default]
    None,
    /// The node agent serves `default` and `ROOTCA` over SDS.
    Sds,
}

impl Certificates {
    /// What a proxy's node metadata says.
    pub fn from_metadata(metadata: &BTreeMap<String, String>) -> Self {
        let sds = metadata.get(SDS_METADATA).is_some_and(|v| v == "true") || metadata.contains_key("ISTIO_VERSION");
        if sds { Self::Sds } else { Self::None }
    }
}

fn sds_secret(name: &str) -> Value {
    json!({"name": name, "sds_config": {
        "api_config_source": {"api_type": "GRPC", "transport_api_version": "V3", "set_node_on_first_message_only": true,
            "grpc_services": [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}]},
        "resource_api_version": "V3",
    }})
}

fn transport_socket(kind: &str, context: Value) -> Value {
    json!({"name": "envoy.transport_sockets.tls", "typed_config": typed(&format!("envoy.extensions.transport_sockets.tls.v3.{kind}"), context)})
}

/// The SPIFFE ids of `accounts` in `namespace`, in the trust domain and each alias.
pub(super) fn spiffe_ids(mesh: &MeshConfig, namespace: &str, accounts: &[&str]) -> Vec<String> {
    let domains = std::iter::once(&mesh.trust_domain).chain(&mesh.trust_domain_aliases);
    domains.flat_map(|td| accounts.iter().map(move |sa| format!("spiffe://{td}/ns/{namespace}/sa/{sa}"))).collect()
}

fn uri_sans(sans: &[String]) -> Vec<Value> {
    sans.iter().map(|s| json!({"san_type": "URI", "matcher": {"exact": s}})).collect()
}

/// TLS 1.2–1.3: Envoy's client default stops at 1.2, and Istio's peers prefer 1.3.
fn tls_params() -> Value {
    json!({"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"})
}

/// The client side of mesh mTLS: the workload's certificate, the mesh root, `sni`, and the
/// server identities `sans` (empty: any identity the root signed).
pub(super) fn upstream_mesh(sni: &str, sans: &[String], http2: bool) -> Value {
    let mut alpn = vec!["istio"];
    if http2 {
        alpn.push("h2");
    }
    let mut default_validation = json!({});
    if !sans.is_empty() {
        default_validation["match_typed_subject_alt_names"] = json!(uri_sans(sans));
    }
    transport_socket(
        "UpstreamTlsContext",
        json!({
            "common_tls_context": {
                "tls_params": tls_params(),
                "alpn_protocols": alpn,
                "tls_certificate_sds_secret_configs": [sds_secret(WORKLOAD_SECRET)],
                "combined_validation_context": {
                    "default_validation_context": default_validation,
                    "validation_context_sds_secret_config": sds_secret(ROOT_SECRET),
                },
            },
            "sni": sni,
        }),
    )
}

/// The client side of DestinationRule SIMPLE (no client certificate) or MUTUAL, from files.
pub(super) fn upstream_files(tls: &ClientTlsSettings, mutual: bool) -> Value {
    let mut common = json!({"tls_params": tls_params()});
    if mutual {
        common["tls_certificates"] = json!([{
            "certificate_chain": {"filename": tls.client_certificate.clone().unwrap_or_default()},
            "private_key": {"filename": tls.private_key.clone().unwrap_or_default()},
        }]);
    }
    if !tls.insecure_skip_verify.unwrap_or(false) {
        let mut validation =
            json!({"trusted_ca": {"filename": tls.ca_certificates.clone().unwrap_or_else(|| SYSTEM_ROOTS.into())}});
        if !tls.subject_alt_names.is_empty() {
            // A DestinationRule's names may be DNS names or URIs; either kind matches.
            let sans: Vec<Value> = tls
                .subject_alt_names
                .iter()
                .flat_map(|s| ["DNS", "URI"].map(|kind| json!({"san_type": kind, "matcher": {"exact": s}})))
                .collect();
            validation["match_typed_subject_alt_names"] = json!(sans);
        }
        if let Some(crl) = &tls.ca_crl {
            validation["crl"] = json!({"filename": crl});
        }
        common["validation_context"] = validation;
    }
    let mut context = json!({"common_tls_context": common});
    if let Some(sni) = &tls.sni {
        context["sni"] = json!(sni);
    }
    transport_socket("UpstreamTlsContext", context)
}

/// The server side of mesh mTLS on an inbound chain: the client must show a certificate the
/// mesh root signed (in the trust domain or an alias, when aliases are set, as istiod does).
pub(super) fn downstream_mesh(mesh: &MeshConfig, http: bool) -> Value {
    let alpn: &[&str] = if http { &["h2", "http/1.1"] } else { &[] };
    let mut default_validation = json!({});
    if !mesh.trust_domain_aliases.is_empty() {
        let domains = std::iter::once(&mesh.trust_domain).chain(&mesh.trust_domain_aliases);
        let sans: Vec<Value> =
            domains.map(|td| json!({"san_type": "URI", "matcher": {"prefix": format!("spiffe://{td}/")}})).collect();
        default_validation["match_typed_subject_alt_names"] = json!(sans);
    }
    let mut common = json!({
        "tls_params": tls_params(),
        "tls_certificate_sds_secret_configs": [sds_secret(WORKLOAD_SECRET)],
        "combined_validation_context": {
            "default_validation_context": default_validation,
            "validation_context_sds_secret_config": sds_secret(ROOT_SECRET),
        },
    });
    if !alpn.is_empty() {
        common["alpn_protocols"] = json!(alpn);
    }
    transport_socket("DownstreamTlsContext", json!({"common_tls_context": common, "require_client_certificate": true}))
}

/// The ALPN values an Istio client offers on mesh mTLS (what an inbound mTLS chain matches).
pub(super) const MESH_ALPNS: [&str; 5] =
    ["istio", "istio-peer-exchange", "istio-http/1.0", "istio-http/1.1", "istio-h2"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxies_say_whether_they_have_sds() {
        let m = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert_eq!(Certificates::from_metadata(&BTreeMap::new()), Certificates::None);
        assert_eq!(Certificates::from_metadata(&m(SDS_METADATA, "true")), Certificates::Sds);
        assert_eq!(Certificates::from_metadata(&m(SDS_METADATA, "false")), Certificates::None);
        assert_eq!(Certificates::from_metadata(&m("ISTIO_VERSION", "1.24.0")), Certificates::Sds);
    }

    #[test]
    fn identities_cover_the_aliases() {
        let mesh = MeshConfig { trust_domain_aliases: vec!["old.example".into()], ..Default::default() };
        assert_eq!(
            spiffe_ids(&mesh, "default", &["a"]),
            ["spiffe://cluster.local/ns/default/sa/a", "spiffe://old.example/ns/default/sa/a"]
        );
    }
}
