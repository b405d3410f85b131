//! A range of the labeled topic as a [`Source`]: the labels the live scorer consumed, read back
//! from Kafka.
//!
//! Read-only and invisible to the live system: partitions are assigned directly (no consumer
//! group joins, nothing is committed). The range is given per bound as `beginning`, `end`,
//! `offset:N` (the same offset in every partition) or `time:T` (Unix ms or RFC 3339, resolved
//! per partition by the broker's time index: the first record at or after T). The end is
//! exclusive. `end` means what the topic holds when the backtest starts: every partition is read
//! up to the high watermark it had then, and until nothing more arrives for a moment, because
//! some brokers (the local Tansu among them) report watermarks that lag what they serve.
//!
//! Partitions are merged by event time (ties by partition), so the replay is one stream, as a
//! file export of the same range would be. One partition (`--partitions P`) replays exactly what
//! the live owner of that partition learned from. Each partition has its own queue and only
//! the one whose next record is needed is polled, so memory holds one record per partition.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ctr_schemas::LabeledImpression;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::input::{BadLine, Next, Source};

/// One end of the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// The partition's first offset.
    Beginning,
    /// The partition's high watermark when the replay starts.
    End,
    /// This offset.
    Offset(i64),
    /// Unix ms.
    Time(i64),
}

impl std::str::FromStr for Bound {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "`{s}`: expected beginning, end, offset:N or time:T (Unix ms or RFC 3339, e.g. time:2026-11-30T00:00:00Z)"
            )
        };
        match s {
            "beginning" => Ok(Bound::Beginning),
            "end" => Ok(Bound::End),
            _ => {
                if let Some(n) = s.strip_prefix("offset:") {
                    n.parse::<i64>()
                        .ok()
                        .filter(|n| *n >= 0)
                        .map(Bound::Offset)
                        .ok_or_else(bad)
                } else if let Some(t) = s.strip_prefix("time:") {
                    match t.parse::<i64>() {
                        Ok(ms) if ms >= 0 => Ok(Bound::Time(ms)),
                        Ok(_) => Err(bad()),
                        Err(_) => humantime::parse_rfc3339(t)
                            .map_err(|_| bad())?
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| Bound::Time(d.as_millis() as i64))
                            .map_err(|_| bad()),
                    }
                } else {
                    Err(bad())
                }
            }
        }
    }
}

/// What to read.
#[derive(Debug, Clone)]
pub struct TopicRange {
    /// The brokers and how to reach them.
    pub kafka: ctr_runtime::kafka::KafkaConnection,
    /// The labeled topic.
    pub topic: String,
    /// `None`: every partition.
    pub partitions: Option<Vec<i32>>,
    /// Where to start.
    pub from: Bound,
    /// Where to stop.
    pub to: Bound,
    /// With `to = end`: once every partition reached its starting high watermark, stop after
    /// this long without a record.
    pub idle: Duration,
}

/// Why a range cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// A Kafka call failed.
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A range that cannot be read (the problem in words).
    #[error("{0}")]
    Range(String),
}

struct Partition {
    id: i32,
    queue: PartitionQueue<rdkafka::consumer::DefaultConsumerContext>,
    /// Exclusive end offset, if known; with `to = end` the starting high watermark.
    end: i64,
    /// `to = end`: after reaching `end`, keep reading until quiet.
    until_quiet: bool,
    /// Offset after the last record read.
    next_offset: i64,
    /// When this partition last delivered a record (or was opened).
    last_seen: Instant,
    /// The next record, decoded (or why it could not be).
    head: Option<(i64, Next)>,
    done: bool,
    read: u64,
}

/// The labeled topic's range, merged by event time.
pub struct LabeledTopic {
    consumer: Arc<BaseConsumer>,
    partitions: Vec<Partition>,
    idle: Duration,
}

