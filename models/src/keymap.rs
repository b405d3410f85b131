//! A flat hash table from 64-bit keys that are already uniform hashes to small `Copy` values:
//! the storage of the count model and of FTRL's coordinates.
//!
//! Why not `std::collections::HashMap` (hashbrown)? Its control bytes and its slots live in two
//! arrays, so a lookup in a table far larger than the caches costs two *dependent* cache
//! misses: the control group, then the slot it points at. Here a slot holds the key beside the
//! value and the table is probed linearly, so a lookup is one miss, and a batch of lookups
//! whose keys are known in advance (an example's 20 features, an impression's 7 count keys)
//! issues its misses back to back, letting the CPU overlap them. That is what brings FTRL's
//! predict + update on a 645k-coordinate table under 1 µs (docs/BENCHMARKS.md has the before and
//! after). The workspace forbids `unsafe`, so explicit prefetch is not available; the batch
//! shape gets the same overlap from out-of-order execution.
//!
//! Layout: a power-of-two array of `(key, value)` slots, key 0 marking an empty slot (the real
//! key 0 lives in a side field), at most half full: linear probing then expects 1.5 probes to
//! find a key and 2.5 to miss one. At 3/4 the table is a third smaller but the longer probe
//! sequences mispredict often enough to cost a third more time on a cache-resident table
//! (measured: docs/BENCHMARKS.md). Memory is 2–4 slots per key. The home slot is the top bits of a
//! multiplicative (Fibonacci) hash of the key, so keys whose low bits collide still spread.
//! Removal is by [`KeyMap::retain`], which rebuilds the table: the learners remove only in
//! periodic maintenance, never on the hot path.
//!
//! Serialized as a map of (key, value) pairs, exactly as a `HashMap` serializes, so snapshots
//! written before this table existed load unchanged.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const EMPTY: u64 = 0;
const MIN_SLOTS: usize = 16;

#[derive(Clone, Copy)]
struct Slot<V> {
    key: u64,
    value: V,
}

/// A map from pre-hashed `u64` keys to `V` (see the module docs).
#[derive(Clone)]
pub struct KeyMap<V> {
    slots: Vec<Slot<V>>,
    /// Occupied slots (the zero key not included).
    used: usize,
    /// The value of key 0, which cannot live in a slot (0 marks an empty slot).
    zero: Option<V>,
}

/// Where a key is, or where it would go: the result of [`KeyMap::find`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// In this slot.
    At(usize),
    /// Key 0, in the side field.
    Zero,
    /// Not present.
    Absent,
}

impl<V: Copy + Default> Default for KeyMap<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: Copy + Default> KeyMap<V> {
    /// An empty map (allocates on the first insert).
    pub fn new() -> Self {
        Self {
            slots: Vec::new(),
            used: 0,
            zero: None,
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.used + usize::from(self.zero.is_some())
    }

    /// No key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of slots allocated (memory is `capacity × size_of::<(u64, V)>()`).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Bytes of one slot.
    pub const fn slot_bytes() -> usize {
        std::mem::size_of::<Slot<V>>()
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// The home slot of `key`: the top bits of a Fibonacci hash.
    fn home(&self, key: u64) -> usize {
        let bits = self.slots.len().trailing_zeros();
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - bits)) as usize
    }

    /// Locates `key`. Cheap to call for many keys in a row: each call is one probe sequence
    /// and does not depend on the others, so their cache misses overlap.
    #[inline]
    pub fn find(&self, key: u64) -> Found {
        if key == EMPTY {
            return if self.zero.is_some() {
                Found::Zero
            } else {
                Found::Absent
            };
        }
        if self.slots.is_empty() {
            return Found::Absent;
        }
        let mask = self.mask();
        let home = self.home(key);
        let mut i = home;
        loop {
            let k = self.slots[i].key;
            if k == key {
                return Found::At(i);
            }
            if k == EMPTY {
                return Found::Absent;
            }
            i = (i + 1) & mask;
        }
    }

