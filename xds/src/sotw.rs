//! State-of-the-World xDS streams: full resource lists per type, nonces, ACK/NACK. The stream
//! loop is [`crate::stream`]'s; this module holds what a SotW request means and what its
//! response holds.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::{ControlPlane, Node};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

use crate::cache::{Difference, ResourceSet};
use crate::resource::Encoded;
use crate::stream::{Core, Gone, Protocol};
use crate::transport::WireAny;
use crate::type_url::{is_full_state_type, is_wildcard_type};

#[derive(Default)]
struct TypeState {
    names: BTreeSet<String>,
    wildcard: bool,
    nonce: String,
    sent_version: String,
    /// For a subscription by name: the type's set when it was last sent, and the names asked
    /// for since. Only what changed is sent to such a client: of listeners and clusters
    /// (whose responses are the whole state, and whose absence is a removal) all it asked for
    /// once one of them changed; of the other types the changed resources alone, as xDS lets
    /// a server group them.
    sent: Option<Arc<ResourceSet>>,
    added: Vec<String>,
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
        state.added.extend(names.difference(&state.names).cloned());
        state.names = names;
        state.wildcard = wildcard;
        let stale = state.sent_version != current_version;
        if first || names_changed || (stale && req.error_detail.is_none()) {
            self.send(core, &type_url, first || names_changed).await?;
        }
        Ok(())
    }

    async fn push(&mut self, core: &mut SotwCore, type_url: &str) -> Result<(), Gone> {
        let due = self
            .types
            .get(type_url)
            .is_some_and(|s| !s.nonce.is_empty() && s.sent_version != core.type_version(type_url));
        if due {
            self.send(core, type_url, false).await?;
        }
        Ok(())
    }

    fn sent_versions(&self) -> impl Iterator<Item = (&str, &str)> {
        self.types.iter().map(|(t, s)| (t.as_str(), s.sent_version.as_str()))
    }
}

impl Sotw {
    /// Sends what the client asked for of `type_url`: everything to a wildcard subscription;
    /// to one by name, what changed since it was last sent (see `TypeState::sent`), or nothing
    /// when nothing did, unless `always` (a new or changed request).
    async fn send(&mut self, core: &mut SotwCore, type_url: &str, always: bool) -> Result<(), Gone> {
        let version = core.type_version(type_url);
        let state = self.types.get_mut(type_url).expect("state exists for requested type");
        let items = core.snapshot.of(type_url).map(|t| &t.items);
        let selected: Vec<Arc<Encoded>> = if state.wildcard {
            items.iter().flat_map(|i| i.values()).cloned().collect()
        } else {
            let asked = |name: &str| state.names.contains(name);
            let (mut changed, mut gone) = (Vec::new(), false);
            match (&state.sent, items) {
                // The difference of two sets walks past what they share.
                (Some(before), Some(now)) => {
                    for d in now.diff(before) {
                        match d {
                            Difference::Put(r) if asked(&r.name) => changed.push(r.clone()),
                            Difference::Removed(name) if asked(name) => gone = true,
                            _ => {}
                        }
                    }
                }
                (None, Some(now)) => changed.extend(state.names.iter().filter_map(|n| now.get(n)).cloned()),
                (Some(before), None) => gone = state.names.iter().any(|n| before.get(n).is_some()),
                (None, None) => {}
            }
            // Names new to the client come even when they did not change (a first send has
            // them all already).
            let added = std::mem::take(&mut state.added);
            if state.sent.is_some() && !added.is_empty() {
                let have: std::collections::HashSet<String> = changed.iter().map(|r| r.name.to_string()).collect();
                let new = added.iter().filter(|n| !have.contains(*n)).filter_map(|n| items?.get(n));
                changed.extend(new.cloned().collect::<Vec<_>>());
            }
            let full = is_full_state_type(type_url);
            let selected = if !full {
                changed
            } else if !changed.is_empty() || gone || always {
                state.names.iter().filter_map(|n| items?.get(n)).cloned().collect()
            } else {
                Vec::new()
            };
            state.sent = items.cloned();
            if selected.is_empty() && !(full && gone) && !always {
                // Nothing this client holds changed: it is current at the new version already.
                core.current_without_response(type_url, &version);
                state.sent_version = version;
                return Ok(());
            }
            selected
        };
        // Before the response is built: it holds a copy of every resource.
        core.in_flight.acquire(&core.shared.pushes).await;
        let start = Instant::now();
        let resources: Vec<WireAny> = selected.iter().map(|r| wire(r)).collect();
        state.nonce = core.next_nonce();
        state.sent_version = version.clone();
        // A client that asked by name holds at most what it asked for.
        let holds = if state.wildcard { resources.len() } else { state.names.len() };
        core.record_sent(type_url, &version, &state.nonce, holds);
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
fn wire(r: &Encoded) -> WireAny {
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
