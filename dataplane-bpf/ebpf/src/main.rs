//! sluice's kernel fast path.
//!
//! - `cgroup/connect4`, `cgroup/connect6`: for a process in a registered kernel-mode workload
//!   cgroup, a connect() to a service VIP picks a backend slot at random (a backend's weight is
//!   the number of slots it holds), rewrites the destination and remembers the VIP per socket.
//!   No extra hop, no conntrack. A node-mode workload's connects to a service with L7 routing
//!   go to the node proxy instead (same port); its other connects are balanced like kernel mode.
//! - `cgroup/getpeername4`, `cgroup/getpeername6`: the application sees the VIP it dialled.
//! - `cgroup/sendmsg4`, `cgroup/sendmsg6`: the same for unconnected UDP, one backend per socket
//!   and service; `cgroup/recvmsg4`, `cgroup/recvmsg6` show replies as coming from the VIP.
//! - Authorization: a kernel-mode caller's connect() to a protected workload is checked against
//!   that workload's L4 rules (EPERM at once when denied); `cgroup_skb/ingress` checks new
//!   connections a protected workload receives from sources off this node (drops them).
//!
//! Function names differ from section names on purpose: equal names break the link.

#![no_std]
#![no_main]

use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::bpf_sock_addr;
use aya_ebpf::helpers::{bpf_get_current_cgroup_id, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_skb_cgroup_id};
use aya_ebpf::macros::{cgroup_skb, cgroup_sock_addr, map};
use aya_ebpf::maps::{HashMap, LruHashMap, PerCpuHashMap};
use aya_ebpf::programs::{SkBuffContext, SockAddrContext};
use sluice_dataplane_common::{
    Addr, Backend, Endpoint, MAX_BLOCKS, MAX_LIST, MAX_RULES, OriginalDst, PolicyCounters, PolicyRule, PolicySet,
    RuleKey, ServiceCounters, ServiceKey, ServiceValue, SlotKey, UdpAffinity, Workload, mode, proto, rule_flags,
    service_flags, v4_mapped,
};

/// Allocate big maps on demand rather than up front.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "SLUICE_SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(65_536, BPF_F_NO_PREALLOC);
#[map(name = "SLUICE_SLOTS")]
static SLOTS: HashMap<SlotKey, u32> = HashMap::pinned(1 << 21, BPF_F_NO_PREALLOC);
#[map(name = "SLUICE_BACKENDS")]
static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(1 << 18, BPF_F_NO_PREALLOC);
#[map(name = "SLUICE_WORKLOADS")]
static WORKLOADS: HashMap<u64, Workload> = HashMap::pinned(65_536, BPF_F_NO_PREALLOC);
#[map(name = "SLUICE_ORIG_DST")]
static ORIGINAL_DST: LruHashMap<u64, OriginalDst> = LruHashMap::pinned(262_144, 0);
#[map(name = "SLUICE_SVC_COUNTERS")]
static COUNTERS: PerCpuHashMap<u32, ServiceCounters> = PerCpuHashMap::pinned(65_536, BPF_F_NO_PREALLOC);
#[map(name = "SLUICE_BE_COUNTERS")]
static BACKEND_COUNTERS: PerCpuHashMap<u32, u64> = PerCpuHashMap::pinned(1 << 18, BPF_F_NO_PREALLOC);
#[map(name = "SLUICE_ENDPOINTS")]
static ENDPOINTS: HashMap<Addr, Endpoint> = HashMap::pinned(1 << 18, BPF_F_NO_PREALLOC);
#[map(name = "SLUICE_POLICY_SETS")]
static POLICY_SETS: HashMap<u32, PolicySet> = HashMap::pinned(65_536, BPF_F_NO_PREALLOC);
#[map(name = "SLUICE_POLICY_RULES")]
static POLICY_RULES: HashMap<RuleKey, PolicyRule> = HashMap::pinned(1 << 18, BPF_F_NO_PREALLOC);
#[map(name = "SLUICE_AUTHZ_COUNTERS")]
static POLICY_COUNTERS: PerCpuHashMap<u32, PolicyCounters> = PerCpuHashMap::pinned(65_536, BPF_F_NO_PREALLOC);
#[map(name = "SLUICE_NODE_PROXY")]
static NODE_PROXY: HashMap<u32, Addr> = HashMap::pinned(1, 0);
#[map(name = "SLUICE_UDP_AFFINITY")]
static UDP_AFFINITY: LruHashMap<u64, UdpAffinity> = LruHashMap::pinned(262_144, 0);

