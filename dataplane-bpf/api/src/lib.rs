//! The messages sluice serves node agents over ADS (node id `agent~<node-name>`): one resource
//! per kernel service and per workload. The translator builds them; the agent reads them and
//! depends on this crate alone, not on the translator. They are protobuf messages (delivered as
//! `Any`) and serde types (golden files and `sluice translate`): one type per concept.

use serde::{Deserialize, Serialize};

/// Type URL of a [`KernelService`] resource on ADS (node id `agent~<node-name>`).
pub const SERVICE_TYPE: &str = "type.googleapis.com/sluice.dataplane.v1.KernelService";
/// Type URL of a [`KernelWorkload`] resource on ADS.
pub const WORKLOAD_TYPE: &str = "type.googleapis.com/sluice.dataplane.v1.KernelWorkload";
/// Node id prefix of node agents.
pub const AGENT_NODE_PREFIX: &str = "agent~";

/// A kernel entry's transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
#[repr(i32)]
pub enum Protocol {
    /// TCP.
    Tcp = 0,
    /// UDP.
    Udp = 1,
}

impl Protocol {
    /// `TCP` or `UDP`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

/// A workload's data-plane mode (label `sluice.io/dataplane`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(i32)]
pub enum Mode {
    /// The kernel balances its connections and enforces its inbound policy.
    Kernel = 0,
    /// Its sidecar does both.
    Sidecar = 1,
    /// The node proxy takes its connections to services with L7 routing.
    Node = 2,
}

impl Mode {
    /// `kernel`, `sidecar` or `node`: the label value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Sidecar => "sidecar",
            Self::Node => "node",
        }
    }

    /// The mode a label value names.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Kernel, Self::Sidecar, Self::Node].into_iter().find(|m| m.name() == name)
    }
}

/// Serde for an enumeration field held as its protobuf number: the variant's name in JSON.
macro_rules! by_name {
    ($module:ident, $enum:ty) => {
        mod $module {
            use serde::{Deserialize, Deserializer, Serialize, Serializer};

            pub fn serialize<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
                <$enum>::try_from(*value).map_err(serde::ser::Error::custom)?.serialize(s)
            }

            pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
                <$enum>::deserialize(d).map(|v| v as i32)
            }
        }
    };
}
by_name!(protocol_name, crate::Protocol);
by_name!(mode_name, crate::Mode);

/// Everything one node's agent programs into its maps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDataplane {
    /// Services with a virtual IP, by (VIP, port, protocol).
    pub services: Vec<KernelService>,
    /// Workloads the agent may run or recognise on this node.
    pub workloads: Vec<KernelWorkload>,
}

/// One (VIP, port) the kernel balances; its ADS resource name is [`KernelService::resource_name`].
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
pub struct KernelService {
    /// `<fqdn>:<port>`.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Virtual IP.
    #[prost(string, tag = "2")]
    pub vip: String,
    /// Service port.
    #[prost(uint32, tag = "3")]
    pub port: u32,
    /// The transport ([`Protocol`]; `TCP` or `UDP` in JSON).
    #[prost(enumeration = "Protocol", tag = "4")]
    #[serde(with = "protocol_name")]
    pub protocol: i32,
    /// Backends with relative weights (empty: connect fails at once).
    #[prost(message, repeated, tag = "5")]
    pub backends: Vec<WeightedBackend>,
    /// The service has L7 routes the kernel does not apply.
    #[prost(bool, tag = "6")]
    pub needs_l7: bool,
}

impl KernelService {
    /// `<vip>:<port>/<protocol>` (IPv6 VIPs in brackets): unique per node.
    pub fn resource_name(&self) -> String {
        entry_name(&self.vip, self.port, self.protocol())
    }

    /// The host of the service this entry balances.
    pub fn host(&self) -> &str {
        self.name.rsplit_once(':').map_or(&self.name, |(host, _)| host)
    }
}

/// `<vip>:<port>/<protocol>` (IPv6 VIPs in brackets): a kernel entry's resource name.
pub fn entry_name(vip: &str, port: u32, protocol: Protocol) -> String {
    let protocol = protocol.name();
    if vip.contains(':') { format!("[{vip}]:{port}/{protocol}") } else { format!("{vip}:{port}/{protocol}") }
}

