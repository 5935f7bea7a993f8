//! This workload's certificate slot: the certificate (its key made and kept
//! in memory, never written to disk), the trust bundle in force and the TLS
//! configurations built from both, swapped in whole when either changes
//! (new handshakes use the new certificate; open connections keep theirs).
//! The control side fills it (`certify`: Certify and renewals; `discovery`:
//! new trust bundles and signers); every TLS handshake of the data path
//! reads it.
//!
//! A workload is in the mesh only while its certificate chains to the trust
//! bundle it was last given and the control plane accepts it. After a root
//! rotation was finished without it (it was away, or the operator forced
//! it), neither holds: the snapshot's bundle no longer has its root, or, if
//! it missed that snapshot too, the control plane refuses its certificate in
//! the TLS handshake (see `certify`). Either way the proxy is not ready until
//! it holds a certificate the mesh trusts again.

use crate::transport::tls::{self, TlsConfigs};
use arc_swap::{ArcSwap, ArcSwapOption};
use remora_proto::SpiffeId;
use rustls::sign::CertifiedKey;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Notify};

/// A certificate this workload holds, with its key (in memory only).
pub struct WorkloadCert {
    pub chain_pem: String,
    key_pem: String,
    pub certified: Arc<CertifiedKey>,
    pub received: SystemTime,
    pub not_after_unix: i64,
    pub signer_id: String,
}

impl WorkloadCert {
    /// A certificate chain and its key, as Certify returned them.
    pub fn new(
        chain_pem: String,
        key_pem: String,
        certified: Arc<CertifiedKey>,
        not_after_unix: i64,
        signer_id: String,
    ) -> WorkloadCert {
        WorkloadCert {
            chain_pem,
            key_pem,
            certified,
            received: SystemTime::now(),
            not_after_unix,
            signer_id,
        }
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// When it expires.
    pub fn not_after(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(self.not_after_unix).unwrap_or(0))
    }

    /// When to renew: about 70% into the lifetime (from when it was received).
    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after()
            .duration_since(self.received)
            .unwrap_or(Duration::ZERO);
        self.received + lifetime.mul_f64(0.7)
    }
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("not_after_unix", &self.not_after_unix)
            .field("signer_id", &self.signer_id)
            .finish_non_exhaustive()
    }
}

/// This workload's identity and the TLS configurations built from it.
pub struct Identity {
    pub spiffe_id: SpiffeId,
    cert: ArcSwapOption<WorkloadCert>,
    /// The latest trust bundle (PEM), from Certify or a snapshot.
    bundle: ArcSwap<String>,
    configs: ArcSwapOption<TlsConfigs>,
    /// Bumped on every new certificate.
    generation: watch::Sender<u64>,
    renew_now: Notify,
    /// The certificate chains to the trust bundle in force.
    trusted: AtomicBool,
    /// The control plane refused the certificate in a TLS handshake.
    refused: AtomicBool,
    /// Failed or lost discovery sessions since the last good one.
    failures: AtomicU32,
    failed: Notify,
}

impl Identity {
    /// An empty slot for the workload `spiffe_id`.
    pub fn new(spiffe_id: SpiffeId) -> Arc<Identity> {
        Arc::new(Identity {
            spiffe_id,
            cert: ArcSwapOption::empty(),
            bundle: ArcSwap::from_pointee(String::new()),
            configs: ArcSwapOption::empty(),
            generation: watch::channel(0).0,
            renew_now: Notify::new(),
            trusted: AtomicBool::new(false),
            refused: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            failed: Notify::new(),
        })
    }

    /// Whether the workload can take part in the mesh: it holds a
    /// certificate that has not expired, chains to the trust bundle in force
    /// (peers verify it against the same bundle) and that the control plane
    /// has not refused.
    pub fn in_mesh(&self) -> bool {
        self.has_cert()
            && self.trusted.load(Ordering::Acquire)
            && !self.refused.load(Ordering::Acquire)
    }

    /// A discovery session failed or was lost.
    pub fn control_plane_failed(&self) {
        self.failures.fetch_add(1, Ordering::AcqRel);
        self.failed.notify_one();
    }

    /// A discovery session is up.
    pub fn control_plane_connected(&self) {
        self.failures.store(0, Ordering::Release);
    }

    /// Resolves at the next failed or lost discovery session.
    pub async fn control_plane_failure(&self) {
        self.failed.notified().await;
    }

