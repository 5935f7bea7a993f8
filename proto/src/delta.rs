//! Incremental snapshots: a delta carries what changed since the snapshot
//! `base_version` (see the `Snapshot` message's comment in `remora.proto`).
//!
//! [`diff`] makes the delta between two complete snapshots and [`apply`]
//! merges one into a complete snapshot; `apply(old, diff(old, new))` gives
//! `new`. Both keep the canonical order the control plane publishes in:
//! resources by kind (in [`Kind::ALL`]'s order, unknown kinds after, by
//! name), namespace and name; endpoints by namespace, service and instance.
//! Both run in linear time over sorted input (unsorted input is sorted first).

use crate::policy::Kind;
use crate::v1::{Endpoint, EndpointKey, Resource, ResourceKey, Snapshot};
use std::cmp::Ordering;

/// A resource's or an endpoint's place in the canonical order; equal keys
/// name the same resource or endpoint.
type Key<'a> = (usize, &'a str, &'a str, &'a str);

/// The rank of a kind in the canonical order: its place in [`Kind::ALL`],
/// unknown kinds after every known one.
fn kind_rank(kind: &str) -> usize {
    Kind::ALL
        .iter()
        .position(|k| k.as_str() == kind)
        .unwrap_or(Kind::ALL.len())
}

/// Something with a canonical key: a resource, an endpoint or their keys.
pub trait Keyed {
    fn key(&self) -> Key<'_>;
}

impl Keyed for Resource {
    fn key(&self) -> Key<'_> {
        (
            kind_rank(&self.kind),
            &self.kind,
            &self.namespace,
            &self.name,
        )
    }
}

impl Keyed for ResourceKey {
    fn key(&self) -> Key<'_> {
        (
            kind_rank(&self.kind),
            &self.kind,
            &self.namespace,
            &self.name,
        )
    }
}

impl Keyed for Endpoint {
    fn key(&self) -> Key<'_> {
        (0, &self.namespace, &self.service, &self.instance_id)
    }
}

impl Keyed for EndpointKey {
    fn key(&self) -> Key<'_> {
        (0, &self.namespace, &self.service, &self.instance_id)
    }
}

/// The key of a resource, as a delta names it when removed.
pub fn resource_key(r: &Resource) -> ResourceKey {
    ResourceKey {
        kind: r.kind.clone(),
        namespace: r.namespace.clone(),
        name: r.name.clone(),
    }
}

/// The key of an endpoint, as a delta names it when removed.
pub fn endpoint_key(e: &Endpoint) -> EndpointKey {
    EndpointKey {
        namespace: e.namespace.clone(),
        service: e.service.clone(),
        instance_id: e.instance_id.clone(),
    }
}

/// Orders two keyed things canonically.
pub fn canonical<T: Keyed>(a: &T, b: &T) -> Ordering {
    a.key().cmp(&b.key())
}

/// Sorts `items` canonically unless they already are.
fn sort<T: Keyed>(items: &mut [T]) {
    if !items.is_sorted_by(|a, b| canonical(a, b) != Ordering::Greater) {
        items.sort_by(canonical);
    }
}

/// Sorts a snapshot's resources and endpoints canonically.
pub fn sort_canonical(snapshot: &mut Snapshot) {
    sort(&mut snapshot.resources);
    sort(&mut snapshot.endpoints);
    sort(&mut snapshot.removed_resources);
    sort(&mut snapshot.removed_endpoints);
}

/// Whether a snapshot is a delta (has a base) rather than complete.
pub fn is_delta(snapshot: &Snapshot) -> bool {
    !snapshot.base_version.is_empty()
}

