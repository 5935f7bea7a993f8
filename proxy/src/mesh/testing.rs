//! What the tests of the mesh and of the data path build snapshots from:
//! resources and endpoints of the namespace `shop`, and pools.

use crate::transport::limits::Limits;
use crate::transport::pool::{PoolSettings, Pools};
use remora_proto::v1;
use std::sync::Arc;

/// Pools with the default limits.
pub(crate) fn pools() -> Arc<Pools> {
    Pools::new(PoolSettings::from(&Limits::default()))
}

/// A policy document of `kind` in `shop`.
pub(crate) fn resource(kind: &str, name: &str, spec: serde_json::Value) -> v1::Resource {
    v1::Resource {
        kind: kind.into(),
        namespace: "shop".into(),
        name: name.into(),
        spec_json: spec.to_string(),
    }
}

/// An endpoint of `service` in `shop` at `address`, labelled `version`,
/// with the identity its service's endpoints carry.
pub(crate) fn endpoint(service: &str, address: &str, version: &str) -> v1::Endpoint {
    v1::Endpoint {
        service: service.into(),
        namespace: "shop".into(),
        instance_id: format!("{service}-{address}"),
        address: address.into(),
        labels: [("version".to_string(), version.to_string())].into(),
        identity: format!("spiffe://cluster.local/ns/shop/sa/{service}"),
    }
}
