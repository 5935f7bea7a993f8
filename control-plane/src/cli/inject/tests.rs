//! The injector's output, read back through the Kubernetes API types
//! (`k8s-openapi`), so every field it writes is checked against the API.

use super::*;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVar, Pod, PodSpec, Probe, Service, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::Resource;

const WORKLOADS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels: {app: frontend}
  x-unknown-field: kept
spec:
  replicas: 2
  selector: {matchLabels: {app: frontend}}
  template:
    metadata:
      labels: {app: frontend, version: v1}
    spec:
      initContainers:
        - name: migrate
          image: shop/migrate:1
      containers:
        - name: web
          image: shop/web:1
          ports: [{containerPort: 8080, name: http}]
          resources: {requests: {cpu: 100m}}
        - name: helper
          image: shop/helper:1
          ports: [{containerPort: 9000}]
      volumes:
        - name: data
          emptyDir: {}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: frontend}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: shop, labels: {app: db}}
spec:
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers: [{name: db, image: redis:7, ports: [{containerPort: 6379}]}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: shop}
data: {LOG: debug, "port": "8080"}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent, namespace: shop}
spec:
  selector: {matchLabels: {name: agent}}
  template:
    metadata: {labels: {name: agent}}
    spec:
      containers: [{name: agent, image: shop/agent:1}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: report, namespace: shop}
spec:
  template:
    metadata:
      annotations: {remora.dev/service: reports}
    spec:
      restartPolicy: Never
      containers: [{name: report, image: shop/report:1}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly, namespace: shop, labels: {app: nightly}}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{name: batch, image: shop/batch:1}]
---
apiVersion: v1
kind: Pod
metadata: {name: debug, namespace: shop}
spec:
  containers: [{name: shell, image: debian:bookworm, ports: [{containerPort: 7000}]}]
"#;

/// The injected manifest's documents.
fn injected(manifest: &str) -> Vec<String> {
    injected_with(manifest, &InjectOptions::default())
}

fn injected_with(manifest: &str, opts: &InjectOptions) -> Vec<String> {
    let out = inject(manifest, opts).unwrap_or_else(|e| panic!("inject failed: {e}"));
    serde_yaml_ng::Deserializer::from_str(&out)
        .map(|de| {
            let v = Value::deserialize(de).expect("the output parses");
            serde_yaml_ng::to_string(&v).expect("re-serializes")
        })
        .collect()
}

/// The documents that are not ServiceAccounts (those the injector adds).
fn without_accounts(docs: &[String]) -> Vec<String> {
    docs.iter()
        .filter(|d| kind_of(d) != "ServiceAccount")
        .cloned()
        .collect()
}

fn kind_of(doc: &str) -> String {
    let v: Value = serde_yaml_ng::from_str(doc).expect("yaml");
    v["kind"].as_str().unwrap_or_default().to_owned()
}

fn typed<T: serde::de::DeserializeOwned>(doc: &str) -> T {
    serde_yaml_ng::from_str(doc).unwrap_or_else(|e| panic!("not a valid object: {e}\n{doc}"))
}

fn pod_spec_of(doc: &str) -> PodSpec {
    let kind: Value = serde_yaml_ng::from_str(doc).expect("yaml");
    let spec = match kind["kind"].as_str() {
        Some(Deployment::KIND) => typed::<Deployment>(doc).spec.template.spec,
        Some(StatefulSet::KIND) => typed::<StatefulSet>(doc).spec.template.spec,
        Some(DaemonSet::KIND) => typed::<DaemonSet>(doc).spec.template.spec,
        Some(Job::KIND) => typed::<Job>(doc).spec.and_then(|s| s.template.spec),
        Some(CronJob::KIND) => typed::<CronJob>(doc)
            .spec
            .job_template
            .spec
            .and_then(|s| s.template.spec),
        Some(Pod::KIND) => typed::<Pod>(doc).spec,
        other => panic!("not a workload: {other:?}"),
    };
    spec.expect("a pod spec")
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env<'a>(c: &'a Container, name: &str) -> Option<&'a EnvVar> {
    c.env.iter().flatten().find(|e| e.name == name)
}

fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    env(c, name).and_then(|e| e.value.as_deref())
}

fn field_path<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    env(c, name)
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str())
}

fn http_probe(p: &Option<Probe>) -> (String, IntOrString) {
    let get = p
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("an httpGet probe");
    (get.path.clone().unwrap_or_default(), get.port.clone())
}

/// Everything the mesh adds to a pod, checked on the typed pod spec, with
/// the default projected ServiceAccount token.
fn assert_meshed(spec: &PodSpec, service: &str, app_port: Option<u16>) {
    assert_meshed_with(spec, service, app_port, TokenSource::Projected);
}

fn assert_meshed_with(spec: &PodSpec, service: &str, app_port: Option<u16>, source: TokenSource) {
    let init = spec.init_containers.as_ref().expect("init containers");
    assert_eq!(init[0].name, "remora-init", "remora-init runs first");
    assert_eq!(init[1].name, "remora-proxy", "the proxy starts next");

    let ic = &init[0];
    assert_eq!(ic.image.as_deref(), Some(DEFAULT_PROXY_IMAGE));
    assert_eq!(
        ic.args.as_ref().and_then(|a| a.first()).map(String::as_str),
        Some("init")
    );
    assert_eq!(ic.restart_policy, None, "remora-init runs to completion");
    let sc = ic.security_context.as_ref().expect("init securityContext");
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(
        caps.add.as_deref(),
        Some(&["NET_ADMIN".to_owned(), "NET_RAW".to_owned()][..]),
        "exactly NET_ADMIN and NET_RAW"
    );
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(sc.run_as_user, Some(0));
    assert_eq!(sc.run_as_non_root, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.privileged, None);

    let proxy = &init[1];
    assert_eq!(
        proxy.restart_policy.as_deref(),
        Some("Always"),
        "a native sidecar"
    );
    assert_eq!(proxy.args.as_deref(), Some(&["run".to_owned()][..]));
    let sc = proxy
        .security_context
        .as_ref()
        .expect("proxy securityContext");
    assert_eq!(sc.run_as_user, Some(1337));
    assert_eq!(sc.run_as_group, Some(1337));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.add, None);
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));

    let ports: Vec<(i32, Option<&str>)> = proxy
        .ports
        .iter()
        .flatten()
        .map(|p| (p.container_port, p.name.as_deref()))
        .collect();
    assert_eq!(
        ports,
        [
            (15001, Some("remora-outbound")),
            (15006, Some("remora-inbound")),
            (15020, Some("remora-health"))
        ]
    );
    let health = IntOrString::Int(15020);
    assert_eq!(
        http_probe(&proxy.readiness_probe),
        ("/ready".into(), health.clone())
    );
    assert_eq!(
        http_probe(&proxy.startup_probe),
        ("/ready".into(), health.clone())
    );
    assert_eq!(http_probe(&proxy.liveness_probe), ("/live".into(), health));

    let res = proxy.resources.as_ref().expect("resources");
    let requests = res.requests.as_ref().expect("requests");
    assert_eq!(requests.get("cpu"), Some(&Quantity("10m".into())));
    assert_eq!(requests.get("memory"), Some(&Quantity("20Mi".into())));
    let limits = res.limits.as_ref().expect("limits");
    assert_eq!(limits.get("memory"), Some(&Quantity("64Mi".into())));

    assert_eq!(env_value(proxy, "REMORA_SERVICE"), Some(service));
    assert_eq!(
        env_value(proxy, "REMORA_CONTROL_PLANE"),
        Some(DEFAULT_CONTROL_PLANE)
    );
    assert_eq!(
        field_path(proxy, "REMORA_NAMESPACE"),
        Some("metadata.namespace")
    );
    assert_eq!(
        field_path(proxy, "REMORA_INSTANCE_ID"),
        Some("metadata.name")
    );
    assert_eq!(
        env_value(proxy, "REMORA_TOKEN_FILE"),
        Some("/var/run/remora/token/token")
    );
    assert_eq!(
        env_value(proxy, "REMORA_CA_FILE"),
        Some("/var/run/remora/ca/ca.pem")
    );
    assert_eq!(env(proxy, "REMORA_OTLP_ENDPOINT"), None);
    match app_port {
        Some(port) => {
            let names: Vec<&str> = proxy
                .env
                .iter()
                .flatten()
                .map(|e| e.name.as_str())
                .collect();
            let pod_ip = names.iter().position(|n| *n == "POD_IP").expect("POD_IP");
            let adv = names
                .iter()
                .position(|n| *n == "REMORA_ADVERTISE")
                .expect("advertise");
            assert!(pod_ip < adv, "$(POD_IP) must be defined before it is used");
            assert_eq!(field_path(proxy, "POD_IP"), Some("status.podIP"));
            let want = format!("$(POD_IP):{port}");
            assert_eq!(env_value(proxy, "REMORA_ADVERTISE"), Some(want.as_str()));
        }
        None => assert_eq!(env(proxy, "REMORA_ADVERTISE"), None),
    }

    // Every mount names a volume of the pod, which the injector added.
    let volumes = spec.volumes.as_ref().expect("volumes");
    let token = volumes
        .iter()
        .find(|v| v.name == "remora-token")
        .expect("token volume");
    match source {
        TokenSource::Projected => {
            assert_eq!(token.secret, None);
            let sources = token
                .projected
                .as_ref()
                .and_then(|p| p.sources.as_deref())
                .expect("a projected volume");
            assert_eq!(sources.len(), 1);
            let sat = sources[0]
                .service_account_token
                .as_ref()
                .expect("a serviceAccountToken source");
            assert_eq!(sat.audience.as_deref(), Some("remora"));
            assert_eq!(sat.expiration_seconds, Some(3600));
            // REMORA_TOKEN_FILE (checked above) is the mount path + this path.
            assert_eq!(sat.path, "token");
            assert_eq!(
                spec.service_account_name.as_deref(),
                Some(service),
                "the pod runs as the ServiceAccount its identity names"
            );
        }
        TokenSource::Secret => {
            assert_eq!(token.projected, None);
            let secret = format!("remora-token-{service}");
            assert_eq!(
                token.secret.as_ref().and_then(|s| s.secret_name.as_deref()),
                Some(secret.as_str())
            );
        }
    }
    let ca = volumes
        .iter()
        .find(|v| v.name == "remora-ca")
        .expect("ca volume");
    assert_eq!(
        ca.config_map.as_ref().map(|c| c.name.as_str()),
        Some("remora-trust-bundle")
    );
    let mounts: Vec<(&str, &str, Option<bool>)> = proxy
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.as_str(), m.mount_path.as_str(), m.read_only))
        .collect();
    assert_eq!(
        mounts,
        [
            ("remora-token", "/var/run/remora/token", Some(true)),
            ("remora-ca", "/var/run/remora/ca", Some(true))
        ]
    );
    for c in init.iter().chain(&spec.containers) {
        for m in c.volume_mounts.iter().flatten() {
            assert!(
                volumes.iter().any(|v| v.name == m.name),
                "mount {} has no volume",
                m.name
            );
        }
    }
    assert!(
        !spec
            .containers
            .iter()
            .any(|c| c.name.starts_with("remora-")),
        "the app's containers are not touched"
    );
}

