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
        let r = translate_sidecar(&snapshot, "sidecar~127.0.7.250~client.ns~ns.svc.cluster.local", Default::default()).expect("translate");
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

/// Numbers and durations where the edges are: each field of a generated DestinationRule and
/// VirtualService takes one, so every range check (and every missing one) is tried.
/// Numbers where the edges are (of the proto types Istio's fields become and of Envoy's bounds).
const NUMBER_EDGES: [&str; 17] = [
    "-1",
    "0",
    "1",
    "100",
    "101",
    "65537",
    "2147483647",
    "2147483648",
    "4294967295",
    "4294967296",
    "5000011",
    "8388608",
    "8388609",
    "9223372036854775807",
    "18446744073709551615",
    "1.5",
    ".inf",
];
/// Durations where the edges are (protobuf's range, zero, negative, sub-millisecond).
const DURATION_EDGES: [&str; 9] =
    ["0s", "1ms", "0.5s", "1h", "315576000000s", "315576000001s", "99999999999999999s", "-1s", "1ns"];
/// How many numbers and durations [`edges_mesh`] takes.
const NUMBERS: usize = 18;
const DURATIONS: usize = 12;
/// The load balancer forms [`edges_mesh`] tries: three consistent hashes, then slow start with
/// round robin and with least request.
const BALANCERS: usize = 5;

fn edge_number() -> impl Strategy<Value = String> {
    // Mostly a plain value, so that an object is not rejected for another field's edge.
    prop_oneof![24 => Just("3".to_string()), 1 => proptest::sample::select(&NUMBER_EDGES[..]).prop_map(str::to_string)]
}

fn edge_duration() -> impl Strategy<Value = String> {
    prop_oneof![14 => Just("1s".to_string()), 1 => proptest::sample::select(&DURATION_EDGES[..]).prop_map(str::to_string)]
}

fn edge_regex() -> impl Strategy<Value = String> {
    (prop_oneof![Just("[a-z]"), Just("."), Just("\\w"), Just("(a|b)")], 0u32..3000)
        .prop_map(|(atom, n)| format!("/{atom}{{{n}}}"))
}

