//! End to end with real Envoy 1.40 and real backends, all on 127.0.0.0/8: `sluice serve` on a
//! copy of `examples/bookinfo`, productpage's sidecar started from `sluice bootstrap`, requests
//! through its outbound listener (bound by the Sidecar's `captureMode: NONE`) and its inbound
//! listener. Variants are switched by editing the served directory while Envoy runs.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sluice_testkit::{Backend, Proc, envoy_bin, eventually, free_port, http_get, http_request, relocate};

/// Bookinfo's listeners use the example's addresses (moved into this run's 127.<n>/16 block, so
/// parallel runs do not collide): one mesh at a time in this binary.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// productpage's outbound listener (the Sidecar's egress bind, 127.0.0.1 in the example).
fn outbound() -> String {
    relocate("127.0.0.1") + ":9080"
}

/// productpage's inbound listener, on its pod IP.
fn inbound() -> String {
    relocate("127.0.1.10:9080")
}

struct Mesh {
    dir: tempfile::TempDir,
    sluice: Option<Proc>,
    envoy: Proc,
    xds_port: u16,
    monitoring_port: u16,
    admin_port: u16,
    _backends: Vec<Backend>,
}

fn sluice_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sluice")
}

fn start_sluice(dir: &Path, xds_port: u16, monitoring_port: u16, log: &str) -> Proc {
    let mut cmd = Command::new(sluice_bin());
    cmd.args(["serve", "--debounce-ms", "20", "--config"]).arg(dir.join("cfg"));
    // A MeshConfig the test wrote (read at start).
    let mesh = dir.join("mesh.yaml");
    if mesh.exists() {
        cmd.arg("--mesh-config").arg(mesh);
    }
    cmd.arg("--state-dir")
        .arg(dir.join("state"))
        .args([
            "--xds-addr",
            &format!("127.0.0.1:{xds_port}"),
            "--monitoring-addr",
            &format!("127.0.0.1:{monitoring_port}"),
            // Bookinfo's config is small: split Delta responses at 1 KiB so that Envoy gets
            // its clusters, endpoints, listeners and routes in parts.
            "--delta-chunk-bytes",
            "1024",
        ])
        .env("RUST_LOG", "info");
    let p = Proc::spawn("sluice", &mut cmd, &dir.join(log));
    let ready = eventually(Duration::from_secs(20), || {
        http_get(&format!("127.0.0.1:{monitoring_port}"), "x", "/ready", &[]).ok().filter(|(s, _)| *s == 200)
    });
    assert!(
        ready.is_some(),
        "sluice did not become ready: {}",
        std::fs::read_to_string(dir.join(log)).unwrap_or_default()
    );
    p
}

fn variant_text(variant: &str) -> String {
    let dir = common::root().join("examples/bookinfo-variants").join(variant);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).expect("variant").map(|e| e.unwrap().path()).collect();
    files.sort();
    files.iter().map(|f| relocate(&std::fs::read_to_string(f).unwrap()) + "\n---\n").collect()
}

impl Mesh {
    fn start(delta: bool, variant: &str) -> Mesh {
        Mesh::start_with(delta, variant, None)
    }

