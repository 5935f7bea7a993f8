//! Bootstrap tokens: each proves one workload identity to `Identity.Certify`.
//!
//! A token is `<id>.<secret>`: the id is 8 random bytes and the secret 32, both
//! lowercase hex. Only SHA-256(secret) is stored (in [`crate::identity::db`]),
//! with the identity, creation and expiry times and a revoked flag; the token
//! itself is shown once, when it is created.
//!
//! A token may be limited in time (`--ttl`: after it, it bootstraps no new
//! certificate) and in uses (`--uses N`: it bootstraps at most N
//! certificates). Uses are counted in the record, in the same durable
//! transaction that checks them, so a restart does not reset them and two
//! concurrent requests cannot both take the last one.
//!
//! Only a workload's first certificate consumes a use and must be within the
//! TTL. A renewal is authenticated by the certificate the workload holds (its
//! mTLS client certificate on the Certify call); the token it presents with it
//! need only be genuine and not revoked, so revoking a token still ends the
//! renewals of every workload it bootstrapped.
//!
//! Verification sits behind [`WorkloadAuthenticator`], so that another kind of
//! credential sits beside it: Kubernetes ServiceAccount tokens
//! ([`crate::identity::kubernetes`]).

use crate::identity::db::{DbError, IdentityDb, TOKENS};
use crate::secret;
use remora_proto::util::{hex, now_unix};
use remora_proto::SpiffeId;
use ring::digest::{digest, SHA256};
use serde::{Deserialize, Serialize};
use std::time::Duration;

const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;
/// The longest credential looked at; anything longer is malformed.
const MAX_CREDENTIAL_LEN: usize = 256;

/// Who a credential proves the caller to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadIdentity {
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service>`.
    pub spiffe_id: SpiffeId,
    /// The bootstrap token that proved it, if a token did (its uses are
    /// counted against it).
    pub token_id: Option<String>,
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
    #[error("token used up: it has bootstrapped {0} certificate(s), its limit (renewals authenticate with the workload's certificate; a new workload needs a new token)")]
    UsedUp(u32),
    #[error("cannot check the token: {0}")]
    Internal(String),
    /// A JWT (a Kubernetes ServiceAccount token) that does not verify.
    #[error("ServiceAccount token refused: {0}")]
    Jwt(remora_proto::jwt::JwtError),
    /// A JWT that verifies but does not name a usable ServiceAccount (its
    /// `sub` and its `kubernetes.io` claims disagree, say).
    #[error("ServiceAccount token refused: {0}")]
    Claims(String),
}

impl AuthError {
    /// The `reason` label of `remora_control_certificates_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Malformed(_) => "token_malformed",
            AuthError::Unknown => "token_unknown",
            AuthError::Revoked => "token_revoked",
            AuthError::Expired => "token_expired",
            AuthError::UsedUp(_) => "token_used_up",
            AuthError::Internal(_) => "internal",
            AuthError::Jwt(e) => e.reason(),
            AuthError::Claims(_) => "jwt_claim",
        }
    }
}

/// Turns a workload's credential into the identity it proves.
#[tonic::async_trait]
pub trait WorkloadAuthenticator: Send + Sync + std::fmt::Debug {
    /// For a first certificate: the credential must still be good for a new
    /// one (for a token: not revoked, not expired, a use left).
    async fn authenticate(&self, credential: &str) -> Result<WorkloadIdentity, AuthError>;

    /// For a renewal by a workload that proved with its current certificate
    /// that it holds the identity: the credential need only be genuine and
    /// not revoked.
    async fn authenticate_renewal(&self, credential: &str) -> Result<WorkloadIdentity, AuthError> {
        self.authenticate(credential).await
    }

    /// Counts a first certificate against the credential that proved `who`,
    /// refusing if it has no use left (checked again, atomically).
    async fn consume(&self, who: &WorkloadIdentity) -> Result<(), AuthError> {
        let _ = who;
        Ok(())
    }
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
    /// How many first certificates it may bootstrap; 0: no limit.
    #[serde(default)]
    pub max_uses: u32,
    /// How many it has bootstrapped (renewals are not counted).
    #[serde(default)]
    pub uses: u32,
}

impl TokenRecord {
    /// `used/max` (`used/-` without a limit).
    pub fn uses_text(&self) -> String {
        crate::human::uses(self.uses, self.max_uses)
    }

