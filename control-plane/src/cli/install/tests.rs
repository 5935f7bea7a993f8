//! `install`'s output, read back through the Kubernetes API types
//! (`k8s-openapi`) as `inject`'s tests do, so every field it writes is
//! checked against the API.

use super::*;
use crate::cli::args::{Cli, Command};
use clap::Parser;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    Container, Namespace, PersistentVolumeClaim, PodSpec, Probe, Service, ServiceAccount, Volume,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;

const ENDPOINTS: &str =
    "https://etcd-0.etcd:2379,https://etcd-1.etcd:2379,https://etcd-2.etcd:2379";

/// `remora-control install ARGS...`, parsed as the CLI does.
fn parse(args: &[&str]) -> Result<InstallArgs, clap::Error> {
    let cli = Cli::try_parse_from(["remora-control", "install"].iter().chain(args))?;
    let Command::Install(install) = cli.command else {
        panic!("not install")
    };
    Ok(install)
}

/// The output of `install ARGS...`, or the error.
fn try_output(args: &[&str]) -> anyhow::Result<String> {
    let install = parse(args).map_err(|e| anyhow::anyhow!("{e}"))?;
    render(&install.options()?)
}

fn output(args: &[&str]) -> String {
    try_output(args).unwrap_or_else(|e| panic!("install {args:?} failed: {e:#}"))
}

/// The documents of an output, as YAML text each.
fn documents_of(out: &str) -> Vec<String> {
    serde_yaml_ng::Deserializer::from_str(out)
        .map(|de| {
            let v = Value::deserialize(de).expect("the output parses");
            serde_yaml_ng::to_string(&v).expect("re-serializes")
        })
        .filter(|d| d.trim() != "null")
        .collect()
}

fn kind_of(doc: &str) -> String {
    let v: Value = serde_yaml_ng::from_str(doc).expect("yaml");
    v["kind"].as_str().unwrap_or_default().to_owned()
}

fn typed<T: serde::de::DeserializeOwned>(doc: &str) -> T {
    serde_yaml_ng::from_str(doc).unwrap_or_else(|e| panic!("not a valid object: {e}\n{doc}"))
}

/// The one document of `kind` (panics unless there is exactly one).
fn only<T: serde::de::DeserializeOwned>(docs: &[String], kind: &str) -> T {
    let found: Vec<&String> = docs.iter().filter(|d| kind_of(d) == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} in {docs:#?}");
    typed(found[0])
}

fn kinds(docs: &[String]) -> Vec<String> {
    docs.iter().map(|d| kind_of(d)).collect()
}

fn pod_spec(docs: &[String]) -> PodSpec {
    only::<Deployment>(docs, "Deployment")
        .spec
        .template
        .spec
        .expect("pod spec")
}

fn the_container(spec: &PodSpec) -> &Container {
    assert_eq!(spec.containers.len(), 1);
    &spec.containers[0]
}

/// The value after `flag` in `args` (panics if absent or repeated).
fn flag<'a>(args: &'a [String], flag: &str) -> &'a str {
    let at: Vec<usize> = (0..args.len()).filter(|&i| args[i] == flag).collect();
    assert_eq!(at.len(), 1, "{flag} once in {args:?}");
    args.get(at[0] + 1).map(String::as_str).expect("a value")
}

fn http_get(probe: &Option<Probe>) -> (String, IntOrString) {
    let get = probe
        .as_ref()
        .and_then(|p| p.http_get.clone())
        .expect("an HTTP probe");
    (get.path.unwrap_or_default(), get.port)
}

fn volume<'a>(spec: &'a PodSpec, name: &str) -> &'a Volume {
    spec.volumes
        .iter()
        .flatten()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("volume {name}"))
}

