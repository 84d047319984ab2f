//! `sluice-bench`: benchmarks that print tables for BENCHMARKS.md. Root for the ones that touch
//! the kernel (they use their own cgroup, pins and network namespace and remove them after).

mod agent;
mod ca;
mod convergence;
mod datapath;
mod maps;
mod mesh;
mod parse;
mod stats;
mod translate;

use clap::{Parser, Subcommand};

/// sluice's benchmarks.
#[derive(Parser)]
#[command(about)]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Translation time and peak memory for S services (each size in its own process).
    Translate {
        /// Sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        services: Vec<usize>,
        /// Runs per size.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Parse time of large and hostile files.
    Parse {
        /// Size of each input.
        #[arg(long, default_value_t = 1 << 20)]
        bytes: usize,
        /// Runs per input.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Only the inputs whose name contains this (for a profiler's run).
        #[arg(long)]
        only: Option<String>,
    },
    /// The CA: certificates signed per second, and one node agent rotating many workload
    /// certificates over Istio's CSR API.
    Ca {
        /// CSRs signed per run (in process).
        #[arg(long, default_value_t = 2000)]
        signs: usize,
        /// Workload certificates the agent gets per run.
        #[arg(long, default_value_t = 1000)]
        workloads: usize,
        /// Requests in flight.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Runs.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// (internal) one size of `translate`.
    #[command(hide = true)]
    TranslateOne {
        #[arg(long)]
        services: usize,
        #[arg(long)]
        runs: usize,
    },
    /// Map programming (root): full sync and one endpoint change.
    Maps {
        /// Services.
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        /// Endpoints per service.
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
        /// Runs.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// The real agent at scale (root): RSS, map memory, file write → map update.
    Agent {
        /// Services.
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        /// Endpoints per service.
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
        /// Endpoint changes to time.
        #[arg(long, default_value_t = 10)]
        changes: usize,
    },
    /// Data path latency (root): direct, kernel VIP, iptables DNAT, sidecar pair.
    Datapath {
        /// Requests per path and run.
        #[arg(long, default_value_t = 2000)]
        count: usize,
        /// Requests per second.
        #[arg(long, default_value_t = 500)]
        rate: u32,
        /// Runs.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Control-plane convergence: N ADS clients, S services.
    Convergence {
        /// Client counts, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
        clients: Vec<usize>,
        /// Service counts, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        services: Vec<usize>,
        /// Pushes per point.
        #[arg(long, default_value_t = 5)]
        pushes: usize,
        /// Clients that subscribe and never answer, added once the others are synced.
        #[arg(long, default_value_t = 0)]
        silent: usize,
        /// The clients use the TLS port (istiod's 15012) with a mesh client certificate from
        /// sluice's own CA, as sidecars do, instead of plaintext 15010.
        #[arg(long)]
        tls: bool,
        /// The clients are proxyless gRPC clients (node metadata GENERATOR: grpc, SotW,
        /// subscribing by name) instead of Envoys.
        #[arg(long)]
        proxyless: bool,
        /// With --proxyless: how many services each client dials (default: all).
        #[arg(long, requires = "proxyless")]
        dials: Option<usize>,
    },
    /// (internal) the data path's echo backend.
    #[command(hide = true)]
    Echo {
        #[arg(long)]
        addr: String,
    },
    /// (internal) the data path's load client.
    #[command(hide = true)]
    Client {
        #[arg(long)]
        target: String,
        #[arg(long)]
        host: String,
        #[arg(long)]
        persistent: bool,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        rate: u32,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Bench::Translate { services, runs } => {
            println!("machine: {}\n", stats::machine());
            translate::run(&services, runs)
        }
        Bench::TranslateOne { services, runs } => translate::one(services, runs),
        Bench::Parse { bytes, runs, only } => {
            println!("machine: {}\n", stats::machine());
            parse::run(bytes, runs, only.as_deref())
        }
        Bench::Ca { signs, workloads, concurrency, runs } => {
            println!("machine: {}\n", stats::machine());
            ca::run(signs, workloads, concurrency, runs)
        }
        Bench::Maps { services, endpoints, runs } => {
            println!("machine: {}\n", stats::machine());
            maps::run(services, endpoints, runs)
        }
        Bench::Agent { services, endpoints, changes } => {
            println!("machine: {}\n", stats::machine());
            agent::run(&std::env::current_exe()?.with_file_name("sluice"), services, endpoints, changes)
        }
        Bench::Datapath { count, rate, runs } => {
            println!("machine: {}", stats::machine());
            datapath::run(count, rate, runs)
        }
        Bench::Convergence { clients, services, pushes, silent, tls, proxyless, dials } => {
            println!("machine: {}\n", stats::machine());
            let sluice = std::env::current_exe()?.with_file_name("sluice");
            convergence::run(&sluice, &clients, &services, pushes, silent, tls, proxyless.then_some(dials))
        }
        Bench::Echo { addr } => datapath::echo(&addr),
        Bench::Client { target, host, persistent, count, rate } => {
            datapath::client(&target, &host, persistent, count, rate)
        }
    }
}
