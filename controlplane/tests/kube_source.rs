//! The Kubernetes source against an in-memory API server behind kube-rs's mock transport:
//! first list, live events, a dropped watch, a 410 Gone relist, the API server down at start
//! (the state directory is served), Istio's CRDs absent (whole groups, or one CRD of a served
//! group), status written only by the Lease holder, and from outside a cluster.

// Shared by the tests that talk to an API server; each uses a part of it.
#[allow(dead_code)]
mod fake_apiserver;

use std::path::Path;
use std::time::Duration;

use fake_apiserver::FakeApiServer;
use serde_json::{Value, json};
use sluice_controlplane::lease::{LeaseConfig, try_hold};
use sluice_controlplane::serve::{KubeServe, ServeOptions, serve};
use sluice_testkit::{eventually, free_port, http_get};

const TIMEOUT: Duration = Duration::from_secs(20);

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kube/cluster.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `sluice serve` on a Kubernetes source, stopped on drop.
struct Running {
    /// Keeps the server's tasks alive.
    _runtime: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    monitoring: String,
}

impl Running {
    fn start(fake: &FakeApiServer, state_dir: Option<&Path>, lease: Option<LeaseConfig>) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let client = runtime.block_on(async { fake.client() });
        let monitoring = format!("127.0.0.1:{}", free_port());
        let options = ServeOptions {
            config: Vec::new(),
            kube: Some(KubeServe { client, watch: Default::default(), lease, own_namespace: "sluice-system".into() }),
            xds_addr: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            xds_tls: None,
            ca: Default::default(),
            mesh: Default::default(),
            monitoring_addr: monitoring.parse().unwrap(),
            state_dir: state_dir.map(Path::to_path_buf),
            debounce: Duration::from_millis(20),
            max_debounce: Duration::from_secs(1),
            delta_chunk_bytes: sluice_xds::server::DELTA_CHUNK_BYTES,
            identifier: sluice_xds::server::DEFAULT_IDENTIFIER.into(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        runtime.spawn(async move {
            if let Err(e) = serve(options, async move {
                let _ = stopped.await;
            })
            .await
            {
                panic!("serve failed: {e:#}");
            }
        });
        Self { _runtime: runtime, stop: Some(stop), monitoring }
    }

    fn configz(&self) -> Option<Value> {
        let (code, body) = http_get(&self.monitoring, "localhost", "/debug/configz", &[]).ok()?;
        (code == 200).then(|| serde_json::from_str(&body).unwrap())
    }

    fn ready(&self) -> bool {
        http_get(&self.monitoring, "localhost", "/ready", &[]).is_ok_and(|(code, _)| code == 200)
    }

    /// Waits until `/debug/configz` satisfies `f`; panics with the last one otherwise.
    fn wait_config(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        eventually(TIMEOUT, || {
            let c = self.configz()?;
            let ok = f(&c);
            last = c.clone();
            ok.then_some(c)
        })
        .unwrap_or_else(|| panic!("{what}: last /debug/configz was {last:#}"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn has(config: &Value, kind: &str, name: &str) -> bool {
    config["objects"].as_array().unwrap().iter().any(|o| o["kind"] == kind && o["name"] == name)
}

fn count(fake: &FakeApiServer, f: impl Fn(&fake_apiserver::Recorded) -> bool) -> usize {
    fake.requests().iter().filter(|r| f(r)).count()
}

#[test]
fn lists_follows_events_survives_dropped_watches_and_410_and_the_leader_writes_status() {
    let fake = FakeApiServer::new();
    fake.load_list(&fixture());
    // As `helm install -n sluice-system --create-namespace` leaves it.
    fake.put("namespaces", json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "sluice-system"}}));
    let running = Running::start(&fake, None, Some(LeaseConfig::new("sluice-system", "sluice-0")));

    // First list: every kind, the invalid VirtualService reported and left out.
    let c = running.wait_config("first list", |c| has(c, "VirtualService", "reviews"));
    for (kind, name) in [
        ("Namespace", "default"),
        ("Service", "reviews"),
        ("EndpointSlice", "reviews-x7k2p"),
        ("Pod", "reviews-v1-6c9f8d7b5-abcde"),
        ("DestinationRule", "reviews"),
        ("AuthorizationPolicy", "reviews-viewer"),
    ] {
        assert!(has(&c, kind, name), "{kind} {name} missing from {c:#}");
    }
    assert!(!has(&c, "VirtualService", "reviews-split"), "the invalid object is kept out");
    let rejected = c["rejected"].to_string();
    assert!(
        rejected.contains("VirtualService default/reviews-split") || rejected.contains("reviews-split"),
        "{rejected}"
    );
    assert!(rejected.contains("spec.http[0].route"), "{rejected}");
    assert!(running.ready());

    // The leader writes the rejection into the object's status, naming field and reason.
    let status = eventually(TIMEOUT, || {
        let o = fake.get("virtualservices", "default", "reviews-split")?;
        o.get("status").cloned()
    })
    .expect("status written on the rejected VirtualService");
    let condition = &status["conditions"][0];
    assert_eq!(condition["type"], "Accepted");
    assert_eq!(condition["status"], "False");
    assert_eq!(
        condition["message"],
        "Error [IST0106] spec.http[0].route: weights of 2 destinations sum to 70; they must sum to 100"
    );
    assert_eq!(status["validationMessages"][0]["type"]["code"], "IST0106");
    assert_eq!(status["observedGeneration"], 3);
    let patched = fake
        .requests()
        .into_iter()
        .find(|r| r.method == http::Method::PATCH && r.path.contains("/reviews-split/"))
        .expect("a PATCH of the rejected object");
    assert_eq!(patched.path, "/apis/networking.istio.io/v1/namespaces/default/virtualservices/reviews-split/status");
    assert_eq!(patched.body["status"]["conditions"][0]["reason"], "Invalid", "a merge patch of status");
    let accepted = eventually(TIMEOUT, || fake.get("virtualservices", "default", "reviews")?.get("status").cloned())
        .expect("status on the accepted VirtualService");
    assert_eq!(accepted["conditions"][0]["status"], "True");
    let lease = fake.get("leases", "sluice-system", "sluice-leader").expect("the Lease was created");
    assert_eq!(lease["spec"]["holderIdentity"], "sluice-0");
    // Status writes do not change config: no new version for them.
    let version = running.configz().unwrap()["version"].clone();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(running.configz().unwrap()["version"], version, "a status write is not a config change");

    // Live events: a deletion.
    fake.delete("virtualservices", "default", "reviews");
    running.wait_config("live delete", |c| !has(c, "VirtualService", "reviews"));

    // A dropped watch resumes from its resourceVersion: a change made meanwhile arrives.
    let watches =
        |fake: &FakeApiServer| count(fake, |r| r.path.ends_with("/virtualservices") && r.query.contains("watch=true"));
    let before = watches(&fake);
    fake.drop_watches();
    fake.put(
        "virtualservices",
        json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "ratings", "namespace": "default", "generation": 1},
        "spec": {"hosts": ["ratings"], "http": [{"route": [{"destination": {"host": "ratings"}}]}]}}),
    );
    running.wait_config("after a dropped watch", |c| has(c, "VirtualService", "ratings"));
    assert!(watches(&fake) > before, "the watch was re-established");

    // 410 Gone: events missed while the API server was away are compacted; the watcher relists,
    // and the relist removes what was deleted meanwhile.
    let lists = |fake: &FakeApiServer| {
        count(fake, |r| r.path.ends_with("/destinationrules") && !r.query.contains("watch=true"))
    };
    let lists_before = lists(&fake);
    fake.set_down(true);
    fake.delete("destinationrules", "default", "reviews");
    fake.put(
        "destinationrules",
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "ratings", "namespace": "default"}, "spec": {"host": "ratings"}}),
    );
    fake.compact();
    std::thread::sleep(Duration::from_millis(500));
    fake.set_down(false);
    running.wait_config("after 410 Gone", |c| {
        !has(c, "DestinationRule", "reviews") && has(c, "DestinationRule", "ratings")
    });
    assert!(lists(&fake) > lists_before, "the watcher relisted after 410");
    drop(running);
}

