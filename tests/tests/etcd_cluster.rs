//! The etcd test harness ([`remora_tests::etcd`]) runs a real 3-member
//! cluster: it survives one member's loss (even the leader's), refuses writes
//! with every member down, and comes back with its data.

#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "test code: not a hot path, and its deadlines are real time"
)]

use std::time::Duration;

use remora_tests::etcd::{self, EtcdCluster};

/// Retries `put` for up to 10 s (a new leader is elected within about a
/// second of the old one's loss); panics with the last error and the logs.
async fn put_eventually(cluster: &EtcdCluster, key: &str, value: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match cluster.put(key, value).await {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                panic!("put {key} failed for 10 s: {e}\n{}", cluster.logs())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// `key`'s value; panics if the cluster cannot say.
async fn value(cluster: &EtcdCluster, key: &str) -> Option<String> {
    cluster
        .get(key)
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e}\n{}", cluster.logs()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_cluster_survives_one_loss_and_a_full_restart() {
    let test = "a_three_member_cluster_survives_one_loss_and_a_full_restart";
    if etcd::skip_unless(test, &["etcd", "etcdctl"]) {
        return;
    }
    let mut cluster = EtcdCluster::start(3).await;
    assert_eq!(cluster.endpoints().len(), 3);
    assert_eq!(cluster.endpoints_csv().split(',').count(), 3);
    assert!(cluster
        .endpoints()
        .iter()
        .all(|e| e.starts_with("http://127.0.0.1:")));
    assert!(cluster.is_healthy().await);

    cluster
        .put("/remora/test/a", "1")
        .await
        .expect("put on a healthy cluster");
    assert_eq!(
        value(&cluster, "/remora/test/a").await.as_deref(),
        Some("1")
    );
    assert_eq!(value(&cluster, "/remora/test/none").await, None);

    // The leader stops: the two others elect a new one and take writes.
    let leader = cluster.leader().await.expect("a leader");
    cluster.stop(leader).await;
    assert!(!cluster.running(leader));
    assert!(
        !cluster.is_healthy().await,
        "a stopped member is not healthy"
    );
    put_eventually(&cluster, "/remora/test/b", "2").await;
    let new_leader = cluster.leader().await.expect("a new leader");
    assert_ne!(new_leader, leader);
    assert_eq!(
        value(&cluster, "/remora/test/b").await.as_deref(),
        Some("2")
    );

    // It rejoins, and catches up on what it missed.
    cluster.start_member(leader).await;
    assert!(cluster.member_healthy(leader).await);
    cluster.wait_healthy(etcd::HEALTHY_TIMEOUT).await;

    // Every member down: no write.
    cluster.stop_all().await;
    assert!(!cluster.is_healthy().await);
    let refused = cluster.put("/remora/test/c", "3").await;
    assert!(
        refused.is_err(),
        "a write with every member down: {refused:?}"
    );

    // Every member back: writable again, the earlier data kept.
    cluster.start_all().await;
    assert!(cluster.is_healthy().await);
    put_eventually(&cluster, "/remora/test/d", "4").await;
    for (key, expected) in [
        ("/remora/test/a", "1"),
        ("/remora/test/b", "2"),
        ("/remora/test/d", "4"),
    ] {
        assert_eq!(
            value(&cluster, key).await.as_deref(),
            Some(expected),
            "{key}"
        );
    }
    assert_eq!(value(&cluster, "/remora/test/c").await, None);

    // A killed member (SIGKILL) comes back on its data dir too.
    cluster.kill(1);
    assert!(!cluster.running(1));
    put_eventually(&cluster, "/remora/test/e", "5").await;
    cluster.start_member(1).await;
    cluster.wait_healthy(etcd::HEALTHY_TIMEOUT).await;
    assert!(cluster.log(1).expect("member 1's log").contains("m1"));
}

/// The `args` of the Deployment's container in `install`'s output (a
/// block sequence of plain or single-quoted scalars).
fn container_args(manifest: &str) -> Vec<String> {
    let mut lines = manifest.lines().skip_while(|l| l.trim() != "args:");
    let header = lines.next().expect("an args: list in the Deployment");
    let indent = header.len() - header.trim_start().len();
    lines
        .take_while(|l| {
            l.len() - l.trim_start().len() == indent && l.trim_start().starts_with("- ")
        })
        .map(|l| {
            let item = l.trim_start().trim_start_matches("- ");
            item.strip_prefix('\'')
                .and_then(|i| i.strip_suffix('\''))
                .map_or_else(|| item.to_owned(), |i| i.replace("''", "'"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_installed_arguments_start_replicas_on_the_cluster() {
    let test = "the_installed_arguments_start_replicas_on_the_cluster";
    if etcd::skip(test) {
        return;
    }
    let mut cluster = EtcdCluster::start(3).await;
    let out = std::process::Command::new(remora_tests::bin("remora-control"))
        .args(["install", "--etcd-endpoints", &cluster.endpoints_csv()])
        .output()
        .expect("running remora-control install");
    assert!(
        out.status.success(),
        "install failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest = String::from_utf8(out.stdout).expect("UTF-8");
    let args = container_args(&manifest);
    assert_eq!(
        args.first().map(String::as_str),
        Some("serve"),
        "{manifest}"
    );

    // Two replicas, as two pods would run them: the pod's paths and
    // addresses replaced by a temp dir's and 127.0.0.1's.
    let dir = tempfile::tempdir().expect("a temp dir");
    let kek = dir.path().join("kek");
    let hex: String = (0..64)
        .map(|_| char::from_digit(fastrand::u32(0..16), 16).unwrap_or('0'))
        .collect();
    std::fs::write(&kek, hex).expect("writing the KEK");
    let mut replicas = Vec::new();
    for r in 0..2 {
        let (grpc, http) = (
            remora_tests::process::free_addr(),
            remora_tests::process::free_addr(),
        );
        let data = dir.path().join(format!("data-{r}"));
        let pod_args: Vec<String> = args
            .iter()
            .map(|a| match a.as_str() {
                "0.0.0.0:15012" | "$(POD_IP):15012" => grpc.to_string(),
                "0.0.0.0:15014" => http.to_string(),
                "/var/lib/remora" => data.display().to_string(),
                "/etc/remora/kek/kek" => kek.display().to_string(),
                other => other.replace("$(POD_IP)", "127.0.0.1"),
            })
            .collect();
        let proc = remora_tests::process::Proc::spawn(
            &format!("remora-control-{r}"),
            std::process::Command::new(remora_tests::bin("remora-control")).args(&pod_args),
        );
        if let Err(e) =
            remora_examples::probe::wait_for_200(http, "/ready", Duration::from_secs(30)).await
        {
            panic!(
                "replica {r} never became ready: {e}\nargs: {pod_args:?}\n{}\n{}",
                proc.logs(),
                cluster.logs()
            );
        }
        replicas.push((proc, http));
    }

    // An etcd member's loss leaves both replicas ready.
    let leader = cluster.leader().await.expect("a leader");
    cluster.kill(leader);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (proc, http) in &replicas {
        if let Err(e) =
            remora_examples::probe::wait_for_200(*http, "/ready", Duration::from_secs(10)).await
        {
            panic!(
                "a replica is not ready with 2 of 3 etcd members: {e}\n{}",
                proc.logs()
            );
        }
    }
}
