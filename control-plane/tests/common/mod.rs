//! Shared helpers: a real control plane on 127.0.0.1:0 over a temporary data
//! directory, and TLS clients for it (with or without a workload certificate).
#![allow(dead_code)]

use rcgen::{CertificateParams, KeyPair, SanType};
use remora_control::server::{start, Running, ServeConfig};
use remora_proto::v1::admin_client::AdminClient;
use remora_proto::v1::discovery_client::DiscoveryClient;
use remora_proto::v1::identity_client::IdentityClient;
use remora_proto::v1::{CertifyRequest, CertifyResponse, SourceFile};
use std::path::Path;
use std::process::Stdio;
use tokio::io::AsyncWriteExt as _;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Request, Status};

pub const SERVICE: &str = "apiVersion: remora.dev/v1
kind: Service
metadata: {name: backend, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
";

pub const ROUTE: &str = "apiVersion: remora.dev/v1
kind: HTTPRoute
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  rules:
    - backends: [{service: backend, weight: 90}, {service: backend, weight: 10}]
      timeout: 2s
";

/// The defaults, on ephemeral ports.
pub fn config(dir: &Path) -> ServeConfig {
    let mut config = ServeConfig::new(dir);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.http_listen = "127.0.0.1:0".parse().unwrap();
    config
}

pub async fn start_in(dir: &Path) -> Running {
    start(config(dir)).await.unwrap()
}

pub fn url(running: &Running) -> String {
    format!("https://{}", running.grpc_addr)
}

/// A TLS channel that verifies the server against the current trust bundle
/// as `remora-control`, presenting `identity` if given.
pub async fn try_channel(
    running: &Running,
    identity: Option<&Workload>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(running.trust_bundle_pem()))
        .domain_name("remora-control");
    if let Some(w) = identity {
        tls = tls.identity(Identity::from_pem(&w.chain_pem, &w.key_pem));
    }
    Channel::from_shared(url(running))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

pub async fn channel(running: &Running) -> Channel {
    try_channel(running, None).await.unwrap()
}

/// Adds `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct Bearer(tonic::metadata::AsciiMetadataValue);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Admin = AdminClient<InterceptedService<Channel, Bearer>>;

pub async fn admin(running: &Running, token: &str) -> Admin {
    let value = format!("Bearer {token}").parse().unwrap();
    AdminClient::with_interceptor(channel(running).await, Bearer(value))
}

pub async fn identity(running: &Running) -> IdentityClient<Channel> {
    IdentityClient::new(channel(running).await)
}

/// A workload's key and certificate chain.
#[derive(Debug, Clone)]
pub struct Workload {
    pub chain_pem: String,
    pub key_pem: String,
    pub response: CertifyResponse,
}

/// A CSR for `uris` (URI SANs) with a new key.
pub fn csr(uris: &[&str]) -> (KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, csr)
}

pub fn spiffe(namespace: &str, service: &str) -> String {
    format!("spiffe://cluster.local/ns/{namespace}/sa/{service}")
}

/// Creates a token for namespace/service and certifies a new key with it.
pub async fn certify(running: &Running, namespace: &str, service: &str) -> Workload {
    let (token, _) = running.tokens.create(namespace, service, None).unwrap();
    certify_with(running, &token, &spiffe(namespace, service), 0)
        .await
        .unwrap()
}

pub async fn certify_with(
    running: &Running,
    token: &str,
    uri: &str,
    lifetime_seconds: u64,
) -> Result<Workload, Status> {
    let (key, csr_pem) = csr(&[uri]);
    let response = identity(running)
        .await
        .certify(CertifyRequest {
            token: token.into(),
            csr_pem,
            lifetime_seconds,
        })
        .await?
        .into_inner();
    Ok(Workload {
        chain_pem: response.certificate_chain_pem.clone(),
        key_pem: key.serialize_pem(),
        response,
    })
}

/// A Discovery client presenting a certificate for namespace/service.
pub async fn discovery_as(
    running: &Running,
    namespace: &str,
    service: &str,
) -> DiscoveryClient<Channel> {
    let workload = certify(running, namespace, service).await;
    DiscoveryClient::new(try_channel(running, Some(&workload)).await.unwrap())
}

/// A Discovery client for `backend` in `shop`.
pub async fn discovery(running: &Running) -> DiscoveryClient<Channel> {
    discovery_as(running, "shop", "backend").await
}

pub fn file(name: &str, content: &str) -> SourceFile {
    SourceFile {
        name: name.into(),
        content: content.into(),
    }
}

/// Every certificate in a PEM text.
pub fn certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    remora_control::pem::parse_certs(pem).unwrap()
}

/// Verifies a chain (leaf first) as a client certificate against `bundle_pem`.
pub fn verify_chain(chain_pem: &str, bundle_pem: &str) -> Result<(), rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    for root in certs(bundle_pem) {
        roots.add(root).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.into(),
        rustls::crypto::ring::default_provider().into(),
    )
    .build()
    .unwrap();
    let chain = certs(chain_pem);
    verifier
        .verify_client_cert(&chain[0], &chain[1..], rustls::pki_types::UnixTime::now())
        .map(|_| ())
}

/// Polls `f` every 20 ms for up to 5 s.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------------ the binary

/// What a run of the `remora-control` binary printed.
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub async fn run(args: &[&str], stdin: Option<&str>) -> Out {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_remora-control"));
    cmd.args(args)
        .env_remove("REMORA_CONTROL_PLANE")
        .env_remove("REMORA_ADMIN_TOKEN")
        .env_remove("REMORA_DATA_DIR")
        .env_remove("REMORA_CA_FILE")
        .env_remove("REMORA_SERVER_NAME")
        .env_remove("REMORA_LOG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.unwrap();
    }
    drop(input);
    let output = child.wait_with_output().await.unwrap();
    Out {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

pub fn dir_arg(p: &Path) -> String {
    p.display().to_string()
}
