//! Workload identities: [`SpiffeId`], `spiffe://<trust-domain>/ns/<namespace>/sa/<service>`,
//! built and parsed here and nowhere else.
//!
//! The rules are the SPIFFE ones, narrowed to the one path shape the mesh uses:
//!
//! - the trust domain ([`check_trust_domain`]): 1 to 255 lowercase letters,
//!   digits, `.`, `-` or `_`;
//! - the namespace and the service ([`check_name`]): 1 to 253 letters, digits,
//!   `.`, `-` or `_`, and neither `.` nor `..`;
//! - nothing else: no port, no user info, no query or fragment, no percent
//!   escapes, no empty or extra path segment, no trailing `/`.
//!
//! Every [`SpiffeId`] obeys them, however it was made, so every one parses
//! back to itself.
//!
//! The sidecar names the TLS server of a peer it dials after the identity the
//! peer must prove: [`SpiffeId::tls_server_name`] (`<service>.<namespace>.<trust-domain>`)
//! and, on the other side of the handshake, [`SpiffeId::from_tls_server_name`].

use std::fmt;
use std::str::FromStr;

const SCHEME: &str = "spiffe://";

/// A workload's SPIFFE ID: `spiffe://<trust-domain>/ns/<namespace>/sa/<service>`.
///
/// Holds the whole ID as one string ([`as_str`](Self::as_str) costs nothing)
/// and where its parts are.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    /// `id[SCHEME.len()..td_end]` is the trust domain.
    td_end: usize,
    /// `id[ns_start..ns_end]` is the namespace.
    ns_start: usize,
    ns_end: usize,
    /// `id[sa_start..]` is the service.
    sa_start: usize,
}

impl SpiffeId {
    /// The ID of `service` in `namespace` of `trust_domain`; an error (the
    /// first part that breaks the rules, and why) if one does.
    pub fn new(trust_domain: &str, namespace: &str, service: &str) -> Result<SpiffeId, String> {
        check_trust_domain(trust_domain)?;
        check_name("namespace", namespace)?;
        check_name("service", service)?;
        Ok(SpiffeId::assemble(trust_domain, namespace, service))
    }

    /// Parses exactly `spiffe://<trust-domain>/ns/<namespace>/sa/<service>`.
    pub fn parse(id: &str) -> Result<SpiffeId, String> {
        let invalid = |why: String| format!("invalid SPIFFE ID {id:?}: {why}");
        let Some(rest) = id.strip_prefix(SCHEME) else {
            return Err(invalid(format!("it must start with {SCHEME}")));
        };
        let Some((trust_domain, path)) = rest.split_once('/') else {
            return Err(invalid(
                "it must have the path /ns/<namespace>/sa/<service>".into(),
            ));
        };
        let mut segments = path.split('/');
        let (Some("ns"), Some(namespace), Some("sa"), Some(service), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return Err(invalid(
                "its path must be exactly /ns/<namespace>/sa/<service>".into(),
            ));
        };
        SpiffeId::new(trust_domain, namespace, service).map_err(invalid)
    }

    /// The ID a peer named `<service>.<namespace>.<trust-domain>` as a TLS
    /// server must prove (the inverse of [`tls_server_name`](Self::tls_server_name)).
    pub fn from_tls_server_name(name: &str) -> Result<SpiffeId, String> {
        let mut labels = name.splitn(3, '.');
        let (Some(service), Some(namespace), Some(trust_domain)) =
            (labels.next(), labels.next(), labels.next())
        else {
            return Err(format!(
                "server name {name:?} is not <service>.<namespace>.<trust-domain>"
            ));
        };
        SpiffeId::new(trust_domain, namespace, service)
            .map_err(|why| format!("server name {name:?}: {why}"))
    }

    /// The TLS server name that stands for this ID when the sidecar dials a
    /// peer that must prove it: `<service>.<namespace>.<trust-domain>`.
    /// `None` when the namespace or the service has a `.` (the name could not
    /// be read back).
    pub fn tls_server_name(&self) -> Option<String> {
        let (namespace, service) = (self.namespace(), self.service());
        if namespace.contains('.') || service.contains('.') {
            return None;
        }
        Some(format!("{service}.{namespace}.{}", self.trust_domain()))
    }

    pub fn trust_domain(&self) -> &str {
        &self.id[SCHEME.len()..self.td_end]
    }

