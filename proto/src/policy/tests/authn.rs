//! `RequestAuthentication` and the `when` conditions of `AuthorizationPolicy`
//! rules: the documents parse and round-trip, and every rule of their
//! validation refuses with the field named.

use super::super::*;
use crate::jwt::testing;
use serde_json::{json, Value};

fn inline_jwks() -> String {
    // Fixed keys (a fresh EC key would change from one call to the next).
    testing::jwks(&[&testing::rsa("k1"), &testing::rsa_other("k2")])
}

fn good_yaml() -> String {
    // JSON text is a valid YAML double-quoted scalar.
    let jwks = serde_json::to_string(&inline_jwks()).unwrap();
    format!(
        r#"
apiVersion: remora.dev/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: shop}}
spec:
  service: backend
  jwtRules:
    - issuer: https://issuer.example
      audiences: [shop, api]
      jwks: {jwks}
      fromHeaders: [{{name: x-token}}, {{name: authorization, prefix: "Token "}}]
      fromCookies: [session]
      forwardOriginalToken: true
      outputClaimToHeaders: [{{header: x-user, claim: sub}}]
    - issuer: https://login.example.org/tenant
      jwksUri: https://login.example.org:8443/keys?tenant=1
---
apiVersion: remora.dev/v1
kind: AuthorizationPolicy
metadata: {{name: backend, namespace: shop}}
spec:
  service: backend
  rules:
    - from: ["*"]
      to: [{{methods: [GET]}}]
      when:
        - key: request.auth.principal
          values: [https://issuer.example/alice]
        - key: request.auth.claims[groups]
          values: [admin, ops]
          notValues: [suspended]
        - key: request.auth.claims[aud]
          values: ["*"]
"#
    )
}

#[test]
fn good_documents_parse_and_round_trip() {
    let docs = parse_documents("authn.yaml", &good_yaml()).unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0].kind(), Kind::RequestAuthentication);
    let Spec::RequestAuthentication(r) = &docs[0].spec else {
        panic!("not a RequestAuthentication")
    };
    assert_eq!(r.service, "backend");
    let first = &r.jwt_rules[0];
    assert_eq!(first.audiences, ["shop", "api"]);
    assert_eq!(first.jwks.as_deref(), Some(inline_jwks().as_str()));
    assert_eq!(first.from_headers[1].prefix.as_deref(), Some("Token "));
    assert_eq!(first.from_cookies, ["session"]);
    assert!(first.forward_original_token);
    assert_eq!(
        first.output_claim_to_headers,
        [ClaimToHeader {
            header: "x-user".into(),
            claim: "sub".into()
        }]
    );
    // The defaults.
    let second = &r.jwt_rules[1];
    assert!(second.audiences.is_empty() && second.from_headers.is_empty());
    assert!(second.from_cookies.is_empty() && second.output_claim_to_headers.is_empty());
    assert!(!second.forward_original_token && second.jwks.is_none());

    let Spec::AuthorizationPolicy(a) = &docs[1].spec else {
        panic!("not an AuthorizationPolicy")
    };
    let when = &a.rules[0].when;
    assert_eq!(when.len(), 3);
    assert_eq!(when[1].not_values, ["suspended"]);
    assert!(when[2].not_values.is_empty());

    for d in &docs {
        // Through the snapshot's JSON form...
        let again = Document::from_parts(
            d.kind(),
            &d.metadata.namespace,
            &d.metadata.name,
            &d.spec_json(),
        )
        .unwrap();
        assert_eq!(again.spec, d.spec);
        // ... and through YAML.
        let again = parse_documents("again.yaml", &d.to_yaml()).unwrap();
        assert_eq!(again.as_slice(), std::slice::from_ref(d));
    }
    // What is left at its default is not written.
    let json: Value = serde_json::from_str(&docs[0].spec_json()).unwrap();
    assert_eq!(
        json["jwtRules"][1],
        json!({"issuer": "https://login.example.org/tenant",
               "jwksUri": "https://login.example.org:8443/keys?tenant=1"})
    );
    assert_eq!(json["jwtRules"][0]["forwardOriginalToken"], json!(true));
    assert_eq!(docs[0].to_value()["kind"], json!("RequestAuthentication"));
}

