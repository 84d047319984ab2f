//! The config model: typed Istio and Kubernetes objects as sluice reads them.

pub mod authorization_policy;
pub mod common;
pub mod destination_rule;
pub mod mesh_config;
pub mod request_authentication;
pub mod service_entry;
pub mod sidecar;
pub mod virtual_service;

use std::collections::BTreeMap;

pub use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
pub use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::diagnostic::ObjectRef;

/// The metadata sluice uses from any object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace` (`default` when absent, empty for cluster-scoped kinds).
    pub namespace: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
}

impl Meta {
    /// Takes the fields sluice uses from Kubernetes metadata.
    pub fn from_object_meta(m: &ObjectMeta, namespaced: bool) -> Self {
        Self {
            name: m.name.clone().unwrap_or_default(),
            namespace: if namespaced { m.namespace.clone().unwrap_or_else(|| "default".into()) } else { String::new() },
            labels: m.labels.clone().unwrap_or_default(),
            annotations: m.annotations.clone().unwrap_or_default(),
        }
    }
}

/// An Istio object: metadata and a typed spec.
#[derive(Debug, Clone, PartialEq)]
pub struct IstioObject<S> {
    /// Metadata.
    pub meta: Meta,
    /// The spec.
    pub spec: S,
    /// File (or other source) it came from.
    pub origin: String,
}

/// Every kind sluice understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// core/v1 Service.
    Service,
    /// discovery.k8s.io/v1 EndpointSlice.
    EndpointSlice,
    /// core/v1 Pod.
    Pod,
    /// core/v1 Namespace.
    Namespace,
    /// networking.istio.io VirtualService.
    VirtualService,
    /// networking.istio.io DestinationRule.
    DestinationRule,
    /// networking.istio.io ServiceEntry.
    ServiceEntry,
    /// networking.istio.io WorkloadEntry.
    WorkloadEntry,
    /// networking.istio.io Sidecar.
    Sidecar,
    /// security.istio.io AuthorizationPolicy.
    AuthorizationPolicy,
    /// security.istio.io PeerAuthentication.
    PeerAuthentication,
    /// security.istio.io RequestAuthentication.
    RequestAuthentication,
}

impl Kind {
    /// Every kind, Kubernetes kinds first.
    pub const ALL: [Kind; 12] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::Namespace,
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::ServiceEntry,
        Kind::WorkloadEntry,
        Kind::Sidecar,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
        Kind::RequestAuthentication,
    ];

    /// The `kind` field.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::Sidecar => "Sidecar",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::RequestAuthentication => "RequestAuthentication",
        }
    }

    /// The API group (empty for the core group).
    pub fn group(&self) -> &'static str {
        match self {
            Kind::Service | Kind::Pod | Kind::Namespace => "",
            Kind::EndpointSlice => "discovery.k8s.io",
            Kind::AuthorizationPolicy | Kind::PeerAuthentication | Kind::RequestAuthentication => "security.istio.io",
            _ => "networking.istio.io",
        }
    }

    /// The versions Istio/Kubernetes serve, newest (preferred) first.
    pub fn versions(&self) -> &'static [&'static str] {
        match self.group() {
            "networking.istio.io" => &["v1", "v1beta1", "v1alpha3"],
            "security.istio.io" => &["v1", "v1beta1"],
            _ => &["v1"],
        }
    }

    /// The resource name in API paths (`virtualservices`).
    pub fn plural(&self) -> String {
        match self {
            Kind::AuthorizationPolicy => "authorizationpolicies".into(),
            Kind::ServiceEntry => "serviceentries".into(),
            Kind::WorkloadEntry => "workloadentries".into(),
            _ => format!("{}s", self.name().to_ascii_lowercase()),
        }
    }

    /// True for the Istio kinds (CustomResourceDefinitions).
    pub fn is_istio(&self) -> bool {
        self.group().ends_with(".istio.io")
    }

    /// Resolves `apiVersion` and `kind`. `Ok(None)` for kinds sluice does not read; `Err` for a
    /// known kind at a version Istio/Kubernetes does not serve.
    pub fn resolve(api_version: &str, kind: &str) -> Result<Option<Kind>, String> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let Some(k) = Kind::ALL.into_iter().find(|k| k.name() == kind && k.group() == group) else {
            return Ok(None);
        };
        if k.versions().contains(&version) {
            Ok(Some(k))
        } else {
            Err(format!(
                "apiVersion {api_version:?} is not served for kind {kind}; use one of {}",
                k.versions().join(", ")
            ))
        }
    }

    /// False for cluster-scoped kinds.
    pub fn namespaced(&self) -> bool {
        *self != Kind::Namespace
    }
}

