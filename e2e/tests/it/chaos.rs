//! Fault injection under load (issue #8), the way Flink proves exactly-once: kill at random
//! points, recover, and assert exact results against a failure-free run over the same input.
//!
//! The same events (explicit IDs, event times from the run's start) go through the HTTP
//! adapter twice: into a reference pipeline that is left alone, and into a chaos pipeline whose
//! adapter, joiner and scorer are SIGKILLed and restarted at seeded random points while the
//! input flows, and whose Redis is restarted (a clean restart: see RELIABILITY.md for a crash).
//! When the stack runs its own Apache Kafka (durable log), the broker is SIGKILLed and started
//! again too; the reference has settled before the faults begin, so it never sees one. On a
//! cluster of three nodes (`CTR_KAFKA_NODES=3 scripts/stack up`: replication factor 3,
//! `min.insync.replicas=2`) the node killed is the leader of a partition in use: the first
//! time of the serves topic's partition 0, the second of the labeled topic's.
//! The client resends a batch until it gets `202`, so resent events reach Kafka twice; the
//! joiner drops duplicate serves and clicks by ID, the scorer drops re-emitted labels by ID.
//! Both joiners run on event time alone (no idle advance by the wall clock), so a click delayed
//! by a fault is judged by its event time as in the reference; sentinel events at the end close
//! every window. Afterwards the per-ad totals in Redis and the labels (deduplicated by ID) of
//! the two runs must be equal.
//!
//! `CTR_CHAOS_SERVES` and `CTR_CHAOS_FAULTS` scale it (defaults 4,000 and 12 in CI; the long
//! run in RELIABILITY.md uses more). The figures go to `target/e2e/chaos.json`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ctr_e2e::*;
use ctr_schemas::LabeledImpression;

use crate::pipeline::{Topics, topics};

const KEY: &str = "chaos-test-key";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The input: JSON events in event-time order, then sentinels that close every window.
fn events(serves: usize, t0: i64) -> Vec<serde_json::Value> {
    let mut rng = Rng(0xc4a0_5eed);
    let mut out: Vec<(i64, u64, serde_json::Value)> = Vec::new();
    let mut click_id = 9_000_000_000u64;
    let mut seq = 0u64;
    let mut push = |out: &mut Vec<(i64, u64, serde_json::Value)>, ts: i64, v| {
        seq += 1;
        out.push((ts, seq, v));
    };
    for i in 0..serves {
        let ts = t0 + i as i64 * 3;
        let serve_id = 8_000_000_000u64 + i as u64;
        let n = 1 + (rng.next_u64() % 3) as usize;
        let first = (rng.next_u64() % 40) as usize;
        let ads: Vec<String> = (0..n)
            .map(|k| format!("ad-{:03}", (first + k * 11) % 40))
            .collect();
        let shown: Vec<serde_json::Value> = ads
            .iter()
            .enumerate()
            .map(|(k, a)| {
                serde_json::json!({"ad_id": a, "campaign_id": format!("camp-{}", &a[3..5]), "position": k + 1, "bid": 1.0})
            })
            .collect();
        let (category, device) = (
            ["travel", "news", "shoes"][i % 3],
            ["mobile", "desktop"][i % 2],
        );
        push(
            &mut out,
            ts,
            serde_json::json!({"type": "serve", "serve_id": serve_id.to_string(), "ts_ms": ts,
                "context": {"query_category": category, "geo": "US", "device": device},
                "ads": shown}),
        );
        for a in &ads {
            if rng.unit() < 0.06 {
                // Most clicks inside the 5 s window, a tenth late (a correction), a few twice.
                let u = rng.unit();
                let delay = if u < 0.7 {
                    100 + (rng.unit() * 1_900.0) as i64
                } else if u < 0.9 {
                    2_000 + (rng.unit() * 2_500.0) as i64
                } else {
                    6_000 + (rng.unit() * 3_000.0) as i64
                };
                click_id += 1;
                let c = serde_json::json!({"type": "click", "click_id": click_id.to_string(),
                    "serve_id": serve_id.to_string(), "ad_id": a, "ts_ms": ts + delay});
                if rng.unit() < 0.03 {
                    push(&mut out, ts + delay + 5, c.clone());
                }
                push(&mut out, ts + delay, c);
            }
        }
    }
    out.sort_by_key(|(ts, seq, _)| (*ts, *seq));
    let end = out.last().map_or(t0, |e| e.0) + 30_000;
    let mut events: Vec<serde_json::Value> = out.into_iter().map(|e| e.2).collect();
    // Sentinels: enough serves (and a click each) that every partition's two streams pass the
    // last window.
    for k in 0..64u64 {
        let serve_id = (7_000_000_000 + k).to_string();
        events.push(
            serde_json::json!({"type": "serve", "serve_id": serve_id, "ts_ms": end,
            "context": {"query_category": "news", "geo": "US", "device": "mobile"},
            "ads": [{"ad_id": "ad-sentinel", "campaign_id": "camp-s", "position": 1, "bid": 1.0}]}),
        );
        events.push(
            serde_json::json!({"type": "click", "click_id": (7_100_000_000 + k).to_string(),
            "serve_id": serve_id, "ad_id": "ad-sentinel", "ts_ms": end + 100}),
        );
    }
    events
}

