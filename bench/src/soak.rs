//! The soak run (`remora-bench soak`, `bench/soak.sh`; not in CI): mixed
//! traffic through a mesh (control plane, two sidecars, an upstream of its
//! own) for a long time, including slow readers, slow uploaders and clients
//! that abort mid-request and mid-response, with each proxy's RSS and
//! open-fd count printed every minute. Growth is measured between two quiet
//! moments (traffic paused, in-flight work finished): the end of the
//! warm-up and the end of the run. Fds are counted apart from the pools'
//! idle connections to the next hop, whose number follows the last burst's
//! concurrency (bounded by `--pool-max-idle`), not the run's length. More than `--limit` percent, a proxy
//! gone, or a mesh that no longer answers, and it exits non-zero.

use crate::resources;
use crate::targets::{self, local, Env, AUTHORITY};
use anyhow::{bail, Context as _};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long the traffic runs, in minutes.
    #[arg(long, default_value_t = 30.0)]
    pub minutes: f64,
    /// The warm-up, in minutes: growth is measured from its end.
    #[arg(long, default_value_t = 5.0)]
    pub warmup: f64,
    /// The most RSS or fd growth allowed after the warm-up, in percent.
    #[arg(long, default_value_t = 5.0)]
    pub limit: f64,
    /// Seconds between two printed samples.
    #[arg(long, default_value_t = 60)]
    pub interval: u64,
    /// Requests per second of the steady keep-alive traffic.
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
}

type Body = BoxBody<Bytes, std::io::Error>;

// ------------------------------------------------------------------ the upstream

/// The soak's upstream (`remora-bench soak-upstream`): `/` 1 KiB, `/big?n=`
/// n bytes streamed, `/upload` reads the body and answers its length,
/// `/slow?ms=` answers after a while.
pub async fn upstream(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(handle);
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r
}

fn query_number(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))?
        .parse()
        .ok()
}

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    Ok(match req.uri().path() {
        "/big" => {
            let n = query_number(&req, "n").unwrap_or(1 << 20);
            let chunk = Bytes::from(vec![b'b'; 64 * 1024]);
            let frames = (0..n.div_ceil(chunk.len() as u64)).map(move |i| {
                let left = n - i * chunk.len() as u64;
                let len = left.min(chunk.len() as u64) as usize;
                Ok(Frame::data(chunk.slice(..len)))
            });
            let mut r = Response::new(StreamBody::new(tokio_stream::iter(frames)).boxed());
            r.headers_mut()
                .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(n));
            r
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => return Ok(full(StatusCode::BAD_REQUEST, "broken upload\n")),
                }
            }
            full(StatusCode::OK, format!("{n}\n"))
        }
        "/slow" => {
            let ms = query_number(&req, "ms").unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            full(StatusCode::OK, "slow\n")
        }
        _ => {
            let _ = req.into_body().collect().await;
            full(StatusCode::OK, vec![b'x'; 1024])
        }
    })
}

// ------------------------------------------------------------------ traffic

/// Counts per kind of client, and what is in flight.
#[derive(Default)]
struct Stats {
    kinds: [(AtomicU64, AtomicU64); KINDS.len()],
    in_flight: AtomicUsize,
}

const KINDS: [&str; 7] = [
    "steady",
    "upload",
    "slow-reader",
    "slow-uploader",
    "abort",
    "new-conn",
    "one-hop",
];

/// Marks one operation in flight until dropped.
struct Op<'a>(&'a Stats);

impl<'a> Op<'a> {
    fn start(s: &'a Stats) -> Op<'a> {
        s.in_flight.fetch_add(1, Ordering::Relaxed);
        Op(s)
    }
}

impl Drop for Op<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Stats {
    fn count(&self, kind: usize, ok: bool) {
        let (o, e) = &self.kinds[kind];
        (if ok { o } else { e }).fetch_add(1, Ordering::Relaxed);
    }

