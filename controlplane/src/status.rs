//! The `status` sluice writes on Istio objects: Istio's `IstioStatus` shape (conditions,
//! validationMessages, observedGeneration), so `kubectl get -o yaml` reads as it would under
//! istiod, and writes validate against Istio's own CRDs as well as ours.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sluice_translator::diagnostic::{Diagnostic, Severity};
use sluice_translator::model::Kind;
use tokio::sync::watch;

use crate::kube_source::{KubeCache, api_resource};

/// The condition type sluice owns on every Istio object it reads.
pub const CONDITION_TYPE: &str = "Accepted";

/// Istio's analysis code for a schema validation error (used when a diagnostic has no code).
pub const SCHEMA_VALIDATION_ERROR: (&str, &str) = ("IST0106", "SchemaValidationError");

/// Istio's name for an analysis code sluice emits.
fn message_name(code: &str) -> &'static str {
    match code {
        "IST0101" => "ReferencedResourceNotFound",
        "IST0109" => "ConflictingMeshGatewayVirtualServiceHosts",
        _ => SCHEMA_VALIDATION_ERROR.1,
    }
}

/// Istio's `IstioStatus`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IstioStatus {
    /// Current service state of the resource.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Errors and warnings found while reading the resource.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub validation_messages: Vec<ValidationMessage>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A status condition.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Type of the condition.
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    /// One-word CamelCase reason for the condition's last transition.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Human-readable details.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Last time the condition transitioned (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// One analysis message, as Istio's `AnalysisMessageBase`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValidationMessage {
    /// The message type.
    #[serde(rename = "type")]
    pub type_: MessageType,
    /// ERROR, WARNING or INFO.
    pub level: String,
    /// Istio's page for this message type.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub documentation_url: String,
}

/// An analysis message type.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct MessageType {
    /// A code matching `^IST[0-9]{4}$`.
    pub code: String,
    /// Human-readable name of the type.
    pub name: String,
}

/// The status an Istio object should carry given its diagnostics: `Accepted=False` with every
/// error's field path and reason when it was rejected, `Accepted=True` otherwise.
/// `last_transition_time` is left for the writer to fill, so equal inputs give equal statuses.
pub fn desired(diagnostics: &[&Diagnostic], generation: Option<i64>) -> IstioStatus {
    let rejected = diagnostics.iter().any(|d| d.severity == Severity::Error);
    let messages: Vec<String> = diagnostics
        .iter()
        .map(|d| {
            let level = if d.severity == Severity::Error { "Error" } else { "Warning" };
            let code = d.code.unwrap_or(SCHEMA_VALIDATION_ERROR.0);
            if d.path.is_empty() {
                format!("{level} [{code}] {}", d.message)
            } else {
                format!("{level} [{code}] {}: {}", d.path, d.message)
            }
        })
        .collect();
    let validation_messages = diagnostics
        .iter()
        .map(|d| {
            let code = d.code.unwrap_or(SCHEMA_VALIDATION_ERROR.0).to_string();
            let name = message_name(&code);
            ValidationMessage {
                documentation_url: format!(
                    "https://istio.io/latest/docs/reference/config/analysis/{}/",
                    code.to_ascii_lowercase()
                ),
                type_: MessageType { code, name: name.into() },
                level: if d.severity == Severity::Error { "ERROR" } else { "WARNING" }.into(),
            }
        })
        .collect();
    let condition = Condition {
        type_: CONDITION_TYPE.into(),
        status: if rejected { "False" } else { "True" }.into(),
        reason: if rejected { "Invalid" } else { "Accepted" }.into(),
        message: if messages.is_empty() { "read by sluice".into() } else { messages.join("; ") },
        last_transition_time: None,
    };
    IstioStatus { conditions: vec![condition], validation_messages, observed_generation: generation }
}

/// The merge patch that brings `current` (an object's `status`, possibly null) to `want`, or
/// None when it already says the same (transition time aside). Conditions of other owners are kept.
pub fn patch(current: &Value, want: &IstioStatus, now: &str) -> Option<Value> {
    let current: IstioStatus = serde_json::from_value(current.clone()).unwrap_or_default();
    let ours = current.conditions.iter().find(|c| c.type_ == CONDITION_TYPE);
    let same = ours.is_some_and(|c| {
        let mut c = c.clone();
        c.last_transition_time = None;
        c == want.conditions[0]
    }) && current.validation_messages == want.validation_messages
        && current.observed_generation == want.observed_generation;
    if same {
        return None;
    }
    let mut condition = want.conditions[0].clone();
    condition.last_transition_time = match ours {
        Some(c) if c.status == condition.status => c.last_transition_time.clone(),
        _ => Some(now.to_string()),
    };
    let mut conditions: Vec<Condition> =
        current.conditions.iter().filter(|c| c.type_ != CONDITION_TYPE).cloned().collect();
    conditions.push(condition);
    Some(json!({"status": {
        "conditions": conditions,
        "validationMessages": want.validation_messages,
        "observedGeneration": want.observed_generation,
    }}))
}

/// One status write: the object and the merge patch for its `status` subresource.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusPatch {
    /// Kind of the object.
    pub kind: Kind,
    /// Version it is written at.
    pub version: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The merge patch.
    pub patch: Value,
}

