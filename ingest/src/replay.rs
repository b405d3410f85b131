//! `ctr-ingest replay` and `ctr-ingest export`: recorded traffic back into Kafka.
//!
//! Replay reads JSONL files (the adapter's JSON event format, one event per line, serves and
//! clicks mixed) or Avro object container files of `ctr.events.Serve` or `ctr.events.Click`
//! records (what `ctr-ingest export` writes, and what Kafka Connect's Avro sinks write), merges
//! the files by event time, and produces each event to the serves or clicks topic keyed by serve
//! ID, through the same idempotent, acks=all producer as the simulator. Pacing:
//!
//! - `--speed 1` (default): the original gaps between event times, in wall-clock time;
//! - `--speed N`: N times faster;
//! - `--speed max`: as fast as the broker takes them.
//!
//! Event times are kept unless `--retime` is given, which moves the first event to now and
//! scales the gaps by the speed, so a recording can feed a live pipeline. Each file is read as
//! a stream (bounded memory whatever its size). A bad line or record stops the replay with its
//! file and line, unless `--skip-invalid` (then each is counted and logged). Nothing is
//! reported as replayed before the broker acknowledged it.

use std::fs::File;
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ctr_schemas::{Click, IdGenerator, Serve, WireEvent};
use indicatif::{ProgressBar, ProgressStyle};
use serde_avro_fast::object_container_file_encoding::{Compression, Reader, WriterBuilder};
use tracing::{info, warn};

use crate::json::{Event, Kind, Preparer};
use crate::now_ms;
use crate::producer::{EventProducer, KafkaArgs, ProduceError};

/// How fast to replay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    /// Multiple of the original pace.
    Times(f64),
    /// As fast as the broker takes them.
    Max,
}

impl std::str::FromStr for Speed {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("max") {
            return Ok(Speed::Max);
        }
        let f: f64 = s
            .trim_end_matches(['x', 'X'])
            .parse()
            .map_err(|_| format!("speed {s:?}: a positive number (1 = original pace) or `max`"))?;
        if f.is_finite() && f > 0.0 {
            Ok(Speed::Times(f))
        } else {
            Err(format!("speed {s:?} must be > 0"))
        }
    }
}

/// Input file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// By extension: `.avro` is Avro, anything else JSONL.
    Auto,
    /// JSON Lines, one serve or click per line.
    Jsonl,
    /// Avro object container files of serves or clicks.
    Avro,
}

/// Settings of `ctr-ingest replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// The broker, the topics and the outage policy.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Files to replay, merged by event time.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Input format.
    #[arg(long, value_enum, default_value_t = Format::Auto)]
    pub format: Format,
    /// `1` = original pace, `N` = N times faster, `max` = as fast as possible.
    #[arg(long, default_value = "1")]
    pub speed: Speed,
    /// Move the first event to now and scale the gaps by the speed.
    #[arg(long)]
    pub retime: bool,
    /// Skip (count and log) invalid lines and records instead of stopping at the first.
    #[arg(long)]
    pub skip_invalid: bool,
    /// ID generator shard for events recorded without IDs.
    #[arg(long, default_value_t = 3)]
    pub shard: u32,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReplaySummary {
    /// Serves produced.
    pub serves: u64,
    /// Clicks produced.
    pub clicks: u64,
    /// Invalid lines and records skipped (`--skip-invalid`).
    pub skipped: u64,
    /// True if stopped by a signal before the end of the input.
    pub interrupted: bool,
}

