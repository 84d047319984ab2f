//! Istio semantics of the sidecar translation, one behaviour per test, on small inline configs.

use serde_json::{Value, json};
use sluice_translator::diagnostic::Severity;
use sluice_translator::envoy::{Certificates, ProxyResources, translate_sidecar};
use sluice_translator::model::mesh_config::MeshConfig;
use sluice_translator::parse::parse_documents;
use sluice_translator::snapshot::Snapshot;

/// A two-namespace mesh: `shop/cart` (v1, v2 pods), `shop/web` (the client) and `other/stock`.
const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec:
  clusterIP: 127.100.1.1
  selector: {app: cart}
  ports: [{name: http, port: 8080, targetPort: 9090}, {name: tcp-db, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: cart-1, namespace: shop, labels: {kubernetes.io/service-name: cart}}
addressType: IPv4
ports: [{name: http, port: 9090}, {name: tcp-db, port: 5432}]
endpoints:
- addresses: [127.0.5.1]
  targetRef: {kind: Pod, name: cart-v1, namespace: shop}
  zone: zone-a
- addresses: [127.0.5.2]
  targetRef: {kind: Pod, name: cart-v2, namespace: shop}
  conditions: {ready: false}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-v1, namespace: shop, labels: {app: cart, version: v1, topology.kubernetes.io/region: eu}}
spec: {containers: [{name: c}]}
status: {podIP: 127.0.5.1}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-v2, namespace: shop, labels: {app: cart, version: v2}}
spec: {containers: [{name: c}]}
status: {podIP: 127.0.5.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web, tier: front}}
spec: {serviceAccountName: web, containers: [{name: c}]}
status: {podIP: 127.0.5.9}
---
apiVersion: v1
kind: Service
metadata: {name: stock, namespace: other}
spec:
  clusterIP: 127.100.2.1
  ports: [{name: http-api, port: 8080}]
"#;

const WEB: &str = "sidecar~127.0.5.9~web.shop~shop.svc.cluster.local";
const CART_V1: &str = "sidecar~127.0.5.1~cart-v1.shop~shop.svc.cluster.local";

fn translate(extra: &str, node: &str) -> ProxyResources {
    translate_for(extra, node, MeshConfig::default(), Certificates::None)
}

/// As [`translate`], with mesh settings and for a proxy that may hold its certificate.
fn translate_for(extra: &str, node: &str, mesh: MeshConfig, certificates: Certificates) -> ProxyResources {
    let (objects, diags) = parse_documents("mesh.yaml", &format!("{MESH}\n---\n{extra}"));
    let errors: Vec<_> = diags.iter().filter(|d| d.severity == Severity::Error).collect();
    assert!(errors.is_empty(), "{errors:#?}");
    let (mut snapshot, _) = Snapshot::build(objects);
    snapshot.mesh = std::sync::Arc::new(mesh);
    translate_sidecar(&snapshot, node, certificates).expect("translate")
}

fn find<'a>(list: &'a [sluice_translator::envoy::Resource], name: &str) -> &'a Value {
    &list.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("no resource {name}")).body
}

fn vhost<'a>(r: &'a ProxyResources, route: &str, host: &str) -> &'a Value {
    find(&r.routes, route)["virtual_hosts"]
        .as_array()
        .expect("vhosts")
        .iter()
        .find(|v| v["name"].as_str().is_some_and(|n| n.starts_with(host)))
        .unwrap_or_else(|| panic!("no vhost {host}"))
}

fn routes(r: &ProxyResources, host: &str) -> Vec<Value> {
    vhost(r, "8080", host)["routes"].as_array().expect("routes").clone()
}

const CART: &str = "cart.shop.svc.cluster.local";

fn vs(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: cart, namespace: shop}}\nspec:\n  hosts: [cart]\n  http:\n{http}"
    )
}

const SUBSETS: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: cart, namespace: shop}
spec:
  host: cart
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

#[test]
fn no_virtual_service_gives_istio_default_route() {
    let r = translate("", WEB);
    let rs = routes(&r, CART);
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0]["name"], "default");
    assert_eq!(rs[0]["route"]["cluster"], format!("outbound|8080||{CART}"));
    assert_eq!(rs[0]["route"]["timeout"], "0s");
    assert_eq!(rs[0]["route"]["retry_policy"]["num_retries"], 2);
    let domains = vhost(&r, "8080", CART)["domains"].clone();
    for d in ["cart", "cart:8080", "cart.shop", "cart.shop.svc", CART, "127.100.1.1", "127.100.1.1:8080"] {
        assert!(domains.as_array().unwrap().contains(&json!(d)), "missing domain {d}");
    }
    // Short names only for the proxy's own namespace.
    let other = vhost(&r, "8080", "stock.other")["domains"].clone();
    assert!(!other.as_array().unwrap().contains(&json!("stock")));
    assert!(other.as_array().unwrap().contains(&json!("stock.other")));
}

