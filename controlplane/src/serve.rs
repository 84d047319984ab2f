//! `sluice serve`: the sources (files watched with notify, and/or a Kubernetes API server), the
//! store, the xDS server, the monitoring port and (with Kubernetes) status and leader election,
//! wired together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use notify::{EventKind, RecursiveMode, Watcher};
use sluice_identity::CertificateAuthority;
use sluice_identity::service::CertificateService;
use sluice_translator::diagnostic::{Diagnostic, Severity};
use sluice_translator::snapshot::SnapshotDelta;
use sluice_xds::server::XdsServer;
use tokio::sync::{mpsc, watch};

use crate::certificates::{CaOptions, MeshAuthenticator, NodeTokens, open_ca};
use crate::generator::{Current, MeshGenerator};
use crate::kube_source::KubeCache;
use crate::metrics::Metrics;
use crate::monitoring::{Monitor, router};
use crate::store::{ConfigStore, Source};

/// The Kubernetes source's part of `sluice serve`.
#[derive(Clone)]
pub struct KubeServe {
    /// The API client (from a kubeconfig, the in-cluster config, or a test's mock).
    pub client: kube::Client,
    /// What to watch.
    pub watch: crate::kube_source::WatchOptions,
    /// Leader election for status writes; without it, status is not written.
    pub lease: Option<crate::lease::LeaseConfig>,
    /// The control plane's own namespace: where the CA Secret `istio-ca-secret` lives.
    pub own_namespace: String,
}

/// xDS over TLS (istiod's 15012): the server's certificate chain and key, and with a client CA,
/// mutual TLS (clients must present a certificate that chains to it).
#[derive(Debug, Clone)]
pub struct XdsTls {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// PEM certificate chain and key files; None: the CA issues the serving certificate.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// PEM CA bundle that client certificates must chain to (mutual TLS required); None: a
    /// client certificate of the mesh is optional (a workload renewing its certificate shows
    /// one; ztunnel and new workloads show none).
    pub client_ca: Option<PathBuf>,
}

impl XdsTls {
    fn config(&self, ca: &CertificateAuthority, names: &[String]) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).with_context(|| format!("reading the xDS TLS {what} {}", p.display()))
        };
        let (cert, key) = match &self.identity {
            Some((cert, key)) => (read(cert, "certificate")?, read(key, "key")?),
            None => {
                let (chain, key) = ca
                    .serving_certificate(names, crate::certificates::SERVING_TTL)
                    .context("issuing the control plane's serving certificate")?;
                (chain.concat().into_bytes(), key.into_bytes())
            }
        };
        let config = tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(cert, key));
        Ok(match &self.client_ca {
            Some(ca) => config.client_ca_root(tonic::transport::Certificate::from_pem(read(ca, "client CA")?)),
            None => {
                config.client_ca_root(tonic::transport::Certificate::from_pem(ca.root_pem())).client_auth_optional(true)
            }
        })
    }
}

/// Options of `sluice serve`.
#[derive(Clone)]
pub struct ServeOptions {
    /// Config files and directories (may be empty with a Kubernetes source).
    pub config: Vec<PathBuf>,
    /// The Kubernetes source.
    pub kube: Option<KubeServe>,
    /// xDS gRPC address.
    pub xds_addr: SocketAddr,
    /// xDS and Istio's CSR API over (mutual) TLS, in addition.
    pub xds_tls: Option<XdsTls>,
    /// The CA that signs workload certificates on the TLS port.
    pub ca: CaOptions,
    /// Istio's MeshConfig: trust domain and aliases, auto mTLS.
    pub mesh: sluice_translator::model::mesh_config::MeshConfig,
    /// Monitoring HTTP address.
    pub monitoring_addr: SocketAddr,
    /// sled state directory.
    pub state_dir: Option<PathBuf>,
    /// Quiet time after a file change before reloading.
    pub debounce: Duration,
    /// The longest a reload waits under continuous changes (Istio caps its debounce too).
    pub max_debounce: Duration,
    /// Delta responses are split at about this many bytes (0: never).
    pub delta_chunk_bytes: usize,
    /// `control_plane.identifier` of every xDS response (Envoy shows it in its config dump, so
    /// an operator can tell which replica served a proxy).
    pub identifier: String,
}

