//! Delta (incremental) xDS streams: per-resource versions, subscribe/unsubscribe, removals. The
//! stream loop is [`crate::stream`]'s; this module holds what a Delta request means, what its
//! responses hold, and their encoding (the transport module says why it is sluice's own).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::{ControlPlane, Node};
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;

use crate::cache::{Difference, ResourceSet};
use crate::resource::Encoded;
use crate::stream::{Core, Gone, Protocol};
use crate::transport::WireAny;
use crate::type_url::is_wildcard_type;

#[derive(Default)]
struct TypeState {
    subscribed: BTreeSet<String>,
    wildcard: bool,
    /// What the client holds: name → version (unless `held` says it).
    known: BTreeMap<String, String>,
    /// What a wildcard client holds when it is exactly a set sent to it: kept as that set, not
    /// as a copy of its names, and the next push is the difference of two sets that share
    /// everything unchanged.
    held: Option<Arc<ResourceSet>>,
    /// The nonce of the last response sent, which completes `sent_version`.
    nonce: String,
    /// The nonces of every part of the last send (one unless it was split).
    parts: Vec<String>,
    sent_version: String,
}

impl TypeState {
    /// Spells `held` out into `known`, for changes that are not a whole set.
    fn spell_out(&mut self) {
        if let Some(held) = self.held.take() {
            self.known = held.iter().map(|(n, r)| (n.to_string(), r.version.clone())).collect();
        }
    }

    /// Number of resources the client holds.
    fn holds(&self) -> usize {
        self.held.as_ref().map_or(self.known.len(), |h| h.len())
    }
}

/// A Delta stream's per-type state.
#[derive(Default)]
pub(crate) struct Delta {
    types: HashMap<String, TypeState>,
}

type DeltaCore = Core<Bytes>;

/// `resources` in runs of about `budget` bytes each (one run when `budget` is 0). Always at
/// least one run, possibly empty (a response of removals only).
fn split(resources: &[Arc<Encoded>], budget: usize) -> Vec<&[Arc<Encoded>]> {
    let mut parts = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, r) in resources.iter().enumerate() {
        if budget > 0 && size > 0 && size + r.bytes.len() > budget {
            parts.push(&resources[start..i]);
            (start, size) = (i, 0);
        }
        size += r.bytes.len();
    }
    parts.push(&resources[start..]);
    parts
}

impl Protocol for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = Bytes;
    const NAME: &'static str = "delta";

    fn node(request: &DeltaDiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }

    fn type_url(request: &DeltaDiscoveryRequest) -> &str {
        &request.type_url
    }

    async fn handle(&mut self, core: &mut DeltaCore, type_url: String, req: DeltaDiscoveryRequest) -> Result<(), Gone> {
        let first = !self.types.contains_key(&type_url);
        let state = self.types.entry(type_url.clone()).or_default();
        if first {
            state.known = req.initial_resource_versions.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            state.wildcard = req.resource_names_subscribe.is_empty() && is_wildcard_type(&type_url);
        }
        core.answered(&req.response_nonce);
        if !req.response_nonce.is_empty() && state.parts.contains(&req.response_nonce) {
            match &req.error_detail {
                Some(err) => core.nacked(&type_url, &state.sent_version, &err.message),
                // The version is acknowledged with its last part.
                None if req.response_nonce == state.nonce => core.acked(&type_url, &state.sent_version),
                None => {}
            }
        }
        for name in &req.resource_names_subscribe {
            if name == "*" {
                state.wildcard = true;
            } else {
                state.subscribed.insert(name.clone());
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == "*" {
                state.wildcard = false;
            } else {
                state.subscribed.remove(name);
                state.spell_out();
                state.known.remove(name);
            }
        }
        let changed = !req.resource_names_subscribe.is_empty();
        if first || changed || req.error_detail.is_none() {
            self.send(core, &type_url, first).await?;
        }
        Ok(())
    }

    async fn push(&mut self, core: &mut DeltaCore, type_url: &str) -> Result<(), Gone> {
        self.send(core, type_url, false).await
    }

    fn sent_versions(&self) -> impl Iterator<Item = (&str, &str)> {
        self.types.iter().map(|(t, s)| (t.as_str(), s.sent_version.as_str()))
    }
}

