//! Control-plane convergence: N xDS clients (Delta ADS, each its own node id, subscribing to
//! clusters, endpoints, listeners and routes and ACKing every response as Envoy does) in this
//! process, against `sluice serve` in another, on a config of S services. Measures the time from
//! a file write until every client has ACKed (i) a full push (a service added: every type
//! changes) and (ii) an endpoint-only change, and sluice's RSS and CPU seconds per push. With
//! `--silent M`, M more clients subscribe the same way once the others are synced and never
//! answer a response (hostile or stuck proxies): the times are still the answering clients'.
//! With `--proxyless`, the clients are proxyless gRPC clients instead (SotW, by name).
//! With `--tls`, every client uses the TLS port with a client certificate of the mesh (one
//! identity of namespace `bench`, signed by sluice's own CA), as sidecars on 15012 do.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use sluice_testkit::{Proc, free_port};
use tokio_stream::wrappers::ReceiverStream;

use crate::mesh::{service_yaml, service_yaml_at};
use crate::stats::{cpu_seconds, quantile, status_kb, summary};

use sluice_xds::cache::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
/// Clients share one HTTP/2 connection per this many streams.
const STREAMS_PER_CONNECTION: usize = 50;

/// The highest version each client has ACKed per type, and when.
type Acks = Arc<Mutex<Vec<HashMap<&'static str, (u64, Instant)>>>>;

/// Opens a Delta ADS stream as `node_id`, subscribed to every resource of the four types;
/// returns the sender for further requests and the responses.
async fn subscribe(
    channel: tonic::transport::Channel,
    node_id: String,
) -> anyhow::Result<(tokio::sync::mpsc::Sender<DeltaDiscoveryRequest>, tonic::Streaming<DeltaDiscoveryResponse>)> {
    let mut ads = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let node = Node { id: node_id, ..Default::default() };
    for type_url in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
        let request = DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: type_url.into(),
            resource_names_subscribe: vec!["*".into()],
            ..Default::default()
        };
        tx.send(request).await?;
    }
    let responses = ads.delta_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
    Ok((tx, responses))
}

/// A client that ACKs every response as Envoy does, recording the versions it ACKed.
async fn client(channel: tonic::transport::Channel, id: usize, acks: Acks) -> anyhow::Result<()> {
    let node = format!("sidecar~127.0.3.1~client-{id}.bench~bench.svc.cluster.local");
    let (tx, mut responses) = subscribe(channel, node).await?;
    while let Some(r) = responses.message().await? {
        tx.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await?;
        let type_url = [CLUSTER, ENDPOINT, LISTENER, ROUTE].into_iter().find(|t| *t == r.type_url).unwrap_or(CLUSTER);
        let version: u64 = r.system_version_info.parse().unwrap_or(0);
        let mut a = acks.lock().expect("acks");
        let entry = a[id].entry(type_url).or_insert((0, Instant::now()));
        if version >= entry.0 {
            *entry = (version, Instant::now());
        }
    }
    Ok(())
}

/// The names a proxyless gRPC client that dials the first `services` services subscribes to,
/// by type: gRPC never subscribes by wildcard.
fn proxyless_names(services: usize, type_url: &str) -> Vec<String> {
    let host = |i: usize| format!("svc-{i}.bench.svc.cluster.local");
    let mut out = Vec::new();
    for i in 0..services {
        match type_url {
            LISTENER => out.push(format!("{}:8080", host(i))),
            ROUTE => out.push(format!("outbound|8080||{}", host(i))),
            _ => out.extend(["", "v1", "v2"].map(|subset| format!("outbound|8080|{subset}|{}", host(i)))),
        }
    }
    out
}

