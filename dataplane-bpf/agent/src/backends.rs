//! The agent's copy of the backends map: each backend id's address and how many service slots
//! point at it, in one dense table indexed by id, with a hash index from address to id that
//! holds only ids (a mesh of 100 000 backends is about 3 MB here, not three ordered maps).
//!
//! An id stops being live when its last slot goes; it is reused only after [`BackendTable::free`],
//! which the agent calls once the map entry is deleted (after the grace period), so a program
//! that read an old slot never finds another backend under its id.

use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;
use sluice_dataplane_common::Backend;

/// One id's state: a backend and how many slots point at it, or (in `refs`, past any real
/// count) free or retired. No enum tag: 24 bytes an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    backend: Backend,
    refs: u32,
}

/// Never used, or deleted from the map: may be handed out again.
const FREE: u32 = u32::MAX;
/// Out of the index (no new slot points at it), still in the map until the grace period ends.
const RETIRED: u32 = u32::MAX - 1;

const _: () = assert!(std::mem::size_of::<Entry>() == 24);

impl Entry {
    const FREE: Entry = Entry { backend: Backend { addr: [0; 16], port: 0, family: 0, pad: 0 }, refs: FREE };

    fn is_live(&self) -> bool {
        self.refs < RETIRED
    }
}

/// Backends by id and by address.
#[derive(Debug)]
pub struct BackendTable {
    /// Indexed by id; id 0 is never used.
    entries: Vec<Entry>,
    /// Live ids, found by their backend.
    index: HashTable<u32>,
    /// Free ids below `entries.len()`, reused last in first out.
    free: Vec<u32>,
    hasher: RandomState,
}

impl Default for BackendTable {
    fn default() -> Self {
        Self { entries: vec![Entry::FREE], index: HashTable::new(), free: Vec::new(), hasher: RandomState::new() }
    }
}

impl BackendTable {
    fn live(&self, id: u32) -> Option<(Backend, u32)> {
        self.entries.get(id as usize).filter(|e| e.is_live()).map(|e| (e.backend, e.refs))
    }

    /// The live id of `backend`.
    pub fn id_of(&self, backend: &Backend) -> Option<u32> {
        let hash = self.hasher.hash_one(backend);
        self.index.find(hash, |id| self.live(*id).is_some_and(|(b, _)| b == *backend)).copied()
    }

    /// The backend a live id stands for.
    pub fn backend(&self, id: u32) -> Option<Backend> {
        self.live(id).map(|(b, _)| b)
    }

    /// True while `id` is live.
    pub fn is_live(&self, id: u32) -> bool {
        self.live(id).is_some()
    }

    /// Records `backend` (not live yet) under a free id, with no references; returns the id.
    pub fn insert(&mut self, backend: Backend) -> u32 {
        let id = self.free.pop().unwrap_or_else(|| {
            self.entries.push(Entry::FREE);
            (self.entries.len() - 1) as u32
        });
        self.put(id, backend);
        id
    }

    /// Records `backend` under `id` (as an earlier agent left it in the map).
    pub fn adopt(&mut self, id: u32, backend: Backend) {
        let at = id as usize;
        if self.entries.len() <= at {
            self.entries.resize(at + 1, Entry::FREE);
        }
        self.put(id, backend);
    }

    fn put(&mut self, id: u32, backend: Backend) {
        self.entries[id as usize] = Entry { backend, refs: 0 };
        let hash = self.hasher.hash_one(backend);
        let (entries, hasher) = (&self.entries, &self.hasher);
        self.index.insert_unique(hash, id, |id| hasher.hash_one(entries[*id as usize].backend));
    }

    /// Rebuilds the free list after adoption: every id not in the map may be handed out.
    pub fn settle(&mut self) {
        self.free = (1..self.entries.len() as u32).rev().filter(|id| self.entries[*id as usize].refs == FREE).collect();
    }

    /// One more slot points at `id`.
    pub fn add_ref(&mut self, id: u32) {
        if let Some(e) = self.entries.get_mut(id as usize).filter(|e| e.is_live()) {
            e.refs += 1;
        }
    }

    /// One slot fewer points at `id`; true when it was the last.
    pub fn drop_ref(&mut self, id: u32) -> bool {
        match self.entries.get_mut(id as usize) {
            Some(e) if e.is_live() && e.refs > 0 => {
                e.refs -= 1;
                e.refs == 0
            }
            _ => false,
        }
    }

    /// How many slots point at `id` (0 for an id that is not live).
    pub fn refs(&self, id: u32) -> u32 {
        self.live(id).map_or(0, |(_, r)| r)
    }

