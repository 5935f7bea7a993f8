//! The ledger of workload certificates issued and not yet expired: what lets
//! a root rotation know when the old root is no longer needed.
//!
//! Every certificate `Identity.Certify` signs is written here, durably, before
//! it is handed out: its serial, signer, identity, bootstrap token and expiry,
//! and the certificate it renewed (the client certificate the renewal was
//! authenticated with), which is marked replaced in the same transaction. A
//! workload that leaves gracefully (Deregister, then its stream closes) has
//! its certificates marked replaced too. Entries are dropped once expired.
//!
//! So the certificates from a root that may still be in use are the ledger's
//! unexpired, unreplaced entries for that signer: a workload that was away
//! during a rotation (a network blip, a control-plane restart) still holds
//! one, and the rotation waits for it to renew or for the certificate to
//! expire. Certificates issued before the ledger existed (a data directory
//! from an older release) are covered by time instead: see
//! [`Ledger::started_unix`].
//!
//! With the shared store (etcd) every replica writes to the same ledger and
//! reads it back whole before answering what is still in use
//! ([`Ledger::in_use`]), so certificates renewed through another replica
//! count. While etcd cannot be reached, entries wait in memory (bounded) and
//! are written at the next write that succeeds: renewals go on.
//!
//! Blocking (redb, etcd): callers run it on the blocking pool.

use crate::identity::db::{DbError, IdentityDb, CERTS, META};
use parking_lot::{Mutex, MutexGuard};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

const STARTED_KEY: &str = "ledger_started_unix";

/// One issued certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCert {
    /// Lowercase hex of the serial number.
    pub serial: String,
    pub signer_id: String,
    pub spiffe_id: String,
    /// The bootstrap token the request was authenticated with, if any.
    #[serde(default)]
    pub token_id: Option<String>,
    pub not_after_unix: i64,
    /// The certificate this one renewed.
    #[serde(default)]
    pub renewed_from: Option<String>,
    /// Renewed into another one, or its workload left: no longer in use.
    #[serde(default)]
    pub replaced: bool,
}

/// The ledger: every entry in memory, each change written through.
pub struct Ledger {
    db: IdentityDb,
    certs: Mutex<HashMap<String, IssuedCert>>,
    started_unix: i64,
    /// Entries not yet written (the shared store was unavailable).
    pending: Mutex<HashMap<String, Vec<u8>>>,
}

/// Entries kept for the shared store while it is unavailable.
const MAX_PENDING: usize = 100_000;

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("started_unix", &self.started_unix)
            .finish_non_exhaustive()
    }
}

fn encode(cert: &IssuedCert) -> Vec<u8> {
    // A struct of strings and numbers always serializes.
    serde_json::to_vec(cert).unwrap_or_default()
}

