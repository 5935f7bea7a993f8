//! End users' tokens checked at the sidecar (RequestAuthentication) and
//! authorization on their claims (AuthorizationPolicy `when`), through real
//! proxies: the JWK set is served over HTTP by the test, fetched by the
//! control plane and pushed; the keys and tokens are made here.

#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "test code: not a hot path, and its deadlines are real time"
)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use remora_proto::jwt::testing::{self, TestKey};
use remora_tests::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ISS: &str = "https://idp.remora.test";
const API: &str = "http://api.shop:8080";

const SHOP: &str = r#"
apiVersion: remora.dev/v1
kind: Service
metadata: {name: frontend, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: remora.dev/v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: remora.dev/v1
kind: AuthorizationPolicy
metadata: {name: api, namespace: shop}
spec:
  service: api
  mtls: permissive
  rules:
    - from: ["*"]
      to: [{paths: ["/public/*"]}]
    - from: ["*"]
      when: [{key: request.auth.principal, values: ["*"]}]
      to: [{paths: ["/api/*"]}]
    - from: ["*"]
      when: [{key: "request.auth.claims[groups]", values: [admin]}]
      to: [{paths: ["/admin/*"]}]
"#;

fn authn(jwks_uri: &str) -> String {
    format!(
        r#"
apiVersion: remora.dev/v1
kind: RequestAuthentication
metadata: {{name: api-users, namespace: shop}}
spec:
  service: api
  jwtRules:
    - issuer: {ISS}
      audiences: [api]
      jwksUri: {jwks_uri}
      outputClaimToHeaders:
        - {{header: x-user, claim: sub}}
        - {{header: x-groups, claim: groups}}
"#
    )
}

/// Serves whatever JWK set `current` holds, with `max-age=1` so that the
/// control plane fetches it again every second or so.
async fn jwks_server(current: Arc<Mutex<String>>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let current = current.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let body = current.lock().unwrap().clone();
                let head = if body.is_empty() {
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_string()
                } else {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                         cache-control: max-age=1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    )
                };
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            });
        }
    });
    addr
}

