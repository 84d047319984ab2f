//! What the agent keeps of the resources it received: their versions (sent back when a stream
//! resumes) and the map-ready values it needs later, not the decoded messages. A mesh of
//! 100 000 workloads is 100 000 of these, so each is a few dozen bytes.

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse;
use prost::Message;
use sluice_dataplane_api::{KernelAuthorization, KernelService, KernelWorkload};
use sluice_dataplane_common::{ServiceKey, Workload};
use smol_str::SmolStr;

use crate::policy::workload_value;
use crate::sync::service_key;

/// A resource version as received. sluice's versions are 16 hex digits, held as a number;
/// any other text is kept as it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Version {
    /// 16 lowercase hex digits.
    Hex(u64),
    /// Anything else (boxed twice: a thin pointer keeps a held workload small).
    Text(Box<Box<str>>),
}

impl Version {
    /// The version `text` names.
    pub fn parse(text: &str) -> Self {
        let hex = text.len() == 16 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        match u64::from_str_radix(text, 16) {
            Ok(n) if hex => Version::Hex(n),
            _ => Version::Text(Box::new(text.into())),
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Version::Hex(n) => write!(f, "{n:016x}"),
            Version::Text(t) => f.write_str(t),
        }
    }
}

/// A held service entry: its version and the map key it was written under (to remove it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldService {
    /// Version received.
    pub version: Version,
    /// The entry's key in the services map.
    pub key: ServiceKey,
}

/// A held workload: what its cgroup's map entry, its address's identity and its policy set
/// are made of.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldWorkload {
    /// Version received.
    pub version: Version,
    /// The workload's map value (identity, namespace, policy set, mode, address).
    pub value: Workload,
    /// Its rules, when the kernel protects it (`value.policy` is not 0).
    pub authorization: Option<Box<KernelAuthorization>>,
    /// It runs on this node: `sluice run` may start it here.
    pub local: bool,
    /// Its service account: with its namespace, the identity its certificate carries.
    pub service_account: SmolStr,
    /// A Pod's UID, which names its containers' cgroups.
    pub pod_uid: Option<SmolStr>,
}

/// The held form of a resource type's messages.
pub trait Hold: Message + Default {
    /// What is held of it.
    type Held;
    /// The held form of `self` at `version`, or why it cannot be held.
    fn hold(&self, version: Version) -> Result<Self::Held, String>;
}

impl Hold for KernelService {
    type Held = HeldService;
    fn hold(&self, version: Version) -> Result<HeldService, String> {
        Ok(HeldService { version, key: service_key(self).map_err(|e| e.to_string())? })
    }
}

impl Hold for KernelWorkload {
    type Held = HeldWorkload;
    fn hold(&self, version: Version) -> Result<HeldWorkload, String> {
        let value = workload_value(self);
        let authorization = self.authorization.clone().filter(|_| value.policy != 0).map(Box::new);
        let service_account = SmolStr::new(&self.service_account);
        let pod_uid = self.pod_uid.as_deref().map(SmolStr::new);
        Ok(HeldWorkload { version, value, authorization, local: self.local, service_account, pod_uid })
    }
}

/// Held resources of one type: a vector sorted by name (a workload is about 90 bytes here;
/// an ordered tree's half-full nodes and a boxed name each doubled that).
#[derive(Debug, Clone, PartialEq)]
pub struct HeldSet<H> {
    entries: Vec<(SmolStr, H)>,
}

impl<H> Default for HeldSet<H> {
    fn default() -> Self {
        Self { entries: Vec::new() }
    }
}

/// A batch with more insertions and removals than this is merged into a new vector in one
/// pass; fewer are moved into place one by one.
const IN_PLACE: usize = 8;

