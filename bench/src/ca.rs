//! The CA's cost. Signing: leaf certificates per second, in process (ECDSA P-256, Istio's leaf
//! rules). Rotation: one node agent getting `workloads` certificates as it does at renewal — a
//! key made on the node, a CSR, Istio's CSR API over TLS impersonating each workload, the answer
//! checked — with the CA in the same process, so the CPU and memory figures are both sides'.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use sluice_identity::service::{AuthError, Authenticator, BoxFuture, Caller, CertificateService, Credentials};
use sluice_identity::workload::{CertificateClient, IssuedCertificate};
use sluice_identity::{CertificateAuthority, SpiffeId};

use crate::stats::{cpu_seconds, status_kb, summary};

/// The one node agent (token `node-1`), running every workload.
struct OneNode;

impl Authenticator for OneNode {
    fn authenticate<'a>(&'a self, credentials: &'a Credentials) -> BoxFuture<'a, Result<Caller, AuthError>> {
        Box::pin(async move {
            match credentials.bearer_token.as_deref() {
                Some("node-1") => Ok(Caller::NodeAgent("node-1".into())),
                _ => Err(AuthError("not node-1's token".into())),
            }
        })
    }

    fn may_impersonate(&self, node: &str, _identity: &SpiffeId) -> bool {
        node == "node-1"
    }
}

fn identity(i: usize) -> SpiffeId {
    SpiffeId::new("cluster.local", &format!("ns-{}", i % 50), &format!("sa-{i}"))
}

/// Prints both tables.
pub fn run(signs: usize, workloads: usize, concurrency: usize, runs: usize) -> anyhow::Result<()> {
    let ca = Arc::new(CertificateAuthority::ephemeral("cluster.local")?);
    println!("CA signing, in process ({signs} CSRs per run, {runs} runs)\n");
    println!("| signed per second (min / median / max) | per certificate, ms (median) |");
    println!("|---|---|");
    let csrs: Vec<String> = (0..signs)
        .map(|_| {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            Ok(CertificateParams::new(vec![])?.serialize_request(&key)?.pem()?)
        })
        .collect::<anyhow::Result<_>>()?;
    let mut rates = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        for (i, csr) in csrs.iter().enumerate() {
            ca.sign(csr, &identity(i), None)?;
        }
        rates.push(signs as f64 / started.elapsed().as_secs_f64());
    }
    let (lo, mid, hi) = summary(&rates);
    println!("| {lo:.0} / {mid:.0} / {hi:.0} | {:.3} |\n", 1e3 / mid);

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(rotate(ca, workloads, concurrency, runs))
}

async fn rotate(
    ca: Arc<CertificateAuthority>,
    workloads: usize,
    concurrency: usize,
    runs: usize,
) -> anyhow::Result<()> {
    let (chain, key) = ca.serving_certificate(&["localhost".to_string()], Duration::from_secs(3600))?;
    let tls =
        tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(chain.concat(), key));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let service = CertificateService::new(ca.clone(), Arc::new(OneNode), "cluster.local");
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)?
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let client_tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca.root_pem()))
        .domain_name("localhost");
    let channel =
        tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?.tls_config(client_tls)?.connect().await?;
    let client = CertificateClient::new(channel, "node-1");
    let pid = std::process::id();
    println!(
        "One node agent rotating {workloads} workload certificates ({concurrency} in flight, CA in the same process)\n"
    );
    println!("| run | time, s | certificates per second | CPU, s (agent + CA) | RSS before → holding them, MB |");
    println!("|---|---|---|---|---|");
    for run in 1..=runs {
        let rss_before = status_kb(pid, "VmRSS").unwrap_or(0);
        let cpu_before = cpu_seconds(pid).unwrap_or(0.0);
        let started = Instant::now();
        let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..workloads {
            let (client, permit) = (client.clone(), semaphore.clone().acquire_owned().await?);
            tasks.spawn(async move {
                let issued = client.issue(&identity(i), None).await;
                drop(permit);
                issued
            });
        }
        let mut held: Vec<IssuedCertificate> = Vec::with_capacity(workloads);
        while let Some(issued) = tasks.join_next().await {
            held.push(issued??);
        }
        let took = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds(pid).unwrap_or(0.0) - cpu_before;
        let rss_after = status_kb(pid, "VmRSS").unwrap_or(0);
        println!(
            "| {run} | {took:.2} | {:.0} | {cpu:.2} | {:.1} → {:.1} |",
            workloads as f64 / took,
            rss_before as f64 / 1024.0,
            rss_after as f64 / 1024.0
        );
        drop(held);
    }
    println!("\npeak RSS (VmHWM): {:.1} MB", status_kb(pid, "VmHWM").unwrap_or(0) as f64 / 1024.0);
    server.abort();
    Ok(())
}
