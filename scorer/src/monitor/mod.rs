//! Model health for the monitoring dashboard (Borealis's "system stream of monitoring events").
//!
//! Two halves, both in every scorer process:
//! - **Report**: once a second each process writes what it knows to Redis,
//!   `<prefix>monitor:{scorer}:<instance>` (JSON [`InstanceReport`], expiring after 15 s): its
//!   records per outcome since it started, consumer lag per partition, shedding and the
//!   learning guard, freshness, each model's progressive metrics merged over its partitions,
//!   and its busiest ads. Metrics travel as their sums (with a coarse AUC histogram), so they
//!   merge exactly across processes.
//! - **View**: every 2 s [`collect`] reads every live report and the joiners' signal hash,
//!   merges them into one [`SystemView`] of the whole deployment (whichever process serves the
//!   page), turns counters into rates, and keeps an hour of history. `GET /v1/monitor` answers
//!   it; `GET /dashboard` is the page that draws it (`scorer/dashboard/`).
//!
//! Read-only: nothing here changes a model or a published estimate.
//!
//! Files: `report.rs` (the report half), `view.rs` (the view and its merge, pure),
//! `history.rs` (an hour of views); this one collects (reads Redis, merges, keeps history).

mod history;
mod report;
mod view;

pub use history::*;
pub use report::*;
use report::{busiest_first, index_key, instance_key};
pub use view::*;
use view::{Previous, merge};

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ctr_models::Metrics;
use ctr_runtime::redis::RedisConn;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::warn;

use crate::config::ScorerConfig;
use ctr_schemas::contract::{JOINER_SIGNAL_FRESH_MS, JoinStats, JoinerSignal, keys};

use crate::load::{AdHealth, Control, merged_models, next_tick, unix_ms};

/// AUC resolution of the metrics in a report: 256 bins of logit keep a report small (a few
/// kB per model) with an AUC error bound still well under 1%.
const REPORT_AUC_BINS: usize = 256;
/// A report not refreshed for this long belongs to a process that is gone.
const REPORT_TTL_S: u64 = 15;
/// History kept: one point every 2 s for an hour.
const HISTORY_POINTS: usize = 1_800;
const COLLECT_EVERY: Duration = Duration::from_secs(2);
/// Busiest ads shown.
const ADS_SHOWN: usize = 15;

/// Reads the live reports, the joiner signals and the busiest ads' published estimates.
async fn read(
    cfg: &ScorerConfig,
    redis: &mut RedisConn,
) -> redis::RedisResult<(Vec<InstanceReport>, HashMap<String, String>)> {
    let prefix = &cfg.service.redis_prefix;
    let index = index_key(prefix);
    let members: Vec<String> = redis.smembers(&index).await?;
    let keys: Vec<String> = members.iter().map(|m| instance_key(prefix, m)).collect();
    let jsons: Vec<Option<String>> = if keys.is_empty() {
        Vec::new()
    } else {
        redis::cmd("MGET").arg(&keys).query_async(redis).await?
    };
    let mut reports = Vec::new();
    for (member, json) in members.iter().zip(jsons) {
        match json.map(|j| serde_json::from_str::<InstanceReport>(&j)) {
            Some(Ok(r)) => reports.push(r),
            Some(Err(e)) => warn!(instance = %member, error = %e, "unreadable monitoring report"),
            // Expired: that process is gone.
            None => {
                let _: redis::RedisResult<()> = redis.srem(&index, member).await;
            }
        }
    }
    let signals: HashMap<String, String> = redis.hgetall(keys::joiner_signal(prefix)).await?;
    Ok((reports, signals))
}

/// An ad's `pctr`, `model` and `ver` fields in Redis.
type Published = (Option<f64>, Option<String>, Option<i64>);

/// Adds what Redis serves now for each ad in the view.
async fn add_published(cfg: &ScorerConfig, redis: &mut RedisConn, view: &mut SystemView) {
    if view.ads.is_empty() {
        return;
    }
    let reads: Vec<redis::Cmd> = view
        .ads
        .iter()
        .map(|a| {
            redis::cmd("HMGET")
                .arg(keys::ad(&cfg.service.redis_prefix, &a.health.ad_id))
                .arg("pctr")
                .arg("model")
                .arg("ver")
                .clone()
        })
        .collect();
    let rows: redis::RedisResult<Vec<Published>> = redis.query_each(&reads).await;
    match rows {
        Ok(rows) => {
            for (a, (pctr, model, ver)) in view.ads.iter_mut().zip(rows) {
                a.published_pctr = pctr;
                a.model_version = model.zip(ver).map(|(m, v)| format!("{m}@{v}"));
            }
        }
        Err(e) => warn!(error = %e, "reading published estimates for the dashboard failed"),
    }
}

