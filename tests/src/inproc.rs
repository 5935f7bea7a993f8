//! An in-process application with behaviours chosen by path (refuse an
//! upload unread, break a response off, answer only HTTP/2, stall, upgrade),
//! and a small mesh in front of it: a control plane, the app's sidecar and a
//! frontend sidecar whose outbound listener tests call in explicit mode.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::observability::stdout_json_lines;
use crate::{eventually, raw_http, ControlPlane, Proxy, ProxyOpts, READY_TIMEOUT};

/// The mesh's services: `backend` (http), `h2only` (http2), `frontend`.
pub const SERVICES: &str = r#"
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
"#;

pub type Body = BoxBody<Bytes, std::io::Error>;

/// The application: what it read of request bodies, by path.
pub struct TestApp {
    pub addr: SocketAddr,
    /// Body bytes the application itself read.
    pub body_bytes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestApp {
    /// `h2_only`: the server speaks only HTTP/2 (h2c with prior knowledge).
    pub async fn start(h2_only: bool) -> TestApp {
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
                            .with_upgrades()
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

pub fn full(status: StatusCode, text: String) -> Response<Body> {
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
        // Streams 64 MiB (for clients that never read it).
        "/big" => {
            let chunk = Bytes::from(vec![b'b'; 64 * 1024]);
            let frames =
                futures_util::stream::iter((0..1024).map(move |_| Ok(Frame::data(chunk.clone()))));
            Response::new(StreamBody::new(frames).boxed())
        }
        // The Host header the application saw.
        "/host" => {
            let host = req
                .headers()
                .get_all(http::header::HOST)
                .iter()
                .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
                .collect::<Vec<_>>()
                .join(" | ");
            full(StatusCode::OK, host)
        }
        // A response head with an `x-big` header of `?n=` bytes.
        "/bighead" => {
            let n = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("n="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let mut r = full(StatusCode::OK, "big head\n".into());
            if let Ok(v) = http::HeaderValue::from_str(&"h".repeat(n)) {
                r.headers_mut().insert("x-big", v);
            }
            r
        }
        // Never reads its upload and answers after 20 s.
        "/stall" => {
            tokio::time::sleep(Duration::from_secs(20)).await;
            full(StatusCode::OK, "late\n".into())
        }
        // Agrees to any upgrade, then answers every request line that comes
        // on the upgraded connection with 200 (a server that would serve
        // smuggled requests).
        "/upgrade" | "/api/innocent" if req.headers().contains_key(http::header::UPGRADE) => {
            upgrade_and_serve(req)
        }
        _ => full(StatusCode::OK, format!("{version}\n")),
    })
}

/// A control plane, the backend (and the h2-only service) behind their
/// proxies, and a frontend proxy whose outbound listener the tests call.
pub struct Mesh {
    pub cp: ControlPlane,
    pub backend_app: TestApp,
    pub backend: Proxy,
    pub h2_app: TestApp,
    pub h2: Proxy,
    pub frontend: Proxy,
}

impl Mesh {
    /// `policies` are applied after the services (`backend` and `h2only`
    /// on port 8080, the latter declared `http2`).
    pub async fn start(policies: &str, args: &[&str]) -> Mesh {
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
            cp,
            backend_app,
            backend,
            h2_app,
            h2,
            frontend,
        };
        // (h2only.shop is waited for by the tests that use it.)
        eventually(READY_TIMEOUT, "backend.shop is reachable", || async {
            let r = mesh.get("backend.shop", "/").await.ok()?;
            (r.status == 200).then_some(())
        })
        .await;
        if !policies.is_empty() {
            let version = mesh.cp.apply_ok(policies).await;
            for proxy in [&mesh.frontend, &mesh.backend, &mesh.h2] {
                let admin = proxy.admin();
                eventually(
                    READY_TIMEOUT,
                    &format!("policy version {version}"),
                    || async {
                        let dump = raw_http::get(admin, "/config_dump").await.ok()?;
                        (dump.status == 200 && dump.json()["policy_version"].as_u64()? >= version)
                            .then_some(())
                    },
                )
                .await;
            }
        }
        mesh
    }

    /// A plain HTTP/1.1 GET through the frontend's outbound listener.
    pub async fn get(&self, host: &str, path: &str) -> std::io::Result<raw_http::RawResponse> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}:8080\r\nConnection: close\r\n\r\n");
        raw_http::exchange(self.frontend.outbound(), req.as_bytes()).await
    }

    /// The frontend's (outbound) access-log lines for `path`.
    pub async fn outbound_lines(&mut self, path: &str, count: usize) -> Vec<serde_json::Value> {
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

/// Answers 101 to an upgrade, then 200 to every request head that arrives on
/// the upgraded connection.
fn upgrade_and_serve(mut req: Request<Incoming>) -> Response<Body> {
    let proto = req.headers()[http::header::UPGRADE].clone();
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let Ok(up) = on_upgrade.await else { return };
        let mut io = BufReader::new(TokioIo::new(up));
        let mut line = String::new();
        loop {
            line.clear();
            if io.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            if let Some(path) = line.strip_prefix("GET ") {
                let path = path.split(' ').next().unwrap_or("").to_owned();
                let body = format!("served {path} on the upgraded connection\n");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if io.get_mut().write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    });
    let mut r = full(StatusCode::SWITCHING_PROTOCOLS, String::new());
    r.headers_mut().insert(http::header::UPGRADE, proto);
    r.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    r
}
