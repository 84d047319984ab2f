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
