//! Translation: S services with one VirtualService and one DestinationRule each, through
//! parse → snapshot → sidecar translation for one client and the node agent's entries; then one
//! endpoint change and one VirtualService change through the serving path (snapshot update and
//! the generator's new xDS snapshots for the agent and the client). Each size runs in its own
//! process so peak memory is its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_controlplane::generator::{Current, MeshGenerator};
use sluice_translator::dataplane::translate_node;
use sluice_translator::envoy::translate_sidecar;
use sluice_translator::parse::parse_documents;
use sluice_translator::snapshot::{Change, Snapshot};
use sluice_xds::cache::{ENDPOINT, ROUTE, Snapshot as XdsSnapshot};
use sluice_xds::server::{Generator, NodeInfo};

use crate::mesh::{CLIENT_NODE, mesh_yaml, service_yaml, service_yaml_at};
use crate::stats::{ms, status_kb};

/// The objects of `text` as snapshot changes.
fn changes(text: &str, only: Option<&str>) -> Vec<Change> {
    // The same file as the mesh's: an object rewritten unchanged is no change.
    let (objects, _) = parse_documents("bench.yaml", text);
    let wanted = objects.into_iter().filter(|o| only.is_none_or(|k| o.reference.kind == k));
    wanted.map(|o| Change::Upsert(Arc::new(o))).collect()
}

fn node(id: &str) -> NodeInfo {
    NodeInfo { id: id.into(), cluster: String::new(), metadata: Default::default() }
}

/// One change through the serving path: the snapshot update, then the node agent's and the
/// client sidecar's new xDS snapshots from the generator (patched where the change allows).
/// Returns the time and the xDS types whose version changed for the client.
fn change(
    generator: &MeshGenerator,
    snapshot: &mut Snapshot,
    version: u64,
    change: Vec<Change>,
    previous: &mut [XdsSnapshot; 2],
) -> anyhow::Result<(Duration, Vec<String>)> {
    let start = Instant::now();
    let delta = snapshot.apply(change);
    generator.set(Current { version, snapshot: snapshot.clone() }, delta);
    let agent = generator.generate(&node("agent~node-1"), Some(&previous[0])).map_err(anyhow::Error::msg)?;
    let client = generator.generate(&node(CLIENT_NODE), Some(&previous[1])).map_err(anyhow::Error::msg)?;
    let took = start.elapsed();
    let changed =
        client.types.iter().filter(|(t, r)| previous[1].types[*t].version != r.version).map(|(t, _)| t.clone());
    let changed = changed.collect();
    *previous = [agent, client];
    Ok((took, changed))
}

/// Measures one size in this process and prints one table row.
pub fn one(services: usize, runs: usize) -> anyhow::Result<()> {
    let text = mesh_yaml(services, 2);
    let (mut load, mut sidecar, mut node_entries) = (Vec::new(), Vec::new(), Vec::new());
    let (mut endpoint, mut routing) = (Vec::new(), Vec::new());
    let mut clusters = 0;
    for run in 0..runs {
        let start = Instant::now();
        let (objects, diags) = parse_documents("bench.yaml", &text);
        anyhow::ensure!(
            diags.iter().all(|d| d.severity != sluice_translator::diagnostic::Severity::Error),
            "{diags:?}"
        );
        let (mut snapshot, _) = Snapshot::build(objects);
        load.push(start.elapsed());
        let t = Instant::now();
        let resources = translate_sidecar(&snapshot, CLIENT_NODE, Default::default())?;
        sidecar.push(t.elapsed());
        clusters = resources.clusters.len();
        let t = Instant::now();
        let (entries, _) = translate_node(&snapshot, "node-1");
        node_entries.push(t.elapsed());
        anyhow::ensure!(entries.services.len() == services, "kernel services: {}", entries.services.len());

        let generator = MeshGenerator::new(Current { version: 1, snapshot: snapshot.clone() });
        let agent = generator.generate(&node("agent~node-1"), None).map_err(anyhow::Error::msg)?;
        let client = generator.generate(&node(CLIENT_NODE), None).map_err(anyhow::Error::msg)?;
        let mut previous = [agent, client];
        // One endpoint change: a service's endpoints (its slice and Pods) move.
        let i = run % services;
        let moved = changes(&service_yaml_at(i, 2, 80, 500_000 + run * 2), None);
        let (took, changed) = change(&generator, &mut snapshot, 2, moved, &mut previous)?;
        anyhow::ensure!(changed == [ENDPOINT], "an endpoint change changed {changed:?}");
        endpoint.push(took);
        // One VirtualService change: new weights.
        let reweighted = changes(&service_yaml(i, 2, 50), Some("VirtualService"));
        let (took, changed) = change(&generator, &mut snapshot, 3, reweighted, &mut previous)?;
        anyhow::ensure!(changed == [ROUTE], "a VirtualService change changed {changed:?}");
        routing.push(took);
    }
    let peak = status_kb(std::process::id(), "VmHWM").unwrap_or(0);
    println!(
        "| {services} | {} | {} | {} | {} | {} | {clusters} | {:.0} |",
        ms(&load),
        ms(&sidecar),
        ms(&node_entries),
        ms(&endpoint),
        ms(&routing),
        peak as f64 / 1024.0
    );
    Ok(())
}

/// Runs every size in a child process.
pub fn run(sizes: &[usize], runs: usize) -> anyhow::Result<()> {
    println!("Translation, {runs} runs each (min / median / max, ms); peak RSS of the process");
    println!();
    println!(
        "| services | parse + snapshot | sidecar translation (1 proxy) | node agent entries | one endpoint changed | one VirtualService changed | clusters | peak RSS MB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for s in sizes {
        let status = std::process::Command::new(std::env::current_exe()?)
            .args(["translate-one", "--services", &s.to_string(), "--runs", &runs.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "translate-one {s} failed");
    }
    Ok(())
}
