//! Online click-through-rate learners, calibration and evaluation.
//!
//! Pure maths: no I/O, no async, no clocks. Everything here is a deterministic function of the
//! events it is given, so the live scorer and an offline backtest computing over the same events
//! end in the same state. Services own the I/O around it.

pub mod smoothing;

pub use smoothing::{BetaPrior, PriorError};
