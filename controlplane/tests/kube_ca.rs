//! The CA in Kubernetes, against the in-memory API server. Its self-signed root (Secret
//! `istio-ca-secret`): the first start makes it, later starts sign under it, a broken one is
//! refused naming the Secret and the key, a start waits for an API server it cannot reach yet,
//! and `serve --kube` presents a serving certificate that chains to it. The trust bundle
//! (ConfigMap `istio-ca-root-cert`): written by the leader in every namespace but the ignored
//! and terminating ones, and written again when edited, deleted or a namespace comes.

// Shared by the tests that talk to an API server; each uses a part of it.
#[allow(dead_code)]
mod fake_apiserver;

use std::time::Duration;

use fake_apiserver::FakeApiServer;
use http::Method;
use k8s_openapi::ByteString;
use serde_json::json;
use sluice_controlplane::ca_secret::{CA_SECRET, open};
use sluice_controlplane::root_cert::{ROOT_CERT_CONFIG_MAP, ROOT_CERT_KEY};
use sluice_controlplane::serve::{KubeServe, ServeOptions, XdsTls, serve};
use sluice_identity::CertificateAuthority;
use sluice_testkit::{eventually, free_port};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

const NAMESPACE: &str = "default";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// The Secret's `key`, decoded.
fn secret_data(fake: &FakeApiServer, key: &str) -> String {
    let secret = fake.get("secrets", NAMESPACE, CA_SECRET).expect("the Secret exists");
    let encoded = secret["data"][key].clone();
    let bytes: ByteString = serde_json::from_value(encoded).unwrap_or_else(|e| panic!("data.{key}: {e} in {secret:#}"));
    String::from_utf8(bytes.0).unwrap()
}

#[test]
fn the_first_start_makes_the_secret_and_later_starts_sign_under_it() {
    let fake = FakeApiServer::new();
    let rt = runtime();
    let client = rt.block_on(async { fake.client() });
    let first = rt.block_on(open(client.clone(), NAMESPACE, "cluster.local")).unwrap();
    let secret = fake.get("secrets", NAMESPACE, CA_SECRET).expect("the first start made the Secret");
    assert_eq!(secret["type"], "istio.io/ca-root");
    assert_eq!(secret_data(&fake, "ca-cert.pem"), first.root_pem());
    assert!(secret_data(&fake, "ca-key.pem").contains("PRIVATE KEY"));
    let again = rt.block_on(open(client, NAMESPACE, "cluster.local")).unwrap();
    assert_eq!(again.root_pem(), first.root_pem(), "a later start (or another replica) keeps the root");
    let creates = fake.requests().iter().filter(|r| r.method == Method::POST && r.path.ends_with("/secrets")).count();
    assert_eq!(creates, 1, "the second start only read the Secret");
}

#[test]
fn a_start_waits_for_an_api_server_it_cannot_reach_yet() {
    let fake = FakeApiServer::new();
    fake.set_down(true);
    let rt = runtime();
    let client = rt.block_on(async { fake.client() });
    let opening = rt.spawn(open(client, NAMESPACE, "cluster.local"));
    std::thread::sleep(Duration::from_millis(800));
    assert!(!opening.is_finished(), "still asking");
    fake.set_down(false);
    let ca = rt.block_on(opening).unwrap().expect("opened once the API server answers");
    assert_eq!(secret_data(&fake, "ca-cert.pem"), ca.root_pem());
}

#[test]
fn a_secret_made_elsewhere_is_loaded_and_a_broken_one_is_refused_naming_the_secret_and_the_key() {
    let fake = FakeApiServer::new();
    let rt = runtime();
    let client = rt.block_on(async { fake.client() });
    let b64 = |s: &str| serde_json::to_value(ByteString(s.as_bytes().to_vec())).unwrap();
    let secret = |data: serde_json::Value| {
        json!({"apiVersion": "v1", "kind": "Secret", "type": "istio.io/ca-root",
               "metadata": {"name": CA_SECRET, "namespace": NAMESPACE}, "data": data})
    };
    let (cert, key) = CertificateAuthority::new_root_pem("cluster.local").unwrap();
    fake.put("secrets", secret(json!({"ca-cert.pem": b64(&cert), "ca-key.pem": b64(&key)})));
    let ca = rt.block_on(open(client.clone(), NAMESPACE, "cluster.local")).unwrap();
    assert_eq!(ca.root_pem(), cert);

    fake.put("secrets", secret(json!({"ca-cert.pem": b64(&cert)})));
    let err = rt.block_on(open(client.clone(), NAMESPACE, "cluster.local")).err().unwrap().to_string();
    assert_eq!(err, "Secret default/istio-ca-secret: data.ca-key.pem is missing or empty");

    let (_, other_key) = CertificateAuthority::new_root_pem("cluster.local").unwrap();
    fake.put("secrets", secret(json!({"ca-cert.pem": b64(&cert), "ca-key.pem": b64(&other_key)})));
    let err = rt.block_on(open(client, NAMESPACE, "cluster.local")).err().unwrap().to_string();
    assert!(err.starts_with("Secret default/istio-ca-secret, ca-cert.pem: does not belong to the key"), "{err}");
    let creates = fake.requests().iter().filter(|r| r.method == Method::POST).count();
    assert_eq!(creates, 0, "a broken Secret is never replaced by a new root");
}

