//! `sluice agent dump`: every map in readable form.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use sluice_dataplane_common::{Addr, mode, proto};

use crate::loader::Maps;
use crate::{DataplaneError, Result};

/// An address as text (IPv4-mapped shown as IPv4).
pub fn show_addr(a: &Addr) -> String {
    let v6 = Ipv6Addr::from(*a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4).to_string(),
        None if *a == [0; 16] => Ipv4Addr::UNSPECIFIED.to_string(),
        None => format!("[{v6}]"),
    }
}

/// The readable dump.
pub fn dump(maps: &Maps) -> Result<String> {
    let e = |map: &'static str| move |source| DataplaneError::Map { map, source };
    let mut out = String::new();
    let backends: BTreeMap<u32, _> =
        maps.backends.iter().collect::<std::result::Result<_, _>>().map_err(e("backends"))?;
    let mut slots: BTreeMap<u32, BTreeMap<u32, u32>> = BTreeMap::new();
    for item in maps.slots.iter() {
        let (k, b) = item.map_err(e("slots"))?;
        slots.entry(k.service).or_default().insert(k.slot, b);
    }
    let mut services: Vec<_> = maps.services.iter().collect::<std::result::Result<_, _>>().map_err(e("services"))?;
    services.sort_by_key(|(k, _)| *k);
    writeln!(out, "services ({})", services.len()).expect("string");
    for (k, v) in services {
        let p = if k.proto == proto::UDP { "UDP" } else { "TCP" };
        let mut weights: BTreeMap<u32, u32> = BTreeMap::new();
        for slot in 0..v.slot_count {
            if let Some(b) = slots.get(&v.id).and_then(|s| s.get(&slot)) {
                *weights.entry(*b).or_default() += 1;
            }
        }
        let counters = maps
            .counters
            .get(&v.id, 0)
            .map(|per_cpu| per_cpu.iter().fold((0, 0), |acc, c| (acc.0 + c.connects, acc.1 + c.no_backend)))
            .unwrap_or((0, 0));
        writeln!(
            out,
            "  {}:{}/{p} id={} slots={} flags={:#x} connects={} no_backend={}",
            show_addr(&k.addr),
            k.port,
            v.id,
            v.slot_count,
            v.flags,
            counters.0,
            counters.1
        )
        .expect("string");
        for (b, n) in weights {
            let target =
                backends.get(&b).map_or("<missing>".to_string(), |be| format!("{}:{}", show_addr(&be.addr), be.port));
            writeln!(out, "    -> {target} weight {n}/{}", v.slot_count).expect("string");
        }
    }
    let mut workloads: Vec<_> = maps.workloads.iter().collect::<std::result::Result<_, _>>().map_err(e("workloads"))?;
    workloads.sort_by_key(|(k, _)| *k);
    writeln!(out, "workloads ({})", workloads.len()).expect("string");
    for (cgroup, w) in workloads {
        let m = match w.mode {
            mode::SIDECAR => "sidecar",
            mode::NODE => "node",
            _ => "kernel",
        };
        writeln!(out, "  cgroup {cgroup}: mode={m} identity={:#010x} namespace={:#010x}", w.identity, w.namespace)
            .expect("string");
    }
    writeln!(out, "backends ({})", backends.len()).expect("string");
    Ok(out)
}
