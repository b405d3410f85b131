//! The report half: what each process writes to Redis once a second ([`InstanceReport`]).

use super::*;

/// One model's metrics in a report: cumulative and over the sliding window.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelSums {
    /// The variant's name.
    pub name: String,
    /// Cumulative progressive-validation sums.
    pub cumulative: Metrics,
    /// The same over the sliding event-time window.
    pub window: Metrics,
}

/// What one scorer process reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceReport {
    /// The process's instance ID.
    pub instance: String,
    /// When it reported (Unix ms).
    pub ts_ms: i64,
    /// Records per outcome since the process started.
    pub records: BTreeMap<String, u64>,
    /// Consumer lag per owned partition.
    pub lag: BTreeMap<i32, i64>,
    /// False while its learning guard is on.
    pub learning: bool,
    /// Why the guard is on.
    pub guard_reason: Option<String>,
    /// Its keep-rate of negatives (1 = shedding nothing).
    pub keep_rate: f64,
    /// Its stage-two thinning factor (1 = none).
    pub thinning: u32,
    /// When it last wrote estimates (Unix ms).
    pub last_publish_ms: Option<i64>,
    /// Newest event time it learned from (Unix ms).
    pub newest_event_ms: Option<i64>,
    /// The variant it serves.
    pub serve_model: String,
    /// Its variants' metrics, summed over its partitions.
    pub models: Vec<ModelSums>,
    /// Its partitions' busiest ads.
    pub ads: Vec<AdHealth>,
}

pub(super) fn instance_key(prefix: &str, instance: &str) -> String {
    keys::monitor_report(prefix, instance)
}

pub(super) fn index_key(prefix: &str) -> String {
    keys::monitor_set(prefix)
}

/// This process's report, from what its workers last reported.
pub fn instance_report(cfg: &ScorerConfig, control: &Control, instance: &str) -> InstanceReport {
    let coarse = |m: &Metrics| {
        let mut c = Metrics::with_auc_bins(REPORT_AUC_BINS);
        c.merge(m);
        c
    };
    let models = merged_models(control)
        .into_iter()
        .map(|(name, cumulative, window)| ModelSums {
            name,
            cumulative: coarse(&cumulative),
            window: coarse(&window),
        })
        .collect();
    let (mut ads, newest_event_ms) = {
        let reports = control.reports.lock().expect("reports");
        let ads: Vec<AdHealth> = reports.values().flat_map(|r| r.ads.clone()).collect();
        (
            ads,
            reports.values().filter_map(|r| r.newest_event_ms).max(),
        )
    };
    busiest_first(&mut ads);
    InstanceReport {
        instance: instance.to_string(),
        ts_ms: unix_ms(),
        records: control
            .records()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        lag: control.lag.lock().expect("lag map").clone(),
        learning: control.learning(),
        guard_reason: control.guard_reason.lock().expect("guard reason").clone(),
        keep_rate: control.policy(1).negative_rate,
        thinning: control.thinning(),
        last_publish_ms: control.last_publish_ms(),
        newest_event_ms,
        serve_model: cfg.serve_model.clone(),
        models,
        ads,
    }
}

pub(super) fn busiest_first(ads: &mut Vec<AdHealth>) {
    ads.sort_by(|a, b| {
        b.impressions
            .cmp(&a.impressions)
            .then_with(|| a.ad_id.cmp(&b.ad_id))
    });
    ads.truncate(ADS_SHOWN);
}

/// Writes this process's report every second until `stop`.
pub async fn report(
    cfg: Arc<ScorerConfig>,
    control: Arc<Control>,
    mut redis: RedisConn,
    instance: String,
    mut stop: watch::Receiver<bool>,
) {
    let key = instance_key(&cfg.service.redis_prefix, &instance);
    let index = index_key(&cfg.service.redis_prefix);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while next_tick(&mut tick, &mut stop).await {
        let json = match serde_json::to_string(&instance_report(&cfg, &control, &instance)) {
            Ok(j) => j,
            Err(e) => {
                warn!(error = %e, "monitoring report does not serialize");
                continue;
            }
        };
        let r: redis::RedisResult<()> = redis::pipe()
            .set_ex(&key, json, REPORT_TTL_S)
            .sadd(&index, &instance)
            .query_async(&mut redis)
            .await;
        if let Err(e) = r {
            warn!(error = %e, "writing the monitoring report failed");
        }
    }
    // Leave the view at once rather than after the TTL.
    let _: redis::RedisResult<()> = redis::pipe()
        .del(&key)
        .srem(&index, &instance)
        .query_async(&mut redis)
        .await;
}
