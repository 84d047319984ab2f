//! Envoy resources between protobuf JSON and protobuf bytes, checked against Envoy's own
//! descriptors: a field Envoy does not know is an error here, not a NACK later.
//!
//! The descriptor set is the one `envoy-types` 0.7.7 generates its Rust types from
//! (`descriptors/envoy-types-0.7.7.bin`; see `descriptors/README.md` to regenerate it).

use std::sync::LazyLock;

use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions};
use serde_json::Value;

static DESCRIPTORS: &[u8] = include_bytes!("../descriptors/envoy-types-0.7.7.bin");

/// Envoy's API descriptors, decoded once. The set's source info (the .proto files' comments
/// and locations, two thirds of it) is dropped: the pool keeps a copy of every file it is
/// given, and nothing here reads comments.
pub fn pool() -> &'static DescriptorPool {
    static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
        let mut set = prost_reflect::prost_types::FileDescriptorSet::decode(DESCRIPTORS)
            .expect("the bundled Envoy descriptor set decodes");
        for file in &mut set.file {
            file.source_code_info = None;
        }
        DescriptorPool::from_file_descriptor_set(set).expect("the bundled Envoy descriptor set is valid")
    });
    &POOL
}

/// A resource that does not fit its Envoy message type.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The type URL names no message in Envoy's API.
    #[error("unknown Envoy type {0:?}")]
    UnknownType(String),
    /// The JSON does not fit the message.
    #[error("{type_name} {name:?}: {reason}")]
    Invalid {
        /// Full message name.
        type_name: String,
        /// Resource name.
        name: String,
        /// The descriptor check's message.
        reason: String,
    },
}

/// The message descriptor behind a type URL (`type.googleapis.com/<full name>`).
pub fn descriptor(type_url: &str) -> Result<MessageDescriptor, CodecError> {
    let full = type_url.rsplit('/').next().unwrap_or(type_url);
    pool().get_message_by_name(full).ok_or_else(|| CodecError::UnknownType(type_url.to_string()))
}

/// Parses protobuf JSON into a message of `type_url`, rejecting unknown fields.
pub fn from_json(type_url: &str, name: &str, json: &Value) -> Result<DynamicMessage, CodecError> {
    let desc = descriptor(type_url)?;
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    DynamicMessage::deserialize_with_options(desc.clone(), json, &options).map_err(|e| CodecError::Invalid {
        type_name: desc.full_name().to_string(),
        name: name.to_string(),
        reason: e.to_string(),
    })
}

/// Encodes protobuf JSON of `type_url` to protobuf bytes.
pub fn encode(type_url: &str, name: &str, json: &Value) -> Result<Vec<u8>, CodecError> {
    Ok(from_json(type_url, name, json)?.encode_to_vec())
}

/// `shell`, an encoded message of `type_url`, with `parts` (each an encoded message) as the
/// elements of its repeated message field `field`. They go before the first field of `shell`
/// numbered above `field`, so the result is byte for byte what encoding the whole message at
/// once gives when `shell` does not set `field` itself.
pub fn splice<'a>(
    type_url: &str,
    shell: &[u8],
    field: &str,
    parts: impl Iterator<Item = &'a [u8]> + Clone,
) -> Result<Vec<u8>, CodecError> {
    let desc = descriptor(type_url)?;
    let invalid =
        |reason: String| CodecError::Invalid { type_name: desc.full_name().to_string(), name: String::new(), reason };
    let f = desc.get_field_by_name(field).ok_or_else(|| invalid(format!("no field {field:?}")))?;
    if !f.is_list() || !matches!(f.kind(), prost_reflect::Kind::Message(_)) {
        return Err(invalid(format!("field {field:?} is not a repeated message")));
    }
    let number = f.number();
    let at = split_before(shell, number).ok_or_else(|| invalid("the shell is not a valid encoding".into()))?;
    let size: usize = parts.clone().map(|p| p.len() + 2 * 10).sum();
    let mut out = Vec::with_capacity(shell.len() + size);
    out.extend_from_slice(&shell[..at]);
    for part in parts {
        prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, &mut out);
        prost::encoding::encode_varint(part.len() as u64, &mut out);
        out.extend_from_slice(part);
    }
    out.extend_from_slice(&shell[at..]);
    Ok(out)
}

