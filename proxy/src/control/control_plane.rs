//! Connections to the control plane: always TLS, verifying the server against
//! `--ca-file` plus the latest trust bundle (so a root rotation does not strand
//! the proxy) under the name `--control-plane-name`. Discovery and renewals
//! also present the workload certificate, which the control plane checks
//! against the identity the proxy registers.

use crate::transport::tls::identity::Identity;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The control plane, as its clients (discovery, certificates) reach it.
#[derive(Clone)]
pub struct ControlPlane {
    /// `--control-plane`: `host:port`, `http://…` or `https://…`.
    pub address: String,
    /// `--control-plane-name`: the name its certificate must carry.
    pub name: String,
    /// `--ca-file`: the trust bundle that verifies it.
    pub ca_file: Option<PathBuf>,
    /// This workload's certificate, and the mesh's latest trust bundle.
    pub identity: Arc<Identity>,
}

/// `host:port`, `http://…` or `https://…` → `https://…`.
pub fn https_url(url: &str) -> String {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    format!("https://{rest}")
}

impl ControlPlane {
    /// Its URL, always `https://`.
    pub fn url(&self) -> String {
        https_url(&self.address)
    }

    /// Its `host:port`.
    pub fn authority(&self) -> String {
        let url = self.url();
        url.trim_start_matches("https://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string()
    }

    /// The roots that verify it (PEM): `--ca-file`, then the mesh's latest
    /// trust bundle.
    pub fn roots_pem(&self) -> Result<String, String> {
        let Some(ca_file) = &self.ca_file else {
            return Err("no --ca-file: cannot verify the control plane".into());
        };
        let mut ca = std::fs::read_to_string(ca_file)
            .map_err(|e| format!("reading the CA file {}: {e}", ca_file.display()))?;
        let bundle = self.identity.bundle_pem();
        if !bundle.is_empty() {
            ca.push('\n');
            ca.push_str(&bundle);
        }
        Ok(ca)
    }

    /// A gRPC channel, presenting the workload certificate when `client_cert`.
    pub async fn channel(&self, client_cert: bool) -> Result<Channel, String> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.roots_pem()?))
            .domain_name(self.name.clone());
        if client_cert {
            let cert = self.identity.cert().ok_or("no workload certificate yet")?;
            tls = tls.identity(tonic::transport::Identity::from_pem(
                &cert.chain_pem,
                cert.key_pem(),
            ));
        }
        let endpoint = Endpoint::from_shared(self.url())
            .map_err(|e| format!("invalid control-plane URL: {e}"))?
            .tls_config(tls)
            .map_err(|e| format!("control-plane TLS: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        endpoint.connect().await.map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            msg
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remora_proto::SpiffeId;

    #[test]
    fn urls_become_https() {
        assert_eq!(https_url("127.0.0.1:15012"), "https://127.0.0.1:15012");
        assert_eq!(https_url("http://cp:1"), "https://cp:1");
        assert_eq!(https_url("https://cp:1"), "https://cp:1");
    }

    #[test]
    fn the_authority_is_host_and_port() {
        let cp = ControlPlane {
            address: "http://cp.remora:15012/x".into(),
            name: "remora-control".into(),
            ca_file: Some("/nowhere/ca.pem".into()),
            identity: Identity::new(SpiffeId::new("cluster.local", "shop", "backend").unwrap()),
        };
        assert_eq!(cp.url(), "https://cp.remora:15012/x");
        assert_eq!(cp.authority(), "cp.remora:15012");
        let e = cp.roots_pem().unwrap_err();
        assert!(e.starts_with("reading the CA file /nowhere/ca.pem"), "{e}");
    }
}
