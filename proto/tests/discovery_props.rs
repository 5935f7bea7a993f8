//! Properties of the `remora.v1` messages as the proxy and the control plane
//! decode them off the wire: any bytes decode to a message or an error,
//! never a panic, allocating no more than the input could hold; and every
//! message survives encode → decode unchanged.

mod common;

use proptest::collection::{hash_map, vec};
use proptest::prelude::*;
use proptest::test_runner::Config;
use prost::Message;
use remora_proto::v1::*;

#[global_allocator]
static ALLOC: common::Counting = common::Counting;

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// What decoding `n` bytes may allocate at most: every string, list and map
/// entry is backed by bytes of the input, plus per-element overhead (a
/// `Resource` is four `String`s: 96 bytes for one byte of tag and three of
/// empty fields, so a few hundred times the input for tiny elements).
fn allowance(n: usize) -> usize {
    64 * 1024 + 400 * n
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9.:/-]{0,24}",
        1 => any::<String>(),
        1 => Just(String::new()),
    ]
}

fn labels() -> impl Strategy<Value = std::collections::HashMap<String, String>> {
    hash_map(text(), text(), 0..4)
}

fn resource() -> impl Strategy<Value = Resource> {
    (text(), text(), text(), text()).prop_map(|(kind, namespace, name, spec_json)| Resource {
        kind,
        namespace,
        name,
        spec_json,
    })
}

fn endpoint() -> impl Strategy<Value = Endpoint> {
    (text(), text(), text(), text(), labels(), text()).prop_map(
        |(service, namespace, instance_id, address, labels, identity)| Endpoint {
            service,
            namespace,
            instance_id,
            address,
            labels,
            identity,
        },
    )
}

fn snapshot() -> impl Strategy<Value = Snapshot> {
    (
        text(),
        any::<u64>(),
        vec(resource(), 0..8),
        vec(endpoint(), 0..8),
        (text(), text(), text(), labels()),
    )
        .prop_map(
            |(version, policy_version, resources, endpoints, (bundle, domain, signer, jwks))| {
                Snapshot {
                    version,
                    policy_version,
                    resources,
                    endpoints,
                    trust_bundle_pem: bundle,
                    trust_domain: domain,
                    signer_id: signer,
                    // JWK sets by URI: a string map, as labels are.
                    jwks,
                    ..Snapshot::default()
                }
            },
        )
}

fn discovery_request() -> impl Strategy<Value = DiscoveryRequest> {
    let register = ((text(), text(), text()), labels(), (text(), text(), text())).prop_map(
        |((service, namespace, instance_id), labels, (address, proxy_version, running))| {
            discovery_request::Kind::Register(Register {
                service,
                namespace,
                instance_id,
                labels,
                address,
                proxy_version,
                running_version: running,
            })
        },
    );
    let ack = (text(), any::<bool>(), text(), text(), any::<i64>()).prop_map(
        |(version, ok, error, cert_signer_id, cert_not_after_unix)| {
            discovery_request::Kind::Ack(Ack {
                version,
                ok,
                error,
                cert_signer_id,
                cert_not_after_unix,
            })
        },
    );
    prop::option::of(prop_oneof![
        register,
        ack,
        Just(discovery_request::Kind::Deregister(Deregister {})),
    ])
    .prop_map(|kind| DiscoveryRequest { kind })
}

/// Decodes `bytes` as `M`, checking the allocation bound and that whatever
/// decoded encodes again to something that decodes to the same.
fn decode_any<M: Message + Default + PartialEq + std::fmt::Debug>(
    bytes: &[u8],
) -> Result<(), TestCaseError> {
    let (r, peak) = common::measure(|| M::decode(bytes));
    prop_assert!(
        peak <= allowance(bytes.len()),
        "{} input bytes allocated {} bytes",
        bytes.len(),
        peak
    );
    if let Ok(m) = r {
        let again = M::decode(m.encode_to_vec().as_slice());
        prop_assert_eq!(again.as_ref(), Ok(&m));
    }
    let (r, peak) = common::measure(|| M::decode_length_delimited(bytes));
    prop_assert!(peak <= allowance(bytes.len()), "{} bytes", peak);
    drop(r);
    Ok(())
}

