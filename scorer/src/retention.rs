//! Bounded exact totals: which (ad, context) keys stay in a partition's hot state, and how a
//! key that left it comes back without losing a count.
//!
//! The exact totals ([`crate::state::PartitionState`]) are kept per ad and per ad in each full
//! context, and the context space grows with traffic. So a key that has not changed for
//! [`Retention::hot_ms`] of event time *retires*: it leaves the hot state (its last value is
//! in Redis, published before it retired) and its hash goes into [`RetiredKeys`], a filter of
//! fixed size.
//!
//! When a record touches a key that is not hot but that the filter may hold, the worker reads
//! the key's hash from Redis (`imps`, `clicks`, `ver`) and the state starts from that value
//! ([`crate::state::PartitionState::seed`]). The value is exact as of offset `ver`, so the
//! state adds only records past `ver` to it: a record at or below `ver` is already in it (a
//! new owner replaying what the previous one published). So the totals stay exact across
//! retirements, SIGKILLs and hand-overs, whenever retirement ran: no owner has to retire keys
//! at the same points as another.
//!
//! What is forgotten. The filter holds [`GENERATIONS`] generations of `remembered /
//! GENERATIONS` keys each; when the newest is full a new one starts and the oldest is dropped.
//! So it remembers at least the last `3/4 × remembered` keys retired in the partition, and at
//! most the last `remembered`. A key that comes back after the filter has forgotten it starts
//! again from zero, and its next write replaces its old value in Redis. A false positive (about 1% of new keys)
//! costs one Redis read, which finds nothing.
//!
//! Memory: a hot key costs [`HOT_KEY_BYTES`] plus the table's slack; the filter costs
//! `remembered × 12 / 8` bytes at most. So a partition's totals are bounded by the keys changed
//! in the last `hot_ms` of event time plus one checkpoint interval (retirement runs with each
//! checkpoint's maintenance), and that filter. docs/BENCHMARKS.md has the figures.

use std::collections::VecDeque;

use fastbloom::BloomFilter;
use serde::{Deserialize, Serialize};

/// Generations of the filter of retired keys.
pub const GENERATIONS: usize = 4;
/// Filter bits per remembered key: about 0.3% false positives per generation with [`HASHES`]
/// hashes, so about 1% over the [`GENERATIONS`] a lookup asks.
const BITS_PER_KEY: usize = 12;
/// Hashes per key in the filter.
const HASHES: u32 = 8;
/// The smallest generation (a tiny setting still gets a working filter).
const MIN_GENERATION_KEYS: usize = 1_024;
/// Bytes of one hot key's entry in the totals table: its 64-bit hash, impressions, clicks and
/// the event time it last changed.
pub const HOT_KEY_BYTES: usize = 32;

/// How long exact totals stay hot, and how many retired keys are remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// A key unchanged for this long (event time, ms) retires. 0: never.
    pub hot_ms: i64,
    /// Retired keys the filter is sized for (see the module docs).
    pub remembered: usize,
}

impl Retention {
    /// Keys never retire.
    pub const KEEP_ALL: Retention = Retention {
        hot_ms: 0,
        remembered: 0,
    };
}

/// The keys retired from a partition's hot totals, approximately (see the module docs).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RetiredKeys {
    generations: VecDeque<Generation>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Generation {
    filter: BloomFilter,
    capacity: u64,
    len: u64,
}

impl Generation {
    fn new(capacity: usize) -> Self {
        Self {
            // Keys are our own hashes (`insert_hash`), so the filter's hasher is never used;
            // a fixed seed makes a filter rebuilt from the same keys the same value (an
            // incremental checkpoint replays retirements into it).
            filter: BloomFilter::with_num_bits(capacity * BITS_PER_KEY)
                .seed(&0)
                .hashes(HASHES),
            capacity: capacity as u64,
            len: 0,
        }
    }
}

impl RetiredKeys {
    /// Remembers `key` as retired, in a filter sized for `remembered` keys (a new size applies
    /// from the next generation on).
    pub fn insert(&mut self, key: u64, remembered: usize) {
        if self.generations.back().is_none_or(|g| g.len >= g.capacity) {
            let capacity = (remembered / GENERATIONS).max(MIN_GENERATION_KEYS);
            self.generations.push_back(Generation::new(capacity));
            while self.generations.len() > GENERATIONS {
                self.generations.pop_front();
            }
        }
        let newest = self.generations.back_mut().expect("pushed above");
        newest.filter.insert_hash(key);
        newest.len += 1;
    }

    /// Whether `key` may have retired (false: it certainly did not, or it was forgotten).
    pub fn may_contain(&self, key: u64) -> bool {
        self.generations.iter().any(|g| g.filter.contains_hash(key))
    }

    /// Keys inserted into the generations still held.
    pub fn len(&self) -> u64 {
        self.generations.iter().map(|g| g.len).sum()
    }

    /// No key remembered.
    pub fn is_empty(&self) -> bool {
        self.generations.is_empty()
    }

    /// Heap bytes of the filter.
    pub fn bytes(&self) -> usize {
        self.generations
            .iter()
            .map(|g| g.filter.num_bits() / 8)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_recent_retirements_and_forgets_the_oldest_generation() {
        let mut r = RetiredKeys::default();
        assert!(!r.may_contain(1));
        let remembered = 4 * MIN_GENERATION_KEYS;
        for k in 0..remembered as u64 {
            r.insert(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), remembered);
        }
        assert!(
            (0..remembered as u64).all(|k| r.may_contain(k.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
        );
        let false_positives = (1_000_000..1_010_000u64)
            .filter(|k| r.may_contain(k.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
            .count();
        assert!(false_positives < 300, "{false_positives} in 10 000");
        // One more generation's worth: the first one is dropped, the rest still held.
        for k in remembered as u64..(remembered + MIN_GENERATION_KEYS) as u64 {
            r.insert(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), remembered);
        }
        assert_eq!(r.generations.len(), GENERATIONS);
        let first_kept = (0..MIN_GENERATION_KEYS as u64)
            .filter(|k| r.may_contain(k.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
            .count();
        assert!(
            first_kept < 100,
            "{first_kept} of the first generation still seen"
        );
        assert!(
            (MIN_GENERATION_KEYS as u64..(remembered + MIN_GENERATION_KEYS) as u64)
                .all(|k| r.may_contain(k.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
        );
        assert_eq!(
            r.bytes(),
            GENERATIONS * MIN_GENERATION_KEYS * BITS_PER_KEY / 8
        );
    }
}
