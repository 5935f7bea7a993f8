//! HTTP/1 heads between a client and the application, fuzzed through real
//! sidecars: requests generated from a grammar with hostile variations
//! (header bytes, duplicated or odd Content-Length, Transfer-Encoding
//! variants, chunk sizes, obs-fold, bare LF and CR, NULs, long lines,
//! pipelining, bodies that carry a second request) go to the application's
//! sidecar directly (inbound, plaintext) or through a client sidecar
//! (outbound, then mTLS and HTTP/2 between the two). The application is a raw
//! TCP server of this file that records every byte it receives.
//!
//! What must hold, for every generated connection:
//! - the proxies never crash: both still run and still answer afterwards;
//! - every answer the client gets is a well-formed HTTP/1 response (status
//!   line, fields, framing), in the order of the requests, or the
//!   connection closes;
//! - everything that reaches the application is a well-framed request
//!   (strict RFC 9112: CRLF, no obs-fold, no control bytes, one Host, one
//!   Content-Length or chunked last, valid chunks), and each is a request
//!   the client sent as a separate, well-framed one: never a request carried
//!   in another's body (smuggled), never one after a request whose framing
//!   was ambiguous or invalid, never one the client did not send, and with
//!   the body the client sent.
//!
//! Bounded: 200 generated connections per run (`REMORA_FUZZ_CASES`
//! overrides), well under 30 s.

#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "test code: not a hot path, and its deadlines are real time"
)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use remora_tests::{ControlPlane, Proxy, ProxyOpts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SERVICES: &str = r#"
apiVersion: remora.dev/v1
kind: Service
metadata: {name: rawapp, namespace: fuzz}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: remora.dev/v1
kind: Service
metadata: {name: client, namespace: fuzz}
spec:
  ports: [{port: 8080, protocol: http}]
"#;

/// How the client names the application through its sidecar.
const AUTHORITY: &str = "rawapp.fuzz:8080";
/// How long a client waits for more bytes once the answers it expects
/// stopped coming.
const QUIET: Duration = Duration::from_millis(300);
/// A head larger than any the proxies accept (64 KiB) is not valid anyway.
const MAX_HEAD: usize = 256 * 1024;

// ------------------------------------------------------------------ strict HTTP/1 reading

/// What reading a message from a connection can end in.
#[derive(Debug)]
enum Fail {
    /// Closed cleanly between messages.
    Eof,
    /// Closed inside a message.
    Truncated,
    /// Nothing came within the wait.
    Quiet,
    /// Not well-formed: what is wrong.
    Bad(String),
}

/// A connection read strictly, keeping every byte for reports.
struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    seen: Vec<u8>,
    /// How long one read may wait (None: forever).
    wait: Option<Duration>,
}

impl Wire {
    fn new(stream: TcpStream, wait: Option<Duration>) -> Wire {
        Wire {
            stream,
            buf: Vec::new(),
            pos: 0,
            seen: Vec::new(),
            wait,
        }
    }

    /// Reads more; false at EOF.
    async fn fill(&mut self) -> Result<bool, Fail> {
        let mut chunk = [0u8; 16 * 1024];
        let read = self.stream.read(&mut chunk);
        let n = match self.wait {
            Some(w) => match tokio::time::timeout(w, read).await {
                Ok(r) => r,
                Err(_) => return Err(Fail::Quiet),
            },
            None => read.await,
        };
        match n {
            Ok(0) | Err(_) => Ok(false),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                self.seen.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
        }
    }

