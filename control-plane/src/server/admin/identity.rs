//! The Admin RPCs about identity: bootstrap tokens and root rotation.
//! [`crate::server::admin::AdminService`] delegates to these.

use crate::identity::tokens::{TokenError, TokenRecord, TokenStore};
use crate::server::rotation::{Rotation, RotationError};
use remora_proto::v1::{
    CreateTokenRequest, CreateTokenResponse, ListTokensResponse, RevokeTokenResponse,
    RotateCaResponse, TokenInfo,
};
use std::sync::Arc;
use std::time::Duration;
use tonic::Status;

fn token_status(e: TokenError) -> Status {
    match e {
        TokenError::NotFound(_) => Status::not_found(e.to_string()),
        TokenError::Invalid(_) => Status::invalid_argument(e.to_string()),
        other => {
            tracing::error!(error = %other, "token store failure");
            Status::internal(other.to_string())
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TokenError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("token store task failed: {e}")))?
        .map_err(token_status)
}

fn info(store: &TokenStore, r: TokenRecord) -> Result<TokenInfo, Status> {
    let spiffe_id = store
        .spiffe_id(&r.namespace, &r.service)
        .map_err(|message| {
            token_status(TokenError::Corrupt {
                id: r.id.clone(),
                message,
            })
        })?;
    Ok(TokenInfo {
        spiffe_id: spiffe_id.into_string(),
        token_id: r.id,
        created_unix: r.created_unix,
        expires_unix: r.expires_unix,
        revoked: r.revoked,
        uses: r.uses,
        max_uses: r.max_uses,
    })
}

/// `max_uses` 0 is no limit.
pub async fn create_token(
    tokens: &Arc<TokenStore>,
    req: CreateTokenRequest,
) -> Result<CreateTokenResponse, Status> {
    let ttl = (req.ttl_seconds > 0).then(|| Duration::from_secs(req.ttl_seconds));
    let max_uses = (req.max_uses > 0).then_some(req.max_uses);
    let store = tokens.clone();
    let (token, record) =
        blocking(move || store.create_limited(&req.namespace, &req.service, ttl, max_uses)).await?;
    let spiffe_id = tokens
        .spiffe_id(&record.namespace, &record.service)
        .map_err(Status::internal)?
        .into_string();
    tracing::info!(
        token_id = %record.id,
        %spiffe_id,
        expires_unix = record.expires_unix,
        max_uses = record.max_uses,
        "bootstrap token created"
    );
    Ok(CreateTokenResponse {
        token,
        token_id: record.id,
        spiffe_id,
        expires_unix: record.expires_unix,
        max_uses: record.max_uses,
    })
}

pub async fn revoke_token(
    tokens: &Arc<TokenStore>,
    token_id: String,
) -> Result<RevokeTokenResponse, Status> {
    // Accept a whole token too: its id is what precedes the dot.
    let id = token_id
        .split_once('.')
        .map_or(token_id.as_str(), |(id, _)| id)
        .trim()
        .to_string();
    if id.is_empty() {
        return Err(Status::invalid_argument("revoke: a token id is required"));
    }
    let store = tokens.clone();
    let record = blocking(move || store.revoke(&id)).await?;
    tracing::info!(token_id = %record.id, "bootstrap token revoked: no more certificates or \
        renewals for it; those issued stay valid until they expire and hold no root rotation");
    Ok(RevokeTokenResponse {})
}

pub async fn list_tokens(tokens: &Arc<TokenStore>) -> Result<ListTokensResponse, Status> {
    let store = tokens.clone();
    let records = blocking(move || store.list()).await?;
    Ok(ListTokensResponse {
        tokens: records
            .into_iter()
            .map(|r| info(tokens, r))
            .collect::<Result<_, _>>()?,
    })
}

/// Starts a rotation, or (`finish`) retires the old root of the one in
/// progress now.
pub async fn rotate_ca(rotation: &Arc<Rotation>, finish: bool) -> Result<RotateCaResponse, Status> {
    let result = if finish {
        rotation.finish().await.map(|done| RotateCaResponse {
            old_signer_id: done.old,
            new_signer_id: done.new,
            finished: true,
            left_behind: done.left_behind.iter().map(ToString::to_string).collect(),
        })
    } else {
        rotation
            .rotate()
            .await
            .map(|(old_signer_id, new_signer_id)| RotateCaResponse {
                old_signer_id,
                new_signer_id,
                finished: false,
                left_behind: Vec::new(),
            })
    };
    match result {
        Ok(response) => Ok(response),
        Err(RotationError::Refused(message)) => Err(Status::failed_precondition(message)),
        Err(RotationError::Failed(message)) => {
            tracing::error!(error = %message, "root rotation failed");
            Err(Status::internal(format!("root rotation failed: {message}")))
        }
    }
}
