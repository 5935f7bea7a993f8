//! JSON access logs: one line per request or TCP connection, written to stdout by a
//! dedicated thread fed through a bounded queue. Logging never waits: when the writer
//! falls behind, lines are dropped and counted. Can be switched off at run time.

use std::borrow::Cow;
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime};

use metrics::{counter, Counter};
use serde::Serialize;

use crate::context::hex;
use crate::metrics::ACCESS_LOGS_DROPPED_TOTAL;
use crate::time::rfc3339_millis;

/// Default queue capacity, in lines.
pub const DEFAULT_CAPACITY: usize = 4096;

/// What one access-log line says. Build it when the request (or connection) ends;
/// formatting happens on the writer thread.
#[derive(Clone, Debug, PartialEq)]
pub struct AccessLogEntry {
    /// When the request arrived.
    pub time: SystemTime,
    /// Trace id, when the request has a trace context.
    pub trace_id: Option<[u8; 16]>,
    /// The proxy's span id for the request.
    pub span_id: Option<[u8; 8]>,
    /// `inbound` | `outbound`.
    pub direction: &'static str,
    /// `http/1.1`, `http/2`, `grpc`, `tcp`.
    pub protocol: &'static str,
    /// The client's mTLS identity.
    pub source_identity: Option<Arc<str>>,
    /// Destination service.
    pub destination: Option<Arc<str>>,
    /// The endpoint the request went to.
    pub upstream: Option<SocketAddr>,
    /// HTTP method.
    pub method: Option<http::Method>,
    /// `:authority` / `Host`.
    pub authority: Option<String>,
    /// Request path; any query is cut off when the line is written.
    pub path: Option<String>,
    /// Matched route's name.
    pub route: Option<Arc<str>>,
    /// HTTP status sent back.
    pub status: Option<u16>,
    /// gRPC status, for gRPC.
    pub grpc_status: Option<u16>,
    /// Total duration.
    pub duration: Duration,
    /// Time spent waiting for the upstream.
    pub upstream_duration: Option<Duration>,
    /// Bytes sent to the client (response body, or TCP bytes to the peer).
    pub bytes_sent: u64,
    /// Bytes received from the client.
    pub bytes_received: u64,
    /// Attempts made (1 without retries).
    pub attempts: u32,
    /// The `x-remora-error` cause, if the proxy failed the request.
    pub error: Option<Cow<'static, str>>,
}

impl AccessLogEntry {
    /// An entry timed now, with every optional field empty.
    pub fn new(direction: &'static str, protocol: &'static str) -> Self {
        AccessLogEntry {
            time: SystemTime::now(),
            trace_id: None,
            span_id: None,
            direction,
            protocol,
            source_identity: None,
            destination: None,
            upstream: None,
            method: None,
            authority: None,
            path: None,
            route: None,
            status: None,
            grpc_status: None,
            duration: Duration::ZERO,
            upstream_duration: None,
            bytes_sent: 0,
            bytes_received: 0,
            attempts: 1,
            error: None,
        }
    }
}

/// The line as serialized; every field is always present (`null` when unknown).
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    trace_id: Option<String>,
    span_id: Option<String>,
    direction: &'a str,
    protocol: &'a str,
    source_identity: Option<&'a str>,
    destination: Option<&'a str>,
    upstream: Option<String>,
    method: Option<&'a str>,
    authority: Option<&'a str>,
    path: Option<&'a str>,
    route: Option<&'a str>,
    status: Option<u16>,
    grpc_status: Option<u16>,
    duration_ms: f64,
    upstream_duration_ms: Option<f64>,
    bytes_sent: u64,
    bytes_received: u64,
    attempts: u32,
    error: Option<&'a str>,
}

impl<'a> Line<'a> {
    fn new(e: &'a AccessLogEntry) -> Self {
        let millis = |d: Duration| d.as_secs_f64() * 1000.0;
        Line {
            time: rfc3339_millis(e.time),
            trace_id: e.trace_id.as_ref().map(|id| hex(id)),
            span_id: e.span_id.as_ref().map(|id| hex(id)),
            direction: e.direction,
            protocol: e.protocol,
            source_identity: e.source_identity.as_deref(),
            destination: e.destination.as_deref(),
            upstream: e.upstream.map(|a| a.to_string()),
            method: e.method.as_ref().map(http::Method::as_str),
            authority: e.authority.as_deref(),
            path: e
                .path
                .as_deref()
                .map(|p| p.split_once('?').map_or(p, |(path, _)| path)),
            route: e.route.as_deref(),
            status: e.status,
            grpc_status: e.grpc_status,
            duration_ms: millis(e.duration),
            upstream_duration_ms: e.upstream_duration.map(millis),
            bytes_sent: e.bytes_sent,
            bytes_received: e.bytes_received,
            attempts: e.attempts,
            error: e.error.as_deref(),
        }
    }
}