    fn rest(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn at_eof_error(&self, start: usize) -> Fail {
        if self.buf.len() == start {
            Fail::Eof
        } else {
            Fail::Truncated
        }
    }

    /// The next head, up to and including its empty line; CRLF only.
    async fn head(&mut self) -> Result<Vec<u8>, Fail> {
        let start = self.pos;
        loop {
            if let Some(i) = find(self.rest(), b"\r\n\r\n") {
                let head = self.rest()[..i + 4].to_vec();
                self.pos += i + 4;
                return Ok(head);
            }
            if self.rest().len() > MAX_HEAD {
                return Err(Fail::Bad("a head of more than 256 KiB".into()));
            }
            if !self.fill().await? {
                return Err(self.at_eof_error(start));
            }
        }
    }

    async fn exact(&mut self, n: usize) -> Result<Vec<u8>, Fail> {
        while self.rest().len() < n {
            if !self.fill().await? {
                return Err(Fail::Truncated);
            }
        }
        let out = self.rest()[..n].to_vec();
        self.pos += n;
        Ok(out)
    }

    /// One line ending in CRLF, without it.
    async fn line(&mut self) -> Result<Vec<u8>, Fail> {
        loop {
            if let Some(i) = find(self.rest(), b"\r\n") {
                let line = self.rest()[..i].to_vec();
                self.pos += i + 2;
                if line.contains(&b'\n') || line.contains(&b'\r') {
                    return Err(Fail::Bad(format!("a bare CR or LF in {:?}", esc(&line))));
                }
                return Ok(line);
            }
            if self.rest().len() > 64 * 1024 {
                return Err(Fail::Bad("a line of more than 64 KiB".into()));
            }
            if !self.fill().await? {
                return Err(Fail::Truncated);
            }
        }
    }

    async fn rest_until_eof(&mut self) -> Vec<u8> {
        while let Ok(true) = self.fill().await {}
        let out = self.rest().to_vec();
        self.pos = self.buf.len();
        out
    }

    /// A body as `framing` says.
    async fn body(&mut self, framing: Framing) -> Result<Vec<u8>, Fail> {
        match framing {
            Framing::None => Ok(Vec::new()),
            Framing::Length(n) => self.exact(n).await,
            Framing::Close => Ok(self.rest_until_eof().await),
            Framing::Chunked => {
                let mut body = Vec::new();
                loop {
                    let line = self.line().await?;
                    let size = chunk_size(&line)
                        .ok_or_else(|| Fail::Bad(format!("chunk size {:?}", esc(&line))))?;
                    if size == 0 {
                        // Trailer fields, up to the empty line.
                        loop {
                            let t = self.line().await?;
                            if t.is_empty() {
                                return Ok(body);
                            }
                            field(&t).map_err(Fail::Bad)?;
                        }
                    }
                    body.extend(self.exact(size).await?);
                    if self.exact(2).await? != b"\r\n" {
                        return Err(Fail::Bad("chunk data not followed by CRLF".into()));
                    }
                }
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Bytes as a readable string for reports, cut to `max`.
fn esc(b: &[u8]) -> String {
    let s: String = b.escape_ascii().to_string();
    if s.len() > 600 {
        format!("{}…({} bytes)", &s[..600], b.len())
    } else {
        s
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A strict field line: token, colon, value of VCHAR/obs-text/SP/HTAB.
fn field(line: &[u8]) -> Result<(String, Vec<u8>), String> {
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| format!("a field without a colon: {:?}", esc(line)))?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(format!("a field name that is not a token: {:?}", esc(line)));
    }
    if !value
        .iter()
        .all(|&b| b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80)
    {
        return Err(format!("a control byte in a field value: {:?}", esc(line)));
    }
    let value = value
        .iter()
        .copied()
        .skip_while(|b| *b == b' ' || *b == b'\t')
        .collect::<Vec<u8>>();
    let end = value
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(0, |i| i + 1);
    Ok((
        String::from_utf8_lossy(name).to_ascii_lowercase(),
        value[..end].to_vec(),
    ))
}

/// `1*HEXDIG [ BWS ; ext ]`, at most 15 digits.
fn chunk_size(line: &[u8]) -> Option<usize> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return None;
    }
    let rest = &line[digits..];
    let rest_trim: Vec<u8> = rest
        .iter()
        .copied()
        .skip_while(|b| *b == b' ' || *b == b'\t')
        .collect();
    if !(rest.is_empty() || rest_trim.first() == Some(&b';')) {
        return None;
    }
    if rest.iter().any(|&b| b < 0x20 && b != b'\t' || b == 0x7f) {
        return None;
    }
    usize::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    None,
    Length(usize),
    Chunked,
    /// Until the connection closes (responses only).
    Close,
}

/// A parsed head: start line and fields (names lowercased).
struct Head {
    start: Vec<u8>,
    fields: Vec<(String, Vec<u8>)>,
}

impl Head {
    /// Parses `raw` (ending in the empty line) strictly, with httparse's
    /// agreement as a second opinion.
    fn parse(raw: &[u8], request: bool) -> Result<Head, String> {
        // `raw` ends in CRLF CRLF: the last line's CRLF and the empty line.
        let text = &raw[..raw.len() - 2];
        let mut lines = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let Some(i) = find(rest, b"\r\n") else {
                return Err(format!("a line not ended by CRLF: {:?}", esc(raw)));
            };
            let line = &rest[..i];
            if line.contains(&b'\n') {
                return Err(format!("a bare LF in the head: {:?}", esc(raw)));
            }
            if line.contains(&b'\r') {
                return Err(format!("a bare CR in the head: {:?}", esc(raw)));
            }
            lines.push(line);
            rest = &rest[i + 2..];
        }
        let Some((start, field_lines)) = lines.split_first() else {
            return Err("an empty head".into());
        };
        let mut fields = Vec::new();
        for line in field_lines {
            if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
                return Err(format!("obs-fold in the head: {:?}", esc(raw)));
            }
            fields.push(field(line)?);
        }
        let start = start.to_vec();
        // httparse must agree that this is one complete head.
        let mut headers = vec![httparse::EMPTY_HEADER; fields.len() + 1];
        let status = if request {
            httparse::Request::new(&mut headers).parse(raw)
        } else {
            httparse::Response::new(&mut headers).parse(raw)
        };
        match status {
            Ok(httparse::Status::Complete(n)) if n == raw.len() => {}
            other => return Err(format!("httparse disagrees ({other:?}): {:?}", esc(raw))),
        }
        Ok(Head { start, fields })
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.fields
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The comma-separated elements of every `name` field, lowercased.
    fn list(&self, name: &str) -> Vec<String> {
        self.all(name)
            .flat_map(|v| v.split(|&b| b == b','))
            .map(|e| String::from_utf8_lossy(e).trim().to_ascii_lowercase())
            .filter(|e| !e.is_empty())
            .collect()
    }

    /// The framing a strict recipient reads, or why there is none.
    fn framing(&self, request: bool) -> Result<Framing, String> {
        let te = self.list("transfer-encoding");
        let cl: Vec<&[u8]> = self.all("content-length").collect();
        if !te.is_empty() {
            if !cl.is_empty() {
                return Err("both Transfer-Encoding and Content-Length".into());
            }
            if te.last().map(String::as_str) != Some("chunked") {
                return Err(format!("Transfer-Encoding {te:?}: chunked is not last"));
            }
            if te.iter().filter(|t| *t == "chunked").count() > 1 {
                return Err(format!("Transfer-Encoding {te:?}: chunked twice"));
            }
            return Ok(Framing::Chunked);
        }
        match cl.as_slice() {
            [] if request => Ok(Framing::None),
            [] => Ok(Framing::Close),
            [one] if !one.is_empty() && one.iter().all(u8::is_ascii_digit) && one.len() < 16 => {
                Ok(Framing::Length(
                    String::from_utf8_lossy(one)
                        .parse()
                        .map_err(|_| "content-length")?,
                ))
            }
            more => Err(format!(
                "Content-Length {:?}",
                more.iter().map(|v| esc(v)).collect::<Vec<_>>()
            )),
        }
    }
}

// ------------------------------------------------------------------ the application

#[derive(Debug, Clone)]
enum AppEvent {
    /// A request the application read; `complete` unless its body was cut.
    Request {
        conn: u64,
        method: String,
        target: String,
        body: Vec<u8>,
        complete: bool,
    },
    /// Something not well-formed reached the application.
    Violation {
        conn: u64,
        what: String,
        raw: Vec<u8>,
    },
}

/// A raw TCP application: reads requests strictly, answers each with 200 and
/// the target it saw, records everything.
struct App {
    addr: SocketAddr,
    events: Arc<Mutex<Vec<AppEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    async fn start() -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let addr = listener.local_addr().expect("its address");
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = events.clone();
        let task = tokio::spawn(async move {
            let ids = AtomicU64::new(0);
            while let Ok((stream, _)) = listener.accept().await {
                let conn = ids.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve_app(Wire::new(stream, None), conn, log.clone()));
            }
        });
        App { addr, events, task }
    }

