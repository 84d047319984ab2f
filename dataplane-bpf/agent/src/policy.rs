//! Identities and authorization in the maps: workload values, the address → identity/policy
//! map, and each protected workload's rules. A policy set is written at the base its live
//! version does not use, then published by one update of its [`PolicySet`], so a program reads
//! one whole version; the old rules are deleted after the grace period. Sets are written before
//! anything references them: a reference to a set not yet written would allow (fail open).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Instant;

use ipnet::IpNet;
use sluice_dataplane_api::{KernelRule, KernelWorkload, Mode};
use sluice_dataplane_common::{
    Addr, Endpoint, IpBlock, MAX_BLOCKS, MAX_LIST, MAX_RULES, PolicyRule, PolicySet, RuleKey, Workload, mode,
    rule_flags,
};

use crate::held::HeldWorkload;
use crate::loader::Maps;
use crate::sync::{GRACE, addr};
use crate::{DataplaneError, Result, deleted, map_error};

/// FNV-1a: stable ids for identities, namespaces and policy sets across agent restarts.
pub fn stable_id(text: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The policy set id of a workload the kernel protects, else 0.
pub fn policy_set(w: &KernelWorkload) -> u32 {
    // A sidecar- or node-mode workload's set holds only the STRICT mTLS rule, which kernel
    // callers meet at connect(); its own traffic the kernel does not check.
    if w.authorization.is_none() {
        return 0;
    }
    stable_id(&format!("policy/{}/{}", w.namespace, w.name)).max(1)
}

fn workload_addr(w: &KernelWorkload) -> Addr {
    w.ip.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok()).map(addr).unwrap_or_default()
}

/// The map value of a workload's cgroup.
pub fn workload_value(w: &KernelWorkload) -> Workload {
    Workload {
        identity: stable_id(&format!("{}/{}", w.namespace, w.service_account)),
        namespace: stable_id(&w.namespace),
        policy: policy_set(w),
        mode: match w.mode() {
            Mode::Sidecar => mode::SIDECAR,
            Mode::Node => mode::NODE,
            Mode::Kernel => mode::KERNEL,
        },
        pad: [0; 3],
        addr: workload_addr(w),
    }
}

fn too_long(rule: &KernelRule, field: &str, max: usize) -> DataplaneError {
    DataplaneError::Invalid(format!(
        "AuthorizationPolicy {} spec.rules[{}]: {field} has more than {max} entries, the most one kernel rule holds",
        rule.policy, rule.rule
    ))
}

fn ids(rule: &KernelRule, field: &str, values: &[String], any: u32) -> Result<([u32; MAX_LIST], u8, u32)> {
    let mut out = [0; MAX_LIST];
    let mut n = 0;
    let mut flags = 0;
    for v in values {
        if v == "*" {
            flags |= any;
            continue;
        }
        *out.get_mut(n).ok_or_else(|| too_long(rule, field, MAX_LIST))? = stable_id(v);
        n += 1;
    }
    Ok((out, n as u8, flags))
}

fn ports(rule: &KernelRule, field: &str, values: &[u32]) -> Result<([u16; MAX_LIST], u8)> {
    let mut out = [0; MAX_LIST];
    if values.len() > MAX_LIST {
        return Err(too_long(rule, field, MAX_LIST));
    }
    for (slot, p) in out.iter_mut().zip(values) {
        *slot = u16::try_from(*p).map_err(|_| {
            DataplaneError::Invalid(format!("AuthorizationPolicy {}: port {p} is out of range", rule.policy))
        })?;
    }
    Ok((out, values.len() as u8))
}

