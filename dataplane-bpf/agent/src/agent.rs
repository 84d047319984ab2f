//! The node agent (`sluice agent`): attaches (or adopts) the programs, keeps the maps equal to
//! what the control plane serves over ADS, hands out workload cgroups on its local socket, and
//! serves metrics.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse;
use sluice_dataplane_api::{KernelService, KernelWorkload, SERVICE_TYPE, WORKLOAD_TYPE};
use sluice_dataplane_common::{Addr, ServiceKey, maps};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use crate::held::{HeldService, HeldSet, HeldWorkload, Undo, update};
use crate::loader::{Dataplane, ensure_bpffs};
use crate::metrics::AgentMetrics;
use crate::policy::PolicySync;
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
    /// Workload certificates over SDS. None: no SDS.
    pub sds: Option<SdsConfig>,
    /// Whether the eBPF programs are loaded.
    pub programs: Programs,
}

/// Whether the agent loads its eBPF programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Programs {
    /// Attach (or adopt) the programs and keep their maps equal to the served config.
    #[default]
    Load,
    /// Load nothing and pin nothing: the agent only makes workload cgroups and serves SDS, for
    /// meshes that run only sidecars (or a kernel without cgroup BPF).
    Skip,
}

/// How the agent gets and serves workload certificates.
#[derive(Debug, Clone)]
pub struct SdsConfig {
    /// The SDS Unix socket (`sluice bootstrap --sds-socket` points Envoy at it).
    pub socket: PathBuf,
    /// The CA: `https://host:port` (the control plane's TLS port).
    pub ca_addr: String,
    /// The PEM root that the CA's serving certificate chains to.
    pub ca_root: PathBuf,
    /// The name the CA's serving certificate carries.
    pub ca_name: String,
    /// The file holding this node's token (a node token, or in Kubernetes the agent's projected
    /// service-account token), read again for each request.
    pub token_file: PathBuf,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// Workload certificate lifetime to ask for (None: the CA's default).
    pub ttl: Option<Duration>,
}

/// Who is behind a pid, for SDS: the workload registered at the process's cgroup (or at a
/// cgroup above it, for a workload that nests its own).
pub struct AgentResolver {
    state: Arc<Mutex<AgentState>>,
    mount: PathBuf,
    trust_domain: String,
}

impl crate::sds::Resolver for AgentResolver {
    fn identity_of(&self, pid: i32) -> std::result::Result<sluice_identity::SpiffeId, String> {
        let cgroup = crate::sds::cgroup_of(pid).map_err(|e| format!("its cgroup cannot be read: {e}"))?;
        let path = crate::sds::under_mount(&self.mount, &cgroup);
        let state = self.state.lock().expect("agent state");
        let identity =
            |(namespace, sa): (String, String)| sluice_identity::SpiffeId::new(&self.trust_domain, &namespace, &sa);
        let mut at = path.clone();
        while at.starts_with(&self.mount) && at != self.mount {
            if let Some(found) = cgroup::cgroup_id(&at).ok().and_then(|id| state.workload_of_cgroup(id)) {
                return Ok(identity(found));
            }
            at.pop();
        }
        let pod = path.strip_prefix(&self.mount).ok().and_then(pod_uid_of_path);
        if let Some(found) = pod.and_then(|uid| state.workload_of_pod(&uid)) {
            return Ok(identity(found));
        }
        Err(format!(
            "cgroup {} is no registered workload's (start it with sluice run) and no Pod's of this node",
            cgroup.display()
        ))
    }
}

/// The UID of the Pod whose cgroup `path` (below the cgroup2 mount) is in: the outermost
/// `pod<uid>` below a `kubepods` cgroup, as the kubelet lays them out. Only the outermost: a
/// process may make cgroups below its own (a delegated subtree), never above, so a `pod<uid>`
/// further in proves nothing.
pub fn pod_uid_of_path(path: &Path) -> Option<String> {
    let mut under_kubepods = false;
    for component in path.components() {
        let name = component.as_os_str().to_string_lossy();
        if under_kubepods && let Some(uid) = pod_uid_of_cgroup(&name) {
            return Some(uid);
        }
        under_kubepods |= name.starts_with("kubepods");
    }
    None
}