/// Merges `delta` into the complete snapshot `base`, which becomes the
/// complete snapshot of `delta.version`. Refuses (leaving `base` unchanged)
/// a delta that is not one, or whose base is not `base`.
pub fn apply(base: &mut Snapshot, delta: Snapshot) -> Result<(), String> {
    if delta.base_version.is_empty() {
        return Err(format!(
            "snapshot {} is complete, not a delta",
            delta.version
        ));
    }
    if delta.base_version != base.version {
        return Err(format!(
            "delta {} is based on {}, not on the snapshot in force ({})",
            delta.version,
            delta.base_version,
            if base.version.is_empty() {
                "none"
            } else {
                &base.version
            }
        ));
    }
    let Snapshot {
        version,
        policy_version,
        resources,
        endpoints,
        trust_bundle_pem,
        trust_domain,
        signer_id,
        jwks,
        base_version: _,
        removed_resources,
        removed_endpoints,
        trust_changed,
        jwks_changed,
    } = delta;
    base.resources = merge(
        std::mem::take(&mut base.resources),
        resources,
        removed_resources,
    );
    base.endpoints = merge(
        std::mem::take(&mut base.endpoints),
        endpoints,
        removed_endpoints,
    );
    base.version = version;
    base.policy_version = policy_version;
    base.trust_domain = trust_domain;
    if trust_changed {
        base.trust_bundle_pem = trust_bundle_pem;
        base.signer_id = signer_id;
    }
    if jwks_changed {
        base.jwks = jwks;
    }
    base.base_version.clear();
    base.removed_resources.clear();
    base.removed_endpoints.clear();
    base.trust_changed = false;
    base.jwks_changed = false;
    Ok(())
}

/// `base` with `upserts` replacing the items of the same key (or added) and
/// the items named by `removed` gone, in canonical order.
fn merge<T: Keyed, R: Keyed>(mut base: Vec<T>, mut upserts: Vec<T>, mut removed: Vec<R>) -> Vec<T> {
    sort(&mut base);
    sort(&mut upserts);
    sort(&mut removed);
    let mut out = Vec::with_capacity(base.len() + upserts.len());
    let mut upserts = upserts.into_iter().peekable();
    let mut gone = removed.iter().peekable();
    for item in base {
        while let Some(u) = upserts.next_if(|u| canonical(u, &item) == Ordering::Less) {
            push_unique(&mut out, u);
        }
        if let Some(u) = upserts.next_if(|u| canonical(u, &item) == Ordering::Equal) {
            push_unique(&mut out, u);
            continue;
        }
        while gone.next_if(|r| r.key() < item.key()).is_some() {}
        if gone.peek().is_some_and(|r| r.key() == item.key()) {
            continue;
        }
        push_unique(&mut out, item);
    }
    for u in upserts {
        push_unique(&mut out, u);
    }
    out
}

/// Pushes `item`, replacing the last one if it has the same key (a list
/// naming a key twice keeps its last).
fn push_unique<T: Keyed>(out: &mut Vec<T>, item: T) {
    match out.last_mut() {
        Some(last) if canonical(last, &item) == Ordering::Equal => *last = item,
        _ => out.push(item),
    }
}

/// The delta that turns the complete snapshot `old` into the complete
/// snapshot `new`: based on `old.version`, carrying `new`'s version, the
/// resources and endpoints added or changed, the keys of those gone, and the
/// trust fields and JWK sets only if they changed.
pub fn diff(old: &Snapshot, new: &Snapshot) -> Snapshot {
    let (resources, removed_resources) = changes(&old.resources, &new.resources, resource_key);
    let (endpoints, removed_endpoints) = changes(&old.endpoints, &new.endpoints, endpoint_key);
    let trust_changed =
        old.trust_bundle_pem != new.trust_bundle_pem || old.signer_id != new.signer_id;
    let jwks_changed = old.jwks != new.jwks;
    Snapshot {
        version: new.version.clone(),
        policy_version: new.policy_version,
        resources,
        endpoints,
        trust_bundle_pem: if trust_changed {
            new.trust_bundle_pem.clone()
        } else {
            String::new()
        },
        trust_domain: new.trust_domain.clone(),
        signer_id: if trust_changed {
            new.signer_id.clone()
        } else {
            String::new()
        },
        jwks: if jwks_changed {
            new.jwks.clone()
        } else {
            Default::default()
        },
        base_version: old.version.clone(),
        removed_resources,
        removed_endpoints,
        trust_changed,
        jwks_changed,
    }
}

