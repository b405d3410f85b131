//! Serving quality (issue 16): the ranking API's pCTR for held-out requests, scored against
//! the simulator's truth, beside Vowpal Wabbit trained on the same labeled stream and asked
//! at request time, in the same run.
//!
//! Run: `scripts/bench-serving` (stack up, release binaries, VW from PyPI into `.run/venv`).
//!
//! The market: `ctr-ingest simulate` with 500 ads in 60 campaigns, contexts of 8 query
//! categories × 6 geos × 3 devices × 24 hours (3,456; with the ads, 1.7M (ad, context)
//! pairs), drift and a daily cycle on, 150,000 serves (~375k impressions) over ~14 h of event
//! time, through the real joiner into the real scorer (defaults: `combined` serves). The
//! held-out requests: the next 4,000 serves' contexts (the simulator rebuilt here from the
//! same settings runs on past the stream), each with 8 distinct candidates drawn uniformly
//! from the market (with their campaigns and bids); the truth is the simulator's click
//! probability of each at the top slot at that time. Scored: normalized entropy against the
//! truth (mean cross-entropy of the estimate under the true probability, over the entropy of
//! the mean true rate), calibration (sum of estimates / sum of truths), and the share of the
//! oracle's expected revenue that choosing the top 3 by bid × pCTR captures (the oracle
//! chooses by bid × truth).

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::time::Duration;

use clap::Parser;
use ctr_e2e::*;
use ctr_ingest::sim::{SimEvent, Simulator};
use ctr_ingest::simulate::{SimulateArgs, sim_config};
use ctr_schemas::{LabelKind, LabeledImpression, decode};

const SERVES: u64 = 150_000;
const HELD_OUT: usize = 4_000;
const CANDIDATES: usize = 8;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: SimulateArgs,
}

fn sim_args(serves_topic: &str, clicks_topic: &str) -> Vec<String> {
    vec![
        format!("--brokers={}", brokers()),
        format!("--serves-topic={serves_topic}"),
        format!("--clicks-topic={clicks_topic}"),
        "--seed=77".into(),
        "--rate=0".into(),
        // 150,000 serves over ~14 h of event time: every hour of the day is seen.
        "--sim-rate=3".into(),
        "--ads=500".into(),
        "--campaigns=60".into(),
        "--start-ms=1760000000000".into(),
        "--click-delay-min-ms=50".into(),
        "--click-delay-max-ms=3000".into(),
        "--burst-every-s=0".into(),
    ]
}

/// Cross-entropy of estimate `q` under true probability `p`.
fn xent(p: f64, q: f64) -> f64 {
    let q = q.clamp(1e-9, 1.0 - 1e-9);
    -(p * q.ln() + (1.0 - p) * (1.0 - q).ln())
}

struct Scores {
    ne: f64,
    calibration: f64,
    revenue_share: f64,
}

/// Scores estimates `q[r][c]` of request `r`'s candidate `c` against truths `p` with bids.
fn score(p: &[Vec<f64>], q: &[Vec<f64>], bids: &[Vec<f64>]) -> Scores {
    let n = p.iter().map(Vec::len).sum::<usize>() as f64;
    let mean_p = p.iter().flatten().sum::<f64>() / n;
    let base = xent(mean_p, mean_p);
    let ce: f64 = p
        .iter()
        .flatten()
        .zip(q.iter().flatten())
        .map(|(p, q)| xent(*p, *q))
        .sum::<f64>()
        / n;
    let top3 = |key: &[f64], bids: &[f64]| -> Vec<usize> {
        let mut idx: Vec<usize> = (0..key.len()).collect();
        idx.sort_by(|&a, &b| (bids[b] * key[b]).total_cmp(&(bids[a] * key[a])));
        idx.truncate(3);
        idx
    };
    let (mut chosen, mut oracle) = (0.0, 0.0);
    for ((p, q), b) in p.iter().zip(q).zip(bids) {
        chosen += top3(q, b).iter().map(|&i| b[i] * p[i]).sum::<f64>();
        oracle += top3(p, b).iter().map(|&i| b[i] * p[i]).sum::<f64>();
    }
    Scores {
        ne: ce / base,
        calibration: q.iter().flatten().sum::<f64>() / p.iter().flatten().sum::<f64>(),
        revenue_share: chosen / oracle,
    }
}

