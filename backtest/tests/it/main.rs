//! `ctr-backtest` on seeded synthetic traffic with known click probabilities (issue #7).

use std::path::{Path, PathBuf};

use ctr_backtest::{BacktestArgs, Format, backtest};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

/// `n` labeled impressions: 40 ads with CTRs from 1% to 9%, halved below position 1, doubled
/// for an ad's favourite device; clicks drawn from the true probability.
fn write_input(path: &Path, n: usize, bad_line_at: Option<usize>) {
    let mut rng = Pcg64Mcg::seed_from_u64(0x9e37_79b9_7f4a_7c15);
    let mut out = String::new();
    for i in 0..n {
        if Some(i) == bad_line_at {
            out.push_str("{\"ts_ms\": 1, \"ad_id\": \"broken\"\n");
        }
        let ad = (rng.random::<f64>() * 40.0) as usize;
        let position = 1 + (rng.random::<f64>() * 3.0) as usize;
        let device = ["mobile", "desktop"][(rng.random::<f64>() * 2.0) as usize];
        let mut p = 0.01 + 0.002 * ad as f64;
        if position > 1 {
            p /= 2.0;
        }
        if ad.is_multiple_of(2) == (device == "mobile") {
            p *= 2.0;
        }
        let clicked = rng.random::<f64>() < p;
        out.push_str(&format!(
            "{{\"ts_ms\":{},\"ad_id\":\"ad-{ad}\",\"position\":{position},\"context\":{{\"query_category\":\"q{}\",\"geo\":\"US\",\"device\":\"{device}\"}},\"clicked\":{clicked},\"ignored\":[1,2]}}\n",
            1_760_000_000_000i64 + i as i64 * 20,
            ad % 5
        ));
    }
    std::fs::write(path, out).unwrap();
}

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ctr-backtest-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn args(input: &Path, report: &Path) -> BacktestArgs {
    BacktestArgs {
        input: input.to_path_buf(),
        format: Format::LabeledJsonl,
        report: report.to_path_buf(),
        models: "counts,ftrl,combined".into(),
        sample_every: 5_000,
        dedupe_horizon_ms: 900_000,
        idle_ms: 3_600_000,
        window_ms: 30_000,
        grace_ms: 5_000,
        late_horizon_ms: 300_000,
        max_out_of_order_ms: 2_000,
        kafka: ctr_runtime::flags::KafkaFlags {
            brokers: String::new(),
            kafka_security_protocol: ctr_runtime::kafka::SecurityProtocol::Plaintext,
            kafka_ca_file: None,
            kafka_sasl_mechanism: "SCRAM-SHA-256".into(),
            kafka_sasl_username: None,
            kafka_sasl_password: None,
        },
        from: ctr_backtest::topic::Bound::Beginning,
        to: ctr_backtest::topic::Bound::End,
        partitions: None,
        layout_partitions: 1,
        batch_baseline: false,
        skip_invalid: false,
        no_progress: true,
    }
}

