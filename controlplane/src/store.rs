//! The config store: the accepted objects, their version, the translator snapshot built from
//! them, and the last-good rule — an object that fails to parse or validate keeps being served
//! in its last good form. Sources report what they read per group (a file, or one Kubernetes
//! object), so a change costs what it touches, not the size of the mesh. With a state
//! directory, the accepted objects and the version live in sled so a restart serves at once and
//! versions never go backwards.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use sluice_translator::diagnostic::{Diagnostic, ObjectRef, Severity};
use sluice_translator::model::Loaded;
use sluice_translator::parse::parse_documents;
use sluice_translator::snapshot::{Change, Snapshot, SnapshotDelta};

use crate::admission;

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
    /// A corrupt state directory could not be moved aside.
    #[error("state directory {path} is corrupt and could not be moved aside: {source}")]
    Aside {
        /// The state directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Which source a group comes from: a complete reload of one source drops its groups that
/// were not read again, and leaves the other source's alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// Files and directories.
    Files,
    /// The Kubernetes API server.
    Kube,
}

/// One group's latest read: its objects and diagnostics, or None when the group is gone.
pub type GroupRead = (String, Option<(Vec<Arc<Loaded>>, Vec<Diagnostic>)>);

/// Each changed object's accepted form before the change.
type Previous = HashMap<ObjectRef, Option<Arc<Loaded>>>;

/// What one group contributes.
struct Group {
    source: Source,
    objects: BTreeMap<ObjectRef, Arc<Loaded>>,
    diagnostics: Vec<Diagnostic>,
}

/// Accepted objects, their version and their snapshot.
pub struct ConfigStore {
    /// Groups by name (a file path, or a Kubernetes object's kind/namespace/name).
    groups: BTreeMap<String, Group>,
    /// The groups contributing each reference; the first by name is the one accepted.
    owners: HashMap<ObjectRef, BTreeSet<String>>,
    /// The accepted objects.
    accepted: HashMap<ObjectRef, Arc<Loaded>>,
    /// Errors in the groups' latest reads (kept as groups change, not counted per reload).
    rejected: usize,
    snapshot: Snapshot,
    version: u64,
    db: Option<(sled::Db, String)>,
    /// Checks that each change's config can be generated.
    checker: admission::Checker,
}

const VERSION_KEY: &[u8] = b"version";

/// Number of errors among `diagnostics`.
fn errors(diagnostics: &[Diagnostic]) -> usize {
    diagnostics.iter().filter(|d| d.severity == Severity::Error).count()
}

fn key(r: &ObjectRef) -> String {
    format!("{}/{}/{}", r.kind, r.namespace, r.name)
}