    /// As [`Mesh::start`], with sluice reading `mesh_config` (MeshConfig YAML).
    fn start_with(delta: bool, variant: &str, mesh_config: Option<&str>) -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        if let Some(text) = mesh_config {
            std::fs::write(dir.path().join("mesh.yaml"), text).unwrap();
        }
        let cfg = dir.path().join("cfg");
        copy_dir(&common::root().join("examples/bookinfo"), &cfg);
        std::fs::write(cfg.join("variant.yaml"), variant_text(variant)).unwrap();
        // The examples' addresses, moved into this run's loopback block by `relocate` (the
        // productpage app's 127.0.0.1 becomes 127.<n>.0.1): nothing binds 127.0.0.1 itself.
        let backends = [
            ("productpage-app", "127.0.0.1", 19080),
            ("details-v1", "127.0.1.20", 9080),
            ("ratings-v1", "127.0.1.30", 9080),
            ("reviews-v1", "127.0.1.40", 9080),
            ("reviews-v2", "127.0.1.41", 9080),
            ("reviews-v3", "127.0.1.42", 9080),
        ]
        .iter()
        .map(|(n, ip, port)| Backend::start(n, SocketAddr::new(relocate(ip).parse().unwrap(), *port)))
        .collect();
        let (xds_port, monitoring_port, admin_port) = (free_port(), free_port(), free_port());
        let sluice = start_sluice(dir.path(), xds_port, monitoring_port, "sluice.log");
        let mut args = vec![
            "bootstrap".to_string(),
            "--proxy".into(),
            relocate(common::PRODUCTPAGE),
            "--xds-addr".into(),
            format!("127.0.0.1:{xds_port}"),
            "--admin-port".into(),
            admin_port.to_string(),
        ];
        if delta {
            args.push("--delta".into());
        }
        let out = Command::new(sluice_bin()).args(&args).output().expect("sluice bootstrap");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let bootstrap = dir.path().join("bootstrap.json");
        std::fs::write(&bootstrap, &out.stdout).unwrap();
        let envoy = Proc::spawn(
            "envoy",
            Command::new(envoy_bin()).arg("-c").arg(&bootstrap).args(["--use-dynamic-base-id", "--log-level", "warn"]),
            &dir.path().join("envoy.log"),
        );
        let mesh =
            Mesh { dir, sluice: Some(sluice), envoy, xds_port, monitoring_port, admin_port, _backends: backends };
        let up = eventually(Duration::from_secs(30), || {
            http_get(&outbound(), "details:9080", "/", &[]).ok().filter(|(s, _)| *s == 200)
        });
        assert!(up.is_some(), "Envoy never served traffic: {}", mesh.logs());
        mesh
    }

    fn logs(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!("--- envoy\n{}\n--- sluice\n{}", read("envoy.log"), read("sluice.log"))
    }

    /// Replaces the variant in the served directory; returns the time of the write.
    fn set_variant(&self, variant: &str) -> Instant {
        let tmp = self.dir.path().join("variant.tmp");
        std::fs::write(&tmp, variant_text(variant)).unwrap();
        let at = Instant::now();
        std::fs::rename(&tmp, self.dir.path().join("cfg/variant.yaml")).unwrap();
        at
    }

    fn reviews(&self, headers: &[(&str, &str)]) -> String {
        let (status, body) = http_get(&outbound(), "reviews:9080", "/", headers).expect("request");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Replaces the variant in the served directory with `text`.
    fn set_text(&self, text: &str) {
        let tmp = self.dir.path().join("variant.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("cfg/variant.yaml")).unwrap();
    }

    /// Envoy's counters whose names contain `filter`, by name.
    fn envoy_stats(&self, filter: &str) -> std::collections::BTreeMap<String, u64> {
        let (_, text) =
            http_get(&format!("127.0.0.1:{}", self.admin_port), "x", &format!("/stats?filter={filter}"), &[])
                .expect("Envoy admin");
        text.lines()
            .filter_map(|l| l.split_once(": "))
            .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
            .collect()
    }

    fn monitoring(&self, path: &str) -> String {
        http_get(&format!("127.0.0.1:{}", self.monitoring_port), "x", path, &[]).expect("monitoring").1
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.envoy.kill();
    }
}

/// Copies the example with its addresses relocated.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            let text = std::fs::read_to_string(e.path()).unwrap();
            std::fs::write(to.join(e.file_name()), relocate(&text)).unwrap();
        }
    }
}

/// Share of `n` reviews requests answered by v1.
fn v1_share(mesh: &Mesh, n: usize) -> f64 {
    let v1 = (0..n).filter(|_| mesh.reviews(&[]) == "reviews-v1").count();
    v1 as f64 / n as f64
}

/// The routing checks shared by SotW and Delta.
fn routing_checks(mesh: &Mesh) {
    for _ in 0..20 {
        assert_eq!(mesh.reviews(&[]), "reviews-v1", "all-v1");
    }
    let written = mesh.set_variant("jason-v2");
    let converged = eventually(Duration::from_secs(10), || {
        (mesh.reviews(&[("end-user", "jason")]) == "reviews-v2").then(Instant::now)
    });
    let converged = converged.expect("jason-v2 never applied");
    eprintln!("convergence after a file edit: {:?}", converged - written);
    for _ in 0..10 {
        assert_eq!(mesh.reviews(&[("end-user", "jason")]), "reviews-v2");
        assert_eq!(mesh.reviews(&[]), "reviews-v1");
    }
    mesh.set_variant("reviews-80-20");
    eventually(Duration::from_secs(10), || (mesh.reviews(&[("end-user", "jason")]) == "reviews-v1").then_some(()))
        .expect("80/20 applied");
    let share = v1_share(mesh, 1000);
    eprintln!("80/20 over 1000 requests: v1 share {share:.3}");
    assert!((0.75..=0.85).contains(&share), "v1 share {share} outside 80±5%");
}

