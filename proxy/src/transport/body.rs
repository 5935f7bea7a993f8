//! The one body type the proxy passes around: a body streamed from a peer, or a
//! small one the proxy made itself. An enum rather than a boxed trait object, so
//! forwarding a request costs no allocation for its body.

use crate::transport::expect::{Gate, Gated};
use crate::transport::io::InFlight;
use crate::transport::replay::ReplayBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

#[derive(Debug)]
pub enum ProxyBody {
    /// Streamed from the downstream client or the upstream server.
    Incoming(Incoming),
    /// A complete body held in memory (the proxy's own answers).
    Full(Option<Bytes>),
    /// A client's request body, streamed once.
    Upload(Upload),
    /// A request body that a retry can send again.
    Replay(ReplayBody<Upload>),
    /// A request body held until the upstream answers `100 Continue`.
    Gated(Box<Gated<ProxyBody>>),
    /// A response streamed from upstream with what must last until its end:
    /// the bulkhead slot it holds and the work done when it ends.
    Tracked(Incoming, Box<Tail>),
}

impl Default for ProxyBody {
    fn default() -> Self {
        ProxyBody::empty()
    }
}

/// How a streamed body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Read to its end.
    Complete,
    /// Its sender broke it off (for a response: the upstream).
    Broken,
    /// Dropped before its end: its reader went away (for a response: the
    /// client, or a cancelled gRPC call).
    Abandoned,
}

/// End-of-body work that a layer above registers on a response body (the
/// request's record, say): told of each frame, then once of how the body
/// ended. One allocation per body that has one, no lock.
pub trait OnEnd: Send + Sync {
    /// A frame went by on its way to the client.
    fn on_frame(&mut self, _frame: &Frame<Bytes>) {}
    /// The body ended, or was dropped before its end.
    fn ended(self: Box<Self>, end: End);
}

/// Where a lent HTTP/1 connection goes back to: its pool.
pub trait Home: Send + Sync {
    fn check_in(&self, sender: http1::SendRequest<ProxyBody>);
}

/// An upstream HTTP/1 connection lent to one response: back to its
/// [`Home`] when the response body has been read to its end, with no task
/// spawned per request.
pub struct Checkin {
    home: Weak<dyn Home>,
    sender: http1::SendRequest<ProxyBody>,
}

impl Checkin {
    pub fn new(home: Weak<dyn Home>, sender: http1::SendRequest<ProxyBody>) -> Checkin {
        Checkin { home, sender }
    }

    pub fn give_back(self) {
        if let Some(home) = self.home.upgrade() {
            if !self.sender.is_closed() {
                home.check_in(self.sender);
            }
        }
    }
}

/// What a response body carries until it ends (or is dropped).
#[derive(Default)]
pub struct Tail {
    pub permit: Option<remora_resilience::RequestPermit>,
    /// The upstream HTTP/1 connection, back to its pool at a clean end.
    pub checkin: Option<Checkin>,
    /// Keeps the downstream connection from idling until the body ends.
    pub in_flight: Option<InFlight>,
    /// A request body held for `100 Continue`: never sent once this
    /// response (which answered without it) has ended.
    pub gate: Option<Gate>,
    /// The work of the layer above (the request's record).
    on_end: Option<Box<dyn OnEnd>>,
    /// Whether the body was read to its end (or had nothing to read).
    ended: bool,
}

impl std::fmt::Debug for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tail").finish_non_exhaustive()
    }
}

impl Tail {
    /// Registers the end-of-body work of the layer above (one per body).
    pub fn on_end(&mut self, hook: Box<dyn OnEnd>) {
        debug_assert!(self.on_end.is_none(), "one end-of-body hook per body");
        self.on_end = Some(hook);
    }

    fn on_frame(&mut self, frame: &Frame<Bytes>) {
        if let Some(hook) = self.on_end.as_mut() {
            hook.on_frame(frame);
        }
    }

    /// Whether the body had ended (or was empty) when this was made.
    pub fn ended(&self) -> bool {
        self.ended
    }