/// Let the syscall go on (rewritten or not).
const PROCEED: i32 = 1;
/// Fail the syscall with EPERM.
const REJECT: i32 = 0;
/// cgroup_skb verdicts.
const SKB_PASS: i32 = 1;
const SKB_DROP: i32 = 0;

fn count(service: u32, balanced: bool) {
    match COUNTERS.get_ptr_mut(service) {
        // SAFETY: per-CPU value owned by this CPU for the duration of the program.
        Some(c) => unsafe {
            if balanced {
                (*c).connects += 1;
            } else {
                (*c).no_backend += 1;
            }
        },
        None => {
            let c = ServiceCounters { connects: balanced as u64, no_backend: !balanced as u64 };
            let _ = COUNTERS.insert(service, c, 0);
        }
    }
}

fn count_backend(backend: u32) {
    match BACKEND_COUNTERS.get_ptr_mut(backend) {
        // SAFETY: per-CPU value owned by this CPU for the duration of the program.
        Some(c) => unsafe { *c += 1 },
        None => {
            let _ = BACKEND_COUNTERS.insert(backend, 1, 0);
        }
    }
}

fn count_decision(set: u32, allowed: bool) {
    match POLICY_COUNTERS.get_ptr_mut(set) {
        // SAFETY: per-CPU value owned by this CPU for the duration of the program.
        Some(c) => unsafe {
            if allowed {
                (*c).allowed += 1;
            } else {
                (*c).denied += 1;
            }
        },
        None => {
            let c = PolicyCounters { allowed: allowed as u64, denied: !allowed as u64 };
            let _ = POLICY_COUNTERS.insert(set, c, 0);
        }
    }
}

/// The calling process's workload when the kernel handles its outbound connections: kernel
/// and node mode (a sidecar-mode workload's own Envoy does it).
fn balanced_caller() -> Option<Workload> {
    // SAFETY: helper with no arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is copied out at once.
    let w = *unsafe { WORKLOADS.get(cgroup) }?;
    (w.mode == mode::KERNEL || w.mode == mode::NODE).then_some(w)
}

/// For a node-mode caller dialling a service with L7 routing: the node proxy's address (the
/// proxy listens there on the service's port).
fn node_proxy_for(caller: &Workload, key: &ServiceKey) -> Option<Addr> {
    if caller.mode != mode::NODE {
        return None;
    }
    // SAFETY: values are copied out at once.
    let service: ServiceValue = *unsafe { SERVICES.get(key) }?;
    if service.flags & service_flags::NEEDS_L7 == 0 {
        return None;
    }
    unsafe { NODE_PROXY.get(0u32) }.copied()
}

/// The backend id and backend for a service key, or Err(()) when the service exists without
/// backends.
fn pick(key: &ServiceKey) -> Option<Result<(u32, Backend), ()>> {
    // SAFETY: values are copied out at once.
    let service: ServiceValue = *unsafe { SERVICES.get(key) }?;
    if service.slot_count == 0 {
        count(service.id, false);
        return Some(Err(()));
    }
    // SAFETY: helper with no arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % service.slot_count;
    let backend_id: u32 = *unsafe { SLOTS.get(SlotKey { service: service.id, slot }) }?;
    let backend: Backend = *unsafe { BACKENDS.get(backend_id) }?;
    count(service.id, true);
    count_backend(backend_id);
    Some(Ok((backend_id, backend)))
}

/// Who opens a connection, for policy. Plain fields, no `Option`: the verifier refuses the
/// uninitialised payload of a `None` spilled to the stack.
struct Peer {
    /// The source is a mesh workload (identity and namespace are meaningful).
    mesh: bool,
    /// Identity id.
    identity: u32,
    /// Namespace id.
    namespace: u32,
    /// Source address as two words of its 16 bytes.
    addr: [u64; 2],
}

fn words(a: &Addr) -> [u64; 2] {
    [
        u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    ]
}

fn contains_u32(list: &[u32; MAX_LIST], n: u8, v: u32) -> bool {
    let mut j = 0;
    while j < MAX_LIST {
        if j >= n as usize {
            break;
        }
        if list[j] == v {
            return true;
        }
        j += 1;
    }
    false
}

