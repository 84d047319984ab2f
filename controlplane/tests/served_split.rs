//! The served path splits alike on both back ends (issue #15). A generated sequence of changes
//! — VirtualServices with HTTP and TCP catch-alls, weights present or missing, header and
//! source-label matches, two VirtualServices for one host (one in another namespace, exported
//! everywhere or to its own namespace only), endpoints coming and going — goes through the
//! snapshot update and the generator's incremental patches, exactly as `sluice serve` serves it.
//! After every step, decoded from the bytes a proxy and an agent receive:
//! - each subset's share of the sidecar's traffic equals its share in the kernel entry, or the
//!   kernel entry is the documented fallback (no backends, with a warning that says so);
//! - the kernel's backends of a subset are the endpoints the sidecar's cluster has;
//! - what was patched equals a full generation of the same config.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier as TcpSpecifier;
use proptest::prelude::*;
use prost::Message;
use sluice_controlplane::generator::{Current, MeshGenerator};
use sluice_translator::dataplane::{
    KernelProtocol, KernelService, KernelWorkload, SERVICE_TYPE, WORKLOAD_TYPE, entry_name, translate_node,
};
use sluice_translator::diagnostic::{ObjectRef, Severity};
use sluice_translator::parse::parse_documents;
use sluice_translator::snapshot::{Change, Snapshot};
use sluice_xds::cache::{ENDPOINT, LISTENER, ROUTE, Snapshot as ProxySnapshot};
use sluice_xds::server::{Generator, NodeInfo};

const VIP: &str = "127.100.63.1";
const CLIENT: &str = "sidecar~127.0.63.9~client.ns~ns.svc.cluster.local";
const AGENT: &str = "agent~n";
const HOST: &str = "web.ns.svc.cluster.local";

/// Service `web` (HTTP 80, TCP 90), four versions with a steady pod `a` each
/// (`127.0.63.1<v>`) and a pod `b` (`127.0.63.2<v>`) whose endpoints come and go, a subset per
/// version, and a client.
fn base() -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: ns}}\nspec: {{clusterIP: {VIP}, selector: {{app: web}}, ports: [{{name: http, port: 80}}, {{name: tcp-raw, port: 90}}]}}\n"
    );
    y += "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web, namespace: ns}\nspec: {host: web, subsets: [{name: v0, labels: {v: v0}}, {name: v1, labels: {v: v1}}, {name: v2, labels: {v: v2}}, {name: v3, labels: {v: v3}}]}\n";
    y += "---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: ns, labels: {app: client}}\nspec: {nodeName: n, containers: [{name: c}]}\nstatus: {podIP: 127.0.63.9}\n";
    for v in 0..4 {
        for (pod, ip) in [("a", 10 + v), ("b", 20 + v)] {
            y += &format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-{v}{pod}, namespace: ns, labels: {{app: web, v: v{v}}}}}\nspec: {{nodeName: n, containers: [{{name: c}}]}}\nstatus: {{podIP: 127.0.63.{ip}}}\n"
            );
        }
    }
    y + &slice("a", 0b1111)
}

/// EndpointSlice `web-<pods>` with the pods `<v><pods>` of the versions in `mask`.
fn slice(pods: &str, mask: u8) -> String {
    let mut y = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-{pods}, namespace: ns, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 80}}, {{name: tcp-raw, port: 90}}]\nendpoints:\n"
    );
    let base = if pods == "a" { 10 } else { 20 };
    let chosen: Vec<u8> = (0..4).filter(|v| mask & (1 << v) != 0).collect();
    if chosen.is_empty() {
        y = y.replace("endpoints:\n", "endpoints: []\n");
    }
    for v in chosen {
        y += &format!(
            "- {{addresses: [127.0.63.{}], targetRef: {{kind: Pod, name: web-{v}{pods}, namespace: ns}}}}\n",
            base + v
        );
    }
    y
}

/// The version of a backend address.
fn version_of(address: &str) -> String {
    let last: u8 = address.rsplit('.').next().and_then(|o| o.parse().ok()).expect("a test address");
    format!("v{}", last % 10)
}

use sluice_testkit::weights::{Route, route};

