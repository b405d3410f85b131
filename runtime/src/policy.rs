//! One policy for a dependency (Redis, the broker) that fails or hangs, the same in every
//! service.
//!
//! - Every call has a deadline ([`Policy::call_timeout`]): a frozen server (SIGSTOP, a stalled
//!   disk, a partition that drops packets) is a timed-out call, not a wait without end.
//! - A transient failure (a timeout, a dropped or refused connection, a server that is loading
//!   or failing over) is retried with exponential backoff (50 ms doubling to 2 s) for as long
//!   as the outage has lasted less than [`Policy::outage_budget`]: an outage shorter than the
//!   budget is ridden out, and the service catches up by itself.
//! - An outage longer than the budget is an error ([`DependencyError::Exhausted`]) that ends the
//!   process non-zero, so that its supervisor (systemd, Kubernetes) restarts it: a service is
//!   never alive and idle. The work behind the call is not lost: it restarts from its last
//!   checkpoint.
//! - A permanent failure (a wrong type at a key, a refused script, missing permissions) is
//!   returned at once ([`DependencyError::Failed`]): waiting would not change it.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// Deadlines of calls to a dependency and how long an outage is ridden out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Longest one call may take before it counts as failed.
    pub call_timeout: Duration,
    /// Longest an outage (consecutive failed calls) is retried before the process gives up.
    pub outage_budget: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(10),
            outage_budget: Duration::from_secs(60),
        }
    }
}

/// Whether a failure may pass by itself (worth retrying) or is permanent.
pub trait Transient {
    /// `true` for a failure that waiting may cure (timeouts, lost connections, a server
    /// loading its data or failing over).
    fn is_transient(&self) -> bool;
}

impl Transient for redis::RedisError {
    fn is_transient(&self) -> bool {
        use redis::RetryMethod;
        self.is_timeout()
            || self.is_io_error()
            || self.is_connection_dropped()
            || self.is_connection_refusal()
            || matches!(
                self.retry_method(),
                RetryMethod::Reconnect
                    | RetryMethod::RetryImmediately
                    | RetryMethod::WaitAndRetry
                    | RetryMethod::ReconnectFromInitialConnections
            )
    }
}

impl Transient for rdkafka::error::KafkaError {
    fn is_transient(&self) -> bool {
        use rdkafka::types::RDKafkaErrorCode as Code;
        // A broker that is down, restarting, electing a leader or loading a coordinator.
        matches!(
            self.rdkafka_error_code(),
            Some(
                Code::BrokerTransportFailure
                    | Code::AllBrokersDown
                    | Code::Resolve
                    | Code::OperationTimedOut
                    | Code::RequestTimedOut
                    | Code::NetworkException
                    | Code::LeaderNotAvailable
                    | Code::NotLeaderForPartition
                    | Code::BrokerNotAvailable
                    | Code::CoordinatorLoadInProgress
                    | Code::CoordinatorNotAvailable
                    | Code::NotCoordinator
            )
        )
    }
}

/// Why a call to a dependency did not succeed under the [`Policy`].
#[derive(Debug, thiserror::Error)]
pub enum DependencyError<E> {
    /// A permanent failure, returned at once.
    #[error("{0}")]
    Failed(E),
    /// The dependency kept failing (or not answering) for longer than the outage budget.
    #[error(
        "{what}: the dependency kept failing for {elapsed:?} (outage budget {budget:?}); last error: {last}"
    )]
    Exhausted {
        /// What was being done (`"checkpoint save of partition 3"`).
        what: String,
        /// How long the outage had lasted when the budget ran out.
        elapsed: Duration,
        /// The budget in force.
        budget: Duration,
        /// The last failure, as text.
        last: String,
    },
}

impl<E> DependencyError<E> {
    /// Maps the permanent error, keeping an exhausted budget as it is.
    pub fn map_failed<F>(self, f: impl FnOnce(E) -> F) -> DependencyError<F> {
        match self {
            Self::Failed(e) => DependencyError::Failed(f(e)),
            Self::Exhausted {
                what,
                elapsed,
                budget,
                last,
            } => DependencyError::Exhausted {
                what,
                elapsed,
                budget,
                last,
            },
        }
    }
}