    /// Why it cannot bootstrap a new certificate at `now`, if it cannot.
    fn refuses_new(&self, now: i64) -> Option<AuthError> {
        if self.revoked {
            Some(AuthError::Revoked)
        } else if self.expires_unix != 0 && now >= self.expires_unix {
            Some(AuthError::Expired)
        } else if self.max_uses != 0 && self.uses >= self.max_uses {
            Some(AuthError::UsedUp(self.uses))
        } else {
            None
        }
    }
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

fn random_hex(n: usize) -> Result<String, TokenError> {
    secret::random_hex(n).map_err(|_| TokenError::Random)
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl TokenStore {
    pub fn new(db: IdentityDb, trust_domain: &str) -> TokenStore {
        TokenStore {
            db,
            trust_domain: trust_domain.to_string(),
        }
    }

    /// The identity a token for `namespace`/`service` proves; an error
    /// naming the part that cannot be in a SPIFFE ID.
    pub fn spiffe_id(&self, namespace: &str, service: &str) -> Result<SpiffeId, String> {
        SpiffeId::new(&self.trust_domain, namespace, service)
    }

    /// Creates a token for `namespace`/`service`; returns the token (shown
    /// once) and its record. `ttl` None: it never expires.
    pub fn create(
        &self,
        namespace: &str,
        service: &str,
        ttl: Option<Duration>,
    ) -> Result<(String, TokenRecord), TokenError> {
        self.create_limited(namespace, service, ttl, None)
    }

    /// [`create`](Self::create), bootstrapping at most `max_uses`
    /// certificates (None: no limit).
    pub fn create_limited(
        &self,
        namespace: &str,
        service: &str,
        ttl: Option<Duration>,
        max_uses: Option<u32>,
    ) -> Result<(String, TokenRecord), TokenError> {
        if max_uses == Some(0) {
            return Err(TokenError::Invalid(
                "--uses must be at least 1 (leave it out for no limit)".into(),
            ));
        }
        self.spiffe_id(namespace, service)
            .map_err(TokenError::Invalid)?;
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
            max_uses: max_uses.unwrap_or(0),
            uses: 0,
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

    /// The record of a genuine credential (its secret matches), whatever
    /// its state.
    fn genuine(&self, credential: &str) -> Result<TokenRecord, AuthError> {
        let credential = credential.trim();
        if credential.is_empty() {
            return Err(AuthError::Malformed("no token given".into()));
        }
        if remora_proto::jwt::looks_like_jwt(credential) {
            return Err(AuthError::Malformed(
                "a JWT (a Kubernetes ServiceAccount token?), but this control plane takes \
                 bootstrap tokens only (serve --kubernetes-issuer and --kubernetes-jwks \
                 accept ServiceAccount tokens)"
                    .into(),
            ));
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
        if !secret::constant_time_eq(presented.as_bytes(), record.secret_sha256.as_bytes()) {
            return Err(AuthError::Unknown);
        }
        Ok(record)
    }

    /// The identity a token's record proves (its names were checked when
    /// it was created).
    fn identity_of(&self, record: TokenRecord) -> Result<WorkloadIdentity, AuthError> {
        let spiffe_id = self
            .spiffe_id(&record.namespace, &record.service)
            .map_err(|e| AuthError::Internal(format!("token {}: {e}", record.id)))?;
        Ok(WorkloadIdentity {
            spiffe_id,
            token_id: Some(record.id),
        })
    }

    /// Checks a credential for a first certificate at time `now`: genuine,
    /// not revoked, not expired, a use left. The secret is checked before
    /// the rest, so that only its holder learns the token's state.
    pub fn verify(&self, credential: &str, now: i64) -> Result<WorkloadIdentity, AuthError> {
        let record = self.genuine(credential)?;
        if let Some(refusal) = record.refuses_new(now) {
            return Err(refusal);
        }
        self.identity_of(record)
    }

    /// Checks a credential presented with a renewal (the workload proved its
    /// identity with its current certificate): genuine and not revoked; its
    /// TTL and uses are for new certificates only.
    pub fn verify_renewal(&self, credential: &str) -> Result<WorkloadIdentity, AuthError> {
        let record = self.genuine(credential)?;
        if record.revoked {
            return Err(AuthError::Revoked);
        }
        self.identity_of(record)
    }

    /// Counts one first certificate against token `id` at time `now`, in one
    /// durable transaction with the check that it may still bootstrap one.
    pub fn consume(&self, id: &str, now: i64) -> Result<TokenRecord, AuthError> {
        let internal = |e: &dyn std::fmt::Display| AuthError::Internal(e.to_string());
        let mut outcome = Err(AuthError::Unknown);
        self.db
            .update(TOKENS, id, |bytes| {
                let Some(bytes) = bytes else {
                    return Ok(None);
                };
                let mut record = match Self::decode(id, bytes) {
                    Ok(record) => record,
                    Err(e) => {
                        outcome = Err(internal(&e));
                        return Ok(None);
                    }
                };
                if let Some(refusal) = record.refuses_new(now) {
                    outcome = Err(refusal);
                    return Ok(None);
                }
                record.uses = record.uses.saturating_add(1);
                let encoded = serde_json::to_vec(&record).map_err(|e| internal(&e));
                outcome = Ok(record);
                match encoded {
                    Ok(encoded) => Ok(Some(encoded)),
                    Err(e) => {
                        outcome = Err(e);
                        Ok(None)
                    }
                }
            })
            .map_err(|e| internal(&e))?;
        outcome
    }
}

/// Runs a token-store call on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AuthError> + Send + 'static,
) -> Result<T, AuthError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AuthError::Internal(e.to_string()))?
}

#[tonic::async_trait]
impl WorkloadAuthenticator for TokenStore {
    async fn authenticate(&self, credential: &str) -> Result<WorkloadIdentity, AuthError> {
        let store = self.clone();
        let credential = credential.to_string();
        blocking(move || store.verify(&credential, now_unix())).await
    }

