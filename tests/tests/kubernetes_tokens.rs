//! Issue 17, first half: workloads prove who they are with Kubernetes
//! ServiceAccount tokens instead of hand-made bootstrap tokens, with a real
//! `remora-control serve --kubernetes-issuer URL --kubernetes-jwks FILE` and
//! real proxies whose `--token-file` holds a projected ServiceAccount token
//! (keys and tokens made here with `remora_proto::jwt::testing`).
//!
//! - A token for the proxy's own namespace and ServiceAccount gets it a
//!   certificate for `spiffe://cluster.local/ns/NS/sa/SA`; the cluster then
//!   rotates its signing key (a new JWK set holding only the new key, and a
//!   new token from it in the file, as the kubelet would write it), and the
//!   proxy's next renewal succeeds without the control plane restarting. Slow
//!   (~50 s): one-minute certificates renew at ~70%.
//! - A token for another namespace and ServiceAccount is refused
//!   (PERMISSION_DENIED, `identity_mismatch`), as are an expired token and one
//!   for another audience (`jwt_expired`, `jwt_audience`): those proxies never
//!   become ready, and each refusal is counted with its reason. Bootstrap
//!   tokens keep working beside ServiceAccount tokens.

#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "test code: not a hot path, and its deadlines are real time"
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use remora_examples::probe;
use remora_proto::jwt::testing::{ec, jwks, now, rsa, sign, TestKey};
use remora_tests::pki::{self, MeshClient};
use remora_tests::process::{free_addr, Proc};
use remora_tests::*;
use serde_json::{json, Value};

const ISSUER: &str = "https://kubernetes.default.svc";
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The claims of a projected ServiceAccount token for NS/SA, as the kubelet
/// gets them from the API server (audience `remora`, one hour).
fn claims(namespace: &str, account: &str, now: u64) -> Value {
    json!({
        "aud": ["remora"],
        "exp": now + 3600,
        "iat": now,
        "nbf": now,
        "iss": ISSUER,
        "jti": format!("{:016x}", fastrand::u64(..)),
        "kubernetes.io": {
            "namespace": namespace,
            "node": {"name": "node-1", "uid": "0b3c9a4e-6a5c-4f7e-9a51-000000000001"},
            "pod": {"name": format!("{account}-6d4cf56db6-abcde"), "uid": "0b3c9a4e-6a5c-4f7e-9a51-000000000002"},
            "serviceaccount": {"name": account, "uid": "0b3c9a4e-6a5c-4f7e-9a51-000000000003"}
        },
        "sub": format!("system:serviceaccount:{namespace}:{account}")
    })
}

/// Replaces `path` whole (as the kubelet's atomic writer and `mv` do).
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).expect("writing a file");
    std::fs::rename(&tmp, path).expect("renaming it into place");
}

fn full_stderr(proxy: &mut Proxy) -> String {
    std::fs::read_to_string(proxy.process().log_dir().join("stderr")).unwrap_or_default()
}

/// `remora-control serve` with Kubernetes ServiceAccount tokens accepted.
struct KubeControlPlane {
    grpc: SocketAddr,
    http: SocketAddr,
    data: tempfile::TempDir,
    files: tempfile::TempDir,
    proc: Proc,
}

