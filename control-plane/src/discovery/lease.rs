//! Snapshot generations that stay unique across restarts: the control plane
//! reserves them in blocks, durably (in the identity database), and a
//! restart starts after the last block reserved, so no two pushes ever carry
//! the same version ([`crate::discovery::registry`]).

use crate::identity::db::{DbError, IdentityDb, META};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Generations reserved at a time: a restart skips at most this many.
pub(crate) const LEASE_BLOCK: u64 = 1000;
const LEASE_KEY: &str = "snapshot_generation_reserved";

/// Snapshot generations reserved durably (in the identity database), so that
/// a restarted control plane never publishes a version it published before.
pub struct GenerationLease {
    db: IdentityDb,
    /// Generations up to this one may be used.
    reserved: u64,
    /// Shared store: the block reserved in the background, and whether a
    /// reservation is under way.
    background: Arc<(AtomicU64, AtomicBool)>,
    /// The generation the first snapshot of this process follows.
    pub start: u64,
}

impl std::fmt::Debug for GenerationLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerationLease")
            .field("reserved", &self.reserved)
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}

impl GenerationLease {
    /// Starts after every generation reserved before, and reserves a block.
    /// Blocking (redb).
    /// Replicas sharing the store reserve disjoint blocks (the reservation is
    /// a compare-and-swap), so versions are unique across the mesh.
    pub fn open(db: IdentityDb) -> Result<GenerationLease, DbError> {
        let (start, reserved) = reserve(&db, 0)?;
        Ok(GenerationLease {
            db,
            reserved,
            background: Arc::new((AtomicU64::new(reserved), AtomicBool::new(false))),
            start,
        })
    }

    /// Makes sure `generation` is reserved (a durable write once per block).
    pub(crate) fn cover(&mut self, generation: u64) {
        if self.db.is_shared() {
            return self.cover_in_background(generation);
        }
        if generation <= self.reserved {
            return;
        }
        let next = generation.saturating_add(LEASE_BLOCK);
        match self.db.put(META, LEASE_KEY, next.to_string().as_bytes()) {
            Ok(()) => self.reserved = next,
            Err(e) => tracing::error!(error = %e, generation,
                "cannot reserve snapshot generations: a restart may reuse versions"),
        }
    }

    fn cover_in_background(&mut self, generation: u64) {
        // Shared (etcd): this runs with the registry locked, so nothing here
        // may wait on the network. The next block is reserved in the
        // background half a block ahead; until it is, generations run on
        // (a replica restarting then may reuse some: its proxies reconnect
        // and get complete snapshots, whatever their versions).
        self.reserved = self.reserved.max(self.background.0.load(Ordering::SeqCst));
        if generation + LEASE_BLOCK / 2 <= self.reserved
            || self.background.1.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let (db, background) = (self.db.clone(), self.background.clone());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            background.1.store(false, Ordering::SeqCst);
            return;
        };
        runtime.spawn_blocking(move || {
            match reserve(&db, generation) {
                Ok((_, reserved)) => {
                    background.0.fetch_max(reserved, Ordering::SeqCst);
                }
                Err(e) => tracing::warn!(error = %e, generation,
                    "cannot reserve snapshot generations in the store"),
            }
            background.1.store(false, Ordering::SeqCst);
        });
    }
}

/// Reserves the block after both the stored reservation and `at_least`;
/// returns (the reservation found, the new one).
fn reserve(db: &IdentityDb, at_least: u64) -> Result<(u64, u64), DbError> {
    let mut found = 0;
    let mut reserved = 0;
    db.update(META, LEASE_KEY, |current| {
        found = current
            .and_then(|b| std::str::from_utf8(b).ok()?.parse::<u64>().ok())
            .unwrap_or(0)
            .max(at_least);
        reserved = found.saturating_add(LEASE_BLOCK);
        Ok(Some(reserved.to_string().into_bytes()))
    })?;
    Ok((found, reserved))
}
