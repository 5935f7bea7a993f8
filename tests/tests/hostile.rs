//! Hostile traffic: one slow or malicious client never stalls, poisons or
//! bypasses anything for anyone else. Each test attacks the mesh as an
//! attacker would (raw sockets, no client library smoothing things over) and
//! checks what the other clients and the application see.

#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "test code: not a hot path, and its deadlines are real time"
)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use remora_tests::inproc::Mesh;
use remora_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

/// A client that reads almost nothing: a tiny receive buffer, and only the
/// first bytes of the answer are ever read.
async fn non_reading_download(proxy: SocketAddr, path: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(proxy).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: backend.shop:8080\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut first = [0u8; 12];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200", "the download started");
    s
}

/// An upload to an application that never reads it: the client writes as
/// long as anything takes its bytes.
async fn non_read_upload(proxy: SocketAddr) -> tokio::task::JoinHandle<()> {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let head =
        "POST /stall HTTP/1.1\r\nHost: backend.shop:8080\r\nContent-Length: 1073741824\r\n\r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    tokio::spawn(async move {
        let chunk = vec![b'u'; 64 * 1024];
        while s.write_all(&chunk).await.is_ok() {}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_streams_never_starve_the_others_between_two_sidecars() {
    let mesh = Mesh::start("", &[]).await;
    let outbound = mesh.frontend.outbound();

    // Ten downloads of 64 MiB nobody reads, and one upload nobody reads, all
    // on the one HTTP/2 connection between the two sidecars.
    let mut stalled = Vec::new();
    for _ in 0..10 {
        stalled.push(non_reading_download(outbound, "/big").await);
    }
    let uploader = non_read_upload(outbound).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 100 other requests through the same pair of sidecars: each answered
    // at its normal speed.
    let mut slowest = Duration::ZERO;
    for i in 0..100 {
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(5), mesh.get("backend.shop", "/"))
            .await
            .unwrap_or_else(|_| panic!("request {i} stalled behind the unread streams"))
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < Duration::from_secs(1),
        "the slowest of 100 requests took {slowest:?}"
    );
    uploader.abort();
    drop(stalled);
}

