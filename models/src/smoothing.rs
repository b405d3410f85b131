//! Bayesian smoothing of click counts with a Beta prior.
//!
//! A raw rate clicks / impressions is useless for a new ad (0/0) and noisy for a rare one (1/3).
//! With a Beta(α, β) prior on the CTR, the posterior mean after `c` clicks in `n` impressions is
//! (c + α) / (n + α + β): the prior mean α / (α + β) when there is no data, and the raw rate when
//! there is a lot. α + β is the prior's weight in pseudo-impressions.

/// A Beta(α, β) prior over a click-through rate.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BetaPrior {
    alpha: f64,
    beta: f64,
}

/// A prior that cannot describe a rate.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum PriorError {
    /// A mean outside (0, 1).
    #[error("prior mean {0} must lie strictly between 0 and 1")]
    Mean(f64),
    /// A strength that is not finite and positive.
    #[error("prior strength {0} must be a finite number > 0 (pseudo-impressions)")]
    Strength(f64),
}

impl BetaPrior {
    /// A prior with the given mean CTR, worth `strength` impressions of evidence.
    pub fn from_mean(mean: f64, strength: f64) -> Result<Self, PriorError> {
        if !(mean > 0.0 && mean < 1.0) {
            return Err(PriorError::Mean(mean));
        }
        if !(strength.is_finite() && strength > 0.0) {
            return Err(PriorError::Strength(strength));
        }
        Ok(Self {
            alpha: mean * strength,
            beta: (1.0 - mean) * strength,
        })
    }

    /// Pseudo-clicks.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// Pseudo-non-clicks.
    pub fn beta(&self) -> f64 {
        self.beta
    }

    /// The prior mean rate.
    pub fn mean(&self) -> f64 {
        self.alpha / (self.alpha + self.beta)
    }

    /// Posterior mean CTR after `clicks` in `impressions`. Counts may be fractional (decayed or
    /// importance-weighted). Negative or non-finite counts are treated as zero evidence, and
    /// more clicks than impressions are capped at the impressions, so the result is always a
    /// probability strictly inside (0, 1).
    pub fn posterior_mean(&self, clicks: f64, impressions: f64) -> f64 {
        let n = if impressions.is_finite() {
            impressions.max(0.0)
        } else {
            0.0
        };
        let c = if clicks.is_finite() {
            clicks.clamp(0.0, n)
        } else {
            0.0
        };
        (c + self.alpha) / (n + self.alpha + self.beta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn no_data_gives_the_prior_mean() {
        let p = BetaPrior::from_mean(0.02, 100.0).unwrap();
        assert!((p.posterior_mean(0.0, 0.0) - 0.02).abs() < 1e-15);
        assert!((p.alpha() - 2.0).abs() < 1e-12 && (p.beta() - 98.0).abs() < 1e-12);
    }

    #[test]
    fn lots_of_data_approaches_the_raw_rate() {
        let p = BetaPrior::from_mean(0.02, 100.0).unwrap();
        let est = p.posterior_mean(5_000.0, 100_000.0);
        assert!((est - 0.05).abs() < 0.0005, "{est}");
    }

    #[test]
    fn bad_priors_are_rejected() {
        assert_eq!(BetaPrior::from_mean(0.0, 1.0), Err(PriorError::Mean(0.0)));
        assert_eq!(BetaPrior::from_mean(1.0, 1.0), Err(PriorError::Mean(1.0)));
        assert!(matches!(
            BetaPrior::from_mean(f64::NAN, 1.0),
            Err(PriorError::Mean(_))
        ));
        assert!(matches!(
            BetaPrior::from_mean(0.1, -1.0),
            Err(PriorError::Strength(_))
        ));
        assert!(matches!(
            BetaPrior::from_mean(0.1, f64::INFINITY),
            Err(PriorError::Strength(_))
        ));
    }

    #[test]
    fn hostile_counts_never_escape_the_unit_interval() {
        let p = BetaPrior::from_mean(0.1, 10.0).unwrap();
        for (c, n) in [
            (f64::NAN, 5.0),
            (3.0, f64::NAN),
            (-4.0, 10.0),
            (50.0, 10.0),
            (1.0, -1.0),
        ] {
            let est = p.posterior_mean(c, n);
            assert!(est > 0.0 && est < 1.0, "({c}, {n}) -> {est}");
        }
    }

    proptest! {
        #[test]
        fn estimate_lies_between_raw_rate_and_prior_mean(
            mean in 0.001f64..0.999, strength in 0.1f64..1e4, n in 1u32..100_000, frac in 0.0f64..=1.0
        ) {
            let p = BetaPrior::from_mean(mean, strength).unwrap();
            let n = f64::from(n);
            let c = (n * frac).floor();
            let est = p.posterior_mean(c, n);
            let raw = c / n;
            let (lo, hi) = if raw < mean { (raw, mean) } else { (mean, raw) };
            prop_assert!(est >= lo - 1e-12 && est <= hi + 1e-12);
        }
    }
}