#[test]
fn output_uses_only_fields_of_the_kubernetes_api() {
    // k8s-openapi ignores unknown fields when reading, so read each document
    // into its type, write it back, and compare: a misspelt or misplaced
    // field would be lost on the way and the two would differ.
    fn round_trips<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &str) {
        let original: serde_json::Value = serde_yaml_ng::from_str(doc).expect("yaml");
        let back = serde_json::to_value(typed::<T>(doc)).expect("serializes");
        assert_eq!(back, original, "a field the Kubernetes API does not know");
    }
    let variants: [&[&str]; 4] = [
        &["--etcd-endpoints", ENDPOINTS],
        &[
            "--etcd-endpoints",
            ENDPOINTS,
            "--etcd-tls-secret",
            "etcd-client",
            "--replicas",
            "5",
            "--etcd-prefix",
            "/mesh",
        ],
        &["--store", "embedded"],
        &[
            "--store",
            "embedded",
            "--storage-class",
            "fast",
            "--storage-size",
            "5Gi",
        ],
    ];
    for args in variants {
        let docs = documents_of(&output(args));
        assert!(docs.len() >= 6, "{args:?}: {docs:#?}");
        for doc in &docs {
            match kind_of(doc).as_str() {
                "Namespace" => round_trips::<Namespace>(doc),
                "ServiceAccount" => round_trips::<ServiceAccount>(doc),
                "PersistentVolumeClaim" => round_trips::<PersistentVolumeClaim>(doc),
                "Service" => round_trips::<Service>(doc),
                "Deployment" => round_trips::<Deployment>(doc),
                "PodDisruptionBudget" => round_trips::<PodDisruptionBudget>(doc),
                other => panic!("unexpected kind {other}"),
            }
        }
        // Every namespaced object is in the namespace.
        for doc in docs.iter().filter(|d| kind_of(d) != "Namespace") {
            let v: Value = serde_yaml_ng::from_str(doc).expect("yaml");
            assert_eq!(v["metadata"]["namespace"].as_str(), Some("remora-system"));
        }
    }
}

#[test]
fn the_default_is_three_replicas_on_etcd() {
    let out = output(&["--etcd-endpoints", ENDPOINTS]);
    let docs = documents_of(&out);
    assert_eq!(
        kinds(&docs),
        [
            "Namespace",
            "ServiceAccount",
            "Service",
            "Service",
            "Deployment",
            "PodDisruptionBudget"
        ]
    );
    let ns: Namespace = only(&docs, "Namespace");
    assert_eq!(ns.metadata.name.as_deref(), Some("remora-system"));
    let deploy: Deployment = only(&docs, "Deployment");
    assert_eq!(deploy.metadata.name.as_deref(), Some("remora-control"));
    let spec = deploy.spec;
    assert_eq!(spec.replicas, Some(3));
    let strategy = spec.strategy.expect("strategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy.rolling_update.and_then(|r| r.max_unavailable),
        Some(IntOrString::Int(1))
    );
    let template_labels = spec
        .template
        .metadata
        .expect("meta")
        .labels
        .expect("labels");
    for (k, v) in spec.selector.match_labels.expect("matchLabels") {
        assert_eq!(
            template_labels.get(&k),
            Some(&v),
            "the selector matches the pods"
        );
    }

    let pod = pod_spec(&docs);
    assert_eq!(pod.service_account_name.as_deref(), Some("remora-control"));
    assert_eq!(pod.automount_service_account_token, Some(false));
    let c = the_container(&pod);
    assert_eq!(c.image.as_deref(), Some(DEFAULT_IMAGE));
    let args = c.args.clone().expect("args");
    assert_eq!(args[0], "serve");
    assert_eq!(flag(&args, "--listen"), "0.0.0.0:15012");
    assert_eq!(flag(&args, "--http-listen"), "0.0.0.0:15014");
    assert_eq!(flag(&args, "--store"), "etcd");
    assert_eq!(flag(&args, "--etcd-endpoints"), ENDPOINTS);
    assert_eq!(flag(&args, "--kek-file"), "/etc/remora/kek/kek");
    assert_eq!(flag(&args, "--advertise-address"), "$(POD_IP):15012");
    assert_eq!(flag(&args, "--trust-domain"), "cluster.local");
    assert_eq!(flag(&args, "--data-dir"), "/var/lib/remora");
    let names: Vec<&str> = flag(&args, "--server-name").split(',').collect();
    for name in [
        "remora-control.remora-system.svc",
        "remora-control.remora-system.svc.cluster.local",
        "remora-control-replicas.remora-system.svc",
        "$(POD_IP)",
    ] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    assert!(!args.iter().any(|a| a.starts_with("--etcd-ca-file")));
    // POD_IP comes from the downward API, so $(POD_IP) expands.
    let env = c.env.clone().expect("env");
    let pod_ip = env.iter().find(|e| e.name == "POD_IP").expect("POD_IP");
    let field = pod_ip
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("a fieldRef");
    assert_eq!(field.field_path, "status.podIP");

    // Probes on the HTTP port.
    let http = IntOrString::String("http".into());
    assert_eq!(
        http_get(&c.readiness_probe),
        ("/ready".into(), http.clone())
    );
    assert_eq!(http_get(&c.liveness_probe), ("/live".into(), http.clone()));
    assert_eq!(http_get(&c.startup_probe), ("/live".into(), http));
    let ports: Vec<(Option<String>, i32)> = c
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        [(Some("grpc".into()), 15012), (Some("http".into()), 15014)]
    );

    // Resources and hardening.
    let resources = c.resources.clone().expect("resources");
    assert_eq!(
        resources.limits.expect("limits").get("memory"),
        Some(&Quantity("512Mi".into()))
    );
    assert!(resources.requests.expect("requests").contains_key("cpu"));
    let sc = c.security_context.clone().expect("securityContext");
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.and_then(|c| c.drop),
        Some(vec!["ALL".to_owned()])
    );
    let pod_sc = pod.security_context.clone().expect("pod securityContext");
    assert_eq!(pod_sc.run_as_non_root, Some(true));
    assert_eq!(pod_sc.fs_group, Some(10001));

    // Spread over nodes.
    let spread = pod.topology_spread_constraints.clone().expect("spread");
    let hosts = spread
        .iter()
        .find(|t| t.topology_key == "kubernetes.io/hostname")
        .expect("a spread over nodes");
    assert_eq!(
        (hosts.max_skew, hosts.when_unsatisfiable.as_str()),
        (1, "DoNotSchedule")
    );

    // Volumes: the data dir an emptyDir, the KEK Secret read-only.
    assert!(volume(&pod, "data").empty_dir.is_some());
    let kek = volume(&pod, "kek").secret.clone().expect("a Secret volume");
    assert_eq!(kek.secret_name.as_deref(), Some("remora-kek"));
    assert_eq!(kek.default_mode, Some(0o440));
    let mounts = c.volume_mounts.clone().expect("mounts");
    let mount = |name: &str| {
        mounts
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("mount {name}"))
            .clone()
    };
    assert_eq!(mount("kek").mount_path, "/etc/remora/kek");
    assert_eq!(mount("kek").read_only, Some(true));
    assert_eq!(mount("data").mount_path, "/var/lib/remora");
    assert!(mounts.iter().all(|m| m.name != "etcd-tls"));

    // The Services.
    let services: Vec<Service> = docs
        .iter()
        .filter(|d| kind_of(d) == "Service")
        .map(|d| typed(d))
        .collect();
    let by_name = |name: &str| {
        services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .and_then(|s| s.spec.clone())
            .unwrap_or_else(|| panic!("Service {name}"))
    };
    for name in ["remora-control", "remora-control-replicas"] {
        let spec = by_name(name);
        let ports: Vec<(Option<String>, i32)> = spec
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone(), p.port))
            .collect();
        assert_eq!(
            ports,
            [(Some("grpc".into()), 15012), (Some("http".into()), 15014)]
        );
        assert_eq!(
            spec.selector,
            only::<Deployment>(&docs, "Deployment")
                .spec
                .selector
                .match_labels
        );
    }
    assert_eq!(
        by_name("remora-control-replicas").cluster_ip.as_deref(),
        Some("None")
    );
    assert_eq!(by_name("remora-control").cluster_ip, None);

    // The PodDisruptionBudget keeps all but one.
    let pdb: PodDisruptionBudget = only(&docs, "PodDisruptionBudget");
    let pdb = pdb.spec.expect("spec");
    assert_eq!(pdb.min_available, Some(IntOrString::Int(2)));
    assert!(pdb.selector.is_some());

    // The opening comment says how to make the KEK and where proxies dial.
    assert!(out.starts_with("# "), "{out}");
    assert!(out.contains(
        "kubectl -n remora-system create secret generic remora-kek --from-literal=kek=$(openssl rand -hex 32)"
    ));
    assert!(out.contains("remora-control.remora-system.svc:15012"));
}

