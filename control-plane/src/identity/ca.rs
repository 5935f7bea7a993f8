//! The certificate authority: the trusted roots, the signer, and the
//! certificates it issues (workload certificates from CSRs, and the control
//! plane's own server certificate).
//!
//! The signer is a generated root (ECDSA P-256) or an operator's root or
//! intermediate. Its `signer_id` is the lowercase hex SHA-256 of its DER.
//! [`Authority`] holds the current [`CaState`] behind an `ArcSwap`, so issuing
//! never waits on a rotation; where the state comes from and how it is kept is
//! [`crate::identity::ca_store`]'s job.

use crate::identity::pem::{self, cert_pem};
use arc_swap::ArcSwap;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use remora_proto::util::hex;
use ring::digest::{digest, SHA256};
use ring::rand::{SecureRandom as _, SystemRandom};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use std::sync::Arc;
use std::time::Duration;
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

/// A generated root is valid for ten years.
pub const ROOT_LIFETIME_SECS: i64 = 10 * 365 * 86_400;
/// The control plane's own certificate; renewed when a third of it is left.
pub const SERVER_CERT_LIFETIME_SECS: i64 = 90 * 86_400;
/// The shortest workload certificate.
pub const MIN_CERT_LIFETIME: Duration = Duration::from_secs(60);
/// Certificates start this long before they are issued (clock skew).
const BACKDATE_SECS: i64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot sign: {0}")]
    Sign(#[from] rcgen::Error),
}

fn invalid(message: impl Into<String>) -> CaError {
    CaError::Invalid(message.into())
}

/// Lowercase hex SHA-256 of a certificate's DER: a signer id.
pub fn fingerprint(der: &[u8]) -> String {
    hex(digest(&SHA256, der).as_ref())
}

pub fn parse_cert<'a>(der: &'a [u8]) -> Result<X509Certificate<'a>, CaError> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| invalid(format!("cannot parse a certificate: {e}")))
}

pub fn not_after_unix(der: &[u8]) -> Result<i64, CaError> {
    Ok(parse_cert(der)?.validity().not_after.timestamp())
}

/// A certificate's serial number as lowercase hex (the ledger's key).
pub fn serial_hex(der: &[u8]) -> Result<String, CaError> {
    Ok(hex(parse_cert(der)?.raw_serial()))
}

/// The URI subject alternative names of a certificate.
pub fn uri_sans(der: &[u8]) -> Result<Vec<String>, CaError> {
    let cert = parse_cert(der)?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| invalid(format!("bad subjectAltName: {e}")))?;
    Ok(sans
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(uri) => Some(uri.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| invalid("no randomness available"))?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

fn set_validity(
    params: &mut CertificateParams,
    not_before: i64,
    not_after: i64,
) -> Result<(), CaError> {
    let time = |t: i64| {
        x509_parser::time::ASN1Time::from_timestamp(t)
            .map(|t| t.to_datetime())
            .map_err(|e| invalid(format!("bad time {t}: {e}")))
    };
    params.not_before = time(not_before)?;
    params.not_after = time(not_after)?;
    Ok(())
}

/// A certificate issued to a workload.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf first, then any intermediates.
    pub chain_pem: String,
    pub not_after_unix: i64,
    pub signer_id: String,
    /// The leaf's serial, lowercase hex.
    pub serial: String,
}

/// The control plane's own certificate and key.
pub struct ServerCert {
    /// Leaf first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    pub signer_id: String,
}

