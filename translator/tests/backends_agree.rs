//! Envoy and the kernel split a service's traffic the same way: both read the route's weights
//! through `live_destinations` (issue #15 found them apart: the kernel gave a destination
//! without a weight, next to one with `weight: 100`, half the traffic; Envoy, as Istio, none).

use sluice_translator::dataplane::translate_node;
use sluice_translator::envoy::translate_sidecar;
use sluice_translator::parse::parse_documents;
use sluice_translator::snapshot::Snapshot;

const MESH: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns}\nspec: {clusterIP: 127.100.61.1, selector: {app: web}, ports: [{name: http, port: 80}, {name: tcp-raw, port: 90}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: ns, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 80}, {name: tcp-raw, port: 90}]\nendpoints:\n- {addresses: [127.0.61.1], targetRef: {kind: Pod, name: web-a, namespace: ns}}\n- {addresses: [127.0.61.2], targetRef: {kind: Pod, name: web-b, namespace: ns}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-a, namespace: ns, labels: {app: web, v: a}}\nspec: {nodeName: n, containers: [{name: c}]}\nstatus: {podIP: 127.0.61.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-b, namespace: ns, labels: {app: web, v: b}}\nspec: {nodeName: n, containers: [{name: c}]}\nstatus: {podIP: 127.0.61.2}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: ns, labels: {app: client, sluice.io/dataplane: kernel}}\nspec: {nodeName: n, containers: [{name: c}]}\nstatus: {podIP: 127.0.61.9}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web, namespace: ns}\nspec: {host: web, subsets: [{name: a, labels: {v: a}}, {name: b, labels: {v: b}}]}\n";

#[test]
fn a_destination_without_a_weight_next_to_one_with_100_gets_nothing_on_either_back_end() {
    for (kind, port) in [("http", 80), ("tcp", 90)] {
        let vs = format!(
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: ns}}\nspec:\n  hosts: [web]\n  {kind}:\n  - route: [{{destination: {{host: web, subset: a, port: {{number: {port}}}}}, weight: 100}}, {{destination: {{host: web, subset: b, port: {{number: {port}}}}}}}]\n"
        );
        let (objects, diagnostics) = parse_documents("mesh.yaml", &format!("{MESH}{vs}"));
        assert!(
            diagnostics.iter().all(|d| d.severity != sluice_translator::diagnostic::Severity::Error),
            "{diagnostics:?}"
        );
        let (snapshot, _) = Snapshot::build(objects);

        // Envoy: only subset a's cluster is routed to.
        let envoy =
            translate_sidecar(&snapshot, "sidecar~127.0.61.9~client.ns~ns.svc.cluster.local").expect("translate");
        let config = serde_json::to_string(&(
            &envoy.routes.iter().map(|r| &r.body).collect::<Vec<_>>(),
            &envoy.listeners.iter().map(|r| &r.body).collect::<Vec<_>>(),
        ))
        .unwrap();
        let a = format!("outbound|{port}|a|web.ns.svc.cluster.local");
        let b = format!("outbound|{port}|b|web.ns.svc.cluster.local");
        assert!(config.contains(&a), "{kind}: Envoy routes to {a}");
        assert!(!config.contains(&format!("\"{b}\"")), "{kind}: Envoy sends {b} nothing");

        // The kernel: only subset a's endpoint is a backend.
        let (node, _) = translate_node(&snapshot, "n");
        let service = node
            .services
            .iter()
            .find(|s| s.vip == "127.100.61.1" && s.port == port)
            .expect("the service in the kernel");
        let backends: Vec<&str> = service.backends.iter().map(|b| b.address.as_str()).collect();
        assert_eq!(backends, ["127.0.61.1"], "{kind}: the kernel sends subset b nothing");
    }
}

/// A TCP route chosen by the client's labels: each sidecar takes the route its own labels pick;
/// the kernel's node-wide entry cannot, so kernel clients' connections fail (no backends), and
/// the warning names the VirtualService and the field — never another client's route in silence.
#[test]
fn a_tcp_route_by_source_labels_is_per_proxy_in_envoy_and_fails_closed_in_the_kernel() {
    let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: ns}\nspec:\n  hosts: [web]\n  tcp:\n  - match: [{sourceLabels: {app: client}}]\n    route: [{destination: {host: web, subset: a, port: {number: 90}}}]\n  - route: [{destination: {host: web, subset: b, port: {number: 90}}}]\n";
    let (objects, _) = parse_documents("mesh.yaml", &format!("{MESH}{vs}"));
    let (snapshot, _) = Snapshot::build(objects);
    let tcp_cluster = |node: &str| {
        let r = translate_sidecar(&snapshot, node).expect("translate");
        let listener = r.listeners.iter().find(|l| l.name == "127.100.61.1_90").expect("the TCP listener");
        listener.body["filter_chains"][0]["filters"][0]["typed_config"]["cluster"].as_str().map(str::to_string)
    };
    assert_eq!(
        tcp_cluster("sidecar~127.0.61.9~client.ns~ns.svc.cluster.local").as_deref(),
        Some("outbound|90|a|web.ns.svc.cluster.local")
    );
    assert_eq!(
        tcp_cluster("sidecar~127.0.61.1~web-a.ns~ns.svc.cluster.local").as_deref(),
        Some("outbound|90|b|web.ns.svc.cluster.local")
    );

    let (node, diagnostics) = translate_node(&snapshot, "n");
    let service =
        node.services.iter().find(|s| s.vip == "127.100.61.1" && s.port == 90).expect("the service in the kernel");
    assert!(service.backends.is_empty(), "kernel clients fail closed: {:?}", service.backends);
    let said: Vec<String> = diagnostics.iter().map(|d| d.to_string()).collect();
    assert!(
        said.iter()
            .any(|d| d.contains("VirtualService/ns/web") && d.contains("spec.tcp[0].match") && d.contains("fail")),
        "{said:?}"
    );
    // The HTTP port is untouched by the TCP route.
    let http = node.services.iter().find(|s| s.vip == "127.100.61.1" && s.port == 80).expect("port 80");
    assert_eq!(http.backends.len(), 2);
}