    /// The value at a location returned by [`KeyMap::find`] (`None` for `Absent`).
    #[inline]
    pub fn at(&self, found: Found) -> Option<&V> {
        match found {
            Found::At(i) => Some(&self.slots[i].value),
            Found::Zero => self.zero.as_ref(),
            Found::Absent => None,
        }
    }

    /// The value at a location returned by [`KeyMap::find`], mutably. A location stays valid
    /// until the table grows (see [`KeyMap::reserve`]) or is rebuilt by [`KeyMap::retain`].
    #[inline]
    pub fn at_mut(&mut self, found: Found) -> Option<&mut V> {
        match found {
            Found::At(i) => Some(&mut self.slots[i].value),
            Found::Zero => self.zero.as_mut(),
            Found::Absent => None,
        }
    }

    /// The value of `key`, if present.
    #[inline]
    pub fn get(&self, key: u64) -> Option<&V> {
        self.at(self.find(key))
    }

    /// The value of `key` to change in place, if present.
    #[inline]
    pub fn get_mut(&mut self, key: u64) -> Option<&mut V> {
        self.at_mut(self.find(key))
    }

    /// The value of `key`, inserted as `make()` if absent.
    #[inline]
    pub fn get_or_insert_with(&mut self, key: u64, make: impl FnOnce() -> V) -> &mut V {
        if key == EMPTY {
            return self.zero.get_or_insert_with(make);
        }
        self.reserve(1);
        let mask = self.mask();
        let mut i = self.home(key);
        loop {
            let k = self.slots[i].key;
            if k == key {
                break;
            }
            if k == EMPTY {
                self.slots[i] = Slot { key, value: make() };
                self.used += 1;
                break;
            }
            i = (i + 1) & mask;
        }
        &mut self.slots[i].value
    }

    /// [`KeyMap::get_or_insert_with`] with `V::default()`.
    #[inline]
    pub fn entry_or_default(&mut self, key: u64) -> &mut V {
        self.get_or_insert_with(key, V::default)
    }

    /// Makes room so that `additional` more keys insert without growing the table (so slot
    /// locations found before those inserts stay valid).
    pub fn reserve(&mut self, additional: usize) {
        let needed = self.used + additional;
        if needed * 2 <= self.slots.len() {
            return;
        }
        let mut slots = MIN_SLOTS;
        while needed * 2 > slots {
            slots *= 2;
        }
        self.rebuild(slots);
    }

    /// Moves every key into a fresh table of `slots` slots.
    fn rebuild(&mut self, slots: usize) {
        let old = std::mem::replace(
            &mut self.slots,
            vec![
                Slot {
                    key: EMPTY,
                    value: V::default(),
                };
                slots
            ],
        );
        let mask = self.mask();
        for s in old.into_iter().filter(|s| s.key != EMPTY) {
            let mut i = self.home(s.key);
            while self.slots[i].key != EMPTY {
                i = (i + 1) & mask;
            }
            self.slots[i] = s;
        }
    }

    /// Keeps the keys for which `keep` is true; the table shrinks to fit them.
    pub fn retain(&mut self, mut keep: impl FnMut(u64, &V) -> bool) {
        if self.zero.as_ref().is_some_and(|v| !keep(EMPTY, v)) {
            self.zero = None;
        }
        let mut dropped = false;
        for s in self.slots.iter_mut().filter(|s| s.key != EMPTY) {
            if !keep(s.key, &s.value) {
                s.key = EMPTY;
                self.used -= 1;
                dropped = true;
            }
        }
        if dropped {
            // Emptied slots may break other keys' probe sequences: re-place every key.
            let mut slots = MIN_SLOTS;
            while self.used * 2 > slots {
                slots *= 2;
            }
            self.rebuild(slots);
        }
    }

