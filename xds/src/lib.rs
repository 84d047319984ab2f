//! sluice's xDS building blocks. Generic over Envoy resources; knows nothing of Istio.
//!
//! Today: encoding of Envoy resources against Envoy's descriptors and config dumps. The ADS
//! server (State-of-the-World and Delta) lands here next.

pub mod codec;
pub mod config_dump;
