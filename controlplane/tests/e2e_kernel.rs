//! Bookinfo on the kernel path, end to end on the real kernel (root): `sluice serve` on the
//! example, `sluice agent` attached to a cgroup this test creates, and clients started with
//! `sluice run --workload productpage-v1.default` connecting to reviews' VIP 127.100.0.40:9080.
//! The agent's pins, its cgroups and every process are removed at the end, also on failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use sluice_dataplane::loader::{Dataplane, Maps};
use sluice_testkit::{Backend, CONNECT_LOOP_PY, Proc, eventually, free_port, is_root, share};

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");
const REVIEWS: &str = "127.100.0.40";

/// The test's cgroup (the agent attaches there), pin directory and scratch files.
struct Sandbox {
    cgroup: PathBuf,
    pin_dir: PathBuf,
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        let id = std::process::id();
        let cgroup = sluice_dataplane::cgroup::cgroup2_mount().unwrap().join(format!("sluice-e2e-{id}"));
        sluice_dataplane::cgroup::create(&cgroup).unwrap();
        Self {
            cgroup,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/sluice-e2e-{id}")),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = Dataplane::remove(&self.pin_dir);
        let _ = sluice_dataplane::cgroup::remove(&self.cgroup);
    }
}

fn agent(sandbox: &Sandbox, xds_port: u16, metrics_port: u16, log: &str) -> Proc {
    Proc::spawn(
        "sluice agent",
        Command::new(SLUICE)
            .args(["agent", "--node", "node-1", "--xds-addr"])
            .arg(format!("127.0.0.1:{xds_port}"))
            .args([
                "--cgroup".as_ref(),
                sandbox.cgroup.as_os_str(),
                "--pin-dir".as_ref(),
                sandbox.pin_dir.as_os_str(),
                "--socket".as_ref(),
                sandbox.socket().as_os_str(),
                "--metrics-addr".as_ref(),
                format!("127.0.0.1:{metrics_port}").as_ref(),
            ]),
        &sandbox.dir.path().join(log),
    )
}

/// `sluice run --workload <workload> -- python3 <connect loop> VIP 9080 <count> <pause ms>`.
fn run_client(sandbox: &Sandbox, workload: &str, count: usize, pause_ms: u64) -> Command {
    let mut cmd = Command::new(SLUICE);
    cmd.args(["run", "--workload", workload, "--agent-socket"]).arg(sandbox.socket()).args([
        "--",
        "python3",
        "-c",
        CONNECT_LOOP_PY,
        REVIEWS,
        "9080",
        &count.to_string(),
        &pause_ms.to_string(),
    ]);
    cmd
}

