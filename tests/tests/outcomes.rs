//! Every request ends with one access-log line and one count, blamed on the
//! side that ended it, and only the upstream's failures count against it;
//! long and quiet requests are not cut by the idle timeout; `Expect:
//! 100-continue` is decided by the application; a port declared `http2`
//! makes the sidecar speak HTTP/2 to its application.
//!
//! The application here is an in-process hyper server whose behaviour each
//! test chooses by path, so that it can refuse an upload unread, break off a
//! response, or answer only HTTP/2.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_tests::observability::{scrape, stdout_json_lines};
use remora_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const SERVICES: &str = r#"
apiVersion: remora.dev/v1
kind: Service
metadata: {name: frontend, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: remora.dev/v1
kind: Service
metadata: {name: backend, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: remora.dev/v1
kind: Service
metadata: {name: h2only, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http2}]
---
apiVersion: remora.dev/v1
kind: DestinationPolicy
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  circuitBreaker: {consecutiveFailures: 3, openFor: 30s}
"#;

type Body = BoxBody<Bytes, std::io::Error>;

/// The application: what it read of request bodies, by path.
struct TestApp {
    addr: SocketAddr,
    /// Body bytes the application itself read.
    body_bytes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestApp {
    /// `h2_only`: the server speaks only HTTP/2 (h2c with prior knowledge).
    async fn start(h2_only: bool) -> TestApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body_bytes = Arc::new(AtomicU64::new(0));
        let counter = body_bytes.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| app(counter.clone(), req));
                    let io = TokioIo::new(stream);
                    let _ = if h2_only {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await
                    } else {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await
                    };
                });
            }
        });
        TestApp {
            addr,
            body_bytes,
            task,
        }
    }
}

fn full(status: StatusCode, text: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r
}

async fn app(
    counter: Arc<AtomicU64>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let version = format!("{:?}", req.version());
    Ok(match req.uri().path() {
        // Refuses an upload without reading a byte of it.
        "/refuse" => full(StatusCode::UNAUTHORIZED, "no\n".into()),
        // Reads the body as it comes; answers how much came.
        "/upload" => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        let len = f.data_ref().map_or(0, |d| d.len() as u64);
                        n += len;
                        counter.fetch_add(len, Ordering::Relaxed);
                    }
                    Err(_) => return Ok(full(StatusCode::BAD_REQUEST, "broken body\n".into())),
                }
            }
            full(StatusCode::OK, format!("{n}\n"))
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            full(StatusCode::OK, "slow\n".into())
        }
        // Declares 1000 bytes, sends 100, then breaks the connection.
        "/broken" => {
            // The head and the first bytes go out; a moment later, the break.
            let frames = futures_util::stream::unfold(0, |step| async move {
                match step {
                    0 => Some((Ok(Frame::data(Bytes::from(vec![b'x'; 100]))), 1)),
                    1 => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        let e = std::io::Error::other("the app broke off its response");
                        Some((Err(e), 2))
                    }
                    _ => None,
                }
            });
            let mut r = Response::new(StreamBody::new(frames).boxed());
            r.headers_mut()
                .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(1000));
            r
        }
        _ => full(StatusCode::OK, format!("{version}\n")),
    })
}

/// A control plane, the backend (and the h2-only service) behind their
/// proxies, and a frontend proxy whose outbound listener the tests call.
struct Mesh {
    _cp: ControlPlane,
    backend_app: TestApp,
    backend: Proxy,
    _h2_app: TestApp,
    _h2: Proxy,
    frontend: Proxy,
}

