//! Forwarding one HTTP request to an upstream pool: request framing checks,
//! hop-by-hop headers (RFC 9110 §7.6.1), the HTTP version spoken upstream, and
//! HTTP/1.1 upgrades (WebSocket), which continue as a byte relay.

use crate::body::ProxyBody;
use crate::error::{Cause, ProxyError};
use crate::pool::{EndpointPool, Upstream};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Version};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;

/// Headers that describe one connection, not the message.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether an HTTP/1.1 request asks to switch protocols (`Connection: upgrade`).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

/// Whether any hop-by-hop header (or [`ORIG_PROTO`]) is present: one pass over
/// the names, no hashing. Without one a request cannot be an upgrade and there
/// is nothing to strip.
pub fn has_hop_by_hop(headers: &HeaderMap) -> bool {
    headers.keys().any(is_hop_by_hop)
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether `name` is one of [`HOP_BY_HOP`] or [`ORIG_PROTO`].
fn is_hop_by_hop(name: &HeaderName) -> bool {
    // Standard names compare as enum tags; the custom ones by length first.
    *name == header::CONNECTION
        || *name == header::TE
        || *name == header::TRANSFER_ENCODING
        || *name == header::UPGRADE
        || *name == header::PROXY_AUTHORIZATION
        || matches!(
            name.as_str(),
            "keep-alive" | "proxy-connection" | "remora-orig-proto"
        )
}

/// Removes hop-by-hop headers, including those the Connection header names, and
/// [`ORIG_PROTO`] (which only proxies may set). `te: trailers` survives (gRPC
/// needs it); for an upgrade, `Upgrade` and `Connection: upgrade` are put back.
///
/// Most messages carry none of these: one pass over the names finds that out
/// without hashing any of them.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    if has_hop_by_hop(headers) {
        strip_present(headers, upgrade);
    }
}

fn strip_present(headers: &mut HeaderMap, upgrade: bool) {
    if let Some(conn) = headers.get(header::CONNECTION) {
        if conn.as_bytes().contains(&b',') || !conn.as_bytes().eq_ignore_ascii_case(b"close") {
            let listed: Vec<HeaderName> = headers
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
                .collect();
            for name in listed {
                if !(upgrade && name == header::UPGRADE) {
                    headers.remove(name);
                }
            }
        }
    }
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    let upgrade_to = if upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
    headers.remove(ORIG_PROTO);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(u) = upgrade_to {
        headers.insert(header::UPGRADE, u);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Carries the application's own HTTP version across an HTTP/2 hop between
/// proxies, so the inbound side speaks it to the application.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("remora-orig-proto");

/// Sends `req` to `pool`. To a mesh peer every request but an upgrade goes as
/// HTTP/2 (one multiplexed mTLS connection), an HTTP/1 request marked with
/// `remora-orig-proto`; otherwise the downstream's HTTP version is kept.
pub async fn forward(
    mut req: Request<ProxyBody>,
    pool: &Arc<EndpointPool>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    limit: Option<&crate::pool::ConnLimit<'_>>,
) -> Result<Response<ProxyBody>, ProxyError> {
    // Everything is changed in place: the request moves once, into the pool.
    let hop = has_hop_by_hop(req.headers());
    let upgrade = hop && is_upgrade(&req);
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    if hop {
        strip_present(req.headers_mut(), upgrade);
    }
    let version = if req.version() == Version::HTTP_2 || (pool.is_mesh() && !upgrade) {
        Upstream::Http2
    } else {
        Upstream::Http1
    };
    match version {
        Upstream::Http2 if req.version() != Version::HTTP_2 => to_http2(&mut req)?,
        Upstream::Http2 => {}
        Upstream::Http1 => to_http1(&mut req),
    }
    let (mut resp, checkin) = pool
        .send(req, version, upgrade, connect_timeout, limit)
        .await?;

    if let Some(down) = downstream_upgrade {
        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            let up = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(down, up) {
                    Ok((d, u)) => {
                        if let Err(e) =
                            crate::tcp::relay(TokioIo::new(d), TokioIo::new(u), idle_timeout).await
                        {
                            tracing::debug!(error = %e, "upgraded connection ended");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                }
            });
        }
    }
    let switching = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(resp.headers_mut(), switching);
    let mut resp = resp.map(ProxyBody::Incoming);
    if let Some(c) = checkin {
        match resp.body_mut().tail() {
            Some(tail) => tail.checkin = Some(c),
            None => c.give_back(),
        }
    }
    Ok(resp)
}

/// HTTP/1 → HTTP/2 (to a mesh peer): the authority moves from Host into the
/// URI, and `remora-orig-proto` tells the peer to speak HTTP/1.1 onwards.
fn to_http2<B>(req: &mut Request<B>) -> Result<(), ProxyError> {
    use http::uri::{Authority, PathAndQuery, Scheme};
    let authority = match req.uri().authority() {
        Some(a) => a.clone(),
        None => {
            let host = req
                .headers()
                .get(header::HOST)
                .ok_or_else(|| ProxyError::new(Cause::BadRequest, "no Host header"))?;
            Authority::try_from(host.as_bytes())
                .map_err(|_| ProxyError::new(Cause::BadRequest, "invalid Host"))?
        }
    };
    let pq = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.uri_mut() = http::Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority)
        .path_and_query(pq)
        .build()
        .map_err(|_| ProxyError::new(Cause::BadRequest, "invalid Host or request target"))?;
    let headers = req.headers_mut();
    headers.remove(header::HOST);
    headers.insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
    *req.version_mut() = Version::HTTP_2;
    Ok(())
}

