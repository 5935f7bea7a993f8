//! The load generator, the same for every path.
//!
//! - [`open_loop`]: request i is due at t0 + i/rate whatever happened before
//!   (a pacing thread hands due times to N keep-alive connections), and its
//!   latency runs from that due time, so a stall is charged to every request it
//!   delayed (no coordinated omission).
//! - [`closed_loop`]: N connections each send their next request as soon as the
//!   last one is answered; only for the highest sustained rate.
//! - [`fresh_connections`]: one request per new connection, optionally through a
//!   `CONNECT` tunnel of an explicit proxy.

use crate::resources::CpuMeter;
use crate::upstream::{grpc_frame, BODY_BYTES};
use anyhow::{bail, ensure, Context as _};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{header, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_proto::examples::EchoRequest;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests still queued this long after the schedule ends are dropped (errors).
const OVERRUN: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Grpc,
}

/// Where requests go and how they look.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub proto: Proto,
    /// Origin-form for a server, absolute-form for an explicit proxy; always
    /// absolute for gRPC (it becomes `:authority`).
    pub uri: Uri,
    pub host: HeaderValue,
    /// An `Authorization` header for every request (the JWT-checked path).
    pub authorization: Option<HeaderValue>,
}

enum Conn {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

async fn dial(t: &Target) -> anyhow::Result<Conn> {
    let tcp = TcpStream::connect(t.addr)
        .await
        .with_context(|| format!("connecting to {}", t.addr))?;
    tcp.set_nodelay(true)?;
    let io = TokioIo::new(tcp);
    Ok(match t.proto {
        Proto::Http1 => {
            let (s, c) = http1::handshake(io).await?;
            tokio::spawn(async move { drop(c.await) });
            Conn::H1(s)
        }
        Proto::Grpc => {
            let (s, c) = http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await?;
            tokio::spawn(async move { drop(c.await) });
            Conn::H2(s)
        }
    })
}

impl Conn {
    fn share(&self) -> Option<Conn> {
        match self {
            Conn::H2(s) => Some(Conn::H2(s.clone())),
            Conn::H1(_) => None,
        }
    }
}

fn grpc_request() -> Bytes {
    grpc_frame(&EchoRequest {
        message: "ping".into(),
        count: 0,
    })
}

/// One request, read to its end and checked.
async fn once(conn: &mut Conn, t: &Target, grpc_body: &Bytes) -> anyhow::Result<()> {
    let mut req = match t.proto {
        Proto::Http1 => Request::get(t.uri.clone())
            .header(header::HOST, t.host.clone())
            .body(Full::default())?,
        Proto::Grpc => Request::post(t.uri.clone())
            .header(header::CONTENT_TYPE, "application/grpc")
            .header(header::TE, "trailers")
            .body(Full::new(grpc_body.clone()))?,
    };
    if let Some(auth) = &t.authorization {
        req.headers_mut()
            .insert(header::AUTHORIZATION, auth.clone());
    }
    let resp = match conn {
        Conn::H1(s) => {
            s.ready().await?;
            s.send_request(req).await?
        }
        Conn::H2(s) => {
            s.ready().await?;
            s.send_request(req).await?
        }
    };
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?;
    let grpc_status = body
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| parts.headers.get("grpc-status"))
        .cloned();
    let len = body.to_bytes().len();
    let err = parts.headers.get("x-remora-error");
    ensure!(parts.status == 200, "status {} ({err:?})", parts.status);
    if t.proto == Proto::Grpc {
        ensure!(
            grpc_status.as_ref().is_some_and(|s| s == "0"),
            "grpc-status {grpc_status:?} ({err:?})"
        );
    }
    ensure!(len >= BODY_BYTES, "short body: {len} bytes");
    Ok(())
}

/// What an open-loop run measured; latencies in microseconds.
#[derive(Debug, Clone, Default)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub ok: u64,
    pub errors: u64,
    pub rps: f64,
    pub gen_cpu: f64,
    /// CPU time the hypervisor took from this machine during the run, % of it.
    pub steal: f64,
    pub first_error: Option<String>,
}

struct WorkerOut {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    last: Instant,
}

/// `rate` requests a second for `dur` over `conns` connections (gRPC: that many
/// concurrent streams on one HTTP/2 connection).
pub async fn open_loop(
    t: &Target,
    rate: u64,
    dur: Duration,
    conns: usize,
) -> anyhow::Result<Latency> {
    let total = (rate as f64 * dur.as_secs_f64()) as u64;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let first = dial(t).await?;
    let mut workers = tokio::task::JoinSet::new();
    let t0 = Instant::now() + Duration::from_millis(50);
    let mut first = Some(first);
    for _ in 0..conns {
        let conn = match first.as_ref().and_then(Conn::share) {
            Some(c) => c,
            None => match first.take() {
                Some(c) => c,
                None => dial(t).await?,
            },
        };
        workers.spawn(worker(conn, t.clone(), rx.clone(), t0, t0 + dur + OVERRUN));
    }
    drop(first);
    let meter = CpuMeter::start_self();
    let steal = crate::resources::StealMeter::start();
    // The pacer is a thread of its own: the runtime's timer wheel ticks in
    // milliseconds, nanosleep does far better.
    let pacer = std::thread::spawn(move || {
        for i in 0..total {
            let at = t0 + Duration::from_nanos(i * 1_000_000_000 / rate);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if tx.send(at).is_err() {
                break;
            }
        }
    });
    let mut out = Latency::default();
    let mut hist = Histogram::<u64>::new_with_max(120_000_000_000, 3)?;
    let mut last = t0;
    while let Some(w) = workers.join_next().await {
        let w = w?;
        hist.add(&w.hist)?;
        out.ok += w.ok;
        out.errors += w.errors;
        out.first_error = out.first_error.or(w.first_error);
        last = last.max(w.last);
    }
    out.gen_cpu = meter.percent();
    out.steal = steal.percent(crate::targets::cores());
    let _ = pacer.join();
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    (out.p50, out.p90, out.p99, out.p999) = (us(0.5), us(0.9), us(0.99), us(0.999));
    out.max = hist.max() as f64 / 1000.0;
    out.rps = out.ok as f64 / last.duration_since(t0).as_secs_f64().max(1e-9);
    Ok(out)
}

