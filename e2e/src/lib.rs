//! Harness for the end-to-end tests: find the stack the project's scripts started, make
//! isolated topics and Redis prefixes per test, run the real service binaries as child
//! processes, and read back what they wrote.
//!
//! The stack comes from `scripts/stack up`; `scripts/test` exports its addresses
//! (`CTR_KAFKA_BROKERS`, `CTR_REDIS_URL`). The binaries come from the same target directory as
//! the test (`scripts/test` builds them first).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ctr_schemas::{Context, Encoder, LabelKind, LabeledImpression};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

mod hosts;
pub use hosts::{NetHost, ports_of};

/// The wall clock in Unix ms.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The broker the stack started (`CTR_KAFKA_BROKERS`), or its default address.
pub fn brokers() -> String {
    std::env::var("CTR_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// The stack's Redis (`CTR_REDIS_URL`), or its default address.
pub fn redis_url() -> String {
    std::env::var("CTR_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:16379/".into())
}

/// A name no other test run uses: topics, groups and Redis prefixes are per test.
pub fn unique(tag: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "t{}-{}-{tag}",
        std::process::id(),
        nanos % 1_000_000_000_000
    )
}

/// Creates topics on the broker, failing the test with a hint when no broker answers.
pub fn create_topics(topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> = kafka_client().create().expect("admin client");
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(n, p)| NewTopic::new(n, *p, TopicReplication::Fixed(kafka_nodes())))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results =
        futures::executor::block_on(admin.create_topics(&new, &opts)).unwrap_or_else(|e| {
            panic!(
                "cannot reach the broker at {} ({e}); run `scripts/stack up`",
                brokers()
            )
        });
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
}

/// Whether the stack's Redis is a cluster (`CTR_REDIS_CLUSTER`, as `scripts/stack env` sets
/// it for `CTR_REDIS_MODE=cluster`): the services are started with `--redis-cluster`.
pub fn redis_cluster() -> bool {
    // As the services read it (clap's `FalseyValueParser`).
    std::env::var("CTR_REDIS_CLUSTER").is_ok_and(|v| {
        !matches!(
            v.to_ascii_lowercase().as_str(),
            "" | "0" | "n" | "no" | "f" | "false" | "off"
        )
    })
}

