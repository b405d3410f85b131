//! The event contract of the CTR pipeline.
//!
//! The Avro files in `schemas/avro/` are the source of truth; this crate holds the matching Rust
//! types ([`events`]), the Confluent wire framing with an in-code schema registry ([`wire`]), and
//! the 64-bit ID generator every producer uses ([`id`]), and the partitioner every producer uses
//! ([`partition`]), and the other contracts between services: header names, dead-letter
//! headers, the joiner's signal and the Redis key layout ([`contract`]). It depends on nothing
//! else in the workspace and does no I/O, so any service, test or backtest can use it.

pub mod contract;
pub mod events;
pub mod id;
pub mod partition;
pub mod wire;

pub use events::{
    AdShown, Click, Context, LabelKind, LabeledImpression, LabeledImpressionRef, Serve,
    ValidationError,
};
pub use id::{IdGenerator, IdParts};
pub use wire::{
    DecodeError, EncodeError, Encoder, EventKind, Unusable, Validate, WireEvent, decode,
    decode_valid,
};
