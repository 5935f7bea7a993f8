//! The upstream every path ends at: HTTP/1.1 and h2c on one port, a fixed
//! 1 KiB body for any request, and a gRPC-unary `Echo/Unary` answer (a 1 KiB
//! reply message and `grpc-status: 0` trailers) for `application/grpc`.
//! Runs as its own process (`remora-bench upstream`) so that its CPU is not
//! counted as the load generator's.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use prost::Message;
use remora_proto::examples::EchoReply;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

pub const BODY_BYTES: usize = 1024;

/// A body of at most one data frame and then, for gRPC, trailers.
pub struct Reply {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.data, &self.trailers) {
            (d, None) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
            _ => SizeHint::default(),
        }
    }
}

/// A length-prefixed gRPC message.
pub fn grpc_frame(msg: &impl Message) -> Bytes {
    let mut buf = Vec::with_capacity(5 + msg.encoded_len());
    buf.push(0);
    buf.extend_from_slice(&(msg.encoded_len() as u32).to_be_bytes());
    msg.encode(&mut buf).expect("a Vec grows");
    Bytes::from(buf)
}

pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let body = Bytes::from(vec![b'x'; BODY_BYTES]);
    let reply = EchoReply {
        message: "x".repeat(BODY_BYTES - 24),
        served_by: "bench/upstream".into(),
        sequence: 0,
    };
    let grpc = grpc_frame(&reply);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (body, grpc) = (body.clone(), grpc.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                handle(req, body.clone(), grpc.clone())
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    body: Bytes,
    grpc: Bytes,
) -> Result<Response<Reply>, Infallible> {
    let is_grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // Read the request to its end before answering, as a real service would.
    let _ = req.into_body().collect().await;
    if is_grpc {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let mut resp = Response::new(Reply {
            data: Some(grpc),
            trailers: Some(trailers),
        });
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        return Ok(resp);
    }
    let mut resp = Response::new(Reply {
        data: Some(body),
        trailers: None,
    });
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(resp)
}
