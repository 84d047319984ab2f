//! Per-proxy snapshots: the resources of each type with a version per type.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use imbl::OrdMap;
use imbl::ordmap::DiffItem;
use smol_str::SmolStr;

use crate::resource::Encoded;

pub use crate::type_url::{CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE, is_wildcard_type};

/// Resources of one type by name, with their content hash (names and versions). Immutable once
/// built, so snapshots share them: every proxy of a class holds the same set. A persistent map:
/// a set with a few resources changed shares the rest with the set it came from, and comparing
/// the two skips what they share.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResourceSet {
    map: OrdMap<SmolStr, Arc<Encoded>>,
    hash: u64,
}

/// One entry's part of a set's hash; the set's hash is their sum, so it follows a change in
/// the time of the change.
fn entry_hash(name: &str, r: &Encoded) -> u64 {
    let mut h = DefaultHasher::new();
    name.hash(&mut h);
    r.version.hash(&mut h);
    h.finish()
}

/// How a set differs from an older one.
pub enum Difference<'a> {
    /// Added or changed.
    Put(&'a Arc<Encoded>),
    /// Gone.
    Removed(&'a str),
}

impl ResourceSet {
    fn from_map(map: OrdMap<SmolStr, Arc<Encoded>>) -> Self {
        let hash = map.iter().fold(0u64, |h, (name, r)| h.wrapping_add(entry_hash(name, r)));
        Self { map, hash }
    }

    /// This set with `put` added or replaced and `removed` taken out.
    pub fn with(&self, put: impl IntoIterator<Item = Arc<Encoded>>, removed: impl IntoIterator<Item = String>) -> Self {
        let mut next = self.clone();
        for name in removed {
            if let Some(old) = next.map.remove(name.as_str()) {
                next.hash = next.hash.wrapping_sub(entry_hash(&name, &old));
            }
        }
        for r in put {
            next.hash = next.hash.wrapping_add(entry_hash(&r.name, &r));
            if let Some(old) = next.map.insert(r.name.clone(), r) {
                next.hash = next.hash.wrapping_sub(entry_hash(&old.name, &old));
            }
        }
        next
    }

    /// What changed from `older` to this set, skipping what the two share.
    pub fn diff<'a>(&'a self, older: &'a ResourceSet) -> impl Iterator<Item = Difference<'a>> {
        older.map.diff(&self.map).map(|d| match d {
            DiffItem::Add(_, r) | DiffItem::Update { new: (_, r), .. } => Difference::Put(r),
            DiffItem::Remove(name, _) => Difference::Removed(name),
        })
    }

    /// The resource called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Encoded>> {
        self.map.get(name)
    }

    /// Resources in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arc<Encoded>)> {
        self.map.iter().map(|(name, r)| (name.as_str(), r))
    }

    /// Names in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(SmolStr::as_str)
    }

    /// Resources in name order.
    pub fn values(&self) -> impl Iterator<Item = &Arc<Encoded>> {
        self.map.values()
    }

    /// Number of resources.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The resources of one type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypeResources {
    /// Version of this type's content (changes only when the content does).
    pub version: String,
    /// Resources by name, possibly shared with other snapshots.
    pub items: Arc<ResourceSet>,
}

/// Per-type resource sets built once and shared by many snapshots (the half of a config that
/// every proxy of a class receives).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SharedTypes {
    types: BTreeMap<String, Arc<ResourceSet>>,
}

/// Resources grouped by type; of two with one name, the later wins.
fn by_type(resources: impl IntoIterator<Item = Arc<Encoded>>) -> BTreeMap<String, OrdMap<SmolStr, Arc<Encoded>>> {
    let mut types: BTreeMap<String, OrdMap<SmolStr, Arc<Encoded>>> = BTreeMap::new();
    for r in resources {
        types.entry(r.type_url.clone()).or_default().insert(r.name.clone(), r);
    }
    types
}

impl SharedTypes {
    /// Groups `resources` by type.
    pub fn new(resources: impl IntoIterator<Item = Arc<Encoded>>) -> Self {
        Self { types: by_type(resources).into_iter().map(|(t, m)| (t, Arc::new(ResourceSet::from_map(m)))).collect() }
    }

    /// These sets with the resources of `type_url` replaced by (or added from) `put`.
    pub fn with(&self, type_url: &str, put: Vec<Arc<Encoded>>) -> Self {
        let mut next = self.clone();
        let set = next.types.entry(type_url.to_string()).or_default();
        *set = Arc::new(set.with(put, []));
        next
    }
}

/// Everything one proxy (or group of proxies) receives.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The config version this snapshot was built from (monotonic, set by the caller).
    pub version: u64,
    /// Resources by type URL.
    pub types: BTreeMap<String, TypeResources>,
}

