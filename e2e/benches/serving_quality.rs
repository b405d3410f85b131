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
//! same settings runs on past the stream), each with 8 distinct candidates (with their
//! campaigns and bids) drawn two ways, each scored on its own ([`Draw`]): uniformly from the
//! market, where most candidates are rare ads, and as the traffic draws the ads it shows. The
//! truth is the simulator's click probability of each at the top slot at the request's time
//! (the ads' drift as of the last held-out serve). Scored: normalized entropy against the
//! truth (mean cross-entropy of the estimate under the true probability, over the entropy of
//! the mean true rate), calibration (sum of estimates / sum of truths), and the share of the
//! oracle's expected revenue that choosing the top 3 by bid × pCTR captures (the oracle
//! chooses by bid × truth).
//!
//! A third row bounds what this much evidence allows: a learner told all of the truth but each
//! ad's base rate and favourite category ([`Informed`]), trained on the same labeled stream.
//! Where it falls short of a goal, no learner that must discover the rest is expected to meet
//! it.
//!
//! The header says how many clicks the joiner dead-lettered and how many of those were clicks
//! of real serves (the simulator also makes orphans on purpose): a lost click is a wrong
//! negative label that every row learns from, so a run that loses any is not clean.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::time::Duration;

use clap::Parser;
use ctr_e2e::*;
use ctr_ingest::sim::{
    BASE_CTR_MEDIAN, BASE_CTR_SIGMA, CATEGORIES, SimEvent, Simulator, category_lift,
};
use ctr_ingest::simulate::{SimulateArgs, sim_config};
use ctr_schemas::{Click, Context, LabelKind, LabeledImpression, decode};
use rand::SeedableRng;
use rand::distr::Distribution;
use rand::rngs::StdRng;

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

/// A learner told all of the truth but two things per ad (`ctr_ingest::sim`): its base click
/// rate (log-normal prior with the simulator's median and spread) and which query category is
/// its favourite (uniform prior; the lift there and elsewhere is told). Every other factor of
/// each impression's true probability (drift, daily cycle, device lean, position) is told: the
/// impression's `rest`, its truth over base × category lift. From the labeled stream it learns
/// the two unknowns jointly, by their exact posterior on a grid (Poisson likelihood of each
/// category's clicks given its exposure, Σ rest). Its pCTR is the posterior mean of base ×
/// lift, times the question's `rest`. The bench's ceiling: a learner knowing the answer's form
/// and everything but each ad's own two unknowns in advance, which no real learner does.
struct Informed {
    /// Per ad: the posterior mean of base × category lift, per query category.
    by_ad: HashMap<String, [f64; CATEGORY_COUNT]>,
    /// The same for an ad without labels: the prior's.
    unseen: [f64; CATEGORY_COUNT],
}

const CATEGORY_COUNT: usize = CATEGORIES.len();

/// Per ad and query category: clicks, and exposure (Σ of the impressions' `rest`).
type Evidence = [(f64, f64); CATEGORY_COUNT];

impl Informed {
    const GRID: usize = 241;

    fn lift(category: usize, favourite: usize) -> f64 {
        category_lift(category == favourite)
    }

    fn category(name: &str) -> usize {
        CATEGORIES
            .iter()
            .position(|c| *c == name)
            .expect("the simulator's categories")
    }

    fn learn(evidence: HashMap<String, Evidence>) -> Self {
        Self {
            by_ad: evidence
                .into_iter()
                .map(|(ad, e)| (ad, Self::posterior_mean(&e)))
                .collect(),
            unseen: Self::posterior_mean(&[(0.0, 0.0); CATEGORY_COUNT]),
        }
    }

    /// E[base × lift(category | favourite)] for every category, under the posterior of (base,
    /// favourite) given `evidence`.
    fn posterior_mean(evidence: &Evidence) -> [f64; CATEGORY_COUNT] {
        let (mu, sigma) = (BASE_CTR_MEDIAN.ln(), BASE_CTR_SIGMA);
        let grid: Vec<f64> = (0..Self::GRID)
            .map(|j| mu - 4.0 * sigma + 8.0 * sigma * j as f64 / (Self::GRID - 1) as f64)
            .collect();
        let log_post: Vec<[f64; CATEGORY_COUNT]> = grid
            .iter()
            .map(|g| {
                let base = g.exp();
                std::array::from_fn(|favourite| {
                    -0.5 * ((g - mu) / sigma).powi(2)
                        + evidence
                            .iter()
                            .enumerate()
                            .map(|(c, (clicks, exposure))| {
                                let rate = base * Self::lift(c, favourite);
                                clicks * rate.ln() - rate * exposure
                            })
                            .sum::<f64>()
                })
            })
            .collect();
        let top = log_post.iter().flatten().copied().fold(f64::MIN, f64::max);
        let (mut total, mut mean) = (0.0, [0.0; CATEGORY_COUNT]);
        for (g, row) in grid.iter().zip(&log_post) {
            for (favourite, lp) in row.iter().enumerate() {
                let w = (lp - top).exp();
                total += w;
                for (c, m) in mean.iter_mut().enumerate() {
                    *m += w * g.exp() * Self::lift(c, favourite);
                }
            }
        }
        mean.map(|m| m / total)
    }

