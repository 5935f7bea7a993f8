//! The `remora.v1.Discovery` server, sending snapshots without copying them.
//!
//! tonic's server encodes each message into a buffer of the stream's own, so
//! a snapshot encoded once would still be copied once per stream and held
//! there until the proxy has read it all: with 10,000 proxies connecting to
//! a mesh of 10,000 endpoints (a complete snapshot of about 1 MB each), that
//! was a gigabyte. This server writes each message as its 5-byte gRPC frame
//! header and then the shared bytes themselves (reference-counted: h2 and
//! hyper pass them on without a copy), so a complete snapshot costs its
//! size once, however many streams are sending it. Requests are decoded by
//! tonic's `Streaming` as before. What answers a stream is a [`Handler`]
//! (`crate::discovery::push` makes every implementation of the generated
//! `Discovery` trait one).

use bytes::{BufMut, Bytes, BytesMut};
use hyper::body::{Body as HttpBody, Frame};
use remora_proto::v1::DiscoveryRequest;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio_stream::Stream;
use tonic::body::Body;
use tonic::codec::Streaming;
use tonic::codegen::Service;
use tonic::server::NamedService;
use tonic::Status;

/// The one method.
const STREAM_PATH: &str = "/remora.v1.Discovery/Stream";
/// The largest request message decoded (tonic's default).
const MAX_REQUEST_BYTES: usize = 4 << 20;
/// The request buffer each stream starts with (and grows by): a proxy sends
/// a Register and then small ACKs. tonic's default is 8 KiB, which is 80 MB
/// at 10,000 streams.
const REQUEST_BUFFER_BYTES: usize = 512;

/// The answer to a stream's opening, to come.
pub type Opening<M> = Pin<Box<dyn Future<Output = Result<tonic::Response<M>, Status>> + Send>>;

/// What answers a Discovery stream: its messages, each already encoded.
pub trait Handler: Send + Sync + 'static {
    type Message: Into<Bytes>;
    type Messages: Stream<Item = Result<Self::Message, Status>> + Send + 'static;

    fn open(
        self: Arc<Self>,
        request: tonic::Request<Streaming<DiscoveryRequest>>,
    ) -> Opening<Self::Messages>;
}

/// Serves a [`Handler`] (in place of the generated server).
#[derive(Debug)]
pub struct DiscoveryServer<T> {
    inner: Arc<T>,
}

impl<T> DiscoveryServer<T> {
    pub fn new(inner: T) -> Self {
        DiscoveryServer {
            inner: Arc::new(inner),
        }
    }
}

impl<T> Clone for DiscoveryServer<T> {
    fn clone(&self) -> Self {
        DiscoveryServer {
            inner: self.inner.clone(),
        }
    }
}

impl<T> NamedService for DiscoveryServer<T> {
    const NAME: &'static str = "remora.v1.Discovery";
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<T, B> Service<http::Request<B>> for DiscoveryServer<T>
where
    T: Handler,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            if req.uri().path() != STREAM_PATH {
                return Ok(Status::unimplemented(format!(
                    "no method {} in remora.v1.Discovery",
                    req.uri().path()
                ))
                .into_http());
            }
            let compressed = req
                .headers()
                .get("grpc-encoding")
                .is_some_and(|e| e.as_bytes() != b"identity");
            if compressed {
                return Ok(Status::unimplemented(
                    "compressed discovery requests are not supported",
                )
                .into_http());
            }
            let (parts, body) = req.into_parts();
            let messages = Streaming::new_request(
                SmallDecoder(tonic_prost::ProstDecoder::<DiscoveryRequest>::default()),
                body,
                None,
                Some(MAX_REQUEST_BYTES),
            );
            let request = tonic::Request::from_http(http::Request::from_parts(parts, messages));
            Ok(match inner.open(request).await {
                Ok(response) => {
                    let (metadata, stream, extensions) = response.into_parts();
                    let mut res = http::Response::new(Body::new(Frames::new(stream)));
                    *res.headers_mut() = metadata.into_headers();
                    res.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/grpc"),
                    );
                    *res.extensions_mut() = extensions;
                    res
                }
                Err(status) => status.into_http(),
            })
        })
    }
}

/// Decodes requests with prost, from a small buffer.
struct SmallDecoder(tonic_prost::ProstDecoder<DiscoveryRequest>);

impl tonic::codec::Decoder for SmallDecoder {
    type Item = DiscoveryRequest;
    type Error = Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<DiscoveryRequest>, Status> {
        self.0.decode(src)
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        tonic::codec::BufferSettings::new(REQUEST_BUFFER_BYTES, 32 << 10)
    }
}

/// A response body of gRPC frames: each message's header, then its shared
/// bytes, and the status in the trailers.
struct Frames<S> {
    messages: Pin<Box<S>>,
    /// The bytes of the message whose header was just sent.
    body: Option<Bytes>,
    done: bool,
}

impl<S> Frames<S> {
    fn new(messages: S) -> Frames<S> {
        Frames {
            messages: Box::pin(messages),
            body: None,
            done: false,
        }
    }
}

/// A message's gRPC header (not compressed, then the length) and the
/// message.
fn frame_header(message: Bytes) -> Result<(Bytes, Bytes), Status> {
    let len = u32::try_from(message.len())
        .map_err(|_| Status::resource_exhausted("a message larger than 4 GiB"))?;
    let mut head = BytesMut::with_capacity(5);
    head.put_u8(0);
    head.put_u32(len);
    Ok((head.freeze(), message))
}

fn trailers(status: &Status) -> Frame<Bytes> {
    let mut map = http::HeaderMap::new();
    if let Err(e) = status.add_header(&mut map) {
        tracing::warn!(error = %e, "cannot write a discovery stream's status");
        map.insert("grpc-status", http::HeaderValue::from_static("13"));
    }
    Frame::trailers(map)
}

impl<S, M> HttpBody for Frames<S>
where
    S: Stream<Item = Result<M, Status>>,
    M: Into<Bytes>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(body) = self.body.take() {
            return Poll::Ready(Some(Ok(Frame::data(body))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        let next = match self.messages.as_mut().poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(next) => next,
        };
        let frame = match next {
            Some(Ok(message)) => match frame_header(message.into()) {
                Ok((head, bytes)) => {
                    self.body = Some(bytes);
                    Frame::data(head)
                }
                Err(status) => {
                    self.done = true;
                    trailers(&status)
                }
            },
            Some(Err(status)) => {
                self.done = true;
                trailers(&status)
            }
            None => {
                self.done = true;
                trailers(&Status::ok(""))
            }
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.body.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn messages_go_out_as_their_header_and_the_shared_bytes_then_the_status() {
        let shared = Bytes::from_static(b"snapshot bytes");
        let messages =
            tokio_stream::iter(vec![Ok(shared.clone()), Err(Status::aborted("replaced"))]);
        let mut body = Frames::new(messages);
        let head = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(head.as_ref(), &[0, 0, 0, 0, 14]);
        let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
        // The very bytes, not a copy.
        assert_eq!(data.as_ptr(), shared.as_ptr());
        let trailers = body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        assert_eq!(trailers["grpc-status"], "10");
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());

        let mut ok = Frames::new(tokio_stream::iter(Vec::<Result<Bytes, Status>>::new()));
        let trailers = ok.frame().await.unwrap().unwrap().into_trailers().unwrap();
        assert_eq!(trailers["grpc-status"], "0");
    }
}
