//! Issue 15: a control plane of three replicas sharing a real three-member
//! etcd cluster (Debian's etcd, on loopback), with real proxies and apps.
//!
//! - What is made through one replica takes effect through the others: a
//!   bootstrap token, a certificate, a revocation, a policy.
//! - 100 applies to each of two replicas at once make 200 versions, one
//!   history without a gap, and every replica serves the same `get`.
//! - A replica killed with SIGKILL while traffic flows: no request fails,
//!   its proxies are on the others within 5 s, `status` shows every proxy.
//! - etcd losing one member changes nothing; losing all of it: traffic and
//!   certificate renewals go on, `apply` fails saying the store is
//!   unavailable, and everything recovers when etcd returns, no restart.
//! - `ca rotate` through one replica moves the proxies of every replica to
//!   the new root, the old one is retired, and no request fails.

#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "test code: not a hot path, and its deadlines are real time"
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use remora_examples::probe;
use remora_tests::etcd::{self, EtcdCluster};
use remora_tests::process::{free_addr, Proc};
use remora_tests::*;
use tokio::time::Instant;

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

const URL: &str = "http://backend.shop:8080/api/orders";
const KEK: &str = "5f1e0c3a9b7d2e4f6a8c0b1d3e5f7a9c2b4d6e8f0a1c3e5b7d9f1a3c5e7b9d0f";

/// One `remora-control serve --store etcd` replica.
struct Replica {
    name: String,
    grpc: SocketAddr,
    http: SocketAddr,
    data: tempfile::TempDir,
    proc: Proc,
}

impl Replica {
    async fn start(name: &str, endpoints: &str, kek: &Path, extra: &[&str]) -> Replica {
        let data = tempfile::tempdir().expect("a data dir");
        let (grpc, http) = (free_addr(), free_addr());
        let mut serve = Command::new(bin("remora-control"));
        scrub_env(&mut serve)
            .arg("serve")
            .args(["--listen", &grpc.to_string()])
            .args(["--http-listen", &http.to_string()])
            .args(["--store", "etcd", "--etcd-endpoints", endpoints])
            .arg("--kek-file")
            .arg(kek)
            .args(["--advertise-address", &grpc.to_string()])
            .arg("--data-dir")
            .arg(data.path())
            .args(extra);
        let proc = Proc::spawn(&format!("remora-control-{name}"), &mut serve);
        if let Err(e) = probe::wait_for_200(http, "/ready", READY_TIMEOUT).await {
            panic!("replica {name} never became ready: {e}\n{}", proc.logs());
        }
        Replica {
            name: name.to_owned(),
            grpc,
            http,
            data,
            proc,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    async fn cli(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        run_control(&self.url(), self.data.path(), args, stdin).await
    }

    async fn cli_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.cli(args, stdin).await;
        expect_success(&out, &format!("{} (replica {})", args.join(" "), self.name))
    }

    async fn apply(&self, yaml: &str) -> u64 {
        let out = self.cli_ok(&["apply", "-f", "-"], Some(yaml)).await;
        parse_version(&out).unwrap_or_else(|| panic!("no version in {out:?}"))
    }

    async fn status(&self) -> Status {
        Status::parse(&self.cli_ok(&["status"], None).await)
    }

    fn bundle(&self) -> PathBuf {
        self.data.path().join("trust-bundle.pem")
    }
}

/// etcd, the key-encryption key, and three replicas.
struct Ha {
    etcd: EtcdCluster,
    dir: tempfile::TempDir,
    replicas: Vec<Replica>,
}

impl Ha {
    async fn start(extra: &[&str]) -> Ha {
        let etcd = EtcdCluster::start(3).await;
        let dir = tempfile::tempdir().expect("a temp dir");
        std::fs::write(dir.path().join("kek"), format!("{KEK}\n")).expect("the kek file");
        let mut ha = Ha {
            etcd,
            dir,
            replicas: Vec::new(),
        };
        let endpoints = ha.etcd.endpoints_csv();
        let kek = ha.dir.path().join("kek");
        for name in ["r0", "r1", "r2"] {
            ha.replicas
                .push(Replica::start(name, &endpoints, &kek, extra).await);
        }
        ha.replicas[0].apply(SHOP).await;
        ha
    }

