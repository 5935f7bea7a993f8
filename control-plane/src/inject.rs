//! `remora-control inject`: adds the mesh to Kubernetes workloads.
//!
//! Every Pod, Deployment, StatefulSet, DaemonSet, Job and CronJob of a
//! multi-document manifest gets, in its pod template:
//!
//! - the init container `remora-init` (`remora-proxy init`: the iptables rules,
//!   with NET_ADMIN and NET_RAW only), first among the init containers;
//! - the proxy `remora-proxy` as a native sidecar: an init container with
//!   `restartPolicy: Always`, which Kubernetes ≥ 1.29 starts (and waits for its
//!   startup probe) before the app and stops after it;
//! - the volumes `remora-token` and `remora-ca` (ConfigMap
//!   `remora-trust-bundle`, key `ca.pem`).
//!
//! The token volume holds what proves the proxy's identity to the control
//! plane (`REMORA_TOKEN_FILE` points at it):
//!
//! - by default (`--token-source projected`), a projected ServiceAccount
//!   token for the audience `--token-audience` (`remora`), valid one hour and
//!   refreshed by the kubelet (the proxy reads the file again at every
//!   renewal), which a control plane started with `--kubernetes-issuer`
//!   accepts. The identity it proves is `ns/<namespace>/sa/<ServiceAccount>`,
//!   so the pod must run as ServiceAccount `<service>`: `serviceAccountName`
//!   is set to it when the pod names none, a pod naming another is refused,
//!   and a `ServiceAccount` `<service>` is added to the output (before the
//!   workload) unless the manifest has one;
//! - with `--token-source secret`, the Secret `remora-token-<service>` (key
//!   `token`) holding a bootstrap token (`remora-control token create`).
//!
//! Other documents pass through unchanged, in order; a `kind: List` has its
//! items injected. Fields the injector does not know survive (documents are
//! handled as YAML values, key order kept); comments do not. A template that
//! already has `remora-proxy` is left as is, so injecting twice gives the same
//! output as injecting once. Pods on the host's network are never injected.
//!
//! Annotations, on the pod template or else on the workload:
//!
//! | annotation | effect |
//! | --- | --- |
//! | `remora.dev/inject: "false"` | leave this workload out |
//! | `remora.dev/service` | the mesh service name (else label `app`, else the workload's name) |
//! | `remora.dev/exclude-inbound-ports: "22,9090"` | inbound ports not intercepted |
//! | `remora.dev/exclude-outbound-ports` | outbound ports not intercepted |
//! | `remora.dev/exclude-outbound-cidrs: "10.0.0.0/8"` | destinations not intercepted |
//! | `remora.dev/proxy-image` | the proxy (and init) image |
//! | `remora.dev/proxy-workers: "2"` | the proxy's data-plane threads (`REMORA_WORKERS`; default 1, match the proxy's CPU limit) |

use std::net::IpAddr;

use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

pub const DEFAULT_PROXY_IMAGE: &str = "ghcr.io/remora-mesh/remora-proxy:0.1.0";
pub const DEFAULT_CONTROL_PLANE: &str = "remora-control.remora-system.svc:15012";

pub const INIT_CONTAINER: &str = "remora-init";
pub const PROXY_CONTAINER: &str = "remora-proxy";
pub const TOKEN_VOLUME: &str = "remora-token";
pub const CA_VOLUME: &str = "remora-ca";
/// The ConfigMap holding the trust bundle (key `ca.pem`).
pub const TRUST_BUNDLE_CONFIGMAP: &str = "remora-trust-bundle";
pub const TOKEN_DIR: &str = "/var/run/remora/token";
/// The token's file name in [`TOKEN_DIR`].
pub const TOKEN_FILE: &str = "token";
/// The projected ServiceAccount token's lifetime (the kubelet refreshes it
/// at 80% of it).
pub const TOKEN_EXPIRATION_SECONDS: i64 = 3600;
pub const CA_DIR: &str = "/var/run/remora/ca";

