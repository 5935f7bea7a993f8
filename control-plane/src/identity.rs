//! The `remora.v1.Identity` service: signs a workload's CSR when its
//! credential proves the identity the CSR asks for.
//!
//! No client certificate is needed (this is how a proxy gets its first one).
//! Refusals: UNAUTHENTICATED when the token proves nothing (the message says
//! why: malformed, unknown, revoked, expired), INVALID_ARGUMENT for a CSR that
//! cannot be used, PERMISSION_DENIED when the CSR asks for another identity.
//! Every answer is counted for `/metrics`.

use crate::ca::Authority;
use crate::tokens::{now_unix, AuthError, WorkloadAuthenticator};
use rcgen::{CertificateSigningRequestParams, SanType};
use remora_proto::v1::identity_server::Identity;
use remora_proto::v1::{CertifyRequest, CertifyResponse};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The largest CSR looked at.
pub const MAX_CSR_PEM_BYTES: usize = 16 * 1024;

/// The `reason` labels of refused certificates.
pub const REFUSAL_REASONS: [&str; 7] = [
    "token_malformed",
    "token_unknown",
    "token_revoked",
    "token_expired",
    "csr_invalid",
    "identity_mismatch",
    "internal",
];

/// `remora_control_certificates_{issued,refused}_total`.
#[derive(Debug, Default)]
pub struct CertMetrics {
    pub issued: AtomicU64,
    refused: [AtomicU64; REFUSAL_REASONS.len()],
}

impl CertMetrics {
    pub fn refuse(&self, reason: &str) {
        let i = REFUSAL_REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(REFUSAL_REASONS.len() - 1);
        if let Some(counter) = self.refused.get(i) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn refused(&self, reason: &str) -> u64 {
        REFUSAL_REASONS
            .iter()
            .position(|r| *r == reason)
            .and_then(|i| self.refused.get(i))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Appends the Prometheus text of both counters.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP remora_control_certificates_issued_total Workload certificates signed.\n\
             # TYPE remora_control_certificates_issued_total counter\n\
             remora_control_certificates_issued_total {}",
            self.issued.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP remora_control_certificates_refused_total Certify requests refused, by reason.\n\
             # TYPE remora_control_certificates_refused_total counter"
        );
        for (reason, counter) in REFUSAL_REASONS.iter().zip(&self.refused) {
            let _ = writeln!(
                out,
                "remora_control_certificates_refused_total{{reason=\"{reason}\"}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
    }
}

#[derive(Debug, Clone)]
pub struct IdentityService {
    authenticator: Arc<dyn WorkloadAuthenticator>,
    authority: Arc<Authority>,
    metrics: Arc<CertMetrics>,
}

impl IdentityService {
    pub fn new(
        authenticator: Arc<dyn WorkloadAuthenticator>,
        authority: Arc<Authority>,
        metrics: Arc<CertMetrics>,
    ) -> IdentityService {
        IdentityService {
            authenticator,
            authority,
            metrics,
        }
    }

    async fn certify_inner(
        &self,
        req: CertifyRequest,
    ) -> Result<CertifyResponse, (&'static str, Status)> {
        let who = self
            .authenticator
            .authenticate(&req.token)
            .await
            .map_err(|e| {
                let status = match &e {
                    AuthError::Internal(_) => Status::unavailable(e.to_string()),
                    _ => Status::unauthenticated(e.to_string()),
                };
                (e.reason(), status)
            })?;
        let bad_csr = |message: String| ("csr_invalid", Status::invalid_argument(message));
        if req.csr_pem.len() > MAX_CSR_PEM_BYTES {
            return Err(bad_csr(format!(
                "the CSR is larger than {MAX_CSR_PEM_BYTES} bytes"
            )));
        }
        // Parses the CSR and verifies its self-signature (rcgen does both).
        let csr = CertificateSigningRequestParams::from_pem(&req.csr_pem)
            .map_err(|e| bad_csr(format!("unusable CSR: {e}")))?;
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(uri) => uri.as_str().to_string(),
                SanType::DnsName(name) => format!("DNS:{}", name.as_str()),
                SanType::IpAddress(ip) => format!("IP:{ip}"),
                SanType::Rfc822Name(mail) => format!("email:{}", mail.as_str()),
                SanType::OtherName(_) => "otherName".to_string(),
                _ => "an unsupported name".to_string(),
            })
            .collect();
        if asked != [who.spiffe_id.as_str()] {
            let asked = if asked.is_empty() {
                "no name".to_string()
            } else {
                asked.join(", ")
            };
            return Err((
                "identity_mismatch",
                Status::permission_denied(format!(
                    "the CSR asks for {asked}, the token proves {} \
                     (the CSR must carry exactly that URI SAN)",
                    who.spiffe_id
                )),
            ));
        }
        let lifetime = self.authority.lifetimes.lifetime(req.lifetime_seconds);
        let state = self.authority.current();
        let issued = state
            .signer
            .sign_workload(&csr.public_key, &who.spiffe_id, lifetime, now_unix())
            .map_err(|e| ("internal", Status::internal(e.to_string())))?;
        tracing::info!(
            spiffe_id = %who.spiffe_id,
            not_after = issued.not_after_unix,
            signer_id = %issued.signer_id,
            "certificate issued"
        );
        Ok(CertifyResponse {
            certificate_chain_pem: issued.chain_pem,
            trust_bundle_pem: state.bundle_pem(),
            not_after_unix: issued.not_after_unix,
            spiffe_id: who.spiffe_id,
            signer_id: issued.signer_id,
        })
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = request.remote_addr();
        match self.certify_inner(request.into_inner()).await {
            Ok(response) => {
                self.metrics.issued.fetch_add(1, Ordering::Relaxed);
                Ok(Response::new(response))
            }
            Err((reason, status)) => {
                self.metrics.refuse(reason);
                tracing::warn!(?peer, reason, error = %status.message(), "certificate refused");
                Err(status)
            }
        }
    }
}
