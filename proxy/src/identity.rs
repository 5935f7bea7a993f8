//! The workload's identity: a key pair made in memory (the private key never
//! leaves the process and is never written to disk), a CSR for
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service>` sent with the bootstrap
//! token, and the certificate that comes back. Renewed at about 70% of its
//! lifetime (a renewal presents the current certificate as its TLS client
//! certificate, which authenticates it, so a single-use token keeps working),
//! at once when the control plane starts signing with a new root,
//! and retried with jitter while the control plane is away, keeping the valid
//! certificate meanwhile. New handshakes use the new certificate; open
//! connections keep theirs.
//!
//! A workload is in the mesh only while its certificate chains to the trust
//! bundle it was last given and the control plane accepts it. After a root
//! rotation was finished without it (it was away, or the operator forced
//! it), neither holds: the snapshot's bundle no longer has its root, or, if
//! it missed that snapshot too, the control plane refuses its certificate in
//! the TLS handshake. When discovery keeps failing, a probe handshake tells
//! which; either way the proxy is not ready and bootstraps again with its
//! token (a renewal with a certificate nobody trusts cannot work), ready
//! again once it holds a certificate the mesh trusts.
//!
//! The lifetime asked for is `--cert-lifetime` when it was given; a proxy
//! left at the default asks for nothing, so the control plane's
//! `--cert-lifetime` applies.

use crate::discovery::Backoff;
use crate::tls::{self, TlsConfigs};
use arc_swap::{ArcSwap, ArcSwapOption};
use remora_proto::v1::identity_client::IdentityClient;
use remora_proto::v1::CertifyRequest;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncReadExt as _;
use tokio::sync::{watch, Notify};

/// `remora-proxy run`'s `--cert-lifetime` default. A proxy left at it asks
/// for no lifetime, so that the control plane's `--cert-lifetime` applies
/// (the settings do not say whether the flag was given; asking for exactly
/// 24 h is read as not asking).
/// Failed discovery attempts in a row before the control plane is asked
/// whether it still accepts this workload's certificate.
const PROBE_AFTER_FAILURES: u32 = 3;
/// At most one such probe this often.
const PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// Each step of a probe (connect, handshake, first bytes).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The lifetime to ask for (0: the control plane's default): only what
/// `--cert-lifetime` set.
pub fn requested_lifetime(configured: Option<Duration>) -> u64 {
    configured.map_or(0, |d| d.as_secs())
}

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
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// When to renew: about 70% into the lifetime (from when it was received).
    pub fn renew_at(&self) -> SystemTime {
        let not_after = UNIX_EPOCH + Duration::from_secs(self.not_after_unix.max(0) as u64);
        let lifetime = not_after
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
    pub spiffe_id: String,
    pub trust_domain: String,
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
    pub fn new(namespace: &str, service: &str, trust_domain: &str) -> Arc<Identity> {
        Arc::new(Identity {
            spiffe_id: format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service}"),
            trust_domain: trust_domain.to_string(),
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
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
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

    fn install(&self, cert: WorkloadCert, bundle_pem: String) -> Result<(), String> {
        let cert = Arc::new(cert);
        let roots = Arc::new(tls::roots_from_pem(&bundle_pem)?);
        chains_to(&cert, roots.clone())
            .map_err(|e| format!("the new certificate does not chain to its trust bundle: {e}"))?;
        let configs = TlsConfigs::build(cert.certified.clone(), roots, &self.trust_domain)?;
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
        let configs = TlsConfigs::build(cert.certified.clone(), roots.clone(), &self.trust_domain)?;
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
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let at = now.min(
        u64::try_from(cert.not_after_unix)
            .unwrap_or(0)
            .saturating_sub(1),
    );
    verifier
        .verify_client_cert(
            leaf,
            intermediates,
            rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(at)),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// What the control plane makes of this workload's certificate.
#[derive(Debug)]
enum Verdict {
    Accepted,
    Refused(String),
    Unknown(String),
}

/// Presents one certificate as the TLS client certificate.
#[derive(Debug)]
struct Presents(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for Presents {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A TLS handshake with the control plane presenting `cert`, and its first
/// bytes: the control plane sends its HTTP/2 settings when it accepts the
/// certificate, and an alert when it does not.
async fn probe(state: &crate::state::State, cert: &WorkloadCert) -> Verdict {
    let s = &state.settings;
    let Some(ca_file) = &s.ca_file else {
        return Verdict::Unknown("no --ca-file".into());
    };
    let mut pem = match std::fs::read_to_string(ca_file) {
        Ok(pem) => pem,
        Err(e) => return Verdict::Unknown(format!("reading {}: {e}", ca_file.display())),
    };
    pem.push('\n');
    pem.push_str(&state.identity.bundle_pem());
    let roots = match tls::roots_from_pem(&pem) {
        Ok(roots) => roots,
        Err(e) => return Verdict::Unknown(e),
    };
    let config = match rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
    {
        Ok(builder) => {
            let mut config = builder
                .with_root_certificates(roots)
                .with_client_cert_resolver(Arc::new(Presents(cert.certified.clone())));
            config.alpn_protocols = vec![b"h2".to_vec()];
            config
        }
        Err(e) => return Verdict::Unknown(e.to_string()),
    };
    let Ok(name) = rustls::pki_types::ServerName::try_from(s.control_plane_name.clone()) else {
        return Verdict::Unknown(format!(
            "bad --control-plane-name {:?}",
            s.control_plane_name
        ));
    };
    let url = crate::control_plane::https_url(&s.control_plane);
    let authority = url
        .trim_start_matches("https://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let step = |what: &'static str| move |_| Verdict::Unknown(format!("{what} timed out"));
    let tcp = match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(&authority))
        .await
        .map_err(step("connect"))
    {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Verdict::Unknown(format!("connect {authority}: {e}")),
        Err(v) => return v,
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut stream = match tokio::time::timeout(PROBE_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(step("handshake"))
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return refusal(&e).unwrap_or_else(|| Verdict::Unknown(e.to_string())),
        Err(v) => return v,
    };
    let mut first = [0u8; 1];
    match tokio::time::timeout(PROBE_TIMEOUT, stream.read(&mut first)).await {
        Ok(Ok(n)) if n > 0 => Verdict::Accepted,
        Ok(Ok(_)) => Verdict::Unknown("the control plane closed the connection".into()),
        Ok(Err(e)) => refusal(&e).unwrap_or_else(|| Verdict::Unknown(e.to_string())),
        Err(_) => Verdict::Unknown("no answer after the handshake".into()),
    }
}

/// A TLS alert by which the peer refused our certificate.
fn refusal(e: &std::io::Error) -> Option<Verdict> {
    use rustls::AlertDescription as A;
    let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    match inner {
        rustls::Error::AlertReceived(
            alert @ (A::BadCertificate
            | A::UnknownCA
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::CertificateRequired
            | A::AccessDenied),
        ) => Some(Verdict::Refused(format!("{alert:?}"))),
        _ => None,
    }
}

/// While discovery keeps failing, asks the control plane (at most every
/// [`PROBE_INTERVAL`]) whether it still accepts the certificate; when it
/// does not, the workload is out of the mesh until it bootstraps again.
async fn watch_refusals(state: Arc<crate::state::State>) {
    let identity = state.identity.clone();
    let mut last: Option<tokio::time::Instant> = None;
    loop {
        identity.failed.notified().await;
        if identity.failures.load(Ordering::Acquire) < PROBE_AFTER_FAILURES
            || identity.refused.load(Ordering::Acquire)
            || last.is_some_and(|t| t.elapsed() < PROBE_INTERVAL)
        {
            continue;
        }
        let Some(cert) = identity.cert() else {
            continue;
        };
        last = Some(tokio::time::Instant::now());
        match probe(&state, &cert).await {
            Verdict::Refused(alert) => {
                // Unless a new certificate came meanwhile.
                if identity.cert().is_some_and(|c| Arc::ptr_eq(&c, &cert)) {
                    identity.refused.store(true, Ordering::Release);
                    tracing::warn!(%alert, signer = %cert.signer_id,
                        "the control plane refuses this workload's certificate (its root was \
                         retired?): not ready; bootstrapping again with the token");
                    identity.renew_now.notify_one();
                }
            }
            Verdict::Accepted => {
                tracing::debug!("the control plane accepts this workload's certificate");
            }
            Verdict::Unknown(why) => tracing::debug!(%why, "certificate probe inconclusive"),
        }
    }
}

/// Makes a fresh key pair and a CSR for `spiffe_id`.
pub fn make_csr(spiffe_id: &str) -> Result<(rcgen::KeyPair, String), String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("key generation: {e}"))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let uri = rcgen::string::Ia5String::try_from(spiffe_id.to_string())
        .map_err(|e| format!("identity {spiffe_id:?}: {e}"))?;
    params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .map_err(|e| format!("csr: {e}"))?;
    let pem = csr.pem().map_err(|e| format!("csr pem: {e}"))?;
    Ok((key, pem))
}

/// One Certify call: a new key, a CSR, the token; a checked certificate back.
pub async fn certify(
    channel: tonic::transport::Channel,
    identity: &Identity,
    token: &str,
    lifetime_seconds: u64,
) -> Result<(WorkloadCert, String), String> {
    certify_status(channel, identity, token, lifetime_seconds)
        .await
        .map_err(|e| match e {
            Ok(status) => refused(&status),
            Err(message) => message,
        })
}

fn refused(status: &tonic::Status) -> String {
    format!(
        "certificate refused: {} ({:?})",
        status.message(),
        status.code()
    )
}

/// [`certify`], telling the control plane's answer (`Err(Ok(status))`)
/// from any other failure.
async fn certify_status(
    channel: tonic::transport::Channel,
    identity: &Identity,
    token: &str,
    lifetime_seconds: u64,
) -> Result<(WorkloadCert, String), Result<tonic::Status, String>> {
    let (key, csr_pem) = make_csr(&identity.spiffe_id).map_err(Err)?;
    let resp = IdentityClient::new(channel)
        .certify(CertifyRequest {
            token: token.to_string(),
            csr_pem,
            lifetime_seconds,
        })
        .await
        .map_err(Ok)?
        .into_inner();
    checked(identity, key, resp).map_err(Err)
}

fn checked(
    identity: &Identity,
    key: rcgen::KeyPair,
    resp: remora_proto::v1::CertifyResponse,
) -> Result<(WorkloadCert, String), String> {
    let chain = tls::certs_from_pem(&resp.certificate_chain_pem);
    let leaf = chain
        .first()
        .ok_or("the control plane sent no certificate")?;
    if !tls::spiffe_ids(leaf).contains(&identity.spiffe_id) {
        return Err(format!(
            "the certificate is not for {} (got {:?})",
            identity.spiffe_id,
            tls::spiffe_ids(leaf)
        ));
    }
    let not_after_unix = tls::not_after_unix(leaf).unwrap_or(resp.not_after_unix);
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = tls::provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| format!("loading the key: {e}"))?;
    let certified = Arc::new(CertifiedKey::new(chain, signing));
    certified
        .keys_match()
        .map_err(|e| format!("the certificate does not match our key: {e}"))?;
    Ok((
        WorkloadCert {
            chain_pem: resp.certificate_chain_pem,
            key_pem: key.serialize_pem(),
            certified,
            received: SystemTime::now(),
            not_after_unix,
            signer_id: resp.signer_id,
        },
        resp.trust_bundle_pem,
    ))
}

/// Whether a failed call never got an answer from the control plane (the
/// connection or its TLS handshake failed), rather than a refusal.
fn transport_failure(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// Keeps a valid certificate the mesh trusts for as long as the process runs.
pub async fn run(state: Arc<crate::state::State>) {
    tokio::spawn(watch_refusals(state.clone()));
    let identity = state.identity.clone();
    let s = &state.settings;
    let lifetime = requested_lifetime(s.cert_lifetime);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(15));
    loop {
        let attempt = async {
            let token = match &s.token_file {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| format!("reading the token file {}: {e}", path.display()))?,
                None => return Err("no --token-file: cannot prove this workload's identity".into()),
            };
            let token = token.trim();
            // A renewal presents the certificate we hold, which is what
            // authenticates it (a single-use token has been used already).
            // If the control plane cannot take it (it no longer trusts its
            // root, say), the token alone is tried: a new certificate.
            if identity.has_cert() && !identity.refused.load(Ordering::Acquire) {
                let renewal = async {
                    let channel = crate::control_plane::channel(&state, true)
                        .await
                        .map_err(Err)?;
                    certify_status(channel, &identity, token, lifetime).await
                };
                match renewal.await {
                    Ok(done) => return Ok(done),
                    // The control plane's answer stands (a revoked token).
                    Err(Ok(status)) if !transport_failure(&status) => return Err(refused(&status)),
                    Err(e) => {
                        let e = e.map_or_else(|message| message, |status| refused(&status));
                        tracing::debug!(error = %e, "renewal with the current certificate failed; trying the token alone");
                    }
                }
            }
            let channel = crate::control_plane::channel(&state, false).await?;
            certify(channel, &identity, token, lifetime).await
        };
        match attempt.await {
            Ok((cert, bundle)) => {
                let not_after = cert.not_after_unix;
                let renew_at = cert.renew_at();
                if let Err(e) = identity.install(cert, bundle) {
                    tracing::error!(error = %e, "cannot use the new certificate");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
                backoff.reset();
                remora_telemetry::metrics::set_cert_expiry(
                    UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64),
                );
                tracing::info!(identity = %identity.spiffe_id, not_after, "certificate installed");
                let wait = renew_at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = identity.renew_now.notified() => {}
                }
            }
            Err(e) => {
                let delay = backoff.next_delay();
                if identity.has_cert() {
                    tracing::warn!(error = %e, retry_in = ?delay, "renewal failed; keeping the current certificate");
                } else if identity.cert().is_some() {
                    tracing::error!(error = %e, retry_in = ?delay, "the certificate has expired and renewal fails; not ready");
                } else {
                    tracing::error!(error = %e, retry_in = ?delay, "no certificate yet; not ready");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_left_at_the_default_lifetime_asks_for_none() {
        assert_eq!(requested_lifetime(None), 0);
        assert_eq!(requested_lifetime(Some(Duration::from_secs(60))), 60);
        // An explicit 24h is asked for, whatever the control plane's default.
        assert_eq!(
            requested_lifetime(Some(Duration::from_secs(24 * 3600))),
            24 * 3600
        );
    }

    #[test]
    fn csr_names_the_identity_and_keeps_the_key_here() {
        let (key, pem) = make_csr("spiffe://cluster.local/ns/shop/sa/backend").unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        assert!(!pem.contains("PRIVATE KEY"));
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&pem).unwrap();
        assert_eq!(
            parsed.params.subject_alt_names,
            vec![rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from("spiffe://cluster.local/ns/shop/sa/backend")
                    .unwrap()
            )]
        );
        use rcgen::PublicKeyData;
        assert_eq!(parsed.public_key.der_bytes(), key.der_bytes());
    }
}