    fn drain(&self) -> Vec<AppEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

async fn serve_app(mut w: Wire, conn: u64, log: Arc<Mutex<Vec<AppEvent>>>) {
    let record = |e: AppEvent| log.lock().unwrap_or_else(|e| e.into_inner()).push(e);
    let violation = |what: String, w: &Wire| AppEvent::Violation {
        conn,
        what,
        raw: w.seen.clone(),
    };
    loop {
        let raw = match w.head().await {
            Ok(h) => h,
            Err(Fail::Eof) => return,
            Err(Fail::Truncated) => {
                record(violation("the connection closed inside a head".into(), &w));
                return;
            }
            Err(Fail::Bad(m)) => {
                record(violation(m, &w));
                return;
            }
            Err(Fail::Quiet) => return,
        };
        let head = match Head::parse(&raw, true) {
            Ok(h) => h,
            Err(m) => {
                record(violation(m, &w));
                return;
            }
        };
        let start = String::from_utf8_lossy(&head.start).into_owned();
        let parts: Vec<&str> = start.split(' ').collect();
        let [method, target, version] = parts[..] else {
            record(violation(format!("request line {start:?}"), &w));
            return;
        };
        if !method.bytes().all(is_tchar)
            || method.is_empty()
            || !(version == "HTTP/1.1" || version == "HTTP/1.0")
            || target.is_empty()
            || !target.bytes().all(|b| (0x21..=0x7e).contains(&b))
        {
            record(violation(format!("request line {start:?}"), &w));
            return;
        }
        let hosts = head.all("host").count();
        if hosts != 1 {
            record(violation(format!("{hosts} Host fields"), &w));
            return;
        }
        let framing = match head.framing(true) {
            Ok(f) => f,
            Err(m) => {
                record(violation(m, &w));
                return;
            }
        };
        if head.list("expect").iter().any(|e| e == "100-continue") {
            let _ = w.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
        }
        let (body, complete) = match w.body(framing).await {
            Ok(b) => (b, true),
            Err(Fail::Bad(m)) => {
                record(violation(format!("{m} in the body of {start:?}"), &w));
                return;
            }
            Err(_) => (Vec::new(), false),
        };
        record(AppEvent::Request {
            conn,
            method: method.to_owned(),
            target: target.to_owned(),
            body,
            complete,
        });
        if !complete {
            return;
        }
        let text = format!("{method} {target}\n");
        let answer = format!(
            "HTTP/1.1 200 OK\r\nx-fuzz-target: {target}\r\ncontent-length: {}\r\n\r\n{}",
            text.len(),
            if method == "HEAD" { "" } else { &text }
        );
        if w.stream.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        let close = head.list("connection").iter().any(|c| c == "close")
            || (version == "HTTP/1.0"
                && !head.list("connection").iter().any(|c| c == "keep-alive"));
        if close {
            return;
        }
    }
}

// ------------------------------------------------------------------ the reference reading of what the client sent

/// What a strict server makes of one message the client sent.
#[derive(Debug, Clone)]
struct RefMsg {
    method: String,
    target: String,
    /// The body, when its framing is unambiguous and complete.
    body: Option<Vec<u8>>,
    /// Why nothing after this message may reach the application (its own
    /// framing is invalid, ambiguous or cut short, or it closes the
    /// connection); None: the next message may follow.
    last: Option<String>,
    /// Whether the server answers it (false: cut short, nothing to answer).
    answered: bool,
}

/// Reads the client's bytes as RFC 9112 says a server must, accepting only
/// the leniencies that cannot move a message's end (a bare LF ending a
/// line, empty lines before a request, equal repeated Content-Lengths,
/// spaces before a chunk extension). The messages that may reach the
/// application are these, up to the first whose `last` is set.
fn reference(bytes: &[u8]) -> Vec<RefMsg> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        while bytes[pos..].starts_with(b"\r\n") || bytes[pos..].starts_with(b"\n") {
            pos += if bytes[pos] == b'\r' { 2 } else { 1 };
        }
        if pos >= bytes.len() {
            return out;
        }
        let (msg, next) = reference_one(&bytes[pos..]);
        let stop = msg.last.is_some();
        out.push(msg);
        match next {
            Some(n) if !stop => pos += n,
            _ => return out,
        }
    }
}

/// Lines ending in LF (a CR before it dropped); None when no LF ends it.
fn split_line(b: &[u8]) -> Option<(&[u8], usize)> {
    let i = b.iter().position(|&c| c == b'\n')?;
    let line = b[..i].strip_suffix(b"\r").unwrap_or(&b[..i]);
    Some((line, i + 1))
}

