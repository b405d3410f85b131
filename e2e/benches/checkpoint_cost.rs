//! What a scorer checkpoint costs as the partition's state grows (issue 19): bytes and time
//! per checkpoint, and restore time, at a fixed rate of change.
//!
//! Run (stack up: the checkpoints go to the stack's Redis through the scorer's own store):
//! `cargo bench -p ctr-e2e --bench checkpoint_cost -- [largest size, default 10000000] [--one-value]`
//! (`--one-value`: the baseline, each body in one Redis value written by one script, as before
//! checkpoints were chunked)
//!
//! One partition's [`PartitionState`] with the scorer's default variants (counts, FTRL,
//! combined) is fed labels whose contexts never repeat (500 ads; each label's query category
//! is new), so every label adds one exact-total key (its ad in its context) and model keys.
//! At each size (100k, 300k, 1M, 3M, 10M exact-total keys at the third checkpoint) the same
//! change is applied before each of three checkpoints: 10,000 more labels. Each checkpoint is
//! timed as the scorer takes it (`PartitionState::snapshot`, then `CheckpointStore::save`: a
//! body over 8 MiB is staged in chunks of that size, then one fenced Lua script commits it),
//! and the last is restored (`CheckpointStore::load`: read and decode). A checkpoint Redis
//! refuses is reported as refused.
//!
//! Beside each save, another client PINGs Redis in a loop on its own thread: the longest
//! answer during the saves is how long Redis stopped serving others.
//!
//! Model maintenance (eviction of idle FTRL coordinates and faded counts) is not run, so the
//! models grow with the contexts as the exact totals do: the figure is the checkpoint's cost
//! per key of state, whichever part holds it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use ctr_e2e::{fresh_context_label, redis, redis_cluster, redis_url, unique};
use ctr_models::{ModelSet, VariantConfig, VariantKind};
use ctr_runtime::Policy;
use ctr_runtime::redis::{Redis, chunk_key};
use ctr_scorer::checkpoint::CheckpointStore;
use ctr_scorer::state::{PartitionState, Policy as LearnPolicy};

/// Labels between two checkpoints: the fixed rate of change.
const CHANGE: u64 = 10_000;
/// Ads of [`fresh_context_label`].
const ADS: u64 = 500;
const SIZES: [usize; 5] = [100_000, 300_000, 1_000_000, 3_000_000, 10_000_000];

fn feed(state: &mut PartitionState, from: u64, to: u64) {
    let mut released = Vec::new();
    for i in from..to {
        // 10 labels per second of event time.
        let l = fresh_context_label(i, 100);
        state
            .apply(&l, &l.context.key(), LearnPolicy::NORMAL, &mut released)
            .expect("the generator's labels are valid");
        released.clear();
    }
    state.next_offset = Some(to as i64);
}

/// Another client of the same Redis, PINGing in a loop on its own thread; while `watch`ed,
/// it keeps the longest answer.
struct Pinger {
    watching: Arc<AtomicBool>,
    longest_us: Arc<AtomicU64>,
}