/// One change.
#[derive(Debug, Clone)]
enum Step {
    /// VirtualService 0 (namespace ns) or 1 (namespace other) for the host, with an HTTP and a
    /// TCP catch-all, each maybe after a matched route (a header; the client's labels), and for
    /// 1 an `exportTo` of everywhere or its own namespace.
    Route {
        which: usize,
        http: Route,
        header_first: Option<usize>,
        tcp: Route,
        source_first: Option<usize>,
        own_only: bool,
    },
    /// A VirtualService removed.
    Unroute(usize),
    /// The `b` pods of the versions in the mask are endpoints; no others are.
    Endpoints(u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0usize..2, route(3), proptest::option::of(0usize..4), route(3), proptest::option::weighted(0.25, 0usize..4), any::<bool>())
            .prop_map(|(which, http, header_first, tcp, source_first, own_only)| Step::Route { which, http, header_first, tcp, source_first, own_only }),
        1 => (0usize..2).prop_map(Step::Unroute),
        2 => (0u8..16).prop_map(Step::Endpoints),
    ]
}

fn destinations(route: &Route, port: u32) -> String {
    let each = route.iter().map(|(s, w)| {
        let weight = w.map(|w| format!(", weight: {w}")).unwrap_or_default();
        format!("{{destination: {{host: {HOST}, subset: v{s}, port: {{number: {port}}}}}{weight}}}")
    });
    each.collect::<Vec<_>>().join(", ")
}

fn vs_ref(which: usize) -> ObjectRef {
    ObjectRef::new("VirtualService", if which == 0 { "ns" } else { "other" }, &format!("web-{which}"))
}

/// The changes one step makes.
fn changes(step: &Step) -> Vec<Change> {
    let yaml = match step {
        Step::Unroute(which) => return vec![Change::Remove(vs_ref(*which))],
        Step::Endpoints(mask) => slice("b", *mask),
        Step::Route { which, http, header_first, tcp, source_first, own_only } => {
            let r = vs_ref(*which);
            let export = if *which == 1 && *own_only { "\n  exportTo: ['.']" } else { "" };
            let mut y = format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {}, namespace: {}}}\nspec:\n  hosts: [{HOST}]{export}\n  http:\n",
                r.name, r.namespace
            );
            if let Some(s) = header_first {
                y += &format!(
                    "  - match: [{{headers: {{x-canary: {{exact: 'yes'}}}}}}]\n    route: [{}]\n",
                    destinations(&vec![(*s, None)], 80)
                );
            }
            y += &format!("  - route: [{}]\n  tcp:\n", destinations(http, 80));
            if let Some(s) = source_first {
                y += &format!(
                    "  - match: [{{sourceLabels: {{app: client}}}}]\n    route: [{}]\n",
                    destinations(&vec![(*s, None)], 90)
                );
            }
            y + &format!("  - route: [{}]\n", destinations(tcp, 90))
        }
    };
    let (objects, diagnostics) = parse_documents("step.yaml", &yaml);
    let errors: Vec<_> = diagnostics.iter().filter(|d| d.severity == Severity::Error).collect();
    assert!(errors.is_empty(), "the generator made invalid input: {errors:?}\n{yaml}");
    objects.into_iter().map(|o| Change::Upsert(Arc::new(o))).collect()
}

fn node(id: &str) -> NodeInfo {
    NodeInfo { id: id.into(), cluster: String::new(), metadata: Default::default() }
}

fn resource<M: Message + Default>(s: &ProxySnapshot, type_url: &str, name: &str) -> Option<M> {
    let encoded = s.of(type_url)?.items.get(name)?;
    Some(M::decode(encoded.bytes.clone()).expect("a resource decodes"))
}

/// Shares by subset of a cluster specifier: one cluster, or weighted clusters.
fn shares<'a>(clusters: impl Iterator<Item = (&'a str, u32)>) -> BTreeMap<String, f64> {
    let clusters: Vec<_> = clusters.collect();
    let total: f64 = clusters.iter().map(|(_, w)| f64::from(*w)).sum();
    let mut out = BTreeMap::new();
    for (name, w) in clusters {
        let subset = name.split('|').nth(2).unwrap_or_default().to_string();
        *out.entry(subset).or_default() += f64::from(w) / total;
    }
    out
}

