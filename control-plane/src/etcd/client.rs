//! The connection to etcd, shared by every part of a replica: one client
//! (its channel balances over `--etcd-endpoints`), every call bounded by
//! [`OP_TIMEOUT`] and retried while etcd is unavailable within it, keys under
//! `--etcd-prefix`, and a bridge for the synchronous stores (they run on the
//! blocking pool).

use crate::etcd::kek::Kek;
use crate::etcd::EtcdConfig;
use anyhow::Context as _;
use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions, Txn, TxnOp,
};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;

/// The longest any one store operation may take, retries included: past it
/// the store is unavailable and the caller says so.
pub const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// The most operations one etcd transaction may hold (etcd's default
/// `--max-txn-ops` is 128).
pub const MAX_TXN_OPS: usize = 100;

#[derive(Debug, Clone, thiserror::Error)]
pub enum EtcdError {
    /// etcd cannot be reached, has no leader, or did not answer in time.
    #[error("the store is unavailable (etcd: {0})")]
    Unavailable(String),
    /// etcd answered with an error.
    #[error("etcd: {0}")]
    Failed(String),
}

impl EtcdError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, EtcdError::Unavailable(_))
    }
}

fn classify(e: etcd_client::Error) -> EtcdError {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s)
            if matches!(
                s.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
            ) =>
        {
            EtcdError::Unavailable(s.message().to_string())
        }
        E::TransportError(t) => EtcdError::Unavailable(t.to_string()),
        E::IoError(io) => EtcdError::Unavailable(io.to_string()),
        other => EtcdError::Failed(other.to_string()),
    }
}

/// A replica's connection to etcd.
pub struct Etcd {
    client: Client,
    prefix: String,
    pub kek: Kek,
    pub config: EtcdConfig,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.config.endpoints)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn read_file(path: &std::path::Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

impl Etcd {
    /// Reads the key-encryption key, connects, and checks that etcd answers.
    pub async fn connect(config: &EtcdConfig) -> anyhow::Result<Arc<Etcd>> {
        let kek = Kek::read(&config.kek_file).map_err(anyhow::Error::msg)?;
        if config.endpoints.is_empty() {
            anyhow::bail!("--store etcd needs --etcd-endpoints");
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(OP_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if config.ca_file.is_some() || config.cert_file.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &config.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read_file(ca, "the etcd CA")?));
            }
            if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
                tls = tls.identity(Identity::from_pem(
                    read_file(cert, "the etcd client certificate")?,
                    read_file(key, "the etcd client key")?,
                ));
            }
            options = options.with_tls(tls);
        }
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .with_context(|| format!("cannot connect to etcd at {}", config.endpoints.join(",")))?;
        let etcd = Arc::new(Etcd {
            client,
            prefix: config.prefix.trim_end_matches('/').to_string(),
            kek,
            config: config.clone(),
        });
        etcd.get(&etcd.key("ping"))
            .await
            .with_context(|| format!("etcd at {} does not answer", config.endpoints.join(",")))?;
        Ok(etcd)
    }

    /// `rest` under this control plane's prefix.
    pub fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    /// The client (cheap to clone), for watches, leases and elections.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs `op` until it succeeds, fails for good, or [`OP_TIMEOUT`] passes
    /// (retrying while etcd is unavailable: a member restarting, a leader
    /// election).
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T, EtcdError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + OP_TIMEOUT;
        let mut delay = Duration::from_millis(50);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let attempt = tokio::time::timeout(left, op(self.client.clone())).await;
            let error = match attempt {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) => classify(e),
                Err(_) => EtcdError::Unavailable(format!("no answer within {OP_TIMEOUT:?}")),
            };
            if !error.is_unavailable() || tokio::time::Instant::now() + delay >= deadline {
                return Err(error);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    /// Runs `fut` to completion from synchronous code (the stores run on the
    /// blocking pool; on a runtime worker thread it is moved off it first).
    pub fn block<T>(
        &self,
        fut: impl Future<Output = Result<T, EtcdError>>,
    ) -> Result<T, EtcdError> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| EtcdError::Failed("no async runtime to reach etcd from".into()))?;
        tokio::task::block_in_place(|| handle.block_on(fut))
    }

    /// The value of `key` and its modification revision.
    pub async fn get(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>, EtcdError> {
        let mut response = self
            .run(|mut c| async move { c.get(key, None).await })
            .await?;
        Ok(response
            .take_kvs()
            .into_iter()
            .next()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    /// Every key under `prefix` (the prefix removed), in key order.
    pub async fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, EtcdError> {
        let mut response = self
            .run(|mut c| async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await })
            .await?;
        Ok(response
            .take_kvs()
            .into_iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key())
                    .strip_prefix(prefix)
                    .unwrap_or_default()
                    .to_string();
                (key, kv.value().to_vec())
            })
            .collect())
    }

    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), EtcdError> {
        self.run(|mut c| {
            let value = value.clone();
            async move { c.put(key, value, None).await }
        })
        .await
        .map(|_| ())
    }

    /// Runs a transaction; whether its comparisons held.
    pub async fn txn(&self, txn: Txn) -> Result<bool, EtcdError> {
        let response = self
            .run(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(response.succeeded())
    }

    /// Runs `ops` in transactions of at most [`MAX_TXN_OPS`] each.
    pub async fn batch(&self, ops: Vec<TxnOp>) -> Result<(), EtcdError> {
        for chunk in ops.chunks(MAX_TXN_OPS) {
            self.txn(Txn::new().and_then(chunk.to_vec())).await?;
        }
        Ok(())
    }
}