impl Pinger {
    fn start() -> Self {
        let (watching, longest_us) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (w, l) = (Arc::clone(&watching), Arc::clone(&longest_us));
        std::thread::spawn(move || {
            let mut con = redis();
            loop {
                let t = Instant::now();
                let _: String = redis::cmd("PING").query(&mut con).expect("PING");
                if w.load(Ordering::Relaxed) {
                    l.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        });
        Self {
            watching,
            longest_us,
        }
    }

    fn watch(&self, on: bool) {
        self.watching.store(on, Ordering::Relaxed);
    }

    /// The longest PING while watched since the last call, in seconds.
    fn take_longest(&self) -> f64 {
        self.longest_us.swap(0, Ordering::Relaxed) as f64 / 1e6
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let largest: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map_or(10_000_000, |a| {
            a.parse().expect("the largest size, a number")
        });
    // The baseline: the body in one value, written by one script (as before chunking).
    let one_value = std::env::args().any(|a| a == "--one-value");
    let redis = Redis::connect(&redis_url(), None, redis_cluster(), Policy::default())
        .await
        .expect("Redis (scripts/stack up)");
    let prefix = format!("{}:", unique("ckptbench"));
    let mut store = CheckpointStore::new(
        redis.manager().await.unwrap(),
        redis.policy(),
        &prefix,
        "labels",
    );
    if one_value {
        store = store.with_chunk_bytes(usize::MAX);
    }
    let models = ModelSet::new(
        [
            VariantKind::Counts,
            VariantKind::Ftrl,
            VariantKind::Combined,
        ]
        .map(VariantConfig::of)
        .to_vec(),
    )
    .unwrap();
    let mut state = PartitionState::new(models, 900_000);
    println!(
        "machine: {} cores; one partition, variants counts, ftrl, combined; {CHANGE} new labels (new contexts) before each checkpoint; body {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if one_value {
            "in one value"
        } else {
            "in chunks of 8 MiB"
        }
    );
    println!(
        "| exact-total keys | model parameters | checkpoint bytes | encode | checkpoint (encode + fenced write) | longest PING meanwhile | restore (read + decode) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let pinger = Pinger::start();
    let mut fed = 0u64;
    for size in SIZES.into_iter().filter(|s| *s <= largest) {
        // Each label adds one (ad, context) key beside the 500 ad keys: the third
        // checkpoint is taken at `size` keys.
        let target = (size as u64).saturating_sub(ADS + 3 * CHANGE);
        feed(&mut state, fed, target.max(fed));
        fed = target.max(fed);
        let (mut bytes, mut encode, mut save) = (0usize, Vec::new(), Vec::new());
        let mut refused = None;
        for _ in 0..3 {
            feed(&mut state, fed, fed + CHANGE);
            fed += CHANGE;
            let t = Instant::now();
            let body = state.snapshot();
            encode.push(t.elapsed().as_secs_f64());
            bytes = body.len();
            let t = Instant::now();
            pinger.watch(true);
            let saved = store.save(0, &state).await;
            pinger.watch(false);
            match saved {
                Ok((written, _)) => {
                    assert!(written, "a checkpoint ahead of the stored one is written");
                    save.push(t.elapsed().as_secs_f64());
                }
                Err(e) => {
                    refused = Some(e.to_string());
                    break;
                }
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let restore = if refused.is_none() {
            let t = Instant::now();
            let restored = store.load(0).await.expect("load").expect("a checkpoint");
            let took = t.elapsed().as_secs_f64();
            assert_eq!(restored.next_offset, state.next_offset);
            format!("{:.3} s", took)
        } else {
            "-".into()
        };
        let longest_ping = pinger.take_longest();
        println!(
            "| {} | {} | {:.1} MB ({:.0} B/key) | {:.3} s | {} | {longest_ping:.3} s | {restore} |",
            state.total_keys(),
            state.parameters(),
            bytes as f64 / 1e6,
            bytes as f64 / (state.total_keys() + state.parameters()) as f64,
            mean(&encode),
            refused.as_ref().map_or_else(
                || format!("{:.3} s", mean(&save)),
                |e| format!("refused: {e}")
            ),
        );
        if refused.is_some() {
            break;
        }
    }
    // The bench's keys: the checkpoint and its chunks (the model stream was never written).
    let mut conn = redis.manager().await.unwrap();
    let key = store.key(0);
    let (generation, chunks): (Option<String>, Option<usize>) = redis::cmd("HMGET")
        .arg(&key)
        .arg("gen")
        .arg("chunks")
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    let mut doomed = vec![key.clone()];
    if let (Some(generation), Some(chunks)) = (generation, chunks) {
        doomed.extend((0..chunks).map(|i| chunk_key(&key, &generation, i)));
    }
    for key in doomed {
        let _: Result<(), _> = redis::cmd("UNLINK").arg(key).query_async(&mut conn).await;
    }
}
