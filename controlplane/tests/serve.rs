//! `sluice serve` on its own (no proxy): a burst of edits becomes one reload, and an edit that
//! breaks an object keeps its last good form, reported in `/debug/configz`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sluice_testkit::{Proc, eventually, free_port, http_get};

fn metric(port: u16, name: &str) -> Option<u64> {
    let (_, text) = http_get(&format!("127.0.0.1:{port}"), "x", "/metrics", &[]).ok()?;
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} ")).and_then(|v| v.trim().parse().ok()))
}

fn configz(port: u16) -> serde_json::Value {
    serde_json::from_str(&http_get(&format!("127.0.0.1:{port}"), "x", "/debug/configz", &[]).expect("configz").1)
        .expect("json")
}

fn dr(host: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: default}}\nspec: {{host: \"{host}\"}}\n"
    )
}

fn start(dir: &Path, debounce_ms: u64) -> (Proc, u16) {
    let (xds, mon) = (free_port(), free_port());
    let p = Proc::spawn(
        "sluice",
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["serve", "--debounce-ms", &debounce_ms.to_string(), "--config"])
            .arg(dir.join("cfg"))
            .args(["--xds-addr", &format!("127.0.0.1:{xds}"), "--monitoring-addr", &format!("127.0.0.1:{mon}")]),
        &dir.join("sluice.log"),
    );
    let ready = eventually(Duration::from_secs(20), || metric(mon, "sluice_config_version").filter(|v| *v >= 1));
    assert!(
        ready.is_some(),
        "sluice not ready: {}",
        std::fs::read_to_string(dir.join("sluice.log")).unwrap_or_default()
    );
    (p, mon)
}

#[test]
fn a_burst_of_edits_is_one_reload() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cfg")).unwrap();
    std::fs::write(dir.path().join("cfg/dr.yaml"), dr("web")).unwrap();
    let (_sluice, mon) = start(dir.path(), 400);
    assert_eq!(metric(mon, "sluice_config_version"), Some(1));
    for i in 0..5 {
        std::fs::write(
            dir.path().join(format!("cfg/extra-{i}.yaml")),
            dr("web").replace("name: web", &format!("name: web-{i}")),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = eventually(Duration::from_secs(10), || metric(mon, "sluice_config_version").filter(|v| *v > 1));
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(v, Some(2), "five edits within the debounce window are one new version");
    assert_eq!(metric(mon, "sluice_config_version"), Some(2));
    assert_eq!(configz(mon)["objects"].as_array().map(Vec::len), Some(6));
}

#[test]
fn a_broken_edit_keeps_the_last_good_object() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cfg")).unwrap();
    std::fs::write(dir.path().join("cfg/dr.yaml"), dr("web")).unwrap();
    let (_sluice, mon) = start(dir.path(), 20);
    std::fs::write(dir.path().join("cfg/dr.yaml"), dr("bad host")).unwrap();
    let rejected = eventually(Duration::from_secs(10), || {
        let c = configz(mon);
        (c["rejected"].as_array()?.len() == 1).then_some(c)
    })
    .expect("the rejection shows in /debug/configz");
    let message = rejected["rejected"][0].as_str().unwrap();
    assert!(message.contains("DestinationRule/default/web: spec.host"), "{message}");
    assert_eq!(rejected["objects"].as_array().map(Vec::len), Some(1), "the last good DestinationRule is still served");
    assert_eq!(metric(mon, "sluice_config_rejected_objects"), Some(1));
    assert_eq!(metric(mon, "sluice_config_version"), Some(1), "nothing served changed");
}

/// `sluice serve` as an unprivileged user (root reads any directory): a subdirectory that
/// becomes unreadable keeps its objects served; readable again, its edits apply.
#[test]
fn an_unreadable_directory_keeps_its_objects() {
    assert!(sluice_testkit::is_root(), "runs sluice as nobody (setpriv): run as root (CI does)");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    std::fs::create_dir_all(cfg.join("policies")).unwrap();
    std::fs::write(cfg.join("dr.yaml"), dr("web")).unwrap();
    std::fs::write(cfg.join("policies/other.yaml"), dr("other").replace("name: web", "name: other")).unwrap();
    sluice_testkit::run_ok(&["chmod", "-R", "a+rwX", dir.path().to_str().unwrap()]);
    let (xds, mon) = (free_port(), free_port());
    let _sluice = Proc::spawn(
        "sluice",
        Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", env!("CARGO_BIN_EXE_sluice")])
            .args(["serve", "--debounce-ms", "20", "--config"])
            .arg(&cfg)
            .args(["--xds-addr", &format!("127.0.0.1:{xds}"), "--monitoring-addr", &format!("127.0.0.1:{mon}")]),
        &dir.path().join("sluice.log"),
    );
    let objects = |n: usize| {
        eventually(Duration::from_secs(10), || {
            let c: serde_json::Value =
                serde_json::from_str(&http_get(&format!("127.0.0.1:{mon}"), "x", "/debug/configz", &[]).ok()?.1)
                    .ok()?;
            (c["objects"].as_array()?.len() == n).then_some(c)
        })
    };
    objects(2).unwrap_or_else(|| panic!("{}", std::fs::read_to_string(dir.path().join("sluice.log")).unwrap()));
    sluice_testkit::run_ok(&["chmod", "000", cfg.join("policies").to_str().unwrap()]);
    // A change elsewhere makes sluice walk the tree again.
    std::fs::write(cfg.join("dr.yaml"), dr("web2")).unwrap();
    let c = eventually(Duration::from_secs(10), || {
        let c = configz(mon);
        (c["rejected"].to_string().contains("stay served")).then_some(c)
    })
    .expect("the unreadable directory is reported");
    assert_eq!(c["objects"].as_array().map(Vec::len), Some(2), "its DestinationRule is still served: {c:#}");
    sluice_testkit::run_ok(&["chmod", "755", cfg.join("policies").to_str().unwrap()]);
    std::fs::write(cfg.join("policies/other.yaml"), "").unwrap();
    objects(1).expect("readable again: the deletion of its object applies");
}

