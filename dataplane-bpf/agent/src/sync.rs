//! Keeps the maps equal to a [`NodeDataplane`], in an order that never lets a reader find a
//! service whose slots point at a missing backend:
//!
//! 1. new backends are written;
//! 2. each changed service's slots are written (growing ones before the count is raised);
//! 3. the service entry publishes the new slot count;
//! 4. what is no longer referenced (slots past a shrunk count, removed services' slots,
//!    unreferenced backends) is deleted only after a grace period, so a program that read the
//!    old entry an instant earlier still finds what it points at.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use prost::Message;
use sluice_dataplane_api::{KernelService, NodeDataplane, Protocol, gcd};
use sluice_dataplane_common::{Backend, MAX_SLOTS, ServiceKey, ServiceValue, SlotKey, proto, service_flags, v4_mapped};

use crate::backends::BackendTable;
use crate::loader::Maps;
use crate::{DataplaneError, Result, deleted, map_error};

/// How long unreferenced entries stay before deletion.
pub const GRACE: Duration = Duration::from_millis(200);

/// A map address from an IP.
pub fn addr(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn port16(service: &str, port: u32) -> Result<u16> {
    u16::try_from(port).map_err(|_| DataplaneError::Invalid(format!("service {service}: port {port} is out of range")))
}

/// The service key of a kernel service.
pub fn service_key(s: &KernelService) -> Result<ServiceKey> {
    let ip: IpAddr = s
        .vip
        .parse()
        .map_err(|_| DataplaneError::Invalid(format!("service {}: VIP {:?} is not an IP", s.name, s.vip)))?;
    Ok(ServiceKey {
        addr: addr(ip),
        port: port16(&s.name, s.port)?,
        proto: match s.protocol() {
            Protocol::Udp => proto::UDP,
            Protocol::Tcp => proto::TCP,
        },
        pad: 0,
    })
}

/// Slot owners for the given weights: backend `i` owns a share of the slots proportional to
/// `weights[i]`, at least one, at most [`MAX_SLOTS`] slots in all.
pub fn slots(weights: &[u32]) -> Vec<usize> {
    let sum: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if sum == 0 {
        return Vec::new();
    }
    let budget = u64::from(MAX_SLOTS).max(weights.len() as u64);
    let scaled: Vec<u64> = if sum > budget {
        weights.iter().map(|w| (u64::from(*w) * budget / sum).max(1)).collect()
    } else {
        weights.iter().map(|w| u64::from(*w)).collect()
    };
    let g = scaled.iter().copied().fold(0, gcd);
    scaled.iter().enumerate().flat_map(|(i, w)| std::iter::repeat_n(i, (w / g.max(1)) as usize)).collect()
}

enum Pending {
    Slots { service: u32, from: u32, to: u32 },
    Backend(u32),
    Counters(u32),
}

/// What one apply did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyStats {
    /// Services written (new or changed).
    pub services_written: usize,
    /// Services removed.
    pub services_removed: usize,
    /// Backends written.
    pub backends_written: usize,
}

/// A service's content as one number (the hash of its encoding, which has no maps and so one
/// form), as the control plane's versions are.
fn fingerprint(s: &KernelService) -> u64 {
    let mut h = DefaultHasher::new();
    s.encode_to_vec().hash(&mut h);
    h.finish()
}

/// A service to write: its entry, fingerprint, backends and their weights.
struct Wanted<'a> {
    service: &'a KernelService,
    print: u64,
    backends: Vec<Backend>,
    weights: Vec<u32>,
}

/// The agent's view of what is in the maps.
#[derive(Default)]
pub struct MapSync {
    services: BTreeMap<ServiceKey, ServiceValue>,
    slots: BTreeMap<u32, Vec<u32>>,
    /// Backends by id and by address, with how many slots point at each.
    backends: BackendTable,
    /// Backend ids whose last slot went away since the last apply.
    orphans: BTreeSet<u32>,
    /// A fingerprint of the last applied form of each service: an unchanged one costs a
    /// comparison (and no second copy of every service is kept), so one
    /// changed endpoint does not recompute every service.
    applied: BTreeMap<ServiceKey, u64>,
    next_service: u32,
    pending: Vec<(Instant, Pending)>,
}