fn reference_one(b: &[u8]) -> (RefMsg, Option<usize>) {
    let mut msg = RefMsg {
        method: String::new(),
        target: String::new(),
        body: None,
        last: None,
        answered: true,
    };
    let stop = |mut m: RefMsg, why: &str| {
        m.last = Some(why.to_owned());
        (m, None)
    };
    let Some((start, mut pos)) = split_line(b) else {
        msg.answered = false;
        // Even a cut request line says which message it would have been.
        let line = String::from_utf8_lossy(b);
        let mut parts = line.split(' ');
        msg.method = parts.next().unwrap_or_default().to_owned();
        msg.target = parts.next().unwrap_or_default().to_owned();
        return stop(msg, "the request line is cut short");
    };
    let start_s = String::from_utf8_lossy(start).into_owned();
    let parts: Vec<&str> = start_s.split(' ').collect();
    if let [m, t, ..] = parts[..] {
        msg.method = m.to_owned();
        msg.target = t.to_owned();
    }
    let [method, target, version] = parts[..] else {
        return stop(msg, "not three parts in the request line");
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return stop(msg, "the method is not a token");
    }
    if method == "CONNECT" {
        return stop(msg, "CONNECT opens a tunnel");
    }
    if target.is_empty() || !target.bytes().all(|c| (0x21..=0x7e).contains(&c)) {
        return stop(msg, "the target has bytes a target may not");
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return stop(msg, "not HTTP/1.0 or 1.1");
    }
    if start.contains(&b'\r') {
        return stop(msg, "a bare CR in the request line");
    }
    let mut fields = Vec::new();
    loop {
        let Some((line, n)) = split_line(&b[pos..]) else {
            msg.answered = false;
            return stop(msg, "the head is cut short");
        };
        pos += n;
        if line.is_empty() {
            break;
        }
        if line.first().is_some_and(|c| *c == b' ' || *c == b'\t') {
            return stop(msg, "obs-fold");
        }
        if line.contains(&b'\r') {
            return stop(msg, "a bare CR in a field");
        }
        match field(line) {
            Ok(f) => fields.push(f),
            Err(_) => return stop(msg, "a field that is not name: value"),
        }
        if pos > 64 * 1024 {
            return stop(msg, "a head over the proxies' limit");
        }
    }
    let head = Head {
        start: start.to_vec(),
        fields,
    };
    let hosts = head.all("host").count();
    if hosts > 1 || (hosts == 0 && version == "HTTP/1.1") {
        return stop(msg, "not exactly one Host");
    }
    // `Connection` naming Host or a framing field: the proxy may refuse the
    // message or ignore the option; the message's own framing stands either
    // way, and so does the next message.
    let connection = head.list("connection");
    let te = head.list("transfer-encoding");
    let cls: Vec<String> = head.list("content-length");
    let framing = if !te.is_empty() {
        if version == "HTTP/1.0" {
            return stop(msg, "Transfer-Encoding in HTTP/1.0");
        }
        // Chunked applied twice is the sender's error (RFC 9112 6.1), but
        // the final coding still frames the message: decoded once.
        if te.last().map(String::as_str) != Some("chunked") {
            return stop(msg, "Transfer-Encoding without chunked last");
        }
        if !cls.is_empty() || head.all("content-length").next().is_some() {
            // RFC 9112 6.3: Transfer-Encoding wins, and the connection closes after.
            msg.last = Some("both Transfer-Encoding and Content-Length".into());
        }
        Framing::Chunked
    } else if head.all("content-length").next().is_some() {
        let ok = !cls.is_empty()
            && cls
                .iter()
                .all(|c| c.bytes().all(|d| d.is_ascii_digit()) && c.len() < 16)
            && cls
                .iter()
                .all(|c| c.parse::<u64>().ok() == cls[0].parse::<u64>().ok())
            && head
                .all("content-length")
                .all(|v| v.split(|&c| c == b',').all(|e| !e.trim_ascii().is_empty()));
        if !ok {
            return stop(msg, "an invalid or conflicting Content-Length");
        }
        Framing::Length(cls[0].parse().unwrap_or(usize::MAX))
    } else {
        Framing::None
    };
    let rest = &b[pos..];
    let (body, used) = match framing {
        Framing::None | Framing::Close => (Vec::new(), 0),
        Framing::Length(n) => {
            if rest.len() < n {
                msg.answered = false;
                return stop(msg, "the body is cut short");
            }
            (rest[..n].to_vec(), n)
        }
        Framing::Chunked => match dechunk(rest) {
            Ok(v) => v,
            Err((why, answered)) => {
                msg.answered = answered;
                return stop(msg, why);
            }
        },
    };
    msg.body = Some(body);
    if connection.iter().any(|c| c == "close")
        || (version == "HTTP/1.0" && !connection.iter().any(|c| c == "keep-alive"))
    {
        msg.last
            .get_or_insert_with(|| "the connection closes after it".into());
    }
    if msg.last.is_some() {
        (msg, None)
    } else {
        (msg, Some(pos + used))
    }
}

/// A chunked body: (payload, bytes used), or why not and whether a server
/// would still answer (false: cut short).
fn dechunk(b: &[u8]) -> Result<(Vec<u8>, usize), (&'static str, bool)> {
    let mut pos = 0;
    let mut body = Vec::new();
    loop {
        let (line, n) = split_line(&b[pos..]).ok_or(("a chunk size line is cut short", false))?;
        if line.contains(&b'\r') {
            return Err(("a bare CR in a chunk size line", true));
        }
        let size = chunk_size(line).ok_or(("an invalid chunk size", true))?;
        pos += n;
        if size == 0 {
            loop {
                let (t, n) = split_line(&b[pos..]).ok_or(("the trailers are cut short", false))?;
                pos += n;
                if t.is_empty() {
                    return Ok((body, pos));
                }
                if t.contains(&b'\r') || field(t).is_err() {
                    return Err(("an invalid trailer field", true));
                }
            }
        }
        if b.len() < pos + size {
            return Err(("chunk data is cut short", false));
        }
        body.extend_from_slice(&b[pos..pos + size]);
        pos += size;
        match &b[pos..] {
            [b'\r', b'\n', ..] => pos += 2,
            [b'\n', ..] => pos += 1,
            [] | [b'\r'] => return Err(("chunk data is cut short", false)),
            _ => return Err(("chunk data not followed by CRLF", true)),
        }
    }
}

// ------------------------------------------------------------------ the grammar

