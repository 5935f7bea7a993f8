//! Issue 15: what `serve --store etcd` puts in etcd and how it reaches it.
//!
//! - Secrets never lie in etcd in the clear: the CA's private key and the
//!   admin token are sealed with the key-encryption key; a replica with
//!   another key refuses to start rather than serve with a CA it cannot open.
//! - etcd over mutual TLS (`--etcd-ca-file`, `--etcd-cert-file`,
//!   `--etcd-key-file`): a replica with the client certificate works; one
//!   without it does not start, and says why.

#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "test code: not a hot path, and its deadlines are real time"
)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};
use remora_examples::probe;
use remora_tests::etcd::{self, find_tool, EtcdCluster};
use remora_tests::process::{free_addr, free_port, Proc};
use remora_tests::*;

const KEK: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const OTHER_KEK: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";
const SERVICE: &str = "apiVersion: remora.dev/v1\nkind: Service\nmetadata: {name: backend, namespace: shop}\nspec:\n  ports: [{port: 8080, protocol: http}]\n";

fn serve(dir: &Path, name: &str, args: &[&str]) -> (Command, SocketAddr, SocketAddr) {
    let (grpc, http) = (free_addr(), free_addr());
    let data = dir.join(name);
    std::fs::create_dir_all(&data).expect("a data dir");
    let mut cmd = Command::new(bin("remora-control"));
    scrub_env(&mut cmd)
        .arg("serve")
        .args(["--listen", &grpc.to_string()])
        .args(["--http-listen", &http.to_string()])
        .args(["--advertise-address", &grpc.to_string()])
        .arg("--data-dir")
        .arg(&data)
        .args(["--store", "etcd"])
        .args(args);
    (cmd, grpc, http)
}

async fn start(dir: &Path, name: &str, args: &[&str]) -> (Proc, String) {
    let (mut cmd, grpc, http) = serve(dir, name, args);
    let proc = Proc::spawn(&format!("remora-control-{name}"), &mut cmd);
    if let Err(e) = probe::wait_for_200(http, "/ready", READY_TIMEOUT).await {
        panic!("replica {name} never became ready: {e}\n{}", proc.logs());
    }
    (proc, format!("http://{grpc}"))
}

