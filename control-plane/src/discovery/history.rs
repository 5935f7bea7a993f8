//! What the registry keeps to serve incremental pushes: the deltas of the
//! recent publications (bounded), the last complete snapshot made, and the
//! deltas composed for streams that are more than one publication behind.
//!
//! A stream asks for the next message after the generation it last sent
//! ([`History::next`]):
//! - nothing sent yet: a complete snapshot: in a large mesh the last one
//!   made when the deltas since are small beside it (the stream catches up
//!   with a delta next), else the current one (made once per generation);
//! - one publication behind: that publication's delta, encoded once and
//!   shared by every stream;
//! - several behind: one delta composing them (made once per starting
//!   generation and shared by the streams that start there), unless the log
//!   no longer reaches back that far or the deltas together are larger than
//!   a complete snapshot: then the current complete snapshot.
//!
//! So a change costs each proxy bytes in proportion to the change, and a
//! burst reaches a slow proxy as one message no larger than the mesh.

use crate::discovery::push::{Complete, Delta, EncodedSnapshot};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Publications whose deltas are kept.
pub const MAX_DELTAS: usize = 1024;
/// The most bytes of deltas kept.
pub const MAX_DELTA_BYTES: usize = 16 << 20;
/// Composed deltas kept for the current generation (one per starting one).
const MAX_COMPOSED: usize = 256;
/// A new stream gets the last complete snapshot made (and then a delta)
/// while the deltas since are less than this fraction of its size...
const STALE_COMPLETE_FRACTION: usize = 4;
/// ...and it is at least this large: a smaller one costs little to make
/// afresh, and a new stream's first snapshot is then the current one. (When
/// thousands of proxies connect at once to a large mesh, each registration
/// is a publication: this spares making and encoding the mesh for each.)
const REUSE_COMPLETE_BYTES: usize = 256 << 10;

/// The next message of a stream.
#[derive(Debug, Clone)]
pub enum Outgoing {
    Complete(Arc<Complete>),
    Delta(Arc<Delta>),
}

impl Outgoing {
    /// The generation the proxy is at once it has this.
    pub fn generation(&self) -> u64 {
        match self {
            Outgoing::Complete(c) => c.generation,
            Outgoing::Delta(d) => d.generation,
        }
    }

    pub fn version(&self) -> &str {
        match self {
            Outgoing::Complete(c) => &c.version,
            Outgoing::Delta(d) => &d.snapshot.version,
        }
    }

    /// Its encoding (a complete snapshot's is made on first use: call this
    /// outside the registry's lock).
    pub fn encoded(&self) -> EncodedSnapshot {
        match self {
            Outgoing::Complete(c) => c.encoded(),
            Outgoing::Delta(d) => d.encoded(),
        }
    }

    pub fn is_delta(&self) -> bool {
        matches!(self, Outgoing::Delta(_))
    }
}

#[derive(Debug, Default)]
pub struct History {
    /// Consecutive publications' deltas, oldest first.
    log: VecDeque<Arc<Delta>>,
    log_bytes: usize,
    /// The last complete snapshot made.
    complete: Option<Arc<Complete>>,
    /// Deltas from a generation (the key) to the current one.
    composed: HashMap<u64, Arc<Delta>>,
}

impl History {
    /// Records a publication's delta (based on the previous publication).
    pub fn push(&mut self, delta: Delta) {
        if self
            .log
            .back()
            .is_some_and(|last| last.generation != delta.base_generation)
        {
            // Not consecutive (cannot happen: publications are): start over.
            self.log.clear();
            self.log_bytes = 0;
        }
        self.log_bytes += delta.len();
        self.log.push_back(Arc::new(delta));
        while self.log.len() > MAX_DELTAS || self.log_bytes > MAX_DELTA_BYTES {
            match self.log.pop_front() {
                Some(old) => self.log_bytes -= old.len(),
                None => break,
            }
        }
        self.composed.clear();
    }

    /// Deltas kept and their bytes.
    pub fn retained(&self) -> (usize, usize) {
        (self.log.len(), self.log_bytes)
    }

    /// Where the deltas after `generation` start in the log, if it reaches
    /// back that far (the log's generations grow by one).
    fn start_after(&self, generation: u64) -> Option<usize> {
        let first = self.log.front()?.base_generation;
        let i = usize::try_from(generation.checked_sub(first)?).ok()?;
        (i < self.log.len()).then_some(i)
    }

    /// The bytes of the deltas after `generation`, if all are kept.
    fn bytes_after(&self, generation: u64) -> Option<usize> {
        let start = self.start_after(generation)?;
        Some(self.log.range(start..).map(|d| d.len()).sum())
    }

    /// The last complete snapshot made, if it is of `generation`.
    pub fn complete_of(&self, generation: u64) -> Option<Arc<Complete>> {
        self.complete
            .as_ref()
            .filter(|c| c.generation == generation)
            .cloned()
    }

    /// Keeps `complete` as the last complete snapshot made.
    pub fn keep_complete(&mut self, complete: Complete) -> Arc<Complete> {
        let complete = Arc::new(complete);
        self.complete = Some(complete.clone());
        complete
    }