/// A proxyless gRPC client as gRPC's own is: State-of-the-World, node metadata
/// `GENERATOR: grpc`, every type subscribed by name, each response ACKed with the names again.
async fn proxyless_client(
    channel: tonic::transport::Channel,
    id: usize,
    services: usize,
    acks: Acks,
) -> anyhow::Result<()> {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    let mut ads = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let generator = Value { kind: Some(Kind::StringValue("grpc".into())) };
    let node = Node {
        id: format!("sidecar~127.0.3.1~grpc-{id}.bench~bench.svc.cluster.local"),
        metadata: Some(Struct { fields: [("GENERATOR".to_string(), generator)].into_iter().collect() }),
        ..Default::default()
    };
    for type_url in [LISTENER, ROUTE, CLUSTER, ENDPOINT] {
        let request = DiscoveryRequest {
            node: Some(node.clone()),
            type_url: type_url.into(),
            resource_names: proxyless_names(services, type_url),
            ..Default::default()
        };
        tx.send(request).await?;
    }
    let mut responses = ads.stream_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
    // The types of which a response held every name: after that, endpoints and routes come
    // one by one as they change.
    let mut complete = std::collections::HashSet::new();
    while let Some(r) = responses.message().await? {
        let type_url = [CLUSTER, ENDPOINT, LISTENER, ROUTE].into_iter().find(|t| *t == r.type_url).unwrap_or(CLUSTER);
        tx.send(DiscoveryRequest {
            type_url: r.type_url.clone(),
            version_info: r.version_info.clone(),
            response_nonce: r.nonce.clone(),
            resource_names: proxyless_names(services, type_url),
            ..Default::default()
        })
        .await?;
        // Every name exists once the config is loaded, and the first response after that holds
        // them all (sluice answers before it has read the config, with none).
        if !complete.contains(type_url) && r.resources.len() != proxyless_names(services, type_url).len() {
            continue;
        }
        complete.insert(type_url);
        let version: u64 = r.version_info.parse().unwrap_or(0);
        let mut a = acks.lock().expect("acks");
        let entry = a[id].entry(type_url).or_insert((0, Instant::now()));
        if version >= entry.0 {
            *entry = (version, Instant::now());
        }
    }
    Ok(())
}

/// A client that subscribes like [`client`] and then never answers: it reads its responses
/// (so the connection keeps flowing) and sends nothing more.
async fn silent(channel: tonic::transport::Channel, id: usize) -> anyhow::Result<()> {
    let node = format!("sidecar~127.0.3.2~silent-{id}.bench~bench.svc.cluster.local");
    let (_tx, mut responses) = subscribe(channel, node).await?;
    while responses.message().await?.is_some() {}
    Ok(())
}

/// Waits until every client has ACKed `type_url` at a version above `above[client]`; returns
/// each client's time from `since`.
fn wait_all(
    acks: &Acks,
    type_url: &'static str,
    above: &[u64],
    since: Instant,
    timeout: Duration,
) -> anyhow::Result<Vec<f64>> {
    loop {
        {
            let a = acks.lock().expect("acks");
            let done: Vec<Option<f64>> = a
                .iter()
                .zip(above)
                .map(|(c, floor)| {
                    c.get(type_url).filter(|(v, _)| v > floor).map(|(_, t)| t.duration_since(since).as_secs_f64())
                })
                .collect();
            if done.iter().all(Option::is_some) {
                return Ok(done.into_iter().flatten().collect());
            }
        }
        anyhow::ensure!(since.elapsed() < timeout, "not every client ACKed {type_url} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn versions(acks: &Acks, type_url: &'static str) -> Vec<u64> {
    acks.lock().expect("acks").iter().map(|c| c.get(type_url).map_or(0, |(v, _)| *v)).collect()
}

/// The TLS client config of a mesh client: the root sluice serve published in `state`, and a
/// certificate its CA (`state/ca`) signs for a service account of namespace `bench`.
fn mesh_client_tls(state: &Path) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
    let ca = sluice_identity::CertificateAuthority::self_signed(&state.join("ca"), "cluster.local")?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?.serialize_request(&key)?.pem()?;
    let identity = sluice_identity::SpiffeId::new("cluster.local", "bench", "bench-client");
    let chain = ca.sign(&csr, &identity, None)?.concat();
    Ok(tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca.root_pem()))
        .identity(tonic::transport::Identity::from_pem(chain, key.serialize_pem()))
        .domain_name("localhost"))
}

