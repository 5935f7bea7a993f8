//! Issue 15, the proxy's side: a proxy given several control-plane replicas
//! (`--control-plane A,B`) fails over between them.
//!
//! Two real `remora-control serve` replicas share an operator CA
//! (`--ca-cert`/`--ca-key`, so either one's certificates and server name are
//! trusted by every proxy) and accept the same Kubernetes ServiceAccount
//! tokens (one cluster key), each with its own embedded store: its `status`
//! lists only the proxies connected to it, which is how the tests see which
//! replica a proxy is on.
//!
//! - A frontend proxy with `--control-plane A,B` becomes ready on one of
//!   them; that replica is killed with SIGKILL while requests go through the
//!   frontend every 5 ms to a backend; within 2 s the frontend is on the
//!   other replica (its status lists it), and not one request failed. Each
//!   replica has a backend instance of its own (pinned to it), so the
//!   frontend's traffic moves from the first to the second as it follows.
//! - Proxies whose first addresses are dead at start (nothing listening)
//!   connect to the live one, promptly.

#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "test code: not a hot path, and its deadlines are real time"
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use remora_examples::probe;
use remora_proto::jwt::testing::{ec, jwks, now, sign, TestKey};
use remora_tests::process::{free_addr, Proc};
use remora_tests::*;
use serde_json::json;
use tokio::time::Instant;

const ISSUER: &str = "https://kubernetes.default.svc";

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

/// What the replicas share: the operator CA and the cluster's token key.
struct Cluster {
    dir: tempfile::TempDir,
    key: TestKey,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("remora-failover-")
            .tempdir()
            .expect("a temp dir");
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a P-256 key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "Remora operator root CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = params.self_signed(&ca_key).expect("a self-signed root");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("writing the CA");
        std::fs::write(dir.path().join("ca.key"), ca_key.serialize_pem()).expect("the CA key");
        let key = ec("cluster-key");
        std::fs::write(dir.path().join("jwks.json"), jwks(&[&key])).expect("writing the JWKS");
        Cluster { dir, key }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A file holding a projected ServiceAccount token for NAMESPACE/ACCOUNT.
    fn token_file(&self, namespace: &str, account: &str) -> PathBuf {
        let now = now();
        let claims = json!({
            "aud": ["remora"],
            "exp": now + 3600,
            "iat": now,
            "nbf": now,
            "iss": ISSUER,
            "jti": format!("{:016x}", fastrand::u64(..)),
            "kubernetes.io": {
                "namespace": namespace,
                "pod": {"name": format!("{account}-{:08x}", fastrand::u32(..)), "uid": "0b3c9a4e-6a5c-4f7e-9a51-000000000002"},
                "serviceaccount": {"name": account, "uid": "0b3c9a4e-6a5c-4f7e-9a51-000000000003"}
            },
            "sub": format!("system:serviceaccount:{namespace}:{account}")
        });
        let path = self.file(&format!("token-{account}-{:08x}", fastrand::u32(..)));
        std::fs::write(&path, format!("{}\n", sign(&self.key, &claims))).expect("a token file");
        path
    }

    /// A proxy for shop/SERVICE in front of `app`, with `--control-plane LIST`.
    fn proxy(&self, service: &str, app: &App, control_planes: &[&str]) -> Proxy {
        let mut opts = ProxyOpts::new(service, "shop", app.port())
            .label("version", "v1")
            .token_file(&self.token_file("shop", service));
        opts.ca_file = Some(self.file("ca.pem"));
        Proxy::spawn(&control_planes.join(","), opts)
    }
}

/// One `remora-control serve` replica of the cluster.
struct Replica {
    name: &'static str,
    grpc: SocketAddr,
    data: tempfile::TempDir,
    proc: Proc,
}

impl Replica {
    async fn start(cluster: &Cluster, name: &'static str) -> Replica {
        let data = tempfile::tempdir().expect("a data dir");
        let (grpc, http) = (free_addr(), free_addr());
        let mut serve = Command::new(bin("remora-control"));
        scrub_env(&mut serve)
            .arg("serve")
            .args(["--listen", &grpc.to_string()])
            .args(["--http-listen", &http.to_string()])
            .arg("--data-dir")
            .arg(data.path())
            .arg("--ca-cert")
            .arg(cluster.file("ca.pem"))
            .arg("--ca-key")
            .arg(cluster.file("ca.key"))
            .args(["--kubernetes-issuer", ISSUER])
            .arg("--kubernetes-jwks")
            .arg(cluster.file("jwks.json"));
        let proc = Proc::spawn(&format!("remora-control-{name}"), &mut serve);
        if let Err(e) = probe::wait_for_200(http, "/ready", READY_TIMEOUT).await {
            panic!("replica {name} never became ready: {e}\n{}", proc.logs());
        }
        let replica = Replica {
            name,
            grpc,
            data,
            proc,
        };
        let out = replica.cli(&["apply", "-f", "-"], Some(SHOP)).await;
        expect_success(&out, "apply");
        replica
    }

    fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    fn data_dir(&self) -> &Path {
        self.data.path()
    }

    async fn cli(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        run_control(&self.url(), self.data_dir(), args, stdin).await
    }