    fn end(&mut self, how: End) {
        self.ended = true;
        if let Some(c) = self.checkin.take() {
            // A connection whose response broke off is not reused.
            if how == End::Complete {
                c.give_back();
            }
        }
        if let Some(hook) = self.on_end.take() {
            hook.ended(how);
        }
        if let Some(g) = self.gate.take() {
            g.finish();
        }
        self.permit = None;
        self.in_flight = None;
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        // Dropped before its end: the client stopped reading (it went away,
        // or reset the stream, as a cancelled gRPC call does). A body that
        // ended (or was empty) still has its work done.
        let how = if self.ended {
            End::Complete
        } else {
            End::Abandoned
        };
        self.end(how);
    }
}

/// A client's request body on its way upstream: the bytes that came are
/// counted, and a failure is classified as the client's (cut off, or
/// malformed framing) so that it is never blamed on the upstream.
#[derive(Debug)]
pub struct Upload {
    inner: Incoming,
    tally: Option<Arc<Tally>>,
}

/// How a client's request body failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadFailure {
    /// The client stopped sending (closed, reset the stream).
    Aborted,
    /// Malformed framing: a bad chunk size, a body longer than declared.
    Malformed,
}

/// What a request body carried, shared with the request's record.
#[derive(Debug, Default)]
pub struct Tally {
    bytes: AtomicU64,
    failure: AtomicU8,
}

const ABORTED: u8 = 1;
const MALFORMED: u8 = 2;

impl Tally {
    /// Bytes of body that arrived from the client.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// How the client's body failed, if it did.
    pub fn failure(&self) -> Option<UploadFailure> {
        match self.failure.load(Ordering::Relaxed) {
            ABORTED => Some(UploadFailure::Aborted),
            MALFORMED => Some(UploadFailure::Malformed),
            _ => None,
        }
    }
}

impl Upload {
    /// `tally`: where to count (none for a body known to be empty).
    pub fn new(inner: Incoming, tally: Option<Arc<Tally>>) -> Upload {
        Upload { inner, tally }
    }
}

/// Malformed framing (a bad chunk size, a body longer than declared) or
/// a client that stopped sending (closed, reset the stream).
fn body_failure(e: &hyper::Error) -> u8 {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
            ) {
                return MALFORMED;
            }
        }
        source = s.source();
    }
    if e.is_parse() {
        MALFORMED
    } else {
        ABORTED
    }
}

impl Body for Upload {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(tally) = &this.tally {
            match &r {
                Poll::Ready(Some(Ok(f))) => {
                    if let Some(d) = f.data_ref() {
                        tally.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tally.failure.store(body_failure(e), Ordering::Relaxed);
                }
                _ => {}
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
            let mut tail = Box::<Tail>::default();
            tail.ended = b.is_end_stream();
            *self = ProxyBody::Tracked(b, tail);
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
            ProxyBody::Upload(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Replay(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Gated(b) => b.poll_frame(cx),
            ProxyBody::Tracked(b, tail) => {
                let r = Pin::new(&mut *b).poll_frame(cx);
                match &r {
                    Poll::Ready(Some(Ok(frame))) => {
                        tail.on_frame(frame);
                        // The last frame: finish before the peer can see it
                        // and send its next request.
                        if frame.is_trailers() || b.is_end_stream() {
                            tail.end(End::Complete);
                        }
                    }
                    Poll::Ready(None) => tail.end(End::Complete),
                    // The upstream broke the response off.
                    Poll::Ready(Some(Err(_))) => tail.end(End::Broken),
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
            ProxyBody::Upload(b) => b.is_end_stream(),
            ProxyBody::Gated(b) => b.is_end_stream(),
            ProxyBody::Replay(b) => b.is_end_stream(),
            ProxyBody::Tracked(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Incoming(b) => b.size_hint(),
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Upload(b) => b.size_hint(),
            ProxyBody::Gated(b) => b.size_hint(),
            ProxyBody::Replay(b) => b.size_hint(),
            ProxyBody::Tracked(b, _) => b.size_hint(),
        }
    }
}