#[test]
fn a_rule_without_when_writes_none() {
    let spec = json!({"service": "backend", "rules": [{"from": ["*"]}]});
    let d =
        Document::from_parts(Kind::AuthorizationPolicy, "shop", "a", &spec.to_string()).unwrap();
    let Spec::AuthorizationPolicy(a) = &d.spec else {
        panic!()
    };
    assert!(a.rules[0].when.is_empty());
    let json: Value = serde_json::from_str(&d.spec_json()).unwrap();
    assert_eq!(json["rules"], json!([{"from": ["*"]}]));
}

#[test]
fn the_kind_is_listed_and_named() {
    let i = Kind::ALL
        .iter()
        .position(|k| *k == Kind::AuthorizationPolicy);
    assert_eq!(
        Kind::ALL.get(i.unwrap() + 1),
        Some(&Kind::RequestAuthentication)
    );
    assert_eq!(
        Kind::RequestAuthentication.as_str(),
        "RequestAuthentication"
    );
    for s in [
        "RequestAuthentication",
        "requestauthentication",
        "requestauthentications",
        "requestauthn",
        "RequestAuthns",
    ] {
        assert_eq!(Kind::parse(s), Some(Kind::RequestAuthentication), "{s}");
    }
}

#[test]
fn an_unknown_field_is_refused_and_named() {
    let bad = good_yaml().replace("fromCookies:", "fromCookie:");
    let e = parse_documents("x.yaml", &bad).unwrap_err();
    assert_eq!(
        (e.document, e.field.as_str()),
        (1, "spec.jwtRules[0].fromCookie"),
        "{e}"
    );
    assert!(e.message.contains("fromCookie"), "{e}");
    let bad = good_yaml().replace("notValues:", "notValue:");
    let e = parse_documents("x.yaml", &bad).unwrap_err();
    assert_eq!(e.document, 2, "{e}");
    assert!(e.field.starts_with("spec.rules[0].when[1]"), "{e}");
}

#[test]
fn errors_are_reported_with_file_document_and_field() {
    let bad = good_yaml().replace("issuer: https://issuer.example", "issuer: ''");
    let e = parse_documents("shop.yaml", &bad).unwrap_err();
    assert_eq!(e.document, 1);
    assert_eq!(e.field, "spec.jwtRules[0].issuer");
    assert_eq!(e.message, "must not be empty");
    assert!(
        e.to_string()
            .contains("RequestAuthentication shop/jwt): spec.jwtRules[0].issuer"),
        "{e}"
    );
}

// ------------------------------------------------------- RequestAuthentication

/// A valid spec with one rule that names its keys by URL.
fn authn() -> Value {
    json!({
        "service": "backend",
        "jwtRules": [{"issuer": "https://issuer.example", "jwksUri": "https://issuer.example/jwks"}],
    })
}

fn authn_with(change: impl FnOnce(&mut Value)) -> Result<Document, String> {
    let mut spec = authn();
    change(&mut spec);
    Document::from_parts(
        Kind::RequestAuthentication,
        "shop",
        "jwt",
        &spec.to_string(),
    )
}

/// The field and the message of the refusal.
#[track_caller]
fn refused(change: impl FnOnce(&mut Value)) -> (String, String) {
    let e = authn_with(change).expect_err("must be refused");
    let (field, message) = e.split_once(": ").expect("field: message");
    (field.to_string(), message.to_string())
}

#[track_caller]
fn assert_refused(change: impl FnOnce(&mut Value), field: &str, message: &str) {
    let (f, m) = refused(change);
    assert_eq!(f, field, "{m}");
    assert!(m.contains(message), "{f}: {m}");
}