/// One typed object, boxed: the kinds differ in size (a DestinationRule is 872 bytes inline, a
/// Service's box 8), and a mesh holds every object.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// Kubernetes Service.
    Service(Box<Service>),
    /// Kubernetes EndpointSlice.
    EndpointSlice(Box<EndpointSlice>),
    /// Kubernetes Pod.
    Pod(Box<Pod>),
    /// Kubernetes Namespace.
    Namespace(Box<Namespace>),
    /// Istio VirtualService.
    VirtualService(Box<IstioObject<virtual_service::VirtualServiceSpec>>),
    /// Istio DestinationRule.
    DestinationRule(Box<IstioObject<destination_rule::DestinationRuleSpec>>),
    /// Istio ServiceEntry.
    ServiceEntry(Box<IstioObject<service_entry::ServiceEntrySpec>>),
    /// Istio WorkloadEntry.
    WorkloadEntry(Box<IstioObject<service_entry::WorkloadEntrySpec>>),
    /// Istio Sidecar.
    Sidecar(Box<IstioObject<sidecar::SidecarSpec>>),
    /// Istio AuthorizationPolicy.
    AuthorizationPolicy(Box<IstioObject<authorization_policy::AuthorizationPolicySpec>>),
    /// Istio PeerAuthentication.
    PeerAuthentication(Box<IstioObject<authorization_policy::PeerAuthenticationSpec>>),
    /// Istio RequestAuthentication.
    RequestAuthentication(Box<IstioObject<request_authentication::RequestAuthenticationSpec>>),
}

/// An object with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The object.
    pub object: Object,
    /// Its kind/namespace/name.
    pub reference: ObjectRef,
    /// File (or other source) it came from.
    pub origin: String,
    /// The document as read, as compact JSON text (with sorted keys), kept so the last good
    /// version can be persisted: a `serde_json::Value` tree of it is about ten times its size,
    /// and a mesh holds every object's.
    pub raw: Box<str>,
    /// A hash of `raw`, computed once: what a store compares to find changes.
    pub fingerprint: u64,
    /// True when `object` is not the document but what stands in for it because it was rejected
    /// (see [`authorization_policy::rejected_stand_in`]): a last good version of the object, if
    /// one is known, is served instead.
    pub stand_in: bool,
}

impl Loaded {
    /// An object read from `origin`; `raw` is the document it was read from.
    pub fn new(object: Object, reference: ObjectRef, origin: String, raw: &serde_json::Value) -> Self {
        use std::hash::{Hash, Hasher};
        // `to_string` writes bytes straight into the buffer; `Display` goes through a
        // formatter that checks every piece it writes again (a tenth of a file's parse).
        let raw: Box<str> = serde_json::to_string(raw).expect("a JSON value serializes").into();
        let mut h = std::hash::DefaultHasher::new();
        raw.hash(&mut h);
        Self { object, reference, origin, raw, fingerprint: h.finish(), stand_in: false }
    }

    /// True when `other` is this object again: the same document from the same place.
    pub fn same_as(&self, other: &Loaded) -> bool {
        self.fingerprint == other.fingerprint && self.origin == other.origin
    }
}

/// Parses an IP address or CIDR (a bare IP is a /32 or /128).
pub fn parse_cidr(s: &str) -> Option<ipnet::IpNet> {
    s.parse::<ipnet::IpNet>().ok().or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}
