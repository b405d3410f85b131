//! The backtest goes through the same code as live scoring (issue #7): a live scorer and
//! `ctr-backtest` over the same labeled records end with identical model state.

use std::io::Write;
use std::time::Duration;

use ctr_e2e::*;
use ctr_schemas::LabeledImpression;

#[test]
fn live_scorer_and_backtest_end_in_identical_model_state() {
    let topic = format!("{}.labeled", unique("bt"));
    create_topics(&[(&topic, 1)]);
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

    // Live: one scorer, no shedding, checkpointing often.
    stream.produce(None, |_| {});
    let prefix = format!("{}:", unique("bt"));
    let port = free_port();
    let scorer = start_scorer(
        &topic,
        &unique("bt-group"),
        &prefix,
        port,
        &["--shedding=false", "--checkpoint-ms=300", "--workers=1"],
    );
    let mut con = redis();
    let ckpt = format!("{prefix}scorer:ckpt:{topic}:0");
    let state: Vec<u8> = eventually(
        Duration::from_secs(120),
        "a checkpoint covering every record",
        || {
            let next: Option<i64> = redis::cmd("HGET")
                .arg(&ckpt)
                .arg("next")
                .query(&mut con)
                .ok()?;
            (next? >= n as i64).then(|| {
                redis::cmd("HGET")
                    .arg(&ckpt)
                    .arg("state")
                    .query(&mut con)
                    .unwrap()
            })
        },
        || scorer.output(),
    );
    scorer.stop();
    let live = ctr_scorer::state::PartitionState::restore(&state).expect("a checkpoint decodes");

    // Offline: the backtest's replay loop over the file.
    let cfg = ctr_backtest::run::RunConfig {
        models: ctr_scorer::config::parse_models("counts,ftrl,combined").unwrap(),
        dedupe_horizon_ms: 900_000,
        idle_ms: 3_600_000,
        sample_every: 10_000,
        skip_invalid: false,
    };
    let reader = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
    let bt = ctr_backtest::run::run_labeled(reader, &cfg, |_| {}).expect("backtest");
    assert!(bt.duplicates > 0, "the stream repeats some corrections");
    for run in &bt.runs {
        let offline = &run.state.models().variants()[0];
        let online = live.models().variant(&run.name).expect("live variant");
        assert!(
            online == offline,
            "variant {}: live and backtest states differ (live {} examples, backtest {})",
            run.name,
            online.metrics().weight(),
            offline.metrics().weight()
        );
        assert!(offline.metrics().weight() > 19_000.0);
    }
}
