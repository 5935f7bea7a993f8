//! Pods as network namespaces: `remora-proxy init` installs the interception
//! rules, the app in one pod calls another pod's address with a plain client
//! (curl, redis-cli, bash's /dev/tcp) that knows nothing of the mesh, and the call crosses the
//! wire as mTLS between the two proxies.
//!
//! Root only: each test creates its own namespaces (see `remora_tests::netns`)
//! and skips, saying why, when it is not root or a tool is missing. Needs the
//! Debian packages iproute2, iptables, util-linux (setpriv), curl, tcpdump,
//! redis-server and redis-tools, and the workspace's binaries:
//!
//! ```text
//! cargo build --workspace --bins && sudo cargo test -p remora-tests --test pods
//! ```

#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "test code: not a hot path, and its deadlines are real time"
)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use remora_tests::bin;
use remora_tests::netns::{
    self, must, wait_until, AppSpec, Cluster, MeshedPod, NsControlPlane, Pod,
};
use remora_tests::process::Proc;

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
---
apiVersion: remora.dev/v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: remora.dev/v1
kind: Service
metadata: {name: cache, namespace: shop}
spec:
  ports: [{port: 6379, protocol: tcp}]
---
apiVersion: remora.dev/v1
kind: Service
metadata: {name: greeter, namespace: shop}
spec:
  ports: [{port: 7000, protocol: tcp}]
"#;

