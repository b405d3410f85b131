//! The backtest goes through the same code as live scoring (issue #7): a live scorer and
//! `ctr-backtest` over the same labeled records end with identical model state.

use std::io::Write;
use std::time::Duration;

use ctr_backtest::input::Source;
use ctr_backtest::topic::{Bound, LabeledTopic, TopicRange};
use ctr_e2e::*;
use ctr_schemas::LabeledImpression;

#[test]
fn live_scorer_and_backtest_end_in_identical_model_state() {
    identical_model_state(1, 1);
}

/// With the production layout (four partitions, two workers live), every
/// partition's state is the same live and offline: the backtest places each ad where the
/// producers' partitioner does, and the partitions learn alone on either side.
#[test]
fn live_scorer_and_backtest_agree_partition_by_partition() {
    identical_model_state(4, 2);
}

fn identical_model_state(partitions: u32, workers: usize) {
    let topic = format!("{}.labeled", unique("bt"));
    create_topics(&[(&topic, partitions as i32)]);
    // 20,000 labels with late-click corrections and their duplicates.
    let stream = labeled_stream(&topic, 20_000, 30, 11);
    let n = stream.records.len();

    // The same records as the backtest's labeled JSON lines.
    let dir = std::env::temp_dir().join(unique("bt"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("labeled.jsonl");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    for (_, _, payload) in &stream.records {
        let l: LabeledImpression = ctr_schemas::decode(payload).unwrap();
        let mut context: serde_json::Map<String, serde_json::Value> = l
            .context
            .pairs()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into()))
            .collect();
        context.sort_keys();
        let line = serde_json::json!({
            "ts_ms": l.ts_ms, "ad_id": l.ad_id, "position": l.position, "context": context,
            "clicked": l.clicked, "campaign_id": l.campaign_id, "label_id": l.label_id,
            "kind": l.kind,
        });
        writeln!(file, "{line}").unwrap();
    }
    file.flush().unwrap();
    drop(file);

    // Live: no shedding, checkpointing often.
    stream.produce(None, |_| {});
    let prefix = format!("{}:", unique("bt"));
    let port = free_port();
    let scorer = start_scorer(
        &topic,
        &unique("bt-group"),
        &prefix,
        port,
        &[
            "--shedding=false",
            "--checkpoint-ms=300",
            &format!("--workers={workers}"),
        ],
    );
    // Every partition's checkpoint, once together they cover every record (a fresh topic's
    // offsets start at 0, so a partition's next offset is its record count).
    let live: Vec<_> = eventually(
        Duration::from_secs(120),
        "checkpoints covering every record",
        || {
            let mut covered = 0i64;
            let mut states = Vec::new();
            for p in 0..partitions {
                let state = scorer_checkpoint(&prefix, &topic, p as i32)?;
                covered += state.next_offset?;
                states.push(state);
            }
            (covered >= n as i64).then_some(states)
        },
        || scorer.output(),
    );
    scorer.stop();

    // Offline: the backtest's replay loop over the file, in the same layout.
    let cfg = ctr_backtest::run::RunConfig {
        partitions,
        ..ctr_backtest::run::RunConfig::new(
            ctr_scorer::config::parse_models("counts,ftrl,combined").unwrap(),
        )
    };
    let reader = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
    let from_file = ctr_backtest::run::run_labeled(reader, &cfg, |_| {}).expect("backtest");
    // And from the topic itself, the whole range.
    let from_topic = ctr_backtest::run::run(
        LabeledTopic::open(&range(&topic, Bound::Beginning, Bound::End, None)).unwrap(),
        &cfg,
        |_| {},
    )
    .expect("backtest of the topic");
    for bt in [&from_file, &from_topic] {
        assert!(bt.duplicates > 0, "the stream repeats some corrections");
        assert_eq!(bt.events as usize, n);
        for run in &bt.runs {
            assert_eq!(run.states.len(), live.len());
            for (p, (offline, live)) in run.states.iter().zip(&live).enumerate() {
                let offline = &offline.models().variants()[0];
                let online = live.models().variant(&run.name).expect("live variant");
                assert!(
                    online == offline,
                    "variant {}, partition {p}: live and backtest states differ (live {} \
                     examples, backtest {})",
                    run.name,
                    online.metrics().weight(),
                    offline.metrics().weight()
                );
                if partitions > 1 {
                    assert!(offline.metrics().weight() > 0.0, "partition {p} learned");
                }
            }
            assert!(run.metrics().weight() > 19_000.0);
        }
    }
}

