//! The proxyless gRPC back end's shapes, on small inline configs: what gRPC accepts and what it
//! cannot do failing closed with a warning.

use serde_json::{Value, json};
use sluice_translator::envoy::{ProxyResources, Resource, translate_proxyless};
use sluice_translator::parse::parse_documents;
use sluice_translator::snapshot::Snapshot;

const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec:
  clusterIP: 127.100.1.1
  selector: {app: cart}
  ports: [{name: grpc, port: 8080, targetPort: 9090}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: cart-1, namespace: shop, labels: {kubernetes.io/service-name: cart}}
addressType: IPv4
ports: [{name: grpc, port: 9090}]
endpoints:
- {addresses: [127.0.5.1], targetRef: {kind: Pod, name: cart-v1, namespace: shop}, zone: zone-a}
- {addresses: [127.0.5.2], targetRef: {kind: Pod, name: cart-v2, namespace: shop}, zone: zone-a}
- {addresses: [127.0.5.3], targetRef: {kind: Pod, name: cart-v3, namespace: shop}}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-v1, namespace: shop, labels: {app: cart, version: v1, topology.kubernetes.io/region: eu}}
spec: {containers: [{name: c}]}
status: {podIP: 127.0.5.1}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-v2, namespace: shop, labels: {app: cart, version: v2, topology.kubernetes.io/region: eu}}
spec: {containers: [{name: c}]}
status: {podIP: 127.0.5.2}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-v3, namespace: shop, labels: {app: cart, version: v3}}
spec: {containers: [{name: c}]}
status: {podIP: 127.0.5.3}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {containers: [{name: c}]}
status: {podIP: 127.0.5.9}
"#;

const WEB: &str = "sidecar~127.0.5.9~web.shop~shop.svc.cluster.local";
const CART_V1: &str = "sidecar~127.0.5.1~cart-v1.shop~shop.svc.cluster.local";
const HOST: &str = "cart.shop.svc.cluster.local";

fn translate(extra: &str, node: &str) -> ProxyResources {
    let (objects, diagnostics) = parse_documents("test.yaml", &format!("{MESH}\n---\n{extra}"));
    assert!(diagnostics.is_empty(), "{diagnostics:?}");
    translate_proxyless(&Snapshot::build(objects).0, node).expect("translate")
}

fn find<'a>(list: &'a [Resource], name: &str) -> &'a Value {
    &list.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("no {name}")).body
}

fn warnings(r: &ProxyResources) -> String {
    r.diagnostics.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

#[test]
fn a_listener_per_name_a_client_may_dial_each_naming_the_route_configuration_of_the_port() {
    let r = translate("", WEB);
    let names: Vec<&str> = r.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        ["127.100.1.1:8080", "cart.shop.svc.cluster.local:8080", "cart.shop.svc:8080", "cart.shop:8080", "cart:8080"]
    );
    let listener = find(&r.listeners, "cart:8080");
    assert_eq!(listener["address"]["socket_address"], json!({"address": "127.100.1.1", "port_value": 8080}));
    let hcm = &listener["api_listener"]["api_listener"];
    assert_eq!(hcm["rds"]["route_config_name"], "outbound|8080||cart.shop.svc.cluster.local");
    let filters: Vec<&str> =
        hcm["http_filters"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(filters, ["envoy.filters.http.fault", "envoy.filters.http.router"], "only what gRPC supports");
    // Not a server of anything: no server listeners, and a short name only from its namespace.
    let other = translate(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: elsewhere}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 127.0.5.20}",
        "sidecar~127.0.5.20~x.elsewhere~elsewhere.svc.cluster.local",
    );
    assert!(other.listeners.iter().all(|l| l.name != "cart:8080"), "cart is not a short name in elsewhere");
}

#[test]
fn clusters_balance_round_robin_or_ring_hash_and_carry_what_grpc_reads() {
    let r = translate(
        r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: cart, namespace: shop}
spec:
  host: cart
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool: {http: {http2MaxRequests: 10}}
    outlierDetection: {consecutive5xxErrors: 3, interval: 5s, baseEjectionTime: 30s, maxEjectionPercent: 50}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user, ringHash: {minimumRingSize: 64}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: cart, namespace: shop}
spec:
  hosts: [cart]
  http: [{route: [{destination: {host: cart, subset: v1}}]}]
