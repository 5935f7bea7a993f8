//! The key-encryption key: what seals secrets (the CA's private keys, the
//! admin token) before they go into etcd, so that etcd and its backups never
//! hold them in the clear. Every replica reads the same key from its
//! `--kek-file` (64 hex digits: 32 random bytes); it never goes to etcd.
//!
//! Sealed values are `RKEK1 ‖ nonce (12 bytes) ‖ AES-256-GCM(value)`, with
//! the etcd key they are stored under as the associated data, so a sealed
//! value copied under another key does not open.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use std::path::Path;

const MAGIC: &[u8] = b"RKEK1";

/// The key-encryption key.
pub struct Kek {
    key: LessSafeKey,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek { .. }")
    }
}

impl Kek {
    /// Reads `path`: 64 hex digits (surrounding whitespace ignored).
    pub fn read(path: &Path) -> Result<Kek, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the key-encryption key {}: {e}", path.display()))?;
        Kek::from_hex(text.trim()).map_err(|e| {
            format!(
                "the key-encryption key {} is unusable: {e} (make one with `openssl rand -hex 32`)",
                path.display()
            )
        })
    }

    /// 64 hex digits.
    pub fn from_hex(hex: &str) -> Result<Kek, String> {
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("it must be 64 hex digits (32 bytes)".into());
        }
        let bytes: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0))
            .collect();
        Kek::from_bytes(&bytes)
    }

    fn from_bytes(bytes: &[u8]) -> Result<Kek, String> {
        let key = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| "not an AES-256 key")?;
        Ok(Kek {
            key: LessSafeKey::new(key),
        })
    }

    /// Seals `value`, bound to `name` (the key it is stored under).
    pub fn seal(&self, name: &str, value: &[u8]) -> Result<Vec<u8>, String> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| "no randomness for a nonce")?;
        let mut sealed = value.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| "sealing failed")?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + sealed.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens what [`Kek::seal`] sealed under `name`.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>, String> {
        let rest = sealed
            .strip_prefix(MAGIC)
            .ok_or_else(|| format!("{name} is not sealed with a key-encryption key"))?;
        if rest.len() < NONCE_LEN {
            return Err(format!("{name}: sealed value too short"));
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "bad nonce")?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut body)
            .map_err(|_| {
                format!(
                    "{name} does not open with this key-encryption key (another --kek-file \
                     than the replica that stored it?)"
                )
            })?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn sealed_values_open_only_with_the_key_and_under_their_name() {
        let kek = Kek::from_hex(HEX).unwrap();
        let sealed = kek.seal("/remora/ca", b"private key").unwrap();
        assert!(!sealed.windows(11).any(|w| w == b"private key"));
        assert_eq!(kek.open("/remora/ca", &sealed).unwrap(), b"private key");
        assert!(kek.open("/remora/other", &sealed).is_err());
        let other = Kek::from_hex(&HEX.replace("1f", "ff")).unwrap();
        let e = other.open("/remora/ca", &sealed).unwrap_err();
        assert!(e.contains("does not open"), "{e}");
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(kek.open("/remora/ca", &tampered).is_err());
        assert!(kek.open("/remora/ca", b"plain").is_err());
    }

    #[test]
    fn the_key_file_must_hold_64_hex_digits() {
        assert!(Kek::from_hex("abc").is_err());
        assert!(Kek::from_hex(&"zz".repeat(32)).is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        std::fs::write(&path, format!("{HEX}\n")).unwrap();
        assert!(Kek::read(&path).is_ok());
        let e = Kek::read(&dir.path().join("nope")).unwrap_err();
        assert!(e.contains("cannot read"), "{e}");
    }
}
