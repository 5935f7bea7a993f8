//! The identity database, `<data-dir>/identity.redb` (mode 0600): bootstrap
//! tokens, the generated CA's record (its private key included) and the
//! ledger of the workload certificates issued ([`crate::identity::issued`]). Every
//! write is a durable redb transaction (an fsync before it returns), so a
//! `kill -9` leaves either the old or the new record, never half of one.
//!
//! With `--store etcd` the same tables live in etcd, shared by every
//! replica ([`IdentityDb::etcd`]): the CA's record sealed with the
//! key-encryption key, updates by compare-and-swap.
//!
//! The database is synchronous; callers run it on the blocking pool.

use crate::etcd::{Etcd, EtcdError};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

/// The file, inside the data directory.
pub const FILE_NAME: &str = "identity.redb";

/// token id → `tokens::TokenRecord` as JSON.
pub(crate) const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// "state" → the generated CA's record as JSON.
pub(crate) const CA: TableDefinition<&str, &[u8]> = TableDefinition::new("ca");
/// certificate serial (hex) → `issued::IssuedCert` as JSON.
pub(crate) const CERTS: TableDefinition<&str, &[u8]> = TableDefinition::new("certificates");
/// Small values: the ledger's start, the snapshot generation lease.
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Values remembered from etcd for when it cannot be reached (token records
/// and the CA: what renewing an existing identity reads).
const MAX_REMEMBERED: usize = 200_000;
/// Compare-and-swap attempts of one [`IdentityDb::update`] against etcd.
const CAS_ATTEMPTS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("identity database: {0}")]
    Db(#[from] redb::Error),
    #[error("identity database: {0}")]
    Io(#[from] std::io::Error),
    #[error("identity database: {0}")]
    Store(#[from] EtcdError),
}

impl DbError {
    /// The shared store (etcd) cannot be reached.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, DbError::Store(e) if e.is_unavailable())
    }
}

fn db_err(e: impl Into<redb::Error>) -> DbError {
    DbError::Db(e.into())
}

/// A handle on the identity database. Cheap to clone.
#[derive(Clone)]
pub struct IdentityDb {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    /// `<data-dir>/identity.redb`.
    Local(Arc<Database>),
    /// etcd, under `<prefix>/identity/<table>/<key>`; the CA table sealed
    /// with the key-encryption key.
    Etcd(Arc<EtcdTables>),
}

struct EtcdTables {
    etcd: Arc<Etcd>,
    /// The last value read of each token and CA key, served while etcd is
    /// unavailable.
    remembered: Mutex<HashMap<String, Option<Vec<u8>>>>,
}

impl std::fmt::Debug for IdentityDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.backend {
            Backend::Local(_) => "IdentityDb(redb)",
            Backend::Etcd(_) => "IdentityDb(etcd)",
        })
    }
}

fn sealed(table: TableDefinition<&str, &[u8]>) -> bool {
    table.name() == CA.name()
}

fn remembered(table: TableDefinition<&str, &[u8]>) -> bool {
    table.name() == CA.name() || table.name() == TOKENS.name()
}

impl EtcdTables {
    fn prefix(&self, table: TableDefinition<&str, &[u8]>) -> String {
        self.etcd.key(&format!("identity/{}/", table.name()))
    }

    fn key(&self, table: TableDefinition<&str, &[u8]>, key: &str) -> String {
        format!("{}{key}", self.prefix(table))
    }

    fn encode(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &[u8],
    ) -> Result<Vec<u8>, DbError> {
        if sealed(table) {
            self.etcd
                .kek
                .seal(&self.key(table, key), value)
                .map_err(|e| DbError::Store(EtcdError::Failed(e)))
        } else {
            Ok(value.to_vec())
        }
    }

    fn decode(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: Vec<u8>,
    ) -> Result<Vec<u8>, DbError> {
        if sealed(table) {
            self.etcd
                .kek
                .open(&self.key(table, key), &value)
                .map_err(|e| DbError::Store(EtcdError::Failed(e)))
        } else {
            Ok(value)
        }
    }

