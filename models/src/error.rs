//! The one error type of `ctr-models`.

/// Why an input or a setting was rejected. The model state is unchanged whenever one is
/// returned: every check runs before the first write.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// An importance weight that is not finite and positive.
    #[error("importance weight {0} must be a finite number > 0")]
    Weight(f64),
    /// An example with no features.
    #[error("the example has no features")]
    NoFeatures,
    /// A feature value that is not finite.
    #[error("feature value {0} must be finite")]
    FeatureValue(f64),
    /// Position 0 (positions start at 1, the top slot).
    #[error("position {0} must be 1 or more")]
    Position(u32),
    /// More context fields than [`crate::example::MAX_CONTEXT_FIELDS`].
    #[error("the context has {0} fields; at most 32 are accepted")]
    ContextFields(usize),
    /// A setting out of range.
    #[error("invalid setting `{name}`: {problem}")]
    Config {
        /// The setting's name.
        name: &'static str,
        /// What it must be.
        problem: &'static str,
    },
    /// A probability outside (0, 1).
    #[error("probability {0} must lie in (0, 1)")]
    Probability(f64),
    /// A snapshot that cannot be restored.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

/// `Result` with [`ModelError`] as the default error.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

pub(crate) fn check_weight(w: f64) -> Result<()> {
    if w.is_finite() && w > 0.0 {
        Ok(())
    } else {
        Err(ModelError::Weight(w))
    }
}

pub(crate) fn config(name: &'static str, ok: bool, problem: &'static str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(ModelError::Config { name, problem })
    }
}
