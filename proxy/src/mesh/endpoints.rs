//! The endpoints of the compiled mesh: each instance of a service with its
//! connection pool and breaker, and the sets a backend resolves to.

use crate::transport::pool::EndpointPool;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// One instance of a service.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub instance_id: String,
    pub identity: String,
    pub labels: BTreeMap<String, String>,
    pub pool: Arc<EndpointPool>,
    /// Outlier detection, when the service's DestinationPolicy asks for it.
    pub breaker: Option<remora_resilience::Breaker>,
    pub breaker_gauge: Option<remora_telemetry::CircuitBreakerGauge>,
}

impl remora_resilience::Balanced for Endpoint {
    fn load(&self) -> &remora_resilience::Load {
        &self.pool.load
    }

    fn available(&self) -> bool {
        self.breaker.as_ref().is_none_or(|b| b.is_available())
    }
}

/// The endpoints a backend (a service, or a subset of it) resolves to.
#[derive(Debug)]
pub struct EndpointSet {
    /// "backend.shop" or "backend.shop{version=v2}", for logs and metrics.
    pub name: Arc<str>,
    pub endpoints: Vec<Arc<Endpoint>>,
    next: AtomicUsize,
}

impl EndpointSet {
    /// The set named `name` (for logs and metrics), round robin starting at
    /// a random endpoint.
    pub fn new(name: impl Into<Arc<str>>, endpoints: Vec<Arc<Endpoint>>) -> EndpointSet {
        EndpointSet {
            name: name.into(),
            endpoints,
            next: AtomicUsize::new(fastrand::usize(..1024)),
        }
    }

    /// Round robin over the endpoints, ignoring breakers (opaque TCP).
    pub fn pick(&self) -> Option<&Arc<Endpoint>> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.endpoints.get(i % self.endpoints.len())
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }
}

/// Builds each (service, subset) endpoint set once per snapshot, so weighted
/// backends that name the same subset share one balancer.
pub struct SetCache<'a> {
    endpoints: &'a HashMap<(String, String), Vec<Arc<Endpoint>>>,
    cache: HashMap<(String, String, BTreeMap<String, String>), Arc<EndpointSet>>,
}

impl<'a> SetCache<'a> {
    /// Sets drawn from `endpoints`, by (namespace, service).
    pub fn new(endpoints: &'a HashMap<(String, String), Vec<Arc<Endpoint>>>) -> SetCache<'a> {
        SetCache {
            endpoints,
            cache: HashMap::new(),
        }
    }

    pub fn get(
        &mut self,
        ns: &str,
        service: &str,
        subset: &BTreeMap<String, String>,
    ) -> Arc<EndpointSet> {
        let key = (ns.to_string(), service.to_string(), subset.clone());
        if let Some(s) = self.cache.get(&key) {
            return s.clone();
        }
        let all = self
            .endpoints
            .get(&(ns.to_string(), service.to_string()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let endpoints = all
            .iter()
            .filter(|e| subset.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
            .cloned()
            .collect();
        let mut name = format!("{service}.{ns}");
        if !subset.is_empty() {
            let labels: Vec<String> = subset.iter().map(|(k, v)| format!("{k}={v}")).collect();
            name = format!("{name}{{{}}}", labels.join(","));
        }
        let set = Arc::new(EndpointSet::new(name, endpoints));
        self.cache.insert(key, set.clone());
        set
    }
}
