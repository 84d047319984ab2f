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
            translate_sidecar(&snapshot, "sidecar~127.0.61.9~client.ns~ns.svc.cluster.local", Default::default())
                .expect("translate");
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
        let r = translate_sidecar(&snapshot, node, Default::default()).expect("translate");
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

/// VirtualServices exported to some namespaces only: clients in different namespaces get
/// different routes. Each sidecar takes its own; the kernel's node-wide entry cannot, so it
/// fails closed with a warning on `spec.exportTo` — unless every namespace sees the same one.
#[test]
fn a_virtual_service_exported_to_some_namespaces_only_is_per_proxy_in_envoy_and_fails_closed_in_the_kernel() {
    let vs = |ns: &str, export: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web-{ns}, namespace: {ns}}}\nspec:\n  hosts: [web.ns.svc.cluster.local]\n  exportTo: [{export}]\n  tcp:\n  - route: [{{destination: {{host: web.ns.svc.cluster.local, subset: a, port: {{number: 90}}}}}}]\n"
        )
    };
    let other_client = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: other-client, namespace: other}\nspec: {nodeName: n, containers: [{name: c}]}\nstatus: {podIP: 127.0.61.8}\n";
    let build = |extra: &str| {
        let (objects, diagnostics) = parse_documents("mesh.yaml", &format!("{MESH}{other_client}{extra}"));
        assert!(
            diagnostics.iter().all(|d| d.severity != sluice_translator::diagnostic::Severity::Error),
            "{diagnostics:?}"
        );
        Snapshot::build(objects).0
    };
    let tcp_cluster = |snapshot: &Snapshot, node: &str| {
        let r = translate_sidecar(snapshot, node, Default::default()).expect("translate");
        let listener = r.listeners.iter().find(|l| l.name == "127.100.61.1_90").expect("the TCP listener");
        listener.body["filter_chains"][0]["filters"][0]["typed_config"]["cluster"].as_str().map(str::to_string)
    };
    let kernel = |snapshot: &Snapshot| {
        let (node, diagnostics) = translate_node(snapshot, "n");
        let service =
            node.services.iter().find(|s| s.vip == "127.100.61.1" && s.port == 90).expect("the entry").clone();
        (service, diagnostics.iter().map(|d| d.to_string()).collect::<Vec<_>>())
    };
    let ns_client = "sidecar~127.0.61.9~client.ns~ns.svc.cluster.local";
    let other = "sidecar~127.0.61.8~other-client.other~other.svc.cluster.local";

    // Exported only to its own namespace "other": its clients go to subset a, those of ns to
    // the whole service.
    let snapshot = build(&vs("other", "'.'"));
    assert_eq!(tcp_cluster(&snapshot, other).as_deref(), Some("outbound|90|a|web.ns.svc.cluster.local"));
    assert_eq!(tcp_cluster(&snapshot, ns_client).as_deref(), Some("outbound|90||web.ns.svc.cluster.local"));
    let (service, said) = kernel(&snapshot);
    assert!(service.backends.is_empty(), "kernel clients fail closed: {:?}", service.backends);
    assert!(
        said.iter()
            .any(|d| d.contains("VirtualService/other/web-other") && d.contains("spec.exportTo") && d.contains("fail")),
        "{said:?}"
    );

    // Exported everywhere: one route for every client, and the kernel applies it.
    let snapshot = build(&vs("other", "'*'"));
    assert_eq!(tcp_cluster(&snapshot, ns_client).as_deref(), Some("outbound|90|a|web.ns.svc.cluster.local"));
    let (service, said) = kernel(&snapshot);
    let backends: Vec<&str> = service.backends.iter().map(|b| b.address.as_str()).collect();
    assert_eq!(backends, ["127.0.61.1"], "{said:?}");
    assert!(!said.iter().any(|d| d.contains("spec.exportTo")), "{said:?}");
}

