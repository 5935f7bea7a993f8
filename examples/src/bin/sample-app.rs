//! `sample-app`: the application behind each sidecar in the demo and the tests.
//!
//! ```text
//! sample-app --name NAME --version V --listen ADDR [--mode http|tcp-echo|banner]
//! ```
//!
//! * `http` (default): HTTP/1.1 and h2c (prior knowledge) on one port. gRPC
//!   (`content-type: application/grpc*`) goes to the `Echo` service; everything
//!   else to the small HTTP API below. Every answer carries `x-served-by: NAME/V`.
//!   - `/echo`: streams the request body back;
//!   - `/stream?chunks=N&size=B`: a chunked answer of N chunks of B bytes;
//!   - `/slow?ms=N`: answers after N ms;
//!   - `/status/CODE`: answers with that status;
//!   - `/stats`: `{"requests": N, "paths": {PATH: N}, "failed": N, "reset": N}`:
//!     every request served except `/stats` and `/control/*` (gRPC calls count
//!     under their method path), how many answered with an injected failure and
//!     how many had their connection closed;
//!   - `/ws` with `Upgrade: websocket`: echoes every text and binary message;
//!   - anything else: a JSON description of the request.
//!
//!   Fault controls, for tests (send them to the app's own port, not through the
//!   mesh; they answer `{"ok": true}` and are not counted):
//!   - `POST /control/fail?count=N&status=503[&grpc=14]`: the next N ordinary
//!     requests answer that status (after reading their body); gRPC calls get a
//!     trailers-only answer with `grpc-status` `grpc` when given;
//!   - `POST /control/slow?ms=N`: every ordinary request waits N ms first, until
//!     set back with `ms=0`;
//!   - `POST /control/reset?count=N`: the next N ordinary requests get their
//!     connection closed (HTTP/1) or their stream reset (HTTP/2), without an answer;
//!   - `POST /control/clear`: all of the above back to normal.
//! * `tcp-echo`: copies every byte back until EOF, then shuts down its write side.
//! * `banner`: speaks first (`220 NAME/V ready\r\n`), then echoes lines.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, Stream, StreamExt};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, BodyStream, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use remora_proto::examples::echo_server::{Echo, EchoServer};
use remora_proto::examples::{EchoReply, EchoRequest};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tower::ServiceExt as _;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// The largest `/stream` answer the app makes (chunks × size).
const MAX_STREAM_BYTES: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Http,
    TcpEcho,
    Banner,
}

#[derive(Debug, Parser)]
#[command(
    name = "sample-app",
    about = "The sample application behind a Remora sidecar"
)]
struct Args {
    /// The service name this instance reports (in `x-served-by` and gRPC replies).
    #[arg(long)]
    name: String,
    /// The version this instance reports.
    #[arg(long)]
    version: String,
    /// The address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long, value_enum, default_value_t = Mode::Http)]
    mode: Mode,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let served_by = format!("{}/{}", args.name, args.version);
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    println!("sample-app {served_by} listening on {}", args.listen);
    match args.mode {
        Mode::Http => serve_http(listener, served_by).await,
        Mode::TcpEcho => serve_tcp(listener, tcp_echo).await,
        Mode::Banner => {
            let banner: Arc<str> = format!("220 {served_by} ready\r\n").into();
            serve_tcp(listener, move |s| banner_echo(s, banner.clone())).await
        }
    }
}

// ------------------------------------------------------------------ raw TCP modes

async fn serve_tcp<F, Fut>(listener: TcpListener, handle: F) -> anyhow::Result<()>
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    loop {
        let (stream, peer) = listener.accept().await?;
        let conn = handle(stream);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("connection from {peer}: {e}");
            }
        });
    }
}

async fn tcp_echo(mut stream: TcpStream) -> std::io::Result<()> {
    let (mut r, mut w) = stream.split();
    tokio::io::copy(&mut r, &mut w).await?;
    w.shutdown().await
}

async fn banner_echo(stream: TcpStream, banner: Arc<str>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    w.write_all(banner.as_bytes()).await?;
    let mut lines = BufReader::new(r);
    let mut line = String::new();
    while lines.read_line(&mut line).await? > 0 {
        w.write_all(line.as_bytes()).await?;
        line.clear();
    }
    w.shutdown().await
}

