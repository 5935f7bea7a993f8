//! Tests of reading documents: the examples parse and round-trip, and every
//! refusal names the file, the document and the field.

use super::*;
use std::time::Duration;

const GOOD: &str = r#"
apiVersion: remora.dev/v1
kind: Service
metadata: {name: backend, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: remora.dev/v1
kind: HTTPRoute
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  rules:
    - matches: [{path: {prefix: /api}, headers: [{name: x-canary, value: "1"}]}]
      backends: [{service: backend, subset: {version: v2}}]
    - backends:
        - {service: backend, subset: {version: v1}, weight: 90}
        - {service: backend, subset: {version: v2}, weight: 10}
      timeout: 2s
      retry: {attempts: 3, perTryTimeout: 500ms, on: [connect-failure, gateway-error, 503], backoff: {base: 25ms, max: 250ms}}
---
"#;

#[test]
fn parses_the_design_examples() {
    let docs = parse_documents("f.yaml", GOOD).unwrap();
    assert_eq!(docs.len(), 2);
    let Spec::HttpRoute(r) = &docs[1].spec else {
        panic!("not a route")
    };
    assert_eq!(r.rules[1].timeout, Some(Duration::from_secs(2)));
    assert_eq!(r.rules[1].backends[0].weight, 90);
    // Round trip through the snapshot form.
    let again =
        Document::from_parts(Kind::HttpRoute, "shop", "backend", &docs[1].spec_json()).unwrap();
    assert_eq!(again.spec, docs[1].spec);
}

#[test]
fn names_file_document_and_field() {
    let bad = GOOD.replace("weight: 10", "weight: ten");
    let e = parse_documents("shop.yaml", &bad).unwrap_err();
    assert_eq!(e.file, "shop.yaml");
    assert_eq!(e.document, 2);
    assert_eq!(e.field, "spec.rules[1].backends[1].weight");
    assert!(e.to_string().contains("HTTPRoute shop/backend"), "{e}");
}

#[test]
fn semantic_errors_name_the_field() {
    let bad = GOOD.replace("attempts: 3", "attempts: 0");
    let e = parse_documents("x.yaml", &bad).unwrap_err();
    assert_eq!(e.field, "spec.rules[1].retry.attempts");
    let bad = GOOD.replace("prefix: /api", "prefix: api");
    let e = parse_documents("x.yaml", &bad).unwrap_err();
    assert_eq!(e.field, "spec.rules[0].matches[0].path");
    let bad = GOOD.replace("protocol: http}", "protocol: smtp}");
    let e = parse_documents("x.yaml", &bad).unwrap_err();
    assert_eq!(
        (e.document, e.field.as_str()),
        (1, "spec.ports[0].protocol")
    );
}

#[test]
fn unknown_fields_and_kinds_are_refused() {
    let bad = GOOD.replace("timeout: 2s", "timeuot: 2s");
    let e = parse_documents("x.yaml", &bad).unwrap_err();
    assert!(e.field.starts_with("spec.rules[1]"), "{e}");
    assert!(e.message.contains("timeuot"), "{e}");
    let bad = GOOD.replace("kind: Service", "kind: Servcie");
    let e = parse_documents("x.yaml", &bad).unwrap_err();
    assert_eq!(e.field, "kind");
    let e = parse_documents("x.yaml", "a: [").unwrap_err();
    assert_eq!(e.field, "(yaml)");
}

#[test]
fn a_key_given_twice_is_refused_and_named() {
    let bad = GOOD.replace("timeout: 2s", "timeout: 2s\n      timeout: 5s");
    let e = parse_documents("x.yaml", &bad).unwrap_err();
    assert_eq!(
        (e.document, e.field.as_str()),
        (2, "spec.rules[1].timeout"),
        "{e}"
    );
    assert!(e.message.starts_with("duplicate key \"timeout\""), "{e}");
    let e = parse_documents("x.yaml", "kind: Service\nkind: HTTPRoute\n").unwrap_err();
    assert_eq!(e.field, "kind", "{e}");
    let e = parse_documents("x.yaml", "metadata: {name: a, name: b}\n").unwrap_err();
    assert_eq!(e.field, "metadata.name", "{e}");
    // The same key in two mappings is fine.
    assert!(parse_documents("x.yaml", GOOD).is_ok());
}

#[test]
#[allow(
    clippy::disallowed_methods,
    reason = "\"quickly\" is a bound on real time"
)]
fn nesting_past_the_limit_is_refused_quickly_and_named() {
    let started = std::time::Instant::now();
    let flow = format!("spec:\n  ports: {}", "[".repeat(200 * 1024));
    let e = parse_documents("x.yaml", &flow).unwrap_err();
    assert_eq!(e.field, "(yaml)");
    assert!(
        e.message
            .contains("nested more than 64 deep at line 2 column 74"),
        "{e}"
    );
    assert!(e.message.contains("nesting limit is 64"), "{e}");
    let maps = format!("---\na: 1\n---\nspec: {}1\n", "{a: ".repeat(100_000));
    let e = parse_documents("x.yaml", &maps).unwrap_err();
    assert_eq!(e.document, 2, "{e}");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));

    // Block nesting is held to the same limit, after parsing.
    let mut block = String::from("spec:\n");
    for i in 0..70 {
        block.push_str(&" ".repeat(i + 1));
        block.push_str("a:\n");
    }
    let e = parse_documents("x.yaml", &block).unwrap_err();
    assert!(e.message.starts_with("nested more than 64 deep"), "{e}");
    assert!(e.field.starts_with("spec.a.a.a."), "{e}");
    // 64 levels are fine (as far as nesting goes).
    let ok = format!("a: {}1{}\n", "[".repeat(63), "]".repeat(63));
    let e = parse_documents("x.yaml", &ok).unwrap_err();
    assert!(!e.message.contains("nest"), "{e}");
}

mod authn;
