//! Connections to the control plane: always TLS, verifying the server against
//! `--ca-file` plus the latest trust bundle (so a root rotation does not strand
//! the proxy) under the name `--control-plane-name`, whichever replica is
//! dialled (see `replicas`: every address of `--control-plane` is one).
//! Discovery and renewals also present the workload certificate, which the
//! control plane checks against the identity the proxy registers.

use crate::control::replicas::{Replica, Replicas};
use crate::transport::tls::identity::Identity;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The control plane, as its clients (discovery, certificates) reach it.
#[derive(Clone)]
pub struct ControlPlane {
    /// `--control-plane`: its replicas, and the rotation discovery and
    /// certificates share.
    pub replicas: Arc<Replicas>,
    /// `--control-plane-name`: the name its certificate must carry.
    pub name: String,
    /// `--ca-file`: the trust bundle that verifies it.
    pub ca_file: Option<PathBuf>,
    /// This workload's certificate, and the mesh's latest trust bundle.
    pub identity: Arc<Identity>,
}

/// A replica's URL: `https://ip:port`.
pub fn url(replica: &Replica) -> String {
    format!("https://{}", replica.addr)
}

impl ControlPlane {
    /// The replica in use (the last one chosen): `host:port`.
    pub fn authority(&self) -> String {
        self.replicas.current()
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

    /// A gRPC channel to `replica`, presenting the workload certificate when
    /// `client_cert`.
    pub async fn channel(&self, replica: &Replica, client_cert: bool) -> Result<Channel, String> {
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
        let endpoint = Endpoint::from_shared(url(replica))
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

    fn control_plane(list: &str) -> ControlPlane {
        let entries = crate::control::replicas::parse_list(list).unwrap();
        ControlPlane {
            replicas: Arc::new(Replicas::starting_at(entries, 0)),
            name: "remora-control".into(),
            ca_file: Some("/nowhere/ca.pem".into()),
            identity: Identity::new(SpiffeId::new("cluster.local", "shop", "backend").unwrap()),
        }
    }

    #[tokio::test]
    async fn replicas_are_dialled_by_address_over_tls() {
        let cp = control_plane("http://127.0.0.1:15012/x,[::1]:7");
        assert_eq!(
            cp.authority(),
            "127.0.0.1:15012",
            "the first, until one is chosen"
        );
        let pick = cp.replicas.pick().await.unwrap();
        assert_eq!(url(&pick.replica), "https://127.0.0.1:15012");
        cp.replicas.failed(&pick);
        let pick = cp.replicas.pick().await.unwrap();
        assert_eq!(url(&pick.replica), "https://[::1]:7");
        assert_eq!(cp.authority(), "[::1]:7", "the one chosen last");
        let e = cp.roots_pem().unwrap_err();
        assert!(e.starts_with("reading the CA file /nowhere/ca.pem"), "{e}");
        let e = cp.channel(&pick.replica, false).await.unwrap_err();
        assert!(e.starts_with("reading the CA file"), "{e}");
    }
}
