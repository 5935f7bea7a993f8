//! The policy: the versioned, append-only store of documents
//! ([`store`], redb) and what an apply, a delete or a rollback does to it
//! ([`changes`]: the new state, the result lines, the history summary, the
//! diff of two versions). The Admin service ([`crate::server::admin`]) runs
//! them; the registry ([`crate::discovery::registry`]) publishes the state.

pub mod changes;
pub mod store;