#[test]
fn replicas_namespace_image_and_trust_domain_are_followed() {
    let out = output(&[
        "--etcd-endpoints",
        "http://10.0.0.1:2379",
        "--replicas",
        "5",
        "-n",
        "mesh",
        "--image",
        "registry.example/remora-control:dev",
        "--trust-domain",
        "prod.example",
        "--kek-secret",
        "mesh-kek",
        "--cluster-domain",
        "corp.local",
    ]);
    let docs = documents_of(&out);
    let deploy: Deployment = only(&docs, "Deployment");
    assert_eq!(deploy.metadata.namespace.as_deref(), Some("mesh"));
    assert_eq!(deploy.spec.replicas, Some(5));
    let pod = pod_spec(&docs);
    let c = the_container(&pod);
    assert_eq!(
        c.image.as_deref(),
        Some("registry.example/remora-control:dev")
    );
    let args = c.args.clone().expect("args");
    assert_eq!(flag(&args, "--trust-domain"), "prod.example");
    assert_eq!(flag(&args, "--etcd-endpoints"), "http://10.0.0.1:2379");
    let names = flag(&args, "--server-name");
    assert!(names.contains("remora-control.mesh.svc,"), "{names}");
    assert!(
        names.contains("remora-control.mesh.svc.corp.local"),
        "{names}"
    );
    let kek = volume(&pod, "kek").secret.clone().expect("secret");
    assert_eq!(kek.secret_name.as_deref(), Some("mesh-kek"));
    let pdb: PodDisruptionBudget = only(&docs, "PodDisruptionBudget");
    assert_eq!(
        pdb.spec.and_then(|s| s.min_available),
        Some(IntOrString::Int(4))
    );
    assert!(out.contains("kubectl -n mesh create secret generic mesh-kek"));
    assert!(out.contains("remora-control.mesh.svc:15012"));

    // One replica on etcd: no disruption budget (it could only be 0).
    let one = documents_of(&output(&["--etcd-endpoints", ENDPOINTS, "--replicas", "1"]));
    assert!(!kinds(&one).contains(&"PodDisruptionBudget".to_owned()));
    assert_eq!(
        only::<Deployment>(&one, "Deployment").spec.replicas,
        Some(1)
    );
}

