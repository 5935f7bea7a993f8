//! Traffic passes through two proxies (the client's outbound, the server's
//! inbound) unchanged: HTTP/1.1 keep-alive and bodies, `Expect: 100-continue`,
//! chunked answers, h2c, the four kinds of gRPC call, WebSocket, raw TCP through
//! CONNECT; hosts resolve within the namespace; hop-by-hop headers stop at the
//! proxy while end-to-end ones arrive.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use remora_proto::examples::EchoRequest;
use remora_tests::raw_http::{exchange, read_response};
use remora_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const SHOP: &str = r#"
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
metadata: {name: echo, namespace: shop}
spec:
  ports: [{port: 9000, protocol: tcp}]
---
apiVersion: remora.dev/v1
kind: Service
metadata: {name: grpc-echo, namespace: shop}
spec:
  ports: [{port: 50051, protocol: grpc}]
"#;

const BACKEND: &str = "http://backend.shop:8080";

/// A control plane with the shop's services, a backend and a frontend (the
/// client side) each behind its proxy.
struct Shop {
    cp: ControlPlane,
    frontend: Sidecar,
    backend: Sidecar,
}

impl Shop {
    async fn start() -> Shop {
        let cp = ControlPlane::start().await;
        cp.apply_ok(SHOP).await;
        let backend = Sidecar::start(&cp, "shop", "backend", "v1", Mode::Http).await;
        let frontend = Sidecar::start(&cp, "shop", "frontend", "v1", Mode::Http).await;
        let shop = Shop {
            cp,
            frontend,
            backend,
        };
        wait_served(&shop.http1(), &format!("{BACKEND}/"), &[], "backend/v1").await;
        shop
    }

    /// Where the client side's requests go: the frontend's outbound listener.
    fn outbound(&self) -> std::net::SocketAddr {
        self.frontend.proxy.outbound()
    }

    fn http1(&self) -> HttpClient {
        http1_via_proxy(self.outbound())
    }
}