    fn predict(&self, ad: &str, category: usize, rest: f64) -> f64 {
        self.by_ad.get(ad).unwrap_or(&self.unseen)[category] * rest
    }
}

/// Each impression's truth over its ad's base rate × category lift: what the ceiling learner
/// is told.
fn rest(sim: &Simulator, idx: usize, category: &str, truth: f64) -> f64 {
    let (base, favourite) = sim.ad_truth(idx);
    truth / (base * Informed::lift(Informed::category(category), favourite))
}

/// How a held-out request's candidates are drawn from the market's ads.
#[derive(Clone, Copy)]
enum Draw {
    /// Uniformly: most candidates are rare ads (the traffic is Zipf). The cold case.
    Uniform,
    /// As the traffic draws the ads it shows (the simulator's Zipf popularity): an ad is a
    /// candidate as often as it is shown, as in an auction whose eligible ads are the ones
    /// that get shown.
    AsTraffic,
}

impl Draw {
    fn describe(self) -> &'static str {
        match self {
            Draw::Uniform => "uniformly from the 500 ads",
            Draw::AsTraffic => "as the traffic draws its ads (Zipf popularity)",
        }
    }
}

/// The held-out questions of one draw: per request, its candidates (ad, campaign) with their
/// truths at the top slot, bids and the ceiling's `rest`.
struct Questions {
    candidates: Vec<Vec<(String, String)>>,
    truth: Vec<Vec<f64>>,
    bids: Vec<Vec<f64>>,
    rest: Vec<Vec<f64>>,
}

impl Questions {
    fn draw(sim: &Simulator, contexts: &[(Context, i64)], draw: Draw, rng: &mut Rng) -> Self {
        // The traffic's draw has its own generator, so the uniform draw's is as before.
        let mut popular = StdRng::seed_from_u64(54_321);
        let mut q = Questions {
            candidates: Vec::new(),
            truth: Vec::new(),
            bids: Vec::new(),
            rest: Vec::new(),
        };
        for (ctx, ts) in contexts {
            let mut chosen = HashSet::new();
            while chosen.len() < CANDIDATES {
                chosen.insert(match draw {
                    Draw::Uniform => (rng.next_u64() % sim.ads() as u64) as usize,
                    Draw::AsTraffic => sim.popularity().sample(&mut popular),
                });
            }
            let mut chosen: Vec<usize> = chosen.into_iter().collect();
            chosen.sort_unstable();
            let (mut candidates, mut truth, mut bids, mut rests) = (vec![], vec![], vec![], vec![]);
            for idx in chosen {
                let (ad, campaign, bid) = sim.ad(idx);
                let p = sim.true_ctr(idx, ctx, 1, *ts);
                candidates.push((ad.to_string(), campaign.to_string()));
                truth.push(p);
                bids.push(bid);
                rests.push(rest(sim, idx, &ctx.query_category, p));
            }
            q.candidates.push(candidates);
            q.truth.push(truth);
            q.bids.push(bids);
            q.rest.push(rests);
        }
        q
    }
}

