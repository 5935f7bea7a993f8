//! The policy documents (`apiVersion: remora.dev/v1`), their parsing from
//! multi-document YAML and their validation.
//!
//! The control plane validates every document before it stores anything; the
//! proxy parses the same types out of each snapshot and NACKs one it cannot use.
//! An error names the file, the document and the field.
//!
//! This module is the facade: every item lives in one of
//!
//! - `model`: the document types ([`Kind`], [`Metadata`], [`Document`],
//!   [`Spec`], [`ResourceKey`]) and the spec of every kind;
//! - `authn`: the types of [`RequestAuthenticationSpec`] and the
//!   [`Condition`]s of an [`AuthorizationRule`]'s `when`;
//! - `parse`: [`parse_documents`] and [`ValidationError`], reading YAML into
//!   those types;
//! - `validate`: [`validate`], what the types alone cannot check;
//! - [`duration`] (and [`opt_duration`]): how durations are written;
//!
//! and is re-exported here, so every path is `remora_proto::policy::X`.

mod authn;
pub mod duration;
mod flow_depth;
mod model;
mod parse;
mod validate;

pub use authn::{
    ClaimToHeader, Condition, ConditionKey, JwtHeader, JwtRule, RequestAuthenticationSpec,
    MAX_CLAIM_HEADERS, MAX_CONDITION_VALUES, MAX_JWT_RULES,
};
pub use duration::opt_duration;
pub use model::{
    AuthorizationPolicySpec, AuthorizationRule, AuthorizationTo, Backend, Backoff, CircuitBreaker,
    DestinationPolicySpec, Document, FaultAbort, FaultDelay, FaultInjection, HeaderMatch,
    HttpRouteSpec, Kind, Limits, LoadBalancer, Metadata, MtlsMode, PathMatch, Protocol, RateLimit,
    ResourceKey, RetryBudget, RetryPolicy, RouteMatch, RouteRule, ServicePort, ServiceSpec, Spec,
    TelemetryPolicySpec, API_VERSION, DEFAULT_UPGRADES, RETRY_ON,
};
pub use parse::{parse_documents, ValidationError, MAX_NESTING_DEPTH};
pub use validate::validate;

#[cfg(test)]
mod tests;
