//! The validated snapshot: every accepted object, plus the service registry built from Services,
//! EndpointSlices, Pods, ServiceEntries and WorkloadEntries. Cross-object problems are reported
//! here, as warnings (Istio's analyzers), never rejections — except duplicates.

mod analysis;
mod mtls;
mod registry;
mod small_set;
mod update;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use imbl::{HashMap, OrdMap};
use small_set::SmallSet;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::diagnostic::{Diagnostic, ObjectRef, Severity};
use crate::model::authorization_policy::{AuthorizationPolicySpec, PeerAuthenticationSpec};
use crate::model::common::{LabelSelector, Protocol, labels_match};
use crate::model::destination_rule::DestinationRuleSpec;
use crate::model::request_authentication::RequestAuthenticationSpec;
use crate::model::service_entry::{Location, Resolution, ServiceEntrySpec, WorkloadEntrySpec};
use crate::model::sidecar::SidecarSpec;
use crate::model::virtual_service::{Client, HttpRoute, TcpRoute, VirtualServiceSpec};
use crate::model::{IstioObject, Loaded};

pub use self::mtls::{ModeFrom, WorkloadMtls};
pub use self::update::{Change, ServiceChange, SnapshotDelta};

/// The DNS suffix of Kubernetes service hosts.
pub const DOMAIN_SUFFIX: &str = "cluster.local";

/// The Istio root namespace: mesh-wide Sidecars and policies live here.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// How a service's endpoints are found by the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceResolution {
    /// Endpoints delivered by EDS.
    Eds,
    /// Endpoints are host names Envoy resolves (STRICT_DNS).
    Dns,
    /// One host name resolved at a time (LOGICAL_DNS).
    DnsRoundRobin,
    /// Forward to the original destination.
    Passthrough,
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Port name.
    pub name: String,
    /// Service port number.
    pub port: u32,
    /// Endpoint port: a number, or a named container port.
    pub target: Option<IntOrString>,
    /// Protocol.
    pub protocol: Protocol,
}

/// One endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// IP address or host name.
    pub address: String,
    /// Port name → endpoint port.
    pub ports: BTreeMap<String, u32>,
    /// Labels (from the Pod or WorkloadEntry).
    pub labels: BTreeMap<String, String>,
    /// `region/zone/subzone`, as far as known.
    pub locality: Option<String>,
    /// Load balancing weight.
    pub weight: Option<u32>,
    /// Ready to receive traffic.
    pub ready: bool,
    /// Service account of the workload behind it.
    pub service_account: Option<String>,
}

/// The workload label that says it holds a mesh certificate and accepts mTLS (Istio's sidecar
/// injector sets it; sluice reads it as istiod does).
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

impl Endpoint {
    /// True when the workload behind it accepts Istio mTLS (label `security.istio.io/tlsMode:
    /// istio`).
    pub fn accepts_mesh_tls(&self) -> bool {
        self.labels.get(TLS_MODE_LABEL).is_some_and(|m| m == "istio")
    }

    /// A ready endpoint at `address` that nothing more is known of.
    pub fn at(address: String) -> Self {
        Self {
            address,
            ports: BTreeMap::new(),
            labels: BTreeMap::new(),
            locality: None,
            weight: None,
            ready: true,
            service_account: None,
        }
    }
}

/// A service as the mesh sees it (Kubernetes Service or ServiceEntry host).
#[derive(Debug, Clone, PartialEq)]
pub struct MeshService {
    /// FQDN.
    pub hostname: String,
    /// Namespace of the defining object.
    pub namespace: String,
    /// Virtual IPs.
    pub addresses: Vec<String>,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// Endpoint discovery.
    pub resolution: ServiceResolution,
    /// Endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Outside the mesh (ServiceEntry MESH_EXTERNAL).
    pub mesh_external: bool,
    /// `exportTo` (empty = everywhere).
    pub export_to: Vec<String>,
    /// The defining object.
    pub source: ObjectRef,
    /// The file it came from.
    pub origin: String,
}

impl MeshService {
    /// The endpoint port serving service port `port` on `endpoint`.
    pub fn endpoint_port(&self, port: &ServicePort, endpoint: &Endpoint) -> u32 {
        if let Some(p) = endpoint.ports.get(&port.name) {
            return *p;
        }
        match &port.target {
            Some(IntOrString::Int(n)) if *n > 0 => *n as u32,
            _ => port.port,
        }
    }