    pub fn namespace(&self) -> &str {
        &self.id[self.ns_start..self.ns_end]
    }

    /// The service (the `sa` segment: the workload's service account).
    pub fn service(&self) -> &str {
        &self.id[self.sa_start..]
    }

    /// The whole ID, `spiffe://…`.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    pub fn into_string(self) -> String {
        self.id
    }

    /// Parts already checked.
    fn assemble(trust_domain: &str, namespace: &str, service: &str) -> SpiffeId {
        let id = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service}");
        let td_end = SCHEME.len() + trust_domain.len();
        let ns_start = td_end + "/ns/".len();
        let ns_end = ns_start + namespace.len();
        SpiffeId {
            td_end,
            ns_start,
            ns_end,
            sa_start: ns_end + "/sa/".len(),
            id,
        }
    }
}

/// A trust domain: 1 to 255 lowercase letters, digits, `.`, `-` or `_`.
pub fn check_trust_domain(trust_domain: &str) -> Result<(), String> {
    let ok = !trust_domain.is_empty()
        && trust_domain.len() <= 255
        && trust_domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid trust domain {trust_domain:?}: a trust domain has only lowercase letters, \
             digits, '.', '-' and '_' (1 to 255)"
        ))
    }
}

/// A namespace or service name usable as a SPIFFE ID path segment: 1 to 253
/// letters, digits, `.`, `-` or `_`, and neither `.` nor `..`. `what` names it
/// in the error.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {what} {name:?}: use 1 to 253 letters, digits, '.', '-' or '_'"
        ))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.id, f)
    }
}

impl FromStr for SpiffeId {
    type Err = String;

    fn from_str(id: &str) -> Result<SpiffeId, String> {
        SpiffeId::parse(id)
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.id
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.id
    }
}

impl PartialEq<str> for SpiffeId {
    fn eq(&self, other: &str) -> bool {
        self.id == other
    }
}

impl PartialEq<&str> for SpiffeId {
    fn eq(&self, other: &&str) -> bool {
        self.id == *other
    }
}

impl PartialEq<String> for SpiffeId {
    fn eq(&self, other: &String) -> bool {
        &self.id == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BACKEND: &str = "spiffe://cluster.local/ns/shop/sa/backend";

    #[test]
    fn new_builds_the_one_shape_and_the_accessors_read_it_back() {
        let id = SpiffeId::new("cluster.local", "shop", "backend").unwrap();
        assert_eq!(id.as_str(), BACKEND);
        assert_eq!(id.to_string(), BACKEND);
        assert_eq!(format!("{id:?}"), format!("{BACKEND:?}"));
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service(), "backend");
        assert_eq!(id, BACKEND);
        assert_eq!(id, *BACKEND);
        assert_eq!(id, BACKEND.to_string());
        assert_eq!(String::from(id.clone()), BACKEND);
        assert_eq!(id.clone().into_string(), BACKEND);
    }

    #[test]
    fn parse_accepts_what_new_builds() {
        let id = SpiffeId::parse(BACKEND).unwrap();
        assert_eq!(
            id,
            SpiffeId::new("cluster.local", "shop", "backend").unwrap()
        );
        assert_eq!(BACKEND.parse::<SpiffeId>().unwrap(), id);
        let odd = SpiffeId::parse("spiffe://a_b-1.c/ns/Team_1.x/sa/A-b.c").unwrap();
        assert_eq!(
            (odd.trust_domain(), odd.namespace(), odd.service()),
            ("a_b-1.c", "Team_1.x", "A-b.c")
        );
    }

