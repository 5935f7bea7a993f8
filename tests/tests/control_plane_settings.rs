//! Issue 14, item 5: `remora-control serve --cert-lifetime` is the lifetime
//! a proxy gets when it does not ask for one (it used to get 24 h whatever
//! the control plane said, because every proxy asked for its own default);
//! a proxy's own `--cert-lifetime` still wins. The snapshot-version half of
//! the item is `control-plane/tests/config_honoured.rs`.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use remora_examples::probe;
use remora_tests::process::{free_addr, Proc};
use remora_tests::*;

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_does_not_ask_gets_the_control_planes_cert_lifetime() {
    let data = tempfile::tempdir().unwrap();
    let (grpc, http) = (free_addr(), free_addr());
    let mut serve = Command::new(bin("remora-control"));
    scrub_env(&mut serve)
        .arg("serve")
        .args(["--listen", &grpc.to_string()])
        .args(["--http-listen", &http.to_string()])
        .arg("--data-dir")
        .arg(data.path())
        .args(["--cert-lifetime", "1m"]);
    let cp = Proc::spawn("remora-control", &mut serve);
    if let Err(e) = probe::wait_for_200(http, "/ready", READY_TIMEOUT).await {
        panic!("the control plane never became ready: {e}\n{}", cp.logs());
    }
    let url = format!("http://{grpc}");

    let expiry_of = |extra: &'static [&'static str]| {
        let url = url.clone();
        let data = data.path().to_path_buf();
        async move {
            let out = run_control(
                &url,
                &data,
                &[
                    "token",
                    "create",
                    "--service",
                    "backend",
                    "--namespace",
                    "shop",
                ],
                None,
            )
            .await;
            let token = expect_success(&out, "token create");
            let dir = tempfile::tempdir().unwrap();
            let token_file = dir.path().join("token");
            std::fs::write(&token_file, token.trim()).unwrap();
            let app = App::start("backend", "v1", Mode::Http).await;
            let mut opts = ProxyOpts::new("backend", "shop", app.port())
                .token_file(&token_file)
                .args(extra);
            opts.ca_file = Some(data.join("trust-bundle.pem"));
            let mut proxy = Proxy::spawn(&url, opts);
            proxy.wait_ready().await;
            let expiry = proxy
                .metric("remora_cert_expiry_timestamp_seconds")
                .await
                .expect("a certificate expiry once ready") as i64;
            (expiry - now_unix(), dir, app, proxy)
        }
    };

    let (left, _dir, _app, _proxy) = expiry_of(&[]).await;
    assert!(
        (50..=60).contains(&left),
        "a proxy without --cert-lifetime got a certificate with {left} s left \
         (the control plane's --cert-lifetime is 1m)"
    );
    let (left, _dir, _app, _proxy) = expiry_of(&["--cert-lifetime", "2h"]).await;
    assert!(
        (7190..=7200).contains(&left),
        "a proxy asking for 2h got {left} s"
    );
}