fn main() {
    let python = std::env::var("CTR_PEERS_PYTHON")
        .expect("CTR_PEERS_PYTHON: a Python with vowpalwabbit (scripts/bench-serving sets it)");
    let base = unique("quality");
    let (serves, clicks, labeled, dead) = (
        format!("{base}.serves"),
        format!("{base}.clicks"),
        format!("{base}.labeled"),
        format!("{base}.deadletter"),
    );
    create_topics(&[(&serves, 4), (&clicks, 4), (&labeled, 4), (&dead, 1)]);
    let prefix = format!("{base}:");
    let feedback = start_feedback(
        [&serves, &clicks, &labeled, &dead],
        &format!("{base}-feedback"),
        &prefix,
        &redis_url(),
        free_port(),
        &FAST_JOIN,
    );
    let port = free_port();
    let scorer = start_scorer(&labeled, &format!("{base}-scorer"), &prefix, port, &[]);
    let mut args = vec!["simulate".to_string()];
    args.extend(sim_args(&serves, &clicks));
    args.push(format!("--serves={SERVES}"));
    Service::start("simulate", "ctr-ingest", &args).wait_success(Duration::from_secs(900));
    eprintln!("simulated {SERVES} serves; waiting for the labels to be learned");
    // Learned: the labeled topic stops growing and the replica reflects all of it.
    let mut last = -1;
    eventually(
        Duration::from_secs(900),
        "the pipeline to settle",
        || {
            std::thread::sleep(Duration::from_secs(3));
            let size = topic_size(&labeled);
            let body = http_get(&format!("http://127.0.0.1:{port}/readyz"))?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let reflected: i64 = v["replica"]["partitions"]
                .as_array()?
                .iter()
                .map(|p| p["version"].as_i64().unwrap_or(-1) + 1)
                .sum();
            let settled = size == last && reflected >= size && size > 0;
            last = size;
            settled.then_some(())
        },
        || format!("{}\n{}", feedback.output(), scorer.output()),
    );

    // Held-out requests from the same market, after the stream.
    let cli = Cli::parse_from(std::iter::once("sim".to_string()).chain(sim_args("s", "c")));
    let mut sim = Simulator::new(sim_config(&cli.args), None).expect("the market");
    let mut seen = 0u64;
    let mut rng = Rng(12_345);
    let (mut truth, mut bids, mut requests) = (Vec::new(), Vec::new(), Vec::new());
    for event in sim.by_ref() {
        let SimEvent::Serve(s) = event else { continue };
        seen += 1;
        if seen <= SERVES {
            continue;
        }
        truth.push(Vec::new());
        bids.push(Vec::new());
        requests.push((s.context.clone(), Vec::new(), s.ts_ms));
        if requests.len() == HELD_OUT {
            break;
        }
    }
    for (r, (ctx, candidates, ts)) in requests.iter_mut().enumerate() {
        let mut chosen = HashSet::new();
        while chosen.len() < CANDIDATES {
            chosen.insert((rng.next_u64() % sim.ads() as u64) as usize);
        }
        let mut chosen: Vec<usize> = chosen.into_iter().collect();
        chosen.sort_unstable();
        for idx in chosen {
            let (ad, campaign, bid) = sim.ad(idx);
            truth[r].push(sim.true_ctr(idx, ctx, 1, *ts));
            bids[r].push(bid);
            candidates.push((ad.to_string(), campaign.to_string()));
        }
    }

    // The API's answers.
    let mut served = Vec::new();
    for ((ctx, candidates, _), bids) in requests.iter().zip(&bids) {
        let mut fields: BTreeMap<String, String> = ctx.extra.clone();
        fields.insert("query_category".into(), ctx.query_category.clone());
        fields.insert("geo".into(), ctx.geo.clone());
        fields.insert("device".into(), ctx.device.clone());
        let body = serde_json::json!({
            "context": fields,
            "candidates": candidates.iter().zip(bids).map(|((ad, campaign), bid)| serde_json::json!({
                "ad_id": ad, "campaign_id": campaign, "bid": bid,
            })).collect::<Vec<_>>(),
        });
        let (status, text) = http_post_json(
            &format!("http://127.0.0.1:{port}/v1/rank"),
            &body.to_string(),
        );
        assert_eq!(status, 200, "{text}");
        let by_ad: BTreeMap<String, f64> = text
            .split("\"ad_id\":\"")
            .skip(1)
            .map(|r| {
                let ad = r[..r.find('"').unwrap()].to_string();
                (ad, json_f64(r, "pctr").unwrap())
            })
            .collect();
        served.push(
            candidates
                .iter()
                .map(|(ad, _)| by_ad[ad])
                .collect::<Vec<f64>>(),
        );
    }

    // Vowpal Wabbit on the labeled stream the scorer learned, asked the same questions.
    let dir = std::env::temp_dir().join(&base);
    std::fs::create_dir_all(&dir).unwrap();
    let mut labels: Vec<LabeledImpression> = read_topic(&labeled)
        .iter()
        .filter_map(|r| decode::<LabeledImpression>(&r.payload).ok())
        .filter(|l| l.kind == LabelKind::Label)
        .collect();
    labels.sort_by_key(|l| l.ts_ms);
    let mut ids = HashSet::new();
    labels.retain(|l| ids.insert(l.label_id.clone()));
    let context_json = |ctx: &ctr_schemas::Context| {
        let m: BTreeMap<&str, &str> = ctx.pairs().into_iter().collect();
        serde_json::to_value(m).unwrap()
    };
    let mut train =
        std::io::BufWriter::new(std::fs::File::create(dir.join("train.jsonl")).unwrap());
    for l in &labels {
        let line = serde_json::json!({
            "ad_id": l.ad_id, "campaign_id": l.campaign_id, "position": l.position,
            "context": context_json(&l.context), "clicked": l.clicked,
        });
        writeln!(train, "{line}").unwrap();
    }
    train.flush().unwrap();
    let mut queries =
        std::io::BufWriter::new(std::fs::File::create(dir.join("queries.jsonl")).unwrap());
    for (ctx, candidates, _) in &requests {
        for (ad, campaign) in candidates {
            let line = serde_json::json!({
                "ad_id": ad, "campaign_id": campaign, "context": context_json(ctx),
            });
            writeln!(queries, "{line}").unwrap();
        }
    }
    queries.flush().unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../backtest/peers/serve_vw.py");
    let status = std::process::Command::new(&python)
        .arg(&script)
        .arg(dir.join("train.jsonl"))
        .arg(dir.join("queries.jsonl"))
        .arg(dir.join("vw.txt"))
        .status()
        .expect("python");
    assert!(status.success(), "serve_vw.py failed");
    let vw_flat: Vec<f64> = std::fs::read_to_string(dir.join("vw.txt"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let vw: Vec<Vec<f64>> = vw_flat.chunks(CANDIDATES).map(<[f64]>::to_vec).collect();

    let (ours, peer, oracle) = (
        score(&truth, &served, &bids),
        score(&truth, &vw, &bids),
        score(&truth, &truth, &bids),
    );
    println!(
        "machine: {} cores; {} labels learned (VW trained on the same {}), {HELD_OUT} held-out requests × {CANDIDATES} candidates",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        topic_size(&labeled),
        labels.len()
    );
    println!("| estimate | NE vs truth | calibration | revenue share of the top 3 |");
    println!("|---|---|---|---|");
    for (name, s) in [
        ("the API (combined, from the replica)", &ours),
        ("Vowpal Wabbit, asked at request time", &peer),
        ("the truth", &oracle),
    ] {
        println!(
            "| {name} | {:.4} | {:.4} | {:.1}% |",
            s.ne,
            s.calibration,
            100.0 * s.revenue_share
        );
    }
    scorer.stop();
    feedback.stop();
}