impl Mesh {
    async fn start(args: &[&str]) -> Mesh {
        let cp = ControlPlane::start().await;
        cp.apply_ok(SERVICES).await;
        let backend_app = TestApp::start(false).await;
        let backend = Proxy::start(
            &cp,
            ProxyOpts::new("backend", "shop", backend_app.addr.port()).args(args),
        )
        .await;
        let h2_app = TestApp::start(true).await;
        let h2 = Proxy::start(
            &cp,
            ProxyOpts::new("h2only", "shop", h2_app.addr.port()).args(args),
        )
        .await;
        let frontend = Proxy::start(&cp, ProxyOpts::new("frontend", "shop", 1).args(args)).await;
        let mesh = Mesh {
            _cp: cp,
            backend_app,
            backend,
            _h2_app: h2_app,
            _h2: h2,
            frontend,
        };
        for host in ["backend.shop", "h2only.shop"] {
            eventually(READY_TIMEOUT, &format!("{host} is reachable"), || async {
                let r = mesh.get(host, "/").await.ok()?;
                (r.status == 200).then_some(())
            })
            .await;
        }
        mesh
    }

    /// A plain HTTP/1.1 GET through the frontend's outbound listener.
    async fn get(&self, host: &str, path: &str) -> std::io::Result<raw_http::RawResponse> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}:8080\r\nConnection: close\r\n\r\n");
        raw_http::exchange(self.frontend.outbound(), req.as_bytes()).await
    }

    /// The frontend's (outbound) access-log lines for `path`.
    async fn outbound_lines(&mut self, path: &str, count: usize) -> Vec<serde_json::Value> {
        let proc = self.frontend.process();
        eventually(
            Duration::from_secs(10),
            &format!("{count} outbound access-log lines for {path}"),
            || async {
                let lines: Vec<_> = stdout_json_lines(proc)
                    .into_iter()
                    .flatten()
                    .filter(|l| l["path"] == path && l["direction"] == "outbound")
                    .collect();
                (lines.len() >= count).then_some(lines)
            },
        )
        .await
    }
}

/// Sends a request head and `sent` bytes of a `declared`-byte body, then
/// closes the connection.
async fn abort_upload(proxy: SocketAddr, declared: usize, sent: usize) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: backend.shop:8080\r\nContent-Length: {declared}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![b'u'; sent]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(s);
}