"#,
        WEB,
    );
    let default = find(&r.clusters, &format!("outbound|8080||{HOST}"));
    assert_eq!(default["lb_policy"], "ROUND_ROBIN", "gRPC NACKs LEAST_REQUEST");
    assert_eq!(default["type"], "EDS");
    assert_eq!(default["eds_cluster_config"]["service_name"], format!("outbound|8080||{HOST}"));
    assert_eq!(default["circuit_breakers"], json!({"thresholds": [{"max_requests": 10}]}));
    let outlier = &default["outlier_detection"];
    assert_eq!((outlier["interval"].as_str(), outlier["base_ejection_time"].as_str()), (Some("5s"), Some("30s")));
    assert_eq!(outlier["enforcing_failure_percentage"], 100, "consecutive errors eject by failure percentage");
    assert!(warnings(&r).contains("round robin"), "{}", warnings(&r));
    let v1 = find(&r.clusters, &format!("outbound|8080|v1|{HOST}"));
    assert_eq!(
        (v1["lb_policy"].as_str(), &v1["ring_hash_lb_config"]),
        (Some("RING_HASH"), &json!({"minimum_ring_size": 64}))
    );
    // The route to v1 hashes by the header, as for sidecars (gRFC A42 reads header hash
    // policies).
    let routes = find(&r.routes, &format!("outbound|8080||{HOST}"));
    assert!(routes.to_string().contains("\"x-user\""), "{routes}");
}

#[test]
fn every_locality_is_named_and_weighted() {
    let r = translate("", WEB);
    let cla = find(&r.endpoints, &format!("outbound|8080||{HOST}"));
    let groups = cla["endpoints"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{cla}");
    for g in groups {
        let n = g["lb_endpoints"].as_array().unwrap().len() as u64;
        assert_eq!(g["load_balancing_weight"], n, "{g}");
        assert!(g["locality"].is_object(), "{g}");
    }
    assert!(groups.iter().any(|g| g["locality"] == json!({})), "the endpoint without a zone: {cla}");
    assert!(groups.iter().any(|g| g["locality"]["zone"] == "zone-a"), "{cla}");
}

#[test]
fn routes_are_the_sidecar_s_with_the_timeout_as_max_stream_duration_and_no_filters_grpc_lacks() {
    let r = translate(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: cart, namespace: shop}
spec:
  hosts: [cart]
  http:
  - timeout: 3s
    corsPolicy: {allowOrigins: [{exact: "https://a.example"}]}
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 50}}}
    route: [{destination: {host: cart}}]
"#,
        WEB,
    );
    let config = find(&r.routes, &format!("outbound|8080||{HOST}"));
    let route = &config["virtual_hosts"][0]["routes"][0];
    assert_eq!(route["route"]["max_stream_duration"], json!({"max_stream_duration": "3s"}));
    assert!(route["route"].get("timeout").is_none());
    let filters = route["typed_per_filter_config"].as_object().unwrap();
    assert_eq!(filters.keys().collect::<Vec<_>>(), ["envoy.filters.http.fault"], "CORS left out");
    assert_eq!(filters["envoy.filters.http.fault"]["abort"]["grpc_status"], 14);
    let w = warnings(&r);
    assert!(w.contains("VirtualService/shop/cart") && w.contains("envoy.filters.http.cors"), "{w}");
}

#[test]
fn istio_mutual_is_mtls_through_the_certificate_provider_and_other_tls_fails_closed() {
    let dr = |tls: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: cart, namespace: shop}}\nspec:\n  host: cart\n  trafficPolicy: {{tls: {tls}}}\n"
        )
    };
    let r = translate(&dr("{mode: ISTIO_MUTUAL}"), WEB);
    let cluster = find(&r.clusters, &format!("outbound|8080||{HOST}"));
    let socket = &cluster["transport_socket"];
    assert_eq!(socket["name"], "envoy.transport_sockets.tls");
    let common = &socket["typed_config"]["common_tls_context"];
    assert_eq!(
        common["tls_certificate_provider_instance"],
        json!({"instance_name": "default", "certificate_name": "default"})
    );
    let validation = &common["validation_context"];
    assert_eq!(validation["ca_certificate_provider_instance"]["certificate_name"], "ROOTCA");
    assert_eq!(validation["match_subject_alt_names"], json!([{"exact": "spiffe://cluster.local/ns/shop/sa/default"}]));
    let cla = find(&r.endpoints, &format!("outbound|8080||{HOST}"));
    assert_eq!(cla["endpoints"].as_array().unwrap().len(), 2, "reachable over mTLS");
    let r = translate(&dr("{mode: SIMPLE, caCertificates: /etc/ca.pem}"), WEB);
    let cla = find(&r.endpoints, &format!("outbound|8080||{HOST}"));
    assert_eq!(cla["endpoints"], json!([]), "no endpoints rather than plain text");
    assert!(find(&r.clusters, &format!("outbound|8080||{HOST}")).get("transport_socket").is_none());
    assert!(warnings(&r).contains("spec.trafficPolicy.tls"), "{}", warnings(&r));
}

