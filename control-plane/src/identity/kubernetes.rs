//! Kubernetes ServiceAccount tokens as workload credentials
//! (`serve --kubernetes-issuer URL --kubernetes-jwks FILE`).
//!
//! A pod injected by `remora-control inject` mounts a projected
//! ServiceAccount token (a JWT signed by the cluster's service-account
//! issuer, for the audience `remora`, refreshed by the kubelet) and its proxy
//! presents it to `Identity.Certify`. [`KubernetesAuthenticator`] verifies it
//! offline, with the issuer's public keys (the JSON served at the cluster's
//! `/openid/v1/jwks`, kept in a file): signature (RS256/ES256 and the other
//! asymmetric algorithms of [`remora_proto::jwt`]; never `none` or HMAC),
//! issuer, audience, `exp` (required), `nbf` and `iat`. The identity is the
//! token's ServiceAccount: `kubernetes.io.namespace` and
//! `kubernetes.io.serviceaccount.name`, which `sub` must repeat as
//! `system:serviceaccount:<ns>:<sa>`; the certificate is for
//! `spiffe://<trust-domain>/ns/<ns>/sa/<sa>` only.
//!
//! The key file is looked at again at most once a second and re-read when
//! its modification time, size or inode changed, so a rotated cluster key
//! works without a restart; a file that cannot be read or parsed leaves the
//! last good keys in force (with a warning).
//!
//! Renewals go through the same checks (the kubelet keeps the file fresh),
//! and no use is counted. Verification is offline: a token stays good until
//! its `exp` even if its pod was deleted (no TokenReview call).
//!
//! [`CompositeAuthenticator`] puts it beside the bootstrap tokens: a
//! credential shaped like a JWT goes to the Kubernetes verifier, anything
//! else to the [`TokenStore`].

use crate::identity::tokens::{AuthError, TokenStore, WorkloadAuthenticator, WorkloadIdentity};
use parking_lot::Mutex;
use remora_proto::identity::check_name;
use remora_proto::jwt::{self, Claims, Expected, KeySet};
use remora_proto::SpiffeId;
use serde_json::Value;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// The audience a token must be for unless `--kubernetes-audience` says
/// otherwise (the one `inject` asks the kubelet for).
pub const DEFAULT_AUDIENCE: &str = "remora";
/// The key file is looked at for a change at most this often.
pub const JWKS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// `--kubernetes-issuer`, `--kubernetes-jwks`, `--kubernetes-audience`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    /// The cluster's service-account issuer (`iss`), as its OIDC discovery
    /// document names it.
    pub issuer: String,
    /// The issuer's JWK set (`kubectl get --raw /openid/v1/jwks`).
    pub jwks_file: PathBuf,
    /// The audience a token must name.
    pub audience: String,
}

impl KubernetesConfig {
    pub fn new(issuer: &str, jwks_file: &Path) -> KubernetesConfig {
        KubernetesConfig {
            issuer: issuer.to_string(),
            jwks_file: jwks_file.to_path_buf(),
            audience: DEFAULT_AUDIENCE.to_string(),
        }
    }
}

/// Verifies projected ServiceAccount tokens.
pub struct KubernetesAuthenticator {
    expected: Expected,
    trust_domain: String,
    jwks: JwksFile,
}

impl std::fmt::Debug for KubernetesAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesAuthenticator")
            .field("issuer", &self.expected.issuer)
            .field("audiences", &self.expected.audiences)
            .field("jwks_file", &self.jwks.path)
            .finish_non_exhaustive()
    }
}

impl KubernetesAuthenticator {
    /// Reads the key file (it must hold a usable JWK set) and checks the
    /// settings.
    pub fn open(
        config: &KubernetesConfig,
        trust_domain: &str,
    ) -> Result<KubernetesAuthenticator, String> {
        if config.issuer.trim().is_empty() {
            return Err("--kubernetes-issuer is empty".into());
        }
        if config.audience.trim().is_empty() {
            return Err("--kubernetes-audience is empty".into());
        }
        let (keys, stamp) = read_jwks(&config.jwks_file).map_err(|(e, _)| {
            format!(
                "cannot use --kubernetes-jwks {}: {e}",
                config.jwks_file.display()
            )
        })?;
        Ok(KubernetesAuthenticator {
            expected: Expected {
                issuer: config.issuer.clone(),
                audiences: vec![config.audience.clone()],
            },
            trust_domain: trust_domain.to_string(),
            jwks: JwksFile {
                path: config.jwks_file.clone(),
                interval: JWKS_CHECK_INTERVAL,
                state: Mutex::new(JwksState {
                    keys: Arc::new(keys),
                    stamp: Some(stamp),
                    checked: Instant::now(),
                    failing: None,
                }),
            },
        })
    }