/// Runs `serve` expecting it to exit with an error; its stderr.
fn refused(dir: &Path, name: &str, args: &[&str]) -> String {
    let (mut cmd, _, _) = serve(dir, name, args);
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("running remora-control serve");
    assert!(!out.status.success(), "serve started ({name})");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_sealed_in_etcd_and_another_key_opens_nothing() {
    if etcd::skip_unless(
        "secrets_are_sealed_in_etcd_and_another_key_opens_nothing",
        &["etcd", "etcdctl"],
    ) {
        return;
    }
    let cluster = EtcdCluster::start(1).await;
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(dir.path().join("kek"), KEK).expect("kek");
    std::fs::write(dir.path().join("other"), OTHER_KEK).expect("kek");
    let endpoints = cluster.endpoints_csv();
    let kek = dir.path().join("kek").display().to_string();
    let (_proc, url) = start(
        dir.path(),
        "a",
        &["--etcd-endpoints", &endpoints, "--kek-file", &kek],
    )
    .await;
    let data = dir.path().join("a");
    let out = run_control(&url, &data, &["apply", "-f", "-"], Some(SERVICE)).await;
    expect_success(&out, "apply");
    let token = std::fs::read_to_string(data.join("admin.token")).expect("the admin token");
    let dump = cluster.etcdctl(&["get", "--prefix", "/remora/"]).await;
    let dump = String::from_utf8_lossy(&dump.stdout).to_string();
    assert!(
        dump.contains("/remora/identity/ca/"),
        "the CA is in etcd:\n{dump}"
    );
    assert!(dump.contains("/remora/policy/version"), "{dump}");
    assert!(
        !dump.contains("PRIVATE KEY"),
        "a private key in the clear in etcd"
    );
    assert!(
        !dump.contains(token.trim()),
        "the admin token in the clear in etcd"
    );
    // Another key-encryption key: the replica does not start.
    let other = dir.path().join("other").display().to_string();
    let stderr = refused(
        dir.path(),
        "b",
        &["--etcd-endpoints", &endpoints, "--kek-file", &other],
    );
    assert!(
        stderr.contains("does not open with this key-encryption key"),
        "{stderr}"
    );
    // No key file: a usage error naming the flag.
    let stderr = refused(dir.path(), "c", &["--etcd-endpoints", &endpoints]);
    assert!(stderr.contains("--kek-file"), "{stderr}");
}

struct Tls {
    ca: String,
    server: (String, String),
    client: (String, String),
}

fn tls() -> Tls {
    let ca_key = KeyPair::generate().expect("a key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "etcd test CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).expect("the CA");
    let issuer = rcgen::Issuer::new(params, ca_key);
    let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().expect("a key");
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        p.subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &issuer).expect("a leaf");
        (cert.pem(), key.serialize_pem())
    };
    Tls {
        ca: ca.pem(),
        server: leaf("etcd", ExtendedKeyUsagePurpose::ServerAuth),
        client: leaf("remora-control", ExtendedKeyUsagePurpose::ClientAuth),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_mutual_tls() {
    if etcd::skip("etcd_over_mutual_tls") {
        return;
    }
    let dir = tempfile::tempdir().expect("a temp dir");
    let p = |name: &str| dir.path().join(name).display().to_string();
    let tls = tls();
    for (name, text) in [
        ("ca.pem", &tls.ca),
        ("server.pem", &tls.server.0),
        ("server.key", &tls.server.1),
        ("client.pem", &tls.client.0),
        ("client.key", &tls.client.1),
        ("kek", &KEK.to_string()),
    ] {
        std::fs::write(dir.path().join(name), text).expect("writing a file");
    }
    let (client, peer) = (free_port(), free_port());
    let url = format!("https://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut etcd_cmd = Command::new(find_tool("etcd").expect("etcd"));
    etcd_cmd
        .args(["--name", "tls", "--data-dir", &p("etcd.data")])
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("tls={peer_url}")])
        .args([
            "--cert-file",
            &p("server.pem"),
            "--key-file",
            &p("server.key"),
        ])
        .args(["--trusted-ca-file", &p("ca.pem"), "--client-cert-auth"]);
    let _etcd = Proc::spawn("etcd-tls", &mut etcd_cmd);
    let args = [
        "--etcd-endpoints",
        &url,
        "--etcd-ca-file",
        &p("ca.pem"),
        "--etcd-cert-file",
        &p("client.pem"),
        "--etcd-key-file",
        &p("client.key"),
        "--kek-file",
        &p("kek"),
    ];
    // etcd takes a moment to come up: the replica's first attempts may fail.
    let mut ready = None;
    for _ in 0..20 {
        let (mut cmd, grpc, http) = serve(dir.path(), "a", &args);
        let proc = Proc::spawn("remora-control-tls", &mut cmd);
        if probe::wait_for_200(http, "/ready", Duration::from_secs(5))
            .await
            .is_ok()
        {
            ready = Some((proc, format!("http://{grpc}")));
            break;
        }
        drop(proc);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (_replica, cp) = ready.expect("a replica on etcd over mutual TLS");
    let out = run_control(
        &cp,
        &dir.path().join("a"),
        &["apply", "-f", "-"],
        Some(SERVICE),
    )
    .await;
    expect_success(&out, "apply over etcd with TLS");
    // Without the client certificate etcd refuses it, and the replica says so.
    let stderr = refused(
        dir.path(),
        "b",
        &[
            "--etcd-endpoints",
            &url,
            "--etcd-ca-file",
            &p("ca.pem"),
            "--kek-file",
            &p("kek"),
        ],
    );
    assert!(stderr.contains("etcd"), "{stderr}");
}