/// How often the config roots are checked for having been deleted, recreated or replaced.
const ROOT_RECHECK: Duration = Duration::from_secs(1);

/// How often serve looks whether streams closed, to give their memory back.
const TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// The notify watches on the config roots. Each root is watched (recursively, if a directory)
/// together with its parent, so that its own deletion, creation and rename are seen; an inotify
/// watch follows the directory it was made on, so a root whose identity changed (recreated, or
/// replaced by a rename) is watched again.
struct RootWatches {
    watcher: notify::RecommendedWatcher,
    /// Each root and the identity (device, inode) it is watched at; None: not watched.
    roots: Vec<(PathBuf, Option<(u64, u64)>)>,
    /// Parents watched.
    parents: std::collections::BTreeSet<PathBuf>,
}

impl RootWatches {
    fn new(watcher: notify::RecommendedWatcher, roots: &[PathBuf]) -> Self {
        Self { watcher, roots: roots.iter().map(|r| (r.clone(), None)).collect(), parents: Default::default() }
    }

    /// Watches what is not watched as it is now. True when a root changed identity (a reload
    /// is due).
    fn refresh(&mut self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let mut changed = false;
        for (root, watched) in &mut self.roots {
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty())
                && !self.parents.contains(parent)
                && self.watcher.watch(parent, RecursiveMode::NonRecursive).is_ok()
            {
                self.parents.insert(parent.to_path_buf());
            }
            let now = std::fs::metadata(&*root).ok().map(|m| (m.dev(), m.ino()));
            if now == *watched {
                continue;
            }
            changed = true;
            if watched.is_some() {
                let _ = self.watcher.unwatch(root);
            }
            *watched = None;
            if let Some(identity) = now {
                let mode = if root.is_dir() { RecursiveMode::Recursive } else { RecursiveMode::NonRecursive };
                match self.watcher.watch(root, mode) {
                    Ok(()) => *watched = Some(identity),
                    Err(e) => tracing::warn!(path = %root.display(), error = %e, "cannot watch; checking again"),
                }
            } else {
                tracing::warn!(path = %root.display(), "config root missing; serving what was read from it");
            }
        }
        changed
    }
}

struct Pipeline {
    config: Vec<PathBuf>,
    files: Mutex<crate::file_source::FileCache>,
    kube: Option<Arc<Mutex<KubeCache>>>,
    store: Arc<Mutex<ConfigStore>>,
    generator: Arc<MeshGenerator>,
    xds: XdsServer,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    /// The snapshot's cross-object diagnostics, for the status writer (which has each object's
    /// own with the object).
    findings: watch::Sender<Arc<Vec<Diagnostic>>>,
}