// ------------------------------------------------------------------ HTTP mode

struct App {
    served_by: String,
    served_by_header: HeaderValue,
    /// Every request served except `/stats` and `/control/*`.
    requests: AtomicU64,
    /// The same, by path.
    paths: Mutex<BTreeMap<String, u64>>,
    faults: Faults,
    grpc: EchoServer<EchoService>,
}

impl App {
    /// Counts one ordinary request to `path`.
    fn count(&self, path: &str) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut paths = self.paths.lock();
        if let Some(n) = paths.get_mut(path) {
            *n += 1;
        } else if paths.len() < 1000 {
            paths.insert(path.to_owned(), 1);
        }
    }
}

/// What `/control/*` set.
#[derive(Default)]
struct Faults {
    /// How many more requests get the injected failure.
    fail_remaining: AtomicU64,
    fail_status: AtomicU32,
    /// The gRPC status for gRPC calls; 0: answer `fail_status` instead.
    fail_grpc: AtomicU32,
    /// Delay before every ordinary request, in ms.
    slow_ms: AtomicU64,
    /// How many more requests get their connection closed.
    reset_remaining: AtomicU64,
    /// Counts of what was done.
    failed: AtomicU64,
    reset: AtomicU64,
}

/// Takes one from `counter` if it is not zero.
fn take_one(counter: &AtomicU64) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

async fn serve_http(listener: TcpListener, served_by: String) -> anyhow::Result<()> {
    let app = Arc::new(App {
        served_by_header: HeaderValue::from_str(&served_by)
            .context("NAME/V must be a valid header value")?,
        grpc: EchoServer::new(EchoService {
            served_by: served_by.clone(),
        }),
        served_by,
        requests: AtomicU64::new(0),
        paths: Mutex::new(BTreeMap::new()),
        faults: Faults::default(),
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    loop {
        let (stream, peer) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(app.clone(), req));
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await
            {
                eprintln!("connection from {peer}: {e}");
            }
        });
    }
}

/// The error a handler returns to have hyper drop the connection (HTTP/1) or
/// reset the stream (HTTP/2) without an answer.
#[derive(Debug)]
struct InjectedReset;

impl std::fmt::Display for InjectedReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset by /control/reset")
    }
}

impl std::error::Error for InjectedReset {}

async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, BoxError> {
    let path = req.uri().path();
    if path.starts_with("/control/") {
        let mut resp = control(&app, &req);
        resp.headers_mut()
            .insert("x-served-by", app.served_by_header.clone());
        return Ok(resp);
    }
    if path != "/stats" {
        app.count(path);
        if let Some(mut resp) = inject(&app, &req).await? {
            // Read the body, as a server that refuses after looking at it would.
            let _ = req.into_body().collect().await;
            resp.headers_mut()
                .insert("x-served-by", app.served_by_header.clone());
            return Ok(resp);
        }
    }
    let mut resp = if is_grpc(&req) {
        let Ok(resp) = app.grpc.clone().oneshot(req).await;
        resp.map(|b| b.map_err(BoxError::from).boxed_unsync())
    } else {
        route(&app, req).await
    };
    resp.headers_mut()
        .insert("x-served-by", app.served_by_header.clone());
    Ok(resp)
}

/// The faults `/control/*` asked for, applied to one ordinary request: an
/// error to reset the connection, an injected failure to answer with, or
/// `None` to serve it normally (after the configured delay).
async fn inject<B>(app: &App, req: &Request<B>) -> Result<Option<Response<Body>>, BoxError> {
    let f = &app.faults;
    if take_one(&f.reset_remaining) {
        f.reset.fetch_add(1, Ordering::Relaxed);
        return Err(Box::new(InjectedReset));
    }
    let ms = f.slow_ms.load(Ordering::Relaxed);
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if !take_one(&f.fail_remaining) {
        return Ok(None);
    }
    f.failed.fetch_add(1, Ordering::Relaxed);
    let grpc = f.fail_grpc.load(Ordering::Relaxed);
    if grpc != 0 && is_grpc(req) {
        let mut resp = Response::new(empty());
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(grpc));
        h.insert(
            "grpc-message",
            HeaderValue::from_static("injected%20by%20%2Fcontrol%2Ffail"),
        );
        return Ok(Some(resp));
    }
    let status = u16::try_from(f.fail_status.load(Ordering::Relaxed))
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    Ok(Some(text(status, "failure injected by /control/fail\n")))
}

