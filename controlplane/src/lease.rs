//! Leader election on a `coordination.k8s.io` Lease, so several replicas can run: all serve xDS,
//! only the holder writes status. Optimistic concurrency (the Lease's resourceVersion) decides
//! races; a holder that stops renewing loses the Lease after its duration.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;

/// Which Lease, and who we are.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Namespace of the Lease (the control plane's own).
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a holder keeps the Lease without renewing.
    pub duration: Duration,
}

impl LeaseConfig {
    /// The default Lease in `namespace` for `identity`: 15 s, as client-go's leader election.
    pub fn new(namespace: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: "sluice-leader".into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
        }
    }
}

/// Where the Lease lives: `flag`, else `$POD_NAMESPACE` (in a pod: its own namespace), else the
/// client's default namespace (outside a cluster: the kubeconfig context's, else `default`),
/// which exists where a fixed `sluice-system` may not.
pub fn lease_namespace(flag: Option<String>, client: &kube::Client) -> String {
    flag.or_else(|| std::env::var("POD_NAMESPACE").ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| client.default_namespace().to_string())
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// One attempt to take or renew the Lease at `now`. True when this replica holds it afterwards.
pub async fn try_hold(api: &Api<Lease>, config: &LeaseConfig, now: Timestamp) -> Result<bool, kube::Error> {
    let seconds = i32::try_from(config.duration.as_secs()).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta { name: Some(config.name.clone()), ..Default::default() },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if conflict(&e) => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.take().unwrap_or_default();
    let ours = spec.holder_identity.as_deref() == Some(config.identity.as_str());
    let held_for = SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(seconds).into());
    let expired = match (&spec.holder_identity, &spec.renew_time) {
        (Some(h), Some(renewed)) if !h.is_empty() => renewed.0 + held_for < now,
        _ => true,
    };
    if !ours && !expired {
        return Ok(false);
    }
    let transitions = spec.lease_transitions.unwrap_or(0);
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(seconds),
        acquire_time: if ours { spec.acquire_time } else { Some(MicroTime(now)) },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if ours { transitions } else { transitions + 1 }),
        ..spec
    });
    // The resourceVersion read above makes this fail with 409 if another replica got there first.
    match api.replace(&config.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(e) if conflict(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Keeps trying to take or renew the Lease (every third of its duration) and publishes whether
/// this replica leads. An error or a lost race makes it a follower until the next attempt wins.
pub async fn run(api: Api<Lease>, config: LeaseConfig, leader: watch::Sender<bool>) {
    let every = config.duration / 3;
    // The same failure is said once (then at debug), with what to do: a namespace that does not
    // exist or a Lease the account may not write would otherwise warn every few seconds.
    let mut said: Option<String> = None;
    loop {
        let leads = match try_hold(&api, &config, Timestamp::now()).await {
            Ok(l) => {
                if said.take().is_some() {
                    tracing::info!(lease = %config.name, namespace = %config.namespace, "the Lease can be written again");
                }
                l
            }
            Err(e) => {
                let text = e.to_string();
                if said.as_deref() == Some(text.as_str()) {
                    tracing::debug!(lease = %config.name, error = %e, "leader election failed; not writing status");
                } else {
                    tracing::warn!(
                        lease = %config.name,
                        namespace = %config.namespace,
                        error = %e,
                        "status writing is off until Lease {}/{} can be taken (does namespace {} exist, and may \
                         this account write Leases there? --lease-namespace picks another; --no-status says \
                         status is not wanted); retrying every {:?}",
                        config.namespace,
                        config.name,
                        config.namespace,
                        every
                    );
                    said = Some(text);
                }
                false
            }
        };
        leader.send_if_modified(|was| {
            if *was != leads {
                tracing::info!(identity = %config.identity, leader = leads, "leadership changed");
                *was = leads;
                true
            } else {
                false
            }
        });
        tokio::time::sleep(every).await;
    }
}
