//! Istio's own validation data (`tests/istio-validation/`, from istio/istio
//! `pkg/config/validation/testdata/crds`): every `*-valid` document is accepted, every
//! `*-invalid` document rejected for the reason its `_err` names (in sluice's words: the table
//! below pairs Istio's message with the part of sluice's that says the same).

use std::path::Path;

use sluice_translator::diagnostic::{Diagnostic, Severity};
use sluice_translator::parse::parse_documents;

/// Istio's `_err` → what sluice's error says (one of them).
const REASONS: &[(&str, &[&str])] = &[
    (
        "Cannot set serviceAccounts with namespaces or principals",
        &["serviceAccounts cannot be combined with namespaces", "serviceAccounts cannot be combined with principals"],
    ),
    (
        "spec.trafficPolicy.loadBalancer.warmup.minimumPercent: Invalid value",
        &["warmup.minimumPercent: 150 must be between 0 and 100"],
    ),
    ("spec.trafficPolicy.loadBalancer.warmup.duration: Required value", &["warmup.duration: duration is required"]),
    (
        "spec.trafficPolicy.loadBalancer.warmup.aggression: Invalid value",
        &["warmup.aggression: aggression must be at least 1"],
    ),
    ("Unsupported value: \"BLAH\"", &["spec.mtls.mode: unknown variant `BLAH`"]),
    ("type conversion error from", &["expected key to be a number"]),
    ("portLevelMtls requires selector", &["portLevelMtls requires a workload selector"]),
    ("spec.portLevelMtls in body should have at least 1 properties", &["portLevelMtls must name at least one port"]),
    ("port must be between 1-65535", &["is out of range 1-65535"]),
    ("spec: Required value", &["spec.hosts: at least one host is required", "spec.address: address is required"]),
    ("spec.hosts: Required value", &["spec.hosts: at least one host is required"]),
    ("wildcard is not supported in selector", &["wildcard is not supported in a selector"]),
    ("only one of WorkloadSelector or Endpoints can be set", &["workloadSelector and endpoints cannot both be set"]),
    ("hostname cannot be wildcard", &["'*' is not allowed in a ServiceEntry"]),
    (
        "CIDR addresses are allowed only for NONE/STATIC resolution types",
        &["is allowed only with resolution NONE or STATIC"],
    ),
    ("Duplicate value", &["duplicate port name"]),
    ("port number cannot be duplicated", &["duplicate port number"]),
    ("NONE mode cannot set endpoints", &["endpoints require resolution STATIC or DNS"]),
    ("DNS_ROUND_ROBIN mode cannot have multiple endpoints", &["resolution DNS_ROUND_ROBIN takes at most one endpoint"]),
    ("Address is required", &["spec.address: address is required"]),
    ("UDS may not be a dir", &["\"/dir/\" is not an absolute path to a file"]),
    ("UDS must be an absolute path or abstract socket", &["\"relative\" is not an absolute path to a file"]),
    ("UDS may not include ports", &["must not include ports"]),
    ("spec.ports: Invalid value", &["invalid port name \"@\""]),
    ("spec.jwtRules[0] in body must be of type object", &["spec.jwtRules[0]: invalid type: null"]),
    ("audiences[0] in body should be at least 1 chars long", &["audiences[0]: audience must not be empty"]),
    ("url must have scheme", &["is not an http(s) URL with a host"]),
    ("spec.jwtRules[0].fromHeaders[0].name: Required value", &["fromHeaders[0].name: header name must not be empty"]),
    (
        "spec.jwtRules[0].fromHeaders[0].name in body should be at least 1 chars long",
        &["fromHeaders[0].name: header name must not be empty"],
    ),
    ("fromParams[0] in body should be at least 1 chars long", &["fromParams[0]: must not be empty"]),
    ("fromCookies[0] in body should be at least 1 chars long", &["fromCookies[0]: must not be empty"]),
    (
        "spec.jwtRules[0].outputClaimToHeaders[0] in body must be of type object",
        &["outputClaimToHeaders[0]: invalid type: null"],
    ),
    (
        "spec.jwtRules[0].outputClaimToHeaders[0].claim in body should be at least 1 chars long",
        &["claim: claim must not be empty"],
    ),
    ("header in body should be at least 1 chars long", &["is not a header name that can be set"]),
    ("header in body should match", &["\":authority\" is not a header name that can be set"]),
    ("must be a valid duration greater than", &["timeout: duration \"apple\""]),
    (
        "spaceDelimitedClaims[0] in body should be at least 1 chars long",
        &["spaceDelimitedClaims[0]: must not be empty"],
    ),
    ("Unsupported value: \"MANDATORY\"", &["presence \"MANDATORY\" is not supported"]),
];

