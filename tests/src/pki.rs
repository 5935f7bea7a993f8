//! Certificates and TLS for identity tests: workload certificates obtained
//! from a real control plane through `Identity.Certify`, a rogue CA that the
//! mesh does not trust, a TLS client that presents either to a proxy's inbound
//! listener (and records the leaf the proxy presents), and a rogue TLS server
//! that records what clients do with its certificate.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use remora_proto::v1::identity_client::IdentityClient;
use remora_proto::v1::CertifyRequest;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::mesh::ControlPlane;

/// The name the control plane's own certificate carries.
pub const CONTROL_PLANE_NAME: &str = "remora-control";

/// `spiffe://cluster.local/ns/NS/sa/SERVICE`.
pub fn spiffe_id(namespace: &str, service: &str) -> String {
    format!("spiffe://cluster.local/ns/{namespace}/sa/{service}")
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain (leaf first) and its private key.
#[derive(Debug)]
pub struct WorkloadCert {
    pub chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
    /// The leaf's not-after, Unix seconds.
    pub not_after_unix: i64,
}

impl WorkloadCert {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }
}

/// Parses every certificate of a PEM text.
pub fn certs_from_pem(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

/// A root store holding every certificate of `pem`.
pub fn roots_from_pem(pem: &str) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs_from_pem(pem));
    assert!(added > 0, "no usable root in {pem:?}");
    roots
}

/// The control plane's trust bundle file, as it is now.
pub fn trust_bundle(cp: &ControlPlane) -> String {
    std::fs::read_to_string(cp.data_dir().join("trust-bundle.pem"))
        .expect("reading <data-dir>/trust-bundle.pem")
}

/// What a leaf certificate says, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    pub serial_hex: String,
    pub not_after_unix: i64,
    pub issuer: String,
    pub spiffe_ids: Vec<String>,
}

pub fn leaf_info(der: &[u8]) -> LeafInfo {
    use x509_parser::prelude::*;
    let (_, x509) = X509Certificate::from_der(der).expect("a DER certificate");
    let spiffe_ids = match x509.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    LeafInfo {
        serial_hex: x509.raw_serial_as_string(),
        not_after_unix: x509.validity().not_after.timestamp(),
        issuer: x509.issuer().to_string(),
        spiffe_ids,
    }
}

// ------------------------------------------------------------------ the real CA

/// An `Identity` client over TLS to `cp`, verifying it with its trust bundle.
pub async fn identity_client(cp: &ControlPlane) -> IdentityClient<Channel> {
    let url = cp.url().replacen("http://", "https://", 1);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(trust_bundle(cp)))
        .domain_name(CONTROL_PLANE_NAME);
    let channel = Endpoint::from_shared(url)
        .expect("the control plane's URL")
        .tls_config(tls)
        .expect("TLS settings for the control plane")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connecting to the control plane over TLS: {e:?}"));
    IdentityClient::new(channel)
}

/// A fresh P-256 key and a CSR for `spiffe_id` (its only name).
pub fn csr_for(spiffe_id: &str) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a P-256 key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        rcgen::string::Ia5String::try_from(spiffe_id).expect("an IA5 URI"),
    )];
    let csr = params.serialize_request(&key).expect("a CSR");
    (key, csr.pem().expect("CSR PEM"))
}

/// `remora-control token create` for SERVICE.NAMESPACE; the token.
pub async fn create_token(cp: &ControlPlane, service: &str, namespace: &str) -> String {
    cp.cli_ok(&[
        "token",
        "create",
        "--service",
        service,
        "--namespace",
        namespace,
    ])
    .await
    .trim()
    .to_owned()
}

/// A workload certificate for SERVICE.NAMESPACE from `cp`'s CA, by the path
/// a proxy takes: a token, a CSR, `Identity.Certify` (lifetime in seconds;
/// the control plane clamps it to at least 60).
pub async fn certify(
    cp: &ControlPlane,
    service: &str,
    namespace: &str,
    lifetime_seconds: u64,
) -> WorkloadCert {
    let token = create_token(cp, service, namespace).await;
    let (key, csr_pem) = csr_for(&spiffe_id(namespace, service));
    let resp = identity_client(cp)
        .await
        .certify(CertifyRequest {
            token,
            csr_pem,
            lifetime_seconds,
        })
        .await
        .unwrap_or_else(|s| panic!("Certify for {service}.{namespace} was refused: {s:?}"))
        .into_inner();
    let chain = certs_from_pem(&resp.certificate_chain_pem);
    assert!(!chain.is_empty(), "Certify answered no certificate");
    WorkloadCert {
        not_after_unix: leaf_info(&chain[0]).not_after_unix,
        chain,
        key_der: key.serialize_der(),
    }
}