/// A mesh whose DestinationRule and VirtualService take `n` and `d` in every numeric and
/// duration field (`hash` picks the consistent-hash form).
fn edges_mesh(n: &[String], d: &[String], regex: &str, hash: usize) -> String {
    let mut y = mesh(1, 2, false, "{simple: ROUND_ROBIN}")
        .replace("  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}\n", "");
    let lb = match hash {
        0 => format!("consistentHash: {{httpHeaderName: x, minimumRingSize: {}}}", n[0]),
        1 => format!("consistentHash: {{useSourceIp: true, ringHash: {{minimumRingSize: {}}}}}", n[0]),
        2 => format!("consistentHash: {{httpCookie: {{name: c, ttl: {}}}, maglev: {{tableSize: {}}}}}", d[0], n[0]),
        3 => format!(
            "simple: ROUND_ROBIN, warmup: {{duration: {}, minimumPercent: {}, aggression: {}}}",
            d[9], n[16], n[17]
        ),
        _ => format!("warmup: {{duration: {}, minimumPercent: {}, aggression: {}}}", d[9], n[16], n[17]),
    };
    y += &format!(
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: edges, namespace: ns}}\nspec:\n  host: svc0\n  trafficPolicy:\n    loadBalancer: {{{lb}}}\n    connectionPool:\n      tcp: {{maxConnections: {}, connectTimeout: {}}}\n      http: {{http1MaxPendingRequests: {}, http2MaxRequests: {}, maxRequestsPerConnection: {}, maxRetries: {}, idleTimeout: {}, maxConcurrentStreams: {}, h2UpgradePolicy: UPGRADE, http2KeepAlive: {{interval: {}, timeout: {}}}}}\n    outlierDetection: {{consecutive5xxErrors: {}, consecutiveGatewayErrors: {}, consecutiveLocalOriginFailures: {}, interval: {}, baseEjectionTime: {}, maxEjectionPercent: {}, minHealthPercent: {}}}\n",
        n[1], d[1], n[2], n[3], n[4], n[5], d[2], n[6], d[10], d[11], n[7], n[8], n[9], d[3], d[4], n[10], n[11],
    );
    y += &format!(
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: edges, namespace: ns}}\nspec:\n  hosts: [svc0]\n  http:\n  - match: [{{uri: {{regex: \"{regex}\"}}}}]\n    timeout: {}\n    retries: {{attempts: {}, perTryTimeout: {}}}\n    fault:\n      delay: {{fixedDelay: {}, percentage: {{value: {}}}}}\n      abort: {{httpStatus: {}, percentage: {{value: {}}}}}\n    route: [{{destination: {{host: svc0, subset: v0}}, weight: {}}}, {{destination: {{host: svc0, subset: v1}}, weight: {}}}]\n  - route: [{{destination: {{host: svc0}}}}]\n",
        d[5], n[12], d[6], d[7], n[13], n[14], n[15], n[12], n[13],
    );
    y
}

/// The resources that do not encode, if validation let anything through that cannot.
fn unencodable(y: &str) -> Option<String> {
    let (objects, _) = parse_documents("edges.yaml", y);
    let (snapshot, _) = Snapshot::build(objects);
    let r = translate_sidecar(&snapshot, "sidecar~127.0.7.250~client.ns~ns.svc.cluster.local", Default::default())
        .expect("translate");
    let lists = [
        (LISTENER_TYPE, &r.listeners),
        (ROUTE_TYPE, &r.routes),
        (CLUSTER_TYPE, &r.clusters),
        (ENDPOINT_TYPE, &r.endpoints),
    ];
    lists
        .iter()
        .flat_map(|(t, list)| list.iter().map(move |res| (*t, res)))
        .find_map(|(t, res)| sluice_xds::codec::encode(t, &res.name, &res.body).err().map(|e| format!("{e}")))
}

/// Every numeric and duration field at every edge, one field at a time (the others plain): what
/// validation accepts encodes. A value that validated but could not be encoded once froze every
/// proxy of the mesh.
#[test]
fn validate_accepts_only_what_encodes_field_by_field() {
    let plain_n = vec!["3".to_string(); NUMBERS];
    let plain_d = vec!["1s".to_string(); DURATIONS];
    let mut tried = 0;
    for hash in 0..BALANCERS {
        for i in 0..NUMBERS {
            for edge in NUMBER_EDGES {
                let mut n = plain_n.clone();
                n[i] = edge.to_string();
                let y = edges_mesh(&n, &plain_d, "/[a-z]+", hash);
                if let Some(e) = unencodable(&y) {
                    panic!("number field {i} = {edge}: validation accepted what cannot be encoded: {e}\n{y}");
                }
                tried += 1;
            }
        }
        for i in 0..DURATIONS {
            for edge in DURATION_EDGES {
                let mut d = plain_d.clone();
                d[i] = edge.to_string();
                let y = edges_mesh(&plain_n, &d, "/[a-z]+", hash);
                if let Some(e) = unencodable(&y) {
                    panic!("duration field {i} = {edge}: validation accepted what cannot be encoded: {e}\n{y}");
                }
                tried += 1;
            }
        }
    }
    assert_eq!(tried, BALANCERS * (NUMBERS * NUMBER_EDGES.len() + DURATIONS * DURATION_EDGES.len()));
}

/// How many cases `validate_accepts_only_what_encodes` tries: `SLUICE_FUZZ_CASES` (for long
/// runs by hand), else enough for CI.
fn fuzz_cases() -> u32 {
    std::env::var("SLUICE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: fuzz_cases(), ..ProptestConfig::default() })]

    /// The same invariant for random combinations of edges and regexes of every size.
    #[test]
    fn validate_accepts_only_what_encodes(
        n in proptest::collection::vec(edge_number(), NUMBERS),
        d in proptest::collection::vec(edge_duration(), DURATIONS),
        regex in edge_regex(),
        hash in 0..BALANCERS,
    ) {
        let y = edges_mesh(&n, &d, &regex, hash);
        if let Some(e) = unencodable(&y) {
            prop_assert!(false, "validation accepted what cannot be encoded: {e}\n{y}");
        }
    }
}