#[test]
fn every_workload_kind_gets_the_init_container_and_a_native_sidecar() {
    let all = injected(WORKLOADS);
    let kinds: Vec<String> = all.iter().map(|d| kind_of(d)).collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "Deployment",
            "Service",
            "ServiceAccount",
            "StatefulSet",
            "ConfigMap",
            "ServiceAccount",
            "DaemonSet",
            "ServiceAccount",
            "Job",
            "ServiceAccount",
            "CronJob",
            "ServiceAccount",
            "Pod"
        ],
        "documents keep their order, each workload's ServiceAccount just before it"
    );
    let accounts: Vec<(Option<String>, Option<String>)> = all
        .iter()
        .filter(|d| kind_of(d) == "ServiceAccount")
        .map(|d| {
            let sa: ServiceAccount = typed(d);
            (sa.metadata.namespace, sa.metadata.name)
        })
        .collect();
    let shop = |name: &str| (Some("shop".to_owned()), Some(name.to_owned()));
    assert_eq!(
        accounts,
        [
            shop("frontend"),
            shop("db"),
            shop("agent"),
            shop("reports"),
            shop("nightly"),
            shop("debug")
        ]
    );
    let docs = without_accounts(&all);

    let web = pod_spec_of(&docs[0]);
    assert_meshed(&web, "frontend", Some(8080));
    let names: Vec<&str> = web
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["remora-init", "remora-proxy", "migrate"]);
    let apps: Vec<&str> = web.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(apps, ["web", "helper"]);
    assert_eq!(
        env_value(container(&web, "remora-proxy"), "REMORA_LABELS"),
        Some("version=v1")
    );
    assert!(web
        .volumes
        .iter()
        .flatten()
        .any(|v| v.name == "data" && v.empty_dir.is_some()));

    assert_meshed(&pod_spec_of(&docs[2]), "db", Some(6379));
    // No app label: the workload's name; no ports: not advertised (a client only).
    let agent = pod_spec_of(&docs[4]);
    assert_meshed(&agent, "agent", None);
    assert_eq!(
        env(container(&agent, "remora-proxy"), "REMORA_LABELS"),
        None
    );
    let report = pod_spec_of(&docs[5]);
    assert_meshed(&report, "reports", None);
    assert_eq!(report.restart_policy.as_deref(), Some("Never"));
    assert_meshed(&pod_spec_of(&docs[6]), "nightly", None);
    assert_meshed(&pod_spec_of(&docs[7]), "debug", Some(7000));
}

