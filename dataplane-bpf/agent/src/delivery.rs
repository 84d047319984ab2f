//! The agent's side of ADS: one Delta stream subscribed to sluice's kernel resource types,
//! resumed with the versions it holds so a reconnect sends only what changed.

use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use sluice_dataplane_api::AGENT_NODE_PREFIX;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::agent::AgentState;
use crate::{DataplaneError, Result};

/// Largest response the agent accepts, as the server's sending limit.
const MAX_MESSAGE: usize = 256 * 1024 * 1024;

fn xds_err(what: &str) -> impl FnOnce(tonic::Status) -> DataplaneError + '_ {
    move |s| DataplaneError::Xds(format!("{what}: {}", s.message()))
}

/// Runs one stream until it ends. Returns how many responses it applied.
pub async fn stream(addr: &str, node: &str, state: &Arc<Mutex<AgentState>>) -> Result<u64> {
    let mut client = AggregatedDiscoveryServiceClient::connect(addr.to_string())
        .await
        .map_err(|e| DataplaneError::Xds(format!("connecting to {addr}: {e}")))?
        // A first response carries every workload of the mesh (100,000 are ~15 MB); the server
        // allows 256 MB.
        .max_decoding_message_size(MAX_MESSAGE);
    let (tx, rx) = mpsc::channel(16);
    let node = Node { id: format!("{AGENT_NODE_PREFIX}{node}"), ..Default::default() };
    let types = state.lock().expect("agent state").types();
    for &type_url in types {
        let initial_resource_versions = state.lock().expect("agent state").versions(type_url);
        let request = DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: type_url.into(),
            resource_names_subscribe: vec!["*".into()],
            initial_resource_versions,
            ..Default::default()
        };
        tx.send(request).await.map_err(|_| DataplaneError::Xds("request channel closed".into()))?;
    }
    let mut responses = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map_err(xds_err("opening the stream"))?
        .into_inner();
    state.lock().expect("agent state").metrics.connected.set(1);
    let mut applied = 0;
    while let Some(response) = responses.message().await.map_err(xds_err("receiving"))? {
        let started = std::time::Instant::now();
        let outcome = state.lock().expect("agent state").apply_response(&response);
        tracing::debug!(
            type_url = %response.type_url,
            resources = response.resources.len(),
            removed = response.removed_resources.len(),
            version = %response.system_version_info,
            took_us = started.elapsed().as_micros() as u64,
            "response applied"
        );
        let error_detail = outcome.err().map(|message| {
            tracing::warn!(type_url = %response.type_url, %message, "rejecting update");
            RpcStatus { code: tonic::Code::InvalidArgument as i32, message, details: vec![] }
        });
        applied += u64::from(error_detail.is_none());
        let ack = ack(&response, error_detail);
        tx.send(ack).await.map_err(|_| DataplaneError::Xds("request channel closed".into()))?;
    }
    Ok(applied)
}

fn ack(response: &DeltaDiscoveryResponse, error_detail: Option<RpcStatus>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: response.type_url.clone(),
        response_nonce: response.nonce.clone(),
        error_detail,
        ..Default::default()
    }
}