/// Each subset's share of what the sidecar sends to `port` (the HTTP catch-all route on 80, the
/// TCP proxy on 90).
fn envoy_shares(s: &ProxySnapshot, port: u32) -> BTreeMap<String, f64> {
    if port == 90 {
        let listener: Listener = resource(s, LISTENER, &format!("{VIP}_90")).expect("the TCP listener");
        let filter = &listener.filter_chains[0].filters[0];
        let Some(ConfigType::TypedConfig(any)) = &filter.config_type else { panic!("a typed filter") };
        let tcp = TcpProxy::decode(any.value.as_slice()).expect("tcp_proxy");
        return match tcp.cluster_specifier.expect("a cluster") {
            TcpSpecifier::Cluster(c) => shares(std::iter::once((c.as_str(), 1))),
            TcpSpecifier::WeightedClusters(w) => {
                let list: Vec<(String, u32)> = w.clusters.into_iter().map(|c| (c.name, c.weight)).collect();
                shares(list.iter().map(|(n, w)| (n.as_str(), *w)))
            }
        };
    }
    let config: RouteConfiguration = resource(s, ROUTE, "80").expect("route configuration 80");
    let host = config.virtual_hosts.iter().find(|h| h.domains.iter().any(|d| d == HOST)).expect("the host");
    let catch_all = host
        .routes
        .iter()
        .find(|r| {
            let m = r.r#match.as_ref().expect("a match");
            m.headers.is_empty() && matches!(&m.path_specifier, Some(PathSpecifier::Prefix(p)) if p == "/")
        })
        .expect("a catch-all route");
    let Some(Action::Route(action)) = &catch_all.action else { panic!("a route action") };
    match action.cluster_specifier.clone().expect("a cluster") {
        ClusterSpecifier::Cluster(c) => shares(std::iter::once((c.as_str(), 1))),
        ClusterSpecifier::WeightedClusters(w) => {
            let list: Vec<(String, u32)> =
                w.clusters.into_iter().map(|c| (c.name, c.weight.map_or(0, |w| w.value))).collect();
            shares(list.iter().map(|(n, w)| (n.as_str(), *w)))
        }
        other => panic!("unexpected cluster specifier {other:?}"),
    }
}

/// The kernel entry of `port`.
fn kernel_entry(s: &ProxySnapshot, port: u32) -> KernelService {
    let name = entry_name(VIP, port, KernelProtocol::Tcp);
    resource(s, SERVICE_TYPE, &name).expect("the kernel entry")
}

/// The addresses of the endpoints of the sidecar's cluster for `subset` on `port`.
fn cluster_endpoints(s: &ProxySnapshot, port: u32, subset: &str) -> BTreeSet<String> {
    let name = format!("outbound|{port}|{subset}|{HOST}");
    let Some(assignment) = resource::<ClusterLoadAssignment>(s, ENDPOINT, &name) else { return BTreeSet::new() };
    let endpoints = assignment.endpoints.iter().flat_map(|l| &l.lb_endpoints);
    endpoints
        .filter_map(|e| match &e.host_identifier {
            Some(envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(ep)) => {
                let address = ep.address.as_ref()?.address.as_ref()?;
                match address {
                    envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(a) => {
                        Some(a.address.clone())
                    }
                    _ => None,
                }
            }
            _ => None,
        })
        .collect()
}

/// Names and encodings per type (shared interner: equal resources are the same encoding).
fn contents(s: &ProxySnapshot) -> Vec<(String, String, bytes::Bytes)> {
    let each =
        s.types.iter().flat_map(|(t, r)| r.items.iter().map(move |(n, e)| (t.clone(), n.to_string(), e.bytes.clone())));
    each.collect()
}