pub const ANNOTATION_INJECT: &str = "remora.dev/inject";
pub const ANNOTATION_SERVICE: &str = "remora.dev/service";
pub const ANNOTATION_EXCLUDE_INBOUND_PORTS: &str = "remora.dev/exclude-inbound-ports";
pub const ANNOTATION_EXCLUDE_OUTBOUND_PORTS: &str = "remora.dev/exclude-outbound-ports";
pub const ANNOTATION_EXCLUDE_OUTBOUND_CIDRS: &str = "remora.dev/exclude-outbound-cidrs";
pub const ANNOTATION_PROXY_IMAGE: &str = "remora.dev/proxy-image";
pub const ANNOTATION_PROXY_WORKERS: &str = "remora.dev/proxy-workers";

/// The proxy's UID and GID (the iptables rules never redirect this UID).
const PROXY_UID: i64 = 1337;
const OUTBOUND_PORT: u16 = 15001;
const INBOUND_PORT: u16 = 15006;
const HEALTH_PORT: u16 = 15020;

/// What the token volume holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenSource {
    /// A projected ServiceAccount token (the pod runs as ServiceAccount
    /// `<service>`).
    #[default]
    Projected,
    /// The Secret `remora-token-<service>` with a bootstrap token.
    Secret,
}

/// What every injected proxy is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectOptions {
    /// The proxy image, also used for the init container.
    pub proxy_image: String,
    /// The control plane's gRPC address (`REMORA_CONTROL_PLANE`).
    pub control_plane: String,
    /// The OTLP/gRPC collector (`REMORA_OTLP_ENDPOINT`), if traces are exported.
    pub otlp_endpoint: Option<String>,
    /// What proves the proxy's identity.
    pub token_source: TokenSource,
    /// The projected token's audience (the control plane's
    /// `--kubernetes-audience`).
    pub token_audience: String,
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            proxy_image: DEFAULT_PROXY_IMAGE.to_owned(),
            control_plane: DEFAULT_CONTROL_PLANE.to_owned(),
            otlp_endpoint: None,
            token_source: TokenSource::Projected,
            token_audience: crate::kubernetes::DEFAULT_AUDIENCE.to_owned(),
        }
    }
}

/// Why a manifest cannot be injected: which document, and what is wrong where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("document {document}{what}: {field}: {message}")]
pub struct InjectError {
    /// 1-based index of the document within the manifest.
    pub document: usize,
    /// " (Kind namespace/name)" when known.
    pub what: String,
    /// The offending field's path, such as `spec.template`, or `(yaml)`.
    pub field: String,
    pub message: String,
}

/// Adds the mesh to every workload of `manifest_yaml` (one or more documents).
pub fn inject(manifest_yaml: &str, opts: &InjectOptions) -> Result<String, InjectError> {
    let mut documents = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(manifest_yaml).enumerate() {
        let document = i + 1;
        let value = Value::deserialize(de).map_err(|e| InjectError {
            document,
            what: String::new(),
            field: "(yaml)".into(),
            message: e.to_string(),
        })?;
        if value.is_null() {
            continue; // an empty document, such as after a trailing `---`
        }
        documents.push((document, value));
    }
    // The ServiceAccounts the manifest already has, wherever they are.
    let mut accounts = Accounts::default();
    for (_, value) in &documents {
        accounts.note(value);
    }
    let mut out = Vec::new();
    let write = |document: usize, value: &Value| {
        serde_yaml_ng::to_string(value).map_err(|e| InjectError {
            document,
            what: String::new(),
            field: "(yaml)".into(),
            message: format!("cannot write the document back: {e}"),
        })
    };
    for (document, mut value) in documents {
        let added = inject_object(&mut value, opts, &mut accounts).map_err(|e| e.at(document))?;
        for account in &added {
            out.push(write(document, account)?);
        }
        out.push(write(document, &value)?);
    }
    Ok(out.join("---\n"))
}

/// The ServiceAccounts of the manifest, and those added to it.
#[derive(Default)]
struct Accounts {
    /// (namespace, name); a namespace left out matches any.
    known: Vec<(Option<String>, String)>,
}

