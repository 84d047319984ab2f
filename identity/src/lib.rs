//! Workload identity for sluice, as Istio has it: SPIFFE ids ([`spiffe`]), a certificate
//! authority that signs workload certificates by istiod's rules ([`authority`]), and the
//! messages of Istio's CSR API ([`api`]) that node agents and istio-agent speak.

pub mod api;
pub mod authority;
pub mod spiffe;

pub use authority::{CaError, CaSource, CertificateAuthority, LeafPolicy};
pub use spiffe::{DEFAULT_TRUST_DOMAIN, SpiffeId, SpiffeIdError};