#[test]
fn output_uses_only_fields_of_the_kubernetes_api() {
    // k8s-openapi ignores unknown fields when reading, so read each injected
    // workload into its type, write it back, and compare: a misspelt or
    // misplaced field would be lost on the way and the two would differ.
    fn round_trips<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &str) {
        let mut original: serde_json::Value = serde_yaml_ng::from_str(doc).expect("yaml");
        // The one field the test put there on purpose is not Kubernetes'.
        if let Some(meta) = original["metadata"].as_object_mut() {
            meta.remove("x-unknown-field");
        }
        let back = serde_json::to_value(typed::<T>(doc)).expect("serializes");
        assert_eq!(back, original, "a field the Kubernetes API does not know");
    }
    for opts in [
        InjectOptions::default(),
        InjectOptions {
            token_source: TokenSource::Secret,
            ..InjectOptions::default()
        },
    ] {
        let docs = injected_with(WORKLOADS, &opts);
        for doc in &docs {
            match kind_of(doc).as_str() {
                "ServiceAccount" => round_trips::<ServiceAccount>(doc),
                "Deployment" => round_trips::<Deployment>(doc),
                "Service" => round_trips::<Service>(doc),
                "StatefulSet" => round_trips::<StatefulSet>(doc),
                "ConfigMap" => round_trips::<ConfigMap>(doc),
                "DaemonSet" => round_trips::<DaemonSet>(doc),
                "Job" => round_trips::<Job>(doc),
                "CronJob" => round_trips::<CronJob>(doc),
                "Pod" => round_trips::<Pod>(doc),
                other => panic!("unexpected kind {other}"),
            }
        }
    }
}

#[test]
fn injecting_twice_gives_the_same_output_as_once() {
    let opts = InjectOptions::default();
    let once = inject(WORKLOADS, &opts).expect("first");
    let twice = inject(&once, &opts).expect("second");
    assert_eq!(once, twice);
    let secret = InjectOptions {
        token_source: TokenSource::Secret,
        ..InjectOptions::default()
    };
    let once_secret = inject(WORKLOADS, &secret).expect("first");
    assert_eq!(once_secret, inject(&once_secret, &secret).expect("second"));
    let spec = pod_spec_of(&without_accounts(&injected(&twice))[0]);
    let proxies = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.name == "remora-proxy")
        .count();
    assert_eq!(proxies, 1);
    assert_eq!(
        spec.volumes
            .iter()
            .flatten()
            .filter(|v| v.name == "remora-token")
            .count(),
        1
    );
}

