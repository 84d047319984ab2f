//! An in-memory Kubernetes API server behind kube-rs's mock transport (tower-test): list, watch
//! (replay from a resourceVersion, live events, 410 Gone below the compaction point), API group
//! discovery (groups and each group version's resources; a resource whose CRD is missing is
//! left out and its list or watch is 404 with a Status body, as a real API server answers), Leases (create/replace with resourceVersion checks) and merge-patched status. Faults:
//! down (transport errors), dropped watches, compaction. Every request is recorded.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// The response body: frames from a channel, so a watch can stream.
pub type Body = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

/// A recorded request.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Value,
}

struct Watch {
    resource: String,
    namespace: Option<String>,
    tx: mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// (resource, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    /// (rv, resource, namespace, event type, object).
    events: Vec<(u64, String, String, &'static str, Value)>,
    compacted: u64,
    down: bool,
    watches: Vec<Watch>,
    requests: Vec<Recorded>,
    /// API groups served, with their versions.
    groups: BTreeMap<String, Vec<String>>,
    /// Istio resources (plurals) whose CRD is not installed: discovery leaves them out and a
    /// list or watch of them is 404, as on a real API server.
    missing: std::collections::BTreeSet<String>,
    /// Service-account tokens TokenReview knows.
    tokens: BTreeMap<String, KnownToken>,
}

/// A service-account token as TokenReview knows it.
struct KnownToken {
    username: String,
    audiences: Vec<String>,
    /// The user's extra: the pod and node a bound token names.
    extra: BTreeMap<String, Vec<String>>,
}

/// The fake API server. Clone freely: clones share state.
#[derive(Clone, Default)]
pub struct FakeApiServer {
    state: Arc<Mutex<State>>,
}

fn frame(v: &Value) -> Result<Frame<Bytes>, Infallible> {
    let mut line = serde_json::to_vec(v).unwrap();
    line.push(b'\n');
    Ok(Frame::data(Bytes::from(line)))
}

fn respond(status: StatusCode, body: &Value) -> Response<Body> {
    let (tx, rx) = mpsc::channel(1);
    tx.try_send(frame(body)).unwrap();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(StreamBody::new(ReceiverStream::new(rx)))
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    respond(StatusCode::from_u16(code).unwrap(), &body)
}

/// What a request path names.
struct Target {
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let rest = match *parts.first()? {
        "api" => &parts[2..],
        "apis" => parts.get(3..)?,
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    Some(Target {
        resource: rest.first()?.to_string(),
        namespace,
        name: rest.get(1).map(|s| s.to_string()),
        subresource: rest.get(2).map(|s| s.to_string()),
    })
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .map(|v| v.replace("%3D", "=").replace("%2F", "/"))
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

impl FakeApiServer {
    /// A server that serves the Istio groups at every version Istio does.
    pub fn new() -> Self {
        let fake = Self::default();
        {
            let mut s = fake.state.lock().unwrap();
            s.rv = 100;
            s.groups.insert("networking.istio.io".into(), vec!["v1".into(), "v1beta1".into(), "v1alpha3".into()]);
            s.groups.insert("security.istio.io".into(), vec!["v1".into(), "v1beta1".into()]);
        }
        fake
    }

    /// A kube client talking to this server.
    pub fn client(&self) -> kube::Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<kube::client::Body>, Response<Body>>();
        let fake = self.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let fake = fake.clone();
                tokio::spawn(async move {
                    let (parts, body) = request.into_parts();
                    let bytes = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                    match fake.handle(parts.method, parts.uri, body) {
                        Some(response) => send.send_response(response),
                        None => send
                            .send_error(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "API server down")),
                    }
                });
            }
        });
        kube::Client::new(service, "default")
    }

    /// A token of service account `namespace`/`name` for `audiences`, as TokenReview will know it.
    pub fn add_token(&self, token: &str, namespace: &str, name: &str, audiences: &[&str]) {
        let username = format!("system:serviceaccount:{namespace}:{name}");
        let audiences = audiences.iter().map(|a| a.to_string()).collect();
        let known = KnownToken { username, audiences, extra: BTreeMap::new() };
        self.state.lock().unwrap().tokens.insert(token.into(), known);
    }

    /// Binds `token` to pod `pod` on `node`, as a projected token is (Kubernetes 1.30+ says
    /// the node).
    pub fn bind_token(&self, token: &str, pod: &str, node: Option<&str>) {
        let mut s = self.state.lock().unwrap();
        let extra = &mut s.tokens.get_mut(token).expect("a known token").extra;
        extra.insert("authentication.kubernetes.io/pod-name".into(), vec![pod.into()]);
        if let Some(node) = node {
            extra.insert("authentication.kubernetes.io/node-name".into(), vec![node.into()]);
        }
    }

    /// A TokenReview's answer, as the API server gives it (created, never stored): the token's
    /// user when it is known and for one of the audiences asked for (when any are).
    fn review(&self, s: &State, mut review: Value) -> Response<Body> {
        let token = review["spec"]["token"].as_str().unwrap_or_default();
        let asked: Vec<String> = serde_json::from_value(review["spec"]["audiences"].clone()).unwrap_or_default();
        review["status"] = match s.tokens.get(token) {
            None => {
                json!({"authenticated": false, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"})
            }
            Some(KnownToken { username, audiences, extra }) => {
                let both: Vec<&String> = if asked.is_empty() {
                    audiences.iter().collect()
                } else {
                    asked.iter().filter(|a| audiences.contains(a)).collect()
                };
                if both.is_empty() {
                    json!({"authenticated": false,
                           "error": format!("[invalid bearer token, token audiences {audiences:?} is invalid for the target audiences {asked:?}]")})
                } else {
                    let namespace = username.split(':').nth(2).unwrap_or_default();
                    json!({"authenticated": true, "audiences": both,
                           "user": {"username": username, "uid": "6d1a7f0e-uid", "extra": extra,
                                    "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{namespace}"), "system:authenticated"]}})
                }
            }
        };
        respond(StatusCode::CREATED, &review)
    }

    /// Stops serving an API group (its CRDs are not installed).
    pub fn remove_group(&self, group: &str) {
        let mut s = self.state.lock().unwrap();
        s.groups.remove(group);
        for kind in sluice_translator::model::Kind::ALL.into_iter().filter(|k| k.group() == group) {
            s.missing.insert(kind.plural());
        }
    }

    /// Stops serving one resource of an Istio group (its CRD is not installed; the group stays).
    pub fn remove_resource(&self, plural: &str) {
        self.state.lock().unwrap().missing.insert(plural.into());
    }

    /// Makes every request fail at the transport (or work again).
    pub fn set_down(&self, down: bool) {
        let mut s = self.state.lock().unwrap();
        s.down = down;
        if down {
            s.watches.clear();
        }
    }

    /// Ends every open watch (as an API server restart or a load balancer timeout would).
    pub fn drop_watches(&self) {
        self.state.lock().unwrap().watches.clear();
    }

    /// Forgets the event history: a watch resuming from before now gets 410 Gone.
    pub fn compact(&self) {
        let mut s = self.state.lock().unwrap();
        s.compacted = s.rv + 1;
        s.events.clear();
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The stored object.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(&(resource.into(), namespace.into(), name.into())).cloned()
    }

    /// Creates or replaces an object of `resource` (its plural), notifying live watches.
    pub fn put(&self, resource: &str, mut object: Value) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        object["metadata"]["resourceVersion"] = rv.to_string().into();
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let key = (resource.to_string(), namespace.clone(), name);
        let kind = if s.objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
        s.objects.insert(key, object.clone());
        s.event(rv, resource, &namespace, kind, object);
    }

    /// Deletes an object, notifying live watches.
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) {
        let mut s = self.state.lock().unwrap();
        let Some(mut object) = s.objects.remove(&(resource.into(), namespace.into(), name.into())) else { return };
        s.rv += 1;
        let rv = s.rv;
        object["metadata"]["resourceVersion"] = rv.to_string().into();
        s.event(rv, resource, namespace, "DELETED", object);
    }

    /// Loads a recorded `kubectl get -o json` List, each item into its collection.
    pub fn load_list(&self, list: &Value) {
        for item in list["items"].as_array().unwrap() {
            let name = item["kind"].as_str().unwrap();
            let kind = sluice_translator::model::Kind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .expect("a kind sluice reads");
            self.put(&kind.plural(), item.clone());
        }
    }

    fn handle(&self, method: Method, uri: http::Uri, body: Value) -> Option<Response<Body>> {
        let mut s = self.state.lock().unwrap();
        let path = uri.path().to_string();
        let query = uri.query().unwrap_or_default().to_string();
        s.requests.push(Recorded {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            body: body.clone(),
        });
        if s.down {
            return None;
        }
        if let Some(group) = path.strip_prefix("/apis/").filter(|g| !g.contains('/')) {
            return Some(match s.groups.get(group) {
                Some(versions) => respond(
                    StatusCode::OK,
                    &json!({"kind": "APIGroup", "apiVersion": "v1", "name": group,
                        "versions": versions.iter().map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v})).collect::<Vec<_>>(),
                        "preferredVersion": {"groupVersion": format!("{group}/{}", versions[0]), "version": versions[0]}}),
                ),
                None => status(404, "NotFound", "the server could not find the requested resource"),
            });
        }
        // `/apis/<group>/<version>`: the group version's resources (kubectl's and kube-rs's
        // discovery), without those whose CRD is missing.
        if let Some((group, version)) =
            path.strip_prefix("/apis/").and_then(|gv| gv.split_once('/')).filter(|(_, v)| !v.contains('/'))
        {
            if !s.groups.get(group).is_some_and(|vs| vs.iter().any(|v| v == version)) {
                return Some(status(404, "NotFound", "the server could not find the requested resource"));
            }
            let resources: Vec<Value> = sluice_translator::model::Kind::ALL
                .into_iter()
                .filter(|k| k.group() == group && k.versions().contains(&version) && !s.missing.contains(&k.plural()))
                .map(|k| {
                    json!({"name": k.plural(), "singularName": k.name().to_ascii_lowercase(), "namespaced": true,
                    "kind": k.name(), "verbs": ["delete", "get", "list", "patch", "create", "update", "watch"]})
                })
                .collect();
            return Some(respond(
                StatusCode::OK,
                &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{group}/{version}"),
                    "resources": resources}),
            ));
        }
        let Some(Target { resource, namespace, name, subresource: sub }) = parse_path(&path) else {
            return Some(status(404, "NotFound", &format!("no route for {path}")));
        };
        if s.missing.contains(&resource) {
            // What a real API server answers for a resource whose CRD is not installed.
            return Some(status(404, "NotFound", "the server could not find the requested resource"));
        }
        if resource == "tokenreviews" && method == Method::POST {
            return Some(self.review(&s, body));
        }
        let ns = namespace.clone().unwrap_or_default();
        Some(match (method, name) {
            (Method::GET, None) if query_param(&query, "watch").as_deref() == Some("true") => {
                let from: u64 = query_param(&query, "resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
                let (tx, rx) = mpsc::channel(1024);
                if from < s.compacted {
                    let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}});
                    tx.try_send(frame(&gone)).unwrap();
                } else {
                    for (rv, r, n, kind, object) in &s.events {
                        if *rv > from && *r == resource && namespace.as_ref().is_none_or(|ns| ns == n) {
                            tx.try_send(frame(&json!({"type": kind, "object": object}))).unwrap();
                        }
                    }
                    s.watches.push(Watch { resource, namespace, tx });
                }
                Response::builder().status(200).body(StreamBody::new(ReceiverStream::new(rx))).unwrap()
            }
            (Method::GET, None) => {
                let by_name = query_param(&query, "fieldSelector")
                    .and_then(|f| f.strip_prefix("metadata.name=").map(String::from));
                let items: Vec<Value> = s
                    .objects
                    .iter()
                    .filter(|((r, n, name), _)| {
                        *r == resource
                            && namespace.as_ref().is_none_or(|ns| ns == n)
                            && by_name.as_ref().is_none_or(|b| b == name)
                    })
                    .map(|(_, o)| {
                        // As the API server writes list items: no apiVersion or kind.
                        let mut o = o.clone();
                        o.as_object_mut().unwrap().retain(|k, _| k != "apiVersion" && k != "kind");
                        o
                    })
                    .collect();
                respond(
                    StatusCode::OK,
                    &json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
                )
            }
            (Method::GET, Some(name)) => match s.objects.get(&(resource, ns, name)) {
                Some(o) => respond(StatusCode::OK, o),
                None => status(404, "NotFound", "not found"),
            },
            (Method::POST, None) => {
                let name = body["metadata"]["name"].as_str().unwrap_or_default().to_string();
                // A real API server refuses to create in a namespace that does not exist.
                let exists = ["default", "kube-system", "kube-public"].contains(&ns.as_str())
                    || s.objects.contains_key(&("namespaces".to_string(), String::new(), ns.clone()));
                if namespace.is_some() && !exists {
                    return Some(status(404, "NotFound", &format!("namespaces \"{ns}\" not found")));
                }
                if s.objects.contains_key(&(resource.clone(), ns.clone(), name)) {
                    return Some(status(409, "AlreadyExists", "already exists"));
                }
                let mut o = body;
                o["metadata"]["namespace"] = ns.into();
                drop(s);
                self.put(&resource, o.clone());
                respond(
                    StatusCode::CREATED,
                    &self
                        .get(
                            &resource,
                            o["metadata"]["namespace"].as_str().unwrap(),
                            o["metadata"]["name"].as_str().unwrap(),
                        )
                        .unwrap(),
                )
            }
            (Method::PUT, Some(name)) => {
                let Some(current) = s.objects.get(&(resource.clone(), ns.clone(), name.clone())) else {
                    return Some(status(404, "NotFound", "not found"));
                };
                if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                    return Some(status(409, "Conflict", "the object has been modified"));
                }
                drop(s);
                self.put(&resource, body);
                respond(StatusCode::OK, &self.get(&resource, &ns, &name).unwrap())
            }
            (Method::PATCH, Some(name)) if sub.as_deref() == Some("status") => {
                let Some(mut o) = s.objects.get(&(resource.clone(), ns.clone(), name.clone())).cloned() else {
                    return Some(status(404, "NotFound", "not found"));
                };
                merge(&mut o, &json!({"status": body["status"]}));
                drop(s);
                self.put(&resource, o);
                respond(StatusCode::OK, &self.get(&resource, &ns, &name).unwrap())
            }
            (m, _) => status(405, "MethodNotAllowed", &format!("{m} {path}")),
        })
    }
}

impl State {
    fn event(&mut self, rv: u64, resource: &str, namespace: &str, kind: &'static str, object: Value) {
        let line = json!({"type": kind, "object": object});
        self.watches.retain(|w| {
            if w.resource != resource || w.namespace.as_ref().is_some_and(|ns| ns != namespace) {
                return true;
            }
            w.tx.try_send(frame(&line)).is_ok()
        });
        self.events.push((rv, resource.into(), namespace.into(), kind, object));
    }
}
