//! State-of-the-World xDS streams: full resource lists per type, nonces, ACK/NACK. The stream
//! loop is [`crate::stream`]'s; this module holds what a SotW request means and what its
//! response holds.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::{ControlPlane, Node};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

use crate::stream::{Core, Gone, Protocol};
use crate::transport::WireAny;
use crate::type_url::is_wildcard_type;

#[derive(Default)]
struct TypeState {
    names: BTreeSet<String>,
    wildcard: bool,
    nonce: String,
    sent_version: String,
    /// What the last response held (names and versions), for named subscriptions: a new
    /// version of the type that changes none of them is not sent.
    sent_digest: u64,
}

/// The digest of the resources a response holds.
fn digest<'a>(resources: impl Iterator<Item = &'a std::sync::Arc<crate::resource::Encoded>>) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    for r in resources {
        r.name.hash(&mut h);
        r.version.hash(&mut h);
    }
    h.finish()
}

/// A SotW stream's per-type state.
#[derive(Default)]
pub(crate) struct Sotw {
    types: HashMap<String, TypeState>,
}

type SotwCore = Core<Bytes>;

impl Protocol for Sotw {
    type Request = DiscoveryRequest;
    type Response = Bytes;
    const NAME: &'static str = "sotw";

    fn node(request: &DiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }

    fn type_url(request: &DiscoveryRequest) -> &str {
        &request.type_url
    }

    async fn handle(&mut self, core: &mut SotwCore, type_url: String, req: DiscoveryRequest) -> Result<(), Gone> {
        let current_version = core.type_version(&type_url);
        let state = self.types.entry(type_url.clone()).or_default();
        if !req.response_nonce.is_empty() {
            core.answered(&req.response_nonce);
            if req.response_nonce != state.nonce {
                // A reply to an older response: superseded by what we sent since.
                return Ok(());
            }
            match &req.error_detail {
                Some(err) => core.nacked(&type_url, &state.sent_version, &err.message),
                None => core.acked(&type_url, &req.version_info),
            }
        }
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        let wildcard = names.contains("*") || (names.is_empty() && is_wildcard_type(&type_url));
        let first = state.nonce.is_empty();
        let names_changed = names != state.names || wildcard != state.wildcard;
        state.names = names;
        state.wildcard = wildcard;
        let stale = state.sent_version != current_version;
        if first || names_changed || (stale && req.error_detail.is_none()) {
            self.send(core, &type_url).await?;
        }
        Ok(())
    }

    async fn push(&mut self, core: &mut SotwCore, type_url: &str) -> Result<(), Gone> {
        let version = core.type_version(type_url);
        let Some(state) = self.types.get_mut(type_url) else { return Ok(()) };
        if state.nonce.is_empty() || state.sent_version == version {
            return Ok(());
        }
        // A client that asked for names (gRPC always does) hears of a change to those only.
        if !state.wildcard {
            let items = core.snapshot.of(type_url).map(|t| &t.items);
            let held = state.names.iter().filter_map(|n| items?.get(n));
            if digest(held) == state.sent_digest {
                core.current_without_response(type_url, &version);
                state.sent_version = version;
                return Ok(());
            }
        }
        self.send(core, type_url).await
    }

    fn sent_versions(&self) -> impl Iterator<Item = (&str, &str)> {
        self.types.iter().map(|(t, s)| (t.as_str(), s.sent_version.as_str()))
    }
}

impl Sotw {
    /// Sends every resource of `type_url` the client asked for.
    async fn send(&mut self, core: &mut SotwCore, type_url: &str) -> Result<(), Gone> {
        // Before the response is built: it holds a copy of every resource.
        core.in_flight.acquire(&core.shared.pushes).await;
        let start = Instant::now();
        let version = core.type_version(type_url);
        let state = self.types.get_mut(type_url).expect("state exists for requested type");
        let resources: Vec<WireAny> = match core.snapshot.of(type_url) {
            Some(t) if state.wildcard => t.items.values().map(|r| wire(r)).collect(),
            Some(t) => {
                state.sent_digest = digest(state.names.iter().filter_map(|n| t.items.get(n)));
                state.names.iter().filter_map(|n| t.items.get(n)).map(|r| wire(r)).collect()
            }
            None => {
                state.sent_digest = digest(std::iter::empty());
                Vec::new()
            }
        };
        state.nonce = core.next_nonce();
        state.sent_version = version.clone();
        core.record_sent(type_url, &version, &state.nonce, resources.len());
        let response = WireResponse {
            version_info: version,
            resources,
            type_url: type_url.to_string(),
            nonce: state.nonce.clone(),
            control_plane: Some(ControlPlane { identifier: core.shared.identifier.clone() }),
        };
        core.send(crate::transport::frame(&response)).await?;
        core.pushed(type_url, start);
        Ok(())
    }
}

/// A resource as the response holds it: its shared encoding, not a copy.
fn wire(r: &crate::resource::Encoded) -> WireAny {
    WireAny { type_url: r.type_url.clone(), value: r.bytes.clone() }
}

/// `envoy.service.discovery.v3.DiscoveryResponse`, the fields sluice sends.
#[derive(Clone, PartialEq, prost::Message)]
struct WireResponse {
    #[prost(string, tag = "1")]
    version_info: String,
    #[prost(message, repeated, tag = "2")]
    resources: Vec<WireAny>,
    #[prost(string, tag = "4")]
    type_url: String,
    #[prost(string, tag = "5")]
    nonce: String,
    #[prost(message, optional, tag = "6")]
    control_plane: Option<ControlPlane>,
}
