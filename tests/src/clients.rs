//! Clients that talk to a proxy's outbound listener in explicit mode: HTTP/1.1
//! (absolute-form), h2c, gRPC, CONNECT tunnels and WebSocket.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use remora_examples::explicit_proxy::ProxyConnector;
use remora_proto::examples::echo_client::EchoClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tonic::transport::{Channel, Endpoint};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The request body type of [`HttpClient`].
pub type Body = BoxBody<Bytes, BoxError>;

/// How long one request through a proxy may take in a test.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A complete answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `x-served-by` (`NAME/V` of the sample app that answered).
    pub fn served_by(&self) -> Option<&str> {
        self.header("x-served-by")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} answered something that is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// A hyper-util client whose every connection goes to one proxy.
#[derive(Debug, Clone)]
pub struct HttpClient {
    inner: Client<ProxyConnector, Body>,
}

/// HTTP/1.1 through the proxy at `proxy`, requests in absolute-form.
pub fn http1_via_proxy(proxy: SocketAddr) -> HttpClient {
    HttpClient {
        inner: Client::builder(TokioExecutor::new()).build(ProxyConnector::new(proxy)),
    }
}

/// HTTP/2 with prior knowledge (h2c) through the proxy at `proxy`; the
/// `:authority` comes from the request's URL.
pub fn h2c_via_proxy(proxy: SocketAddr) -> HttpClient {
    HttpClient {
        inner: Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(ProxyConnector::new(proxy)),
    }
}

impl HttpClient {
    /// Sends `req` and reads the whole answer; a transport error or a timeout
    /// is an `Err` describing it.
    pub async fn send(&self, req: Request<Body>) -> Result<Reply, String> {
        let what = format!("{} {}", req.method(), req.uri());
        let exchange = async {
            let resp = self
                .inner
                .request(req)
                .await
                .map_err(|e| format!("{what}: {e:?}"))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("{what}: reading the body: {e}"))?
                .to_bytes();
            Ok(Reply {
                status: parts.status,
                version: parts.version,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_TIMEOUT:?}")))
    }

    /// `GET url` with extra headers.
    pub async fn try_get(&self, url: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
        let mut req = Request::get(url);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        self.send(req.body(empty()).map_err(|e| e.to_string())?)
            .await
    }

    /// `GET url`; panics on a transport error.
    pub async fn get(&self, url: &str) -> Reply {
        self.get_with(url, &[]).await
    }

    /// `GET url` with extra headers; panics on a transport error.
    pub async fn get_with(&self, url: &str, headers: &[(&str, &str)]) -> Reply {
        self.try_get(url, headers)
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
    }

    /// `GET url` and the answer's body as JSON.
    pub async fn get_json(&self, url: &str) -> (StatusCode, HeaderMap, serde_json::Value) {
        let reply = self.get(url).await;
        let json = reply.json();
        (reply.status, reply.headers, json)
    }
}

/// An Echo client whose channel dials the proxy at `proxy` while `:authority`
/// names `service_url` (such as `http://grpc-echo.shop:50051`).
pub async fn grpc_via_proxy(proxy: SocketAddr, service_url: &str) -> EchoClient<Channel> {
    let origin: Uri = service_url.parse().expect("a service URL");
    let channel = Endpoint::from_shared(format!("http://{proxy}"))
        .expect("the proxy's URL")
        .origin(origin)
        .connect_timeout(REQUEST_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connecting to the proxy {proxy}: {e:?}"));
    EchoClient::new(channel)
}

/// Opens a TCP tunnel to `target` (`host:port`) with `CONNECT`; the stream after
/// the proxy's `200` answer. Panics if the proxy refuses.
pub async fn connect_tunnel(proxy: SocketAddr, target: &str) -> TcpStream {
    try_connect_tunnel(proxy, target)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`connect_tunnel`], with the proxy's refusal (its answer head) as `Err`.
pub async fn try_connect_tunnel(proxy: SocketAddr, target: &str) -> Result<TcpStream, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(proxy)
            .await
            .map_err(|e| format!("connecting to the proxy {proxy}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("sending CONNECT: {e}"))?;
        // Read the answer's head byte by byte so no tunnelled byte is consumed.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
            let b = stream
                .read_u8()
                .await
                .map_err(|e| format!("reading the CONNECT answer: {e}"))?;
            head.push(b);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        match head.split_whitespace().nth(1) {
            Some("200") => Ok(stream),
            _ => Err(format!("CONNECT {target} was refused: {head}")),
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer to CONNECT {target}")))
}

/// A WebSocket to `url` (`ws://backend.shop:8080/ws`) over a connection to the
/// proxy; the `Host` header names the service.
pub async fn websocket_via_proxy(proxy: SocketAddr, url: &str) -> WebSocketStream<TcpStream> {
    let stream = TcpStream::connect(proxy)
        .await
        .expect("connecting to the proxy");
    let (ws, resp) = tokio::time::timeout(
        REQUEST_TIMEOUT,
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    .expect("no WebSocket handshake answer")
    .unwrap_or_else(|e| panic!("WebSocket handshake with {url}: {e}"));
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

/// Waits (up to 10 s) until `GET url` with `headers` through `client` is answered
/// 2xx by the app `served_by` (`NAME/V`): the mesh has converged that far.
pub async fn wait_served(
    client: &HttpClient,
    url: &str,
    headers: &[(&str, &str)],
    served_by: &str,
) {
    let mut last = String::new();
    let what = format!("GET {url} {headers:?} to be served by {served_by}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match client.try_get(url, headers).await {
            Ok(r) if r.status.is_success() && r.served_by() == Some(served_by) => return,
            Ok(r) => {
                last = format!(
                    "{} served by {:?}, x-remora-error {:?}",
                    r.status,
                    r.served_by(),
                    r.header("x-remora-error")
                )
            }
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}; last answer: {last}");
}

// ------------------------------------------------------------------ request loops

/// One request of a [`RequestLoop`].
#[derive(Debug, Clone)]
pub struct Outcome {
    /// When it was sent.
    pub sent: Instant,
    /// `Ok(x-served-by)` for a 2xx answer, else what went wrong.
    pub result: Result<String, String>,
}

/// Sends `GET url` one at a time, one every `every`, until stopped, and records
/// every outcome.
#[derive(Debug)]
pub struct RequestLoop {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Vec<Outcome>>,
}

impl RequestLoop {
    pub fn start(client: HttpClient, url: &str, every: Duration) -> RequestLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let url = url.to_owned();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut outcomes = Vec::new();
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let sent = Instant::now();
                    let result = match client.try_get(&url, &[]).await {
                        Ok(r) if r.status.is_success() => {
                            Ok(r.served_by().unwrap_or("?").to_owned())
                        }
                        Ok(r) => Err(format!(
                            "status {} x-remora-error {:?}",
                            r.status,
                            r.header("x-remora-error")
                        )),
                        Err(e) => Err(e),
                    };
                    outcomes.push(Outcome { sent, result });
                }
                outcomes
            }
        });
        RequestLoop { stop, task }
    }

    /// Stops the loop; every outcome, in order.
    pub async fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the request loop panicked")
    }
}

/// The failed outcomes, for an assertion message.
pub fn failures(outcomes: &[Outcome]) -> Vec<&Outcome> {
    outcomes.iter().filter(|o| o.result.is_err()).collect()
}