#[test]
fn an_etcd_tls_secret_is_mounted_and_passed_as_the_etcd_file_flags() {
    let docs = documents_of(&output(&[
        "--etcd-endpoints",
        ENDPOINTS,
        "--etcd-tls-secret",
        "etcd-client",
    ]));
    let pod = pod_spec(&docs);
    let c = the_container(&pod);
    let args = c.args.clone().expect("args");
    assert_eq!(flag(&args, "--etcd-ca-file"), "/etc/remora/etcd-tls/ca.crt");
    assert_eq!(
        flag(&args, "--etcd-cert-file"),
        "/etc/remora/etcd-tls/tls.crt"
    );
    assert_eq!(
        flag(&args, "--etcd-key-file"),
        "/etc/remora/etcd-tls/tls.key"
    );
    let secret = volume(&pod, "etcd-tls").secret.clone().expect("secret");
    assert_eq!(secret.secret_name.as_deref(), Some("etcd-client"));
    let keys: Vec<String> = secret
        .items
        .iter()
        .flatten()
        .map(|i| i.key.clone())
        .collect();
    assert_eq!(keys, ["ca.crt", "tls.crt", "tls.key"]);
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "etcd-tls")
        .expect("mounted");
    assert_eq!(
        (mount.mount_path.as_str(), mount.read_only),
        ("/etc/remora/etcd-tls", Some(true))
    );
}

#[test]
fn the_embedded_store_is_one_replica_on_a_volume_claim() {
    let out = output(&["--store", "embedded"]);
    let docs = documents_of(&out);
    assert_eq!(
        kinds(&docs),
        [
            "Namespace",
            "ServiceAccount",
            "PersistentVolumeClaim",
            "Service",
            "Service",
            "Deployment"
        ]
    );
    let deploy: Deployment = only(&docs, "Deployment");
    let spec = deploy.spec;
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(
        spec.strategy.and_then(|s| s.type_).as_deref(),
        Some("Recreate")
    );
    let pod = pod_spec(&docs);
    let claim = volume(&pod, "data")
        .persistent_volume_claim
        .clone()
        .expect("a claim");
    assert_eq!(claim.claim_name, "remora-control-data");
    assert!(pod.volumes.iter().flatten().all(|v| v.name != "kek"));
    let args = the_container(&pod).args.clone().expect("args");
    assert_eq!(flag(&args, "--store"), "embedded");
    for etcd_flag in ["--etcd-endpoints", "--kek-file", "--advertise-address"] {
        assert!(
            !args.iter().any(|a| a == etcd_flag),
            "{etcd_flag} in {args:?}"
        );
    }
    let pvc: PersistentVolumeClaim = only(&docs, "PersistentVolumeClaim");
    let pvc_spec = pvc.spec.expect("spec");
    assert_eq!(pvc.metadata.name.as_deref(), Some("remora-control-data"));
    assert_eq!(
        pvc_spec.access_modes,
        Some(vec!["ReadWriteOnce".to_owned()])
    );
    assert_eq!(
        pvc_spec
            .resources
            .and_then(|r| r.requests)
            .and_then(|r| r.get("storage").cloned()),
        Some(Quantity("1Gi".into()))
    );
    assert!(!out.contains("openssl"), "no KEK is needed: {out}");
    // --replicas 1 is allowed, as is saying nothing.
    assert!(try_output(&["--store", "embedded", "--replicas", "1"]).is_ok());
}

