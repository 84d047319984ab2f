//! The real agent at scale (root): `sluice serve` on S services / S×E endpoints, `sluice agent`
//! attached to a cgroup of the benchmark's; the agent's RSS once it holds everything (services
//! and workloads), the map memory, and the time from a file write (one service's endpoints move;
//! debounce 0) until the kernel map holds the new backend.

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_dataplane::loader::Maps;
use sluice_dataplane::sync::addr;
use sluice_dataplane_common::{ServiceKey, SlotKey, proto};
use sluice_testkit::{Proc, free_port};

use sluice_dataplane::sandbox::Sandbox;

use crate::maps::map_memory;
use crate::mesh::{pod_ip, service_yaml, service_yaml_at, vip};
use crate::stats::{ms, status_kb};

/// True when service `i`'s first slot points at `backend`.
fn first_backend_is(maps: &Maps, i: usize, backend: IpAddr) -> bool {
    let key = ServiceKey { addr: addr(IpAddr::V4(vip(i))), port: 8080, proto: proto::TCP, pad: 0 };
    let Ok(service) = maps.services.get(&key, 0) else { return false };
    (0..service.slot_count).any(|slot| {
        maps.slots
            .get(&SlotKey { service: service.id, slot }, 0)
            .ok()
            .and_then(|b| maps.backends.get(&b, 0).ok())
            .is_some_and(|b| b.addr == addr(backend))
    })
}

fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while !f() {
        anyhow::ensure!(start.elapsed() < timeout, "{what} did not happen within {timeout:?}");
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(start.elapsed())
}

/// Runs the measurement; `changes` endpoint moves.
pub fn run(sluice: &Path, services: usize, per_service: usize, changes: usize) -> anyhow::Result<()> {
    let sandbox = Sandbox::new("bench-agent")?;
    let dir = std::env::temp_dir().join(format!("sluice-bench-agent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("config"))?;
    let mut rest = String::new();
    for i in 1..services {
        rest.push_str(&service_yaml(i, per_service, 80));
    }
    std::fs::write(dir.join("config/mesh.yaml"), rest)?;
    std::fs::write(dir.join("config/svc-0.yaml"), service_yaml(0, per_service, 80))?;
    let xds = free_port();
    let _serve = Proc::spawn(
        "sluice serve",
        Command::new(sluice).args(["serve", "--debounce-ms", "0", "--config"]).arg(dir.join("config")).args([
            "--xds-addr",
            &format!("127.0.0.1:{xds}"),
            "--monitoring-addr",
            &format!("127.0.0.1:{}", free_port()),
        ]),
        &dir.join("serve.log"),
    );
    let started = Instant::now();
    let agent = Proc::spawn(
        "sluice agent",
        Command::new(sluice)
            .args(["agent", "--node", "node-1", "--xds-addr", &format!("127.0.0.1:{xds}"), "--cgroup"])
            .arg(&sandbox.cgroup)
            .arg("--pin-dir")
            .arg(&sandbox.pin_dir)
            .arg("--socket")
            .arg(dir.join("agent.sock"))
            .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())]),
        &dir.join("agent.log"),
    );
    let last = IpAddr::V4(pod_ip(services * per_service - 1));
    let maps = {
        let mut opened = None;
        wait("the agent pinning its maps", Duration::from_secs(60), || {
            opened = Maps::open(&sandbox.pin_dir).ok();
            opened.is_some()
        })?;
        opened.expect("opened")
    };
    let synced =
        wait("the full config in the maps", Duration::from_secs(300), || first_backend_is(&maps, services - 1, last))?;
    let synced = synced.max(started.elapsed());
    // The workloads come after the services; the endpoints map gets every address once their
    // last part is in. RSS is read once the agent holds both.
    wait("every workload in the endpoints map", Duration::from_secs(300), || {
        maps.endpoints.get(&addr(last), 0).is_ok()
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let pid = agent.child.id();
    let (rss, hwm) = (status_kb(pid, "VmRSS").unwrap_or(0), status_kb(pid, "VmHWM").unwrap_or(0));
    // Of RSS, what the process allocated (the rest is the mapped binary and libraries).
    let anon = status_kb(pid, "RssAnon").unwrap_or(0);
    let mut times = Vec::new();
    for c in 0..changes {
        let first = 300_000 + c * per_service;
        let written = Instant::now();
        std::fs::write(dir.join("config/svc-0.yaml"), service_yaml_at(0, per_service, 80, first))?;
        wait("the endpoint change in the maps", Duration::from_secs(60), || {
            first_backend_is(&maps, 0, IpAddr::V4(pod_ip(first)))
        })?;
        times.push(written.elapsed());
        std::thread::sleep(Duration::from_millis(300));
    }
    let memory = map_memory(&sandbox.pin_dir);
    drop(agent);
    // SLUICE_BENCH_KEEP=1 keeps the config and the logs for a look afterwards.
    if std::env::var_os("SLUICE_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("kept {}", dir.display());
    }
    println!("The agent at scale, serve and agent both running (release build); debounce 0\n");
    println!(
        "| services | backends | first full sync (agent start → last service in the maps) | agent RSS / peak MB (of it anonymous) | map memory (memlock) MB | file write → map update, one endpoint change ({changes} changes, min / median / max ms) |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {services} | {} | {:.2} s | {:.1} / {:.1} ({:.1}) | {:.1} | {} |",
        services * per_service,
        synced.as_secs_f64(),
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        anon as f64 / 1024.0,
        memory as f64 / 1048576.0,
        ms(&times)
    );
    let each: Vec<String> = times.iter().map(|t| format!("{:.2}", t.as_secs_f64() * 1000.0)).collect();
    println!("\nEach change in order (ms): {}", each.join(", "));
    Ok(())
}
