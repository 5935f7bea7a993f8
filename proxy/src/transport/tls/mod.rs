//! mTLS between proxies (rustls, TLS 1.3 only, ring).
//!
//! - The server side (inbound) requires a client certificate that chains to the
//!   trust bundle; the peer's SPIFFE identity is read from its URI SAN.
//! - The client side (outbound) verifies the server's chain against the bundle
//!   *and* that its SPIFFE identity is the one the destination endpoint is
//!   expected to have, so a stolen endpoint address cannot impersonate a
//!   service. The expected identity travels in the TLS server name
//!   (`<sa>.<ns>.<trust-domain>`), from which the verifier rebuilds it.
//! - ALPN says what the connection carries: `h2` (every proxied HTTP request,
//!   the applications' HTTP/1.1 included), `http/1.1` (upgrades such as
//!   WebSocket) or `remora-tcp` (opaque TCP).

pub mod identity;

use crate::transport::error::ProxyError;
use remora_proto::SpiffeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
pub const ALPN_TCP: &[u8] = b"remora-tcp";

/// What a mesh connection carries, chosen by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    H2,
    Http1,
    Tcp,
}

impl Carry {
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Carry::H2 => ALPN_H2,
            Carry::Http1 => ALPN_HTTP1,
            Carry::Tcp => ALPN_TCP,
        }
    }

    pub fn from_alpn(alpn: Option<&[u8]>) -> Option<Carry> {
        match alpn? {
            ALPN_H2 => Some(Carry::H2),
            ALPN_HTTP1 => Some(Carry::Http1),
            ALPN_TCP => Some(Carry::Tcp),
            _ => None,
        }
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS configurations built from one certificate and one trust bundle.
/// Rebuilt (and swapped in whole) when either changes; open connections keep
/// the configuration they were made with.
#[derive(Debug)]
pub struct TlsConfigs {
    pub server: Arc<ServerConfig>,
    client_h2: Arc<ClientConfig>,
    client_http1: Arc<ClientConfig>,
    client_tcp: Arc<ClientConfig>,
}

impl TlsConfigs {
    pub fn build(
        cert: Arc<CertifiedKey>,
        roots: Arc<RootCertStore>,
        trust_domain: &str,
    ) -> Result<TlsConfigs, String> {
        let provider = provider();
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| format!("client verifier: {e}"))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(client_verifier)
            .with_cert_resolver(Arc::new(OneCert(cert.clone())));
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_TCP.to_vec()];
        // No session resumption: rustls restores a resumed session's client
        // certificate without checking it again, so an expired (or, after a root
        // rotation, untrusted) certificate could keep getting in. Connections
        // between proxies are long-lived and pooled, so full handshakes are rare.
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        let verifier = Arc::new(SpiffeServerVerifier {
            roots,
            provider: provider.clone(),
            trust_domain: trust_domain.to_string(),
        });
        let base = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(OneCert(cert)));
        let with_alpn = |carry: Carry| {
            let mut c = base.clone();
            c.alpn_protocols = vec![carry.alpn().to_vec()];
            c.resumption = rustls::client::Resumption::disabled();
            Arc::new(c)
        };
        Ok(TlsConfigs {
            server: Arc::new(server),
            client_h2: with_alpn(Carry::H2),
            client_http1: with_alpn(Carry::Http1),
            client_tcp: with_alpn(Carry::Tcp),
        })
    }

    pub fn client(&self, carry: Carry) -> Arc<ClientConfig> {
        match carry {
            Carry::H2 => self.client_h2.clone(),
            Carry::Http1 => self.client_http1.clone(),
            Carry::Tcp => self.client_tcp.clone(),
        }
    }
}

