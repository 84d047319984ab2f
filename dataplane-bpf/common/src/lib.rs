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
}

/// Most backend slots one service may have.
pub const MAX_SLOTS: u32 = 1024;

/// IP protocol numbers used in [`ServiceKey::proto`].
pub mod proto {
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
}

/// [`ServiceValue::flags`] bits.
pub mod service_flags {
    /// The service has L7 routing the kernel cannot do; kernel-mode clients still get L4 balancing.
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
    /// [`mode`].
    pub mode: u8,
    /// Zero.
    pub pad: [u8; 3],
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
        assert_eq!((size_of::<Workload>(), offset_of!(Workload, mode)), (12, 8));
        assert_eq!(size_of::<OriginalDst>(), 20);
        assert_eq!(size_of::<ServiceCounters>(), 16);
        assert_eq!(v4_mapped([127, 100, 0, 1])[10..], [0xff, 0xff, 127, 100, 0, 1]);
    }
}