/// One pipeline: adapter, joiner, scorer, each restartable.
struct Pipeline {
    t: Topics,
    prefix: String,
    ingest_port: u16,
    scorer_port: u16,
    joiner_port: u16,
    ingest: Option<Service>,
    joiner: Option<Service>,
    scorer: Option<Service>,
}

impl Pipeline {
    fn new(tag: &str) -> Self {
        let mut p = Self {
            t: topics(tag),
            prefix: format!("{}:", unique(tag)),
            ingest_port: free_port(),
            scorer_port: free_port(),
            joiner_port: free_port(),
            ingest: None,
            joiner: None,
            scorer: None,
        };
        p.start(Victim::Ingest);
        p.start(Victim::Joiner);
        p.start(Victim::Scorer);
        p
    }

    fn start(&mut self, v: Victim) {
        match v {
            Victim::Ingest => {
                self.ingest = Some(start_ingest(
                    &self.t.serves,
                    &self.t.clicks,
                    self.ingest_port,
                    &[
                        &format!("--api-keys={KEY}"),
                        "--max-future-ms=600000",
                        "--shard=7",
                    ],
                ));
            }
            Victim::Joiner => {
                self.joiner = Some(Service::start(
                    "feedback",
                    "ctr-feedback",
                    &[
                        format!("--brokers={}", brokers()),
                        format!("--serves-topic={}", self.t.serves),
                        format!("--clicks-topic={}", self.t.clicks),
                        format!("--labeled-topic={}", self.t.labeled),
                        format!("--deadletter-topic={}", self.t.deadletter),
                        format!("--group={}-feedback", self.t.serves),
                        format!("--redis-url={}", redis_url()),
                        format!("--redis-prefix={}", self.prefix),
                        format!("--http-addr=127.0.0.1:{}", self.joiner_port),
                        "--window-ms=5000".into(),
                        "--grace-ms=0".into(),
                        "--max-out-of-order-ms=500".into(),
                        // Event time only: the wall clock never closes a window.
                        "--idle-ms=3600000".into(),
                        "--checkpoint-ms=1000".into(),
                    ],
                ));
            }
            Victim::Scorer => {
                self.scorer = Some(start_scorer(
                    &self.t.labeled,
                    &format!("{}-scorer", self.t.labeled),
                    &self.prefix,
                    self.scorer_port,
                    &["--checkpoint-ms=1000", "--shedding=false"],
                ));
            }
            Victim::Redis | Victim::Broker => {}
        }
    }

    fn kill(&mut self, v: Victim) {
        let s = match v {
            Victim::Ingest => self.ingest.take(),
            Victim::Joiner => self.joiner.take(),
            Victim::Scorer => self.scorer.take(),
            Victim::Redis | Victim::Broker => None,
        };
        if let Some(s) = s {
            s.kill9();
        }
    }

