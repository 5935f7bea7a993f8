//! Properties of protocol detection (`remora_proxy::detect::detect`): over
//! any first bytes, cut into reads at any points, with the client then
//! closing, going silent or failing, it never panics, hands back exactly the
//! bytes it consumed (so the replayed stream is the client's stream), and
//! tells HTTP/1, HTTP/2 and TLS apart the same way however the bytes are split.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::Config;
use remora_proxy::detect::{detect, Detected};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, ReadBuf};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
];
/// The most detection may take before it must decide (the preface's length).
const PEEK: usize = 24;
/// The detection timeout (the proxy's default). Time is paused in these
/// tests: it passes only while nothing else can run, so a silent client
/// costs nothing and a slow machine never turns a stall into a timeout.
const TIMEOUT: Duration = Duration::from_secs(1);

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// What the client does after its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Eof,
    /// Never sends again, never closes.
    Silent,
    /// The read fails.
    Error,
}

/// A client whose bytes arrive in the given pieces, each read perhaps
/// preceded by a `Pending` (a wake-up with nothing yet).
struct Client {
    data: Vec<u8>,
    /// The length of each read, in order; the rest comes in one last read.
    pieces: Vec<usize>,
    stalls: Vec<bool>,
    end: End,
    /// Bytes handed to the reader so far.
    consumed: usize,
    reads: usize,
    stalled: bool,
}

impl AsyncRead for Client {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.consumed == this.data.len() {
            return match this.end {
                End::Eof => Poll::Ready(Ok(())),
                End::Silent => Poll::Pending,
                End::Error => Poll::Ready(Err(io::Error::other("reset by the client"))),
            };
        }
        if !this.stalled && this.stalls.get(this.reads).copied().unwrap_or(false) {
            this.stalled = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.stalled = false;
        let left = this.data.len() - this.consumed;
        let piece = this.pieces.get(this.reads).copied().unwrap_or(left).max(1);
        let n = piece.min(left).min(buf.remaining());
        buf.put_slice(&this.data[this.consumed..this.consumed + n]);
        this.consumed += n;
        this.reads += 1;
        Poll::Ready(Ok(()))
    }
}

/// What the whole of `data` is, read to its end: the model detection must
/// agree with whatever the split.
fn model(data: &[u8]) -> Detected {
    match data {
        [0x16, 0x03, ..] => Detected::Tls,
        [0x16, ..] => Detected::Opaque,
        _ if data.starts_with(H2_PREFACE) => Detected::Http2,
        _ if METHODS.iter().any(|m| {
            data.len() > m.len() && data.starts_with(m.as_bytes()) && data[m.len()] == b' '
        }) =>
        {
            Detected::Http1
        }
        _ => Detected::Opaque,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime")
}

fn run(
    data: Vec<u8>,
    pieces: Vec<usize>,
    stalls: Vec<bool>,
    end: End,
) -> Result<(), TestCaseError> {
    let mut client = Client {
        data: data.clone(),
        pieces,
        stalls,
        end,
        consumed: 0,
        reads: 0,
        stalled: false,
    };
    let (r, waited) = runtime().block_on(async {
        let started = tokio::time::Instant::now();
        let r = detect(&mut client, TIMEOUT).await;
        (r, started.elapsed())
    });
    // Time passes only when the client is silent and detection undecided.
    prop_assert!(waited <= TIMEOUT, "waited {:?}", waited);
    if end != End::Silent {
        prop_assert_eq!(waited, Duration::ZERO);
    }
    let (got, bytes) = match r {
        Ok(v) => v,
        Err(e) => {
            // Only a failing client makes detection fail, and only once all
            // its bytes are read.
            prop_assert_eq!(end, End::Error, "{}", e);
            prop_assert_eq!(client.consumed, data.len());
            return Ok(());
        }
    };
    // Nothing consumed is lost, nothing is invented: the bytes handed back
    // followed by the rest of the stream are the client's stream.
    prop_assert_eq!(bytes.len(), client.consumed, "consumed vs returned");
    prop_assert_eq!(&bytes[..], &data[..client.consumed]);
    prop_assert!(bytes.len() <= PEEK, "read {} bytes", bytes.len());
    // The same answer as the whole input gives (detection decides within
    // its first PEEK bytes), whatever the split.
    let want = model(&data[..data.len().min(PEEK)]);
    prop_assert_eq!(got, want, "for {:?}", String::from_utf8_lossy(&data));
    Ok(())
}

fn end() -> impl Strategy<Value = End> {
    prop_oneof![6 => Just(End::Eof), 2 => Just(End::Silent), 1 => Just(End::Error)]
}

fn pieces() -> impl Strategy<Value = Vec<usize>> {
    vec(prop_oneof![3 => 1usize..4, 1 => 1usize..64], 0..32)
}

fn stalls() -> impl Strategy<Value = Vec<bool>> {
    vec(prop::bool::weighted(0.2), 0..32)
}

/// An HTTP/1 request head as a client writes it.
fn http1_request() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(METHODS),
        prop_oneof![
            "/[ -~&&[^ ]]{0,40}",
            Just("*".to_owned()),
            "http://[a-z.]{1,20}(:[0-9]{1,5})?/[a-z]{0,10}",
            "[a-z.]{1,20}:[0-9]{1,5}",
        ],
        prop_oneof![Just("HTTP/1.1"), Just("HTTP/1.0")],
        vec(("[A-Za-z-]{1,12}", "[ -~]{0,30}"), 0..4),
        vec(any::<u8>(), 0..64),
    )
        .prop_map(|(method, target, version, headers, body)| {
            let mut r = format!("{method} {target} {version}\r\n").into_bytes();
            for (n, v) in headers {
                r.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
            }
            r.extend_from_slice(b"\r\n");
            r.extend_from_slice(&body);
            r
        })
}

