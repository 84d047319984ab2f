//! A folder of broken files (`tests/invalid/`): each yields its precise error (file, object,
//! field path, reason) — compared with `tests/invalid.expected` — and the valid objects next to
//! them still translate. Update with `SLUICE_UPDATE_GOLDEN=1`.

mod common;

use std::process::Command;

use sluice_controlplane::{load_config, translate_config_dump};

const NODE: &str = "sidecar~127.0.9.9~client.shop~shop.svc.cluster.local";

#[test]
fn each_broken_object_is_reported_precisely() {
    let dir = common::root().join("controlplane/tests/invalid");
    let loaded = load_config(std::slice::from_ref(&dir));
    let prefix = format!("{}/", common::root().display());
    let text: String = loaded.diagnostics.iter().map(|d| d.to_string().replace(&prefix, "") + "\n").collect();
    let expected_file = common::root().join("controlplane/tests/invalid.expected");
    if std::env::var_os("SLUICE_UPDATE_GOLDEN").is_some() {
        std::fs::write(&expected_file, &text).expect("write");
    }
    let expected = std::fs::read_to_string(&expected_file).unwrap_or_default();
    pretty_assertions::assert_eq!(expected, text);
}

#[test]
fn valid_objects_next_to_broken_ones_still_translate() {
    let dir = common::root().join("controlplane/tests/invalid");
    let loaded = load_config(&[dir]);
    let (dump, _) =
        translate_config_dump(&loaded.snapshot, NODE, Default::default(), Default::default()).expect("translate");
    let text = dump.to_string();
    assert!(
        text.contains("outbound|8080|v1|cart.shop.svc.cluster.local"),
        "the good DestinationRule's subset is served"
    );
    assert!(text.contains("\"num_retries\":3"), "the good VirtualService's retries are served");
    assert!(!text.contains("api.example.com"), "the rejected ServiceEntry is not served");
}

#[test]
fn validate_command_fails_on_rejections_and_translate_still_prints() {
    let bin = env!("CARGO_BIN_EXE_sluice");
    let dir = common::root().join("controlplane/tests/invalid");
    let out = Command::new(bin).arg("validate").arg("--config").arg(&dir).output().expect("run sluice");
    assert!(!out.status.success(), "validate must exit non-zero when objects are rejected");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("VirtualService/shop/weights: spec.http[0].route: weights of 2 destinations sum to 110"),
        "{stdout}"
    );
    let out =
        Command::new(bin).args(["translate", "--proxy", NODE, "--config"]).arg(&dir).output().expect("run sluice");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("error: "));
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).expect("translate prints JSON");
    assert_eq!(dump["configs"].as_array().map(Vec::len), Some(4));
    let ok = Command::new(bin)
        .args(["validate", "--config"])
        .arg(common::root().join("examples/bookinfo"))
        .status()
        .expect("run sluice");
    assert!(ok.success(), "the example validates cleanly");
}
