//! The versioned binary snapshot format.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "CTRM"
//! 4       2     format version, little-endian u16 (this build writes 2 and reads 1 and 2)
//! 6       8     body length in bytes, little-endian u64
//! 14      8     XXH3-64 of the body, little-endian u64
//! 22      n     body: the state in postcard encoding (serde data model; f64 as its 8 IEEE
//!               bytes, so a restore is bit-exact)
//! ```
//!
//! A snapshot of another format version is refused with [`SnapshotError::UnsupportedVersion`]
//! naming both versions; when the format changes, the reader of the old version stays and
//! converts (the version field exists for that). Truncation and bit rot are caught by the length
//! and the checksum before anything is decoded.

use serde::Serialize;
use serde::de::DeserializeOwned;
use xxhash_rust::xxh3::xxh3_64;

/// The first four bytes of every snapshot.
pub const MAGIC: [u8; 4] = *b"CTRM";
/// The format version of [`crate::ModelSet`] snapshots this build writes. 2 added each
/// variant's [`crate::variants::Offset`] and counts prior strengths in pseudo-clicks; 1 is read
/// by [`crate::variants::legacy::ModelSetV1`].
pub const FORMAT_VERSION: u16 = 2;
const HEADER: usize = 22;

/// Why bytes are not a usable snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// Fewer bytes than the header.
    #[error("snapshot is {0} bytes, shorter than its 22-byte header")]
    TooShort(usize),
    /// The first bytes are not [`MAGIC`].
    #[error("not a model snapshot (magic bytes {0:02x?}, expected \"CTRM\")")]
    BadMagic([u8; 4]),
    /// A format version this build does not read.
    #[error(
        "snapshot format version {found} is not supported by this build (it reads version {supported})"
    )]
    UnsupportedVersion {
        /// The snapshot's version.
        found: u16,
        /// The version this build reads.
        supported: u16,
    },
    /// A body shorter or longer than the header says.
    #[error("snapshot body is {found} bytes, header says {expected}: truncated or padded")]
    Length {
        /// Bytes the header announces.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// The body does not match its checksum.
    #[error("snapshot checksum mismatch: the body is corrupt")]
    Checksum,
    /// The body does not decode as the expected state.
    #[error("snapshot body does not decode: {0}")]
    Body(String),
}

/// Encodes `state` into a snapshot.
pub fn encode<T: Serialize>(state: &T) -> Vec<u8> {
    encode_version(state, FORMAT_VERSION)
}

/// `state` encoded as a snapshot's body, without the container: for a caller that frames it
/// itself (an incremental checkpoint diffs it against an earlier body).
pub fn encode_body<T: Serialize>(state: &T) -> Vec<u8> {
    postcard::to_allocvec(state).expect("model state always serializes")
}

/// Encodes `state` into a snapshot marked with `version`: the format version of the body's
/// type, for a state kept by another crate in this container (each type numbers its own
/// formats; [`FORMAT_VERSION`] is that of [`crate::ModelSet`]).
pub fn encode_version<T: Serialize>(state: &T, version: u16) -> Vec<u8> {
    frame(&encode_body(state), version)
}

/// A body from [`encode_body`] in the container, marked with `version`.
pub fn frame(body: &[u8], version: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&xxh3_64(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Decodes a snapshot written by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, SnapshotError> {
    match open(bytes)? {
        (FORMAT_VERSION, body) => decode_body(body),
        (found, _) => Err(SnapshotError::UnsupportedVersion {
            found,
            supported: FORMAT_VERSION,
        }),
    }
}

/// Checks a snapshot's header, length and checksum; returns its format version and body, for
/// [`decode_body`] with the type of that version.
pub fn open(bytes: &[u8]) -> Result<(u16, &[u8]), SnapshotError> {
    if bytes.len() < HEADER {
        return Err(SnapshotError::TooShort(bytes.len()));
    }
    let magic: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(SnapshotError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    let expected = u64::from_le_bytes(bytes[6..14].try_into().expect("8 bytes"));
    let body = &bytes[HEADER..];
    if body.len() as u64 != expected {
        return Err(SnapshotError::Length {
            expected,
            found: body.len() as u64,
        });
    }
    if xxh3_64(body) != u64::from_le_bytes(bytes[14..22].try_into().expect("8 bytes")) {
        return Err(SnapshotError::Checksum);
    }
    Ok((version, body))
}

/// Decodes a body returned by [`open`].
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, SnapshotError> {
    postcard::from_bytes(body).map_err(|e| SnapshotError::Body(e.to_string()))
}
