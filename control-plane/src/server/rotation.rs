//! Root rotation, and everything that follows a change of the CA.
//!
//! `ca rotate` generates a new root: both are trusted, the new one signs
//! workload certificates, the old one is "retiring" and keeps signing only the
//! control plane's own certificate (so a proxy that trusts nothing newer can
//! still verify the control plane). The new state is stored, the bundle file
//! is rewritten and a snapshot carrying both roots and the new signer id is
//! pushed (proxies renew when the signer id differs from their certificate's).
//!
//! The old root is retired (trusted = the new root only, stored, bundle file
//! rewritten, snapshot pushed, server certificate reissued) once nothing can
//! still need it, checked at every Ack, every proxy departure and every ten
//! seconds. Something still needs it while any of these holds:
//! - a connected proxy has not acked a snapshot from the rotation on while
//!   running a certificate from the new root;
//! - the ledger ([`crate::identity::issued`]) holds a certificate from the old root
//!   that has not expired and was not replaced (renewed, or its workload
//!   left): its proxy may be away (a network blip, a control-plane restart)
//!   and must be able to come back and renew;
//! - the old root signed before the ledger started (an older release) and a
//!   certificate from then may still be valid (bounded by the longest
//!   lifetime).
//!
//! Certificates whose bootstrap token was revoked never hold a rotation:
//! their workloads cannot renew anyway. `ca rotate --finish` retires the old
//! root at once and names what was still using it.
//!
//! The same task renews the server certificate when a third of it is left.

use crate::discovery::registry::{Registry, Trust};
use crate::human::{self, short};
use crate::identity::ca::{self, generate_root, Authority, CaState};
use crate::identity::ca_store;
use crate::identity::db::IdentityDb;
use crate::identity::issued::Ledger;
use crate::identity::tokens::TokenStore;
use crate::server::tls::ServerTls;
use remora_proto::util::now_unix;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the server certificate's remaining lifetime is checked.
const SERVER_CERT_CHECK: Duration = Duration::from_secs(3600);
/// How often a rotation in progress is checked without any proxy event
/// (certificates expire on their own).
const ROTATION_CHECK: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// The rotation cannot start (operator CA, one already in progress), or
    /// cannot finish (none in progress).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

fn failed(e: impl std::fmt::Display) -> RotationError {
    RotationError::Failed(e.to_string())
}

/// Something that may still use a certificate from the root being retired.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Holdout {
    /// Who, for the operator.
    pub what: String,
    /// When it stops holding the rotation at the latest (its certificate
    /// expires).
    pub until_unix: i64,
}

impl std::fmt::Display for Holdout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}, valid until {}",
            self.what,
            human::unix_time_or(self.until_unix, "?")
        )
    }
}

/// The old and new signer ids of a finished rotation, and what was still
/// using the old root.
#[derive(Debug)]
pub struct Finished {
    pub old: String,
    pub new: String,
    pub left_behind: Vec<Holdout>,
}

/// Changes the CA and makes every part of the control plane follow.
#[derive(Debug)]
pub struct Rotation {
    authority: Arc<Authority>,
    registry: Arc<Registry>,
    tls: Arc<ServerTls>,
    db: IdentityDb,
    ledger: Arc<Ledger>,
    tokens: Arc<TokenStore>,
    bundle_file: PathBuf,
    /// Serializes rotations, retirements and certificate renewals.
    lock: tokio::sync::Mutex<()>,
    /// The generation of the snapshot that started the rotation in progress
    /// (0 after a restart: every snapshot of this process carries it).
    marker: AtomicU64,
    /// The other replicas (`--store etcd`); None: this is the only one.
    cluster: parking_lot::Mutex<Option<Arc<dyn Cluster>>>,
}

/// What a rotation needs to know of the other replicas.
pub trait Cluster: Send + Sync + std::fmt::Debug {
    /// Whether this replica leads singleton work (retiring an old root).
    fn is_leader(&self) -> bool;
    /// What the other replicas' connected proxies still hold for a rotation
    /// to `signer_id`, as they last reported it.
    fn remote_holdouts(&self, signer_id: &str) -> Vec<Holdout>;
}

pub fn trust_of(state: &CaState) -> Trust {
    Trust {
        bundle_pem: state.bundle_pem(),
        signer_id: state.signer.id.clone(),
    }
}

impl Rotation {
    pub fn new(
        authority: Arc<Authority>,
        registry: Arc<Registry>,
        tls: Arc<ServerTls>,
        db: IdentityDb,
        ledger: Arc<Ledger>,
        tokens: Arc<TokenStore>,
        bundle_file: PathBuf,
    ) -> Rotation {
        Rotation {
            authority,
            registry,
            tls,
            db,
            ledger,
            tokens,
            bundle_file,
            lock: tokio::sync::Mutex::new(()),
            marker: AtomicU64::new(0),
            cluster: parking_lot::Mutex::new(None),
        }
    }

