//! The sidecar's own listeners hold out against connections that say nothing
//! (issue 13, item 6): with 200 idle connections open to the health port,
//! `/ready` and `/metrics` answer at once and the proxy keeps at most 64 of
//! them (the oldest idle ones are closed for newer ones); the admin port
//! (127.0.0.1) keeps at most 16 and `/config_dump` still answers; a
//! connection that sends no complete request head is closed after 5 s.

#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "test code: not a hot path, and its deadlines are real time"
)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use remora_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `GET path` on a new connection within `limit`: the status line.
async fn get_within(addr: SocketAddr, path: &str, limit: Duration) -> Option<String> {
    tokio::time::timeout(limit, async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response).into_owned();
        text.lines().next().map(str::to_owned)
    })
    .await
    .ok()
    .flatten()
}

async fn idle_connections(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        streams.push(TcpStream::connect(addr).await.expect("connect"));
    }
    streams
}

/// Whether the server has closed `stream` (EOF or reset, after anything it
/// sent first).
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_millis(5), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

async fn count_closed(streams: &mut [TcpStream]) -> usize {
    let mut n = 0;
    for stream in streams {
        if closed_by_server(stream).await {
            n += 1;
        }
    }
    n
}

async fn proxy() -> (ControlPlane, App, Proxy) {
    let cp = ControlPlane::start().await;
    let app = App::start("backend", "v1", Mode::Http).await;
    let proxy = Proxy::start(&cp, ProxyOpts::new("backend", "shop", app.port())).await;
    (cp, app, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_keep_probes_out_of_the_health_and_admin_ports() {
    let (_cp, _app, proxy) = proxy().await;

    let mut health_idle = idle_connections(proxy.health(), 200).await;
    let mut admin_idle = idle_connections(proxy.admin(), 100).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    for (addr, path) in [
        (proxy.health(), "/ready"),
        (proxy.health(), "/metrics"),
        (proxy.health(), "/live"),
        (proxy.admin(), "/config_dump"),
    ] {
        let start = Instant::now();
        let status = get_within(addr, path, Duration::from_secs(1)).await;
        assert_eq!(
            status.as_deref(),
            Some("HTTP/1.1 200 OK"),
            "GET {path} with idle connections open\n{}",
            proxy.logs()
        );
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    // Capped: the oldest idle connections were closed for the newer ones.
    let closed = count_closed(&mut health_idle).await;
    assert!(
        closed >= 200 - 64,
        "the health port holds {} of 200 idle connections (cap 64)",
        200 - closed
    );
    assert!(
        !closed_by_server(health_idle.last_mut().expect("200")).await,
        "the newest idle connection was closed, not the oldest"
    );
    let closed = count_closed(&mut admin_idle).await;
    assert!(
        closed >= 100 - 16,
        "the admin port holds {} of 100 idle connections (cap 16)",
        100 - closed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_that_never_completes_is_closed_after_five_seconds() {
    let (_cp, _app, proxy) = proxy().await;
    let mut silent = TcpStream::connect(proxy.health()).await.unwrap();
    let mut partial = TcpStream::connect(proxy.health()).await.unwrap();
    partial
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let mut closed_at = [None, None];
    while start.elapsed() < Duration::from_secs(9) && closed_at.iter().any(Option::is_none) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (i, stream) in [&mut silent, &mut partial].into_iter().enumerate() {
            if closed_at[i].is_none() && closed_by_server(stream).await {
                closed_at[i] = Some(start.elapsed());
            }
        }
    }
    for (what, at) in ["silent", "partial-head"].into_iter().zip(closed_at) {
        let at = at.unwrap_or_else(|| panic!("the {what} connection was never closed"));
        assert!(
            at >= Duration::from_millis(4500) && at < Duration::from_millis(7000),
            "the {what} connection was closed after {at:?}, not ~5 s"
        );
    }
    // The port still answers.
    assert_eq!(
        get_within(proxy.health(), "/ready", Duration::from_secs(1))
            .await
            .as_deref(),
        Some("HTTP/1.1 200 OK")
    );
}
