//! A byte string as a patch on an earlier version of it, for the parts of a checkpoint whose
//! size the settings bound (metrics, filters) but whose bytes change a little everywhere: an
//! incremental checkpoint carries the bytes that changed, not the whole.
//!
//! Both versions are cut into content-defined chunks (FastCDC, the `fastcdc` crate): a cut
//! falls where the bytes around it say, not at a fixed offset, so an insertion or a removal
//! (a new metric slice, a window bucket dropped at the front) moves the cuts near it only, and
//! every chunk after it is found again at its new offset. A patch copies the chunks the old
//! version has (found by their XXH3 hash, and compared). Between two copied chunks, a stretch
//! as long as the old version's stretch between the same two chunks changed in place (a
//! counter incremented, a histogram bin moved): the patch carries only its bytes that differ.
//! Any other stretch is carried whole.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// Chunk sizes: small enough that an insertion costs a few hundred bytes around it, large
/// enough that the index of a few megabytes stays some ten thousand entries.
const MIN_CHUNK: usize = 64;
const AVG_CHUNK: usize = 256;
const MAX_CHUNK: usize = 2048;

/// Equal bytes shorter than this between two changed ones are carried rather than skipped:
/// each skip costs a few bytes of its own.
const MIN_SKIP: usize = 8;

/// A version of the bytes, with its chunks by hash: what a patch against it may copy.
#[derive(Debug, Clone, Default)]
pub struct Version {
    bytes: Vec<u8>,
    at: HashMap<u64, (u32, u32), foldhash::fast::FixedState>,
}

impl Version {
    /// `bytes`, cut into chunks.
    pub fn of(bytes: Vec<u8>) -> Self {
        let mut at = HashMap::default();
        for (offset, len) in cuts(&bytes) {
            at.entry(xxh3_64(&bytes[offset..offset + len]))
                .or_insert((offset as u32, len as u32));
        }
        Self { bytes, at }
    }

    /// Where the old version holds `chunk`: at `expected` if it is there (a run of equal chunks
    /// is matched in order), else wherever the index says.
    fn find(&self, chunk: &[u8], hash: u64, expected: usize) -> Option<usize> {
        if self.bytes.get(expected..expected + chunk.len()) == Some(chunk) {
            return Some(expected);
        }
        let &(offset, len) = self.at.get(&hash)?;
        let offset = offset as usize;
        (len as usize == chunk.len() && self.bytes[offset..offset + chunk.len()] == *chunk)
            .then_some(offset)
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
    /// `len` bytes of the earlier version from `offset`, with `edits` (position in the
    /// stretch, the bytes there now) written over them.
    Edit {
        offset: u32,
        len: u32,
        edits: Vec<(u32, Vec<u8>)>,
    },
    /// Bytes the earlier version does not have.
    New(Vec<u8>),
}

impl Patch {
    /// `new` as a patch on `old`, and `new` as the next patch's base. Versions are at most
    /// 4 GiB (offsets are 32-bit).
    pub fn diff(old: &Version, new: Vec<u8>) -> (Self, Version) {
        let mut pieces: Vec<Piece> = Vec::new();
        // The end of the last chunk copied, in each version.
        let (mut old_end, mut new_end) = (0usize, 0usize);
        for (offset, len) in cuts(&new) {
            let chunk = &new[offset..offset + len];
            let hash = xxh3_64(chunk);
            // Where it is if everything since the last copied chunk changed in place.
            let expected = old_end + (offset - new_end);
            let Some(at) = old.find(chunk, hash, expected) else {
                continue;
            };
            let was = (at >= old_end).then(|| &old.bytes[old_end..at]);
            stretch(&mut pieces, old_end, was, &new[new_end..offset]);
            match pieces.last_mut() {
                Some(Piece::Copy { offset, len: l }) if (*offset + *l) as usize == at => {
                    *l += len as u32;
                }
                _ => pieces.push(Piece::Copy {
                    offset: at as u32,
                    len: len as u32,
                }),
            }
            (old_end, new_end) = (at + len, offset + len);
        }
        stretch(
            &mut pieces,
            old_end,
            Some(&old.bytes[old_end..]),
            &new[new_end..],
        );
        let patch = Self {
            pieces,
            len: new.len() as u64,
            hash: xxh3_64(&new),
        };
        (patch, Version::of(new))
    }

