//! The last line of defence behind validation: a change is admitted only if every proxy's config
//! can still be generated and encoded. An object that validates but whose output cannot be
//! encoded (a sluice bug, or a rule validation misses) is refused like an invalid object — its
//! last good version stays — so one object never stops the config of the others.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use sluice_translator::diagnostic::{Diagnostic, ObjectRef, Severity};
use sluice_translator::model::Object;
use sluice_translator::model::common::labels_match;
use sluice_translator::snapshot::{Change, ROOT_NAMESPACE, Snapshot, SnapshotDelta, Workload};
use sluice_xds::resource::Interner;
use sluice_xds::server::{Generator, NodeInfo};

use crate::generator::{Current, MeshGenerator};

/// A proxy whose config cannot be generated, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stuck {
    /// The proxy's node id.
    pub node: String,
    /// The generation error.
    pub reason: String,
}

/// The node id of `w`'s sidecar, if it has an address.
fn sidecar_node(w: &Workload) -> Option<String> {
    let ip = w.ip.as_deref()?;
    Some(format!("sidecar~{ip}~{}.{}~{}.svc.cluster.local", w.name, w.namespace, w.namespace))
}

/// The node ids of the sidecars of `snapshot`'s workloads.
fn sidecar_nodes(snapshot: &Snapshot) -> impl Iterator<Item = String> + '_ {
    snapshot.workloads.values().filter_map(|w| sidecar_node(w))
}

/// Generates every workload's sidecar config as `sluice serve` would (each proxy class's outbound
/// half once) and returns the proxies whose config cannot be generated; with `first`, stops at
/// the first one.
pub fn ungeneratable(snapshot: &Snapshot, first: bool) -> Vec<Stuck> {
    let generator = MeshGenerator::new(Current { version: 0, snapshot: snapshot.clone() });
    let mut stuck = Vec::new();
    for node in sidecar_nodes(snapshot) {
        let info = NodeInfo { id: node.clone(), cluster: String::new(), metadata: Default::default() };
        if let Err(e) = generator.generate(&info, None) {
            stuck.push(Stuck { node, reason: e.reason().to_string() });
            if first {
                break;
            }
        }
    }
    stuck
}

impl Stuck {
    /// The error that refuses object `r` (read from `origin`) for this proxy.
    pub fn refusal(&self, origin: &str, r: &ObjectRef) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            origin: origin.to_string(),
            object: Some(r.clone()),
            path: String::new(),
            code: None,
            message: format!(
                "the config generated from this object cannot be encoded (proxy {}: {}); the object is refused \
                 (its last good version, if any, is kept)",
                self.node, self.reason
            ),
        }
    }
}