#[derive(Debug, Clone)]
enum Line {
    Host,
    /// A Host naming something else (or nothing).
    HostOther(String),
    /// Content-Length: the payload's length written as `style` says, off by `delta`.
    Cl(u8, i64),
    Te(String),
    Connection(String),
    Expect,
    Upgrade(String),
    /// `x-long: aaaa...` of this many bytes.
    Long(usize),
    /// A name and value of any bytes, and how they are joined.
    Raw(Vec<u8>, Vec<u8>, u8),
    /// A continuation line (obs-fold) after the previous field.
    Fold(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Chunking {
    /// Where the payload is cut into chunks.
    cuts: Vec<prop::sample::Index>,
    /// How sizes are written: 0 lower, 1 upper, 2 leading zeros, 3 with an
    /// extension, 4 with spaces before an extension, 5 a bad size.
    style: u8,
    bad: String,
    trailer: Option<Vec<u8>>,
    /// Drop the last chunk (the body never ends).
    unterminated: bool,
}

#[derive(Debug, Clone)]
struct Msg {
    method: String,
    absolute: bool,
    suffix: String,
    version: String,
    /// 0 CRLF, 1 bare LF everywhere, 2 bare LF after the request line
    /// only, 3 a bare CR somewhere.
    eol: u8,
    lines: Vec<Line>,
    payload: Vec<u8>,
    /// Append a whole request to the payload (a body that carries one).
    smuggle: bool,
    chunked: Option<Chunking>,
    /// Bytes after the message, before the next.
    junk: Vec<u8>,
}

#[derive(Debug, Clone)]
struct Case {
    inbound: bool,
    msgs: Vec<Msg>,
    /// The client writes its bytes in two parts, pausing at this point.
    split: Option<prop::sample::Index>,
}

fn bytes_with(hostile: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    vec(
        prop_oneof![
            6 => 0x21u8..0x7f,
            1 => prop::sample::select(hostile),
            1 => any::<u8>(),
        ],
        0..16,
    )
}

fn line() -> impl Strategy<Value = Line> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "chunked", "Chunked", "CHUNKED", " chunked", "chunked ", "gzip, chunked",
            "chunked, gzip", "identity", "chunked, chunked", "xchunked", "chunked;q=1",
            "\tchunked", "chunk", "identity, chunked", ", chunked", "chunked,", "\u{b}chunked",
        ]).prop_map(|t| Line::Te(t.to_owned())),
        3 => (0u8..10, prop_oneof![8 => Just(0i64), 1 => -3i64..3, 1 => Just(1_000_000)])
            .prop_map(|(s, d)| Line::Cl(s, d)),
        2 => prop::sample::select(vec![
            "close", "keep-alive", "content-length", "transfer-encoding", "host", "upgrade",
            "close, content-length", "te", "x-anything",
        ]).prop_map(|c| Line::Connection(c.to_owned())),
        1 => Just(Line::Host),
        1 => prop::sample::select(vec!["", "evil.example", "rawapp.fuzz:8080", "a b", "rawapp.fuzz:8080, x"])
            .prop_map(|h| Line::HostOther(h.to_owned())),
        1 => Just(Line::Expect),
        1 => prop::sample::select(vec!["h2c", "websocket", "smuggle/1"])
            .prop_map(|u| Line::Upgrade(u.to_owned())),
        // The proxies refuse a head once hyper's buffer holds 64 KiB without
        // its end; a head a little over that may still be read whole in one
        // go (the buffer's last read can take it to twice the limit), so the
        // long one is well past both: refused whatever the timing.
        1 => prop::sample::select(vec![100usize, 8_000, 200_000]).prop_map(Line::Long),
        3 => (
            prop_oneof![3 => "[A-Za-z0-9-]{1,12}".prop_map(String::into_bytes),
                        1 => bytes_with(b" :\0\x7f\x80\xff\"(),/;=@[]{}")],
            bytes_with(b"\0\r\n\t \x7f\x80\xff\x0b\x0c"),
            0u8..4,
        ).prop_map(|(n, v, j)| Line::Raw(n, v, j)),
        1 => bytes_with(b"\t ").prop_map(Line::Fold),
    ]
}

fn msg() -> impl Strategy<Value = Msg> {
    let method = prop_oneof![
        20 => prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"])
            .prop_map(str::to_owned),
        1 => prop::sample::select(vec!["get", "G\0T", "GET\t", "P OST", "", "PROPFIND", "TRACE"])
            .prop_map(str::to_owned),
    ];
    let version = prop_oneof![
        20 => Just("HTTP/1.1".to_owned()),
        3 => Just("HTTP/1.0".to_owned()),
        1 => prop::sample::select(vec!["HTTP/1.2", "HTTP/2.0", "http/1.1", "HTTP/1.1 ", "HTTP/11"])
            .prop_map(str::to_owned),
    ];
    let suffix = prop_oneof![
        8 => Just(String::new()),
        1 => "\\?[a-z=&%0-9]{0,12}",
        1 => "[ -~]{0,6}",
    ];
    let framing = prop_oneof![
        3 => Just(0u8), // none
        3 => Just(1u8), // Content-Length
        3 => Just(2u8), // chunked
    ];
    let chunking = (
        vec(any::<prop::sample::Index>(), 0..4),
        prop_oneof![8 => 0u8..5, 1 => Just(5u8)],
        prop::sample::select(vec![
            "0x5",
            "-1",
            "fffffffffffffffffff",
            "5 5",
            "",
            "g",
            "+5",
            "5\r",
        ])
        .prop_map(str::to_owned),
        prop::option::of(prop_oneof![
            Just(b"x-trailer: 1".to_vec()),
            bytes_with(b"\0:\r "),
        ]),
        prop::bool::weighted(0.05),
    )
        .prop_map(|(cuts, style, bad, trailer, unterminated)| Chunking {
            cuts,
            style,
            bad,
            trailer,
            unterminated,
        });
    (
        (method, any::<bool>(), suffix, version),
        prop_oneof![12 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)],
        framing,
        vec(line(), 0..3),
        prop_oneof![3 => vec(any::<u8>(), 0..48), 2 => "[a-z\r\n ]{0,48}".prop_map(String::into_bytes)],
        prop::bool::weighted(0.2),
        chunking,
        prop_oneof![9 => Just(Vec::new()), 1 => bytes_with(b"\r\n")],
    )
        .prop_flat_map(
            |((method, absolute, suffix, version), eol, framing, extra, payload, smuggle, chunking, junk)| {
                let mut lines = vec![Line::Host];
                let chunked = match framing {
                    1 => {
                        lines.push(Line::Cl(0, 0));
                        None
                    }
                    2 => {
                        lines.push(Line::Te("chunked".into()));
                        Some(chunking)
                    }
                    _ => None,
                };
                lines.extend(extra);
                Just(lines).prop_shuffle().prop_map(move |lines| Msg {
                    method: method.clone(),
                    absolute,
                    suffix: suffix.clone(),
                    version: version.clone(),
                    eol,
                    lines,
                    payload: payload.clone(),
                    smuggle,
                    chunked: chunked.clone(),
                    junk: junk.clone(),
                })
            },
        )
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<bool>(),
        vec(msg(), 1..4),
        prop::option::of(any::<prop::sample::Index>()),
    )
        .prop_map(|(inbound, msgs, split)| Case {
            inbound,
            msgs,
            split,
        })
}

