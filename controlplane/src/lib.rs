//! The sluice control plane: sources, the config pipeline, and the commands of the `sluice`
//! binary.

pub mod bootstrap;
pub mod crds;
pub mod file_source;
pub mod generator;
pub mod kube_source;
pub mod lease;
pub mod metrics;
pub mod monitoring;
pub mod serve;
pub mod status;
pub mod store;

use std::path::PathBuf;

use serde_json::Value;
use sluice_translator::diagnostic::Diagnostic;
use sluice_translator::envoy::{ProxyResources, Resource, translate_sidecar};
use sluice_translator::snapshot::Snapshot;

/// A loaded config: the snapshot of every accepted object and every diagnostic on the way.
pub struct LoadedConfig {
    /// The validated snapshot.
    pub snapshot: Snapshot,
    /// Errors (rejected objects) and warnings, sorted by origin.
    pub diagnostics: Vec<Diagnostic>,
}

/// Loads files and directories into a snapshot.
pub fn load_config(paths: &[PathBuf]) -> LoadedConfig {
    let (objects, mut diagnostics) = file_source::load(paths);
    let (snapshot, more) = Snapshot::build(objects);
    diagnostics.extend(more);
    diagnostics.sort();
    diagnostics.dedup();
    LoadedConfig { snapshot, diagnostics }
}

/// Failure to produce a proxy's config.
#[derive(Debug, thiserror::Error)]
pub enum TranslateError {
    /// Bad node id.
    #[error(transparent)]
    Node(#[from] sluice_translator::envoy::NodeError),
    /// A generated resource does not fit Envoy's API (a sluice bug).
    #[error("generated resource rejected by Envoy's API: {0}")]
    Codec(#[from] sluice_xds::codec::CodecError),
}

/// The proxy's resources as an Envoy `/config_dump`, plus translation warnings.
pub fn translate_config_dump(snapshot: &Snapshot, node_id: &str) -> Result<(Value, ProxyResources), TranslateError> {
    let resources = translate_sidecar(snapshot, node_id)?;
    let named = |list: &[Resource]| list.iter().map(|r| (r.name.clone(), r.body.clone())).collect::<Vec<_>>();
    let dump = sluice_xds::config_dump::config_dump(
        "1",
        &named(&resources.listeners),
        &named(&resources.routes),
        &named(&resources.clusters),
        &named(&resources.endpoints),
    )?;
    Ok((dump, resources))
}

/// Generates every workload's sidecar config (one proxy per workload with an address, as its
/// node id names it) and returns the ones that cannot be: (node id, why). What validates must
/// also generate; this is the check `sluice validate` adds on top of the objects' own rules.
pub fn ungeneratable(snapshot: &Snapshot) -> Vec<(String, String)> {
    snapshot
        .workloads
        .values()
        .filter_map(|w| {
            let ip = w.ip.as_deref()?;
            let node = format!("sidecar~{ip}~{}.{}~{}.svc.cluster.local", w.name, w.namespace, w.namespace);
            translate_config_dump(snapshot, &node).err().map(|e| (node, e.to_string()))
        })
        .collect()
}

/// What `sluice translate` prints for a node id: a proxy's `/config_dump`, or for `agent~<node>`
/// the node agent's kernel entries; plus the translation's warnings.
pub fn translate_json(snapshot: &Snapshot, node_id: &str) -> Result<(Value, Vec<Diagnostic>), TranslateError> {
    if let Some(node) = node_id.strip_prefix(sluice_translator::dataplane::AGENT_NODE_PREFIX) {
        let (entries, diagnostics) = sluice_translator::dataplane::translate_node(snapshot, node);
        return Ok((serde_json::to_value(entries).expect("serializable"), diagnostics));
    }
    let (dump, resources) = translate_config_dump(snapshot, node_id)?;
    Ok((dump, resources.diagnostics))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_translator::model::Object;
    use sluice_translator::parse::parse_documents;

    const MESH: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns}\nspec: {clusterIP: 127.100.60.1, ports: [{name: http, port: 80}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: ns}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 127.0.60.2}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: ns}\nspec:\n  hosts: [web]\n  http: [{fault: {abort: {httpStatus: 503, percentage: {value: 1}}}, route: [{destination: {host: web, subset: a}, weight: 50}, {destination: {host: web, subset: b}, weight: 50}]}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web, namespace: ns}\nspec: {host: web, subsets: [{name: a, labels: {v: a}}, {name: b, labels: {v: b}}]}\n";

    #[test]
    fn a_config_that_cannot_be_generated_is_found_per_proxy() {
        let (objects, diagnostics) = parse_documents("mesh.yaml", MESH);
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        let (snapshot, _) = Snapshot::build(objects.clone());
        assert_eq!(ungeneratable(&snapshot), Vec::new(), "a valid mesh generates");
        // What validation would refuse (a negative HTTP status), slipped past it: the proxy's
        // config cannot be encoded, and the check names the proxy and the resource.
        let broken: Vec<_> = objects
            .into_iter()
            .map(|mut l| {
                if let Object::VirtualService(vs) = &mut l.object {
                    let abort = vs.spec.http[0].fault.as_mut().and_then(|f| f.abort.as_mut()).expect("abort");
                    abort.http_status = Some(-1);
                }
                l
            })
            .collect();
        let (snapshot, _) = Snapshot::build(broken);
        let stuck = ungeneratable(&snapshot);
        assert_eq!(stuck.len(), 1, "{stuck:?}");
        assert_eq!(stuck[0].0, "sidecar~127.0.60.2~client.ns~ns.svc.cluster.local");
        assert!(stuck[0].1.contains("RouteConfiguration"), "{}", stuck[0].1);
    }
}
