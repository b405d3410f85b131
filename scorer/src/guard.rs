//! The learning guard. It follows the joiner's click-stream stall signal (`<prefix>signal:joiner`,
//! see `ctr-feedback`'s `signals`): while any joiner reports a stall, workers stop learning and
//! keep counting and serving; the switch is logged and exported as `ctr_scorer_learning_paused`.

use std::collections::HashMap;
use std::time::Duration;

use ctr_runtime::DependencyError;
use ctr_runtime::redis::RedisConn;
use ctr_schemas::contract::{JOINER_SIGNAL_FRESH_MS, JoinerSignal};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::load::{Control, next_tick, unix_ms};

/// Whether any fresh joiner signal reports a stall; the first reason found.
fn stalled(entries: &HashMap<String, String>, now_ms: i64) -> (bool, Option<String>) {
    for (instance, json) in entries {
        match serde_json::from_str::<JoinerSignal>(json) {
            Ok(s) if s.stalled && now_ms - s.updated_ms <= JOINER_SIGNAL_FRESH_MS => {
                return (
                    true,
                    Some(format!("{instance}: {}", s.reason.unwrap_or_default())),
                );
            }
            Ok(_) => {}
            Err(e) => warn!(%instance, error = %e, "unreadable joiner signal ignored"),
        }
    }
    (false, None)
}

/// Why the learning guard stopped.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GuardError(DependencyError<redis::RedisError>);

/// Polls the joiner's signal every second and flips the learning guard, until `stop`. Reads
/// follow the dependency policy; an outage past its budget, or a key that cannot be read as
/// the signal hash (a wrong type: somebody else writes it), ends the guard with an error, and
/// with it the process: learning on without the guard could learn a click-stream stall.
pub async fn guard(
    control: std::sync::Arc<Control>,
    redis: RedisConn,
    policy: ctr_runtime::Policy,
    key: String,
    mut stop: watch::Receiver<bool>,
) -> Result<(), GuardError> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while next_tick(&mut tick, &mut stop).await {
        let entries: HashMap<String, String> = policy
            .retry(&format!("reading the joiner signal at {key}"), || {
                let mut c = redis.clone();
                let key = &key;
                async move { redis::cmd("HGETALL").arg(key).query_async(&mut c).await }
            })
            .await
            .map_err(GuardError)?;
        let (stall, reason) = stalled(&entries, unix_ms());
        *control.guard_reason.lock().expect("guard reason") = reason.clone();
        if stall == control.learning() {
            if stall {
                warn!(
                    reason = reason.as_deref().unwrap_or(""),
                    "click stream stalled: learning paused, serving continues"
                );
            } else {
                info!("click stream healthy again: learning resumed");
            }
            control.set_learning(!stall);
        }
        metrics::gauge!("ctr_scorer_learning_paused").set(f64::from(u8::from(stall)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fresh_stall_signals_count() {
        let signal = |stalled: bool, updated_ms: i64| {
            serde_json::to_string(&JoinerSignal {
                stalled,
                reason: stalled.then(|| "no clicks".to_string()),
                click_coverage: None,
                window_serves: 0,
                window_clicks: 0,
                clicks_per_serve: None,
                baseline_clicks_per_serve: None,
                updated_ms,
                totals: ctr_schemas::contract::JoinStats::default(),
            })
            .unwrap()
        };
        let (fresh, old, ok) = (
            signal(true, 100_000),
            signal(true, 1_000),
            signal(false, 100_000),
        );
        let map = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        assert!(stalled(&map(&[("a", &fresh), ("b", &ok)]), 110_000).0);
        assert!(!stalled(&map(&[("a", &old), ("b", &ok)]), 110_000).0);
        assert!(!stalled(&map(&[("a", "garbage")]), 110_000).0);
    }
}