/// Builds the system view every 2 s until `stop`.
pub async fn collect(
    cfg: Arc<ScorerConfig>,
    monitor: Arc<Monitor>,
    mut redis: RedisConn,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(COLLECT_EVERY);
    while next_tick(&mut tick, &mut stop).await {
        match read(&cfg, &mut redis).await {
            Ok((reports, signals)) => {
                let (mut view, next) = merge(unix_ms(), &reports, &signals, &monitor.previous());
                add_published(&cfg, &mut redis, &mut view).await;
                monitor.push(view, next);
            }
            Err(e) => warn!(error = %e, "reading the monitoring reports failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(instance: &str, learned: u64, shed: u64, p: f64) -> InstanceReport {
        let mut m = Metrics::with_auc_bins(REPORT_AUC_BINS);
        for i in 0..1_000 {
            m.record(p, i % 10 == 0, 1.0);
        }
        InstanceReport {
            instance: instance.into(),
            ts_ms: 0,
            records: [("learned".to_string(), learned), ("shed".to_string(), shed)]
                .into_iter()
                .collect(),
            lag: [(0, 5), (1, 7)].into_iter().collect(),
            learning: true,
            guard_reason: None,
            keep_rate: 0.5,
            thinning: 1,
            last_publish_ms: Some(9_000),
            newest_event_ms: Some(8_000),
            serve_model: "counts".into(),
            models: vec![ModelSums {
                name: "counts".into(),
                cumulative: m.clone(),
                window: m,
            }],
            ads: vec![AdHealth {
                ad_id: format!("ad-{instance}"),
                impressions: learned,
                clicks: 1,
                mean_pctr: Some(p),
                observed_ctr: Some(0.1),
            }],
        }
    }

    #[test]
    fn reports_merge_exactly_and_counters_become_rates() {
        let signal = |serves: u64, clicks: u64| {
            serde_json::to_string(&JoinerSignal {
                stalled: false,
                reason: None,
                click_coverage: None,
                window_serves: 0,
                window_clicks: 0,
                clicks_per_serve: None,
                baseline_clicks_per_serve: None,
                updated_ms: 9_000,
                totals: JoinStats {
                    serves,
                    clicks,
                    positives: 3,
                    negatives: 97,
                    orphan_clicks: 1,
                    ..JoinStats::default()
                },
            })
            .unwrap()
        };
        let signals: HashMap<String, String> = [("j1".to_string(), signal(100, 10))].into();
        let (_, prev) = merge(
            8_000,
            &[report("a", 1_000, 0, 0.1), report("b", 500, 0, 0.1)],
            &signals,
            &Previous::default(),
        );
        let signals: HashMap<String, String> = [("j1".to_string(), signal(300, 30))].into();
        let (view, _) = merge(
            10_000,
            &[report("a", 3_000, 1_000, 0.1), report("b", 500, 0, 0.3)],
            &signals,
            &prev,
        );
        // 2 s: a learned 2,000 and shed 1,000; b nothing. Joiner: 220 events.
        assert_eq!(view.rates.learned, 1_000.0);
        assert_eq!(view.rates.shed, 500.0);
        assert_eq!(view.rates.labeled, 1_500.0);
        assert!((view.rates.shed_share - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(view.rates.events_in, 110.0);
        assert_eq!(view.records["learned"], 3_500);
        assert_eq!(view.joiner.click_coverage, Some(0.75), "3 joined, 1 orphan");
        // Metrics merge as sums: calibration over both = (0.1·1000 + 0.3·1000) / 200 clicks.
        let m = &view.models[0];
        assert!(m.serving);
        assert!((m.cumulative.calibration.unwrap() - 2.0).abs() < 1e-9);
        assert_eq!(m.cumulative.examples, 2_000.0);
        assert_eq!(view.partitions.len(), 4);
        assert_eq!(view.publish_age_ms, Some(1_000));
        assert_eq!(view.event_age_ms, Some(2_000));
        assert_eq!(view.keep_rate, 0.5);
        assert_eq!(view.ads[0].health.ad_id, "ad-a", "busiest first");
    }

    #[test]
    fn a_restarted_process_counts_from_zero_and_stale_joiners_are_ignored() {
        let (_, prev) = merge(
            0,
            &[report("a", 5_000, 0, 0.1)],
            &HashMap::new(),
            &Previous::default(),
        );
        let stale: HashMap<String, String> = [(
            "old".to_string(),
            r#"{"stalled":true,"reason":"x","updated_ms":-60000}"#.to_string(),
        )]
        .into();
        let (view, _) = merge(1_000, &[report("a", 10, 0, 0.1)], &stale, &prev);
        assert_eq!(view.rates.learned, 0.0);
        assert_eq!(view.joiner.instances, 0);
        assert!(!view.joiner.stalled);
    }

    #[test]
    fn history_columns_stay_aligned_when_models_come_and_go() {
        let monitor = Monitor::default();
        let signals = HashMap::new();
        let mut prev = Previous::default();
        for (t, names) in [
            (0, vec!["counts"]),
            (2_000, vec!["counts", "ftrl"]),
            (4_000, vec!["ftrl"]),
        ] {
            let reports: Vec<InstanceReport> = names
                .iter()
                .map(|n| {
                    let mut r = report("a", 10, 0, 0.1);
                    r.models[0].name = (*n).to_string();
                    r
                })
                .collect();
            let (view, next) = merge(t, &reports, &signals, &prev);
            prev = next.clone();
            monitor.push(view, next);
        }
        let h = monitor.response().history;
        assert_eq!(h.ts_ms, [0, 2_000, 4_000]);
        assert_eq!(h.models["counts"].ne.len(), 3);
        assert!(h.models["counts"].ne[2].is_none());
        assert!(h.models["ftrl"].ne[0].is_none() && h.models["ftrl"].ne[1].is_some());
        assert_eq!(h.lag[&1], [Some(7), Some(7), Some(7)]);
    }
}
