//! `ctr-ingest simulate`: drive the simulated marketplace into Kafka.
//!
//! Serves go to the serves topic and clicks to the clicks topic, both keyed by serve ID (decimal
//! text), in event-time order. With `rate > 0` serves are paced in wall-clock time and stamped
//! with wall-clock event times (a live demo); with `rate = 0` they go as fast as the broker
//! takes them, stamped on the simulator's own clock (tests, benchmarks). On shutdown the
//! simulator stops issuing serves but still sends the clicks already owed, so what it reports
//! as emitted is exactly what reached Kafka.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ctr_schemas::{Click, Encoder, Serve};
use tracing::info;

use crate::producer::{ProduceError, TrackedProducer};
use crate::sim::{EmittedCounts, SimConfig, SimError, SimEvent, Simulator};

/// Settings of `ctr-ingest simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "CTR_KAFKA_BROKERS", default_value = "127.0.0.1:19092")]
    pub brokers: String,
    #[arg(long, env = "CTR_SERVES_TOPIC", default_value = "ctr.serves")]
    pub serves_topic: String,
    #[arg(long, env = "CTR_CLICKS_TOPIC", default_value = "ctr.clicks")]
    pub clicks_topic: String,
    /// Seed of the marketplace; the same seed gives the same events.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Number of serves to emit; 0 = until interrupted.
    #[arg(long, default_value_t = 0)]
    pub serves: u64,
    /// Serves per wall-clock second; 0 = as fast as possible on the simulator's own clock.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Serves per event-time second when `rate` is 0.
    #[arg(long, default_value_t = 1000.0)]
    pub sim_rate: f64,
    /// Event time of the first serve (Unix ms); default: now.
    #[arg(long)]
    pub start_ms: Option<i64>,
    #[arg(long, default_value_t = 200)]
    pub ads: usize,
    #[arg(long, default_value_t = 40)]
    pub campaigns: usize,
    #[arg(long, default_value_t = 500)]
    pub click_delay_min_ms: i64,
    #[arg(long, default_value_t = 20_000)]
    pub click_delay_max_ms: i64,
    /// ID generator shard (0..=1023), distinct per concurrently running producer.
    #[arg(long, default_value_t = 1)]
    pub shard: u32,
    /// Write the per-ad counts of what was emitted to this JSON file when done.
    #[arg(long)]
    pub counts_out: Option<PathBuf>,
}

/// Why a simulation run failed.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error(transparent)]
    Sim(#[from] SimError),
    #[error(transparent)]
    Produce(#[from] ProduceError),
    #[error(transparent)]
    Encode(#[from] ctr_schemas::EncodeError),
    #[error("writing the counts file {path}: {source}")]
    Counts {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Runs the simulation until `serves` are emitted or `shutdown` resolves, then flushes.
pub async fn run(
    args: SimulateArgs,
    shutdown: impl Future<Output = ()>,
) -> Result<EmittedCounts, SimulateError> {
    let paced = args.rate > 0.0;
    let cfg = SimConfig {
        seed: args.seed,
        ads: args.ads,
        campaigns: args.campaigns,
        start_ms: args.start_ms.unwrap_or_else(now_ms),
        serves_per_sec: if paced { args.rate } else { args.sim_rate },
        click_delay_min_ms: args.click_delay_min_ms,
        click_delay_max_ms: args.click_delay_max_ms,
        shard: args.shard,
        ..SimConfig::default()
    };
    let start_ms = cfg.start_ms;
    let mut sim = Simulator::new(cfg, (args.serves > 0).then_some(args.serves))?;
    let mut producer = TrackedProducer::new(&args.brokers, 100_000)?;
    let mut serves = Encoder::<Serve>::new();
    let mut clicks = Encoder::<Click>::new();
    let mut buf = Vec::with_capacity(256);
    let started = Instant::now();
    let mut last_log = Instant::now();
    tokio::pin!(shutdown);
    let mut stopping = false;

    while let Some(event) = sim.next() {
        let (topic, key, ts_ms) = match &event {
            SimEvent::Serve(s) => (&args.serves_topic, s.serve_id, s.ts_ms),
            SimEvent::Click(c) => (&args.clicks_topic, c.serve_id, c.ts_ms),
        };
        if paced {
            // Event time is wall-clock time here: wait until the event is due.
            let due = started + Duration::from_millis((ts_ms - start_ms).max(0) as u64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = &mut shutdown, if !stopping => { stopping = true; sim.stop_serving(); }
                }
            }
        } else if !stopping && futures::poll!(&mut shutdown).is_ready() {
            stopping = true;
            sim.stop_serving();
        }
        buf.clear();
        match &event {
            SimEvent::Serve(s) => serves.encode_into(s, &mut buf)?,
            SimEvent::Click(c) => clicks.encode_into(c, &mut buf)?,
        }
        producer.send(topic, &key.to_string(), &buf).await?;
        if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            let c = sim.counts();
            info!(
                serves = c.serves,
                clicks = c.clicks,
                delivered = producer.delivered(),
                "simulating"
            );
        }
    }
    producer.flush().await?;
    let counts = sim.counts().clone();
    info!(
        serves = counts.serves,
        clicks = counts.clicks,
        secs = started.elapsed().as_secs_f64(),
        "simulation finished; every event acknowledged by the broker"
    );
    if let Some(path) = &args.counts_out {
        let json = serde_json::to_vec_pretty(&counts).expect("counts serialise");
        std::fs::write(path, json).map_err(|source| SimulateError::Counts {
            path: path.clone(),
            source,
        })?;
    }
    Ok(counts)
}
