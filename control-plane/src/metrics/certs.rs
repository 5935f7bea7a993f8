//! The Identity service's counters: certificates issued, renewed and
//! refused (by reason).

use super::{local_recorder, sample};
use ::metrics::{counter, describe_counter, Counter, Unit};
use metrics_exporter_prometheus::PrometheusHandle;

/// The `reason` labels of refused certificates.
pub const REFUSAL_REASONS: [&str; 18] = [
    "token_malformed",
    "token_unknown",
    "token_revoked",
    "token_expired",
    "token_used_up",
    // Kubernetes ServiceAccount tokens (`remora_proto::jwt::JwtError::reason`,
    // and `jwt_claim` for claims that name no usable ServiceAccount).
    "jwt_malformed",
    "jwt_too_large",
    "jwt_algorithm",
    "jwt_unknown_key",
    "jwt_signature",
    "jwt_expired",
    "jwt_not_yet_valid",
    "jwt_issuer",
    "jwt_audience",
    "jwt_claim",
    "csr_invalid",
    "identity_mismatch",
    // Last: unknown reasons are counted here.
    "internal",
];

/// Workload certificates signed.
pub const CERTIFICATES_ISSUED_TOTAL: &str = "remora_control_certificates_issued_total";
/// Of those, renewals: the workload authenticated with its current
/// certificate (no token use counted).
pub const CERTIFICATES_RENEWED_TOTAL: &str = "remora_control_certificates_renewed_total";
/// Certify requests refused, by `reason` (one of [`REFUSAL_REASONS`]).
pub const CERTIFICATES_REFUSED_TOTAL: &str = "remora_control_certificates_refused_total";

/// `remora_control_certificates_{issued,refused}_total`, on this control
/// plane's own recorder (see [`crate::metrics`]).
pub struct CertMetrics {
    handle: PrometheusHandle,
    issued: Counter,
    renewed: Counter,
    refused: [Counter; REFUSAL_REASONS.len()],
}

impl Default for CertMetrics {
    fn default() -> CertMetrics {
        let recorder = local_recorder(&[]);
        let handle = recorder.handle();
        ::metrics::with_local_recorder(&recorder, || {
            describe_counter!(
                CERTIFICATES_ISSUED_TOTAL,
                Unit::Count,
                "Workload certificates signed."
            );
            describe_counter!(
                CERTIFICATES_RENEWED_TOTAL,
                Unit::Count,
                "Workload certificates signed for a workload that authenticated with its current \
                 certificate (renewals; also counted as issued)."
            );
            describe_counter!(
                CERTIFICATES_REFUSED_TOTAL,
                Unit::Count,
                "Certify requests refused, by reason."
            );
            CertMetrics {
                handle: handle.clone(),
                issued: counter!(CERTIFICATES_ISSUED_TOTAL),
                renewed: counter!(CERTIFICATES_RENEWED_TOTAL),
                // Every reason is registered up front, so each shows 0 until it happens.
                refused: REFUSAL_REASONS
                    .map(|reason| counter!(CERTIFICATES_REFUSED_TOTAL, "reason" => reason)),
            }
        })
    }
}

impl std::fmt::Debug for CertMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertMetrics").finish_non_exhaustive()
    }
}

impl CertMetrics {
    pub fn issue(&self, renewal: bool) {
        self.issued.increment(1);
        if renewal {
            self.renewed.increment(1);
        }
    }

    /// Renewals so far.
    pub fn renewed(&self) -> u64 {
        self.read(CERTIFICATES_RENEWED_TOTAL, "")
    }

    /// Counts a refusal; an unknown reason counts as `internal`.
    pub fn refuse(&self, reason: &str) {
        let i = REFUSAL_REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(REFUSAL_REASONS.len() - 1);
        self.refused[i].increment(1);
    }

    /// Certificates issued so far.
    pub fn issued(&self) -> u64 {
        self.read(CERTIFICATES_ISSUED_TOTAL, "")
    }

    /// Refusals for `reason` so far.
    pub fn refused(&self, reason: &str) -> u64 {
        self.read(CERTIFICATES_REFUSED_TOTAL, &format!("reason=\"{reason}\""))
    }

    fn read(&self, name: &str, labels: &str) -> u64 {
        let value = sample(&self.handle.render(), name, labels).unwrap_or(0.0);
        // Counter values are whole numbers.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let value = value as u64;
        value
    }

    /// The recorder's handle (rendering, upkeep).
    pub fn handle(&self) -> PrometheusHandle {
        self.handle.clone()
    }

    /// Appends the Prometheus text of both counters.
    pub fn render(&self, out: &mut String) {
        out.push_str(&self.handle.render());
    }
}
