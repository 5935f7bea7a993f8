//! Forwarding one HTTP request to an upstream pool: request framing checks,
//! hop-by-hop headers (RFC 9110 §7.6.1), the HTTP version spoken upstream, and
//! HTTP/1.1 upgrades (WebSocket), which continue as a byte relay.

use crate::transport::body::ProxyBody;
use crate::transport::connect::Connect;
use crate::transport::error::{Cause, ProxyError};
use crate::transport::expect::{expects_continue, Gate};
use crate::transport::pool::{EndpointPool, Upstream};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Version};
use http_body::Body;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;

/// Headers that describe one connection, not the message, and
/// [`ORIG_PROTO`] (which only proxies may set): bit `i` of a [`HopByHop`] is
/// `HOP_BY_HOP[i]`.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    ORIG_PROTO,
    UNREACHED,
];
const CONNECTION_BIT: u16 = 1 << 0;
const TE_BIT: u16 = 1 << 1;
const UPGRADE_BIT: u16 = 1 << 3;
const UNREACHED_BIT: u16 = 1 << 8;

/// Which of `HOP_BY_HOP` a message carries, found in one pass over its
/// header names without hashing any of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HopByHop(u16);

impl HopByHop {
    pub fn scan(headers: &HeaderMap) -> HopByHop {
        let mut bits = 0;
        for name in headers.keys() {
            bits |= hop_bit(name);
        }
        HopByHop(bits)
    }

    pub fn any(self) -> bool {
        self.0 != 0
    }

    /// Whether an HTTP/1.1 request with these headers asks to switch
    /// protocols (`Upgrade` and `Connection: upgrade`).
    pub fn is_upgrade<B>(self, req: &Request<B>) -> bool {
        self.0 & (UPGRADE_BIT | CONNECTION_BIT) == UPGRADE_BIT | CONNECTION_BIT
            && req.version() == Version::HTTP_11
            && connection_has(req.headers(), "upgrade")
    }
}

/// The bit of `name` in a [`HopByHop`] (its place in [`HOP_BY_HOP`]), or 0.
/// Standard names compare as enum tags, custom ones by length first.
fn hop_bit(name: &HeaderName) -> u16 {
    HOP_BY_HOP
        .iter()
        .position(|h| h == name)
        .map_or(0, |i| 1 << i)
}

/// Whether an HTTP/1.1 request asks to switch protocols (`Connection: upgrade`).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    HopByHop::scan(req.headers()).is_upgrade(req)
}

/// The protocol an HTTP/1.1 upgrade request asks for: its first `Upgrade`
/// token, lowercased (`websocket`, `h2c`, ...); None for any other request.
pub fn upgrade_protocol<B>(req: &Request<B>) -> Option<String> {
    if !is_upgrade(req) {
        return None;
    }
    let value = req.headers().get(header::UPGRADE)?.to_str().ok()?;
    let first = value.split(',').next()?.trim();
    let name = first.split('/').next().unwrap_or(first);
    Some(name.to_ascii_lowercase())
}