/// The client side of an mTLS handshake with the peer sidecar at `addr`
/// over `tcp`, within `timeout`: this workload's certificate from `configs`,
/// the peer's verified against the trust bundle and the identity that `peer`
/// (its TLS server name) carries, and `carry`'s ALPN agreed.
pub async fn connect(
    tcp: TcpStream,
    addr: SocketAddr,
    peer: &ServerName<'static>,
    configs: &TlsConfigs,
    carry: Carry,
    timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ProxyError> {
    let connector = tokio_rustls::TlsConnector::from(configs.client(carry));
    let tls = tokio::time::timeout(timeout, connector.connect(peer.clone(), tcp))
        .await
        .map_err(|_| ProxyError::connect(format!("{addr}: TLS handshake timed out")))?
        .map_err(|e| ProxyError::connect(format!("{addr}: TLS handshake: {e}")).with_source(e))?;
    if tls.get_ref().1.alpn_protocol() != Some(carry.alpn()) {
        return Err(ProxyError::connect(format!(
            "{addr}: the peer did not agree to {}",
            String::from_utf8_lossy(carry.alpn())
        )));
    }
    Ok(tls)
}

/// Presents this workload's certificate, as server and as client.
#[derive(Debug)]
struct OneCert(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for OneCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for OneCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The TLS server name that carries the SPIFFE identity a peer must prove:
/// `spiffe://td/ns/N/sa/S` → `S.N.td` ([`SpiffeId::tls_server_name`]).
/// None for an identity that is no SPIFFE ID, or whose name could not be
/// read back.
pub fn server_name_for(identity: &str) -> Option<ServerName<'static>> {
    let name = SpiffeId::parse(identity).ok()?.tls_server_name()?;
    ServerName::try_from(name).ok()
}

/// The URI SANs of a DER certificate that are SPIFFE IDs.
pub fn spiffe_ids(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, x509)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = x509.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

/// The not-after time of a DER certificate, as Unix seconds.
pub fn not_after_unix(cert: &CertificateDer<'_>) -> Option<i64> {
    use x509_parser::prelude::*;
    let (_, x509) = X509Certificate::from_der(cert.as_ref()).ok()?;
    Some(x509.validity().not_after.timestamp())
}

/// The SPIFFE identity of a verified TLS peer (its leaf's first SPIFFE SAN).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    spiffe_ids(certs?.first()?).into_iter().next()
}

/// Verifies a server's chain against the bundle, then its SPIFFE identity.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    trust_domain: String,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let ServerName::DnsName(name) = server_name else {
            return Err(identity_mismatch());
        };
        // `<sa>.<ns>.<trust-domain>` → the identity the destination must have.
        let Ok(expected) = SpiffeId::from_tls_server_name(name.as_ref()) else {
            return Err(identity_mismatch());
        };
        if expected.trust_domain() != self.trust_domain {
            return Err(identity_mismatch());
        }
        if spiffe_ids(end_entity).iter().any(|id| expected == *id) {
            Ok(ServerCertVerified::assertion())
        } else {
            tracing::warn!(%expected, presented = ?spiffe_ids(end_entity),
                "peer certificate does not carry the destination's identity");
            Err(identity_mismatch())
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn identity_mismatch() -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
}

/// Parses every certificate in a PEM bundle.
pub fn certs_from_pem(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

/// A root store from a PEM bundle; errors when it holds no usable root.
pub fn roots_from_pem(pem: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs_from_pem(pem));
    if added == 0 {
        return Err("the trust bundle holds no usable certificate".into());
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_become_server_names() {
        let id = "spiffe://cluster.local/ns/shop/sa/backend";
        let name = server_name_for(id).unwrap();
        assert_eq!(name.to_str(), "backend.shop.cluster.local");
        for not_one in [
            "spiffe://td/ns/a/sa/b/extra",
            "https://td/ns/a/sa/b",
            "spiffe://td/ns/a.b/sa/c",
            "",
        ] {
            assert!(server_name_for(not_one).is_none(), "{not_one}");
        }
    }

    #[test]
    fn alpn_maps_both_ways() {
        for c in [Carry::H2, Carry::Http1, Carry::Tcp] {
            assert_eq!(Carry::from_alpn(Some(c.alpn())), Some(c));
        }
        assert_eq!(Carry::from_alpn(Some(b"smtp")), None);
        assert_eq!(Carry::from_alpn(None), None);
    }
}
