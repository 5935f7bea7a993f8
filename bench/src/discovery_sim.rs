//! Simulated proxies for the config-propagation figure: each holds its own TLS
//! connection and Discovery stream to the control plane, registers an
//! endpoint, and ACKs every snapshot (complete or delta) the moment it
//! arrives, as a real proxy does after applying it; each message's size on
//! the wire is reported. All share one workload certificate (they all claim
//! service `sim`), got once from Identity.Certify with one bootstrap token.

use anyhow::{bail, Context as _};
use prost::Message;
use remora_proto::v1::admin_client::AdminClient;
use remora_proto::v1::discovery_request::Kind;
use remora_proto::v1::identity_client::IdentityClient;
use remora_proto::v1::{Ack, ApplyRequest, CertifyRequest, DiscoveryRequest, Register, SourceFile};
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Reconnects per simulated proxy (on average) after which the fleet gives up.
const RECONNECT_LIMIT: usize = 100;

/// What each simulated proxy reports of each message: who, which policy
/// version, when, how big (the encoded snapshot), whether a delta.
type Event = (usize, u64, Instant, usize, bool);

pub struct Fleet {
    /// The control plane's replicas: proxy `i` connects to `urls[i % len]`;
    /// applies and certificates go through the first.
    urls: Vec<String>,
    ca: String,
    admin_token: String,
    cert: (String, String, String, i64),
    events: mpsc::UnboundedReceiver<Event>,
    events_tx: mpsc::UnboundedSender<Event>,
    pub size: usize,
    /// Streams that broke and were opened again, since the start.
    pub reconnects: Arc<AtomicUsize>,
    tasks: tokio::task::JoinSet<anyhow::Result<()>>,
}

/// The head of a `remora.v1.Snapshot`: a simulated proxy reads the version
/// (and whether it is a delta) and skips the rest. A real proxy decodes the whole snapshot on a core of
/// its own; 1,000 full decodes on the bench's one core would time the bench.
#[derive(Clone, PartialEq, Message)]
struct SnapshotHead {
    #[prost(string, tag = "1")]
    version: String,
    #[prost(uint64, tag = "2")]
    policy_version: u64,
    /// Set: a delta on the last snapshot sent.
    #[prost(string, tag = "9")]
    base_version: String,
}

/// Requests out with prost; snapshots in as ([`SnapshotHead`], encoded size).
#[derive(Default)]
struct SimCodec;

struct HeadDecoder;

impl tonic::codec::Codec for SimCodec {
    type Encode = DiscoveryRequest;
    type Decode = (SnapshotHead, usize);
    type Encoder = tonic_prost::ProstEncoder<DiscoveryRequest>;
    type Decoder = HeadDecoder;
    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }
    fn decoder(&mut self) -> HeadDecoder {
        HeadDecoder
    }
}

impl tonic::codec::Decoder for HeadDecoder {
    type Item = (SnapshotHead, usize);
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Self::Item>, tonic::Status> {
        use bytes::Buf as _;
        let len = buf.remaining();
        let head = SnapshotHead::decode(buf)
            .map_err(|e| tonic::Status::internal(format!("decoding a snapshot: {e}")))?;
        Ok(Some((head, len)))
    }
}

/// One simulated proxy: connect, register, then ACK every snapshot.
async fn sim(
    i: usize,
    url: &str,
    ca: &str,
    (chain, key, signer, not_after): (String, String, String, i64),
    events: mpsc::UnboundedSender<Event>,
    permit: Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError>,
) -> anyhow::Result<()> {
    let ch = channel(url, ca, Some((&chain, &key))).await?;
    let (tx, rx) = mpsc::channel(8);
    let register = Register {
        service: "sim".into(),
        namespace: crate::targets::NAMESPACE.into(),
        instance_id: format!("sim-{i}"),
        address: format!("127.1.{}.{}:15006", i / 250, i % 250 + 1),
        proxy_version: "remora-bench".into(),
        ..Register::default()
    };
    let kind = Some(Kind::Register(register));
    tx.send(DiscoveryRequest { kind }).await?;
    let out = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await?;
    let path = http::uri::PathAndQuery::from_static("/remora.v1.Discovery/Stream");
    let mut stream = grpc
        .streaming(tonic::Request::new(out), path, SimCodec)
        .await?
        .into_inner();
    drop(permit);
    while let Some((snap, len)) = stream.message().await.context("reading a snapshot")? {
        let ack = Ack {
            version: snap.version.clone(),
            ok: true,
            error: String::new(),
            cert_signer_id: signer.clone(),
            cert_not_after_unix: not_after,
        };
        tx.send(DiscoveryRequest {
            kind: Some(Kind::Ack(ack)),
        })
        .await
        .context("sending an Ack (the request stream is gone)")?;
        let delta = !snap.base_version.is_empty();
        let _ = events.send((i, snap.policy_version, Instant::now(), len, delta));
    }
    Ok(())
}

