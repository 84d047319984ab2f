//! Incremental snapshots: after any sequence of object changes, a snapshot updated with
//! `Snapshot::apply` equals one built from scratch from the resulting objects — services,
//! workloads, findings, and what the back ends translate from it.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use sluice_translator::dataplane::translate_node;
use sluice_translator::diagnostic::ObjectRef;
use sluice_translator::envoy::translate_sidecar;
use sluice_translator::model::Loaded;
use sluice_translator::parse::parse_documents;
use sluice_translator::snapshot::{Change, Snapshot};

/// Every object slot of a small mesh and its possible forms (None: absent). The forms exercise
/// what services read: slices with and without Pod references, Pods moving and relabelled, a
/// WorkloadEntry under a Service selector and a ServiceEntry workloadSelector, a host defined
/// twice, routing across services and subsets.
fn slots() -> Vec<Vec<Option<&'static str>>> {
    vec![
        vec![
            Some("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}"),
            Some("apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {sluice.io/dataplane: sidecar}}"),
            None,
        ],
        vec![
            Some(
                "apiVersion: v1\nkind: Service\nmetadata: {name: s0, namespace: a}\nspec: {clusterIP: 127.100.0.1, selector: {app: s0}, ports: [{name: http, port: 80, targetPort: 8080}]}",
            ),
            Some(
                "apiVersion: v1\nkind: Service\nmetadata: {name: s0, namespace: a}\nspec: {clusterIP: 127.100.0.1, selector: {app: s0}, ports: [{name: http, port: 80}, {name: tcp, port: 81}]}",
            ),
            None,
        ],
        vec![
            Some(
                "apiVersion: v1\nkind: Service\nmetadata: {name: s1, namespace: a}\nspec: {clusterIP: 127.100.0.2, selector: {app: s1}, ports: [{name: http, port: 80}]}",
            ),
            None,
        ],
        vec![
            Some(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s0-1, namespace: a, labels: {kubernetes.io/service-name: s0}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- {addresses: [127.0.0.10], targetRef: {kind: Pod, name: p0}}\n- {addresses: [127.0.0.11], targetRef: {kind: Pod, name: p1}}",
            ),
            Some(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s0-1, namespace: a, labels: {kubernetes.io/service-name: s0}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- {addresses: [127.0.0.10], targetRef: {kind: Pod, name: p0}}\n- {addresses: [127.0.0.12]}",
            ),
            None,
        ],
        vec![
            Some(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s1-1, namespace: a, labels: {kubernetes.io/service-name: s1}}\naddressType: IPv4\nports: [{name: http, port: 80}]\nendpoints:\n- {addresses: [127.0.0.12]}\n- {addresses: [127.0.0.11], targetRef: {kind: Pod, name: p1}, conditions: {ready: false}}",
            ),
            None,
        ],
        vec![
            Some(
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p0, namespace: a, labels: {app: s0, version: v1}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 127.0.0.10}",
            ),
            Some(
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p0, namespace: a, labels: {app: s0, version: v2}}\nspec: {containers: [{name: c}], serviceAccountName: sa}\nstatus: {podIP: 127.0.0.10}",
            ),
            None,
        ],
        vec![
            Some(
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p1, namespace: a, labels: {app: s1, version: v2}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 127.0.0.11}",
            ),
            Some(
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p1, namespace: a, labels: {app: s1, version: v1}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 127.0.0.12}",
            ),
            None,
        ],
        vec![
            Some(
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p2, namespace: a, labels: {app: s1}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 127.0.0.12}",
            ),
            None,
        ],
        vec![
            Some(
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: we1, namespace: a}\nspec: {address: 127.0.0.12, labels: {app: s0}, weight: 3}",
            ),
            Some(
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: we1, namespace: a}\nspec: {address: 127.0.0.13, labels: {app: s1}}",
            ),
            None,
        ],
        vec![
            Some(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se, namespace: a}\nspec: {hosts: [ext.example.com, s1.a.svc.cluster.local], addresses: [127.100.0.9], ports: [{number: 80, name: http, protocol: HTTP}], resolution: STATIC, location: MESH_INTERNAL, workloadSelector: {labels: {app: s1}}}",
            ),
            Some(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se, namespace: a}\nspec: {hosts: [ext.example.com], ports: [{number: 443, name: tls, protocol: TLS}], resolution: DNS}",
            ),
            None,
        ],
        vec![
            Some(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: a}\nspec: {hosts: [s0], http: [{route: [{destination: {host: s1}, weight: 60}, {destination: {host: s0, subset: v1}, weight: 40}]}]}",
            ),
            Some(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: a}\nspec: {hosts: [s1], tcp: [{route: [{destination: {host: ext.example.com}}]}]}",
            ),
            None,
        ],
        vec![
            Some(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dr, namespace: a}\nspec: {host: s0, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}",
            ),
            None,
        ],
    ]
}