#[test]
fn bookinfo_sotw_routing_faults_authorization_and_restart() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut mesh = Mesh::start(false, "all-v1");
    routing_checks(&mesh);

    mesh.set_variant("ratings-abort");
    let aborted = eventually(Duration::from_secs(10), || {
        http_get(&outbound(), "ratings:9080", "/", &[("end-user", "jason")]).ok().filter(|(s, _)| *s == 500)
    });
    assert!(aborted.is_some(), "fault abort never applied");
    assert_eq!(http_get(&outbound(), "ratings:9080", "/", &[]).unwrap(), (200, "ratings-v1".into()));
    assert_eq!(http_get(&outbound(), "ratings:9080", "/ratings/broken", &[]).unwrap().0, 503);

    // Inbound: productpage's own listener, bound on its pod IP, forwards to the app.
    assert_eq!(http_get(&inbound(), "productpage:9080", "/admin", &[]).unwrap(), (200, "productpage-app".into()));
    mesh.set_variant("deny-admin");
    let denied = eventually(Duration::from_secs(10), || {
        http_get(&inbound(), "productpage:9080", "/admin", &[]).ok().filter(|(s, _)| *s == 403)
    });
    assert!(denied.is_some(), "DENY policy never applied");
    assert_eq!(http_get(&inbound(), "productpage:9080", "/productpage", &[]).unwrap(), (200, "productpage-app".into()));

    // The convergence of file edits shows in /metrics.
    let metrics = mesh.monitoring("/metrics");
    let count: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pilot_proxy_convergence_time_count "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(count >= 3, "convergence observations in /metrics: {count}\n{metrics}");
    assert!(metrics.contains("pilot_xds 1"), "{metrics}");
    let syncz: serde_json::Value = serde_json::from_str(&mesh.monitoring("/debug/syncz")).unwrap();
    let proxy = &syncz["proxies"][0];
    assert_eq!(proxy["node_id"], relocate(common::PRODUCTPAGE));
    let version_before: u64 = proxy["snapshot_version"].as_u64().unwrap();

    // Kill sluice: Envoy keeps serving its last config.
    mesh.sluice.take().unwrap().kill();
    for _ in 0..20 {
        assert_eq!(http_get(&inbound(), "productpage:9080", "/admin", &[]).unwrap().0, 403);
        // deny-admin has no reviews VirtualService: the default route spreads over all versions.
        assert!(mesh.reviews(&[]).starts_with("reviews-v"));
    }
    // Restart with the same state directory: Envoy reconnects and ACKs; versions did not go back.
    mesh.sluice = Some(start_sluice(mesh.dir.path(), mesh.xds_port, mesh.monitoring_port, "sluice-restarted.log"));
    let synced = eventually(Duration::from_secs(30), || {
        let s: serde_json::Value = serde_json::from_str(&mesh.monitoring("/debug/syncz")).ok()?;
        let p = s["proxies"].get(0)?.clone();
        let types = p["types"].as_object()?;
        let acked = types.len() >= 4 && types.values().all(|t| t["acked_version"] == t["sent_version"]);
        acked.then_some(p)
    });
    let proxy = synced.expect("Envoy did not reconnect and ACK");
    assert!(proxy["snapshot_version"].as_u64().unwrap() >= version_before, "version went backwards: {proxy}");
    assert_eq!(http_get(&inbound(), "productpage:9080", "/admin", &[]).unwrap().0, 403);
}

#[test]
fn bookinfo_delta_routing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mesh = Mesh::start(true, "all-v1");
    routing_checks(&mesh);
    let syncz: serde_json::Value = serde_json::from_str(&mesh.monitoring("/debug/syncz")).unwrap();
    assert_eq!(syncz["proxies"][0]["protocol"], "delta");
}

