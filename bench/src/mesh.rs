//! Synthetic meshes: `S` services in namespace `bench`, each with `E` endpoints (Pods labelled
//! v1/v2 alternately), a DestinationRule with subsets v1 and v2 and a VirtualService splitting
//! 80/20 between them. VIPs in 127.100.0.0/16, pod IPs from 127.1.0.0 upwards.

use std::fmt::Write;
use std::net::Ipv4Addr;

/// The VIP of service `i`.
pub fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 100, (i / 256) as u8, (i % 256) as u8)
}

/// The IP of endpoint `e` (counted over the whole mesh).
pub fn pod_ip(e: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 1 + (e / 65_536) as u8, ((e / 256) % 256) as u8, (e % 256) as u8)
}

/// The YAML of one service `i` with its endpoints `i*E..(i+1)*E`; `v1_weight` is the
/// VirtualService's share for subset v1.
pub fn service_yaml(i: usize, per_service: usize, v1_weight: u32) -> String {
    service_yaml_at(i, per_service, v1_weight, i * per_service)
}

/// [`service_yaml`] with the endpoints at pod addresses `first..first + E` (another `first`
/// is an endpoint-only change).
pub fn service_yaml_at(i: usize, per_service: usize, v1_weight: u32, first: usize) -> String {
    let mut y = String::new();
    let name = format!("svc-{i}");
    writeln!(
        y,
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\nspec:\n  clusterIP: {}\n  selector: {{app: {name}}}\n  ports: [{{name: http, port: 8080, targetPort: 9080}}]\n---",
        vip(i)
    )
    .expect("string");
    writeln!(
        y,
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: bench, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: 9080}}]\nendpoints:"
    )
    .expect("string");
    for e in first..first + per_service {
        let pod = e - first;
        writeln!(y, "- {{addresses: [{}], targetRef: {{kind: Pod, name: {name}-{pod}}}}}", pod_ip(e)).expect("string");
    }
    writeln!(y, "---").expect("string");
    for e in first..first + per_service {
        let version = if (e - first).is_multiple_of(2) { "v1" } else { "v2" };
        writeln!(
            y,
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}-{}, namespace: bench, labels: {{app: {name}, version: {version}}}}}\nspec: {{containers: [{{name: c}}]}}\nstatus: {{podIP: {}}}\n---",
            e - first,
            pod_ip(e)
        )
        .expect("string");
    }
    writeln!(
        y,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: bench}}\nspec:\n  host: {name}\n  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]\n---"
    )
    .expect("string");
    writeln!(
        y,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: bench}}\nspec:\n  hosts: [{name}]\n  http:\n  - route:\n    - {{destination: {{host: {name}, subset: v1}}, weight: {v1_weight}}}\n    - {{destination: {{host: {name}, subset: v2}}, weight: {}}}\n---",
        100 - v1_weight
    )
    .expect("string");
    y
}

/// The whole mesh as one YAML text, plus the client Pod the sidecar benchmarks translate for.
pub fn mesh_yaml(services: usize, per_service: usize) -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: bench, labels: {app: client}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 127.0.3.1}\n---\n",
    );
    for i in 0..services {
        y.push_str(&service_yaml(i, per_service, 80));
    }
    y
}

/// The client's sidecar node id.
pub const CLIENT_NODE: &str = "sidecar~127.0.3.1~client.bench~bench.svc.cluster.local";