/// A chunked upload whose second chunk size is not hex: the answer.
async fn malformed_chunks(proxy: SocketAddr) -> raw_http::RawResponse {
    let req = b"POST /upload HTTP/1.1\r\nHost: backend.shop:8080\r\n\
        Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nbad\r\n0\r\n\r\n";
    raw_http::exchange(proxy, req).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_the_clients_and_never_open_the_upstreams_breaker() {
    let mut mesh = Mesh::start(&[]).await;
    let outbound = mesh.frontend.outbound();

    // Six uploads cut off by their client: each is the client's failure,
    // with the bytes that really came.
    for _ in 0..6 {
        abort_upload(outbound, 100_000, 5_000).await;
    }
    let lines = mesh.outbound_lines("/upload", 6).await;
    for l in &lines {
        assert_eq!(l["error"], "client-reset", "{l}");
        assert_eq!(l["bytes_received"], 5_000, "the bytes that came: {l}");
    }

    // Five malformed chunk sizes: 400 bad-request, the client's fault.
    for _ in 0..5 {
        let r = malformed_chunks(outbound).await;
        assert_eq!(r.status, 400, "{r:?}");
        assert_eq!(r.header("x-remora-error"), Some("bad-request"), "{r:?}");
    }

    // The backend's breaker (3 consecutive failures) is still closed.
    let r = mesh.get("backend.shop", "/").await.unwrap();
    assert_eq!(r.status, 200, "a healthy backend is still served: {r:?}");
    let metrics = scrape(mesh.frontend.health()).await;
    assert_eq!(
        metrics.sum(
            "remora_circuit_breaker_open",
            &[("destination", "backend.shop")]
        ),
        0.0,
        "{}",
        metrics.show("remora_circuit_breaker_open", &[])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_the_app_breaks_off_is_logged_upstream_reset() {
    let mut mesh = Mesh::start(&[]).await;
    let _ = mesh.get("backend.shop", "/broken").await;
    let lines = mesh.outbound_lines("/broken", 1).await;
    assert_eq!(lines[0]["error"], "upstream-reset", "{}", lines[0]);
    let proc = mesh.backend.process();
    let inbound = eventually(Duration::from_secs(10), "the inbound line", || async {
        stdout_json_lines(proc)
            .into_iter()
            .flatten()
            .find(|l| l["path"] == "/broken" && l["direction"] == "inbound")
    })
    .await;
    assert_eq!(inbound["error"], "upstream-reset", "{inbound}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_the_app_works_is_logged_and_counted_once() {
    let mut mesh = Mesh::start(&[]).await;
    let mut s = TcpStream::connect(mesh.frontend.outbound()).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: backend.shop:8080\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(s);
    let lines = mesh.outbound_lines("/slow", 1).await;
    assert_eq!(lines[0]["error"], "client-reset", "{}", lines[0]);
    assert_eq!(lines[0]["status"], 499, "{}", lines[0]);
    // Nothing more is written for it when the app answers later.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(mesh.outbound_lines("/slow", 1).await.len(), 1);
    let metrics = scrape(mesh.frontend.health()).await;
    assert_eq!(
        metrics.sum(
            "remora_requests_total",
            &[("direction", "outbound"), ("status_code", "499")]
        ),
        1.0,
        "{}",
        metrics.show("remora_requests_total", &[])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_outlasts_the_idle_timeout() {
    let mesh = Mesh::start(&["--idle-timeout", "1s"]).await;
    let started = Instant::now();
    let r = mesh.get("backend.shop", "/slow").await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(started.elapsed() >= Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_decided_by_the_app() {
    let mesh = Mesh::start(&[]).await;
    let outbound = mesh.frontend.outbound();

    // Refused: the client gets the app's 401 and sends nothing.
    let mut s = BufReader::new(TcpStream::connect(outbound).await.unwrap());
    s.get_mut()
        .write_all(
            b"POST /refuse HTTP/1.1\r\nHost: backend.shop:8080\r\n\
              Content-Length: 50000000\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), raw_http::read_response(&mut s))
        .await
        .expect("an answer without the body")
        .unwrap();
    assert_eq!(r.status, 401, "the app's own answer: {r:?}");
    assert_eq!(mesh.backend_app.body_bytes.load(Ordering::Relaxed), 0);

    // Accepted: the app's 100 comes back at once (not after a timeout),
    // then the body goes through whole.
    let mut s = BufReader::new(TcpStream::connect(outbound).await.unwrap());
    s.get_mut()
        .write_all(
            b"POST /upload HTTP/1.1\r\nHost: backend.shop:8080\r\n\
              Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let started = Instant::now();
    let interim = tokio::time::timeout(Duration::from_secs(5), raw_http::read_response(&mut s))
        .await
        .expect("a 100 Continue")
        .unwrap();
    assert_eq!(interim.status, 100, "{interim:?}");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "the app's 100 took {:?}: the proxy waited out its timeout",
        started.elapsed()
    );
    s.get_mut().write_all(&vec![b'e'; 1_000_000]).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), raw_http::read_response(&mut s))
        .await
        .expect("the final answer")
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(String::from_utf8_lossy(&r.body).trim(), "1000000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_declared_http2_is_spoken_to_in_http2() {
    let mesh = Mesh::start(&[]).await;
    // An HTTP/1.1 client, an h2c-only application.
    let r = mesh.get("h2only.shop", "/").await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(String::from_utf8_lossy(&r.body).trim(), "HTTP/2.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_tcp_lines_carry_bytes_and_no_source_identity() {
    let mut mesh = Mesh::start(&[]).await;
    let mut tunnel = clients::connect_tunnel(mesh.frontend.outbound(), "backend.shop:8080").await;
    tunnel
        .write_all(b"GET /tunnelled HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut answer)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    drop(tunnel);
    let proc = mesh.frontend.process();
    let line = eventually(Duration::from_secs(10), "the outbound tcp line", || async {
        stdout_json_lines(proc)
            .into_iter()
            .flatten()
            .find(|l| l["protocol"] == "tcp" && l["direction"] == "outbound")
    })
    .await;
    assert!(line["source_identity"].is_null(), "{line}");
    assert!(line["bytes_received"].as_u64().unwrap_or(0) > 0, "{line}");
    assert_eq!(
        line["bytes_sent"].as_u64(),
        Some(answer.len() as u64),
        "{line}"
    );
}