    fn urls(&self, which: &[usize]) -> String {
        which
            .iter()
            .map(|i| self.replicas[*i].url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A bootstrap token for shop/SERVICE, created through replica `via`.
    async fn token(&self, via: usize, service: &str) -> PathBuf {
        let token = self.replicas[via]
            .cli_ok(
                &[
                    "token",
                    "create",
                    "--service",
                    service,
                    "--namespace",
                    "shop",
                ],
                None,
            )
            .await;
        let path = self
            .dir
            .path()
            .join(format!("token-{service}-{:08x}", fastrand::u32(..)));
        std::fs::write(&path, token.trim()).expect("writing the token");
        path
    }

    /// A proxy for shop/SERVICE in front of `app`, on the replicas `on`, its
    /// token made through replica `token_via`.
    async fn proxy(&self, service: &str, app: &App, on: &[usize], token_via: usize) -> Proxy {
        let mut opts = ProxyOpts::new(service, "shop", app.port())
            .token_file(&self.token(token_via, service).await);
        opts.ca_file = Some(self.replicas[0].bundle());
        Proxy::spawn(&self.urls(on), opts)
    }

    /// The replica (index) `status` through `via` says `proxy` is on.
    async fn replica_of(&self, via: usize, proxy: &Proxy) -> Option<usize> {
        let status = self.replicas[via].status().await;
        let row = status.proxy(proxy.inbound())?;
        let id = row.cell("REPLICA").to_owned();
        let line = status
            .text
            .lines()
            .find(|l| l.starts_with(&id) && !id.is_empty())?
            .to_owned();
        self.replicas
            .iter()
            .position(|r| line.contains(&r.grpc.to_string()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_replica_makes_takes_effect_through_the_others() {
    if etcd::skip("what_one_replica_makes_takes_effect_through_the_others") {
        return;
    }
    let ha = Ha::start(&[]).await;
    // A token made through r0 gets a certificate from r1.
    let app = App::start("backend", "v1", Mode::Http).await;
    let mut backend = ha.proxy("backend", &app, &[1], 0).await;
    backend.wait_ready().await;
    // Every replica lists it, on r1, and names three replicas and a leader.
    for via in 0..3 {
        let on = eventually(Duration::from_secs(5), "the proxy in status", || async {
            ha.replica_of(via, &backend).await
        })
        .await;
        assert_eq!(on, 1, "status through r{via} puts the proxy on r1");
        let text = ha.replicas[via].status().await.text;
        assert!(text.contains("store etcd: 3 replicas, leader "), "{text}");
        assert_eq!(text.matches("   yes   ").count(), 1, "one leader:\n{text}");
    }
    // A policy applied through r2 reaches the proxy on r1.
    let version = ha
        .replicas[2]
        .apply(
            "apiVersion: remora.dev/v1\nkind: Service\nmetadata: {name: extra, namespace: shop}\nspec:\n  ports: [{port: 9090, protocol: http}]\n",
        )
        .await;
    eventually(
        Duration::from_secs(5),
        "the proxy acks the new version",
        || async {
            let status = ha.replicas[1].status().await;
            let row = status.proxy(backend.inbound())?;
            row.acked()
                .starts_with(&format!("{version}."))
                .then_some(())
        },
    )
    .await;
    // Every replica serves the same documents.
    let docs = ha.replicas[0]
        .cli_ok(&["get", "-A", "-o", "yaml"], None)
        .await;
    for r in &ha.replicas[1..] {
        assert_eq!(r.cli_ok(&["get", "-A", "-o", "yaml"], None).await, docs);
    }
    // A token revoked through r0 is refused by r2.
    let token = ha.token(1, "frontend").await;
    let list = ha.replicas[2].cli_ok(&["token", "list"], None).await;
    let id = list
        .lines()
        .filter(|l| l.contains("shop/sa/frontend") || l.contains("frontend"))
        .filter_map(|l| l.split_whitespace().next())
        .next_back()
        .unwrap_or_else(|| panic!("the token in the list:\n{list}"))
        .to_owned();
    ha.replicas[0].cli_ok(&["token", "revoke", &id], None).await;
    let front_app = App::start("frontend", "v1", Mode::Http).await;
    let mut opts = ProxyOpts::new("frontend", "shop", front_app.port()).token_file(&token);
    opts.ca_file = Some(ha.replicas[0].bundle());
    let refused = Proxy::spawn(&ha.urls(&[2]), opts);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_ne!(
        refused.ready_status().await,
        Some(200),
        "a revoked token bootstrapped a proxy"
    );
    let logs = refused.logs();
    assert!(
        logs.contains("revoked"),
        "the refusal names the revocation:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_applies_through_two_replicas_make_one_linear_history() {
    if etcd::skip("concurrent_applies_through_two_replicas_make_one_linear_history") {
        return;
    }
    let ha = Ha::start(&[]).await;
    let base = ha.replicas[0].status().await.policy_version.unwrap_or(0);
    let writer = |r: usize| {
        let url = ha.replicas[r].url();
        let dir = ha.replicas[r].data.path().to_path_buf();
        tokio::spawn(async move {
            let mut versions = Vec::new();
            for i in 0..100 {
                let yaml = format!(
                    "apiVersion: remora.dev/v1\nkind: Service\nmetadata: {{name: w{r}-{i}, namespace: load}}\nspec:\n  ports: [{{port: 80, protocol: http}}]\n"
                );
                let out = run_control(&url, &dir, &["apply", "-f", "-"], Some(&yaml)).await;
                let text = expect_success(&out, "apply");
                versions.push(parse_version(&text).expect("a version"));
            }
            versions
        })
    };
    let (a, b) = (writer(0), writer(1));
    let (a, b) = (a.await.expect("writer 0"), b.await.expect("writer 1"));
    let mut all: Vec<u64> = a.iter().chain(&b).copied().collect();
    all.sort_unstable();
    let expected: Vec<u64> = (base + 1..=base + 200).collect();
    assert_eq!(all, expected, "200 distinct versions, no gap");
    // One history, the same through every replica.
    let history = ha.replicas[2].cli_ok(&["history"], None).await;
    let versions: Vec<u64> = history
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(versions, (1..=base + 200).collect::<Vec<_>>(), "{history}");
    let docs = ha.replicas[0]
        .cli_ok(&["get", "-A", "-o", "yaml"], None)
        .await;
    assert_eq!(docs.matches("namespace: load").count(), 200);
    for r in &ha.replicas[1..] {
        assert_eq!(r.cli_ok(&["history"], None).await, history);
        assert_eq!(r.cli_ok(&["get", "-A", "-o", "yaml"], None).await, docs);
    }
}

/// A backend and a frontend on every replica (each may pick any), with
/// requests flowing through the frontend.
async fn mesh(ha: &Ha) -> (Vec<App>, Vec<Proxy>, HttpClient) {
    let apps = vec![
        App::start("backend", "v1", Mode::Http).await,
        App::start("frontend", "v1", Mode::Http).await,
    ];
    let mut proxies = vec![
        ha.proxy("backend", &apps[0], &[0, 1, 2], 0).await,
        ha.proxy("frontend", &apps[1], &[0, 1, 2], 0).await,
    ];
    for p in &mut proxies {
        p.wait_ready().await;
    }
    let client = http1_via_proxy(proxies[1].outbound());
    wait_served(&client, URL, &[], apps[0].served_by()).await;
    (apps, proxies, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_traffic_fails_no_request() {
    if etcd::skip("a_replica_killed_under_traffic_fails_no_request") {
        return;
    }
    let mut ha = Ha::start(&[]).await;
    let (_apps, proxies, client) = mesh(&ha).await;
    // Kill the replica the frontend is on.
    let victim = eventually(Duration::from_secs(5), "the frontend's replica", || async {
        ha.replica_of(0, &proxies[1]).await
    })
    .await;
    let survivor = (victim + 1) % 3;
    let requests = RequestLoop::start(client.clone(), URL, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(500)).await;
    ha.replicas[victim].proc.kill9();
    let killed = Instant::now();
    for proxy in &proxies {
        eventually(
            Duration::from_secs(5),
            "every proxy on a live replica",
            || async {
                let on = ha.replica_of(survivor, proxy).await?;
                (on != victim).then_some(())
            },
        )
        .await;
    }
    let moved = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let outcomes = requests.stop().await;
    let failed = failures(&outcomes);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed when replica {} was killed: {failed:?}",
        failed.len(),
        outcomes.len(),
        ha.replicas[victim].name
    );
    // Requests went on before the kill and after it (not a count: load can
    // slow the loop).
    let after = outcomes.iter().filter(|o| o.sent > killed).count();
    assert!(
        after >= 10 && outcomes.len() - after >= 10,
        "{} requests before the kill, {after} after",
        outcomes.len() - after
    );
    let status = ha.replicas[survivor].status().await;
    assert_eq!(
        status.proxies.len(),
        2,
        "status shows every proxy:\n{}",
        status.text
    );
    eprintln!("proxies back on live replicas {moved:?} after the kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_keeps_traffic_and_renewals_and_refuses_applies_until_it_returns() {
    if etcd::skip("etcd_down_keeps_traffic_and_renewals_and_refuses_applies_until_it_returns") {
        return;
    }
    // Certificates of a minute: renewed at about 70 %, during the outage.
    let mut ha = Ha::start(&["--cert-lifetime", "1m", "--max-cert-lifetime", "1m"]).await;
    let (_apps, proxies, client) = mesh(&ha).await;
    let service = "apiVersion: remora.dev/v1\nkind: Service\nmetadata: {name: NAME, namespace: shop}\nspec:\n  ports: [{port: 9090, protocol: http}]\n";
    // One member down: nothing changes.
    ha.etcd.stop(0).await;
    ha.replicas[1]
        .apply(&service.replace("NAME", "one-down"))
        .await;
    ha.etcd.start_member(0).await;

    let expiry = || async {
        proxies[1]
            .metric("remora_cert_expiry_timestamp_seconds")
            .await
            .unwrap_or(0.0)
    };
    let before = expiry().await;
    let requests = RequestLoop::start(client.clone(), URL, Duration::from_millis(20));
    ha.etcd.stop_all().await;
    // Writes fail, clearly.
    let out = ha.replicas[0]
        .cli(
            &["apply", "-f", "-"],
            Some(&service.replace("NAME", "all-down")),
        )
        .await;
    assert_eq!(out.status.code(), Some(1), "apply without etcd exits 1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("store is unavailable"),
        "apply says why: {stderr}"
    );
    // Renewals go on: the frontend's certificate is renewed during the outage.
    eventually(
        Duration::from_secs(70),
        "a renewal while etcd is down",
        || async { (expiry().await > before).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let outcomes = requests.stop().await;
    let failed = failures(&outcomes);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed while etcd was down: {failed:?}",
        failed.len(),
        outcomes.len()
    );
    // etcd returns: applies succeed again, through every replica, no restart.
    ha.etcd.start_all().await;
    for (i, r) in ha.replicas.iter().enumerate() {
        let yaml = service.replace("NAME", &format!("back-{i}"));
        eventually(
            Duration::from_secs(20),
            "an apply after etcd returned",
            || async {
                let out = r.cli(&["apply", "-f", "-"], Some(&yaml)).await;
                out.status.success().then_some(())
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_through_one_replica_moves_the_proxies_of_every_replica() {
    if etcd::skip("a_rotation_through_one_replica_moves_the_proxies_of_every_replica") {
        return;
    }
    let ha = Ha::start(&[]).await;
    // Pinned: the backend on r1, the frontend on r2; the rotation through r0.
    let apps = [
        App::start("backend", "v1", Mode::Http).await,
        App::start("frontend", "v1", Mode::Http).await,
    ];
    let mut proxies = [
        ha.proxy("backend", &apps[0], &[1], 0).await,
        ha.proxy("frontend", &apps[1], &[2], 0).await,
    ];
    for p in &mut proxies {
        p.wait_ready().await;
    }
    let client = http1_via_proxy(proxies[1].outbound());
    wait_served(&client, URL, &[], apps[0].served_by()).await;
    let requests = RequestLoop::start(client.clone(), URL, Duration::from_millis(10));
    let out = ha.replicas[0].cli_ok(&["ca", "rotate"], None).await;
    eprintln!("{out}");
    // Every replica's proxies move, and the old root is retired.
    eventually(
        Duration::from_secs(60),
        "the rotation to complete",
        || async {
            let text = ha.replicas[0].cli_ok(&["status"], None).await;
            (!text.contains("root rotation in progress")).then_some(())
        },
    )
    .await;
    // Both proxies on the new root, seen through one replica (which asks
    // the other: for half a second after the retirement a replica may still
    // present a server certificate from the retired root, and is asked again).
    eventually(
        Duration::from_secs(10),
        "both proxies on one signer in status",
        || async {
            let status = ha.replicas[1].status().await;
            let signers: Vec<String> = status
                .proxies
                .iter()
                .map(|p| p.cell("SIGNER").to_owned())
                .collect();
            (signers.len() == 2 && signers[0] == signers[1]).then_some(())
        },
    )
    .await;
    wait_served(&client, URL, &[], apps[0].served_by()).await;
    let outcomes = requests.stop().await;
    let failed = failures(&outcomes);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the rotation: {failed:?}",
        failed.len(),
        outcomes.len()
    );
    for r in &ha.replicas {
        let text = r.cli_ok(&["status"], None).await;
        assert!(
            !text.contains("rotation in progress"),
            "replica {}:\n{text}",
            r.name
        );
    }
    let _ = &ha.replicas[0].http;
}