#[test]
fn a_backtest_reports_every_model_with_plots_and_is_deterministic() {
    let d = dir("report");
    let input = d.join("labeled.jsonl");
    write_input(&input, 80_000, None);
    let report = backtest(&args(&input, &d.join("r1"))).expect("backtest");
    assert_eq!(report.events, 80_000);
    let names: Vec<&str> = report.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["counts", "ftrl", "combined"]);
    for m in &report.models {
        let (ne, cal, auc) = (m.ne.unwrap(), m.calibration.unwrap(), m.auc.unwrap());
        assert!(ne < 1.0, "{}: NE {ne} must beat the average", m.name);
        // Progressive, warm-up included; the count model was at 0.94 with a position prior of
        // 1,000 pseudo-impressions (position bias over-estimated early and frozen into its
        // examination units), 0.97 at 100.
        assert!((cal - 1.0).abs() < 0.05, "{}: calibration {cal}", m.name);
        assert!(auc > 0.6, "{}: AUC {auc}", m.name);
        assert!(m.events_per_sec > 0.0);
    }

    // The files an analyst scripts against and looks at.
    let r1 = d.join("r1");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r1.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["events"], 80_000);
    for key in [
        "name",
        "log_loss",
        "ne",
        "auc",
        "calibration",
        "events_per_sec",
    ] {
        assert!(
            json["models"][0].get(key).is_some(),
            "report.json lacks {key}"
        );
    }
    let md = std::fs::read_to_string(r1.join("report.md")).unwrap();
    assert!(
        md.contains("| counts |") && md.contains("calibration.svg"),
        "{md}"
    );
    for svg in ["calibration.svg", "metrics.svg"] {
        let text = std::fs::read_to_string(r1.join(svg)).unwrap();
        assert!(
            text.starts_with("<svg") && text.contains("<polyline"),
            "{svg}"
        );
        assert!(text.contains("combined"), "{svg} has a legend");
    }
    let timeline: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r1.join("timeline.json")).unwrap()).unwrap();
    assert_eq!(
        timeline["models"][1]["points"].as_array().unwrap().len(),
        16
    );

    // Same input, same models: the same numbers (only the timing differs).
    let again = backtest(&args(&input, &d.join("r2"))).unwrap();
    let strip = |r: &ctr_backtest::report::Report| {
        r.models
            .iter()
            .map(|m| (m.name.clone(), m.log_loss, m.ne, m.auc, m.calibration))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&report), strip(&again));
}

/// Issue 18: a log whose contexts have none of the search-ad field names (`query_category`,
/// `geo`, `device`) is replayed, and its fields are learned like any others.
#[test]
fn a_log_with_other_context_fields_is_replayed_and_its_fields_learned() {
    let d = dir("fields");
    let input = d.join("labeled.jsonl");
    write_input(&input, 40_000, None);
    let renamed = std::fs::read_to_string(&input)
        .unwrap()
        .replace("\"query_category\":", "\"segment\":")
        .replace("\"geo\":", "\"region\":")
        .replace("\"device\":", "\"placement\":");
    assert!(!renamed.contains("device"));
    std::fs::write(&input, renamed).unwrap();
    let report = backtest(&args(&input, &d.join("r"))).expect("backtest");
    assert_eq!(report.events, 40_000);
    // The same log with `placement` (the device, which doubles an ad's rate on its favourite
    // one) made constant: every model must lose what that field told it (measured: NE 0.010
    // worse for counts and combined, 0.003 for FTRL, which learns it through its ad × field
    // crosses; the data are seeded).
    let blind = d.join("blind.jsonl");
    let text = std::fs::read_to_string(&input).unwrap();
    let text = text
        .replace("\"placement\":\"mobile\"", "\"placement\":\"any\"")
        .replace("\"placement\":\"desktop\"", "\"placement\":\"any\"");
    std::fs::write(&blind, text).unwrap();
    let without = backtest(&args(&blind, &d.join("b"))).expect("backtest");
    for (m, b) in report.models.iter().zip(&without.models) {
        let (ne, ne_blind) = (m.ne.unwrap(), b.ne.unwrap());
        println!(
            "{}: NE {ne:.4} with the field, {ne_blind:.4} without",
            m.name
        );
        assert!(ne < 1.0, "{}: NE {ne}", m.name);
        assert!(
            ne < ne_blind - 0.002,
            "{}: NE {ne} with the field, {ne_blind} without",
            m.name
        );
    }
}

#[test]
fn a_bad_line_stops_the_backtest_with_its_number_unless_skipped() {
    let d = dir("bad");
    let input = d.join("labeled.jsonl");
    write_input(&input, 3_000, Some(1_234));
    let err = backtest(&args(&input, &d.join("r")))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("line 1235: "), "{err}");
    let mut a = args(&input, &d.join("r"));
    a.skip_invalid = true;
    let report = backtest(&a).unwrap();
    assert_eq!(report.events, 3_000);
    let md = std::fs::read_to_string(d.join("r/report.md")).unwrap();
    assert!(
        md.contains("1 skipped") && md.contains("- line 1235: "),
        "{md}"
    );
    // Settings are checked before anything is read.
    a.models = "counts,neural".into();
    let err = backtest(&a).unwrap_err().to_string();
    assert!(err.contains("neural"), "{err}");
}