/// Why a replay or export failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What reading it said.
        source: std::io::Error,
    },
    /// An invalid line or record.
    #[error("{path}: {at}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Where in it (line or record number).
        at: String,
        /// What is wrong.
        problem: String,
    },
    /// A file that is not Avro of serves or clicks.
    #[error("{path}: not a replayable Avro file: {problem}")]
    Avro {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The broker did not take an event.
    #[error(transparent)]
    Produce(#[from] ProduceError),
    /// An ID generator shard above 1023.
    #[error(transparent)]
    Shard(#[from] ctr_schemas::id::ShardOutOfRange),
    /// A Kafka client failed (export).
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// An export failed (the problem in words).
    #[error("{0}")]
    Export(String),
}

/// Counts the bytes read through it (progress of a file).
struct Counted<R> {
    inner: R,
    bytes: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes.set(self.bytes.get() + n as u64);
        Ok(n)
    }
}

type AvroReader = Reader<serde_avro_fast::de::read::ReaderRead<BufReader<Counted<File>>>>;

enum Input {
    Jsonl {
        lines: BufReader<Counted<File>>,
        line_no: u64,
        buf: String,
    },
    Avro {
        reader: Box<AvroReader>,
        kind: Kind,
        record_no: u64,
    },
}

/// One input file, read one event ahead.
struct Source {
    path: PathBuf,
    input: Input,
    bytes: std::rc::Rc<std::cell::Cell<u64>>,
    head: Option<Event>,
}

/// A line or record that failed, for `--skip-invalid`.
struct Bad {
    at: String,
    problem: String,
}

impl Source {
    fn open(path: &Path, format: Format) -> Result<Self, ReplayError> {
        let io = |source| ReplayError::Io {
            path: path.to_path_buf(),
            source,
        };
        let bytes = std::rc::Rc::new(std::cell::Cell::new(0));
        let file = Counted {
            inner: File::open(path).map_err(io)?,
            bytes: bytes.clone(),
        };
        let avro = match format {
            Format::Avro => true,
            Format::Jsonl => false,
            Format::Auto => path.extension().is_some_and(|e| e == "avro"),
        };
        let input = if avro {
            let reader =
                Reader::from_reader(BufReader::new(file)).map_err(|e| ReplayError::Avro {
                    path: path.to_path_buf(),
                    problem: e.to_string(),
                })?;
            let kind = record_kind(reader.schema().json()).ok_or_else(|| ReplayError::Avro {
                path: path.to_path_buf(),
                problem: "its records are neither ctr.events.Serve nor ctr.events.Click".into(),
            })?;
            Input::Avro {
                reader: Box::new(reader),
                kind,
                record_no: 0,
            }
        } else {
            Input::Jsonl {
                lines: BufReader::with_capacity(1 << 16, file),
                line_no: 0,
                buf: String::new(),
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            input,
            bytes,
            head: None,
        })
    }

    /// Reads the next event into `head`. `Err(Bad)` for an invalid line or record (the caller
    /// decides whether to stop); `Ok(false)` at the end of the file.
    fn advance(&mut self, preparer: &mut Preparer) -> Result<Result<bool, Bad>, ReplayError> {
        self.head = None;
        match &mut self.input {
            Input::Jsonl {
                lines,
                line_no,
                buf,
            } => loop {
                buf.clear();
                let n = lines.read_line(buf).map_err(|source| ReplayError::Io {
                    path: self.path.clone(),
                    source,
                })?;
                if n == 0 {
                    return Ok(Ok(false));
                }
                *line_no += 1;
                if buf.trim().is_empty() {
                    continue;
                }
                let at = || format!("line {line_no}");
                let value = match serde_json::from_str(buf) {
                    Ok(v) => v,
                    Err(e) => {
                        return Ok(Err(Bad {
                            at: at(),
                            problem: format!("not JSON: {e}"),
                        }));
                    }
                };
                // Recorded traffic: any event time is accepted, IDs are assigned only if absent.
                return Ok(match preparer.parse_value(value, now_ms()) {
                    Ok(e) => {
                        self.head = Some(e);
                        Ok(true)
                    }
                    Err(problem) => Err(Bad { at: at(), problem }),
                });
            },
            Input::Avro {
                reader,
                kind,
                record_no,
            } => {
                *record_no += 1;
                let at = format!("record {record_no}");
                let next = match kind {
                    Kind::Serve => reader
                        .deserialize_next::<Serve>()
                        .map(|o| o.map(Event::Serve)),
                    Kind::Click => reader
                        .deserialize_next::<Click>()
                        .map(|o| o.map(Event::Click)),
                };
                match next {
                    Ok(None) => Ok(Ok(false)),
                    // A damaged container cannot be read past the damage: stop either way.
                    Err(e) => Err(ReplayError::Invalid {
                        path: self.path.clone(),
                        at,
                        problem: e.to_string(),
                    }),
                    Ok(Some(event)) => Ok(match event.validate() {
                        Ok(()) => {
                            self.head = Some(event);
                            Ok(true)
                        }
                        Err(problem) => Err(Bad { at, problem }),
                    }),
                }
            }
        }
    }
}

/// `Serve` or `Click`, from an Avro schema's JSON.
fn record_kind(schema_json: &str) -> Option<Kind> {
    let v: serde_json::Value = serde_json::from_str(schema_json).ok()?;
    let name = v.get("name")?.as_str()?;
    let full = match v.get("namespace").and_then(|n| n.as_str()) {
        Some(ns) if !name.contains('.') => format!("{ns}.{name}"),
        _ => name.to_string(),
    };
    match full.as_str() {
        "ctr.events.Serve" => Some(Kind::Serve),
        "ctr.events.Click" => Some(Kind::Click),
        _ => None,
    }
}

/// A progress bar over `total` bytes of input (on stderr; indicatif hides it off a terminal),
/// or a hidden one. Also used by `ctr-backtest`.
pub fn progress_bar(total: u64, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {bytes}/{total_bytes} ({eta} left) {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

/// Replays `args.files` until their end or `shutdown`.
pub async fn replay(
    args: ReplayArgs,
    shutdown: impl Future<Output = ()>,
) -> Result<ReplaySummary, ReplayError> {
    let mut preparer = Preparer::new(IdGenerator::new(args.shard)?, None, usize::MAX);
    let mut sources = Vec::with_capacity(args.files.len());
    let mut total_bytes = 0;
    for path in &args.files {
        total_bytes += std::fs::metadata(path)
            .map_err(|source| ReplayError::Io {
                path: path.clone(),
                source,
            })?
            .len();
        sources.push(Source::open(path, args.format)?);
    }
    let mut summary = ReplaySummary::default();
    let mut skip_or_stop = |src: &Source, bad: Bad| -> Result<(), ReplayError> {
        if !args.skip_invalid {
            return Err(ReplayError::Invalid {
                path: src.path.clone(),
                at: bad.at,
                problem: bad.problem,
            });
        }
        summary.skipped += 1;
        warn!(file = %src.path.display(), at = %bad.at, problem = %bad.problem, "skipped");
        Ok(())
    };
    let fill = |src: &mut Source,
                preparer: &mut Preparer,
                skip: &mut dyn FnMut(&Source, Bad) -> Result<(), ReplayError>|
     -> Result<(), ReplayError> {
        loop {
            match src.advance(preparer)? {
                Ok(_) => return Ok(()),
                Err(bad) => skip(src, bad)?,
            }
        }
    };
    for src in &mut sources {
        fill(src, &mut preparer, &mut skip_or_stop)?;
    }

    let mut producer = EventProducer::new(&args.kafka, 100_000)?;
    let bar = progress_bar(total_bytes, args.no_progress);
    let started = Instant::now();
    let started_ms = now_ms();
    let mut first_ts: Option<i64> = None;
    let mut last_log = Instant::now();
    let mut sent = 0u64;
    tokio::pin!(shutdown);
    // The source whose next event is earliest (files are few: a scan is enough).
    let earliest = |sources: &[Source]| {
        (0..sources.len())
            .filter(|&i| sources[i].head.is_some())
            .min_by_key(|&i| sources[i].head.as_ref().map(Event::ts_ms))
    };
    while let Some(i) = earliest(&sources) {
        let mut event = sources[i].head.take().expect("filtered on head");
        let t0 = *first_ts.get_or_insert(event.ts_ms());
        let since_first = (event.ts_ms() - t0).max(0) as f64;
        if let Speed::Times(f) = args.speed {
            let due = started + Duration::from_secs_f64(since_first / f / 1000.0);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = &mut shutdown => { summary.interrupted = true; break; }
                }
            }
        } else if futures::poll!(&mut shutdown).is_ready() {
            summary.interrupted = true;
            break;
        }
        if args.retime {
            let scale = match args.speed {
                Speed::Times(f) => f,
                Speed::Max => 1.0,
            };
            event.set_ts_ms(started_ms + (since_first / scale) as i64);
        }
        let p = preparer
            .encode(&event)
            .map_err(|problem| ReplayError::Invalid {
                path: sources[i].path.clone(),
                at: "encoding".into(),
                problem,
            })?;
        let topic = match p.kind {
            Kind::Serve => &args.kafka.serves_topic,
            Kind::Click => &args.kafka.clicks_topic,
        };
        producer.send(topic, &p.key, &p.payload).await?;
        match p.kind {
            Kind::Serve => summary.serves += 1,
            Kind::Click => summary.clicks += 1,
        }
        sent += 1;
        fill(&mut sources[i], &mut preparer, &mut skip_or_stop)?;
        if sent.is_multiple_of(1024) {
            let read: u64 = sources.iter().map(|s| s.bytes.get()).sum();
            bar.set_position(read);
            let rate = sent as f64 / started.elapsed().as_secs_f64().max(1e-3);
            bar.set_message(format!("{sent} events, {rate:.0}/s"));
            if last_log.elapsed() >= Duration::from_secs(10) {
                last_log = Instant::now();
                info!(events = sent, per_sec = rate as u64, "replaying");
            }
        }
    }
    producer.flush().await?;
    bar.finish_and_clear();
    info!(
        serves = summary.serves,
        clicks = summary.clicks,
        skipped = summary.skipped,
        interrupted = summary.interrupted,
        secs = started.elapsed().as_secs_f64(),
        "replay finished; every replayed event acknowledged by the broker"
    );
    Ok(summary)
}

/// Settings of `ctr-ingest export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// The brokers and how to reach them (TLS, SASL), as for the services.
    #[command(flatten)]
    pub kafka: ctr_runtime::flags::KafkaFlags,
    /// Topic to export (serves or clicks).
    #[arg(long)]
    pub topic: String,
    /// What the topic holds.
    #[arg(long, value_enum)]
    pub kind: ExportKind,
    /// Output file (an Avro object container file, deflate-compressed).
    #[arg(long)]
    pub out: PathBuf,
    /// After every partition reached its starting high watermark, stop once nothing has
    /// arrived for this long, ms.
    #[arg(long, default_value_t = 1_500)]
    pub idle_ms: u64,
}

