//! The one error type of `ctr-models`.

/// Why an input or a setting was rejected. The model state is unchanged whenever one is
/// returned: every check runs before the first write.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    #[error("importance weight {0} must be a finite number > 0")]
    Weight(f64),
    #[error("the example has no features")]
    NoFeatures,
    #[error("feature value {0} must be finite")]
    FeatureValue(f64),
    #[error("position {0} must be 1 or more")]
    Position(u32),
    #[error("the context has {0} fields; at most 32 are accepted")]
    ContextFields(usize),
    #[error("invalid setting `{name}`: {problem}")]
    Config {
        name: &'static str,
        problem: &'static str,
    },
    #[error("probability {0} must lie in (0, 1)")]
    Probability(f64),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

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