/// The documents of a test data file, each with its `_err` (if any) taken out.
fn documents(file: &str) -> Vec<(Option<String>, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/istio-validation").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.split("\n---\n")
        .map(|doc| {
            let mut err = None;
            let rest: Vec<&str> = doc
                .lines()
                .filter(|l| match l.strip_prefix("_err:") {
                    Some(e) => {
                        let e = e.trim();
                        // YAML quoting of the value: `'…'` or `"…"` around the whole of it.
                        let quoted = e.len() > 1
                            && (e.starts_with('\'') && e.ends_with('\'') || e.starts_with('"') && e.ends_with('"'));
                        err = Some(if quoted { e[1..e.len() - 1].to_string() } else { e.to_string() });
                        false
                    }
                    None => true,
                })
                .collect();
            (err, rest.join("\n"))
        })
        .collect()
}

fn read(file: &str, index: usize, doc: &str) -> Vec<Diagnostic> {
    let (objects, diagnostics) = parse_documents(&format!("{file}#{index}"), doc);
    let errors: Vec<Diagnostic> = diagnostics.into_iter().filter(|d| d.severity == Severity::Error).collect();
    // A rejected object is not accepted; a rejected AuthorizationPolicy leaves its fail-closed
    // stand-in (a DENY of everything) in its place.
    assert!(
        errors.is_empty() || objects.iter().all(|o| o.stand_in),
        "{file}#{index}: rejected and accepted: {errors:?}"
    );
    for o in &objects {
        if o.stand_in {
            let sluice_translator::model::Object::AuthorizationPolicy(p) = &o.object else {
                panic!("{file}#{index}: a stand-in for a {}", o.reference.kind)
            };
            assert_eq!(p.spec.action, Some(sluice_translator::model::authorization_policy::Action::Deny));
            assert_eq!(p.spec.rules, vec![Default::default()], "{file}#{index}: a stand-in denies everything");
        }
    }
    errors
}

const KINDS: &[&str] = &["authz", "destinationrule", "peerauth", "reqauth", "serviceentry", "workloadentry"];

#[test]
fn every_valid_document_of_istio_is_accepted() {
    let mut refused = Vec::new();
    for kind in KINDS {
        let file = format!("{kind}-valid.yaml");
        for (index, (_, doc)) in documents(&file).into_iter().enumerate() {
            for e in read(&file, index, &doc) {
                refused.push(e.to_string());
            }
        }
    }
    assert!(refused.is_empty(), "Istio accepts these:\n{}", refused.join("\n"));
}

#[test]
fn every_invalid_document_of_istio_is_rejected_for_its_reason() {
    let mut wrong = Vec::new();
    for kind in KINDS {
        let file = format!("{kind}-invalid.yaml");
        for (index, (err, doc)) in documents(&file).into_iter().enumerate() {
            let err = err.unwrap_or_else(|| panic!("{file}#{index} has no _err"));
            let errors = read(&file, index, &doc);
            let said: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
            let expected = REASONS.iter().find(|(istio, _)| *istio == err).map(|(_, ours)| *ours);
            match expected {
                Some(ours) if said.iter().any(|s| ours.iter().any(|o| s.contains(o))) => {}
                _ => wrong.push(format!("{file}#{index}: Istio: {err:?}; expected {expected:?}; sluice: {said:?}")),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Istio's validation dataset for the security kinds (`tests/istio-validation/dataset/`, from
/// `pkg/test/datasets/validation/dataset`): each `*-invalid.yaml` is refused, the others taken.
#[test]
fn istios_security_dataset() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/istio-validation/dataset");
    let mut files: Vec<_> = std::fs::read_dir(&dir).expect("dataset").map(|e| e.expect("entry").path()).collect();
    files.sort();
    assert_eq!(files.len(), 5);
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let errors = read(&name, 0, &std::fs::read_to_string(&file).unwrap());
        assert_eq!(!errors.is_empty(), name.ends_with("-invalid.yaml"), "{name}: {errors:?}");
    }
}