impl Accounts {
    /// Notes the ServiceAccounts `value` is or holds (as a `List`).
    fn note(&mut self, value: &Value) {
        let kind = value.get("kind").and_then(Value::as_str);
        let api_version = value.get("apiVersion").and_then(Value::as_str);
        match (api_version, kind) {
            (Some("v1"), Some("ServiceAccount")) => {
                let meta = value.get("metadata");
                let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str);
                let ns = meta
                    .and_then(|m| m.get("namespace"))
                    .and_then(Value::as_str);
                if let Some(name) = name {
                    self.known.push((ns.map(str::to_owned), name.to_owned()));
                }
            }
            (Some("v1"), Some("List")) => {
                for item in value
                    .get("items")
                    .and_then(Value::as_sequence)
                    .into_iter()
                    .flatten()
                {
                    self.note(item);
                }
            }
            _ => {}
        }
    }

    /// A new `ServiceAccount` `name` in `namespace`, unless there is one.
    fn add(&mut self, namespace: Option<&str>, name: &str) -> Option<Value> {
        let exists = self.known.iter().any(|(ns, n)| {
            n == name && (ns.is_none() || namespace.is_none() || ns.as_deref() == namespace)
        });
        if exists {
            return None;
        }
        self.known
            .push((namespace.map(str::to_owned), name.to_owned()));
        let mut meta = Mapping::new();
        meta.insert(s("name"), s(name));
        if let Some(ns) = namespace {
            meta.insert(s("namespace"), s(ns));
        }
        Some(map([
            ("apiVersion", s("v1")),
            ("kind", s("ServiceAccount")),
            ("metadata", Value::Mapping(meta)),
        ]))
    }
}

/// Whether `name` can name a ServiceAccount (a DNS-1123 subdomain).
fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// An error inside one document, before its index is known.
struct Problem {
    what: String,
    field: String,
    message: String,
}

impl Problem {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            what: String::new(),
            field: field.into(),
            message: message.into(),
        }
    }

    fn at(self, document: usize) -> InjectError {
        InjectError {
            document,
            what: self.what,
            field: self.field,
            message: self.message,
        }
    }
}