#[test]
fn first_match_wins_in_order() {
    let r = translate(
        &vs(
            "  - match: [{uri: {prefix: /a}}]\n    route: [{destination: {host: cart, subset: v1}}]\n  - match: [{uri: {prefix: /}}]\n    route: [{destination: {host: cart, subset: v2}}]\n  - route: [{destination: {host: cart}}]\n",
        ),
        WEB,
    );
    let rs = routes(&r, CART);
    assert_eq!(rs.len(), 3);
    assert_eq!(rs[0]["match"]["prefix"], "/a");
    assert_eq!(rs[0]["route"]["cluster"], format!("outbound|8080|v1|{CART}"));
    assert_eq!(rs[1]["route"]["cluster"], format!("outbound|8080|v2|{CART}"));
    assert_eq!(rs[2]["match"]["prefix"], "/");
}

#[test]
fn match_conditions_translate_to_envoy_matchers() {
    let r = translate(
        &vs(r#"  - name: r
    match:
    - name: m
      uri: {regex: "/item/[0-9]+"}
      ignoreUriCase: true
      method: {exact: GET}
      authority: {prefix: cart}
      headers:
        end-user: {exact: jason}
        x-any: {}
      withoutHeaders:
        x-skip: {prefix: "1"}
      queryParams:
        debug: {exact: "1"}
    - uri: {exact: /exact}
    route: [{destination: {host: cart}}]
"#),
        WEB,
    );
    let rs = routes(&r, CART);
    assert_eq!(rs.len(), 2, "each match is its own Envoy route (OR)");
    assert_eq!(rs[0]["name"], "r.m");
    let m = &rs[0]["match"];
    assert_eq!(m["safe_regex"]["regex"], "/item/[0-9]+");
    assert_eq!(m["case_sensitive"], false);
    let headers = m["headers"].as_array().unwrap();
    assert!(headers.contains(&json!({"name": ":method", "string_match": {"exact": "GET"}})));
    assert!(headers.contains(&json!({"name": ":authority", "string_match": {"prefix": "cart"}})));
    assert!(headers.contains(&json!({"name": "end-user", "string_match": {"exact": "jason"}})));
    assert!(headers.contains(&json!({"name": "x-any", "present_match": true})));
    assert!(headers.contains(&json!({"name": "x-skip", "string_match": {"prefix": "1"}, "invert_match": true})));
    assert_eq!(m["query_parameters"], json!([{"name": "debug", "string_match": {"exact": "1"}}]));
    assert_eq!(rs[1]["match"]["path"], "/exact");
}

#[test]
fn source_labels_and_port_select_routes_per_proxy() {
    let config = vs(
        "  - match: [{sourceLabels: {tier: front}}]\n    route: [{destination: {host: cart, subset: v2}}]\n  - match: [{port: 9999}]\n    route: [{destination: {host: cart, subset: v1}}]\n  - route: [{destination: {host: cart}}]\n",
    );
    let web = routes(&translate(&config, WEB), CART);
    assert_eq!(web.len(), 2, "the port 9999 route does not apply on 8080");
    assert_eq!(web[0]["route"]["cluster"], format!("outbound|8080|v2|{CART}"));
    let cart = routes(&translate(&config, CART_V1), CART);
    assert_eq!(cart.len(), 1, "cart-v1 lacks tier=front");
    assert_eq!(cart[0]["route"]["cluster"], format!("outbound|8080||{CART}"));
}

#[test]
fn weights_timeouts_retries_fault_mirror_rewrite_headers_cors() {
    let r = translate(
        &format!(
            "{SUBSETS}---\n{}",
            vs(r#"  - route:
    - destination: {host: cart, subset: v1}
      weight: 75
      headers: {request: {set: {x-v: "1"}}}
    - destination: {host: cart, subset: v2}
      weight: 25
    - destination: {host: cart}
      weight: 0
    timeout: 1.5s
    retries: {attempts: 4, perTryTimeout: 250ms, retryOn: "gateway-error,503"}
    fault:
      delay: {fixedDelay: 2s, percentage: {value: 12.5}}
      abort: {httpStatus: 418}
    mirror: {host: stock.other.svc.cluster.local}
    mirrorPercentage: {value: 10}
    rewrite: {uri: /v2, authority: cart.internal}
    headers:
      request: {add: {x-a: b}, remove: [x-secret]}
      response: {set: {x-served-by: sluice}}
    corsPolicy:
      allowOrigins: [{exact: "https://a.example"}]
      allowMethods: [GET, POST]
      maxAge: 24h
"#)
        ),
        WEB,
    );
    let route = &routes(&r, CART)[0];
    let a = &route["route"];
    let clusters = a["weighted_clusters"]["clusters"].as_array().unwrap();
    assert_eq!(clusters.len(), 2, "zero-weight destinations are dropped");
    assert_eq!(clusters[0]["weight"], 75);
    assert_eq!(clusters[0]["request_headers_to_add"][0]["header"]["key"], "x-v");
    assert_eq!(a["timeout"], "1.500s");
    assert_eq!(a["retry_policy"]["num_retries"], 4);
    assert_eq!(a["retry_policy"]["per_try_timeout"], "0.250s");
    assert_eq!(a["retry_policy"]["retry_on"], "gateway-error,retriable-status-codes");
    assert_eq!(a["retry_policy"]["retriable_status_codes"], json!([503]));
    let fault = &route["typed_per_filter_config"]["envoy.filters.http.fault"];
    assert_eq!(fault["delay"]["fixed_delay"], "2s");
    assert_eq!(fault["delay"]["percentage"], json!({"numerator": 125000, "denominator": "MILLION"}));
    assert_eq!(fault["abort"]["http_status"], 418);
    assert_eq!(fault["abort"]["percentage"]["numerator"], 1_000_000);
    let mirror = &a["request_mirror_policies"][0];
    assert_eq!(mirror["cluster"], "outbound|8080||stock.other.svc.cluster.local");
    assert_eq!(mirror["runtime_fraction"]["default_value"]["numerator"], 100_000);
    assert_eq!(a["prefix_rewrite"], "/v2");
    assert_eq!(a["host_rewrite_literal"], "cart.internal");
    assert_eq!(route["request_headers_to_add"][0]["append_action"], "APPEND_IF_EXISTS_OR_ADD");
    assert_eq!(route["request_headers_to_remove"], json!(["x-secret"]));
    assert_eq!(route["response_headers_to_add"][0]["append_action"], "OVERWRITE_IF_EXISTS_OR_ADD");
    let cors = &route["typed_per_filter_config"]["envoy.filters.http.cors"];
    assert_eq!(cors["allow_origin_string_match"], json!([{"exact": "https://a.example"}]));
    assert_eq!(cors["allow_methods"], "GET,POST");
    assert_eq!(cors["max_age"], "86400");
}

#[test]
fn zero_retry_attempts_disable_retries_and_redirects_and_direct_responses() {
    let r = translate(
        &vs(r#"  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, authority: cart.example, redirectCode: 308}
  - match: [{uri: {prefix: /down}}]
    directResponse: {status: 503, body: {string: maintenance}}
  - route: [{destination: {host: cart}}]
    retries: {attempts: 0}
"#),
        WEB,
    );
    let rs = routes(&r, CART);
    assert_eq!(
        rs[0]["redirect"],
        json!({"path_redirect": "/new", "host_redirect": "cart.example", "response_code": "PERMANENT_REDIRECT"})
    );
    assert_eq!(rs[1]["direct_response"], json!({"status": 503, "body": {"inline_string": "maintenance"}}));
    assert!(rs[2]["route"].get("retry_policy").is_none());
}

#[test]
fn destination_rule_policies_shape_clusters() {
    let r = translate(
        r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: cart, namespace: shop}
spec:
  host: cart
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    connectionPool:
      tcp: {maxConnections: 7, connectTimeout: 3s}
      http: {http1MaxPendingRequests: 9, http2MaxRequests: 11, maxRetries: 2, maxRequestsPerConnection: 1}
    outlierDetection: {consecutive5xxErrors: 3, interval: 5s, baseEjectionTime: 1m, maxEjectionPercent: 20, minHealthPercent: 40}
    portLevelSettings:
    - port: {number: 5432}
      loadBalancer: {simple: ROUND_ROBIN}
  subsets:
  - name: sticky
    labels: {version: v1}
    trafficPolicy:
      loadBalancer:
        consistentHash: {httpHeaderName: x-user, ringHash: {minimumRingSize: 2048}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: cart, namespace: shop}
spec:
  hosts: [cart]
  http:
  - route: [{destination: {host: cart, subset: sticky}}]
"#,
        WEB,
    );
    let c = find(&r.clusters, &format!("outbound|8080||{CART}"));
    assert_eq!(c["type"], "EDS");
    assert_eq!(c["lb_policy"], "RANDOM");
    assert_eq!(c["connect_timeout"], "3s");
    let t = &c["circuit_breakers"]["thresholds"][0];
    assert_eq!(
        (
            t["max_connections"].clone(),
            t["max_pending_requests"].clone(),
            t["max_requests"].clone(),
            t["max_retries"].clone()
        ),
        (json!(7), json!(9), json!(11), json!(2))
    );
    let opts = &c["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
    assert_eq!(opts["common_http_protocol_options"]["max_requests_per_connection"], 1);
    let o = &c["outlier_detection"];
    assert_eq!(
        (
            o["consecutive_5xx"].clone(),
            o["interval"].clone(),
            o["base_ejection_time"].clone(),
            o["max_ejection_percent"].clone()
        ),
        (json!(3), json!("5s"), json!("60s"), json!(20))
    );
    assert_eq!(c["common_lb_config"]["healthy_panic_threshold"]["value"], 40.0);
    assert_eq!(find(&r.clusters, &format!("outbound|5432||{CART}"))["lb_policy"], "ROUND_ROBIN", "port-level override");
    let sticky = find(&r.clusters, &format!("outbound|8080|sticky|{CART}"));
    assert_eq!(sticky["lb_policy"], "RING_HASH");
    assert_eq!(sticky["ring_hash_lb_config"]["minimum_ring_size"], 2048);
    assert_eq!(sticky["circuit_breakers"]["thresholds"][0]["max_connections"], 7, "subset inherits the top-level pool");
    assert_eq!(routes(&r, CART)[0]["route"]["hash_policy"], json!([{"header": {"header_name": "x-user"}}]));
}

#[test]
fn endpoints_follow_subsets_ports_readiness_and_locality() {
    let r = translate(SUBSETS, WEB);
    let all = find(&r.endpoints, &format!("outbound|8080||{CART}"));
    let groups = all["endpoints"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "two localities: eu/zone-a and unknown");
    let text = all.to_string();
    assert!(text.contains(r#""port_value":9090"#), "endpoint port is the target port");
    assert!(text.contains(r#""health_status":"UNHEALTHY""#), "not-ready endpoints are unhealthy");
    let eu = groups.iter().find(|g| g.get("locality").is_some()).unwrap();
    assert_eq!(eu["locality"], json!({"region": "eu", "zone": "zone-a"}));
    let v2 = find(&r.endpoints, &format!("outbound|8080|v2|{CART}")).to_string();
    assert!(v2.contains("127.0.5.2") && !v2.contains("127.0.5.1"));
    assert!(find(&r.endpoints, &format!("outbound|5432|v1|{CART}")).to_string().contains(r#""port_value":5432"#));
}

#[test]
fn service_entries_by_resolution() {
    let r = translate(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: shop}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: any, namespace: shop}
spec:
  hosts: [db.internal]
  addresses: [127.100.3.3]
  ports: [{number: 3306, name: tcp, protocol: TCP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vm, namespace: shop}
spec:
  hosts: [vm.internal]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8081}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints:
  - {address: 127.0.6.1, weight: 3, locality: us/east}
"#,
        WEB,
    );
    let dns = find(&r.clusters, "outbound|443||api.example.com");
    assert_eq!(dns["type"], "STRICT_DNS");
    assert!(dns["load_assignment"].to_string().contains("api.example.com"));
    assert_eq!(find(&r.clusters, "outbound|3306||db.internal")["type"], "ORIGINAL_DST");
    assert_eq!(find(&r.clusters, "outbound|80||vm.internal")["type"], "EDS");
    let e = find(&r.endpoints, "outbound|80||vm.internal");
    assert_eq!(e["endpoints"][0]["lb_endpoints"][0]["load_balancing_weight"], 3);
    assert_eq!(e["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"], 8081);
    assert!(r.listeners.iter().any(|l| l.name == "127.100.3.3_3306"), "TCP service with a VIP gets a VIP listener");
}

#[test]
fn tcp_routes_become_weighted_tcp_proxies() {
    let r = translate(
        &format!(
            "{SUBSETS}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: db, namespace: shop}}\nspec:\n  hosts: [cart]\n  tcp:\n  - match: [{{port: 5432}}]\n    route:\n    - {{destination: {{host: cart, subset: v1}}, weight: 80}}\n    - {{destination: {{host: cart, subset: v2}}, weight: 20}}\n"
        ),
        WEB,
    );
    let l = find(&r.listeners, "127.100.1.1_5432");
    let tcp = &l["filter_chains"][0]["filters"][0]["typed_config"];
    assert_eq!(
        tcp["weighted_clusters"]["clusters"][1],
        json!({"name": format!("outbound|5432|v2|{CART}"), "weight": 20})
    );
    assert_eq!(l["bind_to_port"], false);
}

#[test]
fn sidecar_egress_hosts_scope_what_the_proxy_sees() {
    let scoped = |hosts: &str| {
        translate(
            &format!(
                "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: shop}}\nspec:\n  egress:\n  - hosts: {hosts}\n"
            ),
            WEB,
        )
    };
    let has = |r: &ProxyResources, c: &str| r.clusters.iter().any(|x| x.name == c);
    let same_ns = scoped(r#"["./*"]"#);
    assert!(has(&same_ns, &format!("outbound|8080||{CART}")));
    assert!(!has(&same_ns, "outbound|8080||stock.other.svc.cluster.local"));
    let other = scoped(r#"["other/*"]"#);
    assert!(!has(&other, &format!("outbound|8080||{CART}")));
    assert!(has(&other, "outbound|8080||stock.other.svc.cluster.local"));
    let one = scoped(r#"["*/stock.other.svc.cluster.local"]"#);
    assert!(has(&one, "outbound|8080||stock.other.svc.cluster.local") && !has(&one, &format!("outbound|8080||{CART}")));
}

#[test]
fn export_to_hides_services_from_other_namespaces() {
    let (objects, _) = parse_documents(
        "x.yaml",
        &format!(
            "{MESH}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: o, namespace: other}}\nspec: {{containers: [{{name: c}}]}}\nstatus: {{podIP: 127.0.7.1}}\n"
        ),
    );
    let (mut snapshot, _) = Snapshot::build(objects);
    std::sync::Arc::make_mut(snapshot.services.get_mut(CART).unwrap()).export_to = vec![".".into()];
    let r =
        translate_sidecar(&snapshot, "sidecar~127.0.7.1~o.other~other.svc.cluster.local", Default::default()).unwrap();
    assert!(!r.clusters.iter().any(|c| c.name.ends_with(CART)));
    let r = translate_sidecar(&snapshot, WEB, Default::default()).unwrap();
    assert!(r.clusters.iter().any(|c| c.name.ends_with(CART)));
}

#[test]
fn capture_mode_none_binds_real_addresses() {
    let r = translate(
        r#"apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: web, namespace: shop}
spec:
  workloadSelector: {labels: {app: web}}
  ingress:
  - port: {number: 8080, protocol: HTTP, name: http}
    bind: 127.0.5.9
    captureMode: NONE
    defaultEndpoint: 127.0.0.1:18080
  egress:
  - port: {number: 8080, protocol: HTTP, name: http}
    bind: 127.0.0.2
    captureMode: NONE
    hosts: ["./*"]
  - hosts: ["./*"]
"#,
        WEB,
    );
    let inbound = find(&r.listeners, "127.0.5.9_8080");
    assert!(inbound.get("bind_to_port").is_none(), "bound listener");
    assert_eq!(inbound["traffic_direction"], "INBOUND");
    let egress = find(&r.listeners, "127.0.0.2_8080");
    assert!(egress.get("bind_to_port").is_none());
    assert_eq!(egress["filter_chains"][0]["filters"][0]["typed_config"]["rds"]["route_config_name"], "8080");
    let cluster = find(&r.clusters, "inbound|8080||");
    assert_eq!(
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"],
        json!({"address": "127.0.0.1", "port_value": 18080})
    );
    assert!(
        r.listeners.iter().any(|l| l.name == "virtualOutbound"),
        "without the interception annotation the virtual listeners stay"
    );
}

#[test]
fn inbound_chains_use_target_ports() {
    let r = translate("", CART_V1);
    let vi = find(&r.listeners, "virtualInbound");
    let ports: Vec<_> = vi["filter_chains"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["filter_chain_match"]["destination_port"].as_u64())
        .collect();
    assert_eq!(ports, vec![5432, 9090]);
    assert_eq!(find(&r.listeners, "virtualOutbound")["use_original_dst"], true);
    assert_eq!(
        find(&r.clusters, "inbound|9090||")["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            ["socket_address"]["address"],
        "127.0.5.1"
    );
}

#[test]
fn registry_only_blocks_unknown_destinations() {
    let r = translate(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: shop}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n",
        WEB,
    );
    let block = vhost(&r, "8080", "block_all");
    assert_eq!(block["routes"][0]["direct_response"]["status"], 502);
    let vo = find(&r.listeners, "virtualOutbound");
    assert_eq!(vo["filter_chains"][0]["filters"][0]["typed_config"]["cluster"], "BlackHoleCluster");
}

fn rbac_filters(r: &ProxyResources, port: u64) -> Vec<Value> {
    let vi = find(&r.listeners, "virtualInbound");
    let chain = vi["filter_chains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["filter_chain_match"]["destination_port"] == port)
        .expect("chain")
        .clone();
    let f = &chain["filters"];
    let hcm = f.as_array().unwrap().iter().find(|f| f["name"] == "envoy.filters.network.http_connection_manager");
    let list = match hcm {
        Some(h) => h["typed_config"]["http_filters"].as_array().unwrap().clone(),
        None => f.as_array().unwrap().clone(),
    };
    list.into_iter().filter(|f| f["name"].as_str().unwrap().ends_with(".rbac")).collect()
}

#[test]
fn authorization_deny_before_allow_with_istio_names() {
    let r = translate(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/web], namespaces: [shop]}}]
    to: [{operation: {methods: [GET], paths: ["/api/*"], notPaths: ["/api/admin"]}}]
    when: [{key: "request.headers[x-token]", values: ["*"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-ip, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from: [{source: {ipBlocks: [127.0.9.0/24]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: not-me, namespace: shop}
spec:
  selector: {matchLabels: {app: nobody}}
  action: DENY
  rules: [{}]
"#,
        CART_V1,
    );
    let filters = rbac_filters(&r, 9090);
    assert_eq!(filters.len(), 2);
    let deny = &filters[0]["typed_config"]["rules"];
    assert_eq!(deny["action"], "DENY");
    let policies = deny["policies"].as_object().unwrap();
    assert_eq!(
        policies.keys().collect::<Vec<_>>(),
        vec!["ns[istio-system]-policy[deny-ip]-rule[0]"],
        "the root-namespace policy applies; the unselected one does not"
    );
    assert_eq!(
        policies.values().next().unwrap()["principals"][0]["and_ids"]["ids"][0]["or_ids"]["ids"][0]["direct_remote_ip"],
        json!({"address_prefix": "127.0.9.0", "prefix_len": 24})
    );
    let allow = &filters[1]["typed_config"]["rules"];
    assert_eq!(allow["action"], "ALLOW");
    let p = &allow["policies"]["ns[shop]-policy[allow-web]-rule[0]"];
    let ids = &p["principals"][0]["and_ids"]["ids"];
    assert_eq!(
        ids[0]["or_ids"]["ids"][0]["authenticated"]["principal_name"]["exact"],
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(ids[1]["or_ids"]["ids"][0]["authenticated"]["principal_name"]["safe_regex"]["regex"], ".*/ns/shop/.*");
    assert_eq!(ids[2]["or_ids"]["ids"][0]["header"], json!({"name": "x-token", "present_match": true}));
    let rules = &p["permissions"][0]["and_rules"]["rules"];
    assert_eq!(rules[0]["or_rules"]["rules"][0]["header"]["name"], ":method");
    assert_eq!(rules[1]["or_rules"]["rules"][0]["url_path"]["path"]["prefix"], "/api/");
    assert_eq!(rules[2]["not_rule"]["or_rules"]["rules"][0]["url_path"]["path"]["exact"], "/api/admin");
}

#[test]
fn principals_of_the_mesh_match_in_its_trust_domain_and_every_alias_service_accounts_in_any() {
    let policy = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/shop/sa/web, old.example/ns/shop/sa/legacy, partner.example/ns/x/sa/y, "*"]
    - source: {serviceAccounts: [shop/batch]}
    when: [{key: source.principal, values: [new.example/ns/shop/sa/cron]}]
"#;
    let mesh = MeshConfig {
        trust_domain: "new.example".into(),
        trust_domain_aliases: vec!["old.example".into()],
        ..Default::default()
    };
    let r = translate_for(policy, CART_V1, mesh, Certificates::None);
    let filters = rbac_filters(&r, 9090);
    let p = &filters[0]["typed_config"]["rules"]["policies"]["ns[shop]-policy[allow-web]-rule[0]"];
    // principals[from].ids[field]: the `when` condition is the last field of each `from`.
    let matched = |from: usize, i: usize| -> Vec<Value> {
        p["principals"][from]["and_ids"]["ids"][i]["or_ids"]["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| id["authenticated"]["principal_name"].clone())
            .collect()
    };
    let exact = |v: &str| json!({"exact": v});
    // cluster.local and an alias stand for the mesh's own; another trust domain and `*` stay.
    assert_eq!(
        matched(0, 0),
        vec![
            exact("spiffe://new.example/ns/shop/sa/web"),
            exact("spiffe://old.example/ns/shop/sa/web"),
            exact("spiffe://new.example/ns/shop/sa/legacy"),
            exact("spiffe://old.example/ns/shop/sa/legacy"),
            exact("spiffe://partner.example/ns/x/sa/y"),
            json!({"safe_regex": {"regex": ".+"}}),
        ]
    );
    // A service account is matched as Istio does, in any trust domain.
    assert_eq!(matched(1, 0), vec![json!({"safe_regex": {"regex": "spiffe://.+/ns/shop/(.+/|)sa/batch(/.+)?"}})]);
    assert_eq!(
        matched(0, 1),
        vec![exact("spiffe://new.example/ns/shop/sa/cron"), exact("spiffe://old.example/ns/shop/sa/cron")]
    );
    // With Istio's defaults (cluster.local, no aliases) a principal is matched as written.
    let r = translate(policy, CART_V1);
    let filters = rbac_filters(&r, 9090);
    let p = &filters[0]["typed_config"]["rules"]["policies"]["ns[shop]-policy[allow-web]-rule[0]"];
    let first = &p["principals"][0]["and_ids"]["ids"][0]["or_ids"]["ids"];
    assert_eq!(first.as_array().unwrap().len(), 4, "{first}");
    assert_eq!(first[0]["authenticated"]["principal_name"], exact("spiffe://cluster.local/ns/shop/sa/web"));
}

#[test]
fn allow_without_rules_denies_everything() {
    let r = translate(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: nothing, namespace: shop}\nspec: {selector: {matchLabels: {app: cart}}}\n",
        CART_V1,
    );
    let filters = rbac_filters(&r, 9090);
    assert_eq!(filters.len(), 1);
    // Istio's explicit never-matching policy, under the name of the policy's rule 0.
    assert_eq!(
        filters[0]["typed_config"]["rules"],
        json!({"action": "ALLOW", "policies": {"ns[shop]-policy[nothing]-rule[0]": {
            "permissions": [{"not_rule": {"any": true}}],
            "principals": [{"not_id": {"any": true}}],
        }}})
    );
}

#[test]
fn http_only_rules_fail_closed_on_tcp_ports() {
    let r = translate(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-get, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  rules:
  - to: [{operation: {methods: [GET]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-post, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  action: DENY
  rules:
  - to: [{operation: {methods: [POST], ports: ["5432"]}}]
"#,
        CART_V1,
    );
    let tcp = rbac_filters(&r, 5432);
    assert_eq!(tcp[0]["name"], "envoy.filters.network.rbac");
    let deny = &tcp[0]["typed_config"]["rules"]["policies"]["ns[shop]-policy[deny-post]-rule[0]"];
    assert_eq!(
        deny["permissions"][0]["and_rules"]["rules"],
        json!([{"or_rules": {"rules": [{"destination_port": 5432}]}}]),
        "DENY keeps the L4 part and drops methods"
    );
    assert_eq!(
        tcp[1]["typed_config"]["rules"]["policies"],
        json!({}),
        "the ALLOW rule with methods never matches on TCP"
    );
    let warnings: Vec<String> = r.diagnostics.iter().map(|d| d.to_string()).collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("AuthorizationPolicy/shop/allow-get") && w.contains("to[0].operation.methods")),
        "{warnings:?}"
    );
    let http = rbac_filters(&r, 9090);
    assert_eq!(
        http[1]["typed_config"]["rules"]["policies"]["ns[shop]-policy[allow-get]-rule[0]"]["permissions"][0]["and_rules"]
            ["rules"][0]["or_rules"]["rules"][0]["header"]["string_match"]["exact"],
        "GET"
    );
}

#[test]
fn unknown_proxies_are_clear_errors_or_warnings() {
    let (objects, _) = parse_documents("m.yaml", MESH);
    let (snapshot, _) = Snapshot::build(objects);
    let err = translate_sidecar(&snapshot, "bogus", Default::default()).unwrap_err();
    assert!(err.to_string().contains("four"), "{err}");
    let r = translate_sidecar(&snapshot, "sidecar~127.0.9.1~ghost.shop~shop.svc.cluster.local", Default::default())
        .unwrap();
    assert!(r.diagnostics.iter().any(|d| d.to_string().contains("Pod/shop/ghost")));
}

/// The inbound chains of `port` (0: the catch-all) as (name, transport match, terminates TLS).
fn chains_of(r: &ProxyResources, port: u64) -> Vec<(String, Option<String>, bool)> {
    find(&r.listeners, "virtualInbound")["filter_chains"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["filter_chain_match"]["destination_port"].as_u64().unwrap_or(0) == port)
        .map(|c| {
            let transport = c["filter_chain_match"]["transport_protocol"].as_str().map(String::from);
            (c["name"].as_str().unwrap().to_string(), transport, c.get("transport_socket").is_some())
        })
        .collect()
}

#[test]
fn peer_authentication_layers_mesh_namespace_workload_and_port() {
    let policies = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: mesh, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n---\n\
        apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: ns, namespace: shop}\nspec: {mtls: {mode: UNSET}}\n---\n\
        apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: cart, namespace: shop}\n\
        spec: {selector: {matchLabels: {app: cart}}, mtls: {mode: DISABLE}, portLevelMtls: {9090: {mode: STRICT}}}\n";
    let r = translate_for(policies, CART_V1, MeshConfig::default(), Certificates::Sds);
    // The port-level STRICT beats the workload's DISABLE: TLS only, terminated.
    assert_eq!(chains_of(&r, 9090), [("0.0.0.0_9090-mtls".to_string(), Some("tls".to_string()), true)]);
    // The workload's DISABLE (over the mesh's STRICT; the namespace's UNSET inherits): plain text.
    assert_eq!(chains_of(&r, 5432), [("0.0.0.0_5432".to_string(), None, false)]);
    assert_eq!(chains_of(&r, 0), [("virtualInbound-catchall-tcp".to_string(), None, false)]);
    // web: only the mesh's STRICT applies; undeclared ports are STRICT too.
    let web = translate_for(policies, WEB, MeshConfig::default(), Certificates::Sds);
    assert_eq!(chains_of(&web, 0), [("virtualInbound-catchall-tcp-mtls".to_string(), Some("tls".to_string()), true)]);
    // Nothing set is PERMISSIVE: mTLS by Istio's ALPN, plain text, and a TCP port's own TLS passed on.
    let open = translate_for("", CART_V1, MeshConfig::default(), Certificates::Sds);
    let names: Vec<_> = chains_of(&open, 5432).into_iter().map(|c| (c.0, c.2)).collect();
    assert_eq!(
        names,
        [("0.0.0.0_5432-mtls".into(), true), ("0.0.0.0_5432".into(), false), ("0.0.0.0_5432-tls".into(), false)]
    );
    assert_eq!(chains_of(&open, 9090).len(), 2, "an HTTP port has no TLS passthrough chain");
}

#[test]
fn strict_without_a_certificate_refuses_and_says_so() {
    let strict = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: ns, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n";
    let r = translate_for(strict, CART_V1, MeshConfig::default(), Certificates::None);
    for port in [9090, 5432, 0] {
        let chains = chains_of(&r, port);
        assert_eq!(chains.len(), 1, "{chains:?}");
        assert!(chains[0].0.ends_with("-refused"), "{chains:?}");
    }
    let vi = find(&r.listeners, "virtualInbound");
    assert!(vi["filter_chains"].as_array().unwrap().iter().all(|c| {
        let text = c["filters"].to_string();
        !text.contains("InboundPassthroughCluster") && !text.contains("inbound|")
    }));
    let warned = r.diagnostics.iter().any(|d| {
        d.object.as_ref().is_some_and(|o| o.kind == "PeerAuthentication" && o.name == "ns")
            && d.path == "spec.mtls.mode"
            && d.message.contains("refused")
    });
    assert!(warned, "{:#?}", r.diagnostics);
}

#[test]
fn destination_rule_tls_modes_and_auto_mtls() {
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: cart, namespace: shop}\nspec:\n  host: cart\n  trafficPolicy:\n    tls: {mode: ISTIO_MUTUAL, sni: cart.custom}\n    portLevelSettings:\n    - port: {number: 5432}\n      tls: {mode: DISABLE}\n---\n\
        apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: stock, namespace: other}\nspec:\n  host: stock.other.svc.cluster.local\n  trafficPolicy:\n    tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem, caCertificates: /ca.pem, subjectAltNames: [stock.example]}\n";
    let r = translate_for(dr, WEB, MeshConfig::default(), Certificates::Sds);
    let cart = find(&r.clusters, "outbound|8080||cart.shop.svc.cluster.local");
    let tls = &cart["transport_socket"]["typed_config"];
    assert_eq!(tls["sni"], "cart.custom");
    assert_eq!(tls["common_tls_context"]["tls_certificate_sds_secret_configs"][0]["name"], "default");
    assert_eq!(
        tls["common_tls_context"]["combined_validation_context"]["validation_context_sds_secret_config"]["name"],
        "ROOTCA"
    );
    assert_eq!(tls["common_tls_context"]["tls_params"]["tls_maximum_protocol_version"], "TLSv1_3");
    let db = find(&r.clusters, "outbound|5432||cart.shop.svc.cluster.local");
    assert!(db.get("transport_socket").is_none() && db.get("transport_socket_matches").is_none(), "{db}");
    let stock = &find(&r.clusters, "outbound|8080||stock.other.svc.cluster.local")["transport_socket"]["typed_config"]
        ["common_tls_context"];
    assert_eq!(stock["tls_certificates"][0]["certificate_chain"]["filename"], "/c.pem");
    assert_eq!(stock["validation_context"]["trusted_ca"]["filename"], "/ca.pem");
    assert_eq!(stock["validation_context"]["match_typed_subject_alt_names"][0]["matcher"]["exact"], "stock.example");

    // Without a certificate, ISTIO_MUTUAL cannot be made: no endpoints, and a warning.
    let bare = translate_for(dr, WEB, MeshConfig::default(), Certificates::None);
    let refused = find(&bare.clusters, "outbound|8080||cart.shop.svc.cluster.local");
    assert_eq!(refused["type"], "STATIC");
    assert_eq!(refused["load_assignment"]["endpoints"], json!([]));
    assert!(bare.diagnostics.iter().any(|d| d.path == "spec.trafficPolicy.tls" && d.message.contains("ISTIO_MUTUAL")));

    // No rule: auto mTLS with the service's identities, in the trust domain and its aliases.
    let mesh = MeshConfig { trust_domain_aliases: vec!["old.example".into()], ..Default::default() };
    let auto = translate_for("", CART_V1, mesh, Certificates::Sds);
    let web = find(&auto.clusters, "outbound|8080||cart.shop.svc.cluster.local");
    let matches = web["transport_socket_matches"].as_array().expect("auto mTLS");
    assert_eq!(matches[0]["match"], json!({"tlsMode": "istio"}));
    assert_eq!(matches[1]["match"], json!({}));
    let socket = &matches[0]["transport_socket"]["typed_config"];
    assert_eq!(socket["sni"], "outbound_.8080_._.cart.shop.svc.cluster.local");
    let off = MeshConfig { enable_auto_mtls: false, ..Default::default() };
    let plain = translate_for("", CART_V1, off, Certificates::Sds);
    assert!(
        find(&plain.clusters, "outbound|8080||cart.shop.svc.cluster.local").get("transport_socket_matches").is_none()
    );
}
