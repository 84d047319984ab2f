//! Bookinfo on the kernel path, end to end on the real kernel (root): `sluice serve` on the
//! example, `sluice agent` attached to a cgroup this test creates, and clients started with
//! `sluice run --workload productpage-v1.default` connecting to reviews' VIP 127.100.0.40:9080.
//! The agent's pins, its cgroups and every process are removed at the end, also on failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use sluice_dataplane::loader::Maps;
use std::sync::Mutex;

use sluice_testkit::{
    Backend, CONNECT_LOOP_PY, NetnsPair, Proc, eventually, free_port, is_root, relocate, share, unrelocate,
};

/// Bookinfo's backends use the example's addresses, moved into this run's 127.<n>/16 block
/// (`relocate`) so that parallel runs do not collide: config, node ids and commands go in
/// relocated, and what comes back (dumps, client output) is read with the example's addresses
/// again (`unrelocate`), so the assertions speak of the example. One mesh at a time in this binary.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");
const REVIEWS: &str = "127.100.0.40";
/// The per-node proxy's address (an Envoy configured by sluice, listening on services' ports).
const NODE_PROXY: &str = "127.0.2.1";

/// The test's cgroup (the agent attaches there), pin directory and scratch files.
struct Sandbox {
    kernel: sluice_dataplane::sandbox::Sandbox,
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new(tag: &str) -> Self {
        let kernel = sluice_dataplane::sandbox::Sandbox::new(&format!("e2e-{tag}")).unwrap();
        Self { kernel, dir: tempfile::tempdir().unwrap() }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }
}

fn agent(sandbox: &Sandbox, xds_port: u16, metrics_port: u16, log: &str) -> Proc {
    Proc::spawn(
        "sluice agent",
        Command::new(SLUICE)
            .args(["agent", "--node", "node-1", "--node-proxy", &relocate(NODE_PROXY), "--xds-addr"])
            .arg(format!("127.0.0.1:{xds_port}"))
            .args([
                "--cgroup".as_ref(),
                sandbox.kernel.cgroup.as_os_str(),
                "--pin-dir".as_ref(),
                sandbox.kernel.pin_dir.as_os_str(),
                "--socket".as_ref(),
                sandbox.socket().as_os_str(),
                "--metrics-addr".as_ref(),
                format!("127.0.0.1:{metrics_port}").as_ref(),
            ]),
        &sandbox.dir.path().join(log),
    )
}

/// `sluice run --workload <workload> -- <command>`.
fn run_as(sandbox: &Sandbox, workload: &str, command: &[&str]) -> Command {
    let mut cmd = Command::new(SLUICE);
    cmd.args(["run", "--workload", workload, "--agent-socket"])
        .arg(sandbox.socket())
        .arg("--")
        .args(command.iter().map(|a| relocate(a)));
    cmd
}

/// `sluice run --workload <workload> -- python3 <connect loop> VIP 9080 <count> <pause ms>`.
fn run_client(sandbox: &Sandbox, workload: &str, count: usize, pause_ms: u64) -> Command {
    run_as(
        sandbox,
        workload,
        &["python3", "-c", CONNECT_LOOP_PY, REVIEWS, "9080", &count.to_string(), &pause_ms.to_string()],
    )
}

/// `sluice serve` on Bookinfo plus a routes directory, and `sluice agent` attached to the
/// sandbox's cgroup, with the maps programmed.
struct KernelMesh {
    routes: PathBuf,
    xds_port: u16,
    metrics_port: u16,
    agent: Proc,
    _serve: Proc,
    _backends: Vec<Backend>,
}

