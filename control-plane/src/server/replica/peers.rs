//! `status` through one replica shows the whole mesh: it asks every other
//! live replica for its own proxies, at once, each within two seconds.

use crate::server::replica::{Replica, ReplicaRecord};
use std::future::Future;
use std::time::Duration;

impl Replica {
    /// Asks every other live replica for its own proxies (`status` shows
    /// the whole mesh): each answer, or why there is none.
    pub async fn remote_statuses(
        &self,
        admin_token: &str,
        roots_pem: &str,
    ) -> Vec<(String, Result<remora_proto::v1::StatusResponse, String>)> {
        let others: Vec<ReplicaRecord> = self
            .peers()
            .into_iter()
            .filter(|r| r.id != self.id)
            .collect();
        let asks = others.into_iter().map(|r| {
            let (token, roots) = (admin_token.to_string(), roots_pem.to_string());
            async move {
                let answer = tokio::time::timeout(
                    Duration::from_secs(2),
                    ask_status(&r.address, &token, &roots),
                )
                .await
                .unwrap_or_else(|_| Err("no answer within 2s".into()));
                (r.id, answer)
            }
        });
        join_all(asks).await
    }
}

/// Runs `futures` at once; their outputs in order.
async fn join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        if let Ok(output) = handle.await {
            out.push(output);
        }
    }
    out
}

async fn ask_status(
    address: &str,
    admin_token: &str,
    roots_pem: &str,
) -> Result<remora_proto::v1::StatusResponse, String> {
    use remora_proto::v1::admin_client::AdminClient;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint as Dial};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(roots_pem))
        .domain_name("remora-control");
    let channel = Dial::from_shared(format!("https://{address}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .map_err(|e| format!("cannot reach {address}: {e}"))?;
    let mut request = tonic::Request::new(remora_proto::v1::StatusRequest { local_only: true });
    let value = format!("Bearer {admin_token}")
        .parse()
        .map_err(|_| "the admin token is not a header value".to_string())?;
    request.metadata_mut().insert("authorization", value);
    AdminClient::new(channel)
        .status(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| s.message().to_string())
}
