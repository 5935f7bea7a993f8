//! The proxy's side of the Discovery stream: register, receive snapshots,
//! compile and install each one atomically, ACK or NACK it. When the control
//! plane is gone the proxy keeps its last good snapshot and reconnects with
//! exponential backoff and full jitter.

use crate::control::control_plane::ControlPlane;
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

/// Runs the discovery client until the process ends. `leave` turns true when
/// the proxy drains: the control plane is told to drop this endpoint.
pub async fn run(discovery: Discovery, mut leave: watch::Receiver<bool>) {
    let mut backoff = BACKOFF.attempts();
    loop {
        match session(&discovery, &mut leave).await {
            Ok(()) => {}
            Err(Session::Failed(e)) => {
                tracing::warn!(error = %e, control_plane = %discovery.control_plane.address,
                    "control plane unreachable; serving the last snapshot");
            }
            Err(Session::Lost(e)) => {
                tracing::warn!(error = %e, "control plane stream lost; serving the last snapshot");
                backoff.reset();
            }
        }
        discovery.connected(false);
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

enum Session {
    /// Could not connect or register.
    Failed(String),
    /// Was connected and got snapshots, then lost the stream.
    Lost(String),
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

async fn session(discovery: &Discovery, leave: &mut watch::Receiver<bool>) -> Result<(), Session> {
    let Discovery {
        control_plane,
        me: s,
        data: state,
    } = discovery;
    let identity = &control_plane.identity;
    // Discovery is authenticated by the workload certificate.
    identity.wait_for_cert().await;
    let channel = control_plane.channel(true).await.map_err(Session::Failed)?;
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
    tracing::info!(control_plane = %control_plane.address, "connected to the control plane");
    let own = (s.namespace.as_str(), s.service.as_str());
    let mut got_one = false;
    let mut leave_open = true;
    let mut certs = identity.generations();
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
    }
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