    fn remember(&self, table: TableDefinition<&str, &[u8]>, key: &str, value: Option<&[u8]>) {
        if remembered(table) {
            let mut map = self.remembered.lock();
            if map.len() >= MAX_REMEMBERED {
                map.clear();
            }
            map.insert(self.key(table, key), value.map(<[u8]>::to_vec));
        }
    }

    fn get(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<Vec<u8>>, DbError> {
        let full = self.key(table, key);
        match self.etcd.block(self.etcd.get(&full)) {
            Ok(found) => {
                let value = found.map(|(v, _)| self.decode(table, key, v)).transpose()?;
                self.remember(table, key, value.as_deref());
                Ok(value)
            }
            Err(e) if e.is_unavailable() && remembered(table) => {
                match self.remembered.lock().get(&full) {
                    Some(value) => {
                        tracing::debug!(key = %full, "etcd unavailable: serving the last value read");
                        Ok(value.clone())
                    }
                    None => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    fn put(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &[u8],
    ) -> Result<(), DbError> {
        let stored = self.encode(table, key, value)?;
        self.etcd
            .block(self.etcd.put(&self.key(table, key), stored))?;
        self.remember(table, key, Some(value));
        Ok(())
    }

    fn update(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        mut f: impl FnMut(Option<&[u8]>) -> Result<Option<Vec<u8>>, DbError>,
    ) -> Result<(), DbError> {
        let full = self.key(table, key);
        for _ in 0..CAS_ATTEMPTS {
            let found = self.etcd.block(self.etcd.get(&full))?;
            let (current, compare) = match found {
                Some((v, revision)) => (
                    Some(self.decode(table, key, v)?),
                    Compare::mod_revision(full.clone(), CompareOp::Equal, revision),
                ),
                None => (None, Compare::version(full.clone(), CompareOp::Equal, 0)),
            };
            let Some(next) = f(current.as_deref())? else {
                return Ok(());
            };
            let stored = self.encode(table, key, &next)?;
            let txn = Txn::new()
                .when([compare])
                .and_then([TxnOp::put(full.clone(), stored, None)]);
            if self.etcd.block(self.etcd.txn(txn))? {
                self.remember(table, key, Some(&next));
                return Ok(());
            }
        }
        Err(DbError::Store(EtcdError::Failed(format!(
            "{full}: changed by others {CAS_ATTEMPTS} times in a row"
        ))))
    }

    fn write_batch(
        &self,
        table: TableDefinition<&str, &[u8]>,
        puts: &[(&str, &[u8])],
        removes: &[&str],
    ) -> Result<(), DbError> {
        let mut ops = Vec::with_capacity(puts.len() + removes.len());
        for (key, value) in puts {
            ops.push(TxnOp::put(
                self.key(table, key),
                self.encode(table, key, value)?,
                None,
            ));
        }
        for key in removes {
            ops.push(TxnOp::delete(self.key(table, key), None));
        }
        self.etcd.block(self.etcd.batch(ops))?;
        Ok(())
    }

    fn list(&self, table: TableDefinition<&str, &[u8]>) -> Result<Vec<(String, Vec<u8>)>, DbError> {
        let entries = self.etcd.block(self.etcd.get_prefix(&self.prefix(table)))?;
        entries
            .into_iter()
            .map(|(k, v)| {
                let value = self.decode(table, &k, v)?;
                Ok((k, value))
            })
            .collect()
    }
}

impl IdentityDb {
    /// Opens (or creates) the database in `data_dir`, readable by its owner only.
    pub fn open(data_dir: &Path) -> Result<IdentityDb, DbError> {
        let path = data_dir.join(FILE_NAME);
        let db = Database::create(&path).map_err(db_err)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(TOKENS).map_err(db_err)?;
        txn.open_table(CA).map_err(db_err)?;
        txn.open_table(CERTS).map_err(db_err)?;
        txn.open_table(META).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(IdentityDb {
            backend: Backend::Local(Arc::new(db)),
        })
    }

    /// The database in etcd, shared by every replica. Its calls block: run
    /// them on the blocking pool (or they move off the worker thread).
    pub fn etcd(etcd: Arc<Etcd>) -> IdentityDb {
        IdentityDb {
            backend: Backend::Etcd(Arc::new(EtcdTables {
                etcd,
                remembered: Mutex::new(HashMap::new()),
            })),
        }
    }

    /// Whether it lives in etcd (shared by replicas).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Etcd(_))
    }

    /// The etcd key `key` of `table` is stored under (None: not in etcd).
    pub fn etcd_key(&self, table: TableDefinition<&str, &[u8]>, key: &str) -> Option<String> {
        match &self.backend {
            Backend::Local(_) => None,
            Backend::Etcd(t) => Some(t.key(table, key)),
        }
    }

    pub(crate) fn get(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<Vec<u8>>, DbError> {
        let db = match &self.backend {
            Backend::Local(db) => db,
            Backend::Etcd(t) => return t.get(table, key),
        };
        let read = db.begin_read().map_err(db_err)?;
        let table = read.open_table(table).map_err(db_err)?;
        Ok(table.get(key).map_err(db_err)?.map(|v| v.value().to_vec()))
    }

    /// Writes `key` durably.
    pub(crate) fn put(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &[u8],
    ) -> Result<(), DbError> {
        let db = match &self.backend {
            Backend::Local(db) => db,
            Backend::Etcd(t) => return t.put(table, key, value),
        };
        let txn = db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(table).map_err(db_err)?;
            table.insert(key, value).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(())
    }

    /// Reads `key` and writes what `f` makes of it, atomically: in one
    /// durable write transaction (redb runs one at a time), or in etcd by
    /// compare-and-swap on the key's revision, `f` called again with the
    /// newer value when another replica changed it in between. `f` gets the
    /// current value; Some(new) writes it, None leaves the entry as it is.
    pub(crate) fn update(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        f: impl FnMut(Option<&[u8]>) -> Result<Option<Vec<u8>>, DbError>,
    ) -> Result<(), DbError> {
        let db = match &self.backend {
            Backend::Local(db) => db,
            Backend::Etcd(t) => return t.update(table, key, f),
        };
        let mut f = f;
        let txn = db.begin_write().map_err(db_err)?;
        let changed = {
            let mut table = txn.open_table(table).map_err(db_err)?;
            let current = table.get(key).map_err(db_err)?.map(|v| v.value().to_vec());
            match f(current.as_deref())? {
                Some(next) => {
                    table.insert(key, next.as_slice()).map_err(db_err)?;
                    true
                }
                None => false,
            }
        };
        if changed {
            txn.commit().map_err(db_err)?;
        } else {
            txn.abort().map_err(db_err)?;
        }
        Ok(())
    }

    /// Writes `puts` and removes `removes` in `table`, in one durable
    /// transaction (in etcd: transactions of up to 100 operations).
    pub(crate) fn write_batch(
        &self,
        table: TableDefinition<&str, &[u8]>,
        puts: &[(&str, &[u8])],
        removes: &[&str],
    ) -> Result<(), DbError> {
        let db = match &self.backend {
            Backend::Local(db) => db,
            Backend::Etcd(t) => return t.write_batch(table, puts, removes),
        };
        let txn = db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(table).map_err(db_err)?;
            for (key, value) in puts {
                table.insert(*key, *value).map_err(db_err)?;
            }
            for key in removes {
                table.remove(*key).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)?;
        Ok(())
    }

    /// Every entry, in key order.
    pub(crate) fn list(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<(String, Vec<u8>)>, DbError> {
        let db = match &self.backend {
            Backend::Local(db) => db,
            Backend::Etcd(t) => return t.list(table),
        };
        let read = db.begin_read().map_err(db_err)?;
        let table = read.open_table(table).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_is_private_and_durable() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = IdentityDb::open(dir.path()).unwrap();
            db.put(CA, "state", b"x").unwrap();
        }
        let mode = fs::metadata(dir.path().join(FILE_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let db = IdentityDb::open(dir.path()).unwrap();
        assert_eq!(db.get(CA, "state").unwrap().as_deref(), Some(&b"x"[..]));
        assert!(db.get(CA, "nope").unwrap().is_none());
        assert!(db.list(TOKENS).unwrap().is_empty());
    }
}