impl MapSync {
    /// Reads what an earlier agent left in the maps, so ids stay stable and nothing is flushed.
    pub fn adopt(maps: &Maps) -> Result<Self> {
        let mut s = Self::default();
        for item in maps.backends.iter() {
            let (id, b) = item.map_err(map_error("backends"))?;
            s.backends.adopt(id, b);
        }
        s.backends.settle();
        for item in maps.services.iter() {
            let (k, v) = item.map_err(map_error("services"))?;
            s.services.insert(k, v);
            s.next_service = s.next_service.max(v.id + 1);
        }
        for item in maps.slots.iter() {
            let (k, backend) = item.map_err(map_error("slots"))?;
            let list = s.slots.entry(k.service).or_default();
            if list.len() <= k.slot as usize {
                list.resize(k.slot as usize + 1, u32::MAX);
            }
            list[k.slot as usize] = backend;
        }
        // Slots past a service's published count (or of no service) are deletions the earlier
        // agent had not run yet: schedule them again instead of treating them as live.
        let now = Instant::now();
        let counts: BTreeMap<u32, u32> = s.services.values().map(|v| (v.id, v.slot_count)).collect();
        for (service, list) in &mut s.slots {
            let live = counts.get(service).copied().unwrap_or(0);
            if list.len() > live as usize {
                s.pending.push((now, Pending::Slots { service: *service, from: live, to: list.len() as u32 }));
                list.truncate(live as usize);
            }
        }
        s.slots.retain(|_, list| !list.is_empty());
        for id in s.slots.values().flatten() {
            s.backends.add_ref(*id);
        }
        s.orphans = s.backends.unreferenced().collect();
        s.next_service = s.next_service.max(1);
        Ok(s)
    }