#[test]
fn impossible_settings_are_refused_with_a_clear_error() {
    let err = |args: &[&str]| match try_output(args) {
        Ok(out) => panic!("install {args:?} was accepted:\n{out}"),
        Err(e) => format!("{e:#}"),
    };
    let e = err(&["--store", "embedded", "--replicas", "3"]);
    assert!(
        e.contains("--store embedded") && e.contains("one replica") && e.contains("--store etcd"),
        "{e}"
    );
    let e = err(&[]);
    assert!(
        e.contains("--etcd-endpoints") && e.contains("--store embedded"),
        "{e}"
    );
    let e = err(&["--store", "embedded", "--etcd-endpoints", ENDPOINTS]);
    assert!(e.contains("--etcd-endpoints is for --store etcd"), "{e}");
    assert!(err(&["--etcd-endpoints", "etcd:2379"]).contains("not an etcd client URL"));
    assert!(err(&["--etcd-endpoints", ENDPOINTS, "-n", "Remora System"]).contains("--namespace"));
    assert!(
        err(&["--etcd-endpoints", ENDPOINTS, "--kek-secret", "Bad_Name"]).contains("--kek-secret")
    );
    assert!(
        err(&["--etcd-endpoints", ENDPOINTS, "--trust-domain", "A B"]).contains("--trust-domain")
    );
    assert!(err(&["--etcd-endpoints", ENDPOINTS, "--image", "a b"]).contains("--image"));
    assert!(err(&["--store", "embedded", "--storage-size", "lots"]).contains("--storage-size"));
    assert!(err(&["--etcd-endpoints", ENDPOINTS, "--replicas", "0"]).contains("replicas"));
    assert!(err(&["--store", "sqlite"]).contains("sqlite"));
}

#[test]
fn no_key_material_is_printed() {
    for args in [
        &["--etcd-endpoints", ENDPOINTS][..],
        &[
            "--etcd-endpoints",
            ENDPOINTS,
            "--etcd-tls-secret",
            "etcd-client",
        ],
        &["--store", "embedded"],
    ] {
        let out = output(args);
        assert!(!out.contains("-----BEGIN"), "a PEM block: {out}");
        assert!(!out.contains("kind: Secret"), "a Secret object: {out}");
        // No run of 32 or more hex digits (a key, a token) anywhere.
        let mut run = 0;
        for c in out.chars() {
            run = if c.is_ascii_hexdigit() { run + 1 } else { 0 };
            assert!(run < 32, "a long hex string in the output: {out}");
        }
        // Twice the same: nothing random in it.
        assert_eq!(out, output(args));
    }
}

#[test]
fn the_output_is_what_install_prints_and_the_control_plane_accepts() {
    // The args parse as `remora-control` itself would parse them.
    let docs = documents_of(&output(&[
        "--etcd-endpoints",
        ENDPOINTS,
        "--etcd-tls-secret",
        "t",
    ]));
    let args = the_container(&pod_spec(&docs)).args.clone().expect("args");
    let expanded: Vec<String> = args
        .iter()
        .map(|a| a.replace("$(POD_IP)", "10.1.2.3"))
        .collect();
    let cli = Cli::try_parse_from(std::iter::once("remora-control".to_owned()).chain(expanded))
        .unwrap_or_else(|e| panic!("serve refuses the args: {e}"));
    let Command::Serve(serve) = cli.command else {
        panic!("not serve")
    };
    assert!(cli
        .global
        .server_name
        .contains(&"remora-control.remora-system.svc".to_owned()));
    assert!(cli.global.server_name.contains(&"10.1.2.3".to_owned()));
    let crate::etcd::StoreConfig::Etcd(etcd) = serve.store.config() else {
        panic!("not the etcd store")
    };
    assert_eq!(etcd.endpoints.len(), 3);
    assert_eq!(etcd.advertise_address.as_deref(), Some("10.1.2.3:15012"));
    assert_eq!(
        etcd.kek_file,
        std::path::PathBuf::from("/etc/remora/kek/kek")
    );
    assert!(etcd.ca_file.is_some() && etcd.cert_file.is_some() && etcd.key_file.is_some());
    assert_eq!(serve.listen.port(), 15012);
    assert_eq!(serve.http_listen.port(), 15014);
    // And the embedded one's.
    let docs = documents_of(&output(&["--store", "embedded"]));
    let args = the_container(&pod_spec(&docs)).args.clone().expect("args");
    let cli = Cli::try_parse_from(std::iter::once("remora-control".to_owned()).chain(args))
        .expect("serve accepts the embedded args");
    let Command::Serve(serve) = cli.command else {
        panic!("not serve")
    };
    assert!(matches!(
        serve.store.config(),
        crate::etcd::StoreConfig::Embedded
    ));
}
