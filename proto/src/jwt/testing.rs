//! Keys and tokens made for tests: two fixed RSA keys (ring cannot generate
//! RSA keys) and fresh EC keys.

use super::install_provider;
use base64::Engine as _;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey};

const RSA_A: &str = include_str!("../../testdata/jwt-rsa-2048.pk8.pem");
const RSA_B: &str = include_str!("../../testdata/jwt-rsa-2048-b.pk8.pem");

/// A signing key and its public JWK (with `kid`).
pub struct TestKey {
    pub alg: Algorithm,
    pub kid: String,
    pub encoding: EncodingKey,
    pub jwk: Jwk,
}

fn pem_der(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("test key PEM")
}

fn finish(alg: Algorithm, kid: &str, encoding: EncodingKey) -> TestKey {
    install_provider();
    let mut jwk = Jwk::from_encoding_key(&encoding, alg).expect("JWK of a test key");
    jwk.common.key_id = Some(kid.to_string());
    TestKey {
        alg,
        kid: kid.to_string(),
        encoding,
        jwk,
    }
}

/// The first fixed RSA key, for RS256.
pub fn rsa(kid: &str) -> TestKey {
    finish(
        Algorithm::RS256,
        kid,
        EncodingKey::from_rsa_der(&pem_der(RSA_A)),
    )
}

/// The second fixed RSA key (a "wrong key" or a rotated one).
pub fn rsa_other(kid: &str) -> TestKey {
    finish(
        Algorithm::RS256,
        kid,
        EncodingKey::from_rsa_der(&pem_der(RSA_B)),
    )
}

/// A fresh P-256 key, for ES256.
pub fn ec(kid: &str) -> TestKey {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &rng,
    )
    .expect("P-256 key");
    finish(
        Algorithm::ES256,
        kid,
        EncodingKey::from_ec_der(pkcs8.as_ref()),
    )
}

/// A JWK set of these keys' public halves, as JSON text.
pub fn jwks(keys: &[&TestKey]) -> String {
    let set = JwkSet {
        keys: keys.iter().map(|k| k.jwk.clone()).collect(),
    };
    serde_json::to_string(&set).expect("JWK set JSON")
}

/// A token signed by `key` (with its kid) carrying `claims`.
pub fn sign(key: &TestKey, claims: &serde_json::Value) -> String {
    install_provider();
    let mut header = jsonwebtoken::Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &key.encoding).expect("signing a test token")
}

/// A token whose header and payload are given as JSON and whose
/// signature is `signature` bytes (for `alg: none`, tampering...).
pub fn raw(header: &serde_json::Value, claims: &serde_json::Value, signature: &[u8]) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(signature)
    )
}

/// An HS256 token whose HMAC secret is `secret` (the confusion attack
/// signs with a public key's bytes).
pub fn hs256(secret: &[u8], kid: &str, claims: &serde_json::Value) -> String {
    install_provider();
    let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
    header.kid = Some(kid.to_string());
    let key = EncodingKey::from_secret(secret).expect("an HMAC key");
    jsonwebtoken::encode(&header, claims, &key).expect("signing a test token")
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