#[test]
fn other_kinds_and_unknown_fields_pass_through_untouched() {
    let docs = without_accounts(&injected(WORKLOADS));
    let originals: Vec<Value> = serde_yaml_ng::Deserializer::from_str(WORKLOADS)
        .map(|de| Value::deserialize(de).expect("yaml"))
        .collect();
    for i in [1, 3] {
        let out: Value = serde_yaml_ng::from_str(&docs[i]).expect("yaml");
        assert_eq!(out, originals[i], "document {} changed", i + 1);
    }
    let svc: Service = typed(&docs[1]);
    assert_eq!(svc.metadata.name.as_deref(), Some("web"));
    let cm: ConfigMap = typed(&docs[3]);
    assert_eq!(
        cm.data
            .as_ref()
            .and_then(|d| d.get("LOG"))
            .map(String::as_str),
        Some("debug")
    );
    let deploy: Value = serde_yaml_ng::from_str(&docs[0]).expect("yaml");
    assert_eq!(deploy["metadata"]["x-unknown-field"].as_str(), Some("kept"));
    // Key order is kept: apiVersion, kind, metadata, spec as written.
    assert!(docs[0].starts_with("apiVersion: apps/v1\nkind: Deployment\nmetadata:"));
}

#[test]
fn the_opt_out_annotation_leaves_a_workload_alone() {
    let on_workload = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: legacy, annotations: {remora.dev/inject: "false"}}
spec:
  selector: {matchLabels: {app: legacy}}
  template:
    metadata: {labels: {app: legacy}}
    spec: {containers: [{name: legacy, image: legacy:1}]}
"#;
    let on_template = r#"
apiVersion: v1
kind: Pod
metadata: {name: p, annotations: {remora.dev/inject: "false"}}
spec: {containers: [{name: p, image: p:1}]}
"#;
    let host_network = r#"
apiVersion: v1
kind: Pod
metadata: {name: node-agent}
spec: {hostNetwork: true, containers: [{name: a, image: a:1}]}
"#;
    for manifest in [on_workload, on_template, host_network] {
        let out: Value = serde_yaml_ng::from_str(&injected(manifest)[0]).expect("yaml");
        let original: Value = serde_yaml_ng::from_str(manifest).expect("yaml");
        assert_eq!(out, original);
    }
    // The template's annotation beats the workload's.
    let back_in = on_workload.replace(
        "metadata: {labels: {app: legacy}}",
        "metadata: {labels: {app: legacy}, annotations: {remora.dev/inject: \"true\"}}",
    );
    let docs = injected(&back_in);
    assert_eq!(kind_of(&docs[0]), "ServiceAccount");
    assert_meshed(&pod_spec_of(&docs[1]), "legacy", None);
}

#[test]
fn excluded_ports_and_cidrs_reach_the_init_arguments() {
    let manifest = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, annotations: {remora.dev/exclude-outbound-cidrs: "10.0.0.0/8, 169.254.169.254/32"}}
spec:
  selector: {matchLabels: {app: api}}
  template:
    metadata:
      labels: {app: api}
      annotations:
        remora.dev/exclude-inbound-ports: "22,9090"
        remora.dev/exclude-outbound-ports: "5432"
        remora.dev/proxy-image: registry.local/remora-proxy:dev
        remora.dev/proxy-workers: "2"
    spec: {containers: [{name: api, image: api:1, ports: [{containerPort: 8080}]}]}
"#;
    let spec = pod_spec_of(&without_accounts(&injected(manifest))[0]);
    assert_eq!(
        env_value(container(&spec, "remora-proxy"), "REMORA_WORKERS"),
        Some("2")
    );
    let init = container(&spec, "remora-init");
    assert_eq!(
        init.args.as_deref().unwrap_or_default(),
        [
            "init",
            "--exclude-inbound-ports",
            "22,9090",
            "--exclude-outbound-ports",
            "5432",
            "--exclude-outbound-cidrs",
            "10.0.0.0/8,169.254.169.254/32"
        ]
    );
    for name in ["remora-init", "remora-proxy"] {
        assert_eq!(
            container(&spec, name).image.as_deref(),
            Some("registry.local/remora-proxy:dev")
        );
    }
}

