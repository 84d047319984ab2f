//! `sluice`: the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_controlplane::{load_config, translate_config_dump};
use sluice_translator::diagnostic::Severity;

/// sluice: an Istio-compatible service-mesh control plane.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the Envoy resources one proxy gets, as Envoy's /config_dump JSON.
    Translate {
        /// Config files or directories (YAML, as for kubectl apply); may repeat.
        #[arg(long, required = true)]
        config: Vec<PathBuf>,
        /// Proxy node id: sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local
        #[arg(long)]
        proxy: String,
    },
    /// Serve xDS to Envoy proxies from a config directory, watching it for changes.
    Serve {
        /// Config files or directories; may repeat.
        #[arg(long, required = true)]
        config: Vec<PathBuf>,
        /// xDS (gRPC, plaintext) address.
        #[arg(long, default_value = "127.0.0.1:15010")]
        xds_addr: std::net::SocketAddr,
        /// Monitoring address (/ready, /metrics, /debug/syncz, /debug/configz).
        #[arg(long, default_value = "127.0.0.1:15014")]
        monitoring_addr: std::net::SocketAddr,
        /// Directory where the last good config and the version live (sled).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Quiet time after a file change before reloading, in milliseconds.
        #[arg(long, default_value_t = 100)]
        debounce_ms: u64,
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
    },
    /// Check config: print every rejected object and every warning; fail if any was rejected.
    Validate {
        /// Config files or directories; may repeat.
        #[arg(long, required = true)]
        config: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
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

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Translate { config, proxy } => {
            let loaded = load_config(&config);
            for d in &loaded.diagnostics {
                eprintln!("{d}");
            }
            let (dump, resources) = translate_config_dump(&loaded.snapshot, &proxy).context("translating")?;
            for d in &resources.diagnostics {
                eprintln!("{d}");
            }
            println!("{}", serde_json::to_string_pretty(&dump)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { config, xds_addr, monitoring_addr, state_dir, debounce_ms } => {
            let options = sluice_controlplane::serve::ServeOptions {
                config,
                xds_addr,
                monitoring_addr,
                state_dir,
                debounce: std::time::Duration::from_millis(debounce_ms),
            };
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(sluice_controlplane::serve::serve(options, shutdown_signal()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bootstrap { proxy, xds_addr, admin_port, delta } => {
            let options = sluice_controlplane::bootstrap::BootstrapOptions { proxy, xds_addr, admin_port, delta };
            let b = sluice_controlplane::bootstrap::bootstrap(&options).map_err(anyhow::Error::msg)?;
            println!("{}", serde_json::to_string_pretty(&b)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { config } => {
            let loaded = load_config(&config);
            let errors = loaded.diagnostics.iter().filter(|d| d.severity == Severity::Error).count();
            for d in &loaded.diagnostics {
                println!("{d}");
            }
            let warnings = loaded.diagnostics.len() - errors;
            println!("{errors} rejected, {warnings} warnings");
            Ok(if errors > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