impl Snapshot {
    /// Builds a snapshot at `version` from encoded resources. A type whose content equals its
    /// content in `previous` keeps the previous version string, so unchanged types are not pushed.
    pub fn new(version: u64, resources: impl IntoIterator<Item = Arc<Encoded>>, previous: Option<&Snapshot>) -> Self {
        Self::layered(version, &SharedTypes::default(), resources, previous)
    }

    /// As [`Snapshot::new`], from `shared` sets plus this snapshot's `own` resources. A type with
    /// no own resources reuses the shared set itself (no copy); on a name in both, the shared
    /// resource wins.
    pub fn layered(
        version: u64,
        shared: &SharedTypes,
        own: impl IntoIterator<Item = Arc<Encoded>>,
        previous: Option<&Snapshot>,
    ) -> Self {
        let mut own = by_type(own);
        let mut names: Vec<String> = shared.types.keys().chain(own.keys()).cloned().collect();
        names.extend(PUSH_ORDER.iter().map(|t| t.to_string()));
        names.sort();
        names.dedup();
        let mut types = BTreeMap::new();
        for type_url in names {
            let items = match (shared.types.get(&type_url), own.remove(&type_url)) {
                (Some(s), None) => s.clone(),
                (Some(base), Some(mine)) => {
                    let mine = mine.into_iter().filter(|(name, _)| base.get(name).is_none()).map(|(_, r)| r);
                    Arc::new(base.with(mine, []))
                }
                (None, mine) => Arc::new(ResourceSet::from_map(mine.unwrap_or_default())),
            };
            let prior = previous.and_then(|p| p.types.get(&type_url));
            let version = match prior {
                Some(p) if p.items.hash == items.hash => p.version.clone(),
                _ => version.to_string(),
            };
            types.insert(type_url, TypeResources { version, items });
        }
        Self { version, types }
    }

    /// The resources of a type (empty if none).
    pub fn of(&self, type_url: &str) -> Option<&TypeResources> {
        self.types.get(type_url)
    }

    /// This snapshot at `version` with `put` added or replaced and `removed` (type, name) taken
    /// out: the cost of the change, not of the snapshot. Unchanged types keep their version.
    pub fn patched(
        &self,
        version: u64,
        put: impl IntoIterator<Item = Arc<Encoded>>,
        removed: impl IntoIterator<Item = (String, String)>,
    ) -> Self {
        let mut changes: BTreeMap<String, (Vec<Arc<Encoded>>, Vec<String>)> = BTreeMap::new();
        for r in put {
            changes.entry(r.type_url.clone()).or_default().0.push(r);
        }
        for (type_url, name) in removed {
            changes.entry(type_url).or_default().1.push(name);
        }
        let mut next = Self { version, types: self.types.clone() };
        for (type_url, (put, removed)) in changes {
            let prior = next.types.entry(type_url).or_default();
            let items = Arc::new(prior.items.with(put, removed));
            if items.hash != prior.items.hash {
                prior.version = version.to_string();
            }
            prior.items = items;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(type_url: &str, name: &str, body: &[u8]) -> Arc<Encoded> {
        Arc::new(Encoded::new(type_url, name, body.to_vec()))
    }

    #[test]
    fn layered_snapshots_share_what_they_do_not_add_to() {
        let shared = SharedTypes::new([r(CLUSTER, "a", b"1"), r(ENDPOINT, "a", b"1"), r(LISTENER, "out", b"1")]);
        let one = Snapshot::layered(1, &shared, [r(LISTENER, "in", b"1"), r(LISTENER, "out", b"mine")], None);
        let two = Snapshot::layered(1, &shared, [], None);
        assert!(Arc::ptr_eq(&one.types[ENDPOINT].items, &two.types[ENDPOINT].items), "no copy per snapshot");
        let listeners = &one.types[LISTENER].items;
        assert_eq!(listeners.keys().collect::<Vec<_>>(), ["in", "out"]);
        assert_eq!(listeners.get("out").unwrap().bytes, &b"1"[..], "the shared resource wins a name clash");
        assert_eq!(two.types[LISTENER].items.len(), 1);
        // Same content at a new config version: versions stay, so nothing is pushed.
        let next =
            Snapshot::layered(2, &SharedTypes::new([r(CLUSTER, "a", b"1"), r(ENDPOINT, "a", b"2")]), [], Some(&two));
        assert_eq!(next.types[CLUSTER].version, "1");
        assert_eq!(next.types[ENDPOINT].version, "2", "changed content gets the new version");
        assert_eq!(next.types[LISTENER].version, "2", "a listener went away");
        assert_eq!(Snapshot::new(1, [r(ROUTE, "x", b"1")], None).types.len(), 4, "every pushed type is present");
    }
}