/// The items of `new` that `old` lacks or holds differently, and the keys of
/// those of `old` that `new` lacks, both in canonical order.
fn changes<T: Keyed + Clone + PartialEq, K>(
    old: &[T],
    new: &[T],
    key_of: fn(&T) -> K,
) -> (Vec<T>, Vec<K>) {
    let old = sorted_refs(old);
    let new = sorted_refs(new);
    let mut upserts = Vec::new();
    let mut removed = Vec::new();
    let (mut o, mut n) = (old.into_iter().peekable(), new.into_iter().peekable());
    loop {
        match (o.peek(), n.peek()) {
            (None, None) => break,
            (Some(a), None) => {
                removed.push(key_of(a));
                o.next();
            }
            (None, Some(b)) => {
                upserts.push((*b).clone());
                n.next();
            }
            (Some(a), Some(b)) => match canonical(*a, *b) {
                Ordering::Less => {
                    removed.push(key_of(a));
                    o.next();
                }
                Ordering::Greater => {
                    upserts.push((*b).clone());
                    n.next();
                }
                Ordering::Equal => {
                    if a != b {
                        upserts.push((*b).clone());
                    }
                    o.next();
                    n.next();
                }
            },
        }
    }
    (upserts, removed)
}

/// The resources of `new` that `old` lacks or holds differently, and the
/// keys of those `old` has and `new` lacks (a delta's `resources` and
/// `removed_resources`).
pub fn diff_resources(old: &[Resource], new: &[Resource]) -> (Vec<Resource>, Vec<ResourceKey>) {
    changes(old, new, resource_key)
}

/// One delta with the effect of `deltas` applied in order, each based on
/// the one before: based on the first's base, carrying the last's version.
/// An error if they do not chain (or there are none).
pub fn compose(deltas: &[&Snapshot]) -> Result<Snapshot, String> {
    let (Some(first), Some(last)) = (deltas.first(), deltas.last()) else {
        return Err("no delta to compose".into());
    };
    for pair in deltas.windows(2) {
        if pair[1].base_version != pair[0].version {
            return Err(format!(
                "delta {} is based on {}, not on {}",
                pair[1].version, pair[1].base_version, pair[0].version
            ));
        }
    }
    let mut resources = Changes::default();
    let mut endpoints = Changes::default();
    let mut out = Snapshot {
        version: last.version.clone(),
        policy_version: last.policy_version,
        trust_domain: last.trust_domain.clone(),
        base_version: first.base_version.clone(),
        ..Snapshot::default()
    };
    for d in deltas {
        if !is_delta(d) {
            return Err(format!("snapshot {} is complete, not a delta", d.version));
        }
        resources.add(&d.resources, &d.removed_resources);
        endpoints.add(&d.endpoints, &d.removed_endpoints);
        if d.trust_changed {
            out.trust_changed = true;
            out.trust_bundle_pem.clone_from(&d.trust_bundle_pem);
            out.signer_id.clone_from(&d.signer_id);
        }
        if d.jwks_changed {
            out.jwks_changed = true;
            out.jwks.clone_from(&d.jwks);
        }
    }
    (out.resources, out.removed_resources) = resources.into_parts();
    (out.endpoints, out.removed_endpoints) = endpoints.into_parts();
    Ok(out)
}

/// A canonical key that owns its strings.
type OwnedKey = (usize, String, String, String);

fn owned(k: Key<'_>) -> OwnedKey {
    (k.0, k.1.to_owned(), k.2.to_owned(), k.3.to_owned())
}

/// Upserts and removals gathered over several deltas: the latest word on a
/// key wins.
struct Changes<T, R> {
    upserts: std::collections::BTreeMap<OwnedKey, T>,
    removed: std::collections::BTreeMap<OwnedKey, R>,
}

impl<T, R> Default for Changes<T, R> {
    fn default() -> Self {
        Changes {
            upserts: Default::default(),
            removed: Default::default(),
        }
    }
}

impl<T: Keyed + Clone, R: Keyed + Clone> Changes<T, R> {
    fn add(&mut self, upserts: &[T], removed: &[R]) {
        for r in removed {
            let k = owned(r.key());
            self.upserts.remove(&k);
            self.removed.insert(k, r.clone());
        }
        for u in upserts {
            let k = owned(u.key());
            self.removed.remove(&k);
            self.upserts.insert(k, u.clone());
        }
    }

    fn into_parts(self) -> (Vec<T>, Vec<R>) {
        (
            self.upserts.into_values().collect(),
            self.removed.into_values().collect(),
        )
    }
}

/// References to `items` in canonical order.
fn sorted_refs<T: Keyed>(items: &[T]) -> Vec<&T> {
    let mut refs: Vec<&T> = items.iter().collect();
    sort(&mut refs);
    refs
}

impl<T: Keyed> Keyed for &T {
    fn key(&self) -> Key<'_> {
        (**self).key()
    }
}

#[cfg(test)]
mod tests;
