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

fn declared() -> [Declared; 8] {
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
        Declared {
            kind: Kind::RequestAuthentication,
            short_names: &["ra"],
            storage: "v1beta1",
            spec: schema::<sluice_translator::model::request_authentication::RequestAuthenticationSpec>,
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
    for key in ["default", "title", "$schema", "definitions", "$defs", "examples", "propertyNames"] {
        map.remove(key);
    }
    // Kubernetes has no patternProperties (a real API server refuses the CRD): a map whose keys
    // follow a pattern (e.g. port numbers) becomes a plain map; sluice's validation checks the
    // keys and names the field.
    if let Some(Value::Object(patterns)) = map.remove("patternProperties")
        && let Some(value) = patterns.into_iter().map(|(_, v)| v).next()
    {
        map.insert("additionalProperties".into(), value);
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

/// Violations of Kubernetes' rules for a CRD's schema (apiextensions' structural-schema and
/// OpenAPI checks) in `schema`, at `path`. Empty for a schema a real API server accepts.
pub fn structural_violations(schema: &Value, path: &str) -> Vec<String> {
    let mut out = Vec::new();
    check_node(schema, path, false, &mut out);
    out
}

/// The keywords Kubernetes' JSONSchemaProps refuses ("… is not supported").
const UNSUPPORTED: [&str; 7] =
    ["patternProperties", "dependencies", "$ref", "definitions", "additionalItems", "$schema", "propertyNames"];

/// One node; `in_junction` inside `allOf`/`anyOf`/`oneOf`/`not`, which may hold value
/// validations only.
fn check_node(schema: &Value, path: &str, in_junction: bool, out: &mut Vec<String>) {
    let Value::Object(map) = schema else {
        out.push(format!("{path}: a schema must be an object"));
        return;
    };
    let mut bad = |what: String| out.push(format!("{path}: {what}"));
    for key in UNSUPPORTED {
        if map.contains_key(key) {
            bad(format!("{key} is not supported"));
        }
    }
    if map.get("uniqueItems") == Some(&Value::Bool(true)) {
        bad("uniqueItems cannot be set to true".into());
    }
    let ty = map.get("type").and_then(Value::as_str).unwrap_or("");
    if ty == "null" {
        bad("type cannot be null (use nullable)".into());
    }
    let flag = |k: &str| map.get(k) == Some(&Value::Bool(true));
    let int_or_string = flag("x-kubernetes-int-or-string");
    if map.contains_key("x-kubernetes-preserve-unknown-fields") && !flag("x-kubernetes-preserve-unknown-fields") {
        bad("x-kubernetes-preserve-unknown-fields must be true or absent".into());
    }
    if in_junction {
        for key in [
            "type",
            "default",
            "description",
            "nullable",
            "additionalProperties",
            "x-kubernetes-preserve-unknown-fields",
            "x-kubernetes-embedded-resource",
            "x-kubernetes-int-or-string",
        ] {
            if map.contains_key(key) {
                bad(format!("{key} is not allowed inside allOf/anyOf/oneOf/not"));
            }
        }
    } else if ty.is_empty() && !int_or_string && !flag("x-kubernetes-preserve-unknown-fields") {
        bad("type must not be empty".into());
    }
    if int_or_string && !ty.is_empty() {
        bad("type must be empty with x-kubernetes-int-or-string".into());
    }
    if flag("x-kubernetes-embedded-resource") && ty != "object" {
        bad("type must be object with x-kubernetes-embedded-resource".into());
    }
    if let Some(m) = map.get("x-kubernetes-map-type") {
        if ty != "object" {
            bad("type must be object with x-kubernetes-map-type".into());
        }
        if !matches!(m.as_str(), Some("atomic" | "granular")) {
            bad(format!("x-kubernetes-map-type {m} is not atomic or granular"));
        }
    }
    if let Some(l) = map.get("x-kubernetes-list-type") {
        if ty != "array" {
            bad("type must be array with x-kubernetes-list-type".into());
        }
        if !matches!(l.as_str(), Some("atomic" | "set" | "map")) {
            bad(format!("x-kubernetes-list-type {l} is not atomic, set or map"));
        }
    }
    let list_map = map.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map");
    let has_keys = map.get("x-kubernetes-list-map-keys").and_then(Value::as_array).is_some_and(|k| !k.is_empty());
    if list_map != has_keys {
        bad("x-kubernetes-list-map-keys goes with x-kubernetes-list-type map, and only with it".into());
    }
    let props = map.get("properties").and_then(Value::as_object);
    if props.is_some_and(|p| !p.is_empty()) && map.contains_key("additionalProperties") {
        bad("additionalProperties and properties are mutually exclusive".into());
    }
    if let Some(props) = props {
        for (name, child) in props {
            check_node(child, &format!("{path}.properties[{name}]"), in_junction, out);
        }
    }
    match map.get("items") {
        Some(items @ Value::Object(_)) => check_node(items, &format!("{path}.items"), in_junction, out),
        Some(_) => out.push(format!("{path}: items must be a schema object, not an array")),
        None if ty == "array" && !in_junction => out.push(format!("{path}: an array needs items")),
        None => {}
    }
    if let Some(extra @ Value::Object(_)) = map.get("additionalProperties") {
        check_node(extra, &format!("{path}.additionalProperties"), in_junction, out);
    }
    for junction in ["allOf", "anyOf", "oneOf"] {
        for (i, branch) in map.get(junction).and_then(Value::as_array).into_iter().flatten().enumerate() {
            let at = format!("{path}.{junction}[{i}]");
            // Kubernetes' one exception: int-or-string's `anyOf: [{type: integer}, {type: string}]`.
            let int_or_string_branch = int_or_string
                && matches!(branch.as_object().map(|b| b.len()), Some(1))
                && matches!(branch.get("type").and_then(Value::as_str), Some("integer" | "string"));
            if !int_or_string_branch {
                check_node(branch, &at, true, out);
            }
        }
    }
    if let Some(not) = map.get("not") {
        check_node(not, &format!("{path}.not"), true, out);
    }
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
        // Each schema breaks one rule; the message names its place and the rule.
        let cases = [
            (json!({"type": "object", "properties": {"a": {}}}), "root.properties[a]: type must not be empty"),
            (json!({"type": "string", "$ref": "#/x"}), "root: $ref is not supported"),
            (
                json!({"type": "object", "patternProperties": {"^\\d+$": {"type": "string"}}}),
                "root: patternProperties is not supported",
            ),
            (json!({"type": "object", "dependencies": {}}), "root: dependencies is not supported"),
            (json!({"type": "object", "definitions": {}}), "root: definitions is not supported"),
            (
                json!({"type": "array", "items": {"type": "string"}, "additionalItems": false}),
                "root: additionalItems is not supported",
            ),
            (
                json!({"type": "array", "items": {"type": "string"}, "uniqueItems": true}),
                "root: uniqueItems cannot be set to true",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": false}),
                "root: additionalProperties and properties are mutually exclusive",
            ),
            (
                json!({"type": "string", "anyOf": [{"type": "string"}]}),
                "root.anyOf[0]: type is not allowed inside allOf/anyOf/oneOf/not",
            ),
            (
                json!({"type": "array", "items": [{"type": "string"}]}),
                "root: items must be a schema object, not an array",
            ),
            (json!({"type": "array"}), "root: an array needs items"),
            (
                json!({"type": "object", "x-kubernetes-preserve-unknown-fields": false}),
                "root: x-kubernetes-preserve-unknown-fields must be true or absent",
            ),
            (
                json!({"type": "string", "x-kubernetes-int-or-string": true}),
                "root: type must be empty with x-kubernetes-int-or-string",
            ),
            (
                json!({"type": "string", "x-kubernetes-list-type": "set"}),
                "root: type must be array with x-kubernetes-list-type",
            ),
            (
                json!({"type": "array", "items": {"type": "object"}, "x-kubernetes-list-type": "map"}),
                "root: x-kubernetes-list-map-keys goes with x-kubernetes-list-type map, and only with it",
            ),
            (
                json!({"type": "string", "x-kubernetes-map-type": "atomic"}),
                "root: type must be object with x-kubernetes-map-type",
            ),
            (
                json!({"type": "string", "x-kubernetes-embedded-resource": true}),
                "root: type must be object with x-kubernetes-embedded-resource",
            ),
        ];
        for (schema, want) in cases {
            assert_eq!(structural_violations(&schema, "root"), vec![want.to_string()], "{schema}");
        }
        // Kubernetes' own shapes pass: int-or-string, a free-form object, a map of strings.
        let good = json!({"type": "object", "properties": {
            "port": {"x-kubernetes-int-or-string": true, "anyOf": [{"type": "integer"}, {"type": "string"}]},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "list": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string"}}},
                     "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["k"]}}});
        assert_eq!(structural_violations(&good, "root"), Vec::<String>::new());
    }

    #[test]
    fn integer_keyed_maps_become_additional_properties() {
        // PeerAuthentication's portLevelMtls: schemars writes patternProperties for u32 keys.
        let pa = schema::<authz::PeerAuthenticationSpec>();
        let port_level = &pa["properties"]["portLevelMtls"];
        assert!(port_level.get("patternProperties").is_none(), "{port_level}");
        assert_eq!(port_level["additionalProperties"]["properties"]["mode"]["type"], "string", "{port_level}");
    }
}