#[test]
fn serves_the_state_directory_while_the_api_server_is_down_and_converges_when_it_returns() {
    use sluice_controlplane::store::Source;
    let state = tempfile::tempdir().unwrap();
    {
        // A previous run accepted the fixture.
        let mut store = sluice_controlplane::store::ConfigStore::open(Some(state.path())).unwrap();
        let (loaded, diagnostics) = sluice_translator::parse::parse_documents("kubernetes", &fixture().to_string());
        let objects = loaded.into_iter().map(std::sync::Arc::new).collect();
        let read = (Source::Kube, ("kubernetes".to_string(), Some((objects, diagnostics))));
        assert!(store.apply(vec![read], &[Source::Kube]).unwrap().is_some());
    }
    let fake = FakeApiServer::new();
    fake.load_list(&fixture());
    fake.delete("virtualservices", "default", "reviews");
    fake.set_down(true);
    let running = Running::start(&fake, Some(state.path()), None);

    let c = running.wait_config("state served", |c| has(c, "VirtualService", "reviews"));
    assert!(running.ready(), "ready from the state directory");
    let version = c["version"].as_u64().unwrap();
    // Attempts fail; nothing is lost while they do.
    eventually(TIMEOUT, || (fake.requests().len() >= 3).then_some(())).expect("sluice keeps retrying");
    let c = running.configz().unwrap();
    assert!(has(&c, "VirtualService", "reviews") && has(&c, "Service", "reviews"), "{c:#}");
    assert_eq!(c["version"].as_u64(), Some(version));

    fake.set_down(false);
    let c = running.wait_config("converged", |c| !has(c, "VirtualService", "reviews"));
    assert!(has(&c, "Service", "reviews"));
    assert!(c["version"].as_u64().unwrap() > version);
    drop(running);
}

