//! Every request ends with one access-log line and one count, blamed on the
//! side that ended it, and only the upstream's failures count against it;
//! long and quiet requests are not cut by the idle timeout; `Expect:
//! 100-continue` is decided by the application; a port declared `http2`
//! makes the sidecar speak HTTP/2 to its application.
//!
//! The application here is an in-process hyper server whose behaviour each
//! test chooses by path, so that it can refuse an upload unread, break off a
//! response, or answer only HTTP/2.

#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "test code: not a hot path, and its deadlines are real time"
)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use remora_tests::inproc::Mesh;
use remora_tests::observability::{scrape, stdout_json_lines};
use remora_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const RAW_TCP: &str = r#"
apiVersion: remora.dev/v1
kind: Service
metadata: {name: raw, namespace: shop}
spec:
  ports: [{port: 9000, protocol: tcp}]
"#;

const BREAKER: &str = r#"
apiVersion: remora.dev/v1
kind: DestinationPolicy
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  circuitBreaker: {consecutiveFailures: 3, openFor: 30s}
"#;

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
    let mut mesh = Mesh::start(BREAKER, &[]).await;
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
    let mut mesh = Mesh::start(BREAKER, &[]).await;
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
    let mut mesh = Mesh::start(BREAKER, &[]).await;
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
    let mesh = Mesh::start("", &["--idle-timeout", "1s"]).await;
    let started = Instant::now();
    let r = mesh.get("backend.shop", "/slow").await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(started.elapsed() >= Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_decided_by_the_app() {
    let mesh = Mesh::start(BREAKER, &[]).await;
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
    let mesh = Mesh::start(BREAKER, &[]).await;
    // An HTTP/1.1 client, an h2c-only application.
    let r = eventually(READY_TIMEOUT, "an answer from h2only.shop", || async {
        let r = mesh.get("h2only.shop", "/").await.ok()?;
        (r.status != 503).then_some(r)
    })
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(String::from_utf8_lossy(&r.body).trim(), "HTTP/2.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_tcp_lines_carry_bytes_and_no_source_identity() {
    let mut mesh = Mesh::start(RAW_TCP, &[]).await;
    // The same application, as a service declared opaque TCP.
    let _raw = Proxy::start(
        &mesh.cp,
        ProxyOpts::new("raw", "shop", mesh.backend_app.addr.port()),
    )
    .await;
    let proxy = mesh.frontend.outbound();
    eventually(READY_TIMEOUT, "a tunnel to raw.shop", || async move {
        try_connect_tunnel(proxy, "raw.shop:9000").await.ok()
    })
    .await;
    let mut tunnel = clients::connect_tunnel(proxy, "raw.shop:9000").await;
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
        stdout_json_lines(proc).into_iter().flatten().find(|l| {
            l["protocol"] == "tcp"
                && l["direction"] == "outbound"
                && l["bytes_received"].as_u64().unwrap_or(0) > 0
        })
    })
    .await;
    assert!(line["source_identity"].is_null(), "{line}");
    assert_eq!(
        line["bytes_sent"].as_u64(),
        Some(answer.len() as u64),
        "{line}"
    );
}