/// Which records a topic holds: serves or clicks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportKind {
    /// Serve events.
    Serve,
    /// Click events.
    Click,
}

/// What an export wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportSummary {
    /// Records written.
    pub records: u64,
    /// Undecodable or invalid records left out (each logged with partition and offset).
    pub skipped: u64,
}

/// Exports everything the topic holds now (every partition from its low watermark until it has
/// reached its high watermark and gone quiet) to an Avro container file written with the
/// record's newest schema. Invalid records are left out, each counted and logged.
pub async fn export(args: ExportArgs) -> Result<ExportSummary, ReplayError> {
    tokio::task::spawn_blocking(move || match args.kind {
        ExportKind::Serve => export_as::<Serve>(&args),
        ExportKind::Click => export_as::<Click>(&args),
    })
    .await
    .map_err(|e| ReplayError::Export(format!("export task failed: {e}")))?
}

fn export_as<E: WireEvent + Into<Event>>(args: &ExportArgs) -> Result<ExportSummary, ReplayError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};

    let kafka = args.kafka.clone().check().map_err(ReplayError::Export)?;
    let consumer: BaseConsumer = kafka
        .client()
        .set("group.id", format!("ctr-export-{}", now_ms()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let timeout = Duration::from_secs(10);
    let meta = consumer.fetch_metadata(Some(&args.topic), timeout)?;
    let partitions: Vec<i32> = meta
        .topics()
        .iter()
        .filter(|t| t.name() == args.topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(ReplayError::Export(format!(
            "topic {} not found or has no partitions",
            args.topic
        )));
    }
    let (_, schema) = ctr_schemas::wire::schema_by_id(E::WRITE_ID).expect("registered");
    let file = File::create(&args.out).map_err(|source| ReplayError::Io {
        path: args.out.clone(),
        source,
    })?;
    let io_err = |e: serde_avro_fast::ser::SerError| ReplayError::Export(format!("writing: {e}"));
    let mut writer =
        WriterBuilder::with_owned_config(serde_avro_fast::ser::SerializerConfig::new(schema))
            .compression(Compression::Deflate {
                level: Default::default(),
            })
            .build(std::io::BufWriter::new(file))
            .map_err(io_err)?;
    let mut summary = ExportSummary::default();
    // Every partition from its low watermark, all at once. The end: every partition has reached
    // the high watermark it had at the start, and then nothing has arrived for `idle_ms` (some
    // brokers, the local Tansu among them, report high watermarks that lag what they serve).
    let mut tpl = TopicPartitionList::new();
    let mut remaining = std::collections::BTreeMap::new();
    for &p in &partitions {
        let (low, high) = consumer.fetch_watermarks(&args.topic, p, timeout)?;
        tpl.add_partition_offset(&args.topic, p, Offset::Offset(low))?;
        if high > low {
            remaining.insert(p, high);
        }
    }
    consumer.assign(&tpl)?;
    let idle = Duration::from_millis(args.idle_ms);
    let mut last_record = Instant::now();
    let mut last_progress = Instant::now();
    loop {
        if remaining.is_empty() && last_record.elapsed() >= idle {
            break;
        }
        if last_progress.elapsed() > Duration::from_secs(60) {
            return Err(ReplayError::Export(format!(
                "no progress for 60 s; partitions not yet at their high watermark: {remaining:?}"
            )));
        }
        let Some(msg) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let msg = msg?;
        last_record = Instant::now();
        last_progress = Instant::now();
        if remaining
            .get(&msg.partition())
            .is_some_and(|&high| msg.offset() + 1 >= high)
        {
            remaining.remove(&msg.partition());
        }
        let decoded = ctr_schemas::decode::<E>(msg.payload().unwrap_or(&[]))
            .map_err(|e| e.to_string())
            .map(Into::into)
            .and_then(|e: Event| e.validate().map(|()| e));
        match decoded {
            Ok(event) => {
                match &event {
                    Event::Serve(s) => writer.serialize(s),
                    Event::Click(c) => writer.serialize(c),
                }
                .map_err(io_err)?;
                summary.records += 1;
            }
            Err(problem) => {
                summary.skipped += 1;
                warn!(partition = msg.partition(), offset = msg.offset(), %problem, "left out of the export");
            }
        }
    }
    let mut out = writer.into_inner().map_err(io_err)?;
    std::io::Write::flush(&mut out).map_err(|source| ReplayError::Io {
        path: args.out.clone(),
        source,
    })?;
    info!(records = summary.records, skipped = summary.skipped, out = %args.out.display(), "exported");
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speeds_parse() {
        assert_eq!("max".parse::<Speed>(), Ok(Speed::Max));
        assert_eq!("1".parse::<Speed>(), Ok(Speed::Times(1.0)));
        assert_eq!("10x".parse::<Speed>(), Ok(Speed::Times(10.0)));
        assert!("0".parse::<Speed>().is_err());
        assert!("fast".parse::<Speed>().is_err());
    }

    #[test]
    fn record_kinds_come_from_the_schema_name() {
        for r in ctr_schemas::wire::REGISTRY {
            let kind = record_kind(r.avsc);
            match r.kind {
                ctr_schemas::EventKind::Serve => assert_eq!(kind, Some(Kind::Serve)),
                ctr_schemas::EventKind::Click => assert_eq!(kind, Some(Kind::Click)),
                ctr_schemas::EventKind::Labeled => assert_eq!(kind, None),
            }
        }
    }
}