impl KernelMesh {
    /// Starts with `files` (name, content) in the routes directory; waits until the maps hold
    /// reviews with `expect` in the dump.
    fn start(sandbox: &Sandbox, files: &[(&str, String)], expect: &str) -> KernelMesh {
        let routes = sandbox.dir.path().join("routes");
        std::fs::create_dir_all(&routes).unwrap();
        for (name, content) in files {
            std::fs::write(routes.join(name), relocate(content)).unwrap();
        }
        let example = sandbox.dir.path().join("bookinfo");
        copy_relocated(&common::root().join("examples/bookinfo"), &example);
        let (xds_port, metrics_port) = (free_port(), free_port());
        let serve = Proc::spawn(
            "sluice serve",
            Command::new(SLUICE)
                // Every resource in a part of its own: the agent takes each change in parts.
                .args(["serve", "--debounce-ms", "0", "--delta-chunk-bytes", "1", "--config"])
                .arg(&example)
                .arg("--config")
                .arg(&routes)
                .arg("--xds-addr")
                .arg(format!("127.0.0.1:{xds_port}"))
                .arg("--monitoring-addr")
                .arg(format!("127.0.0.1:{}", free_port())),
            &sandbox.dir.path().join("serve.log"),
        );
        let backends = (1..=3)
            .map(|v| {
                Backend::start(&format!("reviews-v{v}"), relocate(&format!("127.0.1.4{}:9080", v - 1)).parse().unwrap())
            })
            .collect();
        let agent = agent(sandbox, xds_port, metrics_port, "agent.log");
        let served =
            eventually(Duration::from_secs(30), || dump(&sandbox.kernel.pin_dir).filter(|d| d.contains(expect)));
        assert!(
            served.is_some(),
            "the agent never programmed {expect:?}; maps:\n{:?}\nagent log:\n{}\nserve log:\n{}",
            Maps::open(&sandbox.kernel.pin_dir)
                .map(|m| sluice_dataplane::dump::dump(&m).map_err(|e| e.to_string()))
                .map_err(|e| e.to_string()),
            log(sandbox, "agent.log"),
            log(sandbox, "serve.log")
        );
        KernelMesh { routes, xds_port, metrics_port, agent, _serve: serve, _backends: backends }
    }
}

