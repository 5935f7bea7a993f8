//! The one body type the proxy passes around: a body streamed from a peer, or a
//! small one the proxy made itself. An enum rather than a boxed trait object, so
//! forwarding a request costs no allocation for its body.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll};

#[derive(Debug)]
pub enum ProxyBody {
    /// Streamed from the downstream client or the upstream server.
    Incoming(Incoming),
    /// A complete body held in memory (the proxy's own answers).
    Full(Option<Bytes>),
    /// A request body that a retry can send again.
    Replay(crate::replay::ReplayBody),
    /// A response streamed from upstream with what must last until its end:
    /// the bulkhead slot it holds and the telemetry recorded when it ends.
    Tracked(Incoming, Box<Tail>),
}

/// What a response body carries until it ends (or is dropped).
#[derive(Default)]
pub struct Tail {
    pub permit: Option<remora_resilience::RequestPermit>,
    pub done: Option<crate::observe::Pending>,
    /// The upstream HTTP/1 connection, back to its pool at the end.
    pub checkin: Option<crate::pool::Checkin>,
}

impl std::fmt::Debug for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tail").finish_non_exhaustive()
    }
}

impl Tail {
    fn on_frame(&mut self, frame: &Frame<Bytes>) {
        if let Some(done) = self.done.as_mut() {
            done.on_frame(frame);
        }
    }

    fn end(&mut self) {
        if let Some(c) = self.checkin.take() {
            c.give_back();
        }
        if let Some(done) = self.done.take() {
            done.complete();
        }
        self.permit = None;
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.end();
    }
}

impl ProxyBody {
    pub fn empty() -> Self {
        ProxyBody::Full(None)
    }

    pub fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        if b.is_empty() {
            ProxyBody::Full(None)
        } else {
            ProxyBody::Full(Some(b))
        }
    }
}

impl ProxyBody {
    /// The tail of a streamed body, made on first use; None for a body the
    /// proxy made itself (it has nothing left to wait for).
    pub fn tail(&mut self) -> Option<&mut Tail> {
        if let ProxyBody::Incoming(_) = self {
            let ProxyBody::Incoming(b) = std::mem::replace(self, ProxyBody::Full(None)) else {
                return None;
            };
            *self = ProxyBody::Tracked(b, Box::default());
        }
        match self {
            ProxyBody::Tracked(_, tail) => Some(tail),
            _ => None,
        }
    }

    /// Ties `permit` to this body: released when the body ends or is dropped.
    pub fn hold(mut self, permit: remora_resilience::RequestPermit) -> ProxyBody {
        if let Some(t) = self.tail() {
            t.permit = Some(permit);
        }
        self
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Incoming(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            ProxyBody::Replay(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Tracked(b, tail) => {
                let r = Pin::new(&mut *b).poll_frame(cx);
                match &r {
                    Poll::Ready(Some(Ok(frame))) => {
                        tail.on_frame(frame);
                        // The last frame: finish before the peer can see it
                        // and send its next request.
                        if frame.is_trailers() || b.is_end_stream() {
                            tail.end();
                        }
                    }
                    Poll::Ready(None) | Poll::Ready(Some(Err(_))) => tail.end(),
                    Poll::Pending => {}
                }
                r
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Incoming(b) => b.is_end_stream(),
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Replay(b) => b.is_end_stream(),
            ProxyBody::Tracked(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Incoming(b) => b.size_hint(),
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Replay(b) => b.size_hint(),
            ProxyBody::Tracked(b, _) => b.size_hint(),
        }
    }
}
