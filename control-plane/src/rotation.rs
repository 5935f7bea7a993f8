//! Root rotation, and everything that follows a change of the CA.
//!
//! `ca rotate` generates a new root: both are trusted, the new one signs, the
//! old one is "retiring". The new state is stored, the server's own
//! certificate is reissued from the new root, the bundle file is rewritten
//! and a snapshot carrying both roots and the new signer id is pushed
//! (proxies renew when the signer id differs from their certificate's).
//!
//! Then, at every Ack and every proxy departure: once every connected proxy
//! (at least one) has acked a snapshot at or after the rotation's and reports
//! a certificate from the new root, the old root is retired: trusted = the
//! new root only, stored, bundle file rewritten, snapshot pushed.
//!
//! The same task renews the server certificate when a third of it is left.

use crate::ca::{self, generate_root, Authority, CaState};
use crate::ca_store;
use crate::identity_db::IdentityDb;
use crate::registry::{Registry, Trust};
use crate::tls::ServerTls;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the server certificate's remaining lifetime is checked.
const SERVER_CERT_CHECK: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// The rotation cannot start (operator CA, one already in progress).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

fn failed(e: impl std::fmt::Display) -> RotationError {
    RotationError::Failed(e.to_string())
}

/// Changes the CA and makes every part of the control plane follow.
#[derive(Debug)]
pub struct Rotation {
    authority: Arc<Authority>,
    registry: Arc<Registry>,
    tls: Arc<ServerTls>,
    db: IdentityDb,
    bundle_file: PathBuf,
    /// Serializes rotations, retirements and certificate renewals.
    lock: tokio::sync::Mutex<()>,
    /// The generation of the snapshot that started the rotation in progress
    /// (0 after a restart: every snapshot of this process carries it).
    marker: AtomicU64,
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
        bundle_file: PathBuf,
    ) -> Rotation {
        Rotation {
            authority,
            registry,
            tls,
            db,
            bundle_file,
            lock: tokio::sync::Mutex::new(()),
            marker: AtomicU64::new(0),
        }
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
                "a root rotation is already in progress: {} is retired once every proxy runs a \
                 certificate from {} (see `remora-control status`)",
                short(&current.retiring),
                short(&current.signer.id)
            )));
        }
        let signer = generate_root(&self.authority.trust_domain, crate::tokens::now_unix())
            .map_err(failed)?;
        let (old, new) = (current.signer.id.clone(), signer.id.clone());
        let mut roots = current.roots.clone();
        roots.push(signer.cert.clone());
        let state = CaState {
            roots,
            signer: Arc::new(signer),
            retiring: old.clone(),
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

    /// Retires the old root if every connected proxy runs on the new one.
    /// Returns whether it did.
    pub async fn retire_if_done(self: &Arc<Self>) -> Result<bool, RotationError> {
        let _guard = self.lock.lock().await;
        let current = self.authority.current();
        if !current.rotating() {
            return Ok(false);
        }
        let marker = self.marker.load(Ordering::SeqCst);
        if marker == u64::MAX || !self.registry.all_on_signer(&current.signer.id, marker) {
            return Ok(false);
        }
        let retired = current.retiring.clone();
        let state = CaState {
            roots: current
                .roots
                .iter()
                .filter(|r| ca::fingerprint(r) != retired)
                .cloned()
                .collect(),
            signer: current.signer.clone(),
            retiring: String::new(),
            operator: current.operator,
        };
        self.install_blocking(state).await?;
        tracing::info!(retired = %retired, signer = %current.signer.id, "old root retired: rotation complete");
        Ok(true)
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

    /// Follows acks and departures (retiring the old root when it can) and
    /// renews the server certificate, until `stop` resolves.
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut renewal = tokio::time::interval(SERVER_CERT_CHECK);
        renewal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renewal.tick().await;
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = renewal.tick() => self.renew_server_cert().await,
                _ = self.registry.proxy_changed() => {
                    if let Err(e) = self.retire_if_done().await {
                        tracing::error!(error = %e, "cannot retire the old root");
                    }
                }
            }
        }
    }
}

/// The first 12 hex characters of a signer id.
pub fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}
