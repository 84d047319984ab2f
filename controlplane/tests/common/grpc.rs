//! Proxyless gRPC test support: `examples/grpc`, `sluice serve` and `sluice bootstrap --grpc`,
//! and the echo servers and line-driven clients of `tests/grpc/` (Python grpcio, grpc-js).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use sluice_testkit::{Proc, python_bin, relocate};

pub const CLIENT: &str = "sidecar~127.0.3.20~client.grpcdemo~grpcdemo.svc.cluster.local";
pub const ECHO_V3: &str = "sidecar~127.0.3.13~echo-v3.grpcdemo~grpcdemo.svc.cluster.local";
pub const TARGET: &str = "xds:///echo.grpcdemo.svc.cluster.local:7070";

pub fn echo_py() -> PathBuf {
    super::root().join("controlplane/tests/grpc/echo.py")
}

/// Writes `sluice bootstrap --grpc` for `node` (with its certificate files in `certs`, if any)
/// into `dir` and returns its path.
pub fn grpc_bootstrap(dir: &Path, name: &str, node: &str, xds_port: u16, certs: Option<&Path>) -> PathBuf {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(["bootstrap", "--grpc", "--proxy", &relocate(node), "--xds-addr", &format!("127.0.0.1:{xds_port}")]);
    if let Some(certs) = certs {
        cmd.arg("--cert-dir").arg(certs);
    }
    let out = cmd.output().expect("sluice bootstrap --grpc");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, out.stdout).unwrap();
    path
}

/// `examples/grpc`, relocated, with its port moved to `port`: its documents.
pub fn example(port: u16) -> Vec<String> {
    let text = relocate(&std::fs::read_to_string(super::root().join("examples/grpc/mesh.yaml")).unwrap())
        .replace("7070", &port.to_string());
    text.split("\n---\n").map(str::to_string).collect()
}

/// `sluice serve` of the config in `dir/cfg`, with its state in `dir/state`.
pub fn serve(dir: &Path, xds_port: u16, monitoring_port: u16) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(["serve", "--debounce-ms", "20", "--config"])
        .arg(dir.join("cfg"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--xds-addr", &format!("127.0.0.1:{xds_port}")])
        .args(["--monitoring-addr", &format!("127.0.0.1:{monitoring_port}")]);
    Proc::spawn("sluice", &mut cmd, &dir.join("sluice.log"))
}

/// The logs of a test's processes in `dir`, for failure messages.
pub fn logs(dir: &Path) -> String {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    ["sluice", "v3", "client", "outsider"].map(|n| format!("--- {n}\n{}", read(&format!("{n}.log")))).join("\n")
}

/// An echo server answering with `name` on `addr`, with extra `flags`.
pub fn echo_server(dir: &Path, name: &str, addr: &str, flags: &[&str], bootstrap: Option<&Path>) -> Proc {
    let mut cmd = Command::new(python_bin());
    cmd.arg(echo_py()).args(["serve", name, addr]).args(flags);
    if let Some(b) = bootstrap {
        cmd.env("GRPC_XDS_BOOTSTRAP", b);
    }
    Proc::spawn(name, &mut cmd, &dir.join(format!("{name}.log")))
}

/// Which xDS client implementation runs the calls.
#[derive(Clone, Copy)]
pub enum Implementation {
    /// Python `grpcio` (`echo.py client`).
    Python,
    /// Node.js `@grpc/grpc-js` with `@grpc/grpc-js-xds` (`echo.js`).
    Node,
}

/// Where `./test` installs grpc-js: `$SLUICE_NODE_PATH`, else its cache.
pub fn node_path() -> String {
    std::env::var("SLUICE_NODE_PATH")
        .unwrap_or_else(|_| format!("{}/.cache/sluice/grpc-js/node_modules", std::env::var("HOME").unwrap_or_default()))
}

/// The line-driven client of `echo.py` / `echo.js`: one channel for its whole life.
pub struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    pub fn start(implementation: Implementation, target: &str, bootstrap: &Path, log: &Path) -> Client {
        Self::start_under(&[], implementation, target, bootstrap, log)
    }

    /// [`Client::start`] with the client's command run by `wrapper` (e.g. `sluice run … --`).
    pub fn start_under(
        wrapper: &[String],
        implementation: Implementation,
        target: &str,
        bootstrap: &Path,
        log: &Path,
    ) -> Client {
        let (program, mut args): (String, Vec<String>) = match implementation {
            Implementation::Python => (python_bin(), vec![echo_py().display().to_string(), "client".into()]),
            Implementation::Node => {
                ("node".into(), vec![super::root().join("controlplane/tests/grpc/echo.js").display().to_string()])
            }
        };
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut cmd = Command::new(first);
                cmd.args(rest).arg(&program);
                cmd
            }
            None => Command::new(&program),
        };
        args.push(target.to_string());
        let mut child = cmd
            .args(&args)
            .env("NODE_PATH", node_path())
            .env("GRPC_XDS_BOOTSTRAP", bootstrap)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("python echo client");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Client { child, stdin, stdout }
    }

    /// `count` calls of `method` with `metadata`: answers by server name, failures by
    /// `status:<CODE>`.
    pub fn call(&mut self, method: &str, count: usize, metadata: &[&str]) -> BTreeMap<String, usize> {
        writeln!(self.stdin, "{method} {count} {}", metadata.join(" ")).unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("client answered {line:?}: {e}"))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A one-off call with a plain (non-xDS) channel straight to `addr`.
pub fn direct_call(addr: &str) -> BTreeMap<String, usize> {
    let mut child = Command::new(python_bin())
        .arg(echo_py())
        .args(["client", addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python echo client");
    writeln!(child.stdin.take().unwrap(), "/echo.Echo/Call 1").unwrap();
    let out = child.wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// `examples/grpc` at `port` for mesh mTLS, as two files' text: the example without its
/// VirtualService and AuthorizationPolicy, its DestinationRule asking for `ISTIO_MUTUAL`; and
/// the routing and policy — everything to v3, v3's port STRICT and open to namespace
/// grpcdemo only.
pub fn mtls_config(port: u16) -> (String, String) {
    let kept: Vec<String> = example(port)
        .into_iter()
        .filter(|d| !d.contains("kind: VirtualService") && !d.contains("kind: AuthorizationPolicy"))
        .collect();
    let policy = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: grpcdemo}
spec:
  hosts: [echo]
  http: [{route: [{destination: {host: echo, subset: v3}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: grpcdemo}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-v3, namespace: grpcdemo}
spec:
  selector: {matchLabels: {version: v3}}
  rules: [{from: [{source: {namespaces: [grpcdemo]}}]}]
"#;
    // One DestinationRule per host: the example's (with the subsets) gets the TLS setting.
    let kept = kept.join("\n---\n").replace(
        "spec:\n  host: echo\n  subsets:",
        "spec:\n  host: echo\n  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}\n  subsets:",
    );
    (kept, policy.to_string())
}