/// The served directory deleted (`rm -rf`) and recreated under a running Envoy: the DENY rule
/// never disappears while it is gone, and an edit in the recreated directory reaches Envoy.
#[test]
fn a_deleted_config_directory_keeps_the_deny_rule_and_its_return_is_seen() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mesh = Mesh::start(false, "deny-admin");
    let admin = || http_get(&inbound(), "productpage:9080", "/admin", &[]).map(|(s, _)| s).unwrap_or(0);
    assert_eq!(eventually(Duration::from_secs(10), || (admin() == 403).then_some(())), Some(()), "{}", mesh.logs());
    let cfg = mesh.dir.path().join("cfg");
    std::fs::remove_dir_all(&cfg).unwrap();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(admin(), 403, "the DENY rule must hold while the directory is gone\n{}", mesh.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    copy_dir(&common::root().join("examples/bookinfo"), &cfg);
    std::fs::write(cfg.join("variant.yaml"), variant_text("deny-admin")).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(admin(), 403);
    mesh.set_variant("jason-v2");
    // Both halves of the edit: the DENY rule goes (a listener update) and jason's route comes
    // (a route update; without it jason reaches every version, so ask ten times).
    let applied = eventually(Duration::from_secs(10), || {
        (admin() == 200 && (0..10).all(|_| mesh.reviews(&[("end-user", "jason")]) == "reviews-v2")).then_some(())
    });
    assert!(applied.is_some(), "an edit in the recreated directory never reached Envoy\n{}", mesh.logs());
}

/// Objects that once validated but could not be encoded (and froze every proxy of the mesh):
/// rejected, and a DENY rule written after them reaches Envoy; `/healthz` says every proxy is
/// current.
#[test]
fn objects_that_cannot_be_encoded_are_rejected_and_later_changes_still_apply() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mesh = Mesh::start(false, "all-v1");
    let bad = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: wraps, namespace: default}\n\
        spec:\n  hosts: [ratings]\n  http:\n  - route:\n    - {destination: {host: ratings}, weight: 9223372036854775807}\n    \
        - {destination: {host: ratings}, weight: 9223372036854775807}\n    - {destination: {host: ratings}, weight: 102}\n\
        ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: forever, namespace: default}\n\
        spec:\n  hosts: [details]\n  http:\n  - route: [{destination: {host: details}}]\n    timeout: 99999999999999999s\n\
        ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: counts, namespace: default}\n\
        spec:\n  host: productpage\n  trafficPolicy: {outlierDetection: {consecutive5xxErrors: 99999999999}}\n";
    std::fs::write(mesh.dir.path().join("cfg/bad.yaml"), bad).unwrap();
    let rejected = eventually(Duration::from_secs(10), || {
        let c: serde_json::Value = serde_json::from_str(&mesh.monitoring("/debug/configz")).ok()?;
        (c["rejected"].as_array()?.len() >= 3).then_some(c)
    });
    assert!(rejected.is_some(), "the three objects are rejected\n{}", mesh.logs());
    mesh.set_variant("deny-admin");
    let denied = eventually(Duration::from_secs(10), || {
        http_get(&inbound(), "productpage:9080", "/admin", &[]).ok().filter(|(s, _)| *s == 403)
    });
    assert!(denied.is_some(), "the DENY rule written after the bad objects never reached Envoy\n{}", mesh.logs());
    let (code, body) = http_get(&format!("127.0.0.1:{}", mesh.monitoring_port), "x", "/healthz", &[]).unwrap();
    assert_eq!((code, body.as_str()), (200, "ok\n"), "no proxy is served a stale config");
}

/// Istio's authorization actions on a live Envoy: a DENY by method wildcards, CUSTOM failing
/// closed (no ext_authz yet), AUDIT logging without enforcing, a dry run counting without
/// enforcing — each seen in the responses and in Envoy's RBAC counters.
#[test]
fn istio_authorization_actions_on_a_live_envoy() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mesh = Mesh::start(false, "istio-authz");
    let status =
        |method: &str, path: &str| http_request(&inbound(), method, "productpage:9080", path, &[]).expect("request").0;
    let denied = eventually(Duration::from_secs(10), || (status("DELETE", "/x") == 403).then_some(()));
    assert!(denied.is_some(), "the DENY on DEL* never applied");
    assert_eq!(status("PATCH", "/x"), 403, "*TCH is a suffix");
    assert_eq!(status("GET", "/x"), 200);
    assert_eq!(status("GET", "/ext/check"), 403, "CUSTOM without a usable provider denies what it matches");
    assert_eq!(status("GET", "/extra"), 200);

    let prefix = "http.inbound_0.0.0.0_9080.rbac.";
    let counter = |name: &str| mesh.envoy_stats("rbac").get(&format!("{prefix}{name}")).copied().unwrap_or(0);
    let shadow_denied = counter("istio_dry_run_deny_.shadow_denied");
    assert_eq!(status("GET", "/audit/x"), 200, "AUDIT does not enforce");
    let audited = eventually(Duration::from_secs(10), || {
        let log = std::fs::read_to_string(mesh.dir.path().join("envoy.log")).unwrap_or_default();
        log.lines().find(|l| l.contains("sluice-audit GET productpage:9080 /audit/x 200")).map(str::to_string)
    });
    assert!(audited.is_some(), "no audit log line: {}", mesh.logs());
    assert_eq!(status("GET", "/dry"), 200, "a dry run does not enforce");
    assert_eq!(
        counter("istio_dry_run_deny_.shadow_denied"),
        shadow_denied + 1,
        "the dry run counts what it would deny: {:?}",
        mesh.envoy_stats("rbac")
    );
    assert_eq!(status("GET", "/x"), 200);
    assert_eq!(counter("istio_dry_run_deny_.shadow_denied"), shadow_denied + 1, "and only that");
    let log = std::fs::read_to_string(mesh.dir.path().join("envoy.log")).unwrap_or_default();
    assert_eq!(log.matches("sluice-audit").count(), 1, "only what AUDIT's rules match is logged: {log}");
}

