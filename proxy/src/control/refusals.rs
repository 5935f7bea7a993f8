//! Whether the control plane still accepts this workload's certificate.
//! After a root rotation was finished without this workload (it was away, or
//! the operator forced it) the control plane refuses its certificate in the
//! TLS handshake, and discovery keeps failing. Then a probe handshake tells
//! a refusal from an outage; a refused certificate takes the workload out of
//! the mesh (not ready), and `certify` bootstraps again with the token (a
//! renewal with a certificate nobody trusts cannot work).

use crate::control::control_plane::ControlPlane;
use crate::transport::tls;
use crate::transport::tls::identity::WorkloadCert;
use rustls::sign::CertifiedKey;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt as _;
use tokio::time::Instant;

/// Failed discovery attempts in a row before the control plane is asked
/// whether it still accepts this workload's certificate.
const PROBE_AFTER_FAILURES: u32 = 3;
/// At most one such probe this often.
const PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// Each step of a probe (connect, handshake, first bytes).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

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
async fn probe(control_plane: &ControlPlane, cert: &WorkloadCert) -> Verdict {
    let pem = match control_plane.roots_pem() {
        Ok(pem) => pem,
        Err(e) => return Verdict::Unknown(e),
    };
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
    let Ok(name) = rustls::pki_types::ServerName::try_from(control_plane.name.clone()) else {
        return Verdict::Unknown(format!("bad --control-plane-name {:?}", control_plane.name));
    };
    let authority = control_plane.authority();
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
/// `PROBE_INTERVAL`) whether it still accepts the certificate; when it
/// does not, the workload is out of the mesh until it bootstraps again.
pub async fn watch(control_plane: ControlPlane) {
    let identity = control_plane.identity.clone();
    let mut last: Option<Instant> = None;
    loop {
        identity.control_plane_failure().await;
        if identity.failures() < PROBE_AFTER_FAILURES
            || identity.is_refused()
            || last.is_some_and(|t| t.elapsed() < PROBE_INTERVAL)
        {
            continue;
        }
        let Some(cert) = identity.cert() else {
            continue;
        };
        last = Some(Instant::now());
        match probe(&control_plane, &cert).await {
            Verdict::Refused(alert) => {
                // Unless a new certificate came meanwhile.
                if identity.refuse(&cert) {
                    tracing::warn!(%alert, signer = %cert.signer_id,
                        "the control plane refuses this workload's certificate (its root was \
                         retired?): not ready; bootstrapping again with the token");
                }
            }
            Verdict::Accepted => {
                tracing::debug!("the control plane accepts this workload's certificate");
            }
            Verdict::Unknown(why) => tracing::debug!(%why, "certificate probe inconclusive"),
        }
    }
}