/// An IP block as the programs compare it: address and mask as the two native-endian words of
/// their 16 bytes (IPv4 in mapped form).
pub fn ip_block(net: &IpNet) -> IpBlock {
    let (address, prefix) = match net {
        IpNet::V4(n) => (addr(IpAddr::V4(n.network())), 96 + u32::from(n.prefix_len())),
        IpNet::V6(n) => (addr(IpAddr::V6(n.network())), u32::from(n.prefix_len())),
    };
    let mask_bytes = (!0u128).checked_shl(128 - prefix).unwrap_or(0).to_be_bytes();
    let words = |b: &[u8; 16]| {
        [
            u64::from_ne_bytes(b[..8].try_into().expect("8 bytes")),
            u64::from_ne_bytes(b[8..].try_into().expect("8 bytes")),
        ]
    };
    let mask = words(&mask_bytes);
    let a = words(&address);
    IpBlock { addr: [a[0] & mask[0], a[1] & mask[1]], mask }
}

fn blocks(rule: &KernelRule, field: &str, values: &[String]) -> Result<([IpBlock; MAX_BLOCKS], u8)> {
    let mut out = [IpBlock::default(); MAX_BLOCKS];
    if values.len() > MAX_BLOCKS {
        return Err(too_long(rule, field, MAX_BLOCKS));
    }
    for (slot, v) in out.iter_mut().zip(values) {
        let net: IpNet = v.parse().map_err(|_| {
            DataplaneError::Invalid(format!("AuthorizationPolicy {}: {v:?} is not a CIDR", rule.policy))
        })?;
        *slot = ip_block(&net);
    }
    Ok((out, values.len() as u8))
}

/// A rule in map form.
pub fn compile(rule: &KernelRule) -> Result<PolicyRule> {
    let (principals, n_principals, f1) = ids(rule, "principals", &rule.principals, rule_flags::ANY_PRINCIPAL)?;
    let (not_principals, n_not_principals, f2) =
        ids(rule, "notPrincipals", &rule.not_principals, rule_flags::NOT_ANY_PRINCIPAL)?;
    let (namespaces, n_namespaces, f3) = ids(rule, "namespaces", &rule.namespaces, rule_flags::ANY_NAMESPACE)?;
    let (not_namespaces, n_not_namespaces, f4) =
        ids(rule, "notNamespaces", &rule.not_namespaces, rule_flags::NOT_ANY_NAMESPACE)?;
    let (ports_list, n_ports) = ports(rule, "ports", &rule.ports)?;
    let (not_ports, n_not_ports) = ports(rule, "notPorts", &rule.not_ports)?;
    let (ip_blocks, n_ip_blocks) = blocks(rule, "ipBlocks", &rule.ip_blocks)?;
    let (not_ip_blocks, n_not_ip_blocks) = blocks(rule, "notIpBlocks", &rule.not_ip_blocks)?;
    Ok(PolicyRule {
        flags: f1 | f2 | f3 | f4 | if rule.deny { rule_flags::DENY } else { 0 },
        n_principals,
        n_not_principals,
        n_namespaces,
        n_not_namespaces,
        n_ports,
        n_not_ports,
        n_ip_blocks,
        n_not_ip_blocks,
        pad: 0,
        principals,
        not_principals,
        namespaces,
        not_namespaces,
        ports: ports_list,
        not_ports,
        ip_blocks,
        not_ip_blocks,
    })
}

/// Rules of an old version waiting for the grace period.
struct Retired {
    since: Instant,
    set: u32,
    base: u32,
    count: u32,
}

/// The agent's view of the identity and policy maps. It keeps no copy of the endpoints map
/// (one entry per mesh address): a change rewrites the addresses it touched.
#[derive(Default)]
pub struct PolicySync {
    sets: BTreeMap<u32, (PolicySet, Vec<PolicyRule>)>,
    /// The next change rewrites every address: every held workload's and every one in the
    /// map (so the ones no workload has any more are deleted). Set when the agent starts (an
    /// earlier agent's entries may be stale) and while a change failed part way.
    full: bool,
    retired: Vec<Retired>,
}

