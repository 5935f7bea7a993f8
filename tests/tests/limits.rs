//! Every read has a limit: header size, header read time, HTTP/2 concurrent and
//! reset streams, protocol detection, idle connections; and HTTP/1 framing is
//! strict (no request smuggling through conflicting lengths).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use remora_tests::raw_http::{exchange, read_response};
use remora_tests::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

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
"#;

const BACKEND: &str = "http://backend.shop:8080";

/// A backend, and a frontend whose proxy runs with `limits`; requests go to the
/// frontend proxy's outbound listener.
struct Mesh {
    _cp: ControlPlane,
    backend: Sidecar,
    frontend: Sidecar,
}

async fn mesh(limits: &[&str]) -> Mesh {
    let cp = ControlPlane::start().await;
    cp.apply_ok(SHOP).await;
    let backend = Sidecar::start(&cp, "shop", "backend", "v1", Mode::Http).await;
    let app = App::start("frontend", "v1", Mode::Http).await;
    let opts = ProxyOpts::new("frontend", "shop", app.port())
        .label("version", "v1")
        .args(limits);
    let frontend = Sidecar::start_with(&cp, app, opts).await;
    let mesh = Mesh {
        _cp: cp,
        backend,
        frontend,
    };
    wait_served(&mesh.client(), &format!("{BACKEND}/"), &[], "backend/v1").await;
    mesh
}

impl Mesh {
    fn outbound(&self) -> SocketAddr {
        self.frontend.proxy.outbound()
    }

    fn client(&self) -> HttpClient {
        http1_via_proxy(self.outbound())
    }
}