/// The Pod UID in a cgroup directory's name, as the kubelet names them: `pod<uid>` (cgroupfs
/// driver) or `kubepods-<qos>-pod<uid with _ for ->.slice` (systemd driver).
pub fn pod_uid_of_cgroup(name: &str) -> Option<String> {
    let uid = match name.strip_suffix(".slice") {
        Some(unit) => unit.rsplit_once("-pod")?.1.replace('_', "-"),
        None => name.strip_prefix("pod")?.to_string(),
    };
    // A UID: 8-4-4-4-12 hex digits.
    let groups: Vec<&str> = uid.split('-').collect();
    let shape = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]);
    (shape && groups.iter().all(|g| g.chars().all(|c| c.is_ascii_hexdigit()))).then_some(uid)
}

struct Registered {
    workload: String,
    path: PathBuf,
    since: Instant,
}

/// The attached programs and what the agent wrote into their maps.
struct Kernel {
    dataplane: Dataplane,
    sync: MapSync,
    policy: PolicySync,
}

impl Kernel {
    /// Attaches or adopts the programs and points node-mode traffic at `node_proxy`.
    fn attach(config: &AgentConfig) -> Result<Self> {
        ensure_bpffs()?;
        let mut dataplane = Dataplane::attach(&config.pin_dir, &config.cgroup)?;
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
        Ok(Self { dataplane, sync, policy })
    }
}

/// What the agent holds: the attached data plane (unless [`Programs::Skip`]), the resources
/// last received, and the workload cgroups it created.
pub struct AgentState {
    kernel: Option<Kernel>,
    services: HeldSet<HeldService>,
    workloads: HeldSet<HeldWorkload>,
    /// Addresses of the workloads the responses since the last complete change touched.
    touched: BTreeSet<Addr>,
    /// Types received at least once: until then the maps keep what an earlier agent wrote.
    received: BTreeSet<String>,
    registered: BTreeMap<u64, Registered>,
    workload_root: PathBuf,
    next_seq: u64,
    /// The agent's metrics.
    pub metrics: Arc<AgentMetrics>,
}

impl AgentState {
    /// Attaches or adopts the data plane (unless told to skip it) and finds the workload
    /// cgroups an earlier agent made.
    pub fn start(config: &AgentConfig, metrics: Arc<AgentMetrics>) -> Result<Self> {
        let kernel = match config.programs {
            Programs::Load => Some(Kernel::attach(config)?),
            Programs::Skip => None,
        };
        let workload_root = config.cgroup.join(WORKLOADS_DIR);
        cgroup::create(&workload_root)?;
        let mut state = Self {
            kernel,
            services: HeldSet::new(),
            workloads: HeldSet::new(),
            touched: BTreeSet::new(),
            received: BTreeSet::new(),
            registered: BTreeMap::new(),
            workload_root,
            next_seq: 0,
            metrics,
        };
        state.rescan()?;
        match &state.kernel {
            Some(k) => {
                tracing::info!(adopted = k.dataplane.adopted, workloads = state.registered.len(), "data plane ready")
            }
            None => tracing::info!(workloads = state.registered.len(), "no eBPF programs loaded (SDS only)"),
        }
        Ok(state)
    }

    /// Where the programs are attached (None: not loaded), for `/ready`.
    pub fn attachment(&self) -> Option<crate::metrics::Attachment> {
        let dp = &self.kernel.as_ref()?.dataplane;
        Some(crate::metrics::Attachment {
            cgroup: dp.cgroup.display().to_string(),
            cgroup_id: dp.cgroup_id,
            pin_dir: dp.pin_dir.display().to_string(),
            adopted: dp.adopted,
        })
    }

