//! `remora-control install`: prints the control plane's Kubernetes manifests.

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct InstallArgs {}

/// Prints the manifests.
pub fn install(_args: &InstallArgs) -> anyhow::Result<()> {
    anyhow::bail!("install: not built yet")
}
