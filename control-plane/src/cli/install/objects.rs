//! The objects `install` prints, as YAML values (keys in the order written).

use super::{
    InstallOptions, StoreChoice, DATA_CLAIM, DATA_DIR, ETCD_TLS_DIR, GRPC_PORT, HTTP_PORT, KEK_DIR,
    NAME, REPLICAS_SERVICE,
};
use serde_yaml_ng::{Mapping, Value};

/// The UID and GID the image runs as (docker/control-plane.Dockerfile).
const UID: i64 = 10001;
/// Secret files readable by their group only (the pod's fsGroup).
const SECRET_MODE: i64 = 0o440;

fn s(text: &str) -> Value {
    Value::String(text.to_owned())
}

/// A mapping with its keys in the order given.
fn map<const N: usize>(entries: [(&str, Value); N]) -> Value {
    let mut m = Mapping::with_capacity(N);
    for (k, v) in entries {
        m.insert(s(k), v);
    }
    Value::Mapping(m)
}

fn seq(items: impl IntoIterator<Item = Value>) -> Value {
    Value::Sequence(items.into_iter().collect())
}

fn strings<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> Value {
    seq(items.into_iter().map(|i| s(i.as_ref())))
}

/// The labels every object carries; the first one selects the pods.
fn labels() -> Value {
    map([
        ("app.kubernetes.io/name", s(NAME)),
        ("app.kubernetes.io/part-of", s("remora")),
        ("app.kubernetes.io/component", s("control-plane")),
    ])
}

fn selector() -> Value {
    map([("app.kubernetes.io/name", s(NAME))])
}

fn metadata(opts: &InstallOptions, name: &str) -> Value {
    map([
        ("name", s(name)),
        ("namespace", s(&opts.namespace)),
        ("labels", labels()),
    ])
}

pub(super) fn namespace(opts: &InstallOptions) -> Value {
    map([
        ("apiVersion", s("v1")),
        ("kind", s("Namespace")),
        (
            "metadata",
            map([("name", s(&opts.namespace)), ("labels", labels())]),
        ),
    ])
}

/// The control plane's ServiceAccount: it never calls the Kubernetes API,
/// so no token is mounted.
pub(super) fn service_account(opts: &InstallOptions) -> Value {
    map([
        ("apiVersion", s("v1")),
        ("kind", s("ServiceAccount")),
        ("metadata", metadata(opts, NAME)),
        ("automountServiceAccountToken", Value::Bool(false)),
    ])
}

/// The embedded store's volume.
pub(super) fn data_claim(opts: &InstallOptions) -> Value {
    let (size, class) = match &opts.store {
        StoreChoice::Embedded {
            storage_size,
            storage_class,
        } => (storage_size.as_str(), storage_class.as_deref()),
        StoreChoice::Etcd { .. } => ("1Gi", None),
    };
    let mut spec = Mapping::new();
    spec.insert(s("accessModes"), strings(["ReadWriteOnce"]));
    if let Some(class) = class {
        spec.insert(s("storageClassName"), s(class));
    }
    spec.insert(
        s("resources"),
        map([("requests", map([("storage", s(size))]))]),
    );
    map([
        ("apiVersion", s("v1")),
        ("kind", s("PersistentVolumeClaim")),
        ("metadata", metadata(opts, DATA_CLAIM)),
        ("spec", Value::Mapping(spec)),
    ])
}

fn service_ports() -> Value {
    let port = |name: &str, port: u16, protocol: &str| {
        map([
            ("name", s(name)),
            ("port", Value::from(port)),
            ("targetPort", s(name)),
            ("protocol", s("TCP")),
            ("appProtocol", s(protocol)),
        ])
    };
    seq([
        port("grpc", GRPC_PORT, "grpc"),
        port("http", HTTP_PORT, "http"),
    ])
}

/// The Service proxies and the CLI dial: `remora-control.<ns>.svc:15012`.
pub(super) fn service(opts: &InstallOptions) -> Value {
    map([
        ("apiVersion", s("v1")),
        ("kind", s("Service")),
        ("metadata", metadata(opts, NAME)),
        (
            "spec",
            map([
                ("type", s("ClusterIP")),
                ("selector", selector()),
                ("ports", service_ports()),
            ]),
        ),
    ])
}

/// The headless Service: `remora-control-replicas.<ns>.svc` resolves to
/// every ready replica.
pub(super) fn replicas_service(opts: &InstallOptions) -> Value {
    map([
        ("apiVersion", s("v1")),
        ("kind", s("Service")),
        ("metadata", metadata(opts, REPLICAS_SERVICE)),
        (
            "spec",
            map([
                ("clusterIP", s("None")),
                ("selector", selector()),
                ("ports", service_ports()),
            ]),
        ),
    ])
}

