//! `remora-control token create|revoke|list` and `remora-control ca rotate`.

use crate::admin_identity;
use crate::cli::{CaCommand, TokenCommand};
use crate::client::Admin;
use crate::output::{self, note, out, outln};
use remora_proto::v1::{
    CreateTokenRequest, ListTokensRequest, RevokeTokenRequest, RotateCaRequest,
};
use std::io::IsTerminal as _;

pub(crate) async fn token(admin: &mut Admin, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            service,
            namespace,
            ttl,
            uses,
        } => {
            let mut request = tonic::Request::new(CreateTokenRequest {
                service,
                namespace,
                ttl_seconds: ttl.map_or(0, |d| d.as_secs().max(1)),
            });
            if let Some(n) = uses {
                request.metadata_mut().insert(
                    admin_identity::MAX_USES_METADATA,
                    tonic::metadata::AsciiMetadataValue::from(n),
                );
            }
            let response = admin
                .client
                .create_token(request)
                .await
                .map_err(|s| admin.error("token create", s))?;
            let confirmed = response
                .metadata()
                .get(admin_identity::MAX_USES_METADATA)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok());
            let created = response.into_inner();
            if uses.is_some() && confirmed != uses {
                // A server that ignored --uses made an unlimited token: take
                // it back rather than hand it out.
                let revoked = admin
                    .client
                    .revoke_token(RevokeTokenRequest {
                        token_id: created.token_id.clone(),
                    })
                    .await;
                anyhow::bail!(
                    "token create: the control plane did not confirm the --uses limit (is it an \
                     older release?); the token it made ({}) {}",
                    created.token_id,
                    if revoked.is_ok() {
                        "was revoked"
                    } else {
                        "could not be revoked: revoke it"
                    }
                );
            }
            // Only the token on stdout, so that `token create ... > file` works.
            outln(&created.token)?;
            if std::io::stderr().is_terminal() {
                let limit = uses.map_or(String::new(), |n| format!(", at most {n} use(s)"));
                note(format_args!(
                    "token {} proves {} (expires {}{limit}); it is not shown again",
                    created.token_id,
                    created.spiffe_id,
                    output::unix_time_or(created.expires_unix, "never")
                ));
            }
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            let request = RevokeTokenRequest {
                token_id: id.clone(),
            };
            let response = admin.client.revoke_token(request).await;
            response.map_err(|s| admin.error("token revoke", s))?;
            let id = id.split_once('.').map_or(id.as_str(), |(id, _)| id);
            outln(format_args!("token {id} revoked"))?;
            Ok(())
        }
        TokenCommand::List => {
            let response = admin
                .client
                .list_tokens(ListTokensRequest {})
                .await
                .map_err(|s| admin.error("token list", s))?;
            let uses = admin_identity::uses_from(response.metadata());
            let tokens = response.into_inner().tokens;
            if tokens.is_empty() {
                note("no tokens");
            } else {
                out(output::tokens_table(&tokens, &uses))?;
            }
            Ok(())
        }
    }
}

pub(crate) async fn ca(admin: &mut Admin, command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Rotate => {
            let response = admin.client.rotate_ca(RotateCaRequest {}).await;
            let rotated = response
                .map_err(|s| admin.error("ca rotate", s))?
                .into_inner();
            outln(format_args!(
                "root rotation started: new signer {}, retiring {}",
                rotated.new_signer_id, rotated.old_signer_id
            ))?;
            outln(
                "the old root is retired once every connected proxy runs a certificate from the \
                 new one (see `remora-control status`)",
            )?;
            Ok(())
        }
    }
}