/// One (N, S) point: `pushes` full pushes and as many endpoint-only changes.
fn point(
    sluice: &Path,
    clients: usize,
    services: usize,
    pushes: usize,
    quiet: usize,
    tls: bool,
    proxyless: Option<usize>,
) -> anyhow::Result<String> {
    let dir = std::env::temp_dir().join(format!("sluice-conv-{}-{clients}-{services}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("config"))?;
    let mut rest = String::new();
    for i in 1..services {
        rest.push_str(&service_yaml(i, 2, 80));
    }
    std::fs::write(dir.join("config/mesh.yaml"), rest)?;
    std::fs::write(dir.join("config/svc-0.yaml"), service_yaml(0, 2, 80))?;
    let (port, tls_port) = (free_port(), free_port());
    let mut command = Command::new(sluice);
    command
        .args(["serve", "--debounce-ms", "0", "--config"])
        .arg(dir.join("config"))
        .arg("--xds-addr")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--monitoring-addr")
        .arg(format!("127.0.0.1:{}", free_port()));
    if tls {
        command.args(["--xds-tls-addr", &format!("127.0.0.1:{tls_port}"), "--tls-dns-name", "localhost"]);
        command.arg("--state-dir").arg(dir.join("state"));
    }
    let serve = Proc::spawn("sluice serve", &mut command, &dir.join("serve.log"));
    let pid = serve.child.id();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let acks: Acks = Arc::new(Mutex::new(vec![HashMap::new(); clients]));
    let started = Instant::now();
    let client_tls = if tls {
        let root = dir.join("state/root-cert.pem");
        let published = sluice_testkit::eventually(Duration::from_secs(30), || root.exists().then_some(()));
        anyhow::ensure!(published.is_some(), "sluice serve published no root in {}", root.display());
        Some(mesh_client_tls(&dir.join("state"))?)
    } else {
        None
    };
    let channels: Vec<tonic::transport::Channel> = runtime.block_on(async {
        let mut out = Vec::new();
        for _ in 0..(clients.div_ceil(STREAMS_PER_CONNECTION) + quiet.div_ceil(STREAMS_PER_CONNECTION)) {
            let endpoint = match &client_tls {
                Some(tls) => tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{tls_port}"))?
                    .tls_config(tls.clone())?,
                None => tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?,
            };
            let mut tries = 0;
            let channel = loop {
                match endpoint.connect().await {
                    Ok(c) => break c,
                    Err(e) if tries > 100 => return Err(anyhow::anyhow!("connecting to sluice: {e}")),
                    Err(_) => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
            out.push(channel);
        }
        Ok::<_, anyhow::Error>(out)
    })?;
    for id in 0..clients {
        let (channel, acks) = (channels[id / STREAMS_PER_CONNECTION].clone(), acks.clone());
        runtime.spawn(async move {
            let done = match proxyless {
                Some(dials) => proxyless_client(channel, id, dials, acks).await,
                None => client(channel, id, acks).await,
            };
            if let Err(e) = done {
                eprintln!("client {id}: {e}");
            }
        });
    }
    let zeros = vec![0; clients];
    let initial = wait_all(&acks, ROUTE, &zeros, started, Duration::from_secs(600))?;
    wait_all(&acks, ENDPOINT, &zeros, started, Duration::from_secs(600))?;
    let initial_max = initial.iter().copied().fold(0.0, f64::max);
    let first_quiet_channel = clients.div_ceil(STREAMS_PER_CONNECTION);
    let rss_alone = status_kb(pid, "VmRSS").unwrap_or(0);
    let mut silent_tasks = Vec::new();
    for id in 0..quiet {
        let channel = channels[first_quiet_channel + id / STREAMS_PER_CONNECTION].clone();
        silent_tasks.push(runtime.spawn(async move {
            if let Err(e) = silent(channel, id).await {
                eprintln!("silent client {id}: {e}");
            }
        }));
    }
    if quiet > 0 {
        // Until every silent client has its first responses and holds a slot it will not give back.
        std::thread::sleep(Duration::from_secs(2));
    }
    let rss_synced = status_kb(pid, "VmRSS").unwrap_or(0);
    let (mut full, mut eds) = (Vec::new(), Vec::new());
    let mut cpu = Vec::new();
    for p in 0..pushes {
        // (i) Envoy: a new service, so clusters, endpoints, listeners' and routes' contents all
        // change. Proxyless: a new service is nothing its clients asked for, so svc-0's weights
        // change instead (its route configuration).
        let watched = if proxyless.is_some() { ROUTE } else { CLUSTER };
        let before = (versions(&acks, watched), cpu_seconds(pid).unwrap_or(0.0));
        let t = Instant::now();
        if proxyless.is_some() {
            std::fs::write(dir.join("config/svc-0.yaml"), service_yaml(0, 2, 70 - p as u32 % 50))?;
        } else {
            std::fs::write(dir.join(format!("config/extra-{p}.yaml")), service_yaml(services + p, 2, 80))?;
        }
        let mut times = wait_all(&acks, watched, &before.0, t, Duration::from_secs(900))?;
        times.sort_by(f64::total_cmp);
        full.push(times);
        std::thread::sleep(Duration::from_millis(200));
        cpu.push(cpu_seconds(pid).unwrap_or(0.0) - before.1);
        // (ii) One service's endpoints move: only EDS changes.
        let before = versions(&acks, ENDPOINT);
        let t = Instant::now();
        let weight = if proxyless.is_some() { 70 - p as u32 % 50 } else { 80 };
        std::fs::write(dir.join("config/svc-0.yaml"), service_yaml_at(0, 2, weight, 200_000 + 2 * p))?;
        let mut times = wait_all(&acks, ENDPOINT, &before, t, Duration::from_secs(900))?;
        times.sort_by(f64::total_cmp);
        eds.push(times);
        std::thread::sleep(Duration::from_millis(200));
    }
    let hwm = status_kb(pid, "VmHWM").unwrap_or(0);
    // The silent clients go away (their streams and connections close): what sluice keeps.
    let rss_closed = (quiet > 0).then(|| {
        for task in &silent_tasks {
            task.abort();
        }
        drop(channels);
        // Past two of sluice's looks (every 5 s) at how many streams closed: it trims after the second.
        std::thread::sleep(Duration::from_secs(12));
        status_kb(pid, "VmRSS").unwrap_or(0)
    });
    runtime.shutdown_background();
    drop(serve);
    let _ = std::fs::remove_dir_all(&dir);
    let fmt = |pushes: &[Vec<f64>], q: f64| {
        let (lo, mid, hi) = summary(&pushes.iter().map(|t| quantile(t, q) * 1e3).collect::<Vec<_>>());
        format!("{lo:.0} / {mid:.0} / {hi:.0}")
    };
    let (clo, cmid, chi) = summary(&cpu);
    let mb = |kb: u64| format!("{:.0}", kb as f64 / 1024.0);
    let closed = rss_closed.map_or("-".to_string(), |kb| format!("{} → {}", mb(rss_alone), mb(kb)));
    Ok(format!(
        "| {clients} | {quiet} | {services} | {:.0} | {} | {} | {} | {} | {:.0} / {:.0} / {closed} | {clo:.2} / {cmid:.2} / {chi:.2} |",
        initial_max * 1e3,
        fmt(&full, 0.5),
        fmt(&full, 0.99),
        fmt(&eds, 0.5),
        fmt(&eds, 0.99),
        rss_synced as f64 / 1024.0,
        hwm as f64 / 1024.0
    ))
}

/// Sweeps N × S.
pub fn run(
    sluice: &Path,
    clients: &[usize],
    services: &[usize],
    pushes: usize,
    quiet: usize,
    tls: bool,
    proxyless: Option<Option<usize>>,
) -> anyhow::Result<()> {
    if let Some(dials) = proxyless {
        let dials = dials.map_or("every service".to_string(), |d| format!("{d} services"));
        println!(
            "Proxyless gRPC clients (State-of-the-World, GENERATOR: grpc), each dialling {dials}: their listeners, routes, clusters and endpoints subscribed by name; the full push is a routing change of a service they all dial."
        );
    }
    let port = if tls { "the TLS port with a mesh client certificate" } else { "plaintext xDS" };
    println!(
        "Convergence: Delta ADS clients in the benchmark process over {port}, sluice serve in its own; {pushes} pushes per point."
    );
    println!(
        "Times in ms from the file write until the client ACKed, over clients (p50, p99), min / median / max over pushes.\n"
    );
    println!(
        "| clients | silent clients | services | initial sync, all ACKed | full push p50 | full push p99 | endpoint-only p50 | endpoint-only p99 | sluice RSS synced / peak / before the silent clients came → after they left MB | sluice CPU s per full push |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for s in services {
        for n in clients {
            let dials = proxyless.map(|d| d.unwrap_or(*s).min(*s));
            println!("{}", point(sluice, *n, *s, pushes, quiet, tls, dials)?);
        }
    }
    Ok(())
}
