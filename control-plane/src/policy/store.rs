//! The versioned policy store: an append-only history of every accepted change,
//! kept in redb under `<data-dir>/policies.redb`.
//!
//! Each version holds the FULL set of documents in force at that version, so any
//! version can be shown, compared or restored without replaying anything.
//! Version 0 is the empty store. A commit is durable (redb's default
//! `Durability::Immediate`, an fsync) before [`Store::commit`] returns.
//!
//! With `--store etcd` the history lives in etcd instead, shared by every
//! replica ([`Store::open_etcd`]): `<prefix>/policy/version` holds the current
//! version, `policy/history/<version>` and `policy/states/<version>` the
//! rest, and a commit is one etcd transaction that writes all three only if
//! the version is still the one this replica read (compare-and-swap), so two
//! replicas can never commit the same version and the history has no gap.
//! A commit that loses the race fails with [`StoreError::Conflict`]; the
//! caller catches up ([`Store::refresh`]) and plans its change again.
//!
//! The store is synchronous; the admin service owns it behind a tokio mutex and
//! calls it on the blocking pool.

use crate::etcd::{Etcd, EtcdError};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use remora_proto::policy::{Kind, ResourceKey};
use remora_proto::util::now_unix_ms;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// The file the store lives in, inside the data directory.
pub const FILE_NAME: &str = "policies.redb";

/// version → [`HistoryRecord`] as JSON.
const HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("history");
/// version → the documents in force at that version, as a JSON array.
const STATES: TableDefinition<u64, &[u8]> = TableDefinition::new("states");

/// Every document in force, keyed by kind/namespace/name; each value is the
/// whole document as `Document::to_value` renders it.
pub type State = BTreeMap<ResourceKey, serde_json::Value>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("policy store: {0}")]
    Db(#[from] redb::Error),
    #[error("policy store is corrupt at version {version}: {message}")]
    Corrupt { version: u64, message: String },
    #[error("version {0} does not exist")]
    UnknownVersion(u64),
    /// etcd: unreachable, or it refused.
    #[error("{0}; nothing was changed")]
    Shared(#[from] EtcdError),
    /// etcd: another replica committed this version first.
    #[error("another replica committed version {0} first")]
    Conflict(u64),
}

impl StoreError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Shared(e) if e.is_unavailable())
    }
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(e.into())
}

/// One entry of the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRecord {
    pub version: u64,
    pub timestamp_unix_ms: i64,
    /// "apply", "delete" or "rollback to N".
    pub action: String,
    /// What changed, such as "HTTPRoute/shop/backend configured".
    pub summary: String,
    pub resource_count: u32,
}

pub struct Store {
    backend: Backend,
    version: u64,
    state: Arc<State>,
    /// The last commit lost the race to another replica.
    conflicted: bool,
}

enum Backend {
    Local(Database),
    Etcd(Arc<Etcd>),
}

/// A version as an etcd key part: fixed width, so keys sort as versions do.
fn version_key(version: u64) -> String {
    format!("{version:020}")
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("version", &self.version)
            .field("documents", &self.state.len())
            .finish()
    }
}

impl Store {
    /// Opens (or creates) the store in `data_dir` and loads the current version.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let db = Database::create(data_dir.join(FILE_NAME)).map_err(db_err)?;
        // Create the tables once, so that readers never meet a missing table.
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(HISTORY).map_err(db_err)?;
        txn.open_table(STATES).map_err(db_err)?;
        txn.commit().map_err(db_err)?;

