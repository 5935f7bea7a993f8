//! The proxy's side of the Discovery stream: register, receive snapshots,
//! compile and install each one atomically, ACK or NACK it. When the control
//! plane is gone the proxy keeps its last good snapshot and reconnects with
//! exponential backoff and full jitter.

use crate::mesh::Mesh;
use crate::state::State;
use remora_proto::v1::discovery_client::DiscoveryClient;
use remora_proto::v1::{discovery_request, Ack, Deregister, DiscoveryRequest, Health, Register};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Exponential backoff with full jitter: a random delay in [0, min(max, base·2ⁿ)].
#[derive(Debug)]
pub struct Backoff {
    attempt: u32,
    base: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            attempt: 0,
            base,
            max,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(fastrand::f64())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Runs the discovery client until the process ends. `leave` turns true when
/// the proxy drains: the control plane is told to drop this endpoint.
pub async fn run(state: Arc<State>, mut leave: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
    loop {
        match session(&state, &mut leave).await {
            Ok(()) => {}
            Err(Session::Failed(e)) => {
                tracing::warn!(error = %e, control_plane = %state.settings.control_plane,
                    "control plane unreachable; serving the last snapshot");
            }
            Err(Session::Lost(e)) => {
                tracing::warn!(error = %e, "control plane stream lost; serving the last snapshot");
                backoff.reset();
            }
        }
        state.set_control_plane_connected(false);
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

enum Session {
    /// Could not connect or register.
    Failed(String),
    /// Was connected and got snapshots, then lost the stream.
    Lost(String),
}

async fn session(state: &Arc<State>, leave: &mut watch::Receiver<bool>) -> Result<(), Session> {
    let s = &state.settings;
    // Discovery is authenticated by the workload certificate.
    state.identity.wait_for_cert().await;
    let channel = crate::control_plane::channel(state, true)
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
    state.set_control_plane_connected(true);
    tracing::info!(control_plane = %s.control_plane, "connected to the control plane");
    let own = (s.namespace.as_str(), s.service.as_str());
    let mut got_one = false;
    let mut leave_open = true;
    let mut certs = state.identity.generations();
    loop {
        tokio::select! {
            msg = snapshots.message() => {
                let snapshot = match msg {
                    Ok(Some(snap)) => snap,
                    Ok(None) => return Err(lost(got_one, "the control plane closed the stream".into())),
                    Err(e) => return Err(lost(got_one, e.to_string())),
                };
                got_one = true;
                let version = snapshot.version.clone();
                state.identity.set_bundle(&snapshot.trust_bundle_pem);
                state.identity.check_signer(&snapshot.signer_id);
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
                if let Some(cert) = state.identity.cert() {
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
                    if let Some(cert) = state.identity.cert() {
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
    }
}

/// The application's health, as the control plane hears it.
fn health_message(now: crate::app_health::Serving) -> discovery_request::Kind {
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

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        for n in 0..20 {
            let d = b.next_delay();
            let cap = Duration::from_millis(100)
                .saturating_mul(1 << n.min(16))
                .min(Duration::from_secs(10));
            assert!(d <= cap, "attempt {n}: {d:?} > {cap:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