    /// The version this patch describes, from the earlier version `old`.
    pub fn apply(&self, old: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(usize::try_from(self.len).unwrap_or(0));
        let range = |offset: u32, len: u32| {
            let (from, to) = (offset as usize, offset as usize + len as usize);
            old.get(from..to).ok_or_else(|| {
                format!(
                    "a patch copies bytes {from}..{to} of a base of {} bytes",
                    old.len()
                )
            })
        };
        for piece in &self.pieces {
            match piece {
                Piece::Copy { offset, len } => out.extend_from_slice(range(*offset, *len)?),
                Piece::Edit { offset, len, edits } => {
                    let start = out.len();
                    out.extend_from_slice(range(*offset, *len)?);
                    for (at, bytes) in edits {
                        let at = start + *at as usize;
                        out.get_mut(at..at + bytes.len())
                            .ok_or("a patch edits past its stretch")?
                            .copy_from_slice(bytes);
                    }
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
                Piece::Edit { edits, .. } => edits.iter().map(|(_, b)| b.len()).sum(),
                Piece::Copy { .. } => 0,
            })
            .sum()
    }
}

/// Adds the pieces that make `new` where `was` (the old version's bytes from `offset`) stood:
/// nothing if `new` is empty, the bytes that differ if they are as long, else `new` whole.
fn stretch(pieces: &mut Vec<Piece>, offset: usize, was: Option<&[u8]>, new: &[u8]) {
    if new.is_empty() {
        return;
    }
    let Some(was) = was.filter(|w| w.len() == new.len()) else {
        pieces.push(Piece::New(new.to_vec()));
        return;
    };
    let mut edits: Vec<(u32, Vec<u8>)> = Vec::new();
    let mut i = 0;
    while i < new.len() {
        if was[i] == new[i] {
            i += 1;
            continue;
        }
        // A run of changed bytes, extended over short equal gaps.
        let start = i;
        let mut end = i + 1;
        let mut j = end;
        while j < new.len() && j - end < MIN_SKIP {
            if was[j] != new[j] {
                end = j + 1;
            }
            j += 1;
        }
        edits.push((start as u32, new[start..end].to_vec()));
        i = end;
    }
    pieces.push(Piece::Edit {
        offset: offset as u32,
        len: new.len() as u32,
        edits,
    });
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
        let base = Version::of(old.clone());
        // Unchanged: nothing carried.
        let (same, _) = Patch::diff(&base, old.clone());
        assert_eq!(same.carried(), 0);
        assert_eq!(same.apply(&old).unwrap(), old);
        // A few bytes changed in place: about those bytes are carried.
        let mut new = old.clone();
        for i in [1_000usize, 300_000, 300_003, 700_000] {
            new[i] ^= 0xff;
        }
        let (patch, _) = Patch::diff(&base, new.clone());
        assert_eq!(patch.apply(&old).unwrap(), new);
        assert!(patch.carried() <= 8, "{} bytes carried", patch.carried());
        // A block inserted near the front and one removed near the end: each costs a few
        // chunks, the rest is copied at its new offset.
        new.splice(50_000..50_000, noise(3_000, 2));
        new.drain(900_000..905_000);
        let (patch, next) = Patch::diff(&base, new.clone());
        assert_eq!(patch.apply(&old).unwrap(), new);
        assert!(
            patch.carried() < 3_000 + 4 * MAX_CHUNK,
            "{} bytes carried",
            patch.carried()
        );
        // The next patch is against the new version.
        let (again, _) = Patch::diff(&next, new);
        assert_eq!(again.carried(), 0);
    }

    #[test]
    fn a_patch_of_mostly_equal_chunks_matches_them_in_order() {
        // Long runs of zeros (empty histogram bins) cut into equal chunks, with a few counts.
        let mut old = vec![0u8; 200_000];
        old[10_000] = 1;
        let mut new = old.clone();
        new[150_000] = 7;
        let (patch, _) = Patch::diff(&Version::of(old.clone()), new.clone());
        assert_eq!(patch.apply(&old).unwrap(), new);
        assert!(patch.carried() <= 1, "{} bytes carried", patch.carried());
    }

    #[test]
    fn a_patch_applied_to_another_base_is_refused() {
        let old = noise(100_000, 3);
        let mut new = old.clone();
        new[50_000] ^= 1;
        let (patch, _) = Patch::diff(&Version::of(old.clone()), new);
        let other = noise(100_000, 4);
        assert!(patch.apply(&other).is_err());
        assert!(patch.apply(&old[..10]).is_err());
    }
}
