//! Exponential time decay by *forward decay* (Cormode, Shkapenyuk, Srivastava, Xu, ICDE 2009).
//!
//! Decaying every counter at every update would cost an `exp` per counter. Instead each event
//! of time `t` is added with the weight g(t) = 2^((t − t₀)/h), for a landmark t₀ and half-life
//! h, and a counter is read at time T as `stored × 2^(−(T − t₀)/h)`. One `exp` per event,
//! whatever the number of counters it touches, and no timestamp per counter.
//!
//! Order does not matter: an event older than the newest one simply arrives with a smaller
//! weight, so out-of-order and equal-time events need no special rule. To keep g(t) finite the
//! landmark moves forward (and every counter is rescaled once) when g would exceed 2^256; this
//! happens once every 256 half-lives.

/// Decay settings and the current landmark. `half_life_ms = None` means no decay.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DecayClock {
    half_life_ms: Option<f64>,
    landmark_ms: i64,
    /// Newest event time seen: the time estimates are read at.
    now_ms: i64,
}

/// Above this exponent (in half-lives) the landmark moves.
const MAX_EXPONENT: f64 = 256.0;

impl DecayClock {
    /// `half_life_ms` must be finite and > 0 when given.
    pub fn new(half_life_ms: Option<f64>) -> crate::Result<Self> {
        crate::error::config(
            "half_life_ms",
            half_life_ms.is_none_or(|h| h.is_finite() && h > 0.0),
            "must be a finite number of milliseconds > 0",
        )?;
        Ok(Self {
            half_life_ms,
            landmark_ms: i64::MIN,
            now_ms: i64::MIN,
        })
    }

    /// The half-life in event-time ms; `None` when counts never decay.
    pub fn half_life_ms(&self) -> Option<f64> {
        self.half_life_ms
    }

    /// The newest event time observed (Unix ms; `i64::MIN` before the first).
    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }

    /// The landmark stored values are relative to (Unix ms; `i64::MIN` before the first
    /// event). When it moves, every stored value was rescaled.
    pub fn landmark_ms(&self) -> i64 {
        self.landmark_ms
    }

    /// Weight of an event at `ts_ms`, relative to the landmark. Call [`DecayClock::observe`]
    /// first so the landmark is set.
    pub fn weight(&self, ts_ms: i64) -> f64 {
        match self.half_life_ms {
            None => 1.0,
            Some(h) => ((ts_ms.saturating_sub(self.landmark_ms)) as f64 / h).exp2(),
        }
    }

    /// Factor that turns a stored value into its decayed value at the clock's time.
    pub fn read_scale(&self) -> f64 {
        match self.half_life_ms {
            None => 1.0,
            Some(h) => (-((self.now_ms.saturating_sub(self.landmark_ms)) as f64) / h).exp2(),
        }
    }

    /// Advances the clock to `ts_ms` if later. Returns `Some(factor)` when the landmark moved
    /// and every stored value must be multiplied by `factor`.
    #[must_use]
    pub fn observe(&mut self, ts_ms: i64) -> Option<f64> {
        if self.landmark_ms == i64::MIN {
            self.landmark_ms = ts_ms;
        }
        self.now_ms = self.now_ms.max(ts_ms);
        let h = self.half_life_ms?;
        let exponent = (self.now_ms.saturating_sub(self.landmark_ms)) as f64 / h;
        if exponent <= MAX_EXPONENT {
            return None;
        }
        let factor = (-exponent).exp2();
        self.landmark_ms = self.now_ms;
        Some(factor)
    }

    /// The factor [`DecayClock::observe`] applied to every stored value when the landmark moved
    /// from this clock's to `newer`'s, computed the same way (so a replica that multiplies by it
    /// holds bit-identical values); `None` when the landmark did not move or no value is stored
    /// under this clock yet.
    pub fn rescale_factor_to(&self, newer: &DecayClock) -> Option<f64> {
        let h = self.half_life_ms?;
        if self.landmark_ms == i64::MIN || newer.landmark_ms == self.landmark_ms {
            return None;
        }
        let exponent = (newer.landmark_ms.saturating_sub(self.landmark_ms)) as f64 / h;
        Some((-exponent).exp2())
    }
}