    /// Takes a live, unreferenced id out of the index: nothing new points at it; its map entry
    /// goes after the grace period, then [`BackendTable::free`]. Returns false (and does
    /// nothing) for an id that is not live or still referenced.
    pub fn retire(&mut self, id: u32) -> bool {
        let Some((backend, 0)) = self.live(id) else { return false };
        let hash = self.hasher.hash_one(backend);
        if let Ok(found) = self.index.find_entry(hash, |i| *i == id) {
            found.remove();
        }
        self.entries[id as usize].refs = RETIRED;
        true
    }

    /// `id`'s map entry is deleted: the id may be handed out again.
    pub fn free(&mut self, id: u32) {
        if let Some(e) = self.entries.get_mut(id as usize).filter(|e| e.refs == RETIRED) {
            *e = Entry::FREE;
            self.free.push(id);
        }
    }

    /// Live ids no slot points at.
    pub fn unreferenced(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.entries.len() as u32).filter(|id| self.live(*id).is_some_and(|(_, r)| r == 0))
    }

    /// Live backends.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when no backend is live.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn backend(n: u8) -> Backend {
        Backend { addr: [n; 16], port: 80, family: 6, pad: 0 }
    }

    #[test]
    fn ids_are_reused_only_after_they_are_freed() {
        let mut t = BackendTable::default();
        let a = t.insert(backend(1));
        let b = t.insert(backend(2));
        assert_eq!((a, b), (1, 2), "id 0 is never used");
        t.add_ref(a);
        assert!(!t.retire(a), "a referenced id stays live");
        assert!(t.drop_ref(a));
        assert!(t.retire(a));
        assert_eq!(t.id_of(&backend(1)), None);
        assert!(!t.is_live(a));
        assert_eq!(t.insert(backend(1)), 3, "a retired id is not handed out again");
        t.free(a);
        assert_eq!(t.insert(backend(9)), a, "a freed one is");
        assert_eq!(t.backend(a), Some(backend(9)));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn adoption_frees_the_gaps() {
        let mut t = BackendTable::default();
        t.adopt(5, backend(5));
        t.adopt(2, backend(2));
        t.settle();
        assert_eq!(t.id_of(&backend(5)), Some(5));
        assert_eq!(t.unreferenced().collect::<Vec<_>>(), [2, 5]);
        let fresh: Vec<u32> = (0..4).map(|i| t.insert(backend(10 + i))).collect();
        assert_eq!(fresh, [1, 3, 4, 6]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8),
        AddRef(u8),
        DropRef(u8),
        Retire(u8),
        Free(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..16).prop_map(Op::Insert),
            (0u8..24).prop_map(Op::AddRef),
            (0u8..24).prop_map(Op::DropRef),
            (0u8..24).prop_map(Op::Retire),
            (0u8..24).prop_map(Op::Free),
        ]
    }

    proptest! {
        /// The table agrees with a plain model: live ids with their backend and count, retired
        /// ids, and no id live twice or handed out while retired.
        #[test]
        fn the_table_matches_a_model(ops in proptest::collection::vec(op(), 1..200)) {
            let mut t = BackendTable::default();
            let mut live: BTreeMap<u32, (Backend, u32)> = BTreeMap::new();
            let mut retired: Vec<u32> = Vec::new();
            for op in ops {
                match op {
                    Op::Insert(n) => {
                        if live.values().any(|(b, _)| *b == backend(n)) { continue }
                        let id = t.insert(backend(n));
                        prop_assert!(id != 0 && !live.contains_key(&id) && !retired.contains(&id));
                        live.insert(id, (backend(n), 0));
                    }
                    Op::AddRef(id) => {
                        t.add_ref(u32::from(id));
                        if let Some((_, r)) = live.get_mut(&u32::from(id)) { *r += 1 }
                    }
                    Op::DropRef(id) => {
                        let last = t.drop_ref(u32::from(id));
                        let want = live.get_mut(&u32::from(id)).filter(|(_, r)| *r > 0).map(|(_, r)| { *r -= 1; *r == 0 });
                        prop_assert_eq!(last, want.unwrap_or(false));
                    }
                    Op::Retire(id) => {
                        let id = u32::from(id);
                        let want = live.get(&id).is_some_and(|(_, r)| *r == 0);
                        prop_assert_eq!(t.retire(id), want);
                        if want { live.remove(&id); retired.push(id); }
                    }
                    Op::Free(id) => {
                        t.free(u32::from(id));
                        retired.retain(|r| *r != u32::from(id));
                    }
                }
                prop_assert_eq!(t.len(), live.len());
                for (id, (b, r)) in &live {
                    prop_assert_eq!(t.id_of(b), Some(*id));
                    prop_assert_eq!(t.refs(*id), *r);
                }
                let unreferenced: Vec<u32> = live.iter().filter(|(_, (_, r))| *r == 0).map(|(id, _)| *id).collect();
                prop_assert_eq!(t.unreferenced().collect::<Vec<_>>(), unreferenced);
            }
        }
    }
}
