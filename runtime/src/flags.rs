//! Command-line flags every service shares, each with its environment variable (the flag
//! wins). A service flattens the ones it needs into its own settings (`#[command(flatten)]`).

use std::path::PathBuf;
use std::time::Duration;

use crate::kafka::{KafkaConnection, SaslCredentials, SecurityProtocol};
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
        if self.redis.redis_prefix.contains(['{', '}']) {
            // The key layout's hash tags would be the prefix's: every key in one cluster slot.
            return Err("redis_prefix must not contain '{' or '}'".into());
        }
        Ok(Service {
            policy: self.dependencies.policy()?,
            kafka: self.kafka.check()?,
            redis_url: self.redis.redis_url,
            redis_cluster: self.redis.redis_cluster,
            redis_ca_file: self.redis.redis_ca_file,
            redis_prefix: self.redis.redis_prefix,
        })
    }
}

/// Checked [`ServiceFlags`].
#[derive(Clone)]
pub struct Service {
    /// The brokers and how to reach them.
    pub kafka: KafkaConnection,
    /// The Redis URL (it may carry a password: `Debug` shows only its host part); with
    /// `redis_cluster`, one or more nodes' URLs, comma-separated.
    pub redis_url: String,
    /// Whether the URL names nodes of a Redis Cluster.
    pub redis_cluster: bool,
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
            .field("kafka", &self.kafka)
            .field("redis_url", &redis)
            .field("redis_cluster", &self.redis_cluster)
            .field("redis_ca_file", &self.redis_ca_file)
            .field("redis_prefix", &self.redis_prefix)
            .field("policy", &self.policy)
            .finish()
    }
}

/// Where the brokers are, and how a client reaches them.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaFlags {
    /// Kafka bootstrap servers.
    #[arg(long, env = "CTR_KAFKA_BROKERS", default_value = "127.0.0.1:19092")]
    pub brokers: String,
    /// Security of the connection to the brokers: TLS (`ssl`), SASL authentication
    /// (`sasl_plaintext`), both (`sasl_ssl`), or neither (a closed network only).
    #[arg(
        long,
        env = "CTR_KAFKA_SECURITY_PROTOCOL",
        value_enum,
        default_value = "plaintext"
    )]
    pub kafka_security_protocol: SecurityProtocol,
    /// PEM file of the CA that signed the brokers' certificates (`ssl`, `sasl_ssl`); without it
    /// the system's trusted roots verify them.
    #[arg(long, env = "CTR_KAFKA_CA_FILE")]
    pub kafka_ca_file: Option<PathBuf>,
    /// SASL mechanism (`sasl_*`): SCRAM-SHA-256, SCRAM-SHA-512 or PLAIN.
    #[arg(
        long,
        env = "CTR_KAFKA_SASL_MECHANISM",
        default_value = "SCRAM-SHA-256"
    )]
    pub kafka_sasl_mechanism: String,
    /// SASL user (`sasl_*`).
    #[arg(long, env = "CTR_KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,
    /// SASL password (`sasl_*`). Prefer the environment variable: a command line is visible to
    /// every user of the machine.
    #[arg(long, env = "CTR_KAFKA_SASL_PASSWORD", hide_env_values = true)]
    pub kafka_sasl_password: Option<String>,
}