impl Pipeline {
    /// Reloads the sources; on change, updates the snapshot and pushes. `seen` is when the
    /// change was noticed.
    fn reload(&self, seen: Instant) -> anyhow::Result<()> {
        let mut reads = Vec::new();
        let mut complete = Vec::new();
        let started = Instant::now();
        if let Some(kube) = &self.kube {
            let mut kube = kube.lock().expect("kube cache lock");
            if !kube.synced() {
                // A load now would read as the deletion of every kind not listed yet.
                tracing::debug!(waiting_for = ?kube.pending(), "waiting for the first list of every kind");
                return Ok(());
            }
            let (kube_reads, all) = kube.take_reads();
            reads.extend(kube_reads.into_iter().map(|r| (Source::Kube, r)));
            if all {
                complete.push(Source::Kube);
            }
        }
        if !self.config.is_empty() {
            let (file_reads, all) = self.files.lock().expect("file cache lock").reload(&self.config);
            reads.extend(file_reads.into_iter().map(|r| (Source::Files, r)));
            if all {
                complete.push(Source::Files);
            }
        }
        for d in reads.iter().flat_map(|(_, (_, read))| read.iter().flat_map(|(_, d)| d)) {
            match d.severity {
                Severity::Error => tracing::warn!("{d}"),
                Severity::Warning => tracing::debug!("{d}"),
            }
        }
        let read = started.elapsed();
        let mut store = self.store.lock().expect("store lock");
        let delta = store.apply(reads, &complete).unwrap_or_else(|e| {
            // The new config is in the snapshot; what it changed is lost with the error, so
            // every proxy's config is built again.
            tracing::error!(error = %e, "the state directory could not be written; serving the new config anyway");
            Some(SnapshotDelta { rebuild: true, ..Default::default() })
        });
        let rejected = store.rejected();
        self.metrics.loaded(rejected);
        let Some(delta) = delta else {
            self.ready.store(true, Ordering::Release);
            tracing::debug!("config unchanged");
            // Status may still be due: an object rejected now leaves the config as it was.
            self.findings.send_modify(|_| {});
            return Ok(());
        };
        let snapshot = store.snapshot();
        self.findings.send_replace(Arc::new(snapshot.diagnostics()));
        let version = store.version();
        let objects = store.len();
        self.metrics.config_changed(version, seen);
        let services = delta.services.len();
        let stored = started.elapsed();
        self.generator.set(Current { version, snapshot }, delta);
        self.generator.adopt(store.checked());
        // Ready once proxies are given the loaded config, not before; and before the store is
        // let go, so whoever sees the loaded config (`/debug/configz`) also sees ready.
        self.ready.store(true, Ordering::Release);
        drop(store);
        let generated = started.elapsed();
        let pushed = self.xds.refresh();
        tracing::info!(
            version,
            objects,
            rejected,
            services_changed = services,
            proxies_updated = pushed,
            read_us = read.as_micros() as u64,
            store_us = (stored - read).as_micros() as u64,
            generate_us = (generated - stored).as_micros() as u64,
            push_us = (started.elapsed() - generated).as_micros() as u64,
            noticed_us = started.duration_since(seen).as_micros() as u64,
            "config loaded"
        );
        Ok(())
    }
}

