//! The proxy's side of the Discovery stream: register, receive snapshots
//! (complete, or deltas merged into the last one: see `incremental`),
//! compile and install each one atomically, ACK or NACK it.
//!
//! When the stream is lost the proxy keeps its last good snapshot and moves
//! to another replica within about a second (a random wait under 1 s, so the
//! proxies of a lost replica do not all arrive at once), then to each next
//! one at once while they fail; once every replica has failed it waits an
//! exponential backoff with full jitter between attempts, still rotating.

use crate::control::control_plane::ControlPlane;
use crate::control::incremental::{OutOfStep, Received};
use crate::control::replicas::Replica;
use crate::data::state::State;
use crate::mesh::Mesh;
use remora_proto::v1::discovery_client::DiscoveryClient;
use remora_proto::v1::{discovery_request, Ack, Deregister, DiscoveryRequest, Health, Register};
use remora_resilience::Backoff;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// Reconnecting: exponential from 100 ms up to 10 s, with full jitter.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

/// Who this proxy registers as.
#[derive(Debug, Clone)]
pub struct Registration {
    pub service: String,
    pub namespace: String,
    pub instance_id: String,
    pub labels: Vec<(String, String)>,
    /// The address peers dial; none: not an endpoint.
    pub advertise: Option<String>,
}

/// The discovery client: this proxy's registration, the control plane it
/// talks to, and the data plane each snapshot is compiled for and installed
/// in.
pub struct Discovery {
    pub control_plane: ControlPlane,
    pub me: Registration,
    pub data: Arc<State>,
}

/// After a lost stream, the wait before the next replica is tried: uniform
/// in [0, this).
const FAILOVER_JITTER: Duration = Duration::from_secs(1);

/// Runs the discovery client until the process ends. `leave` turns true when
/// the proxy drains: the control plane is told to drop this endpoint.
pub async fn run(discovery: Discovery, mut leave: watch::Receiver<bool>) {
    let replicas = discovery.control_plane.replicas.clone();
    let mut retry = Retry::default();
    loop {
        // Discovery is authenticated by the workload certificate.
        discovery.control_plane.identity.wait_for_cert().await;
        let pick = match replicas.pick().await {
            Ok(pick) => pick,
            Err(e) => {
                tracing::warn!(error = %e, "control plane unreachable; serving the last snapshot");
                discovery.connected(false);
                tokio::time::sleep(retry.backoff.next_delay()).await;
                continue;
            }
        };
        let end = session(&discovery, &pick.replica, &mut leave).await;
        discovery.connected(false);
        let replica = &pick.replica;
        match &end {
            Session::Failed(e) => tracing::warn!(error = %e, %replica,
                "control-plane replica unreachable; serving the last snapshot"),
            Session::Lost(e) => tracing::warn!(error = %e, %replica,
                "control-plane stream lost; serving the last snapshot"),
            Session::Resync(e) => tracing::warn!(error = %e, %replica,
                "control-plane stream out of step; reconnecting"),
        }
        if !matches!(end, Session::Resync(_)) {
            replicas.failed(&pick);
        }
        tokio::time::sleep(retry.after(&end, pick.count)).await;
    }
}

/// How a session ended.
#[derive(Debug)]
enum Session {
    /// Could not connect or register.
    Failed(String),
    /// Was connected and got snapshots, then lost the stream.
    Lost(String),
    /// Got a delta it could not merge: reconnects to the same replica for a
    /// complete snapshot.
    Resync(String),
}

/// When to try again.
struct Retry {
    backoff: remora_resilience::backoff::Attempts,
    /// Attempts failed since the last session that got snapshots.
    failed: usize,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            backoff: BACKOFF.attempts(),
            failed: 0,
        }
    }
}

impl Retry {
    /// The wait after a session that ended so, on a rotation of
    /// `candidates`: a lost stream's failover waits a random
    /// time under [`FAILOVER_JITTER`]; the next replicas are tried at once
    /// while some have not failed since; then the backoff applies. A stream
    /// out of step backs off too (a control plane that keeps sending such
    /// deltas is not hammered).
    fn after(&mut self, end: &Session, candidates: usize) -> Duration {
        match end {
            Session::Lost(_) => {
                self.backoff.reset();
                self.failed = 0;
                jitter(FAILOVER_JITTER)
            }
            Session::Failed(_) => {
                self.failed += 1;
                if self.failed < candidates {
                    Duration::ZERO
                } else {
                    self.backoff.next_delay()
                }
            }
            Session::Resync(_) => {
                self.failed = 0;
                self.backoff.next_delay()
            }
        }
    }
}

