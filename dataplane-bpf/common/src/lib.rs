//! The kernel fast path's map layout: fixed-size `#[repr(C)]` keys and values, shared by the
//! eBPF programs and the node agent. Addresses are 16 bytes; IPv4 is stored IPv4-mapped
//! (`::ffff:a.b.c.d`) so one map serves both families. Ports are in host byte order.
//!
//! Update order (from Cilium) that the agent follows so a reader never sees a service whose
//! slots point nowhere: backends, then slots, then the service entry that publishes the slot
//! count, and only then deletion of what is no longer referenced.

#![no_std]

/// Map names, as pinned under `/sys/fs/bpf/sluice/`.
pub mod maps {
    /// (VIP, port, protocol) → [`ServiceValue`](super::ServiceValue).
    pub const SERVICES: &str = "SLUICE_SERVICES";
    /// (service id, slot) → backend id.
    pub const SLOTS: &str = "SLUICE_SLOTS";
    /// backend id → [`Backend`](super::Backend).
    pub const BACKENDS: &str = "SLUICE_BACKENDS";
    /// cgroup id → [`Workload`](super::Workload).
    pub const WORKLOADS: &str = "SLUICE_WORKLOADS";
    /// socket cookie → the service address the application dialled.
    pub const ORIGINAL_DST: &str = "SLUICE_ORIG_DST";
    /// service id → [`ServiceCounters`](super::ServiceCounters) (per CPU).
    pub const SERVICE_COUNTERS: &str = "SLUICE_SVC_COUNTERS";
    /// backend id → connects balanced to it (per CPU).
    pub const BACKEND_COUNTERS: &str = "SLUICE_BE_COUNTERS";
    /// workload address → [`Endpoint`](super::Endpoint): remote identities and whose policy
    /// protects an address.
    pub const ENDPOINTS: &str = "SLUICE_ENDPOINTS";
    /// policy set id → [`PolicySet`](super::PolicySet).
    pub const POLICY_SETS: &str = "SLUICE_POLICY_SETS";
    /// (policy set, slot) → [`PolicyRule`](super::PolicyRule).
    pub const POLICY_RULES: &str = "SLUICE_POLICY_RULES";
    /// policy set id → [`PolicyCounters`](super::PolicyCounters) (per CPU).
    pub const POLICY_COUNTERS: &str = "SLUICE_AUTHZ_COUNTERS";
    /// 0 → the node proxy's address (absent: no node proxy on this node).
    pub const NODE_PROXY: &str = "SLUICE_NODE_PROXY";
    /// UDP socket cookie → [`UdpAffinity`](super::UdpAffinity).
    pub const UDP_AFFINITY: &str = "SLUICE_UDP_AFFINITY";
}

/// Most backend slots one service may have.
pub const MAX_SLOTS: u32 = 1024;

/// Most rules one workload's policy set may have (DENY rules first, then ALLOW).
pub const MAX_RULES: u32 = 32;
/// Most entries in one list of a [`PolicyRule`].
pub const MAX_LIST: usize = 8;
/// Most IP blocks in one list of a [`PolicyRule`].
pub const MAX_BLOCKS: usize = 4;

/// IP protocol numbers used in [`ServiceKey::proto`].
pub mod proto {
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
}

/// [`ServiceValue::flags`] bits.
pub mod service_flags {
    /// The service has L7 routing the kernel cannot do: kernel-mode clients still get L4
    /// balancing; node-mode clients are redirected to the node proxy (when there is one).
    pub const NEEDS_L7: u32 = 1;
}

/// [`Workload::mode`] values.
pub mod mode {
    /// The kernel balances and authorizes (sidecarless).
    pub const KERNEL: u8 = 0;
    /// The workload's own Envoy does it: the kernel leaves its connections alone.
    pub const SIDECAR: u8 = 1;
    /// The per-node proxy does it.
    pub const NODE: u8 = 2;
}

/// [`PolicyRule::flags`] bits.
pub mod rule_flags {
    /// DENY (else ALLOW).
    pub const DENY: u32 = 1;
    /// `principals` contains `*`: any mesh identity.
    pub const ANY_PRINCIPAL: u32 = 2;
    /// `notPrincipals` contains `*`.
    pub const NOT_ANY_PRINCIPAL: u32 = 4;
    /// `namespaces` contains `*`.
    pub const ANY_NAMESPACE: u32 = 8;
    /// `notNamespaces` contains `*`.
    pub const NOT_ANY_NAMESPACE: u32 = 16;
}

