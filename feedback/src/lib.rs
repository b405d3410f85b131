//! `ctr-feedback`: the impression–click joiner.
//!
//! [`join`] is the pure state machine (no I/O; a backtest may use it directly); [`service`]
//! runs it against Kafka: it consumes the serves and clicks topics, keeps one join per
//! partition pair, and produces labeled impressions keyed by ad.

pub mod join;
pub mod service;