    /// Failed or lost discovery sessions since the last good one.
    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Acquire)
    }

    /// Whether the control plane refused the certificate in a handshake.
    pub fn is_refused(&self) -> bool {
        self.refused.load(Ordering::Acquire)
    }

    /// The control plane refuses `cert` (unless a new certificate came
    /// meanwhile): out of the mesh, and a new certificate is asked for now.
    /// Returns whether `cert` was still the current one.
    pub fn refuse(&self, cert: &Arc<WorkloadCert>) -> bool {
        if !self.cert().is_some_and(|c| Arc::ptr_eq(&c, cert)) {
            return false;
        }
        self.refused.store(true, Ordering::Release);
        self.renew_now.notify_one();
        true
    }

    /// Resolves when a certificate is wanted before its renewal time (a
    /// new signer, a bundle without its root, a refusal).
    pub async fn renewal_wanted(&self) {
        self.renew_now.notified().await;
    }

    /// Records whether the current certificate chains to the bundle in force;
    /// one that does not is renewed at once.
    fn check_trust(&self, cert: &WorkloadCert, roots: Arc<rustls::RootCertStore>) {
        match chains_to(cert, roots) {
            Ok(()) => self.trusted.store(true, Ordering::Release),
            Err(e) => {
                let was = self.trusted.swap(false, Ordering::AcqRel);
                if was {
                    tracing::warn!(error = %e, signer = %cert.signer_id,
                        "the trust bundle no longer holds this workload's root: not ready; \
                         getting a certificate from the mesh's root");
                }
                self.renew_now.notify_one();
            }
        }
    }

    pub fn cert(&self) -> Option<Arc<WorkloadCert>> {
        self.cert.load_full()
    }

    /// Whether the workload holds a certificate that has not expired.
    pub fn has_cert(&self) -> bool {
        let now = remora_proto::util::now_unix();
        self.cert
            .load()
            .as_ref()
            .is_some_and(|c| c.not_after_unix > now)
    }

    pub fn configs(&self) -> Option<Arc<TlsConfigs>> {
        self.configs.load_full()
    }

    pub fn bundle_pem(&self) -> Arc<String> {
        self.bundle.load_full()
    }

    /// Changes with every new certificate.
    pub fn generations(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Resolves once the workload holds a certificate.
    pub async fn wait_for_cert(&self) {
        let mut rx = self.generation.subscribe();
        let _ = rx.wait_for(|g| *g > 0).await;
    }

    /// A new trust bundle from the control plane (root rotation).
    pub fn set_bundle(&self, pem: &str) {
        if pem.is_empty() || self.bundle.load().as_str() == pem {
            return;
        }
        let previous = self.bundle.swap(Arc::new(pem.to_string()));
        if let Err(e) = self.rebuild() {
            self.bundle.store(previous);
            tracing::warn!(error = %e, "cannot use the new trust bundle; keeping the previous one");
        } else {
            tracing::info!("installed a new trust bundle");
        }
    }

    /// The control plane signs with `signer_id` now: renew if ours is older.
    pub fn check_signer(&self, signer_id: &str) {
        if signer_id.is_empty() {
            return;
        }
        if let Some(c) = self.cert.load().as_ref() {
            if c.signer_id != signer_id {
                tracing::info!(old = %c.signer_id, new = %signer_id, "signer changed; renewing now");
                self.renew_now.notify_one();
            }
        }
    }

    /// Installs a new certificate and the trust bundle it came with; refused
    /// (keeping the current one) if it does not chain to that bundle.
    pub fn install(&self, cert: WorkloadCert, bundle_pem: String) -> Result<(), String> {
        let cert = Arc::new(cert);
        let roots = Arc::new(tls::roots_from_pem(&bundle_pem)?);
        chains_to(&cert, roots.clone())
            .map_err(|e| format!("the new certificate does not chain to its trust bundle: {e}"))?;
        let configs =
            TlsConfigs::build(cert.certified.clone(), roots, self.spiffe_id.trust_domain())?;
        self.bundle.store(Arc::new(bundle_pem));
        self.configs.store(Some(Arc::new(configs)));
        self.cert.store(Some(cert));
        self.trusted.store(true, Ordering::Release);
        self.refused.store(false, Ordering::Release);
        self.generation.send_modify(|g| *g += 1);
        Ok(())
    }

    fn rebuild(&self) -> Result<(), String> {
        let Some(cert) = self.cert.load_full() else {
            return Ok(());
        };
        let roots = Arc::new(tls::roots_from_pem(&self.bundle.load())?);
        let configs = TlsConfigs::build(
            cert.certified.clone(),
            roots.clone(),
            self.spiffe_id.trust_domain(),
        )?;
        self.configs.store(Some(Arc::new(configs)));
        self.check_trust(&cert, roots);
        Ok(())
    }
}

/// Whether `cert` verifies against `roots`, as a peer verifies it (its
/// expiry aside: that is [`Identity::has_cert`]'s).
fn chains_to(cert: &WorkloadCert, roots: Arc<rustls::RootCertStore>) -> Result<(), String> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, tls::provider())
            .build()
            .map_err(|e| e.to_string())?;
    let (leaf, intermediates) = cert.certified.cert.split_first().ok_or("no certificate")?;
    // Within the certificate's validity: only the chain is checked here.
    let at = remora_proto::util::now_unix().min(cert.not_after_unix.saturating_sub(1));
    let at = u64::try_from(at).unwrap_or(0);
    verifier
        .verify_client_cert(
            leaf,
            intermediates,
            rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(at)),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}
