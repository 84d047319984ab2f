//! sluice's kernel fast path.
//!
//! - `cgroup/connect4`, `cgroup/connect6`: for a process in a registered kernel-mode workload
//!   cgroup, a connect() to a service VIP picks a backend slot at random (a backend's weight is
//!   the number of slots it holds), rewrites the destination and remembers the VIP per socket.
//!   No extra hop, no conntrack.
//! - `cgroup/getpeername4`, `cgroup/getpeername6`: the application sees the VIP it dialled.
//!
//! Function names differ from section names on purpose: equal names break the link.

#![no_std]
#![no_main]

use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::bpf_sock_addr;
use aya_ebpf::helpers::{bpf_get_current_cgroup_id, bpf_get_prandom_u32, bpf_get_socket_cookie};
use aya_ebpf::macros::{cgroup_sock_addr, map};
use aya_ebpf::maps::{HashMap, LruHashMap, PerCpuHashMap};
use aya_ebpf::programs::SockAddrContext;
use sluice_dataplane_common::{
    Addr, Backend, OriginalDst, ServiceCounters, ServiceKey, ServiceValue, SlotKey, Workload, mode, proto, v4_mapped,
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

/// Let the syscall go on (rewritten or not).
const PROCEED: i32 = 1;
/// Fail the syscall with EPERM.
const REJECT: i32 = 0;

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

/// True when the calling process belongs to a workload the kernel balances for.
fn kernel_mode_caller() -> bool {
    // SAFETY: helper with no arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is only read.
    matches!(unsafe { WORKLOADS.get(cgroup) }, Some(w) if w.mode == mode::KERNEL)
}

/// The backend for a service key, or Err(()) when the service exists without backends.
fn pick(key: &ServiceKey) -> Option<Result<Backend, ()>> {
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
    Some(Ok(backend))
}

fn remember(ctx: &SockAddrContext, addr: Addr, port: u16, family: u8) {
    // SAFETY: the context pointer is the program's own.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = ORIGINAL_DST.insert(cookie, OriginalDst { addr, port, family, pad: 0 }, 0);
}

fn recall(ctx: &SockAddrContext) -> Option<OriginalDst> {
    // SAFETY: the context pointer is the program's own; the value is copied out.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    unsafe { ORIGINAL_DST.get(cookie) }.copied()
}

fn sock(ctx: &SockAddrContext) -> &mut bpf_sock_addr {
    // SAFETY: the kernel hands the program a valid context for its whole run.
    unsafe { &mut *ctx.sock_addr }
}

fn protocol(sa: &bpf_sock_addr) -> u8 {
    if sa.protocol == u32::from(proto::UDP) { proto::UDP } else { proto::TCP }
}

#[cgroup_sock_addr(connect4)]
pub fn sluice_connect4(ctx: SockAddrContext) -> i32 {
    if !kernel_mode_caller() {
        return PROCEED;
    }
    let sa = sock(&ctx);
    let octets = sa.user_ip4.to_ne_bytes();
    let port = u16::from_be(sa.user_port as u16);
    let key = ServiceKey { addr: v4_mapped(octets), port, proto: protocol(sa), pad: 0 };
    match pick(&key) {
        None => PROCEED,
        Some(Err(())) => REJECT,
        Some(Ok(b)) if b.family == 4 => {
            remember(&ctx, key.addr, port, 4);
            let sa = sock(&ctx);
            sa.user_ip4 = u32::from_ne_bytes([b.addr[12], b.addr[13], b.addr[14], b.addr[15]]);
            sa.user_port = u32::from(b.port.to_be());
            PROCEED
        }
        // An IPv6 backend cannot take an IPv4 socket's connection.
        Some(Ok(_)) => REJECT,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn sluice_connect6(ctx: SockAddrContext) -> i32 {
    if !kernel_mode_caller() {
        return PROCEED;
    }
    let sa = sock(&ctx);
    let mut addr = [0u8; 16];
    for (i, word) in sa.user_ip6.iter().enumerate() {
        addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let port = u16::from_be(sa.user_port as u16);
    let key = ServiceKey { addr, port, proto: protocol(sa), pad: 0 };
    match pick(&key) {
        None => PROCEED,
        Some(Err(())) => REJECT,
        Some(Ok(b)) => {
            // IPv4 backends are reached from IPv6 sockets through their mapped form.
            remember(&ctx, key.addr, port, 6);
            let sa = sock(&ctx);
            for i in 0..4 {
                sa.user_ip6[i] =
                    u32::from_ne_bytes([b.addr[i * 4], b.addr[i * 4 + 1], b.addr[i * 4 + 2], b.addr[i * 4 + 3]]);
            }
            sa.user_port = u32::from(b.port.to_be());
            PROCEED
        }
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn sluice_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(o) = recall(&ctx).filter(|o| o.family == 4) {
        let sa = sock(&ctx);
        sa.user_ip4 = u32::from_ne_bytes([o.addr[12], o.addr[13], o.addr[14], o.addr[15]]);
        sa.user_port = u32::from(o.port.to_be());
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn sluice_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(o) = recall(&ctx).filter(|o| o.family == 6) {
        let sa = sock(&ctx);
        for i in 0..4 {
            sa.user_ip6[i] =
                u32::from_ne_bytes([o.addr[i * 4], o.addr[i * 4 + 1], o.addr[i * 4 + 2], o.addr[i * 4 + 3]]);
        }
        sa.user_port = u32::from(o.port.to_be());
    }
    PROCEED
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
