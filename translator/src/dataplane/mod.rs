//! Translation for the kernel fast path: the services a node's agent balances at connect() and
//! the workloads it knows, flattened — never Envoy's tree. VirtualService weights over
//! DestinationRule subsets become weighted backend sets; the agent turns weights into slots.

pub mod authorization;
pub mod patch;

use std::collections::BTreeMap;

pub use sluice_dataplane_api::{
    AGENT_NODE_PREFIX, KernelAuthorization, KernelRule, KernelService, KernelWorkload, Mode, NodeDataplane,
    Protocol as KernelProtocol, SERVICE_TYPE, WORKLOAD_TYPE, WeightedBackend, entry_name, gcd,
};

use crate::diagnostic::{Diagnostic, ObjectRef, Severity};
use crate::model::IstioObject;
use crate::model::common::{Protocol, labels_match};
use crate::model::virtual_service::{Client, Destination, VirtualServiceSpec, live_destinations};
use crate::snapshot::{
    MeshService, PortRouting, ServicePort, ServiceResolution, Snapshot, Workload, host_matches, resolve_host,
};

type VirtualServiceObject = IstioObject<VirtualServiceSpec>;

fn kernel_protocol(port: &ServicePort) -> KernelProtocol {
    if port.protocol == Protocol::Udp { KernelProtocol::Udp } else { KernelProtocol::Tcp }
}

/// The (VIP, port) pairs of `service` the kernel balances, as `(vip, port)`.
fn balanced(service: &MeshService) -> impl Iterator<Item = (&str, &ServicePort)> {
    let eds = service.resolution == ServiceResolution::Eds;
    service.ports.iter().filter(move |_| eds).flat_map(move |port| {
        service.addresses.iter().filter(|a| a.parse::<std::net::IpAddr>().is_ok()).map(move |vip| (vip.as_str(), port))
    })
}

/// The resource names of the kernel entries `service` has (whatever it routes to).
pub fn kernel_service_names(service: &MeshService) -> Vec<String> {
    balanced(service).map(|(vip, port)| entry_name(vip, port.port, kernel_protocol(port))).collect()
}