// ------------------------------------------------------------------ a rogue CA

/// A self-signed CA the mesh has never heard of.
pub struct RogueCa {
    issuer: Issuer<'static, KeyPair>,
    pub cert: CertificateDer<'static>,
}

impl std::fmt::Debug for RogueCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RogueCa").finish_non_exhaustive()
    }
}

impl RogueCa {
    pub fn new() -> RogueCa {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a P-256 key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "Remora root CA (rogue)");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("a self-signed root");
        RogueCa {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A workload certificate for `spiffe_id`, shaped like the mesh's own.
    pub fn issue(&self, spiffe_id: &str) -> WorkloadCert {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a P-256 key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            rcgen::string::Ia5String::try_from(spiffe_id).expect("an IA5 URI"),
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("a leaf from the rogue CA");
        let chain = vec![cert.der().clone()];
        WorkloadCert {
            not_after_unix: leaf_info(&chain[0]).not_after_unix,
            chain,
            key_der: key.serialize_der(),
        }
    }
}

impl Default for RogueCa {
    fn default() -> Self {
        RogueCa::new()
    }
}

// ------------------------------------------------------------------ a TLS client

/// Verifies the server's chain against a bundle (names are SPIFFE URIs, not
/// DNS names, so the name is not checked) and keeps the leaf it presented.
#[derive(Debug)]
struct RecordingVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    seen: Arc<Mutex<Option<CertificateDer<'static>>>>,
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap() = Some(end_entity.clone().into_owned());
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
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

/// A TLS 1.3 client that presents `cert` and trusts servers chaining to
/// `bundle_pem`, offering ALPN `alpn`.
#[derive(Debug, Clone)]
pub struct MeshClient {
    config: Arc<ClientConfig>,
    seen: Arc<Mutex<Option<CertificateDer<'static>>>>,
    last_kind: Arc<Mutex<Option<rustls::HandshakeKind>>>,
}

impl MeshClient {
    pub fn new(cert: &WorkloadCert, bundle_pem: &str, alpn: &[u8]) -> MeshClient {
        let seen = Arc::new(Mutex::new(None));
        let provider = provider();
        let verifier = Arc::new(RecordingVerifier {
            roots: Arc::new(roots_from_pem(bundle_pem)),
            provider: provider.clone(),
            seen: seen.clone(),
        });
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(cert.chain.clone(), cert.key())
            .expect("a usable client certificate");
        config.alpn_protocols = vec![alpn.to_vec()];
        // Every connection is a full handshake unless `resuming` says otherwise.
        config.resumption = rustls::client::Resumption::disabled();
        MeshClient {
            config: Arc::new(config),
            seen,
            last_kind: Arc::default(),
        }
    }

    /// The same client, keeping TLS 1.3 session tickets and offering them on
    /// later connections (resumption: no certificate is sent or checked then).
    pub fn resuming(self) -> MeshClient {
        let mut config = (*self.config).clone();
        config.resumption = rustls::client::Resumption::in_memory_sessions(16);
        MeshClient {
            config: Arc::new(config),
            seen: self.seen,
            last_kind: self.last_kind,
        }
    }

    /// Whether the last completed handshake resumed an earlier session.
    pub fn last_resumed(&self) -> bool {
        *self.last_kind.lock().unwrap() == Some(rustls::HandshakeKind::Resumed)
    }

    /// A client that presents no certificate at all.
    pub fn anonymous(bundle_pem: &str, alpn: &[u8]) -> MeshClient {
        let seen = Arc::new(Mutex::new(None));
        let provider = provider();
        let verifier = Arc::new(RecordingVerifier {
            roots: Arc::new(roots_from_pem(bundle_pem)),
            provider: provider.clone(),
            seen: seen.clone(),
        });
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        MeshClient {
            config: Arc::new(config),
            seen,
            last_kind: Arc::default(),
        }
    }

    /// Connects and completes the handshake (from the client's side: in TLS
    /// 1.3 the server judges the client's certificate after that).
    pub async fn connect(
        &self,
        addr: SocketAddr,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let attempt = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?;
            let name = ServerName::try_from("backend.shop.cluster.local").expect("a DNS name");
            tokio_rustls::TlsConnector::from(self.config.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake with {addr}: {e}"))
        };
        let tls = tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .unwrap_or_else(|_| Err(format!("TLS handshake with {addr} timed out")))?;
        *self.last_kind.lock().unwrap() = tls.get_ref().1.handshake_kind();
        Ok(tls)
    }

