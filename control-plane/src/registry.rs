//! The registry of connected proxies and the current snapshot.
//!
//! Every proxy stream registers here; a registration with an address makes the
//! instance an endpoint of its service. Any change (policy applied, endpoint
//! added or removed) rebuilds the one current [`Snapshot`] and publishes it on a
//! `watch` channel, which every stream task follows. The watch keeps only the
//! latest value, so a burst of changes reaches a slow proxy as one push.

use crate::store::State;
use remora_proto::v1::{Ack, Endpoint, ProxyStatus, Register, Resource, Snapshot};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{oneshot, watch, Notify};

/// Identifies one discovery stream (not one instance: an instance that
/// reconnects gets a new stream id).
pub type StreamId = u64;

/// Counters exported on `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub pushes: AtomicU64,
    pub nacks: AtomicU64,
}

struct Proxy {
    register: Register,
    connected_since_unix_ms: i64,
    endpoint_registered: bool,
    sent_version: String,
    acked_version: String,
    last_nack_version: String,
    last_nack_error: String,
    /// The generation of the last snapshot acked (0: none).
    acked_generation: u64,
    /// The proxy's certificate, as its last Ack reported it.
    cert_signer_id: String,
    cert_not_after_unix: i64,
    /// Dropped when a newer stream registers the same instance; the old stream
    /// task sees that and ends.
    _replaced: oneshot::Sender<()>,
}

struct Inner {
    policy_version: u64,
    resources: Vec<Resource>,
    trust: Trust,
    generation: u64,
    proxies: HashMap<StreamId, Proxy>,
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

/// The registry and the snapshot publisher, shared by the discovery and admin
/// services.
pub struct Registry {
    trust_domain: String,
    inner: Mutex<Inner>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    next_stream: AtomicU64,
    /// Set once when the server shuts down; every stream task then ends.
    closing: watch::Sender<bool>,
    /// Woken on every Ack and every proxy that leaves (root rotation follows it).
    proxy_changes: Notify,
    pub counters: Counters,
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
        let (snapshots, _) = watch::channel(Arc::new(Snapshot::default()));
        let registry = Registry {
            trust_domain: trust_domain.to_string(),
            inner: Mutex::new(Inner {
                policy_version,
                resources: resources_of(state),
                trust,
                generation: 0,
                proxies: HashMap::new(),
            }),
            snapshots,
            next_stream: AtomicU64::new(1),
            closing: watch::channel(false).0,
            proxy_changes: Notify::new(),
            counters: Counters::default(),
        };
        registry.publish(&mut registry.lock());
        registry
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-updated in a
        // way that matters more than stopping service would, so keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The SPIFFE identity of a workload.
    pub fn identity(&self, namespace: &str, service: &str) -> String {
        format!("spiffe://{}/ns/{namespace}/sa/{service}", self.trust_domain)
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

    /// Follows the current snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.subscribe()
    }

    pub fn current_snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
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
        inner.resources = resources_of(state);
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

    /// Resolves at the next Ack or proxy departure (or at once if one
    /// happened since the last call).
    pub async fn proxy_changed(&self) {
        self.proxy_changes.notified().await;
    }

    /// Whether at least one proxy is connected and every connected proxy has
    /// acked a snapshot of generation `min_generation` or later and runs a
    /// certificate from `signer_id`.
    pub fn all_on_signer(&self, signer_id: &str, min_generation: u64) -> bool {
        let inner = self.lock();
        !inner.proxies.is_empty()
            && inner
                .proxies
                .values()
                .all(|p| p.acked_generation >= min_generation && p.cert_signer_id == signer_id)
    }

