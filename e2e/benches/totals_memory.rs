//! Memory of a scorer fed never-repeating contexts for a long simulated period (issue 19):
//! with the exact totals bounded (`--totals-hot-ms`), against the same scorer keeping every
//! key hot (`--totals-hot-ms=0`, the behaviour before), in the same run.
//!
//! Run (stack up, release binaries built: `cargo build --release --workspace --bins`):
//! `cargo bench -p ctr-e2e --bench totals_memory -- [labels, default 2000000]`
//!
//! Input: labels on 4 partitions, 500 ads, each label's query category seen nowhere else (so
//! each adds an (ad, context) key), one label per 200 ms of event time: 2M labels span 4.6
//! days. Both scorers read the whole topic with the default models (counts, FTRL, combined;
//! their own eviction on), checkpointing (and so retiring) every second; shedding is off so
//! every label counts. Sampled every 250 ms: the labels counted, the hot exact-total keys
//! (`ctr_scorer_hot_total_keys`, summed over partitions), the retired-key filters' bytes and
//! the process's resident memory.

use std::time::{Duration, Instant};

use ctr_e2e::*;
use ctr_schemas::{Encoder, LabeledImpression};

const STEP_MS: i64 = 200;
const HOT_MS: i64 = 3_600_000;

fn records(topic: &str, n: u64) -> Vec<(String, String, Vec<u8>)> {
    let mut enc = Encoder::<LabeledImpression>::new();
    (0..n)
        .map(|i| {
            let l = fresh_context_label(i, STEP_MS);
            (
                topic.to_string(),
                l.ad_id.clone(),
                enc.encode(&l).expect("encodes"),
            )
        })
        .collect()
}

/// One sample of a running scorer.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    counted: f64,
    hot_keys: f64,
    filter_bytes: f64,
    /// The serving variant's parameters in the process's replica (the models' own eviction).
    parameters: f64,
    rss: u64,
}

/// Runs a scorer with `extra` flags over the whole topic; its samples, in order.
fn run(topic: &str, total: usize, extra: &[&str]) -> Vec<Sample> {
    let port = free_port();
    let prefix = format!("{}:", unique("mem"));
    let mut flags = vec!["--shedding=false", "--checkpoint-ms=1000"];
    flags.extend_from_slice(extra);
    let s = start_scorer(topic, &format!("{prefix}g"), &prefix, port, &flags);
    let page = || http_get(&format!("http://127.0.0.1:{port}/metrics"));
    let mut samples = Vec::new();
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let Some(p) = page() else { continue };
        let sample = Sample {
            counted: metric_sum(&p, "ctr_scorer_records_total", "").unwrap_or(0.0),
            hot_keys: metric_sum(&p, "ctr_scorer_hot_total_keys", "").unwrap_or(0.0),
            filter_bytes: metric_sum(&p, "ctr_scorer_retired_filter_bytes", "").unwrap_or(0.0),
            parameters: metric(&p, "ctr_scorer_replica_parameters").unwrap_or(0.0),
            rss: s.rss_bytes().unwrap_or(0),
        };
        samples.push(sample);
        if sample.counted >= total as f64 {
            // One more checkpoint interval: the last retirement.
            std::thread::sleep(Duration::from_millis(1_500));
            if let Some(p) = page() {
                samples.push(Sample {
                    hot_keys: metric_sum(&p, "ctr_scorer_hot_total_keys", "").unwrap_or(0.0),
                    filter_bytes: metric_sum(&p, "ctr_scorer_retired_filter_bytes", "")
                        .unwrap_or(0.0),
                    parameters: metric(&p, "ctr_scorer_replica_parameters").unwrap_or(0.0),
                    rss: s.rss_bytes().unwrap_or(0),
                    ..sample
                });
            }
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "the scorer did not count the topic in 15 minutes:\n{}",
            s.output()
        );
    }
    s.stop();
    unlink_prefix(&prefix);
    samples
}

/// Deletes every key under `prefix` (millions of estimate keys: left behind, they would slow
/// every later test that lists keys).
fn unlink_prefix(prefix: &str) {
    let mut con = redis();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(10_000)
            .query(&mut con)
            .expect("SCAN");
        if !keys.is_empty() {
            let _: () = redis::cmd("UNLINK")
                .arg(&keys)
                .query(&mut con)
                .expect("UNLINK");
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

/// The sample nearest to `fraction` of the topic counted.
fn at(samples: &[Sample], total: usize, fraction: f64) -> Sample {
    *samples
        .iter()
        .find(|s| s.counted >= fraction * total as f64)
        .unwrap_or(samples.last().expect("samples"))
}

fn main() {
    let n: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let topic = format!("{}.labeled", unique("totals"));
    create_topics(&[(&topic, 4)]);
    let recs = records(&topic, n);
    let started = Instant::now();
    produce_all(&recs);
    eprintln!(
        "produced {n} labels ({:.1} days of event time) in {:.1} s",
        n as f64 * STEP_MS as f64 / 86_400_000.0,
        started.elapsed().as_secs_f64()
    );
    drop(recs);
    let total = n as usize;
    let all = run(&topic, total, &["--totals-hot-ms=0"]);
    let hot_ms = format!("--totals-hot-ms={HOT_MS}");
    let bounded = run(&topic, total, &[&hot_ms]);
    println!(
        "| labels counted | event time | hot keys, all kept | hot keys, {} h retention | serving-variant parameters | RSS, all kept | RSS, retention | RSS ratio | retired-key filters |",
        HOT_MS / 3_600_000
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for fraction in [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0] {
        let (a, b) = (at(&all, total, fraction), at(&bounded, total, fraction));
        println!(
            "| {:.0} | {:.1} days | {:.0} | {:.0} | {:.0} | {:.0} MB | {:.0} MB | {:.2} | {:.1} MB |",
            b.counted,
            b.counted * STEP_MS as f64 / 86_400_000.0,
            a.hot_keys,
            b.hot_keys,
            b.parameters,
            a.rss as f64 / 1e6,
            b.rss as f64 / 1e6,
            b.rss as f64 / a.rss.max(1) as f64,
            b.filter_bytes / 1e6,
        );
    }
    let peak = |s: &[Sample]| s.iter().map(|x| x.rss).max().unwrap_or(0) as f64 / 1e6;
    let peak_keys = bounded.iter().map(|x| x.hot_keys).fold(0.0, f64::max);
    println!(
        "peak RSS: all kept {:.0} MB, retention {:.0} MB; peak hot keys with retention {peak_keys:.0}",
        peak(&all),
        peak(&bounded)
    );
}