/// An IPv6 or IPv4-mapped address.
pub type Addr = [u8; 16];

/// The IPv4-mapped form of an IPv4 address given as its four bytes.
pub const fn v4_mapped(octets: [u8; 4]) -> Addr {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3]]
}

/// Key of a service: its virtual address, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ServiceKey {
    /// VIP.
    pub addr: Addr,
    /// Port, host byte order.
    pub port: u16,
    /// [`proto`] number.
    pub proto: u8,
    /// Zero.
    pub pad: u8,
}

/// A service: its id and how many backend slots it has.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Id used in [`SlotKey`] and counters.
    pub id: u32,
    /// Number of valid slots, `0..slot_count`. Zero means no backend: connect fails.
    pub slot_count: u32,
    /// [`service_flags`].
    pub flags: u32,
    /// Bumped on every change, for debugging.
    pub revision: u32,
}

/// Key of one backend slot of a service. A backend's weight is the number of slots it holds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SlotKey {
    /// Service id.
    pub service: u32,
    /// Slot index.
    pub slot: u32,
}

/// A backend address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Backend {
    /// Address.
    pub addr: Addr,
    /// Port, host byte order.
    pub port: u16,
    /// 4 or 6.
    pub family: u8,
    /// Zero.
    pub pad: u8,
}

/// A registered workload (the cgroup its processes run in).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Workload {
    /// Identity id (service account), for policy.
    pub identity: u32,
    /// Namespace id, for policy.
    pub namespace: u32,
    /// Policy set protecting the workload (0: none), for traffic it receives.
    pub policy: u32,
    /// [`mode`].
    pub mode: u8,
    /// Zero.
    pub pad: [u8; 3],
    /// The workload's address, the source its connections are matched as against ipBlocks.
    pub addr: Addr,
}

/// A mesh address: who it is (for policy on the receiving side) and which policy set protects it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Endpoint {
    /// Identity id (service account).
    pub identity: u32,
    /// Namespace id.
    pub namespace: u32,
    /// Policy set protecting the workload at this address (0: none).
    pub policy: u32,
    /// Zero.
    pub pad: u32,
}

/// A workload's authorization rules: `count` rules at slots `base..base + count`. The agent
/// writes a new version at the other base, then flips this entry, so a reader sees one whole
/// version.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicySet {
    /// First slot.
    pub base: u32,
    /// Number of rules.
    pub count: u32,
    /// Non-zero when some ALLOW policy selects the workload: what no rule allows is denied.
    pub default_deny: u32,
    /// Zero.
    pub pad: u32,
}

/// Key of one rule of a policy set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RuleKey {
    /// Policy set id.
    pub set: u32,
    /// Slot.
    pub slot: u32,
}

/// A CIDR as address and mask (IPv4 in mapped form), in network byte order words.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IpBlock {
    /// Address, masked.
    pub addr: [u64; 2],
    /// Mask.
    pub mask: [u64; 2],
}

/// One L4 rule: it matches when every non-empty list matches and no negated list does. Lists are
/// ORs. Identities and namespaces are ids (see the agent's `stable_id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyRule {
    /// [`rule_flags`].
    pub flags: u32,
    /// Lengths of the lists below, in this order.
    pub n_principals: u8,
    /// Length of `not_principals`.
    pub n_not_principals: u8,
    /// Length of `namespaces`.
    pub n_namespaces: u8,
    /// Length of `not_namespaces`.
    pub n_not_namespaces: u8,
    /// Length of `ports`.
    pub n_ports: u8,
    /// Length of `not_ports`.
    pub n_not_ports: u8,
    /// Length of `ip_blocks`.
    pub n_ip_blocks: u8,
    /// Length of `not_ip_blocks`.
    pub n_not_ip_blocks: u8,
    /// Zero.
    pub pad: u32,
    /// Source identities.
    pub principals: [u32; MAX_LIST],
    /// Excluded source identities.
    pub not_principals: [u32; MAX_LIST],
    /// Source namespaces.
    pub namespaces: [u32; MAX_LIST],
    /// Excluded source namespaces.
    pub not_namespaces: [u32; MAX_LIST],
    /// Destination ports.
    pub ports: [u16; MAX_LIST],
    /// Excluded destination ports.
    pub not_ports: [u16; MAX_LIST],
    /// Source address blocks.
    pub ip_blocks: [IpBlock; MAX_BLOCKS],
    /// Excluded source address blocks.
    pub not_ip_blocks: [IpBlock; MAX_BLOCKS],
}