/// `/control/fail`, `/control/slow`, `/control/reset`, `/control/clear`.
fn control<B>(app: &App, req: &Request<B>) -> Response<Body> {
    if req.method() != http::Method::POST {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "control requests are POSTs\n",
        );
    }
    let uri = req.uri();
    let param = |name| query_param(uri, name).and_then(|v| v.parse::<u64>().ok());
    let f = &app.faults;
    match uri.path() {
        "/control/fail" => {
            let status = param("status").unwrap_or(503);
            if StatusCode::from_u16(u16::try_from(status).unwrap_or(0)).is_err() {
                return text(StatusCode::BAD_REQUEST, "not a status code\n");
            }
            let grpc = param("grpc").unwrap_or(0);
            f.fail_status
                .store(u32::try_from(status).unwrap_or(503), Ordering::Relaxed);
            f.fail_grpc
                .store(u32::try_from(grpc).unwrap_or(0), Ordering::Relaxed);
            f.fail_remaining
                .store(param("count").unwrap_or(1), Ordering::Relaxed);
        }
        "/control/slow" => f.slow_ms.store(param("ms").unwrap_or(0), Ordering::Relaxed),
        "/control/reset" => f
            .reset_remaining
            .store(param("count").unwrap_or(1), Ordering::Relaxed),
        "/control/clear" => {
            f.fail_remaining.store(0, Ordering::Relaxed);
            f.slow_ms.store(0, Ordering::Relaxed);
            f.reset_remaining.store(0, Ordering::Relaxed);
        }
        _ => return text(StatusCode::NOT_FOUND, "unknown control\n"),
    }
    json(StatusCode::OK, &serde_json::json!({ "ok": true }))
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

async fn route(app: &App, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    if path == "/echo" {
        return echo(req).await;
    }
    if path == "/stream" {
        return stream(&req);
    }
    if path == "/stats" {
        let n = app.requests.load(Ordering::Relaxed);
        let paths = app.paths.lock().clone();
        let f = &app.faults;
        return json(
            StatusCode::OK,
            &serde_json::json!({
                "requests": n,
                "paths": paths,
                "failed": f.failed.load(Ordering::Relaxed),
                "reset": f.reset.load(Ordering::Relaxed),
            }),
        );
    }
    if path == "/ws" && is_websocket_upgrade(&req) {
        return websocket(req);
    }
    let mut status = StatusCode::OK;
    if path == "/slow" {
        let ms = query_param(req.uri(), "ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    } else if let Some(code) = path.strip_prefix("/status/") {
        match code.parse().ok().and_then(|c| StatusCode::from_u16(c).ok()) {
            Some(code) => status = code,
            None => return text(StatusCode::BAD_REQUEST, "not a status code\n"),
        }
    }
    describe(app, status, req).await
}

/// The default answer: what the app saw of the request, as JSON.
async fn describe(app: &App, status: StatusCode, req: Request<Incoming>) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    let mut body_bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    body_bytes += data.len() as u64;
                }
            }
            Err(e) => return text(StatusCode::BAD_REQUEST, &format!("reading the body: {e}\n")),
        }
    }
    let mut headers = BTreeMap::<String, String>::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    let (service, version) = app
        .served_by
        .split_once('/')
        .unwrap_or((app.served_by.as_str(), ""));
    json(
        status,
        &serde_json::json!({
            "service": service,
            "version": version,
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query().unwrap_or(""),
            "http_version": format!("{:?}", parts.version),
            "headers": headers,
            "body_bytes": body_bytes,
        }),
    )
}

