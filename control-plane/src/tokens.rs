//! Bootstrap tokens: each proves one workload identity to `Identity.Certify`.
//!
//! A token is `<id>.<secret>`: the id is 8 random bytes and the secret 32, both
//! lowercase hex. Only SHA-256(secret) is stored (in [`crate::identity_db`]),
//! with the identity, creation and expiry times and a revoked flag; the token
//! itself is shown once, when it is created.
//!
//! Verification sits behind [`WorkloadAuthenticator`], so that another kind of
//! credential (a Kubernetes ServiceAccount token, say) can be added beside it.

use crate::identity_db::{DbError, IdentityDb, TOKENS};
use ring::digest::{digest, SHA256};
use ring::rand::{SecureRandom as _, SystemRandom};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;
/// The longest credential looked at; anything longer is malformed.
const MAX_CREDENTIAL_LEN: usize = 256;

/// Who a credential proves the caller to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadIdentity {
    pub namespace: String,
    pub service: String,
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service>`.
    pub spiffe_id: String,
}

/// Why a credential proves nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("unknown token")]
    Unknown,
    #[error("revoked token")]
    Revoked,
    #[error("expired token")]
    Expired,
    #[error("cannot check the token: {0}")]
    Internal(String),
}

impl AuthError {
    /// The `reason` label of `remora_control_certificates_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Malformed(_) => "token_malformed",
            AuthError::Unknown => "token_unknown",
            AuthError::Revoked => "token_revoked",
            AuthError::Expired => "token_expired",
            AuthError::Internal(_) => "internal",
        }
    }
}

/// Turns a workload's credential into the identity it proves.
#[tonic::async_trait]
pub trait WorkloadAuthenticator: Send + Sync + std::fmt::Debug {
    async fn authenticate(&self, credential: &str) -> Result<WorkloadIdentity, AuthError>;
}

/// One stored token (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub namespace: String,
    pub service: String,
    /// Lowercase hex SHA-256 of the secret.
    pub secret_sha256: String,
    pub created_unix: i64,
    /// 0: never.
    pub expires_unix: i64,
    pub revoked: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("token {0} not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("token record {id} is corrupt: {message}")]
    Corrupt { id: String, message: String },
    #[error("no randomness available")]
    Random,
}

/// The bootstrap-token store and authenticator.
#[derive(Debug, Clone)]
pub struct TokenStore {
    db: IdentityDb,
    trust_domain: String,
}

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_hex(n: usize) -> Result<String, TokenError> {
    let mut bytes = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| TokenError::Random)?;
    Ok(hex(&bytes))
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A namespace or service name usable in a SPIFFE ID path segment.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {what} {name:?}: use 1 to 253 letters, digits, '.', '-' or '_'"
        ))
    }
}

/// Compares two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

impl TokenStore {
    pub fn new(db: IdentityDb, trust_domain: &str) -> TokenStore {
        TokenStore {
            db,
            trust_domain: trust_domain.to_string(),
        }
    }

    pub fn spiffe_id(&self, namespace: &str, service: &str) -> String {
        format!("spiffe://{}/ns/{namespace}/sa/{service}", self.trust_domain)
    }

    /// Creates a token for `namespace`/`service`; returns the token (shown
    /// once) and its record. `ttl` None: it never expires.
    pub fn create(
        &self,
        namespace: &str,
        service: &str,
        ttl: Option<Duration>,
    ) -> Result<(String, TokenRecord), TokenError> {
        check_name("namespace", namespace).map_err(TokenError::Invalid)?;
        check_name("service", service).map_err(TokenError::Invalid)?;
        let id = random_hex(ID_BYTES)?;
        let secret = random_hex(SECRET_BYTES)?;
        let now = now_unix();
        let expires_unix = match ttl {
            None => 0,
            Some(ttl) => now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
        };
        let record = TokenRecord {
            id: id.clone(),
            namespace: namespace.to_string(),
            service: service.to_string(),
            secret_sha256: hex(digest(&SHA256, secret.as_bytes()).as_ref()),
            created_unix: now,
            expires_unix,
            revoked: false,
        };
        self.save(&record)?;
        Ok((format!("{id}.{secret}"), record))
    }

    fn save(&self, record: &TokenRecord) -> Result<(), TokenError> {
        let bytes = serde_json::to_vec(record).map_err(|e| TokenError::Corrupt {
            id: record.id.clone(),
            message: e.to_string(),
        })?;
        Ok(self.db.put(TOKENS, &record.id, &bytes)?)
    }

    fn decode(id: &str, bytes: &[u8]) -> Result<TokenRecord, TokenError> {
        serde_json::from_slice(bytes).map_err(|e| TokenError::Corrupt {
            id: id.to_string(),
            message: e.to_string(),
        })
    }

