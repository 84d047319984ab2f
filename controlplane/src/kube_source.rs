//! The Kubernetes source: one kube-runtime watcher per kind (Services, EndpointSlices, Pods,
//! Namespaces and the Istio kinds), kept as parsed objects that feed the same store as the file
//! source. Only list/watch bookkeeping lives here; parsing, validation, the last-good rule and
//! persistence are the shared path's.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::Value;
use sluice_translator::diagnostic::{Diagnostic, ObjectRef};
use sluice_translator::model::{Kind, Loaded};
use sluice_translator::parse::parse_value;
use tokio::sync::mpsc;

use crate::store::GroupRead;

/// Where the diagnostics of objects read from the API server say they came from.
pub const ORIGIN: &str = "kubernetes";

/// How often a kind whose CRD is not installed is looked for again.
const ABSENT_RECHECK: Duration = Duration::from_secs(30);

/// What to watch.
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    /// Watch only this namespace (and only this Namespace object); every namespace when None.
    pub namespace: Option<String>,
}

/// One object as last seen: what the status writer reads (its generation and status) and its
/// parse (which holds the object's config form).
struct Seen {
    generation: Option<i64>,
    status: Value,
    loaded: Vec<Arc<Loaded>>,
    diagnostics: Vec<Diagnostic>,
}

type Key = (String, String);

#[derive(Default)]
struct KindCache {
    /// The version the kind is watched at.
    version: String,
    /// True once a first list completed (or the kind is known to be absent).
    synced: bool,
    objects: BTreeMap<Key, Seen>,
    /// Objects of a list in progress: they replace `objects` when it completes, so a relist
    /// (after a 410 Gone or a restarted watch) also removes what was deleted meanwhile.
    relist: Option<BTreeMap<Key, Seen>>,
}

/// Every watched kind's objects.
#[derive(Default)]
pub struct KubeCache {
    kinds: BTreeMap<Kind, KindCache>,
    /// Objects added, changed or deleted since the store last took them.
    dirty: BTreeSet<(Kind, Key)>,
    /// The store has taken every object once.
    reported: bool,
}

/// An Istio object as the status writer needs it.
pub struct IstioObjectView<'a> {
    /// The kind.
    pub kind: Kind,
    /// Kind, namespace and name.
    pub reference: ObjectRef,
    /// The version it was read at (and is written back at).
    pub version: &'a str,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The current `status` (null when none).
    pub status: &'a Value,
    /// What parsing and validating it found.
    pub diagnostics: &'a [Diagnostic],
}

/// The object as the translator reads it: `apiVersion` and `kind` set (list items lack them), and
/// the fields that change without changing config left out, so a status write or a kubelet
/// heartbeat does not push config to every proxy. Also returns what was taken out that the status
/// writer needs: `metadata.generation` and `status`.
fn normalize(kind: Kind, version: &str, object: &DynamicObject) -> (Value, Option<i64>, Value) {
    let mut config = serde_json::to_value(object).expect("a DynamicObject serializes");
    let api_version = if kind.group().is_empty() { version.to_string() } else { format!("{}/{version}", kind.group()) };
    config["apiVersion"] = api_version.into();
    config["kind"] = kind.name().into();
    let generation = config.pointer("/metadata/generation").and_then(Value::as_i64);
    if let Some(meta) = config.get_mut("metadata").and_then(Value::as_object_mut) {
        for volatile in ["resourceVersion", "managedFields", "uid", "creationTimestamp", "generation", "selfLink"] {
            meta.remove(volatile);
        }
    }
    let mut status = Value::Null;
    if let Some(map) = config.as_object_mut() {
        let removed = map.remove("status");
        // A Pod's addresses and phase are config; the rest of its status is not.
        if kind == Kind::Pod
            && let Some(Value::Object(mut pod_status)) = removed
        {
            pod_status.retain(|k, _| matches!(k.as_str(), "podIP" | "podIPs" | "hostIP" | "phase"));
            map.insert("status".into(), Value::Object(pod_status));
        } else if kind.is_istio() {
            status = removed.unwrap_or(Value::Null);
        }
    }
    (config, generation, status)
}

