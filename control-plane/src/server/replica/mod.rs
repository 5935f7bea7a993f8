//! One replica among several sharing etcd (`serve --store etcd`).
//!
//! - Presence: the replica holds an etcd lease (a few seconds, kept alive
//!   every second) and, under it, its record (`<prefix>/replicas/<id>`: its
//!   address, version, proxies, and what its proxies still hold for a root
//!   rotation) and the endpoints of the proxies connected to it
//!   (`<prefix>/endpoints/<id>/<namespace>/<service>/<instance>`). When the
//!   replica dies its lease expires and both go; its proxies have moved to
//!   other replicas by then (they reconnect within about a second), and an
//!   instance that is connected anywhere stays an endpoint meanwhile.
//! - Discovery: every replica watches every other replica's endpoints and
//!   serves them beside its own, so all push the same mesh.
//! - Catching up: the policy version and the CA record are checked twice a
//!   second; a version committed or a rotation made through another replica
//!   is loaded and pushed here too.
//! - Leadership: one replica, chosen by etcd's election under its lease,
//!   does singleton work (retiring an old root once every proxy on every
//!   replica has moved).
//!
//! While etcd cannot be reached all of this pauses and the replica serves
//! what it has; each loop starts over by itself when etcd returns.

mod peers;

use crate::discovery::registry::Registry;
use crate::etcd::{Etcd, EtcdError};
use crate::identity::ca_store;
use crate::identity::db::IdentityDb;
use crate::policy::store::Store;
use crate::server::rotation::{Cluster, Holdout, Rotation};
use etcd_client::{EventType, GetOptions, PutOptions, TxnOp, WatchOptions};
use parking_lot::Mutex;
use prost::Message;
use remora_proto::util::now_unix_ms;
use remora_proto::v1::{Endpoint, EndpointKey, ReplicaStatus};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The lease's time to live: how long a dead replica's endpoints outlive it.
pub const LEASE_TTL_SECONDS: i64 = 5;
/// How often the lease is kept alive and the record rewritten.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How often the policy version, the CA and the replicas are checked.
const POLL: Duration = Duration::from_millis(500);
/// After a failure, before a loop starts over.
const RETRY: Duration = Duration::from_secs(1);

/// What a replica says of itself in etcd.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub id: String,
    pub address: String,
    pub version: String,
    pub started_unix_ms: i64,
    pub proxies: u32,
    /// The signer a rotation moves to, and this replica's proxies that have
    /// not moved to it yet.
    #[serde(default)]
    pub rotation_signer: String,
    #[serde(default)]
    pub holdouts: Vec<Holdout>,
}

