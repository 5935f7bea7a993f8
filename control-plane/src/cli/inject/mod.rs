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

mod pod;
mod yaml;

use pod::inject_template;
use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};
use yaml::{describe, map, s, str_field, string_map, type_name};

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
            token_audience: crate::identity::kubernetes::DEFAULT_AUDIENCE.to_owned(),
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

#[cfg(test)]
mod tests;