/// Authorization decisions for one policy set (one per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyCounters {
    /// Connections allowed.
    pub allowed: u64,
    /// Connections denied.
    pub denied: u64,
}

/// What an application dialled, remembered per socket for `getpeername`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OriginalDst {
    /// Address dialled.
    pub addr: Addr,
    /// Port, host byte order.
    pub port: u16,
    /// 4 or 6.
    pub family: u8,
    /// Zero.
    pub pad: u8,
}

/// The backend an unconnected UDP socket's datagrams to a service go to, so one socket talks to
/// one backend, and replies from it are shown as coming from the service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct UdpAffinity {
    /// The service address the application sends to.
    pub service_addr: Addr,
    /// Its port, host byte order.
    pub service_port: u16,
    /// Zero.
    pub pad: u16,
    /// The backend chosen for it.
    pub backend: Backend,
}

/// Per-service counters (one per CPU; the agent sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceCounters {
    /// Connections balanced to a backend.
    pub connects: u64,
    /// Connections refused because the service had no backend.
    pub no_backend: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is #[repr(C)], Copy, made only of integers and byte arrays, with its
    // padding spelled out as explicit fields, so any byte pattern is a valid value.
    #![allow(unsafe_code)]
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::SlotKey {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::Workload {}
    unsafe impl aya::Pod for super::OriginalDst {}
    unsafe impl aya::Pod for super::ServiceCounters {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::PolicySet {}
    unsafe impl aya::Pod for super::RuleKey {}
    unsafe impl aya::Pod for super::PolicyRule {}
    unsafe impl aya::Pod for super::PolicyCounters {}
    unsafe impl aya::Pod for super::UdpAffinity {}
}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, offset_of, size_of};

    use super::*;

    /// The kernel programs and the agent must agree byte for byte; no implicit padding.
    #[test]
    fn layouts_are_fixed() {
        assert_eq!((size_of::<ServiceKey>(), align_of::<ServiceKey>()), (20, 2));
        assert_eq!((offset_of!(ServiceKey, port), offset_of!(ServiceKey, proto)), (16, 18));
        assert_eq!(size_of::<ServiceValue>(), 16);
        assert_eq!(offset_of!(ServiceValue, slot_count), 4);
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!((size_of::<Backend>(), offset_of!(Backend, port), offset_of!(Backend, family)), (20, 16, 18));
        assert_eq!((size_of::<Workload>(), offset_of!(Workload, mode), offset_of!(Workload, addr)), (32, 12, 16));
        assert_eq!((size_of::<Endpoint>(), size_of::<PolicySet>(), size_of::<RuleKey>()), (16, 16, 8));
        assert_eq!((size_of::<IpBlock>(), align_of::<IpBlock>()), (32, 8));
        assert_eq!(offset_of!(PolicyRule, principals), 16);
        assert_eq!(offset_of!(PolicyRule, ports), 16 + 4 * 32);
        assert_eq!(offset_of!(PolicyRule, ip_blocks), 16 + 4 * 32 + 2 * 16);
        assert_eq!(size_of::<PolicyRule>(), 16 + 4 * 32 + 2 * 16 + 2 * 4 * 32);
        assert_eq!(size_of::<PolicyCounters>(), 16);
        assert_eq!((size_of::<UdpAffinity>(), offset_of!(UdpAffinity, backend)), (40, 20));
        assert_eq!(size_of::<OriginalDst>(), 20);
        assert_eq!(size_of::<ServiceCounters>(), 16);
        assert_eq!(v4_mapped([127, 100, 0, 1])[10..], [0xff, 0xff, 127, 100, 0, 1]);
    }
}