/// The greatest common divisor, by which both sides reduce backend weights (the translator its
/// entries' weights, the agent its slot counts).
pub fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// A backend and its share.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, prost::Message, Serialize, Deserialize)]
pub struct WeightedBackend {
    /// IP address.
    #[prost(string, tag = "1")]
    pub address: String,
    /// Port.
    #[prost(uint32, tag = "2")]
    pub port: u32,
    /// Relative weight (> 0).
    #[prost(uint32, tag = "3")]
    pub weight: u32,
}

/// A workload and its data-plane mode; its ADS resource name is `<namespace>/<name>`.
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
pub struct KernelWorkload {
    /// Namespace.
    #[prost(string, tag = "1")]
    pub namespace: String,
    /// Pod or WorkloadEntry name.
    #[prost(string, tag = "2")]
    pub name: String,
    /// IP, when known.
    #[prost(string, optional, tag = "3")]
    pub ip: Option<String>,
    /// Service account.
    #[prost(string, tag = "4")]
    pub service_account: String,
    /// Its data-plane mode ([`Mode`]; `kernel`, `sidecar` or `node` in JSON).
    #[prost(enumeration = "Mode", tag = "5")]
    #[serde(with = "mode_name")]
    pub mode: i32,
    /// The workload runs on this node (or names no node): `sluice run` may start it here.
    /// Other workloads are sent for their identity (remote sources) and their policy.
    #[prost(bool, tag = "6")]
    pub local: bool,
    /// What the kernel enforces for connections to a kernel-mode workload; None when no
    /// AuthorizationPolicy selects it (or its sidecar or node proxy enforces policy).
    #[prost(message, optional, tag = "7")]
    pub authorization: Option<KernelAuthorization>,
    /// A Pod's UID: its containers' cgroups are named by it, which is how the agent tells
    /// which pod a process asking for a certificate belongs to.
    #[prost(string, optional, tag = "8")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

impl KernelWorkload {
    /// `<namespace>/<name>`.
    pub fn resource_name(&self) -> String {
        Self::name_of(&self.namespace, &self.name)
    }

    /// The resource name of the workload `name` in `namespace`.
    pub fn name_of(namespace: &str, name: &str) -> String {
        format!("{namespace}/{name}")
    }
}

/// The authorization of one workload: what the kernel checks for connections it receives.
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
pub struct KernelAuthorization {
    /// Some ALLOW policy selects the workload: a connection no ALLOW rule matches is denied
    /// (also when every ALLOW rule was dropped as L7-only).
    #[prost(bool, tag = "1")]
    pub default_deny: bool,
    /// DENY rules first, then ALLOW rules; the first match decides.
    #[prost(message, repeated, tag = "2")]
    pub rules: Vec<KernelRule>,
}

/// One L4 rule: matches when every non-empty list matches and no `not_` list does.
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
pub struct KernelRule {
    /// `<namespace>/<name>` of the AuthorizationPolicy (of the PeerAuthentication, for the
    /// rule that refuses plaintext on STRICT mTLS ports).
    #[prost(string, tag = "1")]
    pub policy: String,
    /// Index of the rule in `spec.rules`.
    #[prost(uint32, tag = "2")]
    pub rule: u32,
    /// DENY (else ALLOW).
    #[prost(bool, tag = "3")]
    pub deny: bool,
    /// Source identities as `<namespace>/<service account>`, or `*` for any mesh identity.
    #[prost(string, repeated, tag = "4")]
    pub principals: Vec<String>,
    /// Excluded source identities.
    #[prost(string, repeated, tag = "5")]
    pub not_principals: Vec<String>,
    /// Source namespaces, or `*`.
    #[prost(string, repeated, tag = "6")]
    pub namespaces: Vec<String>,
    /// Excluded source namespaces.
    #[prost(string, repeated, tag = "7")]
    pub not_namespaces: Vec<String>,
    /// Destination ports.
    #[prost(uint32, repeated, tag = "8")]
    pub ports: Vec<u32>,
    /// Excluded destination ports.
    #[prost(uint32, repeated, tag = "9")]
    pub not_ports: Vec<u32>,
    /// Source address blocks (CIDR).
    #[prost(string, repeated, tag = "10")]
    pub ip_blocks: Vec<String>,
    /// Excluded source address blocks.
    #[prost(string, repeated, tag = "11")]
    pub not_ip_blocks: Vec<String>,
}
