//! The registry of connected proxies and the snapshots they are sent.
//!
//! Every proxy stream registers here; a registration with an address makes the
//! instance an endpoint of its service. Other replicas' endpoints come in by
//! [`Registry::set_remote_endpoints`] and its siblings. Any change (policy
//! applied, endpoint added or removed, trust, JWK sets) is a publication: a new
//! generation, whose delta from the previous one is made from the change
//! alone (the endpoints and resources are kept by key, not rebuilt) and kept
//! in a bounded log ([`History`]). A stream sends a complete snapshot first,
//! then deltas; one that fell behind gets the deltas it missed as one, or a
//! complete snapshot when they are larger or no longer kept. Complete
//! snapshots are made only when a stream or a caller needs one, sharing the
//! endpoints with the registry. The generation is published on a `watch`
//! channel, which keeps only the latest, so a burst of changes reaches a slow
//! proxy as one push.
//!
//! Snapshot versions are `<policy>.<generation>`, the generation growing with
//! every publication. With a [`GenerationLease`] the generation also keeps
//! growing across restarts: the control plane reserves generations in blocks,
//! durably, and a restart starts after the last block reserved, so no two
//! pushes ever carry the same version.

use crate::discovery::endpoints::{id_of, Endpoints};
use crate::discovery::history::History;
use crate::discovery::lease::GenerationLease;
use crate::metrics::registry::RegistryMetrics;
use crate::policy::store::State;
use parking_lot::{Mutex, MutexGuard};
use remora_proto::v1::{Ack, ProxyStatus, Register, Resource};
use remora_proto::SpiffeId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;

/// Identifies one discovery stream (not one instance: an instance that
/// reconnects gets a new stream id).
pub type StreamId = u64;

impl Proxy {
    /// Whether peers should dial it now.
    fn is_endpoint(&self) -> bool {
        self.endpoint_registered && self.app_serving
    }
}

struct Proxy {
    register: Register,
    connected_since_unix_ms: i64,
    /// The serial (hex) of the certificate its stream's TLS connection was
    /// made with ("" if unknown).
    tls_serial: String,
    /// It sent Deregister: it is leaving.
    deregistered: bool,
    /// Registered with an address and not deregistered (draining).
    endpoint_registered: bool,
    /// Its application can be reached (the proxy's Health reports).
    app_serving: bool,
    sent_version: String,
    acked_version: String,
    last_nack_version: String,
    last_nack_error: String,
    /// The generation of the last snapshot acked (0: none).
    acked_generation: u64,
    connected_at: Instant,
    /// The last snapshot sent and when its push began (for the push latency).
    push_started: Option<(String, Instant)>,
    /// The proxy's certificate, as its last Ack reported it.
    cert_signer_id: String,
    cert_not_after_unix: i64,
    /// Dropped when a newer stream registers the same instance; the old stream
    /// task sees that and ends.
    _replaced: oneshot::Sender<()>,
}

struct Inner {
    policy_version: u64,
    resources: Arc<[Resource]>,
    trust: Trust,
    /// JWK sets fetched for RequestAuthentication `jwksUri`s, by URI.
    jwks: Arc<HashMap<String, String>>,
    endpoints: Endpoints,
    /// What the last publication carried, to make the next one's delta:
    /// its version and what it said of resources, trust and JWK sets.
    published: Option<PublishedState>,
    history: History,
    /// This replica's id ("" with the embedded store).
    replica: String,
    generation: u64,
    lease: Option<GenerationLease>,
    /// The TLS certificate serial each instance id last registered with
    /// (bounded; see [`Registry::register_with`]).
    last_serial: HashMap<String, String>,
    /// When the current snapshot was published.
    published_at: Instant,
    proxies: HashMap<StreamId, Proxy>,
}

/// What the last publication said, beside its endpoints.
struct PublishedState {
    version: String,
    resources: Arc<[Resource]>,
    trust: Trust,
    jwks: Arc<HashMap<String, String>>,
}

/// What snapshots say about trust: the bundle and the current signer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    pub bundle_pem: String,
    pub signer_id: String,
}

/// The generation of a snapshot version ("<policy>.<generation>").
fn generation_of(version: &str) -> Option<u64> {
    version.rsplit_once('.')?.1.parse().ok()
}

/// Instance ids remembered with their last certificate.
const MAX_REMEMBERED_INSTANCES: usize = 65_536;

/// A connected proxy that has not shown it runs on a given signer.
#[derive(Debug, Clone)]
pub struct Behind {
    pub namespace: String,
    pub service: String,
    pub instance_id: String,
    /// The certificate its stream was opened with.
    pub tls_serial: String,
    /// What its last Ack reported ("" / 0: nothing yet).
    pub cert_signer_id: String,
    pub cert_not_after_unix: i64,
}