impl std::fmt::Debug for LabeledTopic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabeledTopic")
            .field(
                "partitions",
                &self.partitions.iter().map(|p| p.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

const TIMEOUT: Duration = Duration::from_secs(10);

impl LabeledTopic {
    /// A consumer positioned at the range's start in every partition it covers.
    pub fn open(range: &TopicRange) -> Result<Self, TopicError> {
        let consumer: BaseConsumer = range
            .kafka
            .client()
            // A group ID is required by librdkafka; it is never joined (partitions are
            // assigned) and nothing is committed.
            .set("group.id", format!("ctr-backtest-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .create()?;
        let consumer = Arc::new(consumer);
        let meta = consumer.fetch_metadata(Some(&range.topic), TIMEOUT)?;
        let all: Vec<i32> = meta
            .topics()
            .iter()
            .filter(|t| t.name() == range.topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if all.is_empty() {
            return Err(TopicError::Range(format!(
                "topic {} not found or has no partitions",
                range.topic
            )));
        }
        let chosen = match &range.partitions {
            None => all.clone(),
            Some(want) => {
                if let Some(p) = want.iter().find(|p| !all.contains(p)) {
                    return Err(TopicError::Range(format!(
                        "topic {} has no partition {p} (it has {all:?})",
                        range.topic
                    )));
                }
                want.clone()
            }
        };
        let times = |ms: i64| -> Result<Vec<Option<i64>>, TopicError> {
            let mut tpl = TopicPartitionList::new();
            for &p in &chosen {
                tpl.add_partition_offset(&range.topic, p, Offset::Offset(ms))?;
            }
            let found = consumer.offsets_for_times(tpl, TIMEOUT)?;
            Ok(chosen
                .iter()
                .map(
                    |&p| match found.find_partition(&range.topic, p).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => Some(o),
                        // No record at or after the time.
                        _ => None,
                    },
                )
                .collect())
        };
        let from_times = match range.from {
            Bound::Time(ms) => Some(times(ms)?),
            _ => None,
        };
        let to_times = match range.to {
            Bound::Time(ms) => Some(times(ms)?),
            _ => None,
        };
        let mut tpl = TopicPartitionList::new();
        let mut plan = Vec::new();
        for (i, &p) in chosen.iter().enumerate() {
            let (low, high) = consumer.fetch_watermarks(&range.topic, p, TIMEOUT)?;
            let start = match range.from {
                Bound::Beginning => low,
                Bound::End => high,
                Bound::Offset(o) => o.clamp(low, high),
                Bound::Time(_) => from_times.as_ref().expect("resolved")[i].unwrap_or(high),
            };
            let end = match range.to {
                Bound::Beginning => low,
                Bound::End => high,
                Bound::Offset(o) => o.max(low),
                Bound::Time(_) => to_times.as_ref().expect("resolved")[i].unwrap_or(high),
            };
            tpl.add_partition_offset(&range.topic, p, Offset::Offset(start))?;
            plan.push((p, start, end));
        }
        // Each partition gets its own queue before the assignment starts fetching. Split after
        // it, a fetch that lands first goes to the consumer's queue (librdkafka#3231): a replay
        // under load once waited 60 s on a partition whose records had all gone there. A queue
        // split by the application stays split (librdkafka marks it and the fetch start leaves
        // it alone), and this consumer is assigned once.
        let mut partitions = Vec::new();
        for (p, start, end) in plan {
            let queue = consumer
                .split_partition_queue(&range.topic, p)
                .ok_or_else(|| TopicError::Range(format!("cannot read partition {p}")))?;
            partitions.push(Partition {
                id: p,
                queue,
                end,
                until_quiet: range.to == Bound::End,
                next_offset: start,
                last_seen: Instant::now(),
                head: None,
                done: start >= end && range.to != Bound::End,
                read: 0,
            });
        }
        consumer.assign(&tpl)?;
        Ok(Self {
            consumer,
            partitions,
            idle: range.idle,
        })
    }

    /// Fills every unfinished partition's head; `Err` when the broker stops answering.
    fn fill(&mut self) -> Result<(), std::io::Error> {
        let stalled_after = Duration::from_secs(60);
        for i in 0..self.partitions.len() {
            loop {
                let part = &mut self.partitions[i];
                if part.done || part.head.is_some() {
                    break;
                }
                // Serve the consumer's events. Its errors are transient ones librdkafka retries
                // (a partition that stays silent is caught below). Records never arrive there
                // (every partition has its own queue); one that did would be lost, so it is an
                // error rather than dropped.
                if let Some(Ok(stray)) = self.consumer.poll(Duration::ZERO) {
                    return Err(std::io::Error::other(format!(
                        "partition {} offset {} arrived outside its partition's queue",
                        stray.partition(),
                        stray.offset()
                    )));
                }
                let polled = part.queue.poll(Duration::from_millis(100));
                let Some(msg) = polled else {
                    let quiet = part.last_seen.elapsed();
                    if part.until_quiet && part.next_offset >= part.end && quiet >= self.idle {
                        part.done = true;
                    } else if quiet > stalled_after {
                        return Err(std::io::Error::other(format!(
                            "partition {} delivered nothing for 60 s at offset {} (range ends at {})",
                            part.id, part.next_offset, part.end
                        )));
                    }
                    continue;
                };
                let msg = msg.map_err(|e| std::io::Error::other(format!("Kafka: {e}")))?;
                part.last_seen = Instant::now();
                let offset = msg.offset();
                if offset >= part.end && !part.until_quiet {
                    part.done = true;
                    break;
                }
                part.next_offset = offset + 1;
                part.read += 1;
                let at = || format!("partition {} offset {offset}", part.id);
                let next: Next = match msg.payload() {
                    None => Err(Ok(BadLine {
                        at: at(),
                        problem: "no payload".into(),
                    })),
                    Some(bytes) => match ctr_schemas::decode::<LabeledImpression>(bytes) {
                        Ok(l) => match l.validate() {
                            Ok(()) => Ok(Some(l)),
                            Err(e) => Err(Ok(BadLine {
                                at: at(),
                                problem: e.to_string(),
                            })),
                        },
                        Err(e) => Err(Ok(BadLine {
                            at: at(),
                            problem: e.to_string(),
                        })),
                    },
                };
                let ts = match &next {
                    Ok(Some(l)) => l.ts_ms,
                    _ => i64::MIN, // a bad record is reported as soon as it is read
                };
                part.head = Some((ts, next));
                if offset + 1 >= part.end && !part.until_quiet {
                    part.done = true;
                }
            }
        }
        Ok(())
    }

    /// Records the range holds as planned (the progress bar's length; with `to = end` a topic
    /// still being written holds more).
    pub fn records_in_range(&self) -> u64 {
        self.partitions
            .iter()
            .map(|p| (p.end - p.next_offset).max(0) as u64)
            .sum()
    }

    /// Records read per partition.
    pub fn read(&self) -> Vec<(i32, u64)> {
        self.partitions.iter().map(|p| (p.id, p.read)).collect()
    }
}

impl Source for LabeledTopic {
    fn next_labeled(&mut self) -> Next {
        self.fill().map_err(Err)?;
        let next = self
            .partitions
            .iter_mut()
            .filter(|p| p.head.is_some())
            .min_by_key(|p| (p.head.as_ref().map(|h| h.0), p.id));
        match next {
            Some(p) => p.head.take().expect("filtered").1,
            None => Ok(None),
        }
    }

    fn notes(&self) -> Vec<String> {
        let per: Vec<String> = self
            .read()
            .iter()
            .map(|(p, n)| format!("{p}: {n}"))
            .collect();
        vec![format!("records read per partition: {}", per.join(", "))]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_parse() {
        assert_eq!("beginning".parse(), Ok(Bound::Beginning));
        assert_eq!("end".parse(), Ok(Bound::End));
        assert_eq!("offset:42".parse(), Ok(Bound::Offset(42)));
        assert_eq!(
            "time:1764460800000".parse(),
            Ok(Bound::Time(1_764_460_800_000))
        );
        assert_eq!(
            "time:2025-11-30T00:00:00Z".parse(),
            Ok(Bound::Time(1_764_460_800_000))
        );
        for bad in ["", "offset:-1", "offset:x", "time:yesterday", "42"] {
            assert!(bad.parse::<Bound>().is_err(), "{bad}");
        }
    }
}
