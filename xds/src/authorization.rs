//! Who may open a stream for which node: the application decides (on a port that
//! authenticates its clients), from the stream's request headers and connection and the node
//! its first request names.

use std::sync::Arc;

use futures::future::BoxFuture;
use tonic::Status;

use crate::shared::NodeInfo;

/// The caller of a stream as the transport saw it: the request's headers (a bearer token) and
/// its extensions (the TLS connection's verified client certificates, tonic's `TlsConnectInfo`).
#[derive(Debug, Clone, Default)]
pub struct StreamCaller {
    /// The request's headers.
    pub headers: http::HeaderMap,
    /// The request's extensions, as the transport filled them.
    pub extensions: http::Extensions,
}

/// Decides whether a caller may have a node's config. Implemented by the application.
pub trait Authorizer: Send + Sync + 'static {
    /// Ok when `caller` may have the config of `node`; else the status the stream ends with
    /// (`UNAUTHENTICATED` when the caller is unknown, `PERMISSION_DENIED` when it is another).
    fn authorize<'a>(&'a self, caller: &'a StreamCaller, node: &'a NodeInfo) -> BoxFuture<'a, Result<(), Status>>;
}

/// A listener's authorization: None serves every caller (a local, plaintext port).
#[derive(Clone, Default)]
pub(crate) struct Gate(pub Option<Arc<dyn Authorizer>>);

impl Gate {
    /// What a stream from a request with `headers` and `extensions` must pass, if anything.
    pub fn admission(&self, headers: &http::HeaderMap, extensions: &http::Extensions) -> Option<Admission> {
        let authorizer = self.0.clone()?;
        Some(Admission {
            authorizer,
            caller: StreamCaller { headers: headers.clone(), extensions: extensions.clone() },
        })
    }
}

/// A stream's caller and the authorizer that decides on the node its first request names.
pub(crate) struct Admission {
    authorizer: Arc<dyn Authorizer>,
    caller: StreamCaller,
}

impl Admission {
    /// Whether the caller may have `node`'s config.
    pub async fn check(&self, node: &NodeInfo) -> Result<(), Status> {
        self.authorizer.authorize(&self.caller, node).await
    }
}