/// Checks one served state; `snapshot` is the config it was generated from.
fn check(
    snapshot: &Snapshot,
    sidecar: &ProxySnapshot,
    agent: &ProxySnapshot,
    steps: &[Step],
) -> Result<(), TestCaseError> {
    for port in [80, 90] {
        let envoy = envoy_shares(sidecar, port);
        let entry = kernel_entry(agent, port);
        if entry.backends.is_empty() {
            // The documented fallback: kernel clients fail closed, and a warning says so.
            let (_, diagnostics) = translate_node(snapshot, "n");
            let said = diagnostics.iter().map(|d| d.to_string()).collect::<Vec<_>>();
            let warned = said.iter().any(|d| d.contains(&format!("{HOST}:{port}")) && d.contains("fail"));
            prop_assert!(
                warned,
                "port {port}: no kernel backends and no warning; Envoy {envoy:?}\n{said:?}\n{steps:?}"
            );
            continue;
        }
        let total: f64 = entry.backends.iter().map(|b| f64::from(b.weight)).sum();
        let mut kernel: BTreeMap<String, f64> = BTreeMap::new();
        let mut addresses: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for b in &entry.backends {
            *kernel.entry(version_of(&b.address)).or_default() += f64::from(b.weight) / total;
            addresses.entry(version_of(&b.address)).or_default().insert(b.address.clone());
        }
        // A subset of the whole service (no VirtualService): the sidecar's cluster has no subset.
        let envoy = if envoy.keys().eq([""].iter()) {
            let all = cluster_endpoints(sidecar, port, "");
            let n = all.len() as f64;
            let mut by_version: BTreeMap<String, f64> = BTreeMap::new();
            for a in &all {
                *by_version.entry(version_of(a)).or_default() += 1.0 / n;
            }
            prop_assert_eq!(
                all,
                addresses.values().flatten().cloned().collect::<BTreeSet<_>>(),
                "port {}: {:?}",
                port,
                steps
            );
            by_version
        } else {
            for (subset, got) in &addresses {
                let want = cluster_endpoints(sidecar, port, subset);
                prop_assert_eq!(
                    got,
                    &want,
                    "port {} subset {}: kernel backends vs Envoy endpoints\n{:?}",
                    port,
                    subset,
                    steps
                );
            }
            // Envoy splits a subset evenly over its endpoints; the kernel's per-endpoint weights
            // add up to the subset's share. (Every subset keeps its pod `a`: none is empty.)
            envoy
        };
        prop_assert_eq!(
            envoy.keys().collect::<Vec<_>>(),
            kernel.keys().collect::<Vec<_>>(),
            "port {}\n{:?}",
            port,
            steps
        );
        for (subset, share) in &envoy {
            prop_assert!(
                (share - kernel[subset]).abs() < 0.01,
                "port {port} {subset}: Envoy {share}, kernel {}\n{steps:?}",
                kernel[subset]
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn the_served_sidecar_and_agent_split_alike_and_patches_equal_a_full_generation(steps in proptest::collection::vec(step(), 1..6)) {
        let (objects, diagnostics) = parse_documents("base.yaml", &base());
        prop_assert!(diagnostics.iter().all(|d| d.severity != Severity::Error), "{:?}", diagnostics);
        let (mut snapshot, _) = Snapshot::build(objects);
        let generator = MeshGenerator::new(Current { version: 1, snapshot: snapshot.clone() });
        let mut sidecar = generator.generate(&node(CLIENT), None).unwrap();
        let mut agent = generator.generate(&node(AGENT), None).unwrap();
        check(&snapshot, &sidecar, &agent, &[])?;
        for (i, step) in steps.iter().enumerate() {
            let version = i as u64 + 2;
            let delta = snapshot.apply(changes(step));
            generator.set(Current { version, snapshot: snapshot.clone() }, delta);
            sidecar = generator.generate(&node(CLIENT), Some(&sidecar)).unwrap();
            agent = generator.generate(&node(AGENT), Some(&agent)).unwrap();
            check(&snapshot, &sidecar, &agent, &steps[..=i])?;
            // Incremental = full: a generator that never saw the earlier versions, sharing the
            // encodings.
            let fresh = MeshGenerator::with_interner(Current { version, snapshot: snapshot.clone() }, generator.interner());
            prop_assert_eq!(contents(&sidecar), contents(&fresh.generate(&node(CLIENT), None).unwrap()), "sidecar after {:?}", &steps[..=i]);
            let decoded = |s: &ProxySnapshot| {
                let services = s.of(SERVICE_TYPE).map(|t| t.items.values().map(|e| KernelService::decode(e.bytes.clone()).unwrap()).collect::<Vec<_>>());
                let workloads = s.of(WORKLOAD_TYPE).map(|t| t.items.values().map(|e| KernelWorkload::decode(e.bytes.clone()).unwrap()).collect::<Vec<_>>());
                (services, workloads, contents(s).into_iter().map(|(t, n, _)| (t, n)).collect::<Vec<_>>())
            };
            prop_assert_eq!(decoded(&agent), decoded(&fresh.generate(&node(AGENT), None).unwrap()), "agent after {:?}", &steps[..=i]);
        }
    }
}
