//! HTTPRoute rules compiled for matching: path (exact, prefix by path element),
//! headers, method; then a weighted choice among backends.

use crate::mesh::endpoints::{EndpointSet, SetCache};
use http::{HeaderName, HeaderValue, Method};
use remora_proto::policy::{RouteRule, DEFAULT_UPGRADES};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug)]
pub struct Rule {
    pub name: Arc<str>,
    matches: Vec<Match>,
    pub backends: Backends,
    pub timeout: Option<Duration>,
    pub metrics: Arc<remora_telemetry::RequestMetrics>,
    pub retry: Option<crate::mesh::destination::Retry>,
    pub fault: Option<remora_resilience::Fault>,
    /// Uses the destination's reserved capacity.
    pub critical: bool,
    /// Used when the chosen backend has no available endpoint.
    pub fallback: Option<Arc<EndpointSet>>,
    /// The protocols its requests may upgrade to, lowercased.
    upgrades: Vec<String>,
}

#[derive(Debug)]
struct Match {
    path: Option<PathMatch>,
    headers: Vec<(HeaderName, HeaderValue)>,
    method: Option<Method>,
}

#[derive(Debug)]
enum PathMatch {
    Exact(String),
    Prefix(String),
}

impl Rule {
    pub fn compile(
        rule: &RouteRule,
        name: String,
        namespace: &str,
        sets: &mut SetCache<'_>,
        metrics: Arc<remora_telemetry::RequestMetrics>,
    ) -> Result<Rule, String> {
        let mut matches = Vec::new();
        for m in &rule.matches {
            let path = m.path.as_ref().and_then(|p| match (&p.exact, &p.prefix) {
                (Some(e), _) => Some(PathMatch::Exact(e.clone())),
                (None, Some(p)) => Some(PathMatch::Prefix(p.clone())),
                (None, None) => None,
            });
            let mut headers = Vec::new();
            for h in &m.headers {
                let n = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|e| format!("{name}: header {:?}: {e}", h.name))?;
                let v = HeaderValue::from_str(&h.value)
                    .map_err(|e| format!("{name}: header value {:?}: {e}", h.value))?;
                headers.push((n, v));
            }
            let method = match &m.method {
                Some(s) => Some(
                    Method::from_bytes(s.to_ascii_uppercase().as_bytes())
                        .map_err(|e| format!("{name}: method {s:?}: {e}"))?,
                ),
                None => None,
            };
            matches.push(Match {
                path,
                headers,
                method,
            });
        }
        let mut list = Vec::new();
        for b in &rule.backends {
            let ns = b.namespace.as_deref().unwrap_or(namespace);
            list.push((b.weight, sets.get(ns, &b.service, &b.subset)));
        }
        Ok(Rule {
            name: name.clone().into(),
            matches,
            backends: Backends::weighted(list),
            timeout: rule.timeout,
            metrics,
            retry: rule
                .retry
                .as_ref()
                .map(crate::mesh::destination::Retry::compile)
                .transpose()
                .map_err(|e| format!("{name}: {e}"))?,
            fault: rule
                .fault
                .as_ref()
                .map(crate::mesh::destination::compile_fault),
            critical: rule.critical,
            fallback: rule.fallback.as_ref().map(|b| {
                sets.get(
                    b.namespace.as_deref().unwrap_or(namespace),
                    &b.service,
                    &b.subset,
                )
            }),
            upgrades: match &rule.upgrades {
                Some(list) => list.iter().map(|u| u.to_ascii_lowercase()).collect(),
                None => DEFAULT_UPGRADES.iter().map(|u| (*u).to_owned()).collect(),
            },
        })
    }

    /// Whether a request of this rule may upgrade to `protocol` (lowercase).
    pub fn allows_upgrade(&self, protocol: &str) -> bool {
        self.upgrades.iter().any(|u| u == protocol)
    }

    /// Whether this rule selects the request. No matches selects everything.
    pub fn matches(&self, method: &Method, path: &str, headers: &http::HeaderMap) -> bool {
        self.matches.is_empty()
            || self
                .matches
                .iter()
                .any(|m| m.matches(method, path, headers))
    }
}

impl Match {
    fn matches(&self, method: &Method, path: &str, headers: &http::HeaderMap) -> bool {
        if let Some(m) = &self.method {
            if m != method {
                return false;
            }
        }
        match &self.path {
            Some(PathMatch::Exact(p)) if p != path => return false,
            Some(PathMatch::Prefix(p)) if !prefix_matches(p, path) => return false,
            _ => {}
        }
        self.headers
            .iter()
            .all(|(n, v)| headers.get_all(n).iter().any(|x| x == v))
    }
}

/// Refuses an upgrade its route (or, with no route, the default: WebSocket
/// only) does not allow; `h2c` passes here and is stripped when forwarded.
pub fn check_upgrade<'r, B>(
    rule: impl FnOnce() -> Option<&'r Rule>,
    req: &http::Request<B>,
) -> Result<(), crate::transport::error::ProxyError> {
    // Most requests ask for no upgrade: one lookup tells.
    if !req.headers().contains_key(http::header::UPGRADE) {
        return Ok(());
    }
    let Some(protocol) = crate::transport::forward::upgrade_protocol(req) else {
        return Ok(());
    };
    let rule = rule();
    let allowed = protocol == "h2c"
        || rule.map_or_else(
            || crate::transport::forward::upgrade_allowed_by_default(&protocol),
            |r| r.allows_upgrade(&protocol),
        );
    if allowed {
        Ok(())
    } else {
        Err(crate::transport::error::ProxyError::new(
            crate::transport::error::Cause::Denied,
            format!("an upgrade to {protocol} is not allowed on this route"),
        ))
    }
}

/// Gateway API prefix semantics: `/api` matches `/api` and `/api/x`, not `/apix`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Weighted backends: cumulative weights for one random draw per request.
#[derive(Debug)]
pub struct Backends {
    total: u32,
    list: Vec<(u32, Arc<EndpointSet>)>,
}

impl Backends {
    pub fn single(set: Arc<EndpointSet>) -> Backends {
        Backends {
            total: 1,
            list: vec![(1, set)],
        }
    }

    fn weighted(items: Vec<(u32, Arc<EndpointSet>)>) -> Backends {
        let mut total = 0u32;
        let mut list = Vec::with_capacity(items.len());
        for (w, set) in items {
            if w == 0 {
                continue;
            }
            total = total.saturating_add(w);
            list.push((total, set));
        }
        Backends { total, list }
    }

    /// Draws a backend by weight.
    pub fn pick(&self) -> Option<&Arc<EndpointSet>> {
        match self.list.len() {
            0 => None,
            1 => Some(&self.list[0].1),
            _ => {
                let r = fastrand::u32(0..self.total);
                self.list.iter().find(|(cum, _)| r < *cum).map(|(_, s)| s)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_matches_whole_path_elements() {
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/orders"));
        assert!(prefix_matches("/api/", "/api/orders"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(!prefix_matches("/api", "/"));
        assert!(prefix_matches("/", "/anything"));
    }
}