#[test]
fn without_istios_crds_the_kubernetes_kinds_are_still_served() {
    let fake = FakeApiServer::new();
    fake.remove_group("networking.istio.io");
    fake.remove_group("security.istio.io");
    fake.load_list(&fixture());
    let running = Running::start(&fake, None, None);
    let c = running.wait_config("core kinds", |c| has(c, "Service", "reviews"));
    assert!(!has(&c, "VirtualService", "reviews"), "not served by this API server");
    assert!(has(&c, "Pod", "reviews-v1-6c9f8d7b5-abcde"));
    drop(running);
}

/// A real API server serves security.istio.io for AuthorizationPolicy while PeerAuthentication's
/// CRD is missing: its list is 404. The kinds that exist are served, the missing one is empty.
#[test]
fn a_missing_crd_in_a_served_group_leaves_the_other_kinds_served() {
    let fake = FakeApiServer::new();
    fake.remove_resource("peerauthentications");
    fake.load_list(&fixture());
    let running = Running::start(&fake, None, None);
    let c = running.wait_config("the kinds that exist", |c| has(c, "VirtualService", "reviews"));
    assert!(has(&c, "Service", "reviews") && has(&c, "Pod", "reviews-v1-6c9f8d7b5-abcde"), "{c:#}");
    assert!(running.ready());
    assert_eq!(
        count(&fake, |r| r.path.ends_with("/peerauthentications")),
        0,
        "discovery says the resource is not served: it is never listed"
    );
    // The fake answers as a real one: 404 with a Status body.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let err = runtime.block_on(async {
        let api: kube::Api<kube::api::DynamicObject> = kube::Api::all_with(
            fake.client(),
            &sluice_controlplane::kube_source::api_resource(sluice_translator::model::Kind::PeerAuthentication, "v1"),
        );
        api.list(&Default::default()).await.unwrap_err()
    });
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"), "{err:?}");
    drop(running);
}

