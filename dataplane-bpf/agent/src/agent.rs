//! The node agent (`sluice agent`): attaches (or adopts) the programs, keeps the maps equal to
//! what the control plane serves over ADS, hands out workload cgroups on its local socket, and
//! serves metrics.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse;
use prost::Message;
use sluice_dataplane_common::maps;
use sluice_translator::dataplane::{KernelService, KernelWorkload, NodeDataplane, SERVICE_TYPE, WORKLOAD_TYPE};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use crate::loader::{Dataplane, ensure_bpffs};
use crate::metrics::AgentMetrics;
use crate::policy::{PolicySync, workload_value};
use crate::socket::{Register, Reply, parse_workload};
use crate::sync::{ApplyStats, GRACE, MapSync};
use crate::{Result, cgroup, io};

/// Directory (under the attached cgroup) that holds the workload cgroups the agent creates.
pub const WORKLOADS_DIR: &str = "sluice-workloads";
/// A new workload cgroup is not reaped as empty before its process had time to move in.
const REAP_AFTER: Duration = Duration::from_secs(2);

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The control plane's xDS address (`http://host:port`).
    pub xds_addr: String,
    /// This node's name (the agent's node id is `agent~<name>`).
    pub node: String,
    /// The cgroup the programs attach to.
    pub cgroup: PathBuf,
    /// Where programs' links and maps are pinned.
    pub pin_dir: PathBuf,
    /// The metrics listener.
    pub metrics_addr: SocketAddr,
    /// The local socket `sluice run` talks to.
    pub socket: PathBuf,
    /// The node proxy's address: node-mode workloads' connects to services with L7 routing go
    /// there (same port). None: no node proxy, node-mode workloads get kernel balancing only.
    pub node_proxy: Option<std::net::IpAddr>,
}

struct Registered {
    workload: String,
    path: PathBuf,
    since: Instant,
}

/// What the agent holds: the attached data plane, the resources last received, and the
/// workload cgroups it created.
pub struct AgentState {
    dataplane: Dataplane,
    sync: MapSync,
    policy: PolicySync,
    services: BTreeMap<String, (String, KernelService)>,
    workloads: BTreeMap<String, (String, KernelWorkload)>,
    /// Types received at least once: until then the maps keep what an earlier agent wrote.
    received: BTreeSet<String>,
    registered: BTreeMap<u64, Registered>,
    workload_root: PathBuf,
    next_seq: u64,
    /// The agent's metrics.
    pub metrics: Arc<AgentMetrics>,
}

/// What applying a Delta response changed in the held resources of one type: the value each
/// touched name had before (None: it was absent), so a failed apply can be undone. The held
/// set is changed in place: a copy of it per response would be the whole mesh (100 000
/// workloads) each time.
#[derive(Debug)]
struct Undo<M> {
    /// Upserted names and what they held before.
    before: Vec<(String, Option<(String, M)>)>,
    /// Removed names and what they held.
    removed: Vec<(String, (String, M))>,
}

impl<M> Undo<M> {
    /// Puts every touched name back as it was (removals were applied last: undone first).
    fn revert(self, held: &mut BTreeMap<String, (String, M)>) {
        for (name, old) in self.removed {
            held.insert(name, old);
        }
        for (name, old) in self.before.into_iter().rev() {
            match old {
                Some(v) => held.insert(name, v),
                None => held.remove(&name),
            };
        }
    }
}

/// Applies `response` to `held` (new and changed resources decoded, removed ones dropped), or
/// leaves `held` as it was and returns the NACK's message.
fn update<M: Message + Default>(
    held: &mut BTreeMap<String, (String, M)>,
    response: &DeltaDiscoveryResponse,
) -> std::result::Result<Undo<M>, String> {
    let mut decoded = Vec::with_capacity(response.resources.len());
    for r in &response.resources {
        let bytes = r.resource.as_ref().map(|a| a.value.as_slice()).unwrap_or_default();
        let value = M::decode(bytes).map_err(|e| format!("{} {}: {e}", response.type_url, r.name))?;
        decoded.push((r.name.clone(), (r.version.clone(), value)));
    }
    let mut undo = Undo { before: Vec::with_capacity(decoded.len()), removed: Vec::new() };
    for (name, value) in decoded {
        let old = held.insert(name.clone(), value);
        undo.before.push((name, old));
    }
    for name in &response.removed_resources {
        if let Some(old) = held.remove(name) {
            undo.removed.push((name.clone(), old));
        }
    }
    Ok(undo)
}

