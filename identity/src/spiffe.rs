//! SPIFFE identities as Istio spells them: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.

use std::fmt;
use std::str::FromStr;

/// A workload's identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    /// The trust domain (mesh config `trustDomain`, default `cluster.local`).
    pub trust_domain: String,
    /// The workload's namespace.
    pub namespace: String,
    /// The workload's service account.
    pub service_account: String,
}

/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Why a string is not an Istio SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{input:?} is not a SPIFFE id of the form spiffe://<trust domain>/ns/<namespace>/sa/<service account>: {reason}"
)]
pub struct SpiffeIdError {
    /// What was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl SpiffeId {
    /// The identity of service account `service_account` in `namespace`.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }

    /// The same workload in another trust domain (an alias of this one).
    pub fn in_trust_domain(&self, trust_domain: &str) -> Self {
        Self { trust_domain: trust_domain.to_string(), ..self.clone() }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

/// A DNS-1123 label as Kubernetes names namespaces and service accounts (service accounts may
/// also hold dots, as subdomains do).
fn valid_name(s: &str, dots: bool) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.'))
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| SpiffeIdError { input: input.to_string(), reason };
        let rest = input.strip_prefix("spiffe://").ok_or_else(|| err("it must start with spiffe://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [trust_domain, "ns", namespace, "sa", service_account] = parts.as_slice() else {
            return Err(err("the path must be /ns/<namespace>/sa/<service account>"));
        };
        if !valid_name(&trust_domain.to_ascii_lowercase(), true) {
            return Err(err("the trust domain must be a DNS name"));
        }
        if !valid_name(namespace, false) {
            return Err(err("the namespace must be a DNS-1123 label"));
        }
        if !valid_name(service_account, true) {
            return Err(err("the service account must be a DNS-1123 subdomain"));
        }
        Ok(Self::new(trust_domain, namespace, service_account))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_istio_refuses() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage".parse().unwrap();
        assert_eq!(id, SpiffeId::new("cluster.local", "default", "bookinfo-productpage"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/bookinfo-productpage");
        assert_eq!(
            id.in_trust_domain("old.example").to_string(),
            "spiffe://old.example/ns/default/sa/bookinfo-productpage"
        );
        for bad in [
            "cluster.local/ns/default/sa/x",
            "spiffe://cluster.local/ns/default",
            "spiffe://cluster.local/ns/default/sa/x/extra",
            "spiffe://cluster.local/sa/x/ns/default",
            "spiffe://cluster.local/ns/Default/sa/x",
            "spiffe://cluster.local/ns/default/sa/",
            "spiffe:///ns/default/sa/x",
        ] {
            let e = bad.parse::<SpiffeId>().expect_err(bad);
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
