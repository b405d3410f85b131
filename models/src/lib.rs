//! Online click-through-rate learners, calibration and evaluation.
//!
//! Pure maths: no I/O, no async, no clocks, no hidden randomness. Everything here is a
//! deterministic function of the examples it is given, so the live scorer and an offline
//! backtest computing over the same examples end in the same state, and a snapshot restores it
//! bit for bit.
//!
//! - [`example`]: the impression as learners see it; stable hashed features.
//! - [`decay`]: forward exponential decay in event time.
//! - [`smoothing`]: Beta-prior smoothing.
//! - [`counts`]: hierarchical smoothed counts with position normalization.
//! - [`ftrl`]: sparse FTRL-Proximal logistic regression with admission and eviction.
//! - [`keymap`]: the flat hash table both learners store their state in.
//! - [`calibration`]: downsampling correction and online Platt scaling.
//! - [`eval`]: progressive-validation metrics (log loss, NE, AUC, calibration, reliability).
//! - [`variants`]: model variants, their combination, side-by-side runs.
//! - [`snapshot`]: the versioned binary snapshot format.

pub mod calibration;
pub mod counts;
pub mod decay;
pub mod error;
pub mod eval;
pub mod example;
pub mod ftrl;
pub mod keymap;
pub mod smoothing;
pub mod snapshot;
pub mod variants;

pub use counts::{BaseRate, CountModel, CountsConfig, Estimate, Level};
pub use error::{ModelError, Result};
pub use eval::Metrics;
pub use example::{Feature, FeatureSpec, Impression};
pub use ftrl::{Ftrl, FtrlConfig};
pub use smoothing::{BetaPrior, PriorError};
pub use snapshot::SnapshotError;
pub use variants::{
    Evicted, ModelSet, ModelSetExtras, ModelSetExtrasRef, Offset, Prediction, Touched, Variant,
    VariantConfig, VariantDelta, VariantKind,
};