/// Wire-format pieces: valid tags of the messages' fields with lengths that
/// lie, varints that never end, groups, every wire type.
fn wireish() -> impl Strategy<Value = Vec<u8>> {
    let varint = |mut v: u64| {
        let mut out = Vec::new();
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    };
    let piece = prop_oneof![
        // A field of wire type 2 claiming any length, then some bytes.
        (1u64..8, any::<u64>(), vec(any::<u8>(), 0..16)).prop_map(move |(f, len, body)| {
            let mut p = varint(f << 3 | 2);
            p.extend(varint(len));
            p.extend(body);
            p
        }),
        // A length that fits, around a nested message of the same pieces.
        (1u64..8, vec(any::<u8>(), 0..32)).prop_map(move |(f, body)| {
            let mut p = varint(f << 3 | 2);
            p.extend(varint(body.len() as u64));
            p.extend(body);
            p
        }),
        // Any tag and wire type, a varint, a fixed value.
        (any::<u32>(), 0u8..8, any::<u64>()).prop_map(move |(f, wt, v)| {
            let mut p = varint(u64::from(f) << 3 | u64::from(wt));
            p.extend(varint(v));
            p
        }),
        // A varint of ten or more continuation bytes.
        (10usize..20).prop_map(|n| vec![0xff; n]),
        // Start-group tags, nested deeply.
        (1usize..200).prop_map(move |n| {
            let mut p = Vec::new();
            for _ in 0..n {
                p.extend(varint(5 << 3 | 3));
            }
            p
        }),
        vec(any::<u8>(), 0..16),
    ];
    vec(piece, 0..16).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(config(2_000))]

    /// Any bytes, as each message the proxy or the control plane decodes.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop_oneof![
        vec(any::<u8>(), 0..512),
        wireish(),
    ]) {
        decode_any::<Snapshot>(&bytes)?;
        decode_any::<DiscoveryRequest>(&bytes)?;
        decode_any::<Register>(&bytes)?;
        decode_any::<Ack>(&bytes)?;
        decode_any::<Resource>(&bytes)?;
        decode_any::<Endpoint>(&bytes)?;
        decode_any::<CertifyRequest>(&bytes)?;
        decode_any::<CertifyResponse>(&bytes)?;
        decode_any::<ApplyRequest>(&bytes)?;
        decode_any::<StatusResponse>(&bytes)?;
    }
}

proptest! {
    #![proptest_config(config(300))]

    /// A valid message, cut or with a byte changed: an error or another
    /// message, never a panic.
    #[test]
    fn damaged_messages_never_panic(s in snapshot(), cut in any::<prop::sample::Index>(),
                                    flip in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = s.encode_to_vec();
        if !bytes.is_empty() {
            let i = flip.index(bytes.len());
            bytes[i] = byte;
            let n = cut.index(bytes.len() + 1);
            decode_any::<Snapshot>(&bytes[..n])?;
        }
        decode_any::<Snapshot>(&bytes)?;
    }
}

proptest! {
    #![proptest_config(config(200))]

    /// Snapshots survive the wire unchanged.
    #[test]
    fn snapshots_round_trip(s in snapshot()) {
        let bytes = s.encode_to_vec();
        prop_assert_eq!(bytes.len(), s.encoded_len());
        prop_assert_eq!(Snapshot::decode(bytes.as_slice()), Ok(s.clone()));
        let delimited = s.encode_length_delimited_to_vec();
        prop_assert_eq!(Snapshot::decode_length_delimited(delimited.as_slice()), Ok(s));
    }

    /// So do the proxy's requests on the discovery stream.
    #[test]
    fn discovery_requests_round_trip(r in discovery_request()) {
        let bytes = r.encode_to_vec();
        prop_assert_eq!(DiscoveryRequest::decode(bytes.as_slice()), Ok(r));
    }

    /// Two snapshots written one after the other decode as one whose lists
    /// are both lists and whose scalars are the second's (protobuf's merge):
    /// the framing never lets one message's bytes run into another field.
    #[test]
    fn concatenated_snapshots_merge(a in snapshot(), b in snapshot()) {
        let mut bytes = a.encode_to_vec();
        bytes.extend(b.encode_to_vec());
        let m = Snapshot::decode(bytes.as_slice()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut resources = a.resources.clone();
        resources.extend(b.resources.clone());
        prop_assert_eq!(&m.resources, &resources);
        let mut endpoints = a.endpoints.clone();
        endpoints.extend(b.endpoints.clone());
        prop_assert_eq!(&m.endpoints, &endpoints);
        let pick = |x: &str, y: &str| if y.is_empty() { x.to_owned() } else { y.to_owned() };
        prop_assert_eq!(m.version, pick(&a.version, &b.version));
        prop_assert_eq!(m.policy_version,
                        if b.policy_version == 0 { a.policy_version } else { b.policy_version });
    }
}

/// A message that claims a huge field, with nothing behind the claim: an
/// error, and nothing allocated for the claim.
#[test]
fn a_lying_length_allocates_nothing() {
    // Snapshot.resources (field 3, wire type 2), length 2^62.
    let mut bytes = vec![3 << 3 | 2];
    let mut len: u64 = 1 << 62;
    while len >= 0x80 {
        bytes.push((len as u8) | 0x80);
        len >>= 7;
    }
    bytes.push(len as u8);
    let (r, peak) = common::measure(|| Snapshot::decode(bytes.as_slice()));
    assert!(r.is_err());
    assert!(peak < 4096, "allocated {peak} bytes");
}

/// Groups nested past prost's recursion limit: an error, no stack overflow.
#[test]
fn deep_groups_are_refused() {
    let bytes: Vec<u8> = std::iter::repeat_n(5 << 3 | 3, 100_000).collect();
    assert!(Snapshot::decode(bytes.as_slice()).is_err());
    assert!(DiscoveryRequest::decode(bytes.as_slice()).is_err());
}