/// The bytes of message `i` of case `id`.
fn render(m: &Msg, id: u64, i: usize) -> Vec<u8> {
    let mut payload = m.payload.clone();
    if m.smuggle {
        payload.extend_from_slice(
            format!("GET /fz/{id}/s{i} HTTP/1.1\r\nHost: {AUTHORITY}\r\n\r\n").as_bytes(),
        );
    }
    let body = match &m.chunked {
        None => payload.clone(),
        Some(c) => {
            let mut cuts: Vec<usize> = c.cuts.iter().map(|x| x.index(payload.len() + 1)).collect();
            cuts.push(0);
            cuts.push(payload.len());
            cuts.sort_unstable();
            cuts.dedup();
            let mut out = Vec::new();
            for (k, w) in cuts.windows(2).enumerate() {
                let piece = &payload[w[0]..w[1]];
                let size = match c.style {
                    1 => format!("{:X}", piece.len()),
                    2 => format!("000{:x}", piece.len()),
                    3 => format!("{:x};ext=1", piece.len()),
                    4 => format!("{:x} ;ext", piece.len()),
                    5 if k == 0 => c.bad.clone(),
                    _ => format!("{:x}", piece.len()),
                };
                out.extend_from_slice(size.as_bytes());
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(piece);
                out.extend_from_slice(b"\r\n");
            }
            if !c.unterminated {
                out.extend_from_slice(b"0\r\n");
                if let Some(t) = &c.trailer {
                    out.extend_from_slice(t);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"\r\n");
            }
            out
        }
    };
    let target = if m.absolute {
        format!("http://{AUTHORITY}/fz/{id}/{i}-{}", m.suffix)
    } else {
        format!("/fz/{id}/{i}-{}", m.suffix)
    };
    let mut lines: Vec<Vec<u8>> = vec![format!("{} {target} {}", m.method, m.version).into_bytes()];
    for l in &m.lines {
        let line = match l {
            Line::Host => format!("Host: {AUTHORITY}").into_bytes(),
            Line::HostOther(h) => format!("Host: {h}").into_bytes(),
            Line::Cl(style, delta) => {
                let n = (body.len() as i64 + delta).max(0);
                let v = match style {
                    1 => format!("0{n}"),
                    2 => format!(" {n} "),
                    3 => format!("+{n}"),
                    4 => format!("{n}, {n}"),
                    5 => format!("{n},{}", n + 1),
                    6 => format!("0x{n:x}"),
                    7 => format!("{n}.0"),
                    8 => "99999999999999999999999".to_owned(),
                    _ => n.to_string(),
                };
                format!("Content-Length: {v}").into_bytes()
            }
            Line::Te(t) => format!("Transfer-Encoding: {t}").into_bytes(),
            Line::Connection(c) => format!("Connection: {c}").into_bytes(),
            Line::Expect => b"Expect: 100-continue".to_vec(),
            Line::Upgrade(u) => format!("Upgrade: {u}").into_bytes(),
            Line::Long(n) => format!("x-long: {}", "a".repeat(*n)).into_bytes(),
            Line::Raw(name, value, join) => {
                let mut v = name.clone();
                v.extend_from_slice(match join {
                    0 => b": ".as_slice(),
                    1 => b" : ".as_slice(),
                    2 => b"".as_slice(),
                    _ => b":".as_slice(),
                });
                v.extend_from_slice(value);
                v
            }
            Line::Fold(v) => [b" ".as_slice(), v].concat(),
        };
        lines.push(line);
    }
    let mut out = Vec::new();
    for (k, l) in lines.iter().enumerate() {
        out.extend_from_slice(l);
        out.extend_from_slice(match (m.eol, k) {
            (1, _) | (2, 0) => b"\n".as_slice(),
            (3, 1) => b"\r".as_slice(),
            _ => b"\r\n".as_slice(),
        });
    }
    out.extend_from_slice(if m.eol == 1 { b"\n" } else { b"\r\n" });
    out.extend_from_slice(&body);
    out.extend_from_slice(&m.junk);
    out
}

// ------------------------------------------------------------------ the mesh and one run

/// What the client sent in one case, and the reference reading of it.
type Sent = (Vec<u8>, Vec<RefMsg>);

struct Rig {
    app: App,
    _cp: ControlPlane,
    backend: Proxy,
    client: Proxy,
    next_id: AtomicU64,
    /// What the client sent in each case so far, and its reference reading.
    sent: Mutex<HashMap<u64, Sent>>,
}

impl Rig {
    async fn start() -> Rig {
        let app = App::start().await;
        let cp = ControlPlane::start().await;
        cp.apply_ok(SERVICES).await;
        let backend = Proxy::start(&cp, ProxyOpts::new("rawapp", "fuzz", app.addr.port())).await;
        let client = Proxy::start(&cp, ProxyOpts::new("client", "fuzz", 1)).await;
        let rig = Rig {
            app,
            _cp: cp,
            backend,
            client,
            next_id: AtomicU64::new(1),
            sent: Mutex::new(HashMap::new()),
        };
        remora_tests::eventually(
            remora_tests::READY_TIMEOUT,
            "the app through both sidecars",
            || async {
                (rig.probe(true).await.is_ok() && rig.probe(false).await.is_ok()).then_some(())
            },
        )
        .await;
        rig.app.drain();
        rig
    }

    fn addr(&self, inbound: bool) -> SocketAddr {
        if inbound {
            self.backend.inbound()
        } else {
            self.client.outbound()
        }
    }

    /// A plain request through one side: the mesh still answers.
    async fn probe(&self, inbound: bool) -> Result<(), String> {
        let req =
            format!("GET /fz/0/live HTTP/1.1\r\nHost: {AUTHORITY}\r\nConnection: close\r\n\r\n");
        let r = remora_tests::raw_http::exchange(self.addr(inbound), req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        if r.status == 200 && r.header("x-fuzz-target") == Some("/fz/0/live") {
            Ok(())
        } else {
            Err(format!("{} {:?}", r.status, r.headers))
        }
    }

    /// Both proxies are still running.
    fn alive(&self) -> Result<(), String> {
        for (name, p) in [("rawapp", &self.backend), ("client", &self.client)] {
            let stat =
                std::fs::read_to_string(format!("/proc/{}/stat", p.pid())).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next());
            if matches!(state, None | Some("Z") | Some("X")) {
                return Err(format!("the {name} sidecar is gone:\n{}", p.logs()));
            }
        }
        Ok(())
    }

