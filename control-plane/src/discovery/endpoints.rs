//! The endpoints snapshots list, kept incrementally: those of the proxies
//! connected to this replica (local) and those other replicas reported
//! (remote, by replica). An instance connected here wins over the same
//! instance reported by another replica, so an instance moving between
//! replicas never disappears: while the replica it left still reports it,
//! that report stands in; once it is connected here, its own registration
//! does.
//!
//! Every change to what snapshots list is remembered until the next
//! publication takes it ([`Endpoints::take_changes`]), so a publication
//! costs the change, not the mesh.

use crate::discovery::push::endpoint_bytes;
use remora_proto::v1::{Endpoint, EndpointKey};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// An endpoint's identity: namespace, service, instance id (the canonical
/// order of snapshots).
pub type EndpointId = (String, String, String);

pub fn id_of(e: &Endpoint) -> EndpointId {
    (
        e.namespace.clone(),
        e.service.clone(),
        e.instance_id.clone(),
    )
}

pub fn id_of_key(k: &EndpointKey) -> EndpointId {
    (
        k.namespace.clone(),
        k.service.clone(),
        k.instance_id.clone(),
    )
}

fn key_of(id: &EndpointId) -> EndpointKey {
    EndpointKey {
        namespace: id.0.clone(),
        service: id.1.clone(),
        instance_id: id.2.clone(),
    }
}

type Map = BTreeMap<EndpointId, Arc<Endpoint>>;

#[derive(Debug, Default)]
pub struct Endpoints {
    local: Map,
    /// By replica id (ordered, so that two replicas reporting one instance
    /// resolve the same way every time).
    remote: BTreeMap<String, Map>,
    /// What snapshots list.
    listed: Map,
    /// What the listed endpoints add to a complete snapshot's encoding.
    listed_bytes: usize,
    /// Listed endpoints changed since the last publication.
    changed: BTreeSet<EndpointId>,
}

impl Endpoints {
    /// Sets (or with None removes) the endpoint of a proxy connected here;
    /// true if the local set changed.
    pub fn set_local(&mut self, id: EndpointId, endpoint: Option<Endpoint>) -> bool {
        let changed = match endpoint {
            Some(e) => {
                if self.local.get(&id).is_some_and(|old| **old == e) {
                    false
                } else {
                    self.local.insert(id.clone(), Arc::new(e));
                    true
                }
            }
            None => self.local.remove(&id).is_some(),
        };
        if changed {
            self.refresh(&id);
        }
        changed
    }

    /// Replaces every endpoint `replica` reported.
    pub fn set_remote(&mut self, replica: &str, endpoints: Vec<Endpoint>) {
        let new: Map = endpoints
            .into_iter()
            .map(|e| (id_of(&e), Arc::new(e)))
            .collect();
        let old = if new.is_empty() {
            self.remote.remove(replica).unwrap_or_default()
        } else {
            self.remote
                .insert(replica.to_string(), new.clone())
                .unwrap_or_default()
        };
        let touched: BTreeSet<&EndpointId> = old
            .iter()
            .filter(|(id, e)| new.get(*id) != Some(*e))
            .map(|(id, _)| id)
            .chain(
                new.iter()
                    .filter(|(id, e)| old.get(*id) != Some(*e))
                    .map(|(id, _)| id),
            )
            .collect();
        for id in touched {
            self.refresh(id);
        }
    }

    /// Adds or replaces one endpoint `replica` reported.
    pub fn upsert_remote(&mut self, replica: &str, endpoint: Endpoint) {
        let id = id_of(&endpoint);
        let map = self.remote.entry(replica.to_string()).or_default();
        if map.get(&id).is_some_and(|old| **old == endpoint) {
            return;
        }
        map.insert(id.clone(), Arc::new(endpoint));
        self.refresh(&id);
    }

    /// Removes one endpoint `replica` reported.
    pub fn remove_remote(&mut self, replica: &str, id: &EndpointId) {
        let Some(map) = self.remote.get_mut(replica) else {
            return;
        };
        if map.remove(id).is_none() {
            return;
        }
        if map.is_empty() {
            self.remote.remove(replica);
        }
        self.refresh(id);
    }

    /// Lists what `id` resolves to now: the local endpoint, else the first
    /// replica's report of it.
    fn refresh(&mut self, id: &EndpointId) {
        let now = self
            .local
            .get(id)
            .or_else(|| self.remote.values().find_map(|m| m.get(id)))
            .cloned();
        let before = self.listed.get(id);
        if before.map(|e| &**e) == now.as_deref() {
            return;
        }
        if let Some(old) = before {
            self.listed_bytes -= endpoint_bytes(old);
        }
        match now {
            Some(e) => {
                self.listed_bytes += endpoint_bytes(&e);
                self.listed.insert(id.clone(), e);
            }
            None => {
                self.listed.remove(id);
            }
        }
        self.changed.insert(id.clone());
    }