/// A test's connection to the stack's Redis: one server, or a cluster (commands routed by
/// their keys' slot; `KEYS` asks every master).
#[allow(missing_debug_implementations)] // redis-rs's cluster connection has no Debug
pub enum TestRedis {
    /// A single Redis.
    Single(redis::Connection),
    /// A Redis Cluster.
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl redis::ConnectionLike for TestRedis {
    fn req_packed_command(&mut self, cmd: &[u8]) -> redis::RedisResult<redis::Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> redis::RedisResult<Vec<redis::Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn req_command(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<redis::Value> {
        match self {
            Self::Single(c) => c.req_command(cmd),
            Self::Cluster(c) => c.req_command(cmd),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }

    fn supports_pipelining(&self) -> bool {
        match self {
            Self::Single(c) => c.supports_pipelining(),
            Self::Cluster(c) => c.supports_pipelining(),
        }
    }

    fn check_connection(&mut self) -> bool {
        match self {
            Self::Single(c) => c.check_connection(),
            Self::Cluster(c) => c.check_connection(),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            Self::Single(c) => c.is_open(),
            Self::Cluster(c) => c.is_open(),
        }
    }
}

/// A connection to the Redis at `url` (a cluster's nodes, comma-separated, when
/// [`redis_cluster`]).
pub fn redis_at(url: &str) -> redis::RedisResult<TestRedis> {
    if redis_cluster() {
        redis::cluster::ClusterClient::new(url.split(',').collect::<Vec<_>>())?
            .get_connection()
            .map(|c| TestRedis::Cluster(Box::new(c)))
    } else {
        redis::Client::open(url)?
            .get_connection()
            .map(TestRedis::Single)
    }
}

/// A connection to the stack's Redis.
pub fn redis() -> TestRedis {
    redis_at(&redis_url()).unwrap_or_else(|e| {
        panic!(
            "cannot reach Redis at {} ({e}); run `scripts/stack up`",
            redis_url()
        )
    })
}

/// Path of a workspace binary, built into the same target directory as this test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// A free loopback port (bound and released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A service process that is killed when dropped, with its output kept for failure reports.
#[derive(Debug)]
pub struct Service {
    /// The name its output is labeled with.
    pub name: String,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Service {
    /// Starts the binary `bin_name` with `args`, its output captured.
    pub fn start(name: &str, bin_name: &str, args: &[String]) -> Self {
        Self::spawn(name, Command::new(bin(bin_name)).args(args))
    }

    /// Starts `command` (a service binary run some other way, e.g. inside a [`NetHost`]), its
    /// output captured.
    pub fn start_command(name: &str, command: &mut Command) -> Self {
        Self::spawn(name, command)
    }

    fn spawn(name: &str, command: &mut Command) -> Self {
        let mut child = command
            .env("RUST_LOG", "info,rdkafka=warn")
            // Where the stack is, the test says in flags; what kind of Redis it is
            // (`CTR_REDIS_CLUSTER`), the services inherit.
            .env_remove("CTR_KAFKA_BROKERS")
            .env_remove("CTR_REDIS_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = Arc::clone(&log);
            let tag = name.to_string();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("CTR_E2E_VERBOSE").is_some() {
                        eprintln!("[{tag}] {line}");
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        Self {
            name: name.to_string(),
            child,
            log,
        }
    }

    /// Waits for the process to exit by itself and asserts it succeeded.
    pub fn wait_success(mut self, timeout: Duration) {
        let status = self.wait_exit(Instant::now() + timeout);
        assert!(
            status.success(),
            "{} exited with {status}:\n{}",
            self.name,
            self.output()
        );
    }

    /// Waits for the process to exit by itself, at the latest by `deadline` (else the test
    /// fails with its output); how it exited.
    pub fn wait_exit(&mut self, deadline: Instant) -> std::process::ExitStatus {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} still running:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The process's resident memory now, from /proc (bytes).
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches(" kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    /// CPU time the process has used so far, user and system (seconds, from /proc; the
    /// kernel counts in ticks of 1/100 s on Linux's default `CLK_TCK`).
    pub fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        // Fields after the command name (which may hold spaces, so split after its `)`):
        // state is field 3; utime and stime are fields 14 and 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(ticks as f64 / 100.0)
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Output so far (last 60 lines), for assertion messages.
    pub fn output(&self) -> String {
        let log = self.log.lock().unwrap();
        log[log.len().saturating_sub(60)..].join("\n")
    }

    /// Sends SIGTERM and waits for a clean exit: a service asked to stop drains its work and
    /// exits 0 within 20 s, or the test fails.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop within 20 s of SIGTERM:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "{} exited with {status} when stopped:\n{}",
            self.name,
            self.output()
        );
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what` and `context()`.
pub fn eventually<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Per-ad (impressions, clicks) as the scorer published them under `prefix`.
pub fn published_ad_counts(con: &mut TestRedis, prefix: &str) -> BTreeMap<String, (u64, u64)> {
    published_counts(con, &format!("{prefix}ad:*"))
        .into_iter()
        .map(|(key, counts)| {
            let ad = ctr_schemas::contract::keys::ad_of_key(prefix, &key).expect("an ad key");
            (ad.to_string(), counts)
        })
        .collect()
}

/// (impressions, clicks) of every (ad, context) key under `prefix`, by the key's name after
/// the prefix.
pub fn published_context_counts(con: &mut TestRedis, prefix: &str) -> BTreeMap<String, (u64, u64)> {
    published_counts(con, &format!("{prefix}adctx:*"))
        .into_iter()
        .map(|(key, counts)| (key[prefix.len()..].to_string(), counts))
        .collect()
}

/// (impressions, clicks) of every estimate key matching `pattern`, by key.
fn published_counts(con: &mut TestRedis, pattern: &str) -> BTreeMap<String, (u64, u64)> {
    let keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query(con).unwrap();
    let mut out = BTreeMap::new();
    for key in keys {
        let (imps, clicks): (u64, u64) = redis::cmd("HMGET")
            .arg(&key)
            .arg("imps")
            .arg("clicks")
            .query(con)
            .unwrap();
        out.insert(key, (imps, clicks));
    }
    out
}

/// GET `url` and return the body, or `None` on any failure.
pub fn http_get(url: &str) -> Option<String> {
    ureq::get(url).call().ok()?.body_mut().read_to_string().ok()
}

/// The value of an unlabeled Prometheus counter or gauge in a `/metrics` page.
pub fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// One record read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    /// The partition it was read from.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key.
    pub key: Vec<u8>,
    /// Its value.
    pub payload: Vec<u8>,
    /// Its headers, as (name, value as text).
    pub headers: Vec<(String, String)>,
}

/// Reads every record of `topic` from the beginning: until no record has arrived for 1.5 s
/// and every partition has been read up to its high watermark.
///
/// Both, because neither is enough alone: Tansu (`CTR_BROKER=tansu`) reports high watermarks
/// that lag the records it serves (docs/STACK.md), so a reader stopping there misses the
/// tail; and on a loaded machine a fetch can take longer than any silence threshold, so a
/// reader stopping at silence alone missed 40 of 374,814 labels in the serving bench.
pub fn read_topic(topic: &str) -> Vec<Record> {
    use rdkafka::Offset;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let consumer: BaseConsumer = kafka_client()
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).expect("assign");
    let partitions: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
    let mut next: HashMap<i32, i64> = HashMap::new();
    let read_to_the_end = |next: &HashMap<i32, i64>| {
        partitions.iter().all(|&p| {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            next.get(&p).copied().unwrap_or(0) >= high
        })
    };
    let mut out = Vec::new();
    let mut last = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "reading {topic} timed out");
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            if last.elapsed() >= Duration::from_millis(1500) && read_to_the_end(&next) {
                break;
            }
            continue;
        };
        let m = m.expect("read");
        last = Instant::now();
        next.insert(m.partition(), m.offset() + 1);
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|x| {
                        (
                            x.key.to_string(),
                            String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(Record {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().unwrap_or_default().to_vec(),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers,
        });
    }
    out
}

/// Approximate number of records in `topic`: the sum of high watermarks, which on the local
/// broker can lag the true count (see [`read_topic`]). Good for progress thresholds only.
pub fn topic_size(topic: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = kafka_client().create().expect("client");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    md.topics()[0]
        .partitions()
        .iter()
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .expect("watermarks")
                .1
        })
        .sum()
}

/// A producer configured like the project's: idempotent, Java-compatible partitioner, so test
/// records land where the services' would.
pub fn producer() -> rdkafka::producer::BaseProducer {
    kafka_client()
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

/// Sends `records` (topic, key, payload) in order and waits until all are acknowledged.
pub fn produce_all(records: &[(String, String, Vec<u8>)]) {
    produce_paced(records, None, None, |_| {});
}

/// Sends `records` in order on one producer, at most `per_sec` records per second when given
/// (in 50 ms steps), calling `progress` with the number sent so far after each step; waits
/// until all are acknowledged. With `labels`, each record carries the joiner's `ctr.clicked`
/// and `ctr.position` headers from the parallel slice of (clicked, position).
pub fn produce_paced(
    records: &[(String, String, Vec<u8>)],
    labels: Option<&[(bool, i32)]>,
    per_sec: Option<f64>,
    mut progress: impl FnMut(usize),
) {
    use ctr_schemas::contract::headers;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseRecord, Producer};
    let p = producer();
    let started = Instant::now();
    let step = per_sec.map_or(records.len().max(1), |r| {
        (r / 20.0).ceil().max(1.0) as usize
    });
    for (i, chunk) in records.chunks(step).enumerate() {
        if per_sec.is_some() {
            let due = Duration::from_millis(50 * i as u64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        for (j, (topic, key, payload)) in chunk.iter().enumerate() {
            let mut rec = BaseRecord::to(topic).key(key).payload(payload);
            let position;
            if let Some(l) = labels {
                let (clicked, at) = l[i * step + j];
                position = at.to_string();
                rec = rec.headers(
                    OwnedHeaders::new()
                        .insert(Header {
                            key: headers::CLICKED,
                            value: Some(headers::clicked_value(clicked)),
                        })
                        .insert(Header {
                            key: headers::POSITION,
                            value: Some(&position),
                        }),
                );
            }
            loop {
                match p.send(rec) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        rec = back;
                        p.poll(Duration::from_millis(10));
                    }
                }
            }
        }
        p.poll(Duration::ZERO);
        progress(i * step + chunk.len());
    }
    p.flush(Duration::from_secs(60)).expect("flush");
}

impl Service {
    /// Kills the process with SIGKILL: no shutdown path runs.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// How the process exited, if it has.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }
}

/// A client configuration for the brokers the tests run against ([`kafka_connection`]).
pub fn kafka_client() -> ClientConfig {
    kafka_connection().client()
}

/// The brokers the tests run against, connected as the services connect: from the same
/// `CTR_KAFKA_*` variables (`scripts/stack env`, or `scripts/stack env sasl` for SASL_SSL),
/// through the runtime's flags.
pub fn kafka_connection() -> ctr_runtime::kafka::KafkaConnection {
    #[derive(clap::Parser)]
    struct FromEnv {
        #[command(flatten)]
        kafka: ctr_runtime::flags::KafkaFlags,
    }
    use clap::Parser;
    let flags = FromEnv::try_parse_from(["e2e"])
        .unwrap_or_else(|e| panic!("the CTR_KAFKA_* variables: {e}"));
    flags
        .kafka
        .check()
        .unwrap_or_else(|e| panic!("the CTR_KAFKA_* variables: {e}"))
}

/// How many Kafka nodes the stack runs (`CTR_KAFKA_NODES`, which `scripts/stack env` sets; 1
/// when unset): topics get that many replicas.
pub fn kafka_nodes() -> i32 {
    std::env::var("CTR_KAFKA_NODES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

/// The pid of the stack's own single Apache Kafka broker, when the tests run against one (its
/// log is durable, so it can be killed and restarted; Tansu keeps memory only, an external
/// cluster is not ours to kill). `None` for a cluster of several nodes: see
/// [`local_kafka_node_pid`].
pub fn local_kafka_pid() -> Option<i32> {
    pid_file("pids/kafka.pid")
}

/// The pid of node `node` (1, 2, 3) of the stack's own Kafka cluster
/// (`CTR_KAFKA_NODES=3 scripts/stack up`), if it runs one.
pub fn local_kafka_node_pid(node: i32) -> Option<i32> {
    pid_file(&format!("pids/kafka-{node}.pid"))
}

fn pid_file(name: &str) -> Option<i32> {
    let run = std::env::var("CTR_RUN_DIR").ok()?;
    let pid = std::fs::read_to_string(PathBuf::from(run).join(name)).ok()?;
    pid.trim().parse().ok()
}

/// `scripts/stack` with `args`, in the tests' environment: `scripts/stack env` named the
/// stack's ports and brokers there, so the command addresses the stack the tests run against.
pub fn stack_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/stack"));
    cmd.args(args);
    cmd
}

/// The node ID of the leader of `topic`'s `partition`, as the cluster's metadata says now.
pub fn partition_leader(topic: &str, partition: i32) -> i32 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = kafka_client().create().expect("a metadata client");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("the topic's metadata");
    let t = md.topics().first().expect("the topic");
    t.partitions()
        .iter()
        .find(|p| p.id() == partition)
        .map(|p| p.leader())
        .unwrap_or_else(|| panic!("{topic} has no partition {partition}"))
}

/// Sends `signal` (`-STOP`, `-CONT`, `-9`) to process `pid`.
pub fn signal_process(pid: i32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// A `redis-server` of a test's own on a free loopback port (the binary the stack script
/// installed), for faults that must not touch the shared Redis: it can be frozen (SIGSTOP)
/// and thawed. Killed when dropped.
#[derive(Debug)]
pub struct PrivateRedis {
    child: Child,
    port: u16,
}

impl PrivateRedis {
    /// Starts a server and waits until it answers.
    pub fn start() -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts (scripts/stack up installs it)");
        let me = Self { child, port };
        eventually(
            Duration::from_secs(10),
            "the private Redis to answer",
            || {
                redis::Client::open(me.url())
                    .and_then(|c| c.get_connection())
                    .ok()
            },
            String::new,
        );
        me
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig} redis-server");
    }

    /// Stops the server's process (SIGSTOP): connections stay open and nothing answers, as
    /// with a stalled disk or a network partition.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets it run again (SIGCONT): it answers what was queued.
    pub fn thaw(&self) {
        self.signal("-CONT");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sum of a Prometheus metric over all its label sets whose label text contains `filter`
/// (e.g. `outcome="shed"`; empty = all).
pub fn metric_sum(page: &str, name: &str, filter: &str) -> Option<f64> {
    metric_sum_where(page, name, &[filter])
}

/// [`metric_sum`] over the series whose labels contain every one of `filters`.
pub fn metric_sum_where(page: &str, name: &str, filters: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in page.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let base = series.split('{').next().unwrap_or("");
        if base == name && filters.iter().all(|f| series.contains(f)) {
            let v: f64 = value.parse().ok()?;
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// The kernel's TCP counters (`TcpExt` of `/proc/net/netstat`, this network namespace's), by
/// name: `ListenOverflows`, `TCPSynRetrans`, `TCPTimeouts`, …. Empty where the file is not.
pub fn tcp_counters() -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    // Pairs of lines: `TcpExt: <names>` then `TcpExt: <values>`.
    let rows: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("TcpExt:"))
        .collect();
    let [names, values] = rows[..] else {
        return BTreeMap::new();
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter_map(|(n, v)| Some((n.to_string(), v.parse().ok()?)))
        .collect()
}

/// The number of the first `"field":` in a JSON text, parsed by Rust's correctly rounded
/// `f64` parser: serde_json's default float parsing may be one ulp off, and exactness tests
/// compare the digits a server printed (shortest round-trip form) bit for bit.
pub fn json_f64(body: &str, field: &str) -> Option<f64> {
    let at = body.find(&format!("\"{field}\":"))? + field.len() + 3;
    let rest = &body[at..];
    let end = rest.find([',', '}', ']']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

/// What an HTTP call answered; status 0 when it got no answer at all.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The HTTP status (0: no answer).
    pub status: u16,
    /// The `Retry-After` header, if any.
    pub retry_after: Option<String>,
    /// The body as text.
    pub body: String,
}

/// POSTs `body` with `headers`; returns whatever the status.
pub fn http_post(url: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.post(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    match req.send(body) {
        Ok(mut r) => Reply {
            status: r.status().as_u16(),
            retry_after: r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(String::from),
            body: r.body_mut().read_to_string().unwrap_or_default(),
        },
        Err(e) => Reply {
            status: 0,
            retry_after: None,
            body: e.to_string(),
        },
    }
}

/// POSTs a body larger than the server accepts and returns the status the server answered
/// (0 if none could be read).
///
/// An HTTP/1.1 server answers `413` before it has read such a body and then closes the
/// connection, while the client is still writing: a client that reads only after writing can
/// see the connection reset instead of the answer (it did, under load). So this writes from
/// one thread and reads the answer from another, over a plain TCP stream.
pub fn http_post_oversized(addr: &str, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return 0;
    };
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut writer = stream.try_clone().expect("clone the stream");
    let write = std::thread::spawn(move || {
        let _ = writer.write_all(head.as_bytes());
        let _ = writer.write_all(&body);
    });
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if answer.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = write.join();
    String::from_utf8_lossy(&answer)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// POSTs JSON to `url`; returns the status and body whatever the status.
pub fn http_post_json(url: &str, body: &str) -> (u16, String) {
    let r = http_post(
        url,
        &[("content-type", "application/json")],
        body.as_bytes(),
    );
    (r.status, r.body)
}

/// Starts `ctr-ingest http` on `port` for the given topics with `extra` flags, and waits until
/// it answers.
pub fn start_ingest(serves: &str, clicks: &str, port: u16, extra: &[&str]) -> Service {
    let mut args = vec![
        "http".to_string(),
        format!("--brokers={}", brokers()),
        format!("--serves-topic={serves}"),
        format!("--clicks-topic={clicks}"),
        format!("--http-addr=127.0.0.1:{port}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut svc = Service::start(&format!("ingest:{port}"), "ctr-ingest", &args);
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(&format!("http://127.0.0.1:{port}/healthz")).is_none() {
        assert!(
            svc.is_running() && Instant::now() < deadline,
            "ingest adapter did not come up:\n{}",
            svc.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    svc
}

/// Event time of the first generated label.
pub const LABELS_T0: i64 = 1_760_000_000_000;

/// Label `i` of a stream whose contexts never repeat (the state-growth benches): ad `i mod
/// 500`, a query category seen nowhere else, one click in 50, one label per `step_ms` of event
/// time from [`LABELS_T0`].
pub fn fresh_context_label(i: u64, step_ms: i64) -> LabeledImpression {
    const ADS: u64 = 500;
    let ad = format!("ad-{:03}", i % ADS);
    let ts_ms = LABELS_T0 + i as i64 * step_ms;
    let clicked = i.is_multiple_of(50);
    LabeledImpression {
        label_id: LabeledImpression::label_id_for(i as i64 + 1, &ad),
        serve_id: i as i64 + 1,
        campaign_id: format!("camp-{}", i % ADS % 60),
        ad_id: ad,
        position: (i % 4 + 1) as i32,
        context: Context {
            query_category: format!("q{i}"),
            geo: format!("g{}", i % 12),
            device: ["mobile", "desktop", "tablet"][(i % 3) as usize].into(),
            extra: Default::default(),
        },
        clicked,
        ts_ms,
        click_ts_ms: clicked.then_some(ts_ms + 500),
        kind: LabelKind::Label,
    }
}

/// One partition's state with the scorer's default variants (counts, FTRL, combined), as the
/// checkpoint bench and tests grow it.
pub fn default_partition_state() -> ctr_scorer::state::PartitionState {
    use ctr_models::{ModelSet, VariantConfig, VariantKind};
    let models = ModelSet::new(
        [
            VariantKind::Counts,
            VariantKind::Ftrl,
            VariantKind::Combined,
        ]
        .map(VariantConfig::of)
        .to_vec(),
    )
    .expect("the default variants are valid");
    ctr_scorer::state::PartitionState::new(models, 900_000)
}

/// Applies labels `from..to` of [`fresh_context_label`] (10 per second of event time) to
/// `state`, as records at those offsets.
pub fn feed_fresh_contexts(state: &mut ctr_scorer::state::PartitionState, from: u64, to: u64) {
    let mut released = Vec::new();
    for i in from..to {
        let l = fresh_context_label(i, 100);
        state
            .apply(
                &l,
                &l.context.key(),
                ctr_scorer::state::Policy::NORMAL,
                &mut released,
            )
            .expect("the generator's labels are valid");
        released.clear();
    }
    state.next_offset = Some(to as i64);
}

/// A labeled stream and the exact per-ad totals it implies.
#[derive(Debug)]
pub struct Stream {
    /// The records to produce: (topic, key, value).
    pub records: Vec<(String, String, Vec<u8>)>,
    /// Whether each record is clicked and its position (what the joiner's `ctr.clicked` and
    /// `ctr.position` headers say).
    pub labels: Vec<(bool, i32)>,
    /// ad → (impressions, clicks) over distinct label IDs.
    pub expected: BTreeMap<String, (u64, u64)>,
    /// ad → click probability at the top slot (the generator's truth).
    pub truth: BTreeMap<String, f64>,
}

/// xorshift64*: deterministic, no dependency.
#[derive(Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A uniform number in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Stream {
    /// Produces the stream as the joiner would (with its headers), at most
    /// `per_sec` records per second when given.
    pub fn produce(&self, per_sec: Option<f64>, progress: impl FnMut(usize)) {
        produce_paced(&self.records, Some(&self.labels), per_sec, progress);
    }
}

/// `n` labels over `ads` ads with Zipf-like traffic, positions with a known bias, 5% of the
/// labels re-emitted later (a restarted joiner) and late-click corrections for 1% of the
/// negatives (some re-emitted too).
pub fn labeled_stream(topic: &str, n: usize, ads: usize, seed: u64) -> Stream {
    labeled_stream_with(topic, n, ads, seed, true)
}

/// [`labeled_stream`], with or without the re-emitted copies.
pub fn labeled_stream_with(topic: &str, n: usize, ads: usize, seed: u64, reemit: bool) -> Stream {
    let mut rng = Rng(seed | 1);
    let mut enc = Encoder::<LabeledImpression>::new();
    let weights: Vec<f64> = (0..ads).map(|i| 1.0 / (i as f64 + 1.0)).collect();
    let total: f64 = weights.iter().sum();
    let truth: BTreeMap<String, f64> = (0..ads)
        .map(|i| {
            (
                format!("ad-{i:03}"),
                0.01 + 0.08 * ((i * 37) % 100) as f64 / 100.0,
            )
        })
        .collect();
    let bias = [1.0, 0.7, 0.5, 0.35];
    let mut labels: Vec<LabeledImpression> = Vec::with_capacity(n + n / 10);
    let mut expected: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for i in 0..n {
        let mut u = rng.unit() * total;
        let ad_idx = weights
            .iter()
            .position(|w| {
                u -= w;
                u <= 0.0
            })
            .unwrap_or(ads - 1);
        let ad = format!("ad-{ad_idx:03}");
        let position = 1 + (rng.next_u64() % 4) as usize;
        let clicked = rng.unit() < truth[&ad] * bias[position - 1];
        let pick =
            |r: &mut Rng, v: &[&str]| v[(r.next_u64() % v.len() as u64) as usize].to_string();
        let ts = LABELS_T0 + i as i64 * 20;
        let l = LabeledImpression {
            label_id: format!("{}:{ad}", 10_000_000 + i),
            serve_id: 10_000_000 + i as i64,
            ad_id: ad.clone(),
            campaign_id: format!("camp-{}", ad_idx % 7),
            position: position as i32,
            context: Context {
                query_category: pick(&mut rng, &["travel", "shoes", "news"]),
                geo: pick(&mut rng, &["US", "DE", "FR"]),
                device: pick(&mut rng, &["mobile", "desktop"]),
                extra: Default::default(),
            },
            clicked,
            ts_ms: ts,
            click_ts_ms: clicked.then_some(ts + 500),
            kind: LabelKind::Label,
        };
        let e = expected.entry(ad.clone()).or_default();
        e.0 += 1;
        e.1 += u64::from(clicked);
        labels.push(l.clone());
        if !clicked && i % 100 == 7 {
            let mut late = l.clone();
            late.label_id.push_str(":late");
            late.clicked = true;
            late.click_ts_ms = Some(ts + 60_000);
            late.kind = LabelKind::LateClick;
            e.1 += 1;
            labels.push(late.clone());
            if i % 200 == 7 {
                labels.push(late);
            }
        }
        // A re-emitted copy some records later, as a restarted joiner would produce.
        if reemit && i % 20 == 3 && i >= 500 {
            let earlier = labels[labels.len() - 400].clone();
            labels.push(earlier);
        }
    }
    let records = labels
        .iter()
        .map(|l| {
            (
                topic.to_string(),
                l.ad_id.clone(),
                enc.encode(l).expect("encodes"),
            )
        })
        .collect();
    Stream {
        records,
        labels: labels.iter().map(|l| (l.clicked, l.position)).collect(),
        expected,
        truth,
    }
}

/// Sends one record on a connected producer and waits for the broker's acknowledgement;
/// returns how long that took, ms. Polls every millisecond: `flush` checks at 100 ms steps,
/// which would dominate a freshness figure.
pub fn send_acked(
    producer: &rdkafka::producer::BaseProducer,
    topic: &str,
    key: &str,
    payload: &[u8],
) -> f64 {
    use rdkafka::producer::{BaseRecord, Producer};
    let started = Instant::now();
    producer
        .send(BaseRecord::to(topic).key(key).payload(payload))
        .expect("enqueue");
    while producer.in_flight_count() > 0 {
        producer.poll(Duration::from_millis(1));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no acknowledgement"
        );
    }
    started.elapsed().as_secs_f64() * 1e3
}

/// One label of `ad` at the top slot in the context travel/US/mobile, as a freshness
/// benchmark produces them one at a time (`id` makes its serve and label IDs).
pub fn single_label(
    id: i64,
    ad: &str,
    campaign: &str,
    clicked: bool,
    ts: i64,
) -> LabeledImpression {
    LabeledImpression {
        label_id: format!("{id}:{ad}"),
        serve_id: id,
        ad_id: ad.into(),
        campaign_id: campaign.into(),
        position: 1,
        context: Context {
            query_category: "travel".into(),
            geo: "US".into(),
            device: "mobile".into(),
            extra: Default::default(),
        },
        clicked,
        ts_ms: ts,
        click_ts_ms: clicked.then_some(ts + 100),
        kind: LabelKind::Label,
    }
}

/// Produces `records` in ten slices 100 ms apart, on a thread: a stream still flowing while a
/// test kills something.
pub fn produce_in_slices(records: Vec<(String, String, Vec<u8>)>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for slice in records.chunks(records.len() / 10 + 1) {
            produce_all(slice);
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

/// Steady background traffic for freshness benchmarks: 200 labels of 50 other ads every
/// 100 ms (~2,000 labels/s) into `topic`, until [`Background::stop`].
#[derive(Debug)]
pub struct Background {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Background {
    /// Starts producing to `topic` (labels from `seed`; with re-emitted copies when `reemit`).
    pub fn start(topic: &str, seed: u64, reemit: bool) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (topic, stop) = (topic.to_string(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let batch = labeled_stream_with(&topic, 200, 50, seed + i, reemit);
                    produce_all(&batch.records);
                    i += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Self { stop, thread }
    }

    /// Stops the traffic and waits for its thread.
    pub fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("background producer");
    }
}

/// Reads `total` records from partitions `0..partitions` of `topics` with a bare rdkafka
/// consumer (no processing): the baseline the services' through-broker rates are compared
/// with. Returns records/s.
pub fn bare_consume_rate(topics: &[&str], partitions: i32, total: usize) -> f64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = kafka_client()
        .set("group.id", unique("bare"))
        .create()
        .expect("bare consumer");
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        for p in 0..partitions {
            tpl.add_partition_offset(t, p, Offset::Beginning)
                .expect("partition");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let started = Instant::now();
    let mut n = 0usize;
    while n < total {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            m.expect("bare consumer read");
            n += 1;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "bare consumer stalled at {n}"
        );
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// Records the scorer serving HTTP on `port` has taken off its topic, every outcome (learned,
/// shed, dropped unread, guarded, corrected, duplicate); `None` before it reports any.
pub fn scorer_records(port: u16) -> Option<f64> {
    metric_sum(
        &http_get(&format!("http://127.0.0.1:{port}/metrics"))?,
        "ctr_scorer_records_total",
        "",
    )
}

/// Starts `ctr-feedback` (the joiner) on the stack: serves, clicks, labeled and dead-letter
/// topics, consumer group `group`, Redis keys under `prefix` at `redis_url`, HTTP on `port`,
/// `extra` flags.
pub fn start_feedback(
    [serves, clicks, labeled, deadletter]: [&str; 4],
    group: &str,
    prefix: &str,
    redis_url: &str,
    port: u16,
    extra: &[&str],
) -> Service {
    let mut args = vec![
        format!("--brokers={}", brokers()),
        format!("--serves-topic={serves}"),
        format!("--clicks-topic={clicks}"),
        format!("--labeled-topic={labeled}"),
        format!("--deadletter-topic={deadletter}"),
        format!("--group={group}"),
        format!("--redis-url={redis_url}"),
        format!("--redis-prefix={prefix}"),
        format!("--http-addr=127.0.0.1:{port}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Service::start("feedback", "ctr-feedback", &args)
}

/// The joiner's flags the end-to-end tests run it with: a 5 s window, no grace, and negatives
/// emitted after 1 s without input (so a finished stream is labeled to its end).
pub const FAST_JOIN: [&str; 4] = [
    "--window-ms=5000",
    "--grace-ms=0",
    "--max-out-of-order-ms=500",
    "--idle-ms=1000",
];

/// Each partition's state as the scorer checkpointed it under `prefix` for `topic` (partitions
/// `0..partitions`), read and restored with the scorer's own store.
pub fn checkpointed_states(
    prefix: &str,
    topic: &str,
    partitions: i32,
) -> Vec<ctr_scorer::state::PartitionState> {
    (0..partitions)
        .map(|p| scorer_checkpoint(prefix, topic, p).expect("a checkpoint of every partition"))
        .collect()
}

/// Partition `p`'s state as the scorer checkpointed it under `prefix` for `topic`, if it did,
/// read through the scorer's own store (which reassembles a body saved in chunks).
pub fn scorer_checkpoint(
    prefix: &str,
    topic: &str,
    p: i32,
) -> Option<ctr_scorer::state::PartitionState> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the scorer's async store");
    rt.block_on(async {
        let redis = ctr_runtime::redis::Redis::connect(
            &redis_url(),
            None,
            redis_cluster(),
            ctr_runtime::Policy::default(),
        )
        .await
        .expect("Redis (scripts/stack up)");
        let conn = redis.manager().await.expect("a Redis connection");
        ctr_scorer::checkpoint::CheckpointStore::new(conn, redis.policy(), prefix, topic)
            .load(p)
            .await
            .expect("the checkpoint reads and restores")
    })
}

/// Starts `ctr-scorer` on the stack for `topic`, in consumer group `group`, writing Redis keys
/// under `prefix`, serving HTTP on `port`, with `extra` flags.
pub fn start_scorer(topic: &str, group: &str, prefix: &str, port: u16, extra: &[&str]) -> Service {
    let args = scorer_args(topic, group, prefix, &format!("127.0.0.1:{port}"), extra);
    Service::start(&format!("scorer:{port}"), "ctr-scorer", &args)
}

/// [`start_scorer`] inside the simulated host `host`, its HTTP port on the host's address.
pub fn start_scorer_on(
    host: &NetHost,
    topic: &str,
    group: &str,
    prefix: &str,
    port: u16,
    extra: &[&str],
) -> Service {
    let args = scorer_args(
        topic,
        group,
        prefix,
        &format!("{}:{port}", host.addr),
        extra,
    );
    Service::start_command(
        &format!("scorer@{}", host.ns),
        host.command(&bin("ctr-scorer")).args(&args),
    )
}

fn scorer_args(
    topic: &str,
    group: &str,
    prefix: &str,
    http_addr: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut args = vec![
        format!("--brokers={}", brokers()),
        format!("--labeled-topic={topic}"),
        format!("--group={group}"),
        format!("--redis-url={}", redis_url()),
        format!("--redis-prefix={prefix}"),
        format!("--http-addr={http_addr}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}