fn key_of(object: &DynamicObject) -> Key {
    (object.metadata.namespace.clone().unwrap_or_default(), object.metadata.name.clone().unwrap_or_default())
}

fn seen(kind: Kind, version: &str, object: &DynamicObject) -> Seen {
    let (config, generation, status) = normalize(kind, version, object);
    let (loaded, diagnostics) = parse_value(ORIGIN, config);
    Seen { generation, status, loaded: loaded.into_iter().map(Arc::new).collect(), diagnostics }
}

impl KubeCache {
    /// Records a watcher event for `kind` watched at `version`. True when the objects the store
    /// sees changed.
    pub fn apply(&mut self, kind: Kind, version: &str, event: Event<DynamicObject>) -> bool {
        let cache = self.kinds.entry(kind).or_default();
        cache.version = version.to_string();
        match event {
            Event::Init => {
                cache.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(o) => {
                cache.relist.get_or_insert_default().insert(key_of(&o), seen(kind, version, &o));
                false
            }
            Event::InitDone => {
                let relisted = cache.relist.take().unwrap_or_default();
                let old = std::mem::replace(&mut cache.objects, relisted);
                let keys = old.into_keys().chain(cache.objects.keys().cloned());
                self.dirty.extend(keys.map(|k| (kind, k)));
                cache.synced = true;
                true
            }
            Event::Apply(o) => {
                cache.objects.insert(key_of(&o), seen(kind, version, &o));
                self.dirty.insert((kind, key_of(&o)));
                true
            }
            Event::Delete(o) => {
                self.dirty.insert((kind, key_of(&o)));
                cache.objects.remove(&key_of(&o)).is_some()
            }
        }
    }

    /// Records that `kind` is not served by the cluster (its CRD is not installed): it counts as
    /// listed, with no objects. True when that removed objects.
    pub fn absent(&mut self, kind: Kind) -> bool {
        let cache = self.kinds.entry(kind).or_default();
        let had = !cache.objects.is_empty();
        self.dirty.extend(std::mem::take(&mut cache.objects).into_keys().map(|k| (kind, k)));
        cache.relist = None;
        cache.synced = true;
        had
    }

    /// True once every kind completed a first list: before that, a load would look like
    /// deletions of everything not listed yet.
    pub fn synced(&self) -> bool {
        Kind::ALL.iter().all(|k| self.kinds.get(k).is_some_and(|c| c.synced))
    }

    /// The kinds still waiting for their first list.
    pub fn pending(&self) -> Vec<&'static str> {
        Kind::ALL.iter().filter(|k| !self.kinds.get(k).is_some_and(|c| c.synced)).map(|k| k.name()).collect()
    }

    /// The objects changed since the last call, as the store takes them (shared, not copied),
    /// one group per object; on the first call every object, and true (a complete read).
    pub fn take_reads(&mut self) -> (Vec<GroupRead>, bool) {
        let complete = !self.reported;
        let keys: Vec<(Kind, Key)> = if complete {
            self.kinds.iter().flat_map(|(k, c)| c.objects.keys().map(|key| (*k, key.clone()))).collect()
        } else {
            std::mem::take(&mut self.dirty).into_iter().collect()
        };
        // The complete read covers whatever was dirty.
        self.dirty.clear();
        self.reported = true;
        let reads = keys
            .into_iter()
            .map(|(kind, key)| {
                let seen = self.kinds.get(&kind).and_then(|c| c.objects.get(&key));
                let group = format!("kube:{}/{}/{}", kind.name(), key.0, key.1);
                (group, seen.map(|s| (s.loaded.clone(), s.diagnostics.clone())))
            })
            .collect();
        (reads, complete)
    }

