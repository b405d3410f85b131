//! `ctr-ingest`: how events get into Kafka.
//!
//! - [`sim`]: a seeded, deterministic simulated ad marketplace (pure; no I/O).
//! - [`producer`]: an idempotent, acks=all Kafka producer that tracks every delivery.
//! - [`simulate`]: the `ctr-ingest simulate` command: simulator → producer, with an optional
//!   record of what was emitted, for tests and for measuring calibration against the truth.

pub mod producer;
pub mod sim;
pub mod simulate;
