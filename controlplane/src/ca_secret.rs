//! The self-signed root in Kubernetes, kept as istiod keeps it: Secret `istio-ca-secret` (type
//! `istio.io/ca-root`, keys `ca-cert.pem` and `ca-key.pem`) in the control plane's namespace.
//! The first replica that finds none makes it; every other replica, and every later start,
//! loads it, so all of them sign under one root that outlives them.

use std::collections::BTreeMap;

use anyhow::Context;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use sluice_identity::CertificateAuthority;
use sluice_identity::authority::PLUGIN_FILES;

/// The Secret's name, as istiod's.
pub const CA_SECRET: &str = "istio-ca-secret";

/// The Secret's type, as istiod's.
const CA_SECRET_TYPE: &str = "istio.io/ca-root";

/// The CA whose root is kept in `namespace`'s [`CA_SECRET`], made (with `trust_domain`) if
/// there is none yet.
pub async fn open(client: kube::Client, namespace: &str, trust_domain: &str) -> anyhow::Result<CertificateAuthority> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let place = format!("Secret {namespace}/{CA_SECRET}");
    // Twice at most: a create that lost the race to another replica reads the winner's.
    for _ in 0..2 {
        if let Some(secret) = get_waiting(&api, &place).await? {
            let ca = load(&place, &secret)?;
            tracing::info!(secret = %place, "certificate authority: the root kept in the Secret");
            return Ok(ca);
        }
        let (cert, key) = CertificateAuthority::new_root_pem(trust_domain)?;
        let data = [(PLUGIN_FILES[0], &cert), (PLUGIN_FILES[1], &key)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect::<BTreeMap<_, _>>();
        let secret = Secret {
            metadata: ObjectMeta { name: Some(CA_SECRET.into()), ..Default::default() },
            type_: Some(CA_SECRET_TYPE.into()),
            data: Some(data),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(secret = %place, %trust_domain, "created a self-signed root CA");
                return Ok(CertificateAuthority::from_stored_root(&place, &cert, &key)?);
            }
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {place}")),
        }
    }
    anyhow::bail!("{place} was being created by another replica and could not be read afterwards")
}

/// How long a start waits for an API server it cannot reach before it gives up.
const UNREACHABLE_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// The Secret, if there is one; an API server that cannot be reached (a control plane started
/// before it, or during its restart) is asked again for [`UNREACHABLE_FOR`]. An answer that
/// refuses (no permission, say) is an error at once.
async fn get_waiting(api: &Api<Secret>, place: &str) -> anyhow::Result<Option<Secret>> {
    let started = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(250);
    loop {
        match api.get_opt(CA_SECRET).await {
            Err(e) if !matches!(e, kube::Error::Api(_)) && started.elapsed() < UNREACHABLE_FOR => {
                tracing::warn!(secret = %place, error = %e, "the API server is not reachable; asking again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(8));
            }
            other => return other.with_context(|| format!("reading {place}")),
        }
    }
}

/// The CA in `secret`; an error names the Secret and the key.
fn load(place: &str, secret: &Secret) -> anyhow::Result<CertificateAuthority> {
    let part = |key: &str| -> anyhow::Result<String> {
        let bytes = secret.data.as_ref().and_then(|d| d.get(key)).map(|b| &b.0[..]).unwrap_or_default();
        anyhow::ensure!(!bytes.is_empty(), "{place}: data.{key} is missing or empty");
        String::from_utf8(bytes.to_vec()).map_err(|_| anyhow::anyhow!("{place}: data.{key} is not PEM text"))
    };
    let (cert, key) = (part(PLUGIN_FILES[0])?, part(PLUGIN_FILES[1])?);
    Ok(CertificateAuthority::from_stored_root(place, &cert, &key)?)
}