    /// Whether anything listed changed since the last [`Endpoints::take_changes`].
    pub fn has_changes(&self) -> bool {
        !self.changed.is_empty()
    }

    /// The endpoints added or changed and the keys of those gone since the
    /// last call, in canonical order: a delta's `endpoints` and
    /// `removed_endpoints`.
    pub fn take_changes(&mut self) -> (Vec<Endpoint>, Vec<EndpointKey>) {
        let mut upserts = Vec::new();
        let mut removed = Vec::new();
        for id in std::mem::take(&mut self.changed) {
            match self.listed.get(&id) {
                Some(e) => upserts.push((**e).clone()),
                None => removed.push(key_of(&id)),
            }
        }
        (upserts, removed)
    }

    /// Every listed endpoint, in canonical order (shared, not copied).
    pub fn listed(&self) -> Vec<Arc<Endpoint>> {
        self.listed.values().cloned().collect()
    }

    /// What the listed endpoints add to a complete snapshot's encoding.
    pub fn listed_bytes(&self) -> usize {
        self.listed_bytes
    }

    /// The endpoints of the proxies connected here, in canonical order.
    pub fn local(&self) -> Vec<Endpoint> {
        self.local.values().map(|e| (**e).clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(id: &str, address: &str) -> Endpoint {
        Endpoint {
            service: "api".into(),
            namespace: "shop".into(),
            instance_id: id.into(),
            address: address.into(),
            ..Endpoint::default()
        }
    }

    fn listed(e: &Endpoints) -> Vec<(String, String)> {
        e.listed()
            .iter()
            .map(|e| (e.instance_id.clone(), e.address.clone()))
            .collect()
    }

    fn pair(id: &str, address: &str) -> (String, String) {
        (id.into(), address.into())
    }

    #[test]
    fn local_wins_over_remote_and_remote_stands_in_when_local_leaves() {
        let mut e = Endpoints::default();
        e.set_remote("r2", vec![ep("a", "10.0.0.2:1"), ep("b", "10.0.0.3:1")]);
        assert_eq!(
            listed(&e),
            [pair("a", "10.0.0.2:1"), pair("b", "10.0.0.3:1")]
        );
        let (up, gone) = e.take_changes();
        assert_eq!((up.len(), gone.len()), (2, 0));
        // "a" moves here: its own registration wins.
        assert!(e.set_local(id_of(&ep("a", "")), Some(ep("a", "10.0.0.1:1"))));
        assert_eq!(listed(&e)[0], pair("a", "10.0.0.1:1"));
        // r2 dropping it changes nothing listed.
        e.take_changes();
        e.remove_remote("r2", &id_of(&ep("a", "")));
        assert!(!e.has_changes());
        // r2 reporting it again while it is local changes nothing either.
        e.upsert_remote("r2", ep("a", "10.0.0.2:1"));
        assert!(!e.has_changes());
        // It leaves here: r2's report stands in at once.
        assert!(e.set_local(id_of(&ep("a", "")), None));
        assert_eq!(listed(&e)[0], pair("a", "10.0.0.2:1"));
        let (up, gone) = e.take_changes();
        assert_eq!(up, vec![ep("a", "10.0.0.2:1")]);
        assert!(gone.is_empty());
        assert_eq!(e.local(), Vec::<Endpoint>::new());
    }

    #[test]
    fn a_replicas_report_replaces_its_last_and_bytes_follow() {
        let mut e = Endpoints::default();
        e.set_remote("r2", vec![ep("a", "1"), ep("b", "1")]);
        let bytes = e.listed_bytes();
        assert_eq!(bytes, 2 * endpoint_bytes(&ep("a", "1")));
        e.take_changes();
        e.set_remote("r2", vec![ep("b", "1"), ep("c", "1")]);
        let (up, gone) = e.take_changes();
        assert_eq!(up, vec![ep("c", "1")]);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].instance_id, "a");
        e.set_remote("r2", Vec::new());
        assert_eq!(e.listed_bytes(), 0);
        assert!(e.listed().is_empty());
        let (up, gone) = e.take_changes();
        assert_eq!((up.len(), gone.len()), (0, 2));
        // Unchanged local endpoints are no change.
        assert!(e.set_local(id_of(&ep("x", "")), Some(ep("x", "1"))));
        assert!(!e.set_local(id_of(&ep("x", "")), Some(ep("x", "1"))));
        assert!(!e.set_local(id_of(&ep("y", "")), None));
    }
}
