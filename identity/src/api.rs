//! Istio's CSR API (`istio.v1.auth.IstioCertificateService`, istio/api
//! `security/v1alpha1/ca.proto`): the messages, the method's path and the metadata key node
//! agents impersonate with.

/// `istio.v1.auth.IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded certificate signing request; only its public key is used.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested validity in seconds (0: the CA's default).
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Opaque metadata; `ImpersonatedIdentity` names the identity a node agent asks for.
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

/// `istio.v1.auth.IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM certificates: the leaf first, the root last.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// The gRPC path of `CreateCertificate`.
pub const CREATE_CERTIFICATE_PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// The gRPC service name.
pub const SERVICE_NAME: &str = "istio.v1.auth.IstioCertificateService";

/// The metadata key with which a node agent asks for another identity's certificate.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

impl IstioCertificateRequest {
    /// The identity a node agent asks to impersonate, if any (a string value of
    /// [`IMPERSONATED_IDENTITY`]).
    pub fn impersonated(&self) -> Option<&str> {
        let value = self.metadata.as_ref()?.fields.get(IMPERSONATED_IDENTITY)?;
        match &value.kind {
            Some(prost_types::value::Kind::StringValue(s)) if !s.is_empty() => Some(s),
            _ => None,
        }
    }

    /// This request asking to impersonate `identity`.
    pub fn impersonating(mut self, identity: &str) -> Self {
        let value = prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(identity.to_string())) };
        self.metadata.get_or_insert_with(Default::default).fields.insert(IMPERSONATED_IDENTITY.to_string(), value);
        self
    }
}