    async fn authenticate_renewal(&self, credential: &str) -> Result<WorkloadIdentity, AuthError> {
        let store = self.clone();
        let credential = credential.to_string();
        blocking(move || store.verify_renewal(&credential)).await
    }

    async fn consume(&self, who: &WorkloadIdentity) -> Result<(), AuthError> {
        let Some(id) = who.token_id.clone() else {
            return Ok(());
        };
        let store = self.clone();
        blocking(move || store.consume(&id, now_unix()).map(|_| ())).await
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
    fn a_limited_token_bootstraps_its_uses_and_no_more_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(IdentityDb::open(dir.path()).unwrap(), "cluster.local");
        let (token, record) = store
            .create_limited("shop", "backend", None, Some(2))
            .unwrap();
        for _ in 0..2 {
            let who = store.verify(&token, now_unix()).unwrap();
            assert_eq!(who.token_id.as_deref(), Some(record.id.as_str()));
            store.consume(&record.id, now_unix()).unwrap();
        }
        assert_eq!(store.verify(&token, now_unix()), Err(AuthError::UsedUp(2)));
        assert_eq!(
            store.consume(&record.id, now_unix()),
            Err(AuthError::UsedUp(2))
        );
        // Renewals (by a workload holding its certificate) still pass.
        assert!(store.verify_renewal(&token).is_ok());
        drop(store);
        let store = TokenStore::new(IdentityDb::open(dir.path()).unwrap(), "cluster.local");
        assert_eq!(store.verify(&token, now_unix()), Err(AuthError::UsedUp(2)));
        assert_eq!(store.get(&record.id).unwrap().unwrap().uses_text(), "2/2");
        store.revoke(&record.id).unwrap();
        assert_eq!(store.verify_renewal(&token), Err(AuthError::Revoked));
        assert!(store
            .create_limited("shop", "backend", None, Some(0))
            .is_err());
    }

    #[test]
    fn an_expired_token_is_refused_for_new_certificates_but_not_renewals() {
        let (_dir, store) = store();
        let (token, record) = store
            .create("shop", "backend", Some(Duration::from_secs(600)))
            .unwrap();
        let later = record.created_unix + 600;
        assert_eq!(store.verify(&token, later), Err(AuthError::Expired));
        assert_eq!(store.consume(&record.id, later), Err(AuthError::Expired));
        assert!(store.verify_renewal(&token).is_ok());
    }

    #[test]
    fn records_without_use_counts_read_as_unlimited() {
        let old = r#"{"id":"a","namespace":"shop","service":"b","secret_sha256":"x",
            "created_unix":1,"expires_unix":0,"revoked":false}"#;
        let record: TokenRecord = serde_json::from_str(old).unwrap();
        assert_eq!((record.max_uses, record.uses), (0, 0));
        assert_eq!(record.refuses_new(2), None);
    }

    #[test]
    fn a_jwt_is_not_taken_for_a_malformed_bootstrap_token() {
        let (_dir, store) = store();
        let jwt = format!("eyJhbGciOiJSUzI1NiJ9.{}.c2ln", "e".repeat(1500));
        let Err(AuthError::Malformed(why)) = store.verify(&jwt, now_unix()) else {
            panic!("not refused as malformed")
        };
        assert!(why.contains("--kubernetes-issuer"), "{why}");
        assert_eq!(
            AuthError::Jwt(remora_proto::jwt::JwtError::Expired).to_string(),
            "ServiceAccount token refused: the token has expired"
        );
        assert_eq!(
            AuthError::Jwt(remora_proto::jwt::JwtError::Audience).reason(),
            "jwt_audience"
        );
    }

    #[test]
    fn names_must_fit_a_spiffe_path() {
        let (_dir, store) = store();
        assert!(store.create("shop", "a/b", None).is_err());
        assert!(store.create("..", "a", None).is_err());
        assert!(store.create("", "a", None).is_err());
    }
}
