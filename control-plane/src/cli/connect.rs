//! How the CLI reaches the control plane: always over TLS, verifying the
//! server's certificate against the trust bundle (`--ca-file`, default
//! `<data-dir>/trust-bundle.pem`) and the name `--server-name` (default
//! `remora-control`), whatever the scheme of `--server`; and `Admin`, the
//! Admin client the commands use, with the admin token on every call.

use crate::cli::args::{server_url, GlobalArgs, DEFAULT_SERVER_NAME};
use crate::data_dir::{default_bundle_path, read_token, token_path};
use anyhow::{anyhow, bail};
use remora_proto::v1::admin_client::AdminClient;
use std::path::PathBuf;
use std::time::Duration;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

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

type Client = AdminClient<InterceptedService<Channel, BearerToken>>;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub(crate) struct BearerToken(AsciiMetadataValue);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A connected Admin client, with what error messages need to say.
pub(crate) struct Admin {
    pub(crate) client: Client,
    url: String,
}

impl Admin {
    pub(crate) async fn connect(global: &GlobalArgs) -> anyhow::Result<Admin> {
        let target = Target::from_args(global)?;
        let token = match &global.admin_token {
            Some(token) => token.trim().to_string(),
            None => {
                let path = token_path(&global.data_dir);
                read_token(&path).map_err(|e| {
                    anyhow!(
                        "no admin token: cannot read {}: {e} (pass --admin-token, set REMORA_ADMIN_TOKEN, or point --data-dir at the server's data directory)",
                        path.display()
                    )
                })?
            }
        };
        let bearer: AsciiMetadataValue = format!("Bearer {token}")
            .parse()
            .map_err(|_| anyhow!("the admin token has characters that cannot be sent"))?;
        let channel = channel(&target).await?;
        Ok(Admin {
            client: AdminClient::with_interceptor(channel, BearerToken(bearer)),
            url: target.url,
        })
    }

    /// Turns a refusal into a message for the operator.
    pub(crate) fn error(&self, action: &str, status: Status) -> anyhow::Error {
        let message = status.message();
        match status.code() {
            Code::InvalidArgument => anyhow!("{action} refused: {message}"),
            Code::NotFound => anyhow!("{action}: {message}"),
            Code::FailedPrecondition => anyhow!("{action} refused: {message}"),
            Code::Unauthenticated => anyhow!(
                "the control plane at {} refused the admin token: {message}",
                self.url
            ),
            Code::Unavailable => {
                anyhow!("cannot reach the control plane at {}: {message}", self.url)
            }
            code => anyhow!("{action} failed: {code:?}: {message}"),
        }
    }
}
