//! The `remora.v1.Admin` gRPC service: apply, get, delete, history, diff,
//! rollback and status, plus bootstrap tokens and root rotation (in
//! [`identity`]). Authentication is the [`auth::AdminAuth`]
//! interceptor in front of it.
//!
//! Every change is validated whole, committed durably, and only then published
//! to the proxies and answered. Documents are parsed and validated on the
//! blocking pool, one apply at a time, within a size limit per apply
//! (`--max-apply-bytes`) and the nesting limit of
//! [`remora_proto::policy::MAX_NESTING_DEPTH`], so no document can hold up
//! discovery, certificates or the other Admin calls.

pub mod auth;
pub mod identity;

use crate::discovery::registry::{resources_of, Registry};
use crate::human;
use crate::identity::ca::Authority;
use crate::identity::tokens::TokenStore;
use crate::policy::changes::{self, Plan};
use crate::policy::store::{HistoryRecord, Store, StoreError};
use crate::server::replica::Replica;
use crate::server::rotation::Rotation;
use remora_proto::policy::{parse_documents, Document, Kind, ResourceKey};
use remora_proto::v1::admin_server::Admin;
use remora_proto::v1::{
    ApplyRequest, ApplyResponse, CreateTokenRequest, CreateTokenResponse, DeleteRequest,
    DiffRequest, DiffResponse, GetRequest, GetResponse, HistoryEntry, HistoryRequest,
    HistoryResponse, ListTokensRequest, ListTokensResponse, RevokeTokenRequest,
    RevokeTokenResponse, RollbackRequest, RotateCaRequest, RotateCaResponse, StatusRequest,
    StatusResponse,
};
use std::sync::Arc;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

/// The largest apply (all its files together) by default.
pub const DEFAULT_MAX_APPLY_BYTES: usize = 1024 * 1024;

/// The largest Admin request the gRPC layer decodes: far above any apply
/// limit an operator would set, so that the service itself can answer an
/// oversized apply (naming the limit) rather than gRPC's codec.
pub fn max_decoding_bytes(max_apply_bytes: usize) -> usize {
    max_apply_bytes.saturating_mul(2).max(64 * 1024 * 1024)
}

/// The Admin service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AdminService {
    store: Arc<Mutex<Store>>,
    registry: Arc<Registry>,
    identity: AdminIdentity,
    max_apply_bytes: usize,
    /// One parse at a time: a costly document waits for its turn rather
    /// than taking every core.
    parsing: Arc<tokio::sync::Semaphore>,
    /// With `--store etcd`: this replica, and the admin token it asks the
    /// others with.
    replica: Option<(Arc<Replica>, String)>,
}

/// What the identity RPCs need.
#[derive(Debug, Clone)]
pub struct AdminIdentity {
    pub tokens: Arc<TokenStore>,
    pub rotation: Arc<Rotation>,
    pub authority: Arc<Authority>,
}

impl AdminService {
    pub fn new(
        store: Arc<Mutex<Store>>,
        registry: Arc<Registry>,
        identity: AdminIdentity,
        max_apply_bytes: usize,
    ) -> AdminService {
        AdminService {
            store,
            registry,
            identity,
            max_apply_bytes,
            parsing: Arc::new(tokio::sync::Semaphore::new(1)),
            replica: None,
        }
    }

    /// One replica of several: `status` gathers every replica's proxies.
    pub fn with_replica(mut self, replica: Arc<Replica>, admin_token: &str) -> AdminService {
        self.replica = Some((replica, admin_token.to_string()));
        self
    }

    /// Runs `f` on the store, on the blocking pool (redb reads and fsyncs block),
    /// with the store locked so that this replica's changes are serialized.
    /// A change finishes and is published even if the caller goes away
    /// meanwhile. With the shared store (etcd) the store first catches up
    /// with what other replicas committed, and `f` runs again, on the newer
    /// version, when another replica commits first.
    async fn with_store<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: Fn(&mut Store, &Registry) -> Result<T, Status> + Send + 'static,
    {
        let mut store = self.store.clone().lock_owned().await;
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || {
            let mut attempt = 0;
            loop {
                if store.refresh().map_err(store_status)? {
                    registry.set_policy(store.version(), &store.current());
                }
                match f(&mut store, &registry) {
                    Err(_) if store.take_conflict() && attempt < MAX_COMMIT_ATTEMPTS => {
                        attempt += 1;
                    }
                    other => return other,
                }
            }
        })
        .await
        .map_err(|e| Status::internal(format!("policy store task failed: {e}")))?
    }
}

