//! The data path.
pub mod app_health;
pub mod inbound;
pub mod observe;
pub mod outbound;
pub mod state;