impl AgentState {
    /// Attaches or adopts the data plane and finds the workload cgroups an earlier agent made.
    pub fn start(config: &AgentConfig, metrics: Arc<AgentMetrics>) -> Result<Self> {
        ensure_bpffs()?;
        let dataplane = Dataplane::attach(&config.pin_dir, &config.cgroup)?;
        let mut dataplane = dataplane;
        match config.node_proxy {
            Some(ip) => dataplane
                .maps
                .node_proxy
                .insert(0, crate::sync::addr(ip), 0)
                .map_err(crate::map_error(maps::NODE_PROXY))?,
            None => crate::deleted(dataplane.maps.node_proxy.remove(&0), maps::NODE_PROXY)?,
        }
        let sync = MapSync::adopt(&dataplane.maps)?;
        let policy = PolicySync::adopt(&dataplane.maps)?;
        let workload_root = config.cgroup.join(WORKLOADS_DIR);
        cgroup::create(&workload_root)?;
        let mut state = Self {
            dataplane,
            sync,
            policy,
            services: BTreeMap::new(),
            workloads: BTreeMap::new(),
            received: BTreeSet::new(),
            registered: BTreeMap::new(),
            workload_root,
            next_seq: 0,
            metrics,
        };
        state.rescan()?;
        tracing::info!(adopted = state.dataplane.adopted, workloads = state.registered.len(), "data plane ready");
        Ok(state)
    }

    /// Workload cgroups are named `<namespace>_<name>_<n>` (Kubernetes names have no `_`).
    fn rescan(&mut self) -> Result<()> {
        let entries =
            std::fs::read_dir(&self.workload_root).map_err(io(format!("listing {}", self.workload_root.display())))?;
        for entry in entries.flatten() {
            let dir = entry.file_name().to_string_lossy().to_string();
            let mut parts = dir.splitn(3, '_');
            let (Some(ns), Some(name), Some(seq)) = (parts.next(), parts.next(), parts.next()) else { continue };
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            self.next_seq = self.next_seq.max(seq.parse::<u64>().unwrap_or(0) + 1);
            let id = cgroup::cgroup_id(&path)?;
            self.registered.insert(id, Registered { workload: format!("{ns}/{name}"), path, since: Instant::now() });
        }
        self.metrics.workloads.set(self.registered.len() as i64);
        Ok(())
    }