async fn worker(
    mut conn: Conn,
    t: Target,
    rx: Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Instant>>>,
    t0: Instant,
    give_up: Instant,
) -> WorkerOut {
    let grpc_body = grpc_request();
    let mut w = WorkerOut {
        hist: Histogram::new_with_max(120_000_000_000, 3).expect("valid bounds"),
        ok: 0,
        errors: 0,
        first_error: None,
        last: t0,
    };
    loop {
        let due = rx.lock().await.recv().await;
        let Some(due) = due else { break };
        if Instant::now() > give_up {
            w.errors += 1;
            w.first_error
                .get_or_insert_with(|| "overrun: dropped".into());
            continue;
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, once(&mut conn, &t, &grpc_body)).await {
            Ok(Ok(())) => {
                let now = Instant::now();
                w.hist
                    .saturating_record(now.duration_since(due).as_nanos() as u64);
                w.ok += 1;
                w.last = now;
            }
            r => {
                w.errors += 1;
                let e = match r {
                    Ok(Err(e)) => format!("{e:#}"),
                    _ => "timeout".to_string(),
                };
                w.first_error.get_or_insert(e);
                if let (Conn::H1(_), Ok(c)) = (&conn, dial(&t).await) {
                    conn = c;
                }
            }
        }
    }
    w
}

/// A closed-loop or fresh-connection run: completed requests a second.
#[derive(Debug, Clone, Default)]
pub struct Throughput {
    pub rps: f64,
    pub errors: u64,
    pub gen_cpu: f64,
    /// CPU time the hypervisor took from this machine during the run, % of it.
    pub steal: f64,
    pub first_error: Option<String>,
}

/// `conns` connections, each sending back to back for `dur`.
pub async fn closed_loop(t: &Target, conns: usize, dur: Duration) -> anyhow::Result<Throughput> {
    let mut set = tokio::task::JoinSet::new();
    let meter = CpuMeter::start_self();
    let start = Instant::now();
    let end = start + dur;
    for _ in 0..conns {
        let mut conn = dial(t).await?;
        let t = t.clone();
        set.spawn(async move {
            let grpc_body = grpc_request();
            let (mut ok, mut errors, mut first) = (0u64, 0u64, None);
            while Instant::now() < end {
                match tokio::time::timeout(REQUEST_TIMEOUT, once(&mut conn, &t, &grpc_body)).await {
                    Ok(Ok(())) => ok += 1,
                    r => {
                        errors += 1;
                        first.get_or_insert(format!("{r:?}"));
                        match dial(&t).await {
                            Ok(c) => conn = c,
                            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                }
            }
            (ok, errors, first)
        });
    }
    sum_up(set, meter, start).await
}

async fn sum_up(
    mut set: tokio::task::JoinSet<(u64, u64, Option<String>)>,
    meter: CpuMeter,
    start: Instant,
) -> anyhow::Result<Throughput> {
    let mut out = Throughput::default();
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        let (o, e, f) = r?;
        ok += o;
        out.errors += e;
        out.first_error = out.first_error.or(f);
    }
    out.rps = ok as f64 / start.elapsed().as_secs_f64();
    out.gen_cpu = meter.percent();
    Ok(out)
}

/// One request per new TCP connection to `addr`; with `tunnel`, each
/// connection first opens `CONNECT <tunnel>` through an explicit proxy.
pub async fn fresh_connections(
    addr: SocketAddr,
    tunnel: Option<String>,
    concurrency: usize,
    dur: Duration,
) -> anyhow::Result<Throughput> {
    let mut set = tokio::task::JoinSet::new();
    let meter = CpuMeter::start_self();
    let start = Instant::now();
    let end = start + dur;
    for _ in 0..concurrency {
        let tunnel = tunnel.clone();
        set.spawn(async move {
            let (mut ok, mut errors, mut first) = (0u64, 0u64, None);
            while Instant::now() < end {
                let one = fresh_one(addr, tunnel.as_deref());
                match tokio::time::timeout(REQUEST_TIMEOUT, one).await {
                    Ok(Ok(())) => ok += 1,
                    r => {
                        errors += 1;
                        first.get_or_insert(format!("{r:?}"));
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            (ok, errors, first)
        });
    }
    sum_up(set, meter, start).await
}

async fn fresh_one(addr: SocketAddr, tunnel: Option<&str>) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    if let Some(authority) = tunnel {
        let connect = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
        s.write_all(connect.as_bytes()).await?;
        let head = read_until(&mut s, &mut buf, 0).await?;
        ensure!(
            buf.starts_with(b"HTTP/1.1 200"),
            "CONNECT answered {:?}",
            String::from_utf8_lossy(&buf[..head])
        );
        buf.clear();
    }
    s.write_all(b"GET / HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
        .await?;
    read_until(&mut s, &mut buf, BODY_BYTES).await?;
    ensure!(buf.starts_with(b"HTTP/1.1 200"), "not a 200");
    Ok(())
}

/// Reads until a response head and `body` more bytes are in `buf`; the head's length.
async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, body: usize) -> anyhow::Result<usize> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if buf.len() >= i + 4 + body {
                return Ok(i + 4);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed after {} bytes", buf.len());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
