//! Connections to the control plane: always TLS, verifying the server against
//! `--ca-file` plus the latest trust bundle (so a root rotation does not strand
//! the proxy) under the name `--control-plane-name`. Discovery also presents
//! the workload certificate, which the control plane checks against the
//! identity the proxy registers.

use crate::state::State;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// `host:port`, `http://…` or `https://…` → `https://…`.
pub fn https_url(url: &str) -> String {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    format!("https://{rest}")
}

pub async fn channel(state: &State, client_cert: bool) -> Result<Channel, String> {
    let s = &state.settings;
    let Some(ca_file) = &s.ca_file else {
        return Err("no --ca-file: cannot verify the control plane".into());
    };
    let mut ca = std::fs::read_to_string(ca_file)
        .map_err(|e| format!("reading the CA file {}: {e}", ca_file.display()))?;
    let bundle = state.identity.bundle_pem();
    if !bundle.is_empty() {
        ca.push('\n');
        ca.push_str(&bundle);
    }
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(s.control_plane_name.clone());
    if client_cert {
        let cert = state.identity.cert().ok_or("no workload certificate yet")?;
        tls = tls.identity(tonic::transport::Identity::from_pem(
            &cert.chain_pem,
            cert.key_pem(),
        ));
    }
    let endpoint = Endpoint::from_shared(https_url(&s.control_plane))
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

#[cfg(test)]
mod tests {
    #[test]
    fn urls_become_https() {
        assert_eq!(
            super::https_url("127.0.0.1:15012"),
            "https://127.0.0.1:15012"
        );
        assert_eq!(super::https_url("http://cp:1"), "https://cp:1");
        assert_eq!(super::https_url("https://cp:1"), "https://cp:1");
    }
}