    fn line(&self) -> String {
        KINDS
            .iter()
            .zip(&self.kinds)
            .map(|(k, (o, e))| {
                format!(
                    "{k} {}/{}",
                    o.load(Ordering::Relaxed),
                    e.load(Ordering::Relaxed)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Shared by every client task.
struct Traffic {
    /// The frontend sidecar's outbound listener (explicit mode).
    mesh: SocketAddr,
    /// The backend sidecar's inbound listener (one hop, plaintext).
    one_hop: SocketAddr,
    stats: Stats,
    paused: AtomicBool,
    stop: AtomicBool,
}

impl Traffic {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }

    /// Waits while paused; false once stopped.
    async fn gate(&self) -> bool {
        while self.paused.load(Ordering::Relaxed) && self.running() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.running()
    }
}

fn head(method: &str, path: &str, extra: &str) -> String {
    format!("{method} http://{AUTHORITY}{path} HTTP/1.1\r\nHost: {AUTHORITY}\r\n{extra}\r\n")
}

/// Reads until the end of a response head; its status.
async fn read_status(s: &mut TcpStream) -> std::io::Result<u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    std::str::from_utf8(buf.get(9..12).unwrap_or_default())
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("not a status line"))
}

/// Keep-alive GETs at an even pace over a few connections (hyper's client).
async fn steady(t: Arc<Traffic>, kind: usize, addr: SocketAddr, per_second: f64) {
    let pause = Duration::from_secs_f64(1.0 / per_second.max(0.1));
    let uri = if kind == 6 {
        "/".to_owned()
    } else {
        format!("http://{AUTHORITY}/")
    };
    while t.gate().await {
        let Ok(stream) = TcpStream::connect(addr).await else {
            t.stats.count(kind, false);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok((mut send, conn)) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await
        else {
            t.stats.count(kind, false);
            continue;
        };
        tokio::spawn(conn);
        // A connection serves a few thousand requests, then a new one.
        for _ in 0..5_000 {
            if !t.gate().await {
                return;
            }
            let op = Op::start(&t.stats);
            let req = Request::get(uri.as_str())
                .header(http::header::HOST, AUTHORITY)
                .body(Empty::new());
            let ok = match req {
                Ok(req) if send.ready().await.is_ok() => match send.send_request(req).await {
                    Ok(resp) => {
                        let status = resp.status();
                        resp.into_body().collect().await.is_ok() && status == StatusCode::OK
                    }
                    Err(_) => false,
                },
                _ => false,
            };
            t.stats.count(kind, ok);
            drop(op);
            if !ok {
                break;
            }
            tokio::time::sleep(pause).await;
        }
    }
}

/// Uploads of 256 KiB at full speed, each on a new connection.
async fn uploads(t: Arc<Traffic>) {
    let body = vec![b'u'; 256 * 1024];
    while t.gate().await {
        let op = Op::start(&t.stats);
        let r = async {
            let mut s = TcpStream::connect(t.mesh).await?;
            let h = head(
                "POST",
                "/upload",
                &format!("Content-Length: {}\r\nConnection: close\r\n", body.len()),
            );
            s.write_all(h.as_bytes()).await?;
            s.write_all(&body).await?;
            read_status(&mut s).await
        };
        let ok = tokio::time::timeout(Duration::from_secs(10), r)
            .await
            .is_ok_and(|r| r.is_ok_and(|s| s == 200));
        t.stats.count(1, ok);
        drop(op);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A download of 8 MiB read at 64 KiB/s for a few seconds, then dropped.
async fn slow_readers(t: Arc<Traffic>, seed: u64) {
    let mut rng = seed;
    while t.gate().await {
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let seconds = 2 + (rng >> 33) % 6;
        let op = Op::start(&t.stats);
        let r = async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.set_recv_buffer_size(8 * 1024)?;
            let mut s = socket.connect(t.mesh).await?;
            s.write_all(head("GET", "/big?n=8388608", "").as_bytes())
                .await?;
            let mut buf = vec![0u8; 16 * 1024];
            let until = Instant::now() + Duration::from_secs(seconds);
            let mut got = 0usize;
            while Instant::now() < until {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                got += n;
                // 16 KiB every 250 ms.
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Ok::<_, std::io::Error>(got)
        };
        let ok = tokio::time::timeout(Duration::from_secs(15), r)
            .await
            .is_ok_and(|r| r.is_ok_and(|n| n > 0));
        t.stats.count(2, ok);
        drop(op);
    }
}

/// A 1 MiB upload sent at 40 KiB/s: every other one finishes, the others
/// stop after a few seconds and drop the connection.
async fn slow_uploaders(t: Arc<Traffic>) {
    let mut finish = false;
    while t.gate().await {
        finish = !finish;
        let op = Op::start(&t.stats);
        let r = async {
            let mut s = TcpStream::connect(t.mesh).await?;
            let total = if finish { 160 * 1024 } else { 1 << 20 };
            let h = head("POST", "/upload", &format!("Content-Length: {total}\r\n"));
            s.write_all(h.as_bytes()).await?;
            let piece = vec![b's'; 4096];
            let mut sent = 0;
            let until = Instant::now() + Duration::from_secs(4);
            while sent < total && (finish || Instant::now() < until) {
                s.write_all(&piece).await?;
                sent += piece.len();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if finish {
                return Ok(read_status(&mut s).await? == 200);
            }
            Ok::<_, std::io::Error>(true)
        };
        let ok = tokio::time::timeout(Duration::from_secs(15), r)
            .await
            .is_ok_and(|r| r.is_ok_and(|ok| ok));
        t.stats.count(3, ok);
        drop(op);
    }
}

/// Clients that give up: after the head, mid-body, after the first bytes
/// of an answer, while the upstream is still thinking; and one that sends
/// half a head and goes away.
async fn aborters(t: Arc<Traffic>) {
    let mut step = 0u32;
    while t.gate().await {
        step = step.wrapping_add(1);
        let op = Op::start(&t.stats);
        let r = async {
            let mut s = TcpStream::connect(t.mesh).await?;
            match step % 5 {
                0 => {
                    s.write_all(head("POST", "/upload", "Content-Length: 100000\r\n").as_bytes())
                        .await?;
                }
                1 => {
                    s.write_all(head("POST", "/upload", "Content-Length: 100000\r\n").as_bytes())
                        .await?;
                    s.write_all(&[b'a'; 30_000]).await?;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                2 => {
                    s.write_all(head("GET", "/big?n=4194304", "").as_bytes())
                        .await?;
                    let mut b = [0u8; 1024];
                    s.read_exact(&mut b).await?;
                }
                3 => {
                    s.write_all(head("GET", "/slow?ms=2000", "").as_bytes())
                        .await?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => {
                    s.write_all(b"GET http://backend.bench:8080/ HTTP/1.1\r\nHost: backe")
                        .await?;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            // Dropped here: a reset or a FIN mid-exchange.
            Ok::<_, std::io::Error>(())
        };
        let ok = tokio::time::timeout(Duration::from_secs(10), r)
            .await
            .is_ok_and(|r| r.is_ok());
        t.stats.count(4, ok);
        drop(op);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One request per connection (`Connection: close`).
async fn new_connections(t: Arc<Traffic>) {
    while t.gate().await {
        let op = Op::start(&t.stats);
        let r = async {
            let mut s = TcpStream::connect(t.mesh).await?;
            s.write_all(head("GET", "/", "Connection: close\r\n").as_bytes())
                .await?;
            let status = read_status(&mut s).await?;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await?;
            Ok::<_, std::io::Error>(status)
        };
        let ok = tokio::time::timeout(Duration::from_secs(10), r)
            .await
            .is_ok_and(|r| r.is_ok_and(|s| s == 200));
        t.stats.count(5, ok);
        drop(op);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------------ samples

#[derive(Debug, Clone, Copy)]
struct Sample {
    rss_kib: u64,
    fds: usize,
    /// Of `fds`, connections to the next hop (the upstream, the peer
    /// sidecar): the pools' idle connections, a cache bounded by
    /// `--pool-max-idle` whose size follows the last burst's concurrency.
    pooled: usize,
}

impl Sample {
    /// The fds that are not pooled connections: what a leak would grow.
    fn own(&self) -> usize {
        self.fds.saturating_sub(self.pooled)
    }
}

/// The inodes of established TCP sockets whose remote port is in `ports`.
fn sockets_to(pid: u32, ports: &[u16]) -> std::collections::HashSet<String> {
    let mut out = std::collections::HashSet::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(state), Some(inode)) = (f.get(2), f.get(3), f.get(9)) else {
                continue;
            };
            let port = remote
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if *state == "01" && port.is_some_and(|p| ports.contains(&p)) {
                out.insert(format!("socket:[{inode}]"));
            }
        }
    }
    out
}

fn sample(pid: u32, next_hops: &[u16]) -> Sample {
    let pool = sockets_to(pid, next_hops);
    let mut fds = 0;
    let mut pooled = 0;
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            fds += 1;
            let link = std::fs::read_link(e.path()).unwrap_or_default();
            if pool.contains(link.to_string_lossy().as_ref()) {
                pooled += 1;
            }
        }
    }
    Sample {
        rss_kib: resources::status_kib(pid, "VmRSS"),
        fds,
        pooled,
    }
}

fn growth(from: f64, to: f64) -> f64 {
    if from <= 0.0 {
        0.0
    } else {
        100.0 * (to - from) / from
    }
}

/// Pauses the traffic until nothing is in flight (at most 20 s), lets the
/// proxies settle, samples both, and lets the traffic go on.
async fn quiet_sample(t: &Traffic, pids: &[(&str, u32)], hops: &[u16]) -> Vec<Sample> {
    t.paused.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while t.stats.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = pids.iter().map(|(_, p)| sample(*p, hops)).collect();
    t.paused.store(false, Ordering::Relaxed);
    s
}

fn print_samples(label: &str, elapsed: Duration, pids: &[(&str, u32)], s: &[Sample], t: &Traffic) {
    let cols: Vec<String> = pids
        .iter()
        .zip(s)
        .map(|((name, _), s)| {
            format!(
                "{name}: RSS {:.1} MiB, {} fds ({} to the next hop)",
                s.rss_kib as f64 / 1024.0,
                s.fds,
                s.pooled
            )
        })
        .collect();
    println!(
        "[{:>5.1} min] {label:<9} {} | ok/failed: {}",
        elapsed.as_secs_f64() / 60.0,
        cols.join("; "),
        t.stats.line()
    );
}

// ------------------------------------------------------------------ the run

pub async fn run(args: SoakArgs) -> anyhow::Result<()> {
    if args.warmup >= args.minutes {
        bail!(
            "the warm-up ({} min) must be shorter than the run ({} min)",
            args.warmup,
            args.minutes
        );
    }
    let mut env = Env::new()?;
    let r = soak(&env, &args).await;
    if r.is_err() {
        env.dir.disable_cleanup(true);
        eprintln!("logs of every process are in {}", env.dir.path().display());
    }
    r
}

async fn soak(env: &Env, args: &SoakArgs) -> anyhow::Result<()> {
    eprintln!(
        "==> soak: {} min of mixed traffic, growth measured after {} min (logs in {})",
        args.minutes,
        args.warmup,
        env.dir.path().display()
    );
    let up_port = targets::free_port();
    let up_addr = local(up_port);
    let exe = std::env::current_exe()?;
    let up_args = [
        "soak-upstream".to_string(),
        "--listen".into(),
        up_addr.to_string(),
    ];
    let _upstream = env.spawn("soak-upstream", &exe, &up_args, 0)?;
    targets::wait_for(10, "the soak upstream", || async {
        TcpStream::connect(up_addr).await.is_ok()
    })
    .await?;
    let cp = targets::ControlPlane::start(env, "control-plane").await?;
    let policy = env.path("bench-policy.yaml");
    std::fs::write(&policy, targets::POLICY)?;
    cp.cli(env, &["apply", "-f", &policy.display().to_string()])?;
    let mut backend = targets::Sidecar::start(env, &cp, "backend", up_port).await?;
    let mut frontend = targets::Sidecar::start(env, &cp, "frontend", up_port).await?;
    let traffic = Arc::new(Traffic {
        mesh: frontend.outbound,
        one_hop: backend.inbound,
        stats: Stats::default(),
        paused: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    });
    targets::wait_for(30, "routing through the mesh", || async {
        mesh_answers(traffic.mesh).await
    })
    .await
    .with_context(|| env.log_tail("proxy-frontend"))?;
    let pids = [
        ("frontend", frontend.proc.pid()),
        ("backend", backend.proc.pid()),
    ];
    let hops = [up_port, backend.inbound.port()];

    // The clients.
    let mut tasks = Vec::new();
    let steady_conns = 8;
    for _ in 0..steady_conns {
        let per = args.rate as f64 / steady_conns as f64;
        tasks.push(tokio::spawn(steady(traffic.clone(), 0, traffic.mesh, per)));
    }
    tasks.push(tokio::spawn(steady(
        traffic.clone(),
        6,
        traffic.one_hop,
        20.0,
    )));
    for _ in 0..2 {
        tasks.push(tokio::spawn(uploads(traffic.clone())));
    }
    for seed in 0..3 {
        tasks.push(tokio::spawn(slow_readers(traffic.clone(), seed)));
    }
    for _ in 0..2 {
        tasks.push(tokio::spawn(slow_uploaders(traffic.clone())));
    }
    tasks.push(tokio::spawn(aborters(traffic.clone())));
    tasks.push(tokio::spawn(new_connections(traffic.clone())));

    let started = Instant::now();
    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let warmup = Duration::from_secs_f64(args.warmup * 60.0);
    let interval = Duration::from_secs(args.interval.max(1));
    println!(
        "pids: frontend {} backend {}; sampling every {} s",
        pids[0].1,
        pids[1].1,
        interval.as_secs()
    );
    print_samples(
        "start",
        started.elapsed(),
        &pids,
        &pids.map(|(_, p)| sample(p, &hops)),
        &traffic,
    );
    let mut baseline: Option<Vec<Sample>> = None;
    let mut next = interval;
    let mut exited = None;
    while started.elapsed() < total {
        let wake = next
            .min(total)
            .min(if baseline.is_none() { warmup } else { total });
        tokio::time::sleep(wake.saturating_sub(started.elapsed())).await;
        for (p, (name, _)) in [&mut frontend.proc, &mut backend.proc]
            .into_iter()
            .zip(&pids)
        {
            if !p.running() {
                exited.get_or_insert_with(|| name.to_string());
            }
        }
        if let Some(name) = &exited {
            traffic.stop.store(true, Ordering::Relaxed);
            bail!(
                "the {name} sidecar exited:\n{}",
                env.log_tail(&format!("proxy-{name}"))
            );
        }
        if baseline.is_none() && started.elapsed() >= warmup {
            let s = quiet_sample(&traffic, &pids, &hops).await;
            print_samples("warmed up", started.elapsed(), &pids, &s, &traffic);
            baseline = Some(s);
            // That was this minute's sample.
            while next <= started.elapsed() {
                next += interval;
            }
        }
        if started.elapsed() >= next {
            let s = pids.map(|(_, p)| sample(p, &hops));
            print_samples("", started.elapsed(), &pids, &s, &traffic);
            next += interval;
        }
    }
    let last = quiet_sample(&traffic, &pids, &hops).await;
    print_samples("end", started.elapsed(), &pids, &last, &traffic);
    traffic.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }

    // Still answering, and still there.
    let answers = mesh_answers(traffic.mesh).await;
    let mut failures = Vec::new();
    if !answers {
        failures.push("the mesh no longer answers a plain GET".to_string());
    }
    let baseline = baseline.context("no sample after the warm-up")?;
    println!(
        "\ngrowth from the end of the warm-up ({} min) to the end ({:.1} min), both sampled with traffic paused:",
        args.warmup,
        started.elapsed().as_secs_f64() / 60.0
    );
    for (((name, _), b), l) in pids.iter().zip(&baseline).zip(&last) {
        let rss = growth(b.rss_kib as f64, l.rss_kib as f64);
        let fds = growth(b.own() as f64, l.own() as f64);
        println!(
            "  {name}: RSS {:.1} → {:.1} MiB ({rss:+.1} %), fds besides pooled connections {} → {} ({fds:+.1} %), pooled connections to the next hop {} → {}",
            b.rss_kib as f64 / 1024.0,
            l.rss_kib as f64 / 1024.0,
            b.own(),
            l.own(),
            b.pooled,
            l.pooled
        );
        if rss > args.limit {
            failures.push(format!("{name}: RSS grew {rss:.1} %"));
        }
        if fds > args.limit {
            failures.push(format!("{name}: fds grew {fds:.1} %"));
        }
        // The pool is bounded by --pool-max-idle (64 by default).
        if l.pooled > 64 + 2 {
            failures.push(format!("{name}: {} pooled connections", l.pooled));
        }
    }
    println!("traffic (ok/failed): {}", traffic.stats.line());
    if failures.is_empty() {
        println!("PASS: growth within {} %", args.limit);
        Ok(())
    } else {
        bail!("FAIL: {}", failures.join("; "))
    }
}

/// A plain GET through the mesh answers 200.
async fn mesh_answers(mesh: SocketAddr) -> bool {
    let r = async {
        let mut s = TcpStream::connect(mesh).await?;
        s.write_all(head("GET", "/", "Connection: close\r\n").as_bytes())
            .await?;
        read_status(&mut s).await
    };
    tokio::time::timeout(Duration::from_secs(5), r)
        .await
        .is_ok_and(|r| r.is_ok_and(|s| s == 200))
}
