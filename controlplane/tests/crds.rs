//! The CRDs in `crds/` and in the chart's `crds/` are what `sluice crds` generates today.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The YAML files in `dir`, by name.
fn files(dir: &Path) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap()))
        .collect();
    out.sort();
    out
}

#[test]
fn crds_and_the_charts_copy_match_the_generator() {
    let generated: Vec<(String, String)> = {
        let mut g: Vec<_> = sluice_controlplane::crds::crds()
            .iter()
            .map(|(f, c)| (f.clone(), sluice_controlplane::crds::to_yaml(c)))
            .collect();
        g.sort();
        g
    };
    let dirs = [root().join("crds"), root().join("charts/sluice/crds")];
    if std::env::var_os("SLUICE_UPDATE_GOLDEN").is_some() {
        for dir in &dirs {
            std::fs::create_dir_all(dir).unwrap();
            for (name, _) in files(dir) {
                std::fs::remove_file(dir.join(name)).unwrap();
            }
            for (name, yaml) in &generated {
                std::fs::write(dir.join(name), yaml).unwrap();
            }
        }
    }
    for dir in &dirs {
        let on_disk = files(dir);
        let names = |l: &[(String, String)]| l.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(&on_disk), names(&generated), "{}: files differ from the generator", dir.display());
        for ((name, disk), (_, want)) in on_disk.iter().zip(&generated) {
            assert!(
                disk == want,
                "{}/{name} drifted from the generator; run SLUICE_UPDATE_GOLDEN=1 cargo test -p sluice-controlplane --test crds",
                dir.display()
            );
        }
    }
}

#[test]
fn crds_declare_istios_groups_versions_and_storage() {
    let crds = sluice_controlplane::crds::crds();
    let find = |name: &str| &crds.iter().find(|(f, _)| f == &format!("{name}.yaml")).expect(name).1;
    let versions =
        |name: &str| find(name).spec.versions.iter().map(|v| (v.name.clone(), v.served, v.storage)).collect::<Vec<_>>();
    let networking = |stored: &str| {
        ["v1", "v1alpha3", "v1beta1"].iter().map(|v| (v.to_string(), true, *v == stored)).collect::<Vec<_>>()
    };
    for name in ["virtualservices", "destinationrules", "serviceentries", "workloadentries", "sidecars"] {
        assert_eq!(versions(&format!("{name}.networking.istio.io")), networking("v1alpha3"), "{name}");
    }
    for name in ["authorizationpolicies", "peerauthentications"] {
        let want = vec![("v1".to_string(), true, false), ("v1beta1".to_string(), true, true)];
        assert_eq!(versions(&format!("{name}.security.istio.io")), want, "{name}");
    }
    let vs = find("virtualservices.networking.istio.io");
    assert_eq!(vs.spec.names.short_names.as_deref(), Some(&["vs".to_string()][..]));
    assert_eq!(vs.spec.scope, "Namespaced");
    let v1 = serde_json::to_value(&vs.spec.versions[0]).unwrap();
    let http = &v1["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["http"];
    assert_eq!(http["type"], "array", "the spec schema comes from the translator's types");
    assert_eq!(http["items"]["x-kubernetes-preserve-unknown-fields"], true, "unknown fields are not pruned");
    assert!(v1["subresources"]["status"].is_object(), "status is a subresource");
}