fn contains_port(list: &[u16; MAX_LIST], n: u8, v: u16) -> bool {
    let mut j = 0;
    while j < MAX_LIST {
        if j >= n as usize {
            break;
        }
        if list[j] == v {
            return true;
        }
        j += 1;
    }
    false
}

fn in_blocks(blocks: &[sluice_dataplane_common::IpBlock; MAX_BLOCKS], n: u8, a: &[u64; 2]) -> bool {
    let mut j = 0;
    while j < MAX_BLOCKS {
        if j >= n as usize {
            break;
        }
        let b = &blocks[j];
        if a[0] & b.mask[0] == b.addr[0] && a[1] & b.mask[1] == b.addr[1] {
            return true;
        }
        j += 1;
    }
    false
}

/// A positive id list (with its "any" flag): empty matches everything; otherwise the source
/// must be a mesh workload whose id is listed.
fn id_matches(r: &PolicyRule, any: u32, list: &[u32; MAX_LIST], n: u8, mesh: bool, id: u32) -> bool {
    if n == 0 && r.flags & any == 0 {
        return true;
    }
    mesh && (r.flags & any != 0 || contains_u32(list, n, id))
}

/// A negated id list: a mesh source whose id is listed (or any, with the flag) is excluded.
fn id_excluded(r: &PolicyRule, any: u32, list: &[u32; MAX_LIST], n: u8, mesh: bool, id: u32) -> bool {
    mesh && (r.flags & any != 0 || contains_u32(list, n, id))
}

fn rule_matches(r: &PolicyRule, peer: &Peer, port: u16) -> bool {
    let (mesh, identity, namespace) = (peer.mesh, peer.identity, peer.namespace);
    id_matches(r, rule_flags::ANY_PRINCIPAL, &r.principals, r.n_principals, mesh, identity)
        && !id_excluded(r, rule_flags::NOT_ANY_PRINCIPAL, &r.not_principals, r.n_not_principals, mesh, identity)
        && id_matches(r, rule_flags::ANY_NAMESPACE, &r.namespaces, r.n_namespaces, mesh, namespace)
        && !id_excluded(r, rule_flags::NOT_ANY_NAMESPACE, &r.not_namespaces, r.n_not_namespaces, mesh, namespace)
        && (r.n_ports == 0 || contains_port(&r.ports, r.n_ports, port))
        && !contains_port(&r.not_ports, r.n_not_ports, port)
        && (r.n_ip_blocks == 0 || in_blocks(&r.ip_blocks, r.n_ip_blocks, &peer.addr))
        && !in_blocks(&r.not_ip_blocks, r.n_not_ip_blocks, &peer.addr)
}

/// Istio's decision for a workload's policy set: the first matching rule (DENY rules come
/// first) decides; with no match, denied if some ALLOW policy selects the workload.
fn authorize(set_id: u32, peer: &Peer, port: u16) -> bool {
    if set_id == 0 {
        return true;
    }
    // SAFETY: copied out at once.
    let Some(set) = unsafe { POLICY_SETS.get(set_id) }.copied() else { return true };
    let mut i = 0;
    while i < MAX_RULES {
        if i >= set.count {
            break;
        }
        let key = RuleKey { set: set_id, slot: set.base + i };
        let Some(rule) = POLICY_RULES.get_ptr(&key) else {
            // A rule of the published version is missing: fail closed.
            count_decision(set_id, false);
            return false;
        };
        // SAFETY: the map value stays valid for the program's run (RCU).
        if rule_matches(unsafe { &*rule }, peer, port) {
            // SAFETY: as above.
            let allowed = unsafe { (*rule).flags } & rule_flags::DENY == 0;
            count_decision(set_id, allowed);
            return allowed;
        }
        i += 1;
    }
    let allowed = set.default_deny == 0;
    count_decision(set_id, allowed);
    allowed
}

/// Client-side check of a kernel-mode caller's connection to `addr:port`.
fn caller_may_connect(caller: &Workload, addr: &Addr, port: u16) -> bool {
    // SAFETY: copied out at once.
    let Some(endpoint) = unsafe { ENDPOINTS.get(addr) }.copied() else { return true };
    let peer = Peer { mesh: true, identity: caller.identity, namespace: caller.namespace, addr: words(&caller.addr) };
    authorize(endpoint.policy, &peer, port)
}

fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the context pointer is the program's own.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

fn remember(ctx: &SockAddrContext, addr: Addr, port: u16, family: u8) {
    let _ = ORIGINAL_DST.insert(cookie(ctx), OriginalDst { addr, port, family, pad: 0 }, 0);
}