/// Sends `head` on a new connection to `addr` and reads one answer.
async fn one(addr: SocketAddr, head: &str) -> raw_http::RawResponse {
    raw_http::exchange(addr, head.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{head:?}: {e}"))
}

const ONLY_API: &str = r#"
apiVersion: remora.dev/v1
kind: AuthorizationPolicy
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  mtls: permissive
  rules:
    - from: ["*"]
      to: [{methods: [GET], paths: ["/api/*"]}]
---
apiVersion: remora.dev/v1
kind: HTTPRoute
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  rules:
    - name: api
      matches: [{path: {prefix: /api}}]
      backends: [{service: backend}]
      upgrades: []
    - name: ws
      matches: [{path: {prefix: /upgrade}}]
      backends: [{service: backend}]
    - name: rest
      backends: [{service: backend}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_never_tunnels_requests_past_authorization() {
    let mesh = Mesh::start(ONLY_API, &[]).await;
    // Through the frontend's sidecar, and straight to the backend's inbound
    // listener (plaintext, as a client outside the mesh).
    for (side, addr) in [
        ("outbound", mesh.frontend.outbound()),
        ("inbound", mesh.backend.inbound()),
    ] {
        let denied = one(
            addr,
            "GET /admin/secret HTTP/1.1\r\nHost: backend.shop:8080\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(denied.status, 403, "{side}: {denied:?}");

        // h2c: the Upgrade is removed, the request is an ordinary one, and the
        // next request on the connection is authorized like any other.
        let mut s = BufReader::new(TcpStream::connect(addr).await.unwrap());
        s.get_mut()
            .write_all(
                b"GET /api/innocent HTTP/1.1\r\nHost: backend.shop:8080\r\n\
                  Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
                  HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
            )
            .await
            .unwrap();
        let first = raw_http::read_response(&mut s).await.unwrap();
        assert_eq!(first.status, 200, "{side}: h2c is not forwarded: {first:?}");
        s.get_mut()
            .write_all(b"GET /admin/secret HTTP/1.1\r\nHost: backend.shop:8080\r\n\r\n")
            .await
            .unwrap();
        let second = raw_http::read_response(&mut s).await.unwrap();
        assert_eq!(second.status, 403, "{side}: smuggled after h2c: {second:?}");

        // A route that allows no upgrade refuses WebSocket too.
        let ws = one(
            addr,
            "GET /api/innocent HTTP/1.1\r\nHost: backend.shop:8080\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await;
        assert_eq!(ws.status, 403, "{side}: {ws:?}");
        assert_eq!(ws.header("x-remora-error"), Some("denied"), "{side}");

        // Protocols other than WebSocket are refused unless a route allows them.
        let other = one(
            addr,
            "GET /upgrade HTTP/1.1\r\nHost: backend.shop:8080\r\nConnection: Upgrade\r\n\
             Upgrade: smuggle/1\r\n\r\n",
        )
        .await;
        assert_eq!(other.status, 403, "{side}: {other:?}");
    }
}

const RATE_LIMITED: &str = r#"
apiVersion: remora.dev/v1
kind: AuthorizationPolicy
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  mtls: permissive
  rules: [{from: ["*"]}]
  rateLimit: {requestsPerSecond: 1, burst: 1}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_first_byte_is_still_http_and_still_rate_limited() {
    let mesh = Mesh::start(RATE_LIMITED, &["--detect-timeout", "500ms"]).await;
    let inbound = mesh.backend.inbound();
    // One byte, a pause longer than protocol detection waits, then ten
    // pipelined requests: they are HTTP (the port is declared so) and the
    // rate limit answers all but the first.
    let mut s = BufReader::new(TcpStream::connect(inbound).await.unwrap());
    s.get_mut().write_all(b"G").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut pipelined = String::from("ET / HTTP/1.1\r\nHost: backend.shop:8080\r\n\r\n");
    for _ in 1..10 {
        pipelined.push_str("GET / HTTP/1.1\r\nHost: backend.shop:8080\r\n\r\n");
    }
    s.get_mut().write_all(pipelined.as_bytes()).await.unwrap();
    let mut statuses = Vec::new();
    for _ in 0..10 {
        match tokio::time::timeout(Duration::from_secs(5), raw_http::read_response(&mut s)).await {
            Ok(Ok(r)) => statuses.push(r.status),
            _ => break,
        }
    }
    let passed = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        passed <= 1,
        "{passed} of 10 passed a 1 rps limit: {statuses:?}"
    );
    assert!(
        statuses.contains(&429),
        "{statuses:?}\n{}",
        mesh.backend.logs()
    );

    // Bytes that are not HTTP are refused, never relayed to the app.
    let garbage = raw_http::exchange(inbound, b"\x16\x00garbage\r\n\r\n").await;
    if let Ok(r) = garbage {
        assert!(r.status >= 400, "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_heads_are_held_to_rfc_9112() {
    let mesh = Mesh::start("", &[]).await;
    for (side, addr) in [
        ("outbound", mesh.frontend.outbound()),
        ("inbound", mesh.backend.inbound()),
    ] {
        let two_hosts = one(
            addr,
            "GET /host HTTP/1.1\r\nHost: backend.shop:8080\r\nHost: evil.example\r\n\
             Connection: close\r\n\r\n",
        )
        .await;
        assert_eq!(two_hosts.status, 400, "{side}: {two_hosts:?}");

        let no_host = one(addr, "GET /host HTTP/1.1\r\nConnection: close\r\n\r\n").await;
        assert_eq!(no_host.status, 400, "{side}: {no_host:?}");

        // Connection may not make the proxy strip the Host it routes by.
        let named = one(
            addr,
            "GET /host HTTP/1.1\r\nHost: backend.shop:8080\r\nConnection: host, close\r\n\r\n",
        )
        .await;
        assert_eq!(named.status, 200, "{side}: {named:?}");
        assert!(
            String::from_utf8_lossy(&named.body).contains("backend.shop"),
            "{side}: the app saw Host: {:?}",
            String::from_utf8_lossy(&named.body)
        );

        let long = format!(
            "GET /{} HTTP/1.1\r\nHost: backend.shop:8080\r\nConnection: close\r\n\r\n",
            "a".repeat(20_000)
        );
        let long = one(addr, &long).await;
        assert_eq!(long.status, 414, "{side}: {long:?}");

        // The absolute-form target's authority wins over Host.
        let absolute = one(
            addr,
            "GET http://backend.shop:8080/host HTTP/1.1\r\nHost: evil.example\r\n\
             Connection: close\r\n\r\n",
        )
        .await;
        assert_eq!(absolute.status, 200, "{side}: {absolute:?}");
        assert_eq!(
            String::from_utf8_lossy(&absolute.body),
            "backend.shop:8080",
            "{side}"
        );

        let not_last = one(
            addr,
            "POST /upload HTTP/1.1\r\nHost: backend.shop:8080\r\n\
             Transfer-Encoding: chunked, gzip\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
        .await;
        assert_eq!(not_last.status, 400, "{side}: {not_last:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_head_limit_is_the_same_every_time() {
    let mesh = Mesh::start("", &[]).await;
    for (n, want) in [(65_000, 200), (66_000, 502), (100_000, 502)] {
        for attempt in 0..3 {
            let r = mesh
                .get("backend.shop", &format!("/bighead?n={n}"))
                .await
                .unwrap();
            assert_eq!(
                r.status,
                want,
                "a {n}-byte response header, try {attempt}: {:?}",
                r.header("x-remora-error")
            );
        }
    }
}
