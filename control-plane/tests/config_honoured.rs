//! Issue 14, item 5: configuration that does what it says. Snapshot
//! versions are unique per push across control-plane restarts too (the
//! generation continues after the last one reserved, never from 1 again);
//! `serve --cert-lifetime` is the lifetime of a certificate whose request
//! names none (the proxy side is `tests/tests/control_plane_settings.rs`).

mod common;

use common::*;
use remora_control::server::start;
use remora_proto::v1::ApplyRequest;
use std::collections::HashSet;
use std::time::Duration;

fn generation(version: &str) -> u64 {
    version.rsplit_once('.').unwrap().1.parse().unwrap()
}

#[tokio::test]
async fn snapshot_versions_are_unique_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut seen = HashSet::new();
    let mut last_generation = 0;
    for restart in 0..3 {
        let running = start_in(dir.path()).await;
        let first = running.registry.current_snapshot().version.clone();
        assert!(
            generation(&first) > last_generation,
            "after restart {restart}: {first} follows generation {last_generation}"
        );
        let mut admin = admin(&running, &running.token).await;
        for (i, doc) in [SERVICE, ROUTE].iter().enumerate() {
            admin
                .apply(ApplyRequest {
                    files: vec![file(&format!("{restart}-{i}.yaml"), doc)],
                    dry_run: false,
                })
                .await
                .unwrap();
        }
        let versions: HashSet<String> =
            [first, running.registry.current_snapshot().version.clone()].into();
        for v in versions {
            assert!(
                seen.insert(v.clone()),
                "version {v} was pushed before a restart"
            );
            last_generation = last_generation.max(generation(&v));
        }
        running.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn the_control_planes_cert_lifetime_is_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.cert_lifetime = Duration::from_secs(60);
    let running = start(config).await.unwrap();
    let (token, _) = running.tokens.create("shop", "a", None).unwrap();
    let asked_nothing = certify_with(&running, &token, &spiffe("shop", "a"), 0)
        .await
        .unwrap();
    let now = remora_control::tokens::now_unix();
    let left = asked_nothing.response.not_after_unix - now;
    assert!((55..=60).contains(&left), "{left} s left");
    // A proxy that asks gets what it asked for, up to the maximum (24 h).
    let asked = certify_with(&running, &token, &spiffe("shop", "a"), 7200)
        .await
        .unwrap();
    let left = asked.response.not_after_unix - now;
    assert!((7195..=7200).contains(&left), "{left} s left");
    running.shutdown().await.unwrap();
}