/// The registry and the snapshot publisher, shared by the discovery and admin
/// services.
pub struct Registry {
    trust_domain: String,
    inner: Mutex<Inner>,
    /// The generation of the last publication.
    snapshots: watch::Sender<u64>,
    /// Bumped whenever the endpoints of the proxies connected here change.
    local_endpoints: watch::Sender<u64>,
    next_stream: AtomicU64,
    /// Set once when the server shuts down; every stream task then ends.
    closing: watch::Sender<bool>,
    /// Woken on every Ack and every proxy that leaves (root rotation follows it).
    proxy_changes: Notify,
    pub metrics: RegistryMetrics,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// A registry serving `state` at `policy_version`, with no trust bundle.
    pub fn new(trust_domain: &str, policy_version: u64, state: &State) -> Registry {
        Registry::with_trust(trust_domain, policy_version, state, Trust::default())
    }

    /// A registry serving `state` at `policy_version` with `trust`.
    pub fn with_trust(
        trust_domain: &str,
        policy_version: u64,
        state: &State,
        trust: Trust,
    ) -> Registry {
        Registry::with_lease(trust_domain, policy_version, state, trust, None)
    }

    /// [`Registry::with_trust`], its generations following `lease` (unique
    /// across restarts).
    pub fn with_lease(
        trust_domain: &str,
        policy_version: u64,
        state: &State,
        trust: Trust,
        lease: Option<GenerationLease>,
    ) -> Registry {
        let registry = Registry {
            trust_domain: trust_domain.to_string(),
            inner: Mutex::new(Inner {
                policy_version,
                resources: Arc::from(resources_of(state)),
                trust,
                jwks: Arc::default(),
                endpoints: Endpoints::default(),
                published: None,
                history: History::default(),
                replica: String::new(),
                generation: lease.as_ref().map_or(0, |l| l.start),
                lease,
                last_serial: HashMap::new(),
                published_at: Instant::now(),
                proxies: HashMap::new(),
            }),
            snapshots: watch::channel(0).0,
            local_endpoints: watch::channel(0).0,
            next_stream: AtomicU64::new(1),
            closing: watch::channel(false).0,
            proxy_changes: Notify::new(),
            metrics: RegistryMetrics::default(),
        };
        registry.publish(&mut registry.lock());
        registry
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // No poisoning (parking_lot): a panic while holding the lock cannot
        // leave `Inner` half-updated in a way that matters more than stopping
        // service would, so keep going.
        self.inner.lock()
    }

    /// The SPIFFE identity of a workload; an error naming the part that
    /// cannot be in a SPIFFE ID.
    pub fn identity(&self, namespace: &str, service: &str) -> Result<SpiffeId, String> {
        SpiffeId::new(&self.trust_domain, namespace, service)
    }

