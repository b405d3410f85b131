//! The noise model behind the overload test's bias checks
//! (`it::scorer::shedding_at_five_times_capacity_bounds_lag_and_memory_and_keeps_estimates`).
//!
//! A run of that test can say only so much about bias: under shedding the serving variant's
//! estimates scatter, and part of the scatter is shared by every key of a partition (FTRL's
//! bias and position weights and the count feature's weight take big importance-weighted
//! steps), so it does not average out over keys. This replays the test's stream (the same
//! generator, `ctr_e2e::labeled_stream_with`) through the scorer's own partition state
//! (`PartitionState::apply`: dedupe, held clicks, stage-one sampling with carried weights)
//! and stage-two thinning (`Thinning`), with the governor replaced by a fixed schedule, once
//! without shedding and once with it, for many seeds, and prints the two statistics the test
//! checks, each estimate taken as the test reads it (at the key's last impression):
//! - per ad: the mean over the ads with 1,000+ impressions of the relative difference of the
//!   ad key's estimate (the count model's ad level, which shares the partition's position
//!   effects);
//! - per (ad, context): the relative difference of the sums of the serving variant's
//!   estimates, read two ways: as Redis holds them (each written at the key's last
//!   impression) and as the ranking API answers them (the final state, asked for every key
//!   at the end). They differ under shedding: a key's last learned record is more often a
//!   negative standing for many, learned a moment before its value is written.
//!
//! ```text
//! cargo run --release -p ctr-e2e --example shedding_noise -- [seeds] [rate] [thinning]
//! ```
//!
//! Over many seeds the mean is the bias (expected 0) and the standard deviation is the noise
//! one run of the test carries (the test's bound is four of them).

use std::collections::HashMap;

use ctr_models::{Impression, ModelSet, VariantConfig, VariantKind};
use ctr_schemas::LabeledImpression;
use ctr_scorer::state::{PartitionState, Policy, Thinning};

/// Records per run: the test's 8 s at five times a capacity of ~21k/s.
const RECORDS: usize = 860_000;
/// Shedding starts once the backlog builds, about 15% into the stream in the test.
const SHED_FROM: f64 = 0.15;
const PARTITIONS: usize = 4;

