//! The chart, rendered by the real helm binary: lint-clean, and the rendered objects carry the
//! kinds, RBAC, ports, probes and mounts sluice needs, for default and non-default values.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use sluice_translator::model::Kind;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn custom_values() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/helm/values-custom.yaml").display().to_string()
}

fn helm(args: &[&str]) -> String {
    let bin = sluice_testkit::helm_bin();
    let out = Command::new(&bin)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("running {bin} (bash .ci/run installs helm): {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "helm {args:?} failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    text
}

/// `helm template` output as objects.
fn render(extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["template", "sluice", "charts/sluice", "--namespace", "sluice-system"];
    args.extend_from_slice(extra);
    let text = helm(&args);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn one<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendering"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect()).unwrap_or_default()
}

/// Every (group, resource, verb) the control plane is granted, checking least privilege on the way:
/// no wildcards, writes only on status subresources and the leader Lease.
fn grants(objects: &[Value]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for role in objects.iter().filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role") {
        for rule in role["rules"].as_array().unwrap() {
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        assert!(![&group, &resource, &verb].iter().any(|s| s.contains('*')), "wildcard in {rule}");
                        let write = !matches!(verb.as_str(), "get" | "list" | "watch");
                        if write {
                            let status = resource.ends_with("/status") && matches!(verb.as_str(), "patch" | "update");
                            let lease = resource == "leases"
                                && (verb == "create" || strings(&rule["resourceNames"]) == ["sluice-leader"]);
                            // The CA's root Secret, made by the first replica; the trust bundle's
                            // ConfigMaps, replaced by name only.
                            let ca_root = resource == "secrets" && verb == "create";
                            let review = resource == "tokenreviews" && verb == "create";
                            let bundle = resource == "configmaps"
                                && (verb == "create" || strings(&rule["resourceNames"]) == ["istio-ca-root-cert"]);
                            assert!(
                                status || lease || ca_root || bundle || review,
                                "{verb} on {group}/{resource} is more than sluice needs"
                            );
                        }
                        out.insert((group.clone(), resource.clone(), verb));
                    }
                }
            }
        }
    }
    out
}

fn container(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]["containers"][0]
}

#[test]
fn helm_lint_is_clean_for_default_and_custom_values() {
    let custom = custom_values();
    for extra in [vec![], vec!["-f", custom.as_str()]] {
        let mut args = vec!["lint", "--strict", "charts/sluice"];
        args.extend(extra);
        let out = helm(&args);
        assert!(out.contains("0 chart(s) failed"), "{out}");
        assert!(!out.contains("[WARNING]") && !out.contains("[ERROR]"), "{out}");
    }
}

