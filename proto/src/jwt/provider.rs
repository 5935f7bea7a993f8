//! ring as `jsonwebtoken`'s cryptography: verification of the accepted
//! algorithms, and signing for the tests and tools that make tokens.

use super::ALLOWED;
use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{EllipticCurve, ThumbprintHash};
use jsonwebtoken::signature;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};

/// Installs ring as `jsonwebtoken`'s cryptography, once per process. Called
/// by everything here before use; harmless to call again.
pub fn install_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Fails only if another provider was installed first, which then
        // serves as well.
        let _ = RING_PROVIDER.install_default();
    });
}

static RING_PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: ring_signer,
    verifier_factory: ring_verifier,
    key_utils: jsonwebtoken::crypto::KeyUtils {
        rsa_pub_components_from_private_key: rsa_components_from_private,
        rsa_pub_components_from_public_key: |_| Err(ErrorKind::InvalidKeyFormat.into()),
        ec_pub_components_from_private_key: ec_components_from_private,
        ed_pub_components_from_private_key: |_, _| Err(ErrorKind::InvalidEddsaKey.into()),
        compute_digest,
    },
};

struct RingVerifier {
    alg: Algorithm,
    key: DecodingKey,
}

impl signature::Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), signature::Error> {
        use jsonwebtoken::DecodingKeyKind;
        use ring::signature as rs;
        let rsa: &'static rs::RsaParameters = match self.alg {
            Algorithm::RS256 => &rs::RSA_PKCS1_2048_8192_SHA256,
            Algorithm::RS384 => &rs::RSA_PKCS1_2048_8192_SHA384,
            Algorithm::RS512 => &rs::RSA_PKCS1_2048_8192_SHA512,
            Algorithm::PS256 => &rs::RSA_PSS_2048_8192_SHA256,
            Algorithm::PS384 => &rs::RSA_PSS_2048_8192_SHA384,
            Algorithm::PS512 => &rs::RSA_PSS_2048_8192_SHA512,
            Algorithm::ES256 | Algorithm::ES384 => {
                let params = if self.alg == Algorithm::ES256 {
                    &rs::ECDSA_P256_SHA256_FIXED
                } else {
                    &rs::ECDSA_P384_SHA384_FIXED
                };
                let DecodingKeyKind::SecretOrDer(point) = self.key.kind() else {
                    return Err(signature::Error::new());
                };
                return rs::UnparsedPublicKey::new(params, point)
                    .verify(msg, sig)
                    .map_err(|_| signature::Error::new());
            }
            _ => return Err(signature::Error::new()),
        };
        match self.key.kind() {
            DecodingKeyKind::RsaModulusExponent { n, e } => rs::RsaPublicKeyComponents { n, e }
                .verify(rsa, msg, sig)
                .map_err(|_| signature::Error::new()),
            DecodingKeyKind::SecretOrDer(der) => rs::UnparsedPublicKey::new(rsa, der)
                .verify(msg, sig)
                .map_err(|_| signature::Error::new()),
        }
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

fn ring_verifier(
    alg: &Algorithm,
    key: &DecodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
    if !ALLOWED.contains(alg) {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    Ok(Box::new(RingVerifier {
        alg: *alg,
        key: key.clone(),
    }))
}

/// Signing: for tests and tools that make tokens (the proxy and the control
/// plane only verify). RSA keys are PKCS#8 or PKCS#1 DER, EC keys PKCS#8 DER,
/// HMAC keys any bytes.
enum RingSigner {
    Rsa(
        Algorithm,
        &'static dyn ring::signature::RsaEncoding,
        ring::signature::RsaKeyPair,
    ),
    Ec(Algorithm, ring::signature::EcdsaKeyPair),
    Hmac(Algorithm, ring::hmac::Key),
}

impl signature::Signer<Vec<u8>> for RingSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let rng = ring::rand::SystemRandom::new();
        match self {
            RingSigner::Rsa(_, padding, pair) => {
                let mut sig = vec![0; pair.public().modulus_len()];
                pair.sign(*padding, &rng, msg, &mut sig)
                    .map_err(|_| signature::Error::new())?;
                Ok(sig)
            }
            RingSigner::Ec(_, pair) => pair
                .sign(&rng, msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| signature::Error::new()),
            RingSigner::Hmac(_, key) => Ok(ring::hmac::sign(key, msg).as_ref().to_vec()),
        }
    }
}