impl KafkaFlags {
    /// The checked connection: credentials exactly when the protocol authenticates, a CA file
    /// only with TLS, a mechanism librdkafka knows.
    pub fn check(self) -> Result<KafkaConnection, String> {
        let protocol = self.kafka_security_protocol;
        if self.brokers.trim().is_empty() {
            return Err("brokers must not be empty".into());
        }
        if self.kafka_ca_file.is_some() && !protocol.tls() {
            return Err(format!(
                "kafka_ca_file is for TLS: give --kafka-security-protocol ssl or sasl_ssl, not {protocol:?}"
            ));
        }
        let (username, password) = (self.kafka_sasl_username, self.kafka_sasl_password);
        let sasl = if protocol.sasl() {
            let (Some(username), Some(password)) = (username, password) else {
                return Err(format!(
                    "{protocol:?} needs both --kafka-sasl-username and --kafka-sasl-password"
                ));
            };
            const MECHANISMS: [&str; 3] = ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"];
            if !MECHANISMS.contains(&self.kafka_sasl_mechanism.as_str()) {
                return Err(format!(
                    "kafka_sasl_mechanism must be one of {MECHANISMS:?}, not {:?}",
                    self.kafka_sasl_mechanism
                ));
            }
            Some(SaslCredentials {
                mechanism: self.kafka_sasl_mechanism,
                username,
                password,
            })
        } else if username.is_some() || password.is_some() {
            // They would be silently unused.
            return Err(format!(
                "SASL credentials given, but --kafka-security-protocol is {protocol:?}: use sasl_ssl (or sasl_plaintext)"
            ));
        } else {
            None
        };
        Ok(KafkaConnection {
            brokers: self.brokers,
            protocol,
            ca_file: self.kafka_ca_file,
            sasl,
        })
    }
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
    /// The URL names nodes of a Redis Cluster (one or more, comma-separated: the others are
    /// found from them). Keys that are written or read together share a hash tag
    /// (ARCHITECTURE.md, "Redis key layout").
    /// `CTR_REDIS_CLUSTER`: `1`/`true` for a cluster; `0`, `false`, `no`, `off` or empty not.
    #[arg(long, env = "CTR_REDIS_CLUSTER", value_parser = clap::builder::FalseyValueParser::new())]
    pub redis_cluster: bool,
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
                kafka_security_protocol: SecurityProtocol::SaslSsl,
                kafka_ca_file: None,
                kafka_sasl_mechanism: "SCRAM-SHA-256".into(),
                kafka_sasl_username: Some("ctr".into()),
                kafka_sasl_password: Some("k4fka-s3cret".into()),
            },
            redis: RedisFlags {
                redis_url: "rediss://scorer:s3cret@redis.internal:6380/".into(),
                redis_cluster: false,
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
        assert!(shown.contains("username: \"ctr\""), "{shown}");
        assert!(
            shown.contains("rediss://***@redis.internal:6380/"),
            "{shown}"
        );
        let mut empty = flags;
        empty.redis.redis_prefix.clear();
        assert!(empty.check().is_err());
    }

    fn kafka(protocol: SecurityProtocol, user: Option<&str>, password: Option<&str>) -> KafkaFlags {
        KafkaFlags {
            brokers: "b:9092".into(),
            kafka_security_protocol: protocol,
            kafka_ca_file: None,
            kafka_sasl_mechanism: "SCRAM-SHA-256".into(),
            kafka_sasl_username: user.map(Into::into),
            kafka_sasl_password: password.map(Into::into),
        }
    }

    #[test]
    fn kafka_security_settings_must_agree() {
        use SecurityProtocol::*;
        assert!(kafka(Plaintext, None, None).check().is_ok());
        assert!(kafka(SaslSsl, Some("u"), Some("p")).check().is_ok());
        // Credentials without a SASL protocol would be silently unused.
        let e = kafka(Plaintext, Some("u"), Some("p")).check().unwrap_err();
        assert!(e.contains("sasl_ssl"), "{e}");
        let e = kafka(SaslSsl, Some("u"), None).check().unwrap_err();
        assert!(e.contains("--kafka-sasl-password"), "{e}");
        let mut ca = kafka(Plaintext, None, None);
        ca.kafka_ca_file = Some("ca.pem".into());
        assert!(ca.check().unwrap_err().contains("TLS"));
        let mut mech = kafka(SaslSsl, Some("u"), Some("p"));
        mech.kafka_sasl_mechanism = "GSSAPI".into();
        assert!(mech.check().unwrap_err().contains("SCRAM-SHA-256"));
    }

    /// Parses a service's flags from `args` (and the environment, as a service does).
    fn parse(args: &[&str]) -> Result<Service, String> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            service: ServiceFlags,
        }
        let cli = <Cli as clap::Parser>::try_parse_from(
            std::iter::once("svc").chain(args.iter().copied()),
        )
        .map_err(|e| e.to_string())?;
        cli.service.check()
    }

    #[test]
    fn redis_cluster_is_a_flag_and_the_prefix_may_not_hold_a_hash_tag() {
        assert!(parse(&["--redis-cluster"]).unwrap().redis_cluster);
        // Braces in the prefix would be every key's hash tag: one cluster slot for everything.
        let e = parse(&["--redis-prefix={ctr}:"]).unwrap_err();
        assert!(e.contains("'{'"), "{e}");
    }
}