    /// The leaf the last server presented.
    pub fn server_leaf(&self) -> Option<CertificateDer<'static>> {
        self.seen.lock().unwrap().clone()
    }

    /// Sends one HTTP/1.1 `GET path` over a new TLS connection (ALPN must be
    /// `http/1.1`) and reads until the server closes: `Ok(answer bytes)`, or
    /// what went wrong (a refused handshake, an alert, a reset).
    pub async fn http1_get(&self, addr: SocketAddr, path: &str) -> Result<Vec<u8>, String> {
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: backend.shop:8080\r\nConnection: close\r\n\r\n");
        self.exchange(addr, req.as_bytes()).await
    }

    /// Sends `bytes` over a new TLS connection and reads until the server
    /// closes (or 10 s pass): `Ok(answer bytes)`, or what went wrong.
    pub async fn exchange(&self, addr: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>, String> {
        let mut tls = self.connect(addr).await?;
        let exchange = async {
            tls.write_all(bytes)
                .await
                .map_err(|e| format!("writing the request: {e}"))?;
            tls.flush().await.map_err(|e| format!("flushing: {e}"))?;
            let mut answer = Vec::new();
            tls.read_to_end(&mut answer)
                .await
                .map_err(|e| format!("reading the answer: {e}"))?;
            Ok(answer)
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .unwrap_or_else(|_| Err("no answer and no close within 10 s".into()))
    }
}

// ------------------------------------------------------------------ a rogue server

/// What happened to one connection of a [`RogueServer`].
#[derive(Debug, Clone)]
pub struct RogueConnection {
    /// The handshake's outcome from the server's side.
    pub handshake: Result<(), String>,
    /// Application bytes the client sent after the handshake.
    pub app_bytes: usize,
}

/// A TLS server on 127.0.0.1 presenting a certificate of the test's choice,
/// asking for (but not checking) a client certificate. It never answers.
#[derive(Debug)]
pub struct RogueServer {
    addr: SocketAddr,
    connections: Arc<Mutex<Vec<RogueConnection>>>,
    task: JoinHandle<()>,
}

/// Accepts any client certificate (the rogue wants to look like a peer).
#[derive(Debug)]
struct AnyClient(Arc<CryptoProvider>);

impl rustls::server::danger::ClientCertVerifier for AnyClient {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        false
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl RogueServer {
    pub async fn start(cert: &WorkloadCert) -> RogueServer {
        let provider = provider();
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_client_cert_verifier(Arc::new(AnyClient(provider)))
            .with_single_cert(cert.chain.clone(), cert.key())
            .expect("a usable server certificate");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"remora-tcp".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the rogue server");
        let addr = listener.local_addr().expect("its address");
        let connections = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let connections = connections.clone();
            async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let acceptor = acceptor.clone();
                    let connections = connections.clone();
                    tokio::spawn(async move {
                        let handshake =
                            tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp))
                                .await;
                        let record = match handshake {
                            Ok(Ok(mut tls)) => {
                                // TLS 1.3: the client judges our certificate
                                // before it sends Finished, so a refusal shows
                                // up here as an alert or a close.
                                let mut buf = vec![0u8; 4096];
                                let mut app_bytes = 0;
                                let mut outcome = Ok(());
                                loop {
                                    match tokio::time::timeout(
                                        Duration::from_secs(3),
                                        tls.read(&mut buf),
                                    )
                                    .await
                                    {
                                        Ok(Ok(0)) | Err(_) => break,
                                        Ok(Ok(n)) => app_bytes += n,
                                        Ok(Err(e)) => {
                                            outcome = Err(e.to_string());
                                            break;
                                        }
                                    }
                                }
                                RogueConnection {
                                    handshake: outcome,
                                    app_bytes,
                                }
                            }
                            Ok(Err(e)) => RogueConnection {
                                handshake: Err(e.to_string()),
                                app_bytes: 0,
                            },
                            Err(_) => RogueConnection {
                                handshake: Err("handshake timed out".into()),
                                app_bytes: 0,
                            },
                        };
                        connections.lock().unwrap().push(record);
                    });
                }
            }
        });
        RogueServer {
            addr,
            connections,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every finished connection so far.
    pub fn connections(&self) -> Vec<RogueConnection> {
        self.connections.lock().unwrap().clone()
    }
}

impl Drop for RogueServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