/// The certificate and key that sign.
pub struct Signer {
    pub cert: CertificateDer<'static>,
    key: KeyPair,
    /// `fingerprint(cert)`.
    pub id: String,
    /// What follows the leaf in an issued chain: nothing for a root; the
    /// signer and the intermediates above it for an intermediate.
    pub chain: Vec<CertificateDer<'static>>,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer from its certificate and key; refuses a key that is not the
    /// certificate's.
    pub fn new(
        cert: CertificateDer<'static>,
        key: KeyPair,
        chain: Vec<CertificateDer<'static>>,
    ) -> Result<Signer, CaError> {
        let parsed = parse_cert(&cert)?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(invalid("the CA key does not belong to the CA certificate"));
        }
        if !parsed.is_ca() {
            return Err(invalid("the CA certificate is not a CA (basicConstraints)"));
        }
        let not_before_unix = parsed.validity().not_before.timestamp();
        let not_after_unix = parsed.validity().not_after.timestamp();
        Ok(Signer {
            id: fingerprint(&cert),
            cert,
            key,
            chain,
            not_before_unix,
            not_after_unix,
        })
    }

    /// The key as PKCS#8 PEM (for the CA record).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, CaError> {
        Ok(Issuer::from_ca_cert_der(&self.cert, &self.key)?)
    }

    fn chain_pem(&self, leaf: &[u8]) -> String {
        let mut out = cert_pem(leaf);
        for cert in &self.chain {
            out.push_str(&cert_pem(cert));
        }
        out
    }

    /// Signs a workload certificate: the URI SAN `spiffe_id` only, EKU
    /// serverAuth + clientAuth, key usage digitalSignature, valid from a
    /// minute ago for `lifetime` (never past the signer's own expiry).
    pub fn sign_workload(
        &self,
        public_key: &impl PublicKeyData,
        spiffe_id: &str,
        lifetime: Duration,
        now: i64,
    ) -> Result<Issued, CaError> {
        let lifetime = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX);
        let not_after = now.saturating_add(lifetime).min(self.not_after_unix);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            Ia5String::try_from(spiffe_id).map_err(|e| invalid(e.to_string()))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, now - BACKDATE_SECS, not_after)?;
        let cert = params.signed_by(public_key, &self.issuer()?)?;
        Ok(Issued {
            chain_pem: self.chain_pem(cert.der()),
            not_after_unix: not_after,
            signer_id: self.id.clone(),
            serial: serial_hex(cert.der())?,
        })
    }

    /// Signs a server certificate for `names` (DNS names or IP addresses)
    /// with a new P-256 key.
    pub fn sign_server(&self, names: &[String], now: i64) -> Result<ServerCert, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "remora-control");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        let not_before = now - BACKDATE_SECS;
        let not_after = now
            .saturating_add(SERVER_CERT_LIFETIME_SECS)
            .min(self.not_after_unix);
        set_validity(&mut params, not_before, not_after)?;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        Ok(ServerCert {
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            not_before_unix: not_before,
            not_after_unix: not_after,
            signer_id: self.id.clone(),
        })
    }
}

/// Generates a self-signed root: ECDSA P-256, CA with path length 0, valid
/// for [`ROOT_LIFETIME_SECS`].
pub fn generate_root(trust_domain: &str, now: i64) -> Result<Signer, CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let serial = random_serial()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Remora");
    // A distinct name per root keeps old and new apart during a rotation.
    let tag = hex(&serial.to_bytes()[..4]);
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Remora root CA {tag}"));
    if trust_domain.len() <= 64 {
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, trust_domain);
    }
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(serial);
    set_validity(
        &mut params,
        now - BACKDATE_SECS,
        now.saturating_add(ROOT_LIFETIME_SECS),
    )?;
    let cert = params.self_signed(&key)?;
    Signer::new(cert.der().clone(), key, Vec::new())
}

/// Everything the CA is at one moment.
#[derive(Debug)]
pub struct CaState {
    /// Every trusted root (two during a rotation).
    pub roots: Vec<CertificateDer<'static>>,
    pub signer: Arc<Signer>,
    /// The signer id being retired ("" when no rotation is in progress).
    pub retiring: String,
    /// The signer being retired, with its key, while a rotation is in
    /// progress: it keeps signing the control plane's own certificate, so a
    /// proxy that missed the start of the rotation (and trusts only the old
    /// root) can still verify the control plane and catch up.
    pub retiring_signer: Option<Arc<Signer>>,
    /// The operator supplied the CA: it cannot be rotated from here.
    pub operator: bool,
}