impl PolicySync {
    /// Reads what an earlier agent left, so an unchanged policy is not rewritten.
    pub fn adopt(maps: &Maps) -> Result<Self> {
        let mut s = Self::default();
        for item in maps.policy_sets.iter() {
            let (id, set) = item.map_err(map_error("policy sets"))?;
            let mut rules = Vec::new();
            for i in 0..set.count {
                match maps.policy_rules.get(&RuleKey { set: id, slot: set.base + i }, 0) {
                    Ok(r) => rules.push(r),
                    Err(_) => break,
                }
            }
            s.sets.insert(id, (set, rules));
        }
        s.full = true;
        Ok(s)
    }

    /// True while the next change rewrites every address (see [`PolicySync::apply`]).
    pub fn rewrites_all(&self) -> bool {
        self.full
    }

    /// Makes the next change rewrite every address: cheaper than tracking most of them.
    pub fn rewrite_all(&mut self) {
        self.full = true;
    }

    /// Writes the policy sets of `workloads`, then the entries of the addresses in `touched`
    /// (those of the workloads a change added, changed or removed, before and after) in the
    /// address map that references them. Returns how many sets were written.
    pub fn apply<'w>(
        &mut self,
        maps: &mut Maps,
        workloads: impl Iterator<Item = (&'w str, &'w HeldWorkload)> + Clone,
        touched: BTreeSet<Addr>,
        now: Instant,
    ) -> Result<usize> {
        let mut wanted: BTreeMap<u32, (bool, Vec<PolicyRule>)> = BTreeMap::new();
        for (name, w) in workloads.clone() {
            let set = w.value.policy;
            let Some(authorization) = w.authorization.as_deref().filter(|_| set != 0) else { continue };
            if authorization.rules.len() > MAX_RULES as usize {
                return Err(DataplaneError::Invalid(format!(
                    "workload {name}: {} authorization rules, more than the {MAX_RULES} the kernel holds per workload",
                    authorization.rules.len()
                )));
            }
            let rules = authorization.rules.iter().map(compile).collect::<Result<Vec<_>>>()?;
            wanted.insert(set, (authorization.default_deny, rules));
        }
        let mut written = 0;
        for (id, (default_deny, rules)) in &wanted {
            let current = self.sets.get(id);
            if current.is_some_and(|(s, r)| (s.default_deny != 0) == *default_deny && r == rules) {
                continue;
            }
            // The other half of the set's slots: the live version stays whole until the flip.
            let base = match current {
                Some((s, _)) if s.base == 0 => MAX_RULES,
                _ => 0,
            };
            for (i, rule) in rules.iter().enumerate() {
                maps.policy_rules
                    .insert(RuleKey { set: *id, slot: base + i as u32 }, *rule, 0)
                    .map_err(map_error("policy rules"))?;
            }
            let set = PolicySet { base, count: rules.len() as u32, default_deny: u32::from(*default_deny), pad: 0 };
            maps.policy_sets.insert(id, set, 0).map_err(map_error("policy sets"))?;
            if let Some((old, _)) = current {
                self.retired.push(Retired { since: now, set: *id, base: old.base, count: old.count });
            }
            self.sets.insert(*id, (set, rules.clone()));
            written += 1;
        }
        // Addresses: every workload's identity (remote sources) and its policy set.
        // Each touched address gets the identity of the last workload (by name) that has it,
        // as one pass over the held workloads finds it; an address none has is deleted. A full
        // rewrite writes every workload's address in that order (the last one wins) and
        // deletes the map's others, holding only a sorted list of addresses meanwhile.
        let endpoint =
            |v: &Workload| Endpoint { identity: v.identity, namespace: v.namespace, policy: v.policy, pad: 0 };
        if std::mem::replace(&mut self.full, true) {
            let mut held: Vec<Addr> = Vec::new();
            for (_, w) in workloads.filter(|(_, w)| w.value.addr != Addr::default()) {
                maps.endpoints.insert(w.value.addr, endpoint(&w.value), 0).map_err(map_error("endpoints"))?;
                held.push(w.value.addr);
            }
            held.sort_unstable();
            let keys = maps.endpoints.keys().collect::<std::result::Result<Vec<Addr>, _>>();
            for a in keys.map_err(map_error("endpoints"))?.iter().filter(|a| held.binary_search(a).is_err()) {
                deleted(maps.endpoints.remove(a), "endpoints")?;
            }
        } else {
            let mut endpoints: BTreeMap<Addr, Endpoint> = BTreeMap::new();
            for (_, w) in workloads.filter(|(_, w)| touched.contains(&w.value.addr)) {
                endpoints.insert(w.value.addr, endpoint(&w.value));
            }
            for a in touched.iter().filter(|a| **a != Addr::default()) {
                match endpoints.get(a) {
                    Some(e) => maps.endpoints.insert(a, *e, 0).map_err(map_error("endpoints"))?,
                    None => deleted(maps.endpoints.remove(a), "endpoints")?,
                }
            }
        }
        self.full = false;
        // Sets nothing selects any more: unpublish (no policy: allowed), free the rules later.
        let gone: Vec<u32> = self.sets.keys().filter(|id| !wanted.contains_key(id)).copied().collect();
        for id in gone {
            let (set, _) = self.sets.remove(&id).expect("listed");
            deleted(maps.policy_sets.remove(&id), "policy sets")?;
            self.retired.push(Retired { since: now, set: id, base: set.base, count: set.count });
        }
        Ok(written)
    }

    /// Deletes retired rules older than the grace period, unless their slots are live again.
    pub fn collect(&mut self, maps: &mut Maps, now: Instant) -> Result<usize> {
        let (due, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.retired).into_iter().partition(|r| now.duration_since(r.since) >= GRACE);
        self.retired = later;
        let mut n = 0;
        for r in due {
            let live = self.sets.get(&r.set).map(|(s, _)| (s.base, s.count));
            for slot in r.base..r.base + r.count {
                if live.is_some_and(|(base, count)| (base..base + count).contains(&slot)) {
                    continue;
                }
                deleted(maps.policy_rules.remove(&RuleKey { set: r.set, slot }), "policy rules")?;
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_blocks_match_like_the_program() {
        let matches = |net: &str, ip: &str| {
            let b = ip_block(&net.parse().unwrap());
            let a = addr(ip.parse().unwrap());
            let w = [u64::from_ne_bytes(a[..8].try_into().unwrap()), u64::from_ne_bytes(a[8..].try_into().unwrap())];
            w[0] & b.mask[0] == b.addr[0] && w[1] & b.mask[1] == b.addr[1]
        };
        assert!(matches("10.233.0.0/24", "10.233.0.7"));
        assert!(!matches("10.233.0.0/24", "10.233.1.7"));
        assert!(matches("0.0.0.0/0", "192.0.2.1"));
        assert!(!matches("0.0.0.0/0", "2001:db8::1"), "an IPv4 block holds only IPv4 addresses");
        assert!(matches("2001:db8::/32", "2001:db8:1::1"));
        assert!(matches("127.0.1.40/32", "127.0.1.40") && !matches("127.0.1.40/32", "127.0.1.41"));
    }

    #[test]
    fn rules_compile_to_ids_and_flags() {
        let rule = KernelRule {
            policy: "default/p".into(),
            principals: vec!["*".into(), "default/a".into()],
            ports: vec![9080],
            deny: true,
            ..Default::default()
        };
        let r = compile(&rule).unwrap();
        assert_eq!(r.flags, rule_flags::DENY | rule_flags::ANY_PRINCIPAL);
        assert_eq!((r.n_principals, r.principals[0], r.n_ports, r.ports[0]), (1, stable_id("default/a"), 1, 9080));
        let long = KernelRule { ports: (1..=9).collect(), ..rule };
        assert!(compile(&long).unwrap_err().to_string().contains("default/p spec.rules[0]: ports"));
    }
}