/// Reads until the peer closes (EOF or reset), for at most `limit`; how long
/// that took, or `None` if the connection was still open.
async fn time_to_close(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    let closed = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // an error answer (408) may come first
            }
        }
    };
    tokio::time::timeout(limit, closed)
        .await
        .ok()
        .map(|()| start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_head_gets_431() {
    let mesh = mesh(&["--max-header-bytes", "8192"]).await;
    let request = |header_len: usize| {
        format!(
            "GET {BACKEND}/ HTTP/1.1\r\nHost: backend.shop:8080\r\nX-Big: {}\r\n\
             Connection: close\r\n\r\n",
            "a".repeat(header_len)
        )
    };
    let small = exchange(mesh.outbound(), request(2048).as_bytes())
        .await
        .unwrap();
    assert_eq!(small.status, 200, "a 2 KiB header is within the limit");
    let served = mesh.backend.app.requests_served().await;
    let big = exchange(mesh.outbound(), request(16 * 1024).as_bytes())
        .await
        .unwrap();
    assert_eq!(big.status, 431);
    assert_eq!(mesh.backend.app.requests_served().await, served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_head_is_cut_off_while_others_are_served() {
    let mesh = mesh(&["--header-read-timeout", "1s"]).await;
    let mut stalled = TcpStream::connect(mesh.outbound()).await.unwrap();
    stalled
        .write_all(b"GET http://backend.shop:80")
        .await
        .unwrap();
    let closing =
        tokio::spawn(async move { time_to_close(&mut stalled, Duration::from_secs(5)).await });
    // Meanwhile a normal request gets its answer.
    let reply = mesh.client().get(&format!("{BACKEND}/meanwhile")).await;
    assert_eq!(reply.status, StatusCode::OK);
    let closed_after = closing
        .await
        .unwrap()
        .expect("the stalled connection was still open after 5 s");
    assert!(
        closed_after >= Duration::from_millis(800) && closed_after <= Duration::from_millis(2500),
        "the stalled connection was closed after {closed_after:?}, expected about 1 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_max_concurrent_streams_is_advertised() {
    let mesh = mesh(&["--h2-max-concurrent-streams", "3"]).await;
    let tcp = TcpStream::connect(mesh.outbound()).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await.unwrap();
    // The server's SETTINGS arrive right after the handshake; one request makes
    // sure they have been read.
    let req = Request::get(format!("{BACKEND}/")).body(()).unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(REQUEST_TIMEOUT, resp)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(send.current_max_send_streams(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_flood_gets_the_connection_closed() {
    let mesh = mesh(&["--h2-max-pending-reset-streams", "5"]).await;
    let tcp = TcpStream::connect(mesh.outbound()).await.unwrap();
    let (mut send, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);

    let mut refused = None;
    for i in 0..200 {
        if let Err(e) = std::future::poll_fn(|cx| send.poll_ready(cx)).await {
            refused = Some(format!("stream {i}: {e}"));
            break;
        }
        let req = Request::get(format!("{BACKEND}/slow?ms=1000"))
            .body(())
            .unwrap();
        match send.send_request(req, false) {
            Ok((_resp, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
            Err(e) => {
                refused = Some(format!("stream {i}: {e}"));
                break;
            }
        }
    }
    // `send` stays alive: a client connection with a live handle only ends when
    // the server ends it.
    let ended = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the connection was still open 5 s after 200 reset streams (refused: {refused:?})"
            )
        })
        .unwrap();
    if let Err(e) = &ended {
        if let Some(reason) = e.reason() {
            assert!(
                reason == h2::Reason::ENHANCE_YOUR_CALM || e.is_go_away() || e.is_io(),
                "closed with {e:?}"
            );
        }
    }
    drop(send);

    // A fresh connection still works.
    let reply = h2c_via_proxy(mesh.outbound())
        .get(&format!("{BACKEND}/after"))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
}

/// How long after connecting (and sending nothing) the banner arrives.
async fn time_to_banner(addr: SocketAddr, expected: &str) -> Duration {
    let start = Instant::now();
    let stream = TcpStream::connect(addr).await.unwrap();
    banner_after(start, stream, expected).await
}

/// How long after `start` the banner arrives on `stream`.
async fn banner_after(start: Instant, stream: TcpStream, expected: &str) -> Duration {
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_line(&mut line))
        .await
        .expect("no banner within 5 s")
        .unwrap();
    let elapsed = start.elapsed();
    assert_eq!(line, expected);
    // The connection works both ways afterwards.
    stream.get_mut().write_all(b"ping\r\n").await.unwrap();
    line.clear();
    tokio::time::timeout(Duration::from_secs(5), stream.read_line(&mut line))
        .await
        .expect("no echo")
        .unwrap();
    assert_eq!(line, "ping\r\n");
    elapsed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_first_protocols_wait_for_detection_unless_declared_tcp() {
    let cp = ControlPlane::start().await;
    let undeclared = App::start("banner-raw", "v1", Mode::Banner).await;
    let declared = App::start("banner-tcp", "v1", Mode::Banner).await;
    // Only banner-tcp has a Service (declared tcp). banner-raw accepts
    // plaintext from outside the mesh, which is what the raw client below is.
    cp.apply_ok(&format!(
        r#"
apiVersion: remora.dev/v1
kind: Service
metadata: {{name: banner-tcp, namespace: shop}}
spec:
  ports: [{{port: {port}, protocol: tcp}}]
---
apiVersion: remora.dev/v1
kind: AuthorizationPolicy
metadata: {{name: banner-tcp, namespace: shop}}
spec:
  service: banner-tcp
  mtls: permissive
  rules: [{{from: ["*"]}}]
---
apiVersion: remora.dev/v1
kind: AuthorizationPolicy
metadata: {{name: banner-raw, namespace: shop}}
spec:
  service: banner-raw
  mtls: permissive
  rules: [{{from: ["*"]}}]
"#,
        port = declared.port()
    ))
    .await;
    let detect = ["--detect-timeout", "500ms"];
    let raw_proxy = Proxy::start(
        &cp,
        ProxyOpts::new("banner-raw", "shop", undeclared.port()).args(&detect),
    )
    .await;
    let tcp_proxy = Proxy::start(
        &cp,
        ProxyOpts::new("banner-tcp", "shop", declared.port()).args(&detect),
    )
    .await;

    let waited = time_to_banner(raw_proxy.inbound(), "220 banner-raw/v1 ready\r\n").await;
    assert!(
        waited >= Duration::from_millis(400) && waited <= Duration::from_secs(3),
        "an undeclared protocol's banner came after {waited:?}, expected about the 500 ms \
         detect timeout"
    );
    // Through the mesh: a client's sidecar tunnels to the declared-tcp service
    // over mTLS. The peer proxy sees the TLS ClientHello at once and protocol
    // detection is skipped, so the server-first banner is not held up.
    let client_app = App::start("client", "v1", Mode::Http).await;
    let client = Proxy::start(
        &cp,
        ProxyOpts::new("client", "shop", client_app.port()).args(&detect),
    )
    .await;
    let start = Instant::now();
    let tunnel = connect_tunnel(
        client.outbound(),
        &format!("banner-tcp.shop:{}", declared.port()),
    )
    .await;
    let waited = banner_after(start, tunnel, "220 banner-tcp/v1 ready\r\n").await;
    assert!(
        waited < Duration::from_millis(300),
        "a declared tcp service's banner came after {waited:?}: detection was not skipped"
    );
    drop(tcp_proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_connection_is_closed() {
    let mesh = mesh(&["--idle-timeout", "1s"]).await;
    let mut conn = BufReader::new(TcpStream::connect(mesh.outbound()).await.unwrap());
    let req = format!("GET {BACKEND}/ HTTP/1.1\r\nHost: backend.shop:8080\r\n\r\n");
    conn.get_mut().write_all(req.as_bytes()).await.unwrap();
    let resp = read_response(&mut conn).await.unwrap();
    assert_eq!(resp.status, 200);
    let idle = time_to_close(conn.get_mut(), Duration::from_secs(5))
        .await
        .expect("the idle connection was still open after 5 s");
    assert!(
        idle >= Duration::from_millis(800) && idle <= Duration::from_secs(3),
        "the idle connection was closed after {idle:?}, expected about 1 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_body_lengths_cannot_smuggle_a_request() {
    // hyper's HTTP/1 parser resolves Content-Length + Transfer-Encoding the way
    // RFC 9112 §6.3 tells an intermediary to: Transfer-Encoding wins, the
    // Content-Length is dropped before forwarding, and the connection is
    // closed after the response. So the bytes after the chunked body are never
    // read as a second request. (The conflict is invisible after parsing, so
    // the proxy cannot answer it with 400; see the README's limits table.)
    let mesh = mesh(&[]).await;
    for (order, head) in [
        (
            "CL first",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        ),
        (
            "TE first",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        ),
    ] {
        let served = mesh.backend.app.requests_served().await;
        let both = format!(
            "POST {BACKEND}/echo HTTP/1.1\r\nHost: backend.shop:8080\r\n{head}\r\n\
             0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: backend.shop:8080\r\n\r\n"
        );
        let mut s = tokio::net::TcpStream::connect(mesh.outbound())
            .await
            .unwrap();
        s.write_all(both.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .unwrap_or_else(|_| panic!("{order}: the proxy kept the connection open"))
            .unwrap();
        let text = String::from_utf8_lossy(&out);
        assert_eq!(
            text.matches("HTTP/1.1 ").count(),
            1,
            "{order}: exactly one response, for the chunked POST: {text}"
        );
        assert!(text.starts_with("HTTP/1.1 200"), "{order}: {text}");
        assert_eq!(
            mesh.backend.app.requests_served().await,
            served + 1,
            "{order}: the smuggled request must not reach the app"
        );
    }

    let two = format!(
        "POST {BACKEND}/echo HTTP/1.1\r\nHost: backend.shop:8080\r\nContent-Length: 5\r\n\
         Content-Length: 6\r\n\r\nhello!"
    );
    let served = mesh.backend.app.requests_served().await;
    let resp = exchange(mesh.outbound(), two.as_bytes()).await.unwrap();
    assert_eq!(resp.status, 400, "two different Content-Length values");
    assert_eq!(
        mesh.backend.app.requests_served().await,
        served,
        "a malformed request reached the app"
    );
    // The proxy still serves well-formed requests.
    let reply = mesh
        .client()
        .send(
            Request::post(format!("{BACKEND}/echo"))
                .body(full(Bytes::from_static(b"hello")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(&reply.body[..], b"hello");
}