        let read = db.begin_read().map_err(db_err)?;
        let states = read.open_table(STATES).map_err(db_err)?;
        let (version, state) = match states.last().map_err(db_err)? {
            None => (0, State::new()),
            Some((k, v)) => {
                let version = k.value();
                (version, decode_state(version, v.value())?)
            }
        };
        drop(states);
        drop(read);
        Ok(Store {
            backend: Backend::Local(db),
            version,
            state: Arc::new(state),
            conflicted: false,
        })
    }

    /// The store in etcd, at its current version. Blocking.
    pub fn open_etcd(etcd: Arc<Etcd>) -> Result<Store, StoreError> {
        let mut store = Store {
            backend: Backend::Etcd(etcd),
            version: 0,
            state: Arc::new(State::new()),
            conflicted: false,
        };
        store.refresh()?;
        Ok(store)
    }

    /// Catches up with the shared store: loads the version another replica
    /// committed, if any. Whether the current version changed. Always false
    /// with the embedded store (this process is its only writer).
    pub fn refresh(&mut self) -> Result<bool, StoreError> {
        let Backend::Etcd(etcd) = &self.backend else {
            return Ok(false);
        };
        let version = match etcd.block(etcd.get(&etcd.key("policy/version")))? {
            None => 0,
            Some((bytes, _)) => parse_version(&bytes)?,
        };
        if version == self.version {
            return Ok(false);
        }
        let state = self.load_state(version)?;
        self.version = version;
        self.state = Arc::new(state);
        Ok(true)
    }

    /// Whether the last commit lost the race to another replica (and clears
    /// it): the caller refreshes and plans again.
    pub fn take_conflict(&mut self) -> bool {
        std::mem::take(&mut self.conflicted)
    }

    /// The etcd key the current version is kept under (None: embedded).
    pub fn version_watch_key(&self) -> Option<String> {
        match &self.backend {
            Backend::Local(_) => None,
            Backend::Etcd(etcd) => Some(etcd.key("policy/version")),
        }
    }

    fn load_state(&self, version: u64) -> Result<State, StoreError> {
        if version == 0 {
            return Ok(State::new());
        }
        match &self.backend {
            Backend::Local(db) => {
                let read = db.begin_read().map_err(db_err)?;
                let states = read.open_table(STATES).map_err(db_err)?;
                let bytes = states
                    .get(version)
                    .map_err(db_err)?
                    .ok_or(StoreError::UnknownVersion(version))?;
                decode_state(version, bytes.value())
            }
            Backend::Etcd(etcd) => {
                let key = etcd.key(&format!("policy/states/{}", version_key(version)));
                let (bytes, _) = etcd
                    .block(etcd.get(&key))?
                    .ok_or(StoreError::UnknownVersion(version))?;
                decode_state(version, &bytes)
            }
        }
    }

    /// The current version (0 when nothing was ever applied).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The documents in force at the current version.
    pub fn current(&self) -> Arc<State> {
        self.state.clone()
    }

    /// The documents in force at `version` (0 is the empty state).
    pub fn state_at(&self, version: u64) -> Result<Arc<State>, StoreError> {
        if version == self.version {
            return Ok(self.state.clone());
        }
        Ok(Arc::new(self.load_state(version)?))
    }

    /// Every version, oldest first.
    pub fn history(&self) -> Result<Vec<HistoryRecord>, StoreError> {
        let db = match &self.backend {
            Backend::Local(db) => db,
            Backend::Etcd(etcd) => {
                let prefix = etcd.key("policy/history/");
                let mut out = Vec::new();
                for (key, bytes) in etcd.block(etcd.get_prefix(&prefix))? {
                    let version = key.parse().unwrap_or(0);
                    let record: HistoryRecord =
                        serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                            version,
                            message: e.to_string(),
                        })?;
                    out.push(record);
                }
                return Ok(out);
            }
        };
        let read = db.begin_read().map_err(db_err)?;
        let table = read.open_table(HISTORY).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let record: HistoryRecord =
                serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                    version: k.value(),
                    message: e.to_string(),
                })?;
            out.push(record);
        }
        Ok(out)
    }

    /// Stores `state` as a new version and makes it current. Returns the new
    /// version once it is durable on disk.
    pub fn commit(&mut self, action: &str, summary: &str, state: State) -> Result<u64, StoreError> {
        let version = self.version + 1;
        let record = HistoryRecord {
            version,
            timestamp_unix_ms: now_unix_ms(),
            action: action.to_string(),
            summary: summary.to_string(),
            resource_count: u32::try_from(state.len()).unwrap_or(u32::MAX),
        };
        let record_bytes = serde_json::to_vec(&record).map_err(|e| StoreError::Corrupt {
            version,
            message: e.to_string(),
        })?;
        let docs: Vec<&serde_json::Value> = state.values().collect();
        let state_bytes = serde_json::to_vec(&docs).map_err(|e| StoreError::Corrupt {
            version,
            message: e.to_string(),
        })?;

        let db = match &self.backend {
            Backend::Local(db) => db,
            Backend::Etcd(etcd) => {
                let version_key_name = etcd.key("policy/version");
                // Version 0 is no key at all.
                let unchanged = if self.version == 0 {
                    Compare::version(version_key_name.clone(), CompareOp::Equal, 0)
                } else {
                    Compare::value(
                        version_key_name.clone(),
                        CompareOp::Equal,
                        self.version.to_string(),
                    )
                };
                let txn = Txn::new().when([unchanged]).and_then([
                    TxnOp::put(version_key_name, version.to_string(), None),
                    TxnOp::put(
                        etcd.key(&format!("policy/history/{}", version_key(version))),
                        record_bytes,
                        None,
                    ),
                    TxnOp::put(
                        etcd.key(&format!("policy/states/{}", version_key(version))),
                        state_bytes,
                        None,
                    ),
                ]);
                if !etcd.block(etcd.txn(txn))? {
                    self.conflicted = true;
                    return Err(StoreError::Conflict(version));
                }
                self.version = version;
                self.state = Arc::new(state);
                return Ok(version);
            }
        };
        let txn = db.begin_write().map_err(db_err)?;
        {
            let mut history = txn.open_table(HISTORY).map_err(db_err)?;
            history
                .insert(version, record_bytes.as_slice())
                .map_err(db_err)?;
            let mut states = txn.open_table(STATES).map_err(db_err)?;
            states
                .insert(version, state_bytes.as_slice())
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;

        self.version = version;
        self.state = Arc::new(state);
        Ok(version)
    }
}

