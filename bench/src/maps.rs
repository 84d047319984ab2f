//! Map programming (root): a full sync of S services / S×E endpoints into the real maps, and
//! one endpoint change; then the map memory the kernel charges for them. Programs are attached
//! to a cgroup of the benchmark's own and everything is removed at the end.

use std::path::Path;
use std::time::Instant;

use sluice_dataplane::loader::Dataplane;
use sluice_dataplane::sandbox::Sandbox;
use sluice_dataplane::sync::MapSync;
use sluice_translator::dataplane::{NodeDataplane, translate_node};
use sluice_translator::parse::parse_documents;
use sluice_translator::snapshot::Snapshot;

use crate::mesh::mesh_yaml;
use crate::stats::ms;

/// The agent's entries for the synthetic mesh.
pub fn entries(services: usize, per_service: usize) -> anyhow::Result<NodeDataplane> {
    let (objects, _) = parse_documents("bench.yaml", &mesh_yaml(services, per_service));
    let (snapshot, _) = Snapshot::build(objects);
    Ok(translate_node(&snapshot, "node-1").0)
}

/// Kernel memory charged for the pinned maps (`memlock` in their fdinfo), in bytes.
pub fn map_memory(pin_dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(pin_dir).into_iter().flatten().flatten() {
        if entry.path().is_dir() {
            continue;
        }
        // Opening a pinned map gives an fd whose fdinfo tells its memlock.
        if let Ok(bytes) = memlock(&entry.path()) {
            total += bytes;
        }
    }
    total
}

fn memlock(path: &Path) -> anyhow::Result<u64> {
    use std::os::fd::{AsFd, AsRawFd};
    let map = sluice_dataplane::loader::open_pinned(path)?;
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    Ok(info.lines().find_map(|l| l.strip_prefix("memlock:")?.trim().parse().ok()).unwrap_or(0))
}

/// Full sync and one endpoint change, `runs` times each on fresh maps.
pub fn run(services: usize, per_service: usize, runs: usize) -> anyhow::Result<()> {
    let desired = entries(services, per_service)?;
    let mut changed = desired.clone();
    changed.services[0].backends[0].address = "127.0.250.1".into();
    let (mut full, mut one) = (Vec::new(), Vec::new());
    let mut memory = 0;
    for _ in 0..runs {
        let sandbox = Sandbox::new("bench-maps")?;
        let mut dp = Dataplane::attach(&sandbox.pin_dir, &sandbox.cgroup)?;
        let mut sync = MapSync::adopt(&dp.maps)?;
        let t = Instant::now();
        sync.apply(&mut dp.maps, &desired, Instant::now())?;
        full.push(t.elapsed());
        // As the agent applies a Delta response: only the service that changed.
        let t = Instant::now();
        let stats = sync.apply_changes(&mut dp.maps, &changed.services[..1], &[], Instant::now())?;
        one.push(t.elapsed());
        anyhow::ensure!(stats.services_written == 1, "one endpoint change wrote {stats:?}");
        memory = map_memory(&sandbox.pin_dir);
    }
    let endpoints: usize = desired.services.iter().map(|s| s.backends.len()).sum();
    println!("Map programming, {runs} runs (min / median / max, ms)");
    println!();
    println!("| services | backends | full sync | one endpoint changed | map memory (memlock) MB |");
    println!("|---|---|---|---|---|");
    println!("| {services} | {endpoints} | {} | {} | {:.1} |", ms(&full), ms(&one), memory as f64 / 1048576.0);
    Ok(())
}