fn main() {
    let arg = |i: usize, default: f64| {
        std::env::args()
            .nth(i)
            .map_or(default, |s| s.parse().expect("a number"))
    };
    let seeds = arg(1, 20.0) as u64;
    let (rate, thinning) = (arg(2, 0.2), arg(3, 2.0) as u32);
    let mut runs = Vec::new();
    for seed in 0..seeds {
        let stream = ctr_e2e::labeled_stream_with("noise", RECORDS, 60, 2 * seed + 11, false);
        let labels: Vec<LabeledImpression> = stream
            .records
            .iter()
            .map(|(_, _, bytes)| {
                ctr_schemas::wire::decode(bytes).expect("the generator's records decode")
            })
            .collect();
        let reference = estimates(&labels, |_| None);
        let from = (labels.len() as f64 * SHED_FROM) as usize;
        let shed = estimates(&labels, |i| (i >= from).then_some((rate, thinning)));
        let per_ad: Vec<(f64, f64)> = stream
            .expected
            .iter()
            .filter(|(_, (imps, _))| *imps >= 1_000)
            .map(|(ad, (imps, _))| (shed.ads[ad] / reference.ads[ad] - 1.0, *imps as f64))
            .collect();
        // Each ad's error scaled by the square root of its impressions: the test bounds every
        // ad by four times sigma / sqrt(impressions), this estimates sigma.
        let scaled =
            (per_ad.iter().map(|(r, n)| r * r * n).sum::<f64>() / per_ad.len() as f64).sqrt();
        let per_ad = per_ad.iter().map(|(r, _)| r).sum::<f64>() / per_ad.len() as f64;
        // Keys the shedding run wrote (one whose every impression was dropped unread is not).
        let sums = |shed: &HashMap<String, f64>, reference: &HashMap<String, f64>| {
            let (mut sum_shed, mut sum_ref) = (0.0, 0.0);
            for (key, r) in reference {
                if let Some(s) = shed.get(key) {
                    sum_ref += r;
                    sum_shed += s;
                }
            }
            sum_shed / sum_ref - 1.0
        };
        let written = sums(&shed.contexts, &reference.contexts);
        let served = sums(&shed.served, &reference.served);
        println!(
            "seed {seed}: shed/unshed per ad (mean) {per_ad:+.4}, per ad rms × sqrt(impressions) {scaled:.2}, per (ad, context) (sum) as written {written:+.4}, as served {served:+.4}"
        );
        runs.push((per_ad, written, scaled, served));
    }
    println!(
        "{} seeds, keep-rate {rate}, thinning {thinning}:",
        runs.len()
    );
    for (name, values) in [
        ("per ad", runs.iter().map(|r| r.0).collect::<Vec<_>>()),
        (
            "per (ad, context) as written",
            runs.iter().map(|r| r.1).collect(),
        ),
        (
            "per (ad, context) as served",
            runs.iter().map(|r| r.3).collect(),
        ),
        (
            "per ad, rms × sqrt(impressions)",
            runs.iter().map(|r| r.2).collect(),
        ),
    ] {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let sd =
            (values.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
        println!(
            "  {name}: mean {mean:+.4} (standard error {:.4}), sd {sd:.4}",
            sd / n.sqrt()
        );
    }
}

/// The estimates as the test reads them from Redis.
struct Estimates {
    /// Ad → the ad key's estimate.
    ads: HashMap<String, f64>,
    /// `ad:context key` → the serving variant's estimate at the key's last impression.
    contexts: HashMap<String, f64>,
    /// `ad:context key` → the serving variant's estimate from the final state.
    served: HashMap<String, f64>,
}

/// The estimates of every ad and (ad, context) at the key's last impression, and of every
/// (ad, context) from the final state, when record `i` is shed as `shedding(i)` says:
/// `Some((keep-rate, thinning factor))` or `None`.
fn estimates(
    labels: &[LabeledImpression],
    shedding: impl Fn(usize) -> Option<(f64, u32)>,
) -> Estimates {
    let mut parts: Vec<PartitionState> = (0..PARTITIONS)
        .map(|_| {
            let models = ModelSet::new(vec![VariantConfig::of(VariantKind::Combined)])
                .expect("the default variant is valid");
            PartitionState::new(models, 900_000)
        })
        .collect();
    let mut thin = Thinning::default();
    let mut out = Estimates {
        ads: HashMap::new(),
        contexts: HashMap::new(),
        served: HashMap::new(),
    };
    let mut released = Vec::new();
    // Each key's last record, whose ad, campaign and context ask the final state.
    let mut last: HashMap<String, usize> = HashMap::new();
    for (i, l) in labels.iter().enumerate() {
        let (rate, k) = shedding(i).unwrap_or((1.0, 1));
        // As the consumer decides from the `ctr.clicked` and `ctr.position` headers: a
        // late-click correction is clicked, so only a label's negative is thinned.
        let negative =
            || (l.kind == ctr_schemas::LabelKind::Label && !l.clicked).then_some(l.position as u32);
        let Some(thinned) = thin.admit(l.ad_id.as_bytes(), k, negative) else {
            continue;
        };
        let state = &mut parts[partition(l)];
        let ctx_key = l.context.key();
        let policy = Policy {
            negative_rate: rate,
            learn: true,
            thinned,
        };
        state
            .apply(l, &ctx_key, policy, &mut released)
            .expect("the generator's labels are valid");
        released.clear();
        let pairs = l.context.pairs();
        let serving = &state.models().variants()[0];
        let top = top_slot(l, &pairs, state);
        let counts = serving.counts().expect("combined has a count model");
        let ad_level = counts
            .predict(&Impression {
                context: &[],
                ..top
            })
            .p;
        out.ads.insert(l.ad_id.clone(), ad_level);
        let key = format!("{}:{ctx_key}", l.ad_id);
        out.contexts.insert(key.clone(), serving.predict(&top).p);
        last.insert(key, i);
    }
    for (key, i) in last {
        let l = &labels[i];
        let state = &parts[partition(l)];
        let pairs = l.context.pairs();
        let top = top_slot(l, &pairs, state);
        out.served
            .insert(key, state.models().variants()[0].predict(&top).p);
    }
    out
}

/// The partition of `l`'s ad (`ad-NNN`): NNN modulo the partitions.
fn partition(l: &LabeledImpression) -> usize {
    let ad: usize = l.ad_id[3..].parse().expect("ad-NNN");
    ad % PARTITIONS
}

/// `l`'s ad in its context (`pairs`) at the top slot, at `state`'s newest event time.
fn top_slot<'a>(
    l: &'a LabeledImpression,
    pairs: &'a [(&'a str, &'a str)],
    state: &PartitionState,
) -> Impression<'a> {
    Impression {
        ad: &l.ad_id,
        campaign: &l.campaign_id,
        position: 1,
        context: pairs,
        ts_ms: state.newest_ms().max(0),
    }
}