    /// The Istio objects, for the status writer.
    pub fn istio_objects(&self) -> impl Iterator<Item = IstioObjectView<'_>> {
        self.kinds.iter().filter(|(k, _)| k.is_istio()).flat_map(|(kind, cache)| {
            cache.objects.iter().map(move |((namespace, name), seen)| IstioObjectView {
                kind: *kind,
                reference: ObjectRef::new(kind.name(), namespace, name),
                version: &cache.version,
                generation: seen.generation,
                status: &seen.status,
                diagnostics: &seen.diagnostics,
            })
        })
    }
}

/// The resource of `kind` at `version`.
pub fn api_resource(kind: Kind, version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(kind.group(), version, kind.name()), &kind.plural())
}

/// The version to watch `kind` at: the newest Istio version at which the cluster serves the
/// kind's resource. None when no version serves it (its CRD is not installed; the group may
/// still be there for other kinds).
async fn served_version(client: &Client, kind: Kind) -> Result<Option<String>, kube::Error> {
    if !kind.is_istio() {
        return Ok(Some(kind.versions()[0].to_string()));
    }
    for version in kind.versions() {
        let request =
            http::Request::get(format!("/apis/{}/{version}", kind.group())).body(Vec::new()).expect("a valid request");
        let resources: k8s_openapi::apimachinery::pkg::apis::meta::v1::APIResourceList =
            match client.request(request).await {
                Ok(list) => list,
                Err(kube::Error::Api(status)) if status.code == 404 => continue,
                Err(e) => return Err(e),
            };
        if resources.resources.iter().any(|r| r.name == kind.plural()) {
            return Ok(Some(version.to_string()));
        }
    }
    Ok(None)
}

