//! The `remora.v1.Discovery` service: one bidirectional stream per proxy.
//!
//! The stream needs a client certificate (from `Identity.Certify`) whose URI
//! SAN is exactly the SPIFFE ID of the service and namespace the Register
//! names: no certificate is UNAUTHENTICATED, another identity is
//! PERMISSION_DENIED. So only a workload that proved its identity can make
//! itself an endpoint of its service.
//!
//! The proxy's first message registers it (and, with an address, its endpoint);
//! the control plane answers with a complete snapshot and then, at every
//! change, a delta from the last snapshot it sent (see
//! [`crate::discovery::history`] for when it sends a complete one instead).
//! The proxy ACKs or NACKs each version. When the stream closes or fails —
//! including when HTTP/2 keepalive finds the proxy gone — the proxy and its
//! endpoint are removed.
//!
//! For root rotations ([`crate::identity::issued`]): a proxy that deregistered before
//! its stream closed left for good, so the certificates it held are no
//! longer in use; so are those of an instance that registers again with a
//! certificate not renewed from its previous one (it restarted).

use crate::discovery::push::{Discovery, EncodedSnapshot};
use crate::discovery::registry::{Registry, StreamId};
use crate::identity::issued::Ledger;
use remora_proto::util::now_unix_ms;
use remora_proto::v1::discovery_request::Kind as RequestKind;
use remora_proto::v1::{Ack, DiscoveryRequest, Register};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// How long a new stream may take to send its Register.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Snapshots queued for one proxy. What to send is decided when there is
/// room (all that changed since the last one sent, as one message), so a
/// slow proxy holds at most this many, none larger than a complete snapshot.
const OUTBOUND_QUEUE: usize = 4;
/// The longest string field a Register may carry; longer ones are refused.
const MAX_FIELD_LEN: usize = 1024;
/// The most labels a Register may carry.
const MAX_LABELS: usize = 64;

#[derive(Debug, Clone)]
pub struct DiscoveryService {
    registry: Arc<Registry>,
    ledger: Arc<Ledger>,
}

impl DiscoveryService {
    pub fn new(registry: Arc<Registry>, ledger: Arc<Ledger>) -> DiscoveryService {
        DiscoveryService { registry, ledger }
    }
}

/// Marks `serial` (and what was renewed from it) as no longer in use.
async fn left(registry: &Registry, ledger: &Arc<Ledger>, serial: String) {
    let ledger = ledger.clone();
    let done = tokio::task::spawn_blocking(move || ledger.left(&serial)).await;
    if let Ok(Err(e)) = done {
        tracing::warn!(error = %e, "cannot record a departed workload's certificates");
    }
    // A rotation may have been waiting for them.
    registry.notify_changed();
}