/// Uniform in [0, `below`).
fn jitter(below: Duration) -> Duration {
    let nanos = u64::try_from(below.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(..nanos.max(1)))
}

impl Discovery {
    /// Whether a discovery session is up. Failing again and again may mean
    /// the control plane no longer accepts this workload's certificate (the
    /// identity slot counts the failures for `refusals`).
    fn connected(&self, up: bool) {
        remora_telemetry::metrics::set_control_plane_connected(up);
        let identity = &self.control_plane.identity;
        if up {
            identity.control_plane_connected();
        } else {
            identity.control_plane_failed();
        }
    }
}

/// One stream with `replica`, until it ends.
async fn session(
    discovery: &Discovery,
    replica: &Replica,
    leave: &mut watch::Receiver<bool>,
) -> Session {
    match stream(discovery, replica, leave).await {
        Ok(never) => match never {},
        Err(end) => end,
    }
}

async fn stream(
    discovery: &Discovery,
    replica: &Replica,
    leave: &mut watch::Receiver<bool>,
) -> Result<std::convert::Infallible, Session> {
    let Discovery {
        control_plane,
        me: s,
        data: state,
    } = discovery;
    let identity = &control_plane.identity;
    let channel = control_plane
        .channel(replica, true)
        .await
        .map_err(Session::Failed)?;
    let mut client = DiscoveryClient::new(channel);
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(8);
    let register = Register {
        service: s.service.clone(),
        namespace: s.namespace.clone(),
        instance_id: s.instance_id.clone(),
        labels: s.labels.iter().cloned().collect(),
        address: s.advertise.clone().unwrap_or_default(),
        proxy_version: env!("CARGO_PKG_VERSION").to_string(),
        running_version: state.mesh.load().version.clone(),
    };
    let send = |kind| DiscoveryRequest { kind: Some(kind) };
    tx.send(send(discovery_request::Kind::Register(register)))
        .await
        .map_err(|_| Session::Failed("stream closed".into()))?;
    if *leave.borrow() {
        let _ = tx
            .send(send(discovery_request::Kind::Deregister(Deregister {})))
            .await;
    }
    let mut health = state.app_health.subscribe();
    // Register implies serving; say so only if it is not.
    let now = health.borrow_and_update().clone();
    if !now.serving {
        let _ = tx.send(send(health_message(now))).await;
    }
    let mut snapshots = client
        .stream(ReceiverStream::new(rx))
        .await
        .map_err(|e| Session::Failed(e.to_string()))?
        .into_inner();
    discovery.connected(true);
    tracing::info!(%replica, "connected to the control plane");
    let own = (s.namespace.as_str(), s.service.as_str());
    let mut got_one = false;
    let mut leave_open = true;
    let mut certs = identity.generations();
    let mut received = Received::default();
    let out_of_step = loop {
        tokio::select! {
            msg = snapshots.message() => {
                let snapshot = match msg {
                    Ok(Some(snap)) => snap,
                    Ok(None) => return Err(lost(got_one, "the control plane closed the stream".into())),
                    Err(e) => return Err(lost(got_one, e.to_string())),
                };
                got_one = true;
                let version = snapshot.version.clone();
                let snapshot = match received.take(snapshot) {
                    Ok(complete) => complete,
                    Err(OutOfStep(error)) => {
                        tracing::warn!(%version, %error, "refused a delta; keeping the previous snapshot");
                        let nack = Ack { version, ok: false, error: error.clone(), ..Default::default() };
                        let _ = tx.send(send(discovery_request::Kind::Ack(nack))).await;
                        break error;
                    }
                };
                identity.set_bundle(&snapshot.trust_bundle_pem);
                identity.check_signer(&snapshot.signer_id);
                let mut ack = match Mesh::compile(snapshot, own, &state.pools, &state.registry) {
                    Ok(mesh) => {
                        state.install(mesh);
                        tracing::info!(%version, "applied snapshot");
                        Ack { version, ok: true, ..Default::default() }
                    }
                    Err(error) => {
                        tracing::warn!(%version, %error, "refused snapshot; keeping the previous one");
                        Ack { version, ok: false, error, ..Default::default() }
                    }
                };
                if let Some(cert) = identity.cert() {
                    ack.cert_signer_id = cert.signer_id.clone();
                    ack.cert_not_after_unix = cert.not_after_unix;
                }
                if tx.send(send(discovery_request::Kind::Ack(ack))).await.is_err() {
                    return Err(lost(got_one, "stream closed".into()));
                }
            }
            r = certs.changed() => {
                // A renewed certificate: tell the control plane (a root
                // rotation finishes once every proxy reports the new signer).
                if r.is_ok() && got_one {
                    if let Some(cert) = identity.cert() {
                        let ack = Ack {
                            version: state.mesh.load().version.clone(),
                            ok: true,
                            cert_signer_id: cert.signer_id.clone(),
                            cert_not_after_unix: cert.not_after_unix,
                            ..Default::default()
                        };
                        if tx.send(send(discovery_request::Kind::Ack(ack))).await.is_err() {
                            return Err(lost(got_one, "stream closed".into()));
                        }
                    }
                }
            }
            r = health.changed() => {
                if r.is_ok() {
                    let now = health.borrow_and_update().clone();
                    if tx.send(send(health_message(now))).await.is_err() {
                        return Err(lost(got_one, "stream closed".into()));
                    }
                }
            }
            r = leave.changed(), if leave_open => {
                leave_open = r.is_ok();
                if leave_open && *leave.borrow() {
                    tracing::info!("leaving: asking the control plane to drop this endpoint");
                    let _ = tx.send(send(discovery_request::Kind::Deregister(Deregister {}))).await;
                }
            }
        }
    };
    // End the stream from this side, so the NACK reaches the control plane
    // before the connection goes: it closes its side once it has read ours.
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(Some(_)) = snapshots.message().await {}
    })
    .await;
    Err(Session::Resync(out_of_step))
}

