//! What the agent keeps of the resources it received: their versions (sent back when a stream
//! resumes) and the map-ready values it needs later, not the decoded messages. A mesh of
//! 100 000 workloads is 100 000 of these, so each is a few dozen bytes.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse;
use prost::Message;
use sluice_dataplane_common::{ServiceKey, Workload};
use sluice_translator::dataplane::{KernelAuthorization, KernelService, KernelWorkload};

use crate::policy::workload_value;
use crate::sync::service_key;

/// A resource version as received. sluice's versions are 16 hex digits, held as a number;
/// any other text is kept as it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Version {
    /// 16 lowercase hex digits.
    Hex(u64),
    /// Anything else.
    Text(Box<str>),
}

impl Version {
    /// The version `text` names.
    pub fn parse(text: &str) -> Self {
        let hex = text.len() == 16 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        match u64::from_str_radix(text, 16) {
            Ok(n) if hex => Version::Hex(n),
            _ => Version::Text(text.into()),
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Version::Hex(n) => write!(f, "{n:016x}"),
            Version::Text(t) => f.write_str(t),
        }
    }
}

/// A held service entry: its version and the map key it was written under (to remove it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldService {
    /// Version received.
    pub version: Version,
    /// The entry's key in the services map.
    pub key: ServiceKey,
}

/// A held workload: what its cgroup's map entry, its address's identity and its policy set
/// are made of.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldWorkload {
    /// Version received.
    pub version: Version,
    /// The workload's map value (identity, namespace, policy set, mode, address).
    pub value: Workload,
    /// It runs on this node: `sluice run` may start it here.
    pub local: bool,
    /// Its rules, when the kernel protects it (`value.policy` is not 0).
    pub authorization: Option<Box<KernelAuthorization>>,
}

/// The held form of a resource type's messages.
pub trait Hold: Message + Default {
    /// What is held of it.
    type Held;
    /// The held form of `self` at `version`, or why it cannot be held.
    fn hold(&self, version: Version) -> Result<Self::Held, String>;
}

impl Hold for KernelService {
    type Held = HeldService;
    fn hold(&self, version: Version) -> Result<HeldService, String> {
        Ok(HeldService { version, key: service_key(self).map_err(|e| e.to_string())? })
    }
}

impl Hold for KernelWorkload {
    type Held = HeldWorkload;
    fn hold(&self, version: Version) -> Result<HeldWorkload, String> {
        let value = workload_value(self);
        let authorization = self.authorization.clone().filter(|_| value.policy != 0).map(Box::new);
        Ok(HeldWorkload { version, value, local: self.local, authorization })
    }
}

/// Held resources of one type, by name.
pub type HeldSet<H> = BTreeMap<Box<str>, H>;

/// What applying a Delta response changed in the held resources of one type: the value each
/// touched name had before (None: it was absent), so a failed apply can be undone. The held
/// set is changed in place: a copy of it per response would be the whole mesh each time.
#[derive(Debug)]
pub struct Undo<H> {
    /// Upserted names and what they held before.
    pub before: Vec<(Box<str>, Option<H>)>,
    /// Removed names and what they held.
    pub removed: Vec<(Box<str>, H)>,
}

impl<H> Undo<H> {
    /// Puts every touched name back as it was (removals were applied last: undone first).
    pub fn revert(self, held: &mut HeldSet<H>) {
        for (name, old) in self.removed {
            held.insert(name, old);
        }
        for (name, old) in self.before.into_iter().rev() {
            match old {
                Some(v) => held.insert(name, v),
                None => held.remove(&name),
            };
        }
    }
}