fn parse_version(bytes: &[u8]) -> Result<u64, StoreError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| StoreError::Corrupt {
            version: 0,
            message: format!("the version key holds {:?}", String::from_utf8_lossy(bytes)),
        })
}

fn decode_state(version: u64, bytes: &[u8]) -> Result<State, StoreError> {
    let corrupt = |message: String| StoreError::Corrupt { version, message };
    let docs: Vec<serde_json::Value> =
        serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    let mut state = State::new();
    for doc in docs {
        let key = key_of(&doc).ok_or_else(|| corrupt(format!("document without a key: {doc}")))?;
        state.insert(key, doc);
    }
    Ok(state)
}

/// The key of a stored document (`kind`, `metadata.namespace`, `metadata.name`).
pub fn key_of(doc: &serde_json::Value) -> Option<ResourceKey> {
    let kind = doc.get("kind")?.as_str()?;
    let kind = Kind::ALL.into_iter().find(|k| k.as_str() == kind)?;
    let metadata = doc.get("metadata")?;
    Some(ResourceKey {
        kind,
        namespace: metadata.get("namespace")?.as_str()?.to_string(),
        name: metadata.get("name")?.as_str()?.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use remora_proto::policy::parse_documents;

    fn state_of(yaml: &str) -> State {
        parse_documents("test.yaml", yaml)
            .unwrap()
            .into_iter()
            .map(|d| (d.key(), d.to_value()))
            .collect()
    }

    const SVC: &str = "apiVersion: remora.dev/v1\nkind: Service\nmetadata: {name: backend, namespace: shop}\nspec: {ports: [{port: 8080, protocol: http}]}\n";
    const SVC2: &str = "apiVersion: remora.dev/v1\nkind: Service\nmetadata: {name: frontend, namespace: shop}\nspec: {ports: [{port: 80, protocol: http}]}\n";

    #[test]
    fn a_new_store_is_empty_at_version_zero() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.version(), 0);
        assert!(store.current().is_empty());
        assert!(store.history().unwrap().is_empty());
        assert!(store.state_at(0).unwrap().is_empty());
        assert!(matches!(
            store.state_at(1),
            Err(StoreError::UnknownVersion(1))
        ));
    }

    #[test]
    fn commits_are_versioned_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = Store::open(dir.path()).unwrap();
            assert_eq!(store.commit("apply", "one", state_of(SVC)).unwrap(), 1);
            let both = state_of(&format!("{SVC}---\n{SVC2}"));
            assert_eq!(store.commit("apply", "two", both).unwrap(), 2);
            assert_eq!(store.commit("delete", "three", state_of(SVC2)).unwrap(), 3);
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.version(), 3);
        assert_eq!(*store.current(), state_of(SVC2));
        assert_eq!(*store.state_at(1).unwrap(), state_of(SVC));
        assert_eq!(store.state_at(2).unwrap().len(), 2);
        let history = store.history().unwrap();
        let actions: Vec<_> = history
            .iter()
            .map(|h| {
                (
                    h.version,
                    h.action.as_str(),
                    h.summary.as_str(),
                    h.resource_count,
                )
            })
            .collect();
        assert_eq!(
            actions,
            vec![
                (1, "apply", "one", 1),
                (2, "apply", "two", 2),
                (3, "delete", "three", 1)
            ]
        );
        assert!(history.iter().all(|h| h.timestamp_unix_ms > 0));
    }

    #[test]
    fn a_reopened_store_continues_the_history() {
        let dir = tempfile::tempdir().unwrap();
        Store::open(dir.path())
            .unwrap()
            .commit("apply", "one", state_of(SVC))
            .unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.commit("rollback to 0", "x", State::new()).unwrap(), 2);
        assert!(store.current().is_empty());
        assert_eq!(*store.state_at(1).unwrap(), state_of(SVC));
    }

    #[test]
    fn stored_documents_keep_their_labels() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = "apiVersion: remora.dev/v1\nkind: Service\nmetadata: {name: a, namespace: b, labels: {team: x}}\nspec: {ports: [{port: 1, protocol: tcp}]}\n";
        Store::open(dir.path())
            .unwrap()
            .commit("apply", "", state_of(yaml))
            .unwrap();
        let store = Store::open(dir.path()).unwrap();
        let doc = store.current().values().next().cloned().unwrap();
        assert_eq!(doc["metadata"]["labels"]["team"], "x");
    }

    #[test]
    fn key_of_rejects_documents_without_kind_or_name() {
        assert!(key_of(&serde_json::json!({"kind": "Service"})).is_none());
        assert!(key_of(
            &serde_json::json!({"kind": "Nope", "metadata": {"name": "a", "namespace": "b"}})
        )
        .is_none());
    }
}
