//! Where the CA comes from and where it is kept.
//!
//! - Generated (the default): on the first `serve` a root is generated and
//!   its record (trusted roots, signer certificate and PKCS#8 key, the signer
//!   being retired) is written to the identity database; later starts load it.
//! - The operator's (`--ca-cert`, `--ca-key`, `--ca-bundle`): read from those
//!   files on every start and never written anywhere.
//!
//! Also writes the trust bundle file (`--ca-file`) atomically.

use crate::identity::ca::{self, generate_root, CaState, Signer};
use crate::identity::db::{IdentityDb, CA};
use crate::identity::pem::parse_certs;
use anyhow::{anyhow, bail, Context as _};
use rcgen::KeyPair;
use remora_proto::util::now_unix;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const CA_KEY: &str = "state";

/// The generated CA as stored.
#[derive(Serialize, Deserialize)]
struct CaRecord {
    roots: Vec<String>,
    signer_cert: String,
    signer_key: String,
    retiring: String,
    /// The signer being retired and its key, during a rotation (it signs
    /// the control plane's own certificate until it is retired).
    #[serde(default)]
    retiring_cert: String,
    #[serde(default)]
    retiring_key: String,
}

/// An operator's CA files.
#[derive(Debug, Clone)]
pub struct OperatorCa {
    /// The signing certificate (root or intermediate), optionally followed by
    /// the intermediates above it.
    pub cert: PathBuf,
    /// Its unencrypted PKCS#8 key.
    pub key: PathBuf,
    /// The trusted roots; default: the signing certificate itself.
    pub bundle: Option<PathBuf>,
}

fn one_cert(pem: &str, what: &str) -> anyhow::Result<CertificateDer<'static>> {
    parse_certs(pem)
        .map_err(|e| anyhow!("{what}: {e}"))?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("{what}: no certificate"))
}

/// Loads the generated CA, generating and storing it on first use.
pub fn load_or_generate(db: &IdentityDb, trust_domain: &str) -> anyhow::Result<CaState> {
    if let Some(bytes) = db.get(CA, CA_KEY)? {
        return decode(&bytes).context("the CA record in the identity database is unusable");
    }
    let signer = generate_root(trust_domain, now_unix())?;
    tracing::info!(signer_id = %signer.id, "generated a new root CA");
    let state = CaState {
        roots: vec![signer.cert.clone()],
        signer: Arc::new(signer),
        retiring: String::new(),
        retiring_signer: None,
        operator: false,
    };
    // Stored only if no other replica stored a CA meanwhile; the stored one
    // is the mesh's.
    let record = encode(&state)?;
    db.update(CA, CA_KEY, |current| {
        Ok(current.is_none().then(|| record.clone()))
    })?;
    let stored = db
        .get(CA, CA_KEY)?
        .context("the CA record vanished right after it was stored")?;
    decode(&stored).context("the CA record in the identity database is unusable")
}

/// Reads the stored CA (None: none stored yet).
pub fn load(db: &IdentityDb) -> anyhow::Result<Option<CaState>> {
    match db.get(CA, CA_KEY)? {
        Some(bytes) => Ok(Some(
            decode(&bytes).context("the CA record in the identity database is unusable")?,
        )),
        None => Ok(None),
    }
}

/// The etcd key the CA record lives under (None: embedded store).
pub fn etcd_key(db: &IdentityDb) -> Option<String> {
    db.etcd_key(CA, CA_KEY)
}