#[test]
fn options_set_the_image_control_plane_and_collector() {
    let opts = InjectOptions {
        proxy_image: "remora-proxy:test".into(),
        control_plane: "https://cp.example:15012".into(),
        otlp_endpoint: Some("http://jaeger.tracing:4317".into()),
        ..InjectOptions::default()
    };
    let docs = without_accounts(&injected_with(WORKLOADS, &opts));
    let spec = pod_spec_of(&docs[0]);
    let proxy = container(&spec, "remora-proxy");
    assert_eq!(proxy.image.as_deref(), Some("remora-proxy:test"));
    assert_eq!(
        container(&spec, "remora-init").image.as_deref(),
        Some("remora-proxy:test")
    );
    assert_eq!(
        env_value(proxy, "REMORA_CONTROL_PLANE"),
        Some("https://cp.example:15012")
    );
    assert_eq!(
        env_value(proxy, "REMORA_OTLP_ENDPOINT"),
        Some("http://jaeger.tracing:4317")
    );
    // Without the annotation the proxy keeps its default of one data-plane thread.
    assert_eq!(env_value(proxy, "REMORA_WORKERS"), None);
}

#[test]
fn a_list_has_its_items_injected() {
    let list = r#"
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: ConfigMap
    metadata: {name: c}
  - apiVersion: v1
    kind: Pod
    metadata: {name: p, labels: {app: shop}}
    spec: {containers: [{name: p, image: p:1}]}
"#;
    let out: Value = serde_yaml_ng::from_str(&injected(list)[0]).expect("yaml");
    let sa: ServiceAccount =
        serde_yaml_ng::from_value(out["items"][1].clone()).expect("a ServiceAccount item");
    assert_eq!(sa.metadata.name.as_deref(), Some("shop"));
    let pod = serde_yaml_ng::to_string(&out["items"][2]).expect("yaml");
    assert_meshed(&pod_spec_of(&pod), "shop", None);
    assert!(out["items"][0].get("spec").is_none());
}

#[test]
fn kinds_of_other_api_groups_are_not_workloads() {
    let manifest = r#"
apiVersion: batch.volcano.sh/v1alpha1
kind: Job
metadata: {name: train}
spec: {tasks: []}
"#;
    let out: Value = serde_yaml_ng::from_str(&injected(manifest)[0]).expect("yaml");
    assert_eq!(
        out,
        serde_yaml_ng::from_str::<Value>(manifest).expect("yaml")
    );
}

#[test]
fn empty_documents_are_dropped() {
    let docs = injected("---\napiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: a, image: a}]}\n---\n");
    assert_eq!(docs.len(), 2, "the pod and its ServiceAccount");
}

