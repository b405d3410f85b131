//! Instructions per labeled impression in one partition's state, for callgrind: what bounded
//! totals and the notes incremental checkpoints keep of what changed (issue 19) add to the hot
//! path. (No checkpoint is taken here, so the notes grow over the whole run, where a scorer
//! clears them at each checkpoint.)
//!
//! `cargo build --release -p ctr-scorer --example apply_cost`, then
//! `valgrind --tool=callgrind target/release/examples/apply_cost [retiring]`.
//!
//! 50,000 labels over 500 ads in 600 contexts (ads and contexts drawn unevenly), one per 10 ms
//! of event time, through `PartitionState::apply` with the scorer's default variants (counts,
//! FTRL, combined). With `retiring`, the worker's extra steps run too: every 5,000 labels keys
//! unchanged for 10 s of event time retire, and before each label both of its keys are checked
//! (`needs_seed`), and brought back when they retired (as absent from Redis: the read itself
//! is not measured). Without it, the path is the one before bounded totals, so the same file
//! (without the `retiring` branch) built at an earlier commit gives the baseline.

use ctr_models::{ModelSet, VariantConfig, VariantKind};
use ctr_schemas::{Context, LabelKind, LabeledImpression};
use ctr_scorer::state::{PartitionState, Policy};

const LABELS: u64 = 50_000;

fn label(i: u64) -> LabeledImpression {
    // Uneven: a multiplicative hash folded twice favours low indices.
    let h = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 11;
    let ad = (h % 500) * (h % 500) / 500;
    let ctx = ((h >> 20) % 600) * ((h >> 20) % 600) / 600;
    let clicked = h.is_multiple_of(40);
    let ts_ms = 1_760_000_000_000 + i as i64 * 10;
    let ad_id = format!("ad-{ad:03}");
    LabeledImpression {
        label_id: LabeledImpression::label_id_for(i as i64 + 1, &ad_id),
        serve_id: i as i64 + 1,
        campaign_id: format!("camp-{}", ad % 60),
        ad_id,
        position: (h % 4 + 1) as i32,
        context: Context {
            query_category: format!("q{}", ctx % 20),
            geo: format!("g{}", ctx / 20 % 10),
            device: ["mobile", "desktop", "tablet"][(ctx / 200) as usize].into(),
            extra: Default::default(),
        },
        clicked,
        ts_ms,
        click_ts_ms: clicked.then_some(ts_ms + 500),
        kind: LabelKind::Label,
    }
}

fn main() {
    let retiring = std::env::args().any(|a| a == "retiring");
    let models = ModelSet::new(vec![
        VariantConfig::of(VariantKind::Counts),
        VariantConfig::of(VariantKind::Ftrl),
        VariantConfig::of(VariantKind::Combined),
    ])
    .expect("default variants");
    let mut state = PartitionState::new(models, 900_000);
    let labels: Vec<(LabeledImpression, String)> = (0..LABELS)
        .map(|i| {
            let l = label(i);
            let key = l.context.key();
            (l, key)
        })
        .collect();
    let mut released = Vec::new();
    let retention = ctr_scorer::retention::Retention {
        hot_ms: 10_000,
        remembered: 100_000,
    };
    let mut returned = 0u64;
    for (i, (l, key)) in labels.iter().enumerate() {
        state.next_offset = Some(i as i64 + 1);
        if retiring {
            for context in [None, Some(key.as_str())] {
                let k = ctr_scorer::state::total_key(&l.ad_id, context);
                if state.needs_seed(k) {
                    state.seed(k, None);
                    returned += 1;
                }
            }
        }
        state
            .apply(l, key, Policy::NORMAL, &mut released)
            .expect("valid labels");
        released.clear();
        if retiring && i % 5_000 == 4_999 {
            state.retire(retention, |_| false);
        }
    }
    println!(
        "{LABELS} labels; {} hot total keys; {returned} returned",
        state.total_keys()
    );
}