/// The names in the server certificate: the Services' DNS names, and the
/// pod's IP (its `--advertise-address`).
fn server_names(opts: &InstallOptions) -> String {
    let (ns, domain) = (&opts.namespace, &opts.cluster_domain);
    let mut names = Vec::new();
    for service in [NAME, REPLICAS_SERVICE] {
        names.push(format!("{service}.{ns}"));
        names.push(format!("{service}.{ns}.svc"));
        names.push(format!("{service}.{ns}.svc.{domain}"));
    }
    names.push("$(POD_IP)".to_owned());
    names.join(",")
}

/// `remora-control`'s arguments (the image's entrypoint).
pub(super) fn args(opts: &InstallOptions) -> Vec<String> {
    let mut args: Vec<String> = [
        "serve",
        "--listen",
        &format!("0.0.0.0:{GRPC_PORT}"),
        "--http-listen",
        &format!("0.0.0.0:{HTTP_PORT}"),
        "--data-dir",
        DATA_DIR,
        "--trust-domain",
        &opts.trust_domain,
        "--server-name",
        &server_names(opts),
    ]
    .map(str::to_owned)
    .to_vec();
    match &opts.store {
        StoreChoice::Etcd {
            endpoints,
            tls_secret,
            prefix,
            ..
        } => {
            let more = [
                "--store".to_owned(),
                "etcd".to_owned(),
                "--etcd-endpoints".to_owned(),
                endpoints.join(","),
                "--kek-file".to_owned(),
                format!("{KEK_DIR}/kek"),
                "--advertise-address".to_owned(),
                format!("$(POD_IP):{GRPC_PORT}"),
            ];
            args.extend(more);
            if let Some(prefix) = prefix {
                args.extend(["--etcd-prefix".to_owned(), prefix.clone()]);
            }
            if tls_secret.is_some() {
                for (flag, file) in [
                    ("--etcd-ca-file", "ca.crt"),
                    ("--etcd-cert-file", "tls.crt"),
                    ("--etcd-key-file", "tls.key"),
                ] {
                    args.extend([flag.to_owned(), format!("{ETCD_TLS_DIR}/{file}")]);
                }
            }
        }
        StoreChoice::Embedded { .. } => {
            args.extend(["--store".to_owned(), "embedded".to_owned()]);
        }
    }
    args
}

fn field_env(name: &str, path: &str) -> Value {
    map([
        ("name", s(name)),
        (
            "valueFrom",
            map([("fieldRef", map([("fieldPath", s(path))]))]),
        ),
    ])
}

fn probe(path: &str, period: i64, failures: i64) -> Value {
    map([
        ("httpGet", map([("path", s(path)), ("port", s("http"))])),
        ("periodSeconds", Value::from(period)),
        ("timeoutSeconds", Value::from(2)),
        ("failureThreshold", Value::from(failures)),
    ])
}

fn container(opts: &InstallOptions) -> Value {
    let port = |name: &str, port: u16| {
        map([
            ("name", s(name)),
            ("containerPort", Value::from(port)),
            ("protocol", s("TCP")),
        ])
    };
    let mount = |name: &str, path: &str, read_only: bool| {
        map([
            ("name", s(name)),
            ("mountPath", s(path)),
            ("readOnly", Value::Bool(read_only)),
        ])
    };
    let mut mounts = vec![mount("data", DATA_DIR, false), mount("tmp", "/tmp", false)];
    if let StoreChoice::Etcd { tls_secret, .. } = &opts.store {
        mounts.push(mount("kek", KEK_DIR, true));
        if tls_secret.is_some() {
            mounts.push(mount("etcd-tls", ETCD_TLS_DIR, true));
        }
    }
    map([
        ("name", s(NAME)),
        ("image", s(&opts.image)),
        ("imagePullPolicy", s("IfNotPresent")),
        ("args", strings(args(opts))),
        (
            "env",
            seq([
                field_env("POD_IP", "status.podIP"),
                field_env("POD_NAME", "metadata.name"),
            ]),
        ),
        (
            "ports",
            seq([port("grpc", GRPC_PORT), port("http", HTTP_PORT)]),
        ),
        // Up to a minute to open the store (etcd may be electing a leader).
        ("startupProbe", probe("/live", 2, 30)),
        ("readinessProbe", probe("/ready", 5, 3)),
        ("livenessProbe", probe("/live", 10, 3)),
        (
            "resources",
            map([
                (
                    "requests",
                    map([("cpu", s("100m")), ("memory", s("128Mi"))]),
                ),
                ("limits", map([("memory", s("512Mi"))])),
            ]),
        ),
        (
            "securityContext",
            map([
                ("runAsNonRoot", Value::Bool(true)),
                ("runAsUser", Value::from(UID)),
                ("runAsGroup", Value::from(UID)),
                ("readOnlyRootFilesystem", Value::Bool(true)),
                ("allowPrivilegeEscalation", Value::Bool(false)),
                ("privileged", Value::Bool(false)),
                ("capabilities", map([("drop", strings(["ALL"]))])),
            ]),
        ),
        ("volumeMounts", seq(mounts)),
    ])
}