/// True for a watcher error that says the resource is not served (its CRD was removed).
fn not_served(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// Starts one watcher task per kind; each change to the cache is signalled on `changed`.
pub fn spawn(
    client: Client,
    options: WatchOptions,
    cache: Arc<Mutex<KubeCache>>,
    changed: mpsc::UnboundedSender<Instant>,
) -> Vec<tokio::task::JoinHandle<()>> {
    Kind::ALL
        .into_iter()
        .map(|kind| {
            let (client, options, cache, changed) = (client.clone(), options.clone(), cache.clone(), changed.clone());
            tokio::spawn(watch_kind(client, kind, options, cache, changed))
        })
        .collect()
}

async fn watch_kind(
    client: Client,
    kind: Kind,
    options: WatchOptions,
    cache: Arc<Mutex<KubeCache>>,
    changed: mpsc::UnboundedSender<Instant>,
) {
    let mut retry = Duration::from_millis(500);
    let signal = |did: bool| {
        if did {
            let _ = changed.send(Instant::now());
        }
    };
    loop {
        let version = match served_version(&client, kind).await {
            Ok(Some(v)) => v,
            Ok(None) => {
                tracing::warn!(
                    kind = kind.name(),
                    group = kind.group(),
                    "not served by the API server (CRDs not installed?); will look again"
                );
                signal(cache.lock().expect("kube cache lock").absent(kind));
                tokio::time::sleep(ABSENT_RECHECK).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(kind = kind.name(), error = %e, "API discovery failed; retrying");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        retry = Duration::from_millis(500);
        let resource = api_resource(kind, &version);
        let mut config = watcher::Config::default();
        let api: Api<DynamicObject> = match (&options.namespace, kind.namespaced()) {
            (Some(ns), true) => Api::namespaced_with(client.clone(), ns, &resource),
            (Some(ns), false) => {
                config = config.fields(&format!("metadata.name={ns}"));
                Api::all_with(client.clone(), &resource)
            }
            (None, _) => Api::all_with(client.clone(), &resource),
        };
        tracing::info!(kind = kind.name(), version = %version, "watching");
        // The watcher relists on its own after a 410 Gone or a dropped watch, with backoff on errors.
        let mut events = watcher::watcher(api, config).default_backoff().boxed();
        while let Some(item) = events.next().await {
            match item {
                Ok(event) => signal(cache.lock().expect("kube cache lock").apply(kind, &version, event)),
                // The CRD went away under the watch: discover again (and mark the kind absent).
                Err(e) if not_served(&e) => {
                    tracing::warn!(kind = kind.name(), version = %version, error = %e, "no longer served");
                    break;
                }
                Err(e) => tracing::warn!(kind = kind.name(), error = %e, "watch failed; retrying"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(json: Value) -> DynamicObject {
        serde_json::from_value(json).unwrap()
    }

    fn vs(name: &str, host: &str) -> DynamicObject {
        object(serde_json::json!({
            "metadata": {"name": name, "namespace": "default", "resourceVersion": "7", "generation": 2},
            "spec": {"hosts": [host], "http": [{"route": [{"destination": {"host": "a"}}]}]},
            "status": {"conditions": []}
        }))
    }

    /// Every object held, as a complete read would give it.
    fn held(c: &KubeCache) -> Vec<Arc<Loaded>> {
        c.kinds.values().flat_map(|k| k.objects.values()).flat_map(|s| s.loaded.iter().cloned()).collect()
    }

    #[test]
    fn a_relist_replaces_the_objects_and_volatile_fields_are_not_config() {
        let mut c = KubeCache::default();
        let v = "v1";
        assert!(!c.apply(Kind::VirtualService, v, Event::Init));
        c.apply(Kind::VirtualService, v, Event::InitApply(vs("a", "a")));
        c.apply(Kind::VirtualService, v, Event::InitApply(vs("b", "b")));
        assert!(c.apply(Kind::VirtualService, v, Event::InitDone));
        assert_eq!(held(&c).len(), 2);
        let (reads, complete) = c.take_reads();
        assert!(complete && reads.len() == 2, "the first read is complete: {reads:?}");
        let raw: serde_json::Value = serde_json::from_str(&held(&c)[0].raw).unwrap();
        assert_eq!(raw["apiVersion"], "networking.istio.io/v1", "list items get apiVersion and kind");
        assert!(raw.get("status").is_none() && raw["metadata"].get("resourceVersion").is_none());
        assert_eq!(c.istio_objects().next().unwrap().generation, Some(2));
        // A relist without b (deleted while the watch was down) drops b.
        c.apply(Kind::VirtualService, v, Event::Init);
        c.apply(Kind::VirtualService, v, Event::InitApply(vs("a", "a")));
        assert_eq!(held(&c).len(), 2, "the old objects stay until the relist completes");
        c.apply(Kind::VirtualService, v, Event::InitDone);
        assert_eq!(held(&c).len(), 1);
        let (reads, complete) = c.take_reads();
        let reads: Vec<(&str, bool)> = reads.iter().map(|(g, r)| (g.as_str(), r.is_some())).collect();
        assert!(!complete);
        assert_eq!(reads, [("kube:VirtualService/default/a", true), ("kube:VirtualService/default/b", false)]);
        assert!(c.take_reads().0.is_empty(), "nothing changed since");
        assert!(c.apply(Kind::VirtualService, v, Event::Delete(vs("a", "a"))));
        assert!(!c.apply(Kind::VirtualService, v, Event::Delete(vs("a", "a"))), "a repeated delete changes nothing");
        assert!(!c.synced(), "other kinds have not listed yet");
        for k in Kind::ALL {
            c.absent(k);
        }
        assert!(c.synced());
    }

    #[test]
    fn an_invalid_object_is_reported_and_left_out() {
        let mut c = KubeCache::default();
        c.apply(Kind::VirtualService, "v1", Event::Apply(vs("bad", "a b")));
        let (mut reads, _) = c.take_reads();
        let (loaded, diagnostics) = reads.remove(0).1.unwrap();
        assert!(loaded.is_empty());
        let d = &diagnostics[0];
        assert_eq!(d.object, Some(ObjectRef::new("VirtualService", "default", "bad")));
        assert!(d.path.starts_with("spec.hosts"), "{d}");
    }
}