    /// Every (key, value), in slot order (deterministic for a given history, unspecified).
    pub fn iter(&self) -> impl Iterator<Item = (u64, &V)> {
        self.zero.iter().map(|v| (EMPTY, v)).chain(
            self.slots
                .iter()
                .filter(|s| s.key != EMPTY)
                .map(|s| (s.key, &s.value)),
        )
    }

    /// Every value, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    /// Every value to change in place, in no particular order.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.zero.iter_mut().chain(
            self.slots
                .iter_mut()
                .filter(|s| s.key != EMPTY)
                .map(|s| &mut s.value),
        )
    }
}

/// Merges a later delta's keys into an earlier one's, for deltas that are applied by removing
/// `removed` first and then writing `set` (absolute values). Afterwards the pair, applied
/// once, does what the two did applied in turn: a key ends with the value the later delta set,
/// else removed if the later removed it, else as the earlier left it. `split` and `join`
/// convert between a delta's entry and its (key, value) pair.
pub(crate) fn merge_keyed<K, V, S>(
    set: &mut Vec<S>,
    removed: &mut Vec<K>,
    later_set: impl IntoIterator<Item = (K, V)>,
    later_removed: Vec<K>,
    split: impl Fn(&S) -> (K, V),
    join: impl Fn((K, V)) -> S,
) where
    K: std::hash::Hash + Eq + Copy,
    V: Copy,
{
    type Fixed = foldhash::fast::FixedState;
    let mut last: std::collections::HashMap<K, Option<V>, Fixed> =
        std::collections::HashMap::with_capacity_and_hasher(
            set.len() + removed.len(),
            Fixed::default(),
        );
    last.extend(removed.drain(..).map(|k| (k, None)));
    last.extend(set.drain(..).map(|s| {
        let (k, v) = split(&s);
        (k, Some(v))
    }));
    last.extend(later_removed.into_iter().map(|k| (k, None)));
    last.extend(later_set.into_iter().map(|(k, v)| (k, Some(v))));
    for (k, v) in last {
        match v {
            Some(v) => set.push(join((k, v))),
            None => removed.push(k),
        }
    }
}

/// Equal when both hold the same keys with equal values, whatever the layout (a restored
/// table has the same contents but may place them differently).
impl<V: Copy + Default + PartialEq> PartialEq for KeyMap<V> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(k, v)| other.get(k) == Some(v))
    }
}

impl<V: Copy + Default + fmt::Debug> fmt::Debug for KeyMap<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<V: Copy + Default + Serialize> Serialize for KeyMap<V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            map.serialize_entry(&k, v)?;
        }
        map.end()
    }
}

