//! Connections that say nothing cannot keep the operator or a proxy out
//! (issue 13, item 6): against a real `remora-control serve` process, a flood
//! of TLS handshakes stalled after one byte does not delay `remora-control
//! status`, `token create` or a Certify call; one source cannot hold more
//! handshakes than its bound; idle HTTP connections do not keep `/metrics` or
//! `/ready` from answering, and a request head that does not arrive in time
//! closes its connection.
//!
//! The server runs as its own process (as under attack in production); the
//! flooders connect from 127.0.0.1, the operator's own address, unless a test
//! needs them told apart, in which case they come from 127.0.0.2.

mod common;

use common::*;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// How long an operator's command may take while the listener is flooded.
const PROMPT: Duration = Duration::from_secs(2);

/// A `remora-control serve` child process, killed when dropped.
struct Server {
    child: Child,
    grpc: SocketAddr,
    http: SocketAddr,
    data: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    listener.local_addr().unwrap()
}

impl Server {
    /// Starts a control plane on two free ports; a port taken meanwhile (a
    /// free port is an ephemeral one, which any outgoing connection may get
    /// first) makes it exit at once, and it starts again on others.
    async fn start(extra: &[&str]) -> Server {
        for _ in 0..5 {
            if let Some(server) = Server::try_start(extra).await {
                return server;
            }
        }
        panic!("the control plane never became ready");
    }

    async fn try_start(extra: &[&str]) -> Option<Server> {
        let data = tempfile::tempdir().unwrap();
        let (grpc, http) = (free_addr(), free_addr());
        let child = Command::new(env!("CARGO_BIN_EXE_remora-control"))
            .arg("serve")
            .args(["--listen", &grpc.to_string()])
            .args(["--http-listen", &http.to_string()])
            .arg("--data-dir")
            .arg(data.path())
            .args(extra)
            .env_remove("REMORA_LOG")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut server = Server {
            child,
            grpc,
            http,
            data,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while get(server.http, "/ready", Duration::from_secs(1))
            .await
            .is_none_or(|r| !r.starts_with("HTTP/1.1 200"))
        {
            if server.child.try_wait().ok().flatten().is_some() {
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "the control plane never became ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(server)
    }

    fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// Runs the real CLI against this server; its output and how long it took.
    async fn cli(&self, args: &[&str]) -> (Out, Duration) {
        let server = self.grpc.to_string();
        let data_dir = dir_arg(self.data_dir());
        let mut all = vec!["--server", &server, "--data-dir", &data_dir];
        all.extend_from_slice(args);
        let start = Instant::now();
        let out = run(&all, None).await;
        (out, start.elapsed())
    }

    /// A sample of `remora_control_connections_shed_total`.
    async fn shed(&self, listener: &str, reason: &str) -> f64 {
        let text = get(self.http, "/metrics", Duration::from_secs(2))
            .await
            .expect("/metrics answers");
        let name = format!(
            "remora_control_connections_shed_total{{listener=\"{listener}\",reason=\"{reason}\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(name.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} on /metrics:\n{text}"))
    }
}

/// `GET path` on a new connection within `limit`; the whole answer.
async fn get(addr: SocketAddr, path: &str, limit: Duration) -> Option<String> {
    tokio::time::timeout(limit, async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        Some(String::from_utf8_lossy(&response).into_owned())
    })
    .await
    .ok()
    .flatten()
}

/// `n` connections to `addr` from `source`, each sending `first` and then
/// nothing.
async fn flood(addr: SocketAddr, source: Ipv4Addr, n: usize, first: &[u8]) -> Vec<TcpStream> {
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((source, 0))).unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        if !first.is_empty() {
            stream.write_all(first).await.unwrap();
        }
        streams.push(stream);
    }
    streams
}

/// How many of `streams` the server has closed (EOF or reset, after
/// whatever it sent first) by now.
async fn closed_by_server(streams: &mut [TcpStream]) -> usize {
    let mut closed = 0;
    for stream in streams.iter_mut() {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_millis(5), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed += 1;
                    break;
                }
                Ok(Ok(_)) => continue,
                Err(_) => break,
            }
        }
    }
    closed
}