/// Commits that lose the race to another replica, in a row, before an apply
/// gives up.
const MAX_COMMIT_ATTEMPTS: u32 = 64;

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::UnknownVersion(_) => Status::not_found(e.to_string()),
        StoreError::Conflict(_) => Status::aborted(e.to_string()),
        ref shared if shared.is_unavailable() => {
            tracing::warn!(error = %shared, "policy store unavailable");
            Status::unavailable(shared.to_string())
        }
        other => {
            tracing::error!(error = %other, "policy store failure");
            Status::internal(other.to_string())
        }
    }
}

fn parse_kind(kind: &str) -> Result<Kind, Status> {
    Kind::parse(kind).ok_or_else(|| {
        Status::invalid_argument(format!(
            "unknown kind {kind:?} (one of {})",
            Kind::ALL.map(Kind::as_str).join(", ")
        ))
    })
}

/// Commits a plan as a new version and publishes it; answers the current
/// version unchanged when the plan changes nothing.
fn commit(
    store: &mut Store,
    registry: &Registry,
    action: &str,
    plan: Plan,
) -> Result<ApplyResponse, Status> {
    if !plan.changed {
        return Ok(ApplyResponse {
            version: store.version(),
            changed: false,
            results: plan.results,
        });
    }
    let version = store
        .commit(action, &plan.summary, plan.state)
        .map_err(store_status)?;
    registry.set_policy(version, &store.current());
    tracing::info!(version, action, summary = %plan.summary, "policy changed");
    Ok(ApplyResponse {
        version,
        changed: true,
        results: plan.results,
    })
}

