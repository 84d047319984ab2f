//! Property: for random meshes and VirtualServices, translation never fails, every resource fits
//! Envoy's API, and weighted routes keep the configured split.

use proptest::prelude::*;
use sluice_translator::diagnostic::Severity;
use sluice_translator::envoy::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, translate_sidecar};
use sluice_translator::parse::parse_documents;
use sluice_translator::snapshot::Snapshot;

/// Splits 100 into `n` positive weights.
fn weights(n: usize) -> impl Strategy<Value = Vec<i64>> {
    proptest::collection::vec(1i64..50, n)
        .prop_map(|raw| {
            let total: i64 = raw.iter().sum();
            let mut w: Vec<i64> = raw.iter().map(|r| (r * 100 / total).max(1)).collect();
            let diff = 100 - w.iter().sum::<i64>();
            w[0] += diff;
            w
        })
        .prop_filter("positive", |w| w.iter().all(|x| *x > 0))
}

fn mesh(services: usize, versions: usize, tcp: bool, lb: &str) -> String {
    let mut y = String::new();
    for s in 0..services {
        let proto = if tcp && s % 2 == 1 { "tcp" } else { "http" };
        y += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc{s}, namespace: ns}}\nspec:\n  clusterIP: 127.100.7.{}\n  ports: [{{name: {proto}, port: {}}}]\n",
            s + 1,
            8000 + s
        );
        let mut eps = String::new();
        for v in 0..versions {
            let ip = format!("127.0.7.{}", s * 10 + v + 1);
            eps += &format!("  - addresses: [{ip}]\n    targetRef: {{kind: Pod, name: svc{s}-v{v}}}\n");
            y += &format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: svc{s}-v{v}, namespace: ns, labels: {{app: svc{s}, version: v{v}}}}}\nspec: {{containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}}}\n"
            );
        }
        y += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc{s}, namespace: ns, labels: {{kubernetes.io/service-name: svc{s}}}}}\naddressType: IPv4\nports: [{{name: {proto}, port: {}}}]\nendpoints:\n{eps}",
            9000 + s
        );
        let subsets: String =
            (0..versions).map(|v| format!("  - {{name: v{v}, labels: {{version: v{v}}}}}\n")).collect();
        y += &format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: svc{s}, namespace: ns}}\nspec:\n  host: svc{s}\n  trafficPolicy: {{loadBalancer: {lb}}}\n  subsets:\n{subsets}"
        );
    }
    y += "---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: ns}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 127.0.7.250}\n";
    y
}

fn lb() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("{simple: ROUND_ROBIN}".to_string()),
        Just("{simple: LEAST_REQUEST}".to_string()),
        Just("{simple: RANDOM}".to_string()),
        Just("{consistentHash: {httpHeaderName: x-user}}".to_string()),
        Just("{consistentHash: {useSourceIp: true, maglev: {tableSize: 65537}}}".to_string()),
        Just("{consistentHash: {httpCookie: {name: c, ttl: 10s}}}".to_string()),
    ]
}

fn uri() -> impl Strategy<Value = String> {
    prop_oneof![
        "/[a-z]{1,8}".prop_map(|p| format!("{{prefix: {p}}}")),
        "/[a-z]{1,8}".prop_map(|p| format!("{{exact: {p}}}")),
        "[a-z]{1,5}".prop_map(|p| format!("{{regex: \"/{p}/[0-9]+\"}}")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn translation_fits_envoy_and_keeps_weights(
        services in 1usize..4,
        versions in 2usize..4,
        tcp in any::<bool>(),
        lb in lb(),
        split in weights(2),
        uri in uri(),
        timeout_ms in 1u64..5000,
    ) {
        let mut y = mesh(services, versions, tcp, &lb);
        // Weighted HTTP route on svc0 (always HTTP), with a match in front.
        y += &format!(
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs, namespace: ns}}\nspec:\n  hosts: [svc0]\n  http:\n  - match: [{{uri: {uri}}}]\n    route: [{{destination: {{host: svc0, subset: v1}}}}]\n    timeout: {timeout_ms}ms\n  - route:\n    - {{destination: {{host: svc0, subset: v0}}, weight: {}}}\n    - {{destination: {{host: svc0, subset: v1}}, weight: {}}}\n",
            split[0], split[1]
        );
        let (objects, diags) = parse_documents("gen.yaml", &y);
        let errors: Vec<_> = diags.iter().filter(|d| d.severity == Severity::Error).map(ToString::to_string).collect();
        prop_assert!(errors.is_empty(), "{errors:?}\n{y}");
        let (snapshot, _) = Snapshot::build(objects);
        let r = translate_sidecar(&snapshot, "sidecar~127.0.7.250~client.ns~ns.svc.cluster.local").expect("translate");
        for (type_url, list) in [(LISTENER_TYPE, &r.listeners), (ROUTE_TYPE, &r.routes), (CLUSTER_TYPE, &r.clusters), (ENDPOINT_TYPE, &r.endpoints)] {
            for res in list {
                if let Err(e) = sluice_xds::codec::encode(type_url, &res.name, &res.body) {
                    prop_assert!(false, "{e}");
                }
            }
        }
        let route = r.routes.iter().find(|x| x.name == "8000").expect("route config for svc0");
        let vh = route.body["virtual_hosts"].as_array().unwrap().iter().find(|v| v["name"] == "svc0.ns.svc.cluster.local:8000").expect("vhost");
        let weighted = &vh["routes"][1]["route"]["weighted_clusters"]["clusters"];
        prop_assert_eq!(weighted[0]["weight"].as_i64(), Some(split[0]));
        prop_assert_eq!(weighted[1]["weight"].as_i64(), Some(split[1]));
        // Every cluster a route names exists.
        let names: std::collections::BTreeSet<_> = r.clusters.iter().map(|c| c.name.as_str()).collect();
        for c in weighted.as_array().unwrap() {
            prop_assert!(names.contains(c["name"].as_str().unwrap()));
        }
        // Every EDS cluster has its load assignment.
        for c in r.clusters.iter().filter(|c| c.body["type"] == "EDS") {
            prop_assert!(r.endpoints.iter().any(|e| e.name == c.name), "no EDS for {}", c.name);
        }
    }
}