    /// The resource types to subscribe to: services are only for the maps.
    pub fn types(&self) -> &'static [&'static str] {
        if self.kernel.is_some() { &[SERVICE_TYPE, WORKLOAD_TYPE] } else { &[WORKLOAD_TYPE] }
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
            SERVICE_TYPE => self.services.iter().map(|(n, s)| (n.to_string(), s.version.to_string())).collect(),
            WORKLOAD_TYPE => self.workloads.iter().map(|(n, w)| (n.to_string(), w.version.to_string())).collect(),
            _ => HashMap::new(),
        }
    }

    /// Applies one Delta response to the maps. An error leaves the held resources unchanged
    /// and is the NACK's message.
    ///
    /// A large change may come in parts, as sluice's server sends it (so neither side holds a
    /// whole mesh in one message): each part is a valid incremental update, and only the last
    /// one names the version (`system_version_info`). A response that names one completes a
    /// change.
    pub fn apply_response(&mut self, response: &DeltaDiscoveryResponse) -> std::result::Result<ApplyStats, String> {
        let started = Instant::now();
        let complete = !response.system_version_info.is_empty();
        let type_url = response.type_url.as_str();
        let outcome = match type_url {
            SERVICE_TYPE => {
                let (services, undo) = update::<KernelService>(&mut self.services, response)?;
                let outcome = self.apply_services(services, &undo, complete);
                if outcome.is_err() {
                    undo.revert(&mut self.services);
                }
                outcome
            }
            WORKLOAD_TYPE => {
                let (_, undo) = update::<KernelWorkload>(&mut self.workloads, response)?;
                // A full rewrite (the first change, or after one failed) touches every address.
                if let Some(kernel) = self.kernel.as_mut()
                    && !kernel.policy.rewrites_all()
                {
                    let before = undo.before.iter().filter_map(|(_, old)| old.as_ref());
                    let addrs = before.chain(undo.removed.iter().map(|(_, old)| old)).map(|w| w.value.addr);
                    let after = undo.before.iter().filter_map(|(n, _)| self.workloads.get(n)).map(|w| w.value.addr);
                    self.touched.extend(addrs.chain(after));
                    if self.touched.len() > 1024 && self.touched.len() > self.workloads.len() / 4 {
                        self.touched.clear();
                        kernel.policy.rewrite_all();
                    }
                }
                // The policy sync walks every held workload: once per change, not per part.
                if !complete {
                    return Ok(ApplyStats::default());
                }
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

    /// Writes the services of a response. Until a change is complete (see
    /// [`AgentState::apply_response`]) nothing is removed; the last part of the first change
    /// of the type then removes every service the held ones do not name (an earlier agent's
    /// maps may hold more). After it, a response carries only what changed, and only that is
    /// written.
    fn apply_services(
        &mut self,
        services: Vec<KernelService>,
        undo: &Undo<HeldService>,
        complete: bool,
    ) -> Result<ApplyStats> {
        let reconcile = complete && !self.received.contains(SERVICE_TYPE);
        let Some(kernel) = self.kernel.as_mut() else {
            if complete {
                self.received.insert(SERVICE_TYPE.to_string());
            }
            return Ok(ApplyStats::default());
        };
        let removed: Vec<ServiceKey> = if reconcile {
            let keep: BTreeSet<ServiceKey> = self.services.values().map(|s| s.key).collect();
            kernel.sync.service_keys().filter(|k| !keep.contains(k)).collect()
        } else {
            undo.removed.iter().map(|(_, s)| s.key).collect()
        };
        let stats = kernel.sync.apply_changes(&mut kernel.dataplane.maps, &services, &removed, Instant::now())?;
        // Only a reconcile that succeeded lets later responses be applied as deltas.
        if reconcile {
            self.received.insert(SERVICE_TYPE.to_string());
        }
        Ok(stats)
    }

    /// Writes the policy sets and identities of the held workloads, then the workload entries of
    /// registered cgroups (policy sets first: an entry must not point at a set not yet written).
    fn apply_workloads(&mut self) -> Result<()> {
        let touched = std::mem::take(&mut self.touched);
        let Some(Kernel { dataplane, policy, .. }) = self.kernel.as_mut() else { return Ok(()) };
        policy.apply(&mut dataplane.maps, self.workloads.iter(), touched, Instant::now())?;
        for (id, r) in &self.registered {
            let wanted = self.workloads.get(r.workload.as_str()).map(|w| w.value);
            let current = dataplane.maps.workloads.get(id, 0).ok();
            match wanted {
                Some(v) if current != Some(v) => {
                    dataplane.maps.workloads.insert(id, v, 0).map_err(crate::map_error(maps::WORKLOADS))?
                }
                // Gone from the config: its processes are no longer a mesh workload.
                None if current.is_some() => {
                    dataplane.maps.workloads.remove(id).map_err(crate::map_error(maps::WORKLOADS))?
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The (namespace, service account) of the Pod of this node whose UID is `uid`.
    pub fn workload_of_pod(&self, uid: &str) -> Option<(String, String)> {
        self.workloads.iter().find(|(_, w)| w.local && w.pod_uid.as_deref() == Some(uid)).and_then(|(key, w)| {
            let (namespace, _) = key.split_once('/')?;
            Some((namespace.to_string(), w.service_account.to_string()))
        })
    }

    /// The namespace and service account of the workload registered at cgroup `id`.
    pub fn workload_of_cgroup(&self, id: u64) -> Option<(String, String)> {
        let registered = self.registered.get(&id)?;
        let (namespace, _) = registered.workload.split_once('/')?;
        let held = self.workloads.get(registered.workload.as_str())?;
        Some((namespace.to_string(), held.service_account.to_string()))
    }

    /// Creates a cgroup for `workload` (`<name>.<namespace>`) known to the served config.
    pub fn register(&mut self, workload: &str) -> Result<PathBuf> {
        let (namespace, name) = parse_workload(workload)?;
        let key = format!("{namespace}/{name}");
        let Some(w) = self.workloads.get(key.as_str()).filter(|w| w.local) else {
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
        if let Some(kernel) = self.kernel.as_mut() {
            kernel.dataplane.maps.workloads.insert(id, w.value, 0).map_err(crate::map_error(maps::WORKLOADS))?;
        }
        self.registered.insert(id, Registered { workload: key, path: path.clone(), since: Instant::now() });
        self.metrics.workloads.set(self.registered.len() as i64);
        Ok(path)
    }

    /// Deletes what became unreferenced past the grace period, and the workload cgroups whose
    /// processes have all exited.
    pub fn housekeeping(&mut self) -> Result<()> {
        if let Some(Kernel { dataplane, sync, policy }) = self.kernel.as_mut() {
            sync.collect(&mut dataplane.maps, Instant::now())?;
            policy.collect(&mut dataplane.maps, Instant::now())?;
        }
        let empty: Vec<u64> = self
            .registered
            .iter()
            .filter(|(_, r)| r.since.elapsed() >= REAP_AFTER && !populated(&r.path))
            .map(|(id, _)| *id)
            .collect();
        for id in empty {
            let r = self.registered.remove(&id).expect("listed");
            if let Some(kernel) = self.kernel.as_mut() {
                crate::deleted(kernel.dataplane.maps.workloads.remove(&id), maps::WORKLOADS)?;
            }
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
    if config.programs == Programs::Load {
        crate::loader::object()?;
    }
    let metrics = Arc::new(AgentMetrics::default());
    // Every port and socket is bound before anything is pinned: a start that fails here leaves
    // nothing behind for the next agent to adopt.
    let metrics_listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .map_err(io(format!("binding {}", config.metrics_addr)))?;
    let socket = bind_socket(&config.socket)?;
    let sds = match config.sds.as_ref().map(prepare_sds).transpose() {
        Ok(sds) => sds,
        Err(e) => {
            let _ = std::fs::remove_file(&config.socket);
            return Err(e);
        }
    };
    let served = metrics.clone();
    tokio::spawn(async move {
        let _ = axum::serve(metrics_listener, crate::metrics::router(served)).await;
    });
    let state = match AgentState::start(&config, metrics.clone()) {
        Ok(state) => Arc::new(Mutex::new(state)),
        Err(e) => {
            let _ = std::fs::remove_file(&config.socket);
            if let Some(sds) = &config.sds {
                let _ = std::fs::remove_file(&sds.socket);
            }
            return Err(e);
        }
    };
    metrics.set_ready(state.lock().expect("agent state").attachment());
    tokio::spawn(serve_socket(socket, state.clone()));
    if let Some(sds) = sds {
        spawn_sds(sds, state.clone());
    }
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
    if let Some(sds) = &config.sds {
        let _ = std::fs::remove_file(&sds.socket);
    }
    tracing::info!("agent stopped; programs stay attached and pinned");
    Ok(())
}

/// SDS made ready before anything is pinned: its files read, its CA client made, its socket
/// bound (so a start that fails on them leaves nothing behind).
struct PreparedSds {
    certificates: Arc<crate::sds::Certificates>,
    mount: PathBuf,
    listener: UnixListener,
    trust_domain: String,
}

/// Prepares SDS on `config.socket`, with certificates from the CA at `config.ca_addr`.
fn prepare_sds(config: &SdsConfig) -> Result<PreparedSds> {
    let read = |path: &Path| std::fs::read_to_string(path).map_err(io(format!("reading {}", path.display())));
    // Read now so a missing token stops the start; sent as it is at each request.
    read(&config.token_file)?;
    let root = read(&config.ca_root)?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(root))
        .domain_name(config.ca_name.clone());
    let channel = tonic::transport::Endpoint::from_shared(config.ca_addr.clone())
        .and_then(|e| e.tls_config(tls))
        .map_err(|e| crate::DataplaneError::Invalid(format!("CA address {}: {e}", config.ca_addr)))?
        // Connected when first needed: a CA that is down delays certificates, not the agent.
        .connect_lazy();
    let client = sluice_identity::workload::CertificateClient::with_token_file(channel, &config.token_file);
    let mount = cgroup::cgroup2_mount()?;
    if let Some(dir) = config.socket.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    let listener = crate::sds::Sds::bind(&config.socket).map_err(io(format!("binding {}", config.socket.display())))?;
    Ok(PreparedSds {
        certificates: crate::sds::Certificates::new(client, config.ttl),
        mount,
        listener,
        trust_domain: config.trust_domain.clone(),
    })
}

/// Serves SDS for the workloads registered in `state`.
fn spawn_sds(prepared: PreparedSds, state: Arc<Mutex<AgentState>>) {
    let PreparedSds { certificates, mount, listener, trust_domain } = prepared;
    let resolver = Arc::new(AgentResolver { state, mount, trust_domain });
    let sds = crate::sds::Sds::new(resolver, certificates);
    tokio::spawn(async move {
        if let Err(e) = sds.serve_on(listener, std::future::pending()).await {
            tracing::error!(error = %e, "SDS stopped");
        }
    });
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
    use super::{pod_uid_of_cgroup, pod_uid_of_path};
    use std::path::Path;

    #[test]
    fn a_pod_is_the_outermost_pod_cgroup_below_kubepods() {
        let (a, b) = ("0f5c8a4e-3b1d-4c2e-9a7f-6d5e4c3b2a10", "11111111-2222-3333-4444-555555555555");
        let cgroupfs = format!("kubepods/burstable/pod{a}/4f1e2d");
        assert_eq!(pod_uid_of_path(Path::new(&cgroupfs)).as_deref(), Some(a));
        let systemd = format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-4f.scope",
            a.replace('-', "_")
        );
        assert_eq!(pod_uid_of_path(Path::new(&systemd)).as_deref(), Some(a));
        // A container that made a cgroup named like another Pod's below its own is still its Pod's.
        let nested = format!("kubepods/burstable/pod{a}/4f1e2d/pod{b}");
        assert_eq!(pod_uid_of_path(Path::new(&nested)).as_deref(), Some(a));
        // Not under kubepods: no Pod.
        assert_eq!(pod_uid_of_path(Path::new(&format!("system.slice/pod{b}"))), None);
    }

    #[test]
    fn a_pods_uid_is_read_from_the_kubelets_cgroup_names() {
        let uid = "0f5c8a4e-3b1d-4c2e-9a7f-6d5e4c3b2a10";
        assert_eq!(pod_uid_of_cgroup(&format!("pod{uid}")).as_deref(), Some(uid), "cgroupfs driver");
        let systemd = format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_"));
        assert_eq!(pod_uid_of_cgroup(&systemd).as_deref(), Some(uid), "systemd driver");
        assert_eq!(pod_uid_of_cgroup(&format!("kubepods-pod{}.slice", uid.replace('-', "_"))).as_deref(), Some(uid));
        for other in ["kubepods", "burstable", "podman-1234.scope", "pod", "podnot-a-uid", "kubepods-burstable.slice"] {
            assert_eq!(pod_uid_of_cgroup(other), None, "{other}");
        }
        // A container's own cgroup under the pod's is not the pod's: its parent is looked at next.
        assert_eq!(pod_uid_of_cgroup("cri-containerd-4f1e2d.scope"), None);
    }
}