impl<H> HeldSet<H> {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        self.entries.binary_search_by(|(n, _)| n.as_str().cmp(name))
    }

    /// What `name` holds.
    pub fn get(&self, name: &str) -> Option<&H> {
        self.find(name).ok().map(|i| &self.entries[i].1)
    }

    /// Names and values, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &H)> + Clone {
        self.entries.iter().map(|(n, h)| (n.as_str(), h))
    }

    /// Values, in name order.
    pub fn values(&self) -> impl Iterator<Item = &H> {
        self.entries.iter().map(|(_, h)| h)
    }

    /// How many names are held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Holds `value` under `name`; returns what it held before.
    pub fn insert(&mut self, name: SmolStr, value: H) -> Option<H> {
        self.apply(vec![(name, Some(value))]).pop().and_then(|(_, old)| old)
    }

    /// Drops `name`; returns what it held.
    pub fn remove(&mut self, name: &str) -> Option<H> {
        self.apply(vec![(name.into(), None)]).pop().and_then(|(_, old)| old)
    }

    /// Sets each name in turn to its value (None: dropped) and returns, in the same order, what
    /// each held just before its own step.
    pub fn apply(&mut self, items: Vec<(SmolStr, Option<H>)>) -> Vec<(SmolStr, Option<H>)> {
        let moves = items.iter().filter(|(name, value)| self.find(name).is_ok() != value.is_some()).count();
        if moves <= IN_PLACE {
            return items.into_iter().map(|(name, value)| self.set(name, value)).collect();
        }
        self.merge(items)
    }

    fn set(&mut self, name: SmolStr, value: Option<H>) -> (SmolStr, Option<H>) {
        let old = match (self.find(&name), value) {
            (Ok(i), Some(v)) => Some(std::mem::replace(&mut self.entries[i].1, v)),
            (Ok(i), None) => Some(self.entries.remove(i).1),
            (Err(i), Some(v)) => {
                self.entries.insert(i, (name.clone(), v));
                None
            }
            (Err(_), None) => None,
        };
        (name, old)
    }

    /// [`HeldSet::apply`] for a large batch: one ordered pass over the held entries and the
    /// batch sorted by name (and, for one name, by its place in the batch).
    fn merge(&mut self, items: Vec<(SmolStr, Option<H>)>) -> Vec<(SmolStr, Option<H>)> {
        let mut ops: Vec<(SmolStr, usize, Option<H>)> =
            items.into_iter().enumerate().map(|(i, (name, value))| (name, i, value)).collect();
        ops.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
        let old = std::mem::take(&mut self.entries);
        let mut out = Vec::with_capacity(old.len() + ops.len());
        let mut before: Vec<(usize, SmolStr, Option<H>)> = Vec::with_capacity(ops.len());
        let mut old = old.into_iter();
        let mut ops = ops.into_iter().peekable();
        while let Some((name, ..)) = ops.peek() {
            let name = name.clone();
            // The held entries before this name move as one run, found by a binary search.
            let run = old.as_slice().partition_point(|(n, _)| *n < name);
            out.extend(old.by_ref().take(run));
            let held = old.as_slice().first().is_some_and(|(n, _)| *n == name);
            let mut current = if held { old.next().map(|(_, v)| v) } else { None };
            while let Some((n, i, value)) = ops.next_if(|(n, ..)| *n == name) {
                before.push((i, n, std::mem::replace(&mut current, value)));
            }
            if let Some(v) = current {
                out.push((name, v));
            }
        }
        out.extend(old);
        out.shrink_to_fit();
        self.entries = out;
        before.sort_unstable_by_key(|(i, ..)| *i);
        before.into_iter().map(|(_, name, old)| (name, old)).collect()
    }
}

/// What applying a Delta response changed in the held resources of one type: the value each
/// touched name had before (None: it was absent), so a failed apply can be undone. The held
/// set is changed in place: a copy of it per response would be the whole mesh each time.
#[derive(Debug)]
pub struct Undo<H> {
    /// Upserted names and what they held before.
    pub before: Vec<(SmolStr, Option<H>)>,
    /// Removed names and what they held.
    pub removed: Vec<(SmolStr, H)>,
}

impl<H> Undo<H> {
    /// Puts every touched name back as it was: the steps undone last to first.
    pub fn revert(self, held: &mut HeldSet<H>) {
        let removed = self.removed.into_iter().rev().map(|(name, old)| (name, Some(old)));
        held.apply(removed.chain(self.before.into_iter().rev()).collect());
    }
}