/// One byte of a TLS record: a handshake record's content type.
const TLS_FIRST_BYTE: &[u8] = &[0x16];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tls_handshakes_do_not_delay_the_cli_or_certify() {
    let server = Server::start(&[]).await;
    // As in the report: 300 connections that send one byte of a TLS record
    // and stop, from the operator's own address.
    let _flood = flood(server.grpc, Ipv4Addr::LOCALHOST, 300, TLS_FIRST_BYTE).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (out, took) = server.cli(&["status"]).await;
    assert_eq!(out.code, 0, "status failed: {}", out.stderr);
    assert!(out.stdout.starts_with("policy version 0"), "{}", out.stdout);
    assert!(
        took < PROMPT,
        "status took {took:?} under a flood of stalled handshakes"
    );

    let (out, took) = server
        .cli(&[
            "token",
            "create",
            "--service",
            "backend",
            "--namespace",
            "shop",
        ])
        .await;
    assert_eq!(out.code, 0, "token create failed: {}", out.stderr);
    assert!(took < PROMPT, "token create took {took:?}");

    // A proxy's first certificate (Identity), over a new connection.
    let bundle = std::fs::read_to_string(server.data_dir().join("trust-bundle.pem")).unwrap();
    let start = Instant::now();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(bundle))
        .domain_name("remora-control");
    let channel = tonic::transport::Channel::from_shared(format!("https://{}", server.grpc))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (_key, csr_pem) = csr(&[&spiffe("shop", "backend")]);
    remora_proto::v1::identity_client::IdentityClient::new(channel)
        .certify(remora_proto::v1::CertifyRequest {
            token: out.stdout.trim().to_string(),
            csr_pem,
            lifetime_seconds: 0,
        })
        .await
        .expect("a certificate");
    let took = start.elapsed();
    assert!(took < PROMPT, "Certify took {took:?}");

    // Still the case a second later, with the flood still open.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (out, took) = server.cli(&["status"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(took < PROMPT, "the second status took {took:?}");

    // The flood cost its own connections: one source holds at most 64
    // handshakes (the default), so the rest were closed to make room.
    assert!(server.shed("grpc", "evicted").await >= 200.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_holds_no_more_handshakes_than_its_bound_and_they_time_out() {
    let server = Server::start(&[
        "--max-handshakes-per-source",
        "8",
        "--handshake-timeout",
        "1s",
    ])
    .await;
    let flooder = Ipv4Addr::new(127, 0, 0, 2);
    let mut streams = flood(server.grpc, flooder, 50, TLS_FIRST_BYTE).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The oldest 42 were closed as newer ones came; the newest 8 wait.
    let (old, new) = streams.split_at_mut(42);
    assert_eq!(closed_by_server(old).await, 42);
    assert_eq!(closed_by_server(new).await, 0);
    // Another source is not affected.
    let (out, took) = server.cli(&["status"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(took < PROMPT, "status took {took:?}");
    // The last 8 run out of time.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(closed_by_server(new).await, 8);
    assert_eq!(server.shed("grpc", "evicted").await, 42.0);
    assert_eq!(server.shed("grpc", "timeout").await, 8.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http_connections_do_not_keep_metrics_or_ready_out() {
    let server = Server::start(&[]).await;
    let mut idle = flood(server.http, Ipv4Addr::LOCALHOST, 200, b"").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for path in ["/metrics", "/ready", "/metrics", "/live"] {
        let start = Instant::now();
        let answer = get(server.http, path, Duration::from_secs(1)).await;
        assert!(
            answer
                .as_deref()
                .is_some_and(|a| a.starts_with("HTTP/1.1 200")),
            "GET {path} did not answer within 1 s with 200 idle connections open: {answer:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(1));
    }
    // At most 64 connections are held (the default cap): the oldest idle
    // ones were closed for the newer ones.
    let closed = closed_by_server(&mut idle).await;
    assert!(
        closed >= 200 - 64,
        "only {closed} of 200 idle connections closed"
    );
    assert!(server.shed("http", "evicted").await >= 136.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_request_head_that_does_not_arrive_in_time_closes_its_connection() {
    let server = Server::start(&["--http-header-read-timeout", "1s"]).await;
    let mut silent = TcpStream::connect(server.http).await.unwrap();
    let mut slow = TcpStream::connect(server.http).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    // A header line every 300 ms never finishes the head in time.
    let mut slow_closed_at = None;
    let mut silent_closed_at = None;
    while start.elapsed() < Duration::from_secs(4)
        && (slow_closed_at.is_none() || silent_closed_at.is_none())
    {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if slow_closed_at.is_none() && slow.write_all(b"X-Slow: 1\r\n").await.is_err() {
            slow_closed_at = Some(start.elapsed());
        }
        if slow_closed_at.is_none() && closed_by_server(std::slice::from_mut(&mut slow)).await == 1
        {
            slow_closed_at = Some(start.elapsed());
        }
        if silent_closed_at.is_none()
            && closed_by_server(std::slice::from_mut(&mut silent)).await == 1
        {
            silent_closed_at = Some(start.elapsed());
        }
    }
    for (what, at) in [("silent", silent_closed_at), ("slow", slow_closed_at)] {
        let at = at.unwrap_or_else(|| panic!("the {what} connection was never closed"));
        assert!(
            at >= Duration::from_millis(900) && at < Duration::from_millis(2500),
            "the {what} connection was closed after {at:?}, not ~1 s"
        );
    }
    assert!(server.shed("http", "timeout").await >= 2.0);
}
