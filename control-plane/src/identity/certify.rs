//! The `remora.v1.Identity` service: signs a workload's CSR when its
//! credential proves the identity the CSR asks for.
//!
//! No client certificate is needed for a first certificate: the bootstrap
//! token proves the identity, and the certificate counts as one of its uses
//! (`token create --uses N`) and must come within its TTL. A workload that
//! presents its current certificate as its TLS client certificate is renewing:
//! the certificate proves the identity (the CSR must ask for the same one),
//! the token it sends along must only be genuine and not revoked, and no use
//! is counted, so a single-use token keeps its workload renewing.
//!
//! Every certificate is written to the ledger ([`crate::identity::issued`]) before it
//! is handed out, with the certificate a renewal replaces: that is how a
//! root rotation knows which old-root certificates may still be in use.
//!
//! Refusals: UNAUTHENTICATED when the token proves nothing (the message says
//! why: malformed, unknown, revoked, expired, used up; for a Kubernetes
//! ServiceAccount token, which check failed), INVALID_ARGUMENT for a
//! CSR that cannot be used, PERMISSION_DENIED when the CSR asks for another
//! identity (or the token proves another one than the client certificate).
//! Every answer is counted for `/metrics`.

use crate::identity::ca::Authority;
use crate::identity::issued::{IssuedCert, Ledger};
use crate::identity::tokens::{AuthError, WorkloadAuthenticator};
use crate::metrics::certs::CertMetrics;
use rcgen::{CertificateSigningRequestParams, SanType};
use remora_proto::util::now_unix;
use remora_proto::v1::identity_server::Identity;
use remora_proto::v1::{CertifyRequest, CertifyResponse};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The largest CSR looked at.
pub const MAX_CSR_PEM_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct IdentityService {
    authenticator: Arc<dyn WorkloadAuthenticator>,
    authority: Arc<Authority>,
    metrics: Arc<CertMetrics>,
    ledger: Arc<Ledger>,
}

/// The client certificate a Certify call was made with.
struct Presented {
    spiffe_id: String,
    serial: Option<String>,
}

impl IdentityService {
    pub fn new(
        authenticator: Arc<dyn WorkloadAuthenticator>,
        authority: Arc<Authority>,
        metrics: Arc<CertMetrics>,
        ledger: Arc<Ledger>,
    ) -> IdentityService {
        IdentityService {
            authenticator,
            authority,
            metrics,
            ledger,
        }
    }

    /// Signs `req`'s CSR. `renewal`: the client certificate the caller
    /// presented (verified by the TLS layer), if any.
    async fn certify_inner(
        &self,
        req: CertifyRequest,
        renewal: Option<Presented>,
    ) -> Result<CertifyResponse, (&'static str, Status)> {
        let (renewal_by, renewed_from) = match renewal {
            Some(p) => (Some(p.spiffe_id), p.serial),
            None => (None, None),
        };
        let renewal_by = renewal_by.as_deref();
        let refused = |e: AuthError| {
            let status = match &e {
                AuthError::Internal(_) => Status::unavailable(e.to_string()),
                _ => Status::unauthenticated(e.to_string()),
            };
            (e.reason(), status)
        };
        let who = match renewal_by {
            Some(_) => self.authenticator.authenticate_renewal(&req.token).await,
            None => self.authenticator.authenticate(&req.token).await,
        }
        .map_err(refused)?;
        if let Some(holder) = renewal_by {
            if who.spiffe_id != holder {
                return Err((
                    "identity_mismatch",
                    Status::permission_denied(format!(
                        "the client certificate is for {holder}, the token proves {}",
                        who.spiffe_id
                    )),
                ));
            }
        }
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
        // A first certificate takes one of the token's uses; checked again
        // here, atomically, so two requests cannot both take the last one.
        if renewal_by.is_none() {
            self.authenticator.consume(&who).await.map_err(refused)?;
        }
        let lifetime = self.authority.lifetimes.lifetime(req.lifetime_seconds);
        let state = self.authority.current();
        let now = now_unix();
        let issued = state
            .signer
            .sign_workload(&csr.public_key, who.spiffe_id.as_str(), lifetime, now)
            .map_err(|e| ("internal", Status::internal(e.to_string())))?;
        // Durable before it is handed out: a certificate the ledger does not
        // know could be stranded by a root rotation.
        let entry = IssuedCert {
            serial: issued.serial.clone(),
            signer_id: issued.signer_id.clone(),
            spiffe_id: who.spiffe_id.to_string(),
            token_id: who.token_id.clone(),
            not_after_unix: issued.not_after_unix,
            renewed_from,
            replaced: false,
        };
        let ledger = self.ledger.clone();
        tokio::task::spawn_blocking(move || ledger.record(entry, now))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| {
                tracing::error!(error = %e, "cannot record an issued certificate");
                (
                    "internal",
                    Status::unavailable(format!("cannot record the certificate: {e}")),
                )
            })?;
        tracing::info!(
            spiffe_id = %who.spiffe_id,
            token_id = who.token_id.as_deref().unwrap_or("-"),
            renewal = renewal_by.is_some(),
            serial = %issued.serial,
            not_after = issued.not_after_unix,
            signer_id = %issued.signer_id,
            "certificate issued"
        );
        Ok(CertifyResponse {
            certificate_chain_pem: issued.chain_pem,
            trust_bundle_pem: state.bundle_pem(),
            not_after_unix: issued.not_after_unix,
            spiffe_id: who.spiffe_id.into_string(),
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
        let presented = match crate::identity::peer::peer_spiffe_id(&request) {
            Ok(holder) => holder.map(|spiffe_id| Presented {
                spiffe_id,
                serial: crate::identity::peer::peer_serial(&request),
            }),
            Err(status) => {
                self.metrics.refuse("identity_mismatch");
                tracing::warn!(?peer, error = %status.message(), "certificate refused");
                return Err(status);
            }
        };
        let renewal = presented.is_some();
        match self.certify_inner(request.into_inner(), presented).await {
            Ok(response) => {
                self.metrics.issue(renewal);
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
