//! How the CLI shows answers: aligned tables, documents as YAML or JSON; and
//! where they go: every line the CLI prints goes through [`out`] (stdout) or
//! [`note`] (stderr), never `print!`/`println!`, which panic when the output
//! is gone (`| head -1`, a full disk).

use crate::human::{self, unix_time_or};
use remora_proto::policy::{Document, Kind, API_VERSION};
use remora_proto::v1::{
    HistoryEntry, ProxyStatus, ReplicaStatus, Resource, StatusResponse, TokenInfo,
};
use std::collections::HashMap;
use std::fmt::Display;
use std::io::Write as _;

/// The CLI's output (stdout) could not be written. `main` ends quietly with
/// exit 0 when the reader went away ([`WriteError::is_closed_pipe`], as with
/// `| head`), and reports anything else (a full disk) with exit 1.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the output")]
pub struct WriteError(#[source] pub std::io::Error);

impl WriteError {
    /// The reader closed the pipe (EPIPE).
    pub fn is_closed_pipe(&self) -> bool {
        self.0.kind() == std::io::ErrorKind::BrokenPipe
    }
}

/// Writes `text` to stdout as it is (it ends with its own newline, if any)
/// and flushes it, so a failure shows here rather than at exit.
pub fn out(text: impl Display) -> Result<(), WriteError> {
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{text}")
        .and_then(|()| stdout.flush())
        .map_err(WriteError)
}

/// Writes `line` and a newline to stdout (see [`out`]).
pub fn outln(line: impl Display) -> Result<(), WriteError> {
    out(format_args!("{line}\n"))
}

/// Writes `line` and a newline to stderr: notes and error messages. A failure
/// is ignored, since there is nowhere left to report it.
pub fn note(line: impl Display) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Columns separated by three spaces, padded to the widest cell; the last
/// column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        for (i, cell) in row.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths.get(i).copied().unwrap_or(0) - cell.chars().count();
                out.push_str(&" ".repeat(pad + 3));
            }
        }
        out.push('\n');
    }
    out
}

/// A resource as a whole document (apiVersion, kind, metadata, spec).
pub fn document(resource: &Resource) -> serde_json::Value {
    let parsed = Kind::parse(&resource.kind).and_then(|kind| {
        Document::from_parts(
            kind,
            &resource.namespace,
            &resource.name,
            &resource.spec_json,
        )
        .ok()
    });
    match parsed {
        Some(doc) => doc.to_value(),
        // A document the server holds but this CLI cannot validate (a newer
        // server): show it as it is rather than hide it.
        None => serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": resource.kind,
            "metadata": {"name": resource.name, "namespace": resource.namespace},
            "spec": serde_json::from_str::<serde_json::Value>(&resource.spec_json)
                .unwrap_or_else(|_| serde_json::Value::String(resource.spec_json.clone())),
        }),
    }
}

pub fn resources_table(resources: &[Resource]) -> String {
    let rows: Vec<Vec<String>> = resources
        .iter()
        .map(|r| vec![r.kind.clone(), r.namespace.clone(), r.name.clone()])
        .collect();
    table(&["KIND", "NAMESPACE", "NAME"], &rows)
}

pub fn resources_yaml(resources: &[Resource]) -> String {
    let docs: Vec<serde_json::Value> = resources.iter().map(document).collect();
    human::yaml(&docs)
}

pub fn resources_json(resources: &[Resource]) -> String {
    let docs: Vec<serde_json::Value> = resources.iter().map(document).collect();
    serde_json::to_string_pretty(&docs).unwrap_or_else(|_| "[]".into()) + "\n"
}

/// The first 12 hex characters of a signer id, or `-`.
fn short_id(id: &str) -> String {
    or_dash(human::short(id))
}

/// `token list`: USES is `used/max` (`used/-` without a limit).
pub fn tokens_table(tokens: &[TokenInfo]) -> String {
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            vec![
                t.token_id.clone(),
                t.spiffe_id.clone(),
                unix_time_or(t.created_unix, "-"),
                unix_time_or(t.expires_unix, "never"),
                human::uses(t.uses, t.max_uses),
                if t.revoked { "yes" } else { "no" }.to_string(),
            ]
        })
        .collect();
    table(
        &["ID", "IDENTITY", "CREATED", "EXPIRES", "USES", "REVOKED"],
        &rows,
    )
}