    /// The key ids in force (for logs and tests).
    pub fn kids(&self) -> Vec<String> {
        self.jwks.current().kids()
    }

    /// Checks `credential` at time `now` (Unix seconds): the identity of the
    /// ServiceAccount it was issued for.
    pub fn verify_at(&self, credential: &str, now: u64) -> Result<WorkloadIdentity, AuthError> {
        let keys = self.jwks.current();
        let claims =
            jwt::verify(credential.trim(), &keys, &self.expected, now).map_err(AuthError::Jwt)?;
        let (namespace, account) = service_account(&claims).map_err(AuthError::Claims)?;
        Ok(WorkloadIdentity {
            spiffe_id: SpiffeId::new(&self.trust_domain, &namespace, &account)
                .map_err(AuthError::Claims)?,
            token_id: None,
        })
    }

    /// [`verify_at`](Self::verify_at) now.
    pub fn verify(&self, credential: &str) -> Result<WorkloadIdentity, AuthError> {
        let now = u64::try_from(remora_proto::util::now_unix()).unwrap_or(0);
        self.verify_at(credential, now)
    }

    #[cfg(test)]
    fn check_every(mut self, interval: Duration) -> KubernetesAuthenticator {
        self.jwks.interval = interval;
        self
    }
}

#[tonic::async_trait]
impl WorkloadAuthenticator for KubernetesAuthenticator {
    async fn authenticate(&self, credential: &str) -> Result<WorkloadIdentity, AuthError> {
        self.verify(credential)
    }
    // Renewals: the same checks (the default); no uses to count.
}

/// The namespace and ServiceAccount a token's claims name, checked against
/// its `sub`.
fn service_account(claims: &Claims) -> Result<(String, String), String> {
    let k8s = claims
        .get("kubernetes.io")
        .and_then(Value::as_object)
        .ok_or("no kubernetes.io claim: not a projected ServiceAccount token")?;
    let namespace = k8s
        .get("namespace")
        .and_then(Value::as_str)
        .ok_or("no kubernetes.io.namespace claim")?;
    let account = k8s
        .get("serviceaccount")
        .and_then(|sa| sa.get("name"))
        .and_then(Value::as_str)
        .ok_or("no kubernetes.io.serviceaccount.name claim")?;
    check_name("namespace", namespace)?;
    check_name("service account", account)?;
    let want = format!("system:serviceaccount:{namespace}:{account}");
    match claims.get("sub").and_then(Value::as_str) {
        Some(sub) if sub == want => Ok((namespace.to_string(), account.to_string())),
        Some(sub) => Err(format!(
            "sub {:?} does not match the kubernetes.io claims ({want:?})",
            sub.chars().take(128).collect::<String>()
        )),
        None => Err(format!("no sub claim (expected {want:?})")),
    }
}

// ------------------------------------------------------------------ key file

/// What tells one version of the key file from another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt as _;
        Stamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: meta.ino(),
        }
    }
}

