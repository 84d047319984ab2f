//! The config store: the accepted objects, their version, and the last-good rule — an object
//! that fails to parse or validate keeps being served in its last good form. With a state
//! directory, the accepted objects and the version live in sled so a restart serves at once and
//! versions never go backwards.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use sluice_translator::diagnostic::{Diagnostic, ObjectRef, Severity};
use sluice_translator::model::Loaded;
use sluice_translator::parse::parse_documents;
use sluice_translator::snapshot::Snapshot;

/// A persistence failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("state directory {path}: {source}")]
    Sled {
        /// The state directory.
        path: String,
        /// The cause.
        source: sled::Error,
    },
}

/// Accepted objects and their version.
pub struct ConfigStore {
    accepted: BTreeMap<ObjectRef, Arc<Loaded>>,
    version: u64,
    fingerprint: u64,
    diagnostics: Vec<Diagnostic>,
    db: Option<(sled::Db, String)>,
}

const VERSION_KEY: &[u8] = b"version";

fn key(r: &ObjectRef) -> String {
    format!("{}/{}/{}", r.kind, r.namespace, r.name)
}

impl ConfigStore {
    /// A store; with `state_dir`, reopens the persisted objects and version.
    pub fn open(state_dir: Option<&Path>) -> Result<Self, StoreError> {
        let mut store =
            Self { accepted: BTreeMap::new(), version: 0, fingerprint: 0, diagnostics: Vec::new(), db: None };
        let Some(dir) = state_dir else { return Ok(store) };
        let path = dir.display().to_string();
        let err = |source| StoreError::Sled { path: path.clone(), source };
        let db = sled::open(dir).map_err(err)?;
        if let Some(v) = db.get(VERSION_KEY).map_err(err)? {
            store.version = u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]));
        }
        let objects = db.open_tree("objects").map_err(err)?;
        for item in objects.iter() {
            let (_, value) = item.map_err(err)?;
            let Ok(saved) = serde_json::from_slice::<serde_json::Value>(&value) else { continue };
            let origin = saved["origin"].as_str().unwrap_or("state").to_string();
            let (loaded, _) = parse_documents(&origin, &saved["raw"].to_string());
            for l in loaded {
                store.accepted.insert(l.reference.clone(), Arc::new(l));
            }
        }
        store.fingerprint = store.compute_fingerprint();
        store.db = Some((db, path));
        Ok(store)
    }

    /// Config version: bumped on every change of the accepted objects, persisted.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Number of accepted objects.
    pub fn len(&self) -> usize {
        self.accepted.len()
    }

    /// True when nothing is accepted.
    pub fn is_empty(&self) -> bool {
        self.accepted.is_empty()
    }

    /// The diagnostics of the last load.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        &self.diagnostics
    }

    /// The accepted objects.
    pub fn objects(&self) -> impl Iterator<Item = &Loaded> {
        self.accepted.values().map(|l| l.as_ref())
    }

    fn compute_fingerprint(&self) -> u64 {
        let mut h = DefaultHasher::new();
        for (r, l) in &self.accepted {
            r.hash(&mut h);
            // Each object's hash was taken once, when it was parsed.
            l.fingerprint.hash(&mut h);
        }
        h.finish()
    }

    /// Takes a fresh load of the sources. Objects the load rejected keep their last good form,
    /// as do all objects of a file that could not be parsed at all. Returns true when the
    /// accepted set changed (and the version was bumped).
    pub fn apply(&mut self, loaded: Vec<Arc<Loaded>>, diagnostics: Vec<Diagnostic>) -> Result<bool, StoreError> {
        let mut next: BTreeMap<ObjectRef, Arc<Loaded>> = BTreeMap::new();
        for l in loaded {
            next.entry(l.reference.clone()).or_insert(l);
        }
        let rejected: BTreeSet<&ObjectRef> =
            diagnostics.iter().filter(|d| d.severity == Severity::Error).filter_map(|d| d.object.as_ref()).collect();
        let broken_files: BTreeSet<&str> = diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error && d.object.is_none())
            .map(|d| d.origin.as_str())
            .collect();
        for (r, old) in &self.accepted {
            let keep = rejected.contains(r) || broken_files.contains(old.origin.as_str());
            if keep && !next.contains_key(r) {
                tracing::warn!(object = %r, "keeping the last good version of a rejected object");
                next.insert(r.clone(), old.clone());
            }
        }
        self.accepted = next;
        self.diagnostics = diagnostics;
        let fingerprint = self.compute_fingerprint();
        if fingerprint == self.fingerprint && self.version > 0 {
            return Ok(false);
        }
        self.fingerprint = fingerprint;
        self.version += 1;
        self.persist()?;
        Ok(true)
    }

    fn persist(&self) -> Result<(), StoreError> {
        let Some((db, path)) = &self.db else { return Ok(()) };
        let err = |source| StoreError::Sled { path: path.clone(), source };
        let objects = db.open_tree("objects").map_err(err)?;
        let mut batch = sled::Batch::default();
        for item in objects.iter().keys() {
            batch.remove(item.map_err(err)?);
        }
        for (r, l) in &self.accepted {
            let value = serde_json::json!({"origin": l.origin, "raw": l.raw});
            batch.insert(key(r).as_bytes(), serde_json::to_vec(&value).expect("json"));
        }
        objects.apply_batch(batch).map_err(err)?;
        db.insert(VERSION_KEY, &self.version.to_be_bytes()).map_err(err)?;
        db.flush().map_err(err)?;
        Ok(())
    }

    /// The translator's snapshot of the accepted objects, with its cross-object diagnostics.
    pub fn snapshot(&self) -> (Snapshot, Vec<Diagnostic>) {
        Snapshot::build(self.accepted.values().map(|l| l.clone_without_raw()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> (Vec<Arc<Loaded>>, Vec<Diagnostic>) {
        let (loaded, diagnostics) = parse_documents("f.yaml", text);
        (loaded.into_iter().map(Arc::new).collect(), diagnostics)
    }

    const GOOD: &str =
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: a}\nspec: {host: a}\n";
    const BAD: &str =
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: a}\nspec: {host: \"a b\"}\n";

    #[test]
    fn rejected_objects_keep_their_last_good_form_and_versions_persist() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ConfigStore::open(Some(dir.path())).unwrap();
        let (l, d) = load(GOOD);
        assert!(s.apply(l, d).unwrap());
        assert_eq!((s.version(), s.len()), (1, 1));
        let (l, d) = load(BAD);
        assert!(!s.apply(l, d).unwrap(), "nothing changed: the good DestinationRule is kept");
        assert_eq!(s.len(), 1);
        let (l, d) = load("apiVersion: v1\nkind: [unclosed\n");
        s.apply(l, d).unwrap();
        assert_eq!(s.len(), 1, "a file that does not parse keeps its objects");
        let (l, d) = load("");
        assert!(s.apply(l, d).unwrap(), "a deleted object goes");
        assert_eq!((s.version(), s.len()), (2, 0));
        let (l, d) = load(GOOD);
        s.apply(l, d).unwrap();
        drop(s);
        let s = ConfigStore::open(Some(dir.path())).unwrap();
        assert_eq!((s.version(), s.len()), (3, 1), "restart: same objects, version does not go back");
    }
}