impl JwtSigner for RingSigner {
    fn algorithm(&self) -> Algorithm {
        match self {
            RingSigner::Rsa(a, ..) | RingSigner::Ec(a, _) | RingSigner::Hmac(a, _) => *a,
        }
    }
}

fn rsa_pair(der: &[u8]) -> jsonwebtoken::errors::Result<ring::signature::RsaKeyPair> {
    ring::signature::RsaKeyPair::from_pkcs8(der)
        .or_else(|_| ring::signature::RsaKeyPair::from_der(der))
        .map_err(|e| ErrorKind::InvalidRsaKey(e.to_string()).into())
}

fn ec_pair(
    alg: Algorithm,
    der: &[u8],
) -> jsonwebtoken::errors::Result<ring::signature::EcdsaKeyPair> {
    let params = match alg {
        Algorithm::ES384 => &ring::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
        _ => &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
    };
    ring::signature::EcdsaKeyPair::from_pkcs8(params, der, &ring::rand::SystemRandom::new())
        .map_err(|_| ErrorKind::InvalidEcdsaKey.into())
}

fn ring_signer(
    alg: &Algorithm,
    key: &EncodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
    use ring::signature as rs;
    let der = key.as_bytes();
    let rsa = |padding: &'static dyn rs::RsaEncoding| -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
        Ok(Box::new(RingSigner::Rsa(*alg, padding, rsa_pair(der)?)))
    };
    let hmac = |h: ring::hmac::Algorithm| -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
        Ok(Box::new(RingSigner::Hmac(
            *alg,
            ring::hmac::Key::new(h, der),
        )))
    };
    match alg {
        Algorithm::RS256 => rsa(&rs::RSA_PKCS1_SHA256),
        Algorithm::RS384 => rsa(&rs::RSA_PKCS1_SHA384),
        Algorithm::RS512 => rsa(&rs::RSA_PKCS1_SHA512),
        Algorithm::PS256 => rsa(&rs::RSA_PSS_SHA256),
        Algorithm::PS384 => rsa(&rs::RSA_PSS_SHA384),
        Algorithm::PS512 => rsa(&rs::RSA_PSS_SHA512),
        Algorithm::ES256 | Algorithm::ES384 => {
            Ok(Box::new(RingSigner::Ec(*alg, ec_pair(*alg, der)?)))
        }
        Algorithm::HS256 => hmac(ring::hmac::HMAC_SHA256),
        Algorithm::HS384 => hmac(ring::hmac::HMAC_SHA384),
        Algorithm::HS512 => hmac(ring::hmac::HMAC_SHA512),
        _ => Err(ErrorKind::InvalidAlgorithm.into()),
    }
}

fn rsa_components_from_private(der: &[u8]) -> jsonwebtoken::errors::Result<(Vec<u8>, Vec<u8>)> {
    let pair = rsa_pair(der)?;
    let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
    Ok((public.n, public.e))
}

fn ec_components_from_private(
    der: &[u8],
    alg: Algorithm,
) -> jsonwebtoken::errors::Result<(EllipticCurve, Vec<u8>, Vec<u8>)> {
    use ring::signature::KeyPair as _;
    let pair = ec_pair(alg, der)?;
    let point = pair.public_key().as_ref();
    let (curve, len) = match alg {
        Algorithm::ES384 => (EllipticCurve::P384, 48),
        _ => (EllipticCurve::P256, 32),
    };
    if point.len() != 1 + 2 * len || point[0] != 4 {
        return Err(ErrorKind::InvalidEcdsaKey.into());
    }
    let (x, y) = point[1..].split_at(len);
    Ok((curve, x.to_vec(), y.to_vec()))
}

fn compute_digest(data: &[u8], hash: ThumbprintHash) -> jsonwebtoken::errors::Result<Vec<u8>> {
    let alg = match hash {
        ThumbprintHash::SHA384 => &ring::digest::SHA384,
        ThumbprintHash::SHA512 => &ring::digest::SHA512,
        _ => &ring::digest::SHA256,
    };
    Ok(ring::digest::digest(alg, data).as_ref().to_vec())
}
