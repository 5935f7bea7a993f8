//! Fetches the JWK sets that RequestAuthentication rules name by `jwksUri`
//! and publishes them in every snapshot, so that sidecars never reach out to
//! an identity provider themselves (as istiod does for Envoy).
//!
//! Each URI is fetched when a policy first names it, then again when its
//! cache lifetime ends (`Cache-Control: max-age`, kept between 1 s and
//! 24 h; 5 minutes when the provider says nothing). A fetch that fails (no
//! answer in 5 s, a status other than 200, more than 64 KiB, not a usable
//! JWK set) keeps the last good set and is tried again after 1 s, 2 s, 4 s...
//! up to a minute. A set that did not change publishes nothing.
//!
//! `https://` URIs are checked against the system's roots (`SSL_CERT_FILE`,
//! else `/etc/ssl/certs/ca-certificates.crt`).

use crate::discovery::registry::Registry;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use remora_proto::jwt::{KeySet, MAX_JWKS_BYTES};
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// A provider that asks for 1 s gets it (its own statement of how fast its
/// keys change); istiod's fixed 20 min would leave a rotated key unknown.
const MIN_LIFETIME: Duration = Duration::from_secs(1);
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// After a failed fetch: 1 s, 2 s, 4 s... up to a minute (the ceilings of
/// the workspace's one backoff; no jitter, the provider is one server).
const BACKOFF: remora_resilience::Backoff =
    remora_resilience::Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

/// The state of one URI.
#[derive(Debug, Default)]
struct Entry {
    /// The last good set.
    json: Option<String>,
    next: Option<Instant>,
    failures: u32,
}

/// The `jwksUri`s of the RequestAuthentications in a snapshot.
fn uris(registry: &Registry) -> BTreeSet<String> {
    let snapshot = registry.current_snapshot();
    snapshot
        .resources
        .iter()
        .filter(|r| r.kind == remora_proto::policy::Kind::RequestAuthentication.as_str())
        .filter_map(|r| serde_json::from_str::<serde_json::Value>(&r.spec_json).ok())
        .flat_map(|spec| {
            spec.get("jwtRules")
                .and_then(|r| r.as_array())
                .into_iter()
                .flatten()
                .filter_map(|rule| rule.get("jwksUri")?.as_str().map(str::to_string))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Runs until `shutdown` resolves.
pub async fn run(registry: Arc<Registry>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut snapshots = registry.subscribe();
    let mut entries: HashMap<String, Entry> = HashMap::new();
    loop {
        let wanted = uris(&registry);
        entries.retain(|uri, _| wanted.contains(uri));
        for uri in wanted {
            entries.entry(uri).or_default();
        }
        let now = Instant::now();
        for (uri, entry) in entries.iter_mut() {
            if entry.next.is_some_and(|t| t > now) {
                continue;
            }
            match fetch(uri).await {
                Ok((json, lifetime)) => {
                    if entry.json.as_deref() != Some(json.as_str()) {
                        tracing::info!(uri, "fetched a JWK set");
                    }
                    entry.json = Some(json);
                    entry.failures = 0;
                    entry.next = Some(Instant::now() + lifetime);
                }
                Err(e) => {
                    entry.failures = entry.failures.saturating_add(1);
                    let backoff = BACKOFF.ceiling(entry.failures - 1);
                    tracing::warn!(
                        uri,
                        error = %e,
                        kept = entry.json.is_some(),
                        retry_in = ?backoff,
                        "cannot fetch a JWK set; the last good one stays"
                    );
                    entry.next = Some(Instant::now() + backoff);
                }
            }
        }
        let published: HashMap<String, String> = entries
            .iter()
            .filter_map(|(uri, e)| Some((uri.clone(), e.json.clone()?)))
            .collect();
        registry.set_jwks(published);
        // The snapshot we just published (if anything changed) is seen as a
        // change: mark it seen, then wait for the next due fetch or a new
        // policy.
        snapshots.borrow_and_update();
        let next = entries.values().filter_map(|e| e.next).min();
        let wait = async {
            match next {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown => return,
            _ = wait => {}
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// GETs `uri`: the JWK set's text and how long it may be kept.
pub async fn fetch(uri: &str) -> Result<(String, Duration), String> {
    tokio::time::timeout(FETCH_TIMEOUT, fetch_inner(uri))
        .await
        .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))?
}

async fn fetch_inner(uri: &str) -> Result<(String, Duration), String> {
    let parsed: http::Uri = uri.parse().map_err(|e| format!("bad URI: {e}"))?;
    let https = match parsed.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("the URI must be http:// or https://".into()),
    };
    let host = parsed.host().ok_or("the URI has no host")?.to_string();
    let port = parsed.port_u16().unwrap_or(if https { 443 } else { 80 });
    let bare_host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let tcp = tokio::net::TcpStream::connect((bare_host.as_str(), port))
        .await
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
    let authority = parsed
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or(host.clone());
    let path = parsed
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let request = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, "remora-control")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = if https {
        let tls = tls_connector()?;
        let name = rustls::pki_types::ServerName::try_from(bare_host.clone())
            .map_err(|e| format!("bad server name {bare_host}: {e}"))?;
        let stream = tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}: {e}"))?;
        send(stream, request).await?
    } else {
        send(tcp, request).await?
    };
    let status = response.status();
    if status != http::StatusCode::OK {
        return Err(format!("answered {status}"));
    }
    let lifetime = max_age(response.headers()).unwrap_or(DEFAULT_LIFETIME);
    let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    let text = String::from_utf8(body.to_vec()).map_err(|_| "the body is not UTF-8".to_string())?;
    KeySet::parse(&text)?;
    Ok((text, lifetime.clamp(MIN_LIFETIME, MAX_LIFETIME)))
}

async fn send<S>(
    stream: S,
    request: http::Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())
}

/// `Cache-Control: max-age=N`.
fn max_age(headers: &http::HeaderMap) -> Option<Duration> {
    headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|d| {
            let (k, v) = d.trim().split_once('=')?;
            k.eq_ignore_ascii_case("max-age")
                .then(|| v.trim().parse::<u64>().ok())
                .flatten()
        })
        .map(Duration::from_secs)
}

fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    let path = std::env::var_os("SSL_CERT_FILE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
    let pem = std::fs::read_to_string(&path)
        .map_err(|e| format!("reading the system roots {}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::identity::pem::parse_certs(&pem)? {
        // A bundle may hold a certificate rustls cannot use; skip it.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(format!("no usable root in {}", path.display()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_is_read_from_cache_control() {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::CACHE_CONTROL,
            "public, max-age=120, must-revalidate".parse().unwrap(),
        );
        assert_eq!(max_age(&h), Some(Duration::from_secs(120)));
        assert_eq!(max_age(&http::HeaderMap::new()), None);
    }

    #[tokio::test]
    async fn a_fetch_refuses_what_is_not_a_usable_set() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let body = "{\"keys\": []}";
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        let e = fetch(&format!("http://{addr}/jwks")).await.unwrap_err();
        assert!(e.contains("no usable key"), "{e}");
        let e = fetch("ftp://example.com/x").await.unwrap_err();
        assert!(e.contains("http"), "{e}");
    }
}
