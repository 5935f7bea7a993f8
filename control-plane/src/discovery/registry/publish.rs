//! Publications ([`Registry::publish`]) and what a stream sends next
//! ([`Registry::next_message`]): deltas made from the change alone, complete
//! snapshots made when needed.

use super::{Inner, PublishedState, Registry, StreamId};
use crate::discovery::history::Outgoing;
use crate::discovery::push::{resource_bytes, Complete, Delta};
use remora_proto::v1::Snapshot;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::time::Instant;

impl Registry {
    /// The current snapshot, complete (made now if no stream needed it yet;
    /// its endpoints are shared with the registry, not copied).
    pub fn current_snapshot(&self) -> Arc<Complete> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        if let Some(c) = inner.history.complete_of(inner.generation) {
            return c;
        }
        let complete = self.make_complete(inner);
        inner.history.keep_complete(complete)
    }

    /// The next message for stream `id`, which last sent the snapshot of
    /// generation `after` (None: nothing yet), recorded as sent to it; None
    /// when it is up to date. See [`History::next`].
    pub fn next_message(&self, id: StreamId, after: Option<u64>) -> Option<Outgoing> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let complete_len = complete_len(inner);
        // Out while it calls back for a complete snapshot of `inner`
        // (taking an empty one allocates nothing).
        let mut history = std::mem::take(&mut inner.history);
        let out = history.next(after, inner.generation, complete_len, || {
            self.make_complete(inner)
        });
        inner.history = history;
        let out = out?;
        self.record_sent_locked(inner, id, out.version());
        Some(out)
    }

    /// Deltas kept for streams that fall behind, and their bytes.
    pub fn deltas_retained(&self) -> (usize, usize) {
        self.lock().history.retained()
    }

    /// The complete snapshot of the current state.
    pub(super) fn make_complete(&self, inner: &Inner) -> Complete {
        Complete::new(
            inner.generation,
            inner.policy_version,
            inner.resources.clone(),
            inner.endpoints.listed(),
            (
                inner.trust.bundle_pem.clone(),
                self.trust_domain.clone(),
                inner.trust.signer_id.clone(),
            ),
            inner.jwks.clone(),
        )
    }

    /// Publishes a new generation: its delta from the previous publication
    /// is made from what changed (endpoints by key, resources by diffing the
    /// policy's, trust and JWK sets by comparing). Called with the lock held,
    /// so publications are made in the order the changes happened.
    pub(super) fn publish(&self, inner: &mut Inner) {
        let base_generation = inner.generation;
        inner.generation += 1;
        let generation = inner.generation;
        if let Some(lease) = inner.lease.as_mut() {
            lease.cover(generation);
        }
        inner.published_at = Instant::now();
        self.metrics
            .set_versions(inner.policy_version, inner.generation);
        let version = format!("{}.{}", inner.policy_version, inner.generation);
        let (endpoints, removed_endpoints) = inner.endpoints.take_changes();
        let now = PublishedState {
            version: version.clone(),
            resources: inner.resources.clone(),
            trust: inner.trust.clone(),
            jwks: inner.jwks.clone(),
        };
        if let Some(before) = inner.published.replace(now) {
            let (resources, removed_resources) = if Arc::ptr_eq(&before.resources, &inner.resources)
            {
                Default::default()
            } else {
                remora_proto::delta::diff_resources(&before.resources, &inner.resources)
            };
            let trust_changed = before.trust != inner.trust;
            let jwks_changed = before.jwks != inner.jwks;
            let delta = Snapshot {
                version,
                policy_version: inner.policy_version,
                resources,
                endpoints,
                trust_bundle_pem: if trust_changed {
                    inner.trust.bundle_pem.clone()
                } else {
                    String::new()
                },
                trust_domain: self.trust_domain.clone(),
                signer_id: if trust_changed {
                    inner.trust.signer_id.clone()
                } else {
                    String::new()
                },
                jwks: if jwks_changed {
                    (*inner.jwks).clone()
                } else {
                    HashMap::new()
                },
                base_version: before.version,
                removed_resources,
                removed_endpoints,
                trust_changed,
                jwks_changed,
            };
            inner
                .history
                .push(Delta::new(base_generation, generation, delta));
        }
        self.snapshots.send_replace(generation);
    }
}

/// About what a complete snapshot of `inner` takes on the wire.
pub(super) fn complete_len(inner: &Inner) -> usize {
    let head = 64
        + inner.trust.bundle_pem.len()
        + inner.trust.signer_id.len()
        + inner
            .jwks
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum::<usize>();
    head + inner.resources.iter().map(resource_bytes).sum::<usize>()
        + inner.endpoints.listed_bytes()
}