/// Applies `response` to `held` (new and changed resources decoded and held, removed ones
/// dropped) and returns the decoded messages with the undo record; or leaves `held` as it was
/// and returns the NACK's message.
pub fn update<M: Hold>(
    held: &mut HeldSet<M::Held>,
    response: &DeltaDiscoveryResponse,
) -> Result<(Vec<M>, Undo<M::Held>), String> {
    let mut decoded = Vec::with_capacity(response.resources.len());
    let mut batch = Vec::with_capacity(response.resources.len() + response.removed_resources.len());
    for r in &response.resources {
        let bytes = r.resource.as_ref().map(|a| a.value.as_slice()).unwrap_or_default();
        let invalid = |e: String| format!("{} {}: {e}", response.type_url, r.name);
        let value = M::decode(bytes).map_err(|e| invalid(e.to_string()))?;
        batch.push((SmolStr::from(r.name.as_str()), Some(value.hold(Version::parse(&r.version)).map_err(invalid)?)));
        decoded.push(value);
    }
    let upserts = batch.len();
    batch.extend(response.removed_resources.iter().map(|name| (SmolStr::from(name.as_str()), None)));
    let mut before = held.apply(batch);
    // Only what was held is recorded as removed.
    let removed = before.split_off(upserts).into_iter().filter_map(|(name, old)| Some((name, old?))).collect();
    Ok((decoded, Undo { before, removed }))
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::Resource;
    use envoy_types::pb::google::protobuf::Any;
    use sluice_dataplane_api::SERVICE_TYPE;

    use super::*;

    fn service(name: &str, port: u32) -> KernelService {
        KernelService { name: name.into(), vip: "127.100.0.1".into(), port, ..Default::default() }
    }

    fn resource(s: &KernelService, version: &str) -> Resource {
        Resource {
            name: s.name.clone(),
            version: version.into(),
            resource: Some(Any { type_url: SERVICE_TYPE.into(), value: s.encode_to_vec() }),
            ..Default::default()
        }
    }

    fn hold(held: &mut HeldSet<HeldService>, s: &KernelService, version: &str) {
        held.insert(s.name.as_str().into(), s.hold(Version::parse(version)).unwrap());
    }

    #[test]
    fn versions_are_held_as_numbers_when_they_are_sluices_and_as_text_otherwise() {
        for text in ["00000000000000ff", "0123456789abcdef", "1", "v2", "0123456789ABCDEF", "+123456789abcdef"] {
            assert_eq!(Version::parse(text).to_string(), text);
        }
        assert_eq!(Version::parse("00000000000000ff"), Version::Hex(255));
        assert!(matches!(Version::parse("0123456789ABCDEF"), Version::Text(_)), "upper case is not sluice's");
        assert!(matches!(Version::parse("+123456789abcdef"), Version::Text(_)));
    }

    #[test]
    fn a_response_is_applied_in_place_and_reverted_exactly() {
        let mut held = HeldSet::new();
        hold(&mut held, &service("a", 80), "1");
        hold(&mut held, &service("b", 80), "1");
        let before = held.clone();
        let response = DeltaDiscoveryResponse {
            type_url: SERVICE_TYPE.into(),
            resources: vec![resource(&service("a", 81), "2"), resource(&service("c", 80), "1")],
            removed_resources: vec!["b".into(), "never-held".into()],
            ..Default::default()
        };
        let (decoded, undo) = update::<KernelService>(&mut held, &response).unwrap();
        assert_eq!(decoded, [service("a", 81), service("c", 80)]);
        assert_eq!(held.iter().map(|(k, _)| k).collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(held.get("a").unwrap().key.port, 81);
        assert_eq!(held.get("a").unwrap().version, Version::Text(Box::new("2".into())));
        assert_eq!(undo.removed.len(), 1, "only what was held is recorded as removed");
        assert_eq!(&*undo.removed[0].0, "b");
        undo.revert(&mut held);
        assert_eq!(held, before);

        let broken = DeltaDiscoveryResponse {
            type_url: SERVICE_TYPE.into(),
            resources: vec![Resource {
                name: "x".into(),
                resource: Some(Any { type_url: SERVICE_TYPE.into(), value: vec![0xff, 0xff] }),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(update::<KernelService>(&mut held, &broken).unwrap_err().contains(" x: "));
        let bad_vip = KernelService { vip: "not-an-ip".into(), ..service("y", 80) };
        let unholdable = DeltaDiscoveryResponse {
            type_url: SERVICE_TYPE.into(),
            resources: vec![resource(&service("d", 80), "1"), resource(&bad_vip, "1")],
            ..Default::default()
        };
        let err = update::<KernelService>(&mut held, &unholdable).unwrap_err();
        assert!(err.contains(" y: ") && err.contains("not-an-ip"), "{err}");
        assert_eq!(held, before, "a response that does not decode or hold changes nothing");
    }

    proptest::proptest! {
        /// A batch (large ones merged, small ones in place) does what setting each name in turn
        /// does to an ordered map, reports each step's prior value, and reverts exactly.
        #[test]
        fn batches_match_an_ordered_map(
            start in proptest::collection::btree_map(0u8..40, 0u32..5, 0..30),
            upserts in proptest::collection::vec((0u8..40, 0u32..5), 0..30),
            removals in proptest::collection::vec(0u8..40, 0..20),
        ) {
            let name = |n: u8| SmolStr::from(format!("w{n:02}"));
            let mut held = HeldSet::new();
            held.apply(start.iter().map(|(n, v)| (name(*n), Some(*v))).collect());
            let mut model: std::collections::BTreeMap<SmolStr, u32> = start.iter().map(|(n, v)| (name(*n), *v)).collect();
            let original = held.clone();
            // As `update` builds a batch: upserts, then removals (a name may be in both).
            let items: Vec<(SmolStr, Option<u32>)> = upserts.iter().map(|(n, v)| (name(*n), Some(*v)))
                .chain(removals.iter().map(|n| (name(*n), None))).collect();
            let mut want = Vec::new();
            for (n, v) in &items {
                want.push((n.clone(), match v { Some(v) => model.insert(n.clone(), *v), None => model.remove(n) }));
            }
            let before = held.apply(items.clone());
            proptest::prop_assert_eq!(&before, &want);
            proptest::prop_assert_eq!(held.iter().map(|(n, v)| (SmolStr::from(n), *v)).collect::<Vec<_>>(), model.into_iter().collect::<Vec<_>>());
            let mut before = before;
            let removed = before.split_off(upserts.len()).into_iter().filter_map(|(n, o)| Some((n, o?))).collect();
            Undo { before, removed }.revert(&mut held);
            proptest::prop_assert_eq!(held, original);
        }
    }
}
