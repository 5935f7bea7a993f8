//! Admin API authentication: a bearer token generated on the first `serve` into
//! `<data-dir>/admin.token` (mode 0600) and checked on every Admin call. With
//! `--store etcd` every replica uses the one token kept in etcd, sealed
//! ([`shared_token`]).

use crate::data_dir::{read_token, token_path};
use crate::etcd::Etcd;
use crate::secret::{constant_time_eq, random_hex};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Random bytes in a token (hex-encoded on disk and on the wire).
const TOKEN_BYTES: usize = 32;

/// Reads the admin token from `data_dir`, creating it on first use.
pub fn load_or_create_token(data_dir: &Path) -> io::Result<String> {
    let path = token_path(data_dir);
    match read_token(&path) {
        Ok(token) => {
            warn_if_readable_by_others(&path);
            return Ok(token);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let token = random_hex(TOKEN_BYTES).map_err(io::Error::other)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display())))?;
    file.write_all(format!("{token}\n").as_bytes())?;
    file.sync_all()?;
    Ok(token)
}

/// The admin token every replica shares (`--store etcd`): the one in etcd
/// (sealed with the key-encryption key), or, on the first replica, this
/// data directory's (created if need be), stored unless another replica
/// stored one first. Written to `<data-dir>/admin.token` too, so the
/// commands run on this machine find it.
pub async fn shared_token(etcd: &Etcd, data_dir: &Path) -> anyhow::Result<String> {
    let key = etcd.key("admin/token");
    let open = |sealed: &[u8]| -> anyhow::Result<String> {
        let plain = etcd.kek.open(&key, sealed).map_err(anyhow::Error::msg)?;
        String::from_utf8(plain).map_err(|_| anyhow::anyhow!("the stored admin token is not text"))
    };
    let token = match etcd.get(&key).await? {
        Some((sealed, _)) => open(&sealed)?,
        None => {
            let local = load_or_create_token(data_dir)?;
            let sealed = etcd
                .kek
                .seal(&key, local.as_bytes())
                .map_err(anyhow::Error::msg)?;
            let create = etcd_client::Txn::new()
                .when([etcd_client::Compare::version(
                    key.clone(),
                    etcd_client::CompareOp::Equal,
                    0,
                )])
                .and_then([etcd_client::TxnOp::put(key.clone(), sealed, None)]);
            etcd.txn(create).await?;
            let (sealed, _) = etcd
                .get(&key)
                .await?
                .ok_or_else(|| anyhow::anyhow!("the admin token vanished from etcd"))?;
            open(&sealed)?
        }
    };
    let path = token_path(data_dir);
    if read_token(&path).ok().as_deref() != Some(token.as_str()) {
        write_private(&path, &token)?;
    }
    Ok(token)
}

/// Writes `token` to `path`, mode 0600, replacing what was there.
fn write_private(path: &Path, token: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(format!("{token}\n").as_bytes())?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

fn warn_if_readable_by_others(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "admin token file is readable by other users; chmod 600 it");
        }
    }
}

/// Refuses every request without `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct AdminAuth {
    expected: String,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminAuth { .. }")
    }
}

impl AdminAuth {
    pub fn new(token: &str) -> AdminAuth {
        AdminAuth {
            expected: format!("Bearer {token}"),
        }
    }
}

impl Interceptor for AdminAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(value) = request.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "missing admin token (authorization: Bearer <token>)",
            ));
        };
        if constant_time_eq(value.as_bytes(), self.expected.as_bytes()) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("invalid admin token"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_created_once_with_mode_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let token = load_or_create_token(dir.path()).unwrap();
        assert_eq!(token.len(), 2 * TOKEN_BYTES);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        let mode = fs::metadata(token_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create_token(dir.path()).unwrap(), token);
    }

    #[test]
    fn the_interceptor_checks_the_bearer_token() {
        let mut auth = AdminAuth::new("secret");
        let mut ok = Request::new(());
        ok.metadata_mut()
            .insert("authorization", "Bearer secret".parse().unwrap());
        assert!(auth.call(ok).is_ok());

        let mut wrong = Request::new(());
        wrong
            .metadata_mut()
            .insert("authorization", "Bearer secreT".parse().unwrap());
        assert_eq!(
            auth.call(wrong).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            auth.call(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
