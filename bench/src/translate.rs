//! Translation: S services with one VirtualService and one DestinationRule each, through
//! parse → snapshot → sidecar translation for one client and the node agent's entries; and one
//! VirtualService changed afterwards. Each size runs in its own process so peak memory is its own.

use std::time::Instant;

use sluice_translator::dataplane::translate_node;
use sluice_translator::envoy::translate_sidecar;
use sluice_translator::parse::parse_documents;
use sluice_translator::snapshot::Snapshot;

use crate::mesh::{CLIENT_NODE, mesh_yaml, service_yaml};
use crate::stats::{ms, status_kb};

/// Measures one size in this process and prints one table row.
pub fn one(services: usize, runs: usize) -> anyhow::Result<()> {
    let text = mesh_yaml(services, 2);
    let (mut load, mut sidecar, mut node, mut change) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut clusters = 0;
    for run in 0..runs {
        let start = Instant::now();
        let (objects, diags) = parse_documents("bench.yaml", &text);
        anyhow::ensure!(
            diags.iter().all(|d| d.severity != sluice_translator::diagnostic::Severity::Error),
            "{diags:?}"
        );
        let (snapshot, _) = Snapshot::build(objects.clone());
        load.push(start.elapsed());
        let t = Instant::now();
        let resources = translate_sidecar(&snapshot, CLIENT_NODE)?;
        sidecar.push(t.elapsed());
        clusters = resources.clusters.len();
        let t = Instant::now();
        let (entries, _) = translate_node(&snapshot, "node-1");
        node.push(t.elapsed());
        anyhow::ensure!(entries.services.len() == services, "kernel services: {}", entries.services.len());
        // One VirtualService changes: parse that object, rebuild the snapshot from the parsed
        // objects, translate again for the client.
        let t = Instant::now();
        let (changed, _) = parse_documents("change.yaml", &service_yaml(run % services, 2, 50));
        let vs = changed.into_iter().find(|o| o.reference.kind == "VirtualService").expect("a VirtualService");
        let mut next = objects;
        let slot = next.iter().position(|o| o.reference == vs.reference).expect("the VirtualService is there");
        next[slot] = vs;
        let (snapshot, _) = Snapshot::build(next);
        translate_sidecar(&snapshot, CLIENT_NODE)?;
        change.push(t.elapsed());
    }
    let peak = status_kb(std::process::id(), "VmHWM").unwrap_or(0);
    println!(
        "| {services} | {} | {} | {} | {} | {clusters} | {:.0} |",
        ms(&load),
        ms(&sidecar),
        ms(&node),
        ms(&change),
        peak as f64 / 1024.0
    );
    Ok(())
}

/// Runs every size in a child process.
pub fn run(sizes: &[usize], runs: usize) -> anyhow::Result<()> {
    println!("Translation, {runs} runs each (min / median / max, ms); peak RSS of the process");
    println!();
    println!(
        "| services | parse + snapshot | sidecar translation (1 proxy) | node agent entries | one VirtualService changed | clusters | peak RSS MB |"
    );
    println!("|---|---|---|---|---|---|---|");
    for s in sizes {
        let status = std::process::Command::new(std::env::current_exe()?)
            .args(["translate-one", "--services", &s.to_string(), "--runs", &runs.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "translate-one {s} failed");
    }
    Ok(())
}
