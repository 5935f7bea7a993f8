//! The data path: every proxied connection and request, outbound (the
//! application's calls) and inbound (calls to it), what is recorded about
//! each, and the state they share with the control side.

pub mod app_health;
pub mod inbound;
pub mod observe;
pub mod outbound;
pub mod state;