/// Whether an upgrade to `protocol` is allowed where no route says (only
/// WebSocket; `h2c` is never forwarded but stripped, see [`forward`]).
pub fn upgrade_allowed_by_default(protocol: &str) -> bool {
    remora_proto::policy::DEFAULT_UPGRADES.contains(&protocol)
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The longest request target (path and query, or absolute URI) the proxy
/// takes: longer gets 414. A head longer than `--max-header-bytes` gets 431
/// first.
pub const MAX_URI_BYTES: usize = 16 * 1024;

/// RFC 9112 checks of an HTTP/1 request head that hyper leaves to its user:
/// exactly one `Host` in HTTP/1.1 (at most one in 1.0), and a request target
/// within [`MAX_URI_BYTES`]. HTTP/2 requests carry `:authority` instead.
pub fn check_http1_head<B>(req: &Request<B>) -> Result<(), ProxyError> {
    let version = req.version();
    if version != Version::HTTP_11 && version != Version::HTTP_10 {
        return Ok(());
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => {
            return Err(ProxyError::new(
                Cause::BadRequest,
                "more than one Host header",
            ))
        }
        (None, _) if version == Version::HTTP_11 => {
            return Err(ProxyError::new(
                Cause::BadRequest,
                "an HTTP/1.1 request without Host",
            ))
        }
        _ => {}
    }
    let target = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len())
        + req.uri().authority().map_or(0, |a| a.as_str().len());
    if target > MAX_URI_BYTES {
        return Err(ProxyError::new(
            Cause::UriTooLong,
            format!("the request target is longer than {MAX_URI_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// End-to-end headers the proxy itself relies on (routing, framing, tracing,
/// deadlines): a `Connection` header naming one of them is ignored for it,
/// so a client cannot make the proxy strip what it routes or frames by.
fn protected(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "host"
            | "content-length"
            | "content-type"
            | "expect"
            | "authorization"
            | "traceparent"
            | "tracestate"
            | "b3"
            | "x-b3-traceid"
            | "x-b3-spanid"
            | "x-b3-parentspanid"
            | "x-b3-sampled"
            | "grpc-timeout"
    )
}

/// Removes hop-by-hop headers, including those the Connection header names, and
/// [`ORIG_PROTO`]. `te: trailers` survives (gRPC needs it); for an upgrade,
/// `Upgrade` and `Connection: upgrade` are put back.
///
/// Most messages carry none of these, and a gRPC request only `te: trailers`:
/// one pass over the names finds that out, and only names present are touched.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let present = HopByHop::scan(headers);
    if present.any() {
        strip_present(headers, present, upgrade);
    }
}

fn strip_present(headers: &mut HeaderMap, present: HopByHop, upgrade: bool) {
    let mut bits = present.0;
    if bits & CONNECTION_BIT != 0 {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter(|t| !t.trim().eq_ignore_ascii_case("close"))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !protected(n))
            .collect();
        for name in listed {
            if !(upgrade && name == header::UPGRADE) && headers.remove(&name).is_some() {
                // A listed hop-by-hop name is gone already.
                bits &= !hop_bit(&name);
            }
        }
    }
    if bits & TE_BIT != 0 {
        let mut te = headers.get_all(header::TE).iter();
        let trailers = te
            .next()
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        if trailers && te.next().is_none() {
            // Exactly `te: trailers`: it stays as it is.
            bits &= !TE_BIT;
        } else if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
            bits &= !TE_BIT;
        }
    }
    let upgrade_to = if upgrade && bits & UPGRADE_BIT != 0 {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    for (i, h) in HOP_BY_HOP.iter().enumerate() {
        if bits & (1 << i) != 0 {
            headers.remove(h);
        }
    }
    if let Some(u) = upgrade_to {
        headers.insert(header::UPGRADE, u);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Carries the application's own HTTP version across an HTTP/2 hop between
/// proxies, so the inbound side speaks it to the application.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("remora-orig-proto");

/// On a peer sidecar's own answer: its application could not be reached, so
/// the request was never processed and may go to another endpoint, whatever
/// its method. Only proxies set it (an application's is removed as hop-by-hop).
pub const UNREACHED: HeaderName = HeaderName::from_static("remora-unreached");

/// Sends `req` to `pool`, which opens a connection, if it needs one, as
/// `connect` says. To a mesh peer every request but an upgrade or an
/// `Expect: 100-continue` upload goes as HTTP/2 (one multiplexed mTLS
/// connection), an HTTP/1 request marked with `remora-orig-proto`; to an
/// application whose port is declared HTTP/2 (`h2_app`), HTTP/2 (h2c);
/// otherwise the downstream's HTTP version is kept.
pub async fn forward(
    mut req: Request<ProxyBody>,
    pool: &Arc<EndpointPool>,
    connect: &Connect<'_>,
    idle_timeout: Duration,
    h2_app: bool,
) -> Result<Response<ProxyBody>, ProxyError> {
    // Everything is changed in place: the request moves once, into the pool.
    let hop = HopByHop::scan(req.headers());
    // `Upgrade: h2c` is never forwarded (RFC 9113 removed it; a tunnel it
    // opened would carry requests no policy saw): the request goes on as an
    // ordinary one, its Upgrade and HTTP2-Settings removed as hop-by-hop.
    let upgrade = hop.is_upgrade(&req) && upgrade_protocol(&req).is_none_or(|p| p != "h2c");
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    if hop.any() {
        strip_present(req.headers_mut(), hop, upgrade);
    }
    // The upstream decides about an upload it was asked about, over
    // HTTP/1.1 where its `100 Continue` can be seen.
    let expect = req.version() == Version::HTTP_11
        && !upgrade
        && !h2_app
        && !req.body().is_end_stream()
        && expects_continue(req.headers());
    let version = if req.version() == Version::HTTP_2
        || (!upgrade && !expect && (pool.is_mesh() || h2_app))
    {
        Upstream::Http2
    } else {
        Upstream::Http1
    };
    match version {
        Upstream::Http2 if req.version() != Version::HTTP_2 => to_http2(&mut req, pool.is_mesh())?,
        Upstream::Http2 => {}
        Upstream::Http1 => {
            to_http1(&mut req);
            // hyper sends a GET or HEAD of unknown length with no body at
            // all; one that has a body (chunked from the client) keeps it.
            if matches!(*req.method(), http::Method::GET | http::Method::HEAD)
                && !req.body().is_end_stream()
                && req.body().size_hint().exact().is_none()
            {
                req.headers_mut().insert(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
            }
        }
    }
    let gate = expect.then(|| {
        let gate = Gate::on_continue(&mut req);
        let body = std::mem::take(req.body_mut());
        *req.body_mut() = ProxyBody::Gated(Box::new(gate.hold(body)));
        gate
    });
    let (mut resp, mut checkin) = pool.send(req, version, upgrade, connect).await?;
    if gate.as_ref().is_some_and(|g| !g.opened()) {
        // Answered without the body: the connection, left mid-request, is
        // not reused.
        checkin = None;
    }

    if let Some(down) = downstream_upgrade {
        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            let up = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(down, up) {
                    Ok((d, u)) => {
                        let r = crate::transport::tcp::relay(
                            TokioIo::new(d),
                            TokioIo::new(u),
                            idle_timeout,
                        )
                        .await;
                        if let Some(e) = r.error {
                            tracing::debug!(error = %e, "upgraded connection ended");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                }
            });
        }
    }
    let switching = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    let hop = HopByHop::scan(resp.headers());
    if hop.0 & UNREACHED_BIT != 0 && pool.is_mesh() {
        return Err(ProxyError::connect(format!(
            "{}: the peer could not reach its application",
            pool.addr()
        )));
    }
    if hop.any() {
        strip_present(resp.headers_mut(), hop, switching);
    }
    let mut resp = resp.map(ProxyBody::Incoming);
    if checkin.is_some() || gate.is_some() {
        match resp.body_mut().tail() {
            Some(tail) => {
                tail.checkin = checkin;
                // A held body is given up only once this answer has been
                // read whole: ending it sooner would make hyper abort the
                // connection under the answer.
                tail.gate = gate;
            }
            None => {
                if let Some(c) = checkin {
                    c.give_back();
                }
                if let Some(g) = gate {
                    g.finish();
                }
            }
        }
    }
    Ok(resp)
}

/// HTTP/1 → HTTP/2: the authority moves from Host into the URI; to a mesh
/// peer (`mark`), `remora-orig-proto` tells it to speak HTTP/1.1 onwards.
fn to_http2<B>(req: &mut Request<B>, mark: bool) -> Result<(), ProxyError> {
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
    if mark {
        headers.insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
    }
    *req.version_mut() = Version::HTTP_2;
    Ok(())
}

/// To HTTP/1.1: absolute-form (explicit proxy) becomes origin-form, the
/// authority staying in Host.
fn to_http1<B>(req: &mut Request<B>) {
    if let Some(auth) = req.uri().authority() {
        // RFC 9112 §3.2.2: an absolute-form target's authority replaces Host.
        if let Ok(v) = HeaderValue::from_str(auth.as_str()) {
            req.headers_mut().insert(header::HOST, v);
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
        to_http2(&mut req, true).unwrap();
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
        assert!(to_http2(&mut no_host, true).is_err());
        let mut bad_host = Request::get("/")
            .header(header::HOST, "a b")
            .body(())
            .unwrap();
        assert!(to_http2(&mut bad_host, true).is_err());
    }

    #[test]
    fn te_keeps_only_trailers_unless_connection_names_it() {
        // A gRPC request's only hop-by-hop header is left as it is.
        let mut grpc = HeaderMap::new();
        grpc.insert(header::TE, HeaderValue::from_static("trailers"));
        grpc.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        let before = grpc.clone();
        strip_hop_by_hop(&mut grpc, false);
        assert_eq!(grpc, before);

        let mut several = HeaderMap::new();
        several.append(header::TE, HeaderValue::from_static("trailers"));
        several.append(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut several, false);
        let te: Vec<_> = several.get_all(header::TE).iter().collect();
        assert_eq!(te, ["trailers"]);

        let mut other = HeaderMap::new();
        other.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut other, false);
        assert!(other.is_empty());

        let mut named = HeaderMap::new();
        named.insert(header::CONNECTION, HeaderValue::from_static("te, close"));
        named.insert(header::TE, HeaderValue::from_static("trailers"));
        named.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        strip_hop_by_hop(&mut named, false);
        assert!(named.is_empty(), "{named:?}");
    }

    #[test]
    fn upgrade_needs_both_headers_and_http11() {
        let req = |conn: Option<&str>, up: Option<&str>, v: Version| {
            let mut b = Request::get("/").version(v);
            if let Some(c) = conn {
                b = b.header(header::CONNECTION, c);
            }
            if let Some(u) = up {
                b = b.header(header::UPGRADE, u);
            }
            b.body(()).unwrap()
        };
        assert!(is_upgrade(&req(
            Some("keep-alive, Upgrade"),
            Some("websocket"),
            Version::HTTP_11
        )));
        assert!(!is_upgrade(&req(
            Some("keep-alive"),
            Some("websocket"),
            Version::HTTP_11
        )));
        assert!(!is_upgrade(&req(None, Some("websocket"), Version::HTTP_11)));
        assert!(!is_upgrade(&req(Some("upgrade"), None, Version::HTTP_11)));
        assert!(!is_upgrade(&req(
            Some("upgrade"),
            Some("h2c"),
            Version::HTTP_10
        )));
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