/// Applies `response` to `held` (new and changed resources decoded and held, removed ones
/// dropped) and returns the decoded messages with the undo record; or leaves `held` as it was
/// and returns the NACK's message.
pub fn update<M: Hold>(
    held: &mut HeldSet<M::Held>,
    response: &DeltaDiscoveryResponse,
) -> Result<(Vec<M>, Undo<M::Held>), String> {
    let mut decoded = Vec::with_capacity(response.resources.len());
    let mut holds = Vec::with_capacity(response.resources.len());
    for r in &response.resources {
        let bytes = r.resource.as_ref().map(|a| a.value.as_slice()).unwrap_or_default();
        let invalid = |e: String| format!("{} {}: {e}", response.type_url, r.name);
        let value = M::decode(bytes).map_err(|e| invalid(e.to_string()))?;
        holds.push((Box::<str>::from(r.name.as_str()), value.hold(Version::parse(&r.version)).map_err(invalid)?));
        decoded.push(value);
    }
    let mut undo = Undo { before: Vec::with_capacity(holds.len()), removed: Vec::new() };
    for (name, value) in holds {
        let old = held.insert(name.clone(), value);
        undo.before.push((name, old));
    }
    for name in &response.removed_resources {
        if let Some((name, old)) = held.remove_entry(name.as_str()) {
            undo.removed.push((name, old));
        }
    }
    Ok((decoded, undo))
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::Resource;
    use envoy_types::pb::google::protobuf::Any;
    use sluice_translator::dataplane::SERVICE_TYPE;

    use super::*;

    fn service(name: &str, port: u32) -> KernelService {
        KernelService { name: name.into(), vip: "127.100.0.1".into(), port, ..Default::default() }
    }

    fn resource(s: &KernelService, version: &str) -> Resource {
        Resource {
            name: s.name.clone(),
            version: version.into(),
            resource: Some(Any { type_url: SERVICE_TYPE.into(), value: s.encode_to_vec() }),
            ..Default::default()
        }
    }

    fn hold(held: &mut HeldSet<HeldService>, s: &KernelService, version: &str) {
        held.insert(s.name.as_str().into(), s.hold(Version::parse(version)).unwrap());
    }

    #[test]
    fn versions_are_held_as_numbers_when_they_are_sluices_and_as_text_otherwise() {
        for text in ["00000000000000ff", "0123456789abcdef", "1", "v2", "0123456789ABCDEF", "+123456789abcdef"] {
            assert_eq!(Version::parse(text).to_string(), text);
        }
        assert_eq!(Version::parse("00000000000000ff"), Version::Hex(255));
        assert!(matches!(Version::parse("0123456789ABCDEF"), Version::Text(_)), "upper case is not sluice's");
        assert!(matches!(Version::parse("+123456789abcdef"), Version::Text(_)));
    }

    #[test]
    fn a_response_is_applied_in_place_and_reverted_exactly() {
        let mut held = HeldSet::new();
        hold(&mut held, &service("a", 80), "1");
        hold(&mut held, &service("b", 80), "1");
        let before = held.clone();
        let response = DeltaDiscoveryResponse {
            type_url: SERVICE_TYPE.into(),
            resources: vec![resource(&service("a", 81), "2"), resource(&service("c", 80), "1")],
            removed_resources: vec!["b".into(), "never-held".into()],
            ..Default::default()
        };
        let (decoded, undo) = update::<KernelService>(&mut held, &response).unwrap();
        assert_eq!(decoded, [service("a", 81), service("c", 80)]);
        assert_eq!(held.keys().map(|k| &**k).collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(held["a"].key.port, 81);
        assert_eq!(held["a"].version, Version::Text("2".into()));
        assert_eq!(undo.removed.len(), 1, "only what was held is recorded as removed");
        assert_eq!(&*undo.removed[0].0, "b");
        undo.revert(&mut held);
        assert_eq!(held, before);

        let broken = DeltaDiscoveryResponse {
            type_url: SERVICE_TYPE.into(),
            resources: vec![Resource {
                name: "x".into(),
                resource: Some(Any { type_url: SERVICE_TYPE.into(), value: vec![0xff, 0xff] }),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(update::<KernelService>(&mut held, &broken).unwrap_err().contains(" x: "));
        let bad_vip = KernelService { vip: "not-an-ip".into(), ..service("y", 80) };
        let unholdable = DeltaDiscoveryResponse {
            type_url: SERVICE_TYPE.into(),
            resources: vec![resource(&service("d", 80), "1"), resource(&bad_vip, "1")],
            ..Default::default()
        };
        let err = update::<KernelService>(&mut held, &unholdable).unwrap_err();
        assert!(err.contains(" y: ") && err.contains("not-an-ip"), "{err}");
        assert_eq!(held, before, "a response that does not decode or hold changes nothing");
    }
}
