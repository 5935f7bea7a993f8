//! The identity database, `<data-dir>/identity.redb` (mode 0600): bootstrap
//! tokens, the generated CA's record (its private key included) and the
//! ledger of the workload certificates issued ([`crate::identity::issued`]). Every
//! write is a durable redb transaction (an fsync before it returns), so a
//! `kill -9` leaves either the old or the new record, never half of one.
//!
//! The database is synchronous; callers run it on the blocking pool.

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
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

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("identity database: {0}")]
    Db(#[from] redb::Error),
    #[error("identity database: {0}")]
    Io(#[from] std::io::Error),
}

fn db_err(e: impl Into<redb::Error>) -> DbError {
    DbError::Db(e.into())
}

/// A handle on the identity database. Cheap to clone.
#[derive(Clone)]
pub struct IdentityDb {
    db: Arc<Database>,
}

impl std::fmt::Debug for IdentityDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdentityDb")
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
        Ok(IdentityDb { db: Arc::new(db) })
    }

    pub(crate) fn get(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<Vec<u8>>, DbError> {
        let read = self.db.begin_read().map_err(db_err)?;
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
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(table).map_err(db_err)?;
            table.insert(key, value).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(())
    }

    /// Reads `key` and writes what `f` makes of it, in one durable write
    /// transaction (redb runs one at a time, so nothing changes `key` in
    /// between). `f` gets the current value; Some(new) writes it, None
    /// leaves the entry as it is.
    pub(crate) fn update(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        f: impl FnOnce(Option<&[u8]>) -> Result<Option<Vec<u8>>, DbError>,
    ) -> Result<(), DbError> {
        let txn = self.db.begin_write().map_err(db_err)?;
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
    /// transaction.
    pub(crate) fn write_batch(
        &self,
        table: TableDefinition<&str, &[u8]>,
        puts: &[(&str, &[u8])],
        removes: &[&str],
    ) -> Result<(), DbError> {
        let txn = self.db.begin_write().map_err(db_err)?;
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
        let read = self.db.begin_read().map_err(db_err)?;
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