/// Raw serves and clicks are labeled by the joiner's state machine: one label per ad shown,
/// a click within the window makes it positive, a later one adds a correction, a duplicate
/// click changes nothing and an orphan is counted apart.
#[test]
fn raw_events_are_labeled_by_the_joiner_logic() {
    let d = dir("events");
    let input = d.join("events.jsonl");
    let t0 = 1_760_000_000_000i64;
    let mut lines = Vec::new();
    let mut rng = Pcg64Mcg::seed_from_u64(7);
    let (mut impressions, mut in_window, mut late) = (0u64, 0u64, 0u64);
    let mut pending: Vec<(i64, String)> = Vec::new();
    for i in 0..5_000i64 {
        let ts = t0 + i * 100;
        // Clicks whose time has come, in time order with the serves.
        pending.sort();
        while pending.first().is_some_and(|(t, _)| *t <= ts) {
            lines.push(pending.remove(0).1);
        }
        let ads: Vec<String> = (0..1 + i % 3)
            .map(|k| format!("ad-{}", (i + k * 7) % 20))
            .collect();
        let shown: Vec<String> = ads
            .iter()
            .enumerate()
            .map(|(k, a)| {
                format!(
                    r#"{{"ad_id":"{a}","campaign_id":"c","position":{},"bid":1.0}}"#,
                    k + 1
                )
            })
            .collect();
        lines.push(format!(
            r#"{{"type":"serve","serve_id":{},"ts_ms":{ts},"context":{{"query_category":"q","geo":"US","device":"mobile"}},"ads":[{}]}}"#,
            1_000 + i,
            shown.join(",")
        ));
        impressions += ads.len() as u64;
        if rng.random::<f64>() < 0.1 {
            let delay = if rng.random::<f64>() < 0.2 {
                60_000
            } else {
                2_000
            };
            if delay > 35_000 {
                late += 1
            } else {
                in_window += 1
            }
            let click = format!(
                r#"{{"type":"click","click_id":{},"serve_id":{},"ad_id":"{}","ts_ms":{}}}"#,
                900_000 + i,
                1_000 + i,
                ads[0],
                ts + delay
            );
            pending.push((ts + delay, click.clone()));
            // Every fifth click is sent twice.
            if i % 5 == 0 {
                pending.push((ts + delay + 10, click));
            }
        }
        if i % 1_000 == 999 {
            lines.push(format!(
                r#"{{"type":"click","click_id":{},"serve_id":77,"ad_id":"ad-1","ts_ms":{ts}}}"#,
                800_000 + i
            ));
        }
    }
    pending.sort();
    lines.extend(pending.into_iter().map(|(_, l)| l));
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();

    let mut a = args(&input, &d.join("r"));
    a.format = Format::EventsJsonl;
    let report = backtest(&a).expect("backtest");
    // One label per impression, plus one correction per late click.
    assert_eq!(report.events, impressions + late);
    let md = std::fs::read_to_string(d.join("r/report.md")).unwrap();
    let expect = format!("{in_window} clicks joined, {late} late clicks");
    assert!(md.contains(&expect), "{expect:?} in {md}");
    assert!(md.contains("5 orphan clicks"), "{md}");
}

