//! Istio's trust bundle in every namespace: ConfigMap `istio-ca-root-cert` (key `root-cert.pem`,
//! label `istio.io/config: "true"`), kept as istiod's namespace controller keeps it, so that
//! workloads mount the root they verify their peers with. Written by the Lease holder (every
//! replica signs under the same root); a ConfigMap deleted or edited is written again, a
//! terminating namespace is left alone.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;

/// The ConfigMap's name, as istiod's.
pub const ROOT_CERT_CONFIG_MAP: &str = "istio-ca-root-cert";

/// The key that holds the root, as istiod's.
pub const ROOT_CERT_KEY: &str = "root-cert.pem";

/// Namespaces istiod leaves alone: those its injector ignores, but kube-system (ztunnel runs
/// there).
const IGNORED: [&str; 3] = ["kube-public", "kube-node-lease", "local-path-storage"];

/// How often failed writes are tried again.
const RETRY: Duration = Duration::from_secs(30);

/// What one namespace needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// No ConfigMap yet: create it.
    Create,
    /// The ConfigMap is there (this, at its resource version) with another root or without
    /// the label: replace it.
    Replace(Box<ConfigMap>),
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([("istio.io/config".to_string(), "true".to_string())])
}

/// The writes that bring `held` (each namespace's ConfigMap as the API server has it) to
/// `root` in every namespace of `namespaces`.
pub fn writes(namespaces: &BTreeSet<String>, held: &BTreeMap<String, ConfigMap>, root: &str) -> Vec<(String, Write)> {
    let mut out = Vec::new();
    for ns in namespaces.iter().filter(|ns| !IGNORED.contains(&ns.as_str())) {
        match held.get(ns) {
            None => out.push((ns.clone(), Write::Create)),
            Some(cm) => {
                let data = cm.data.as_ref().and_then(|d| d.get(ROOT_CERT_KEY));
                let labelled =
                    cm.metadata.labels.as_ref().and_then(|l| l.get("istio.io/config")).is_some_and(|v| v == "true");
                if data.map(String::as_str) != Some(root) || !labelled {
                    out.push((ns.clone(), Write::Replace(Box::new(cm.clone()))));
                }
            }
        }
    }
    out
}