    /// The service accounts of its endpoints, sorted, without repeats: the identities a client
    /// accepts from the service's servers.
    pub fn service_accounts(&self) -> Vec<&str> {
        let mut accounts: Vec<&str> = self.endpoints.iter().filter_map(|e| e.service_account.as_deref()).collect();
        accounts.sort_unstable();
        accounts.dedup();
        accounts
    }

    /// The port with this number.
    pub fn port(&self, number: u32) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == number)
    }

    /// True when a proxy in `namespace` may see this service.
    pub fn visible_to(&self, namespace: &str) -> bool {
        exported_to(&self.export_to, &self.namespace, namespace)
    }
}

/// Istio's `exportTo` rule.
pub fn exported_to(export_to: &[String], own: &str, namespace: &str) -> bool {
    export_to.is_empty() || export_to.iter().any(|e| e == "*" || (e == "." && own == namespace) || e == namespace)
}

/// The TCP route a connection takes and its VirtualService; Err: a VirtualService and the index
/// of a route whose match depends on the client.
pub type TcpChoice<'a> =
    Result<Option<(&'a IstioObject<VirtualServiceSpec>, &'a TcpRoute)>, (&'a IstioObject<VirtualServiceSpec>, usize)>;

/// The VirtualServices that route one service for some clients ([`Snapshot::port_routing`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct PortRouting<'a> {
    /// The first with TCP routes.
    pub tcp: Option<&'a IstioObject<VirtualServiceSpec>>,
    /// The first of all.
    pub http: Option<&'a IstioObject<VirtualServiceSpec>>,
}

impl<'a> PortRouting<'a> {
    /// The TCP route a connection to `port` of `service` takes from `client`, with the
    /// VirtualService it is in ([`tcp_route`]'s rules). Err: the VirtualService and the index of
    /// a route whose match depends on a client `client` does not describe.
    pub fn tcp_route(&self, service: &MeshService, port: u32, client: Client<'_>) -> TcpChoice<'a> {
        let Some(vs) = self.tcp else { return Ok(None) };
        crate::model::virtual_service::tcp_route(&vs.spec.tcp, port, &service.addresses, client)
            .map(|r| r.map(|r| (vs, r)))
            .map_err(|i| (vs, i))
    }

    /// The HTTP routes that apply, in order, with their VirtualService.
    pub fn http_routes(&self) -> Option<(&'a IstioObject<VirtualServiceSpec>, &'a [HttpRoute])> {
        self.http.map(|vs| (vs, vs.spec.http.as_slice()))
    }

    /// True when both are the very same objects as `other`'s.
    pub fn same_as(&self, other: &PortRouting<'_>) -> bool {
        let same =
            |x: Option<&IstioObject<VirtualServiceSpec>>, y: Option<&IstioObject<VirtualServiceSpec>>| match (x, y) {
                (Some(x), Some(y)) => std::ptr::eq(x, y),
                (x, y) => x.is_none() && y.is_none(),
            };
        same(self.tcp, other.tcp) && same(self.http, other.http)
    }
}

/// A workload: a Pod or a WorkloadEntry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// IP address.
    pub ip: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// Service account.
    pub service_account: String,
    /// `region/zone/subzone`.
    pub locality: Option<String>,
    /// Named container ports → numbers (resolves named targetPorts).
    pub named_ports: BTreeMap<String, u32>,
    /// The node it runs on (`spec.nodeName`), when known.
    pub node: Option<String>,
    /// A Pod's UID (`metadata.uid`): the node agent finds a pod's processes by it.
    pub pod_uid: Option<String>,
}
/// Accepted Istio objects of one kind, by reference (namespace/name order within the kind).
pub type Objects<S> = OrdMap<ObjectRef, Arc<IstioObject<S>>>;