/// How long an applied version took to be ACKed by every connected simulated proxy.
#[derive(Debug, Clone)]
pub struct Propagation {
    pub proxies: usize,
    pub first_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub all_ms: f64,
    /// The largest message a proxy got for it.
    pub snapshot_bytes: usize,
    /// How many proxies got it as a delta.
    pub deltas: usize,
}

/// What one more endpoint (one more simulated proxy registering) cost every
/// other proxy: the message each got for it.
#[derive(Debug, Clone)]
pub struct EndpointChange {
    pub proxies: usize,
    pub p50_bytes: usize,
    pub max_bytes: usize,
    /// How many got it as a delta.
    pub deltas: usize,
    pub all_ms: f64,
    /// The complete snapshot the new proxy got first.
    pub complete_bytes: usize,
}

async fn channel(url: &str, ca: &str, client: Option<(&str, &str)>) -> anyhow::Result<Channel> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("remora-control");
    if let Some((chain, key)) = client {
        tls = tls.identity(Identity::from_pem(chain, key));
    }
    let https = format!("https://{}", url.trim_start_matches("http://"));
    Ok(Endpoint::from_shared(https)?
        .tls_config(tls)?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

impl Fleet {
    pub async fn new(urls: &[String], data_dir: &Path, token: &str) -> anyhow::Result<Fleet> {
        let url = urls.first().context("no control plane")?.as_str();
        let ca = std::fs::read_to_string(data_dir.join("trust-bundle.pem"))?;
        let admin_token = std::fs::read_to_string(data_dir.join("admin.token"))?
            .trim()
            .to_owned();
        let spiffe = format!(
            "spiffe://cluster.local/ns/{}/sa/sim",
            crate::targets::NAMESPACE
        );
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(spiffe.try_into()?)];
        let csr_pem = params.serialize_request(&key)?.pem()?;
        let resp = IdentityClient::new(channel(url, &ca, None).await?)
            .certify(CertifyRequest {
                token: token.into(),
                csr_pem,
                lifetime_seconds: 3600,
            })
            .await
            .context("Identity.Certify")?
            .into_inner();
        let (events_tx, events) = mpsc::unbounded_channel();
        Ok(Fleet {
            urls: urls.to_vec(),
            ca,
            admin_token,
            cert: (
                resp.certificate_chain_pem,
                key.serialize_pem(),
                resp.signer_id,
                resp.not_after_unix,
            ),
            events,
            events_tx,
            size: 0,
            reconnects: Arc::new(AtomicUsize::new(0)),
            tasks: tokio::task::JoinSet::new(),
        })
    }

    /// Starts simulated proxy number `self.size` (reconnecting, as a
    /// proxy does, when its stream breaks).
    fn spawn(&mut self, setup: &Arc<tokio::sync::Semaphore>) {
        let url = self.urls[self.size % self.urls.len()].clone();
        let (i, ca) = (self.size, self.ca.clone());
        let (cert, events, setup) = (self.cert.clone(), self.events_tx.clone(), setup.clone());
        let reconnects = self.reconnects.clone();
        self.tasks.spawn(async move {
            // A broken stream reconnects, as a proxy does (with less backoff).
            loop {
                let permit = setup.clone().acquire_owned().await;
                let r = sim(i, &url, &ca, cert.clone(), events.clone(), permit).await;
                let n = reconnects.fetch_add(1, Ordering::Relaxed);
                if n > 10 * RECONNECT_LIMIT {
                    return r;
                }
                if n.is_power_of_two() {
                    let why = r.err().map_or("stream ended".into(), |e| format!("{e:#}"));
                    eprintln!(
                        "    simulated proxy {i} reconnects ({} so far): {why}",
                        n + 1
                    );
                }
                let wait = 100 + (i as u64 * 7919) % 400;
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
        });
        self.size += 1;
    }

    /// Connects simulated proxies until there are `n` (64 setting up at a
    /// time), then waits until the pushes their registrations caused settle.
    pub async fn grow(&mut self, n: usize) -> anyhow::Result<()> {
        let setup = Arc::new(tokio::sync::Semaphore::new(64));
        let mut pending: HashSet<usize> = (self.size..n).collect();
        while self.size < n {
            self.spawn(&setup);
        }
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut quiet = Instant::now() + Duration::from_secs(1);
        loop {
            if let Some(Ok(Err(e))) = self.tasks.try_join_next() {
                return Err(e.context("a simulated proxy failed"));
            }
            match tokio::time::timeout(Duration::from_millis(100), self.events.recv()).await {
                Ok(Some((i, ..))) => {
                    pending.remove(&i);
                    quiet = Instant::now() + Duration::from_secs(1);
                }
                Ok(None) => bail!("every simulated proxy is gone"),
                Err(_) if pending.is_empty() && Instant::now() > quiet => return Ok(()),
                Err(_) if Instant::now() > deadline => {
                    bail!("{} simulated proxies got no snapshot", pending.len())
                }
                Err(_) => {}
            }
        }
    }

    /// Applies a changed policy through the Admin API and waits until every
    /// simulated proxy has received and ACKed the new version.
    pub async fn propagate(&mut self, round: usize) -> anyhow::Result<Propagation> {
        let yaml = format!(
            "apiVersion: remora.dev/v1\nkind: Service\nmetadata: {{name: sim, namespace: {ns}}}\n\
             spec:\n  ports: [{{port: 15006, protocol: http}}]\n---\n\
             apiVersion: remora.dev/v1\nkind: DestinationPolicy\nmetadata: {{name: sim, namespace: {ns}}}\n\
             spec:\n  service: sim\n  connectTimeout: {}ms\n",
            100 + round,
            ns = crate::targets::NAMESPACE
        );
        let mut admin = AdminClient::new(channel(&self.urls[0], &self.ca, None).await?);
        let mut req = tonic::Request::new(ApplyRequest {
            files: vec![SourceFile {
                name: "bench.yaml".into(),
                content: yaml,
            }],
            dry_run: false,
        });
        let bearer = format!("Bearer {}", self.admin_token).parse()?;
        req.metadata_mut().insert("authorization", bearer);
        let start = Instant::now();
        let version = admin
            .apply(req)
            .await
            .context("Admin.Apply")?
            .into_inner()
            .version;
        let mut seen = HashSet::new();
        let mut times = Vec::new();
        let mut bytes = 0;
        let mut deltas = 0;
        let deadline = start + Duration::from_secs(300);
        while seen.len() < self.size {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some((i, v, at, len, delta))) =
                tokio::time::timeout(left, self.events.recv()).await
            else {
                bail!(
                    "only {} of {} proxies got version {version}",
                    seen.len(),
                    self.size
                );
            };
            if v >= version && seen.insert(i) {
                times.push(at.duration_since(start).as_secs_f64() * 1000.0);
                bytes = bytes.max(len);
                deltas += usize::from(delta);
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(Propagation {
            proxies: self.size,
            first_ms: times[0],
            p50_ms: times[times.len() / 2],
            p99_ms: times[(times.len() * 99 / 100).min(times.len() - 1)],
            all_ms: times[times.len() - 1],
            snapshot_bytes: bytes,
            deltas,
        })
    }

    /// Registers one more endpoint (one more simulated proxy) and measures
    /// the message every other proxy gets for it. The fleet must be quiet.
    pub async fn endpoint_change(&mut self) -> anyhow::Result<EndpointChange> {
        // Anything still in flight from before is not this change's.
        while self.events.try_recv().is_ok() {}
        let others = self.size;
        let start = Instant::now();
        self.spawn(&Arc::new(tokio::sync::Semaphore::new(1)));
        let mut sizes: Vec<(usize, bool)> = Vec::with_capacity(others);
        let mut seen = HashSet::new();
        let mut complete_bytes = 0;
        let mut all_ms = 0.0;
        let deadline = start + Duration::from_secs(300);
        while seen.len() < others || complete_bytes == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some((i, _, at, len, delta))) =
                tokio::time::timeout(left, self.events.recv()).await
            else {
                bail!(
                    "only {} of {others} proxies heard of the new endpoint",
                    seen.len()
                );
            };
            if i == others {
                if complete_bytes == 0 {
                    complete_bytes = len;
                }
            } else if seen.insert(i) {
                sizes.push((len, delta));
                all_ms = at.duration_since(start).as_secs_f64() * 1000.0;
            }
        }
        let mut bytes: Vec<usize> = sizes.iter().map(|(b, _)| *b).collect();
        bytes.sort_unstable();
        Ok(EndpointChange {
            proxies: others,
            p50_bytes: bytes[bytes.len() / 2],
            max_bytes: bytes[bytes.len() - 1],
            deltas: sizes.iter().filter(|(_, d)| *d).count(),
            all_ms,
            complete_bytes,
        })
    }
}