    async fn run(&self, case: &Case) -> Result<(), TestCaseError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes: Vec<u8> = case
            .msgs
            .iter()
            .enumerate()
            .flat_map(|(i, m)| render(m, id, i))
            .collect();
        let refs = reference(&bytes);
        self.sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (bytes.clone(), refs.clone()));
        let side = if case.inbound { "inbound" } else { "outbound" };
        let what = || {
            format!(
                "case {id} ({side}), the client sent {:?}\nreference reading: {:#?}",
                esc(&bytes),
                refs
            )
        };

        let answers = self
            .exchange(case, &bytes, &refs)
            .await
            .map_err(|e| TestCaseError::fail(format!("{e}\n{}", what())))?;
        self.alive().map_err(TestCaseError::fail)?;
        // What the application received, once it has settled.
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.check_app(id, &answers)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{}", what())))?;
        if id.is_multiple_of(25) {
            for inbound in [true, false] {
                self.probe(inbound)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("after case {id}: no answer: {e}")))?;
            }
            self.app.drain();
        }
        Ok(())
    }

    /// Sends the case's bytes and reads every answer strictly; the targets
    /// the application's answers name, in order.
    async fn exchange(
        &self,
        case: &Case,
        bytes: &[u8],
        refs: &[RefMsg],
    ) -> Result<Vec<String>, String> {
        let mut stream = TcpStream::connect(self.addr(case.inbound))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let at = case.split.map_or(bytes.len(), |s| s.index(bytes.len() + 1));
        // The proxy may close early (after a 400): a failed write is fine.
        if stream.write_all(&bytes[..at]).await.is_ok() && at < bytes.len() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let _ = stream.write_all(&bytes[at..]).await;
        }
        // Answers are due for the messages up to the first that ends the
        // connection, except one cut short.
        let mut due = 0;
        for r in refs {
            due += usize::from(r.answered);
            if r.last.is_some() {
                break;
            }
        }
        let mut w = Wire::new(stream, Some(QUIET));
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut finals: Vec<String> = Vec::new();
        let mut statuses = Vec::new();
        loop {
            if finals.len() >= due {
                // Then only briefly: anything more is an answer too many.
                w.wait = Some(Duration::from_millis(30));
            }
            if Instant::now() > deadline {
                break;
            }
            let raw = match w.head().await {
                Ok(h) => h,
                Err(Fail::Eof | Fail::Quiet) => break,
                Err(Fail::Truncated) => {
                    return Err(format!(
                        "the connection closed inside a response head: {:?}",
                        esc(&w.seen)
                    ))
                }
                Err(Fail::Bad(m)) => return Err(format!("{m}; answers: {:?}", esc(&w.seen))),
            };
            let head = Head::parse(&raw, false)
                .map_err(|m| format!("{m}; answers: {:?}", esc(&w.seen)))?;
            let start = String::from_utf8_lossy(&head.start).into_owned();
            let status: u16 = start
                .strip_prefix("HTTP/1.1 ")
                .or_else(|| start.strip_prefix("HTTP/1.0 "))
                .and_then(|s| s.get(..3))
                .filter(|_| start.len() == 12 || start.as_bytes().get(12) == Some(&b' '))
                .and_then(|s| s.parse().ok())
                .filter(|s| (100..600).contains(s))
                .ok_or_else(|| {
                    format!("not a status line: {start:?}; answers: {:?}", esc(&w.seen))
                })?;
            statuses.push(status);
            if status == 101 {
                return Err(format!(
                    "a 101 answer, yet the application never agrees to upgrade: {:?}",
                    esc(&w.seen)
                ));
            }
            if (100..200).contains(&status) {
                continue;
            }
            let index = finals.len();
            let to_head = refs.get(index).is_some_and(|r| r.method == "HEAD");
            let framing = if to_head || status == 204 || status == 304 {
                Framing::None
            } else {
                head.framing(false)
                    .map_err(|m| format!("response {index}: {m}: {:?}", esc(&w.seen)))?
            };
            match w.body(framing).await {
                Ok(_) => {}
                Err(Fail::Bad(m)) => {
                    return Err(format!("response {index}: {m}: {:?}", esc(&w.seen)))
                }
                Err(_) => return Err(format!("response {index} cut short: {:?}", esc(&w.seen))),
            }
            let target = head
                .all("x-fuzz-target")
                .next()
                .map(|t| String::from_utf8_lossy(t).into_owned())
                .unwrap_or_default();
            if !target.is_empty() {
                // The application's answer to request `index`, in order.
                match refs.get(index) {
                    Some(r) if marker(&r.target).is_some() && marker(&r.target) == marker(&target) => {}
                    _ => {
                        return Err(format!(
                            "answer {index} is the application's answer to {target:?}, not to message {index}; answers: {:?}",
                            esc(&w.seen)
                        ))
                    }
                }
            }
            finals.push(target);
            if framing == Framing::Close {
                break;
            }
        }
        // More answers than messages: only the proxy's own refusal of what
        // followed the last message (bytes it read as one more request).
        let extra = finals.len().saturating_sub(refs.len());
        let app_answers = finals.iter().filter(|t| !t.is_empty()).count();
        let allowed = refs
            .iter()
            .position(|r| r.last.is_some())
            .map_or(refs.len(), |p| p + 1);
        if extra > 1
            || app_answers > allowed
            || (extra == 1 && finals.last().is_some_and(|t| !t.is_empty()))
        {
            return Err(format!(
                "{} answers ({app_answers} from the application) to {} messages: {:?}",
                finals.len(),
                refs.len(),
                esc(&w.seen)
            ));
        }
        Ok(finals)
    }

    /// Checks what the application received since the last check.
    fn check_app(&self, _id: u64, _answers: &[String]) -> Result<(), String> {
        let sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        // The last index seen per case, to see order and repeats.
        let mut last_seen: HashMap<u64, usize> = HashMap::new();
        for e in self.app.drain() {
            match e {
                AppEvent::Violation { conn, what, raw } => {
                    return Err(format!(
                        "the application received something not well-framed on its connection {conn}: {what}\nall it received there: {:?}",
                        esc(&raw)
                    ));
                }
                AppEvent::Request {
                    conn,
                    method,
                    target,
                    body,
                    complete,
                } => {
                    let Some((case, index)) = marker(&target) else {
                        return Err(format!(
                            "the application received {method} {target:?}, which no client sent (connection {conn})"
                        ));
                    };
                    if case == 0 {
                        continue; // a probe
                    }
                    let Some((bytes, refs)) = sent.get(&case) else {
                        return Err(format!("{method} {target:?} names no case sent"));
                    };
                    let from = || format!("case {case}: the client sent {:?}", esc(bytes));
                    // Which top-level message of the reference reading it
                    // is (a request written after a body without framing is
                    // a top-level one, whatever its marker says).
                    let found = refs
                        .iter()
                        .position(|r| marker(&r.target) == Some((case, index.clone())));
                    // Allowed: the messages up to the first that ends the connection.
                    let allowed = refs
                        .iter()
                        .position(|r| r.last.is_some())
                        .map_or(refs.len(), |p| p + 1);
                    let index = match found {
                        Some(i) if i < allowed => i,
                        Some(i) => {
                            return Err(format!(
                                "the application received message {i} ({method} {target:?}), which comes after one whose framing ends the connection ({:?})\n{}\nreference: {refs:#?}",
                                refs.get(allowed.saturating_sub(1)).and_then(|r| r.last.clone()),
                                from()
                            ));
                        }
                        None if index.starts_with('s') => {
                            return Err(format!(
                                "SMUGGLED: the application received {method} {target:?}, a request the client only sent inside another's body\n{}\nreference: {refs:#?}",
                                from()
                            ));
                        }
                        None => {
                            return Err(format!(
                                "the application received {method} {target:?}, which the client did not send as a request of its own, or only after one whose framing ends the connection\n{}\nreference: {refs:#?}",
                                from()
                            ));
                        }
                    };
                    if let Some(prev) = last_seen.insert(case, index) {
                        if prev >= index {
                            return Err(format!(
                                "the application received message {index} after message {prev}\n{}",
                                from()
                            ));
                        }
                    }
                    let r = &refs[index];
                    if method != r.method {
                        return Err(format!(
                            "message {index} was sent as {:?} and reached the application as {method:?}\n{}",
                            r.method,
                            from()
                        ));
                    }
                    if let (true, None, Some(want)) = (complete, &r.last, &r.body) {
                        if &body != want {
                            return Err(format!(
                                "message {index} reached the application with body {:?}, sent with {:?}\n{}",
                                esc(&body),
                                esc(want),
                                from()
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// `/fz/<case>/<index>...` in a target: (case, index text).
fn marker(target: &str) -> Option<(u64, String)> {
    let rest = &target[target.find("/fz/")? + 4..];
    let (case, rest) = rest.split_once('/')?;
    // A message's index (digits), or `s<digits>` for a request carried in a
    // body; what the grammar appends after it is not part of it.
    let smuggled = rest.starts_with('s');
    let digits: String = rest
        .chars()
        .skip(usize::from(smuggled))
        .take_while(char::is_ascii_digit)
        .collect();
    let index = if smuggled {
        format!("s{digits}")
    } else {
        digits
    };
    Some((case.parse().ok()?, index))
}

#[test]
fn http1_heads_reach_the_app_well_framed_or_not_at_all() {
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let rig = rt.block_on(Rig::start());
    let cases = std::env::var("REMORA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 400,
        max_shrink_time: 90_000,
        ..Config::default()
    });
    let fuzzed = Instant::now();
    let result = runner.run(&case(), |c| rt.block_on(rig.run(&c)));
    eprintln!(
        "{cases} connections in {:?} (mesh up in {:?})",
        fuzzed.elapsed(),
        fuzzed - started
    );
    if let Err(e) = result {
        panic!(
            "{e}\n--- rawapp sidecar:\n{}\n--- client sidecar:\n{}",
            tail(&rig.backend.logs()),
            tail(&rig.client.logs())
        );
    }
    // The reference reading itself, on what the grammar cannot always make.
    rt.block_on(async {
        for inbound in [true, false] {
            rig.probe(inbound).await.expect("the mesh still answers");
        }
    });
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The reference reading agrees with RFC 9112 on the classic cases.
#[test]
fn the_reference_reading_is_strict() {
    let one = |b: &[u8]| reference(b);
    let r = one(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(r.len(), 2);
    assert!(r.iter().all(|m| m.last.is_none()));
    let r = one(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /s HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(r[0].last.is_some());
    let r =
        one(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!");
    assert_eq!(
        r[0].last.as_deref(),
        Some("an invalid or conflicting Content-Length")
    );
    let r = one(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n0\r\n\r\n");
    assert_eq!(r[0].body.as_deref(), Some(b"hello".as_slice()));
    assert!(r[0].last.is_none());
    let r = one(b"GET /a HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n");
    assert_eq!(r[0].last.as_deref(), Some("obs-fold"));
    let r = one(b"GET /a HTTP/1.1\nHost: x\n\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(r.len(), 2);
    assert_eq!(marker("/fz/12/3?x"), Some((12, "3".to_owned())));
    assert_eq!(marker("/fz/12/0A"), Some((12, "0".to_owned())));
    assert_eq!(marker("http://a/fz/12/s0"), Some((12, "s0".to_owned())));
}

/// A GET with a chunked body keeps it on the way to the application
/// (through one sidecar, and through two): hyper's HTTP/1 client sends a GET
/// of unknown length with no body unless asked for chunked framing, which
/// the proxy now does.
#[test]
fn a_chunked_get_keeps_its_body() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let rig = rt.block_on(Rig::start());
    rt.block_on(async {
        for inbound in [true, false] {
            let req = format!(
                "GET /fz/0/get-body HTTP/1.1\r\nHost: {AUTHORITY}\r\n\
                 Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            );
            let r = remora_tests::raw_http::exchange(rig.addr(inbound), req.as_bytes())
                .await
                .expect("an answer");
            assert_eq!(r.status, 200);
            let seen = rig.app.drain();
            let bodies: Vec<&[u8]> = seen
                .iter()
                .filter_map(|e| match e {
                    AppEvent::Request { body, .. } => Some(body.as_slice()),
                    AppEvent::Violation { .. } => None,
                })
                .collect();
            assert_eq!(bodies, [b"hello".as_slice()], "inbound: {inbound}");
        }
    });
}
