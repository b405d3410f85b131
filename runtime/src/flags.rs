//! Command-line flags every service shares, each with its environment variable (the flag
//! wins). A service flattens the ones it needs into its own settings (`#[command(flatten)]`).

use std::path::PathBuf;
use std::time::Duration;

use crate::policy::Policy;

/// The flags of a service that runs against Kafka and Redis: where they are, and how their
/// outages are treated.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceFlags {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub kafka: KafkaFlags,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub redis: RedisFlags,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub dependencies: DependencyFlags,
}

impl ServiceFlags {
    /// The checked settings.
    pub fn check(self) -> Result<Service, String> {
        if self.redis.redis_prefix.is_empty() {
            return Err("redis_prefix must not be empty".into());
        }
        Ok(Service {
            policy: self.dependencies.policy()?,
            brokers: self.kafka.brokers,
            redis_url: self.redis.redis_url,
            redis_ca_file: self.redis.redis_ca_file,
            redis_prefix: self.redis.redis_prefix,
        })
    }
}

/// Checked [`ServiceFlags`].
#[derive(Clone)]
pub struct Service {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// The Redis URL (it may carry a password: `Debug` shows only its host part).
    pub redis_url: String,
    /// The CA that signs the Redis server's certificate, for `rediss://`.
    pub redis_ca_file: Option<PathBuf>,
    /// Prefix of every Redis key.
    pub redis_prefix: String,
    /// Deadlines and the outage budget of Redis and the broker.
    pub policy: Policy,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Whatever stands before the last `@` is credentials.
        let redis = match self.redis_url.rsplit_once('@') {
            Some((scheme_and_user, host)) => {
                let scheme = scheme_and_user.split("://").next().unwrap_or("redis");
                format!("{scheme}://***@{host}")
            }
            None => self.redis_url.clone(),
        };
        f.debug_struct("Service")
            .field("brokers", &self.brokers)
            .field("redis_url", &redis)
            .field("redis_ca_file", &self.redis_ca_file)
            .field("redis_prefix", &self.redis_prefix)
            .field("policy", &self.policy)
            .finish()
    }
}

/// Where the broker is.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaFlags {
    /// Kafka bootstrap servers.
    #[arg(long, env = "CTR_KAFKA_BROKERS", default_value = "127.0.0.1:19092")]
    pub brokers: String,
}

/// Where Redis is, and the prefix of every key a deployment writes.
#[derive(Debug, Clone, clap::Args)]
pub struct RedisFlags {
    /// Redis URL: redis://[user:password@]host:port/ (an ACL user and its password, or just
    /// :password for AUTH), rediss:// for TLS.
    #[arg(
        long,
        env = "CTR_REDIS_URL",
        // The URL may carry a password (redis://user:password@host/): never print it.
        hide_env_values = true,
        default_value = "redis://127.0.0.1:16379/"
    )]
    pub redis_url: String,
    /// PEM file of the CA that signed the Redis server's certificate, for a `rediss://` URL
    /// (without it the system's trusted roots verify the server).
    #[arg(long, env = "CTR_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// Prefix of every Redis key (lets deployments share a Redis).
    #[arg(long, env = "CTR_REDIS_PREFIX", default_value = "ctr:")]
    pub redis_prefix: String,
}

/// How a service treats a dependency (Redis, the broker) that fails or hangs
/// ([`crate::policy`]).
#[derive(Debug, Clone, clap::Args)]
pub struct DependencyFlags {
    /// Deadline of one call to Redis or one request to the broker, ms: a call without an answer
    /// by then has failed.
    #[arg(long, env = "CTR_CALL_TIMEOUT_MS", default_value_t = 10_000)]
    pub call_timeout_ms: u64,
    /// Longest outage of Redis or the broker that is ridden out, ms: past it the service exits
    /// non-zero, for its supervisor to restart it (it resumes from its last checkpoint). Also
    /// the time the broker has to acknowledge a record.
    #[arg(long, env = "CTR_OUTAGE_BUDGET_MS", default_value_t = 60_000)]
    pub outage_budget_ms: u64,
}

impl DependencyFlags {
    /// The checked policy.
    pub fn policy(&self) -> Result<Policy, String> {
        if self.call_timeout_ms == 0 {
            return Err("call_timeout_ms must be positive".into());
        }
        if self.outage_budget_ms < self.call_timeout_ms {
            return Err(format!(
                "outage_budget_ms ({}) must be at least call_timeout_ms ({})",
                self.outage_budget_ms, self.call_timeout_ms
            ));
        }
        Ok(Policy {
            call_timeout: Duration::from_millis(self.call_timeout_ms),
            outage_budget: Duration::from_millis(self.outage_budget_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_redis_password() {
        let flags = ServiceFlags {
            kafka: KafkaFlags {
                brokers: "b:9092".into(),
            },
            redis: RedisFlags {
                redis_url: "rediss://scorer:s3cret@redis.internal:6380/".into(),
                redis_ca_file: None,
                redis_prefix: "ctr:".into(),
            },
            dependencies: DependencyFlags {
                call_timeout_ms: 1_000,
                outage_budget_ms: 5_000,
            },
        };
        let shown = format!("{:?}", flags.clone().check().unwrap());
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("rediss://***@redis.internal:6380/"),
            "{shown}"
        );
        let mut empty = flags;
        empty.redis.redis_prefix.clear();
        assert!(empty.check().is_err());
    }
}