/// Copies the example's YAML with its addresses relocated.
fn copy_relocated(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().map(Result::unwrap) {
        if e.file_type().unwrap().is_dir() {
            copy_relocated(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::write(to.join(e.file_name()), relocate(&std::fs::read_to_string(e.path()).unwrap())).unwrap();
        }
    }
}

fn log(sandbox: &Sandbox, name: &str) -> String {
    std::fs::read_to_string(sandbox.dir.path().join(name)).unwrap_or_default()
}

fn variant(name: &str) -> String {
    std::fs::read_to_string(common::root().join(format!("examples/bookinfo-variants/{name}/virtual-service.yaml")))
        .unwrap()
}

fn lines(out: &Output) -> Vec<String> {
    assert!(out.status.success(), "client failed: {}", String::from_utf8_lossy(&out.stderr));
    unrelocate(&String::from_utf8_lossy(&out.stdout)).lines().map(str::to_string).collect()
}

fn dump(pin_dir: &Path) -> Option<String> {
    Maps::open(pin_dir).ok().and_then(|m| sluice_dataplane::dump::dump(&m).ok()).map(|d| unrelocate(&d))
}

#[test]
fn bookinfo_reviews_split_at_connect_with_live_edits_and_agent_restart() {
    assert!(is_root(), "this test loads eBPF programs and creates cgroups: run it as root (CI does)");
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sandbox = Sandbox::new("split");
    let files = [("reviews.yaml", variant("reviews-80-20")), ("extra.yaml", EXTRA_SERVICE.to_string())];
    let mut mesh = KernelMesh::start(&sandbox, &files, "127.0.1.40:9080 weight 4/5");
    let dump_text = dump(&sandbox.kernel.pin_dir).unwrap();
    assert!(dump_text.contains(EXTRA_VIP), "{EXTRA_VIP} missing:\n{dump_text}");
    // Every Bookinfo service is on the kernel path.
    for vip in ["127.100.0.10:9080/TCP", "127.100.0.20:9080/TCP", "127.100.0.30:9080/TCP", "127.100.0.40:9080/TCP"] {
        assert!(dump_text.contains(vip), "{vip} missing:\n{dump_text}");
    }
    // The CLI dump reads the same pinned maps.
    let cli = Command::new(SLUICE).args(["agent", "dump", "--pin-dir"]).arg(&sandbox.kernel.pin_dir).output().unwrap();
    assert!(unrelocate(&String::from_utf8_lossy(&cli.stdout)).contains("-> 127.0.1.41:9080 weight 1/5"), "{cli:?}");

    // 1000 connects from productpage's workload: 80/20 within ±5 points; getpeername shows the VIP.
    let out = lines(&run_client(&sandbox, "productpage-v1.default", 1000, 0).output().unwrap());
    assert_eq!(out.len(), 1000);
    assert!(
        out.iter().all(|l| l.ends_with(&format!("{REVIEWS}:9080"))),
        "getpeername must show the VIP: {:?}",
        &out[..3]
    );
    let v1 = share(&out, "reviews-v1");
    eprintln!("kernel path, reviews 80/20 over 1000 connects: v1 share {v1:.3}");
    assert!((0.75..=0.85).contains(&v1), "v1 share {v1}");
    assert!((share(&out, "reviews-v2") - (1.0 - v1)).abs() < 1e-9, "only v1 and v2 are routed: {:?}", &out[..5]);

    // A process outside any registered cgroup is not redirected: nothing listens on the VIP.
    let outside =
        Command::new("python3").args(["-c", CONNECT_LOOP_PY, &relocate(REVIEWS), "9080", "2"]).output().unwrap();
    assert!(lines(&outside).iter().all(|l| l == "error 111"), "{outside:?}");
    // A workload the config does not have is refused with its name.
    let unknown = run_client(&sandbox, "nobody.default", 1, 0).output().unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("default/nobody"), "{unknown:?}");

    // Metrics on the agent's port.
    let metrics_addr = format!("127.0.0.1:{}", mesh.metrics_port);
    let (status, metrics) = sluice_testkit::http_get(&metrics_addr, "agent", "/metrics", &[]).unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains("sluice_agent_services 5") && metrics.contains("sluice_agent_xds_connected 1"),
        "{metrics}"
    );

    // A config edit reaches the maps: file write → map update, timed.
    let written = Instant::now();
    std::fs::write(mesh.routes.join("reviews.yaml"), relocate(&variant("reviews-50-50"))).unwrap();
    let updated = eventually(Duration::from_secs(10), || {
        dump(&sandbox.kernel.pin_dir).filter(|d| d.contains("127.0.1.40:9080 weight 1/2")).map(|_| written.elapsed())
    });
    let updated =
        updated.unwrap_or_else(|| panic!("50/50 never reached the maps; agent log:\n{}", log(&sandbox, "agent.log")));
    eprintln!("file write → map update (debounce 0): {updated:?}");
    let v1 = share(&lines(&run_client(&sandbox, "productpage-v1.default", 1000, 0).output().unwrap()), "reviews-v1");
    assert!((0.45..=0.55).contains(&v1), "v1 share after 50/50: {v1}");

    // kill -9 the agent while a workload connects in a loop, then start a new one: the pinned
    // programs keep balancing, the new agent adopts them, and not one connect fails.
    let client =
        run_client(&sandbox, "productpage-v1.default", 300, 5).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut client = Proc { child: client, name: "client loop".into() };
    std::thread::sleep(Duration::from_millis(300));
    mesh.agent.kill();
    // A service goes while no agent runs: the next one finds it in the maps it adopts, and its
    // first change (in parts) removes it once the last part has arrived.
    std::fs::remove_file(mesh.routes.join("extra.yaml")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    mesh.agent = agent(&sandbox, mesh.xds_port, mesh.metrics_port, "agent2.log");
    let out: Vec<String> = unrelocate(&client.wait_for_stdout()).lines().map(str::to_string).collect();
    assert_eq!(out.len(), 300);
    let failed: Vec<_> = out.iter().filter(|l| !l.starts_with("reviews-v")).collect();
    assert!(failed.is_empty(), "connects failed across the agent restart: {failed:?}");
    let adopted = eventually(Duration::from_secs(10), || {
        log(&sandbox, "agent2.log").contains("adopting pinned programs and maps").then_some(())
    });
    assert!(adopted.is_some(), "{}", log(&sandbox, "agent2.log"));
    let removed =
        eventually(Duration::from_secs(10), || dump(&sandbox.kernel.pin_dir).filter(|d| !d.contains(EXTRA_VIP)));
    let dump_text =
        removed.unwrap_or_else(|| panic!("{EXTRA_VIP} stayed; agent log:\n{}", log(&sandbox, "agent2.log")));
    assert!(dump_text.contains("127.100.0.40:9080/TCP"), "the other services stay:\n{dump_text}");
}

/// A service with no endpoints, in the maps as its VIP with no backends.
const EXTRA_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: extra, namespace: default}\nspec: {clusterIP: 127.100.0.99, ports: [{name: http, port: 9080}]}\n";
const EXTRA_VIP: &str = "127.100.0.99:9080/TCP";

/// reviews accepts only productpage's identity on 9080. A second ALLOW rule for details has an
/// HTTP method in it: as in ztunnel, it does not match at L4 (fail closed), with a warning.
const REVIEWS_POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-from-productpage, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/bookinfo-productpage]}}]
    to: [{operation: {ports: ["9080"]}}]
  - from: [{source: {principals: [cluster.local/ns/default/sa/bookinfo-details]}}]
    to: [{operation: {methods: [GET]}}]
"#;