/// Runs until `shutdown` resolves.
pub async fn serve(
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (mut store, recovered) = ConfigStore::open_recovering(options.state_dir.as_deref())?;
    store.set_mesh(options.mesh.clone());
    if let Some(said) = recovered {
        tracing::warn!("{said}");
    }
    let from_state = !store.is_empty();
    let current = Current { version: store.version(), snapshot: store.snapshot() };
    let generator = Arc::new(MeshGenerator::with_interner(current, store.interner()));
    let metrics = Arc::new(Metrics::new());
    metrics.config_changed(store.version(), Instant::now());
    let xds = XdsServer::new(generator.clone(), metrics.clone())
        .with_delta_chunk_bytes(options.delta_chunk_bytes)
        .with_identifier(options.identifier.clone());
    let store = Arc::new(Mutex::new(store));
    let ready = Arc::new(AtomicBool::new(from_state));
    if from_state {
        tracing::info!(version = generator.version(), "serving the last good config from the state directory");
    }

    let xds_listener = tokio::net::TcpListener::bind(options.xds_addr)
        .await
        .with_context(|| format!("binding xDS address {}", options.xds_addr))?;
    let monitoring_listener = tokio::net::TcpListener::bind(options.monitoring_addr)
        .await
        .with_context(|| format!("binding monitoring address {}", options.monitoring_addr))?;
    tracing::info!(xds = %xds_listener.local_addr()?, monitoring = %monitoring_listener.local_addr()?,
        "listening (xDS here is plaintext and unauthenticated: for local proxies only)");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let xds_task = {
        let xds = xds.clone();
        let stop = wait(stop_rx.clone());
        tokio::spawn(async move { xds.serve(xds_listener, stop).await })
    };
    // The CA's root, for the istio-ca-root-cert ConfigMaps (with Kubernetes and a CA).
    let mut root_pem = None;
    let xds_tls_task = match &options.xds_tls {
        Some(tls) => {
            let trust_domain = &options.mesh.trust_domain;
            let ca = match &options.kube {
                // In Kubernetes the root is kept where every replica finds it, as istiod keeps it.
                Some(kube) if options.ca.ca_dir.is_none() => {
                    crate::ca_secret::open(kube.client.clone(), &kube.own_namespace, trust_domain)
                        .await?
                        .with_policy(options.ca.policy)
                }
                _ => open_ca(&options.ca, trust_domain, options.state_dir.as_deref())?,
            };
            root_pem = Some(ca.root_pem().to_string());
            let ca = Arc::new(ca);
            if let Some(state) = &options.state_dir {
                // The trust bundle, for workloads and operators without a cluster (in Kubernetes
                // the ConfigMap istio-ca-root-cert holds it).
                let path = state.join("root-cert.pem");
                std::fs::write(&path, ca.root_pem()).with_context(|| format!("writing {}", path.display()))?;
            }
            let config = tls.config(&ca, &options.ca.serving_names)?;
            let tokens = match &options.ca.node_tokens {
                Some(path) => NodeTokens::load(path)?,
                None => NodeTokens::default(),
            };
            let mut authenticator = MeshAuthenticator::new(tokens, generator.clone());
            if let Some(kube) = &options.kube {
                authenticator = authenticator
                    .with_token_review(kube.client.clone(), trust_domain)
                    .with_node_accounts(options.ca.node_accounts.iter().cloned());
            }
            let authenticator = Arc::new(authenticator);
            let authorizer: Arc<dyn sluice_xds::authorization::Authorizer> =
                Arc::new(crate::certificates::XdsAuthorizer::new(authenticator.clone()));
            let csr = CertificateService::new(ca, authenticator, &options.mesh.trust_domain);
            let listener = tokio::net::TcpListener::bind(tls.addr)
                .await
                .with_context(|| format!("binding xDS TLS address {}", tls.addr))?;
            tracing::info!(xds_tls = %listener.local_addr()?, mutual = tls.client_ca.is_some(),
                "listening (xDS and Istio's CSR API; a caller has only the config of its own proxies)");
            let (xds, stop) = (xds.clone(), wait(stop_rx.clone()));
            let extra = tonic::service::Routes::new(csr);
            Some(tokio::spawn(async move { xds.serve_tls(listener, config, extra, Some(authorizer), stop).await }))
        }
        None => None,
    };
    let monitor =
        Arc::new(Monitor { metrics: metrics.clone(), xds: xds.clone(), store: store.clone(), ready: ready.clone() });
    // When streams go away (proxies restarted, or silent ones dropped), what they held is
    // given back to the system, not kept resident for the next crowd.
    let trim_task = {
        let (xds, mut stop) = (xds.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TRIM_INTERVAL);
            let mut watch = crate::allocator::TrimAfterStreams::default();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|stop| *stop) => return,
                }
                if watch.look(xds.closed()) {
                    tokio::task::spawn_blocking(crate::allocator::trim);
                }
            }
        })
    };
    let monitoring_task = {
        let stop = wait(stop_rx.clone());
        tokio::spawn(
            async move { axum::serve(monitoring_listener, router(monitor)).with_graceful_shutdown(stop).await },
        )
    };

    let (findings_tx, findings_rx) = watch::channel(Arc::new(Vec::new()));
    let kube_cache = options.kube.as_ref().map(|_| Arc::new(Mutex::new(KubeCache::default())));
    let pipeline = Arc::new(Pipeline {
        config: options.config.clone(),
        files: Mutex::default(),
        kube: kube_cache.clone(),
        store,
        generator,
        xds,
        metrics,
        ready: ready.clone(),
        findings: findings_tx,
    });
    // Watch before the first load so no change between the two is missed.
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut kube_tasks = Vec::new();
    if let (Some(kube), Some(cache)) = (&options.kube, &kube_cache) {
        kube_tasks =
            crate::kube_source::spawn(kube.client.clone(), kube.watch.clone(), cache.clone(), events_tx.clone());
        let mut leader = None;
        if let Some(lease) = &kube.lease {
            let (leader_tx, leader_rx) = watch::channel(false);
            let api = kube::Api::namespaced(kube.client.clone(), &lease.namespace);
            kube_tasks.push(tokio::spawn(crate::lease::run(api, lease.clone(), leader_tx)));
            kube_tasks.push(tokio::spawn(crate::status::run_writer(
                kube.client.clone(),
                cache.clone(),
                findings_rx,
                leader_rx.clone(),
            )));
            leader = Some(leader_rx);
        }
        if let Some(root) = root_pem {
            // Watching one namespace: the bundle goes there, and to the control plane's own,
            // where the node agents mount it.
            let mut scopes = vec![kube.watch.namespace.clone()];
            if kube.watch.namespace.as_ref().is_some_and(|only| *only != kube.own_namespace) {
                scopes.push(Some(kube.own_namespace.clone()));
            }
            for only in scopes {
                let (client, root, leader) = (kube.client.clone(), root.clone(), leader.clone());
                kube_tasks.push(tokio::spawn(crate::root_cert::run(client, root, only, leader)));
            }
        }
    }
    let state_dir = options.state_dir.clone().map(|d| d.canonicalize().unwrap_or(d));
    // Events may name a path as it was given (relative) or absolute: match either.
    let roots: Vec<PathBuf> =
        options.config.iter().flat_map(|r| [r.clone(), std::path::absolute(r).unwrap_or_else(|_| r.clone())]).collect();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        let relevant = matches!(event.kind, EventKind::Create(_) | EventKind::Remove(_))
            || matches!(event.kind, EventKind::Modify(k) if !matches!(k, notify::event::ModifyKind::Metadata(_)));
        let in_state = state_dir.as_ref().is_some_and(|s| event.paths.iter().all(|p| p.starts_with(s)));
        // The roots' parents are watched too (for the roots' own deletion and creation): their
        // other entries are not config.
        let in_config = event.paths.iter().any(|p| roots.iter().any(|r| p.starts_with(r)));
        if relevant && !in_state && in_config {
            let _ = events_tx.send(Instant::now());
        }
    })
    .context("starting the file watcher")?;
    let watches = Arc::new(Mutex::new(RootWatches::new(watcher, &options.config)));
    watches.lock().expect("watches lock").refresh();
    {
        let p = pipeline.clone();
        tokio::task::spawn_blocking(move || p.reload(Instant::now())).await??;
    }

    let (debounce, max_debounce) = (options.debounce, options.max_debounce);
    let reloader = {
        let p = pipeline.clone();
        let mut stop = stop_rx.clone();
        let watches = watches.clone();
        tokio::spawn(async move {
            // A root deleted, recreated or swapped in by a rename is watched again within a
            // tick (its inotify watch died with the directory it was made on).
            let mut tick = tokio::time::interval(ROOT_RECHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let seen = tokio::select! {
                    e = events.recv() => match e { Some(t) => t, None => break },
                    _ = tick.tick() => {
                        if !watches.lock().expect("watches lock").refresh() {
                            continue;
                        }
                        Instant::now()
                    }
                    _ = stop.wait_for(|s| *s) => break,
                };
                // Coalesce a burst of changes into one reload, waiting at most `max_debounce`.
                // Without a debounce, only what is already queued: a zero timeout still waits
                // for the timer's next millisecond.
                if debounce.is_zero() {
                    while events.try_recv().is_ok() {}
                } else {
                    let started = tokio::time::Instant::now();
                    loop {
                        let left = max_debounce.saturating_sub(started.elapsed());
                        if left.is_zero() {
                            break;
                        }
                        match tokio::time::timeout(debounce.min(left), events.recv()).await {
                            Ok(Some(_)) => continue,
                            _ => break,
                        }
                    }
                }
                watches.lock().expect("watches lock").refresh();
                let p = p.clone();
                match tokio::task::spawn_blocking(move || p.reload(seen)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "reload failed"),
                    Err(e) => tracing::error!(error = %e, "reload task failed"),
                }
            }
        })
    };

    shutdown.await;
    tracing::info!("shutting down");
    for task in &kube_tasks {
        task.abort();
    }
    drop(watches);
    let _ = stop_tx.send(true);
    let _ = reloader.await;
    xds_task.await?.context("xDS server")?;
    if let Some(task) = xds_tls_task {
        task.await?.context("xDS TLS server")?;
    }
    monitoring_task.await?.context("monitoring server")?;
    trim_task.abort();
    Ok(())
}