    #[test]
    fn parse_refuses_every_other_shape() {
        for bad in [
            "",
            "cluster.local/ns/shop/sa/backend",
            "SPIFFE://cluster.local/ns/shop/sa/backend",
            "https://cluster.local/ns/shop/sa/backend",
            "spiffe:/cluster.local/ns/shop/sa/backend",
            "spiffe://",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe:///ns/shop/sa/backend",
            "spiffe://Cluster.local/ns/shop/sa/backend",
            "spiffe://cluster.local:8443/ns/shop/sa/backend",
            "spiffe://user@cluster.local/ns/shop/sa/backend",
            "spiffe://cluster.local/ns/shop/sa/backend/",
            "spiffe://cluster.local/ns/shop/sa/backend/extra",
            "spiffe://cluster.local/ns/shop/sa/",
            "spiffe://cluster.local/ns//sa/backend",
            "spiffe://cluster.local//ns/shop/sa/backend",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/sa/backend/ns/shop",
            "spiffe://cluster.local/namespace/shop/sa/backend",
            "spiffe://cluster.local/ns/shop/serviceaccount/backend",
            "spiffe://cluster.local/ns/./sa/backend",
            "spiffe://cluster.local/ns/shop/sa/..",
            "spiffe://cluster.local/ns/shop/sa/back end",
            "spiffe://cluster.local/ns/shop/sa/back%20end",
            "spiffe://cluster.local/ns/shop/sa/backend?x=1",
            "spiffe://cluster.local/ns/shop/sa/backend#x",
            "spiffe://cluster.local/ns/shöp/sa/backend",
            " spiffe://cluster.local/ns/shop/sa/backend",
            "spiffe://cluster.local/ns/shop/sa/backend\n",
        ] {
            let err = SpiffeId::parse(bad).expect_err(bad);
            assert!(err.contains("invalid SPIFFE ID"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn parts_are_checked_with_the_part_named() {
        let err = SpiffeId::new("Cluster", "shop", "backend").unwrap_err();
        assert!(err.contains("trust domain"), "{err}");
        let err = SpiffeId::new("td", "", "backend").unwrap_err();
        assert!(err.starts_with("invalid namespace \"\""), "{err}");
        let err = SpiffeId::new("td", "shop", "a/b").unwrap_err();
        assert!(err.starts_with("invalid service \"a/b\""), "{err}");
        assert!(SpiffeId::new(&"a".repeat(255), "shop", "backend").is_ok());
        assert!(SpiffeId::new(&"a".repeat(256), "shop", "backend").is_err());
        assert!(SpiffeId::new("td", &"n".repeat(253), &"s".repeat(253)).is_ok());
        assert!(SpiffeId::new("td", &"n".repeat(254), "backend").is_err());
        assert!(check_name("service account", "..")
            .unwrap_err()
            .starts_with("invalid service account \"..\""));
    }

    #[test]
    fn the_tls_server_name_stands_for_the_id_and_reads_back() {
        let id = SpiffeId::parse(BACKEND).unwrap();
        let name = id.tls_server_name().unwrap();
        assert_eq!(name, "backend.shop.cluster.local");
        assert_eq!(SpiffeId::from_tls_server_name(&name).unwrap(), id);
        // A dot in the namespace or the service could not be read back.
        for dotted in [("a.b", "c"), ("a", "b.c")] {
            let id = SpiffeId::new("td", dotted.0, dotted.1).unwrap();
            assert_eq!(id.tls_server_name(), None, "{id}");
        }
        for bad in [
            "backend",
            "backend.shop",
            "backend.shop.",
            ".shop.td",
            "b.s.TD",
        ] {
            assert!(SpiffeId::from_tls_server_name(bad).is_err(), "{bad}");
        }
    }

    fn name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{1,20}".prop_filter("not . or ..", |s| s != "." && s != "..")
    }

    proptest! {
        #[test]
        fn every_id_parses_back_to_itself(
            td in "[a-z0-9._-]{1,30}",
            ns in name(),
            sa in name(),
        ) {
            let id = SpiffeId::new(&td, &ns, &sa).unwrap();
            prop_assert_eq!(SpiffeId::parse(id.as_str()).unwrap(), id.clone());
            prop_assert_eq!(
                (id.trust_domain(), id.namespace(), id.service()),
                (td.as_str(), ns.as_str(), sa.as_str())
            );
            if let Some(server_name) = id.tls_server_name() {
                prop_assert_eq!(SpiffeId::from_tls_server_name(&server_name).unwrap(), id);
            }
        }

        #[test]
        fn what_parse_accepts_it_prints_unchanged(s in prop_oneof![
            // Near the shape: valid often, off by a character or a segment often.
            "spiffe://[a-z.:A]{0,6}/(ns|sa|)/[a-z./% ]{0,5}/(sa|ns)/[a-z./#?]{0,5}",
            any::<String>(),
        ]) {
            if let Ok(id) = SpiffeId::parse(&s) {
                prop_assert_eq!(id.as_str(), s.as_str());
                prop_assert_eq!(
                    SpiffeId::new(id.trust_domain(), id.namespace(), id.service()).unwrap(),
                    id
                );
            }
        }
    }
}
