//! sluice's xDS server library, in the spirit of go-control-plane. Generic over Envoy resources;
//! knows nothing of Istio.
//!
//! - [`codec`]: protobuf JSON ↔ protobuf, checked against Envoy's descriptors.
//! - [`resource`]: resources encoded once and shared.
//! - [`type_url`]: the resource types, their push order and subscription.
//! - [`cache`]: per-proxy snapshots with per-type versions.
//! - [`server`]: ADS (State-of-the-World and Delta) and the per-type services, ACK/NACK
//!   bookkeeping ([`status`]), push on refresh.

pub mod authorization;
pub mod cache;
pub mod codec;
pub mod config_dump;
mod delta;
pub mod resource;
pub mod server;
mod shared;
mod sotw;
pub mod status;
mod stream;
pub mod throttle;
mod transport;
pub mod type_url;
mod typed;
