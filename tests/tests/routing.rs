//! HTTPRoutes pick the subset: a weighted 90/10 split holds its ratio, a header
//! match always wins, path (prefix and exact) and method matches select their
//! rule, and gRPC calls follow the split too.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use http::{Method, Request, StatusCode};
use remora_proto::examples::EchoRequest;
use remora_tests::*;

const SERVICES: &str = r#"
apiVersion: remora.dev/v1
kind: Service
metadata: {name: frontend, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: remora.dev/v1
kind: Service
metadata: {name: backend, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
"#;

const CANARY_ROUTE: &str = r#"
apiVersion: remora.dev/v1
kind: HTTPRoute
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  rules:
    - matches: [{headers: [{name: x-canary, value: "1"}]}]
      backends: [{service: backend, subset: {version: v2}}]
    - backends:
        - {service: backend, subset: {version: v1}, weight: 90}
        - {service: backend, subset: {version: v2}, weight: 10}
      timeout: 2s
"#;

const MATCH_ROUTE: &str = r#"
apiVersion: remora.dev/v1
kind: HTTPRoute
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  rules:
    - matches: [{path: {prefix: /api}}]
      backends: [{service: backend, subset: {version: v2}}]
    - matches: [{path: {exact: /checkout}}]
      backends: [{service: backend, subset: {version: v2}}]
    - matches: [{method: DELETE}]
      backends: [{service: backend, subset: {version: v2}}]
    - backends: [{service: backend, subset: {version: v1}}]
"#;

const URL: &str = "http://backend.shop:8080/api/orders";

struct Mesh {
    cp: ControlPlane,
    _v1: Sidecar,
    _v2: Sidecar,
    frontend: Sidecar,
}

/// backend v1 and v2 behind their proxies, a frontend, and `route` applied.
async fn mesh(route: &str) -> Mesh {
    let cp = ControlPlane::start().await;
    cp.apply_ok(&format!("{SERVICES}---{route}")).await;
    let v1 = Sidecar::start(&cp, "shop", "backend", "v1", Mode::Http).await;
    let v2 = Sidecar::start(&cp, "shop", "backend", "v2", Mode::Http).await;
    let frontend = Sidecar::start(&cp, "shop", "frontend", "v1", Mode::Http).await;
    Mesh {
        cp,
        _v1: v1,
        _v2: v2,
        frontend,
    }
}

impl Mesh {
    fn client(&self) -> HttpClient {
        http1_via_proxy(self.frontend.proxy.outbound())
    }
}

/// Sends `n` requests (16 at a time); how many each `x-served-by` answered.
async fn tally(client: &HttpClient, n: usize, headers: &[(&str, &str)]) -> BTreeMap<String, usize> {
    let answers: Vec<Result<Reply, String>> = futures_util::stream::iter(0..n)
        .map(|_| client.try_get(URL, headers))
        .buffer_unordered(16)
        .collect()
        .await;
    let mut served = BTreeMap::new();
    for answer in answers {
        let reply = answer.unwrap_or_else(|e| panic!("a request failed: {e}"));
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "x-remora-error {:?}",
            reply.header("x-remora-error")
        );
        *served
            .entry(reply.served_by().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_holds_its_ratio_and_the_canary_header_wins() {
    let mesh = mesh(CANARY_ROUTE).await;
    let client = mesh.client();
    // Both subsets known to the client's proxy before counting.
    wait_served(&client, URL, &[("x-canary", "1")], "backend/v2").await;
    wait_served(&client, URL, &[], "backend/v1").await;

    let served = tally(&client, 2000, &[]).await;
    let v1 = served.get("backend/v1").copied().unwrap_or(0);
    let v2 = served.get("backend/v2").copied().unwrap_or(0);
    assert_eq!(v1 + v2, 2000, "answers from elsewhere: {served:?}");
    let share = 100.0 * v2 as f64 / 2000.0;
    assert!(
        (7.0..=13.0).contains(&share),
        "v2 got {share:.1}% of the split, expected 10% ± 3: {served:?}"
    );

    let canary = tally(&client, 50, &[("x-canary", "1")]).await;
    assert_eq!(
        canary.get("backend/v2"),
        Some(&50),
        "x-canary: 1 must always reach v2: {canary:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_follow_the_split() {
    let mesh = mesh(CANARY_ROUTE).await;
    let http = mesh.client();
    wait_served(&http, URL, &[("x-canary", "1")], "backend/v2").await;
    wait_served(&http, URL, &[], "backend/v1").await;

    let client = grpc_via_proxy(mesh.frontend.proxy.outbound(), "http://backend.shop:8080").await;
    let calls = 200;
    let served: Vec<String> = futures_util::stream::iter(0..calls)
        .map(|i| {
            let mut client = client.clone();
            async move {
                let request = EchoRequest {
                    message: format!("call {i}"),
                    count: 0,
                };
                let reply = client
                    .unary(request)
                    .await
                    .unwrap_or_else(|s| panic!("gRPC call {i} failed: {s:?}"))
                    .into_inner();
                assert_eq!(reply.message, format!("call {i}"));
                reply.served_by
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let v2 = served.iter().filter(|s| *s == "backend/v2").count();
    let v1 = served.iter().filter(|s| *s == "backend/v1").count();
    assert_eq!(v1 + v2, calls, "answers from elsewhere: {served:?}");
    // 200 draws of p = 0.1: the standard deviation is 2.1 points.
    let share = 100.0 * v2 as f64 / calls as f64;
    assert!(
        (3.0..=20.0).contains(&share),
        "v2 got {share:.1}% of the gRPC calls, expected about 10%"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_and_method_matches_pick_their_rule() {
    let mesh = mesh(MATCH_ROUTE).await;
    let client = mesh.client();
    let base = "http://backend.shop:8080";
    wait_served(&client, &format!("{base}/api"), &[], "backend/v2").await;
    wait_served(&client, &format!("{base}/other"), &[], "backend/v1").await;

    let cases: &[(Method, &str, &str)] = &[
        // prefix /api
        (Method::GET, "/api", "backend/v2"),
        (Method::GET, "/api/orders?id=7", "backend/v2"),
        (Method::POST, "/api/orders", "backend/v2"),
        // A prefix matches whole path segments, as in Gateway API.
        (Method::GET, "/apiary", "backend/v1"),
        // exact /checkout
        (Method::GET, "/checkout", "backend/v2"),
        (Method::GET, "/checkout/step2", "backend/v1"),
        // method DELETE
        (Method::DELETE, "/other", "backend/v2"),
        // the default rule
        (Method::GET, "/other", "backend/v1"),
        (Method::POST, "/other", "backend/v1"),
        (Method::GET, "/", "backend/v1"),
    ];
    for (method, path, expected) in cases {
        for _ in 0..10 {
            let req = Request::builder()
                .method(method.clone())
                .uri(format!("{base}{path}"))
                .body(empty())
                .unwrap();
            let reply = client.send(req).await.unwrap();
            assert_eq!(reply.status, StatusCode::OK, "{method} {path}");
            assert_eq!(
                reply.served_by(),
                Some(*expected),
                "{method} {path} went to the wrong subset"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_changes_apply_without_restarting_anything() {
    let mesh = mesh(MATCH_ROUTE).await;
    let client = mesh.client();
    let url = "http://backend.shop:8080/other";
    wait_served(&client, url, &[], "backend/v1").await;
    // Send everything to v2 now.
    mesh.cp
        .apply_ok(
            r#"
apiVersion: remora.dev/v1
kind: HTTPRoute
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  rules:
    - backends: [{service: backend, subset: {version: v2}}]
"#,
        )
        .await;
    eventually(
        Duration::from_secs(5),
        "the new route to take effect",
        || {
            let client = client.clone();
            async move {
                let r = client.try_get(url, &[]).await.ok()?;
                (r.served_by() == Some("backend/v2")).then_some(())
            }
        },
    )
    .await;
    let served = tally(&client, 50, &[]).await;
    assert_eq!(served.get("backend/v2"), Some(&50), "{served:?}");
}
