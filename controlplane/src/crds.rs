//! CustomResourceDefinitions for the Istio kinds sluice reads: Istio's group, kinds, versions and
//! served/storage flags, with structural schemas generated (schemars, kube's structural rewrite)
//! from the translator's own spec types. `sluice crds` writes them; a test fails on drift.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceDefinitionNames, CustomResourceDefinitionSpec,
    CustomResourceDefinitionVersion, CustomResourceSubresourceStatus, CustomResourceSubresources,
    CustomResourceValidation, JSONSchemaProps,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde_json::{Value, json};
use sluice_translator::model::{
    Kind, authorization_policy as authz, destination_rule as dr, service_entry as se, sidecar, virtual_service as vs,
};

use crate::status::IstioStatus;

/// What Istio's CRD for a kind declares beyond the kind itself.
struct Declared {
    kind: Kind,
    short_names: &'static [&'static str],
    /// The version objects are stored at (Istio keeps its oldest).
    storage: &'static str,
    spec: fn() -> Value,
}

fn declared() -> [Declared; 7] {
    [
        Declared {
            kind: Kind::VirtualService,
            short_names: &["vs"],
            storage: "v1alpha3",
            spec: schema::<vs::VirtualServiceSpec>,
        },
        Declared {
            kind: Kind::DestinationRule,
            short_names: &["dr"],
            storage: "v1alpha3",
            spec: schema::<dr::DestinationRuleSpec>,
        },
        Declared {
            kind: Kind::ServiceEntry,
            short_names: &["se"],
            storage: "v1alpha3",
            spec: schema::<se::ServiceEntrySpec>,
        },
        Declared {
            kind: Kind::WorkloadEntry,
            short_names: &["we"],
            storage: "v1alpha3",
            spec: schema::<se::WorkloadEntrySpec>,
        },
        Declared { kind: Kind::Sidecar, short_names: &[], storage: "v1alpha3", spec: schema::<sidecar::SidecarSpec> },
        Declared {
            kind: Kind::AuthorizationPolicy,
            short_names: &["ap"],
            storage: "v1beta1",
            spec: schema::<authz::AuthorizationPolicySpec>,
        },
        Declared {
            kind: Kind::PeerAuthentication,
            short_names: &["pa"],
            storage: "v1beta1",
            spec: schema::<authz::PeerAuthenticationSpec>,
        },
    ]
}

/// The structural OpenAPI v3 schema of `T`, as a CRD takes it.
fn schema<T: JsonSchema>() -> Value {
    let generator = SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .with_transform(kube::core::schema::OptionalEnum)
        .with_transform(kube::core::schema::OptionalIntOrString)
        .with_transform(kube::core::schema::StructuralSchemaRewriter)
        .into_generator();
    let mut value = generator.into_root_schema_for::<T>().to_value();
    make_structural(&mut value);
    value
}

/// What schemars leaves that a structural schema does not allow: untyped nodes (free-form
/// `serde_json::Value` fields) become objects that keep unknown fields; defaults, titles and
/// Rust integer formats go (Kubernetes knows int32/int64/float/double only). Every object keeps
/// unknown fields.
fn make_structural(value: &mut Value) {
    let Value::Object(map) = value else {
        if *value == Value::Bool(true) {
            *value = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
        }
        return;
    };
    for key in ["default", "title", "$schema", "definitions", "$defs", "examples"] {
        map.remove(key);
    }
    if let Some(format) = map.get("format").and_then(Value::as_str) {
        match format {
            "int32" | "int64" | "float" | "double" => {}
            "uint64" => {
                map.insert("format".into(), "int64".into());
            }
            _ => {
                map.remove("format");
            }
        }
    }
    let untyped = !map.contains_key("type")
        && !map.contains_key("x-kubernetes-int-or-string")
        && !map.contains_key("x-kubernetes-preserve-unknown-fields")
        && !map.contains_key("anyOf")
        && !map.contains_key("oneOf");
    if untyped {
        map.insert("type".into(), "object".into());
        map.insert("x-kubernetes-preserve-unknown-fields".into(), true.into());
    }
    // Fields sluice does not model (yet) must survive the API server's pruning: the objects are
    // the user's Istio config, and Istio (or a later sluice) may read them.
    if map.contains_key("properties") {
        map.insert("x-kubernetes-preserve-unknown-fields".into(), true.into());
    }
    for (key, child) in map.iter_mut() {
        match key.as_str() {
            "properties" => {
                if let Value::Object(props) = child {
                    props.values_mut().for_each(make_structural);
                }
            }
            "items" | "additionalProperties" => make_structural(child),
            _ => {}
        }
    }
}