    /// Whether this replica's `status` lists the proxy advertising `addr`.
    async fn lists(&self, addr: SocketAddr) -> bool {
        let out = self.cli(&["status"], None).await;
        Status::parse(&expect_success(&out, "status"))
            .proxy(addr)
            .is_some()
    }
}

/// Everything the proxy wrote to stderr (its logs).
fn full_stderr(proxy: &mut Proxy) -> String {
    std::fs::read_to_string(proxy.process().log_dir().join("stderr")).unwrap_or_default()
}

/// Which of `replicas` lists `proxy` (exactly one must, within 5 s).
async fn replica_of(replicas: &[&Replica], proxy: &Proxy) -> usize {
    eventually(
        Duration::from_secs(5),
        "exactly one replica listing the proxy",
        || async {
            let mut on = Vec::new();
            for (i, r) in replicas.iter().enumerate() {
                if r.lists(proxy.inbound()).await {
                    on.push(i);
                }
            }
            match on.as_slice() {
                [one] => Some(*one),
                _ => None,
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_fails_over_to_the_other_replica_within_2s_without_a_failed_request() {
    let cluster = Cluster::new();
    let mut replicas = [
        Replica::start(&cluster, "a").await,
        Replica::start(&cluster, "b").await,
    ];
    let urls = [replicas[0].url(), replicas[1].url()];
    // A backend instance on each replica, the frontend on both.
    let apps = [
        App::start("backend-a", "v1", Mode::Http).await,
        App::start("backend-b", "v1", Mode::Http).await,
    ];
    let mut backends = [
        cluster.proxy("backend", &apps[0], &[&urls[0]]),
        cluster.proxy("backend", &apps[1], &[&urls[1]]),
    ];
    let frontend_app = App::start("frontend", "v1", Mode::Http).await;
    let mut frontend = cluster.proxy("frontend", &frontend_app, &[&urls[0], &urls[1]]);
    for proxy in backends.iter_mut().chain([&mut frontend]) {
        proxy.wait_ready().await;
    }

    let [a, b] = &replicas;
    let x = replica_of(&[a, b], &frontend).await;
    let y = 1 - x;
    let before = full_stderr(&mut frontend);
    assert!(
        before.contains(&format!(
            "connected to the control plane replica={}",
            replicas[x].grpc
        )),
        "the proxy logs the replica it connected to:\n{before}"
    );
    let client = http1_via_proxy(frontend.outbound());
    wait_served(&client, URL, &[], apps[x].served_by()).await;

    let requests = RequestLoop::start(client.clone(), URL, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(500)).await;
    replicas[x].proc.kill9();
    let killed = Instant::now();
    let on_y = loop {
        if replicas[y].lists(frontend.inbound()).await {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "the proxy is not on replica {} 5 s after {} was killed\n{}",
            replicas[y].name,
            replicas[x].name,
            frontend.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        on_y < Duration::from_secs(2),
        "the proxy took {on_y:?} to be on replica {} after {} was killed\n{}",
        replicas[y].name,
        replicas[x].name,
        frontend.logs()
    );
    eprintln!(
        "on replica {} {on_y:?} after {} was killed",
        replicas[y].name, replicas[x].name
    );
    // Its snapshots now come from the other replica, whose backend it uses.
    let switched = Instant::now();
    loop {
        let served = client.try_get(URL, &[]).await;
        if served
            .as_ref()
            .is_ok_and(|r| r.served_by() == Some(apps[y].served_by()))
        {
            break;
        }
        assert!(
            switched.elapsed() < Duration::from_secs(5),
            "requests never went to the other replica's backend (last: {:?})",
            served.map(|r| r.served_by().map(str::to_owned))
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outcomes = requests.stop().await;
    let failed = failures(&outcomes);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the failover: {failed:?}\n{}",
        failed.len(),
        outcomes.len(),
        frontend.logs()
    );
    // Requests went on throughout (one after another, 5 ms apart): before
    // the kill and after the failover.
    let failed_over = killed + on_y;
    assert!(
        outcomes.iter().any(|o| o.sent < killed),
        "no request before the kill"
    );
    assert!(
        outcomes.iter().any(|o| o.sent >= failed_over),
        "no request after the failover"
    );
    eprintln!("{} requests, none failed", outcomes.len());
    let logs = full_stderr(&mut frontend);
    assert!(
        logs.contains(&format!(
            "connected to the control plane replica={}",
            replicas[y].grpc
        )),
        "the proxy logs the replica it failed over to:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_whose_first_addresses_are_dead_connect_to_the_live_one() {
    let cluster = Cluster::new();
    let live = Replica::start(&cluster, "live").await;
    let (dead1, dead2) = (format!("http://{}", free_addr()), free_addr().to_string());
    let url = live.url();
    let app = App::start("backend", "v1", Mode::Http).await;
    // Each starts at a random address of the three: most of them start on a
    // dead one, and move on at once.
    let mut proxies: Vec<Proxy> = (0..3)
        .map(|_| cluster.proxy("backend", &app, &[&dead1, &dead2, &url]))
        .collect();
    let started = Instant::now();
    for proxy in &mut proxies {
        proxy.wait_ready().await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "three proxies took {:?} to be ready past dead addresses",
        started.elapsed()
    );
    for proxy in &proxies {
        eventually(
            Duration::from_secs(5),
            "the live replica to list the proxy",
            || async { live.lists(proxy.inbound()).await.then_some(()) },
        )
        .await;
    }
}