impl<'de, V: Copy + Default + Deserialize<'de>> Deserialize<'de> for KeyMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor<V>(PhantomData<V>);

        impl<'de, V: Copy + Default + Deserialize<'de>> Visitor<'de> for MapVisitor<V> {
            type Value = KeyMap<V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of u64 keys to values")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<KeyMap<V>, A::Error> {
                // Every entry first, then one table sized for all of them. The entries arrive
                // in the serialized table's slot order, which is sorted by home slot, so all
                // of them hash to the front part of any smaller table: inserted into a table
                // that grows as they come, the first ones pile up in one probe run and each
                // insert walks it (a 3M-key checkpoint took 700 s to restore, not 2 s;
                // docs/BENCHMARKS.md, issue 19). The length hint comes from the input: it is
                // capped so a corrupt one cannot make us allocate before the entries prove it.
                let mut entries = Vec::with_capacity(access.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(entry) = access.next_entry::<u64, V>()? {
                    entries.push(entry);
                }
                let mut map = KeyMap::new();
                map.reserve(entries.len());
                for (k, v) in entries {
                    *map.entry_or_default(k) = v;
                }
                Ok(map)
            }
        }

        deserializer.deserialize_map(MapVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn key_zero_and_colliding_homes_work() {
        let mut m = KeyMap::<u32>::new();
        *m.entry_or_default(0) += 5;
        // Keys that share their home slot in a 16-slot table probe on.
        let keys: Vec<u64> = (1..2_000u64).filter(|k| k % 7 == 0).collect();
        for &k in &keys {
            *m.entry_or_default(k) += k as u32;
        }
        assert_eq!(m.get(0), Some(&5));
        assert_eq!(m.len(), keys.len() + 1);
        for &k in &keys {
            assert_eq!(m.get(k), Some(&(k as u32)));
        }
        assert_eq!(m.get(1), None);
        assert!(m.capacity() >= 2 * (m.len() - 1), "at most half full");
    }

    #[test]
    fn reserve_keeps_locations_valid_for_that_many_inserts() {
        let mut m = KeyMap::<u8>::new();
        for k in 1..=7 {
            m.entry_or_default(k);
        }
        m.reserve(1);
        let cap = m.capacity();
        let found = m.find(5);
        m.entry_or_default(1_000);
        assert_eq!(m.capacity(), cap, "no growth after reserve");
        assert_eq!(m.find(5), found);
    }

    #[test]
    fn serializes_like_a_hashmap() {
        let mut m = KeyMap::<u32>::new();
        let mut h = HashMap::new();
        for k in [0u64, 3, 99, u64::MAX] {
            *m.entry_or_default(k) = k as u32;
            h.insert(k, k as u32);
        }
        let from_map: KeyMap<u32> =
            postcard::from_bytes(&postcard::to_allocvec(&h).unwrap()).unwrap();
        assert_eq!(from_map, m, "a HashMap's bytes load into a KeyMap");
        let back: HashMap<u64, u32> =
            postcard::from_bytes(&postcard::to_allocvec(&m).unwrap()).unwrap();
        assert_eq!(back, h);
    }

    /// More keys than the length hint is trusted for: the entries are read first and the table
    /// is sized once (how long that takes is the checkpoint bench's restore time).
    #[test]
    fn a_table_above_the_length_hint_cap_round_trips() {
        let mut m = KeyMap::<u32>::new();
        for k in 1..=(1u64 << 20) + 1_000 {
            *m.entry_or_default(k.wrapping_mul(0x9E37_79B9_7F4A_7C15)) = k as u32;
        }
        let back: KeyMap<u32> = postcard::from_bytes(&postcard::to_allocvec(&m).unwrap()).unwrap();
        assert_eq!(back.len(), m.len());
        assert_eq!(back, m);
    }

    proptest! {
        /// Behaves like a HashMap under any sequence of inserts, updates and retains.
        #[test]
        fn agrees_with_a_hashmap(ops in proptest::collection::vec((0u64..64, any::<u16>(), 0u8..10), 0..400)) {
            let mut m = KeyMap::<u16>::new();
            let mut h: HashMap<u64, u16> = HashMap::new();
            for (k, v, op) in ops {
                // Spread small keys over the whole range, keeping 0 and collisions possible.
                let key = if k == 0 { 0 } else { k.wrapping_mul(0x1000_0000_0000_0001) };
                match op {
                    0 => {
                        m.retain(|k, x| (k ^ u64::from(*x)) % 3 != 0);
                        h.retain(|k, x| (*k ^ u64::from(*x)) % 3 != 0);
                    }
                    1..=3 => { prop_assert_eq!(m.get(key), h.get(&key)); }
                    _ => {
                        *m.entry_or_default(key) = v;
                        h.insert(key, v);
                    }
                }
                prop_assert_eq!(m.len(), h.len());
            }
            let mut a: Vec<(u64, u16)> = m.iter().map(|(k, v)| (k, *v)).collect();
            let mut b: Vec<(u64, u16)> = h.into_iter().collect();
            a.sort_unstable();
            b.sort_unstable();
            prop_assert_eq!(a, b);
        }
    }
}