fn range(topic: &str, from: Bound, to: Bound, partitions: Option<Vec<i32>>) -> TopicRange {
    TopicRange {
        kafka: kafka_connection(),
        topic: topic.to_string(),
        partitions,
        from,
        to,
        idle: Duration::from_millis(1_500),
    }
}

/// Records a topic range replays: (count, records per partition, whether they came in event
/// time order).
fn replayed(r: &TopicRange) -> (u64, Vec<(i32, u64)>, bool) {
    let mut src = LabeledTopic::open(r).expect("range opens");
    let (mut n, mut last_ts, mut ordered) = (0, i64::MIN, true);
    while let Some(l) = src.next_labeled().expect("a valid label") {
        ordered &= l.ts_ms >= last_ts;
        last_ts = l.ts_ms;
        n += 1;
    }
    (n, src.read(), ordered)
}

#[test]
fn a_topic_range_by_offsets_times_and_partitions() {
    let topic = format!("{}.labeled", unique("btr"));
    create_topics(&[(&topic, 4)]);
    let first = labeled_stream_with(&topic, 4_000, 20, 5, false);
    first.produce(None, |_| {});
    std::thread::sleep(Duration::from_millis(1_500));
    let between = now_ms();
    std::thread::sleep(Duration::from_millis(1_500));
    let second = labeled_stream_with(&topic, 2_000, 20, 6, false);
    second.produce(None, |_| {});
    let total = (first.records.len() + second.records.len()) as u64;

    let (all, per, _) = replayed(&range(&topic, Bound::Beginning, Bound::End, None));
    assert_eq!(all, total);
    assert_eq!(per.len(), 4);
    // By broker time: the records produced after `between` are exactly the second batch, and
    // within a batch (event times rising) the partitions merge in event-time order.
    let (later, _, ordered) = replayed(&range(&topic, Bound::Time(between), Bound::End, None));
    assert_eq!(later, second.records.len() as u64);
    assert!(ordered, "merged by event time");
    let (earlier, _, ordered) =
        replayed(&range(&topic, Bound::Beginning, Bound::Time(between), None));
    assert_eq!(earlier, first.records.len() as u64);
    assert!(ordered, "merged by event time");
    // By offsets, the same in every partition: [100, 300) is 200 records per partition.
    let (middle, per, _) = replayed(&range(&topic, Bound::Offset(100), Bound::Offset(300), None));
    assert_eq!(middle, 800);
    assert!(per.iter().all(|&(_, n)| n == 200), "{per:?}");
    // One partition alone.
    let (one, per, _) = replayed(&range(&topic, Bound::Beginning, Bound::End, Some(vec![2])));
    assert_eq!(per, [(2, one)]);
    assert!(one > 0 && one < total);
    // The command line, as an analyst scripts it.
    let report = std::env::temp_dir().join(unique("btr-report"));
    let out = std::process::Command::new(bin("ctr-backtest"))
        .args([
            "--format",
            "labeled-topic",
            "--input",
            &topic,
            "--brokers",
            &brokers(),
        ])
        .args([
            "--from",
            "offset:100",
            "--to",
            "offset:300",
            "--no-progress",
        ])
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["events"], 800);
    let bad = std::process::Command::new(bin("ctr-backtest"))
        .args([
            "--format",
            "labeled-topic",
            "--input",
            &topic,
            "--from",
            "yesterday",
        ])
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("expected beginning, end, offset:N or time:T")
    );
    // A partition the topic does not have is a clear error.
    let err = LabeledTopic::open(&range(&topic, Bound::Beginning, Bound::End, Some(vec![9])))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no partition 9"), "{err}");
}