/// The workloads whose inbound half `changes` (which made `delta`) can have changed: the
/// workloads that changed, the ones an added or changed AuthorizationPolicy, PeerAuthentication
/// or Sidecar selects, and the endpoints of an added or changed Service or ServiceEntry. A
/// removal only takes config away. (Inbound config is per workload, so checking every one on
/// every policy change would cost what generating every sidecar costs.)
fn inbound_touched(snapshot: &Snapshot, delta: &SnapshotDelta, changes: &[Change]) -> HashSet<(String, String)> {
    let mut touched: HashSet<(String, String)> = delta.workloads.iter().cloned().collect();
    let select = |touched: &mut HashSet<_>, namespace: &str, labels: Option<&BTreeMap<String, String>>| {
        let everywhere = namespace == ROOT_NAMESPACE;
        for (key, w) in snapshot.workloads.iter() {
            if (everywhere || w.namespace == namespace) && labels.is_none_or(|l| labels_match(l, &w.labels)) {
                touched.insert(key.clone());
            }
        }
    };
    for change in changes {
        let Change::Upsert(l) = change else { continue };
        let ns = l.reference.namespace.as_str();
        match &l.object {
            Object::AuthorizationPolicy(o) => {
                select(&mut touched, ns, o.spec.selector.as_ref().map(|s| &s.match_labels))
            }
            Object::PeerAuthentication(o) => {
                select(&mut touched, ns, o.spec.selector.as_ref().map(|s| &s.match_labels))
            }
            Object::RequestAuthentication(o) => {
                select(&mut touched, ns, o.spec.selector.as_ref().map(|s| &s.match_labels))
            }
            Object::Sidecar(o) => select(&mut touched, ns, o.spec.workload_selector.as_ref().map(|s| &s.labels)),
            Object::Service(_) | Object::ServiceEntry(_) => {
                for service in snapshot.services.values().filter(|s| s.source == l.reference) {
                    for e in &service.endpoints {
                        if let Some(w) = snapshot.workload_at(&service.namespace, &e.address) {
                            touched.insert((w.namespace.clone(), w.name.clone()));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    touched
}

/// What [`admit`] decided.
pub struct Admitted {
    /// The snapshot with the admitted changes.
    pub snapshot: Snapshot,
    /// What the admitted changes changed.
    pub delta: SnapshotDelta,
    /// The refused changes' objects, each with the proxy it broke.
    pub refused: Vec<(ObjectRef, Stuck)>,
}

/// The object a change is about.
pub fn reference(change: &Change) -> ObjectRef {
    match change {
        Change::Upsert(l) => l.reference.clone(),
        Change::Remove(r) => r.clone(),
    }
}

/// Checks each new config as `sluice serve` would generate it, incrementally: a generator of its
/// own follows the admitted snapshots, so a change costs what the push after it costs; the
/// server's generator shares its encodings (the interner) and adopts the outbound halves it
/// built ([`MeshGenerator::adopt`]), so the push does not do the work again.
pub struct Checker {
    generator: MeshGenerator,
    version: u64,
}

impl Checker {
    /// A checker whose encodings are shared through `interner`.
    pub fn new(interner: Arc<Interner>) -> Self {
        let current = Current { version: 0, snapshot: Snapshot::default() };
        Self { generator: MeshGenerator::with_interner(current, interner), version: 0 }
    }

    /// The encodings this checker shares.
    pub fn interner(&self) -> Arc<Interner> {
        self.generator.interner()
    }

    /// The generator the checks ran on: it holds the outbound halves of the config last checked.
    pub fn generator(&self) -> &MeshGenerator {
        &self.generator
    }

    /// Moves to `snapshot`, which `delta` leads to from the snapshot checked before by way of
    /// `changes`, and returns the first proxy whose config cannot be generated: every class's
    /// outbound half (patched as a push patches it), and the inbound half of the workloads the
    /// changes can have touched ([`inbound_touched`]).
    fn check(&mut self, snapshot: &Snapshot, delta: SnapshotDelta, changes: &[Change]) -> Option<Stuck> {
        let inbound = inbound_touched(snapshot, &delta, changes);
        self.generator.set(Current { version: self.version, snapshot: snapshot.clone() }, delta);
        snapshot.workloads.iter().find_map(|(key, w)| {
            let node = sidecar_node(w)?;
            self.generator
                .check(&node, inbound.contains(key))
                .err()
                .map(|e| Stuck { reason: e.reason().to_string(), node })
        })
    }

    /// Applies `changes` to `base` (the snapshot checked last), refusing the ones after which
    /// some proxy's config cannot be generated. Found by halving the change list, so a bad
    /// object among many costs a few generations, and a change list that generates costs one
    /// incremental check. When `base` itself does not generate (state from an older sluice),
    /// nothing can be blamed on the changes and all are admitted.
    ///
    /// The checks are made as config `version`, the one the store gives the result: the
    /// server's generator then takes the outbound halves built for it ([`Checker::generator`]).
    pub fn admit(&mut self, version: u64, base: &Snapshot, changes: Vec<Change>) -> Admitted {
        self.version = version;
        let mut candidate = base.clone();
        let delta = candidate.apply(changes.iter().cloned());
        if self.check(&candidate, delta.clone(), &changes).is_none() || !ungeneratable(base, true).is_empty() {
            return Admitted { snapshot: candidate, delta, refused: Vec::new() };
        }
        // `base` generates and the candidate does not: find what to refuse.
        let admitted = halve(base, changes);
        // The checker saw the refused candidate: it starts again from what was admitted.
        self.check(&admitted.snapshot, SnapshotDelta { rebuild: true, ..Default::default() }, &[]);
        admitted
    }
}

/// [`Checker::admit`] without a checker: every check generates every proxy's config afresh.
pub fn admit(base: &Snapshot, changes: Vec<Change>) -> Admitted {
    if !ungeneratable(base, true).is_empty() {
        let mut candidate = base.clone();
        let delta = candidate.apply(changes);
        return Admitted { snapshot: candidate, delta, refused: Vec::new() };
    }
    admit_on_good_base(base, changes)
}

/// [`admit`] for a `base` that generates and `changes` after which something does not.
fn halve(base: &Snapshot, mut changes: Vec<Change>) -> Admitted {
    if changes.len() == 1 {
        let change = changes.pop().expect("one change");
        let mut candidate = base.clone();
        let delta = candidate.apply([change.clone()]);
        return match ungeneratable(&candidate, true).pop() {
            Some(stuck) => Admitted {
                snapshot: base.clone(),
                delta: SnapshotDelta::default(),
                refused: vec![(reference(&change), stuck)],
            },
            // It broke a proxy only together with changes refused already.
            None => Admitted { snapshot: candidate, delta, refused: Vec::new() },
        };
    }
    let second = changes.split_off(changes.len() / 2);
    let first = admit_on_good_base(base, changes);
    let rest = admit_on_good_base(&first.snapshot, second);
    let mut delta = first.delta;
    delta.then(&rest.delta);
    let mut refused = first.refused;
    refused.extend(rest.refused);
    Admitted { snapshot: rest.snapshot, delta, refused }
}

/// [`admit`] for a `base` known to generate.
fn admit_on_good_base(base: &Snapshot, changes: Vec<Change>) -> Admitted {
    if changes.is_empty() {
        return Admitted { snapshot: base.clone(), delta: SnapshotDelta::default(), refused: Vec::new() };
    }
    let mut candidate = base.clone();
    let delta = candidate.apply(changes.iter().cloned());
    if ungeneratable(&candidate, true).is_empty() {
        return Admitted { snapshot: candidate, delta, refused: Vec::new() };
    }
    halve(base, changes)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use sluice_translator::model::{Loaded, Object};
    use sluice_translator::parse::parse_documents;

    const MESH: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns}\nspec: {clusterIP: 127.100.60.1, ports: [{name: http, port: 80}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: ns}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 127.0.60.2}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: ns}\nspec:\n  hosts: [web]\n  http: [{fault: {abort: {httpStatus: 503, percentage: {value: 1}}}, route: [{destination: {host: web, subset: a}, weight: 50}, {destination: {host: web, subset: b}, weight: 50}]}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web, namespace: ns}\nspec: {host: web, subsets: [{name: a, labels: {v: a}}, {name: b, labels: {v: b}}]}\n";

    /// The mesh's objects, with the VirtualService's abort status set to what validation would
    /// refuse (a negative HTTP status), as if it had slipped past validation.
    pub(crate) fn mesh(broken: bool) -> Vec<Loaded> {
        let (objects, diagnostics) = parse_documents("mesh.yaml", MESH);
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        objects
            .into_iter()
            .map(|mut l| {
                if let Object::VirtualService(vs) = &mut l.object
                    && broken
                {
                    let abort = vs.spec.http[0].fault.as_mut().and_then(|f| f.abort.as_mut()).expect("abort");
                    abort.http_status = Some(-1);
                    // Another version of the object, as a store compares them.
                    l.fingerprint = l.fingerprint.wrapping_add(1);
                }
                l
            })
            .collect()
    }

    #[test]
    fn a_config_that_cannot_be_generated_is_found_per_proxy() {
        let (snapshot, _) = Snapshot::build(mesh(false));
        assert_eq!(ungeneratable(&snapshot, false), Vec::new(), "a valid mesh generates");
        let (snapshot, _) = Snapshot::build(mesh(true));
        let stuck = ungeneratable(&snapshot, false);
        assert_eq!(stuck.len(), 1, "{stuck:?}");
        assert_eq!(stuck[0].node, "sidecar~127.0.60.2~client.ns~ns.svc.cluster.local");
        assert!(stuck[0].reason.contains("VirtualHost"), "{}", stuck[0].reason);
    }

    #[test]
    fn the_object_that_breaks_generation_is_refused_and_the_others_admitted() {
        let upserts =
            |objects: Vec<Loaded>| objects.into_iter().map(|l| Change::Upsert(Arc::new(l))).collect::<Vec<_>>();
        let admitted = admit(&Snapshot::default(), upserts(mesh(true)));
        let refused: Vec<String> = admitted.refused.iter().map(|(r, _)| r.to_string()).collect();
        assert_eq!(refused, ["VirtualService/ns/web"]);
        assert!(ungeneratable(&admitted.snapshot, false).is_empty());
        assert!(admitted.snapshot.lookup("web", "ns").is_some(), "the Service is admitted");
        assert_eq!(admitted.snapshot.virtual_services.len(), 0);

        // On a good base, the broken version of the VirtualService is refused and the good one
        // stays; a change list that generates is admitted whole.
        let good = admit(&Snapshot::default(), upserts(mesh(false)));
        assert!(good.refused.is_empty());
        let vs = |broken| upserts(mesh(broken)).into_iter().filter(|c| reference(c).kind == "VirtualService");
        let again = admit(&good.snapshot, vs(true).collect());
        assert_eq!(again.refused.len(), 1);
        assert_eq!(again.delta, SnapshotDelta::default(), "nothing admitted, nothing changed");
        assert_eq!(again.snapshot.virtual_services.len(), 1);
    }
}