    /// Tells every discovery stream to end (server shutdown).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once [`Registry::close`] was called.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.closing.subscribe();
        async move {
            // An error means the registry is gone, which is closed too.
            let _ = rx.wait_for(|closing| *closing).await;
        }
    }

    /// Follows the generation of the current snapshot.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.snapshots.subscribe()
    }

    pub fn policy_version(&self) -> u64 {
        self.lock().policy_version
    }

    pub fn proxies_connected(&self) -> usize {
        self.lock().proxies.len()
    }

    /// Publishes a new policy state. A version older than the one in force is
    /// ignored, so that concurrent changes can never publish out of order.
    pub fn set_policy(&self, policy_version: u64, state: &State) {
        let mut inner = self.lock();
        if policy_version < inner.policy_version {
            return;
        }
        inner.policy_version = policy_version;
        inner.resources = Arc::from(resources_of(state));
        self.publish(&mut inner);
    }

    /// Publishes a new trust bundle and signer; returns the generation of the
    /// snapshot that carries them.
    pub fn set_trust(&self, trust: Trust) -> u64 {
        let mut inner = self.lock();
        inner.trust = trust;
        self.publish(&mut inner);
        inner.generation
    }

    /// Publishes the JWK sets fetched for `jwksUri`s, if they changed.
    pub fn set_jwks(&self, jwks: HashMap<String, String>) {
        let mut inner = self.lock();
        if *inner.jwks != jwks {
            inner.jwks = Arc::new(jwks);
            self.publish(&mut inner);
        }
    }

    /// Wakes [`Registry::proxy_changed`] (something a rotation waits for
    /// changed outside the registry).
    pub fn notify_changed(&self) {
        self.proxy_changes.notify_one();
    }

    /// Resolves at the next Ack or proxy departure (or at once if one
    /// happened since the last call).
    pub async fn proxy_changed(&self) {
        self.proxy_changes.notified().await;
    }

    /// Every connected proxy that has not both acked a snapshot of
    /// generation `min_generation` or later and reported a certificate from
    /// `signer_id`.
    pub fn behind(&self, signer_id: &str, min_generation: u64) -> Vec<Behind> {
        let inner = self.lock();
        inner
            .proxies
            .values()
            .filter(|p| !(p.acked_generation >= min_generation && p.cert_signer_id == signer_id))
            .map(|p| Behind {
                namespace: p.register.namespace.clone(),
                service: p.register.service.clone(),
                instance_id: p.register.instance_id.clone(),
                tls_serial: p.tls_serial.clone(),
                cert_signer_id: p.cert_signer_id.clone(),
                cert_not_after_unix: p.cert_not_after_unix,
            })
            .collect()
    }

    /// Adds a proxy. Another stream registered with the same instance id is
    /// replaced: its entry and endpoint go, and its stream is told to end.
    /// Returns the new stream's id and a receiver that fires when it is replaced.
    pub fn register(
        &self,
        register: Register,
        now_unix_ms: i64,
    ) -> (StreamId, oneshot::Receiver<()>) {
        let (id, replaced, _) = self.register_with(register, now_unix_ms, "");
        (id, replaced)
    }

    /// [`Registry::register`] of a stream opened with the certificate of
    /// serial `tls_serial`; also returns the serial this instance id last
    /// registered with, when it differs (the caller tells whether the
    /// instance restarted with a new certificate).
    pub fn register_with(
        &self,
        register: Register,
        now_unix_ms: i64,
        tls_serial: &str,
    ) -> (StreamId, oneshot::Receiver<()>, Option<String>) {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let (replaced_tx, replaced_rx) = oneshot::channel();
        let mut inner = self.lock();
        let previous = if tls_serial.is_empty() {
            None
        } else {
            if inner.last_serial.len() >= MAX_REMEMBERED_INSTANCES {
                inner.last_serial.clear();
            }
            inner
                .last_serial
                .insert(register.instance_id.clone(), tls_serial.to_string())
                .filter(|p| p != tls_serial)
        };
        let endpoint = (!register.address.is_empty()).then(|| self.endpoint_of(&register));
        let new_id = endpoint.as_ref().map(id_of);
        let inner = &mut *inner;
        let mut local_changed = false;
        let replaced: Vec<StreamId> = inner
            .proxies
            .iter()
            .filter(|(_, p)| p.register.instance_id == register.instance_id)
            .map(|(id, _)| *id)
            .collect();
        for old in replaced {
            let Some(p) = inner.proxies.remove(&old) else {
                continue;
            };
            let old_id = endpoint_id(&p.register);
            if p.is_endpoint() && Some(&old_id) != new_id.as_ref() {
                local_changed |= inner.endpoints.set_local(old_id, None);
            }
        }
        let endpoint_registered = endpoint.is_some();
        if let (Some(key), Some(endpoint)) = (new_id, endpoint) {
            local_changed |= inner.endpoints.set_local(key, Some(endpoint));
        }
        inner.proxies.insert(
            id,
            Proxy {
                register,
                connected_since_unix_ms: now_unix_ms,
                tls_serial: tls_serial.to_string(),
                deregistered: false,
                endpoint_registered,
                app_serving: true,
                sent_version: String::new(),
                acked_version: String::new(),
                last_nack_version: String::new(),
                last_nack_error: String::new(),
                acked_generation: 0,
                connected_at: Instant::now(),
                push_started: None,
                cert_signer_id: String::new(),
                cert_not_after_unix: 0,
                _replaced: replaced_tx,
            },
        );
        self.metrics.set_proxies_connected(inner.proxies.len());
        self.endpoints_changed(inner, local_changed);
        (id, replaced_rx, previous)
    }

    /// Removes a proxy's endpoint but keeps it registered (Deregister).
    pub fn deregister_endpoint(&self, id: StreamId) {
        let mut inner = self.lock();
        let Some(proxy) = inner.proxies.get_mut(&id) else {
            return;
        };
        proxy.endpoint_registered = false;
        proxy.deregistered = true;
        let changed = self.update_local(&mut inner, id);
        self.endpoints_changed(&mut inner, changed);
    }

    /// Records whether a proxy's application can be reached: an instance
    /// whose application cannot is not an endpoint until it can again.
    pub fn set_serving(&self, id: StreamId, serving: bool) {
        let mut inner = self.lock();
        let Some(proxy) = inner.proxies.get_mut(&id) else {
            return;
        };
        proxy.app_serving = serving;
        let changed = self.update_local(&mut inner, id);
        self.endpoints_changed(&mut inner, changed);
    }

    /// Removes a proxy whose stream ended (no-op if it was already replaced).
    /// Returns the serial of its stream's certificate if it had deregistered
    /// first: it left for good, and so did that certificate.
    pub fn remove(&self, id: StreamId) -> Option<String> {
        let mut inner = self.lock();
        let proxy = inner.proxies.remove(&id)?;
        self.metrics.set_proxies_connected(inner.proxies.len());
        let changed = proxy.is_endpoint()
            && inner
                .endpoints
                .set_local(endpoint_id(&proxy.register), None);
        self.endpoints_changed(&mut inner, changed);
        let left = proxy.deregistered && !proxy.tls_serial.is_empty();
        if left {
            inner.last_serial.remove(&proxy.register.instance_id);
        }
        drop(inner);
        self.proxy_changes.notify_one();
        left.then_some(proxy.tls_serial)
    }

    /// Records a snapshot sent to a proxy; its push latency runs from the
    /// snapshot's publication (or the proxy's connection, if later) when it is
    /// the current one, else from now.
    pub fn record_sent(&self, id: StreamId, version: &str) {
        self.record_sent_locked(&mut self.lock(), id, version);
    }

    fn record_sent_locked(&self, inner: &mut Inner, id: StreamId, version: &str) {
        self.metrics.pushed();
        let now = Instant::now();
        let current = generation_of(version) == Some(inner.generation);
        let published_at = inner.published_at;
        if let Some(proxy) = inner.proxies.get_mut(&id) {
            proxy.sent_version = version.to_string();
            let started = if current {
                published_at.max(proxy.connected_at)
            } else {
                now
            };
            proxy.push_started = Some((version.to_string(), started));
        }
    }

    /// Records an ACK or NACK and the certificate it reports. Only versions
    /// this control plane published count towards a rotation.
    pub fn record_ack(&self, id: StreamId, ack: &Ack) {
        if !ack.ok {
            self.metrics.nacked();
        }
        let mut inner = self.lock();
        let current = inner.generation;
        if let Some(proxy) = inner.proxies.get_mut(&id) {
            if proxy
                .push_started
                .as_ref()
                .is_some_and(|(sent, _)| *sent == ack.version)
            {
                if let Some((_, started)) = proxy.push_started.take() {
                    if ack.ok {
                        self.metrics.acked_after(started.elapsed());
                    }
                }
            }
            if ack.ok {
                proxy.acked_version = ack.version.clone();
                if let Some(g) = generation_of(&ack.version).filter(|g| *g <= current) {
                    proxy.acked_generation = proxy.acked_generation.max(g);
                }
            } else {
                proxy.last_nack_version = ack.version.clone();
                proxy.last_nack_error = ack.error.clone();
            }
            if !ack.cert_signer_id.is_empty() {
                proxy.cert_signer_id = ack.cert_signer_id.clone();
                proxy.cert_not_after_unix = ack.cert_not_after_unix;
            }
        }
        drop(inner);
        self.proxy_changes.notify_one();
    }

    /// Every connected proxy, sorted by namespace, service and instance.
    pub fn status(&self) -> Vec<ProxyStatus> {
        let inner = self.lock();
        let mut out: Vec<ProxyStatus> = inner
            .proxies
            .values()
            .map(|p| ProxyStatus {
                service: p.register.service.clone(),
                namespace: p.register.namespace.clone(),
                instance_id: p.register.instance_id.clone(),
                address: p.register.address.clone(),
                labels: p.register.labels.clone(),
                proxy_version: p.register.proxy_version.clone(),
                sent_version: p.sent_version.clone(),
                acked_version: p.acked_version.clone(),
                last_nack_version: p.last_nack_version.clone(),
                last_nack_error: p.last_nack_error.clone(),
                connected_since_unix_ms: p.connected_since_unix_ms,
                cert_not_after_unix: p.cert_not_after_unix,
                endpoint_registered: p.is_endpoint(),
                cert_signer_id: p.cert_signer_id.clone(),
                replica: inner.replica.clone(),
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.namespace, &a.service, &a.instance_id).cmp(&(
                &b.namespace,
                &b.service,
                &b.instance_id,
            ))
        });
        out
    }
}

/// The documents of a state as snapshot resources, in key order.
pub fn resources_of(state: &State) -> Vec<Resource> {
    state
        .iter()
        .map(|(key, doc)| Resource {
            kind: key.kind.as_str().to_string(),
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            spec_json: doc.get("spec").map(|s| s.to_string()).unwrap_or_default(),
        })
        .collect()
}

mod publish;
mod replicas;

use replicas::endpoint_id;

#[cfg(test)]
mod tests;