/// To HTTP/1.1: absolute-form (explicit proxy) becomes origin-form, the
/// authority staying in Host.
fn to_http1<B>(req: &mut Request<B>) {
    if let Some(auth) = req.uri().authority() {
        if !req.headers().contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(auth.as_str()) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        *req.uri_mut() = http::Uri::from(pq);
    }
    *req.version_mut() = Version::HTTP_11;
}

/// On the inbound side: a request that crossed the mesh as HTTP/2 for an
/// HTTP/1 application goes back to HTTP/1.1.
pub fn restore_orig_proto<B>(req: &mut Request<B>) {
    if let Some(v) = req.headers_mut().remove(ORIG_PROTO) {
        if v.as_bytes().eq_ignore_ascii_case(b"HTTP/1.1") {
            *req.version_mut() = Version::HTTP_11;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_listed_and_standard_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-end-to-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("x-secret"));
        assert!(!h.contains_key(header::CONNECTION));
        assert!(!h.contains_key("keep-alive"));
        assert!(!h.contains_key("proxy-connection"));
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h["x-end-to-end"], "1");
    }

    #[test]
    fn strips_a_spoofed_orig_proto_and_leaves_clean_headers_alone() {
        let mut h = HeaderMap::new();
        h.insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
        h.insert("x-app", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key(ORIG_PROTO));
        assert_eq!(h.len(), 1);

        let mut clean = HeaderMap::new();
        clean.insert(header::HOST, HeaderValue::from_static("a"));
        clean.append("x-many", HeaderValue::from_static("1"));
        clean.append("x-many", HeaderValue::from_static("2"));
        let before = clean.clone();
        strip_hop_by_hop(&mut clean, false);
        assert_eq!(clean, before);
    }

    #[test]
    fn http1_requests_cross_to_http2_and_back_to_origin_form() {
        let mut req = Request::get("/orders?id=7")
            .header(header::HOST, "backend.shop:8080")
            .body(())
            .unwrap();
        to_http2(&mut req).unwrap();
        assert_eq!(req.uri(), "http://backend.shop:8080/orders?id=7");
        assert_eq!(req.version(), Version::HTTP_2);
        assert!(!req.headers().contains_key(header::HOST));
        assert_eq!(req.headers()[ORIG_PROTO], "HTTP/1.1");

        let mut req = Request::get("http://backend.shop:8080/x").body(()).unwrap();
        to_http1(&mut req);
        assert_eq!(req.uri(), "/x");
        assert_eq!(req.headers()[header::HOST], "backend.shop:8080");
        assert_eq!(req.version(), Version::HTTP_11);

        let mut no_host = Request::get("/").body(()).unwrap();
        assert!(to_http2(&mut no_host).is_err());
        let mut bad_host = Request::get("/")
            .header(header::HOST, "a b")
            .body(())
            .unwrap();
        assert!(to_http2(&mut bad_host).is_err());
    }

    #[test]
    fn keeps_upgrade_for_websocket() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }
}