/// The object of one slot's form, and its reference (forms of a slot share it).
fn object(slot: usize, form: usize) -> (ObjectRef, Option<Loaded>) {
    let slots = slots();
    let text = slots[slot].iter().flatten().next().expect("every slot has a present form");
    let (first, _) = parse_documents("slot.yaml", text);
    let reference = first[0].reference.clone();
    let loaded = slots[slot][form].map(|text| {
        let (mut objects, diagnostics) = parse_documents(&format!("slot-{slot}.yaml"), text);
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        objects.remove(0)
    });
    (reference, loaded)
}

const CLIENT: &str = "sidecar~127.0.0.10~p0.a~a.svc.cluster.local";

/// Everything compared between the two snapshots.
fn view(s: &Snapshot) -> impl PartialEq + std::fmt::Debug {
    (
        s.services.clone(),
        s.workloads.clone(),
        s.namespaces.clone(),
        s.virtual_services.keys().cloned().collect::<Vec<_>>(),
        s.destination_rules.keys().cloned().collect::<Vec<_>>(),
        s.diagnostics(),
        translate_node(s, "node-1"),
        translate_sidecar(s, CLIENT, Default::default()).expect("client node id"),
    )
}

fn forms() -> impl Strategy<Value = Vec<usize>> {
    let counts: Vec<usize> = slots().iter().map(Vec::len).collect();
    counts.into_iter().map(|n| 0..n).collect::<Vec<_>>()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn updates_equal_a_fresh_build(
        start in forms(),
        steps in proptest::collection::vec((0usize..12, 0usize..3), 1..12),
    ) {
        let mut current: BTreeMap<usize, usize> = start.into_iter().enumerate().collect();
        let mut snapshot = Snapshot::default();
        snapshot.apply(current.iter().filter_map(|(&slot, &form)| object(slot, form).1).map(|l| Change::Upsert(Arc::new(l))));
        for (slot, form) in steps {
            let form = form % slots()[slot].len();
            current.insert(slot, form);
            let (reference, loaded) = object(slot, form);
            let delta = snapshot.apply([match loaded {
                Some(l) => Change::Upsert(Arc::new(l)),
                None => Change::Remove(reference),
            }]);
            let fresh = Snapshot::build(current.iter().filter_map(|(&slot, &form)| object(slot, form).1).collect()).0;
            prop_assert_eq!(view(&snapshot), view(&fresh));
            // What the delta calls endpoint-only really left everything else of the service alone.
            for (host, change) in &delta.services {
                if change.endpoints_only {
                    let (before, after) = (change.before.as_ref().unwrap(), &snapshot.services[host]);
                    prop_assert_eq!((&before.ports, &before.addresses), (&after.ports, &after.addresses));
                }
            }
        }
    }
}

#[test]
fn a_moved_endpoint_is_an_endpoint_only_change_of_its_service() {
    let mut snapshot = Snapshot::default();
    for slot in [1, 3, 5, 6] {
        snapshot.apply([Change::Upsert(Arc::new(object(slot, 0).1.unwrap()))]);
    }
    // p1 moves to another address: s0's endpoints change (its slice names p1), nothing else.
    let delta = snapshot.apply([Change::Upsert(Arc::new(object(6, 1).1.unwrap()))]);
    assert!(!delta.rebuild);
    assert_eq!(delta.services.keys().collect::<Vec<_>>(), ["s0.a.svc.cluster.local"]);
    assert!(delta.endpoints_only(), "{delta:?}");
    assert_eq!(delta.workloads.iter().collect::<Vec<_>>(), [&("a".to_string(), "p1".to_string())]);
    // The same object again changes nothing.
    assert!(snapshot.apply([Change::Upsert(Arc::new(object(6, 1).1.unwrap()))]).is_empty());
    // A new port is not an endpoint-only change; a VirtualService changes the routing of its
    // hosts; a DestinationRule forces a rebuild.
    let delta = snapshot.apply([Change::Upsert(Arc::new(object(1, 1).1.unwrap()))]);
    assert!(!delta.endpoints_only());
    let delta = snapshot.apply([Change::Upsert(Arc::new(object(10, 0).1.unwrap()))]);
    assert_eq!(delta.routing.iter().collect::<Vec<_>>(), ["s0.a.svc.cluster.local"]);
    assert!(!delta.rebuild && !delta.endpoints_only());
    let delta = snapshot.apply([Change::Upsert(Arc::new(object(10, 1).1.unwrap()))]);
    assert_eq!(delta.routing.len(), 2, "the old and the new hosts: {delta:?}");
    assert!(snapshot.apply([Change::Upsert(Arc::new(object(11, 0).1.unwrap()))]).rebuild);
}