#[test]
fn authorization_at_connect_and_for_sources_off_the_node() {
    assert!(is_root(), "this test loads eBPF programs and creates cgroups: run it as root (CI does)");
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sandbox = Sandbox::new("authz");
    let files = [("reviews.yaml", variant("reviews-80-20")), ("policy.yaml", REVIEWS_POLICY.to_string())];
    // reviews-v1, -v2 and -v3 each get the policy.
    let _mesh = KernelMesh::start(&sandbox, &files, "policy sets (3)");

    // The allowed identity connects; the denied one gets EPERM at connect() (errno 1), at once.
    let allowed = lines(&run_client(&sandbox, "productpage-v1.default", 20, 0).output().unwrap());
    assert!(allowed.iter().all(|l| l.starts_with("reviews-v")), "{allowed:?}");
    let started = Instant::now();
    let denied = lines(&run_client(&sandbox, "details-v1.default", 5, 0).output().unwrap());
    assert!(denied.iter().all(|l| l == "error 1"), "details must get EPERM: {denied:?}");
    eprintln!("5 denied connects (including the interpreter's start): {:?}", started.elapsed());
    let d = dump(&sandbox.kernel.pin_dir).unwrap();
    assert_eq!(totals(&d), (20, 5), "{d}");
    let warnings = agent_warnings(&sandbox);
    assert!(
        warnings.contains("AuthorizationPolicy/default/reviews-from-productpage")
            && warnings.contains("spec.rules[1]")
            && warnings.contains("to[0].operation.methods"),
        "{warnings}"
    );

    // A source off the node (another network namespace) reaching reviews-v1's process directly:
    // its SYN is dropped. ratings, which no policy protects, answers the same source.
    let net = NetnsPair::create("authz", "192.0.2.10", "192.0.2.20");
    let server = |workload: &str, port: &str, log_name: &str| {
        let mut cmd = run_as(
            &sandbox,
            workload,
            &["ip", "netns", "exec", &net.a, "python3", "-m", "http.server", "--bind", "192.0.2.10", port],
        );
        Proc::spawn(workload, cmd.current_dir(sandbox.dir.path()), &sandbox.dir.path().join(log_name))
    };
    let _reviews = server("reviews-v1.default", "9080", "reviews-server.log");
    let _ratings = server("ratings-v1.default", "9081", "ratings-server.log");
    let from_b = |port: &str, count: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", &net.b, "python3", "-c", CONNECT_LOOP_PY, "192.0.2.10", port, count])
            .output()
            .unwrap();
        lines(&out)
    };
    let open = eventually(Duration::from_secs(10), || {
        from_b("9081", "1").iter().all(|l| !l.starts_with("error")).then_some(())
    });
    assert!(open.is_some(), "ratings never answered the other namespace: {}", log(&sandbox, "ratings-server.log"));
    let dropped = from_b("9080", "1");
    assert_eq!(dropped, vec!["error None".to_string()], "the SYN must be dropped (connect times out)");
    // The SYN and its retransmissions were each denied.
    let d = dump(&sandbox.kernel.pin_dir).unwrap();
    let (allowed, denied) = totals(&d);
    assert!(allowed == 20 && denied > 5, "{d}");
}

/// What `sluice translate` warns for node-1's agent on Bookinfo and the sandbox's routes.
fn agent_warnings(sandbox: &Sandbox) -> String {
    let translated = Command::new(SLUICE)
        .args(["translate", "--proxy", "agent~node-1", "--config"])
        .arg(common::root().join("examples/bookinfo"))
        .arg("--config")
        .arg(sandbox.dir.path().join("routes"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&translated.stderr).into_owned()
}

/// reviews requires mTLS: the kernel path, which has none, must not reach it in plaintext.
const REVIEWS_STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: reviews-strict, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  mtls: {mode: STRICT}
"#;

#[test]
fn a_kernel_client_of_a_strict_workload_gets_eperm_and_a_warning_names_both() {
    assert!(is_root(), "this test loads eBPF programs and creates cgroups: run it as root (CI does)");
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sandbox = Sandbox::new("strict");
    let files = [("reviews.yaml", variant("reviews-80-20")), ("strict.yaml", REVIEWS_STRICT.to_string())];
    // reviews-v1, -v2 and -v3 each get the STRICT rule.
    let _mesh = KernelMesh::start(&sandbox, &files, "policy sets (3)");
    let refused = lines(&run_client(&sandbox, "productpage-v1.default", 5, 0).output().unwrap());
    assert!(
        refused.len() == 5 && refused.iter().all(|l| l == "error 1"),
        "plaintext to a STRICT workload gets EPERM: {refused:?}"
    );
    let warnings = agent_warnings(&sandbox);
    assert!(
        warnings.contains("PeerAuthentication/default/reviews-strict")
            && warnings.contains("default/reviews-v1 requires mTLS on every port")
            && warnings.contains("default/productpage-v1")
            && warnings.contains("EPERM"),
        "{warnings}"
    );
}

/// (allowed, denied) from the dump's totals line.
fn totals(dump: &str) -> (u64, u64) {
    let line = dump.lines().find_map(|l| l.strip_prefix("authorization totals: ")).expect("totals line");
    let value =
        |key: &str| line.split(' ').find_map(|kv| kv.strip_prefix(key)).and_then(|v| v.parse().ok()).expect("count");
    (value("allowed="), value("denied="))
}

/// The node proxy (a Pod and a Sidecar binding its egress listener on NODE_PROXY, as productpage's
/// captureMode NONE sidecar does) and two clients of reviews: `shell-node` in node mode and
/// productpage in kernel mode.
const NODE_MODE: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: node-proxy, namespace: default, labels: {app: node-proxy, sluice.io/dataplane: sidecar}}
spec: {containers: [{name: envoy}]}
status: {podIP: 127.0.2.1}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: node-proxy, namespace: default}
spec:
  workloadSelector: {labels: {app: node-proxy}}
  egress:
  - port: {number: 9080, protocol: HTTP, name: http}
    bind: 127.0.2.1
    captureMode: NONE
    hosts: ["./*"]
