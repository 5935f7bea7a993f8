//! Failures that must not take the mesh down, with the policies users get by
//! default (no DestinationPolicy, no retry on the route).

#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "test code: not a hot path, and its deadlines are real time"
)]

use std::time::{Duration, Instant};

use remora_tests::*;

const SHOP: &str = r#"
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

const BACKEND: &str = "http://backend.shop:8080/";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_app_costs_almost_nothing_with_default_policies() {
    let cp = ControlPlane::start().await;
    cp.apply_ok(SHOP).await;
    let mut doomed = Sidecar::start(&cp, "shop", "backend", "v1", Mode::Http).await;
    let survivor = Sidecar::start(&cp, "shop", "backend", "v2", Mode::Http).await;
    let frontend = Sidecar::start(&cp, "shop", "frontend", "v1", Mode::Http).await;
    let client = http1_via_proxy(frontend.proxy.outbound());
    // Both instances take traffic.
    let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
    eventually(READY_TIMEOUT, "both backends to answer", || async {
        let r = client.try_get(BACKEND, &[]).await.ok()?;
        let mut seen = seen.lock().unwrap();
        seen.insert(r.served_by()?.to_owned());
        (seen.len() == 2).then_some(())
    })
    .await;

    // Steady load from four clients for 8 s; one app is killed after 2 s
    // while its sidecar stays up.
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..4 {
        let client = client.clone();
        workers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            while started.elapsed() < Duration::from_secs(8) {
                // One client uploads: a small body goes to another endpoint
                // too when the first one's app is gone.
                let r = if worker == 0 {
                    let req = http::Request::post(BACKEND)
                        .body(full(vec![b'p'; 1024]))
                        .unwrap();
                    client.send(req).await
                } else {
                    client.try_get(BACKEND, &[]).await
                };
                let ok = r.as_ref().is_ok_and(|r| r.status == 200);
                outcomes.push((started.elapsed(), ok, format!("{:?}", r.map(|r| r.status))));
            }
            outcomes
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = started.elapsed();
    doomed.app.kill9();
    let mut outcomes = Vec::new();
    for w in workers {
        outcomes.extend(w.await.unwrap());
    }

    let failed: Vec<_> = outcomes.iter().filter(|(_, ok, _)| !ok).collect();
    let late: Vec<_> = failed
        .iter()
        .filter(|(at, _, _)| *at > killed_at + Duration::from_secs(1))
        .collect();
    eprintln!(
        "{} requests, {} failed ({} after the first second): {:?}",
        outcomes.len(),
        failed.len(),
        late.len(),
        failed.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        outcomes.len() > 400,
        "too little load to judge: {}",
        outcomes.len()
    );
    assert!(
        (failed.len() as f64) < outcomes.len() as f64 * 0.01,
        "{} of {} requests failed",
        failed.len(),
        outcomes.len()
    );
    assert!(late.is_empty(), "failures after the first second: {late:?}");

    // The dead app's endpoint is withdrawn while its sidecar lives on...
    let doomed_addr = doomed.proxy.inbound();
    eventually(
        Duration::from_secs(10),
        "the endpoint withdrawn",
        || async {
            let status = cp.status().await;
            (!status.proxy(doomed_addr)?.registered()).then_some(())
        },
    )
    .await;
    assert!(survivor.app.requests_served().await > 0);
}