/// Reads and parses the key file. On failure, the stamp of the version that
/// could not be used, if the file could be opened (so that it is not tried
/// again until it changes).
fn read_jwks(path: &Path) -> Result<(KeySet, Stamp), (String, Option<Stamp>)> {
    let file = std::fs::File::open(path).map_err(|e| (e.to_string(), None))?;
    let meta = file.metadata().map_err(|e| (e.to_string(), None))?;
    let stamp = Stamp::of(&meta);
    if !meta.is_file() {
        return Err(("not a regular file".into(), Some(stamp)));
    }
    let mut text = String::new();
    file.take(jwt::MAX_JWKS_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(|e| (e.to_string(), Some(stamp)))?;
    let keys = KeySet::parse(&text).map_err(|e| (e, Some(stamp)))?;
    Ok((keys, stamp))
}

/// The key file and the keys last read from it.
struct JwksFile {
    path: PathBuf,
    interval: Duration,
    state: Mutex<JwksState>,
}

struct JwksState {
    /// The last good keys.
    keys: Arc<KeySet>,
    /// The version last read (good or not).
    stamp: Option<Stamp>,
    checked: Instant,
    /// Why the file is not in use, while it is not (warned once per cause).
    failing: Option<String>,
}

impl JwksFile {
    /// The keys in force, after looking at the file if it is time to.
    fn current(&self) -> Arc<KeySet> {
        let mut state = self.state.lock();
        if state.checked.elapsed() >= self.interval {
            state.checked = Instant::now();
            self.refresh(&mut state);
        }
        state.keys.clone()
    }

    fn refresh(&self, state: &mut JwksState) {
        let changed = match std::fs::metadata(&self.path) {
            Ok(meta) => state.stamp != Some(Stamp::of(&meta)),
            Err(_) => true,
        };
        if !changed {
            return;
        }
        match read_jwks(&self.path) {
            Ok((keys, stamp)) => {
                tracing::info!(file = %self.path.display(), kids = ?keys.kids(),
                    "Kubernetes service-account keys reloaded");
                state.keys = Arc::new(keys);
                state.stamp = Some(stamp);
                state.failing = None;
            }
            Err((error, stamp)) => {
                if stamp.is_some() {
                    state.stamp = stamp;
                }
                if state.failing.as_deref() != Some(error.as_str()) {
                    tracing::warn!(file = %self.path.display(), %error, kids = ?state.keys.kids(),
                        "cannot reload the Kubernetes service-account keys; keeping the last good ones");
                    state.failing = Some(error);
                }
            }
        }
    }
}

// ------------------------------------------------------------------ composite

/// Whether a credential is for the Kubernetes verifier: a JWT's shape, or
/// at least three dot-separated parts (a bootstrap token has two), so that a
/// malformed JWT (`alg: none` with its empty signature) is refused as one.
pub fn is_jwt_credential(credential: &str) -> bool {
    let credential = credential.trim();
    jwt::looks_like_jwt(credential) || credential.matches('.').count() >= 2
}

/// Bootstrap tokens and Kubernetes ServiceAccount tokens side by side.
#[derive(Debug, Clone)]
pub struct CompositeAuthenticator {
    tokens: Arc<TokenStore>,
    kubernetes: Arc<KubernetesAuthenticator>,
}

impl CompositeAuthenticator {
    pub fn new(
        tokens: Arc<TokenStore>,
        kubernetes: Arc<KubernetesAuthenticator>,
    ) -> CompositeAuthenticator {
        CompositeAuthenticator { tokens, kubernetes }
    }
}

#[tonic::async_trait]
impl WorkloadAuthenticator for CompositeAuthenticator {
    async fn authenticate(&self, credential: &str) -> Result<WorkloadIdentity, AuthError> {
        if is_jwt_credential(credential) {
            self.kubernetes.authenticate(credential).await
        } else {
            self.tokens.authenticate(credential).await
        }
    }

    async fn authenticate_renewal(&self, credential: &str) -> Result<WorkloadIdentity, AuthError> {
        if is_jwt_credential(credential) {
            self.kubernetes.authenticate_renewal(credential).await
        } else {
            self.tokens.authenticate_renewal(credential).await
        }
    }

    async fn consume(&self, who: &WorkloadIdentity) -> Result<(), AuthError> {
        // Only a bootstrap token has uses (its id is in `who`).
        if who.token_id.is_some() {
            WorkloadAuthenticator::consume(&*self.tokens, who).await
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::db::IdentityDb;
    use crate::metrics::certs::{CertMetrics, REFUSAL_REASONS};
    use remora_proto::jwt::testing::{self, ec, hs256, jwks, now, raw, rsa, rsa_other, sign};
    use serde_json::json;

    const ISS: &str = "https://kubernetes.default.svc";

    fn claims(ns: &str, sa: &str, now: u64) -> Value {
        json!({
            "aud": ["remora"],
            "exp": now + 3600,
            "iat": now,
            "nbf": now,
            "iss": ISS,
            "jti": "6f1c9b0e-1f5e-4a83-9d3e-2f3f1c0a7b11",
            "kubernetes.io": {
                "namespace": ns,
                "node": {"name": "node-1", "uid": "3c1d2b6a-0000-4000-8000-000000000001"},
                "pod": {"name": format!("{sa}-7d9f8b6c5-x2x9q"), "uid": "3c1d2b6a-0000-4000-8000-000000000002"},
                "serviceaccount": {"name": sa, "uid": "3c1d2b6a-0000-4000-8000-000000000003"}
            },
            "sub": format!("system:serviceaccount:{ns}:{sa}")
        })
    }

    /// Writes `text` to `path` as a kubelet or `kubectl ... > tmp && mv`
    /// would: whole, by a rename.
    fn write_atomically(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    struct Setup {
        _dir: tempfile::TempDir,
        file: PathBuf,
    }

    fn setup(keys: &[&testing::TestKey]) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("jwks.json");
        write_atomically(&file, &jwks(keys));
        Setup { _dir: dir, file }
    }

    fn authenticator(s: &Setup) -> KubernetesAuthenticator {
        KubernetesAuthenticator::open(&KubernetesConfig::new(ISS, &s.file), "cluster.local")
            .unwrap()
    }

    fn reason(auth: &KubernetesAuthenticator, token: &str) -> &'static str {
        auth.verify(token).unwrap_err().reason()
    }

    #[tokio::test]
    async fn rs256_and_es256_tokens_prove_their_service_account() {
        let (r, e) = (rsa("r1"), ec("e1"));
        let s = setup(&[&r, &e]);
        let auth = authenticator(&s);
        for (key, ns, sa) in [(&r, "shop", "backend"), (&e, "billing", "invoices")] {
            let token = sign(key, &claims(ns, sa, now()));
            let want = format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
            for who in [
                auth.authenticate(&token).await.unwrap(),
                auth.authenticate_renewal(&token).await.unwrap(),
                // As read from a file, with its newline.
                auth.authenticate(&format!("{token}\n")).await.unwrap(),
            ] {
                assert_eq!(who.spiffe_id, want);
                assert_eq!(
                    (who.spiffe_id.namespace(), who.spiffe_id.service()),
                    (ns, sa)
                );
                assert_eq!(who.token_id, None, "nothing to consume");
                auth.consume(&who).await.unwrap();
            }
        }
        // A single audience string is as good as a list.
        let mut c = claims("shop", "backend", now());
        c["aud"] = json!("remora");
        assert!(auth.verify(&sign(&r, &c)).is_ok());
    }

    #[test]
    fn each_bad_token_is_refused_with_its_reason_and_a_clear_message() {
        let key = rsa("r1");
        let s = setup(&[&key]);
        let auth = authenticator(&s);
        let now = now();
        let with = |patch: Value| {
            let mut c = claims("shop", "backend", now);
            for (k, v) in patch.as_object().unwrap() {
                c[k] = v.clone();
            }
            sign(&key, &c)
        };
        let cases = [
            (
                with(json!({"aud": ["kubernetes"]})),
                "jwt_audience",
                "audience",
            ),
            (
                with(json!({"iss": "https://evil.example"})),
                "jwt_issuer",
                "issuer",
            ),
            (
                with(json!({"exp": now - 3600, "iat": now - 7200, "nbf": now - 7200})),
                "jwt_expired",
                "the token has expired",
            ),
            (
                with(json!({"nbf": now + 3600})),
                "jwt_not_yet_valid",
                "not valid yet",
            ),
            // Signed by another key under the kid of the set's key.
            (
                sign(&rsa_other("r1"), &claims("shop", "backend", now)),
                "jwt_signature",
                "signature",
            ),
            // A key the set does not hold.
            (
                sign(&rsa_other("r2"), &claims("shop", "backend", now)),
                "jwt_unknown_key",
                "kid",
            ),
            // alg: none.
            (
                raw(
                    &json!({"alg": "none", "kid": "r1"}),
                    &claims("shop", "backend", now),
                    b"x",
                ),
                "jwt_algorithm",
                "none",
            ),
            (
                raw(
                    &json!({"alg": "none", "kid": "r1"}),
                    &claims("shop", "backend", now),
                    b"",
                ),
                "jwt_malformed",
                "malformed",
            ),
            // HS256 "signed" with the public key (the confusion attack).
            (
                hs256(
                    &serde_json::to_vec(&key.jwk).unwrap(),
                    "r1",
                    &claims("shop", "backend", now),
                ),
                "jwt_algorithm",
                "HS256",
            ),
            (
                hs256(
                    jwks(&[&key]).as_bytes(),
                    "r1",
                    &claims("shop", "backend", now),
                ),
                "jwt_algorithm",
                "HS256",
            ),
            // The claims name one ServiceAccount, sub another.
            (
                with(json!({"sub": "system:serviceaccount:kube-system:admin"})),
                "jwt_claim",
                "does not match",
            ),
            (with(json!({"sub": "alice"})), "jwt_claim", "does not match"),
            (
                sign(&key, &{
                    let mut c = claims("shop", "backend", now);
                    c.as_object_mut().unwrap().remove("sub");
                    c
                }),
                "jwt_claim",
                "no sub",
            ),
            // Not a ServiceAccount token at all.
            (
                sign(&key, &{
                    let mut c = claims("shop", "backend", now);
                    c.as_object_mut().unwrap().remove("kubernetes.io");
                    c
                }),
                "jwt_claim",
                "kubernetes.io",
            ),
            // A name that cannot be a SPIFFE path segment.
            (
                sign(&key, &claims("shop", "a/b", now)),
                "jwt_claim",
                "invalid service account",
            ),
            // A legacy (Secret) ServiceAccount token: no exp, no aud.
            (
                sign(
                    &key,
                    &json!({"iss": ISS, "sub": "system:serviceaccount:shop:backend",
                        "kubernetes.io/serviceaccount/namespace": "shop"}),
                ),
                "jwt_claim",
                "exp",
            ),
        ];
        for (token, want, message) in &cases {
            let err = auth.verify(token).unwrap_err();
            assert_eq!(err.reason(), *want, "{err}");
            assert!(
                err.to_string().contains(message),
                "{want}: {err:?} does not say {message:?}"
            );
        }
    }

    #[test]
    fn every_refusal_reason_is_counted_as_itself() {
        let m = CertMetrics::default();
        let reasons = [
            "jwt_too_large",
            "jwt_malformed",
            "jwt_algorithm",
            "jwt_unknown_key",
            "jwt_signature",
            "jwt_expired",
            "jwt_not_yet_valid",
            "jwt_issuer",
            "jwt_audience",
            "jwt_claim",
        ];
        for r in reasons {
            assert!(REFUSAL_REASONS.contains(&r), "{r}");
            m.refuse(r);
            assert_eq!(m.refused(r), 1, "{r}");
        }
        assert_eq!(m.refused("internal"), 0);
        assert_eq!(AuthError::Claims("x".into()).reason(), "jwt_claim");
    }

    #[test]
    fn a_rotated_key_file_is_used_without_a_restart_and_a_bad_one_is_ignored() {
        let (a, b) = (rsa("a"), rsa_other("b"));
        let s = setup(&[&a]);
        let auth = authenticator(&s).check_every(Duration::ZERO);
        let by_a = sign(&a, &claims("shop", "backend", now()));
        let by_b = sign(&b, &claims("shop", "backend", now()));
        assert!(auth.verify(&by_a).is_ok());
        assert_eq!(reason(&auth, &by_b), "jwt_unknown_key");

        // The cluster rotates: the new key beside the old, then alone.
        write_atomically(&s.file, &jwks(&[&a, &b]));
        assert!(auth.verify(&by_a).is_ok());
        assert!(auth.verify(&by_b).is_ok());
        write_atomically(&s.file, &jwks(&[&b]));
        assert!(auth.verify(&by_b).is_ok());
        assert_eq!(reason(&auth, &by_a), "jwt_unknown_key");
        assert_eq!(auth.kids(), ["b"]);

        // A broken file, an empty set, a missing file: the last good keys stay.
        for bad in ["{\"keys\": [", "{\"keys\": []}"] {
            write_atomically(&s.file, bad);
            assert!(auth.verify(&by_b).is_ok(), "{bad}");
        }
        std::fs::remove_file(&s.file).unwrap();
        assert!(auth.verify(&by_b).is_ok());
        // And a good file again is read.
        write_atomically(&s.file, &jwks(&[&a]));
        assert!(auth.verify(&by_a).is_ok());
        assert_eq!(reason(&auth, &by_b), "jwt_unknown_key");
    }

    #[test]
    fn the_key_file_is_looked_at_at_most_once_a_second() {
        let (a, b) = (rsa("a"), ec("b"));
        let s = setup(&[&a]);
        let auth = authenticator(&s);
        let by_b = sign(&b, &claims("shop", "backend", now()));
        std::thread::sleep(JWKS_CHECK_INTERVAL + Duration::from_millis(100));
        assert_eq!(reason(&auth, &by_b), "jwt_unknown_key"); // checked now
        write_atomically(&s.file, &jwks(&[&b]));
        assert_eq!(
            reason(&auth, &by_b),
            "jwt_unknown_key",
            "looked again within the second"
        );
        std::thread::sleep(JWKS_CHECK_INTERVAL + Duration::from_millis(100));
        assert!(auth.verify(&by_b).is_ok());
    }

    #[test]
    fn a_bad_key_file_or_setting_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let open = |issuer: &str, file: &Path, audience: &str| {
            let mut config = KubernetesConfig::new(issuer, file);
            config.audience = audience.into();
            KubernetesAuthenticator::open(&config, "cluster.local").unwrap_err()
        };
        let missing = dir.path().join("missing.json");
        assert!(open(ISS, &missing, "remora").contains("cannot use --kubernetes-jwks"));
        let garbage = dir.path().join("garbage.json");
        std::fs::write(&garbage, "not json").unwrap();
        assert!(open(ISS, &garbage, "remora").contains("not a JWK set"));
        let hmac = dir.path().join("hmac.json");
        std::fs::write(&hmac, r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).unwrap();
        assert!(open(ISS, &hmac, "remora").contains("no usable key"));
        let good = setup(&[&rsa("a")]);
        assert!(open("", &good.file, "remora").contains("issuer"));
        assert!(open(ISS, &good.file, " ").contains("audience"));
    }

    #[tokio::test]
    async fn jwts_go_to_kubernetes_and_bootstrap_tokens_to_the_store() {
        let key = rsa("r1");
        let s = setup(&[&key]);
        let db_dir = tempfile::tempdir().unwrap();
        let store = Arc::new(TokenStore::new(
            IdentityDb::open(db_dir.path()).unwrap(),
            "cluster.local",
        ));
        let (bootstrap, record) = store
            .create_limited("shop", "legacy", None, Some(1))
            .unwrap();
        let both = CompositeAuthenticator::new(store.clone(), Arc::new(authenticator(&s)));

        // A real projected token is 1-2 KB: far over the bootstrap tokens'
        // 256 bytes, and it reaches the verifier.
        let mut c = claims("shop", "backend", now());
        c["kubernetes.io"]["pod"]["name"] = json!("p".repeat(200));
        c["kubernetes.io"]["extra"] = json!("x".repeat(600));
        let token = sign(&key, &c);
        assert!(token.len() > 1024, "{}", token.len());
        let who = both.authenticate(&token).await.unwrap();
        assert_eq!(who.spiffe_id, "spiffe://cluster.local/ns/shop/sa/backend");
        both.consume(&who).await.unwrap();
        assert!(both.authenticate_renewal(&token).await.is_ok());

        let who = both.authenticate(&bootstrap).await.unwrap();
        assert_eq!(who.spiffe_id, "spiffe://cluster.local/ns/shop/sa/legacy");
        both.consume(&who).await.unwrap();
        assert_eq!(store.get(&record.id).unwrap().unwrap().uses, 1);
        assert_eq!(
            both.authenticate(&bootstrap).await,
            Err(AuthError::UsedUp(1))
        );
        assert!(both.authenticate_renewal(&bootstrap).await.is_ok());

        // Bad JWTs are refused as JWTs, other garbage as bootstrap tokens.
        let expired = sign(&key, &{
            let mut c = claims("shop", "backend", now() - 7200);
            c["exp"] = json!(now() - 3600);
            c
        });
        let err = both.authenticate(&expired).await.unwrap_err();
        assert_eq!(err.reason(), "jwt_expired");
        assert!(err.to_string().contains("the token has expired"), "{err}");
        assert_eq!(
            both.authenticate("a.b.").await.unwrap_err().reason(),
            "jwt_malformed"
        );
        assert_eq!(
            both.authenticate("nodot").await.unwrap_err().reason(),
            "token_malformed"
        );
        assert!(is_jwt_credential(&format!("{token}\n")));
        assert!(!is_jwt_credential(&bootstrap));
    }
}
