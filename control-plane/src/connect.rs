//! How the CLI reaches the control plane: always over TLS, verifying the
//! server's certificate against the trust bundle (`--ca-file`, default
//! `<data-dir>/trust-bundle.pem`) and the name `--server-name` (default
//! `remora-control`), whatever the scheme of `--server`.

use crate::ca_store::default_bundle_path;
use crate::cli::{server_url, GlobalArgs, DEFAULT_SERVER_NAME};
use anyhow::{anyhow, bail};
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Target {
    /// `https://host:port`.
    pub url: String,
    pub ca_file: PathBuf,
    pub server_name: String,
}

impl Target {
    pub fn from_args(global: &GlobalArgs) -> anyhow::Result<Target> {
        let url = server_url(global.server.as_deref()).map_err(|e| anyhow!(e))?;
        let server_name = match global.server_name.as_slice() {
            [] => DEFAULT_SERVER_NAME.to_string(),
            [one] => one.clone(),
            _ => bail!("give one --server-name to verify in the server's certificate"),
        };
        let ca_file = global
            .ca_file
            .clone()
            .unwrap_or_else(|| default_bundle_path(&global.data_dir));
        Ok(Target {
            url,
            ca_file,
            server_name,
        })
    }
}

/// An error and its sources, joined with ": ".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // Sources often repeat what their wrapper already said.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Connects to `target` over TLS.
pub async fn channel(target: &Target) -> anyhow::Result<Channel> {
    let bundle = match std::fs::read(&target.ca_file) {
        Ok(bundle) => bundle,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "no trust bundle at {}: pass --ca-file or --data-dir",
            target.ca_file.display()
        ),
        Err(e) => bail!(
            "cannot read the trust bundle {}: {e}",
            target.ca_file.display()
        ),
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(bundle))
        .domain_name(target.server_name.clone());
    let url = &target.url;
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| anyhow!("invalid --server URL {url:?}: {e}"))?
        .tls_config(tls)
        .map_err(|e| {
            anyhow!(
                "cannot use the trust bundle {}: {}",
                target.ca_file.display(),
                chain(&e)
            )
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT);
    endpoint.connect().await.map_err(|e| {
        let message = chain(&e);
        let hint = if message.contains("InvalidContentType") {
            " (the server did not answer with TLS: is it an older, plaintext control plane?)"
                .to_string()
        } else if message.contains("certificate") || message.contains("Certificate") {
            format!(
                " (is {} the control plane's trust bundle, and {:?} a name in its certificate?)",
                target.ca_file.display(),
                target.server_name
            )
        } else {
            String::new()
        };
        anyhow!("cannot reach the control plane at {url}: {message}{hint}")
    })
}