fn history_entry(r: HistoryRecord) -> HistoryEntry {
    HistoryEntry {
        version: r.version,
        timestamp_unix_ms: r.timestamp_unix_ms,
        action: r.action,
        summary: r.summary,
        resource_count: r.resource_count,
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let ApplyRequest { files, dry_run } = request.into_inner();
        if files.is_empty() {
            return Err(Status::invalid_argument("apply: no files given"));
        }
        let size: usize = files.iter().map(|f| f.content.len() + f.name.len()).sum();
        if size > self.max_apply_bytes {
            return Err(Status::invalid_argument(format!(
                "the files are {}, more than the limit of {} per apply (the control plane's \
                 --max-apply-bytes): split them into several applies",
                human::bytes(size),
                human::bytes(self.max_apply_bytes)
            )));
        }
        let turn = self
            .parsing
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("the control plane is shutting down"))?;
        // The turn ends with the parse, even if the caller has gone.
        let docs = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            let mut docs: Vec<(String, Document)> = Vec::new();
            for file in &files {
                let parsed = parse_documents(&file.name, &file.content)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                docs.extend(parsed.into_iter().map(|d| (file.name.clone(), d)));
            }
            if docs.is_empty() {
                let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
                return Err(Status::invalid_argument(format!(
                    "no documents in {}",
                    names.join(", ")
                )));
            }
            Ok(docs)
        })
        .await
        .map_err(|e| Status::internal(format!("policy parsing task failed: {e}")))??;
        let response = self
            .with_store(move |store, registry| {
                let plan = changes::plan_apply(&store.current(), &docs)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                if dry_run {
                    // `changed` tells whether the apply would change anything.
                    return Ok(ApplyResponse {
                        version: store.version(),
                        changed: plan.changed,
                        results: plan.results,
                    });
                }
                commit(store, registry, "apply", plan)
            })
            .await?;
        Ok(Response::new(response))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let req = request.into_inner();
        let kind = match req.kind.as_str() {
            "" => None,
            k => Some(parse_kind(k)?),
        };
        let response = self
            .with_store(move |store, _| {
                let version = if req.version == 0 {
                    store.version()
                } else {
                    req.version
                };
                let state = store.state_at(version).map_err(store_status)?;
                let selected: crate::policy::store::State = state
                    .iter()
                    .filter(|(key, _)| {
                        kind.is_none_or(|k| key.kind == k)
                            && (req.name.is_empty() || key.name == req.name)
                            && (req.namespace.is_empty() || key.namespace == req.namespace)
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                Ok(GetResponse {
                    version,
                    resources: resources_of(&selected),
                })
            })
            .await?;
        Ok(Response::new(response))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let req = request.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("delete: a name is required"));
        }
        let key = ResourceKey {
            kind: parse_kind(&req.kind)?,
            namespace: if req.namespace.is_empty() {
                "default".to_string()
            } else {
                req.namespace
            },
            name: req.name,
        };
        let response = self
            .with_store(move |store, registry| {
                let plan = changes::plan_delete(&store.current(), &key)
                    .ok_or_else(|| Status::not_found(format!("{key} not found")))?;
                commit(store, registry, "delete", plan)
            })
            .await?;
        Ok(Response::new(response))
    }

    async fn history(
        &self,
        _request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        let records = self
            .with_store(|store, _| store.history().map_err(store_status))
            .await?;
        Ok(Response::new(HistoryResponse {
            entries: records.into_iter().map(history_entry).collect(),
        }))
    }

    /// Version 0 is the empty state, so `diff 0 N` shows all of version N.
    async fn diff(&self, request: Request<DiffRequest>) -> Result<Response<DiffResponse>, Status> {
        let DiffRequest {
            from_version,
            to_version,
        } = request.into_inner();
        let diff = self
            .with_store(move |store, _| {
                let from = store.state_at(from_version).map_err(store_status)?;
                let to = store.state_at(to_version).map_err(store_status)?;
                Ok(changes::unified_diff(from_version, &from, to_version, &to))
            })
            .await?;
        Ok(Response::new(DiffResponse { diff }))
    }

    async fn rollback(
        &self,
        request: Request<RollbackRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let version = request.into_inner().version;
        if version == 0 {
            return Err(Status::invalid_argument(
                "rollback: a version of at least 1 is required (delete resources to empty the store)",
            ));
        }
        let response = self
            .with_store(move |store, registry| {
                let target = store.state_at(version).map_err(store_status)?;
                let plan = changes::plan_restore(&store.current(), &target);
                commit(store, registry, &format!("rollback to {version}"), plan)
            })
            .await?;
        Ok(Response::new(response))
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let local_only = request.into_inner().local_only;
        let snapshot = self.registry.current_snapshot();
        let ca = self.identity.authority.current();
        let (holdouts, deadline) = self.identity.rotation.pending().await;
        let mut response = StatusResponse {
            policy_version: snapshot.policy_version,
            snapshot_version: snapshot.version.clone(),
            proxies: self.registry.status(),
            retiring_signer_id: ca.retiring.clone(),
            signer_id: ca.signer.id.clone(),
            rotation_waiting_for: holdouts.iter().map(ToString::to_string).collect(),
            rotation_deadline_unix: deadline,
            store: "embedded".into(),
            ..StatusResponse::default()
        };
        let Some((replica, token)) = &self.replica else {
            return Ok(Response::new(response));
        };
        response.store = "etcd".into();
        response.replica = replica.id.clone();
        response.leader = replica.leader_id();
        response.replicas = replica.statuses();
        if !local_only {
            let answers = replica.remote_statuses(token, &ca.bundle_pem()).await;
            for (id, answer) in answers {
                match answer {
                    Ok(theirs) => response.proxies.extend(theirs.proxies),
                    Err(e) => {
                        if let Some(r) = response.replicas.iter_mut().find(|r| r.id == id) {
                            r.error = e;
                        }
                    }
                }
            }
            response.proxies.sort_by(|a, b| {
                (&a.namespace, &a.service, &a.instance_id).cmp(&(
                    &b.namespace,
                    &b.service,
                    &b.instance_id,
                ))
            });
        }
        Ok(Response::new(response))
    }

    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        identity::create_token(&self.identity.tokens, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let revoked =
            identity::revoke_token(&self.identity.tokens, request.into_inner().token_id).await?;
        // Its certificates no longer hold a rotation.
        let rotation = self.identity.rotation.clone();
        tokio::spawn(async move { rotation.check().await });
        Ok(Response::new(revoked))
    }

    async fn list_tokens(
        &self,
        _request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        identity::list_tokens(&self.identity.tokens)
            .await
            .map(Response::new)
    }

    async fn rotate_ca(
        &self,
        request: Request<RotateCaRequest>,
    ) -> Result<Response<RotateCaResponse>, Status> {
        identity::rotate_ca(&self.identity.rotation, request.into_inner().finish)
            .await
            .map(Response::new)
    }
}
