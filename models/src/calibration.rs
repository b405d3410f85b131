//! Turning scores into calibrated probabilities.
//!
//! - [`correct_downsampling`]: a model trained on all positives and a fraction w of the
//!   negatives (without importance weights) over-predicts; q = p / (p + (1 − p)/w) undoes it
//!   (He et al., ADKDD 2014, §6.2). With importance weights 1/w on the kept negatives no
//!   correction is needed; both routes are tested.
//! - [`Platt`]: online Platt scaling, q = σ(a·(logit(p) − c) + b + c) around a fixed centre c
//!   (logit of 2%), fitted by per-parameter AdaGrad
//!   steps on log loss after each label. It fixes a systematic bias of the underlying model
//!   (e.g. a learner whose regularization shrinks its scores) without changing its ranking
//!   (a > 0 is kept). Its effect is measured in the tests and in backtests.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::ftrl::sigmoid;

/// Undoes negative downsampling at rate `w` (0 < w ≤ 1).
pub fn correct_downsampling(p: f64, w: f64) -> Result<f64> {
    if !(w > 0.0 && w <= 1.0) {
        return Err(ModelError::Config {
            name: "downsampling rate",
            problem: "must be in (0, 1]",
        });
    }
    if !(p > 0.0 && p < 1.0) {
        return Err(ModelError::Probability(p));
    }
    Ok(p / (p + (1.0 - p) / w))
}

fn logit(p: f64) -> f64 {
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    (p / (1.0 - p)).ln()
}

/// The logit the slope turns around: logit(2%), a typical ad CTR. Measuring the slope's input
/// from here rather than from 0 keeps the two parameters nearly independent (raw logits of ad
/// CTRs all sit near −3.5, so `a·x` and `b` would move together and AdaGrad would crawl).
const CENTER: f64 = -3.891_820_298_110_627;

/// Online Platt scaling: q = σ(a·(logit(p) − c) + b + c), c = logit(2%); the identity at
/// a = 1, b = 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Platt {
    a: f64,
    b: f64,
    ga: f64,
    gb: f64,
    rate: f64,
}

impl Platt {
    /// Starts as the identity (a = 1, b = 0); `rate` is the AdaGrad step size.
    pub fn new(rate: f64) -> Result<Self> {
        crate::error::config("platt rate", rate.is_finite() && rate > 0.0, "must be > 0")?;
        Ok(Self {
            a: 1.0,
            b: 0.0,
            ga: 1e-6,
            gb: 1e-6,
            rate,
        })
    }

    /// The calibrated probability for the model's output `p`.
    pub fn calibrate(&self, p: f64) -> f64 {
        let x = logit(p);
        sigmoid(self.a * (x - CENTER) + self.b + CENTER)
    }

    /// Learns from one label; call after [`Platt::calibrate`] was recorded for it.
    pub fn update(&mut self, p: f64, clicked: bool, weight: f64) {
        if !(p.is_finite() && weight.is_finite() && weight > 0.0) {
            return;
        }
        let x = logit(p) - CENTER;
        let q = sigmoid(self.a * x + self.b + CENTER);
        let g = (q - f64::from(u8::from(clicked))) * weight;
        let (g_a, g_b) = (g * x, g);
        self.ga += g_a * g_a;
        self.gb += g_b * g_b;
        self.a = (self.a - self.rate * g_a / self.ga.sqrt()).clamp(0.05, 20.0);
        self.b = (self.b - self.rate * g_b / self.gb.sqrt()).clamp(-20.0, 20.0);
    }

    /// The current (slope, intercept) on the centered logit, for reports and tests.
    pub fn params(&self) -> (f64, f64) {
        (self.a, self.b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::Metrics;

    #[test]
    fn downsampling_correction_formula() {
        // A true 1% CTR trained with 10% of negatives looks like 0.01 / (0.01 + 0.099) ≈ 9.2%.
        let observed = 0.01 / (0.01 + 0.99 * 0.1);
        assert!((correct_downsampling(observed, 0.1).unwrap() - 0.01).abs() < 1e-12);
        assert_eq!(correct_downsampling(0.3, 1.0).unwrap(), 0.3);
        assert!(correct_downsampling(0.3, 0.0).is_err());
        assert!(correct_downsampling(f64::NAN, 0.5).is_err());
    }

    #[test]
    fn platt_fixes_a_biased_scorer() {
        // The scorer says 2× the truth; Platt learns to halve it.
        let mut platt = Platt::new(0.05).unwrap();
        let (mut raw, mut cal) = (Metrics::default(), Metrics::default());
        let mut state = 12345u64;
        for i in 0..200_000u64 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let truth = 0.01 + 0.04 * (i % 5) as f64 / 4.0;
            let clicked = ((state >> 11) as f64 / (1u64 << 53) as f64) < truth;
            let p = 2.0 * truth;
            if i > 50_000 {
                raw.record(p, clicked, 1.0);
                cal.record(platt.calibrate(p), clicked, 1.0);
            }
            platt.update(p, clicked, 1.0);
        }
        let (r, c) = (raw.calibration().unwrap(), cal.calibration().unwrap());
        assert!((r - 2.0).abs() < 0.1, "raw calibration {r}");
        assert!((c - 1.0).abs() < 0.05, "calibrated {c}");
        assert!(cal.log_loss().unwrap() < raw.log_loss().unwrap());
    }
}