/// This replica.
pub struct Replica {
    pub id: String,
    pub address: String,
    etcd: Arc<Etcd>,
    registry: Arc<Registry>,
    started_unix_ms: i64,
    /// The lease in force (0: none: etcd unreachable).
    lease: AtomicI64,
    leader: AtomicBool,
    leader_id: Mutex<String>,
    /// Every live replica's record, as last read (this one included).
    peers: Mutex<Vec<ReplicaRecord>>,
    /// The other replicas whose endpoints are served here.
    remote: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("id", &self.id)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Cluster for Replica {
    fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    fn remote_holdouts(&self, signer_id: &str) -> Vec<Holdout> {
        self.peers
            .lock()
            .iter()
            .filter(|r| r.id != self.id)
            .flat_map(|r| {
                if r.rotation_signer == signer_id {
                    r.holdouts.clone()
                } else {
                    // It has not even seen the new root yet.
                    vec![Holdout {
                        what: format!("replica {} has not loaded the new root yet", r.id),
                        until_unix: 0,
                    }]
                }
            })
            .collect()
    }
}

fn endpoint_key(e: &Endpoint) -> String {
    format!("{}/{}/{}", e.namespace, e.service, e.instance_id)
}

/// Runs `f` again after [`RETRY`] whenever it fails, until the process ends.
async fn forever<F, Fut>(what: &'static str, f: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), EtcdError>>,
{
    loop {
        if let Err(e) = f().await {
            tracing::warn!(error = %e, "{what}; starting over");
        }
        tokio::time::sleep(RETRY).await;
    }
}

impl Replica {
    pub fn new(
        etcd: Arc<Etcd>,
        registry: Arc<Registry>,
        id: String,
        address: String,
    ) -> Arc<Replica> {
        registry.set_replica_id(&id);
        Arc::new(Replica {
            id,
            address,
            etcd,
            registry,
            started_unix_ms: now_unix_ms(),
            lease: AtomicI64::new(0),
            leader: AtomicBool::new(false),
            leader_id: Mutex::new(String::new()),
            peers: Mutex::new(Vec::new()),
            remote: Mutex::new(HashSet::new()),
        })
    }

    /// The replica that leads ("" when unknown).
    pub fn leader_id(&self) -> String {
        self.leader_id.lock().clone()
    }

    /// Every live replica, as last read.
    pub fn peers(&self) -> Vec<ReplicaRecord> {
        self.peers.lock().clone()
    }

    /// The replicas for `status`.
    pub fn statuses(&self) -> Vec<ReplicaStatus> {
        let leader = self.leader_id();
        let mut out: Vec<ReplicaStatus> = self
            .peers()
            .into_iter()
            .map(|r| ReplicaStatus {
                leader: r.id == leader,
                id: r.id,
                address: r.address,
                version: r.version,
                proxies: r.proxies,
                started_unix_ms: r.started_unix_ms,
                error: String::new(),
            })
            .collect();
        if !out.iter().any(|r| r.id == self.id) {
            out.push(ReplicaStatus {
                id: self.id.clone(),
                address: self.address.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                leader: self.id == leader,
                proxies: u32::try_from(self.registry.proxies_connected()).unwrap_or(u32::MAX),
                started_unix_ms: self.started_unix_ms,
                error: "not registered in etcd (unreachable?)".into(),
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Starts every loop; they run until the process ends.
    pub fn start(
        self: &Arc<Self>,
        store: Arc<tokio::sync::Mutex<Store>>,
        rotation: Arc<Rotation>,
        db: IdentityDb,
    ) {
        let this = self.clone();
        let rot = rotation.clone();
        tokio::spawn(async move { forever("etcd lease lost", || this.hold_lease(&rot)).await });
        let this = self.clone();
        tokio::spawn(async move {
            forever("cannot mirror endpoints to etcd", || {
                this.mirror_endpoints()
            })
            .await
        });
        let this = self.clone();
        tokio::spawn(
            async move { forever("endpoint watch ended", || this.watch_endpoints()).await },
        );
        let this = self.clone();
        tokio::spawn(
            async move { forever("leader election interrupted", || this.campaign()).await },
        );
        let this = self.clone();
        tokio::spawn(async move { this.poll(store, rotation, db).await });
    }

    async fn record(&self, rotation: &Arc<Rotation>) -> ReplicaRecord {
        ReplicaRecord {
            id: self.id.clone(),
            address: self.address.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            started_unix_ms: self.started_unix_ms,
            proxies: u32::try_from(self.registry.proxies_connected()).unwrap_or(u32::MAX),
            rotation_signer: rotation.signer_id(),
            holdouts: rotation.local_holdouts().await,
        }
    }

    /// Grants a lease, writes the record under it and keeps both alive until
    /// etcd stops answering.
    async fn hold_lease(&self, rotation: &Arc<Rotation>) -> Result<(), EtcdError> {
        let grant = self
            .etcd
            .run(|mut c| async move { c.lease_grant(LEASE_TTL_SECONDS, None).await })
            .await?;
        let lease = grant.id();
        let (mut keeper, mut answers) = self
            .etcd
            .run(|mut c| async move { c.lease_keep_alive(lease).await })
            .await?;
        self.lease.store(lease, Ordering::SeqCst);
        tracing::info!(replica = %self.id, lease, "replica registered in etcd");
        let result = async {
            let mut tick = tokio::time::interval(HEARTBEAT);
            loop {
                tick.tick().await;
                let record = serde_json::to_vec(&self.record(rotation).await)
                    .map_err(|e| EtcdError::Failed(e.to_string()))?;
                let key = self.etcd.key(&format!("replicas/{}", self.id));
                self.etcd
                    .run(|mut c| {
                        let (key, record) = (key.clone(), record.clone());
                        async move {
                            c.put(key, record, Some(PutOptions::new().with_lease(lease)))
                                .await
                        }
                    })
                    .await?;
                keeper
                    .keep_alive()
                    .await
                    .map_err(|e| EtcdError::Unavailable(e.to_string()))?;
                let answer =
                    tokio::time::timeout(crate::etcd::client::OP_TIMEOUT, answers.message())
                        .await
                        .map_err(|_| EtcdError::Unavailable("no keep-alive answer".into()))?
                        .map_err(|e| EtcdError::Unavailable(e.to_string()))?;
                match answer {
                    Some(a) if a.ttl() > 0 => {}
                    _ => return Err(EtcdError::Unavailable("the lease expired".into())),
                }
            }
        }
        .await;
        self.lease.store(0, Ordering::SeqCst);
        self.leader.store(false, Ordering::SeqCst);
        result
    }

    /// Writes this replica's endpoints under its lease as they change.
    async fn mirror_endpoints(&self) -> Result<(), EtcdError> {
        let mut changes = self.registry.subscribe_local_endpoints();
        let mut written: HashMap<String, Vec<u8>> = HashMap::new();
        let mut written_lease = 0;
        loop {
            let lease = self.lease.load(Ordering::SeqCst);
            if lease == 0 {
                tokio::time::sleep(POLL).await;
                continue;
            }
            let prefix = self.etcd.key(&format!("endpoints/{}/", self.id));
            if lease != written_lease {
                // A new lease: every key is written again under it, and what
                // an earlier run left that is no longer true goes. (Not a
                // delete of everything first: the other replicas would see
                // the endpoints vanish for a moment.)
                written = self
                    .etcd
                    .get_prefix(&prefix)
                    .await?
                    .into_iter()
                    .map(|(k, _)| (k, Vec::new()))
                    .collect();
            }
            changes.borrow_and_update();
            let now: HashMap<String, Vec<u8>> = self
                .registry
                .local_endpoints()
                .iter()
                .map(|e| (endpoint_key(e), e.encode_to_vec()))
                .collect();
            let mut ops = Vec::new();
            for (k, v) in &now {
                if written.get(k) != Some(v) || lease != written_lease {
                    ops.push(TxnOp::put(
                        format!("{prefix}{k}"),
                        v.clone(),
                        Some(PutOptions::new().with_lease(lease)),
                    ));
                }
            }
            for k in written.keys().filter(|k| !now.contains_key(*k)) {
                ops.push(TxnOp::delete(format!("{prefix}{k}"), None));
            }
            self.etcd.batch(ops).await?;
            written = now;
            written_lease = lease;
            tokio::select! {
                r = changes.changed() => if r.is_err() { return Ok(()) },
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
        }
    }

    /// Serves every other replica's endpoints here: all of them, then each
    /// change as etcd reports it.
    async fn watch_endpoints(&self) -> Result<(), EtcdError> {
        let prefix = self.etcd.key("endpoints/");
        let p = prefix.clone();
        let mut listed = self
            .etcd
            .run(|mut c| {
                let p = p.clone();
                async move { c.get(p, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let revision = listed.header().map_or(0, |h| h.revision());
        let mut by_replica: HashMap<String, Vec<Endpoint>> = HashMap::new();
        for kv in listed.take_kvs() {
            let key = String::from_utf8_lossy(kv.key()).to_string();
            let Some((replica, _)) = key.strip_prefix(&prefix).and_then(|r| r.split_once('/'))
            else {
                continue;
            };
            if replica == self.id {
                continue;
            }
            if let Ok(e) = Endpoint::decode(kv.value()) {
                by_replica.entry(replica.to_string()).or_default().push(e);
            }
        }
        let known: HashSet<String> = std::mem::take(&mut *self.remote.lock());
        for gone in known.iter().filter(|r| !by_replica.contains_key(*r)) {
            self.registry.set_remote_endpoints(gone, Vec::new());
        }
        self.remote.lock().extend(by_replica.keys().cloned());
        for (replica, endpoints) in by_replica {
            self.registry.set_remote_endpoints(&replica, endpoints);
        }
        let p = prefix.clone();
        let mut stream = self
            .etcd
            .run(|mut c| {
                let p = p.clone();
                async move {
                    c.watch(
                        p,
                        Some(
                            WatchOptions::new()
                                .with_prefix()
                                .with_start_revision(revision + 1),
                        ),
                    )
                    .await
                }
            })
            .await?;
        loop {
            let Some(response) = stream
                .message()
                .await
                .map_err(|e| EtcdError::Unavailable(e.to_string()))?
            else {
                return Err(EtcdError::Unavailable("the watch ended".into()));
            };
            if response.canceled() {
                return Err(EtcdError::Failed(format!(
                    "watch canceled: {}",
                    response.cancel_reason()
                )));
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).to_string();
                let Some((replica, rest)) =
                    key.strip_prefix(&prefix).and_then(|r| r.split_once('/'))
                else {
                    continue;
                };
                if replica == self.id {
                    continue;
                }
                match event.event_type() {
                    EventType::Put => {
                        self.remote.lock().insert(replica.to_string());
                        if let Ok(e) = Endpoint::decode(kv.value()) {
                            self.registry.upsert_remote_endpoint(replica, e);
                        }
                    }
                    EventType::Delete => {
                        let mut parts = rest.splitn(3, '/');
                        if let (Some(namespace), Some(service), Some(instance_id)) =
                            (parts.next(), parts.next(), parts.next())
                        {
                            self.registry.remove_remote_endpoint(
                                replica,
                                &EndpointKey {
                                    namespace: namespace.into(),
                                    service: service.into(),
                                    instance_id: instance_id.into(),
                                },
                            );
                        }
                    }
                }
            }
        }
    }

    /// Campaigns for leadership under the lease in force; leads until the
    /// lease is lost.
    async fn campaign(&self) -> Result<(), EtcdError> {
        let lease = self.lease.load(Ordering::SeqCst);
        if lease == 0 {
            return Ok(());
        }
        let name = self.etcd.key("leader");
        let mut election = self.etcd.client().election_client();
        let won = tokio::select! {
            r = election.campaign(name.clone(), self.id.clone(), lease) => match r {
                Ok(won) => Ok(won),
                // A candidate waits longer than a call may last: it asks again.
                Err(etcd_client::Error::GRpcStatus(s))
                    if matches!(s.code(), tonic::Code::Cancelled | tonic::Code::DeadlineExceeded) =>
                {
                    return Ok(());
                }
                Err(e) => Err(EtcdError::Unavailable(e.to_string())),
            },
            _ = async {
                while self.lease.load(Ordering::SeqCst) == lease {
                    tokio::time::sleep(POLL).await;
                }
            } => return Ok(()),
        };
        won?;
        self.leader.store(true, Ordering::SeqCst);
        tracing::info!(replica = %self.id, "this replica now leads");
        while self.lease.load(Ordering::SeqCst) == lease {
            tokio::time::sleep(POLL).await;
        }
        self.leader.store(false, Ordering::SeqCst);
        tracing::warn!(replica = %self.id, "lease lost: no longer leading");
        Ok(())
    }

    /// Follows the policy version, the CA record, the replicas and the leader.
    async fn poll(
        &self,
        store: Arc<tokio::sync::Mutex<Store>>,
        rotation: Arc<Rotation>,
        db: IdentityDb,
    ) {
        let ca_key = ca_store::etcd_key(&db).unwrap_or_default();
        let mut ca_revision = 0;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // Policy committed through another replica.
            let mut guard = store.clone().lock_owned().await;
            let registry = self.registry.clone();
            let refreshed = tokio::task::spawn_blocking(move || {
                let changed = guard.refresh();
                if let Ok(true) = changed {
                    registry.set_policy(guard.version(), &guard.current());
                }
                changed.map(|c| (c, guard.version()))
            })
            .await;
            match refreshed {
                Ok(Ok((true, version))) => {
                    tracing::info!(version, "policy changed through another replica")
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "cannot check the policy version"),
                _ => {}
            }
            // The CA, changed by a rotation through another replica.
            if let Ok(Some((_, revision))) = self.etcd.get(&ca_key).await {
                if revision != ca_revision {
                    let db = db.clone();
                    match tokio::task::spawn_blocking(move || ca_store::load(&db)).await {
                        Ok(Ok(Some(state))) => match rotation.adopt(state).await {
                            Ok(()) => ca_revision = revision,
                            Err(e) => tracing::error!(error = %e, "cannot follow the stored CA"),
                        },
                        Ok(Err(e)) => {
                            tracing::error!(error = %format!("{e:#}"), "cannot read the stored CA")
                        }
                        _ => {}
                    }
                }
            }
            // The replicas and the leader.
            if let Ok(records) = self.etcd.get_prefix(&self.etcd.key("replicas/")).await {
                let peers = records
                    .into_iter()
                    .filter_map(|(_, v)| serde_json::from_slice::<ReplicaRecord>(&v).ok())
                    .collect();
                *self.peers.lock() = peers;
            }
            let name = self.etcd.key("leader");
            let leader = self
                .etcd
                .run(|c| {
                    let name = name.clone();
                    async move { c.election_client().leader(name).await }
                })
                .await;
            if let Ok(mut leader) = leader {
                let id = leader
                    .take_kv()
                    .map(|kv| String::from_utf8_lossy(kv.value()).to_string())
                    .unwrap_or_default();
                *self.leader_id.lock() = id;
            }
        }
    }
}
