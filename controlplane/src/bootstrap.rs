//! `sluice bootstrap`: an Envoy bootstrap that takes everything from sluice over ADS.

use serde_json::{Value, json};

/// Options of `sluice bootstrap`.
#[derive(Debug, Clone)]
pub struct BootstrapOptions {
    /// Node id (`sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`).
    pub proxy: String,
    /// sluice's xDS address, `host:port`.
    pub xds_addr: String,
    /// Envoy admin port on 127.0.0.1.
    pub admin_port: u16,
    /// Delta xDS instead of State-of-the-World.
    pub delta: bool,
    /// The node agent's SDS socket: adds the `sds-grpc` cluster that workload certificates
    /// (`default`, `ROOTCA`) come through.
    pub sds_socket: Option<String>,
}

pub use sluice_translator::envoy::SDS_CLUSTER;

/// The `sds-grpc` cluster: HTTP/2 to the agent's SDS Unix socket at `path`.
pub fn sds_cluster(path: &str) -> Value {
    json!({
        "name": SDS_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": SDS_CLUSTER, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": path}}}}]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
    })
}

/// The cluster name of the xDS server in the bootstrap (Istio's name).
pub const XDS_CLUSTER: &str = "xds-grpc";

/// Builds the bootstrap; it is checked against Envoy's Bootstrap message before it is returned.
pub fn bootstrap(o: &BootstrapOptions) -> Result<Value, String> {
    sluice_translator::envoy::NodeId::parse(&o.proxy).map_err(|e| e.to_string())?;
    let (host, port) =
        o.xds_addr.rsplit_once(':').ok_or_else(|| format!("--xds-addr {:?} must be host:port", o.xds_addr))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| format!("--xds-addr {:?}: bad port", o.xds_addr))?;
    let cluster_type = if host.parse::<std::net::IpAddr>().is_ok() { "STATIC" } else { "STRICT_DNS" };
    let pod_ns = o.proxy.split('~').nth(2).unwrap_or_default();
    let api = if o.delta { "DELTA_GRPC" } else { "GRPC" };
    let mut b = json!({
        "node": {"id": o.proxy, "cluster": pod_ns, "metadata": {"GENERATOR": "sluice"}},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": o.admin_port}}},
        "dynamic_resources": {
            "ads_config": {"api_type": api, "transport_api_version": "V3", "set_node_on_first_message_only": true,
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}]},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        // As Istio's bootstrap: regexes up to this RE2 program size (Envoy's default is 100);
        // sluice's validation holds every regex to the same limit.
        "layered_runtime": {"layers": [{"name": "sluice", "static_layer": {
            "re2.max_program_size.error_level": sluice_translator::model::common::RE2_MAX_PROGRAM_SIZE}}]},
        "static_resources": {"clusters": [{
            "name": XDS_CLUSTER, "type": cluster_type, "connect_timeout": "1s",
            "load_assignment": {"cluster_name": XDS_CLUSTER, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}]},
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
        }]},
    });
    if let (Some(path), Some(clusters)) = (&o.sds_socket, b["static_resources"]["clusters"].as_array_mut()) {
        clusters.push(sds_cluster(path));
        // Tells sluice that this proxy can hold its certificate: it then gets mesh mTLS.
        b["node"]["metadata"][sluice_translator::envoy::SDS_METADATA] = json!("true");
    }
    sluice_xds::codec::canonical("type.googleapis.com/envoy.config.bootstrap.v3.Bootstrap", "bootstrap", &b)
        .map_err(|e| e.to_string())?;
    Ok(b)
}