/// Whether a TLS connection to `addr` that trusts only `root` succeeds.
async fn trusted(addr: &str, root: &str) -> Result<(), String> {
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root)).domain_name("localhost");
    let endpoint =
        Endpoint::from_shared(format!("https://{addr}")).unwrap().tls_config(tls).map_err(|e| e.to_string())?;
    endpoint.connect().await.map(|_| ()).map_err(|e| format!("{e:?}"))
}

#[test]
fn serve_in_kubernetes_signs_its_serving_certificate_under_the_secret() {
    let fake = FakeApiServer::new();
    let rt = runtime();
    let client = rt.block_on(async { fake.client() });
    let tls_addr = format!("127.0.0.1:{}", free_port());
    let options = ServeOptions {
        config: Vec::new(),
        kube: Some(KubeServe { client, watch: Default::default(), lease: None, own_namespace: NAMESPACE.into() }),
        xds_addr: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        xds_tls: Some(XdsTls { addr: tls_addr.parse().unwrap(), identity: None, client_ca: None }),
        ca: Default::default(),
        mesh: Default::default(),
        monitoring_addr: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        state_dir: None,
        debounce: Duration::from_millis(20),
        max_debounce: Duration::from_secs(1),
        delta_chunk_bytes: sluice_xds::server::DELTA_CHUNK_BYTES,
        identifier: "sluice-test".into(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(serve(options, async move {
        let _ = stopped.await;
    }));
    let opened = eventually(Duration::from_secs(20), || std::net::TcpStream::connect(&tls_addr).ok().map(|_| ()));
    assert!(opened.is_some(), "the TLS port never opened");
    let root = secret_data(&fake, "ca-cert.pem");
    rt.block_on(async {
        trusted(&tls_addr, &root).await.expect("the serving certificate chains to the Secret's root");
        let (stranger, _) = CertificateAuthority::new_root_pem("cluster.local").unwrap();
        assert!(trusted(&tls_addr, &stranger).await.is_err(), "another root does not verify it");
    });
    let _ = stop.send(());
    rt.block_on(server).unwrap().unwrap();
}

fn namespace(name: &str, phase: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}, "status": {"phase": phase}})
}

/// The root in `namespace`'s ConfigMap, if there is one (and its label, which must be there).
fn published(fake: &FakeApiServer, namespace: &str) -> Option<String> {
    let cm = fake.get("configmaps", namespace, ROOT_CERT_CONFIG_MAP)?;
    assert_eq!(cm["metadata"]["labels"]["istio.io/config"], "true", "{cm:#}");
    cm["data"][ROOT_CERT_KEY].as_str().map(String::from)
}

#[test]
fn the_leader_publishes_the_root_in_every_namespace_and_keeps_it_there() {
    let fake = FakeApiServer::new();
    for (name, phase) in
        [("default", "Active"), ("bookinfo", "Active"), ("kube-public", "Active"), ("dying", "Terminating")]
    {
        fake.put("namespaces", namespace(name, phase));
    }
    let rt = runtime();
    let client = rt.block_on(async { fake.client() });
    let (leader_tx, leader_rx) = tokio::sync::watch::channel(false);
    let root = "-----BEGIN CERTIFICATE-----\nROOT\n-----END CERTIFICATE-----\n";
    let task = rt.spawn(sluice_controlplane::root_cert::run(client, root.into(), None, Some(leader_rx)));
    let until = |what: &str, f: &dyn Fn() -> bool| {
        assert!(eventually(Duration::from_secs(10), || f().then_some(())).is_some(), "{what}");
    };
    // Both watches listed: a replica that does not lead writes nothing.
    until("the namespaces and ConfigMaps are listed", &|| {
        let lists = fake.requests().iter().filter(|r| r.method == Method::GET && !r.query.contains("watch")).count();
        lists >= 2
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!fake.requests().iter().any(|r| r.method != Method::GET), "a follower writes nothing");

    leader_tx.send_replace(true);
    until("the leader publishes the root", &|| published(&fake, "default").is_some_and(|r| r == root));
    until("in bookinfo too", &|| published(&fake, "bookinfo").is_some_and(|r| r == root));
    assert!(published(&fake, "kube-public").is_none(), "an ignored namespace is left alone");
    assert!(published(&fake, "dying").is_none(), "a terminating namespace is left alone");

    // Edited: written again, with what else it held kept.
    let mut edited = fake.get("configmaps", "default", ROOT_CERT_CONFIG_MAP).unwrap();
    edited["data"][ROOT_CERT_KEY] = "tampered".into();
    edited["data"]["extra"] = "kept".into();
    fake.put("configmaps", edited);
    until("an edited ConfigMap gets the root back", &|| published(&fake, "default").is_some_and(|r| r == root));
    assert_eq!(fake.get("configmaps", "default", ROOT_CERT_CONFIG_MAP).unwrap()["data"]["extra"], "kept");
    // Deleted: made again. A new namespace: gets one.
    fake.delete("configmaps", "bookinfo", ROOT_CERT_CONFIG_MAP);
    until("a deleted ConfigMap is made again", &|| published(&fake, "bookinfo").is_some_and(|r| r == root));
    fake.put("namespaces", namespace("late", "Active"));
    until("a new namespace gets the root", &|| published(&fake, "late").is_some_and(|r| r == root));
    task.abort();
}