fn lines(out: &Output) -> Vec<String> {
    assert!(out.status.success(), "client failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

fn dump(pin_dir: &Path) -> Option<String> {
    Maps::open(pin_dir).ok().and_then(|m| sluice_dataplane::dump::dump(&m).ok())
}

#[test]
fn bookinfo_reviews_split_at_connect_with_live_edits_and_agent_restart() {
    assert!(is_root(), "this test loads eBPF programs and creates cgroups: run it as root (CI does)");
    let sandbox = Sandbox::new();
    let routes = sandbox.dir.path().join("routes");
    std::fs::create_dir(&routes).unwrap();
    let variant = |name: &str| common::root().join(format!("examples/bookinfo-variants/{name}/virtual-service.yaml"));
    std::fs::copy(variant("reviews-80-20"), routes.join("reviews.yaml")).unwrap();
    let (xds_port, metrics_port) = (free_port(), free_port());
    let _serve = Proc::spawn(
        "sluice serve",
        Command::new(SLUICE)
            .args(["serve", "--debounce-ms", "0", "--config"])
            .arg(common::root().join("examples/bookinfo"))
            .arg("--config")
            .arg(&routes)
            .arg("--xds-addr")
            .arg(format!("127.0.0.1:{xds_port}"))
            .arg("--monitoring-addr")
            .arg(format!("127.0.0.1:{}", free_port())),
        &sandbox.dir.path().join("serve.log"),
    );
    let _backends: Vec<Backend> = (1..=3)
        .map(|v| Backend::start(&format!("reviews-v{v}"), format!("127.0.1.4{}:9080", v - 1).parse().unwrap()))
        .collect();
    let mut agent_proc = agent(&sandbox, xds_port, metrics_port, "agent.log");
    let agent_log = || std::fs::read_to_string(sandbox.dir.path().join("agent.log")).unwrap_or_default();
    let served = eventually(Duration::from_secs(30), || {
        dump(&sandbox.pin_dir).filter(|d| d.contains("127.0.1.40:9080 weight 4/5"))
    });
    let dump_text =
        served.unwrap_or_else(|| panic!("the agent never programmed reviews 80/20; agent log:\n{}", agent_log()));
    // Every Bookinfo service is on the kernel path.
    for vip in ["127.100.0.10:9080/TCP", "127.100.0.20:9080/TCP", "127.100.0.30:9080/TCP", "127.100.0.40:9080/TCP"] {
        assert!(dump_text.contains(vip), "{vip} missing:\n{dump_text}");
    }
    // The CLI dump reads the same pinned maps.
    let cli = Command::new(SLUICE).args(["agent", "dump", "--pin-dir"]).arg(&sandbox.pin_dir).output().unwrap();
    assert!(String::from_utf8_lossy(&cli.stdout).contains("-> 127.0.1.41:9080 weight 1/5"), "{cli:?}");

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
    let outside = Command::new("python3").args(["-c", CONNECT_LOOP_PY, REVIEWS, "9080", "2"]).output().unwrap();
    assert!(lines(&outside).iter().all(|l| l == "error 111"), "{outside:?}");
    // A workload the config does not have is refused with its name.
    let unknown = run_client(&sandbox, "nobody.default", 1, 0).output().unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("default/nobody"), "{unknown:?}");

    // Metrics on the agent's port.
    let (status, metrics) =
        sluice_testkit::http_get(&format!("127.0.0.1:{metrics_port}"), "agent", "/metrics", &[]).unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains("sluice_agent_services 4") && metrics.contains("sluice_agent_xds_connected 1"),
        "{metrics}"
    );

    // A config edit reaches the maps: file write → map update, timed.
    let written = Instant::now();
    std::fs::copy(variant("reviews-50-50"), routes.join("reviews.yaml")).unwrap();
    let updated = eventually(Duration::from_secs(10), || {
        dump(&sandbox.pin_dir).filter(|d| d.contains("127.0.1.40:9080 weight 1/2")).map(|_| written.elapsed())
    });
    let updated = updated.unwrap_or_else(|| panic!("50/50 never reached the maps; agent log:\n{}", agent_log()));
    eprintln!("file write → map update (debounce 0): {updated:?}");
    let v1 = share(&lines(&run_client(&sandbox, "productpage-v1.default", 1000, 0).output().unwrap()), "reviews-v1");
    assert!((0.45..=0.55).contains(&v1), "v1 share after 50/50: {v1}");

    // kill -9 the agent while a workload connects in a loop, then start a new one: the pinned
    // programs keep balancing, the new agent adopts them, and not one connect fails.
    let client =
        run_client(&sandbox, "productpage-v1.default", 300, 5).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut client = Proc { child: client, name: "client loop".into() };
    std::thread::sleep(Duration::from_millis(300));
    agent_proc.kill();
    std::thread::sleep(Duration::from_millis(300));
    let _agent2 = agent(&sandbox, xds_port, metrics_port, "agent2.log");
    let out: Vec<String> = client.wait_for_stdout().lines().map(str::to_string).collect();
    assert_eq!(out.len(), 300);
    let failed: Vec<_> = out.iter().filter(|l| !l.starts_with("reviews-v")).collect();
    assert!(failed.is_empty(), "connects failed across the agent restart: {failed:?}");
    let log2 = || std::fs::read_to_string(sandbox.dir.path().join("agent2.log")).unwrap_or_default();
    assert!(
        eventually(Duration::from_secs(10), || log2().contains("adopting pinned programs and maps").then_some(()))
            .is_some(),
        "{}",
        log2()
    );
}