/// Structural-schema violations in `schema` (at `path`): untyped nodes, references, and
/// type-carrying `anyOf`/`oneOf` branches. Empty for a schema Kubernetes accepts.
pub fn structural_violations(schema: &Value, path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Value::Object(map) = schema else {
        return vec![format!("{path}: a schema must be an object")];
    };
    if map.contains_key("$ref") {
        out.push(format!("{path}: $ref is not allowed"));
    }
    let typed = map.contains_key("type")
        || map.contains_key("x-kubernetes-int-or-string")
        || map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if !typed {
        out.push(format!("{path}: no type"));
    }
    for junction in ["anyOf", "oneOf", "allOf"] {
        for (i, branch) in map.get(junction).and_then(Value::as_array).into_iter().flatten().enumerate() {
            for forbidden in ["type", "default", "description", "nullable", "additionalProperties"] {
                if branch.get(forbidden).is_some() && !map.contains_key("x-kubernetes-int-or-string") {
                    out.push(format!("{path}.{junction}[{i}]: {forbidden} is not allowed in a junction"));
                }
            }
        }
    }
    if let Some(props) = map.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            out.extend(structural_violations(child, &format!("{path}.{name}")));
        }
    }
    if let Some(items) = map.get("items") {
        out.extend(structural_violations(items, &format!("{path}[]")));
    }
    if let Some(extra @ Value::Object(_)) = map.get("additionalProperties") {
        out.extend(structural_violations(extra, &format!("{path}.*")));
    }
    out
}

/// Every CRD: (file name, definition).
pub fn crds() -> Vec<(String, CustomResourceDefinition)> {
    let status = schema::<IstioStatus>();
    declared()
        .into_iter()
        .map(|d| {
            let kind = d.kind.name();
            let group = d.kind.group();
            let plural = d.kind.plural();
            let mut spec = (d.spec)();
            if let Value::Object(m) = &mut spec {
                m.insert("description".into(), format!("The {kind} spec, as Istio's {group} API.").into());
            }
            let mut status = status.clone();
            // Istio's status keeps fields it does not know (other controllers write there too).
            status["x-kubernetes-preserve-unknown-fields"] = true.into();
            let root = json!({
                "type": "object",
                "properties": {"spec": spec, "status": status},
                "required": ["spec"],
            });
            let props: JSONSchemaProps =
                serde_json::from_value(root).expect("a generated schema is valid JSONSchemaProps");
            // Istio lists versions alphabetically; every one is served, one is stored.
            let mut versions: Vec<&str> = d.kind.versions().to_vec();
            versions.sort();
            let versions = versions
                .into_iter()
                .map(|v| CustomResourceDefinitionVersion {
                    name: v.into(),
                    served: true,
                    storage: v == d.storage,
                    schema: Some(CustomResourceValidation { open_api_v3_schema: Some(props.clone()) }),
                    subresources: Some(CustomResourceSubresources {
                        status: Some(CustomResourceSubresourceStatus(json!({}))),
                        scale: None,
                    }),
                    ..Default::default()
                })
                .collect();
            let category = group.replace('.', "-");
            let crd = CustomResourceDefinition {
                metadata: ObjectMeta {
                    name: Some(format!("{plural}.{group}")),
                    labels: Some(BTreeMap::from([("app.kubernetes.io/part-of".to_string(), "sluice".to_string())])),
                    annotations: Some(BTreeMap::from([("helm.sh/resource-policy".to_string(), "keep".to_string())])),
                    ..Default::default()
                },
                spec: CustomResourceDefinitionSpec {
                    group: group.into(),
                    names: CustomResourceDefinitionNames {
                        kind: kind.into(),
                        list_kind: Some(format!("{kind}List")),
                        plural: plural.clone(),
                        singular: Some(kind.to_ascii_lowercase()),
                        short_names: (!d.short_names.is_empty())
                            .then(|| d.short_names.iter().map(|s| s.to_string()).collect()),
                        categories: Some(vec!["istio-io".into(), category]),
                    },
                    scope: "Namespaced".into(),
                    versions,
                    ..Default::default()
                },
                status: None,
            };
            (format!("{plural}.{group}.yaml"), crd)
        })
        .collect()
}

/// A CRD as the YAML file `crds/` holds.
pub fn to_yaml(crd: &CustomResourceDefinition) -> String {
    let mut value = serde_json::to_value(crd).expect("serializable");
    if let Value::Object(m) = &mut value {
        m.insert("apiVersion".into(), "apiextensions.k8s.io/v1".into());
        m.insert("kind".into(), "CustomResourceDefinition".into());
    }
    format!(
        "# Generated by `sluice crds` from sluice's types; do not edit.\n{}",
        serde_yaml_ng::to_string(&value).expect("serializable")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_generated_schema_is_structural() {
        for (file, crd) in crds() {
            for v in &crd.spec.versions {
                let schema = serde_json::to_value(&v.schema).unwrap();
                let violations = structural_violations(&schema["openAPIV3Schema"], &format!("{file} {}", v.name));
                assert!(violations.is_empty(), "{}", violations.join("\n"));
            }
            assert_eq!(crd.spec.versions.iter().filter(|v| v.storage).count(), 1, "{file}: one storage version");
        }
    }

    #[test]
    fn the_checker_finds_what_the_api_server_rejects() {
        let bad = json!({"type": "object", "properties": {"a": {}, "b": {"$ref": "#/x", "type": "string"},
            "c": {"anyOf": [{"type": "string"}], "type": "string"}}});
        let v = structural_violations(&bad, "root");
        assert_eq!(v.len(), 3, "{v:?}");
    }
}