impl Policy {
    /// The longest a work loop's step may take under the policy: one call that waits out an
    /// outage for the whole budget, plus that call's own deadline. A loop that has not stepped
    /// for longer is wedged (what `/healthz` reports).
    pub fn longest_step(&self) -> Duration {
        self.outage_budget + self.call_timeout
    }

    /// How long a stopping process may drain (a last publish or checkpoint that may itself
    /// meet an outage): the longest step plus one more call.
    pub fn drain_time(&self) -> Duration {
        self.longest_step() + self.call_timeout
    }

    /// Runs `op` under the policy: each attempt within [`Policy::call_timeout`], transient
    /// failures retried with backoff until the outage has lasted [`Policy::outage_budget`].
    /// `op` must be safe to repeat (an idempotent write, a read).
    pub async fn retry<T, E, F, Fut>(&self, what: &str, mut op: F) -> Result<T, DependencyError<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Transient + Display,
    {
        let mut outage: Option<Instant> = None;
        let mut backoff = Duration::from_millis(50);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            // An outage starts when its first failed attempt started, not when it ended: a call
            // that hung for its whole deadline already counts that long.
            let attempt_started = Instant::now();
            let last = match tokio::time::timeout(self.call_timeout, op()).await {
                Ok(Ok(value)) => {
                    if let Some(started) = outage {
                        info!(what, attempts = attempt, elapsed = ?started.elapsed(), "dependency answers again");
                    }
                    return Ok(value);
                }
                Ok(Err(e)) if !e.is_transient() => return Err(DependencyError::Failed(e)),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {:?}", self.call_timeout),
            };
            let started = *outage.get_or_insert(attempt_started);
            let elapsed = started.elapsed();
            if elapsed + backoff > self.outage_budget {
                return Err(DependencyError::Exhausted {
                    what: what.to_string(),
                    elapsed,
                    budget: self.outage_budget,
                    last,
                });
            }
            warn!(what, attempt, error = %last, retry_in = ?backoff, "dependency failed; retrying");
            metrics::counter!("ctr_dependency_retries_total").increment(1);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug)]
    struct Fault(bool);
    impl Display for Fault {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "fault (transient: {})", self.0)
        }
    }
    impl Transient for Fault {
        fn is_transient(&self) -> bool {
            self.0
        }
    }

    fn policy(budget_ms: u64) -> Policy {
        Policy {
            call_timeout: Duration::from_millis(100),
            outage_budget: Duration::from_millis(budget_ms),
        }
    }

    // Real time, short durations: the tests take about a second in all.
    #[tokio::test]
    async fn a_short_outage_is_ridden_out() {
        let calls = AtomicU32::new(0);
        let got = policy(5_000)
            .retry("read", || async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0..3 => Err(Fault(true)),
                    _ => Ok(7),
                }
            })
            .await;
        assert_eq!(got.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_permanent_failure_is_returned_at_once() {
        let calls = AtomicU32::new(0);
        let got: Result<(), _> = policy(5_000)
            .retry("read", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Fault(false))
            })
            .await;
        assert!(matches!(got, Err(DependencyError::Failed(Fault(false)))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_hung_dependency_exhausts_the_budget_within_it() {
        let started = tokio::time::Instant::now();
        let got: Result<(), DependencyError<Fault>> =
            policy(300).retry("read", std::future::pending).await;
        let DependencyError::Exhausted { elapsed, last, .. } = got.unwrap_err() else {
            panic!("expected an exhausted budget");
        };
        assert!(last.starts_with("no answer"), "{last}");
        assert!(elapsed <= Duration::from_millis(300), "{elapsed:?}");
        // Never much longer than the budget plus one call's deadline (the machine may be busy).
        assert!(
            started.elapsed() < Duration::from_millis(1_000),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn an_outage_longer_than_the_budget_is_an_error() {
        let got: Result<(), DependencyError<Fault>> = policy(200)
            .retry("write", || async { Err(Fault(true)) })
            .await;
        let e = got.unwrap_err();
        assert!(matches!(e, DependencyError::Exhausted { .. }));
        assert!(
            e.to_string().contains("write: the dependency kept failing"),
            "{e}"
        );
    }
}