fn rule(spec: &mut Value) -> &mut Value {
    &mut spec["jwtRules"][0]
}

#[test]
fn the_base_spec_is_valid() {
    authn_with(|_| {}).unwrap();
}

#[test]
fn service_and_rules_are_checked() {
    assert_refused(
        |s| s["service"] = json!("Backend"),
        "spec.service",
        "must name a service",
    );
    assert_refused(
        |s| s["jwtRules"] = json!([]),
        "spec.jwtRules",
        "at least one rule is required",
    );
    let e = Document::from_parts(
        Kind::RequestAuthentication,
        "shop",
        "jwt",
        r#"{"service": "backend"}"#,
    )
    .unwrap_err();
    assert!(e.starts_with("spec: missing field `jwtRules`"), "{e}");
    let many = |n: usize| {
        move |s: &mut Value| {
            s["jwtRules"] = (0..n)
                .map(|i| json!({"issuer": format!("i{i}"), "jwksUri": "http://keys/"}))
                .collect();
        }
    };
    authn_with(many(MAX_JWT_RULES)).unwrap();
    assert_refused(many(MAX_JWT_RULES + 1), "spec.jwtRules", "at most 16 rules");
}

#[test]
fn issuers_are_checked() {
    assert_refused(
        |s| rule(s)["issuer"] = json!(""),
        "spec.jwtRules[0].issuer",
        "must not be empty",
    );
    authn_with(|s| rule(s)["issuer"] = json!("i".repeat(512))).unwrap();
    assert_refused(
        |s| rule(s)["issuer"] = json!("i".repeat(513)),
        "spec.jwtRules[0].issuer",
        "at most 512 bytes",
    );
    assert_refused(
        |s| {
            let first = rule(s).clone();
            s["jwtRules"] =
                json!([first.clone(), {"issuer": "other", "jwksUri": "http://k/"}, first]);
        },
        "spec.jwtRules[2].issuer",
        "duplicate issuer",
    );
}

#[test]
fn exactly_one_source_of_keys() {
    assert_refused(
        |s| {
            rule(s).as_object_mut().unwrap().remove("jwksUri");
        },
        "spec.jwtRules[0]",
        "exactly one of jwks or jwksUri is required",
    );
    assert_refused(
        |s| rule(s)["jwks"] = json!(inline_jwks()),
        "spec.jwtRules[0]",
        "exactly one of jwks or jwksUri is required",
    );
}