impl Delta {
    /// Sends what the client lacks or holds at another version, and what it holds that is gone.
    /// Sends nothing when there is no difference, unless `always` (the first request of a type).
    async fn send(&mut self, core: &mut DeltaCore, type_url: &str, always: bool) -> Result<(), Gone> {
        let start = Instant::now();
        let version = core.type_version(type_url);
        let state = self.types.get_mut(type_url).expect("state exists for requested type");
        let items = core.snapshot.of(type_url).map(|t| &t.items);
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        if !state.wildcard || items.is_none() {
            state.spell_out();
        }
        if let (true, Some(held), Some(items)) = (state.wildcard, &state.held, items) {
            for d in items.diff(held) {
                match d {
                    Difference::Put(r) => resources.push(r.clone()),
                    Difference::Removed(name) => removed.push(name.to_string()),
                }
            }
        } else if state.wildcard {
            // Everything the snapshot has that the client lacks, and everything it holds that is
            // gone: walked without collecting the names (thousands per type, per stream, per push).
            for r in items.iter().flat_map(|i| i.values()) {
                if state.known.get(r.name.as_str()) != Some(&r.version) {
                    resources.push(r.clone());
                }
            }
            removed.extend(state.known.keys().filter(|n| items.is_none_or(|i| i.get(n).is_none())).cloned());
        } else {
            for name in &state.subscribed {
                match items.and_then(|i| i.get(name)) {
                    Some(r) if state.known.get(name) != Some(&r.version) => resources.push(r.clone()),
                    None if state.known.contains_key(name) => removed.push(name.clone()),
                    _ => {}
                }
            }
        }
        if resources.is_empty() && removed.is_empty() && !always {
            // Nothing this client holds changed: it is current at the new version already.
            if state.sent_version != version {
                core.current_without_response(type_url, &version);
                state.sent_version = version;
            }
            return Ok(());
        }
        if state.wildcard {
            // The client now holds exactly the snapshot's set.
            state.held = Some(items.cloned().unwrap_or_default());
            state.known.clear();
        } else {
            for r in &resources {
                state.known.insert(r.name.to_string(), r.version.clone());
            }
            for name in &removed {
                state.known.remove(name);
            }
        }
        core.in_flight.acquire(&core.shared.pushes).await;
        state.sent_version = version.clone();
        state.parts.clear();
        let parts = split(&resources, core.shared.delta_chunk_bytes);
        let last = parts.len() - 1;
        for (i, part) in parts.into_iter().enumerate() {
            let nonce = core.next_nonce();
            state.parts.push(nonce.clone());
            let complete = i == last;
            let response = frame(DeltaResponse {
                // Only the last part names the version (in Delta it is for debugging only): a
                // client that reads it sees the version once all of it has arrived.
                system_version_info: if complete { version.clone() } else { String::new() },
                resources: part,
                type_url,
                removed_resources: if complete { std::mem::take(&mut removed) } else { Vec::new() },
                nonce: nonce.clone(),
                identifier: &core.shared.identifier,
            });
            if complete {
                core.record_sent(type_url, &version, &nonce, state.holds());
                state.nonce = nonce;
            }
            core.send(response).await?;
        }
        core.pushed(type_url, start);
        Ok(())
    }
}

/// `envoy.service.discovery.v3.Resource`, the fields sluice sends.
#[derive(Clone, PartialEq, prost::Message)]
struct WireResource {
    #[prost(string, tag = "1")]
    version: String,
    #[prost(message, optional, tag = "2")]
    resource: Option<WireAny>,
    #[prost(string, tag = "3")]
    name: String,
}

/// `envoy.service.discovery.v3.DeltaDiscoveryResponse`, the fields sluice sends.
#[derive(Clone, PartialEq, prost::Message)]
struct WireResponse {
    #[prost(string, tag = "1")]
    system_version_info: String,
    #[prost(message, repeated, tag = "2")]
    resources: Vec<WireResource>,
    #[prost(string, tag = "4")]
    type_url: String,
    #[prost(string, tag = "5")]
    nonce: String,
    #[prost(string, repeated, tag = "6")]
    removed_resources: Vec<String>,
    #[prost(message, optional, tag = "7")]
    control_plane: Option<ControlPlane>,
}

/// One Delta response, as the stream logic describes it.
pub(crate) struct DeltaResponse<'a> {
    pub system_version_info: String,
    pub resources: &'a [Arc<Encoded>],
    pub type_url: &'a str,
    pub removed_resources: Vec<String>,
    pub nonce: String,
    /// `control_plane.identifier`.
    pub identifier: &'a str,
}

/// The gRPC message frame (flag, length, message) of `response`.
pub(crate) fn frame(response: DeltaResponse<'_>) -> Bytes {
    let message = WireResponse {
        system_version_info: response.system_version_info,
        resources: response
            .resources
            .iter()
            .map(|r| WireResource {
                version: r.version.clone(),
                resource: Some(WireAny { type_url: r.type_url.clone(), value: r.bytes.clone() }),
                name: r.name.to_string(),
            })
            .collect(),
        type_url: response.type_url.to_string(),
        nonce: response.nonce,
        removed_resources: response.removed_resources,
        control_plane: Some(ControlPlane { identifier: response.identifier.to_string() }),
    };
    crate::transport::frame(&message)
}
