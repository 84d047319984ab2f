//! Encoded resources: converted to protobuf once, then shared (by `Arc`) by every snapshot and
//! every proxy that receives them.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, Weak};

use serde_json::Value;
use smol_str::SmolStr;

use crate::codec::{CodecError, encode, splice};

/// One resource in protobuf form.
#[derive(Debug, PartialEq, Eq)]
pub struct Encoded {
    /// Type URL.
    pub type_url: String,
    /// Resource name (the key of every set that holds the resource: a copy is a count).
    pub name: SmolStr,
    /// Content version (hash of the encoded bytes), as sent in Delta xDS.
    pub version: String,
    /// The protobuf bytes of the resource message (shared, not copied, by every response that
    /// carries it).
    pub bytes: bytes::Bytes,
}

impl Encoded {
    /// Wraps already-encoded bytes.
    pub fn new(type_url: &str, name: &str, bytes: Vec<u8>) -> Self {
        let mut h = DefaultHasher::new();
        bytes.hash(&mut h);
        let version = format!("{:016x}", h.finish());
        Self { type_url: type_url.to_string(), name: name.into(), version, bytes: bytes.into() }
    }

    /// As a `google.protobuf.Any`.
    pub fn to_any(&self) -> envoy_types::pb::google::protobuf::Any {
        envoy_types::pb::google::protobuf::Any { type_url: self.type_url.clone(), value: self.bytes.to_vec() }
    }
}

/// Key of an interned resource: type, name and a hash of its JSON text.
type Key = (String, String, u64);

/// Encodes protobuf JSON once per distinct content: proxies that get the same resource share
/// one encoding. Entries live as long as some snapshot holds them.
#[derive(Debug, Default)]
pub struct Interner {
    entries: Mutex<HashMap<Key, Weak<Encoded>>>,
}

impl Interner {
    /// The shared encoding of `json` as `type_url`, encoding it only if no live snapshot has it.
    pub fn encode(&self, type_url: &str, name: &str, json: &Value) -> Result<Arc<Encoded>, CodecError> {
        let mut h = DefaultHasher::new();
        // serde_json's Value hashes structurally: no serialization per lookup.
        json.hash(&mut h);
        let key = (type_url.to_string(), name.to_string(), h.finish());
        if let Some(hit) = self.entries.lock().expect("interner lock").get(&key).and_then(Weak::upgrade) {
            return Ok(hit);
        }
        let encoded = Arc::new(Encoded::new(type_url, name, encode(type_url, name, json)?));
        self.insert(key, &encoded);
        Ok(encoded)
    }

    /// The shared encoding of a message of `type_url` that is `shell` with `parts` as the
    /// elements of its repeated message field `field` (see [`crate::codec::splice`]): only the
    /// shell is encoded, the parts are copied in. Its content version hashes the shell and the
    /// parts' versions, so a change of one part costs a copy, not an encoding of the whole.
    pub fn encode_with_parts(
        &self,
        type_url: &str,
        name: &str,
        shell: &Value,
        field: &str,
        parts: &[Arc<Encoded>],
    ) -> Result<Arc<Encoded>, CodecError> {
        let mut h = DefaultHasher::new();
        (field, shell).hash(&mut h);
        // A part's version is the hash of its bytes, which hold its name.
        for p in parts {
            p.version.hash(&mut h);
        }
        let key = (type_url.to_string(), name.to_string(), h.finish());
        if let Some(hit) = self.entries.lock().expect("interner lock").get(&key).and_then(Weak::upgrade) {
            return Ok(hit);
        }
        let shell_bytes = encode(type_url, name, shell)?;
        let bytes = splice(type_url, &shell_bytes, field, parts.iter().map(|p| &p.bytes[..]))?;
        let encoded = Arc::new(Encoded {
            type_url: type_url.to_string(),
            name: name.into(),
            version: format!("{:016x}", key.2),
            bytes: bytes.into(),
        });
        self.insert(key, &encoded);
        Ok(encoded)
    }

    fn insert(&self, key: Key, encoded: &Arc<Encoded>) {
        let mut entries = self.entries.lock().expect("interner lock");
        // Drop dead entries now and then so the map does not grow without bound.
        if entries.len() > 1024 && entries.len().is_power_of_two() {
            entries.retain(|_, w| w.strong_count() > 0);
        }
        entries.insert(key, Arc::downgrade(encoded));
    }

    /// Number of live shared encodings.
    pub fn live(&self) -> usize {
        self.entries.lock().expect("interner lock").values().filter(|w| w.strong_count() > 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::type_url::CLUSTER;

    #[test]
    fn same_content_is_encoded_once() {
        let i = Interner::default();
        let a = i.encode(CLUSTER, "a", &json!({"name": "a"})).unwrap();
        let b = i.encode(CLUSTER, "a", &json!({"name": "a"})).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let c = i.encode(CLUSTER, "a", &json!({"name": "a", "connect_timeout": "1s"})).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert_ne!(a.version, c.version);
        drop((a, b));
        assert_eq!(i.live(), 1);
    }

    #[test]
    fn a_message_from_parts_is_shared_and_changes_with_a_part() {
        const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
        const HOST: &str = "type.googleapis.com/envoy.config.route.v3.VirtualHost";
        let i = Interner::default();
        let host =
            |name: &str, domain: &str| i.encode(HOST, name, &json!({"name": name, "domains": [domain]})).unwrap();
        let shell = json!({"name": "80", "validate_clusters": false});
        let parts = [host("a", "a"), host("b", "b")];
        let whole = i.encode_with_parts(ROUTE, "80", &shell, "virtual_hosts", &parts).unwrap();
        let expected = json!({"name": "80", "validate_clusters": false,
            "virtual_hosts": [{"name": "a", "domains": ["a"]}, {"name": "b", "domains": ["b"]}]});
        assert_eq!(whole.bytes, encode(ROUTE, "80", &expected).unwrap());
        let again = i.encode_with_parts(ROUTE, "80", &shell, "virtual_hosts", &parts).unwrap();
        assert!(Arc::ptr_eq(&whole, &again), "the same shell and parts are one encoding");
        let changed = i.encode_with_parts(ROUTE, "80", &shell, "virtual_hosts", &[parts[0].clone(), host("b", "c")]);
        assert_ne!(changed.unwrap().version, whole.version);
    }
}
