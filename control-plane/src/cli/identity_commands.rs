//! `remora-control token create|revoke|list` and `remora-control ca rotate`.

use crate::cli::args::{CaCommand, TokenCommand};
use crate::cli::connect::Admin;
use crate::cli::output::{self, note, out, outln};
use crate::human;
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
            let request = CreateTokenRequest {
                service,
                namespace,
                ttl_seconds: ttl.map_or(0, |d| d.as_secs().max(1)),
                max_uses: uses.unwrap_or(0),
            };
            let created = admin
                .client
                .create_token(request)
                .await
                .map_err(|s| admin.error("token create", s))?
                .into_inner();
            if uses.is_some_and(|n| created.max_uses != n) {
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
                    human::unix_time_or(created.expires_unix, "never")
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
            let tokens = response.into_inner().tokens;
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
        CaCommand::Rotate { finish } => {
            let response = admin.client.rotate_ca(RotateCaRequest { finish }).await;
            let rotated = response
                .map_err(|s| admin.error("ca rotate", s))?
                .into_inner();
            if rotated.finished {
                outln(format_args!(
                    "root rotation finished: retired {}, signing with {}",
                    rotated.old_signer_id, rotated.new_signer_id
                ))?;
                if !rotated.left_behind.is_empty() {
                    note(format_args!(
                        "warning: {} certificate(s) from the retired root were still in use; \
                         their proxies are cut off from the mesh (not ready) until they \
                         bootstrap again with their tokens (a used-up or expired token needs \
                         replacing):",
                        rotated.left_behind.len()
                    ));
                    for line in &rotated.left_behind {
                        note(format_args!("  - {line}"));
                    }
                }
                return Ok(());
            }
            outln(format_args!(
                "root rotation started: new signer {}, retiring {}",
                rotated.new_signer_id, rotated.old_signer_id
            ))?;
            outln(
                "the old root is retired once no certificate from it is in use: each proxy \
                 renews from the new root, leaves, or its certificate expires (see \
                 `remora-control status`; `remora-control ca rotate --finish` retires it now)",
            )?;
            Ok(())
        }
    }
}