/// An ES256 key that signs test JWTs, and its JWKS.
struct JwtKey {
    pair: ring::signature::EcdsaKeyPair,
    jwks: String,
}

impl JwtKey {
    fn new(kid: &str) -> JwtKey {
        use base64::Engine;
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).expect("key");
        // An uncompressed point: 0x04, x, y.
        let point = pair.public_key().as_ref().to_vec();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        }]});
        JwtKey { pair, jwks: jwks.to_string() }
    }

    /// A signed token with `claims` (and an expiry an hour away).
    fn token(&self, kid: &str, mut claims: serde_json::Value) -> String {
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        claims["exp"] = serde_json::json!(now + 3600);
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": kid});
        let signed = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let signature = self.pair.sign(&ring::rand::SystemRandom::new(), signed.as_bytes()).expect("sign");
        format!("{signed}.{}", b64(signature.as_ref()))
    }
}

/// RequestAuthentication and JWT policies on a live Envoy: a token signed by the issuer's key
/// is verified and its principal and claims (nested ones too) decide; a bad signature or an
/// unknown issuer is refused with 401; a request without a token passes authentication and is
/// judged by the policies alone.
#[test]
fn jwt_principals_and_claims_on_a_live_envoy() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mesh = Mesh::start(false, "all-v1");
    let key = JwtKey::new("k1");
    let jwks = serde_json::to_string(&key.jwks).unwrap();
    mesh.set_text(&format!(
        r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: productpage-jwt, namespace: default}}
spec:
  selector: {{matchLabels: {{app: productpage}}}}
  jwtRules:
  - issuer: https://issuer.test
    jwks: {jwks}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: productpage-jwt, namespace: default}}