fn volumes(opts: &InstallOptions) -> Value {
    let secret = |name: &str, secret: &str, keys: &[&str]| {
        map([
            ("name", s(name)),
            (
                "secret",
                map([
                    ("secretName", s(secret)),
                    ("defaultMode", Value::from(SECRET_MODE)),
                    (
                        "items",
                        seq(keys.iter().map(|k| map([("key", s(k)), ("path", s(k))]))),
                    ),
                ]),
            ),
        ])
    };
    let empty_dir = |name: &str| {
        map([
            ("name", s(name)),
            ("emptyDir", Value::Mapping(Mapping::new())),
        ])
    };
    let mut volumes = Vec::new();
    match &opts.store {
        StoreChoice::Etcd {
            tls_secret,
            kek_secret,
            ..
        } => {
            // The replica's own files only (its trust-bundle.pem, caches):
            // what replicas share is in etcd.
            volumes.push(empty_dir("data"));
            volumes.push(secret("kek", kek_secret, &["kek"]));
            if let Some(tls) = tls_secret {
                volumes.push(secret("etcd-tls", tls, &["ca.crt", "tls.crt", "tls.key"]));
            }
        }
        StoreChoice::Embedded { .. } => volumes.push(map([
            ("name", s("data")),
            ("persistentVolumeClaim", map([("claimName", s(DATA_CLAIM))])),
        ])),
    }
    volumes.push(empty_dir("tmp"));
    seq(volumes)
}

/// Replicas spread over nodes (at most one more on any node than on
/// another), and over zones where the cluster has them.
fn spread() -> Value {
    let constraint = |key: &str, when: &str| {
        map([
            ("maxSkew", Value::from(1)),
            ("topologyKey", s(key)),
            ("whenUnsatisfiable", s(when)),
            ("labelSelector", map([("matchLabels", selector())])),
        ])
    };
    seq([
        constraint("kubernetes.io/hostname", "DoNotSchedule"),
        constraint("topology.kubernetes.io/zone", "ScheduleAnyway"),
    ])
}

pub(super) fn deployment(opts: &InstallOptions) -> Value {
    let strategy = match opts.store {
        // One replica uses one volume at a time: the old pod goes first.
        StoreChoice::Embedded { .. } => map([("type", s("Recreate"))]),
        StoreChoice::Etcd { .. } => map([
            ("type", s("RollingUpdate")),
            (
                "rollingUpdate",
                map([
                    ("maxUnavailable", Value::from(1)),
                    ("maxSurge", Value::from(1)),
                ]),
            ),
        ]),
    };
    let pod_spec = map([
        ("serviceAccountName", s(NAME)),
        ("automountServiceAccountToken", Value::Bool(false)),
        ("enableServiceLinks", Value::Bool(false)),
        ("terminationGracePeriodSeconds", Value::from(30)),
        (
            "securityContext",
            map([
                ("runAsNonRoot", Value::Bool(true)),
                ("runAsUser", Value::from(UID)),
                ("runAsGroup", Value::from(UID)),
                ("fsGroup", Value::from(UID)),
                ("seccompProfile", map([("type", s("RuntimeDefault"))])),
            ]),
        ),
        ("topologySpreadConstraints", spread()),
        ("containers", seq([container(opts)])),
        ("volumes", volumes(opts)),
    ]);
    map([
        ("apiVersion", s("apps/v1")),
        ("kind", s("Deployment")),
        ("metadata", metadata(opts, NAME)),
        (
            "spec",
            map([
                ("replicas", Value::from(opts.replicas)),
                ("selector", map([("matchLabels", selector())])),
                ("strategy", strategy),
                (
                    "template",
                    map([
                        (
                            "metadata",
                            map([
                                ("labels", labels()),
                                // `remora-control inject` leaves the control plane alone.
                                (
                                    "annotations",
                                    map([(crate::cli::inject::ANNOTATION_INJECT, s("false"))]),
                                ),
                            ]),
                        ),
                        ("spec", pod_spec),
                    ]),
                ),
            ]),
        ),
    ])
}

/// All replicas but one stay up through voluntary disruptions (drains).
pub(super) fn disruption_budget(opts: &InstallOptions) -> Value {
    map([
        ("apiVersion", s("policy/v1")),
        ("kind", s("PodDisruptionBudget")),
        ("metadata", metadata(opts, NAME)),
        (
            "spec",
            map([
                ("minAvailable", Value::from(opts.replicas.saturating_sub(1))),
                ("selector", map([("matchLabels", selector())])),
            ]),
        ),
    ])
}