    /// Resource versions held for a type, sent when a stream (re)starts.
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        match type_url {
            SERVICE_TYPE => self.services.iter().map(|(n, (v, _))| (n.clone(), v.clone())).collect(),
            WORKLOAD_TYPE => self.workloads.iter().map(|(n, (v, _))| (n.clone(), v.clone())).collect(),
            _ => HashMap::new(),
        }
    }

    /// Applies one Delta response to the maps. An error leaves the held resources unchanged
    /// and is the NACK's message.
    pub fn apply_response(&mut self, response: &DeltaDiscoveryResponse) -> std::result::Result<ApplyStats, String> {
        let started = Instant::now();
        let type_url = response.type_url.as_str();
        let outcome = match type_url {
            SERVICE_TYPE => {
                let undo = update(&mut self.services, response)?;
                let outcome = self.apply_services(response, &undo);
                if outcome.is_err() {
                    undo.revert(&mut self.services);
                }
                outcome
            }
            WORKLOAD_TYPE => {
                let undo = update(&mut self.workloads, response)?;
                self.received.insert(type_url.to_string());
                let outcome = self.apply_workloads().map(|()| ApplyStats::default());
                if outcome.is_err() {
                    undo.revert(&mut self.workloads);
                }
                outcome
            }
            other => return Err(format!("unexpected resource type {other}")),
        };
        match outcome {
            Ok(stats) => {
                self.metrics.applied(type_url, started.elapsed());
                self.metrics.services.set(self.services.len() as i64);
                Ok(stats)
            }
            Err(e) => {
                self.metrics.rejected.inc();
                Err(e.to_string())
            }
        }
    }

    /// Writes the services of a response. The first response of the type reconciles every
    /// service (an earlier agent's maps may hold more); after it, a response carries only what
    /// changed, and only that is written.
    fn apply_services(&mut self, response: &DeltaDiscoveryResponse, undo: &Undo<KernelService>) -> Result<ApplyStats> {
        if !self.received.contains(SERVICE_TYPE) {
            let desired = NodeDataplane {
                services: self.services.values().map(|(_, s)| s.clone()).collect(),
                workloads: Vec::new(),
            };
            let stats = self.sync.apply(&mut self.dataplane.maps, &desired, Instant::now())?;
            // Only a full reconcile that succeeded lets later responses be applied as deltas.
            self.received.insert(SERVICE_TYPE.to_string());
            return Ok(stats);
        }
        let upserts: Vec<KernelService> =
            response.resources.iter().filter_map(|r| self.services.get(&r.name)).map(|(_, s)| s.clone()).collect();
        let removed = undo.removed.iter().map(|(_, (_, s))| crate::sync::service_key(s)).collect::<Result<Vec<_>>>()?;
        self.sync.apply_changes(&mut self.dataplane.maps, &upserts, &removed, Instant::now())
    }

    /// Writes the policy sets and identities of the held workloads, then the workload entries of
    /// registered cgroups (policy sets first: an entry must not point at a set not yet written).
    fn apply_workloads(&mut self) -> Result<()> {
        self.policy.apply(&mut self.dataplane.maps, self.workloads.values().map(|(_, w)| w), Instant::now())?;
        for (id, r) in &self.registered {
            let wanted = self.workloads.get(&r.workload).map(|(_, w)| workload_value(w));
            let current = self.dataplane.maps.workloads.get(id, 0).ok();
            match wanted {
                Some(v) if current != Some(v) => {
                    self.dataplane.maps.workloads.insert(id, v, 0).map_err(crate::map_error(maps::WORKLOADS))?
                }
                // Gone from the config: its processes are no longer a mesh workload.
                None if current.is_some() => {
                    self.dataplane.maps.workloads.remove(id).map_err(crate::map_error(maps::WORKLOADS))?
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Creates a cgroup for `workload` (`<name>.<namespace>`) known to the served config.
    pub fn register(&mut self, workload: &str) -> Result<PathBuf> {
        let (namespace, name) = parse_workload(workload)?;
        let key = format!("{namespace}/{name}");
        let Some((_, w)) = self.workloads.get(&key).filter(|(_, w)| w.local) else {
            let why = if self.received.contains(WORKLOAD_TYPE) {
                "is not in the config served to this node (or its Pod runs on another node)"
            } else {
                "is unknown: the agent has no config from the control plane yet"
            };
            return Err(crate::DataplaneError::Invalid(format!(
                "workload {key} (no Pod or WorkloadEntry {name} in namespace {namespace}) {why}"
            )));
        };
        let path = self.workload_root.join(format!("{namespace}_{name}_{}", self.next_seq));
        self.next_seq += 1;
        cgroup::create(&path)?;
        let id = cgroup::cgroup_id(&path)?;
        self.dataplane.maps.workloads.insert(id, workload_value(w), 0).map_err(crate::map_error(maps::WORKLOADS))?;
        self.registered.insert(id, Registered { workload: key, path: path.clone(), since: Instant::now() });
        self.metrics.workloads.set(self.registered.len() as i64);
        Ok(path)
    }

    /// Deletes what became unreferenced past the grace period, and the workload cgroups whose
    /// processes have all exited.
    pub fn housekeeping(&mut self) -> Result<()> {
        self.sync.collect(&mut self.dataplane.maps, Instant::now())?;
        self.policy.collect(&mut self.dataplane.maps, Instant::now())?;
        let empty: Vec<u64> = self
            .registered
            .iter()
            .filter(|(_, r)| r.since.elapsed() >= REAP_AFTER && !populated(&r.path))
            .map(|(id, _)| *id)
            .collect();
        for id in empty {
            let r = self.registered.remove(&id).expect("listed");
            crate::deleted(self.dataplane.maps.workloads.remove(&id), maps::WORKLOADS)?;
            cgroup::remove(&r.path)?;
            tracing::info!(workload = %r.workload, cgroup = %r.path.display(), "workload exited");
        }
        self.metrics.workloads.set(self.registered.len() as i64);
        Ok(())
    }
}

/// True while some process is in the cgroup or below it.
fn populated(path: &Path) -> bool {
    std::fs::read_to_string(path.join("cgroup.events")).is_ok_and(|e| e.lines().any(|l| l == "populated 1"))
}

/// Runs the agent until SIGINT or SIGTERM. The programs stay attached and pinned when it
/// exits, so connections keep being balanced and the next agent adopts them.
pub async fn run(config: AgentConfig) -> Result<()> {
    let metrics = Arc::new(AgentMetrics::default());
    let state = Arc::new(Mutex::new(AgentState::start(&config, metrics.clone())?));
    let metrics_listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .map_err(io(format!("binding {}", config.metrics_addr)))?;
    tokio::spawn(async move {
        let _ = axum::serve(metrics_listener, crate::metrics::router(metrics)).await;
    });
    let socket = bind_socket(&config.socket)?;
    tokio::spawn(serve_socket(socket, state.clone()));
    let keeper = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(GRACE);
        loop {
            tick.tick().await;
            if let Err(e) = keeper.lock().expect("agent state").housekeeping() {
                tracing::warn!(error = %e, "housekeeping");
            }
        }
    });
    let deliver = async {
        let mut backoff = Duration::from_millis(100);
        loop {
            match crate::delivery::stream(&config.xds_addr, &config.node, &state).await {
                Ok(n) => tracing::info!(applied = n, "xDS stream closed by the control plane"),
                Err(e) => tracing::warn!(error = %e, "xDS stream"),
            }
            // A stream that got as far as opening resets the backoff.
            let was_connected = state.lock().expect("agent state").metrics.connected.set(0) == 1;
            backoff =
                if was_connected { Duration::from_millis(100) } else { (backoff * 2).min(Duration::from_secs(5)) };
            tokio::time::sleep(backoff).await;
        }
    };
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(io("SIGTERM handler"))?;
    tokio::select! {
        _ = deliver => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    let _ = std::fs::remove_file(&config.socket);
    tracing::info!("agent stopped; programs stay attached and pinned");
    Ok(())
}

fn bind_socket(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    // A socket file left by a killed agent would make bind fail.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(io(format!("binding {}", path.display())))?;
    // Only root may ask for a workload cgroup: a workload's cgroup is its identity for policy.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("restricting {}", path.display())))?;
    Ok(listener)
}

async fn serve_socket(listener: UnixListener, state: Arc<Mutex<AgentState>>) {
    while let Ok((stream, _)) = listener.accept().await {
        let state = state.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            if BufReader::new(read).read_line(&mut line).await.is_err() {
                return;
            }
            let reply = match serde_json::from_str::<Register>(&line) {
                Ok(req) => match state.lock().expect("agent state").register(&req.workload) {
                    Ok(path) => Reply::Cgroup(path),
                    Err(e) => Reply::Error(e.to_string()),
                },
                Err(e) => Reply::Error(format!("bad request {line:?}: {e}")),
            };
            let mut text = serde_json::to_string(&reply).expect("serializable");
            text.push('\n');
            let _ = write.write_all(text.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::Resource;
    use envoy_types::pb::google::protobuf::Any;

    use super::*;

    fn service(name: &str, port: u32) -> KernelService {
        KernelService { name: name.into(), port, ..Default::default() }
    }

    fn resource(s: &KernelService, version: &str) -> Resource {
        Resource {
            name: s.name.clone(),
            version: version.into(),
            resource: Some(Any { type_url: SERVICE_TYPE.into(), value: s.encode_to_vec() }),
            ..Default::default()
        }
    }

    #[test]
    fn a_response_is_applied_in_place_and_reverted_exactly() {
        let mut held: BTreeMap<String, (String, KernelService)> = BTreeMap::new();
        held.insert("a".into(), ("1".into(), service("a", 80)));
        held.insert("b".into(), ("1".into(), service("b", 80)));
        let before = held.clone();
        let response = DeltaDiscoveryResponse {
            type_url: SERVICE_TYPE.into(),
            resources: vec![resource(&service("a", 81), "2"), resource(&service("c", 80), "1")],
            removed_resources: vec!["b".into(), "never-held".into()],
            ..Default::default()
        };
        let undo = update(&mut held, &response).unwrap();
        assert_eq!(held.keys().collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(held["a"].1.port, 81);
        assert_eq!(undo.removed.len(), 1, "only what was held is recorded as removed");
        assert_eq!(undo.removed[0].1.1.name, "b");
        undo.revert(&mut held);
        assert_eq!(held, before);

        let broken = DeltaDiscoveryResponse {
            type_url: SERVICE_TYPE.into(),
            resources: vec![Resource {
                name: "x".into(),
                resource: Some(Any { type_url: SERVICE_TYPE.into(), value: vec![0xff, 0xff] }),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(update(&mut held, &broken).unwrap_err().contains(" x: "));
        assert_eq!(held, before, "a response that does not decode changes nothing");
    }
}