/// The kernel entries of one service: one per VIP and port (before the node-wide rule that
/// the first service by host keeps a (VIP, port) two services claim).
pub fn kernel_services(
    snapshot: &Snapshot,
    service: &MeshService,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<KernelService> {
    balanced(service).map(|(vip, port)| kernel_service(snapshot, service, port, vip, diagnostics)).collect()
}

/// The kernel entry of one workload for the agent of `node`.
pub fn kernel_workload(
    snapshot: &Snapshot,
    w: &Workload,
    node: &str,
    clients: &authorization::KernelClients<'_>,
    diagnostics: &mut Vec<Diagnostic>,
) -> KernelWorkload {
    let mode = mode(snapshot, &w.namespace, &w.labels);
    let mut authorization = match mode {
        Mode::Kernel => {
            authorization::workload_authorization(snapshot, &w.namespace, &w.labels, w.ip.as_deref(), diagnostics)
        }
        Mode::Sidecar | Mode::Node => None,
    };
    // The kernel path has no mTLS (until HBONE): its callers' plaintext to a STRICT port would
    // fail at the TLS layer, or, at a kernel-mode workload, be taken against its policy.
    if let Some(deny) = authorization::strict_mtls_rule(snapshot, w, mode, clients, diagnostics) {
        let auth = authorization.get_or_insert_with(Default::default);
        auth.rules.insert(0, deny);
    }
    KernelWorkload {
        namespace: w.namespace.clone(),
        name: w.name.clone(),
        ip: w.ip.clone(),
        service_account: w.service_account.clone(),
        mode: mode as i32,
        local: w.node.as_deref().is_none_or(|n| n == node),
        authorization,
        pod_uid: w.pod_uid.clone(),
    }
}

/// The data-plane mode of a workload: its own `sluice.io/dataplane` label, else its
/// namespace's, else `kernel`.
/// (Validation refuses any other label value.)
fn mode(snapshot: &Snapshot, namespace: &str, labels: &BTreeMap<String, String>) -> Mode {
    labels
        .get(crate::DATAPLANE_LABEL)
        .or_else(|| snapshot.namespaces.get(namespace).and_then(|l| l.get(crate::DATAPLANE_LABEL)))
        .and_then(|m| Mode::from_name(m))
        .unwrap_or(Mode::Kernel)
}

/// Translates the snapshot for the agent of `node`. Every workload is sent (identities of remote
/// sources, policies of remote destinations); `local` marks those on this node (objects
/// without a node name belong to every node, as on a one-machine mesh).
pub fn translate_node(snapshot: &Snapshot, node: &str) -> (NodeDataplane, Vec<Diagnostic>) {
    let mut diagnostics = Vec::new();
    let mut services = Vec::new();
    for service in snapshot.services.values() {
        services.extend(kernel_services(snapshot, service, &mut diagnostics));
    }
    services.sort_by(|a, b| (&a.vip, a.port, &a.protocol).cmp(&(&b.vip, b.port, &b.protocol)));
    services.dedup_by(|a, b| (&a.vip, a.port, &a.protocol) == (&b.vip, b.port, &b.protocol));
    let clients = authorization::KernelClients::new(snapshot);
    let workloads =
        snapshot.workloads.values().map(|w| kernel_workload(snapshot, w, node, &clients, &mut diagnostics)).collect();
    diagnostics.sort();
    diagnostics.dedup();
    (NodeDataplane { services, workloads }, diagnostics)
}

/// Endpoints of `service` selected by a destination's subset.
fn subset_endpoints(
    snapshot: &Snapshot,
    service: &MeshService,
    subset: Option<&str>,
) -> Option<BTreeMap<String, String>> {
    let Some(name) = subset else { return Some(BTreeMap::new()) };
    snapshot
        .destination_rules_for_host(&service.hostname)
        .filter(|dr| host_matches(&resolve_host(&dr.spec.host, &dr.meta.namespace), &service.hostname))
        .flat_map(|dr| dr.spec.subsets.iter())
        .find(|s| s.name == name)
        .map(|s| s.labels.clone())
}

/// The namespaces whose clients may see different VirtualServices for `service`: `""` stands
/// for every namespace no `exportTo` names, then each namespace a VirtualService for the host
/// is exported to by name or by `.`.
fn client_views(snapshot: &Snapshot, service: &MeshService) -> Vec<String> {
    let mut views = vec![String::new()];
    for vs in snapshot.virtual_services_for_host(&service.hostname) {
        for e in &vs.spec.export_to {
            let named = match e.as_str() {
                "*" => continue,
                "." => &vs.meta.namespace,
                other => other,
            };
            if !views.iter().any(|v| v == named) {
                views.push(named.to_string());
            }
        }
    }
    views
}

/// The destinations and weights the kernel applies, None when no VirtualService routes the
/// port (the service's own endpoints then): the TCP route for the port, decided as a proxy
/// decides it ([`tcp_route`], the first VirtualService with TCP routes, as the sidecar's
/// `tcp_proxy`), else the first HTTP route without match conditions; what it cannot apply is
/// reported. One entry serves every client on the node, so a route that depends on the client
/// cannot be one entry: a TCP match on source labels or namespace, or VirtualServices exported
/// to some namespaces only so that clients in different namespaces get different routes. Kernel
/// clients' connects to the port then fail (no backends), with a warning, rather than take a
/// route that is not theirs.
fn routed_destinations(
    snapshot: &Snapshot,
    service: &MeshService,
    service_port: &ServicePort,
    diagnostics: &mut Vec<Diagnostic>,
) -> (Option<Vec<(Destination, u32)>>, bool) {
    let port = service_port.port;
    let object = |vs: &VirtualServiceObject| ObjectRef::new("VirtualService", &vs.meta.namespace, &vs.meta.name);
    let fail_closed = |vs: &VirtualServiceObject, path: String, why: &str| Diagnostic {
        severity: Severity::Warning,
        origin: vs.origin.clone(),
        object: Some(object(vs)),
        path,
        code: None,
        message: format!(
            "the route for {}:{port} depends on the client ({why}), which one node-wide kernel entry cannot tell \
             apart: kernel-mode clients' connections to it fail; give those clients a sidecar or the node proxy",
            service.hostname
        ),
    };
    // TCP routes apply to the ports a sidecar gives a tcp_proxy; HTTP ports are routed by `http`.
    let tcp = !service_port.protocol.is_http();
    let chosen = |namespace: &str| {
        let routing = snapshot.port_routing(service, namespace);
        PortRouting { tcp: routing.tcp.filter(|_| tcp), ..routing }
    };
    let views = client_views(snapshot, service);
    let everyone = chosen(&views[0]);
    if let Some(other) = views[1..].iter().map(|ns| chosen(ns)).find(|c| !c.same_as(&everyone)) {
        let candidates = [other.tcp, other.http, everyone.tcp, everyone.http];
        let restricted = candidates.iter().flatten().find(|vs| !vs.spec.export_to.is_empty());
        if let Some(vs) = restricted.or(candidates.iter().flatten().next()) {
            diagnostics.push(fail_closed(
                vs,
                "spec.exportTo".into(),
                "VirtualServices exported to some namespaces only",
            ));
        }
        return (Some(Vec::new()), false);
    }
    match everyone.tcp_route(service, port, Client::Unknown) {
        Ok(Some((vs, tcp))) => {
            let resolve =
                |d: &Destination| Destination { host: resolve_host(&d.host, &vs.meta.namespace), ..d.clone() };
            let live = live_destinations(&tcp.route).into_iter().map(|(d, w)| (resolve(&d.destination), w));
            return (Some(live.collect()), false);
        }
        Ok(None) => {}
        Err((vs, i)) => {
            diagnostics.push(fail_closed(vs, format!("spec.tcp[{i}].match"), "sourceLabels or sourceNamespace"));
            return (Some(Vec::new()), false);
        }
    }
    let Some((vs, http)) = everyone.http_routes() else { return (None, false) };
    let resolve = |d: &Destination| Destination { host: resolve_host(&d.host, &vs.meta.namespace), ..d.clone() };
    let needs_l7 = !http.is_empty();
    let catch_all = http.iter().position(|r| r.is_catch_all());
    // What the kernel cannot apply, route by route; retries and timeouts (which only a proxy
    // can apply) are not worth a warning when the split itself is exact.
    let lacking: Vec<String> = http
        .iter()
        .enumerate()
        .take(catch_all.map_or(usize::MAX, |i| i + 1))
        .filter_map(|(i, r)| {
            let fields: Vec<&str> =
                r.beyond_split().into_iter().filter(|f| !matches!(*f, "timeout" | "retries")).collect();
            (!fields.is_empty()).then(|| format!("spec.http[{i}] ({})", fields.join(", ")))
        })
        .collect();
    if !lacking.is_empty() {
        let instead = match catch_all {
            Some(i) => format!("the weights of the catch-all route spec.http[{i}]"),
            None => "the service's own endpoints (no route is a catch-all)".to_string(),
        };
        diagnostics.push(Diagnostic {
            severity: Severity::Warning,
            origin: vs.origin.clone(),
            object: Some(object(vs)),
            path: "spec.http".into(),
            code: None,
            message: format!(
                "kernel-mode clients of {}:{port} cannot get {}: the kernel applies {instead} to every connection; \
                 give those clients a sidecar or the node proxy",
                service.hostname,
                lacking.join(", ")
            ),
        });
    }
    let destinations = catch_all
        .map(|i| &http[i])
        .map(|r| live_destinations(&r.route).into_iter().map(|(d, w)| (resolve(&d.destination), w)).collect());
    (destinations, needs_l7)
}

fn kernel_service(
    snapshot: &Snapshot,
    service: &MeshService,
    port: &ServicePort,
    vip: &str,
    diagnostics: &mut Vec<Diagnostic>,
) -> KernelService {
    let (routed, needs_l7) = routed_destinations(snapshot, service, port, diagnostics);
    let destinations =
        routed.unwrap_or_else(|| vec![(Destination { host: service.hostname.clone(), ..Default::default() }, 100)]);
    let mut backends: BTreeMap<(String, u32), u32> = BTreeMap::new();
    for (dest, weight) in destinations.iter().filter(|(_, w)| *w > 0) {
        let Some(target) = snapshot.services.get(&dest.host) else { continue };
        let target_port = dest.port.map(|p| p.number).unwrap_or(port.port);
        let Some(tport) = target.port(target_port) else { continue };
        let Some(selector) = subset_endpoints(snapshot, target, dest.subset.as_deref()) else { continue };
        let endpoints: Vec<_> = target
            .endpoints
            .iter()
            .filter(|e| e.ready && labels_match(&selector, &e.labels) && e.address.parse::<std::net::IpAddr>().is_ok())
            .collect();
        let total: u32 = endpoints.iter().map(|e| e.weight.unwrap_or(1).max(1)).sum();
        for e in endpoints {
            // The destination's share, split over its endpoints by their own weights.
            let share = (u64::from(*weight) * 1000 * u64::from(e.weight.unwrap_or(1).max(1)) / u64::from(total.max(1)))
                .max(1) as u32;
            *backends.entry((e.address.clone(), target.endpoint_port(tport, e))).or_default() += share;
        }
    }
    let divisor = backends.values().map(|w| u64::from(*w)).fold(0, gcd) as u32;
    KernelService {
        name: format!("{}:{}", service.hostname, port.port),
        vip: vip.to_string(),
        port: port.port,
        protocol: kernel_protocol(port) as i32,
        backends: backends
            .into_iter()
            .map(|((address, port), w)| WeightedBackend { address, port, weight: w / divisor.max(1) })
            .collect(),
        needs_l7,
    }
}