/// The batch baseline fits `linfa-logistic` on the first half and scores the second; the
/// online variants are reported over the same second half (issue #7).
#[test]
fn the_batch_baseline_is_scored_on_the_second_half_beside_the_online_variants() {
    let d = dir("baseline");
    let input = d.join("labeled.jsonl");
    write_input(&input, 60_000, None);
    let mut a = args(&input, &d.join("r"));
    a.batch_baseline = true;
    let report = backtest(&a).expect("backtest with baseline");
    let b = report.baseline.as_ref().expect("a baseline section");
    assert_eq!(b.batch.split_at, 30_000);
    assert_eq!(b.batch.train_rows, 30_000);
    assert_eq!(b.batch.scored, 30_000);
    // 40 ads × 2 devices × positions: the one-hot vocabulary holds ad, position, each field
    // value and each ad × field value.
    assert!(b.batch.features > 100, "{}", b.batch.features);
    let (ne, cal, auc) = (
        b.batch.ne.unwrap(),
        b.batch.calibration.unwrap(),
        b.batch.auc.unwrap(),
    );
    assert!(
        ne < 0.97 && auc > 0.65,
        "the batch model learned the structure: NE {ne}, AUC {auc}"
    );
    assert!((cal - 1.0).abs() < 0.1, "calibration {cal}");
    assert_eq!(b.online_after_split.len(), 3);
    for m in &b.online_after_split {
        // Over the second half the online models are past their warm-up: no worse than over
        // the whole input.
        let whole = report.models.iter().find(|w| w.name == m.name).unwrap();
        assert!(
            m.ne.unwrap() <= whole.ne.unwrap() + 1e-3,
            "{}: {:?} vs {:?}",
            m.name,
            m.ne,
            whole.ne
        );
        assert!((m.calibration.unwrap() - 1.0).abs() < 0.1);
    }
    let md = std::fs::read_to_string(d.join("r/report.md")).unwrap();
    assert!(
        md.contains("## Batch baseline") && md.contains("linfa-logistic"),
        "{md}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("r/report.json")).unwrap()).unwrap();
    assert_eq!(json["baseline"]["batch"]["scored"], 30_000);
}

#[test]
fn a_partitioned_layout_learns_each_ad_in_its_partition_alone() {
    use ctr_backtest::run::{RunConfig, partition_of, run_labeled};
    let d = dir("layout");
    let input = d.join("labeled.jsonl");
    write_input(&input, 30_000, None);
    let replay = |partitions| {
        let cfg = RunConfig {
            partitions,
            ..RunConfig::new(ctr_scorer::config::parse_models("counts,ftrl,combined").unwrap())
        };
        let file = std::io::BufReader::new(std::fs::File::open(&input).unwrap());
        run_labeled(file, &cfg, |_| {}).unwrap()
    };
    let (whole, split, again) = (replay(1), replay(4), replay(4));
    assert_eq!(split.events, 30_000);
    // Records per partition, as the producers would place them.
    let mut per_partition = [0u64; 4];
    for line in std::fs::read_to_string(&input).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        per_partition[partition_of(v["ad_id"].as_str().unwrap(), 4) as usize] += 1;
    }
    assert!(per_partition.iter().all(|&n| n > 0), "{per_partition:?}");
    for ((one, s), a2) in whole.runs.iter().zip(&split.runs).zip(&again.runs) {
        assert_eq!((one.states.len(), s.states.len()), (1, 4));
        for (part, (a, b)) in s.states.iter().zip(&a2.states).enumerate() {
            // Deterministic.
            assert!(a.models() == b.models(), "{}: partition {part}", one.name);
            // Each partition learned from its own ads' records alone.
            let w = a.models().variants()[0].metrics().weight();
            assert_eq!(
                w, per_partition[part] as f64,
                "{}: partition {part}",
                one.name
            );
            for ad in 0..40 {
                let ad = format!("ad-{ad}");
                let here = a.total(&ad, None).imps > 0;
                assert_eq!(here, partition_of(&ad, 4) as usize == part, "{ad}");
            }
        }
        // Summed over the partitions, every record is scored once, as in one partition.
        assert_eq!(s.metrics().weight(), one.metrics().weight());
        assert_eq!(s.metrics().observed_ctr(), one.metrics().observed_ctr());
    }
}