#[test]
fn default_rendering_has_what_the_control_plane_and_agent_need() {
    let objects = render(&[]);
    let kinds: BTreeSet<String> = objects.iter().map(|o| o["kind"].as_str().unwrap().to_string()).collect();
    for kind in [
        "Deployment",
        "DaemonSet",
        "Service",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ] {
        assert!(kinds.contains(kind), "{kind} missing: {kinds:?}");
    }
    // 15012 by default, with the CA's own serving certificate: its root Secret, the trust
    // bundle everywhere, token reviews.
    assert_eq!(one(&objects, "Role", "sluice-ca")["metadata"]["namespace"], "sluice-system");
    assert_eq!(one(&objects, "ClusterRoleBinding", "sluice-ca-root")["roleRef"]["kind"], "ClusterRole");

    let deployment = one(&objects, "Deployment", "sluice");
    assert_eq!(deployment["spec"]["replicas"], 1);
    let c = container(deployment);
    assert_eq!(c["image"], "ghcr.io/sluice-mesh/sluice:0.1.0");
    let args = strings(&c["args"]);
    assert_eq!(&args[..2], ["serve", "--kube"]);
    for want in [
        "--xds-addr=0.0.0.0:15010",
        "--monitoring-addr=0.0.0.0:15014",
        "--xds-tls-addr=0.0.0.0:15012",
        "--tls-dns-name=sluice.sluice-system.svc",
        "--trusted-node-account=sluice-system/sluice-agent",
        "--ca-dir=/etc/cacerts",
        "--ca-dir-if-present",
        "--mesh-config=/etc/istio/config/mesh",
        "--mesh-config-if-present",
    ] {
        assert!(args.contains(&want.to_string()), "{want} missing from {args:?}");
    }
    assert!(!args.iter().any(|a| a.starts_with("--tls-cert")), "the CA issues the serving certificate: {args:?}");
    // Istio's plug-in CA when Secret cacerts exists (an optional mount), else the self-signed root.
    let cacerts =
        deployment["spec"]["template"]["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "cacerts");
    let cacerts = &cacerts.expect("the cacerts volume")["secret"];
    assert_eq!((cacerts["secretName"].as_str(), cacerts["optional"].as_bool()), (Some("cacerts"), Some(true)));
    // MeshConfig from ConfigMap istio when there is one; the chart makes none by default.
    let volumes = deployment["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
    let mesh = &volumes.iter().find(|v| v["name"] == "mesh-config").expect("the mesh-config volume")["configMap"];
    assert_eq!((mesh["name"].as_str(), mesh["optional"].as_bool()), (Some("istio"), Some(true)));
    assert!(!objects.iter().any(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "istio"));
    let ports: Vec<(String, u64)> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_string(), p["containerPort"].as_u64().unwrap()))
        .collect();
    assert_eq!(ports, [("grpc-xds".into(), 15010), ("tls-xds".into(), 15012), ("http-monitoring".into(), 15014)]);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "http-monitoring");
    let env: Vec<String> =
        c["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_string()).collect();
    assert!(
        env.contains(&"POD_NAME".into()) && env.contains(&"POD_NAMESPACE".into()),
        "the Lease identity comes from the pod"
    );
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["volumeMounts"][0]["mountPath"], "/var/lib/sluice", "the state directory");

    let service = one(&objects, "Service", "sluice");
    let service_ports: Vec<u64> =
        service["spec"]["ports"].as_array().unwrap().iter().map(|p| p["port"].as_u64().unwrap()).collect();
    assert_eq!(service_ports, [15010, 15012, 15014]);

    let agent = one(&objects, "DaemonSet", "sluice-agent");
    let pod = &agent["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["automountServiceAccountToken"], false, "the agent needs no API access");
    assert!(pod["tolerations"].as_array().unwrap().iter().any(|t| t["operator"] == "Exists"), "runs on every node");
    let a = container(agent);
    assert_eq!(a["securityContext"]["privileged"], true);
    let agent_args = strings(&a["args"]);
    for want in [
        "--xds-addr=sluice.sluice-system.svc:15010",
        "--sds-socket=/run/sluice/sds/socket",
        "--ca-addr=https://sluice.sluice-system.svc:15012",
        "--ca-name=sluice.sluice-system.svc",
        "--ca-root=/etc/sluice/ca/root-cert.pem",
        "--node-token-file=/var/run/secrets/tokens/istio-token",
    ] {
        assert!(agent_args.contains(&want.to_string()), "{want} missing from {agent_args:?}");
    }
    // Its CA credential: its own projected token for istio-ca; the root from the published bundle.
    let volume = |name: &str| pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == name).unwrap().clone();
    let token = &volume("istio-token")["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!((token["audience"].as_str(), token["path"].as_str()), (Some("istio-ca"), Some("istio-token")));
    assert_eq!(volume("ca-root")["configMap"]["name"], "istio-ca-root-cert");
    assert_eq!(volume("sds")["hostPath"]["path"], "/run/sluice/sds", "the SDS socket's directory, for pods");
    let host_paths: BTreeSet<(String, String)> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| Some((v["name"].as_str()?.to_string(), v["hostPath"]["path"].as_str()?.to_string())))
        .collect();
    assert!(host_paths.contains(&("bpffs".into(), "/sys/fs/bpf".into())), "{host_paths:?}");
    assert!(host_paths.contains(&("cgroup".into(), "/sys/fs/cgroup".into())), "{host_paths:?}");
    let bpf_mount = a["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "bpffs").unwrap();
    assert_eq!(bpf_mount["mountPropagation"], "Bidirectional");

    // RBAC: exactly the watched kinds readable, status writable, the Lease; nothing else.
    let grants = grants(&objects);
    for kind in Kind::ALL {
        for verb in ["get", "list", "watch"] {
            let g = (kind.group().to_string(), kind.plural(), verb.to_string());
            assert!(grants.contains(&g), "missing {g:?}");
        }
        if kind.is_istio() {
            assert!(grants.contains(&(kind.group().into(), format!("{}/status", kind.plural()), "patch".into())));
        }
    }
    // ConfigMaps only by the trust bundle's name (checked in `grants`).
    let readable: BTreeSet<String> =
        grants.iter().filter(|g| g.2 == "list" && g.1 != "configmaps").map(|g| g.1.clone()).collect();
    let watched: BTreeSet<String> = Kind::ALL.iter().map(|k| k.plural()).collect();
    assert_eq!(readable, watched, "read access is exactly what the source watches");
    let binding = one(&objects, "ClusterRoleBinding", "sluice");
    assert_eq!(binding["subjects"][0]["name"], "sluice", "bound to the control plane only");
}

