//! Incremental snapshots, the proxy's side: the last snapshot a discovery
//! stream sent, kept complete, which the next delta is merged into
//! (`remora_proto::delta::apply`). It is the last one RECEIVED, not the one
//! installed: the control plane bases its next delta on what it sent,
//! whether the proxy applied it or refused it. A stream starts with no base
//! (its first snapshot is complete); a delta on anything but the base is
//! refused, and the stream ends so the proxy reconnects and gets a complete
//! snapshot.

use remora_proto::v1::Snapshot;

/// The last snapshot this stream sent, complete.
#[derive(Debug, Default)]
pub struct Received {
    base: Option<Snapshot>,
}

/// A delta that cannot be merged: the stream must start over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfStep(pub String);

impl Received {
    /// The base's version, if there is one.
    pub fn version(&self) -> Option<&str> {
        self.base.as_ref().map(|b| b.version.as_str())
    }

    /// `snapshot` (complete, or a delta on the base) as the complete
    /// snapshot to compile and install; it becomes the base. A delta on
    /// another base (or with none yet) is refused and the base is dropped:
    /// nothing can be merged until a complete snapshot comes.
    pub fn take(&mut self, snapshot: Snapshot) -> Result<Snapshot, OutOfStep> {
        if !remora_proto::delta::is_delta(&snapshot) {
            self.base = Some(snapshot.clone());
            return Ok(snapshot);
        }
        let Some(base) = self.base.as_mut() else {
            return Err(OutOfStep(format!(
                "delta {} is based on {}, but no snapshot was received on this stream: \
                 reconnecting for a complete snapshot",
                snapshot.version, snapshot.base_version
            )));
        };
        match remora_proto::delta::apply(base, snapshot) {
            Ok(()) => Ok(base.clone()),
            Err(e) => {
                self.base = None;
                Err(OutOfStep(format!(
                    "{e}: reconnecting for a complete snapshot"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remora_proto::v1::{Endpoint, EndpointKey, Resource, ResourceKey};

    fn resource(kind: &str, name: &str, spec: &str) -> Resource {
        Resource {
            kind: kind.into(),
            namespace: "shop".into(),
            name: name.into(),
            spec_json: spec.into(),
        }
    }

    fn endpoint(instance: &str, address: &str) -> Endpoint {
        Endpoint {
            service: "backend".into(),
            namespace: "shop".into(),
            instance_id: instance.into(),
            address: address.into(),
            ..Default::default()
        }
    }

    fn complete(version: &str) -> Snapshot {
        Snapshot {
            version: version.into(),
            policy_version: 1,
            resources: vec![
                resource("Service", "backend", "{}"),
                resource("Service", "frontend", "{}"),
            ],
            endpoints: vec![
                endpoint("b-1", "10.0.0.1:80"),
                endpoint("b-2", "10.0.0.2:80"),
            ],
            trust_bundle_pem: "ROOTS".into(),
            trust_domain: "cluster.local".into(),
            signer_id: "signer-1".into(),
            jwks: [("https://idp/jwks".to_string(), "{}".to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_complete_snapshot_is_taken_whole_and_becomes_the_base() {
        let mut received = Received::default();
        assert_eq!(received.version(), None);
        let got = received.take(complete("1.1")).unwrap();
        assert_eq!(got, complete("1.1"));
        assert_eq!(received.version(), Some("1.1"));
    }

    #[test]
    fn a_delta_on_the_base_is_merged_into_a_complete_snapshot() {
        let mut received = Received::default();
        received.take(complete("1.1")).unwrap();
        let delta = Snapshot {
            version: "2.2".into(),
            policy_version: 2,
            base_version: "1.1".into(),
            resources: vec![resource("Service", "backend", "{\"changed\":true}")],
            removed_resources: vec![ResourceKey {
                kind: "Service".into(),
                namespace: "shop".into(),
                name: "frontend".into(),
            }],
            endpoints: vec![endpoint("b-3", "10.0.0.3:80")],
            removed_endpoints: vec![EndpointKey {
                namespace: "shop".into(),
                service: "backend".into(),
                instance_id: "b-1".into(),
            }],
            trust_domain: "cluster.local".into(),
            // Unchanged trust and JWK sets are not sent.
            ..Default::default()
        };
        let got = received.take(delta).unwrap();
        assert_eq!(got.version, "2.2");
        assert_eq!(got.policy_version, 2);
        assert!(got.base_version.is_empty(), "the result is complete");
        assert_eq!(
            got.resources,
            vec![resource("Service", "backend", "{\"changed\":true}")]
        );
        let instances: Vec<_> = got
            .endpoints
            .iter()
            .map(|e| e.instance_id.as_str())
            .collect();
        assert_eq!(instances, ["b-2", "b-3"]);
        assert_eq!(
            (got.trust_bundle_pem.as_str(), got.signer_id.as_str()),
            ("ROOTS", "signer-1")
        );
        assert_eq!(got.jwks.len(), 1);
        assert_eq!(received.version(), Some("2.2"));

        // Flags set: the trust fields and the JWK sets are replaced.
        let delta = Snapshot {
            version: "2.3".into(),
            policy_version: 2,
            base_version: "2.2".into(),
            trust_changed: true,
            trust_bundle_pem: "NEW ROOTS".into(),
            signer_id: "signer-2".into(),
            jwks_changed: true,
            trust_domain: "cluster.local".into(),
            ..Default::default()
        };
        let got = received.take(delta).unwrap();
        assert_eq!(
            (got.trust_bundle_pem.as_str(), got.signer_id.as_str()),
            ("NEW ROOTS", "signer-2")
        );
        assert!(got.jwks.is_empty());
        assert_eq!(got.endpoints.len(), 2, "the endpoints stay");
    }

    #[test]
    fn a_delta_on_another_base_is_refused_and_nothing_merges_until_a_complete_one() {
        let mut received = Received::default();
        received.take(complete("1.1")).unwrap();
        let delta = |version: &str, base: &str| Snapshot {
            version: version.into(),
            base_version: base.into(),
            ..Default::default()
        };
        let OutOfStep(e) = received.take(delta("1.3", "1.2")).unwrap_err();
        assert!(e.contains("1.2") && e.contains("1.1"), "{e}");
        assert!(e.ends_with("reconnecting for a complete snapshot"), "{e}");
        assert_eq!(received.version(), None, "the base is dropped");
        // Even a delta on the old base is refused now.
        let OutOfStep(e) = received.take(delta("1.2", "1.1")).unwrap_err();
        assert!(e.contains("no snapshot was received on this stream"), "{e}");
        // A complete snapshot starts over.
        received.take(complete("1.4")).unwrap();
        assert!(received.take(delta("1.5", "1.4")).is_ok());
    }

    #[test]
    fn a_delta_before_any_snapshot_is_refused() {
        let mut received = Received::default();
        let delta = Snapshot {
            version: "1.2".into(),
            base_version: "1.1".into(),
            ..Default::default()
        };
        let OutOfStep(e) = received.take(delta).unwrap_err();
        assert!(e.starts_with("delta 1.2 is based on 1.1"), "{e}");
    }
}
