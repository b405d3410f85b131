//! `ctr-runtime`: running a service against Kafka and Redis. One purpose, every service uses
//! it, and it knows no domain type (no event, no model, no key layout: those are the
//! contracts in `ctr-schemas` and the services' own logic).
//!
//! - [`policy`]: one policy for a dependency that fails or hangs (deadlines, an outage
//!   budget, then a non-zero exit).
//! - [`redis`]: the connection (ACL, TLS, checked at start) and the fenced checkpoint store.
//! - [`kafka`]: common client settings, the consumer-group context with its rebalance queue
//!   and broker watch, and the tracked producer.
//! - [`process`]: logs, the shutdown signal, the supervisor of long-lived tasks, and the
//!   liveness `/healthz` reports.
//! - [`flags`]: the command-line flags every service shares.
//! - [`http`]: timing an HTTP route's every answer (refusals and load-shed `503`s included).

pub mod flags;
pub mod http;
pub mod kafka;
pub mod policy;
pub mod process;
pub mod redis;

pub use policy::{DependencyError, Policy};
pub use process::{Heartbeat, Liveness, Supervisor, TaskFailed};

/// The wall clock, Unix ms (ages, freshness, the time a checkpoint was written; never part of
/// a model's or a join's state, which run on event time).
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
