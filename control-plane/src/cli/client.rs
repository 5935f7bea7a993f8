//! The operator's commands: each one calls the Admin API of a running control
//! plane and prints the answer (through [`output::out`], never `print!`).
//! Errors come back as [`anyhow::Error`] with a message meant for a person;
//! `main` prints them and exits 1.

use crate::cli::args::{ApplyArgs, Command, DeleteArgs, GetArgs, GlobalArgs, Output};
use crate::cli::connect::Admin;
use crate::cli::identity_commands;
use crate::cli::output::{self, note, out, outln};
use crate::human;
use anyhow::{bail, Context as _};
use remora_proto::v1::{
    ApplyRequest, ApplyResponse, DeleteRequest, DiffRequest, GetRequest, HistoryRequest,
    RollbackRequest, SourceFile, StatusRequest,
};
use std::io::Read as _;
use std::path::Path;

/// Runs one operator command (everything but `serve`).
pub async fn run(global: &GlobalArgs, command: Command) -> anyhow::Result<()> {
    // Read the input first, so that a bad path fails without a connection.
    let files = match &command {
        Command::Apply(args) => read_sources(&args.files)?,
        _ => Vec::new(),
    };
    let mut admin = Admin::connect(global).await?;
    match command {
        Command::Serve(_) => bail!("serve is not a client command"),
        Command::Inject(_) => bail!("inject is not a client command"),
        Command::Install(_) => bail!("install is not a client command"),
        Command::Apply(args) => apply(&mut admin, &args, files).await,
        Command::Get(args) => get(&mut admin, args).await,
        Command::Delete(args) => delete(&mut admin, args).await,
        Command::History => {
            let response = admin.client.history(HistoryRequest {}).await;
            let entries = response
                .map_err(|s| admin.error("history", s))?
                .into_inner()
                .entries;
            if entries.is_empty() {
                note("no versions yet");
            } else {
                out(output::history_table(&entries))?;
            }
            Ok(())
        }
        Command::Diff { from, to } => {
            let request = DiffRequest {
                from_version: from,
                to_version: to,
            };
            let response = admin.client.diff(request).await;
            let diff = response
                .map_err(|s| admin.error("diff", s))?
                .into_inner()
                .diff;
            if diff.is_empty() {
                note(format_args!("versions {from} and {to} are the same"));
            } else {
                out(diff)?;
            }
            Ok(())
        }
        Command::Rollback { version } => {
            let response = admin.client.rollback(RollbackRequest { version }).await;
            let response = response
                .map_err(|s| admin.error("rollback", s))?
                .into_inner();
            if response.changed {
                outln(format_args!(
                    "rolled back to version {version} as version {}",
                    response.version
                ))?;
            } else {
                outln(format_args!(
                    "unchanged at version {} (it equals version {version})",
                    response.version
                ))?;
            }
            print_results(&response)
        }
        Command::Status => {
            let response = admin.client.status(StatusRequest::default()).await;
            let status = response.map_err(|s| admin.error("status", s))?.into_inner();
            out(output::status(&status))?;
            Ok(())
        }
        Command::Token(command) => identity_commands::token(&mut admin, command).await,
        Command::Ca(command) => identity_commands::ca(&mut admin, command).await,
    }
}

fn print_results(response: &ApplyResponse) -> anyhow::Result<()> {
    for line in &response.results {
        outln(line)?;
    }
    Ok(())
}

async fn apply(admin: &mut Admin, args: &ApplyArgs, files: Vec<SourceFile>) -> anyhow::Result<()> {
    let request = ApplyRequest {
        files,
        dry_run: args.dry_run,
    };
    let response = admin.client.apply(request).await;
    let response = response.map_err(|s| admin.error("apply", s))?.into_inner();
    let summary = match (args.dry_run, response.changed) {
        (true, true) => "dry run: valid, would change version",
        (true, false) => "dry run: valid, unchanged at version",
        (false, true) => "applied version",
        (false, false) => "unchanged at version",
    };
    outln(format_args!("{summary} {}", response.version))?;
    print_results(&response)
}

async fn get(admin: &mut Admin, args: GetArgs) -> anyhow::Result<()> {
    let namespace = args.selected_namespace();
    let request = GetRequest {
        kind: args.kind.clone().unwrap_or_default(),
        name: args.name.clone().unwrap_or_default(),
        // Empty: every namespace.
        namespace: namespace.unwrap_or_default().to_string(),
        version: args.version.unwrap_or(0),
    };
    let response = admin.client.get(request).await;
    let response = response.map_err(|s| admin.error("get", s))?.into_inner();
    let place = namespace
        .map(|n| format!(" in namespace {n}"))
        .unwrap_or_default();
    if response.resources.is_empty() {
        if let (Some(kind), Some(name)) = (&args.kind, &args.name) {
            let hint = if args.namespace.is_none() && namespace.is_some() {
                " (-n NS: another namespace, -A: every namespace)"
            } else {
                ""
            };
            bail!(
                "{kind} {name}{place} not found at version {}{hint}",
                response.version
            );
        }
    }
    match args.output {
        Output::Table if response.resources.is_empty() => {
            note(format_args!(
                "no resources found{place} at version {}",
                response.version
            ));
        }
        Output::Table => out(output::resources_table(&response.resources))?,
        Output::Yaml => out(output::resources_yaml(&response.resources))?,
        Output::Json => out(output::resources_json(&response.resources))?,
    }
    Ok(())
}