/// Checks what a proxy says about itself before it enters the registry.
fn check_register(r: &Register) -> Result<(), Status> {
    for (field, value) in [
        ("service", &r.service),
        ("namespace", &r.namespace),
        ("instance_id", &r.instance_id),
    ] {
        if value.is_empty() {
            return Err(Status::invalid_argument(format!(
                "register.{field} is required"
            )));
        }
    }
    let too_long = [
        &r.service,
        &r.namespace,
        &r.instance_id,
        &r.address,
        &r.proxy_version,
        &r.running_version,
    ]
    .into_iter()
    .chain(r.labels.iter().flat_map(|(k, v)| [k, v]))
    .any(|s| s.len() > MAX_FIELD_LEN);
    if too_long {
        return Err(Status::invalid_argument(format!(
            "register: a field is longer than {MAX_FIELD_LEN} bytes"
        )));
    }
    if r.labels.len() > MAX_LABELS {
        return Err(Status::invalid_argument(format!(
            "register: more than {MAX_LABELS} labels"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = ReceiverStream<Result<EncodedSnapshot, Status>>;

    /// Answers at once and reads the Register in the stream task, so that a
    /// proxy may send its Register before or after the call returns. A
    /// refused registration ends the response stream with the error.
    async fn stream(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let Some(peer) = crate::identity::peer::peer_spiffe_id(&request)? else {
            tracing::warn!(peer = ?request.remote_addr(), "discovery stream without a client certificate refused");
            return Err(Status::unauthenticated(
                "a discovery stream needs a client certificate: get one from Identity.Certify \
                 and present it in the TLS handshake",
            ));
        };
        let serial = crate::identity::peer::peer_serial(&request).unwrap_or_default();
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        tokio::spawn(accept(
            self.registry.clone(),
            self.ledger.clone(),
            (peer, serial),
            request.into_inner(),
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Waits for the stream's Register and checks it.
async fn read_register(inbound: &mut Streaming<DiscoveryRequest>) -> Result<Register, Status> {
    let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
        .await
        .map_err(|_| {
            Status::deadline_exceeded(format!(
                "no Register within {}s",
                REGISTER_TIMEOUT.as_secs()
            ))
        })??;
    let register = match first.and_then(|m| m.kind) {
        Some(RequestKind::Register(r)) => r,
        _ => {
            return Err(Status::invalid_argument(
                "the first message on a discovery stream must be a Register",
            ))
        }
    };
    check_register(&register)?;
    Ok(register)
}

/// Registers the proxy, serves it, and removes it when its stream ends.
/// `peer`: the SPIFFE ID and serial of its certificate.
async fn accept(
    registry: Arc<Registry>,
    ledger: Arc<Ledger>,
    (peer, serial): (String, String),
    mut inbound: Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<Result<EncodedSnapshot, Status>>,
) {
    let registered = tokio::select! {
        r = read_register(&mut inbound) => r.and_then(|register| {
            match registry.identity(&register.namespace, &register.service) {
                Ok(claimed) if claimed == peer => Ok(register),
                Ok(claimed) => Err(Status::permission_denied(format!(
                    "the client certificate is for {peer}, but the Register claims {claimed}"
                ))),
                Err(why) => Err(Status::permission_denied(format!(
                    "the client certificate is for {peer}, but the Register claims no \
                     identity: {why}"
                ))),
            }
        }),
        _ = registry.closed() => Err(Status::unavailable("the control plane is shutting down")),
    };
    let register = match registered {
        Ok(register) => register,
        Err(status) => {
            tracing::warn!(error = %status.message(), "discovery stream refused");
            let _ = tx.try_send(Err(status));
            return;
        }
    };
    tracing::info!(
        service = %register.service,
        namespace = %register.namespace,
        instance = %register.instance_id,
        address = %register.address,
        proxy_version = %register.proxy_version,
        "proxy registered"
    );
    let (id, replaced, previous) = registry.register_with(register, now_unix_ms(), &serial);
    if let Some(previous) = previous {
        // The same instance with a certificate not renewed from its last
        // one: it restarted, and its previous certificates are out of use.
        if !ledger.chain(&previous).contains(&serial) {
            left(&registry, &ledger, previous).await;
        }
    }
    let snapshots = registry.subscribe();
    run_stream(&registry, id, inbound, tx, snapshots, replaced).await;
    if let Some(serial) = registry.remove(id) {
        left(&registry, &ledger, serial).await;
    }
}

/// Serves one registered proxy until its stream ends (the caller removes it).
async fn run_stream(
    registry: &Registry,
    id: StreamId,
    mut inbound: Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<Result<EncodedSnapshot, Status>>,
    mut snapshots: watch::Receiver<u64>,
    mut replaced: oneshot::Receiver<()>,
) {
    let end = serve_proxy(
        registry,
        id,
        &mut inbound,
        &tx,
        &mut snapshots,
        &mut replaced,
    )
    .await;
    match end {
        End::Closed => tracing::info!(stream = id, "proxy disconnected"),
        End::Failed(status) => {
            tracing::info!(stream = id, error = %status.message(), "proxy stream ended with an error");
        }
        End::Shutdown => {
            let _ = tx.try_send(Err(Status::unavailable(
                "the control plane is shutting down",
            )));
        }
        End::Refused(status) => {
            tracing::warn!(stream = id, error = %status.message(), "proxy stream refused");
            // Best effort: the proxy may already be gone.
            let _ = tx.try_send(Err(status));
        }
    }
}

enum End {
    /// The proxy closed its stream or stopped reading.
    Closed,
    /// The transport failed (reset, keepalive timeout...).
    Failed(Status),
    /// The control plane ends the stream with this status.
    Refused(Status),
    /// The control plane is shutting down.
    Shutdown,
}

async fn serve_proxy(
    registry: &Registry,
    id: StreamId,
    inbound: &mut Streaming<DiscoveryRequest>,
    tx: &mpsc::Sender<Result<EncodedSnapshot, Status>>,
    snapshots: &mut watch::Receiver<u64>,
    replaced: &mut oneshot::Receiver<()>,
) -> End {
    let closed = registry.closed();
    tokio::pin!(closed);
    // The generation of the last snapshot sent (None: nothing yet).
    let mut sent: Option<u64> = None;
    loop {
        let current = *snapshots.borrow_and_update();
        if sent.is_none_or(|g| g < current) {
            // Sending waits while the proxy's queue is full; keep watching the
            // inbound side meanwhile so that ACKs and a close are not missed.
            // What to send is decided once there is room: everything since
            // the last snapshot sent.
            tokio::select! {
                permit = tx.reserve() => match permit {
                    Ok(permit) => {
                        if let Some(out) = registry.next_message(id, sent) {
                            sent = Some(out.generation());
                            permit.send(Ok(out.encoded()));
                        }
                    }
                    Err(_) => return End::Closed,
                },
                msg = inbound.message() => {
                    if let Some(end) = handle_message(registry, id, msg) {
                        return end;
                    }
                }
                _ = &mut *replaced => return replaced_end(),
                _ = &mut closed => return End::Shutdown,
            }
            continue;
        }
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return End::Shutdown;
                }
            }
            msg = inbound.message() => {
                if let Some(end) = handle_message(registry, id, msg) {
                    return end;
                }
            }
            _ = &mut *replaced => return replaced_end(),
            _ = &mut closed => return End::Shutdown,
            _ = tx.closed() => return End::Closed,
        }
    }
}

fn replaced_end() -> End {
    End::Refused(Status::aborted(
        "replaced by a newer registration of the same instance id",
    ))
}

/// Applies one inbound message; `Some` ends the stream.
fn handle_message(
    registry: &Registry,
    id: StreamId,
    msg: Result<Option<DiscoveryRequest>, Status>,
) -> Option<End> {
    let request = match msg {
        Ok(Some(request)) => request,
        Ok(None) => return Some(End::Closed),
        Err(status) => return Some(End::Failed(status)),
    };
    match request.kind {
        Some(RequestKind::Ack(ack)) => {
            if ack.ok {
                tracing::debug!(stream = id, version = %ack.version, "snapshot acked");
            } else {
                tracing::warn!(stream = id, version = %ack.version, error = %ack.error, "snapshot refused (NACK)");
            }
            let clip = |s: &str| s.chars().take(MAX_FIELD_LEN).collect::<String>();
            let ack = Ack {
                version: clip(&ack.version),
                ok: ack.ok,
                error: clip(&ack.error),
                cert_signer_id: clip(&ack.cert_signer_id),
                cert_not_after_unix: ack.cert_not_after_unix,
            };
            registry.record_ack(id, &ack);
            None
        }
        Some(RequestKind::Deregister(_)) => {
            tracing::info!(stream = id, "proxy deregistered its endpoint");
            registry.deregister_endpoint(id);
            None
        }
        Some(RequestKind::Health(health)) => {
            let reason: String = health.reason.chars().take(MAX_FIELD_LEN).collect();
            if health.serving {
                tracing::info!(stream = id, "proxy's application is serving again");
            } else {
                tracing::warn!(stream = id, %reason, "proxy's application is unreachable; endpoint withdrawn");
            }
            registry.set_serving(id, health.serving);
            None
        }
        Some(RequestKind::Register(_)) => Some(End::Refused(Status::invalid_argument(
            "Register may only be sent once per stream",
        ))),
        None => Some(End::Refused(Status::invalid_argument(
            "empty discovery request",
        ))),
    }
}
