//! Workload identity for sluice, as Istio has it: SPIFFE ids ([`spiffe`]), a certificate
//! authority that signs workload certificates by istiod's rules ([`authority`]), and the
//! messages and service of Istio's CSR API ([`api`], [`service`]) that node agents and
//! istio-agent speak.

pub mod api;
pub mod authority;
pub mod service;
pub mod spiffe;
pub mod workload;

pub use authority::{CaError, CaSource, CertificateAuthority, LeafPolicy};
pub use spiffe::{DEFAULT_TRUST_DOMAIN, SpiffeId, SpiffeIdError};