async fn delete(admin: &mut Admin, args: DeleteArgs) -> anyhow::Result<()> {
    let request = DeleteRequest {
        kind: args.kind,
        name: args.name,
        namespace: args.namespace,
    };
    let response = admin.client.delete(request).await;
    let response = response.map_err(|s| admin.error("delete", s))?.into_inner();
    outln(format_args!("applied version {}", response.version))?;
    print_results(&response)
}

/// The most one apply may carry for any control plane: what its gRPC layer
/// decodes with the default `--max-apply-bytes` (a server's own limit, 1 MiB
/// by default, is checked there and named in its answer).
pub const MAX_APPLY_BYTES_SENT: usize = 64 * 1024 * 1024;

/// Reads at most `limit` bytes (more is an error naming the limit).
fn read_capped(what: &str, reader: impl std::io::Read, limit: usize) -> anyhow::Result<String> {
    let mut content = String::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    reader
        .take(cap)
        .read_to_string(&mut content)
        .with_context(|| format!("cannot read {what}"))?;
    if content.len() > limit {
        bail!(
            "{what} is larger than {}, more than any control plane takes in one apply \
             (their --max-apply-bytes is 1 MiB by default)",
            human::bytes(limit)
        );
    }
    Ok(content)
}

/// Reads `-f` arguments: files, directories (their *.yaml and *.yml, sorted)
/// and `-` for stdin. Together they may hold at most
/// [`MAX_APPLY_BYTES_SENT`].
pub fn read_sources(args: &[String]) -> anyhow::Result<Vec<SourceFile>> {
    let files = read_sources_unchecked(args)?;
    let total: usize = files.iter().map(|f| f.content.len() + f.name.len()).sum();
    if total > MAX_APPLY_BYTES_SENT {
        bail!(
            "the files are {} together, more than any control plane takes in one apply ({}; \
             their --max-apply-bytes is 1 MiB by default): apply them in parts",
            human::bytes(total),
            human::bytes(MAX_APPLY_BYTES_SENT)
        );
    }
    Ok(files)
}

fn read_sources_unchecked(args: &[String]) -> anyhow::Result<Vec<SourceFile>> {
    let mut files = Vec::new();
    for arg in args {
        if arg == "-" {
            let content = read_capped("stdin", std::io::stdin(), MAX_APPLY_BYTES_SENT)?;
            files.push(SourceFile {
                name: "<stdin>".into(),
                content,
            });
            continue;
        }
        let path = Path::new(arg);
        if path.is_dir() {
            let mut found: Vec<_> = std::fs::read_dir(path)
                .with_context(|| format!("cannot read directory {arg}"))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && p.extension()
                            .is_some_and(|ext| ext == "yaml" || ext == "yml")
                })
                .collect();
            if found.is_empty() {
                bail!("no *.yaml or *.yml files in {arg}");
            }
            found.sort();
            for p in found {
                files.push(read_file(&p)?);
            }
        } else {
            files.push(read_file(path)?);
        }
    }
    Ok(files)
}

fn read_file(path: &Path) -> anyhow::Result<SourceFile> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let content = read_capped(&path.display().to_string(), file, MAX_APPLY_BYTES_SENT)?;
    Ok(SourceFile {
        name: path.display().to_string(),
        content,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_means_its_yaml_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.yml"), "b").unwrap();
        std::fs::write(dir.path().join("a.yaml"), "a").unwrap();
        std::fs::write(dir.path().join("c.txt"), "c").unwrap();
        let files = read_sources(&[dir.path().display().to_string()]).unwrap();
        let contents: Vec<_> = files.iter().map(|f| f.content.as_str()).collect();
        assert_eq!(contents, vec!["a", "b"]);
        assert!(files[0].name.ends_with("a.yaml"));
    }

    #[test]
    fn missing_files_and_empty_directories_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_sources(&[dir.path().display().to_string()]).is_err());
        let missing = dir.path().join("nope.yaml").display().to_string();
        let err = read_sources(&[missing]).unwrap_err();
        assert!(format!("{err:#}").contains("cannot read"), "{err:#}");
    }
}
