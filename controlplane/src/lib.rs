//! The sluice control plane: sources, the config pipeline, and the commands of the `sluice`
//! binary.

pub mod admission;
pub mod allocator;
pub mod bootstrap;
pub mod ca_secret;
pub mod certificates;
pub mod crds;
pub mod file_source;
pub mod generator;
pub mod kube_source;
pub mod lease;
pub mod metrics;
pub mod monitoring;
pub mod root_cert;
pub mod serve;
pub mod status;
pub mod store;
pub mod token_review;

use std::path::PathBuf;

use serde_json::Value;
use sluice_translator::diagnostic::Diagnostic;
use sluice_translator::envoy::{Certificates, ProxyResources, Resource, XdsClient, translate_sidecar};
use sluice_translator::snapshot::{Change, Snapshot};

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
    let (mut snapshot, more) = Snapshot::build(objects.clone());
    diagnostics.extend(more);
    if !admission::ungeneratable(&snapshot, true).is_empty() {
        // Refuse what `sluice serve` would refuse, naming the objects (the first of duplicates
        // is the one built, as in the snapshot).
        let mut origins = std::collections::HashMap::new();
        let mut changes = Vec::new();
        for l in objects {
            if !origins.contains_key(&l.reference) {
                origins.insert(l.reference.clone(), l.origin.clone());
                changes.push(Change::Upsert(std::sync::Arc::new(l)));
            }
        }
        let admitted = admission::admit(&Snapshot::default(), changes);
        for (r, stuck) in &admitted.refused {
            diagnostics.push(stuck.refusal(&origins[r], r));
        }
        snapshot = admitted.snapshot;
    }
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
pub fn translate_config_dump(
    snapshot: &Snapshot,
    node_id: &str,
    certificates: Certificates,
    client: XdsClient,
) -> Result<(Value, ProxyResources), TranslateError> {
    let resources = match client {
        XdsClient::Envoy => translate_sidecar(snapshot, node_id, certificates)?,
        XdsClient::ProxylessGrpc => sluice_translator::envoy::translate_proxyless(snapshot, node_id)?,
    };
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

/// What `sluice translate` prints for a node id: a proxy's `/config_dump`, or for `agent~<node>`
/// the node agent's kernel entries; plus the translation's warnings.
pub fn translate_json(
    snapshot: &Snapshot,
    node_id: &str,
    certificates: Certificates,
    client: XdsClient,
) -> Result<(Value, Vec<Diagnostic>), TranslateError> {
    if let Some(node) = node_id.strip_prefix(sluice_translator::dataplane::AGENT_NODE_PREFIX) {
        let (entries, diagnostics) = sluice_translator::dataplane::translate_node(snapshot, node);
        return Ok((serde_json::to_value(entries).expect("serializable"), diagnostics));
    }
    let (dump, resources) = translate_config_dump(snapshot, node_id, certificates, client)?;
    Ok((dump, resources.diagnostics))
}
