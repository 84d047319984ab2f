//! `sluice agent dump`: every map in readable form.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use sluice_dataplane_common::{Addr, PolicyRule, RuleKey, mode, proto, rule_flags};

use crate::Result;
use crate::loader::{Maps, PROGRAMS, pinned_target};

/// An address as text (IPv4-mapped shown as IPv4).
pub fn show_addr(a: &Addr) -> String {
    let v6 = Ipv6Addr::from(*a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4).to_string(),
        None if *a == [0; 16] => Ipv4Addr::UNSPECIFIED.to_string(),
        None => format!("[{v6}]"),
    }
}

/// Where each pinned program is attached, as the kernel's links say: the cgroup's id and path,
/// or why it runs nowhere.
pub fn links(pin_dir: &Path) -> String {
    let mount = crate::cgroup::cgroup2_mount().ok();
    let mut out = String::new();
    writeln!(out, "programs ({})", PROGRAMS.len()).expect("string");
    for (name, _) in PROGRAMS {
        let place = match pinned_target(pin_dir, name) {
            None => "not pinned".to_string(),
            Some(t) if t.cgroup_id == 0 => "detached: its cgroup was removed".to_string(),
            Some(t) => {
                let path = mount.as_deref().and_then(|m| crate::cgroup::find_by_id(m, t.cgroup_id));
                let path = path.map_or_else(|| "(no such cgroup: removed?)".to_string(), |p| p.display().to_string());
                format!("cgroup {} {path}", t.cgroup_id)
            }
        };
        writeln!(out, "  {name}: {place}").expect("string");
    }
    out
}

/// The readable dump.
pub fn dump(maps: &Maps) -> Result<String> {
    let e = crate::map_error;
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
    for (id, b) in &backends {
        let connects: u64 = maps.backend_counters.get(id, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0);
        writeln!(out, "  {id}: {}:{} connects={connects}", show_addr(&b.addr), b.port).expect("string");
    }
    let mut endpoints: Vec<_> = maps.endpoints.iter().collect::<std::result::Result<_, _>>().map_err(e("endpoints"))?;
    endpoints.sort_by_key(|(a, _)| *a);
    writeln!(out, "endpoints ({})", endpoints.len()).expect("string");
    for (a, ep) in endpoints {
        writeln!(
            out,
            "  {}: identity={:#010x} namespace={:#010x} policy={:#010x}",
            show_addr(&a),
            ep.identity,
            ep.namespace,
            ep.policy
        )
        .expect("string");
    }
    let mut sets: Vec<_> = maps.policy_sets.iter().collect::<std::result::Result<_, _>>().map_err(e("policy sets"))?;
    sets.sort_by_key(|(id, _)| *id);
    writeln!(out, "policy sets ({})", sets.len()).expect("string");
    let (mut allowed, mut denied) = (0, 0);
    for (id, set) in sets {
        let (a, d) = maps
            .policy_counters
            .get(&id, 0)
            .map(|per_cpu| per_cpu.iter().fold((0, 0), |acc, c| (acc.0 + c.allowed, acc.1 + c.denied)))
            .unwrap_or((0, 0));
        allowed += a;
        denied += d;
        let default = if set.default_deny != 0 { "deny" } else { "allow" };
        writeln!(out, "  {id:#010x}: rules={} default={default} allowed={a} denied={d}", set.count).expect("string");
        for slot in set.base..set.base + set.count {
            match maps.policy_rules.get(&RuleKey { set: id, slot }, 0) {
                Ok(r) => writeln!(out, "    [{}] {}", slot - set.base, show_rule(&r)).expect("string"),
                Err(_) => writeln!(out, "    [{}] <missing>", slot - set.base).expect("string"),
            }
        }
    }
    writeln!(out, "authorization totals: allowed={allowed} denied={denied}").expect("string");
    match maps.node_proxy.get(&0, 0) {
        Ok(a) => writeln!(out, "node proxy: {}", show_addr(&a)).expect("string"),
        Err(_) => writeln!(out, "node proxy: none").expect("string"),
    }
    Ok(out)
}

fn show_rule(r: &PolicyRule) -> String {
    let action = if r.flags & rule_flags::DENY != 0 { "DENY" } else { "ALLOW" };
    let mut parts = vec![action.to_string()];
    let ids = |name: &str, any: bool, list: &[u32], n: u8| {
        let mut items: Vec<String> = list[..usize::from(n)].iter().map(|i| format!("{i:#010x}")).collect();
        if any {
            items.push("*".into());
        }
        (!items.is_empty()).then(|| format!("{name}=[{}]", items.join(",")))
    };
    parts.extend(ids("principals", r.flags & rule_flags::ANY_PRINCIPAL != 0, &r.principals, r.n_principals));
    parts.extend(ids(
        "notPrincipals",
        r.flags & rule_flags::NOT_ANY_PRINCIPAL != 0,
        &r.not_principals,
        r.n_not_principals,
    ));
    parts.extend(ids("namespaces", r.flags & rule_flags::ANY_NAMESPACE != 0, &r.namespaces, r.n_namespaces));
    parts.extend(ids(
        "notNamespaces",
        r.flags & rule_flags::NOT_ANY_NAMESPACE != 0,
        &r.not_namespaces,
        r.n_not_namespaces,
    ));
    let ports = |name: &str, list: &[u16], n: u8| (n > 0).then(|| format!("{name}={:?}", &list[..usize::from(n)]));
    parts.extend(ports("ports", &r.ports, r.n_ports));
    parts.extend(ports("notPorts", &r.not_ports, r.n_not_ports));
    if r.n_ip_blocks > 0 {
        parts.push(format!("ipBlocks={}", r.n_ip_blocks));
    }
    if r.n_not_ip_blocks > 0 {
        parts.push(format!("notIpBlocks={}", r.n_not_ip_blocks));
    }
    parts.join(" ")
}
