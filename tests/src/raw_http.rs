//! A raw HTTP/1.1 response reader for tests that must control the bytes on the
//! wire (keep-alive, `Expect: 100-continue`, framing attacks, limits).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The most a response head may take before the reader gives up.
const MAX_HEAD: usize = 256 * 1024;

#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Names lowercased, in wire order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether the body came with `Transfer-Encoding: chunked`.
    pub chunked: bool,
}

impl RawResponse {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// Reads one response: status line, headers and body (by `Content-Length`,
/// chunked, or until EOF). A `1xx` answer is returned as it is, without a body.
pub async fn read_response<R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<RawResponse> {
    let mut line = String::new();
    let mut head_len = 0;
    head_len += next_line(r, &mut line).await?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|_| line.starts_with("HTTP/1."))
        .ok_or_else(|| invalid(format!("not a status line: {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        head_len += next_line(r, &mut line).await?;
        if head_len > MAX_HEAD {
            return Err(invalid("response head too large".into()));
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        let (name, value) = l
            .split_once(':')
            .ok_or_else(|| invalid(format!("not a header: {l:?}")))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let mut resp = RawResponse {
        status,
        headers,
        body: Vec::new(),
        chunked: false,
    };
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(resp);
    }
    let te = resp
        .header("transfer-encoding")
        .map(str::to_ascii_lowercase);
    if te.is_some_and(|te| te.ends_with("chunked")) {
        resp.chunked = true;
        loop {
            next_line(r, &mut line).await?;
            let size = line.trim_end().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size.trim(), 16)
                .map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    next_line(r, &mut line).await?;
                    if line.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = resp.body.len();
            resp.body.resize(start + size, 0);
            r.read_exact(&mut resp.body[start..]).await?;
            next_line(r, &mut line).await?;
        }
    } else if let Some(len) = resp.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| invalid(format!("bad content-length {len:?}")))?;
        resp.body.resize(len, 0);
        r.read_exact(&mut resp.body).await?;
    } else {
        r.read_to_end(&mut resp.body).await?;
    }
    Ok(resp)
}

/// `GET path` on `addr` over a fresh connection (`Connection: close`), within 10 s.
pub async fn get(addr: SocketAddr, path: &str) -> io::Result<RawResponse> {
    let exchange = async {
        let stream = TcpStream::connect(addr).await?;
        let mut stream = BufReader::new(stream);
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.get_mut().write_all(req.as_bytes()).await?;
        read_response(&mut stream).await
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("GET {path} on {addr}")))?
}

/// Sends `request` (raw bytes) on a fresh connection and reads one response.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> io::Result<RawResponse> {
    let stream = TcpStream::connect(addr).await?;
    let mut stream = BufReader::new(stream);
    stream.get_mut().write_all(request).await?;
    tokio::time::timeout(Duration::from_secs(10), read_response(&mut stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no response within 10 s"))?
}

/// Reads one line into `line` (cleared first); EOF is an error.
async fn next_line<R: AsyncBufRead + Unpin>(r: &mut R, line: &mut String) -> io::Result<usize> {
    line.clear();
    match r.read_line(line).await? {
        0 => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed in the middle of a response",
        )),
        n => Ok(n),
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}