#[test]
fn errors_name_the_document_and_the_field() {
    let err = |manifest: &str| {
        inject(manifest, &InjectOptions::default())
            .expect_err("should be refused")
            .to_string()
    };
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: a, image: a}]}\n";

    assert_eq!(
        err(&format!("{pod}---\n- just\n- a list\n")),
        "document 2: (document): expected a mapping (a Kubernetes object), found a list"
    );
    assert_eq!(
        err("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\nspec: {replicas: 1}\n"),
        "document 1 (Deployment shop/web): spec.template: missing"
    );
    assert_eq!(
        err(&format!("{pod}---\napiVersion: batch/v1\nkind: CronJob\nmetadata: {{name: c}}\nspec: {{jobTemplate: {{spec: {{template: 3}}}}}}\n")),
        "document 2 (CronJob c): spec.jobTemplate.spec.template: not a mapping"
    );
    assert_eq!(
        err("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: []}\n"),
        "document 1 (Pod a): spec.containers: empty"
    );
    assert_eq!(
        err("apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: d}\nspec: {template: {spec: {}}}\n"),
        "document 1 (DaemonSet d): spec.template.spec.containers: missing"
    );
    assert_eq!(
        err("apiVersion: v1\nkind: Pod\nmetadata: {name: a, annotations: {remora.dev/exclude-inbound-ports: \"22,ssh\"}}\nspec: {containers: [{name: a, image: a}]}\n"),
        "document 1 (Pod a): metadata.annotations.remora.dev/exclude-inbound-ports: \"ssh\" is not a valid port"
    );
    assert_eq!(
        err("apiVersion: v1\nkind: Pod\nmetadata: {name: a, annotations: {remora.dev/exclude-outbound-cidrs: \"10.0.0.0/33\"}}\nspec: {containers: [{name: a, image: a}]}\n"),
        "document 1 (Pod a): metadata.annotations.remora.dev/exclude-outbound-cidrs: \"10.0.0.0/33\" is not a valid CIDR"
    );
    assert_eq!(
        err("apiVersion: v1\nkind: Pod\nmetadata: {name: a, annotations: {remora.dev/proxy-workers: \"two\"}}\nspec: {containers: [{name: a, image: a}]}\n"),
        "document 1 (Pod a): metadata.annotations.remora.dev/proxy-workers: \"two\" is not a number of threads (0: one per core)"
    );
    assert_eq!(
        err("apiVersion: v1\nmetadata: {name: a}\n"),
        "document 1: kind: missing: not a Kubernetes object"
    );
    assert_eq!(
        err("apiVersion: v1\nkind: List\nitems:\n  - {apiVersion: apps/v1, kind: Deployment, metadata: {name: w}, spec: {}}\n"),
        "document 1 (List), items[0] (Deployment w): spec.template: missing"
    );
    assert_eq!(
        err("apiVersion: v1\nkind: Pod\nspec: {containers: [{name: a, image: a}]}\n"),
        "document 1 (Pod): metadata: no service name: set annotation remora.dev/service, label app or a name"
    );
    let yaml = err(&format!("{pod}---\nkind: [unclosed\n"));
    assert!(yaml.starts_with("document 2: (yaml): "), "{yaml}");
}

const ONE_POD: &str = "apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api}}
spec:
  containers: [{name: api, image: api:1, ports: [{containerPort: 8080}]}]
";

fn with_spec_line(line: &str) -> String {
    ONE_POD.replace("spec:\n", &format!("spec:\n  {line}\n"))
}

#[test]
fn the_token_is_a_projected_service_account_token_for_the_chosen_audience() {
    let opts = InjectOptions {
        token_audience: "mesh.example".into(),
        ..InjectOptions::default()
    };
    let docs = injected_with(ONE_POD, &opts);
    assert_eq!(docs.len(), 2);
    let sa: ServiceAccount = typed(&docs[0]);
    assert_eq!(sa.metadata.name.as_deref(), Some("api"));
    assert_eq!(sa.metadata.namespace.as_deref(), Some("shop"));
    let spec = pod_spec_of(&docs[1]);
    assert_eq!(spec.service_account_name.as_deref(), Some("api"));
    let token = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == TOKEN_VOLUME)
        .expect("the token volume");
    let sat = token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
        .service_account_token
        .clone()
        .unwrap();
    assert_eq!(sat.audience.as_deref(), Some("mesh.example"));
    assert_eq!(sat.expiration_seconds, Some(TOKEN_EXPIRATION_SECONDS));
    let proxy = container(&spec, PROXY_CONTAINER);
    let mount = proxy
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == TOKEN_VOLUME)
        .expect("the token mount");
    assert_eq!(
        env_value(proxy, "REMORA_TOKEN_FILE"),
        Some(format!("{}/{}", mount.mount_path, sat.path).as_str()),
        "the proxy reads the projected token"
    );
    // The default audience is the control plane's default.
    let spec = pod_spec_of(&injected(ONE_POD)[1]);
    assert_meshed(&spec, "api", Some(8080));
}

