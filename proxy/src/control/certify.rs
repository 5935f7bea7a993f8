//! Getting and keeping this workload's certificate: a key pair made in
//! memory (the private key never leaves the process and is never written to
//! disk), a CSR for `spiffe://<trust-domain>/ns/<namespace>/sa/<service>`
//! sent with the bootstrap token, and the certificate that comes back, put in
//! the [`Identity`] slot. Renewed at about 70% of its lifetime (a renewal
//! presents the current certificate as its TLS client certificate, which
//! authenticates it, so a single-use token keeps working), at once when the
//! control plane starts signing with a new root or refuses the certificate
//! (see `refusals`), and retried with jitter while the control plane is away,
//! keeping the valid certificate meanwhile. A replica that cannot be reached
//! hands the request to the next one at once (see `replicas`).
//!
//! The lifetime asked for is `--cert-lifetime` when it was given; a proxy
//! left without it asks for none, so the control plane's `--cert-lifetime`
//! applies.

use crate::control::control_plane::ControlPlane;
use crate::control::refusals;
use crate::control::replicas::Replica;
use crate::transport::tls;
use crate::transport::tls::identity::{Identity, WorkloadCert};
use remora_proto::v1::identity_client::IdentityClient;
use remora_proto::v1::CertifyRequest;
use remora_resilience::Backoff;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The lifetime to ask for (0: the control plane's default): only what
/// `--cert-lifetime` set.
pub fn requested_lifetime(configured: Option<Duration>) -> u64 {
    configured.map_or(0, |d| d.as_secs())
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
    let (key, csr_pem) = make_csr(identity.spiffe_id.as_str()).map_err(Err)?;
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
    if !tls::spiffe_ids(leaf)
        .iter()
        .any(|id| identity.spiffe_id == *id)
    {
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
        WorkloadCert::new(
            resp.certificate_chain_pem,
            key.serialize_pem(),
            certified,
            not_after_unix,
            resp.signer_id,
        ),
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

/// Why an attempt on one replica failed.
enum Failure {
    /// It could not be reached, or the connection broke: the next replica
    /// may do.
    Unreachable(String),
    /// It answered (a refusal), or the answer was unusable: that stands.
    Answer(String),
}

/// One attempt: on the rotation's replica, then at once on each next one
/// while they are unreachable.
async fn across_replicas(
    control_plane: &ControlPlane,
    token: &str,
    lifetime: u64,
) -> Result<(WorkloadCert, String), String> {
    let replicas = &control_plane.replicas;
    let mut tried = 0;
    loop {
        let pick = replicas.pick().await?;
        match on_replica(control_plane, &pick.replica, token, lifetime).await {
            Ok(done) => return Ok(done),
            Err(Failure::Answer(e)) => return Err(e),
            Err(Failure::Unreachable(e)) => {
                replicas.failed(&pick);
                tried += 1;
                if tried >= pick.count {
                    return Err(e);
                }
                tracing::warn!(replica = %pick.replica, error = %e,
                    "control-plane replica unreachable; asking the next one");
            }
        }
    }
}

/// One attempt on `replica`. A renewal presents the certificate we hold,
/// which is what authenticates it (a single-use token has been used
/// already). If the control plane cannot take it (it no longer trusts its
/// root, say), the token alone is tried: a new certificate.
async fn on_replica(
    control_plane: &ControlPlane,
    replica: &Replica,
    token: &str,
    lifetime: u64,
) -> Result<(WorkloadCert, String), Failure> {
    let identity = &control_plane.identity;
    if identity.has_cert() && !identity.is_refused() {
        let channel = control_plane
            .channel(replica, true)
            .await
            .map_err(Failure::Unreachable)?;
        match certify_status(channel, identity, token, lifetime).await {
            Ok(done) => return Ok(done),
            // The control plane's answer stands (a revoked token).
            Err(Ok(status)) if !transport_failure(&status) => {
                return Err(Failure::Answer(refused(&status)))
            }
            Err(e) => {
                let e = e.map_or_else(|message| message, |status| refused(&status));
                tracing::debug!(error = %e, %replica,
                    "renewal with the current certificate failed; trying the token alone");
            }
        }
    }
    let channel = control_plane
        .channel(replica, false)
        .await
        .map_err(Failure::Unreachable)?;
    certify_status(channel, identity, token, lifetime)
        .await
        .map_err(|e| match e {
            Ok(status) if transport_failure(&status) => Failure::Unreachable(refused(&status)),
            Ok(status) => Failure::Answer(refused(&status)),
            Err(message) => Failure::Answer(message),
        })
}

/// What proves this workload's identity to the control plane.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// `--token-file`: the bootstrap token (read again for each attempt).
    pub token_file: Option<PathBuf>,
    /// `--cert-lifetime`, when it was given.
    pub lifetime: Option<Duration>,
}

/// Keeps a valid certificate the mesh trusts in `control_plane.identity` for
/// as long as the process runs.
pub async fn run(control_plane: ControlPlane, credentials: Credentials) {
    tokio::spawn(refusals::watch(control_plane.clone()));
    let identity = control_plane.identity.clone();
    let lifetime = requested_lifetime(credentials.lifetime);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(15)).attempts();
    loop {
        let attempt = async {
            let token = match &credentials.token_file {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| format!("reading the token file {}: {e}", path.display()))?,
                None => return Err("no --token-file: cannot prove this workload's identity".into()),
            };
            across_replicas(&control_plane, token.trim(), lifetime).await
        };
        match attempt.await {
            Ok((cert, bundle)) => {
                let (not_after, expires) = (cert.not_after_unix, cert.not_after());
                let renew_at = cert.renew_at();
                if let Err(e) = identity.install(cert, bundle) {
                    tracing::error!(error = %e, "cannot use the new certificate");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
                backoff.reset();
                remora_telemetry::metrics::set_cert_expiry(expires);
                tracing::info!(identity = %identity.spiffe_id, not_after, "certificate installed");
                let wait = renew_at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = identity.renewal_wanted() => {}
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