impl Ledger {
    /// Loads the ledger (dropping expired entries), starting it at `now` if
    /// this database never had one.
    pub fn open(db: IdentityDb, now: i64) -> Result<Ledger, DbError> {
        let started_unix = match db.get(META, STARTED_KEY)? {
            Some(bytes) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(now),
            None => {
                db.put(META, STARTED_KEY, now.to_string().as_bytes())?;
                now
            }
        };
        let mut certs = HashMap::new();
        let mut expired = Vec::new();
        for (serial, bytes) in db.list(CERTS)? {
            match serde_json::from_slice::<IssuedCert>(&bytes) {
                Ok(cert) if cert.not_after_unix > now => {
                    certs.insert(serial, cert);
                }
                Ok(_) => expired.push(serial),
                Err(e) => {
                    tracing::warn!(%serial, error = %e, "dropping an unreadable certificate record");
                    expired.push(serial);
                }
            }
        }
        if !expired.is_empty() {
            let keys: Vec<&str> = expired.iter().map(String::as_str).collect();
            db.write_batch(CERTS, &[], &keys)?;
        }
        Ok(Ledger {
            db,
            certs: Mutex::new(certs),
            started_unix,
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// Writes `puts` and `removes` (and whatever waits from before). With the
    /// shared store unavailable the puts wait in memory instead.
    fn write(&self, puts: &[(&str, &[u8])], removes: &[&str]) -> Result<(), DbError> {
        let mut pending = self.pending.lock();
        let waiting: Vec<(String, Vec<u8>)> = pending.drain().collect();
        let mut all: Vec<(&str, &[u8])> = waiting
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        all.extend_from_slice(puts);
        match self.db.write_batch(CERTS, &all, removes) {
            Ok(()) => {
                if !waiting.is_empty() {
                    tracing::info!(
                        entries = waiting.len(),
                        "certificate ledger caught up with the store"
                    );
                }
                Ok(())
            }
            Err(e) if e.is_unavailable() && pending.len() + all.len() <= MAX_PENDING => {
                tracing::warn!(error = %e, waiting = all.len(),
                    "store unavailable: certificate ledger entries wait in memory");
                for (k, v) in all {
                    pending.insert(k.to_string(), v.to_vec());
                }
                Ok(())
            }
            Err(e) => {
                pending.extend(waiting);
                Err(e)
            }
        }
    }

    /// Reads the shared ledger back whole (what other replicas issued and
    /// replaced), keeping entries not written yet. No-op when not shared or
    /// when the store cannot be reached.
    fn reload(&self, now: i64) {
        if !self.db.is_shared() {
            return;
        }
        let entries = match self.db.list(CERTS) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::debug!(error = %e, "cannot reload the certificate ledger");
                return;
            }
        };
        let mut fresh = HashMap::new();
        for (serial, bytes) in entries {
            if let Ok(cert) = serde_json::from_slice::<IssuedCert>(&bytes) {
                if cert.not_after_unix > now {
                    fresh.insert(serial, cert);
                }
            }
        }
        for (serial, bytes) in self.pending.lock().iter() {
            if let Ok(cert) = serde_json::from_slice::<IssuedCert>(bytes) {
                fresh.insert(serial.clone(), cert);
            }
        }
        *self.lock() = fresh;
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, IssuedCert>> {
        self.certs.lock()
    }

    /// When the ledger started: certificates issued before then are not in it.
    pub fn started_unix(&self) -> i64 {
        self.started_unix
    }

    /// Records a new certificate (and marks the one it renewed replaced),
    /// dropping expired entries, in one durable transaction.
    pub fn record(&self, cert: IssuedCert, now: i64) -> Result<(), DbError> {
        // Worked out under the lock, written without it: the write may wait
        // on the network (etcd), and readers of the ledger must not.
        let (expired, renewed) = {
            let certs = self.lock();
            let expired: Vec<String> = certs
                .values()
                .filter(|c| c.not_after_unix <= now)
                .map(|c| c.serial.clone())
                .collect();
            let renewed = cert
                .renewed_from
                .as_ref()
                .and_then(|s| certs.get(s))
                .filter(|c| !c.replaced)
                .map(|c| IssuedCert {
                    replaced: true,
                    ..c.clone()
                });
            (expired, renewed)
        };
        let mut puts = vec![(cert.serial.clone(), encode(&cert))];
        if let Some(old) = &renewed {
            puts.push((old.serial.clone(), encode(old)));
        }
        let put_refs: Vec<(&str, &[u8])> = puts
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        let removes: Vec<&str> = expired.iter().map(String::as_str).collect();
        self.write(&put_refs, &removes)?;
        let mut certs = self.lock();
        for serial in &expired {
            certs.remove(serial);
        }
        if let Some(old) = renewed {
            certs.insert(old.serial.clone(), old);
        }
        certs.insert(cert.serial.clone(), cert);
        Ok(())
    }

    /// `serial` and every certificate renewed from it, directly or not: the
    /// certificates one workload has held since it held `serial`.
    fn chain_in(certs: &HashMap<String, IssuedCert>, serial: &str) -> Vec<String> {
        let mut chain = vec![serial.to_string()];
        let mut i = 0;
        while i < chain.len() {
            let from = chain[i].clone();
            chain.extend(
                certs
                    .values()
                    .filter(|c| c.renewed_from.as_deref() == Some(from.as_str()))
                    .map(|c| c.serial.clone())
                    .filter(|s| *s != from),
            );
            i += 1;
            if i > certs.len() + 1 {
                break;
            }
        }
        chain
    }

    /// `chain_in` of the ledger.
    pub fn chain(&self, serial: &str) -> Vec<String> {
        Self::chain_in(&self.lock(), serial)
    }

    /// The workload that held `serial` left: it and every certificate
    /// renewed from it are no longer in use.
    pub fn left(&self, serial: &str) -> Result<(), DbError> {
        let changed: Vec<IssuedCert> = {
            let certs = self.lock();
            Self::chain_in(&certs, serial)
                .iter()
                .filter_map(|s| certs.get(s))
                .filter(|c| !c.replaced)
                .map(|c| IssuedCert {
                    replaced: true,
                    ..c.clone()
                })
                .collect()
        };
        if changed.is_empty() {
            return Ok(());
        }
        let encoded: Vec<(String, Vec<u8>)> = changed
            .iter()
            .map(|c| (c.serial.clone(), encode(c)))
            .collect();
        let puts: Vec<(&str, &[u8])> = encoded
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        self.write(&puts, &[])?;
        let mut certs = self.lock();
        for c in changed {
            certs.insert(c.serial.clone(), c);
        }
        Ok(())
    }

    /// The certificates from `signer_id` still valid at `now` and not
    /// replaced, soonest to expire first.
    pub fn in_use(&self, signer_id: &str, now: i64) -> Vec<IssuedCert> {
        self.reload(now);
        let mut out: Vec<IssuedCert> = self
            .lock()
            .values()
            .filter(|c| c.signer_id == signer_id && c.not_after_unix > now && !c.replaced)
            .cloned()
            .collect();
        out.sort_by(|a, b| (a.not_after_unix, &a.serial).cmp(&(b.not_after_unix, &b.serial)));
        out
    }

    /// The entry for `serial`, if the ledger holds it.
    pub fn get(&self, serial: &str) -> Option<IssuedCert> {
        self.lock().get(serial).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(serial: &str, signer: &str, not_after: i64, from: Option<&str>) -> IssuedCert {
        IssuedCert {
            serial: serial.into(),
            signer_id: signer.into(),
            spiffe_id: "spiffe://cluster.local/ns/shop/sa/a".into(),
            token_id: Some("t".into()),
            not_after_unix: not_after,
            renewed_from: from.map(str::to_string),
            replaced: false,
        }
    }

    #[test]
    fn renewals_and_departures_replace_and_expiry_drops_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = IdentityDb::open(dir.path()).unwrap();
        let ledger = Ledger::open(db.clone(), 100).unwrap();
        assert_eq!(ledger.started_unix(), 100);
        ledger.record(cert("a1", "old", 1000, None), 100).unwrap();
        ledger.record(cert("b1", "old", 500, None), 100).unwrap();
        ledger.record(cert("c1", "old", 200, None), 100).unwrap();
        assert_eq!(ledger.in_use("old", 100).len(), 3);
        // a renews onto the new root; b leaves after one more renewal.
        ledger
            .record(cert("a2", "new", 1000, Some("a1")), 110)
            .unwrap();
        ledger
            .record(cert("b2", "old", 600, Some("b1")), 110)
            .unwrap();
        ledger.left("b1").unwrap();
        let serials = |v: Vec<IssuedCert>| v.into_iter().map(|c| c.serial).collect::<Vec<_>>();
        assert_eq!(serials(ledger.in_use("old", 110)), ["c1"]);
        assert_eq!(serials(ledger.in_use("old", 300)), Vec::<String>::new());
        drop(ledger);
        let ledger = Ledger::open(db, 300).unwrap();
        assert_eq!(ledger.started_unix(), 100);
        assert!(ledger.get("c1").is_none(), "expired entries are dropped");
        assert!(ledger.get("a1").unwrap().replaced);
        assert_eq!(serials(ledger.in_use("new", 300)), ["a2"]);
    }
}