#[test]
fn the_pod_runs_as_the_service_account_its_identity_names() {
    // Already the right one, under either field: kept, and the account added.
    for line in ["serviceAccountName: api", "serviceAccount: api"] {
        let docs = injected(&with_spec_line(line));
        assert_eq!(kind_of(&docs[0]), "ServiceAccount", "{line}");
        let spec = pod_spec_of(&docs[1]);
        assert_eq!(spec.service_account_name.as_deref(), Some("api"), "{line}");
    }
    // Another one is refused, saying why and what to do.
    for (line, field) in [
        ("serviceAccountName: default", "spec.serviceAccountName"),
        ("serviceAccount: builder", "spec.serviceAccount"),
    ] {
        let err = inject(&with_spec_line(line), &InjectOptions::default())
            .expect_err(line)
            .to_string();
        assert!(
            err.starts_with(&format!("document 1 (Pod shop/api): {field}: ")),
            "{err}"
        );
        assert!(err.contains("ns/<namespace>/sa/api"), "{err}");
        assert!(err.contains("--token-source secret"), "{err}");
    }
    // Named after the ServiceAccount, the workload is fine.
    let renamed = with_spec_line("serviceAccountName: builder").replace(
        "labels: {app: api}",
        "labels: {app: api}, annotations: {remora.dev/service: builder}",
    );
    let docs = injected(&renamed);
    let spec = pod_spec_of(&docs[1]);
    assert_meshed(&spec, "builder", Some(8080));
    // A service name that cannot name a ServiceAccount is refused.
    let err = inject(
        &ONE_POD.replace("app: api", "app: Api_V2"),
        &InjectOptions::default(),
    )
    .expect_err("an invalid ServiceAccount name")
    .to_string();
    assert!(
        err.contains("\"Api_V2\" cannot name the pod's ServiceAccount"),
        "{err}"
    );
}

#[test]
fn a_service_account_already_in_the_manifest_is_not_added_again() {
    let account = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: api, namespace: shop}\n";
    // Before or after the workload.
    for manifest in [
        format!("{account}---\n{ONE_POD}"),
        format!("{ONE_POD}---\n{account}"),
    ] {
        let docs = injected(&manifest);
        assert_eq!(docs.len(), 2, "{docs:?}");
        assert_eq!(
            docs.iter()
                .filter(|d| kind_of(d) == "ServiceAccount")
                .count(),
            1
        );
    }
    // Two workloads of one service in one namespace: one account.
    let twice = format!(
        "{ONE_POD}---\n{}",
        ONE_POD.replace("name: api,", "name: api-2,")
    );
    let docs = injected(&twice);
    let kinds: Vec<String> = docs.iter().map(|d| kind_of(d)).collect();
    assert_eq!(kinds, ["ServiceAccount", "Pod", "Pod"]);
    // In another namespace, another account.
    let elsewhere = format!(
        "{ONE_POD}---\n{}",
        ONE_POD.replace("namespace: shop", "namespace: billing")
    );
    let docs = injected(&elsewhere);
    let kinds: Vec<String> = docs.iter().map(|d| kind_of(d)).collect();
    assert_eq!(kinds, ["ServiceAccount", "Pod", "ServiceAccount", "Pod"]);
    let sa: ServiceAccount = typed(&docs[2]);
    assert_eq!(sa.metadata.namespace.as_deref(), Some("billing"));
    // A workload left alone gets none.
    let opted_out = ONE_POD.replace(
        "labels: {app: api}",
        "labels: {app: api}, annotations: {remora.dev/inject: \"false\"}",
    );
    assert_eq!(injected(&opted_out).len(), 1);
}

#[test]
fn token_source_secret_keeps_the_bootstrap_token_secret() {
    let opts = InjectOptions {
        token_source: TokenSource::Secret,
        ..InjectOptions::default()
    };
    let docs = injected_with(WORKLOADS, &opts);
    assert!(
        docs.iter().all(|d| kind_of(d) != "ServiceAccount"),
        "no ServiceAccount added"
    );
    assert_eq!(docs.len(), 8);
    let web = pod_spec_of(&docs[0]);
    assert_meshed_with(&web, "frontend", Some(8080), TokenSource::Secret);
    assert_eq!(
        web.service_account_name, None,
        "the pod's account untouched"
    );
    assert_meshed_with(
        &pod_spec_of(&docs[7]),
        "debug",
        Some(7000),
        TokenSource::Secret,
    );
    // A pod running as another ServiceAccount is fine: the token names the identity.
    let docs = injected_with(&with_spec_line("serviceAccountName: builder"), &opts);
    assert_eq!(docs.len(), 1);
    let spec = pod_spec_of(&docs[0]);
    assert_eq!(spec.service_account_name.as_deref(), Some("builder"));
    assert_meshed_with(&spec, "api", Some(8080), TokenSource::Secret);
}