spec:
  selector: {{matchLabels: {{app: productpage}}}}
  rules:
  - to: [{{operation: {{paths: [/open]}}}}]
  - from: [{{source: {{requestPrincipals: [https://issuer.test/alice]}}}}]
    to: [{{operation: {{paths: [/alice]}}}}]
  - to: [{{operation: {{paths: [/admin]}}}}]
    when:
    - {{key: "request.auth.claims[groups]", values: [admins]}}
    - {{key: "request.auth.claims[org][team]", values: [blue]}}
"#
    ));
    let status = |path: &str, token: Option<&str>| {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
        http_get(&inbound(), "productpage:9080", path, &headers).expect("request").0
    };
    let applied = eventually(Duration::from_secs(10), || (status("/other", None) == 403).then_some(()));
    assert!(applied.is_some(), "the policy never applied: {}", mesh.logs());
    let alice = key.token("k1", serde_json::json!({"iss": "https://issuer.test", "sub": "alice"}));
    let bob = key.token("k1", serde_json::json!({"iss": "https://issuer.test", "sub": "bob"}));
    assert_eq!(status("/open", None), 200, "no token: authentication passes, the policy allows /open");
    assert_eq!(status("/open", Some(&alice)), 200);
    assert_eq!(status("/alice", Some(&alice)), 200, "requestPrincipals iss/sub");
    assert_eq!(status("/alice", Some(&bob)), 403);
    assert_eq!(status("/alice", None), 403);
    let mut forged = alice.clone();
    forged.replace_range(forged.len() - 4.., if forged.ends_with("AAAA") { "BBBB" } else { "AAAA" });
    assert_eq!(status("/open", Some(&forged)), 401, "an invalid signature is refused");
    let other = JwtKey::new("k1").token("k1", serde_json::json!({"iss": "https://issuer.test", "sub": "alice"}));
    assert_eq!(status("/alice", Some(&other)), 401, "a key the issuer's JWKS does not hold");
    let stranger = key.token("k1", serde_json::json!({"iss": "https://elsewhere.test", "sub": "alice"}));
    assert_eq!(status("/open", Some(&stranger)), 401, "an issuer no rule accepts");
    let admin = |groups: serde_json::Value, team: &str| {
        key.token(
            "k1",
            serde_json::json!({"iss": "https://issuer.test", "sub": "carol", "groups": groups, "org": {"team": team}}),
        )
    };
    assert_eq!(
        status("/admin", Some(&admin(serde_json::json!(["users", "admins"]), "blue"))),
        200,
        "a list claim and a nested one"
    );
    assert_eq!(status("/admin", Some(&admin(serde_json::json!("admins"), "blue"))), 200, "a string claim");
    assert_eq!(status("/admin", Some(&admin(serde_json::json!(["users"]), "blue"))), 403);
    assert_eq!(status("/admin", Some(&admin(serde_json::json!(["admins"]), "red"))), 403);
}

/// A CUSTOM policy on a live Envoy with an HTTP authorizer (MeshConfig `extensionProviders`,
/// its service a ServiceEntry): only the requests the policy's rules match are checked, under
/// the provider's path prefix, and the authorizer's answer decides.
#[test]
fn custom_authorization_through_an_http_authorizer_on_a_live_envoy() {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    // The authorizer: allows a check of a path with "/allow" in it, denies the rest.
    let authorizer = std::net::TcpListener::bind(relocate("127.0.1.99:9080")).expect("authorizer");
    let checked = std::sync::Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = checked.clone();
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    std::thread::spawn(move || {
        for stream in authorizer.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            // The headers, up to the blank line (checks carry no body here).
            let mut header = String::new();
            while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                header.clear();
            }
            let path = line.split(' ').nth(1).unwrap_or("").to_string();
            counted.fetch_add(1, Ordering::SeqCst);
            seen.lock().unwrap().push(path.clone());
            let reply = if path.contains("/allow") {
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_string()
            } else {
                "HTTP/1.1 403 Forbidden\r\nx-reason: not-on-the-list\r\ncontent-length: 6\r\n\r\nno way".to_string()
            };
            let mut stream = stream;
            let _ = stream.write_all(reply.as_bytes());
        }
    });
    let mesh = Mesh::start_with(
        false,
        "all-v1",
        Some(
            "extensionProviders:\n- name: ext-authz\n  envoyExtAuthzHttp:\n    service: default/ext-authz.local\n    port: 9080\n    \
             pathPrefix: /check\n    headersToDownstreamOnDeny: [x-reason]\n",
        ),
    );
    mesh.set_text(&relocate(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext-authz, namespace: default}
spec:
  hosts: [ext-authz.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.1.99}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: productpage-ext, namespace: default}
spec:
  selector: {matchLabels: {app: productpage}}
  action: CUSTOM
  provider: {name: ext-authz}
  rules: [{to: [{operation: {paths: ["/ext/*"]}}]}]
"#,
    ));
    let get = |path: &str| http_get(&inbound(), "productpage:9080", path, &[]).expect("request");
    let applied = eventually(Duration::from_secs(10), || (get("/ext/nope").0 == 403).then_some(()));
    assert!(applied.is_some(), "the CUSTOM policy never applied: {}", mesh.logs());
    assert_eq!(get("/ext/allow"), (200, "productpage-app".into()), "the authorizer allowed it");
    let (status, body) = get("/ext/other");
    assert_eq!((status, body.as_str()), (403, "no way"), "the authorizer's denial reaches the client");
    let before = count.load(Ordering::SeqCst);
    assert_eq!(get("/elsewhere"), (200, "productpage-app".into()));
    assert_eq!(count.load(Ordering::SeqCst), before, "a request the CUSTOM rules do not match is not checked");
    let paths = checked.lock().unwrap().clone();
    assert!(paths.contains(&"/check/ext/allow".to_string()), "checked under the path prefix: {paths:?}");
}