#[test]
fn a_strict_port_serves_mtls_only_and_permissive_serves_plain_text_unless_labelled_for_mesh_tls() {
    let strict = translate(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n",
        CART_V1,
    );
    let chain = &find(&strict.listeners, "xds.istio.io/grpc/lds/inbound/127.0.5.1:9090")["filter_chains"][0];
    assert_eq!(chain["name"], "inbound-mtls");
    let tls = &chain["transport_socket"]["typed_config"];
    assert_eq!(tls["require_client_certificate"], true);
    assert_eq!(
        tls["common_tls_context"]["validation_context"]["ca_certificate_provider_instance"]["certificate_name"],
        "ROOTCA"
    );
    let permissive = translate("", CART_V1);
    let chain = &find(&permissive.listeners, "xds.istio.io/grpc/lds/inbound/127.0.5.1:9090")["filter_chains"][0];
    assert_eq!(chain["name"], "inbound-plaintext");
    assert!(chain.get("transport_socket").is_none());
}

#[test]
fn server_rbac_is_deny_then_allow_and_what_grpc_cannot_evaluate_fails_closed() {
    let r = translate(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-jwt-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  action: DENY
  rules:
  - from:
    - source:
        requestPrincipals: ["*"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  rules:
  - to: [{operation: {paths: [/shop.Cart/Get]}}]
  - when: [{key: "request.auth.claims[group]", values: [admin]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  action: AUDIT
  rules: [{}]
"#,
        CART_V1,
    );
    let name = "xds.istio.io/grpc/lds/inbound/127.0.5.1:9090";
    let listener = find(&r.listeners, name);
    assert_eq!(listener["address"]["socket_address"], json!({"address": "127.0.5.1", "port_value": 9090}));
    assert!(r.listeners.iter().any(|l| l.name == "grpc/server?xds.resource.listening_address=0.0.0.0:9090"));
    let chains = listener["filter_chains"].as_array().unwrap();
    assert_eq!(chains.len(), 1);
    let hcm = &chains[0]["filters"][0]["typed_config"];
    assert_eq!(hcm["route_config"]["virtual_hosts"][0]["routes"][0]["non_forwarding_action"], json!({}));
    let filters = hcm["http_filters"].as_array().unwrap();
    let names: Vec<&str> = filters.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["envoy.filters.http.rbac.DENY", "envoy.filters.http.rbac", "envoy.filters.http.router"]);
    // The DENY rule on JWT principals, which gRPC cannot see, denies everything.
    let deny = &filters[0]["typed_config"]["rules"];
    assert_eq!(deny["action"], "DENY");
    assert_eq!(
        deny["policies"]["ns[shop]-policy[no-jwt-admin]-rule[0]"],
        json!({"permissions": [{"any": true}], "principals": [{"any": true}]})
    );
    // The ALLOW rule on a claim never matches (left out); the path rule stays.
    let allow = filters[1]["typed_config"]["rules"]["policies"].as_object().unwrap();
    assert_eq!(allow.keys().collect::<Vec<_>>(), ["ns[shop]-policy[allow]-rule[0]"]);
    assert!(allow["ns[shop]-policy[allow]-rule[0]"].to_string().contains("/shop.Cart/Get"));
    let w = warnings(&r);
    for expected in ["AuthorizationPolicy/shop/no-jwt-admin", "AuthorizationPolicy/shop/allow", "do not audit"] {
        assert!(w.contains(expected), "{expected}: {w}");
    }
}
