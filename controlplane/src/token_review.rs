//! Kubernetes service-account tokens, checked as istiod checks them: a TokenReview for the
//! audience `istio-ca` (a pod's projected token, as Istio's injector mounts it); the caller is
//! the service account the API server names. Tokens without that audience (the legacy,
//! unbound ones) are refused: istiod takes them only with its third-party-token check off.
//! A pod-bound token also says the pod and, on Kubernetes 1.30 and later, the node it runs on:
//! what makes a node agent's own token enough for it to act for its node.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};

/// The audience a CSR caller's token must be for.
pub const AUDIENCE: &str = "istio-ca";

/// Who a reviewed token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    /// The service account's namespace.
    pub namespace: String,
    /// The service account.
    pub service_account: String,
    /// The pod the token is bound to, if it is.
    pub pod: Option<String>,
    /// The node of that pod, if the API server says (`authentication.kubernetes.io/node-name`).
    pub node: Option<String>,
}

/// Who `token` belongs to, or why it is not taken.
pub async fn review(client: &kube::Client, token: &str) -> Result<Reviewed, String> {
    let review = TokenReview {
        spec: TokenReviewSpec { token: token.to_string(), audiences: Some(vec![AUDIENCE.to_string()]) },
        ..Default::default()
    };
    let api: Api<TokenReview> = Api::all(client.clone());
    let reviewed = api
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| format!("the Kubernetes API could not review the token: {e}"))?;
    service_account(&reviewed.status.unwrap_or_default())
}

/// Who a review's `status` authenticated, or why it did not.
pub fn service_account(status: &TokenReviewStatus) -> Result<Reviewed, String> {
    if let Some(error) = status.error.as_deref().filter(|e| !e.is_empty()) {
        return Err(format!("the token is not valid: {error}"));
    }
    if status.authenticated != Some(true) {
        return Err("the token is not valid".into());
    }
    // An API server that did not check the audience says none: not good enough.
    if !status.audiences.iter().flatten().any(|a| a == AUDIENCE) {
        return Err(format!("the token is not for audience {AUDIENCE}"));
    }
    let user = status.user.as_ref().ok_or("the review names no user")?;
    let in_group = user.groups.iter().flatten().any(|g| g == "system:serviceaccounts");
    let username = user.username.as_deref().unwrap_or_default();
    match username.strip_prefix("system:serviceaccount:").and_then(|rest| rest.split_once(':')) {
        Some((ns, sa)) if in_group && !ns.is_empty() && !sa.is_empty() && !sa.contains(':') => {
            let extra = |key: &str| {
                let values = user.extra.as_ref().and_then(|e| e.get(&format!("authentication.kubernetes.io/{key}")));
                values.and_then(|v| v.first()).filter(|v| !v.is_empty()).cloned()
            };
            Ok(Reviewed {
                namespace: ns.to_string(),
                service_account: sa.to_string(),
                pod: extra("pod-name"),
                node: extra("node-name"),
            })
        }
        _ => Err(format!("the token is not a service account's ({username:?})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    fn status(username: &str, groups: &[&str], audiences: &[&str]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|s| s.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(username.into()),
                groups: Some(groups.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn only_a_service_account_token_for_the_ca_is_taken() {
        let sa = ["system:serviceaccounts", "system:authenticated"];
        let ok = status("system:serviceaccount:default:bookinfo-productpage", &sa, &[AUDIENCE]);
        let reviewed = service_account(&ok).unwrap();
        assert_eq!(
            (reviewed.namespace.as_str(), reviewed.service_account.as_str()),
            ("default", "bookinfo-productpage")
        );
        assert_eq!((reviewed.pod, reviewed.node), (None, None));
        let mut bound = ok.clone();
        bound.user.as_mut().unwrap().extra = Some(
            [("pod-name", "agent-x7"), ("node-name", "node-1")]
                .map(|(k, v)| (format!("authentication.kubernetes.io/{k}"), vec![v.to_string()]))
                .into(),
        );
        let reviewed = service_account(&bound).unwrap();
        assert_eq!((reviewed.pod.as_deref(), reviewed.node.as_deref()), (Some("agent-x7"), Some("node-1")));
        let other_audience = status("system:serviceaccount:default:web", &sa, &["https://kubernetes.default.svc"]);
        assert!(service_account(&other_audience).unwrap_err().contains("audience istio-ca"));
        let a_person = status("alice@example.com", &["system:authenticated"], &[AUDIENCE]);
        assert!(service_account(&a_person).unwrap_err().contains("not a service account's"));
        let not_in_group = status("system:serviceaccount:default:web", &["system:authenticated"], &[AUDIENCE]);
        assert!(service_account(&not_in_group).is_err());
        let malformed = status("system:serviceaccount:default:a:b", &sa, &[AUDIENCE]);
        assert!(service_account(&malformed).is_err());
        let refused = TokenReviewStatus { error: Some("token expired".into()), ..ok.clone() };
        assert_eq!(service_account(&refused), Err("the token is not valid: token expired".into()));
        let unauthenticated = TokenReviewStatus { authenticated: Some(false), ..ok };
        assert!(service_account(&unauthenticated).is_err());
    }
}
