//! What the data directory (`--data-dir`) holds that both `serve` and the
//! operator's commands use: the admin token `serve` writes and the commands
//! present, and the trust bundle `serve` writes and the commands verify the
//! server with. The stores in it are their modules' own
//! ([`crate::policy::store`], [`crate::identity::db`]).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The admin token's file.
pub const TOKEN_FILE: &str = "admin.token";
/// The trust bundle's file (the `--ca-file` default).
pub const BUNDLE_FILE: &str = "trust-bundle.pem";

pub fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKEN_FILE)
}

pub fn default_bundle_path(data_dir: &Path) -> PathBuf {
    data_dir.join(BUNDLE_FILE)
}

/// Reads a token file (its content, trimmed; empty is an error).
pub fn read_token(path: &Path) -> io::Result<String> {
    let content = fs::read_to_string(path)?;
    let token = content.trim();
    if token.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(token.to_string())
}