fn decode(bytes: &[u8]) -> anyhow::Result<CaState> {
    let record: CaRecord = serde_json::from_slice(bytes)?;
    let roots = record
        .roots
        .iter()
        .map(|pem| one_cert(pem, "a stored root"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let key = KeyPair::from_pem(&record.signer_key).map_err(|e| anyhow!("signer key: {e}"))?;
    let cert = one_cert(&record.signer_cert, "the stored signer")?;
    let signer = Signer::new(cert, key, Vec::new())?;
    if !roots.iter().any(|r| r.as_ref() == signer.cert.as_ref()) {
        bail!("the stored signer is not one of the stored roots");
    }
    let retiring = if roots
        .iter()
        .any(|r| ca::fingerprint(r) == record.retiring && record.retiring != signer.id)
    {
        record.retiring
    } else {
        String::new()
    };
    // Records from before the retiring key was kept have none: the server
    // certificate then comes from the new signer.
    let retiring_signer = if retiring.is_empty() || record.retiring_key.is_empty() {
        None
    } else {
        let key = KeyPair::from_pem(&record.retiring_key)
            .map_err(|e| anyhow!("retiring signer key: {e}"))?;
        let cert = one_cert(&record.retiring_cert, "the stored retiring signer")?;
        let old = Signer::new(cert, key, Vec::new())?;
        (old.id == retiring).then(|| Arc::new(old))
    };
    Ok(CaState {
        roots,
        signer: Arc::new(signer),
        retiring,
        retiring_signer,
        operator: false,
    })
}

/// Stores a generated CA's state durably.
pub fn save(db: &IdentityDb, state: &CaState) -> anyhow::Result<()> {
    db.put(CA, CA_KEY, &encode(state)?)?;
    Ok(())
}

fn encode(state: &CaState) -> anyhow::Result<Vec<u8>> {
    if state.operator {
        bail!("an operator-provided CA is not stored");
    }
    let record = CaRecord {
        roots: state
            .roots
            .iter()
            .map(|r| crate::identity::pem::cert_pem(r))
            .collect(),
        signer_cert: crate::identity::pem::cert_pem(&state.signer.cert),
        signer_key: state.signer.key_pem(),
        retiring: state.retiring.clone(),
        retiring_cert: state
            .retiring_signer
            .as_ref()
            .map(|s| crate::identity::pem::cert_pem(&s.cert))
            .unwrap_or_default(),
        retiring_key: state
            .retiring_signer
            .as_ref()
            .map(|s| s.key_pem())
            .unwrap_or_default(),
    };
    Ok(serde_json::to_vec(&record)?)
}

fn read(path: &Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

fn self_signed(der: &[u8]) -> anyhow::Result<bool> {
    let cert = ca::parse_cert(der)?;
    Ok(cert.subject() == cert.issuer() && cert.verify_signature(None).is_ok())
}

/// Whether `der` is signed by one of `roots`.
fn signed_by_any(der: &[u8], roots: &[CertificateDer<'static>]) -> anyhow::Result<bool> {
    let cert = ca::parse_cert(der)?;
    for root in roots {
        let root = ca::parse_cert(root)?;
        if cert.issuer() == root.subject() && cert.verify_signature(Some(root.public_key())).is_ok()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Loads an operator's CA and checks that its chain leads to a trusted root.
pub fn load_operator(files: &OperatorCa) -> anyhow::Result<CaState> {
    let certs = parse_certs(&read(&files.cert, "--ca-cert")?)
        .map_err(|e| anyhow!("--ca-cert {}: {e}", files.cert.display()))?;
    let Some(signer_cert) = certs.first().cloned() else {
        bail!("--ca-cert {}: no certificate", files.cert.display());
    };
    let key = KeyPair::from_pem(&read(&files.key, "--ca-key")?).map_err(|e| {
        anyhow!(
            "--ca-key {}: {e} (it must be an unencrypted PKCS#8 key, \"BEGIN PRIVATE KEY\"; \
             convert one with `openssl pkcs8 -topk8 -nocrypt`)",
            files.key.display()
        )
    })?;
    let roots = match &files.bundle {
        Some(path) => {
            let roots = parse_certs(&read(path, "--ca-bundle")?)
                .map_err(|e| anyhow!("--ca-bundle {}: {e}", path.display()))?;
            if roots.is_empty() {
                bail!("--ca-bundle {}: no certificate", path.display());
            }
            roots
        }
        None => {
            if !self_signed(&signer_cert)? {
                tracing::warn!(
                    "--ca-cert is not self-signed and no --ca-bundle was given: \
                     trusting the --ca-cert certificate itself as the root"
                );
            }
            vec![signer_cert.clone()]
        }
    };
    let chain: Vec<CertificateDer<'static>> = certs
        .into_iter()
        .filter(|c| !roots.iter().any(|r| r.as_ref() == c.as_ref()))
        .collect();
    if let Some(top) = chain.last() {
        if !signed_by_any(top, &roots)? {
            bail!(
                "the chain in --ca-cert {} does not lead to a root in the trust bundle \
                 (pass the root(s) with --ca-bundle)",
                files.cert.display()
            );
        }
    }
    let signer = Signer::new(signer_cert, key, chain)
        .with_context(|| format!("--ca-cert {}", files.cert.display()))?;
    Ok(CaState {
        roots,
        signer: Arc::new(signer),
        retiring: String::new(),
        retiring_signer: None,
        operator: true,
    })
}

/// Writes the trust bundle to `path` atomically (a temporary file renamed
/// over it), mode 0644.
pub fn write_bundle_file(path: &Path, pem: &str) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} is not a file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        file.write_all(pem.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().with_context(|| format!("cannot write the trust bundle {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_ca_is_stored_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let db = IdentityDb::open(dir.path()).unwrap();
        let first = load_or_generate(&db, "cluster.local").unwrap();
        let again = load_or_generate(&db, "cluster.local").unwrap();
        assert_eq!(first.signer.id, again.signer.id);
        assert_eq!(first.bundle_pem(), again.bundle_pem());
        assert!(!again.rotating() && !again.operator);
    }

    #[test]
    fn the_bundle_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/bundle.pem");
        write_bundle_file(&path, "one").unwrap();
        write_bundle_file(&path, "two").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        let entries = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
        assert_eq!(entries, 1);
    }
}