/// Streams the request body back as it arrives. The first frame is read before
/// the answer starts, so an `Expect: 100-continue` client gets its `100 Continue`.
async fn echo(req: Request<Incoming>) -> Response<Body> {
    let mut echoed = http::HeaderMap::new();
    for name in [header::CONTENT_TYPE, header::CONTENT_LENGTH] {
        if let Some(v) = req.headers().get(&name) {
            echoed.insert(name, v.clone());
        }
    }
    let mut body = req.into_body();
    let first = match body.frame().await.transpose() {
        Ok(first) => first,
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("reading the body: {e}\n")),
    };
    let frames = futures_util::stream::iter(first.map(Ok))
        .chain(BodyStream::new(body))
        .map(|frame| frame.map_err(BoxError::from));
    let mut resp = Response::new(StreamBody::new(frames).boxed_unsync());
    *resp.headers_mut() = echoed;
    resp
}

/// `chunks` frames of `size` bytes, without a length, so HTTP/1 sends them chunked.
fn stream(req: &Request<Incoming>) -> Response<Body> {
    let param = |name| query_param(req.uri(), name).and_then(|v| v.parse::<u64>().ok());
    let chunks = param("chunks").unwrap_or(10);
    let size = param("size").unwrap_or(1024);
    if chunks.saturating_mul(size) > MAX_STREAM_BYTES {
        return text(
            StatusCode::BAD_REQUEST,
            "chunks × size is limited to 1 GiB\n",
        );
    }
    let Ok(size) = usize::try_from(size) else {
        return text(StatusCode::BAD_REQUEST, "size too large\n");
    };
    let frames = futures_util::stream::iter(0..chunks).map(move |i| {
        let byte = b'a' + (i % 26) as u8;
        Ok::<_, BoxError>(Frame::data(Bytes::from(vec![byte; size])))
    });
    let mut resp = Response::new(StreamBody::new(frames).boxed_unsync());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Completes the WebSocket handshake and echoes every text and binary message.
fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return text(StatusCode::BAD_REQUEST, "missing sec-websocket-key\n");
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => return eprintln!("websocket upgrade: {e}"),
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(msg) = ws.next().await {
            let reply = match msg {
                Ok(m @ (Message::Text(_) | Message::Binary(_))) => m,
                Ok(Message::Close(_)) => break,
                Ok(_) => continue,
                Err(e) => return eprintln!("websocket: {e}"),
            };
            if let Err(e) = ws.send(reply).await {
                return eprintln!("websocket: {e}");
            }
        }
        let _ = ws.close(None).await;
    });
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    resp
}

fn query_param<'a>(uri: &'a http::Uri, name: &str) -> Option<&'a str> {
    uri.query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find_map(|(k, v)| (k == name).then_some(v))
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::copy_from_slice(msg.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut body = value.to_string();
    body.push('\n');
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

// ------------------------------------------------------------------ gRPC

struct EchoService {
    served_by: String,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, tonic::Status>> + Send>>;

impl EchoService {
    fn reply(&self, message: String, sequence: u32) -> EchoReply {
        EchoReply {
            message,
            served_by: self.served_by.clone(),
            sequence,
        }
    }
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        Ok(tonic::Response::new(
            self.reply(request.into_inner().message, 0),
        ))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<ReplyStream>, tonic::Status> {
        let EchoRequest { message, count } = request.into_inner();
        let served_by = self.served_by.clone();
        let replies = futures_util::stream::iter(0..count).map(move |sequence| {
            Ok(EchoReply {
                message: message.clone(),
                served_by: served_by.clone(),
                sequence,
            })
        });
        Ok(tonic::Response::new(Box::pin(replies)))
    }

    async fn client_stream(
        &self,
        request: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let mut requests = request.into_inner();
        let mut messages = Vec::new();
        while let Some(req) = requests.message().await? {
            messages.push(req.message);
        }
        let count = u32::try_from(messages.len()).unwrap_or(u32::MAX);
        Ok(tonic::Response::new(self.reply(messages.join(","), count)))
    }

    type BidiStreamStream = ReplyStream;

    async fn bidi_stream(
        &self,
        request: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<ReplyStream>, tonic::Status> {
        let served_by = self.served_by.clone();
        let replies = request
            .into_inner()
            .zip(futures_util::stream::iter(0u32..))
            .map(move |(req, sequence)| {
                req.map(|r| EchoReply {
                    message: r.message,
                    served_by: served_by.clone(),
                    sequence,
                })
            });
        Ok(tonic::Response::new(Box::pin(replies)))
    }
}