const STRICT_BACKEND: &str = r#"
apiVersion: remora.dev/v1
kind: AuthorizationPolicy
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  mtls: strict
  rules:
    - from: [spiffe://cluster.local/ns/shop/sa/frontend]
"#;

const V1_ANY: AppSpec = AppSpec::Sample {
    version: "v1",
    any: true,
};
const V1_POD_IP: AppSpec = AppSpec::Sample {
    version: "v1",
    any: false,
};

/// `curl` in `pod` as root (so its traffic is intercepted): the output.
fn curl(pod: &Pod, url: &str, extra: &[&str]) -> Output {
    pod.command("curl")
        .args(["-sS", "--max-time", "5"])
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("running curl")
}

/// The body of a successful curl, if it succeeded.
fn curl_ok(pod: &Pod, url: &str, extra: &[&str]) -> Option<String> {
    let out = curl(pod, url, &[&["--fail"], extra].concat());
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn served_by(body: &str, service: &str) -> bool {
    body.contains(&format!("\"service\":\"{service}\""))
}

/// Waits until `client` gets an answer from `service` at `url` (the proxies
/// have their certificates and the caller's proxy knows the endpoint).
fn wait_reachable(client: &MeshedPod, server: &MeshedPod, url: &str, service: &str) {
    wait_until(
        Duration::from_secs(30),
        &format!("{} reaching {service} at {url}", client.service),
        || curl_ok(&client.pod, url, &[]).is_some_and(|b| served_by(&b, service)),
        || format!("{}{}", client.logs(), server.logs()),
    );
}

/// A tcpdump on the node's end of a pod's veth, writing a pcap file.
struct Capture {
    proc: Proc,
    file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Capture {
    fn start(cluster: &Cluster, pod: &Pod) -> Capture {
        let dir = tempfile::Builder::new()
            .prefix("remora-capture-")
            .tempdir()
            .expect("a temp dir");
        let file = dir.path().join("veth.pcap");
        let mut cmd = cluster.node_command("tcpdump");
        // -U and --immediate-mode: each packet is written as it comes; -Z
        // root: no privilege drop, so the file in root's temp dir stays writable.
        cmd.args(["-i", &pod.veth, "-n", "-U", "--immediate-mode", "-s", "0"])
            .args(["-Z", "root", "-w"])
            .arg(&file)
            .arg("tcp");
        let proc = Proc::spawn("tcpdump", &mut cmd);
        let stderr = proc.log_dir().join("stderr");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&stderr).is_ok_and(|s| s.contains("listening on")) {
            assert!(
                Instant::now() < deadline,
                "tcpdump did not start\n{}",
                proc.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Capture {
            proc,
            file,
            _dir: dir,
        }
    }

    /// Stops the capture and returns the pcap file's bytes.
    fn stop(mut self) -> (Vec<u8>, CaptureFile) {
        std::thread::sleep(Duration::from_millis(300)); // the last packets
        self.proc.sigterm();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.proc.running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let bytes = std::fs::read(&self.file).expect("reading the capture");
        (bytes, CaptureFile { capture: self })
    }
}

/// A finished capture, to filter with tcpdump.
struct CaptureFile {
    capture: Capture,
}

impl CaptureFile {
    /// How many packets match the BPF `filter`.
    fn count(&self, filter: &str) -> usize {
        let out = must(
            Command::new("tcpdump")
                .args(["-r"])
                .arg(&self.capture.file)
                .args(["-n", filter])
                .stderr(Stdio::null()),
        );
        out.lines().count()
    }
}

/// The first payload byte of a TCP segment is 0x16: a TLS handshake record.
const TLS_HANDSHAKE: &str = "tcp[((tcp[12:1] & 0xf0) >> 2):1] = 0x16";

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

// ------------------------------------------------------------------ init

#[test]
fn init_dry_run_prints_the_rules_and_installs_nothing() {
    if netns::skip("init_dry_run_prints_the_rules_and_installs_nothing", &[]) {
        return;
    }
    let mut cluster = Cluster::new("idry", 11);
    let pod = cluster.add_pod();
    let before = pod.nat_rules();
    let out = must(pod.command(bin("remora-proxy")).args([
        "init",
        "--dry-run",
        "--exclude-inbound-ports",
        "2222",
    ]));
    for rule in [
        "iptables -t nat -A REMORA_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "iptables -t nat -A REMORA_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A REMORA_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A REMORA_INBOUND -p tcp --dport 2222 -j RETURN",
        "iptables -t nat -A PREROUTING -p tcp -j REMORA_INBOUND",
        "iptables -t nat -A OUTPUT -p tcp -j REMORA_OUTPUT",
    ] {
        assert!(
            out.contains(rule),
            "--dry-run did not print {rule:?}:\n{out}"
        );
    }
    assert_eq!(pod.nat_rules(), before, "--dry-run changed the nat table");
}

#[test]
fn init_twice_keeps_one_copy_of_each_rule_and_cleanup_removes_them_all() {
    if netns::skip(
        "init_twice_keeps_one_copy_of_each_rule_and_cleanup_removes_them_all",
        &["ip6tables"],
    ) {
        return;
    }
    let mut cluster = Cluster::new("itwice", 12);
    let pod = cluster.add_pod();
    let v6_rules = || must(pod.command("ip6tables").args(["-t", "nat", "-S"]));
    let (before, before_v6) = (pod.nat_rules(), v6_rules());
    let init = |args: &[&str]| must(pod.command(bin("remora-proxy")).arg("init").args(args));

    init(&[]);
    let once = pod.nat_rules();
    for chain in [
        "REMORA_INBOUND",
        "REMORA_IN_REDIRECT",
        "REMORA_OUTPUT",
        "REMORA_OUT_REDIRECT",
    ] {
        assert!(
            once.contains(&format!("-N {chain}\n")),
            "no chain {chain}:\n{once}"
        );
    }
    let once_v6 = v6_rules();
    assert!(
        once_v6.contains("-A OUTPUT -p tcp -j REMORA_OUTPUT"),
        "the pod has IPv6 (::1 on lo), so ip6tables rules are installed too:\n{once_v6}"
    );

    init(&[]);
    let twice = pod.nat_rules();
    assert_eq!(twice, once, "a second init changed the rules");
    assert_eq!(v6_rules(), once_v6, "a second init changed the IPv6 rules");
    for jump in [
        "-A PREROUTING -p tcp -j REMORA_INBOUND",
        "-A OUTPUT -p tcp -j REMORA_OUTPUT",
    ] {
        let copies = twice.lines().filter(|l| *l == jump).count();
        assert_eq!(copies, 1, "{jump:?} appears {copies} times:\n{twice}");
    }

    init(&["--cleanup"]);
    let after = pod.nat_rules();
    assert!(!after.contains("REMORA"), "--cleanup left rules:\n{after}");
    assert_eq!(after, before);
    assert_eq!(v6_rules(), before_v6);
}

#[test]
fn the_init_entrypoint_script_installs_and_prints_the_rules() {
    if netns::skip(
        "the_init_entrypoint_script_installs_and_prints_the_rules",
        &["sh"],
    ) {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker/init.sh");
    let mut cluster = Cluster::new("iscript", 13);
    let pod = cluster.add_pod();
    let bin_dir = bin("remora-proxy")
        .parent()
        .expect("the binaries' directory")
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run = |args: &[&str]| {
        pod.command("sh")
            .arg(&script)
            .args(args)
            .env("PATH", &path)
            .env("REMORA_EXCLUDE_INBOUND_PORTS", "2222")
            .env("REMORA_EXCLUDE_OUTBOUND_CIDRS", "192.0.2.0/24")
            .stdin(Stdio::null())
            .output()
            .expect("running docker/init.sh")
    };
    let out = run(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "init.sh failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What it printed is the nat table as installed, exclusions included.
    assert!(
        stdout.contains("-A REMORA_INBOUND -p tcp -m tcp --dport 2222 -j RETURN"),
        "{stdout}"
    );
    assert!(
        stdout.contains("-A REMORA_OUTPUT -d 192.0.2.0/24 -j RETURN"),
        "{stdout}"
    );
    assert!(
        stdout.contains("-A OUTPUT -p tcp -j REMORA_OUTPUT"),
        "{stdout}"
    );
    assert!(pod.nat_rules().contains("--dport 2222 -j RETURN"));

    let bad = run(&["--ipv6", "sometimes"]);
    assert!(
        !bad.status.success(),
        "init.sh must fail when remora-proxy init does"
    );
    assert!(String::from_utf8_lossy(&bad.stderr)
        .contains("remora-init: installing the interception rules failed"));
}

// ------------------------------------------------------------------ the mesh

#[test]
fn an_app_call_is_intercepted_on_both_sides_and_crosses_the_wire_as_mtls() {
    if netns::skip(
        "an_app_call_is_intercepted_on_both_sides_and_crosses_the_wire_as_mtls",
        &["curl", "tcpdump"],
    ) {
        return;
    }
    let mut cluster = Cluster::new("mtls", 21);
    let cp = NsControlPlane::start(&cluster);
    cp.apply(SERVICES);
    let backend = MeshedPod::start(&cp, cluster.add_pod(), "backend", "shop", Some(V1_POD_IP));
    let frontend = MeshedPod::start(&cp, cluster.add_pod(), "frontend", "shop", Some(V1_ANY));
    let outsider = MeshedPod::bare(cluster.add_pod(), "outsider", None);
    let url = format!("http://{}:8080/orders", backend.pod.ip);
    // The capture covers every connection between the two proxies from its
    // first handshake on (they pool connections).
    let capture = Capture::start(&cluster, &backend.pod);
    wait_reachable(&frontend, &backend, &url, "backend");

    let marker = format!("REMORA-MARKER-{:016x}", fastrand::u64(..));
    let body = curl_ok(&frontend.pod, &url, &["-H", &format!("x-marker: {marker}")]);
    // The control: a client without a sidecar (backend is permissive) sends
    // its marker in plaintext, and the capture does see that one.
    let plain_marker = format!("REMORA-PLAINTEXT-{:016x}", fastrand::u64(..));
    let plain = curl_ok(
        &outsider.pod,
        &url,
        &["-H", &format!("x-marker: {plain_marker}")],
    );
    let (pcap, file) = capture.stop();

    let body =
        body.unwrap_or_else(|| panic!("the call failed\n{}{}", frontend.logs(), backend.logs()));
    assert!(served_by(&body, "backend"), "{body}");
    assert!(
        body.contains(&marker),
        "the app did not see the header: {body}"
    );
    let to_backend = format!("tcp and dst host {} and dst port 8080", backend.pod.ip);
    assert!(
        file.count(&format!("{to_backend} and tcp[tcpflags] & tcp-push != 0")) > 0,
        "the capture on {} saw no data to the backend ({} bytes)",
        backend.pod.veth,
        pcap.len()
    );
    assert!(
        file.count(&format!("{to_backend} and {TLS_HANDSHAKE}")) > 0,
        "no TLS handshake to {}:8080 on the wire",
        backend.pod.ip
    );
    assert!(
        !contains(&pcap, &marker),
        "the marker crossed the veth in plaintext"
    );
    assert!(
        plain.is_some_and(|b| b.contains(&plain_marker)),
        "the plaintext control call failed"
    );
    assert!(
        contains(&pcap, &plain_marker),
        "the capture misses even a plaintext call: it proves nothing"
    );
}

#[test]
fn a_pod_without_a_sidecar_is_refused_by_a_strict_service() {
    if netns::skip(
        "a_pod_without_a_sidecar_is_refused_by_a_strict_service",
        &["curl"],
    ) {
        return;
    }
    let mut cluster = Cluster::new("strict", 22);
    let cp = NsControlPlane::start(&cluster);
    cp.apply(&format!("{SERVICES}---{STRICT_BACKEND}"));
    let backend = MeshedPod::start(&cp, cluster.add_pod(), "backend", "shop", Some(V1_ANY));
    let frontend = MeshedPod::start(&cp, cluster.add_pod(), "frontend", "shop", Some(V1_ANY));
    let outsider = MeshedPod::bare(cluster.add_pod(), "outsider", None);
    let url = format!("http://{}:8080/orders", backend.pod.ip);
    // A meshed client with the allowed identity gets through.
    wait_reachable(&frontend, &backend, &url, "backend");

    // The outsider reaches the pod (the health port is not intercepted)...
    let health = format!("http://{}:15020/live", backend.pod.ip);
    assert!(
        curl_ok(&outsider.pod, &health, &[]).is_some(),
        "the outsider cannot reach the backend's pod at all"
    );
    // ...but its plaintext call to the app's port is refused by the proxy.
    let out = curl(&outsider.pod, &url, &["-i"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !served_by(&text, "backend"),
        "a plaintext call got the backend's answer under mtls: strict:\n{text}"
    );
    let refused = !out.status.success() || text.is_empty() || text.starts_with("HTTP/1.1 4");
    assert!(refused, "a plaintext call was not refused: {text}");
}

#[test]
fn apps_listening_on_the_pod_ip_or_on_any_address_are_both_reached() {
    if netns::skip(
        "apps_listening_on_the_pod_ip_or_on_any_address_are_both_reached",
        &["curl"],
    ) {
        return;
    }
    let mut cluster = Cluster::new("listen", 23);
    let cp = NsControlPlane::start(&cluster);
    cp.apply(SERVICES);
    let on_pod_ip = MeshedPod::start(&cp, cluster.add_pod(), "backend", "shop", Some(V1_POD_IP));
    let on_any = MeshedPod::start(&cp, cluster.add_pod(), "api", "shop", Some(V1_ANY));
    let frontend = MeshedPod::start(&cp, cluster.add_pod(), "frontend", "shop", Some(V1_ANY));
    wait_reachable(
        &frontend,
        &on_pod_ip,
        &format!("http://{}:8080/a", on_pod_ip.pod.ip),
        "backend",
    );
    wait_reachable(
        &frontend,
        &on_any,
        &format!("http://{}:8080/b", on_any.pod.ip),
        "api",
    );
}

#[test]
fn a_real_redis_server_and_client_work_through_the_mesh() {
    if netns::skip(
        "a_real_redis_server_and_client_work_through_the_mesh",
        &["redis-server", "redis-cli", "tcpdump"],
    ) {
        return;
    }
    let mut cluster = Cluster::new("redis", 24);
    let cp = NsControlPlane::start(&cluster);
    cp.apply(SERVICES);
    let cache = MeshedPod::start(
        &cp,
        cluster.add_pod(),
        "cache",
        "shop",
        Some(AppSpec::Redis),
    );
    let frontend = MeshedPod::start(&cp, cluster.add_pod(), "frontend", "shop", Some(V1_ANY));
    let host = cache.pod.ip.to_string();
    let capture = Capture::start(&cluster, &cache.pod);
    let redis = |args: &[&str]| {
        let out = frontend
            .pod
            .command("redis-cli")
            .args(["-h", &host, "-p", "6379"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    wait_until(
        Duration::from_secs(30),
        "redis-cli PING through the mesh",
        || redis(&["PING"]) == "PONG",
        || format!("{}{}", frontend.logs(), cache.logs()),
    );

    let value = format!("REMORA-MARKER-{:016x}", fastrand::u64(..));
    let set = redis(&["SET", "remora:key", &value]);
    let got = redis(&["GET", "remora:key"]);
    let (pcap, file) = capture.stop();
    assert_eq!(set, "OK");
    assert_eq!(got, value);
    assert!(
        file.count(&format!(
            "tcp and dst host {host} and dst port 6379 and {TLS_HANDSHAKE}"
        )) > 0,
        "no TLS handshake to the cache on the wire"
    );
    assert!(
        !contains(&pcap, &value),
        "the value crossed the veth in plaintext"
    );
}

#[test]
fn a_server_that_speaks_first_is_heard_through_the_mesh() {
    if netns::skip(
        "a_server_that_speaks_first_is_heard_through_the_mesh",
        &["bash", "tcpdump"],
    ) {
        return;
    }
    let mut cluster = Cluster::new("banner", 25);
    let cp = NsControlPlane::start(&cluster);
    cp.apply(SERVICES);
    let greeter = MeshedPod::start(
        &cp,
        cluster.add_pod(),
        "greeter",
        "shop",
        Some(AppSpec::Banner),
    );
    let frontend = MeshedPod::start(&cp, cluster.add_pod(), "frontend", "shop", Some(V1_ANY));
    let capture = Capture::start(&cluster, &greeter.pod);
    // bash's /dev/tcp as the client: it waits for the server's first line
    // before it sends anything.
    let script = format!(
        "exec 3<>/dev/tcp/{}/7000 || exit 1
         IFS= read -r -t 5 banner <&3 || exit 2
         printf '%s\\n' \"$banner\"
         printf 'hello mesh\\n' >&3
         IFS= read -r -t 5 echo <&3 || exit 3
         printf '%s\\n' \"$echo\"",
        greeter.pod.ip
    );
    let mut answer = String::new();
    wait_until(
        Duration::from_secs(30),
        "the greeter's banner through the mesh",
        || {
            let out = frontend
                .pod
                .command("bash")
                .args(["-c", &script])
                .stdin(Stdio::null())
                .output()
                .expect("running bash");
            answer = String::from_utf8_lossy(&out.stdout).into_owned();
            out.status.success()
        },
        || format!("{}{}", frontend.logs(), greeter.logs()),
    );
    let (_, file) = capture.stop();
    let lines: Vec<&str> = answer.lines().map(|l| l.trim_end_matches('\r')).collect();
    assert_eq!(lines, ["220 greeter/v1 ready", "hello mesh"], "{answer:?}");
    assert!(
        file.count(&format!(
            "tcp and dst host {} and dst port 7000 and {TLS_HANDSHAKE}",
            greeter.pod.ip
        )) > 0,
        "no TLS handshake to the greeter on the wire"
    );
}
