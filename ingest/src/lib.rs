//! `ctr-ingest`: how events get into Kafka.
//!
//! - [`json`]: the JSON form of serves and clicks (parse, assign IDs, validate, encode; pure).
//! - [`adapter`]: `ctr-ingest http`, the HTTP/JSON adapter for producers in any language.
//! - [`sim`]: a seeded, deterministic simulated ad marketplace (pure; no I/O).
//! - [`producer`]: an idempotent, acks=all Kafka producer that tracks every delivery.
//! - [`simulate`]: the `ctr-ingest simulate` command: simulator → producer, with an optional
//!   record of what was emitted, for tests and for measuring calibration against the truth.

pub mod adapter;
pub mod json;
pub mod producer;
pub mod replay;
pub mod sim;
pub mod simulate;

/// The wall clock in Unix milliseconds: the time the adapter stamps on events sent without one,
/// and the start of a retimed replay or a live simulation.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
