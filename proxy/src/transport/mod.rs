//! The transport layer: connections, bytes and HTTP messages, and the
//! errors and answers of the data path. Names no module of the layers
//! above; what they need done at a body's end or when a connection is
//! opened they pass in (`body::OnEnd`, `body::Home`, `connect::Connect`).

pub mod body;
pub mod connect;
pub mod detect;
pub mod drain;
pub mod error;
pub mod expect;
pub mod forward;
pub mod intercept;
pub mod io;
pub mod limits;
pub mod pool;
pub mod replay;
pub mod serve;
pub mod tcp;
pub mod tls;