impl CaState {
    /// The signer of the control plane's own certificate: the old root
    /// while a rotation is in progress, the current signer otherwise.
    pub fn server_signer(&self) -> &Arc<Signer> {
        match &self.retiring_signer {
            Some(old) if self.rotating() && old.id == self.retiring => old,
            _ => &self.signer,
        }
    }

    /// The trust bundle: every trusted root, PEM.
    pub fn bundle_pem(&self) -> String {
        pem::certs_pem(&self.roots)
    }

    pub fn rotating(&self) -> bool {
        !self.retiring.is_empty()
    }
}

/// How long workload certificates live.
#[derive(Debug, Clone, Copy)]
pub struct LifetimePolicy {
    /// When the CSR asks for nothing.
    pub default: Duration,
    /// The most a CSR may get.
    pub max: Duration,
}

impl LifetimePolicy {
    /// `requested_secs` (0: the default) clamped to [1 minute, max].
    pub fn lifetime(&self, requested_secs: u64) -> Duration {
        let wanted = if requested_secs == 0 {
            self.default
        } else {
            Duration::from_secs(requested_secs)
        };
        wanted.clamp(MIN_CERT_LIFETIME, self.max.max(MIN_CERT_LIFETIME))
    }
}

/// The CA shared by the services: its current state and issuing policy.
#[derive(Debug)]
pub struct Authority {
    state: ArcSwap<CaState>,
    pub trust_domain: String,
    pub lifetimes: LifetimePolicy,
}

impl Authority {
    pub fn new(state: CaState, trust_domain: &str, lifetimes: LifetimePolicy) -> Authority {
        Authority {
            state: ArcSwap::from_pointee(state),
            trust_domain: trust_domain.to_string(),
            lifetimes,
        }
    }

    pub fn current(&self) -> Arc<CaState> {
        self.state.load_full()
    }

    pub(crate) fn replace(&self, state: CaState) -> Arc<CaState> {
        let state = Arc::new(state);
        self.state.store(state.clone());
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remora_proto::util::now_unix;

    #[test]
    fn lifetimes_are_clamped() {
        let policy = LifetimePolicy {
            default: Duration::from_secs(3600),
            max: Duration::from_secs(7200),
        };
        assert_eq!(policy.lifetime(0).as_secs(), 3600);
        assert_eq!(policy.lifetime(1).as_secs(), 60);
        assert_eq!(policy.lifetime(100_000).as_secs(), 7200);
        assert_eq!(policy.lifetime(600).as_secs(), 600);
    }

    #[test]
    fn a_generated_root_signs_workload_and_server_certificates() {
        let now = now_unix();
        let root = generate_root("cluster.local", now).unwrap();
        assert_eq!(root.id, fingerprint(&root.cert));
        assert!(parse_cert(&root.cert).unwrap().is_ca());
        let key = KeyPair::generate().unwrap();
        let issued = root
            .sign_workload(
                &key,
                "spiffe://cluster.local/ns/a/sa/b",
                Duration::from_secs(120),
                now,
            )
            .unwrap();
        assert_eq!(issued.not_after_unix, now + 120);
        let der = pem::parse_certs(&issued.chain_pem).unwrap();
        assert_eq!(der.len(), 1);
        assert_eq!(
            uri_sans(&der[0]).unwrap(),
            vec!["spiffe://cluster.local/ns/a/sa/b"]
        );
        let server = root
            .sign_server(&["remora-control".into(), "127.0.0.1".into()], now)
            .unwrap();
        assert_eq!(server.chain.len(), 1);
        assert_eq!(server.signer_id, root.id);
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let now = now_unix();
        let root = generate_root("cluster.local", now).unwrap();
        let other = KeyPair::generate().unwrap();
        assert!(Signer::new(root.cert.clone(), other, Vec::new()).is_err());
    }
}