/// An HTTP route the kernel cannot apply exactly: the warning names each route and field it
/// cannot apply, and what it applies instead.
#[test]
fn the_kernel_names_the_http_fields_it_cannot_apply_and_what_it_does_instead() {
    let said = |http: &str| {
        let vs = format!(
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: ns}}\nspec:\n  hosts: [web]\n  http:\n{http}"
        );
        let (objects, diagnostics) = parse_documents("mesh.yaml", &format!("{MESH}{vs}"));
        assert!(
            diagnostics.iter().all(|d| d.severity != sluice_translator::diagnostic::Severity::Error),
            "{diagnostics:?}"
        );
        let (node, diagnostics) = translate_node(&Snapshot::build(objects).0, "n");
        let service =
            node.services.iter().find(|s| s.vip == "127.100.61.1" && s.port == 80).expect("the entry").clone();
        let said: Vec<String> =
            diagnostics.iter().map(|d| d.to_string()).filter(|d| d.contains("web.ns.svc.cluster.local:80")).collect();
        (service.backends.iter().map(|b| b.address.clone()).collect::<Vec<_>>(), said)
    };
    let (backends, warnings) = said(
        "  - match: [{headers: {x-canary: {exact: 'yes'}}}]\n    route: [{destination: {host: web, subset: b}}]\n  - fault: {abort: {httpStatus: 503, percentage: {value: 10}}}\n    route: [{destination: {host: web, subset: a}}]\n",
    );
    assert_eq!(backends, ["127.0.61.1"], "the catch-all's split");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let w = &warnings[0];
    assert!(w.contains("spec.http[0] (match)") && w.contains("spec.http[1] (fault)"), "{w}");
    assert!(w.contains("catch-all route spec.http[1]"), "{w}");

    let (backends, warnings) =
        said("  - match: [{uri: {prefix: /v2}}]\n    route: [{destination: {host: web, subset: b}}]\n");
    assert_eq!(backends.len(), 2, "no catch-all: the service's own endpoints");
    assert!(warnings.len() == 1 && warnings[0].contains("the service's own endpoints"), "{warnings:?}");

    // A plain split with retries and a timeout: exact in the kernel, nothing to warn about.
    let (_, warnings) =
        said("  - timeout: 3s\n    retries: {attempts: 2}\n    route: [{destination: {host: web, subset: a}}]\n");
    assert!(warnings.is_empty(), "{warnings:?}");
}

mod differential {
    //! For generated routes — 1 to 4 destinations over subsets, weights present or missing,
    //! HTTP or TCP catch-all — each subset's share of traffic in the sidecar's config equals its
    //! share in the kernel entry (within the kernel's rounding), so the two back ends can no
    //! longer drift apart on a split.

    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use serde_json::Value;
    use sluice_translator::dataplane::translate_node;
    use sluice_translator::envoy::translate_sidecar;
    use sluice_translator::parse::parse_documents;
    use sluice_translator::snapshot::Snapshot;