/// Starts access-log writers.
pub struct AccessLog;

impl AccessLog {
    /// Starts the writer thread on stdout. `capacity` bounds the queue (at least 1).
    pub fn start(enabled: bool, capacity: usize) -> io::Result<AccessLogHandle> {
        AccessLog::start_with_writer(enabled, capacity, Box::new(io::stdout()))
    }

    /// Starts the writer thread on `sink` (tests pass an in-memory one).
    pub fn start_with_writer(
        enabled: bool,
        capacity: usize,
        sink: Box<dyn Write + Send>,
    ) -> io::Result<AccessLogHandle> {
        let (tx, rx) = mpsc::sync_channel(capacity.max(1));
        thread::Builder::new()
            .name("remora-access-log".into())
            .spawn(move || write_lines(&rx, sink))?;
        Ok(AccessLogHandle {
            tx,
            shared: Arc::new(Shared {
                enabled: AtomicBool::new(enabled),
                dropped: AtomicU64::new(0),
                dropped_total: counter!(ACCESS_LOGS_DROPPED_TOTAL),
            }),
        })
    }
}

/// Queues access-log lines. Cheap to clone; the writer thread ends, after writing what
/// is queued, when every handle is dropped.
#[derive(Clone)]
pub struct AccessLogHandle {
    /// Boxed entries: the channel allocates and touches every slot up front,
    /// and 4,096 inline entries would be 1.2 MiB of resident memory.
    tx: SyncSender<Box<AccessLogEntry>>,
    shared: Arc<Shared>,
}

struct Shared {
    enabled: AtomicBool,
    dropped: AtomicU64,
    dropped_total: Counter,
}

impl AccessLogHandle {
    /// Whether lines are being written; check it before building an entry.
    pub fn enabled(&self) -> bool {
        self.shared.enabled.load(Ordering::Relaxed)
    }

    /// Turns access logging on or off.
    pub fn set_enabled(&self, enabled: bool) {
        self.shared.enabled.store(enabled, Ordering::Relaxed);
    }

    /// Queues a line, unless logging is off. Never waits: a full queue drops the line
    /// and counts it.
    pub fn log(&self, entry: AccessLogEntry) {
        self.log_boxed(Box::new(entry));
    }

