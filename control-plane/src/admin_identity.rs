//! The Admin RPCs about identity: bootstrap tokens and root rotation.
//! [`crate::admin::AdminService`] delegates to these.

use crate::rotation::{Rotation, RotationError};
use crate::tokens::{TokenError, TokenRecord, TokenStore};
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

fn info(store: &TokenStore, r: TokenRecord) -> TokenInfo {
    TokenInfo {
        spiffe_id: store.spiffe_id(&r.namespace, &r.service),
        token_id: r.id,
        created_unix: r.created_unix,
        expires_unix: r.expires_unix,
        revoked: r.revoked,
    }
}

/// The request metadata that limits a new token's uses (`token create
/// --uses N`), and the response metadata that confirms the limit was set.
///
/// Metadata rather than a field of `CreateTokenRequest` because `proto/` was
/// not ours to change when this was added; a `max_uses` field there should
/// replace it. The CLI refuses (and revokes) a token whose limit the server
/// did not confirm, so a server that ignores the header cannot hand out an
/// unlimited token in its place.
pub const MAX_USES_METADATA: &str = "remora-token-max-uses";
/// ListTokens response metadata: `<id>=<used>/<max or ->` per token,
/// comma-separated (the `USES` column of `token list`); left out when it
/// would be longer than [`USES_METADATA_LIMIT`].
pub const USES_METADATA: &str = "remora-token-uses";
const USES_METADATA_LIMIT: usize = 8 * 1024;

/// The `--uses` limit a CreateToken request asks for (None: no limit).
pub fn max_uses_of(metadata: &tonic::metadata::MetadataMap) -> Result<Option<u32>, Status> {
    let Some(value) = metadata.get(MAX_USES_METADATA) else {
        return Ok(None);
    };
    match value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
    {
        Some(n) if n >= 1 => Ok(Some(n)),
        _ => Err(Status::invalid_argument(format!(
            "{MAX_USES_METADATA} must be a whole number of at least 1"
        ))),
    }
}

/// Confirms the uses limit set on a created token.
pub fn with_uses_echo<T>(
    mut response: tonic::Response<T>,
    max_uses: Option<u32>,
) -> tonic::Response<T> {
    if let Some(n) = max_uses {
        if let Ok(value) = n.to_string().parse() {
            response.metadata_mut().insert(MAX_USES_METADATA, value);
        }
    }
    response
}

pub async fn create_token(
    tokens: &Arc<TokenStore>,
    req: CreateTokenRequest,
    max_uses: Option<u32>,
) -> Result<CreateTokenResponse, Status> {
    let ttl = (req.ttl_seconds > 0).then(|| Duration::from_secs(req.ttl_seconds));
    let store = tokens.clone();
    let (token, record) =
        blocking(move || store.create_limited(&req.namespace, &req.service, ttl, max_uses)).await?;
    let spiffe_id = tokens.spiffe_id(&record.namespace, &record.service);
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
    tracing::info!(token_id = %record.id, "bootstrap token revoked");
    Ok(RevokeTokenResponse {})
}

pub async fn list_tokens(
    tokens: &Arc<TokenStore>,
) -> Result<tonic::Response<ListTokensResponse>, Status> {
    let store = tokens.clone();
    let records = blocking(move || store.list()).await?;
    let uses = records
        .iter()
        .map(|r| format!("{}={}", r.id, r.uses_text()))
        .collect::<Vec<_>>()
        .join(",");
    let mut response = tonic::Response::new(ListTokensResponse {
        tokens: records.into_iter().map(|r| info(tokens, r)).collect(),
    });
    if !uses.is_empty() && uses.len() <= USES_METADATA_LIMIT {
        if let Ok(value) = uses.parse() {
            response.metadata_mut().insert(USES_METADATA, value);
        }
    }
    Ok(response)
}

/// The `USES_METADATA` of a ListTokens answer: token id → `used/max`.
pub fn uses_from(
    metadata: &tonic::metadata::MetadataMap,
) -> std::collections::HashMap<String, String> {
    metadata
        .get(USES_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(|text| {
            text.split(',')
                .filter_map(|entry| entry.split_once('='))
                .map(|(id, uses)| (id.to_string(), uses.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

pub async fn rotate_ca(rotation: &Arc<Rotation>) -> Result<RotateCaResponse, Status> {
    match rotation.rotate().await {
        Ok((old_signer_id, new_signer_id)) => Ok(RotateCaResponse {
            old_signer_id,
            new_signer_id,
        }),
        Err(RotationError::Refused(message)) => Err(Status::failed_precondition(message)),
        Err(RotationError::Failed(message)) => {
            tracing::error!(error = %message, "root rotation failed");
            Err(Status::internal(format!("root rotation failed: {message}")))
        }
    }
}
