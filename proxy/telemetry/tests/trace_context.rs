//! Trace context in and out: W3C `traceparent`/`tracestate`, B3 single and multi
//! header, strictly validated, and written back so either kind of application keeps
//! the trace.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use remora_telemetry::context::*;

const TID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SID: &str = "00f067aa0ba902b7";
const PSID: &str = "0102030405060708";

fn map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn tp(s: &str) -> Option<TraceContext> {
    extract(&map(&[("traceparent", s)]))
}

#[test]
fn w3c_valid_sampled_and_unsampled() {
    let ctx = tp(&format!("00-{TID}-{SID}-01")).unwrap();
    assert_eq!(hex(&ctx.trace_id), TID);
    assert_eq!(hex(&ctx.span_id), SID);
    assert!(ctx.sampled);
    assert!(!ctx.deferred);
    assert_eq!(ctx.format, Format::W3C);
    assert_eq!(ctx.tracestate, None);

    let ctx = tp(&format!("00-{TID}-{SID}-00")).unwrap();
    assert!(!ctx.sampled);
    // Other flag bits do not make a trace sampled.
    let ctx = tp(&format!("00-{TID}-{SID}-02")).unwrap();
    assert!(!ctx.sampled);
    let ctx = tp(&format!("00-{TID}-{SID}-03")).unwrap();
    assert!(ctx.sampled);
}

#[test]
fn w3c_future_versions_are_read_leniently() {
    let ctx = tp(&format!("cc-{TID}-{SID}-01-what-the-future-holds")).unwrap();
    assert!(ctx.sampled);
    assert!(tp(&format!("cc-{TID}-{SID}-01")).is_some());
    assert!(tp(&format!("cc-{TID}-{SID}-01x")).is_none());
}

#[test]
fn w3c_malformed_is_rejected() {
    let zero_trace = "0".repeat(32);
    let zero_span = "0".repeat(16);
    let bad = [
        String::new(),
        "garbage".to_string(),
        format!("ff-{TID}-{SID}-01"),       // forbidden version
        format!("00-{TID}-{SID}-01-extra"), // v00 must be exact
        format!("00-{TID}-{SID}-1"),        // short flags
        format!("00-{}-{SID}-01", TID.to_uppercase()), // uppercase hex
        format!("00-{TID}-{}-01", SID.to_uppercase()), // uppercase hex
        format!("0A-{TID}-{SID}-01"),       // uppercase version
        format!("00-{zero_trace}-{SID}-01"), // zero trace id
        format!("00-{TID}-{zero_span}-01"), // zero span id
        format!("00-{}-{SID}-01", &TID[..31]), // short trace id
        format!("00-{TID}x-{SID}-0"),       // misplaced dash
        format!("00_{TID}_{SID}_01"),       // wrong separators
        format!("00-{}g-{SID}-01", &TID[..31]), // non-hex
        format!("00-{TID}-{SID}-0g"),       // non-hex flags
        format!(" 00-{TID}-{SID}-01"),      // leading space
    ];
    for s in &bad {
        assert_eq!(tp(s), None, "{s:?} must be rejected");
    }
}

#[test]
fn w3c_duplicate_traceparent_is_rejected() {
    let v = format!("00-{TID}-{SID}-01");
    assert_eq!(
        extract(&map(&[("traceparent", &v), ("traceparent", &v)])),
        None
    );
}

#[test]
fn w3c_invalid_falls_back_to_b3() {
    let h = map(&[
        ("traceparent", "00-bogus"),
        ("b3", &format!("{TID}-{SID}-1")),
    ]);
    let ctx = extract(&h).unwrap();
    assert_eq!(ctx.format, Format::B3Single);
}

#[test]
fn w3c_takes_precedence_over_b3() {
    let other = "11111111111111111111111111111111";
    let h = map(&[
        ("b3", &format!("{other}-{SID}-0")),
        ("traceparent", &format!("00-{TID}-{SID}-01")),
    ]);
    let ctx = extract(&h).unwrap();
    assert_eq!(ctx.format, Format::W3C);
    assert_eq!(hex(&ctx.trace_id), TID);
}

