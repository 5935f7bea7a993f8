//! The one error every constructor in this crate returns for a setting it cannot honour.

/// A resilience setting that is out of range, naming the field and what is wrong with it.
///
/// The control plane validates policies before it stores them; this error is the data
/// plane's second line of defence, so a bad value is refused instead of panicking or
/// silently misbehaving on the request path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct ConfigError {
    /// The offending setting, named as in the policy document (`openFor`, `ratio`, ...).
    pub field: &'static str,
    /// Why it was refused.
    pub reason: &'static str,
}

impl ConfigError {
    pub(crate) const fn new(field: &'static str, reason: &'static str) -> Self {
        Self { field, reason }
    }
}
