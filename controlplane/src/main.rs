//! `sluice`: the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_controlplane::{load_config, translate_json};
use sluice_translator::diagnostic::Severity;
use sluice_translator::envoy::{Certificates, XdsClient};
use sluice_translator::model::mesh_config::MeshConfig;

/// sluice: an Istio-compatible service-mesh control plane.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the size of the `serve` variant costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Print the Envoy resources one proxy gets, as Envoy's /config_dump JSON.
    Translate {
        /// Config files or directories (YAML, as for kubectl apply); may repeat.
        #[arg(long, required = true)]
        config: Vec<PathBuf>,
        /// Proxy node id: sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local, or
        /// agent~<node> for a node agent's kernel entries (printed as JSON)
        #[arg(long)]
        proxy: String,
        /// Translate for a proxy that holds its workload certificate (bootstrapped with
        /// `--sds-socket`): mesh mTLS in its clusters and inbound chains.
        #[arg(long)]
        sds: bool,
        /// Translate for a proxyless gRPC client or server (node metadata `GENERATOR: grpc`):
        /// what gRPC's own xDS client gets.
        #[arg(long, conflicts_with = "sds")]
        grpc: bool,
        /// Istio's MeshConfig YAML (trustDomain, trustDomainAliases, enableAutoMtls).
        #[arg(long)]
        mesh_config: Option<PathBuf>,
    },
    /// Serve xDS to Envoy proxies from config files (watched for changes) and/or a Kubernetes API
    /// server.
    Serve {
        /// Config files or directories; may repeat.
        #[arg(long, required_unless_present_any = ["kube", "kubeconfig"])]
        config: Vec<PathBuf>,
        /// Read from the Kubernetes API server: $KUBECONFIG, ~/.kube/config or the in-cluster
        /// service account.
        #[arg(long)]
        kube: bool,
        /// Read from the Kubernetes API server of this kubeconfig file.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Watch only this namespace (Kubernetes source).
        #[arg(long)]
        namespace: Option<String>,
        /// The control plane's own namespace, where its leader-election Lease and its CA Secret
        /// `istio-ca-secret` live (default: $POD_NAMESPACE in a pod, else the kubeconfig
        /// context's namespace, else `default`).
        #[arg(long)]
        lease_namespace: Option<String>,
        /// This replica's identity in the Lease (default: $POD_NAME, else the host name).
        #[arg(long)]
        identity: Option<String>,
        /// Do not write status on Istio objects (and do not take part in leader election).
        #[arg(long)]
        no_status: bool,
        /// xDS (gRPC, plaintext) address.
        #[arg(long, default_value = "127.0.0.1:15010")]
        xds_addr: std::net::SocketAddr,
        /// Also serve xDS over TLS on this address (istiod's 15012); needs --tls-cert and --tls-key.
        #[arg(long)]
        xds_tls_addr: Option<std::net::SocketAddr>,
        /// PEM certificate chain for --xds-tls-addr (default: one sluice's CA issues).
        #[arg(long, requires_all = ["tls_key", "xds_tls_addr"])]
        tls_cert: Option<PathBuf>,
        /// PEM private key for --xds-tls-addr.
        #[arg(long, requires_all = ["tls_cert", "xds_tls_addr"])]
        tls_key: Option<PathBuf>,
        /// DNS names of the serving certificate the CA issues for --xds-tls-addr (repeatable).
        #[arg(long = "tls-dns-name")]
        tls_dns_names: Vec<String>,
        /// Istio's plug-in CA directory (ca-cert.pem, ca-key.pem, cert-chain.pem,
        /// root-cert.pem); default: a self-signed root kept in Secret istio-ca-secret with
        /// --kube, else in --state-dir/ca.
        #[arg(long)]
        ca_dir: Option<PathBuf>,
        /// Use --ca-dir only if it holds any plug-in file (an optional Secret `cacerts` mounted
        /// there), else the self-signed root, as istiod does with /etc/cacerts.
        #[arg(long, requires = "ca_dir")]
        ca_dir_if_present: bool,
        /// Istio's MeshConfig YAML (trustDomain, trustDomainAliases, enableAutoMtls; Istio's
        /// defaults when absent).
        #[arg(long)]
        mesh_config: Option<PathBuf>,
        /// Istio's defaults when the --mesh-config file does not exist (an optional mount of
        /// ConfigMap `istio`, key `mesh`, as istiod reads it), instead of an error.
        #[arg(long, requires = "mesh_config")]
        mesh_config_if_present: bool,
        /// Node agents' tokens for the CSR API: lines of `<node name> <token>`.
        #[arg(long)]
        node_tokens: Option<PathBuf>,
        /// With --kube: a node agents' service account, `<namespace>/<name>` (repeatable; as
        /// istiod's CA_TRUSTED_NODE_ACCOUNTS): its pod-bound tokens act for the pod's node.
        #[arg(long = "trusted-node-account", value_parser = node_account)]
        trusted_node_accounts: Vec<(String, String)>,
        /// Workload certificate lifetime when a request does not say, in seconds (istiod: 24 h).
        #[arg(long, default_value_t = 24 * 3600)]
        default_cert_ttl_s: u64,
        /// The longest workload certificate lifetime a request may ask for, in seconds
        /// (istiod: 90 days); longer requests are refused.
        #[arg(long, default_value_t = 90 * 24 * 3600)]
        max_cert_ttl_s: u64,
        /// PEM CA bundle: clients of --xds-tls-addr must present a certificate it signed (mTLS).
        #[arg(long)]
        tls_client_ca: Option<PathBuf>,
        /// Monitoring address (/ready, /metrics, /debug/syncz, /debug/configz).
        #[arg(long, default_value = "127.0.0.1:15014")]
        monitoring_addr: std::net::SocketAddr,
        /// Directory where the last good config and the version live (sled).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Quiet time after a file change before reloading, in milliseconds.
        #[arg(long, default_value_t = 100)]
        debounce_ms: u64,
        /// The longest a reload waits while changes keep coming, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        max_debounce_ms: u64,
        /// Split Delta xDS responses (Envoy's and the node agents') into parts of about this many
        /// bytes, so a large initial sync holds a part per stream in memory, not the whole config
        /// (0: never).
        #[arg(long, default_value_t = sluice_xds::server::DELTA_CHUNK_BYTES)]
        delta_chunk_bytes: usize,
    },
    /// Print an Envoy bootstrap that gets everything from sluice over ADS.
    Bootstrap {
        /// Proxy node id: sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local
        #[arg(long)]
        proxy: String,
        /// sluice's xDS address.
        #[arg(long, default_value = "127.0.0.1:15010")]
        xds_addr: String,
        /// Envoy admin port (on 127.0.0.1).
        #[arg(long, default_value_t = 15000)]
        admin_port: u16,
        /// Use Delta xDS (DELTA_GRPC) instead of State-of-the-World.
        #[arg(long)]
        delta: bool,
        /// The node agent's SDS socket (`sluice agent --sds-socket`): adds the sds-grpc cluster.
        #[arg(long)]
        sds_socket: Option<String>,
        /// Write gRPC's xDS bootstrap (for GRPC_XDS_BOOTSTRAP) for a proxyless gRPC client or
        /// server instead of Envoy's.
        #[arg(long, conflicts_with_all = ["delta", "sds_socket"])]
        grpc: bool,
        /// With --grpc: the directory of the workload's certificate files (cert-chain.pem,
        /// key.pem, root-cert.pem), for mTLS through gRPC's file_watcher certificate provider.
        #[arg(long, requires = "grpc")]
        cert_dir: Option<PathBuf>,
    },
    /// The node agent (root): loads sluice's eBPF programs and keeps their maps in sync with the
    /// control plane. `sluice agent dump` prints the maps; `sluice agent detach` removes it all.
    Agent(AgentArgs),
    /// Run a command as a mesh workload: in a new cgroup the agent knows as <name>.<namespace>.
    Run {
        /// `<name>.<namespace>` of a Pod or WorkloadEntry in the config.
        #[arg(long)]
        workload: String,
        /// The agent's local socket.
        #[arg(long, default_value = sluice_dataplane::socket::DEFAULT_SOCKET)]
        agent_socket: PathBuf,
        /// Keep the workload's certificate files (cert-chain.pem, key.pem, root-cert.pem) in
        /// this directory, from the agent's SDS, for as long as the command runs: what a
        /// proxyless gRPC application's file_watcher provider reads (`sluice bootstrap --grpc
        /// --cert-dir`).
        #[arg(long, requires = "sds_socket")]
        cert_dir: Option<PathBuf>,
        /// The agent's SDS socket (`sluice agent --sds-socket`), for --cert-dir.
        #[arg(long)]
        sds_socket: Option<PathBuf>,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Write the CustomResourceDefinitions for the Istio kinds sluice reads (one file each).
    Crds {
        /// Directory to write to (created if absent); without it, print them all.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check config: print every rejected object and every warning; fail if any was rejected.
    Validate {
        /// Config files or directories; may repeat.
        #[arg(long, required = true)]
        config: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
struct AgentArgs {
    #[command(subcommand)]
    action: Option<AgentAction>,
    /// The control plane's xDS address.
    #[arg(long, default_value = "127.0.0.1:15010")]
    xds_addr: String,
    /// This node's name (default: the host name); the agent's node id is agent~<name>.
    #[arg(long)]
    node: Option<String>,
    /// The cgroup to attach to (default: the cgroup2 root).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Where programs and maps are pinned.
    #[arg(long, global = true, default_value = "/sys/fs/bpf/sluice")]
    pin_dir: PathBuf,
    /// Metrics address.
    #[arg(long, default_value = sluice_dataplane::metrics::DEFAULT_ADDR)]
    metrics_addr: std::net::SocketAddr,
    /// The local socket `sluice run` asks for workload cgroups.
    #[arg(long, default_value = sluice_dataplane::socket::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// The per-node proxy's IP: node-mode workloads' connects to services with L7 routing go
    /// there, on the service's port (an Envoy from `sluice bootstrap` whose Sidecar binds
    /// its egress listeners on this IP).
    #[arg(long)]
    node_proxy: Option<std::net::IpAddr>,
    /// Serve workload certificates over SDS on this Unix socket (keys are made here and signed
    /// by the CA at --ca-addr, as this node's agent).
    #[arg(long, requires_all = ["ca_addr", "ca_root", "node_token_file"])]
    sds_socket: Option<PathBuf>,
    /// The CA (the control plane's TLS port), host:port or https://host:port.
    #[arg(long)]
    ca_addr: Option<String>,
    /// The PEM root the CA's certificate chains to (the control plane's <state dir>/root-cert.pem).
    #[arg(long)]
    ca_root: Option<PathBuf>,
    /// The name in the CA's serving certificate.
    #[arg(long, default_value = "istiod.istio-system.svc")]
    ca_name: String,
    /// The file holding this node's token (a line of the control plane's --node-tokens).
    #[arg(long)]
    node_token_file: Option<PathBuf>,
    /// The mesh's trust domain.
    #[arg(long, default_value = sluice_identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Workload certificate lifetime to ask for, in seconds (default: the CA's, 24 h).
    #[arg(long)]
    workload_cert_ttl_s: Option<u64>,
    /// Load no eBPF programs: only make workload cgroups for `sluice run` and serve SDS (for
    /// meshes that run only sidecars).
    #[arg(long, requires = "sds_socket")]
    sds_only: bool,
}

#[derive(Subcommand)]
enum AgentAction {
    /// Print every map in readable form.
    Dump,
    /// Detach the programs and remove the pins (connections then go where they were dialled).
    Detach,
}

fn main() -> ExitCode {
    sluice_controlplane::allocator::tune();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The MeshConfig in `path`, or Istio's defaults.
fn read_mesh_config(path: Option<&std::path::Path>) -> anyhow::Result<MeshConfig> {
    let Some(path) = path else { return Ok(MeshConfig::default()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (mesh, ignored) = MeshConfig::from_yaml(&text).with_context(|| format!("{}", path.display()))?;
    if !ignored.is_empty() {
        tracing::info!(file = %path.display(), fields = ?ignored, "MeshConfig fields sluice does not read");
    }
    Ok(mesh)
}

/// `sluice run --cert-dir`: this process, in the workload's cgroup, keeps the workload's
/// certificate files current (the agent knows it by that cgroup) and runs `command` as its
/// child once they are there; the child dies with it and its exit code is this one's.
// The one unsafe call: `pre_exec` to set the child's parent-death signal; std has no safe way.
#[allow(unsafe_code)]
fn run_with_certificate_files(
    workload: &str,
    sds: PathBuf,
    dir: PathBuf,
    command: &[String],
) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let keeper = tokio::spawn(sluice_dataplane::cert_files::keep(sds, dir.clone(), workload.to_string()));
        let chain = dir.join(sluice_dataplane::cert_files::CHAIN_FILE);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !chain.exists() {
            anyhow::ensure!(!keeper.is_finished(), "cannot keep the certificate files in {}", dir.display());
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "no certificate for {workload} from the agent within 30 s (see the warnings above)"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let mut cmd = std::process::Command::new(&command[0]);
        cmd.args(&command[1..]);
        // SAFETY: prctl is async-signal-safe; it makes the child die with this process, which
        // is what keeps its certificate fresh.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("running {:?}", command[0]))?;
        let waited = tokio::task::spawn_blocking(move || child.wait());
        tokio::select! {
            status = waited => {
                let status = status??;
                Ok(ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8))
            }
            failed = keeper => {
                let reason = match failed { Ok(e) => e.to_string(), Err(e) => e.to_string() };
                // The child is killed with this process (PR_SET_PDEATHSIG).
                Err(anyhow::anyhow!("the certificate files of {workload} can no longer be kept: {reason}"))
            }
        }
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Translate { config, proxy, sds, grpc, mesh_config } => {
            let mut loaded = load_config(&config);
            for d in &loaded.diagnostics {
                eprintln!("{d}");
            }
            loaded.snapshot.mesh = std::sync::Arc::new(read_mesh_config(mesh_config.as_deref())?);
            let certificates = if sds { Certificates::Sds } else { Certificates::None };
            let client = if grpc { XdsClient::ProxylessGrpc } else { XdsClient::Envoy };
            let (dump, diagnostics) =
                translate_json(&loaded.snapshot, &proxy, certificates, client).context("translating")?;
            for d in &diagnostics {
                eprintln!("{d}");
            }
            println!("{}", serde_json::to_string_pretty(&dump)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            config,
            kube,
            kubeconfig,
            namespace,
            lease_namespace,
            identity,
            no_status,
            xds_addr,
            xds_tls_addr,
            tls_cert,
            tls_key,
            tls_dns_names,
            ca_dir,
            ca_dir_if_present,
            mesh_config,
            mesh_config_if_present,
            node_tokens,
            trusted_node_accounts,
            default_cert_ttl_s,
            max_cert_ttl_s,
            tls_client_ca,
            monitoring_addr,
            state_dir,
            debounce_ms,
            max_debounce_ms,
            delta_chunk_bytes,
        } => {
            let xds_tls = xds_tls_addr.map(|addr| sluice_controlplane::serve::XdsTls {
                addr,
                identity: tls_cert.zip(tls_key),
                client_ca: tls_client_ca,
            });
            anyhow::ensure!(
                default_cert_ttl_s <= max_cert_ttl_s,
                "--default-cert-ttl-s {default_cert_ttl_s} is longer than --max-cert-ttl-s {max_cert_ttl_s}"
            );
            let mesh_config = mesh_config.filter(|file| {
                let present = !mesh_config_if_present || file.exists();
                if !present {
                    tracing::info!(file = %file.display(), "no MeshConfig file: Istio's defaults");
                }
                present
            });
            let mesh = read_mesh_config(mesh_config.as_deref())?;
            let defaults = sluice_controlplane::certificates::CaOptions::default();
            let ca_dir = ca_dir.filter(|dir| {
                let present = !ca_dir_if_present || sluice_controlplane::certificates::plug_in_present(dir);
                if !present {
                    tracing::info!(dir = %dir.display(), "no plug-in CA files: the CA self-signs its root");
                }
                present
            });
            let ca = sluice_controlplane::certificates::CaOptions {
                ca_dir,
                node_tokens,
                node_accounts: trusted_node_accounts,
                serving_names: if tls_dns_names.is_empty() { defaults.serving_names } else { tls_dns_names },
                policy: sluice_identity::LeafPolicy {
                    default_ttl: std::time::Duration::from_secs(default_cert_ttl_s),
                    max_ttl: std::time::Duration::from_secs(max_cert_ttl_s),
                },
            };
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            let identity = identity.or_else(|| env("POD_NAME")).unwrap_or_else(host_name);
            let identifier = format!("sluice-{identity}");
            let kube = if kube || kubeconfig.is_some() {
                let client = runtime.block_on(kube_client(kubeconfig.as_deref()))?;
                let own_namespace = sluice_controlplane::lease::lease_namespace(lease_namespace, &client);
                let lease = (!no_status).then(|| {
                    tracing::info!(namespace = %own_namespace, "leader election Lease sluice-leader");
                    sluice_controlplane::lease::LeaseConfig::new(&own_namespace, &identity)
                });
                Some(sluice_controlplane::serve::KubeServe {
                    client,
                    watch: sluice_controlplane::kube_source::WatchOptions { namespace },
                    lease,
                    own_namespace,
                })
            } else {
                None
            };
            let options = sluice_controlplane::serve::ServeOptions {
                config,
                kube,
                xds_addr,
                xds_tls,
                ca,
                mesh,
                monitoring_addr,
                state_dir,
                debounce: std::time::Duration::from_millis(debounce_ms),
                max_debounce: std::time::Duration::from_millis(max_debounce_ms.max(debounce_ms)),
                delta_chunk_bytes,
                identifier,
            };
            runtime.block_on(sluice_controlplane::serve::serve(options, shutdown_signal()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bootstrap { proxy, xds_addr, grpc: true, cert_dir, .. } => {
            let b = sluice_controlplane::bootstrap::grpc_bootstrap(&proxy, &xds_addr, cert_dir.as_deref())
                .map_err(anyhow::Error::msg)?;
            println!("{}", serde_json::to_string_pretty(&b)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bootstrap { proxy, xds_addr, admin_port, delta, sds_socket, grpc: false, .. } => {
            let options =
                sluice_controlplane::bootstrap::BootstrapOptions { proxy, xds_addr, admin_port, delta, sds_socket };
            let b = sluice_controlplane::bootstrap::bootstrap(&options).map_err(anyhow::Error::msg)?;
            println!("{}", serde_json::to_string_pretty(&b)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(args) => agent(args),
        Command::Run { workload, agent_socket, cert_dir, sds_socket, command } => {
            use std::os::unix::process::CommandExt;
            let cgroup = sluice_dataplane::socket::register(&agent_socket, &workload)?;
            sluice_dataplane::cgroup::add_process(&cgroup, std::process::id())?;
            if let (Some(dir), Some(sds)) = (cert_dir, sds_socket) {
                return run_with_certificate_files(&workload, sds, dir, &command);
            }
            // exec only returns on failure; the command inherits this process's new cgroup.
            let err = std::process::Command::new(&command[0]).args(&command[1..]).exec();
            Err(anyhow::anyhow!("running {:?}: {err}", command[0]))
        }
        Command::Crds { out } => {
            for (file, crd) in sluice_controlplane::crds::crds() {
                let yaml = sluice_controlplane::crds::to_yaml(&crd);
                match &out {
                    Some(dir) => {
                        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                        let path = dir.join(file);
                        std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
                    }
                    None => print!("---\n{yaml}"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { config } => {
            let loaded = load_config(&config);
            let errors = loaded.diagnostics.iter().filter(|d| d.severity == Severity::Error).count();
            for d in &loaded.diagnostics {
                println!("{d}");
            }
            let warnings = loaded.diagnostics.len() - errors;
            // Left after the refusals only when objects together break a proxy.
            let stuck = sluice_controlplane::admission::ungeneratable(&loaded.snapshot, false);
            for s in &stuck {
                println!("error: cannot generate the config of proxy {}: {}", s.node, s.reason);
            }
            println!("{errors} rejected, {warnings} warnings");
            if !stuck.is_empty() {
                println!("{} proxies whose config cannot be generated", stuck.len());
            }
            Ok(if errors > 0 || !stuck.is_empty() { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
    }
}

fn agent(args: AgentArgs) -> anyhow::Result<ExitCode> {
    match args.action {
        Some(AgentAction::Dump) => {
            let maps = sluice_dataplane::loader::Maps::open(&args.pin_dir).with_context(|| {
                format!("opening the maps pinned in {} (is the agent attached?)", args.pin_dir.display())
            })?;
            print!("{}", sluice_dataplane::dump::links(&args.pin_dir));
            print!("{}", sluice_dataplane::dump::dump(&maps)?);
        }
        Some(AgentAction::Detach) => sluice_dataplane::loader::Dataplane::remove(&args.pin_dir)?,
        None => {
            let node = match args.node {
                Some(n) => n,
                None => host_name(),
            };
            let cgroup = match args.cgroup {
                Some(c) => c,
                None => sluice_dataplane::cgroup::cgroup2_mount()?,
            };
            let xds_addr =
                if args.xds_addr.contains("://") { args.xds_addr } else { format!("http://{}", args.xds_addr) };
            let config = sluice_dataplane::agent::AgentConfig {
                xds_addr,
                node,
                cgroup,
                pin_dir: args.pin_dir,
                metrics_addr: args.metrics_addr,
                socket: args.socket,
                node_proxy: args.node_proxy,
                sds: args.sds_socket.map(|socket| sluice_dataplane::agent::SdsConfig {
                    socket,
                    ca_addr: args
                        .ca_addr
                        .map_or_else(String::new, |a| if a.contains("://") { a } else { format!("https://{a}") }),
                    ca_root: args.ca_root.unwrap_or_default(),
                    ca_name: args.ca_name,
                    token_file: args.node_token_file.unwrap_or_default(),
                    trust_domain: args.trust_domain,
                    ttl: args.workload_cert_ttl_s.map(std::time::Duration::from_secs),
                }),
                programs: if args.sds_only {
                    sluice_dataplane::agent::Programs::Skip
                } else {
                    sluice_dataplane::agent::Programs::Load
                },
            };
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(sluice_dataplane::agent::run(config))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A Kubernetes client from `kubeconfig`, or inferred ($KUBECONFIG, ~/.kube/config, in-cluster).
async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context("finding a Kubernetes config (kubeconfig or in-cluster)")?,
    };
    kube::Client::try_from(config).context("creating the Kubernetes client")
}

/// `<namespace>/<service account>`.
fn node_account(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => Ok((ns.into(), sa.into())),
        _ => Err(format!("{s:?} is not <namespace>/<service account>")),
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "sluice".into())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
