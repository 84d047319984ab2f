//! How responses reach the wire: each response (Delta or State-of-the-World) is encoded once,
//! into a buffer of its own size, straight from the shared resource encodings.
//!
//! tonic's generated services would build a response whose `Any` values are owned copies of
//! every resource, then encode it into one buffer per stream that keeps the size of the largest
//! message it ever held (a route configuration of a large mesh is megabytes): with a thousand
//! streams that is gigabytes. So the streaming methods are served here, in front of the
//! generated services, which keep the others (REST-style fetch).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use http_body::Frame;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::server::NamedService;

use crate::authorization::{Admission, Gate};
use crate::delta::Delta;
use crate::shared::Shared;
use crate::sotw::Sotw;
use crate::stream::{Protocol, STREAM_BUFFER};

/// A gRPC service whose streaming methods (Delta at `delta_path`, State-of-the-World at
/// `sotw_path`) are served by [`Delta`] and [`Sotw`] streams with framed responses; every other
/// method goes to `inner`.
#[derive(Clone)]
pub(crate) struct FramedService<S> {
    inner: S,
    shared: Arc<Shared>,
    delta_path: &'static str,
    sotw_path: &'static str,
    fixed_type: Option<&'static str>,
    gate: Gate,
}

impl<S> FramedService<S> {
    /// `inner` with its streaming methods at `delta_path` and `sotw_path` served here (for the
    /// type `fixed_type`, or any type on ADS), their streams let through `gate`.
    pub fn new(
        inner: S,
        shared: Arc<Shared>,
        (delta_path, sotw_path): (&'static str, &'static str),
        fixed_type: Option<&'static str>,
        gate: Gate,
    ) -> Self {
        Self { inner, shared, delta_path, sotw_path, fixed_type, gate }
    }
}

/// `google.protobuf.Any` whose value is a shared encoding.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct WireAny {
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
}

/// The gRPC message frame (flag, length, message) of `message`.
pub(crate) fn frame(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    message.encode(&mut buf).expect("the buffer has room for the message");
    buf.freeze()
}

impl<S: NamedService> NamedService for FramedService<S> {
    const NAME: &'static str = S::NAME;
}

/// Requests larger than this are refused (a request names resources; it is never large).
const MAX_REQUEST: usize = 16 * 1024 * 1024;

impl<S> tower::Service<http::Request<tonic::body::Body>> for FramedService<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let path = request.uri().path();
        let delta = path == self.delta_path;
        if !delta && path != self.sotw_path {
            return Box::pin(self.inner.call(request));
        }
        let admission = self.gate.admission(request.headers(), request.extensions());
        let (shared, fixed_type, body) = (self.shared.clone(), self.fixed_type, request.into_body());
        let rx = if delta {
            spawn_stream(shared, body, fixed_type, admission, Delta::default())
        } else {
            spawn_stream(shared, body, fixed_type, admission, Sotw::default())
        };
        Box::pin(async move { Ok(response(rx)) })
    }
}

/// Runs a `protocol` stream reading its requests from `body`; returns its framed responses.
fn spawn_stream<P: Protocol<Response = Bytes>>(
    shared: Arc<Shared>,
    body: tonic::body::Body,
    fixed_type: Option<&'static str>,
    admission: Option<Admission>,
    protocol: P,
) -> mpsc::Receiver<Result<Bytes, Status>> {
    let requests = tonic::codec::Streaming::<P::Request>::new_request(
        tonic_prost::ProstCodec::<(), P::Request>::raw_decoder(Default::default()),
        body,
        None,
        Some(MAX_REQUEST),
    );
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(crate::stream::run(shared, requests, tx, fixed_type, admission, protocol));
    rx
}

/// The streamed HTTP response: each frame as data, then the trailers with the final status
/// (OK when the stream simply ends).
fn response(rx: mpsc::Receiver<Result<Bytes, Status>>) -> http::Response<tonic::body::Body> {
    let frames = ReceiverStream::new(rx).map(Some).chain(futures::stream::once(async { None }));
    let mut ended = false;
    let frames = frames.filter_map(move |item| {
        let frame = match item {
            _ if ended => None,
            Some(Ok(data)) => Some(Frame::data(data)),
            Some(Err(status)) => {
                ended = true;
                Some(Frame::trailers(trailers(&status)))
            }
            None => Some(Frame::trailers(trailers(&Status::ok("")))),
        };
        futures::future::ready(frame.map(Ok::<_, Status>))
    });
    let body = tonic::body::Body::new(http_body_util::StreamBody::new(frames));
    let mut response = http::Response::new(body);
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    response
}

fn trailers(status: &Status) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    // A status whose message cannot be a header value is sent as a bare code.
    if status.add_header(&mut headers).is_err() {
        let bare = Status::new(status.code(), "");
        let _ = bare.add_header(&mut headers);
    }
    headers
}