#[test]
fn tracestate_kept_joined_or_dropped() {
    let parent = format!("00-{TID}-{SID}-01");
    let ctx = extract(&map(&[
        ("traceparent", &parent),
        ("tracestate", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
    ]))
    .unwrap();
    assert_eq!(
        ctx.tracestate.unwrap(),
        "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    );

    let ctx = extract(&map(&[
        ("traceparent", &parent),
        ("tracestate", "rojo=1"),
        ("tracestate", "tenant@vendor=2"),
    ]))
    .unwrap();
    assert_eq!(ctx.tracestate.unwrap(), "rojo=1,tenant@vendor=2");

    for bad in ["novalue", "UPPER=1", "a=b=c", "=x", "k=", "k=a\tb", ",,,"] {
        let ctx = extract(&map(&[("traceparent", &parent), ("tracestate", bad)])).unwrap();
        assert_eq!(ctx.tracestate, None, "{bad:?} must be dropped");
    }

    let long = (0..40)
        .map(|i| format!("k{i}=v"))
        .collect::<Vec<_>>()
        .join(",");
    let ctx = extract(&map(&[("traceparent", &parent), ("tracestate", &long)])).unwrap();
    assert_eq!(ctx.tracestate, None, "more than 32 members");
    let huge = format!("k={}", "v".repeat(600));
    let ctx = extract(&map(&[("traceparent", &parent), ("tracestate", &huge)])).unwrap();
    assert_eq!(ctx.tracestate, None, "longer than 512");
    // tracestate without traceparent means nothing.
    assert_eq!(extract(&map(&[("tracestate", "rojo=1")])), None);
}

#[test]
fn b3_single_forms() {
    let b3 = |s: &str| extract(&map(&[("b3", s)]));
    let ctx = b3(&format!("{TID}-{SID}-1-{PSID}")).unwrap();
    assert_eq!(hex(&ctx.trace_id), TID);
    assert_eq!(hex(&ctx.span_id), SID);
    assert!(ctx.sampled && !ctx.deferred);
    assert_eq!(ctx.format, Format::B3Single);

    let ctx = b3(&format!("{TID}-{SID}-0")).unwrap();
    assert!(!ctx.sampled && !ctx.deferred);
    let ctx = b3(&format!("{TID}-{SID}-d")).unwrap();
    assert!(ctx.sampled);
    let ctx = b3(&format!("{TID}-{SID}")).unwrap();
    assert!(ctx.deferred && !ctx.sampled);

    // 64-bit trace id.
    let ctx = b3(&format!("a3ce929d0e0e4736-{SID}-1")).unwrap();
    assert_eq!(hex(&ctx.trace_id), "0000000000000000a3ce929d0e0e4736");

    // Decision alone.
    let deny = b3("0").unwrap();
    assert!(!deny.sampled && !deny.deferred && deny.decision_only);
    assert_eq!(deny.as_parent(), None);
    let child = TraceContext::next(Some(&deny), false);
    assert!(!child.decision_only);
    assert_eq!(child.as_parent(), Some(child.span_id));
    assert_eq!(deny.format, Format::B3Single);
    assert_ne!(deny.trace_id, [0; 16]);
    assert!(b3("1").unwrap().sampled);
    assert!(b3("d").unwrap().sampled);
}

#[test]
fn b3_single_malformed_is_rejected() {
    let zero = "0".repeat(32);
    let bad = [
        String::new(),
        "2".to_string(),
        "true".to_string(),
        TID.to_string(),
        format!("{TID}-"),
        format!("{}-{SID}-1", TID.to_uppercase()),
        format!("{zero}-{SID}-1"),
        format!("0000000000000000-{SID}-1"),
        format!("{TID}-0000000000000000-1"),
        format!("{TID}-{SID}-2"),
        format!("{TID}-{SID}-1-zz"),
        format!("{TID}-{SID}-1-{PSID}-more"),
        format!("{}-{SID}-1", &TID[..20]),
        format!("{TID}-{}-1", &SID[..8]),
    ];
    for s in &bad {
        assert_eq!(extract(&map(&[("b3", s)])), None, "{s:?} must be rejected");
    }
}

#[test]
fn b3_multi_forms() {
    let ctx = extract(&map(&[
        ("x-b3-traceid", TID),
        ("x-b3-spanid", SID),
        ("x-b3-parentspanid", PSID),
        ("x-b3-sampled", "1"),
    ]))
    .unwrap();
    assert_eq!(hex(&ctx.trace_id), TID);
    assert_eq!(hex(&ctx.span_id), SID);
    assert!(ctx.sampled && !ctx.deferred);
    assert_eq!(ctx.format, Format::B3Multi);

    let ctx = extract(&map(&[("x-b3-traceid", TID), ("x-b3-spanid", SID)])).unwrap();
    assert!(ctx.deferred);
    let ctx = extract(&map(&[
        ("x-b3-traceid", "a3ce929d0e0e4736"),
        ("x-b3-spanid", SID),
        ("x-b3-sampled", "false"),
    ]))
    .unwrap();
    assert!(!ctx.sampled && !ctx.deferred);
    assert_eq!(ctx.trace_id[..8], [0; 8]);
    let ctx = extract(&map(&[
        ("x-b3-traceid", TID),
        ("x-b3-spanid", SID),
        ("x-b3-sampled", "0"),
        ("x-b3-flags", "1"),
    ]))
    .unwrap();
    assert!(ctx.sampled, "debug forces sampling");

    let deny = extract(&map(&[("x-b3-sampled", "0")])).unwrap();
    assert!(!deny.sampled);
    assert_eq!(deny.format, Format::B3Multi);
}

#[test]
fn b3_multi_malformed_is_rejected() {
    let cases: &[&[(&str, &str)]] = &[
        &[("x-b3-traceid", TID)],
        &[("x-b3-spanid", SID)],
        &[("x-b3-spanid", SID), ("x-b3-sampled", "1")],
        &[("x-b3-traceid", "xyz"), ("x-b3-spanid", SID)],
        &[("x-b3-traceid", &TID[..30]), ("x-b3-spanid", SID)],
        &[("x-b3-traceid", TID), ("x-b3-spanid", "0000000000000000")],
        &[
            ("x-b3-traceid", TID),
            ("x-b3-spanid", SID),
            ("x-b3-sampled", "yes"),
        ],
        &[
            ("x-b3-traceid", TID),
            ("x-b3-spanid", SID),
            ("x-b3-flags", "2"),
        ],
        &[
            ("x-b3-traceid", TID),
            ("x-b3-spanid", SID),
            ("x-b3-parentspanid", "nope"),
        ],
        &[
            ("x-b3-traceid", TID),
            ("x-b3-traceid", TID),
            ("x-b3-spanid", SID),
        ],
    ];
    for case in cases {
        assert_eq!(extract(&map(case)), None, "{case:?} must be rejected");
    }
    assert_eq!(extract(&HeaderMap::new()), None);
}

#[test]
fn inject_w3c_writes_traceparent_and_tracestate() {
    let mut ctx = tp(&format!("00-{TID}-{SID}-01")).unwrap().child(true);
    ctx.tracestate = Some(HeaderValue::from_static("rojo=1"));
    let mut h = map(&[("tracestate", "stale=1")]);
    inject(&mut h, &ctx);
    let expected = format!("00-{TID}-{}-01", hex(&ctx.span_id));
    assert_eq!(h[TRACEPARENT], expected.as_str());
    // New with every request: never worth a slot in HPACK's dynamic table.
    assert!(h[TRACEPARENT].is_sensitive());
    assert_eq!(h[TRACESTATE], "rojo=1");
    assert!(!h.contains_key(B3));
    assert!(!h.contains_key(X_B3_TRACEID));
    assert_eq!(
        extract(&h).unwrap(),
        TraceContext {
            deferred: false,
            ..ctx
        }
    );

    let ctx = TraceContext::new_root(false);
    let mut h = map(&[("tracestate", "stale=1")]);
    inject(&mut h, &ctx);
    assert!(h[TRACEPARENT].to_str().unwrap().ends_with("-00"));
    assert!(!h.contains_key(TRACESTATE));
}

#[test]
fn inject_b3_single_round_trips() {
    let incoming = map(&[("b3", &format!("{TID}-{SID}-1-{PSID}"))]);
    let child = extract(&incoming).unwrap().child(true);
    let mut h = incoming.clone();
    inject(&mut h, &child);
    let span = hex(&child.span_id);
    assert_eq!(h[B3], format!("{TID}-{span}-1").as_str());
    assert_eq!(h[TRACEPARENT], format!("00-{TID}-{span}-01").as_str());
    assert!(!h.contains_key(X_B3_TRACEID));
}

#[test]
fn inject_b3_keeps_64_bit_ids() {
    let incoming = map(&[
        ("x-b3-traceid", "a3ce929d0e0e4736"),
        ("x-b3-spanid", SID),
        ("x-b3-parentspanid", PSID),
        ("x-b3-sampled", "0"),
        ("x-b3-flags", "0"),
    ]);
    let child = extract(&incoming).unwrap().child(false);
    let mut h = incoming.clone();
    inject(&mut h, &child);
    assert_eq!(h[X_B3_TRACEID], "a3ce929d0e0e4736");
    assert_eq!(h[X_B3_SPANID], hex(&child.span_id).as_str());
    assert_eq!(h[X_B3_SAMPLED], "0");
    assert!(!h.contains_key(X_B3_PARENTSPANID));
    assert!(!h.contains_key(X_B3_FLAGS));
    assert_eq!(
        h[TRACEPARENT],
        format!(
            "00-0000000000000000a3ce929d0e0e4736-{}-00",
            hex(&child.span_id)
        )
        .as_str()
    );
}

#[test]
fn inject_updates_b3_headers_already_present_under_w3c() {
    let incoming = map(&[
        ("traceparent", &format!("00-{TID}-{SID}-01")),
        ("b3", &format!("{TID}-{SID}-1")),
        ("x-b3-traceid", TID),
        ("x-b3-spanid", SID),
    ]);
    let child = extract(&incoming).unwrap().child(true);
    let mut h = incoming.clone();
    inject(&mut h, &child);
    let span = hex(&child.span_id);
    assert_eq!(h[B3], format!("{TID}-{span}-1").as_str());
    assert_eq!(h[X_B3_SPANID], span.as_str());
}

#[test]
fn new_ids_are_random_and_non_zero() {
    let a = new_trace_id();
    let b = new_trace_id();
    assert_ne!(a, b);
    assert_ne!(a, [0; 16]);
    assert_ne!(new_span_id(), new_span_id());
    let root = TraceContext::new_root(true);
    let child = root.child(true);
    assert_eq!(root.trace_id, child.trace_id);
    assert_ne!(root.span_id, child.span_id);
    assert_eq!(root.trace_id_hex().len(), 32);
    assert_eq!(root.span_id_hex().len(), 16);
}