/// Where a kind keeps its pod template.
fn template_path(api_version: &str, kind: &str) -> Option<&'static [&'static str]> {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    match (group, kind) {
        ("", "Pod") => Some(&[]),
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet") => Some(&["spec", "template"]),
        ("batch", "Job") => Some(&["spec", "template"]),
        ("batch", "CronJob") => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// Injects one object; the ServiceAccounts to add before it.
fn inject_object(
    doc: &mut Value,
    opts: &InjectOptions,
    accounts: &mut Accounts,
) -> Result<Vec<Value>, Problem> {
    let Some(obj) = doc.as_mapping_mut() else {
        return Err(Problem::new(
            "(document)",
            format!(
                "expected a mapping (a Kubernetes object), found {}",
                type_name(doc)
            ),
        ));
    };
    let kind = str_field(obj, "kind")
        .ok_or_else(|| Problem::new("kind", "missing: not a Kubernetes object"))?
        .to_owned();
    let api_version = str_field(obj, "apiVersion").unwrap_or_default().to_owned();
    let what = describe(&kind, obj);
    let with_what = |mut p: Problem| {
        p.what.clone_from(&what);
        p
    };
    if kind == "List" && api_version == "v1" {
        let Some(items) = obj.get_mut("items").and_then(Value::as_sequence_mut) else {
            return Ok(Vec::new());
        };
        // Added ServiceAccounts go into the list, before their workload.
        let mut injected = Vec::with_capacity(items.len());
        for (i, mut item) in std::mem::take(items).into_iter().enumerate() {
            let added = inject_object(&mut item, opts, accounts).map_err(|mut p| {
                p.what = format!("{what}, items[{i}]{}", p.what);
                p
            })?;
            injected.extend(added);
            injected.push(item);
        }
        *items = injected;
        return Ok(Vec::new());
    }
    let Some(path) = template_path(&api_version, &kind) else {
        return Ok(Vec::new());
    };
    let namespace = obj
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let workload = Workload {
        name: obj
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        labels: string_map(obj.get("metadata").and_then(|m| m.get("labels"))),
        annotations: string_map(obj.get("metadata").and_then(|m| m.get("annotations"))),
    };
    let mut template = &mut *obj;
    for (depth, key) in path.iter().enumerate() {
        let field = path[..=depth].join(".");
        template = template
            .get_mut(*key)
            .ok_or_else(|| with_what(Problem::new(&field, "missing")))?
            .as_mapping_mut()
            .ok_or_else(|| with_what(Problem::new(&field, "not a mapping")))?;
    }
    let prefix = path.join(".");
    let account = inject_template(template, &workload, opts).map_err(|mut p| {
        if !prefix.is_empty() {
            p.field = format!("{prefix}.{}", p.field);
        }
        with_what(p)
    })?;
    Ok(account
        .and_then(|name| accounts.add(namespace.as_deref(), &name))
        .into_iter()
        .collect())
}

/// The workload around a pod template (the Pod itself for a Pod).
struct Workload {
    name: Option<String>,
    labels: Vec<(String, String)>,
    annotations: Vec<(String, String)>,
}

/// Injects one pod template (`metadata` + `spec`), unless it opted out or
/// already has the proxy. The ServiceAccount it runs as, when it must exist
/// for a projected token.
fn inject_template(
    template: &mut Mapping,
    workload: &Workload,
    opts: &InjectOptions,
) -> Result<Option<String>, Problem> {
    let labels = string_map(template.get("metadata").and_then(|m| m.get("labels")));
    let annotations = string_map(template.get("metadata").and_then(|m| m.get("annotations")));
    // The template's annotation wins over the workload's.
    let annotation = |key: &str| {
        lookup(&annotations, key)
            .or_else(|| lookup(&workload.annotations, key))
            .map(str::trim)
    };
    if annotation(ANNOTATION_INJECT).is_some_and(|v| v.eq_ignore_ascii_case("false")) {
        return Ok(None);
    }
    let spec = template
        .get_mut("spec")
        .ok_or_else(|| Problem::new("spec", "missing"))?
        .as_mapping_mut()
        .ok_or_else(|| Problem::new("spec", "not a mapping"))?;
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        // iptables rules would land in the node's own network namespace.
        return Ok(None);
    }
    let containers = spec
        .get("containers")
        .ok_or_else(|| Problem::new("spec.containers", "missing"))?
        .as_sequence()
        .ok_or_else(|| Problem::new("spec.containers", "not a list"))?;
    if containers.is_empty() {
        return Err(Problem::new("spec.containers", "empty"));
    }
    let init_containers = match spec.get("initContainers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Sequence(s)) => s.clone(),
        Some(_) => return Err(Problem::new("spec.initContainers", "not a list")),
    };
    let named = |c: &Value, name: &str| c.get("name").and_then(Value::as_str) == Some(name);
    if init_containers
        .iter()
        .chain(containers)
        .any(|c| named(c, PROXY_CONTAINER))
    {
        return Ok(None); // already injected
    }

    let service = annotation(ANNOTATION_SERVICE)
        .filter(|s| !s.is_empty())
        .or_else(|| lookup(&labels, "app"))
        .or_else(|| lookup(&workload.labels, "app"))
        .or(workload.name.as_deref())
        .ok_or_else(|| {
            Problem::new(
                "metadata",
                format!(
                    "no service name: set annotation {ANNOTATION_SERVICE}, label app or a name"
                ),
            )
        })?
        .to_owned();
    let app_port = first_container_port(containers)?;
    if opts.token_source == TokenSource::Projected {
        service_account_of(spec, &service)?;
    }
    let image = annotation(ANNOTATION_PROXY_IMAGE)
        .filter(|s| !s.is_empty())
        .unwrap_or(&opts.proxy_image)
        .to_owned();
    let mut init_args = vec![s("init")];
    for (key, flag, noun, check) in EXCLUSIONS {
        let Some(list) = annotation(key) else {
            continue;
        };
        let items: Vec<&str> = list
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        if let Some(bad) = items.iter().find(|p| !check(p)) {
            return Err(Problem::new(
                format!("metadata.annotations.{key}"),
                format!("{bad:?} is not a valid {noun}"),
            ));
        }
        if !items.is_empty() {
            init_args.push(s(flag));
            init_args.push(s(&items.join(",")));
        }
    }
    let version = lookup(&labels, "version").or_else(|| lookup(&workload.labels, "version"));
    let workers = match annotation(ANNOTATION_PROXY_WORKERS).map(str::trim) {
        None | Some("") => None,
        Some(w) => match w.parse::<u16>() {
            Ok(n) => Some(n),
            Err(_) => {
                return Err(Problem::new(
                    format!("metadata.annotations.{ANNOTATION_PROXY_WORKERS}"),
                    format!("{w:?} is not a number of threads (0: one per core)"),
                ))
            }
        },
    };

    let mut new_init = vec![
        init_container(&image, init_args),
        proxy_container(&image, &service, app_port, version, workers, opts),
    ];
    new_init.extend(
        init_containers
            .into_iter()
            .filter(|c| !named(c, INIT_CONTAINER)),
    );
    spec.insert(s("initContainers"), Value::Sequence(new_init));

    let mut volumes = match spec.get("volumes") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Sequence(v)) => v.clone(),
        Some(_) => return Err(Problem::new("spec.volumes", "not a list")),
    };
    volumes.retain(|v| !named(v, TOKEN_VOLUME) && !named(v, CA_VOLUME));
    volumes.push(token_volume(&service, opts));
    volumes.push(map([
        ("name", s(CA_VOLUME)),
        ("configMap", map([("name", s(TRUST_BUNDLE_CONFIGMAP))])),
    ]));
    spec.insert(s("volumes"), Value::Sequence(volumes));
    if opts.token_source == TokenSource::Projected {
        spec.insert(s("serviceAccountName"), s(&service));
        Ok(Some(service))
    } else {
        Ok(None)
    }
}