/// `remora-control status`: the versions, the CA signer (and a rotation in
/// progress), then a row per proxy.
pub fn status(status: &StatusResponse) -> String {
    let mut out = format!(
        "policy version {} (snapshot {})\n",
        status.policy_version, status.snapshot_version
    );
    out.push_str(&format!("CA signer {}\n", short_id(&status.signer_id)));
    if status.store == "etcd" {
        out.push_str(&format!(
            "store etcd: {} replicas, leader {}, answered by {}\n",
            status.replicas.len(),
            or_dash(&status.leader),
            status.replica
        ));
        out.push_str(&replicas_table(&status.replicas));
    }
    if !status.retiring_signer_id.is_empty() {
        let (old, new) = (
            short_id(&status.retiring_signer_id),
            short_id(&status.signer_id),
        );
        let pending = status
            .proxies
            .iter()
            .filter(|p| p.cert_signer_id != status.signer_id)
            .count();
        out.push_str(&format!(
            "root rotation in progress: retiring {old}, signing with {new}; \
             {pending} of {} connected proxies still run a certificate from another root\n",
            status.proxies.len()
        ));
        if status.rotation_waiting_for.is_empty() {
            out.push_str("  nothing uses the old root any more: it is retired within seconds\n");
        } else {
            out.push_str(&format!(
                "  the old root is retired once none of these uses it (each renews, leaves, or \
                 expires: by {} at the latest), or now with `remora-control ca rotate --finish`:\n",
                unix_time_or(status.rotation_deadline_unix, "?")
            ));
            for line in &status.rotation_waiting_for {
                out.push_str(&format!("  - {line}\n"));
            }
        }
    }
    if status.proxies.is_empty() {
        out.push_str("no proxies connected\n");
    } else {
        out.push_str(&status_table(&status.proxies));
    }
    out
}

/// The control-plane replicas (`--store etcd`).
pub fn replicas_table(replicas: &[ReplicaStatus]) -> String {
    let rows: Vec<Vec<String>> = replicas
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.address.clone(),
                r.version.clone(),
                r.proxies.to_string(),
                if r.leader { "yes" } else { "-" }.to_string(),
                human::unix_ms(r.started_unix_ms),
                or_dash(&r.error),
            ]
        })
        .collect();
    table(
        &[
            "REPLICA", "ADDRESS", "VERSION", "PROXIES", "LEADER", "STARTED", "ERROR",
        ],
        &rows,
    )
}

pub fn history_table(entries: &[HistoryEntry]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.version.to_string(),
                human::unix_ms(e.timestamp_unix_ms),
                e.action.clone(),
                e.resource_count.to_string(),
                e.summary.clone(),
            ]
        })
        .collect();
    table(
        &["VERSION", "TIME", "ACTION", "RESOURCES", "SUMMARY"],
        &rows,
    )
}

fn labels(labels: &HashMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    let mut pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    pairs.join(",")
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

pub fn status_table(proxies: &[ProxyStatus]) -> String {
    let rows: Vec<Vec<String>> = proxies
        .iter()
        .map(|p| {
            let nack = if p.last_nack_version.is_empty() {
                "-".to_string()
            } else {
                format!("{} ({})", p.last_nack_version, p.last_nack_error)
            };
            let address = if p.endpoint_registered || p.address.is_empty() {
                or_dash(&p.address)
            } else {
                format!("{} (deregistered)", p.address)
            };
            vec![
                p.service.clone(),
                p.namespace.clone(),
                p.instance_id.clone(),
                address,
                labels(&p.labels),
                or_dash(&p.acked_version),
                unix_time_or(p.cert_not_after_unix, "-"),
                short_id(&p.cert_signer_id),
                nack,
                or_dash(&p.replica),
            ]
        })
        .collect();
    let mut columns = vec![
        "SERVICE",
        "NAMESPACE",
        "INSTANCE",
        "ADDRESS",
        "LABELS",
        "ACKED",
        "CERT-EXPIRES",
        "SIGNER",
        "NACK",
        "REPLICA",
    ];
    let mut rows = rows;
    // One control plane: no replica column.
    if proxies.iter().all(|p| p.replica.is_empty()) {
        columns.pop();
        for row in &mut rows {
            row.pop();
        }
    }
    table(&columns, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_aligned() {
        let t = table(
            &["A", "BB"],
            &[vec!["xxx".into(), "y".into()], vec!["z".into(), "".into()]],
        );
        assert_eq!(t, "A     BB\nxxx   y\nz     \n");
    }

    #[test]
    fn resources_render_as_whole_documents() {
        let r = Resource {
            kind: "Service".into(),
            namespace: "shop".into(),
            name: "backend".into(),
            spec_json: r#"{"ports":[{"port":8080,"protocol":"http"}]}"#.into(),
        };
        let doc = document(&r);
        assert_eq!(doc["apiVersion"], API_VERSION);
        assert_eq!(doc["metadata"]["namespace"], "shop");
        assert_eq!(doc["spec"]["ports"][0]["port"], 8080);
        let yaml = resources_yaml(&[r.clone(), r]);
        assert_eq!(yaml.matches("---").count(), 1);
    }
}
