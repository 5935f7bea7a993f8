//! `remora-control token create|revoke|list` and `remora-control ca rotate`.

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
        } => {
            let request = CreateTokenRequest {
                service,
                namespace,
                ttl_seconds: ttl.map_or(0, |d| d.as_secs().max(1)),
            };
            let response = admin.client.create_token(request).await;
            let created = response
                .map_err(|s| admin.error("token create", s))?
                .into_inner();
            // Only the token on stdout, so that `token create ... > file` works.
            outln(&created.token)?;
            if std::io::stderr().is_terminal() {
                note(format_args!(
                    "token {} proves {} (expires {}); it is not shown again",
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
            let response = admin.client.list_tokens(ListTokensRequest {}).await;
            let tokens = response
                .map_err(|s| admin.error("token list", s))?
                .into_inner()
                .tokens;
            if tokens.is_empty() {
                note("no tokens");
            } else {
                out(output::tokens_table(&tokens))?;
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