    /// Adds a proxy. Another stream registered with the same instance id is
    /// replaced: its entry and endpoint go, and its stream is told to end.
    /// Returns the new stream's id and a receiver that fires when it is replaced.
    pub fn register(
        &self,
        register: Register,
        now_unix_ms: i64,
    ) -> (StreamId, oneshot::Receiver<()>) {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let (replaced_tx, replaced_rx) = oneshot::channel();
        let mut inner = self.lock();
        let before = endpoint_count(&inner);
        inner
            .proxies
            .retain(|_, p| p.register.instance_id != register.instance_id);
        let endpoint_registered = !register.address.is_empty();
        inner.proxies.insert(
            id,
            Proxy {
                register,
                connected_since_unix_ms: now_unix_ms,
                endpoint_registered,
                sent_version: String::new(),
                acked_version: String::new(),
                last_nack_version: String::new(),
                last_nack_error: String::new(),
                acked_generation: 0,
                cert_signer_id: String::new(),
                cert_not_after_unix: 0,
                _replaced: replaced_tx,
            },
        );
        if endpoint_registered || endpoint_count(&inner) != before {
            self.publish(&mut inner);
        }
        (id, replaced_rx)
    }

    /// Removes a proxy's endpoint but keeps it registered (Deregister).
    pub fn deregister_endpoint(&self, id: StreamId) {
        let mut inner = self.lock();
        let Some(proxy) = inner.proxies.get_mut(&id) else {
            return;
        };
        if std::mem::take(&mut proxy.endpoint_registered) {
            self.publish(&mut inner);
        }
    }

    /// Removes a proxy whose stream ended (no-op if it was already replaced).
    pub fn remove(&self, id: StreamId) {
        let mut inner = self.lock();
        if let Some(proxy) = inner.proxies.remove(&id) {
            if proxy.endpoint_registered {
                self.publish(&mut inner);
            }
            self.proxy_changes.notify_one();
        }
    }

    pub fn record_sent(&self, id: StreamId, version: &str) {
        self.counters.pushes.fetch_add(1, Ordering::Relaxed);
        if let Some(proxy) = self.lock().proxies.get_mut(&id) {
            proxy.sent_version = version.to_string();
        }
    }

    /// Records an ACK or NACK and the certificate it reports. Only versions
    /// this control plane published count towards a rotation.
    pub fn record_ack(&self, id: StreamId, ack: &Ack) {
        if !ack.ok {
            self.counters.nacks.fetch_add(1, Ordering::Relaxed);
        }
        let mut inner = self.lock();
        let current = inner.generation;
        if let Some(proxy) = inner.proxies.get_mut(&id) {
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
                endpoint_registered: p.endpoint_registered,
                cert_signer_id: p.cert_signer_id.clone(),
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

    /// Rebuilds the snapshot from `inner` and publishes it. Called with the lock
    /// held, so snapshots are published in the order the changes happened.
    fn publish(&self, inner: &mut Inner) {
        inner.generation += 1;
        let mut endpoints: Vec<Endpoint> = inner
            .proxies
            .values()
            .filter(|p| p.endpoint_registered)
            .map(|p| Endpoint {
                service: p.register.service.clone(),
                namespace: p.register.namespace.clone(),
                instance_id: p.register.instance_id.clone(),
                address: p.register.address.clone(),
                labels: p.register.labels.clone(),
                identity: self.identity(&p.register.namespace, &p.register.service),
            })
            .collect();
        endpoints.sort_by(|a, b| {
            (&a.namespace, &a.service, &a.instance_id).cmp(&(
                &b.namespace,
                &b.service,
                &b.instance_id,
            ))
        });
        let snapshot = Snapshot {
            version: format!("{}.{}", inner.policy_version, inner.generation),
            policy_version: inner.policy_version,
            resources: inner.resources.clone(),
            endpoints,
            trust_bundle_pem: inner.trust.bundle_pem.clone(),
            trust_domain: self.trust_domain.clone(),
            signer_id: inner.trust.signer_id.clone(),
        };
        self.snapshots.send_replace(Arc::new(snapshot));
    }
}

fn endpoint_count(inner: &Inner) -> usize {
    inner
        .proxies
        .values()
        .filter(|p| p.endpoint_registered)
        .count()
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

#[cfg(test)]
#[path = "registry_tests.rs"]
mod tests;