/// The ranking API's pCTR for each candidate of `q`, asked one request at a time.
fn ask_api(port: u16, contexts: &[(Context, i64)], q: &Questions) -> Vec<Vec<f64>> {
    contexts
        .iter()
        .zip(q.candidates.iter().zip(&q.bids))
        .map(|((ctx, _), (candidates, bids))| {
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
            candidates.iter().map(|(ad, _)| by_ad[ad]).collect()
        })
        .collect()
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
    let mut contexts = Vec::new();
    // For the ceiling learner: each impression's truth but its ad's base rate and category lift.
    let index: HashMap<String, usize> = (0..sim.ads())
        .map(|i| (sim.ad(i).0.to_string(), i))
        .collect();
    let mut rest_of: HashMap<(i64, String), f64> = HashMap::new();
    while let Some(event) = sim.next() {
        let SimEvent::Serve(s) = event else { continue };
        seen += 1;
        if seen <= SERVES {
            for (shown, p) in s.ads.iter().zip(sim.last_serve_truth()) {
                let r = rest(&sim, index[&shown.ad_id], &s.context.query_category, *p);
                rest_of.insert((s.serve_id, shown.ad_id.clone()), r);
            }
            continue;
        }
        contexts.push((s.context.clone(), s.ts_ms));
        if contexts.len() == HELD_OUT {
            break;
        }
    }
    let mut rng = Rng(12_345);
    let drawn: Vec<(Draw, Questions)> = [Draw::Uniform, Draw::AsTraffic]
        .into_iter()
        .map(|draw| (draw, Questions::draw(&sim, &contexts, draw, &mut rng)))
        .collect();

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
    // Both draws' questions in one file, in order: one VW run answers them all.
    let mut queries =
        std::io::BufWriter::new(std::fs::File::create(dir.join("queries.jsonl")).unwrap());
    for (_, q) in &drawn {
        for ((ctx, _), candidates) in contexts.iter().zip(&q.candidates) {
            for (ad, campaign) in candidates {
                let line = serde_json::json!({
                    "ad_id": ad, "campaign_id": campaign, "context": context_json(ctx),
                });
                writeln!(queries, "{line}").unwrap();
            }
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
    let mut vw_answers = vw_flat.chunks(CANDIDATES).map(<[f64]>::to_vec);

    // The ceiling learner's evidence: each label's clicks and the rest of its truth.
    let mut evidence: HashMap<String, Evidence> = HashMap::new();
    for l in &labels {
        let rest = *rest_of
            .get(&(l.serve_id, l.ad_id.clone()))
            .expect("every label's impression is in the re-run (same seed and settings)");
        let e = &mut evidence.entry(l.ad_id.clone()).or_default()
            [Informed::category(&l.context.query_category)];
        e.0 += f64::from(u8::from(l.clicked));
        e.1 += rest;
    }
    let informed = Informed::learn(evidence);

    // The joiner's dead letters: the simulator's orphan clicks name serves that never
    // existed; a click of a real serve among them is a label lost (and its serve's label a
    // wrong negative), which every estimate here would learn from.
    let dead_letters = read_topic(&dead);
    let lost = dead_letters
        .iter()
        .filter_map(|r| decode::<Click>(&r.payload).ok())
        .filter(|c| rest_of.contains_key(&(c.serve_id, c.ad_id.clone())))
        .count();

    println!(
        "machine: {} cores; {} labels learned (VW trained on the same {}), {HELD_OUT} held-out requests × {CANDIDATES} candidates, drawn two ways",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        topic_size(&labeled),
        labels.len()
    );
    println!(
        "joiner: {} clicks dead-lettered, {lost} of them clicks of real serves (lost labels)",
        dead_letters.len()
    );
    for (draw, q) in &drawn {
        let served = ask_api(port, &contexts, q);
        let vw: Vec<Vec<f64>> = vw_answers.by_ref().take(contexts.len()).collect();
        let told: Vec<Vec<f64>> = contexts
            .iter()
            .zip(q.candidates.iter().zip(&q.rest))
            .map(|((ctx, _), (candidates, rest))| {
                let category = Informed::category(&ctx.query_category);
                candidates
                    .iter()
                    .zip(rest)
                    .map(|((ad, _), rest)| informed.predict(ad, category, *rest))
                    .collect()
            })
            .collect();
        println!("\ncandidates drawn {}:", draw.describe());
        println!("| estimate | NE vs truth | calibration | revenue share of the top 3 |");
        println!("|---|---|---|---|");
        for (name, estimate) in [
            ("the API (combined, from the replica)", &served),
            (
                "Vowpal Wabbit (rate chosen by its progressive loss), asked at request time",
                &vw,
            ),
            (
                "a learner told all but each ad's base rate and favourite category (the ceiling)",
                &told,
            ),
            ("the truth", &q.truth),
        ] {
            let s = score(&q.truth, estimate, &q.bids);
            println!(
                "| {name} | {:.4} | {:.4} | {:.1}% |",
                s.ne,
                s.calibration,
                100.0 * s.revenue_share
            );
        }
    }
    scorer.stop();
    feedback.stop();
}
