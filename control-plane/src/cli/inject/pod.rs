//! The pod-spec rewriting of [`super::inject`]: one pod template gets the
//! init container, the proxy as a native sidecar and their volumes, checked
//! against the annotations and the ServiceAccount it runs as.

use super::yaml::{lookup, map, s, seq, string_map, type_name};
use super::{
    InjectOptions, Problem, TokenSource, Workload, ANNOTATION_EXCLUDE_INBOUND_PORTS,
    ANNOTATION_EXCLUDE_OUTBOUND_CIDRS, ANNOTATION_EXCLUDE_OUTBOUND_PORTS, ANNOTATION_INJECT,
    ANNOTATION_PROXY_IMAGE, ANNOTATION_PROXY_WORKERS, ANNOTATION_SERVICE, CA_DIR, CA_VOLUME,
    INIT_CONTAINER, PROXY_CONTAINER, TOKEN_DIR, TOKEN_EXPIRATION_SECONDS, TOKEN_FILE, TOKEN_VOLUME,
    TRUST_BUNDLE_CONFIGMAP,
};
use serde_yaml_ng::{Mapping, Value};
use std::net::IpAddr;

/// The proxy's UID and GID (the iptables rules never redirect this UID).
const PROXY_UID: i64 = 1337;
const OUTBOUND_PORT: u16 = 15001;
const INBOUND_PORT: u16 = 15006;
const HEALTH_PORT: u16 = 15020;

/// Injects one pod template (`metadata` + `spec`), unless it opted out or
/// already has the proxy. The ServiceAccount it runs as, when it must exist
/// for a projected token.
pub(super) fn inject_template(
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