#[test]
fn custom_values_are_honoured() {
    let objects = render(&["-f", &custom_values()]);
    let deployment = one(&objects, "Deployment", "sluice");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let c = container(deployment);
    assert_eq!(c["image"], "registry.example.com/mesh/sluice:test");
    let args = strings(&c["args"]);
    for want in [
        "--namespace=bookinfo",
        "--no-status",
        "--xds-tls-addr=0.0.0.0:15012",
        "--tls-client-ca=/etc/sluice/tls/ca.crt",
    ] {
        assert!(args.contains(&want.to_string()), "{want} missing from {args:?}");
    }
    let volumes = &deployment["spec"]["template"]["spec"]["volumes"];
    assert!(volumes.as_array().unwrap().iter().any(|v| v["secret"]["secretName"] == "my-xds-cert"));
    assert_eq!(deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"], "true");
    assert_eq!(one(&objects, "Service", "sluice")["spec"]["type"], "NodePort");

    // One watched namespace: namespaced reads are a Role there; no status or Lease rights.
    let read = one(&objects, "Role", "sluice-read");
    assert_eq!(read["metadata"]["namespace"], "bookinfo");
    let cluster = one(&objects, "ClusterRole", "sluice");
    let cluster_resources: Vec<String> =
        cluster["rules"].as_array().unwrap().iter().flat_map(|r| strings(&r["resources"])).collect();
    assert_eq!(cluster_resources, ["namespaces", "tokenreviews"], "with 15012, token reviews for the CA");
    let grants = grants(&objects);
    let writes: Vec<_> = grants.iter().filter(|g| !matches!(g.2.as_str(), "get" | "list" | "watch")).collect();
    let grant = |resource: &str, verb: &str| ("".to_string(), resource.to_string(), verb.to_string());
    let review = ("authentication.k8s.io".to_string(), "tokenreviews".to_string(), "create".to_string());
    let want = [grant("configmaps", "create"), grant("configmaps", "update"), grant("secrets", "create"), review];
    assert_eq!(writes, want.iter().collect::<Vec<_>>(), "only the CA's root, its trust bundle and token reviews");
    assert!(!objects.iter().any(|o| o["metadata"]["name"] == "sluice-leader"), "no Lease role without status");
    // With 15012 on, the CA keeps its root in Secret istio-ca-secret of the release namespace.
    let ca = one(&objects, "Role", "sluice-ca");
    let read = ca["rules"].as_array().unwrap().iter().find(|r| strings(&r["verbs"]) == ["get"]).unwrap();
    assert_eq!(strings(&read["resourceNames"]), ["istio-ca-secret"]);
    assert_eq!(one(&objects, "RoleBinding", "sluice-ca")["roleRef"]["name"], "sluice-ca");
    // The trust bundle in the one watched namespace and in the agents': Roles there, reads
    // limited to its name.
    let bundles: Vec<&Value> =
        objects.iter().filter(|o| o["kind"] == "Role" && o["metadata"]["name"] == "sluice-ca-root").collect();
    let namespaces: Vec<&str> = bundles.iter().map(|b| b["metadata"]["namespace"].as_str().unwrap()).collect();
    assert_eq!(namespaces, ["bookinfo", "sluice-system"]);
    for bundle in bundles {
        let by_name = bundle["rules"].as_array().unwrap().iter().find(|r| r["resourceNames"].is_array()).unwrap();
        assert_eq!(strings(&by_name["verbs"]), ["get", "list", "watch", "update"]);
    }
    assert_eq!(one(&objects, "RoleBinding", "sluice-ca-root")["roleRef"]["kind"], "Role");

    let agent = one(&objects, "DaemonSet", "sluice-agent");
    let a = container(agent);
    assert!(strings(&a["args"]).contains(&"--node-proxy=127.0.0.9".to_string()));
    // meshConfig becomes ConfigMap istio, as Istio's chart makes it.
    let mesh = one(&objects, "ConfigMap", "istio");
    assert_eq!(mesh["metadata"]["namespace"], "sluice-system");
    let mesh: serde_json::Value = serde_yaml_ng::from_str(mesh["data"]["mesh"].as_str().unwrap()).unwrap();
    assert_eq!(mesh["trustDomain"], "corp.example");
    assert_eq!(mesh["trustDomainAliases"][0], "cluster.local");
    // A port that requires client certificates would turn away the agent's token: no SDS.
    assert!(!strings(&a["args"]).iter().any(|arg| arg.starts_with("--sds-socket")));
    assert!(strings(&a["args"]).contains(&"--pin-dir=/sys/fs/bpf/mesh".to_string()));
    let pod = &agent["spec"]["template"]["spec"];
    assert!(pod["volumes"].as_array().unwrap().iter().any(|v| v["hostPath"]["path"] == "/sys/fs/cgroup/unified"));
    assert!(pod.get("tolerations").is_none());
    assert_eq!(pod["nodeSelector"]["sluice.io/agent"], "true");
}

#[test]
fn without_15012_there_is_no_ca_and_no_sds() {
    let objects = render(&["--set", "controlPlane.xdsTls.enabled=false"]);
    for name in ["sluice-ca", "sluice-ca-root"] {
        assert!(!objects.iter().any(|o| o["metadata"]["name"] == name), "{name} without 15012");
    }
    let args = strings(&container(one(&objects, "Deployment", "sluice"))["args"]);
    assert!(!args.iter().any(|a| a.contains("15012") || a.starts_with("--trusted-node-account")), "{args:?}");
    let agent = one(&objects, "DaemonSet", "sluice-agent");
    assert!(!strings(&container(agent)["args"]).iter().any(|a| a.starts_with("--sds-socket")));
    let cluster = one(&objects, "ClusterRole", "sluice");
    let resources: Vec<String> =
        cluster["rules"].as_array().unwrap().iter().flat_map(|r| strings(&r["resources"])).collect();
    assert!(!resources.contains(&"tokenreviews".to_string()), "{resources:?}");
}

#[test]
fn the_chart_installs_sluices_crds() {
    let objects = render(&["--include-crds"]);
    let mut from_chart: Vec<&Value> = objects.iter().filter(|o| o["kind"] == "CustomResourceDefinition").collect();
    from_chart.sort_by_key(|o| o["metadata"]["name"].as_str().unwrap().to_string());
    let mut generated: Vec<Value> = sluice_controlplane::crds::crds()
        .iter()
        .map(|(_, c)| serde_yaml_ng::from_str(&sluice_controlplane::crds::to_yaml(c)).unwrap())
        .collect();
    generated.sort_by_key(|o| o["metadata"]["name"].as_str().unwrap().to_string());
    assert_eq!(from_chart.len(), generated.len());
    assert_eq!(from_chart.len(), 8, "the eight Istio kinds sluice reads");
    for (chart, want) in from_chart.iter().zip(&generated) {
        assert_eq!(*chart, want, "{}", want["metadata"]["name"]);
    }
}

#[test]
fn the_meshs_trust_domain_reaches_the_control_plane_and_the_agents() {
    let objects = render(&["--set", "meshConfig.trustDomain=corp.example"]);
    let mesh = one(&objects, "ConfigMap", "istio");
    assert!(mesh["data"]["mesh"].as_str().unwrap().contains("trustDomain: corp.example"), "{mesh}");
    let agent = strings(&container(one(&objects, "DaemonSet", "sluice-agent"))["args"]);
    assert!(agent.contains(&"--trust-domain=corp.example".to_string()), "the SPIFFE ids the agent asks for: {agent:?}");
}