    /// [`AccessLogHandle::log`] for an entry already on the heap (no copy).
    pub fn log_boxed(&self, entry: Box<AccessLogEntry>) {
        if !self.enabled() {
            return;
        }
        if self.tx.try_send(entry).is_err() {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            self.shared.dropped_total.increment(1);
        }
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

/// Writes every queued entry as a JSON line, flushing whenever the queue runs empty.
fn write_lines(rx: &Receiver<Box<AccessLogEntry>>, sink: Box<dyn Write + Send>) {
    let mut out = BufWriter::with_capacity(64 * 1024, sink);
    let mut failed = false;
    while let Ok(first) = rx.recv() {
        let mut result = write_line(&mut out, &first);
        while let Ok(entry) = rx.try_recv() {
            result = result.and_then(|()| write_line(&mut out, &entry));
        }
        result = result.and_then(|()| out.flush());
        match result {
            Err(error) if !failed => {
                failed = true;
                tracing::warn!(%error, "writing access logs failed");
            }
            Ok(()) => failed = false,
            Err(_) => {}
        }
    }
}

fn write_line(out: &mut impl Write, entry: &AccessLogEntry) -> io::Result<()> {
    serde_json::to_writer(&mut *out, &Line::new(entry))?;
    out.write_all(b"\n")
}

#[cfg(test)]
// The writer runs on a thread of its own: these tests wait for it with the
// std clock and hold it up with a std Condvar (whose lock is std's).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn lines(&self, want: usize) -> Vec<serde_json::Value> {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
                let lines: Vec<_> = text
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect();
                if lines.len() >= want || std::time::Instant::now() > deadline {
                    return lines;
                }
                thread::sleep(Duration::from_millis(5));
            }
        }
    }

    fn full_entry() -> AccessLogEntry {
        AccessLogEntry {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            trace_id: Some([0xab; 16]),
            span_id: Some([0x01; 8]),
            direction: "outbound",
            protocol: "http/1.1",
            source_identity: Some("spiffe://remora/ns/default/sa/web".into()),
            destination: Some("users".into()),
            upstream: Some("127.0.0.1:8081".parse().unwrap()),
            method: Some(http::Method::POST),
            authority: Some("users:8080".into()),
            path: Some("/api/users?token=secret".into()),
            route: Some("users-api".into()),
            status: Some(503),
            grpc_status: None,
            duration: Duration::from_micros(12_500),
            upstream_duration: Some(Duration::from_millis(10)),
            bytes_sent: 42,
            bytes_received: 7,
            attempts: 3,
            error: Some("upstream_unavailable".into()),
        }
    }

    #[test]
    fn lines_are_json_with_every_field() {
        let sink = Sink::default();
        let log = AccessLog::start_with_writer(true, 16, Box::new(sink.clone())).unwrap();
        log.log(full_entry());
        log.log(AccessLogEntry::new("inbound", "tcp"));
        let lines = sink.lines(2);
        assert_eq!(lines.len(), 2);
        let l = &lines[0];
        assert_eq!(l["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(l["trace_id"], "ab".repeat(16));
        assert_eq!(l["span_id"], "01".repeat(8));
        assert_eq!(l["direction"], "outbound");
        assert_eq!(l["protocol"], "http/1.1");
        assert_eq!(l["source_identity"], "spiffe://remora/ns/default/sa/web");
        assert_eq!(l["destination"], "users");
        assert_eq!(l["upstream"], "127.0.0.1:8081");
        assert_eq!(l["method"], "POST");
        assert_eq!(l["authority"], "users:8080");
        assert_eq!(l["path"], "/api/users", "the query is cut off");
        assert_eq!(l["route"], "users-api");
        assert_eq!(l["status"], 503);
        assert_eq!(l["grpc_status"], serde_json::Value::Null);
        assert_eq!(l["duration_ms"], 12.5);
        assert_eq!(l["upstream_duration_ms"], 10.0);
        assert_eq!(l["bytes_sent"], 42);
        assert_eq!(l["bytes_received"], 7);
        assert_eq!(l["attempts"], 3);
        assert_eq!(l["error"], "upstream_unavailable");
        let fields = l.as_object().unwrap().len();
        assert_eq!(fields, 20);
        // Unknown fields are present as null, so every line has the same shape.
        assert_eq!(lines[1].as_object().unwrap().len(), 20);
        assert_eq!(lines[1]["trace_id"], serde_json::Value::Null);
        assert_eq!(lines[1]["protocol"], "tcp");
    }

    #[test]
    fn can_be_switched_off_and_on() {
        let sink = Sink::default();
        let log = AccessLog::start_with_writer(false, 16, Box::new(sink.clone())).unwrap();
        log.log(full_entry());
        log.set_enabled(true);
        let mut e = full_entry();
        e.route = Some("second".into());
        log.log(e);
        // Lines are written in order: had the first been queued, it would come first.
        let lines = sink.lines(1);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["route"], "second");
        assert!(log.enabled());
    }

    /// A sink that blocks until released: the writer thread is stuck.
    struct Stuck(Arc<(Mutex<bool>, std::sync::Condvar)>);
    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, cv) = &*self.0;
            let mut go = lock.lock().unwrap();
            while !*go {
                go = cv.wait(go).unwrap();
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_writer_never_blocks_logging() {
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let log = AccessLog::start_with_writer(true, 8, Box::new(Stuck(gate.clone()))).unwrap();
        // The first line gets the writer stuck in its flush.
        log.log(full_entry());
        thread::sleep(Duration::from_millis(200));
        let started = std::time::Instant::now();
        for _ in 0..10_000 {
            log.log(full_entry());
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        // The queue holds 8; the rest are dropped and counted.
        assert_eq!(log.dropped(), 10_000 - 8);
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }
}