/// The application's health, as the control plane hears it.
fn health_message(now: crate::data::app_health::Serving) -> discovery_request::Kind {
    discovery_request::Kind::Health(Health {
        serving: now.serving,
        reason: now.reason,
    })
}

fn lost(got_one: bool, e: String) -> Session {
    if got_one {
        Session::Lost(e)
    } else {
        Session::Failed(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed() -> Session {
        Session::Failed("connection refused".into())
    }

    #[test]
    fn a_lost_stream_fails_over_within_a_second_then_each_replica_at_once() {
        let mut retry = Retry::default();
        // Two dead replicas at start: the second is tried at once, then the
        // backoff (its first ceiling is 100 ms).
        assert_eq!(retry.after(&failed(), 3), Duration::ZERO);
        assert_eq!(retry.after(&failed(), 3), Duration::ZERO);
        assert!(retry.after(&failed(), 3) <= Duration::from_millis(100));
        assert!(retry.after(&failed(), 3) <= Duration::from_millis(200));
        assert_eq!(retry.backoff.next_ceiling(), Duration::from_millis(400));
        // A stream that got snapshots, lost: under a second, and the
        // backoff starts over.
        for _ in 0..100 {
            assert!(retry.after(&Session::Lost("reset".into()), 2) < FAILOVER_JITTER);
        }
        assert_eq!(retry.backoff.next_ceiling(), Duration::from_millis(100));
        assert_eq!(
            retry.after(&failed(), 2),
            Duration::ZERO,
            "the other one at once"
        );
        assert!(
            retry.after(&failed(), 2) <= Duration::from_millis(100),
            "both failed"
        );
        // One replica: straight to the backoff.
        let mut retry = Retry::default();
        assert!(retry.after(&failed(), 1) <= Duration::from_millis(100));
    }

    #[test]
    fn the_failover_wait_is_spread_over_the_second() {
        let waits: Vec<Duration> = (0..200).map(|_| jitter(FAILOVER_JITTER)).collect();
        assert!(waits.iter().all(|w| *w < FAILOVER_JITTER));
        assert!(waits.iter().any(|w| *w < Duration::from_millis(250)));
        assert!(waits.iter().any(|w| *w > Duration::from_millis(750)));
    }

    #[test]
    fn a_stream_out_of_step_backs_off_growing() {
        let mut retry = Retry::default();
        let resync = Session::Resync("delta 1.3 is based on 1.2".into());
        assert!(retry.after(&resync, 2) <= Duration::from_millis(100));
        assert!(retry.after(&resync, 2) <= Duration::from_millis(200));
        assert_eq!(retry.backoff.next_ceiling(), Duration::from_millis(400));
    }
}
