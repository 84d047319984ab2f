//! What each connected proxy was sent and what it acknowledged: the data behind
//! `/debug/syncz` and `istioctl proxy-status`.

use std::collections::BTreeMap;

use serde::Serialize;

/// Per-type sync state of one proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TypeStatus {
    /// Version last sent.
    pub sent_version: String,
    /// Nonce of the last response.
    pub sent_nonce: String,
    /// Version last acknowledged.
    pub acked_version: String,
    /// The last NACK: rejected version and Envoy's message.
    pub last_nack: Option<Nack>,
    /// Number of resources last sent (SotW) or known by the proxy (Delta).
    pub resources: usize,
}

/// A rejected push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nack {
    /// The version the proxy rejected.
    pub version: String,
    /// The proxy's `error_detail.message`.
    pub message: String,
}

/// Sync state of one proxy stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProxyStatus {
    /// Node id.
    pub node_id: String,
    /// `sotw` or `delta`.
    pub protocol: String,
    /// Config version of the snapshot the stream holds.
    pub snapshot_version: u64,
    /// By type URL.
    pub types: BTreeMap<String, TypeStatus>,
    /// Why the latest config could not be made into this proxy's snapshot: the proxy keeps
    /// `snapshot_version`, which is stale. None while it is current.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generate_error: Option<String>,
}

impl ProxyStatus {
    /// True when every type sent has been acknowledged at the version sent.
    pub fn in_sync(&self) -> bool {
        self.types.values().all(|t| t.sent_nonce.is_empty() || t.acked_version == t.sent_version)
    }
}