    /// Joins the other replicas: only the leader retires an old root, and
    /// only once their proxies have moved too.
    pub fn set_cluster(&self, cluster: Arc<dyn Cluster>) {
        *self.cluster.lock() = Some(cluster);
    }

    /// The signer in force.
    pub fn signer_id(&self) -> String {
        self.authority.current().signer.id.clone()
    }

    fn cluster(&self) -> Option<Arc<dyn Cluster>> {
        self.cluster.lock().clone()
    }

    /// Follows a CA state another replica stored (a rotation started or
    /// finished there): TLS, the authority, the bundle file and the snapshot.
    pub async fn adopt(self: &Arc<Self>, state: CaState) -> Result<(), RotationError> {
        let _guard = self.lock.lock().await;
        let current = self.authority.current();
        if current.signer.id == state.signer.id
            && current.retiring == state.retiring
            && current.roots.len() == state.roots.len()
        {
            return Ok(());
        }
        let (signer, retiring) = (state.signer.id.clone(), state.retiring.clone());
        let this = self.clone();
        self.marker.store(u64::MAX, Ordering::SeqCst);
        let generation = tokio::task::spawn_blocking(move || this.apply(state))
            .await
            .map_err(failed)??;
        self.marker.store(generation, Ordering::SeqCst);
        tracing::info!(%signer, %retiring, generation, "CA changed by another replica; following it");
        Ok(())
    }