    pub fn get(&self, id: &str) -> Result<Option<TokenRecord>, TokenError> {
        match self.db.get(TOKENS, id)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(Self::decode(id, &bytes)?)),
        }
    }

    /// Revokes a token (again is fine).
    pub fn revoke(&self, id: &str) -> Result<TokenRecord, TokenError> {
        let mut record = self
            .get(id)?
            .ok_or_else(|| TokenError::NotFound(id.to_string()))?;
        if !record.revoked {
            record.revoked = true;
            self.save(&record)?;
        }
        Ok(record)
    }

    /// Every token, oldest first.
    pub fn list(&self) -> Result<Vec<TokenRecord>, TokenError> {
        let mut out = self
            .db
            .list(TOKENS)?
            .into_iter()
            .map(|(id, bytes)| Self::decode(&id, &bytes))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by(|a, b| (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id)));
        Ok(out)
    }

    /// Checks a credential at time `now`. The secret is checked before the
    /// revoked and expiry flags, so that only its holder learns them.
    pub fn verify(&self, credential: &str, now: i64) -> Result<WorkloadIdentity, AuthError> {
        let credential = credential.trim();
        if credential.is_empty() {
            return Err(AuthError::Malformed("no token given".into()));
        }
        if credential.len() > MAX_CREDENTIAL_LEN {
            return Err(AuthError::Malformed("too long".into()));
        }
        let Some((id, secret)) = credential.split_once('.') else {
            return Err(AuthError::Malformed("expected <id>.<secret>".into()));
        };
        if !is_lower_hex(id, 2 * ID_BYTES) || !is_lower_hex(secret, 2 * SECRET_BYTES) {
            return Err(AuthError::Malformed(format!(
                "expected <id>.<secret> as {} and {} lowercase hex digits",
                2 * ID_BYTES,
                2 * SECRET_BYTES
            )));
        }
        let record = self
            .get(id)
            .map_err(|e| AuthError::Internal(e.to_string()))?
            .ok_or(AuthError::Unknown)?;
        let presented = hex(digest(&SHA256, secret.as_bytes()).as_ref());
        if !constant_time_eq(presented.as_bytes(), record.secret_sha256.as_bytes()) {
            return Err(AuthError::Unknown);
        }
        if record.revoked {
            return Err(AuthError::Revoked);
        }
        if record.expires_unix != 0 && now >= record.expires_unix {
            return Err(AuthError::Expired);
        }
        Ok(WorkloadIdentity {
            spiffe_id: self.spiffe_id(&record.namespace, &record.service),
            namespace: record.namespace,
            service: record.service,
        })
    }
}

#[tonic::async_trait]
impl WorkloadAuthenticator for TokenStore {
    async fn authenticate(&self, credential: &str) -> Result<WorkloadIdentity, AuthError> {
        let store = self.clone();
        let credential = credential.to_string();
        tokio::task::spawn_blocking(move || store.verify(&credential, now_unix()))
            .await
            .map_err(|e| AuthError::Internal(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, TokenStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = IdentityDb::open(dir.path()).unwrap();
        (dir, TokenStore::new(db, "cluster.local"))
    }

    #[test]
    fn a_token_proves_its_identity_until_revoked() {
        let (_dir, store) = store();
        let (token, record) = store.create("shop", "backend", None).unwrap();
        assert_eq!(token.len(), 16 + 1 + 64);
        assert!(token.starts_with(&format!("{}.", record.id)));
        assert!(!token.contains(&record.secret_sha256));
        let who = store.verify(&token, now_unix()).unwrap();
        assert_eq!(who.spiffe_id, "spiffe://cluster.local/ns/shop/sa/backend");
        store.revoke(&record.id).unwrap();
        assert_eq!(store.verify(&token, now_unix()), Err(AuthError::Revoked));
        assert!(store.list().unwrap()[0].revoked);
        assert!(matches!(store.revoke("0000"), Err(TokenError::NotFound(_))));
    }

    #[test]
    fn wrong_expired_and_malformed_tokens_are_refused() {
        let (_dir, store) = store();
        let (token, record) = store
            .create("shop", "backend", Some(Duration::from_secs(60)))
            .unwrap();
        assert_eq!(
            store.verify(&token, record.created_unix + 60),
            Err(AuthError::Expired)
        );
        let mut wrong = token.clone();
        wrong.pop();
        wrong.push(if token.ends_with('0') { '1' } else { '0' });
        assert_eq!(store.verify(&wrong, 0), Err(AuthError::Unknown));
        let unknown = format!("{}.{}", "a".repeat(16), "b".repeat(64));
        assert_eq!(store.verify(&unknown, 0), Err(AuthError::Unknown));
        for bad in ["", "nodot", "abc.def", &token.to_uppercase()] {
            assert!(
                matches!(store.verify(bad, 0), Err(AuthError::Malformed(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn names_must_fit_a_spiffe_path() {
        let (_dir, store) = store();
        assert!(store.create("shop", "a/b", None).is_err());
        assert!(store.create("..", "a", None).is_err());
        assert!(store.create("", "a", None).is_err());
    }
}
