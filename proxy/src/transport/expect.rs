//! `Expect: 100-continue` carried end to end: the application, not a proxy,
//! decides whether a client's upload is wanted.
//!
//! hyper's HTTP/1 server answers `100 Continue` the moment a request body is
//! first read. So the proxy holds a client's body back ([`Gated`]) until the
//! upstream says `100 Continue` (seen through hyper's informational-response
//! callback); only then is the body read, which makes the proxy's own server
//! send `100 Continue` on to the client. An upstream that answers finally
//! first (a 401, a 413) gets no body at all, and neither does the proxy: the
//! client sees the final answer and sends nothing. An upstream that never
//! answers `100` (one that ignores Expect) gets the body after
//! [`EXPECT_TIMEOUT`], as curl itself does.
//!
//! Between sidecars such a request travels as HTTP/1.1 over mTLS, so that
//! the peer's `100` can come back the same way.

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::{header, HeaderMap, Request};
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// How long a body waits for the upstream's `100 Continue` before it is sent
/// anyway (curl waits 1 s too).
pub const EXPECT_TIMEOUT: Duration = Duration::from_secs(1);

const WAITING: u8 = 0;
const OPEN: u8 = 1;
/// The upstream answered finally without asking for the body.
const ABANDONED: u8 = 2;

/// Whether a request asks `Expect: 100-continue`.
pub fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

#[derive(Debug, Default)]
struct Shared {
    state: AtomicU8,
    waker: AtomicWaker,
}

/// The handle that opens (or abandons) a held body.
#[derive(Debug, Clone, Default)]
pub struct Gate(Arc<Shared>);

impl Gate {
    /// A gate that the upstream's `100 Continue` to `req` opens (seen
    /// through hyper's informational-response callback). Hold the request's
    /// body behind it with [`Gate::hold`]; drop or [`finish`](Gate::finish)
    /// it once the final answer is in.
    pub fn on_continue<B>(req: &mut Request<B>) -> Gate {
        let gate = Gate::default();
        let on_continue = gate.clone();
        hyper::ext::on_informational(req, move |res| {
            if res.status() == http::StatusCode::CONTINUE {
                on_continue.set(OPEN);
            }
        });
        gate
    }

    /// `body`, held until this gate opens (or [`EXPECT_TIMEOUT`] passes).
    pub fn hold<B>(&self, body: B) -> Gated<B> {
        Gated {
            inner: body,
            shared: self.0.clone(),
            timer: Box::pin(tokio::time::sleep(EXPECT_TIMEOUT)),
        }
    }

    /// Whether the body was let through.
    pub fn opened(&self) -> bool {
        self.0.state.load(Ordering::Acquire) == OPEN
    }

    /// The final answer came: a body still held is never sent.
    pub fn finish(self) {
        self.set(ABANDONED);
    }

    fn set(&self, to: u8) {
        if self
            .0
            .state
            .compare_exchange(WAITING, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.0.waker.wake();
        }
    }
}

/// A request body held back until its gate opens.
#[derive(Debug)]
pub struct Gated<B> {
    inner: B,
    shared: Arc<Shared>,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<B: Body<Data = Bytes> + Unpin> Gated<B> {
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        loop {
            match self.shared.state.load(Ordering::Acquire) {
                OPEN => return Pin::new(&mut self.inner).poll_frame(cx),
                ABANDONED => return Poll::Ready(None),
                _ => {}
            }
            self.shared.waker.register(cx.waker());
            if self.shared.state.load(Ordering::Acquire) != WAITING {
                continue;
            }
            if self.timer.as_mut().poll(cx).is_ready() {
                // No word from the upstream: send the body, as clients do.
                let _ = self.shared.state.compare_exchange(
                    WAITING,
                    OPEN,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                continue;
            }
            return Poll::Pending;
        }
    }

    pub fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    pub fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    fn held() -> (Gate, Gated<Full<Bytes>>) {
        let gate = Gate::default();
        let body = gate.hold(Full::new(Bytes::from_static(b"payload")));
        (gate, body)
    }

    async fn next(body: &mut Gated<Full<Bytes>>) -> Option<Bytes> {
        std::future::poll_fn(|cx| body.poll_frame(cx))
            .await
            .map(|f| f.unwrap().into_data().unwrap())
    }

    #[test]
    fn only_100_continue_counts() {
        let mut h = HeaderMap::new();
        assert!(!expects_continue(&h));
        h.insert(header::EXPECT, "100-Continue".parse().unwrap());
        assert!(expects_continue(&h));
        h.insert(header::EXPECT, "something-else".parse().unwrap());
        assert!(!expects_continue(&h));
    }

    #[tokio::test]
    async fn the_body_waits_for_the_upstreams_continue() {
        let (gate, mut body) = held();
        let held = tokio::time::timeout(Duration::from_millis(500), next(&mut body)).await;
        assert!(
            held.is_err(),
            "the body went before the upstream asked for it"
        );
        gate.set(OPEN);
        assert_eq!(next(&mut body).await.as_deref(), Some(&b"payload"[..]));
        assert!(gate.opened());
    }

    #[tokio::test]
    async fn a_final_answer_first_means_no_body_is_sent() {
        let (gate, mut body) = held();
        gate.clone().finish();
        assert_eq!(next(&mut body).await, None);
        assert!(!gate.opened());
    }

    #[tokio::test]
    async fn an_upstream_that_never_answers_100_gets_the_body_after_the_timeout() {
        let (_gate, mut body) = held();
        let started = tokio::time::Instant::now();
        assert_eq!(next(&mut body).await.as_deref(), Some(&b"payload"[..]));
        assert!(started.elapsed() >= EXPECT_TIMEOUT);
    }
}