/// gRPC's xDS bootstrap (`GRPC_XDS_BOOTSTRAP`) for the proxyless client or server `proxy`:
/// sluice over plaintext ADS with xDS v3, the node marked `GENERATOR: grpc` (what sends it
/// the proxyless config), and Istio's server listener template, so an `xds=True` server asks
/// for `xds.istio.io/grpc/lds/inbound/<ip:port>`.
///
/// With `cert_dir`, the certificate provider `default` (gRFC A29) reads the workload's
/// certificate, key and the mesh root from Istio's file names there (`cert-chain.pem`,
/// `key.pem`, `root-cert.pem`) and follows their changes; mTLS then works for clients and
/// servers that use gRPC's xDS credentials.
pub fn grpc_bootstrap(proxy: &str, xds_addr: &str, cert_dir: Option<&std::path::Path>) -> Result<Value, String> {
    let node = sluice_translator::envoy::NodeId::parse(proxy).map_err(|e| e.to_string())?;
    if !xds_addr.contains(':') {
        return Err(format!("--xds-addr {xds_addr:?} must be host:port"));
    }
    let mut b = json!({
        "xds_servers": [{
            "server_uri": xds_addr,
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": {
            "id": proxy,
            "cluster": format!("{}.{}", node.pod, node.namespace),
            "metadata": {"GENERATOR": "grpc", "NAMESPACE": node.namespace, "INSTANCE_IPS": node.ip},
            "locality": {},
        },
        "server_listener_resource_name_template": format!("{}%s", sluice_translator::envoy::ISTIO_SERVER_LISTENER_PREFIX),
    });
    if let Some(dir) = cert_dir {
        let file = |name: &str| dir.join(name).display().to_string();
        b["certificate_providers"] = json!({"default": {"plugin_name": "file_watcher", "config": {
            "certificate_file": file("cert-chain.pem"),
            "private_key_file": file("key.pem"),
            "ca_certificate_file": file("root-cert.pem"),
            "refresh_interval": "60s",
        }}});
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_fits_envoy_and_names_the_node() {
        let o = BootstrapOptions {
            proxy: "sidecar~127.0.1.10~productpage-v1.default~default.svc.cluster.local".into(),
            xds_addr: "127.0.0.1:15010".into(),
            admin_port: 15000,
            delta: true,
            sds_socket: None,
        };
        let b = bootstrap(&o).unwrap();
        assert_eq!(b["node"]["id"], o.proxy);
        assert_eq!(b["dynamic_resources"]["ads_config"]["api_type"], "DELTA_GRPC");
        assert_eq!(b["static_resources"]["clusters"].as_array().unwrap().len(), 1, "no SDS unless asked");
        let sds =
            bootstrap(&BootstrapOptions { sds_socket: Some("/run/sluice/sds.sock".into()), ..o.clone() }).unwrap();
        let cluster = &sds["static_resources"]["clusters"][1];
        assert_eq!(cluster["name"], SDS_CLUSTER);
        assert_eq!(
            cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["pipe"]["path"],
            "/run/sluice/sds.sock"
        );
        assert!(bootstrap(&BootstrapOptions { proxy: "nope".into(), ..o.clone() }).is_err());
        assert!(bootstrap(&BootstrapOptions { xds_addr: "nohostport".into(), ..o }).is_err());
    }

    #[test]
    fn grpc_bootstrap_names_the_node_the_server_template_and_the_certificate_files() {
        let id = "sidecar~127.0.3.20~client.grpcdemo~grpcdemo.svc.cluster.local";
        let plain = grpc_bootstrap(id, "sluice.sluice-system:15010", None).unwrap();
        assert_eq!(plain["node"]["metadata"]["GENERATOR"], "grpc");
        assert_eq!(plain["xds_servers"][0]["server_features"], serde_json::json!(["xds_v3"]));
        assert_eq!(plain["server_listener_resource_name_template"], "xds.istio.io/grpc/lds/inbound/%s");
        assert!(plain.get("certificate_providers").is_none());
        let tls = grpc_bootstrap(id, "sluice.sluice-system:15010", Some(std::path::Path::new("/certs"))).unwrap();
        let provider = &tls["certificate_providers"]["default"];
        assert_eq!(provider["plugin_name"], "file_watcher");
        assert_eq!(provider["config"]["ca_certificate_file"], "/certs/root-cert.pem");
        assert!(grpc_bootstrap("not-an-id", "sluice.sluice-system:15010", None).is_err());
    }
}
