//! A request body that can be sent again.
//!
//! The first attempt streams the body as it arrives (nothing waits for the
//! whole body, so client-streaming gRPC is not held up) while a copy of up to
//! `cap` bytes is kept. A retry replays that copy and, if the client is still
//! sending, continues with the rest. Once more than `cap` bytes have gone by,
//! the body is no longer replayable and the request is not retried after it
//! was sent.

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use parking_lot::{Mutex, MutexGuard};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Bodies kept for replay by default (64 KiB).
pub const DEFAULT_CAP: usize = 64 * 1024;

#[derive(Debug)]
struct Shared<B> {
    /// Data frames seen so far (while `replayable`).
    chunks: Vec<Bytes>,
    size: usize,
    trailers: Option<HeaderMap>,
    /// The client's body, until it ends.
    source: Option<B>,
    complete: bool,
    replayable: bool,
    /// Whether any attempt polled the body at all.
    touched: bool,
}

/// The handle a request path keeps to make one body per attempt.
#[derive(Debug)]
pub struct Replay<B = Incoming> {
    shared: Arc<Mutex<Shared<B>>>,
    cap: usize,
    size_hint: SizeHint,
}

impl<B> Clone for Replay<B> {
    fn clone(&self) -> Self {
        Replay {
            shared: self.shared.clone(),
            cap: self.cap,
            size_hint: self.size_hint,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Replay<B> {
    pub fn new(body: B, cap: usize) -> Replay<B> {
        let size_hint = body.size_hint();
        let complete = body.is_end_stream();
        // A body known to be larger than the cap is never replayable.
        let replayable = size_hint.lower() as usize <= cap;
        Replay {
            shared: Arc::new(Mutex::new(Shared {
                chunks: Vec::new(),
                size: 0,
                trailers: None,
                source: if complete { None } else { Some(body) },
                complete,
                replayable,
                touched: false,
            })),
            cap,
            size_hint,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared<B>> {
        self.shared.lock()
    }

    /// Whether another attempt can carry the whole body again: nothing was
    /// read yet, or all that was read is still held.
    pub fn can_replay(&self) -> bool {
        let s = self.lock();
        !s.touched || s.replayable
    }

    /// A body for the next attempt.
    pub fn body(&self) -> ReplayBody<B> {
        ReplayBody {
            replay: self.clone(),
            next_chunk: 0,
            trailers_sent: false,
        }
    }
}

/// One attempt's view of the request body.
#[derive(Debug)]
pub struct ReplayBody<B = Incoming> {
    replay: Replay<B>,
    next_chunk: usize,
    trailers_sent: bool,
}

impl<B: Body<Data = Bytes> + Unpin> Body for ReplayBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let cap = this.replay.cap;
        let mut s = this.replay.lock();
        s.touched = true;
        // Replay what earlier attempts read.
        if this.next_chunk < s.chunks.len() {
            let c = s.chunks[this.next_chunk].clone();
            this.next_chunk += 1;
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        if s.complete {
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(t) = s.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        // Read on from the client.
        let Some(src) = s.source.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(src).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.complete = true;
                s.source = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.replayable = false;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    s.size += data.len();
                    if s.replayable && s.size <= cap {
                        s.chunks.push(data.clone());
                        this.next_chunk = s.chunks.len();
                    } else {
                        s.replayable = false;
                        s.chunks.clear();
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    this.trailers_sent = true;
                }
                if s.source.as_ref().is_some_and(|b| b.is_end_stream()) {
                    s.complete = true;
                    s.source = None;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self.replay.lock();
        s.complete
            && self.next_chunk >= s.chunks.len()
            && (self.trailers_sent || s.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        self.replay.size_hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::convert::Infallible;

    type Chunks = StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>,
    >;

    fn stream(chunks: &[&'static str]) -> Chunks {
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_small_body_is_replayed_whole() {
        let replay = Replay::new(stream(&["hel", "lo"]), 16);
        let first = replay.body().collect().await.unwrap().to_bytes();
        assert_eq!(&first[..], b"hello");
        assert!(replay.can_replay());
        let second = replay.body().collect().await.unwrap().to_bytes();
        assert_eq!(&second[..], b"hello");
    }

    #[tokio::test]
    async fn a_body_over_the_cap_is_not_replayable() {
        let replay = Replay::new(stream(&["0123456789", "0123456789"]), 16);
        let first = replay.body().collect().await.unwrap().to_bytes();
        assert_eq!(first.len(), 20);
        assert!(!replay.can_replay());
        let known = Replay::new(Full::new(Bytes::from(vec![0u8; 1 << 20])), 64 * 1024);
        assert!(
            known.can_replay(),
            "nothing sent yet: a connect failure may still retry"
        );
        let _ = known.body().collect().await.unwrap();
        assert!(
            !known.can_replay(),
            "a 1 MiB body is never replayed once sent"
        );
    }

    #[tokio::test]
    async fn a_retry_continues_a_body_the_first_attempt_did_not_finish() {
        let replay = Replay::new(stream(&["a", "b", "c"]), 16);
        let mut first = replay.body();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.data_ref().unwrap().as_ref(), b"a");
        drop(first); // the attempt failed after one chunk
        let second = replay.body().collect().await.unwrap().to_bytes();
        assert_eq!(&second[..], b"abc");
    }
}