    /// The next message of a stream that last sent `after` (None: nothing
    /// yet), the current generation being `current`; `complete_len` is about
    /// what a complete snapshot of it takes, and `make` makes one. None when
    /// the stream is up to date.
    pub fn next(
        &mut self,
        after: Option<u64>,
        current: u64,
        complete_len: usize,
        make: impl FnOnce() -> Complete,
    ) -> Option<Outgoing> {
        match after {
            Some(g) if g >= current => return None,
            Some(g) => {
                if let Some(delta) = self.delta_after(g, current, complete_len) {
                    return Some(Outgoing::Delta(delta));
                }
            }
            None if complete_len >= REUSE_COMPLETE_BYTES => {
                let reusable = self.complete.as_ref().filter(|c| {
                    self.bytes_after(c.generation)
                        .is_some_and(|b| b.saturating_mul(STALE_COMPLETE_FRACTION) <= complete_len)
                });
                if let Some(c) = reusable {
                    return Some(Outgoing::Complete(c.clone()));
                }
            }
            None => {}
        }
        let complete = match self.complete_of(current) {
            Some(c) => c,
            None => self.keep_complete(make()),
        };
        Some(Outgoing::Complete(complete))
    }

    /// The delta from `after` to `current`, unless the log does not reach
    /// back that far or the deltas are larger than `complete_len`.
    fn delta_after(&mut self, after: u64, current: u64, complete_len: usize) -> Option<Arc<Delta>> {
        let start = self.start_after(after)?;
        if start + 1 == self.log.len() {
            return self.log.back().cloned();
        }
        if let Some(d) = self.composed.get(&after) {
            return Some(d.clone());
        }
        let bytes: usize = self.log.range(start..).map(|d| d.len()).sum();
        if bytes > complete_len {
            return None;
        }
        let parts: Vec<&remora_proto::v1::Snapshot> =
            self.log.range(start..).map(|d| &d.snapshot).collect();
        let composed = remora_proto::delta::compose(&parts).ok()?;
        let delta = Arc::new(Delta::new(after, current, composed));
        if self.composed.len() < MAX_COMPOSED {
            self.composed.insert(after, delta.clone());
        }
        Some(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remora_proto::v1::{Endpoint, Snapshot};

    fn delta(generation: u64, endpoint: &str, bytes: usize) -> Delta {
        Delta::new(
            generation - 1,
            generation,
            Snapshot {
                version: format!("1.{generation}"),
                base_version: format!("1.{}", generation - 1),
                endpoints: vec![Endpoint {
                    instance_id: endpoint.into(),
                    address: "x".repeat(bytes),
                    ..Endpoint::default()
                }],
                ..Snapshot::default()
            },
        )
    }

    fn complete(generation: u64) -> Complete {
        Complete::new(
            generation,
            1,
            Arc::default(),
            Vec::new(),
            Default::default(),
            Arc::default(),
        )
    }

    #[test]
    fn a_stream_gets_a_complete_snapshot_then_deltas() {
        let mut h = History::default();
        let first = h.next(None, 1, 1000, || complete(1)).unwrap();
        assert!(!first.is_delta());
        assert_eq!(first.generation(), 1);
        assert!(h.next(Some(1), 1, 1000, || unreachable!()).is_none());
        h.push(delta(2, "a", 10));
        let next = h.next(Some(1), 2, 1000, || unreachable!()).unwrap();
        assert!(next.is_delta());
        assert_eq!(next.version(), "1.2");
        // The same shared delta for every stream.
        let again = h.next(Some(1), 2, 1000, || unreachable!()).unwrap();
        match (next, again) {
            (Outgoing::Delta(a), Outgoing::Delta(b)) => assert!(Arc::ptr_eq(&a, &b)),
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_stream_behind_gets_one_composed_delta_shared_with_others() {
        let mut h = History::default();
        for g in 2..=5 {
            h.push(delta(g, &format!("e{g}"), 10));
        }
        let Some(Outgoing::Delta(d)) = h.next(Some(2), 5, 1000, || unreachable!()) else {
            panic!("a delta")
        };
        assert_eq!(d.snapshot.base_version, "1.2");
        assert_eq!(d.snapshot.version, "1.5");
        assert_eq!(d.snapshot.endpoints.len(), 3);
        let Some(Outgoing::Delta(again)) = h.next(Some(2), 5, 1000, || unreachable!()) else {
            panic!("a delta")
        };
        assert!(Arc::ptr_eq(&d, &again));
        // Larger together than the complete snapshot: the complete one.
        let out = h.next(Some(1), 5, 30, || complete(5)).unwrap();
        assert!(!out.is_delta());
        assert_eq!(out.generation(), 5);
    }

    #[test]
    fn a_stream_behind_the_log_gets_a_complete_snapshot() {
        let mut h = History::default();
        for g in 2..=(MAX_DELTAS as u64 + 10) {
            h.push(delta(g, "e", 1));
        }
        assert_eq!(h.retained().0, MAX_DELTAS);
        let current = MAX_DELTAS as u64 + 10;
        let out = h.next(Some(2), current, usize::MAX, || complete(current));
        assert!(out.is_some_and(|o| !o.is_delta()));
        // A byte budget too.
        let mut h = History::default();
        for g in 2..=20 {
            h.push(delta(g, "e", MAX_DELTA_BYTES / 8));
        }
        assert!(h.retained().1 <= MAX_DELTA_BYTES);
        assert!(h.retained().0 < 10);
    }

    #[test]
    fn a_new_stream_reuses_a_recent_complete_snapshot() {
        let mut h = History::default();
        h.keep_complete(complete(1));
        h.push(delta(2, "a", 10));
        let large = REUSE_COMPLETE_BYTES;
        let out = h.next(None, 2, large, || unreachable!()).unwrap();
        assert_eq!(out.generation(), 1, "the deltas since are small");
        let out = h.next(None, 2, 1000, || complete(2)).unwrap();
        assert_eq!(out.generation(), 2, "a small mesh: the current one");
        let out = h.next(None, 2, large, || unreachable!()).unwrap();
        assert_eq!(out.generation(), 2, "made once");
        h.push(delta(3, "b", large));
        let out = h.next(None, 3, large, || complete(3)).unwrap();
        assert_eq!(out.generation(), 3, "too much changed since: a new one");
    }
}