    /// Four versions, one pod each (`127.0.62.<v+1>`), a subset per version, and a client.
    fn mesh() -> String {
        let mut y = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns}\nspec: {clusterIP: 127.100.62.1, selector: {app: web}, ports: [{name: http, port: 80}, {name: tcp-raw, port: 90}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: ns, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 80}, {name: tcp-raw, port: 90}]\nendpoints:\n".to_string();
        for v in 0..4 {
            y += &format!(
                "- {{addresses: [127.0.62.{}], targetRef: {{kind: Pod, name: web-{v}, namespace: ns}}}}\n",
                v + 1
            );
        }
        for v in 0..4 {
            y += &format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-{v}, namespace: ns, labels: {{app: web, v: v{v}}}}}\nspec: {{nodeName: n, containers: [{{name: c}}]}}\nstatus: {{podIP: 127.0.62.{}}}\n",
                v + 1
            );
        }
        y += "---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: ns, labels: {app: client}}\nspec: {nodeName: n, containers: [{name: c}]}\nstatus: {podIP: 127.0.62.9}\n";
        y += "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web, namespace: ns}\nspec: {host: web, subsets: [{name: v0, labels: {v: v0}}, {name: v1, labels: {v: v1}}, {name: v2, labels: {v: v2}}, {name: v3, labels: {v: v3}}]}\n";
        y
    }

    /// Each subset's share (0..=1) of what the sidecar sends to `port`.
    fn envoy_shares(snapshot: &Snapshot, port: u32, tcp: bool) -> BTreeMap<String, f64> {
        let r = translate_sidecar(snapshot, "sidecar~127.0.62.9~client.ns~ns.svc.cluster.local", Default::default())
            .expect("translate");
        let action: Value = if tcp {
            let l = r.listeners.iter().find(|l| l.name == format!("127.100.62.1_{port}")).expect("listener");
            l.body["filter_chains"][0]["filters"][0]["typed_config"].clone()
        } else {
            let rc = r.routes.iter().find(|rc| rc.name == port.to_string()).expect("route config");
            let vh = rc.body["virtual_hosts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"].as_str().unwrap().starts_with("web.ns"))
                .unwrap()
                .clone();
            vh["routes"][0]["route"].clone()
        };
        let subset = |cluster: &str| cluster.split('|').nth(2).unwrap_or("").to_string();
        let mut shares = BTreeMap::new();
        if let Some(c) = action["cluster"].as_str() {
            shares.insert(subset(c), 1.0);
        } else {
            let clusters = action["weighted_clusters"]["clusters"].as_array().expect("weighted clusters");
            let total: f64 = clusters.iter().map(|c| c["weight"].as_f64().unwrap()).sum();
            for c in clusters {
                *shares.entry(subset(c["name"].as_str().unwrap())).or_default() +=
                    c["weight"].as_f64().unwrap() / total;
            }
        }
        shares
    }

    /// Each subset's share in the kernel entry for `port` (a backend's subset is its pod's version).
    fn kernel_shares(snapshot: &Snapshot, port: u32) -> BTreeMap<String, f64> {
        let (node, _) = translate_node(snapshot, "n");
        let s = node.services.iter().find(|s| s.vip == "127.100.62.1" && s.port == port).expect("entry");
        let total: f64 = s.backends.iter().map(|b| f64::from(b.weight)).sum();
        let mut shares = BTreeMap::new();
        for b in &s.backends {
            let v: usize = b.address.rsplit('.').next().unwrap().parse::<usize>().unwrap() - 1;
            *shares.entry(format!("v{v}")).or_default() += f64::from(b.weight) / total;
        }
        shares
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn envoy_and_the_kernel_split_alike(route in sluice_testkit::weights::route(4), tcp in any::<bool>()) {
            let port = if tcp { 90 } else { 80 };
            let kind = if tcp { "tcp" } else { "http" };
            let destinations: Vec<String> = route
                .iter()
                .map(|(s, w)| {
                    let weight = w.map(|w| format!(", weight: {w}")).unwrap_or_default();
                    format!("{{destination: {{host: web, subset: v{s}, port: {{number: {port}}}}}{weight}}}")
                })
                .collect();
            let vs = format!("---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: ns}}\nspec:\n  hosts: [web]\n  {kind}:\n  - route: [{}]\n", destinations.join(", "));
            let (objects, diagnostics) = parse_documents("mesh.yaml", &format!("{}{vs}", mesh()));
            let errors: Vec<_> = diagnostics.iter().filter(|d| d.severity == sluice_translator::diagnostic::Severity::Error).collect();
            prop_assert!(errors.is_empty(), "the generator made an invalid route: {:?}", errors);
            let (snapshot, _) = Snapshot::build(objects);
            let envoy = envoy_shares(&snapshot, port, tcp);
            let kernel = kernel_shares(&snapshot, port);
            prop_assert_eq!(envoy.keys().collect::<Vec<_>>(), kernel.keys().collect::<Vec<_>>(), "{}", vs);
            for (subset, share) in &envoy {
                prop_assert!((share - kernel[subset]).abs() < 0.01, "{subset}: Envoy {share}, kernel {}\n{vs}", kernel[subset]);
            }
        }
    }
}