    /// The connected proxies of this replica that have not moved to the
    /// rotation in progress (what it reports to the other replicas).
    pub async fn local_holdouts(self: &Arc<Self>) -> Vec<Holdout> {
        let state = self.authority.current();
        if !state.rotating() || self.marker.load(Ordering::SeqCst) == u64::MAX {
            return Vec::new();
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut seen = HashSet::new();
            this.proxy_holdouts(&state, now_unix(), false, &mut seen)
        })
        .await
        .unwrap_or_default()
    }

    pub fn bundle_file(&self) -> &std::path::Path {
        &self.bundle_file
    }

    /// Stores `state`, then makes TLS, the authority, the bundle file and the
    /// snapshot follow it; returns the generation of the snapshot pushed.
    /// Blocking (redb, file I/O): run it on the blocking pool.
    fn install(&self, state: CaState) -> Result<u64, RotationError> {
        if !state.operator {
            ca_store::save(&self.db, &state).map_err(|e| failed(format!("{e:#}")))?;
        }
        self.apply(state)
    }

    /// Makes TLS, the authority, the bundle file and the snapshot follow
    /// `state`. Blocking (file I/O).
    fn apply(&self, state: CaState) -> Result<u64, RotationError> {
        self.tls.reload(&state).map_err(failed)?;
        let state = self.authority.replace(state);
        if let Err(e) = ca_store::write_bundle_file(&self.bundle_file, &state.bundle_pem()) {
            tracing::error!(error = %format!("{e:#}"), "cannot rewrite the trust bundle file");
        }
        Ok(self.registry.set_trust(trust_of(&state)))
    }

    async fn install_blocking(self: &Arc<Self>, state: CaState) -> Result<u64, RotationError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.install(state))
            .await
            .map_err(failed)?
    }

    /// Starts a rotation; returns the old and new signer ids.
    pub async fn rotate(self: &Arc<Self>) -> Result<(String, String), RotationError> {
        let _guard = self.lock.lock().await;
        let current = self.authority.current();
        if current.operator {
            return Err(RotationError::Refused(
                "the CA was provided by the operator (--ca-cert/--ca-key), so it cannot be \
                 rotated from here: restart remora-control with the new --ca-cert/--ca-key and a \
                 --ca-bundle that holds both the old and the new root"
                    .into(),
            ));
        }
        if current.rotating() {
            return Err(RotationError::Refused(format!(
                "a root rotation is already in progress: {} is retired once no certificate from \
                 it is in use any more (see `remora-control status`), or at once with \
                 `remora-control ca rotate --finish`",
                short(&current.retiring),
            )));
        }
        let signer = generate_root(&self.authority.trust_domain, now_unix()).map_err(failed)?;
        let (old, new) = (current.signer.id.clone(), signer.id.clone());
        let mut roots = current.roots.clone();
        roots.push(signer.cert.clone());
        let state = CaState {
            roots,
            signer: Arc::new(signer),
            retiring: old.clone(),
            retiring_signer: Some(current.signer.clone()),
            operator: false,
        };
        // No retirement can see the new signer with a stale marker: it waits
        // for this lock, and the marker is set before it is released.
        self.marker.store(u64::MAX, Ordering::SeqCst);
        let generation = self.install_blocking(state).await?;
        self.marker.store(generation, Ordering::SeqCst);
        tracing::info!(old = %old, new = %new, generation, "root rotation started");
        Ok((old, new))
    }

    /// What may still use a certificate from the root being retired (all of
    /// it, or only the first found). Blocking (token lookups).
    fn holdouts(&self, state: &CaState, first_only: bool) -> Vec<Holdout> {
        let now = now_unix();
        let old = state.retiring.as_str();
        let mut out = Vec::new();
        if old.is_empty() {
            return out;
        }
        let mut seen: HashSet<String> = HashSet::new();
        out.extend(self.proxy_holdouts(state, now, first_only, &mut seen));
        if first_only && !out.is_empty() {
            return out;
        }
        // The other replicas' proxies, as they reported them.
        if let Some(cluster) = self.cluster() {
            out.extend(cluster.remote_holdouts(&state.signer.id));
            if first_only && !out.is_empty() {
                return out;
            }
        }
        let mut revoked_tokens: HashMap<String, bool> = HashMap::new();
        let mut revoked = |token: &Option<String>| -> bool {
            let Some(token) = token else {
                return false;
            };
            *revoked_tokens.entry(token.clone()).or_insert_with(|| {
                // Unreadable: assume it still counts.
                matches!(self.tokens.get(token), Ok(Some(record)) if record.revoked)
            })
        };
        // Certificates from the old root that nobody has shown replaced.
        for cert in self.ledger.in_use(old, now) {
            if seen.contains(&cert.serial) || revoked(&cert.token_id) {
                continue;
            }
            out.push(Holdout {
                what: format!(
                    "certificate {} for {} (token {}; its proxy is not connected)",
                    short(&cert.serial),
                    cert.spiffe_id,
                    cert.token_id.as_deref().unwrap_or("-")
                ),
                until_unix: cert.not_after_unix,
            });
            if first_only {
                return out;
            }
        }
        // Certificates the old root signed before there was a ledger.
        let old_since = state
            .retiring_signer
            .as_ref()
            .map(|s| s.not_before_unix)
            .or_else(|| {
                state
                    .roots
                    .iter()
                    .find(|r| ca::fingerprint(r) == old)
                    .and_then(|r| ca::parse_cert(r).ok())
                    .map(|c| c.validity().not_before.timestamp())
            })
            .unwrap_or(i64::MIN);
        let started = self.ledger.started_unix();
        // Roots are backdated by a minute.
        if old_since < started - 120 {
            let max = i64::try_from(self.authority.lifetimes.max.as_secs()).unwrap_or(i64::MAX);
            let until = started.saturating_add(max);
            if now < until {
                out.push(Holdout {
                    what: "certificates the old root signed before this control plane kept a \
                           ledger of them (an older release)"
                        .into(),
                    until_unix: until,
                });
            }
        }
        out
    }

    /// This replica's connected proxies that have not shown they moved to
    /// `state`'s signer (those whose token was revoked or whose certificate
    /// expired do not count); `seen` gets the certificates they account for.
    /// Blocking (token lookups).
    fn proxy_holdouts(
        &self,
        state: &CaState,
        now: i64,
        first_only: bool,
        seen: &mut HashSet<String>,
    ) -> Vec<Holdout> {
        let old = state.retiring.as_str();
        let mut out = Vec::new();
        let mut revoked_tokens: HashMap<String, bool> = HashMap::new();
        let mut revoked = |token: &Option<String>| -> bool {
            let Some(token) = token else {
                return false;
            };
            *revoked_tokens.entry(token.clone()).or_insert_with(|| {
                // Unreadable: assume it still counts.
                matches!(self.tokens.get(token), Ok(Some(record)) if record.revoked)
            })
        };
        let marker = self.marker.load(Ordering::SeqCst);
        for p in self.registry.behind(&state.signer.id, marker) {
            let entry = self.ledger.get(&p.tls_serial);
            seen.extend(self.ledger.chain(&p.tls_serial));
            if entry.as_ref().is_some_and(|e| revoked(&e.token_id)) {
                continue;
            }
            if p.cert_not_after_unix != 0 && p.cert_not_after_unix <= now {
                continue;
            }
            let until = match (p.cert_not_after_unix, &entry) {
                (0, Some(e)) => e.not_after_unix,
                (0, None) => now,
                (t, _) => t,
            };
            let doing = if p.cert_signer_id == old {
                "runs a certificate from the old root"
            } else {
                "has not acked the new root yet"
            };
            out.push(Holdout {
                what: format!(
                    "proxy {}/{} {} (connected; {doing})",
                    p.namespace, p.service, p.instance_id
                ),
                until_unix: until,
            });
            if first_only {
                return out;
            }
        }
        out
    }

    /// What holds the rotation in progress (empty when none is), and when
    /// the last of it expires.
    pub async fn pending(self: &Arc<Self>) -> (Vec<Holdout>, i64) {
        let state = self.authority.current();
        if !state.rotating() {
            return (Vec::new(), 0);
        }
        let this = self.clone();
        let holdouts = tokio::task::spawn_blocking(move || this.holdouts(&state, false))
            .await
            .unwrap_or_default();
        let deadline = holdouts.iter().map(|h| h.until_unix).max().unwrap_or(0);
        (holdouts, deadline)
    }

    /// The CA state without the root being retired.
    fn retired(current: &CaState) -> CaState {
        CaState {
            roots: current
                .roots
                .iter()
                .filter(|r| ca::fingerprint(r) != current.retiring)
                .cloned()
                .collect(),
            signer: current.signer.clone(),
            retiring: String::new(),
            retiring_signer: None,
            operator: current.operator,
        }
    }

    /// Retires the old root if nothing may still use it. Returns whether it
    /// did.
    pub async fn retire_if_done(self: &Arc<Self>) -> Result<bool, RotationError> {
        let _guard = self.lock.lock().await;
        let current = self.authority.current();
        if !current.rotating() || self.marker.load(Ordering::SeqCst) == u64::MAX {
            return Ok(false);
        }
        // One replica retires (the others follow the stored CA).
        if self.cluster().is_some_and(|c| !c.is_leader()) {
            return Ok(false);
        }
        let this = self.clone();
        let state = current.clone();
        let holding = tokio::task::spawn_blocking(move || this.holdouts(&state, true))
            .await
            .map_err(failed)?;
        if !holding.is_empty() {
            return Ok(false);
        }
        self.install_blocking(Self::retired(&current)).await?;
        tracing::info!(retired = %current.retiring, signer = %current.signer.id,
            "old root retired: no certificate from it is in use any more; rotation complete");
        Ok(true)
    }

    /// Retires the old root now, whatever still uses it (`ca rotate
    /// --finish`); names what did.
    pub async fn finish(self: &Arc<Self>) -> Result<Finished, RotationError> {
        let _guard = self.lock.lock().await;
        let current = self.authority.current();
        if !current.rotating() {
            return Err(RotationError::Refused(
                "no root rotation is in progress (`remora-control ca rotate` starts one)".into(),
            ));
        }
        let this = self.clone();
        let state = current.clone();
        let left_behind = tokio::task::spawn_blocking(move || this.holdouts(&state, false))
            .await
            .map_err(failed)?;
        self.install_blocking(Self::retired(&current)).await?;
        if left_behind.is_empty() {
            tracing::info!(retired = %current.retiring, "old root retired by the operator");
        } else {
            let list: Vec<String> = left_behind.iter().map(ToString::to_string).collect();
            tracing::warn!(retired = %current.retiring, left_behind = %list.join("; "),
                "old root retired by the operator while certificates from it were in use: \
                 their proxies must bootstrap again with their tokens");
        }
        Ok(Finished {
            old: current.retiring.clone(),
            new: current.signer.id.clone(),
            left_behind,
        })
    }

    /// Renews the server certificate if a third of its lifetime is left.
    async fn renew_server_cert(self: &Arc<Self>) {
        let _guard = self.lock.lock().await;
        let state = self.authority.current();
        let tls = self.tls.clone();
        let renewed = tokio::task::spawn_blocking(move || tls.reload(&state)).await;
        match renewed {
            Ok(Ok(true)) => tracing::info!("server certificate renewed"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot renew the server certificate"),
            Err(e) => tracing::error!(error = %e, "server certificate renewal failed"),
        }
    }

    /// Follows acks, departures and the clock (retiring the old root when it
    /// can) and renews the server certificate, until `stop` resolves.
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut renewal = tokio::time::interval(SERVER_CERT_CHECK);
        renewal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renewal.tick().await;
        let mut clock = tokio::time::interval(ROTATION_CHECK);
        clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = renewal.tick() => self.renew_server_cert().await,
                _ = self.registry.proxy_changed() => self.check().await,
                _ = clock.tick() => {
                    if self.authority.current().rotating() {
                        self.check().await;
                    }
                }
            }
        }
    }

    /// Retires the old root if nothing may still use it (logs a failure).
    pub async fn check(self: &Arc<Self>) {
        if let Err(e) = self.retire_if_done().await {
            tracing::error!(error = %e, "cannot retire the old root");
        }
    }
}