/// The writes that bring every Istio object's status in line with what reading it found: its
/// own parse and validation (held with the object, so the two always agree) and the snapshot's
/// cross-object `findings` of the config being served.
pub fn pending(cache: &KubeCache, findings: &[Diagnostic], now: &str) -> Vec<StatusPatch> {
    let mut by_object: std::collections::BTreeMap<_, Vec<&Diagnostic>> = Default::default();
    for d in findings {
        if let Some(r) = &d.object {
            by_object.entry(r.clone()).or_default().push(d);
        }
    }
    cache
        .istio_objects()
        .filter_map(|o| {
            let mut found: Vec<&Diagnostic> = o.diagnostics.iter().collect();
            found.extend(by_object.get(&o.reference).into_iter().flatten());
            let want = desired(&found, o.generation);
            patch(o.status, &want, now).map(|patch| StatusPatch {
                kind: o.kind,
                version: o.version.to_string(),
                namespace: o.reference.namespace.to_string(),
                name: o.reference.name.to_string(),
                patch,
            })
        })
        .collect()
}

/// RFC 3339 in seconds, as Kubernetes writes condition times.
fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// While this replica leads, writes the status of every Istio object whose findings changed.
/// Runs after each load (a new `findings` value: the snapshot's cross-object diagnostics) and
/// every 30 s, which retries failed writes.
pub async fn run_writer(
    client: Client,
    cache: Arc<Mutex<KubeCache>>,
    mut findings: watch::Receiver<Arc<Vec<Diagnostic>>>,
    mut leader: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = findings.changed() => if r.is_err() { return },
            r = leader.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        if !*leader.borrow_and_update() {
            continue;
        }
        let current = findings.borrow_and_update().clone();
        let writes = pending(&cache.lock().expect("kube cache lock"), &current, &now());
        for w in writes {
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &w.namespace, &api_resource(w.kind, &w.version));
            match api.patch_status(&w.name, &PatchParams::default(), &Patch::Merge(&w.patch)).await {
                Ok(_) => {
                    tracing::debug!(kind = w.kind.name(), namespace = %w.namespace, name = %w.name, "status written")
                }
                // Deleted meanwhile: nothing to report on.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    tracing::warn!(kind = w.kind.name(), namespace = %w.namespace, name = %w.name, error = %e, "writing status failed")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_translator::diagnostic::ObjectRef;

    fn error(path: &str, message: &str) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            origin: "kubernetes".into(),
            object: Some(ObjectRef::new("VirtualService", "default", "r")),
            path: path.into(),
            code: None,
            message: message.into(),
        }
    }

    #[test]
    fn a_rejected_object_names_field_and_reason_and_a_repeat_patch_is_none() {
        let d = error("spec.http[0].route[0].weight", "weights must add up to 100");
        let want = desired(&[&d], Some(3));
        let p = patch(&Value::Null, &want, "2026-01-01T00:00:00Z").expect("a patch");
        let c = &p["status"]["conditions"][0];
        assert_eq!(c["status"], "False");
        assert_eq!(c["message"], "Error [IST0106] spec.http[0].route[0].weight: weights must add up to 100");
        assert_eq!(p["status"]["validationMessages"][0]["type"]["code"], "IST0106");
        assert_eq!(p["status"]["observedGeneration"], 3);
        assert_eq!(patch(&p["status"], &want, "2027-01-01T00:00:00Z"), None, "already written");
        let fixed = desired(&[], Some(4));
        let p2 = patch(&p["status"], &fixed, "2027-01-01T00:00:00Z").expect("fixed object is updated");
        assert_eq!(p2["status"]["conditions"][0]["status"], "True");
        assert_eq!(p2["status"]["conditions"][0]["lastTransitionTime"], "2027-01-01T00:00:00Z");
        assert_eq!(p2["status"]["validationMessages"], json!([]));
    }

    /// Istio's CRDs prune unknown fields inside conditions and validation messages (only the
    /// status root keeps them): every field sluice writes must be one Istio's schema declares.
    #[test]
    fn every_written_field_is_in_istios_status_schema() {
        let d = error("spec.hosts[0]", "bad host");
        let p = patch(&Value::Null, &desired(&[&d], Some(1)), "2026-01-01T00:00:00Z").unwrap();
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        let condition_fields =
            ["lastProbeTime", "lastTransitionTime", "message", "observedGeneration", "reason", "status", "type"];
        for k in keys(&p["status"]["conditions"][0]) {
            assert!(condition_fields.contains(&k.as_str()), "condition field {k} is not in Istio's schema");
        }
        let message = &p["status"]["validationMessages"][0];
        for k in keys(message) {
            assert!(["documentationUrl", "level", "type"].contains(&k.as_str()), "validationMessages field {k}");
        }
        assert_eq!(keys(&message["type"]), ["code", "name"]);
        assert!(["UNKNOWN", "ERROR", "WARNING", "INFO"].contains(&message["level"].as_str().unwrap()));
        assert!(message["type"]["code"].as_str().unwrap().starts_with("IST"));
    }

    #[test]
    fn conditions_of_other_writers_are_kept() {
        let current = json!({"conditions": [{"type": "Reconciled", "status": "True"}]});
        let p = patch(&current, &desired(&[], None), "t").unwrap();
        assert_eq!(p["status"]["conditions"][0]["type"], "Reconciled");
        assert_eq!(p["status"]["conditions"][1]["type"], CONDITION_TYPE);
    }
}
