//! What a scorer checkpoint costs as the partition's state grows (issue 19): bytes and time
//! per checkpoint, whole and incremental, and restore time, at a fixed rate of change.
//!
//! Run (stack up: the checkpoints go to the stack's Redis through the scorer's own store):
//! `cargo bench -p ctr-e2e --bench checkpoint_cost -- [largest size, default 10000000]`
//!
//! One partition's [`PartitionState`] with the scorer's default variants (counts, FTRL,
//! combined) is fed labels whose contexts never repeat (500 ads; each label's query category
//! is new), so every label adds one exact-total key (its ad in its context) and model keys.
//! At each size (100k, 300k, 1M, 3M, 10M exact-total keys) the partition is first checkpointed
//! whole (the baseline: what every checkpoint cost before increments, `--checkpoint-links=0`),
//! then the same change is applied before each of three incremental checkpoints: 10,000 more
//! labels. Each checkpoint is timed as the scorer takes it (`CheckpointStore::save`: encode,
//! then the fenced write), and the chain (the whole state and its three increments) is
//! restored (`CheckpointStore::load`: read, decode, apply).
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

use ctr_e2e::{
    default_partition_state, feed_fresh_contexts, redis, redis_cluster, redis_url, unique,
};
use ctr_runtime::Policy;
use ctr_runtime::redis::{Redis, chunk_key};
use ctr_scorer::checkpoint::{CheckpointStore, Kind, Saved};
use ctr_scorer::state::{Compaction, PartitionState};

/// Labels between two checkpoints: the fixed rate of change.
const CHANGE: u64 = 10_000;
/// Ads of [`fresh_context_label`].
const ADS: u64 = 500;
const SIZES: [usize; 5] = [100_000, 300_000, 1_000_000, 3_000_000, 10_000_000];

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

/// One save, timed, with what it wrote.
async fn timed_save(
    store: &mut CheckpointStore,
    state: &mut PartitionState,
    pinger: &Pinger,
) -> (Saved, f64) {
    let t = Instant::now();
    pinger.watch(true);
    let saved = store.save(0, state).await;
    pinger.watch(false);
    let took = t.elapsed().as_secs_f64();
    let saved = saved
        .expect("a checkpoint is written")
        .expect("a checkpoint ahead of the stored one is written");
    (saved, took)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let largest: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map_or(10_000_000, |a| {
            a.parse().expect("the largest size, a number")
        });
    let redis = Redis::connect(&redis_url(), None, redis_cluster(), Policy::default())
        .await
        .expect("Redis (scripts/stack up)");
    let prefix = format!("{}:", unique("ckptbench"));
    let store = |compaction| {
        let conn = redis.manager();
        let policy = redis.policy();
        let prefix = prefix.clone();
        async move {
            CheckpointStore::new(conn.await.unwrap(), policy, &prefix, "labels")
                .with_compaction(compaction)
        }
    };
    let mut whole = store(Compaction { max_links: 0 }).await;
    let mut incremental = store(Compaction { max_links: 1_000 }).await;
    let mut state = default_partition_state();
    println!(
        "machine: {} cores; one partition, variants counts, ftrl, combined; {CHANGE} new labels (new contexts) before each incremental checkpoint",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!(
        "| exact-total keys | model parameters | whole: bytes | whole: time | increment: bytes (of it, bounded parts) | increment: time | ratio bytes | ratio time | longest PING, whole / increments | restore (base + 3 increments) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let pinger = Pinger::start();
    let mut fed = 0u64;
    for size in SIZES.into_iter().filter(|s| *s <= largest) {
        // Each label adds one (ad, context) key beside the 500 ad keys: the third
        // increment is taken at `size` keys.
        let target = (size as u64).saturating_sub(ADS + 3 * CHANGE);
        feed_fresh_contexts(&mut state, fed, target.max(fed));
        fed = target.max(fed);
        let (base, whole_s) = timed_save(&mut whole, &mut state, &pinger).await;
        assert_eq!(base.kind, Kind::Whole);
        let ping_whole = pinger.take_longest();
        let (mut bytes, mut extras, mut took) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..3 {
            feed_fresh_contexts(&mut state, fed, fed + CHANGE);
            fed += CHANGE;
            let (saved, s) = timed_save(&mut incremental, &mut state, &pinger).await;
            assert_eq!(saved.kind, Kind::Increment, "compacted early");
            bytes.push(saved.bytes as f64);
            extras.push(saved.bounded_bytes as f64);
            took.push(s);
        }
        let ping_increments = pinger.take_longest();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let t = Instant::now();
        let restored = incremental
            .load(0)
            .await
            .expect("load")
            .expect("a checkpoint");
        let restore = t.elapsed().as_secs_f64();
        assert_eq!(restored.next_offset, state.next_offset);
        assert_eq!(restored.total_keys(), state.total_keys());
        assert_eq!(restored.parameters(), state.parameters());
        drop(restored);
        println!(
            "| {} | {} | {:.1} MB | {whole_s:.3} s | {:.2} MB ({:.2} MB) | {:.3} s | {:.4} | {:.4} | {ping_whole:.3} s / {ping_increments:.3} s | {restore:.3} s |",
            state.total_keys(),
            state.parameters(),
            base.bytes as f64 / 1e6,
            mean(&bytes) / 1e6,
            mean(&extras) / 1e6,
            mean(&took),
            mean(&bytes) / base.bytes as f64,
            mean(&took) / whole_s,
        );
    }
    // The bench's keys: the checkpoint and its chunks (the model stream was never written).
    let mut conn = redis.manager().await.unwrap();
    let key = incremental.key(0);
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