---
apiVersion: v1
kind: Pod
metadata: {name: shell-node, namespace: default, labels: {app: shell, sluice.io/dataplane: node}}
spec: {containers: [{name: shell}], serviceAccountName: shell}
status: {podIP: 127.0.1.50}
"#;

#[test]
fn node_mode_goes_through_the_node_proxy_for_l7_routes() {
    assert!(is_root(), "this test loads eBPF programs and creates cgroups: run it as root (CI does)");
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sandbox = Sandbox::new("node");
    let jason =
        std::fs::read_to_string(common::root().join("examples/bookinfo-variants/jason-v2/virtual-service.yaml"))
            .unwrap();
    let files = [("reviews.yaml", jason), ("node-mode.yaml", NODE_MODE.to_string())];
    let mesh = KernelMesh::start(&sandbox, &files, "node proxy: 127.0.2.1");
    let bootstrap = Command::new(SLUICE)
        .args(["bootstrap", "--proxy", &relocate("sidecar~127.0.2.1~node-proxy.default~default.svc.cluster.local")])
        .arg("--xds-addr")
        .arg(format!("127.0.0.1:{}", mesh.xds_port))
        .args(["--admin-port", &free_port().to_string()])
        .output()
        .unwrap();
    assert!(bootstrap.status.success(), "{bootstrap:?}");
    let file = sandbox.dir.path().join("node-proxy.json");
    std::fs::write(&file, &bootstrap.stdout).unwrap();
    let _envoy = Proc::spawn(
        "node proxy",
        Command::new(sluice_testkit::envoy_bin()).arg("-c").arg(&file).args([
            "--use-dynamic-base-id",
            "--log-level",
            "warn",
        ]),
        &sandbox.dir.path().join("envoy.log"),
    );
    let listening =
        eventually(Duration::from_secs(30), || std::net::TcpStream::connect((relocate(NODE_PROXY), 9080)).ok());
    assert!(listening.is_some(), "the node proxy never listened: {}", log(&sandbox, "envoy.log"));

    // jason's header reaches reviews-v2 only through L7 routing: the node-mode client gets it
    // (via the node proxy); the kernel-mode client is balanced at L4 by the catch-all route (v1).
    let curl = "for i in 1 2 3 4 5; do curl -s -H 'end-user: jason' http://127.100.0.40:9080/; echo; done";
    let via_proxy = lines(&run_as(&sandbox, "shell-node.default", &["sh", "-c", curl]).output().unwrap());
    assert_eq!(via_proxy, vec!["reviews-v2"; 5], "node mode: {}", log(&sandbox, "envoy.log"));
    let in_kernel = lines(&run_as(&sandbox, "productpage-v1.default", &["sh", "-c", curl]).output().unwrap());
    assert_eq!(in_kernel, vec!["reviews-v1"; 5], "kernel mode");
    // The node-mode application still sees the VIP as its peer.
    let peer = lines(
        &run_as(&sandbox, "shell-node.default", &["python3", "-c", CONNECT_LOOP_PY, REVIEWS, "9080", "1"])
            .output()
            .unwrap(),
    );
    assert!(peer[0].ends_with("127.100.0.40:9080"), "{peer:?}");
}
