//! The endpoints of the proxies connected here (local) as they change, and
//! those other replicas report (remote): see [`crate::discovery::endpoints`].

use super::{Inner, Registry, StreamId};
use crate::discovery::endpoints::{id_of_key, EndpointId};
use remora_proto::v1::{Endpoint, EndpointKey, Register};
use remora_proto::SpiffeId;
use tokio::sync::watch;

impl Registry {
    /// The endpoint a registered proxy stands for.
    pub(super) fn endpoint_of(&self, r: &Register) -> Endpoint {
        Endpoint {
            service: r.service.clone(),
            namespace: r.namespace.clone(),
            instance_id: r.instance_id.clone(),
            address: r.address.clone(),
            labels: r.labels.clone(),
            // A proxy registers only with a certificate for its identity,
            // so its names make one.
            identity: self
                .identity(&r.namespace, &r.service)
                .map(SpiffeId::into_string)
                .unwrap_or_default(),
        }
    }

    /// Lists proxy `id`'s endpoint or not, as it now is one or not; true
    /// if the local endpoints changed.
    pub(super) fn update_local(&self, inner: &mut Inner, id: StreamId) -> bool {
        let Some(p) = inner.proxies.get(&id) else {
            return false;
        };
        let endpoint = p.is_endpoint().then(|| self.endpoint_of(&p.register));
        let key = endpoint_id(&p.register);
        inner.endpoints.set_local(key, endpoint)
    }

    /// Publishes what changed in the endpoints, if anything did, and tells
    /// the followers of local endpoints if those changed.
    pub(super) fn endpoints_changed(&self, inner: &mut Inner, local_changed: bool) {
        if inner.endpoints.has_changes() {
            self.publish(inner);
        }
        if local_changed {
            self.local_endpoints.send_modify(|n| *n += 1);
        }
    }

    /// Names this replica (in `status()`); reports of endpoints under this
    /// name are its own, and ignored.
    pub fn set_replica_id(&self, id: &str) {
        self.lock().replica = id.to_string();
    }

    /// Replaces every endpoint replica `replica` reported with `endpoints`
    /// (none: it is gone). A proxy connected here wins over the same
    /// instance reported by another replica.
    pub fn set_remote_endpoints(&self, replica: &str, endpoints: Vec<Endpoint>) {
        let mut inner = self.lock();
        if replica == inner.replica {
            return;
        }
        inner.endpoints.set_remote(replica, endpoints);
        self.endpoints_changed(&mut inner, false);
    }

    /// Adds or replaces one endpoint replica `replica` reported.
    pub fn upsert_remote_endpoint(&self, replica: &str, endpoint: Endpoint) {
        let mut inner = self.lock();
        if replica == inner.replica {
            return;
        }
        inner.endpoints.upsert_remote(replica, endpoint);
        self.endpoints_changed(&mut inner, false);
    }

    /// Removes one endpoint replica `replica` reported.
    pub fn remove_remote_endpoint(&self, replica: &str, key: &EndpointKey) {
        let mut inner = self.lock();
        inner.endpoints.remove_remote(replica, &id_of_key(key));
        self.endpoints_changed(&mut inner, false);
    }

    /// The endpoints of the proxies connected to this replica, in
    /// namespace, service, instance order.
    pub fn local_endpoints(&self) -> Vec<Endpoint> {
        self.lock().endpoints.local()
    }

    /// A counter bumped whenever [`Registry::local_endpoints`] changes.
    pub fn subscribe_local_endpoints(&self) -> watch::Receiver<u64> {
        self.local_endpoints.subscribe()
    }
}

/// The endpoint id of a registered proxy.
pub(super) fn endpoint_id(r: &Register) -> EndpointId {
    (
        r.namespace.clone(),
        r.service.clone(),
        r.instance_id.clone(),
    )
}