/// Everything accepted, indexed for translation. Cloning is cheap (the maps share structure),
/// so a new config version is the previous snapshot with [`Snapshot::apply`]'s changes.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Services by FQDN (a host defined twice keeps its first definition: Services before
    /// ServiceEntries, then by namespace/name).
    pub services: OrdMap<String, Arc<MeshService>>,
    /// Workloads by (namespace, name).
    pub workloads: OrdMap<(String, String), Arc<Workload>>,
    /// Namespace labels by name.
    pub namespaces: OrdMap<String, BTreeMap<String, String>>,
    /// VirtualServices.
    pub virtual_services: Objects<VirtualServiceSpec>,
    /// DestinationRules.
    pub destination_rules: Objects<DestinationRuleSpec>,
    /// Sidecars.
    pub sidecars: Objects<SidecarSpec>,
    /// AuthorizationPolicies.
    pub authorization_policies: Objects<AuthorizationPolicySpec>,
    /// PeerAuthentications.
    pub peer_authentications: Objects<PeerAuthenticationSpec>,
    /// RequestAuthentications.
    pub request_authentications: Objects<RequestAuthenticationSpec>,
    /// The mesh-wide settings (trust domain, auto mTLS).
    pub mesh: Arc<crate::model::mesh_config::MeshConfig>,
    /// VirtualServices by the (resolved) hosts they name.
    virtual_service_hosts: HostIndex,
    /// VirtualServices by the (resolved) hosts they route to.
    virtual_service_destinations: HostIndex,
    /// DestinationRules by their (resolved) host.
    destination_rule_hosts: HostIndex,
    /// What the services were built from, so a change recomputes only what read it.
    registry: registry::Registry,
    /// IST0109 findings by host.
    conflicts: HashMap<String, Vec<Diagnostic>>,
    /// IST0101 findings by VirtualService or DestinationRule.
    analysis: OrdMap<ObjectRef, Vec<Diagnostic>>,
    /// Label keys by which some object picks proxies for their outbound config (VirtualService
    /// `sourceLabels`, DestinationRule and Sidecar `workloadSelector`), with how many objects
    /// name each: proxies whose labels agree on these keys get the same outbound config.
    selector_keys: OrdMap<String, usize>,
    /// The hosts of the services with an endpoint at each address, so a proxy finds the
    /// services that select it without reading every endpoint of the mesh.
    endpoint_hosts: OrdMap<String, imbl::OrdSet<String>>,
}

/// References to objects by the (resolved) hosts they name, so that finding the objects for one
/// service does not scan them all: translation stays linear in the number of services.
#[derive(Debug, Clone, Default)]
pub struct HostIndex {
    exact: HashMap<String, SmallSet<ObjectRef>>,
    wildcard: SmallSet<ObjectRef>,
}

impl HostIndex {
    fn insert(&mut self, host: String, object: &ObjectRef) {
        if host.starts_with('*') {
            self.wildcard.insert(object.clone());
        } else {
            self.exact.entry(host).or_default().insert(object.clone());
        }
    }

    fn remove(&mut self, host: &str, object: &ObjectRef) {
        if host.starts_with('*') {
            self.wildcard.remove(object);
        } else if let Some(set) = self.exact.get_mut(host) {
            set.remove(object);
            if set.is_empty() {
                self.exact.remove(host);
            }
        }
    }

    /// The objects of `objects` this index lists for `hostname`, in order.
    fn lookup<'a, S>(&'a self, objects: &'a Objects<S>, hostname: &str) -> impl Iterator<Item = &'a IstioObject<S>> {
        self.candidates(hostname).into_iter().filter_map(|r| objects.get(r)).map(|o| o.as_ref())
    }

    /// References, in order, of the objects whose hosts may cover `hostname` (callers still
    /// check the wildcard ones with [`host_matches`]).
    pub fn candidates(&self, hostname: &str) -> Vec<&ObjectRef> {
        let mut out: Vec<&ObjectRef> = self.exact.get(hostname).into_iter().flatten().collect();
        out.extend(&self.wildcard);
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// Expands a short host name in `namespace` to its FQDN, as Istio does for hosts without dots.
pub fn resolve_host(host: &str, namespace: &str) -> String {
    if host.contains('.') || host.starts_with('*') {
        host.to_string()
    } else {
        format!("{host}.{namespace}.svc.{DOMAIN_SUFFIX}")
    }
}

/// True when `host` (possibly `*.suffix` or `*`) covers `name`.
pub fn host_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => name.ends_with(suffix) || (suffix.starts_with('.') && name.ends_with(suffix)),
        None => pattern == name,
    }
}