/// `cm` (or a new ConfigMap in `namespace`) holding `root`, its other keys and labels kept.
fn with_root(namespace: &str, cm: Option<ConfigMap>, root: &str) -> ConfigMap {
    let mut cm = cm.unwrap_or_else(|| ConfigMap {
        metadata: ObjectMeta {
            name: Some(ROOT_CERT_CONFIG_MAP.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        ..Default::default()
    });
    cm.metadata.labels.get_or_insert_with(Default::default).extend(labels());
    cm.data.get_or_insert_with(Default::default).insert(ROOT_CERT_KEY.into(), root.into());
    cm
}

/// The namespace's name, unless it is being deleted (a write there would be refused).
fn live_name(ns: &Namespace) -> Option<String> {
    let terminating = ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating");
    ns.metadata.name.clone().filter(|_| !terminating)
}

/// Keeps `root` in the ConfigMap of every namespace (only `only`, when sluice watches one) while
/// `leader` says this replica leads (always, with no leader election).
pub async fn run(client: kube::Client, root: String, only: Option<String>, leader: Option<watch::Receiver<bool>>) {
    let field = |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
    let ns_config = only.as_deref().map_or_else(watcher::Config::default, field);
    let cm_api: Api<ConfigMap> = match &only {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut namespaces = watcher::watcher(Api::<Namespace>::all(client.clone()), ns_config).boxed();
    let mut config_maps = watcher::watcher(cm_api, field(ROOT_CERT_CONFIG_MAP)).boxed();
    // What the API server has (after a first list), and the list being read.
    let (mut live, mut held) = (BTreeSet::new(), BTreeMap::new());
    let (mut listing_ns, mut listing_cm) = (BTreeSet::new(), BTreeMap::new());
    let (mut ns_synced, mut cm_synced) = (false, false);
    let mut leader = leader;
    let mut retry = tokio::time::interval(RETRY);
    // Namespaces whose write failed: tried again at the next retry tick, not at every event.
    let mut failed = BTreeSet::new();
    let ours = |cm: &ConfigMap| cm.metadata.name.as_deref() == Some(ROOT_CERT_CONFIG_MAP);
    loop {
        tokio::select! {
            event = namespaces.next() => match event {
                Some(Ok(Event::Init)) => listing_ns.clear(),
                Some(Ok(Event::InitApply(ns))) => listing_ns.extend(live_name(&ns)),
                Some(Ok(Event::InitDone)) => {
                    live = std::mem::take(&mut listing_ns);
                    ns_synced = true;
                }
                Some(Ok(Event::Apply(ns))) => match live_name(&ns) {
                    Some(name) => { live.insert(name); }
                    None => { live.remove(ns.metadata.name.as_deref().unwrap_or_default()); }
                },
                Some(Ok(Event::Delete(ns))) => { live.remove(ns.metadata.name.as_deref().unwrap_or_default()); }
                Some(Err(e)) => { tracing::warn!(error = %e, "watching namespaces for istio-ca-root-cert"); continue }
                None => return,
            },
            event = config_maps.next() => match event {
                Some(Ok(Event::Init)) => listing_cm.clear(),
                Some(Ok(Event::InitApply(cm))) if ours(&cm) => {
                    listing_cm.insert(cm.metadata.namespace.clone().unwrap_or_default(), cm);
                }
                Some(Ok(Event::InitDone)) => {
                    held = std::mem::take(&mut listing_cm);
                    cm_synced = true;
                }
                Some(Ok(Event::Apply(cm))) if ours(&cm) => {
                    held.insert(cm.metadata.namespace.clone().unwrap_or_default(), cm);
                }
                Some(Ok(Event::Delete(cm))) if ours(&cm) => {
                    held.remove(cm.metadata.namespace.as_deref().unwrap_or_default());
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => { tracing::warn!(error = %e, "watching istio-ca-root-cert ConfigMaps"); continue }
                None => return,
            },
            changed = async { match leader.as_mut() { Some(l) => l.changed().await, None => std::future::pending().await } } => {
                // The Lease task ended (serve is stopping): nothing more to lead.
                if changed.is_err() { return }
            }
            _ = retry.tick() => failed.clear(),
        }
        let leads = leader.as_mut().is_none_or(|l| *l.borrow_and_update());
        if !(leads && ns_synced && cm_synced) {
            continue;
        }
        let due: Vec<_> = writes(&live, &held, &root).into_iter().filter(|(ns, _)| !failed.contains(ns)).collect();
        for (ns, write) in due {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
            let result = match write {
                Write::Create => api.create(&PostParams::default(), &with_root(&ns, None, &root)).await,
                Write::Replace(cm) => {
                    api.replace(ROOT_CERT_CONFIG_MAP, &PostParams::default(), &with_root(&ns, Some(*cm), &root)).await
                }
            };
            match result {
                // Held at once: a write is not repeated before its watch event comes back.
                Ok(written) => {
                    tracing::info!(namespace = %ns, "wrote ConfigMap istio-ca-root-cert");
                    held.insert(ns, written);
                }
                // Made or changed by someone else meanwhile: its watch event brings it back here.
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => {
                    tracing::warn!(namespace = %ns, error = %e, "writing ConfigMap istio-ca-root-cert failed; will try again");
                    failed.insert(ns);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(root: &str, labelled: bool) -> ConfigMap {
        let mut cm = with_root("a", None, root);
        if !labelled {
            cm.metadata.labels = None;
        }
        cm
    }

    #[test]
    fn every_namespace_but_the_ignored_ones_gets_the_root_once() {
        let namespaces: BTreeSet<String> =
            ["a", "b", "c", "d", "kube-system", "kube-public"].into_iter().map(String::from).collect();
        let held = BTreeMap::from([
            ("a".to_string(), cm("ROOT", true)),
            ("b".to_string(), cm("OLD", true)),
            ("c".to_string(), cm("ROOT", false)),
            ("gone".to_string(), cm("OLD", true)),
        ]);
        let got: Vec<(String, bool)> =
            writes(&namespaces, &held, "ROOT").into_iter().map(|(ns, w)| (ns, w == Write::Create)).collect();
        let want = [("b", false), ("c", false), ("d", true), ("kube-system", true)];
        assert_eq!(got, want.map(|(ns, create)| (ns.to_string(), create)));
    }

    #[test]
    fn a_replaced_config_map_keeps_its_other_keys_and_labels() {
        let mut old = cm("OLD", true);
        old.data.as_mut().unwrap().insert("extra".into(), "kept".into());
        old.metadata.labels.as_mut().unwrap().insert("team".into(), "x".into());
        let new = with_root("a", Some(old), "ROOT");
        assert_eq!(new.data.as_ref().unwrap()[ROOT_CERT_KEY], "ROOT");
        assert_eq!(new.data.as_ref().unwrap()["extra"], "kept");
        assert_eq!(new.metadata.labels.as_ref().unwrap()["team"], "x");
        assert_eq!(new.metadata.labels.as_ref().unwrap()["istio.io/config"], "true");
    }
}