/// `sluice serve --kubeconfig` on a laptop: no POD_NAMESPACE and no sluice-system namespace.
/// The Lease goes to the kubeconfig's namespace, so status is written.
#[test]
fn outside_a_cluster_the_lease_is_taken_where_it_can_be_and_status_is_written() {
    let fake = FakeApiServer::new();
    fake.load_list(&fixture());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let namespace = runtime.block_on(async { sluice_controlplane::lease::lease_namespace(None, &fake.client()) });
    if std::env::var_os("POD_NAMESPACE").is_none() {
        assert_eq!(namespace, "default", "the client's default namespace");
    }
    // Where the Lease used to go by default, a real API server refuses it.
    let refused = runtime.block_on(async {
        let api = kube::Api::namespaced(fake.client(), "sluice-system");
        try_hold(&api, &LeaseConfig::new("sluice-system", "x"), k8s_openapi::jiff::Timestamp::now()).await
    });
    assert!(matches!(&refused, Err(kube::Error::Api(s)) if s.code == 404), "{refused:?}");
    let running = Running::start(&fake, None, Some(LeaseConfig::new(&namespace, "laptop")));
    eventually(TIMEOUT, || {
        (count(&fake, |r| r.method == http::Method::PATCH && r.path.contains("/reviews-split/status")) > 0)
            .then_some(())
    })
    .expect("status written on the rejected VirtualService");
    assert_eq!(fake.get("leases", &namespace, "sluice-leader").unwrap()["spec"]["holderIdentity"], "laptop");
    drop(running);
}

#[test]
fn a_follower_writes_no_status() {
    let fake = FakeApiServer::new();
    fake.load_list(&fixture());
    fake.put("namespaces", json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "sluice-system"}}));
    let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S.000000Z").to_string();
    fake.put(
        "leases",
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "sluice-leader", "namespace": "sluice-system"},
        "spec": {"holderIdentity": "sluice-other", "leaseDurationSeconds": 3600, "renewTime": now}}),
    );
    let running = Running::start(&fake, None, Some(LeaseConfig::new("sluice-system", "sluice-1")));
    running.wait_config("first list", |c| c["rejected"].to_string().contains("reviews-split"));
    eventually(TIMEOUT, || {
        (count(&fake, |r| r.path.ends_with("/leases/sluice-leader") && r.method == http::Method::GET) > 0).then_some(())
    })
    .expect("the follower looked at the Lease");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(count(&fake, |r| r.method == http::Method::PATCH), 0, "only the leader writes status");
    assert_eq!(fake.get("leases", "sluice-system", "sluice-leader").unwrap()["spec"]["holderIdentity"], "sluice-other");
    drop(running);
}

#[test]
fn the_lease_is_taken_when_free_or_expired_and_not_while_held() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let fake = FakeApiServer::new();
        fake.put("namespaces", json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns"}}));
        let api: kube::Api<k8s_openapi::api::coordination::v1::Lease> = kube::Api::namespaced(fake.client(), "ns");
        let a = LeaseConfig::new("ns", "a");
        let b = LeaseConfig::new("ns", "b");
        let t0 = k8s_openapi::jiff::Timestamp::now();
        assert!(try_hold(&api, &a, t0).await.unwrap(), "created");
        assert!(try_hold(&api, &a, t0 + k8s_openapi::jiff::SignedDuration::from_secs(5)).await.unwrap(), "renewed");
        assert!(!try_hold(&api, &b, t0 + k8s_openapi::jiff::SignedDuration::from_secs(10)).await.unwrap(), "held by a");
        assert!(try_hold(&api, &b, t0 + k8s_openapi::jiff::SignedDuration::from_secs(30)).await.unwrap(), "expired");
        let lease = fake.get("leases", "ns", "sluice-leader").unwrap();
        assert_eq!(lease["spec"]["holderIdentity"], "b");
        assert_eq!(lease["spec"]["leaseTransitions"], 1);
    });
}
