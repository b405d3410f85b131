//! An hour of the merged view, every 2 s, kept by the process that answers ([`Monitor`]).

use super::*;

/// One point of the history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// When the point was taken (Unix ms).
    pub ts_ms: i64,
    /// Event rates then.
    pub rates: Rates,
    /// Consumer lag per partition then.
    pub lag: BTreeMap<i32, i64>,
    /// Per model: name, cumulative and window scores.
    pub models: Vec<(String, Scores, Scores)>,
}

/// The history as columns, the shape the page's charts take.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct History {
    /// Times of the points (Unix ms).
    pub ts_ms: Vec<i64>,
    /// Events into the joiners per second.
    pub events_in: Vec<f64>,
    /// Labels into the scorers per second.
    pub labeled: Vec<f64>,
    /// Labels learned per second.
    pub learned: Vec<f64>,
    /// Labels shed or dropped per second.
    pub shed: Vec<f64>,
    /// Consumer lag per partition (`null` while the partition had no owner reporting).
    pub lag: BTreeMap<i32, Vec<Option<i64>>>,
    /// Per model: cumulative and window series of each metric (`null` where undefined).
    pub models: BTreeMap<String, ModelSeries>,
}

/// One model's metrics over time, one value per point of the history.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ModelSeries {
    /// Cumulative log loss.
    pub log_loss: Vec<Option<f64>>,
    /// Cumulative normalized entropy.
    pub ne: Vec<Option<f64>>,
    /// Cumulative AUC.
    pub auc: Vec<Option<f64>>,
    /// Cumulative calibration (Σp / Σy).
    pub calibration: Vec<Option<f64>>,
    /// Log loss over the sliding window.
    pub window_log_loss: Vec<Option<f64>>,
    /// Normalized entropy over the sliding window.
    pub window_ne: Vec<Option<f64>>,
    /// AUC over the sliding window.
    pub window_auc: Vec<Option<f64>>,
    /// Calibration over the sliding window.
    pub window_calibration: Vec<Option<f64>>,
}

/// What `GET /v1/monitor` answers.
#[derive(Debug, Clone, Serialize)]
pub struct MonitorResponse {
    /// The newest merged view; `None` before the first collection.
    pub latest: Option<SystemView>,
    /// The last hour.
    pub history: History,
}

/// The view and its history, shared with the HTTP handler.
#[derive(Debug, Default)]
pub struct Monitor {
    inner: Mutex<MonitorState>,
}

#[derive(Debug, Default)]
pub(super) struct MonitorState {
    latest: Option<SystemView>,
    history: VecDeque<Point>,
    /// Last counters seen per scorer and joiner instance, for rates.
    previous: Previous,
}

impl Monitor {
    /// The newest view and the history, as `GET /v1/monitor` answers.
    pub fn response(&self) -> MonitorResponse {
        let state = self.inner.lock().expect("monitor");
        let mut h = History::default();
        for p in &state.history {
            h.ts_ms.push(p.ts_ms);
            h.events_in.push(p.rates.events_in);
            h.labeled.push(p.rates.labeled);
            h.learned.push(p.rates.learned);
            h.shed.push(p.rates.shed);
        }
        let n = state.history.len();
        for (i, p) in state.history.iter().enumerate() {
            for (&partition, &lag) in &p.lag {
                let col = h.lag.entry(partition).or_insert_with(|| vec![None; i]);
                col.resize(i, None);
                col.push(Some(lag));
            }
        }
        for col in h.lag.values_mut() {
            col.resize(n, None);
        }
        for (i, p) in state.history.iter().enumerate() {
            for (name, c, w) in &p.models {
                let s = h.models.entry(name.clone()).or_insert_with(|| {
                    // A model that appears late has no values before it appeared.
                    let empty = vec![None; i];
                    ModelSeries {
                        log_loss: empty.clone(),
                        ne: empty.clone(),
                        auc: empty.clone(),
                        calibration: empty.clone(),
                        window_log_loss: empty.clone(),
                        window_ne: empty.clone(),
                        window_auc: empty.clone(),
                        window_calibration: empty,
                    }
                });
                s.log_loss.push(c.log_loss);
                s.ne.push(c.ne);
                s.auc.push(c.auc);
                s.calibration.push(c.calibration);
                s.window_log_loss.push(w.log_loss);
                s.window_ne.push(w.ne);
                s.window_auc.push(w.auc);
                s.window_calibration.push(w.calibration);
            }
            // A model that disappeared keeps its columns aligned with the timestamps.
            for s in h.models.values_mut() {
                for col in [
                    &mut s.log_loss,
                    &mut s.ne,
                    &mut s.auc,
                    &mut s.calibration,
                    &mut s.window_log_loss,
                    &mut s.window_ne,
                    &mut s.window_auc,
                    &mut s.window_calibration,
                ] {
                    col.resize(i + 1, None);
                }
            }
        }
        debug_assert!(h.models.values().all(|s| s.ne.len() == n));
        MonitorResponse {
            latest: state.latest.clone(),
            history: h,
        }
    }

    pub(super) fn push(&self, view: SystemView, previous: Previous) {
        let mut state = self.inner.lock().expect("monitor");
        let point = Point {
            ts_ms: view.ts_ms,
            rates: view.rates,
            lag: view
                .partitions
                .iter()
                .map(|p| (p.partition, p.lag))
                .collect(),
            models: view
                .models
                .iter()
                .map(|m| (m.name.clone(), m.cumulative, m.window))
                .collect(),
        };
        state.history.push_back(point);
        while state.history.len() > HISTORY_POINTS {
            state.history.pop_front();
        }
        state.latest = Some(view);
        state.previous = previous;
    }

    pub(super) fn previous(&self) -> Previous {
        self.inner.lock().expect("monitor").previous.clone()
    }
}