fn recall(ctx: &SockAddrContext) -> Option<OriginalDst> {
    // SAFETY: the value is copied out.
    unsafe { ORIGINAL_DST.get(cookie(ctx)) }.copied()
}

fn sock(ctx: &SockAddrContext) -> &mut bpf_sock_addr {
    // SAFETY: the kernel hands the program a valid context for its whole run.
    unsafe { &mut *ctx.sock_addr }
}

fn protocol(sa: &bpf_sock_addr) -> u8 {
    if sa.protocol == u32::from(proto::UDP) { proto::UDP } else { proto::TCP }
}

/// The destination the application asked for, as a map address.
#[inline(always)]
fn destination<const V6: bool>(sa: &bpf_sock_addr) -> Addr {
    if V6 {
        // Context fields are read at constant offsets only (the verifier refuses computed ones).
        let (w0, w1, w2, w3) = (sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]);
        let mut addr = [0u8; 16];
        addr[0..4].copy_from_slice(&w0.to_ne_bytes());
        addr[4..8].copy_from_slice(&w1.to_ne_bytes());
        addr[8..12].copy_from_slice(&w2.to_ne_bytes());
        addr[12..16].copy_from_slice(&w3.to_ne_bytes());
        addr
    } else {
        v4_mapped(sa.user_ip4.to_ne_bytes())
    }
}

/// Rewrites the destination; an IPv4 socket cannot reach an IPv6 backend.
#[inline(always)]
fn rewrite<const V6: bool>(sa: &mut bpf_sock_addr, addr: &Addr, port: u16) -> bool {
    if V6 {
        let word = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
        // Context fields are written at constant offsets only.
        sa.user_ip6[0] = word(0);
        sa.user_ip6[1] = word(4);
        sa.user_ip6[2] = word(8);
        sa.user_ip6[3] = word(12);
    } else {
        if addr[..12] != v4_mapped([0; 4])[..12] {
            return false;
        }
        sa.user_ip4 = u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]);
    }
    sa.user_port = u32::from(port.to_be());
    true
}

/// connect(): balance a service VIP, authorize, remember what was dialled.
fn on_connect<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let Some(caller) = balanced_caller() else { return PROCEED };
    let sa = sock(ctx);
    let dialled = destination::<V6>(sa);
    let port = u16::from_be(sa.user_port as u16);
    let key = ServiceKey { addr: dialled, port, proto: protocol(sa), pad: 0 };
    if let Some(proxy) = node_proxy_for(&caller, &key) {
        remember(ctx, dialled, port, if V6 { 6 } else { 4 });
        return if rewrite::<V6>(sock(ctx), &proxy, port) { PROCEED } else { REJECT };
    }
    match pick(&key) {
        // Not a service: still a mesh destination whose policy applies.
        None => {
            if caller_may_connect(&caller, &dialled, port) {
                PROCEED
            } else {
                REJECT
            }
        }
        Some(Err(())) => REJECT,
        Some(Ok((_, b))) => {
            remember(ctx, dialled, port, if V6 { 6 } else { 4 });
            forward::<V6>(ctx, &caller, &b)
        }
    }
}

/// Sends the caller's connection or datagram to `backend` if its policy allows the caller.
#[inline(always)]
fn forward<const V6: bool>(ctx: &SockAddrContext, caller: &Workload, backend: &Backend) -> i32 {
    if !caller_may_connect(caller, &backend.addr, backend.port) {
        return REJECT;
    }
    if rewrite::<V6>(sock(ctx), &backend.addr, backend.port) { PROCEED } else { REJECT }
}

