//! A minimal HTTP/1.1 GET for health checks (`/ready`, `/live`): no client pool, no
//! keep-alive, just the status code of one request on a fresh connection.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `GET path` on `addr`; the answer's status code. Gives up after `timeout`.
pub async fn get_status(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<u16> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await?;
        // The status line is all we need: `HTTP/1.1 200 OK`.
        let mut buf = Vec::with_capacity(64);
        let mut chunk = [0u8; 256];
        while !buf.contains(&b'\n') {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&buf);
        line.split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "not an HTTP answer: {:?}",
                        line.lines().next().unwrap_or("")
                    ),
                )
            })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("GET {path} on {addr}")))?
}

/// Polls `GET path` until it answers 200 or `deadline` passes.
pub async fn wait_for_200(addr: SocketAddr, path: &str, deadline: Duration) -> io::Result<()> {
    let start = tokio::time::Instant::now();
    let mut last = String::from("no answer yet");
    while start.elapsed() < deadline {
        match get_status(addr, path, Duration::from_secs(1)).await {
            Ok(200) => return Ok(()),
            Ok(code) => last = format!("status {code}"),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("GET http://{addr}{path} did not answer 200 within {deadline:?} (last: {last})"),
    ))
}
