//! The registry of connected proxies and the current snapshot.
//!
//! Every proxy stream registers here; a registration with an address makes the
//! instance an endpoint of its service. Any change (policy applied, endpoint
//! added or removed) rebuilds the one current [`Snapshot`] and publishes it on a
//! `watch` channel, which every stream task follows. The watch keeps only the
//! latest value, so a burst of changes reaches a slow proxy as one push.

use crate::store::State;
use remora_proto::v1::{Endpoint, ProxyStatus, Register, Resource, Snapshot};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{oneshot, watch};

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
    /// Dropped when a newer stream registers the same instance; the old stream
    /// task sees that and ends.
    _replaced: oneshot::Sender<()>,
}

struct Inner {
    policy_version: u64,
    resources: Vec<Resource>,
    generation: u64,
    proxies: HashMap<StreamId, Proxy>,
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
    /// A registry serving `state` at `policy_version`.
    pub fn new(trust_domain: &str, policy_version: u64, state: &State) -> Registry {
        let (snapshots, _) = watch::channel(Arc::new(Snapshot::default()));
        let registry = Registry {
            trust_domain: trust_domain.to_string(),
            inner: Mutex::new(Inner {
                policy_version,
                resources: resources_of(state),
                generation: 0,
                proxies: HashMap::new(),
            }),
            snapshots,
            next_stream: AtomicU64::new(1),
            closing: watch::channel(false).0,
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
        }
    }

    pub fn record_sent(&self, id: StreamId, version: &str) {
        self.counters.pushes.fetch_add(1, Ordering::Relaxed);
        if let Some(proxy) = self.lock().proxies.get_mut(&id) {
            proxy.sent_version = version.to_string();
        }
    }

    pub fn record_ack(&self, id: StreamId, version: &str, ok: bool, error: &str) {
        if !ok {
            self.counters.nacks.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(proxy) = self.lock().proxies.get_mut(&id) {
            if ok {
                proxy.acked_version = version.to_string();
            } else {
                proxy.last_nack_version = version.to_string();
                proxy.last_nack_error = error.to_string();
            }
        }
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
                cert_not_after_unix: 0,
                endpoint_registered: p.endpoint_registered,
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
            trust_bundle_pem: String::new(),
            trust_domain: self.trust_domain.clone(),
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
mod tests {
    use super::*;

    fn reg(instance: &str, address: &str) -> Register {
        Register {
            service: "backend".into(),
            namespace: "shop".into(),
            instance_id: instance.into(),
            address: address.into(),
            ..Register::default()
        }
    }

    #[test]
    fn registration_publishes_an_endpoint_with_its_identity() {
        let registry = Registry::new("cluster.local", 0, &State::new());
        let first = registry.current_snapshot();
        assert_eq!(first.version, "0.1");
        let (id, _replaced) = registry.register(reg("i1", "10.0.0.1:8080"), 1);
        let snap = registry.current_snapshot();
        assert_eq!(snap.version, "0.2");
        assert_eq!(snap.endpoints.len(), 1);
        assert_eq!(
            snap.endpoints[0].identity,
            "spiffe://cluster.local/ns/shop/sa/backend"
        );
        registry.deregister_endpoint(id);
        assert!(registry.current_snapshot().endpoints.is_empty());
        assert_eq!(registry.proxies_connected(), 1);
        registry.remove(id);
        assert_eq!(registry.proxies_connected(), 0);
    }

    #[test]
    fn a_second_registration_of_an_instance_replaces_the_first() {
        let registry = Registry::new("cluster.local", 0, &State::new());
        let (old, mut old_replaced) = registry.register(reg("i1", "10.0.0.1:1"), 1);
        let (new, _r) = registry.register(reg("i1", "10.0.0.2:1"), 2);
        assert!(old_replaced
            .try_recv()
            .is_err_and(|e| e == oneshot::error::TryRecvError::Closed));
        // The old stream ending must not remove the new registration.
        registry.remove(old);
        let snap = registry.current_snapshot();
        assert_eq!(snap.endpoints.len(), 1);
        assert_eq!(snap.endpoints[0].address, "10.0.0.2:1");
        registry.record_ack(new, "0.3", false, "bad");
        let status = registry.status();
        assert_eq!(status[0].last_nack_error, "bad");
        assert_eq!(registry.counters.nacks.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn older_policy_versions_are_not_published() {
        let registry = Registry::new("cluster.local", 5, &State::new());
        registry.set_policy(4, &State::new());
        assert_eq!(registry.current_snapshot().policy_version, 5);
        registry.set_policy(6, &State::new());
        assert_eq!(registry.current_snapshot().version, "6.2");
    }
}