    /// The keys of the services in the maps.
    pub fn service_keys(&self) -> impl Iterator<Item = ServiceKey> + '_ {
        self.services.keys().copied()
    }

    /// Makes the service maps equal `desired` (workloads are registered separately, by cgroup).
    pub fn apply(&mut self, maps: &mut Maps, desired: &NodeDataplane, now: Instant) -> Result<ApplyStats> {
        let mut keys: BTreeSet<ServiceKey> = BTreeSet::new();
        for s in &desired.services {
            keys.insert(service_key(s)?);
        }
        let gone: Vec<ServiceKey> = self.services.keys().filter(|k| !keys.contains(k)).copied().collect();
        self.apply_changes(maps, &desired.services, &gone, now)
    }

    /// Writes `upserts` (new or changed services; unchanged ones cost a comparison) and removes
    /// `removed`, leaving every other service alone: what one change costs does not grow with
    /// the mesh. The agent calls it with the services of one Delta response.
    pub fn apply_changes(
        &mut self,
        maps: &mut Maps,
        upserts: &[KernelService],
        removed: &[ServiceKey],
        now: Instant,
    ) -> Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        let mut wanted: BTreeMap<ServiceKey, Wanted<'_>> = BTreeMap::new();
        for s in upserts {
            let key = service_key(s)?;
            let print = fingerprint(s);
            if self.applied.get(&key) == Some(&print) {
                continue;
            }
            let mut backends = Vec::new();
            let mut weights = Vec::new();
            for b in &s.backends {
                let ip: IpAddr = b.address.parse().map_err(|_| {
                    DataplaneError::Invalid(format!("service {}: backend {:?} is not an IP", s.name, b.address))
                })?;
                backends.push(Backend {
                    addr: addr(ip),
                    port: port16(&s.name, b.port)?,
                    family: if ip.is_ipv4() { 4 } else { 6 },
                    pad: 0,
                });
                weights.push(b.weight);
            }
            wanted.insert(key, Wanted { service: s, print, backends, weights });
        }
        // 1. Backends first.
        for Wanted { backends, .. } in wanted.values() {
            for b in backends {
                if self.backends.id_of(b).is_none() {
                    let id = self.backends.insert(*b);
                    if let Err(e) = maps.backends.insert(id, *b, 0) {
                        // Never in the map: the id is free again at once.
                        self.backends.retire(id);
                        self.backends.free(id);
                        return Err(map_error("backends")(e));
                    }
                    // Referenced by the slots written next; collected if not.
                    self.orphans.insert(id);
                    stats.backends_written += 1;
                }
            }
        }
        // 2 and 3. Slots, then the service entry.
        for (key, Wanted { service: s, print, backends, weights }) in &wanted {
            let owners = slots(weights);
            let new_slots: Vec<u32> =
                owners.iter().map(|i| self.backends.id_of(&backends[*i]).expect("written in step 1")).collect();
            let flags = if s.needs_l7 { service_flags::NEEDS_L7 } else { 0 };
            let current = self.services.get(key).copied();
            let id = current.map_or_else(
                || {
                    let id = self.next_service;
                    self.next_service += 1;
                    id
                },
                |c| c.id,
            );
            let old_slots = self.slots.get(&id).cloned().unwrap_or_default();
            self.applied.insert(*key, *print);
            if current.is_some_and(|c| c.slot_count as usize == new_slots.len() && c.flags == flags)
                && old_slots == new_slots
            {
                continue;
            }
            for (i, backend) in new_slots.iter().enumerate() {
                if old_slots.get(i) != Some(backend) {
                    maps.slots
                        .insert(SlotKey { service: id, slot: i as u32 }, *backend, 0)
                        .map_err(map_error("slots"))?;
                }
            }
            let value = ServiceValue {
                id,
                slot_count: new_slots.len() as u32,
                flags,
                revision: current.map_or(1, |c| c.revision.wrapping_add(1)),
            };
            maps.services.insert(*key, value, 0).map_err(map_error("services"))?;
            if old_slots.len() > new_slots.len() {
                self.pending.push((
                    now,
                    Pending::Slots { service: id, from: new_slots.len() as u32, to: old_slots.len() as u32 },
                ));
            }
            self.services.insert(*key, value);
            self.set_slots(id, new_slots);
            stats.services_written += 1;
        }
        // 4. Removed services: unpublish now, free their slots later.
        for key in removed {
            let Some(value) = self.services.remove(key) else { continue };
            self.applied.remove(key);
            deleted(maps.services.remove(key), "services")?;
            let count = self.set_slots(value.id, Vec::new()).len() as u32;
            self.pending.push((now, Pending::Slots { service: value.id, from: 0, to: count }));
            self.pending.push((now, Pending::Counters(value.id)));
            stats.services_removed += 1;
        }
        for id in std::mem::take(&mut self.orphans) {
            if self.backends.retire(id) {
                self.pending.push((now, Pending::Backend(id)));
            }
        }
        Ok(stats)
    }

    /// Replaces a service's slot list, keeping the reference counts; returns the old list.
    fn set_slots(&mut self, service: u32, new: Vec<u32>) -> Vec<u32> {
        for id in &new {
            self.backends.add_ref(*id);
        }
        let old = if new.is_empty() { self.slots.remove(&service) } else { self.slots.insert(service, new) };
        let old = old.unwrap_or_default();
        for id in &old {
            if self.backends.drop_ref(*id) {
                self.orphans.insert(*id);
            }
        }
        old
    }

    /// Deletes what became unreferenced at least [`GRACE`] before `now`. Returns how many
    /// deletions ran.
    pub fn collect(&mut self, maps: &mut Maps, now: Instant) -> Result<usize> {
        let (due, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.pending).into_iter().partition(|(t, _)| now.duration_since(*t) >= GRACE);
        self.pending = later;
        let mut n = 0;
        for (_, p) in due {
            match p {
                Pending::Slots { service, from, to } => {
                    // A service id reused since then may own these slots again.
                    let live = self.slots.get(&service).map_or(0, |s| s.len() as u32);
                    for slot in from.max(live)..to {
                        deleted(maps.slots.remove(&SlotKey { service, slot }), "slots")?;
                        n += 1;
                    }
                }
                Pending::Backend(id) => {
                    if !self.backends.is_live(id) {
                        deleted(maps.backends.remove(&id), "backends")?;
                        self.backends.free(id);
                        n += 1;
                    }
                }
                Pending::Counters(id) => {
                    if !self.services.values().any(|s| s.id == id) {
                        deleted(maps.counters.remove(&id), "counters")?;
                        n += 1;
                    }
                }
            }
        }
        Ok(n)
    }

    /// Deletions still waiting for their grace period.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn slots_follow_weights() {
        assert_eq!(slots(&[4, 1]), vec![0, 0, 0, 0, 1]);
        assert_eq!(slots(&[50, 50]), vec![0, 1]);
        assert_eq!(slots(&[1, 1, 1]), vec![0, 1, 2]);
        assert!(slots(&[]).is_empty());
        assert!(slots(&[0]).is_empty());
    }

    proptest! {
        #[test]
        fn slots_are_bounded_and_give_every_backend_its_share(weights in proptest::collection::vec(1u32..100_000, 1..200)) {
            let s = slots(&weights);
            prop_assert!(s.len() <= MAX_SLOTS as usize || s.len() == weights.len());
            let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
            for (i, w) in weights.iter().enumerate() {
                let owned = s.iter().filter(|x| **x == i).count();
                prop_assert!(owned >= 1, "every backend keeps a slot");
                let want = f64::from(*w) / total as f64;
                let got = owned as f64 / s.len() as f64;
                // Scaling rounds down and keeps at least one slot each: within 1/MAX_SLOTS·n.
                prop_assert!((want - got).abs() <= weights.len() as f64 / f64::from(MAX_SLOTS) + 1e-9, "{i}: want {want} got {got}");
            }
        }
    }
}