    /// Whether `v` has recovered: the adapter is ready (broker reachable), the joiner and the
    /// scorer own all four partitions again (the consumer group rebalanced to the restarted
    /// process, which restores each partition's checkpoint on assignment), Redis answers; after
    /// the broker, all three are working again.
    fn ready(&self, v: Victim) -> bool {
        let owns_all = |port: u16, gauge: &str| {
            http_get(&format!("http://127.0.0.1:{port}/metrics"))
                .and_then(|page| metric(&page, gauge))
                .is_some_and(|n| n >= 4.0)
        };
        match v {
            Victim::Ingest => http_ok(&format!("http://127.0.0.1:{}/readyz", self.ingest_port)),
            Victim::Scorer => owns_all(self.scorer_port, "ctr_scorer_assigned_partitions"),
            Victim::Joiner => owns_all(self.joiner_port, "ctr_feedback_assigned_partitions"),
            Victim::Broker => [Victim::Ingest, Victim::Joiner, Victim::Scorer]
                .into_iter()
                .all(|v| self.ready(v)),
            Victim::Redis => redis::Client::open(redis_url())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok(),
        }
    }

    fn logs(&self) -> String {
        [&self.ingest, &self.joiner, &self.scorer]
            .iter()
            .filter_map(|s| s.as_ref())
            .map(|s| format!("--- {}\n{}", s.name, s.output()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn http_ok(url: &str) -> bool {
    matches!(ureq::get(url).call(), Ok(r) if r.status() == 200)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Victim {
    Ingest,
    Joiner,
    Scorer,
    Redis,
    Broker,
}

/// Sends every event through the adapter at `port`, in batches, resending a batch until it is
/// answered `202`. Returns the number of resends.
fn send_all(port: u16, events: &[serde_json::Value], pace: Duration) -> usize {
    let url = format!("http://127.0.0.1:{port}/v1/events");
    let mut resends = 0;
    for batch in events.chunks(40) {
        let body = serde_json::to_vec(batch).unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r = http_post(
                &url,
                &[
                    ("content-type", "application/json"),
                    ("authorization", &format!("Bearer {KEY}")),
                ],
                &body,
            );
            if r.status == 202 {
                break;
            }
            assert!(
                r.status != 400 && r.status != 401 && Instant::now() < deadline,
                "the adapter refused a batch: {} {}",
                r.status,
                r.body
            );
            resends += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(pace);
    }
    resends
}

/// Labels of a topic by ID (the topic may hold re-emitted copies, identical by construction).
fn labels(topic: &str) -> BTreeMap<String, (bool, String, i32, String)> {
    let mut out = BTreeMap::new();
    for r in read_topic(topic) {
        let l: LabeledImpression = ctr_schemas::decode(&r.payload).expect("a label");
        let v = (l.clicked, l.ad_id.clone(), l.position, l.context.key());
        if let Some(old) = out.insert(l.label_id.clone(), v.clone()) {
            assert_eq!(
                old, v,
                "a re-emitted label differs from the first: {}",
                l.label_id
            );
        }
    }
    out
}

/// A broker of the stack's own Apache Kafka to kill, as (node ID, pid): the single broker, or on
/// a cluster the node that leads `topic`'s partition 0 now. `None` when the broker is not ours.
fn broker_to_kill(topic: &str) -> Option<(i32, i32)> {
    if kafka_nodes() > 1 {
        let node = partition_leader(topic, 0);
        Some((node, local_kafka_node_pid(node)?))
    } else {
        Some((1, local_kafka_pid()?))
    }
}

/// On a cluster, a partition of a fresh probe topic (three replicas) that `node` leads, for
/// [`acked_again`]; `None` when the cluster gave `node` none.
fn probe_partition(node: i32) -> Option<(String, i32)> {
    let topic = format!("{}.failover", unique("probe"));
    create_topics(&[(&topic, 3)]);
    let p = (0..3).find(|p| partition_leader(&topic, *p) == node)?;
    Some((topic, p))
}

/// How long after `killed` a write (`acks=all`) to `topic`'s `partition` is acknowledged: the
/// cluster's failover as a producer sees it, when that partition's leader was killed.
fn acked_again(topic: &str, partition: i32, killed: Instant) -> Duration {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = kafka_client()
        .set("acks", "all")
        .set("message.timeout.ms", "60000")
        .create()
        .expect("a producer");
    producer
        .send(
            BaseRecord::to(topic)
                .partition(partition)
                .key("k")
                .payload("probe"),
        )
        .expect("enqueued");
    while producer.in_flight_count() > 0 {
        producer.poll(Duration::from_millis(5));
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "no acknowledgement"
        );
    }
    killed.elapsed()
}

/// Runs `scripts/stack up`, which starts again whatever of the stack is down. When the stack
/// runs its own broker, it is told so (the tests' environment names the broker as external).
fn stack_up(after: &str) {
    let mut cmd = stack_command(&["up"]);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "stack up after {after}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SIGKILLs a broker of the stack and starts it again on its data. On a cluster, first waits
/// until a partition the killed node led takes writes again; returns how long that took.
fn restart_broker((node, pid): (i32, i32)) -> Option<Duration> {
    let probe = (kafka_nodes() > 1).then(|| probe_partition(node)).flatten();
    let killed = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -9 {pid}");
    // The signal is asynchronous: until the process is gone, `up` would find it alive.
    let alive = || std::path::Path::new(&format!("/proc/{pid}")).exists();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let failover = probe.map(|(topic, p)| acked_again(&topic, p, killed));
    stack_up("the broker's kill");
    failover
}

/// Restarts the stack's Redis cleanly (SHUTDOWN writes the append-only file) and waits for it.
fn restart_redis() {
    let mut con = redis();
    let _: redis::RedisResult<()> = redis::cmd("SHUTDOWN").query(&mut con);
    stack_up("Redis's shutdown");
}

#[test]
#[ignore = "restarts the shared Redis and broker: runs alone in the load-test step (scripts/test)"]
fn faults_under_load_change_no_count_and_no_label() {
    let serves = env_or("CTR_CHAOS_SERVES", 4_000);
    let faults = env_or("CTR_CHAOS_FAULTS", 12);
    let t0 = now_ms();
    let input = events(serves, t0);
    let pace = Duration::from_millis(60);

    // Reference: the same input, no fault, settled before any fault begins.
    let mut reference = Pipeline::new("chaos-ref");
    assert_eq!(send_all(reference.ingest_port, &input, pace), 0);
    let mut con = redis();
    let want = eventually(
        Duration::from_secs(120),
        "the reference's totals to settle",
        || {
            let a = published_ad_counts(&mut con, &reference.prefix);
            std::thread::sleep(Duration::from_secs(2));
            let b = published_ad_counts(&mut con, &reference.prefix);
            (a == b && b.contains_key("ad-sentinel")).then_some(b)
        },
        || reference.logs(),
    );

    // Chaos: faults while the input flows.
    let chaos = Arc::new(Mutex::new(Pipeline::new("chaos")));
    let sending = Arc::new(AtomicBool::new(true));
    let ingest_port = chaos.lock().unwrap().ingest_port;
    let client = {
        let input = input.clone();
        let sending = Arc::clone(&sending);
        std::thread::spawn(move || {
            let n = send_all(ingest_port, &input, pace);
            sending.store(false, Ordering::SeqCst);
            n
        })
    };
    let mut rng = Rng(0xfa17);
    // (victim, down: kill to restart, recovery: restart to recovered).
    let mut recoveries: Vec<(Victim, Duration, Duration)> = Vec::new();
    // On a cluster: from a node's kill until a partition it led took writes again.
    let mut failovers: Vec<Duration> = Vec::new();
    let redis_at = faults / 2;
    let broker = local_kafka_pid().or(local_kafka_node_pid(1)).is_some();
    let broker_at = [faults / 4, (3 * faults) / 4];
    for k in 0..faults {
        std::thread::sleep(Duration::from_millis(400 + (rng.unit() * 1_200.0) as u64));
        let victim = if k == redis_at {
            Victim::Redis
        } else if broker && broker_at.contains(&k) {
            Victim::Broker
        } else {
            [Victim::Ingest, Victim::Joiner, Victim::Scorer][(rng.unit() * 3.0) as usize]
        };
        let killed = Instant::now();
        if victim == Victim::Redis {
            restart_redis();
        } else if victim == Victim::Broker {
            let p = chaos.lock().unwrap();
            let topic = if k == broker_at[0] {
                p.t.serves.clone()
            } else {
                p.t.labeled.clone()
            };
            drop(p);
            failovers.extend(restart_broker(
                broker_to_kill(&topic).expect("the broker's pid file"),
            ));
        } else {
            chaos.lock().unwrap().kill(victim);
            std::thread::sleep(Duration::from_millis((rng.unit() * 400.0) as u64));
            chaos.lock().unwrap().start(victim);
        }
        let restarted = Instant::now();
        let deadline = restarted + Duration::from_secs(60);
        while !chaos.lock().unwrap().ready(victim) {
            assert!(
                Instant::now() < deadline,
                "{victim:?} did not recover:\n{}",
                chaos.lock().unwrap().logs()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        // Redis's restart waits until it answers: its recovery is the whole outage. The broker's
        // is from its kill until the adapter, joiner and scorer are working again.
        let recovery = match victim {
            Victim::Redis => restarted - killed,
            Victim::Broker => killed.elapsed(),
            _ => restarted.elapsed(),
        };
        recoveries.push((victim, restarted - killed, recovery));
    }
    let resends = client.join().expect("the client finished");
    assert!(!sending.load(Ordering::SeqCst));

    // Recovery: the chaos run's totals reach the reference's (on a new connection: Redis was
    // restarted since the first).
    let mut con = redis();
    let p = chaos.lock().unwrap();
    let last = std::cell::RefCell::new(BTreeMap::new());
    let got = eventually(
        Duration::from_secs(180),
        "the chaos run's totals to equal the reference's",
        || {
            let got = published_ad_counts(&mut con, &p.prefix);
            *last.borrow_mut() = got.clone();
            (got == want).then_some(got)
        },
        || format!("want {want:?}\ngot {:?}\n{}", last.borrow(), p.logs()),
    );
    assert_eq!(got, want);
    let (ref_labels, chaos_labels) = (labels(&reference.t.labeled), labels(&p.t.labeled));
    assert_eq!(
        ref_labels.len(),
        chaos_labels.len(),
        "as many distinct labels"
    );
    assert!(ref_labels == chaos_labels, "the same labels");
    let imps: u64 = want.values().map(|c| c.0).sum();
    assert!(imps > serves as u64, "{imps} impressions");

    let mut by_kind: BTreeMap<String, Vec<u128>> = BTreeMap::new();
    for (v, _, recovery) in &recoveries {
        by_kind
            .entry(format!("{v:?}"))
            .or_default()
            .push(recovery.as_millis());
    }
    for ms in by_kind.values_mut() {
        ms.sort_unstable();
    }
    let summary = serde_json::json!({
        "serves": serves, "events": input.len(), "faults": recoveries.len(),
        "resent_batches": resends, "impressions": imps, "distinct_labels": ref_labels.len(),
        "recovery_ms_by_component": by_kind,
        "kafka_nodes": kafka_nodes(),
        "cluster_failover_ms": failovers.iter().map(Duration::as_millis).collect::<Vec<_>>(),
    });
    eprintln!("chaos: {summary}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/e2e");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("chaos.json"), summary.to_string()).unwrap();
    drop(p);
    reference.kill(Victim::Ingest);
}