impl Snapshot {
    /// Builds the snapshot from accepted objects. Returns the diagnostics found across objects.
    pub fn build(objects: Vec<Loaded>) -> (Snapshot, Vec<Diagnostic>) {
        let mut diagnostics = Vec::new();
        let mut seen: std::collections::HashMap<ObjectRef, String> = std::collections::HashMap::new();
        let mut unique = Vec::new();
        for l in objects {
            if let Some(first) = seen.get(&l.reference) {
                diagnostics.push(Diagnostic {
                    severity: Severity::Error,
                    origin: l.origin.clone(),
                    object: Some(l.reference.clone()),
                    path: "metadata.name".into(),
                    code: None,
                    message: format!("duplicate object: already defined in {first}; this copy is rejected"),
                });
                continue;
            }
            seen.insert(l.reference.clone(), l.origin.clone());
            unique.push(Change::Upsert(Arc::new(l)));
        }
        let mut snap = Snapshot::default();
        snap.apply(unique);
        diagnostics.extend(snap.diagnostics());
        (snap, diagnostics)
    }

    /// The cross-object findings: IST0109 host conflicts, then IST0101 unknown references of
    /// VirtualServices and of DestinationRules.
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        let mut conflicts: Vec<Diagnostic> = self.conflicts.values().flatten().cloned().collect();
        conflicts.sort_by(|a, b| (&a.object, &a.message).cmp(&(&b.object, &b.message)));
        let analysis = |kind: &'static str| {
            self.analysis.iter().filter(move |(r, _)| r.kind == kind).flat_map(|(_, d)| d.iter().cloned())
        };
        conflicts.into_iter().chain(analysis("VirtualService")).chain(analysis("DestinationRule")).collect()
    }

    /// The services with an endpoint at `address`, by host.
    pub fn services_at(&self, address: &str) -> impl Iterator<Item = &MeshService> {
        let hosts = self.endpoint_hosts.get(address).into_iter().flatten();
        hosts.filter_map(|h| self.services.get(h)).map(|s| s.as_ref())
    }

    /// The labels of `labels` that some object selects proxies' outbound config by: what a proxy
    /// class keeps of its workload's labels.
    pub fn outbound_labels(&self, labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        labels
            .iter()
            .filter(|(k, _)| self.selector_keys.contains_key(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// VirtualServices, in namespace/name order, that may name `hostname`.
    pub fn virtual_services_for_host(&self, hostname: &str) -> impl Iterator<Item = &IstioObject<VirtualServiceSpec>> {
        self.virtual_service_hosts.lookup(&self.virtual_services, hostname)
    }

    /// The VirtualServices that route `service` for clients in `namespace`, in namespace/name
    /// order: exported to that namespace, bound to the mesh, with a host that covers the
    /// service. A sidecar takes the first for HTTP and the first with TCP routes for TCP; so
    /// does the kernel. The one place this rule is written.
    pub fn virtual_services_routing<'a>(
        &'a self,
        service: &'a MeshService,
        namespace: &str,
    ) -> impl Iterator<Item = &'a IstioObject<VirtualServiceSpec>> + use<'a> {
        let namespace = namespace.to_string();
        self.virtual_services_for_host(&service.hostname).filter(move |vs| {
            exported_to(&vs.spec.export_to, &vs.meta.namespace, &namespace)
                && (vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh"))
                && vs.spec.hosts.iter().any(|h| host_matches(&resolve_host(h, &vs.meta.namespace), &service.hostname))
        })
    }

    /// Which VirtualServices route `service` for clients in `namespace`: the one rule both back
    /// ends use. `tcp` is the first with TCP routes, which a non-HTTP port's `tcp_proxy` takes;
    /// `http` is the first of all, whose HTTP routes apply to HTTP ports (and to a TCP port no
    /// TCP route covers).
    pub fn port_routing<'a>(&'a self, service: &'a MeshService, namespace: &str) -> PortRouting<'a> {
        let tcp = self.virtual_services_routing(service, namespace).find(|vs| !vs.spec.tcp.is_empty());
        PortRouting { tcp, http: self.virtual_services_routing(service, namespace).next() }
    }

    /// VirtualServices, in namespace/name order, that may route to `hostname`.
    pub fn virtual_services_routing_to(
        &self,
        hostname: &str,
    ) -> impl Iterator<Item = &IstioObject<VirtualServiceSpec>> {
        self.virtual_service_destinations.lookup(&self.virtual_services, hostname)
    }

    /// DestinationRules, in namespace/name order, that may name `hostname`.
    pub fn destination_rules_for_host(
        &self,
        hostname: &str,
    ) -> impl Iterator<Item = &IstioObject<DestinationRuleSpec>> {
        self.destination_rule_hosts.lookup(&self.destination_rules, hostname)
    }

    /// The service a VirtualService or DestinationRule in `namespace` means by `host`.
    pub fn lookup(&self, host: &str, namespace: &str) -> Option<&MeshService> {
        self.services.get(&resolve_host(host, namespace)).map(|s| s.as_ref())
    }

    /// Subset names defined for `fqdn` by DestinationRules visible from `namespace`.
    pub fn subsets_for(&self, fqdn: &str, namespace: &str) -> BTreeSet<String> {
        self.destination_rules_for_host(fqdn)
            .filter(|dr| resolve_host(&dr.spec.host, &dr.meta.namespace) == fqdn)
            .filter(|dr| exported_to(&dr.spec.export_to, &dr.meta.namespace, namespace))
            .flat_map(|dr| dr.spec.subsets.iter().map(|s| s.name.clone()))
            .collect()
    }
}

/// The objects of `objects` that apply to a workload in `namespace` with `labels`, in name
/// order: the root namespace's and the workload namespace's, selector-less or selecting it.
/// `labels` is None for a proxy whose workload is unknown (only selector-less ones apply).
fn selecting<'a, S>(
    objects: &'a Objects<S>,
    selector: impl Fn(&S) -> Option<&LabelSelector>,
    namespace: &str,
    labels: Option<&BTreeMap<String, String>>,
) -> Vec<&'a IstioObject<S>> {
    objects
        .values()
        .map(|p| p.as_ref())
        .filter(|p| p.meta.namespace == ROOT_NAMESPACE || p.meta.namespace == namespace)
        .filter(|p| match selector(&p.spec) {
            Some(s) if !s.match_labels.is_empty() => labels.is_some_and(|l| labels_match(&s.match_labels, l)),
            _ => true,
        })
        .collect()
}