#[cgroup_sock_addr(connect4)]
pub fn sluice_connect4(ctx: SockAddrContext) -> i32 {
    on_connect::<false>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn sluice_connect6(ctx: SockAddrContext) -> i32 {
    on_connect::<true>(&ctx)
}

/// getpeername(): the VIP the application dialled.
fn on_getpeername<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    if let Some(o) = recall(ctx).filter(|o| o.family == if V6 { 6 } else { 4 }) {
        rewrite::<V6>(sock(ctx), &o.addr, o.port);
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn sluice_getpeername4(ctx: SockAddrContext) -> i32 {
    on_getpeername::<false>(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn sluice_getpeername6(ctx: SockAddrContext) -> i32 {
    on_getpeername::<true>(&ctx)
}

/// sendmsg() on an unconnected UDP socket: one backend per socket and service.
fn on_sendmsg<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let Some(caller) = balanced_caller() else { return PROCEED };
    let sa = sock(ctx);
    let dialled = destination::<V6>(sa);
    let port = u16::from_be(sa.user_port as u16);
    let id = cookie(ctx);
    // SAFETY: copied out at once.
    let kept = unsafe { UDP_AFFINITY.get(id) }.copied().filter(|a| a.service_addr == dialled && a.service_port == port);
    let backend = match kept {
        Some(a) => a.backend,
        None => match pick(&ServiceKey { addr: dialled, port, proto: proto::UDP, pad: 0 }) {
            None => return if caller_may_connect(&caller, &dialled, port) { PROCEED } else { REJECT },
            Some(Err(())) => return REJECT,
            Some(Ok((_, b))) => {
                let affinity = UdpAffinity { service_addr: dialled, service_port: port, pad: 0, backend: b };
                let _ = UDP_AFFINITY.insert(id, affinity, 0);
                b
            }
        },
    };
    forward::<V6>(ctx, &caller, &backend)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sluice_sendmsg4(ctx: SockAddrContext) -> i32 {
    on_sendmsg::<false>(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sluice_sendmsg6(ctx: SockAddrContext) -> i32 {
    on_sendmsg::<true>(&ctx)
}

/// recvmsg(): a reply from the socket's backend is shown as coming from the service.
fn on_recvmsg<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    // SAFETY: copied out at once.
    let Some(a) = unsafe { UDP_AFFINITY.get(cookie(ctx)) }.copied() else { return PROCEED };
    let sa = sock(ctx);
    if destination::<V6>(sa) == a.backend.addr && u16::from_be(sa.user_port as u16) == a.backend.port {
        rewrite::<V6>(sa, &a.service_addr, a.service_port);
    }
    PROCEED
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sluice_recvmsg4(ctx: SockAddrContext) -> i32 {
    on_recvmsg::<false>(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sluice_recvmsg6(ctx: SockAddrContext) -> i32 {
    on_recvmsg::<true>(&ctx)
}

/// TCP flags byte: SYN and ACK bits.
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Server-side check for a protected kernel-mode workload: new connections (TCP SYN, every UDP
/// datagram) from sources off this node. Loopback sources are processes on this node, checked
/// at their connect() when they are kernel-mode workloads.
#[cgroup_skb(ingress)]
pub fn sluice_ingress(ctx: SkBuffContext) -> i32 {
    ingress(&ctx).unwrap_or(SKB_PASS)
}

fn ingress(ctx: &SkBuffContext) -> Option<i32> {
    // SAFETY: the program's own socket buffer.
    let cgroup = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    // SAFETY: copied out at once.
    let workload = unsafe { WORKLOADS.get(cgroup) }.copied()?;
    if workload.mode != mode::KERNEL || workload.policy == 0 {
        return None;
    }
    let version = ctx.load::<u8>(0).ok()? >> 4;
    let (source, protocol, transport) = if version == 4 {
        let ihl = usize::from(ctx.load::<u8>(0).ok()? & 0x0f) * 4;
        let s: [u8; 4] = ctx.load(12).ok()?;
        if s[0] == 127 {
            return None;
        }
        (v4_mapped(s), ctx.load::<u8>(9).ok()?, ihl)
    } else {
        let s: [u8; 16] = ctx.load(8).ok()?;
        if s == core::net::Ipv6Addr::LOCALHOST.octets() || s[..12] == v4_mapped([0; 4])[..12] && s[12] == 127 {
            return None;
        }
        (s, ctx.load::<u8>(6).ok()?, 40)
    };
    if protocol == proto::TCP {
        let flags = ctx.load::<u8>(transport + 13).ok()?;
        if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
            return None;
        }
    } else if protocol != proto::UDP {
        return None;
    }
    let port = u16::from_be(ctx.load::<u16>(transport + 2).ok()?);
    // SAFETY: copied out at once.
    let known = unsafe { ENDPOINTS.get(&source) }.copied();
    let (mesh, identity, namespace) = match known {
        Some(e) => (true, e.identity, e.namespace),
        None => (false, 0, 0),
    };
    let peer = Peer { mesh, identity, namespace, addr: words(&source) };
    Some(if authorize(workload.policy, &peer, port) { SKB_PASS } else { SKB_DROP })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
