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

use crate::now_ms;
use crate::producer::{EventProducer, KafkaArgs, ProduceError};
use crate::sim::{EmittedCounts, SimConfig, SimError, SimEvent, Simulator};

/// Settings of `ctr-ingest simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// The broker, the topics and the outage policy.
    #[command(flatten)]
    pub kafka: KafkaArgs,
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
    /// Number of distinct ads.
    #[arg(long, default_value_t = 200)]
    pub ads: usize,
    /// Number of campaigns the ads are spread over.
    #[arg(long, default_value_t = 40)]
    pub campaigns: usize,
    /// Shortest click delay, ms.
    #[arg(long, default_value_t = 500)]
    pub click_delay_min_ms: i64,
    /// Median click delay (log-normal; capped at the geometric mean of min and max).
    #[arg(long, default_value_t = 4_000)]
    pub click_delay_median_ms: i64,
    /// Longest click delay; beyond the joiner's window a click becomes a late correction.
    #[arg(long, default_value_t = 120_000)]
    pub click_delay_max_ms: i64,
    /// Share of clicks sent twice (same click ID).
    #[arg(long, default_value_t = 0.02)]
    pub duplicate_clicks: f64,
    /// Clicks on serves that never existed, per serve (the joiner dead-letters them).
    #[arg(long, default_value_t = 0.002)]
    pub orphan_clicks: f64,
    /// Amplitude of the daily CTR cycle (peak at 20:00 UTC), 0..1.
    #[arg(long, default_value_t = 0.3)]
    pub daily_amplitude: f64,
    /// Drift of each ad's CTR: standard deviation of its logarithm per simulated hour.
    #[arg(long, default_value_t = 0.1)]
    pub drift_per_hour: f64,
    /// Put the hour of day into the context (extra field `hour`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub hour_context: bool,
    /// Seconds of event time between traffic bursts (0 = no bursts).
    #[arg(long, default_value_t = 120)]
    pub burst_every_s: i64,
    /// Length of a burst, seconds.
    #[arg(long, default_value_t = 15)]
    pub burst_len_s: i64,
    /// Serve rate multiplier during a burst.
    #[arg(long, default_value_t = 3.0)]
    pub burst_factor: f64,
    /// ID generator shard (0..=1023), distinct per concurrently running producer.
    #[arg(long, default_value_t = 1)]
    pub shard: u32,
    /// Write the per-ad counts of what was emitted to this JSON file when done.
    #[arg(long)]
    pub counts_out: Option<PathBuf>,
    /// Write the true click probability of every impression to this JSONL file
    /// (`{"serve_id", "ad_id", "position", "ts_ms", "p"}` per line), for calibration against the
    /// truth.
    #[arg(long)]
    pub truth_out: Option<PathBuf>,
}

/// Why a simulation run failed.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    /// The simulator's settings are invalid.
    #[error(transparent)]
    Sim(#[from] SimError),
    /// The broker did not take an event.
    #[error(transparent)]
    Produce(#[from] ProduceError),
    /// An event could not be encoded.
    #[error(transparent)]
    Encode(#[from] ctr_schemas::EncodeError),
    /// The ground-truth file could not be written.
    #[error("writing {path}: {source}")]
    Output {
        /// The file.
        path: PathBuf,
        /// What writing it said.
        source: std::io::Error,
    },
}

/// The marketplace `args` describe (the same settings give the same market and events: a
/// benchmark rebuilds it to ask for the truth of impressions the run never made).
pub fn sim_config(args: &SimulateArgs) -> SimConfig {
    let paced = args.rate > 0.0;
    SimConfig {
        seed: args.seed,
        ads: args.ads,
        campaigns: args.campaigns,
        start_ms: args.start_ms.unwrap_or_else(now_ms),
        serves_per_sec: if paced { args.rate } else { args.sim_rate },
        click_delay_min_ms: args.click_delay_min_ms,
        click_delay_median_ms: args.click_delay_median_ms,
        click_delay_max_ms: args.click_delay_max_ms,
        duplicate_click_rate: args.duplicate_clicks,
        orphan_click_rate: args.orphan_clicks,
        daily_amplitude: args.daily_amplitude,
        drift_per_hour: args.drift_per_hour,
        hour_context: args.hour_context,
        burst_every_ms: args.burst_every_s.saturating_mul(1000),
        burst_len_ms: args.burst_len_s.saturating_mul(1000),
        burst_factor: args.burst_factor,
        shard: args.shard,
        ..SimConfig::default()
    }
}

/// Runs the simulation until `serves` are emitted or `shutdown` resolves, then flushes.
pub async fn run(
    args: SimulateArgs,
    shutdown: impl Future<Output = ()>,
) -> Result<EmittedCounts, SimulateError> {
    let paced = args.rate > 0.0;
    let cfg = sim_config(&args);
    let start_ms = cfg.start_ms;
    let mut sim = Simulator::new(cfg, (args.serves > 0).then_some(args.serves))?;
    let mut truth = match &args.truth_out {
        Some(path) => Some((
            path,
            std::io::BufWriter::new(std::fs::File::create(path).map_err(|source| {
                SimulateError::Output {
                    path: path.clone(),
                    source,
                }
            })?),
        )),
        None => None,
    };
    let mut producer = EventProducer::new(&args.kafka, 100_000)?;
    let mut serves = Encoder::<Serve>::new();
    let mut clicks = Encoder::<Click>::new();
    let mut buf = Vec::with_capacity(256);
    let started = Instant::now();
    let mut last_log = Instant::now();
    tokio::pin!(shutdown);
    let mut stopping = false;

    while let Some(event) = sim.next() {
        let (topic, key, ts_ms) = match &event {
            SimEvent::Serve(s) => (&args.kafka.serves_topic, s.serve_id, s.ts_ms),
            SimEvent::Click(c) => (&args.kafka.clicks_topic, c.serve_id, c.ts_ms),
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
        if let (Some((path, out)), SimEvent::Serve(s)) = (&mut truth, &event) {
            write_truth(out, s, sim.last_serve_truth()).map_err(|source| {
                SimulateError::Output {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
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
                duplicate_clicks = c.duplicate_clicks,
                orphan_clicks = c.orphan_clicks,
                delivered = producer.delivered(),
                events_per_sec =
                    (producer.delivered() as f64 / started.elapsed().as_secs_f64()) as u64,
                "simulating"
            );
        }
    }
    producer.flush().await?;
    if let Some((path, out)) = truth {
        out.into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .map_err(|source| SimulateError::Output {
                path: path.clone(),
                source,
            })?;
    }
    let counts = sim.counts().clone();
    info!(
        serves = counts.serves,
        clicks = counts.clicks,
        secs = started.elapsed().as_secs_f64(),
        "simulation finished; every event acknowledged by the broker"
    );
    if let Some(path) = &args.counts_out {
        let json = serde_json::to_vec_pretty(&counts).expect("counts serialise");
        std::fs::write(path, json).map_err(|source| SimulateError::Output {
            path: path.clone(),
            source,
        })?;
    }
    Ok(counts)
}

/// One truth line per impression of `serve`.
fn write_truth(out: &mut impl std::io::Write, serve: &Serve, p: &[f64]) -> std::io::Result<()> {
    for (ad, p) in serve.ads.iter().zip(p) {
        writeln!(
            out,
            "{{\"serve_id\":{},\"ad_id\":\"{}\",\"position\":{},\"ts_ms\":{},\"p\":{p}}}",
            serve.serve_id, ad.ad_id, ad.position, serve.ts_ms
        )?;
    }
    Ok(())
}