/// Checks that the pod may run as ServiceAccount `service` (the identity a
/// projected token proves is its ServiceAccount's).
fn service_account_of(spec: &Mapping, service: &str) -> Result<(), Problem> {
    if !is_dns_subdomain(service) {
        return Err(Problem::new(
            "metadata",
            format!(
                "the service name {service:?} cannot name the pod's ServiceAccount (lowercase \
                 letters, digits, '-' and '.'): set annotation {ANNOTATION_SERVICE}, or inject \
                 with --token-source secret"
            ),
        ));
    }
    for field in ["serviceAccountName", "serviceAccount"] {
        match spec.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::String(name)) if name == service => {}
            Some(Value::String(name)) if name.is_empty() => {}
            Some(other) => {
                let named = match other {
                    Value::String(name) => format!("{name:?}"),
                    other => type_name(other).to_owned(),
                };
                return Err(Problem::new(
                    format!("spec.{field}"),
                    format!(
                        "the pod runs as ServiceAccount {named}, but its mesh identity is \
                         ns/<namespace>/sa/{service} and its projected token proves its \
                         ServiceAccount's: run it as ServiceAccount {service:?} (or leave \
                         {field} out), name the service after the ServiceAccount \
                         (annotation {ANNOTATION_SERVICE}), or inject with --token-source secret"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The volume `REMORA_TOKEN_FILE` is in.
fn token_volume(service: &str, opts: &InjectOptions) -> Value {
    let source = match opts.token_source {
        TokenSource::Projected => (
            "projected",
            map([(
                "sources",
                Value::Sequence(vec![map([(
                    "serviceAccountToken",
                    map([
                        ("audience", s(&opts.token_audience)),
                        ("expirationSeconds", Value::from(TOKEN_EXPIRATION_SECONDS)),
                        ("path", s(TOKEN_FILE)),
                    ]),
                )])]),
            )]),
        ),
        TokenSource::Secret => (
            "secret",
            map([("secretName", s(&format!("remora-token-{service}")))]),
        ),
    };
    map([("name", s(TOKEN_VOLUME)), source])
}

/// `remora-proxy init`, with the capabilities iptables needs and nothing else.
fn init_container(image: &str, args: Vec<Value>) -> Value {
    map([
        ("name", s(INIT_CONTAINER)),
        ("image", s(image)),
        ("args", Value::Sequence(args)),
        (
            "securityContext",
            map([
                (
                    "capabilities",
                    map([
                        ("add", seq(&["NET_ADMIN", "NET_RAW"])),
                        ("drop", seq(&["ALL"])),
                    ]),
                ),
                ("runAsUser", Value::from(0)),
                ("runAsNonRoot", Value::Bool(false)),
                ("allowPrivilegeEscalation", Value::Bool(false)),
            ]),
        ),
    ])
}

/// The proxy as a native sidecar.
fn proxy_container(
    image: &str,
    service: &str,
    app_port: Option<i64>,
    version: Option<&str>,
    workers: Option<u16>,
    opts: &InjectOptions,
) -> Value {
    let field_ref = |name: &str, path: &str| {
        map([
            ("name", s(name)),
            (
                "valueFrom",
                map([("fieldRef", map([("fieldPath", s(path))]))]),
            ),
        ])
    };
    let value = |name: &str, v: &str| map([("name", s(name)), ("value", s(v))]);
    let mut env = vec![
        value("REMORA_CONTROL_PLANE", &opts.control_plane),
        value("REMORA_SERVICE", service),
        field_ref("REMORA_NAMESPACE", "metadata.namespace"),
        field_ref("REMORA_INSTANCE_ID", "metadata.name"),
        field_ref("POD_IP", "status.podIP"),
    ];
    if let Some(port) = app_port {
        env.push(value("REMORA_ADVERTISE", &format!("$(POD_IP):{port}")));
    }
    if let Some(v) = version {
        env.push(value("REMORA_LABELS", &format!("version={v}")));
    }
    env.push(value(
        "REMORA_TOKEN_FILE",
        &format!("{TOKEN_DIR}/{TOKEN_FILE}"),
    ));
    env.push(value("REMORA_CA_FILE", &format!("{CA_DIR}/ca.pem")));
    if let Some(otlp) = &opts.otlp_endpoint {
        env.push(value("REMORA_OTLP_ENDPOINT", otlp));
    }
    if let Some(w) = workers {
        env.push(value("REMORA_WORKERS", &w.to_string()));
    }
    let port = |name: &str, port: u16| {
        map([
            ("name", s(name)),
            ("containerPort", Value::from(port)),
            ("protocol", s("TCP")),
        ])
    };
    let probe = |path: &str, period: u16, failures: u16| {
        map([
            (
                "httpGet",
                map([("path", s(path)), ("port", Value::from(HEALTH_PORT))]),
            ),
            ("periodSeconds", Value::from(period)),
            ("failureThreshold", Value::from(failures)),
        ])
    };
    map([
        ("name", s(PROXY_CONTAINER)),
        ("image", s(image)),
        ("args", seq(&["run"])),
        ("restartPolicy", s("Always")),
        ("env", Value::Sequence(env)),
        (
            "ports",
            Value::Sequence(vec![
                port("remora-outbound", OUTBOUND_PORT),
                port("remora-inbound", INBOUND_PORT),
                port("remora-health", HEALTH_PORT),
            ]),
        ),
        // The app starts once this passes: up to a minute for the first certificate.
        ("startupProbe", probe("/ready", 1, 60)),
        ("readinessProbe", probe("/ready", 5, 3)),
        ("livenessProbe", probe("/live", 10, 3)),
        (
            "resources",
            map([
                ("requests", map([("cpu", s("10m")), ("memory", s("20Mi"))])),
                ("limits", map([("memory", s("64Mi"))])),
            ]),
        ),
        (
            "securityContext",
            map([
                ("runAsUser", Value::from(PROXY_UID)),
                ("runAsGroup", Value::from(PROXY_UID)),
                ("runAsNonRoot", Value::Bool(true)),
                ("readOnlyRootFilesystem", Value::Bool(true)),
                ("allowPrivilegeEscalation", Value::Bool(false)),
                ("capabilities", map([("drop", seq(&["ALL"]))])),
            ]),
        ),
        (
            "volumeMounts",
            Value::Sequence(vec![
                map([
                    ("name", s(TOKEN_VOLUME)),
                    ("mountPath", s(TOKEN_DIR)),
                    ("readOnly", Value::Bool(true)),
                ]),
                map([
                    ("name", s(CA_VOLUME)),
                    ("mountPath", s(CA_DIR)),
                    ("readOnly", Value::Bool(true)),
                ]),
            ]),
        ),
    ])
}

/// An exclusion annotation, its `remora-proxy init` flag, what its items are
/// and how each is checked.
type Exclusion = (&'static str, &'static str, &'static str, fn(&str) -> bool);

const EXCLUSIONS: [Exclusion; 3] = [
    (
        ANNOTATION_EXCLUDE_INBOUND_PORTS,
        "--exclude-inbound-ports",
        "port",
        check_port,
    ),
    (
        ANNOTATION_EXCLUDE_OUTBOUND_PORTS,
        "--exclude-outbound-ports",
        "port",
        check_port,
    ),
    (
        ANNOTATION_EXCLUDE_OUTBOUND_CIDRS,
        "--exclude-outbound-cidrs",
        "CIDR",
        check_cidr,
    ),
];

/// The first `containerPort` of the app's containers, in order, if any.
fn first_container_port(containers: &[Value]) -> Result<Option<i64>, Problem> {
    for (i, c) in containers.iter().enumerate() {
        let Some(ports) = c.get("ports") else {
            continue;
        };
        let Some(ports) = ports.as_sequence() else {
            return Err(Problem::new(
                format!("spec.containers[{i}].ports"),
                "not a list",
            ));
        };
        if let Some(first) = ports.first() {
            let port = first.get("containerPort").and_then(Value::as_i64);
            return match port {
                Some(p) if (1..=65535).contains(&p) => Ok(Some(p)),
                _ => Err(Problem::new(
                    format!("spec.containers[{i}].ports[0].containerPort"),
                    "missing or not a port number",
                )),
            };
        }
    }
    Ok(None)
}

fn check_port(p: &str) -> bool {
    p.parse::<u16>().is_ok_and(|p| p != 0)
}

fn check_cidr(c: &str) -> bool {
    let (ip, len) = c.split_once('/').unwrap_or((c, ""));
    let Ok(ip) = ip.parse::<IpAddr>() else {
        return false;
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    len.is_empty() || len.parse::<u8>().is_ok_and(|l| l <= max)
}

// ------------------------------------------------------------------ YAML helpers

fn s(text: &str) -> Value {
    Value::String(text.to_owned())
}

fn seq(items: &[&str]) -> Value {
    Value::Sequence(items.iter().map(|i| s(i)).collect())
}

/// A mapping with its keys in the order given.
fn map<const N: usize>(entries: [(&str, Value); N]) -> Value {
    let mut m = Mapping::with_capacity(N);
    for (k, v) in entries {
        m.insert(s(k), v);
    }
    Value::Mapping(m)
}

fn str_field<'a>(m: &'a Mapping, key: &str) -> Option<&'a str> {
    m.get(key).and_then(Value::as_str)
}

/// The string (or scalar) entries of a labels or annotations mapping.
fn string_map(v: Option<&Value>) -> Vec<(String, String)> {
    let Some(m) = v.and_then(Value::as_mapping) else {
        return Vec::new();
    };
    m.iter()
        .filter_map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Bool(b) => b.to_string(),
                Value::Number(n) => n.to_string(),
                _ => return None,
            };
            Some((k.as_str()?.to_owned(), v))
        })
        .collect()
}

fn lookup<'a>(entries: &'a [(String, String)], key: &str) -> Option<&'a str> {
    entries
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// " (Kind namespace/name)", or what of it is known.
fn describe(kind: &str, obj: &Mapping) -> String {
    let meta = obj.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str);
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str);
    match (ns, name) {
        (Some(ns), Some(name)) => format!(" ({kind} {ns}/{name})"),
        (None, Some(name)) => format!(" ({kind} {name})"),
        _ => format!(" ({kind})"),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

#[cfg(test)]
mod tests;