/// The HTTP/2 preface and then frames (or anything).
fn http2_preface() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..128).prop_map(|rest| [H2_PREFACE, &rest].concat())
}

/// A TLS record header of a ClientHello and some of its body.
fn tls_client_hello() -> impl Strategy<Value = Vec<u8>> {
    (0u8..=4, any::<u16>(), vec(any::<u8>(), 0..200)).prop_map(|(minor, len, body)| {
        let mut r = vec![0x16, 0x03, minor];
        r.extend_from_slice(&len.to_be_bytes());
        r.push(0x01); // handshake type: ClientHello
        r.extend_from_slice(&body);
        r
    })
}

/// Bytes that look like the start of something: a near-miss of a method or
/// the preface, a lowercase method, a record of another type.
fn near_misses() -> impl Strategy<Value = Vec<u8>> {
    let base = prop_oneof![
        prop::sample::select(METHODS).prop_map(|m| format!("{m} ").into_bytes()),
        Just(H2_PREFACE.to_vec()),
        Just(vec![0x16, 0x03, 0x01]),
    ];
    (
        base,
        any::<prop::sample::Index>(),
        any::<u8>(),
        vec(any::<u8>(), 0..32),
    )
        .prop_map(|(mut b, at, byte, tail)| {
            let i = at.index(b.len());
            b[i] = byte;
            b.truncate(i + 1 + (byte as usize % (b.len() - i)));
            b.extend_from_slice(&tail);
            b
        })
}

proptest! {
    #![proptest_config(config(1_000))]

    /// Any bytes at all.
    #[test]
    fn arbitrary_first_bytes(data in vec(any::<u8>(), 0..96), pieces in pieces(),
                             stalls in stalls(), end in end()) {
        run(data, pieces, stalls, end)?;
    }

    /// Bytes close to what detection looks for, one byte changed or cut short.
    #[test]
    fn near_misses_are_not_mistaken(data in near_misses(), pieces in pieces(),
                                    stalls in stalls(), end in end()) {
        run(data, pieces, stalls, end)?;
    }

    /// A real HTTP/1 request is HTTP/1, however it is split.
    #[test]
    fn http1_requests_are_http1(data in http1_request(), pieces in pieces(),
                                stalls in stalls(), end in end()) {
        prop_assert_eq!(model(&data), Detected::Http1);
        run(data, pieces, stalls, end)?;
    }

    /// The HTTP/2 preface is HTTP/2, however it is split.
    #[test]
    fn the_http2_preface_is_http2(data in http2_preface(), pieces in pieces(),
                                  stalls in stalls(), end in end()) {
        prop_assert_eq!(model(&data), Detected::Http2);
        run(data, pieces, stalls, end)?;
    }

    /// A TLS ClientHello is TLS, however it is split.
    #[test]
    fn a_client_hello_is_tls(data in tls_client_hello(), pieces in pieces(),
                             stalls in stalls(), end in end()) {
        prop_assert_eq!(model(&data), Detected::Tls);
        run(data, pieces, stalls, end)?;
    }
}

/// Over a real in-memory pipe: a request written in pieces with pauses is
/// detected and nothing of it is lost (the rest is still in the pipe).
#[test]
fn over_a_duplex_pipe_nothing_is_lost() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        for cut in 1..40 {
            let req = b"OPTIONS * HTTP/1.1\r\nHost: backend.shop\r\n\r\n".to_vec();
            let (mut client, mut server) = tokio::io::duplex(8);
            let sent = req.clone();
            let writer = tokio::spawn(async move {
                for piece in sent.chunks(cut) {
                    client.write_all(piece).await.expect("the pipe takes bytes");
                    tokio::task::yield_now().await;
                }
            });
            let (d, first) = detect(&mut server, Duration::from_secs(2))
                .await
                .expect("detection");
            assert_eq!(d, Detected::Http1, "cut {cut}");
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.expect("the rest");
            writer.await.expect("the writer");
            assert_eq!([&first[..], &rest[..]].concat(), req, "cut {cut}");
        }
    });
}
