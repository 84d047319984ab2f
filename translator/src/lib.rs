//! sluice's compiler front and middle: the config model, validation, the validated snapshot, and
//! pure translation to Envoy xDS resources. No I/O, no clocks, no async.

pub mod dataplane;
pub mod diagnostic;
pub mod envoy;
pub mod model;
pub mod parse;
pub mod snapshot;
pub mod validation;

/// Label (on Pods, WorkloadEntries or Namespaces) that picks a workload's data plane.
pub const DATAPLANE_LABEL: &str = "sluice.io/dataplane";