impl ConfigStore {
    /// A store; with `state_dir`, reopens the persisted objects and version.
    pub fn open(state_dir: Option<&Path>) -> Result<Self, StoreError> {
        let mut store = Self {
            groups: BTreeMap::new(),
            owners: HashMap::new(),
            accepted: HashMap::new(),
            rejected: 0,
            snapshot: Snapshot::default(),
            version: 0,
            db: None,
            checker: admission::Checker::new(Default::default()),
        };
        let Some(dir) = state_dir else { return Ok(store) };
        let path = dir.display().to_string();
        let err = |source| StoreError::Sled { path: path.clone(), source };
        let db = sled::open(dir).map_err(err)?;
        if let Some(v) = db.get(VERSION_KEY).map_err(err)? {
            store.version = u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]));
        }
        let mut saved: BTreeMap<(Source, String), Vec<Arc<Loaded>>> = BTreeMap::new();
        for item in db.open_tree("objects").map_err(err)?.iter() {
            let (_, value) = item.map_err(err)?;
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(&value) else { continue };
            let origin = value["origin"].as_str().unwrap_or("state").to_string();
            let group = value["group"].as_str().unwrap_or(&origin).to_string();
            // State written before sources were recorded: the Kubernetes source's origin tells.
            let kube = value["source"] == "kube" || origin == crate::kube_source::ORIGIN;
            let source = if kube { Source::Kube } else { Source::Files };
            let (loaded, _) = parse_documents(&origin, &value["raw"].to_string());
            saved.entry((source, group)).or_default().extend(loaded.into_iter().map(Arc::new));
        }
        let reads = saved.into_iter().map(|((source, group), objects)| (source, (group, Some((objects, Vec::new())))));
        let (changes, _) = store.take(reads.collect(), &[]);
        store.snapshot.apply(changes);
        store.db = Some((db, path));
        Ok(store)
    }

    /// Puts the mesh-wide settings in force for every snapshot from now on.
    pub fn set_mesh(&mut self, mesh: sluice_translator::model::mesh_config::MeshConfig) {
        self.snapshot.mesh = Arc::new(mesh);
    }

    /// As [`ConfigStore::open`], but a state directory that cannot be read (corrupt, or of a
    /// layout this sluice cannot open) is moved aside to `<dir>.corrupt-<unix seconds>` and a
    /// fresh one started: sluice then serves from its sources. Returns what was done, to be said.
    pub fn open_recovering(state_dir: Option<&Path>) -> Result<(Self, Option<String>), StoreError> {
        let Some(dir) = state_dir else { return Ok((Self::open(None)?, None)) };
        let error = match Self::open(Some(dir)) {
            Ok(store) => return Ok((store, None)),
            Err(e) => e,
        };
        let seconds = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut aside = dir.as_os_str().to_owned();
        aside.push(format!(".corrupt-{seconds}"));
        let aside = std::path::PathBuf::from(aside);
        std::fs::rename(dir, &aside).map_err(|source| StoreError::Aside { path: dir.display().to_string(), source })?;
        let store = Self::open(Some(dir))?;
        let said = format!(
            "the state directory could not be read ({error}); it was moved aside to {} and sluice starts from its \
             sources (the last good objects of rejected ones are not known)",
            aside.display()
        );
        Ok((store, Some(said)))
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

    /// The diagnostics of the latest read of every group.
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        self.groups.values().flat_map(|g| g.diagnostics.iter().cloned()).collect()
    }

    /// Number of objects the latest reads rejected.
    pub fn rejected(&self) -> usize {
        self.rejected
    }

    /// The accepted objects.
    pub fn objects(&self) -> impl Iterator<Item = &Loaded> {
        self.accepted.values().map(|l| l.as_ref())
    }

    /// The encodings of the store's generation check, for the server's generator to share.
    pub fn interner(&self) -> Arc<sluice_xds::resource::Interner> {
        self.checker.interner()
    }

    /// The generator the store's check ran on, holding the outbound halves of the current
    /// version (see [`crate::generator::MeshGenerator::adopt`]).
    pub fn checked(&self) -> &crate::generator::MeshGenerator {
        self.checker.generator()
    }

    /// The translator's snapshot of the accepted objects (a cheap copy: it shares structure).
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot.clone()
    }

    /// Takes the sources' `reads` of their groups; for a source in `complete`, every group was
    /// read and the ones not in `reads` are gone. Returns the snapshot's delta when the accepted
    /// objects changed (and the version was bumped). A changed object after which some proxy's
    /// config cannot be generated is refused like an invalid one ([`crate::admission`]). On a
    /// persistence error the snapshot has changed all the same (the error says only that the
    /// state directory lags).
    pub fn apply(
        &mut self,
        reads: Vec<(Source, GroupRead)>,
        complete: &[Source],
    ) -> Result<Option<SnapshotDelta>, StoreError> {
        let (changes, mut previous) = self.take(reads, complete);
        if changes.is_empty() {
            return Ok(None);
        }
        let admitted = self.checker.admit(self.version + 1, &self.snapshot, changes.clone());
        for (r, stuck) in &admitted.refused {
            let new = changes.iter().find_map(|c| match c {
                Change::Upsert(l) if &l.reference == r => Some(l.clone()),
                _ => None,
            });
            self.refuse(r, previous.remove(r).flatten(), new, stuck);
        }
        let refused: BTreeSet<&ObjectRef> = admitted.refused.iter().map(|(r, _)| r).collect();
        let kept: Vec<Change> = changes.into_iter().filter(|c| !refused.contains(&admission::reference(c))).collect();
        if kept.is_empty() {
            return Ok(None);
        }
        self.version += 1;
        let persisted = self.persist(&kept);
        self.snapshot = admitted.snapshot;
        persisted.map(|()| Some(admitted.delta))
    }

    /// Undoes the change of `r` (its accepted form goes back to `old`) because the config of
    /// `stuck.node` cannot be generated with `new`; the owning group says so, as for an invalid
    /// object.
    fn refuse(&mut self, r: &ObjectRef, old: Option<Arc<Loaded>>, new: Option<Arc<Loaded>>, stuck: &admission::Stuck) {
        tracing::warn!(object = %r, proxy = %stuck.node, reason = %stuck.reason,
            "refusing a change whose config cannot be generated; keeping the last good version");
        match &old {
            Some(o) => self.accepted.insert(r.clone(), o.clone()),
            None => self.accepted.remove(r),
        };
        let Some(name) = self.owners.get(r).and_then(|o| o.first()).cloned() else { return };
        let group = self.groups.get_mut(&name).expect("an owner is a group");
        match old {
            Some(o) => {
                group.objects.insert(r.clone(), o);
            }
            None => {
                group.objects.remove(r);
            }
        }
        group.diagnostics.push(stuck.refusal(&new.map_or(name.clone(), |l| l.origin.clone()), r));
        self.rejected += 1;
        if !self.groups[&name].objects.contains_key(r) {
            self.disown(r, &name);
        }
    }

    /// Records the reads; returns the changes of the accepted objects, and each changed
    /// object's accepted form before.
    fn take(&mut self, mut reads: Vec<(Source, GroupRead)>, complete: &[Source]) -> (Vec<Change>, Previous) {
        if !complete.is_empty() {
            let read: BTreeSet<&str> = reads.iter().map(|(_, (g, _))| g.as_str()).collect();
            let gone: Vec<(Source, GroupRead)> = self
                .groups
                .iter()
                .filter(|(name, g)| complete.contains(&g.source) && !read.contains(name.as_str()))
                .map(|(name, g)| (g.source, (name.clone(), None)))
                .collect();
            reads.extend(gone);
        }
        let mut touched = BTreeSet::new();
        for (source, (name, read)) in reads {
            let previous = match self.groups.remove(&name) {
                Some(g) => {
                    self.rejected -= errors(&g.diagnostics);
                    g.objects
                }
                None => BTreeMap::new(),
            };
            let before: Vec<ObjectRef> = previous.keys().cloned().collect();
            let group = read.map(|(objects, diagnostics)| Self::last_good(source, previous, objects, diagnostics));
            for r in before {
                if !group.as_ref().is_some_and(|g| g.objects.contains_key(&r)) {
                    self.disown(&r, &name);
                }
                touched.insert(r);
            }
            let Some(group) = group else { continue };
            self.rejected += errors(&group.diagnostics);
            for r in group.objects.keys() {
                self.owners.entry(r.clone()).or_default().insert(name.clone());
                touched.insert(r.clone());
            }
            self.groups.insert(name, group);
        }
        let mut changes = Vec::new();
        let mut previous = Previous::new();
        for r in touched {
            let now = self.owners.get(&r).and_then(|o| o.first()).and_then(|g| self.groups[g].objects.get(&r)).cloned();
            match (self.accepted.get(&r), now) {
                (Some(old), Some(new)) if old.same_as(&new) => {}
                (_, Some(new)) => {
                    previous.insert(r.clone(), self.accepted.insert(r, new.clone()));
                    changes.push(Change::Upsert(new));
                }
                (Some(_), None) => {
                    previous.insert(r.clone(), self.accepted.remove(&r));
                    changes.push(Change::Remove(r));
                }
                (None, None) => {}
            }
        }
        (changes, previous)
    }

    /// What a group contributes after a read: a rejected object keeps its last good form (else
    /// its stand-in, if it has one, applies), and
    /// when a document could not be parsed at all (so which object it held is unknown), every
    /// object of the group that the read lacks keeps its last good form — the read's good
    /// documents still apply.
    fn last_good(
        source: Source,
        previous: BTreeMap<ObjectRef, Arc<Loaded>>,
        objects: Vec<Arc<Loaded>>,
        diagnostics: Vec<Diagnostic>,
    ) -> Group {
        let errors = || diagnostics.iter().filter(|d| d.severity == Severity::Error);
        let mut group = Group { source, objects: BTreeMap::new(), diagnostics: Vec::new() };
        for l in objects {
            group.objects.entry(l.reference.clone()).or_insert(l);
        }
        let unparsed = errors().any(|d| d.object.is_none());
        let rejected: BTreeSet<&ObjectRef> = errors().filter_map(|d| d.object.as_ref()).collect();
        for (r, old) in previous {
            // A stand-in for the rejected object (see `Loaded::stand_in`) gives way to a real one.
            let lacking = group.objects.get(&r).is_none_or(|new| new.stand_in && !old.stand_in);
            if (unparsed || rejected.contains(&r)) && lacking {
                tracing::warn!(object = %r, "keeping the last good version of a rejected object");
                group.objects.insert(r, old);
            }
        }
        group.diagnostics = diagnostics;
        group
    }

    fn disown(&mut self, r: &ObjectRef, group: &str) {
        if let Some(owners) = self.owners.get_mut(r) {
            owners.remove(group);
            if owners.is_empty() {
                self.owners.remove(r);
            }
        }
    }

    fn persist(&self, changes: &[Change]) -> Result<(), StoreError> {
        let Some((db, path)) = &self.db else { return Ok(()) };
        let err = |source| StoreError::Sled { path: path.clone(), source };
        let objects = db.open_tree("objects").map_err(err)?;
        let mut batch = sled::Batch::default();
        for change in changes {
            match change {
                Change::Upsert(l) => {
                    let group = self.owners.get(&l.reference).and_then(|o| o.first());
                    let source = match group.map(|g| self.groups[g].source) {
                        Some(Source::Kube) => "kube",
                        _ => "files",
                    };
                    let head = serde_json::json!({"origin": l.origin, "group": group, "source": source}).to_string();
                    // `raw` is JSON text already: spliced in as the last field, not parsed again.
                    let record = format!("{},\"raw\":{}}}", head.strip_suffix('}').expect("an object"), l.raw);
                    batch.insert(key(&l.reference).as_bytes(), record.as_bytes());
                }
                Change::Remove(r) => batch.remove(key(r).as_bytes()),
            }
        }
        objects.apply_batch(batch).map_err(err)?;
        db.insert(VERSION_KEY, &self.version.to_be_bytes()).map_err(err)?;
        db.flush().map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(group: &str, text: &str) -> Vec<(Source, GroupRead)> {
        let (loaded, diagnostics) = parse_documents(group, text);
        vec![(Source::Files, (group.to_string(), Some((loaded.into_iter().map(Arc::new).collect(), diagnostics))))]
    }

    /// Opens the state directory a dropped store used: sled's flusher thread may hold its lock
    /// for a moment after the drop.
    fn reopen(dir: &Path) -> ConfigStore {
        for _ in 0..50 {
            match ConfigStore::open(Some(dir)) {
                Err(StoreError::Sled { source: sled::Error::Io(e), .. }) if e.to_string().contains("lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(40));
                }
                other => return other.unwrap(),
            }
        }
        panic!("{} stays locked", dir.display())
    }

    const GOOD: &str =
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: a}\nspec: {host: a}\n";
    const BAD: &str =
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: a}\nspec: {host: \"a b\"}\n";

    #[test]
    fn rejected_objects_keep_their_last_good_form_and_versions_persist() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ConfigStore::open(Some(dir.path())).unwrap();
        assert!(s.apply(read("f.yaml", GOOD), &[Source::Files]).unwrap().is_some());
        assert_eq!((s.version(), s.len()), (1, 1));
        assert!(
            s.apply(read("f.yaml", BAD), &[]).unwrap().is_none(),
            "nothing changed: the good DestinationRule is kept"
        );
        assert_eq!(s.len(), 1);
        assert_eq!(s.diagnostics().len(), 1, "the rejection is reported");
        assert_eq!(s.rejected(), 1);
        s.apply(read("f.yaml", "apiVersion: v1\nkind: [unclosed\n"), &[]).unwrap();
        assert_eq!(s.len(), 1, "a file that does not parse keeps its objects");
        // A broken document next to good ones: the good ones apply (here a second object),
        // the broken one's object (unknown) keeps its last good form.
        let second = GOOD.replace("name: a", "name: b");
        assert!(
            s.apply(read("f.yaml", &format!("apiVersion: v1\nkind: [unclosed\n---\n{second}")), &[]).unwrap().is_some()
        );
        assert_eq!(s.len(), 2, "the good neighbour is served and the last good DestinationRule kept");
        s.apply(read("f.yaml", GOOD), &[]).unwrap();
        assert_eq!(s.len(), 1);
        assert!(s.apply(read("f.yaml", ""), &[]).unwrap().is_some(), "a deleted object goes");
        assert_eq!(s.rejected(), 0, "the rejection went with the read that had it");
        assert_eq!((s.version(), s.len()), (4, 0));
        s.apply(read("f.yaml", GOOD), &[]).unwrap();
        drop(s);
        let mut s = reopen(dir.path());
        assert_eq!((s.version(), s.len()), (5, 1), "restart: same objects, version does not go back");
        assert_eq!(s.snapshot().destination_rules.len(), 1, "and the snapshot has them");
        // A complete read of the files without f.yaml: it was deleted while sluice was down.
        assert!(s.apply(read("g.yaml", ""), &[Source::Files]).unwrap().is_some());
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn a_rejected_authorization_policy_keeps_its_last_good_form_else_denies_through_its_stand_in() {
        let policy = |principal: &str| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\n\
                 spec: {{selector: {{matchLabels: {{app: a}}}}, rules: [{{from: [{{source: {{principals: [\"{principal}\"]}}}}]}}]}}\n"
            )
        };
        let served = |s: &ConfigStore| {
            let snapshot = s.snapshot();
            let p = snapshot.authorization_policies.values().next().expect("a policy is served").clone();
            (p.spec.action, p.spec.rules.len(), p.spec.rules[0].from.len())
        };
        use sluice_translator::model::authorization_policy::Action;
        let mut s = ConfigStore::open(None).unwrap();
        s.apply(read("p.yaml", &policy("cluster.local/ns/shop/sa/web")), &[]).unwrap();
        assert_eq!(served(&s), (None, 1, 1));
        s.apply(read("p.yaml", &policy("a*b*c")), &[]).unwrap();
        assert_eq!(served(&s), (None, 1, 1), "the last good version, not the stand-in");
        assert_eq!(s.rejected(), 1);
        let mut s = ConfigStore::open(None).unwrap();
        s.apply(read("p.yaml", &policy("a*b*c")), &[]).unwrap();
        assert_eq!(served(&s), (Some(Action::Deny), 1, 0), "no last good version: the stand-in denies everything");
        s.apply(read("p.yaml", &policy("cluster.local/ns/shop/sa/web")), &[]).unwrap();
        assert_eq!(served(&s), (None, 1, 1), "fixed: the policy itself");
        assert_eq!(s.rejected(), 0);
    }

    #[test]
    fn a_reference_defined_twice_is_taken_from_the_first_group_and_falls_back_to_the_other() {
        let mut s = ConfigStore::open(None).unwrap();
        let other = GOOD.replace("host: a", "host: b");
        s.apply([read("b.yaml", &other), read("a.yaml", GOOD)].concat(), &[]).unwrap();
        let host = |s: &ConfigStore| s.snapshot().destination_rules.values().next().map(|d| d.spec.host.clone());
        assert_eq!(host(&s).as_deref(), Some("a"));
        let delta = s.apply(vec![(Source::Files, ("a.yaml".to_string(), None))], &[]).unwrap().unwrap();
        assert!(delta.rebuild);
        assert_eq!(host(&s).as_deref(), Some("b"), "the other definition takes over");
        assert!(s.apply(read("a.yaml", ""), &[]).unwrap().is_none(), "an empty new file changes nothing");
    }

    #[test]
    fn a_corrupt_state_directory_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut s = ConfigStore::open(Some(&state)).unwrap();
        s.apply(read("f.yaml", GOOD), &[Source::Files]).unwrap();
        drop(s);
        for entry in std::fs::read_dir(&state).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::write(&path, b"\xde\xad\xbe\xef not sled").unwrap();
            }
        }
        assert!(ConfigStore::open(Some(&state)).is_err(), "the corruption is real");
        let (s, said) = ConfigStore::open_recovering(Some(&state)).unwrap();
        assert!(s.is_empty() && s.version() == 0, "a fresh store");
        let said = said.expect("the recovery is said");
        assert!(said.contains("moved aside"), "{said}");
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("state.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "the old directory is kept for a look: {aside:?}");
    }

    #[test]
    fn an_object_whose_config_cannot_be_encoded_keeps_its_last_good_version_and_blocks_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ConfigStore::open(Some(dir.path())).unwrap();
        let group = |objects: Vec<Loaded>| {
            vec![(
                Source::Files,
                ("mesh.yaml".to_string(), Some((objects.into_iter().map(Arc::new).collect(), Vec::new()))),
            )]
        };
        s.apply(group(crate::admission::tests::mesh(false)), &[]).unwrap().expect("a change");
        let version = s.version();
        // The broken VirtualService, as if it had passed validation: refused, nothing changed.
        assert!(s.apply(group(crate::admission::tests::mesh(true)), &[]).unwrap().is_none());
        assert_eq!((s.version(), s.rejected()), (version, 1));
        let said = s.diagnostics();
        assert!(
            said.iter().any(|d| d.severity == Severity::Error
                && d.object.as_ref().is_some_and(|r| r.kind == "VirtualService")
                && d.message.contains("cannot be encoded")),
            "{said:?}"
        );
        assert!(crate::admission::ungeneratable(&s.snapshot(), false).is_empty(), "the served config generates");
        assert_eq!(s.snapshot().virtual_services.len(), 1, "the last good VirtualService is served");
        // Another object of the mesh still changes.
        let dr = GOOD.replace("name: a", "name: other");
        assert!(s.apply(read("other.yaml", &dr), &[]).unwrap().is_some());
        drop(s);
        let s = reopen(dir.path());
        assert!(
            crate::admission::ungeneratable(&s.snapshot(), false).is_empty(),
            "the refused version was not persisted"
        );
    }
}