/// A forward-decayed (impressions, clicks) pair: the value of one counter key.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Counter {
    /// Decayed impressions (examination-weighted where the caller weights them).
    pub imps: f64,
    /// Decayed clicks.
    pub clicks: f64,
}

impl Counter {
    /// Adds `imps` impressions and `clicks` clicks, each scaled by the decay weight `g`.
    pub fn add(&mut self, g: f64, imps: f64, clicks: f64) {
        self.imps += g * imps;
        self.clicks += g * clicks;
    }

    /// Scales both by `f` (moving the landmark rescales every counter).
    pub fn scale(&mut self, f: f64) {
        self.imps *= f;
        self.clicks *= f;
    }

    /// Decayed (impressions, clicks) at the clock's time.
    pub fn read(&self, clock: &DecayClock) -> (f64, f64) {
        let s = clock.read_scale();
        (self.imps * s, self.clicks * s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DAY: f64 = 86_400_000.0;

    fn add(clock: &mut DecayClock, c: &mut Counter, ts: i64, clicked: bool) {
        if let Some(f) = clock.observe(ts) {
            c.scale(f);
        }
        c.add(clock.weight(ts), 1.0, f64::from(u8::from(clicked)));
    }

    #[test]
    fn one_half_life_halves() {
        let mut clock = DecayClock::new(Some(DAY)).unwrap();
        let mut c = Counter::default();
        add(&mut clock, &mut c, 0, true);
        let _ = clock.observe(DAY as i64);
        let (n, k) = c.read(&clock);
        assert!(
            (n - 0.5).abs() < 1e-12 && (k - 0.5).abs() < 1e-12,
            "{n} {k}"
        );
    }

    #[test]
    fn landmark_moves_without_changing_values() {
        let mut clock = DecayClock::new(Some(1000.0)).unwrap();
        let mut c = Counter::default();
        add(&mut clock, &mut c, 0, false);
        // 300 half-lives later: the landmark must move (2^300 would be fine for f64, but the
        // rule keeps a wide margin), and an event then counts as 1.
        add(&mut clock, &mut c, 300_000, true);
        let (n, k) = c.read(&clock);
        assert!(
            (n - 1.0).abs() < 1e-12 && (k - 1.0).abs() < 1e-12,
            "{n} {k}"
        );
        assert!(clock.weight(300_000).is_finite());
    }

    #[test]
    fn bad_half_life_is_rejected() {
        assert!(DecayClock::new(Some(0.0)).is_err());
        assert!(DecayClock::new(Some(f64::NAN)).is_err());
        assert!(DecayClock::new(None).is_ok());
    }

    proptest! {
        /// The order of updates does not matter (up to float rounding), including events that
        /// arrive out of time order.
        #[test]
        fn order_does_not_matter(mut events in proptest::collection::vec((0i64..10_000_000, any::<bool>()), 1..50)) {
            let run = |evs: &[(i64, bool)]| {
                let mut clock = DecayClock::new(Some(DAY / 10.0)).unwrap();
                let mut c = Counter::default();
                for &(t, y) in evs { add(&mut clock, &mut c, t, y); }
                let _ = clock.observe(20_000_000);
                c.read(&clock)
            };
            let a = run(&events);
            events.reverse();
            let b = run(&events);
            prop_assert!((a.0 - b.0).abs() <= 1e-9 * a.0.max(1.0));
            prop_assert!((a.1 - b.1).abs() <= 1e-9 * a.1.max(1.0));
        }

        /// Decaying to t then adding equals adding at t then decaying by the elapsed time.
        #[test]
        fn decay_then_add_equals_add_then_decay(t1 in 0i64..1_000_000, dt in 0i64..1_000_000, h in 1_000.0f64..1e7) {
            let mut clock = DecayClock::new(Some(h)).unwrap();
            let mut c = Counter::default();
            add(&mut clock, &mut c, t1, true);
            add(&mut clock, &mut c, t1 + dt, false);
            let (n, k) = c.read(&clock);
            let f = (-(dt as f64) / h).exp2();
            prop_assert!((n - (f + 1.0)).abs() < 1e-9, "{} vs {}", n, f + 1.0);
            prop_assert!((k - f).abs() < 1e-9);
        }
    }
}