fn claims(sub: &str, groups: &[&str]) -> serde_json::Value {
    let now = testing::now();
    json!({"iss": ISS, "sub": sub, "aud": ["api"], "exp": now + 600, "iat": now, "groups": groups})
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The sum of `remora_jwt_checks_total` samples whose labels hold `filter`.
async fn jwt_checks(proxy: &Proxy, filter: &str) -> f64 {
    let resp = raw_http::get(proxy.health(), "/metrics").await.unwrap();
    String::from_utf8_lossy(&resp.body)
        .lines()
        .filter(|l| l.starts_with("remora_jwt_checks_total{") && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_at_the_sidecar_and_only_verified_claims_reach_the_app() {
    let key = testing::rsa("k1");
    let current = Arc::new(Mutex::new(testing::jwks(&[&key])));
    let idp = jwks_server(current.clone()).await;

    let cp = ControlPlane::start().await;
    cp.apply_ok(SHOP).await;
    let api = Sidecar::start(&cp, "shop", "api", "v1", Mode::Http).await;
    let frontend = Sidecar::start(&cp, "shop", "frontend", "v1", Mode::Http).await;
    let client = http1_via_proxy(frontend.proxy.outbound());
    wait_served(&client, &format!("{API}/public/x"), &[], "api/v1").await;

    // An invalid policy is refused with the field at fault, and nothing
    // changes.
    let bad = authn("ftp://nowhere/jwks");
    let out = cp.apply_yaml(&bad).await;
    assert!(
        !out.status.success(),
        "a jwksUri that is not http(s) was accepted"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.jwtRules[0].jwksUri"), "{err}");

    cp.apply_ok(&authn(&format!("http://{idp}/jwks"))).await;
    let alice = testing::sign(&key, &claims("alice", &["admin", "dev"]));
    let url = format!("{API}/api/orders");
    let seen = eventually(
        Duration::from_secs(15),
        "alice's token to be accepted (the JWK set fetched and pushed)",
        || async {
            let r = client
                .try_get(
                    &url,
                    &[("authorization", &bearer(&alice)), ("x-user", "mallory")],
                )
                .await
                .ok()?;
            (r.status == StatusCode::OK).then(|| r.json())
        },
    )
    .await;
    // The app sees the verified claims, never the forged header, and not the
    // token (forwardOriginalToken defaults to false).
    let headers = &seen["headers"];
    assert_eq!(headers["x-user"], "alice", "{seen}");
    assert_eq!(headers["x-groups"], "admin,dev", "{seen}");
    assert!(headers.get("authorization").is_none(), "{seen}");

    // Without a token: public paths pass (a forged claim header is removed),
    // the rule that requires a principal denies.
    let r = client
        .get_with(&format!("{API}/public/x"), &[("x-user", "mallory")])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.json()["headers"].get("x-user").is_none(),
        "a forged x-user reached the app"
    );
    let r = client.get(&url).await;
    assert_eq!(
        (r.status, r.header("x-remora-error")),
        (StatusCode::FORBIDDEN, Some("denied"))
    );

    // Claim rules: alice is in `admin`, bob is not.
    let bob = testing::sign(&key, &claims("bob", &["dev"]));
    let admin = format!("{API}/admin/panel");
    let r = client
        .get_with(&admin, &[("authorization", &bearer(&alice))])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = client
        .get_with(&admin, &[("authorization", &bearer(&bob))])
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // Every bad token: 401, a Bearer challenge, nothing reaches the app.
    let now = testing::now();
    let with = |patch: serde_json::Value| {
        let mut c = claims("alice", &["admin"]);
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        testing::sign(&key, &c)
    };
    let tampered = {
        let good = testing::sign(&key, &claims("bob", &["dev"]));
        let parts: Vec<&str> = good.split('.').collect();
        let forged = testing::raw(&json!({"alg": "RS256"}), &claims("bob", &["admin"]), b"x");
        let payload = forged.split('.').nth(1).unwrap().to_string();
        format!("{}.{}.{}", parts[0], payload, parts[2])
    };
    let bad: Vec<(&str, String, &str)> = vec![
        ("expired", with(json!({"exp": now - 3600})), "expired"),
        (
            "wrong audience",
            with(json!({"aud": "billing"})),
            "audience",
        ),
        (
            "wrong issuer",
            with(json!({"iss": "https://evil.test"})),
            "issuer",
        ),
        (
            "unknown kid",
            testing::sign(&testing::rsa_other("k9"), &claims("alice", &["admin"])),
            "kid",
        ),
        ("tampered payload", tampered, "signature"),
        (
            "alg none",
            testing::raw(&json!({"alg": "none"}), &claims("alice", &["admin"]), b"x"),
            "algorithm",
        ),
        (
            "oversized",
            with(json!({"pad": "x".repeat(remora_proto::jwt::MAX_TOKEN_BYTES)})),
            "longer than",
        ),
    ];
    let served = api.app.requests_served().await;
    for (what, token, why) in &bad {
        let r = client
            .get_with(&url, &[("authorization", &bearer(token))])
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}: {:?}", r.body);
        assert_eq!(
            r.header("x-remora-error"),
            Some("unauthenticated"),
            "{what}"
        );
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(
            challenge.starts_with("Bearer realm=\"api.shop\"") && challenge.contains(why),
            "{what}: {challenge}"
        );
    }
    assert_eq!(
        api.app.requests_served().await,
        served,
        "a refused token reached the app"
    );
    assert!(jwt_checks(&api.proxy, "result=\"refused\"").await >= bad.len() as f64);

    // The same token again costs no signature check: one verification, then
    // cache hits.
    let carol = testing::sign(&key, &claims("carol", &["admin"]));
    let verified = jwt_checks(&api.proxy, "result=\"verified\"").await;
    let cached = jwt_checks(&api.proxy, "result=\"cached\"").await;
    for _ in 0..5 {
        let r = client
            .get_with(&url, &[("authorization", &bearer(&carol))])
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(
        jwt_checks(&api.proxy, "result=\"verified\"").await,
        verified + 1.0
    );
    assert!(jwt_checks(&api.proxy, "result=\"cached\"").await >= cached + 4.0);

    // The identity provider goes away: the last good set stays.
    let saved = std::mem::take(&mut *current.lock().unwrap());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fresh = testing::sign(&key, &claims("dave", &[]));
    let r = client
        .get_with(&url, &[("authorization", &bearer(&fresh))])
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the last good JWK set was dropped"
    );

    // Key rotation: the provider publishes a new key and drops the old one;
    // without any restart, tokens of the new key pass and the old ones stop.
    let next: TestKey = testing::ec("k2");
    drop(saved);
    *current.lock().unwrap() = testing::jwks(&[&next]);
    let rotated = testing::sign(&next, &claims("erin", &[]));
    eventually(
        Duration::from_secs(15),
        "a token of the rotated key to pass",
        || async {
            let r = client
                .try_get(&url, &[("authorization", &bearer(&rotated))])
                .await
                .ok()?;
            (r.status == StatusCode::OK).then_some(())
        },
    )
    .await;
    let old = testing::sign(&key, &claims("alice", &["admin"]));
    let r = client
        .get_with(&url, &[("authorization", &bearer(&old))])
        .await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "the retired key still verifies"
    );
}
