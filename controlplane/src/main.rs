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