#[test]
fn jwks_uris_are_absolute_http_urls_with_a_host() {
    for good in [
        "http://keys",
        "https://issuer.example/.well-known/jwks.json",
        "HTTPS://Issuer.Example:8443/jwks?x=1#f",
        "http://10.0.0.1:8080/keys",
        "http://[::1]:8080/keys",
        "http://[2001:db8::1]",
        "https://auth_server.internal/keys",
    ] {
        authn_with(|s| rule(s)["jwksUri"] = json!(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    for bad in [
        "",
        "keys.example/jwks",
        "/jwks",
        "ftp://keys.example/jwks",
        "file:///etc/jwks.json",
        "https://",
        "https:///jwks",
        "https://:443/jwks",
        "https://user:pass@keys.example/jwks",
        "https://keys.example:/jwks",
        "https://keys.example:0/jwks",
        "https://keys.example:65536/jwks",
        "https://keys.example:+80/jwks",
        "https://keys..example/jwks",
        "https://keys example/jwks",
        "https://keys.example/a b",
        "https://[::1/jwks",
        "https://[not-v6]/jwks",
        "https://ключи.example/jwks",
    ] {
        assert_refused(
            |s| rule(s)["jwksUri"] = json!(bad),
            "spec.jwtRules[0].jwksUri",
            "must be an absolute http:// or https:// URL with a host",
        );
    }
    let long = format!("https://keys.example/{}", "a".repeat(2048));
    assert_refused(
        |s| rule(s)["jwksUri"] = json!(long),
        "spec.jwtRules[0].jwksUri",
        "at most 2048 bytes",
    );
}

fn with_inline(jwks: Value) -> impl FnOnce(&mut Value) {
    move |s| {
        let r = rule(s).as_object_mut().unwrap();
        r.remove("jwksUri");
        r.insert("jwks".into(), jwks);
    }
}

#[test]
fn inline_jwks_must_hold_a_usable_key() {
    authn_with(with_inline(json!(inline_jwks()))).unwrap();
    for bad in [
        "",
        "not json",
        "[]",
        r#"{"keys": []}"#,
        r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#,
    ] {
        let (f, m) = refused(with_inline(json!(bad)));
        assert_eq!(f, "spec.jwtRules[0].jwks", "{bad}: {m}");
    }
    let huge = format!(r#"{{"keys": [], "pad": "{}"}}"#, " ".repeat(64 * 1024));
    assert_refused(
        with_inline(json!(huge)),
        "spec.jwtRules[0].jwks",
        "at most 65536 bytes",
    );
}

#[test]
fn audiences_headers_and_cookies_are_checked() {
    assert_refused(
        |s| rule(s)["audiences"] = json!(["shop", ""]),
        "spec.jwtRules[0].audiences[1]",
        "must not be empty",
    );
    authn_with(|s| rule(s)["fromHeaders"] = json!([{"name": "X-Token", "prefix": "Bearer "}]))
        .unwrap();
    for bad in ["", "x token", ":authority", "x-token:"] {
        assert_refused(
            |s| rule(s)["fromHeaders"] = json!([{"name": "ok"}, {"name": bad}]),
            "spec.jwtRules[0].fromHeaders[1].name",
            "not a valid header name",
        );
    }
    authn_with(|s| rule(s)["fromCookies"] = json!(["session", "__Host-token"])).unwrap();
    for bad in ["", "a=b", "a;b", "a b", "a,b", "\"a\""] {
        assert_refused(
            |s| rule(s)["fromCookies"] = json!([bad]),
            "spec.jwtRules[0].fromCookies[0]",
            "not a valid cookie name",
        );
    }
}

#[test]
fn claims_go_only_to_headers_the_mesh_leaves_alone() {
    let to = |header: &str, claim: &str| {
        let o = json!([{"header": "x-ok", "claim": "sub"}, {"header": header, "claim": claim}]);
        move |s: &mut Value| rule(s)["outputClaimToHeaders"] = o
    };
    authn_with(to("X-User-Groups", "groups")).unwrap();
    let at = "spec.jwtRules[0].outputClaimToHeaders[1]";
    assert_refused(
        to("x-user", ""),
        &format!("{at}.claim"),
        "must not be empty",
    );
    assert_refused(to(":path", "sub"), &format!("{at}.header"), "pseudo-header");
    assert_refused(
        to("x user", "sub"),
        &format!("{at}.header"),
        "not a valid header name",
    );
    for reserved in [
        "host",
        "Authorization",
        "CONTENT-LENGTH",
        "transfer-encoding",
        "connection",
        "te",
        "Upgrade",
        "cookie",
    ] {
        assert_refused(
            to(reserved, "sub"),
            &format!("{at}.header"),
            "must not be host, authorization",
        );
    }
    assert_refused(
        to("X-Remora-Principal", "sub"),
        &format!("{at}.header"),
        "must not start with x-remora-",
    );
    let many = |n: usize| {
        move |s: &mut Value| {
            rule(s)["outputClaimToHeaders"] = (0..n)
                .map(|i| json!({"header": format!("x-c{i}"), "claim": "sub"}))
                .collect();
        }
    };
    authn_with(many(MAX_CLAIM_HEADERS)).unwrap();
    assert_refused(
        many(MAX_CLAIM_HEADERS + 1),
        "spec.jwtRules[0].outputClaimToHeaders",
        "at most 32",
    );
}

// ------------------------------------------------------- when

fn authz_with(when: Value) -> Result<Document, String> {
    let spec = json!({
        "service": "backend",
        "rules": [{"from": ["*"]}, {"from": ["*"], "when": when}],
    });
    Document::from_parts(Kind::AuthorizationPolicy, "shop", "a", &spec.to_string())
}

#[track_caller]
fn assert_when_refused(when: Value, field: &str, message: &str) {
    let e = authz_with(when).expect_err("must be refused");
    let (f, m) = e.split_once(": ").unwrap();
    assert_eq!(f, field, "{m}");
    assert!(m.contains(message), "{e}");
}

#[test]
fn condition_keys_are_parsed() {
    let key = |k: &str| {
        Condition {
            key: k.into(),
            values: vec!["x".into()],
            not_values: vec![],
        }
        .parsed_key()
    };
    assert_eq!(key("request.auth.principal"), Ok(ConditionKey::Principal));
    assert_eq!(
        key("request.auth.claims[groups]"),
        Ok(ConditionKey::Claim("groups".into()))
    );
    assert_eq!(
        key("request.auth.claims[https://example.com/roles]"),
        Ok(ConditionKey::Claim("https://example.com/roles".into()))
    );
    for bad in [
        "",
        "request.auth.principals",
        "Request.Auth.Principal",
        "request.auth.claims",
        "request.auth.claims.groups",
        "request.auth.claims[groups",
        "request.auth.claims[groups]x",
        "source.principal",
    ] {
        assert!(
            key(bad)
                .unwrap_err()
                .contains("must be request.auth.principal"),
            "{bad}"
        );
    }
    assert!(key("request.auth.claims[]")
        .unwrap_err()
        .contains("must not be empty"));
    for bad in [
        "request.auth.claims[a[b]]",
        "request.auth.claims[a]]",
        "request.auth.claims[[a]",
    ] {
        assert!(key(bad).unwrap_err().contains("'[' or ']'"), "{bad}");
    }
}

#[test]
fn conditions_are_checked() {
    authz_with(json!([{"key": "request.auth.claims[groups]", "notValues": ["banned"]}])).unwrap();
    assert_when_refused(
        json!([{"key": "request.auth.principal", "values": ["a/b"]}, {"key": "request.auth.claims[]", "values": ["x"]}]),
        "spec.rules[1].when[1].key",
        "must not be empty",
    );
    assert_when_refused(
        json!([{"key": "source.ip", "values": ["x"]}]),
        "spec.rules[1].when[0].key",
        "must be request.auth.principal or request.auth.claims[NAME]",
    );
    assert_when_refused(
        json!([{"key": "request.auth.principal"}]),
        "spec.rules[1].when[0]",
        "at least one of values or notValues is required",
    );
    assert_when_refused(
        json!([{"key": "request.auth.principal", "values": [], "notValues": []}]),
        "spec.rules[1].when[0]",
        "at least one of values or notValues is required",
    );
    assert_when_refused(
        json!([{"key": "request.auth.principal", "values": ["a", ""]}]),
        "spec.rules[1].when[0].values[1]",
        "must not be empty",
    );
    assert_when_refused(
        json!([{"key": "request.auth.principal", "notValues": [""]}]),
        "spec.rules[1].when[0].notValues[0]",
        "must not be empty",
    );
    let n = |n: usize| (0..n).map(|i| format!("v{i}")).collect::<Vec<_>>();
    authz_with(json!([{"key": "request.auth.principal", "values": n(64), "notValues": n(64)}]))
        .unwrap();
    assert_when_refused(
        json!([{"key": "request.auth.principal", "values": n(65)}]),
        "spec.rules[1].when[0].values",
        "at most 64 values",
    );
    assert_when_refused(
        json!([{"key": "request.auth.principal", "values": ["a"], "notValues": n(65)}]),
        "spec.rules[1].when[0].notValues",
        "at most 64 values",
    );
}