/// A raw connection to the client's outbound listener.
async fn raw(shop: &Shop) -> BufReader<TcpStream> {
    BufReader::new(TcpStream::connect(shop.outbound()).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keep_alive_carries_several_requests_on_one_connection() {
    let shop = Shop::start().await;
    let mut conn = raw(&shop).await;
    for i in 0..5 {
        let req =
            format!("GET {BACKEND}/api/orders?n={i} HTTP/1.1\r\nHost: backend.shop:8080\r\n\r\n");
        conn.get_mut().write_all(req.as_bytes()).await.unwrap();
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, read_response(&mut conn))
            .await
            .expect("an answer on the kept-alive connection")
            .unwrap_or_else(|e| panic!("request {i} on the same connection: {e}"));
        assert_eq!(resp.status, 200, "request {i}");
        assert_eq!(resp.header("x-served-by"), Some("backend/v1"));
        let json = resp.json();
        assert_eq!(json["path"], "/api/orders");
        assert_eq!(json["query"], format!("n={i}"));
        assert_eq!(json["method"], "GET");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_body_is_echoed_byte_for_byte() {
    let shop = Shop::start().await;
    let mut payload = vec![0u8; 256 * 1024];
    fastrand::fill(&mut payload);
    let chunks: Vec<Result<Frame<Bytes>, BoxError>> = payload
        .chunks(10_000)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    // A stream body has no known length, so hyper sends it chunked.
    let body = BodyExt::boxed(StreamBody::new(futures_util::stream::iter(chunks)));
    let req = Request::post(format!("{BACKEND}/echo"))
        .header("content-type", "application/octet-stream")
        .body(body)
        .unwrap();
    let reply = shop.http1().send(req).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.served_by(), Some("backend/v1"));
    assert_eq!(reply.body.len(), payload.len());
    assert!(
        reply.body == payload,
        "the echoed body differs from the one sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_gets_continue_before_the_body_is_sent() {
    let shop = Shop::start().await;
    let mut conn = raw(&shop).await;
    let body = b"hello, continue";
    let head = format!(
        "POST {BACKEND}/echo HTTP/1.1\r\nHost: backend.shop:8080\r\nContent-Length: {}\r\n\
         Expect: 100-continue\r\n\r\n",
        body.len()
    );
    conn.get_mut().write_all(head.as_bytes()).await.unwrap();
    let interim = tokio::time::timeout(Duration::from_secs(5), read_response(&mut conn))
        .await
        .expect("no 100 Continue within 5 s of the request head")
        .unwrap();
    assert_eq!(
        interim.status, 100,
        "expected `HTTP/1.1 100 Continue` first"
    );
    conn.get_mut().write_all(body).await.unwrap();
    let resp = tokio::time::timeout(REQUEST_TIMEOUT, read_response(&mut conn))
        .await
        .expect("no answer after the body")
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_response_streams_through() {
    let shop = Shop::start().await;
    let req = format!(
        "GET {BACKEND}/stream?chunks=50&size=1000 HTTP/1.1\r\nHost: backend.shop:8080\r\n\
         Connection: close\r\n\r\n"
    );
    let resp = exchange(shop.outbound(), req.as_bytes()).await.unwrap();
    assert_eq!(resp.status, 200);
    assert!(
        resp.chunked,
        "the app's chunked answer reached the client with headers {:?}",
        resp.headers
    );
    assert_eq!(resp.body.len(), 50 * 1000);
    for (i, chunk) in resp.body.chunks(1000).enumerate() {
        let byte = b'a' + (i % 26) as u8;
        assert!(chunk.iter().all(|b| *b == byte), "chunk {i} was altered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_request_reaches_the_app() {
    let shop = Shop::start().await;
    let client = h2c_via_proxy(shop.outbound());
    for _ in 0..3 {
        let reply = client.get(&format!("{BACKEND}/h2?x=1")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.version, http::Version::HTTP_2);
        assert_eq!(reply.served_by(), Some("backend/v1"));
        let json = reply.json();
        assert_eq!(json["path"], "/h2");
        assert_eq!(json["query"], "x=1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_calls_pass() {
    let shop = Shop::start().await;
    let _grpc = Sidecar::start(&shop.cp, "shop", "grpc-echo", "v1", Mode::Http).await;
    let mut client = grpc_via_proxy(shop.outbound(), "http://grpc-echo.shop:50051").await;
    let request = |message: &str, count| EchoRequest {
        message: message.to_owned(),
        count,
    };

    // Unary (retried until the client's proxy knows the new endpoint).
    let reply = eventually(Duration::from_secs(10), "a unary call to grpc-echo", || {
        let mut client = client.clone();
        async move { client.unary(request("hello", 0)).await.ok() }
    })
    .await
    .into_inner();
    assert_eq!(reply.message, "hello");
    assert_eq!(reply.served_by, "grpc-echo/v1");

    // Server streaming.
    let mut replies = client
        .server_stream(request("tick", 5))
        .await
        .unwrap()
        .into_inner();
    let mut sequences = Vec::new();
    while let Some(reply) = replies.message().await.unwrap() {
        assert_eq!(reply.message, "tick");
        sequences.push(reply.sequence);
    }
    assert_eq!(sequences, vec![0, 1, 2, 3, 4]);

    // Client streaming.
    let messages = ["a", "b", "c"].map(|m| request(m, 0));
    let reply = client
        .client_stream(futures_util::stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.message, "a,b,c");

    // Bidirectional: each reply arrives before the next request is sent.
    let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(1);
    let outgoing =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    tx.send(request("one", 0)).await.unwrap();
    let mut incoming = client.bidi_stream(outgoing).await.unwrap().into_inner();
    for (i, next) in ["one", "two", "three"].iter().enumerate() {
        if i > 0 {
            tx.send(request(next, 0)).await.unwrap();
        }
        let reply = tokio::time::timeout(REQUEST_TIMEOUT, incoming.message())
            .await
            .expect("a bidi reply")
            .unwrap()
            .expect("the bidi stream ended early");
        assert_eq!(reply.message, *next);
        assert_eq!(reply.sequence, i as u32);
    }
    drop(tx);
    assert!(incoming.message().await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_messages_are_echoed() {
    let shop = Shop::start().await;
    let mut ws = websocket_via_proxy(shop.outbound(), "ws://backend.shop:8080/ws").await;
    let messages = [
        Message::text("first"),
        Message::binary(vec![0u8, 1, 2, 254, 255]),
        Message::text("third ✓"),
    ];
    for msg in messages {
        ws.send(msg.clone()).await.unwrap();
        let echoed = tokio::time::timeout(REQUEST_TIMEOUT, ws.next())
            .await
            .expect("an echo within the timeout")
            .expect("the socket closed")
            .unwrap();
        assert_eq!(echoed, msg);
    }
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnel_carries_10_mib_byte_for_byte() {
    let shop = Shop::start().await;
    let _echo = Sidecar::start(&shop.cp, "shop", "echo", "v1", Mode::TcpEcho).await;
    let stream = eventually(
        Duration::from_secs(10),
        "a tunnel to echo.shop:9000",
        || {
            let proxy = shop.outbound();
            async move { try_connect_tunnel(proxy, "echo.shop:9000").await.ok() }
        },
    )
    .await;

    let mut payload = vec![0u8; 10 << 20];
    fastrand::fill(&mut payload);
    let payload = Bytes::from(payload);
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn({
        let payload = payload.clone();
        async move {
            wr.write_all(&payload).await.unwrap();
            wr.shutdown().await.unwrap();
        }
    });
    let mut echoed = Vec::with_capacity(payload.len());
    tokio::time::timeout(Duration::from_secs(60), rd.read_to_end(&mut echoed))
        .await
        .expect("the echo did not end within 60 s")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(echoed.len(), payload.len(), "bytes echoed");
    assert!(echoed == payload, "the echoed bytes differ from those sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_resolve_within_the_namespace_and_unknown_ones_get_503() {
    let shop = Shop::start().await;
    let client = shop.http1();

    // The frontend is in `shop`, so `backend` names backend.shop.
    let reply = client.get("http://backend:8080/short").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.served_by(), Some("backend/v1"));
    assert_eq!(reply.json()["path"], "/short");

    let reply = client.get("http://nope.shop:8080/").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.header("x-remora-error"), Some("no-endpoints"));
    assert_eq!(reply.served_by(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_stop_at_the_proxy() {
    let shop = Shop::start().await;
    let req = format!(
        "GET {BACKEND}/headers HTTP/1.1\r\nHost: backend.shop:8080\r\n\
         Connection: keep-alive, x-secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n\
         Proxy-Connection: keep-alive\r\nX-End-To-End: 1\r\n\r\n"
    );
    let resp = exchange(shop.outbound(), req.as_bytes()).await.unwrap();
    assert_eq!(resp.status, 200);
    let json = resp.json();
    let headers = json["headers"].as_object().expect("the app's headers");
    for hop in ["x-secret", "keep-alive", "proxy-connection"] {
        assert!(
            !headers.contains_key(hop),
            "the app saw hop-by-hop header {hop}: {headers:?}"
        );
    }
    if let Some(conn) = headers.get("connection") {
        assert!(
            !conn.as_str().unwrap_or("").contains("x-secret"),
            "the app saw the client's Connection header: {conn}"
        );
    }
    assert_eq!(headers.get("x-end-to-end"), Some(&"1".into()));
    // The server's proxy delivered it, so the app counts it.
    assert!(shop.backend.app.requests_served().await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_answers_keep_status_and_body() {
    let shop = Shop::start().await;
    let client = shop.http1();
    let reply = client.get(&format!("{BACKEND}/status/418")).await;
    assert_eq!(reply.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(reply.header("x-remora-error"), None);
    let post = Request::post(format!("{BACKEND}/count"))
        .body(full(vec![b'x'; 12345]))
        .unwrap();
    let reply = client.send(post).await.unwrap();
    assert_eq!(reply.json()["body_bytes"], 12345);
    assert_eq!(reply.json()["method"], "POST");
}
