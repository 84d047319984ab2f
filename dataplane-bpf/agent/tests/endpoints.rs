//! The address → identity map on the real maps (root): a first change writes every held
//! workload's address and deletes what an earlier agent left; later changes rewrite only the
//! addresses they touched; of two workloads with one address the last by name wins, and the
//! other takes over when it goes.

use std::collections::BTreeSet;
use std::time::Instant;

use sluice_dataplane::held::{HeldSet, HeldWorkload, Hold, Version};
use sluice_dataplane::loader::{Dataplane, Maps};
use sluice_dataplane::policy::{PolicySync, stable_id};
use sluice_dataplane::sandbox::Sandbox;
use sluice_dataplane::sync::addr;
use sluice_dataplane_api::KernelWorkload;
use sluice_dataplane_common::{Addr, Endpoint};
use sluice_testkit::is_root;

fn workload(name: &str, ip: &str, account: &str) -> KernelWorkload {
    KernelWorkload {
        namespace: "default".into(),
        name: name.into(),
        ip: Some(ip.into()),
        service_account: account.into(),
        mode: sluice_dataplane_api::Mode::Kernel as i32,
        ..Default::default()
    }
}

fn ip(text: &str) -> Addr {
    addr(text.parse().unwrap())
}

/// The map's entries as (address, identity).
fn entries(maps: &Maps) -> Vec<(Addr, u32)> {
    let mut all: Vec<(Addr, u32)> =
        maps.endpoints.iter().map(|e| e.map(|(a, e): (Addr, Endpoint)| (a, e.identity)).unwrap()).collect();
    all.sort();
    all
}

fn identity(account: &str) -> u32 {
    stable_id(&format!("default/{account}"))
}

#[test]
fn endpoint_identities_follow_the_held_workloads() {
    assert!(is_root(), "this test loads eBPF programs and creates cgroups: run it as root (CI does)");
    let sandbox = Sandbox::new("endpoints").unwrap();
    let mut dp = Dataplane::attach(&sandbox.pin_dir, &sandbox.cgroup).unwrap();
    // What an earlier agent left: an address no workload has any more.
    let stale = Endpoint { identity: 7, namespace: 7, policy: 0, pad: 0 };
    dp.maps.endpoints.insert(ip("127.0.8.99"), stale, 0).unwrap();

    let mut held: HeldSet<HeldWorkload> = HeldSet::new();
    let put = |held: &mut HeldSet<HeldWorkload>, w: KernelWorkload| {
        held.insert(w.name.as_str().into(), w.hold(Version::parse("1")).unwrap());
    };
    put(&mut held, workload("a", "127.0.8.1", "sa-a"));
    put(&mut held, workload("b", "127.0.8.2", "sa-b"));
    let mut policy = PolicySync::adopt(&dp.maps).unwrap();
    assert!(policy.rewrites_all(), "a started agent rewrites every address first");
    let apply = |policy: &mut PolicySync, maps: &mut Maps, held: &HeldSet<HeldWorkload>, touched: &[&str]| {
        let touched: BTreeSet<Addr> = touched.iter().map(|t| ip(t)).collect();
        policy.apply(maps, held.iter(), touched, Instant::now()).unwrap();
    };
    apply(&mut policy, &mut dp.maps, &held, &[]);
    assert_eq!(entries(&dp.maps), [(ip("127.0.8.1"), identity("sa-a")), (ip("127.0.8.2"), identity("sa-b"))]);
    assert!(!policy.rewrites_all());

    // b moves: its old and new address are touched.
    put(&mut held, workload("b", "127.0.8.3", "sa-b"));
    apply(&mut policy, &mut dp.maps, &held, &["127.0.8.2", "127.0.8.3"]);
    assert_eq!(entries(&dp.maps), [(ip("127.0.8.1"), identity("sa-a")), (ip("127.0.8.3"), identity("sa-b"))]);

    // c takes a's address: the last by name wins; when c goes, a has it again.
    put(&mut held, workload("c", "127.0.8.1", "sa-c"));
    apply(&mut policy, &mut dp.maps, &held, &["127.0.8.1"]);
    assert_eq!(entries(&dp.maps)[0], (ip("127.0.8.1"), identity("sa-c")));
    held.remove("c");
    apply(&mut policy, &mut dp.maps, &held, &["127.0.8.1"]);
    assert_eq!(entries(&dp.maps), [(ip("127.0.8.1"), identity("sa-a")), (ip("127.0.8.3"), identity("sa-b"))]);

    // An address that was not touched is left alone, even if the held set says otherwise.
    put(&mut held, workload("a", "127.0.8.4", "sa-a"));
    apply(&mut policy, &mut dp.maps, &held, &[]);
    assert_eq!(entries(&dp.maps)[0], (ip("127.0.8.1"), identity("sa-a")), "untouched");
    // A full rewrite puts everything right.
    policy.rewrite_all();
    apply(&mut policy, &mut dp.maps, &held, &[]);
    assert_eq!(entries(&dp.maps), [(ip("127.0.8.3"), identity("sa-b")), (ip("127.0.8.4"), identity("sa-a"))]);
}