/// The config directory deleted, recreated, and swapped in by renames: nothing is dropped
/// while it is gone, and every later edit applies.
#[test]
fn the_config_directory_can_go_come_back_and_be_swapped() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    std::fs::write(cfg.join("dr.yaml"), dr("web")).unwrap();
    let (_sluice, mon) = start(dir.path(), 20);
    let hosts = || -> Vec<String> {
        let c = configz(mon);
        let mut h: Vec<String> =
            c["objects"].as_array().unwrap().iter().filter_map(|o| o["name"].as_str().map(String::from)).collect();
        h.sort();
        h
    };
    let version =
        |v: u64| eventually(Duration::from_secs(10), || metric(mon, "sluice_config_version").filter(|n| *n >= v));
    assert_eq!(hosts(), ["web"]);

    std::fs::remove_dir_all(&cfg).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(hosts(), ["web"], "a deleted root keeps its objects");
    assert!(configz(mon)["rejected"].to_string().contains("no such file or directory"));

    std::fs::create_dir(&cfg).unwrap();
    std::fs::write(cfg.join("dr.yaml"), dr("web")).unwrap();
    std::fs::write(cfg.join("two.yaml"), dr("two").replace("name: web", "name: two")).unwrap();
    version(2).expect("the recreated directory is read");
    assert_eq!(hosts(), ["two", "web"]);
    std::fs::write(cfg.join("three.yaml"), dr("three").replace("name: web", "name: three")).unwrap();
    version(3).expect("an edit in the recreated directory applies");

    // An atomic swap: the new tree is built aside and renamed into place.
    let next = dir.path().join("cfg-next");
    std::fs::create_dir(&next).unwrap();
    std::fs::write(next.join("dr.yaml"), dr("web")).unwrap();
    std::fs::rename(&cfg, dir.path().join("cfg-old")).unwrap();
    std::fs::rename(&next, &cfg).unwrap();
    version(4).expect("the swapped-in tree is read");
    assert_eq!(hosts(), ["web"]);
    std::fs::write(cfg.join("four.yaml"), dr("four").replace("name: web", "name: four")).unwrap();
    version(5).expect("an edit after the swap applies");
    assert_eq!(hosts(), ["four", "web"]);
}

/// Writes every 8 ms for 3 s: with a 400 ms debounce that never goes quiet, reloads still come
/// at most `--max-debounce-ms` apart.
#[test]
fn continuous_writes_still_reload() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cfg")).unwrap();
    std::fs::write(dir.path().join("cfg/dr.yaml"), dr("web")).unwrap();
    let (_sluice, mon) = start(dir.path(), 400);
    let started = std::time::Instant::now();
    let mut i = 0;
    let mut reloaded_during = None;
    while started.elapsed() < Duration::from_secs(3) {
        std::fs::write(dir.path().join("cfg/burst.yaml"), dr("web").replace("name: web", &format!("name: b{i}")))
            .unwrap();
        i += 1;
        if reloaded_during.is_none() && metric(mon, "sluice_config_version").is_some_and(|v| v > 1) {
            reloaded_during = Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(8));
    }
    assert!(reloaded_during.is_some(), "no reload while the writes went on ({i} writes)");
}

/// `--config` as the README writes it, relative to the working directory: edits are seen, and so
/// is the directory's return after a deletion.
#[test]
fn a_relative_config_path_is_watched() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cfg")).unwrap();
    std::fs::write(dir.path().join("cfg/dr.yaml"), dr("web")).unwrap();
    let (xds, mon) = (free_port(), free_port());
    let _sluice = Proc::spawn(
        "sluice",
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .current_dir(dir.path())
            .args(["serve", "--debounce-ms", "20", "--config", "cfg"])
            .args(["--xds-addr", &format!("127.0.0.1:{xds}"), "--monitoring-addr", &format!("127.0.0.1:{mon}")]),
        &dir.path().join("sluice.log"),
    );
    let version =
        |v: u64| eventually(Duration::from_secs(10), || metric(mon, "sluice_config_version").filter(|n| *n >= v));
    version(1).expect("loaded");
    std::fs::write(dir.path().join("cfg/two.yaml"), dr("two").replace("name: web", "name: two")).unwrap();
    version(2).unwrap_or_else(|| {
        panic!(
            "an edit under a relative root was not seen: {}",
            std::fs::read_to_string(dir.path().join("sluice.log")).unwrap()
        )
    });
    std::fs::remove_dir_all(dir.path().join("cfg")).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::create_dir(dir.path().join("cfg")).unwrap();
    std::fs::write(dir.path().join("cfg/three.yaml"), dr("three").replace("name: web", "name: three")).unwrap();
    version(3).expect("the recreated relative root is read");
    assert_eq!(configz(mon)["objects"].as_array().map(Vec::len), Some(1), "only three.yaml is left");
}