impl KubeControlPlane {
    async fn start(keys: &[&TestKey], extra: &[&str]) -> KubeControlPlane {
        let data = tempfile::tempdir().expect("a data dir");
        let files = tempfile::tempdir().expect("a dir for keys and tokens");
        let jwks_file = files.path().join("jwks.json");
        write_atomically(&jwks_file, &jwks(keys));
        let (grpc, http) = (free_addr(), free_addr());
        let mut serve = Command::new(bin("remora-control"));
        serve
            .arg("serve")
            .args(["--listen", &grpc.to_string()])
            .args(["--http-listen", &http.to_string()])
            .arg("--data-dir")
            .arg(data.path())
            .args(["--kubernetes-issuer", ISSUER])
            .arg("--kubernetes-jwks")
            .arg(&jwks_file)
            .args(extra);
        let proc = Proc::spawn("remora-control", &mut serve);
        if let Err(e) = probe::wait_for_200(http, "/ready", READY_TIMEOUT).await {
            panic!("the control plane never became ready: {e}\n{}", proc.logs());
        }
        KubeControlPlane {
            grpc,
            http,
            data,
            files,
            proc,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    fn jwks_file(&self) -> PathBuf {
        self.files.path().join("jwks.json")
    }

    fn bundle(&self) -> String {
        std::fs::read_to_string(self.data.path().join("trust-bundle.pem"))
            .expect("the trust bundle")
    }

    /// A token file named `name` holding `token`.
    fn token_file(&self, name: &str, token: &str) -> PathBuf {
        let path = self.files.path().join(name);
        write_atomically(&path, &format!("{token}\n"));
        path
    }

    /// A proxy for SERVICE in NAMESPACE reading `token_file`.
    fn proxy(&self, service: &str, namespace: &str, app: &App, token_file: &Path) -> Proxy {
        let mut opts = ProxyOpts::new(service, namespace, app.port()).token_file(token_file);
        opts.ca_file = Some(self.data.path().join("trust-bundle.pem"));
        Proxy::spawn(&self.url(), opts)
    }

    /// A sample of `/metrics` (0 when absent).
    async fn metric(&self, sample: &str) -> f64 {
        let response = raw_http::get(self.http, "/metrics")
            .await
            .expect("the control plane's /metrics");
        let text = String::from_utf8_lossy(&response.body).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    async fn refused(&self, reason: &str) -> f64 {
        self.metric(&format!(
            "remora_control_certificates_refused_total{{reason=\"{reason}\"}}"
        ))
        .await
    }
}

/// The SPIFFE IDs and serial of the certificate the proxy's inbound
/// listener presents.
async fn served_leaf(bundle: &str, proxy: &Proxy) -> pki::LeafInfo {
    let client = MeshClient::anonymous(bundle, ALPN_HTTP1);
    let _tls = client
        .connect(proxy.inbound())
        .await
        .expect("a TLS handshake with the proxy's inbound listener");
    pki::leaf_info(
        &client
            .server_leaf()
            .expect("the proxy presented a certificate"),
    )
}

/// Waits until the proxy's log holds `text`.
async fn wait_for_log(proxy: &mut Proxy, text: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let logs = full_stderr(proxy);
        if logs.contains(text) {
            return logs;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy never logged {text:?}:\n{}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_token_gets_its_certificate_and_a_rotated_cluster_key_renews_it() {
    let old_key = rsa("cluster-key-1");
    let mut cp = KubeControlPlane::start(&[&old_key], &["--cert-lifetime", "1m"]).await;
    let app = App::start("backend", "v1", Mode::Http).await;
    let token_file = cp.token_file("token", &sign(&old_key, &claims("shop", "backend", now())));
    let mut proxy = cp.proxy("backend", "shop", &app, &token_file);
    proxy.wait_ready().await;

    let first = served_leaf(&cp.bundle(), &proxy).await;
    assert_eq!(first.spiffe_ids, [pki::spiffe_id("shop", "backend")]);
    let first_expiry = proxy
        .metric("remora_cert_expiry_timestamp_seconds")
        .await
        .expect("a certificate expiry once ready");
    assert_eq!(
        cp.metric("remora_control_certificates_issued_total").await,
        1.0
    );

    // The cluster rotates its signing key: the JWK set now holds only the new
    // (ES256) key, and the kubelet writes a token signed by it. The old token
    // would be refused now (its key is gone), so a renewal that succeeds used
    // both the re-read key file and the re-read token file.
    let new_key = ec("cluster-key-2");
    write_atomically(&cp.jwks_file(), &jwks(&[&new_key]));
    write_atomically(
        &token_file,
        &sign(&new_key, &claims("shop", "backend", now())),
    );

    // The proxy renews at ~70% of its minute.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let expiry = proxy.metric("remora_cert_expiry_timestamp_seconds").await;
        if expiry.is_some_and(|e| e > first_expiry) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy did not renew its certificate (expiry still {expiry:?}):\n{}\n{}",
            proxy.logs(),
            cp.proc.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let renewed = served_leaf(&cp.bundle(), &proxy).await;
    assert_eq!(renewed.spiffe_ids, [pki::spiffe_id("shop", "backend")]);
    assert_ne!(renewed.serial_hex, first.serial_hex, "a new certificate");
    assert_eq!(proxy.ready_status().await, Some(200));
    assert!(
        cp.metric("remora_control_certificates_renewed_total").await >= 1.0,
        "the renewal was not counted as one"
    );
    assert_eq!(
        cp.refused("jwt_unknown_key").await,
        0.0,
        "a token was checked against stale keys"
    );
    let logs = full_stderr(&mut proxy);
    assert!(!logs.contains("renewal failed"), "{}", proxy.logs());
    assert!(cp.proc.running(), "the control plane restarted");
    let cp_logs = std::fs::read_to_string(cp.proc.log_dir().join("stderr")).unwrap_or_default();
    assert!(
        cp_logs.contains("Kubernetes service-account keys reloaded")
            && cp_logs.contains("cluster-key-2"),
        "{}",
        cp.proc.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_for_another_identity_expired_or_for_another_audience_are_refused_and_counted() {
    let key = rsa("cluster-key-1");
    let cp = KubeControlPlane::start(&[&key], &[]).await;
    let app = App::start("backend", "v1", Mode::Http).await;

    // The proxy is shop/backend; its token is for payments/ledger.
    let stolen = cp.token_file("stolen", &sign(&key, &claims("payments", "ledger", now())));
    let mut impostor = cp.proxy("backend", "shop", &app, &stolen);
    let logs = wait_for_log(&mut impostor, "certificate refused").await;
    assert!(logs.contains("PermissionDenied"), "{}", impostor.logs());
    assert!(
        logs.contains(&format!(
            "the token proves {}",
            pki::spiffe_id("payments", "ledger")
        )),
        "{}",
        impostor.logs()
    );

    // Expired an hour ago; for the Kubernetes API server instead of remora.
    let mut expired_claims = claims("shop", "backend", now() - 7200);
    expired_claims["exp"] = json!(now() - 3600);
    let expired = cp.token_file("expired", &sign(&key, &expired_claims));
    let mut expired_proxy = cp.proxy("backend", "shop", &app, &expired);
    let mut api_claims = claims("shop", "backend", now());
    api_claims["aud"] = json!(["https://kubernetes.default.svc.cluster.local"]);
    let for_api = cp.token_file("for-api", &sign(&key, &api_claims));
    let mut api_proxy = cp.proxy("backend", "shop", &app, &for_api);
    let logs = wait_for_log(&mut expired_proxy, "certificate refused").await;
    assert!(
        logs.contains("the token has expired") && logs.contains("Unauthenticated"),
        "{}",
        expired_proxy.logs()
    );
    let logs = wait_for_log(&mut api_proxy, "certificate refused").await;
    assert!(
        logs.contains("not meant for this audience"),
        "{}",
        api_proxy.logs()
    );

    // Each refusal is counted with its reason.
    for reason in ["identity_mismatch", "jwt_expired", "jwt_audience"] {
        assert!(
            cp.refused(reason).await >= 1.0,
            "no {reason} refusal counted"
        );
    }
    assert_eq!(
        cp.metric("remora_control_certificates_issued_total").await,
        0.0
    );
    // They keep retrying, and are never ready.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for proxy in [&impostor, &expired_proxy, &api_proxy] {
        assert_eq!(proxy.ready_status().await, Some(503), "{}", proxy.logs());
    }

    // Beside them, the proxy's own token works, and so do bootstrap tokens.
    let own = cp.token_file("own", &sign(&key, &claims("shop", "backend", now())));
    let mut backend = cp.proxy("backend", "shop", &app, &own);
    backend.wait_ready().await;
    assert_eq!(
        served_leaf(&cp.bundle(), &backend).await.spiffe_ids,
        [pki::spiffe_id("shop", "backend")]
    );
    let out = run_control(
        &cp.url(),
        cp.data.path(),
        &[
            "token",
            "create",
            "--service",
            "frontend",
            "--namespace",
            "shop",
        ],
        None,
    )
    .await;
    let bootstrap = cp.token_file("bootstrap", expect_success(&out, "token create").trim());
    let front = App::start("frontend", "v1", Mode::Http).await;
    let mut frontend = cp.proxy("frontend", "shop", &front, &bootstrap);
    frontend.wait_ready().await;
    assert_eq!(
        served_leaf(&cp.bundle(), &frontend).await.spiffe_ids,
        [pki::spiffe_id("shop", "frontend")]
    );
    assert_eq!(
        cp.metric("remora_control_certificates_issued_total").await,
        2.0
    );
}