/// The offset of the first top-level field of `message` numbered above `number` (its length
/// if there is none); None if `message` is not a valid encoding.
fn split_before(message: &[u8], number: u32) -> Option<usize> {
    let mut rest = message;
    loop {
        let at = message.len() - rest.len();
        if rest.is_empty() {
            return Some(at);
        }
        let key = prost::encoding::decode_varint(&mut rest).ok()?;
        if (key >> 3) > u64::from(number) {
            return Some(at);
        }
        let skip = match key & 7 {
            0 => {
                prost::encoding::decode_varint(&mut rest).ok()?;
                0
            }
            1 => 8,
            2 => usize::try_from(prost::encoding::decode_varint(&mut rest).ok()?).ok()?,
            5 => 4,
            // Groups are not used by Envoy's API.
            _ => return None,
        };
        rest = rest.get(skip..)?;
    }
}

/// The canonical protobuf JSON of a message: proto field names, default values left out.
pub fn to_json(message: &DynamicMessage) -> Value {
    let options = SerializeOptions::new().use_proto_field_name(true).stringify_64_bit_integers(false);
    message
        .serialize_with_options(serde_json::value::Serializer, &options)
        .expect("a dynamic message always serializes to JSON")
}

/// Round-trips protobuf JSON through Envoy's descriptors: validates it and returns its
/// canonical form, with `@type` first.
pub fn canonical(type_url: &str, name: &str, json: &Value) -> Result<Value, CodecError> {
    let message = from_json(type_url, name, json)?;
    let mut out = serde_json::Map::new();
    out.insert("@type".into(), Value::String(type_url.to_string()));
    if let Value::Object(fields) = to_json(&message) {
        out.extend(fields);
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::type_url::CLUSTER;

    #[test]
    fn known_fields_round_trip() {
        let c = json!({"name": "a", "type": "STATIC", "connect_timeout": "10s",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}});
        let out = canonical(CLUSTER, "a", &c).unwrap();
        assert_eq!(out["connect_timeout"], "10s");
        assert_eq!(out["@type"], CLUSTER);
        let bytes = encode(CLUSTER, "a", &c).unwrap();
        assert!(!bytes.is_empty());
    }

    #[test]
    fn a_spliced_message_is_the_whole_message_encoded_at_once() {
        const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
        const HOST: &str = "type.googleapis.com/envoy.config.route.v3.VirtualHost";
        let hosts = [
            json!({"name": "a", "domains": ["a", "a:80"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c"}}]}),
            json!({"name": "b", "domains": ["*"], "include_request_attempt_count": true}),
        ];
        let whole = json!({"name": "80", "virtual_hosts": hosts, "validate_clusters": false,
            "ignore_port_in_host_matching": true, "request_headers_to_remove": ["x"]});
        let shell = json!({"name": "80", "validate_clusters": false, "ignore_port_in_host_matching": true,
            "request_headers_to_remove": ["x"]});
        let parts: Vec<Vec<u8>> = hosts.iter().map(|h| encode(HOST, "h", h).unwrap()).collect();
        let spliced =
            splice(ROUTE, &encode(ROUTE, "80", &shell).unwrap(), "virtual_hosts", parts.iter().map(|p| &p[..]));
        assert_eq!(spliced.unwrap(), encode(ROUTE, "80", &whole).unwrap());
        // No parts, and a shell with nothing after the field.
        let bare = encode(ROUTE, "80", &json!({"name": "80"})).unwrap();
        assert_eq!(splice(ROUTE, &bare, "virtual_hosts", std::iter::empty()).unwrap(), bare);
        assert!(splice(ROUTE, &bare, "name", std::iter::empty()).is_err(), "not a repeated message");
        assert!(splice(ROUTE, &[0x0a, 0x05], "virtual_hosts", std::iter::empty()).is_err(), "truncated");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = canonical(CLUSTER, "a", &json!({"name": "a", "conect_timeout": "1s"})).unwrap_err();
        assert!(err.to_string().contains("conect_timeout"), "{err}");
        assert!(matches!(descriptor("type.googleapis.com/no.Such"), Err(CodecError::UnknownType(_))));
    }
}