impl Snapshot {
    /// The AuthorizationPolicies (of every action) that apply to a workload (see [`selecting`]).
    pub fn authorization_policies_for(
        &self,
        namespace: &str,
        labels: Option<&BTreeMap<String, String>>,
    ) -> Vec<&IstioObject<AuthorizationPolicySpec>> {
        selecting(&self.authorization_policies, |s| s.selector.as_ref(), namespace, labels)
    }

    /// The RequestAuthentications that apply to a workload (see [`selecting`]).
    pub fn request_authentications_for(
        &self,
        namespace: &str,
        labels: Option<&BTreeMap<String, String>>,
    ) -> Vec<&IstioObject<RequestAuthenticationSpec>> {
        selecting(&self.request_authentications, |s| s.selector.as_ref(), namespace, labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_resolve_in_namespace() {
        assert_eq!(resolve_host("reviews", "default"), "reviews.default.svc.cluster.local");
        assert_eq!(resolve_host("reviews.default.svc.cluster.local", "x"), "reviews.default.svc.cluster.local");
        assert_eq!(resolve_host("*.example.com", "x"), "*.example.com");
    }

    #[test]
    fn wildcard_hosts() {
        assert!(host_matches("*", "a.b"));
        assert!(host_matches("*.example.com", "api.example.com"));
        assert!(!host_matches("*.example.com", "example.org"));
        assert!(host_matches("a.b", "a.b"));
    }

    #[test]
    fn export_to() {
        assert!(exported_to(&[], "a", "b"));
        assert!(exported_to(&[".".into()], "a", "a"));
        assert!(!exported_to(&[".".into()], "a", "b"));
        assert!(exported_to(&["b".into()], "a", "b"));
        assert!(!exported_to(&["~".into()], "a", "a"));
    }
}
