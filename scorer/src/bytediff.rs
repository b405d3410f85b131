//! A byte string as a patch on an earlier version of it, for the parts of a checkpoint whose
//! size the settings bound (metrics, filters) but whose bytes change a little everywhere: an
//! incremental checkpoint carries the pieces that changed, not the whole.
//!
//! Both versions are cut into content-defined chunks (FastCDC, the `fastcdc` crate): a cut
//! falls where the bytes around it say, not at a fixed offset, so an insertion or a removal
//! (a new metric slice, a window bucket dropped at the front) moves the cuts near it only, and
//! every chunk after it is found again at its new offset. A patch copies the chunks the old
//! version has (by their XXH3 hash) and carries the rest.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// Chunk sizes: small enough that a change of a few bytes costs about a kilobyte, large enough
/// that the index of a few megabytes stays a few thousand entries.
const MIN_CHUNK: usize = 64;
const AVG_CHUNK: usize = 256;
const MAX_CHUNK: usize = 2048;

/// The chunks of a version, by hash: what a patch against it may copy.
#[derive(Debug, Clone, Default)]
pub struct Chunks {
    at: HashMap<u64, (u32, u32), foldhash::fast::FixedState>,
}

impl Chunks {
    /// The chunks of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let mut at = HashMap::default();
        for c in cuts(bytes) {
            at.entry(xxh3_64(&bytes[c.0..c.0 + c.1]))
                .or_insert((c.0 as u32, c.1 as u32));
        }
        Self { at }
    }
}

fn cuts(bytes: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
    fastcdc::v2020::FastCDC::new(bytes, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
        .map(|c| (c.offset, c.length))
}

/// A version as pieces of the one before it and new bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patch {
    pieces: Vec<Piece>,
    /// The version's length and XXH3 hash: a patch applied to another base than its own is
    /// caught.
    len: u64,
    hash: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Piece {
    /// `len` bytes of the earlier version from `offset`.
    Copy { offset: u32, len: u32 },
    /// Bytes the earlier version does not have.
    New(Vec<u8>),
}

impl Patch {
    /// `new` as a patch on the version whose chunks are `old`, and `new`'s chunks (the next
    /// patch's base). Versions are at most 4 GiB (offsets are 32-bit).
    pub fn diff(old: &Chunks, new: &[u8]) -> (Self, Chunks) {
        let mut pieces: Vec<Piece> = Vec::new();
        let mut chunks = Chunks::default();
        for (offset, len) in cuts(new) {
            let bytes = &new[offset..offset + len];
            let hash = xxh3_64(bytes);
            chunks.at.entry(hash).or_insert((offset as u32, len as u32));
            match (old.at.get(&hash), pieces.last_mut()) {
                // Continues the copy before it.
                (Some(&(o, l)), Some(Piece::Copy { offset, len })) if *offset + *len == o => {
                    *len += l;
                }
                (Some(&(o, l)), _) => pieces.push(Piece::Copy { offset: o, len: l }),
                (None, Some(Piece::New(b))) => b.extend_from_slice(bytes),
                (None, _) => pieces.push(Piece::New(bytes.to_vec())),
            }
        }
        let patch = Self {
            pieces,
            len: new.len() as u64,
            hash: xxh3_64(new),
        };
        (patch, chunks)
    }

    /// The version this patch describes, from the earlier version `old`.
    pub fn apply(&self, old: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(usize::try_from(self.len).unwrap_or(0));
        for piece in &self.pieces {
            match piece {
                Piece::Copy { offset, len } => {
                    let (from, to) = (*offset as usize, *offset as usize + *len as usize);
                    let part = old.get(from..to).ok_or_else(|| {
                        format!(
                            "a patch copies bytes {from}..{to} of a base of {} bytes",
                            old.len()
                        )
                    })?;
                    out.extend_from_slice(part);
                }
                Piece::New(bytes) => out.extend_from_slice(bytes),
            }
        }
        if out.len() as u64 != self.len || xxh3_64(&out) != self.hash {
            return Err("a patch applied to another base than its own".into());
        }
        Ok(out)
    }

    /// Bytes the patch carries (not copied from the earlier version).
    pub fn carried(&self) -> usize {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::New(b) => b.len(),
                Piece::Copy { .. } => 0,
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
        (0..n).map(|_| rng.random()).collect()
    }

    #[test]
    fn a_patch_carries_what_changed_and_rebuilds_the_new_version() {
        let old = noise(1 << 20, 1);
        let base = Chunks::of(&old);
        // Unchanged: nothing carried.
        let (same, _) = Patch::diff(&base, &old);
        assert_eq!(same.carried(), 0);
        assert_eq!(same.apply(&old).unwrap(), old);
        // A few bytes changed in place, a block inserted near the front and one removed near
        // the end: each costs a few chunks, the rest is copied at its new offset.
        let mut new = old.clone();
        for i in [1_000usize, 300_000, 700_000] {
            new[i] ^= 0xff;
        }
        new.splice(50_000..50_000, noise(3_000, 2));
        new.drain(900_000..905_000);
        let (patch, next) = Patch::diff(&base, &new);
        assert_eq!(patch.apply(&old).unwrap(), new);
        assert!(
            patch.carried() < 3_000 + 6 * MAX_CHUNK,
            "{} bytes carried",
            patch.carried()
        );
        // The next patch is against the new version.
        let (again, _) = Patch::diff(&next, &new);
        assert_eq!(again.carried(), 0);
    }

    #[test]
    fn a_patch_applied_to_another_base_is_refused() {
        let old = noise(100_000, 3);
        let mut new = old.clone();
        new[50_000] ^= 1;
        let (patch, _) = Patch::diff(&Chunks::of(&old), &new);
        let other = noise(100_000, 4);
        assert!(patch.apply(&other).is_err());
        assert!(patch.apply(&old[..10]).is_err());
    }
}
