//! Property test on the real maps (root): random sequences of service and backend updates
//! applied by the agent's ordered sync while readers run. A reader must never find a service
//! whose slot is missing or points at a missing backend. Two readers: a thread walking the
//! pinned maps as a program does (service → slot → backend), and a kernel-mode process whose
//! connects go through the real connect4 program (a broken chain would let a connect through
//! to the VIP, where nothing listens: "connection refused").

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::python_in;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sluice_dataplane::loader::{Dataplane, Maps};
use sluice_dataplane::policy::workload_value;
use sluice_dataplane::sandbox::Sandbox;
use sluice_dataplane::sync::MapSync;
use sluice_dataplane_api::{KernelService, KernelWorkload, NodeDataplane, WeightedBackend};
use sluice_dataplane_common::SlotKey;
use sluice_testkit::{Backend, CONNECT_LOOP_PY, is_root};

/// Backends that really listen, so every balanced connect succeeds.
const BACKENDS: [&str; 6] = ["127.0.9.11", "127.0.9.12", "127.0.9.13", "127.0.9.14", "127.0.9.15", "127.0.9.16"];
const PORT: u32 = 8082;
/// Services the reader process connects to (the sequences add and drop backends, never a whole
/// service, so a VIP never stops being balanced).
const VIPS: [&str; 3] = ["127.100.9.11", "127.100.9.12", "127.100.9.13"];

fn node(sets: &[Vec<(usize, u32)>]) -> NodeDataplane {
    let services = sets
        .iter()
        .enumerate()
        .map(|(i, backends)| KernelService {
            name: format!("s{i}"),
            vip: VIPS[i].into(),
            port: PORT,
            protocol: sluice_dataplane_api::Protocol::Tcp as i32,
            backends: backends
                .iter()
                .map(|(b, w)| WeightedBackend { address: BACKENDS[*b].into(), port: PORT, weight: *w })
                .collect(),
            needs_l7: false,
        })
        .collect();
    NodeDataplane { services, workloads: Vec::new() }
}

/// One state: for each service, 1–6 distinct backends with weights.
fn state() -> impl Strategy<Value = Vec<Vec<(usize, u32)>>> {
    let service = proptest::collection::btree_map(0..BACKENDS.len(), 1u32..2000, 1..=BACKENDS.len())
        .prop_map(|m| m.into_iter().collect::<Vec<_>>());
    proptest::collection::vec(service, VIPS.len())
}

/// Walks every service's slots as the program does; returns a description of the first broken
/// chain.
fn broken_chain(maps: &Maps) -> Option<String> {
    for item in maps.services.iter() {
        let Ok((key, service)) = item else { continue };
        for slot in 0..service.slot_count {
            let Ok(backend) = maps.slots.get(&SlotKey { service: service.id, slot }, 0) else {
                return Some(format!("service {} slot {slot} of {} missing", service.id, service.slot_count));
            };
            if maps.backends.get(&backend, 0).is_err() {
                return Some(format!(
                    "service {} ({:?}) slot {slot} → missing backend {backend}",
                    service.id, key.addr
                ));
            }
        }
    }
    None
}

#[test]
fn readers_never_see_a_slot_without_its_backend() {
    assert!(is_root(), "this test loads eBPF programs and creates cgroups: run it as root (CI does)");
    let sandbox = Sandbox::new("consistency").unwrap();
    let client = sandbox.cgroup.join("client");
    sluice_dataplane::cgroup::create(&client).unwrap();
    let _listeners: Vec<Backend> =
        BACKENDS.iter().map(|a| Backend::start(a, format!("{a}:{PORT}").parse().unwrap())).collect();
    let mut dp = Dataplane::attach(&sandbox.pin_dir, &sandbox.cgroup).unwrap();
    let caller = KernelWorkload {
        namespace: "default".into(),
        name: "reader".into(),
        mode: sluice_dataplane_api::Mode::Kernel as i32,
        ..Default::default()
    };
    dp.maps
        .workloads
        .insert(sluice_dataplane::cgroup::cgroup_id(&client).unwrap(), workload_value(&caller), 0)
        .unwrap();
    let mut sync = MapSync::adopt(&dp.maps).unwrap();
    sync.apply(&mut dp.maps, &node(&[vec![(0, 1)], vec![(1, 1)], vec![(2, 1)]]), Instant::now()).unwrap();

    // Reader 1: a thread on its own handles to the pinned maps.
    let stop = Arc::new(AtomicBool::new(false));
    let walks = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, walks, pin_dir) = (stop.clone(), walks.clone(), sandbox.pin_dir.clone());
        std::thread::spawn(move || {
            let maps = Maps::open(&pin_dir).unwrap();
            while !stop.load(Ordering::Relaxed) {
                if let Some(broken) = broken_chain(&maps) {
                    return Some(broken);
                }
                walks.fetch_add(1, Ordering::Relaxed);
            }
            None
        })
    };
    // Reader 2: connects through connect4, round robin over the VIPs, for the whole run.
    let connects: Vec<_> =
        VIPS.iter().map(|vip| python_in(&client, CONNECT_LOOP_PY, &[vip, "8082", "400", "10"])).collect();

    let mut runner = TestRunner::new(Config { cases: 24, failure_persistence: None, ..Config::default() });
    // The runner takes a Fn: the writer's state is borrowed per case.
    let writer = std::cell::RefCell::new((dp, sync, 0usize));
    let result = runner.run(&proptest::collection::vec(state(), 1..8), |sequence| {
        let (dp, sync, updates) = &mut *writer.borrow_mut();
        for s in &sequence {
            sync.apply(&mut dp.maps, &node(s), Instant::now()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            *updates += 1;
            // Real time passes so deferred deletions run during the sequence, as in the agent.
            std::thread::sleep(Duration::from_millis(15));
            sync.collect(&mut dp.maps, Instant::now()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(broken_chain(&dp.maps).is_none(), "after an update: {:?}", broken_chain(&dp.maps));
        }
        Ok(())
    });
    let updates = writer.borrow().2;
    stop.store(true, Ordering::Relaxed);
    let reader_found = reader.join().unwrap();
    let outcomes: Vec<String> = connects.into_iter().flat_map(|c| c.lines()).collect();
    result.unwrap();
    assert_eq!(reader_found, None, "a concurrent reader found a broken chain");
    eprintln!(
        "{updates} updates; the map walker checked {} times; {} connects through connect4",
        walks.load(Ordering::Relaxed),
        outcomes.len()
    );
    assert_eq!(outcomes.len(), 1200);
    let failed: Vec<_> = outcomes.iter().filter(|l| l.starts_with("error")).collect();
    assert!(failed.is_empty(), "connects that met a broken chain: {failed:?}");
    assert!(walks.load(Ordering::Relaxed) > 100, "the walker must have run during the updates");
}
