//! Learner costs (issue #3). Run: `cargo bench -p ctr-models --bench learners`
//!
//! - `ftrl_<case>/learn_20`: one progressive-validation step (predict + update) of FTRL on 20
//!   hashed features. Cases by table size: `cold` ~2.7M coordinates (~100 MB, beyond any L3
//!   cache: most lookups are memory accesses), `warm` ~650k (23 MB: fits a large L3), `hot` 20k
//!   (in L2: the compute cost).
//! - `counts_<case>/update`: one impression into the hierarchical count model (touches 3 +
//!   fields keys); `cold` ~3M keys (~130 MB), `warm` ~440k (17 MB), `hot` ~15k.
//! - `stream/<variant>`: whole progressive validation (extract, predict, metrics, update) per
//!   labeled impression, for each variant.
//! - Memory per FTRL coordinate and per count key is printed before the runs.

// `criterion_group!` defines an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ctr_models::example::{Feature, combine};
use ctr_models::{
    CountModel, CountsConfig, Ftrl, FtrlConfig, Impression, ModelSet, VariantConfig, VariantKind,
};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

struct Owned {
    ad: String,
    campaign: String,
    position: u32,
    ctx: Vec<(&'static str, &'static str)>,
    ts: i64,
    clicked: bool,
}

const GEOS: [&str; 6] = ["US", "DE", "FR", "JP", "BR", "IN"];
const DEVICES: [&str; 3] = ["mobile", "desktop", "tablet"];
const CATS: [&str; 8] = [
    "travel",
    "electronics",
    "finance",
    "fashion",
    "autos",
    "health",
    "food",
    "sports",
];
const HOURS: [&str; 24] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    "17", "18", "19", "20", "21", "22", "23",
];

/// A stream like the simulator's: 10,000 ads, four context fields, ~2% CTR.
fn stream(n: usize) -> Vec<Owned> {
    stream_over(n, 10_000.0, &HOURS)
}

/// The same with `ads` ads and the given hour values (fewer of both = a cache-resident table).
fn stream_over(n: usize, ads: f64, hours: &[&'static str]) -> Vec<Owned> {
    let mut rng = Pcg64Mcg::seed_from_u64(1);
    (0..n)
        .map(|i| {
            let ad = (rng.random::<f64>().powi(3) * ads) as usize;
            Owned {
                ad: format!("ad-{ad:05}"),
                campaign: format!("camp-{:04}", ad % 500),
                position: rng.random_range(1..=4),
                ctx: vec![
                    ("geo", GEOS[rng.random_range(0..6)]),
                    ("device", DEVICES[rng.random_range(0..3)]),
                    ("query_category", CATS[rng.random_range(0..8)]),
                    ("hour", hours[rng.random_range(0..hours.len())]),
                ],
                ts: 1_760_000_000_000 + i as i64 * 5,
                clicked: rng.random_bool(0.02),
            }
        })
        .collect()
}

fn imp(o: &Owned) -> Impression<'_> {
    Impression {
        ad: &o.ad,
        campaign: &o.campaign,
        position: o.position,
        context: &o.ctx,
        ts_ms: o.ts,
    }
}

/// `n` examples of 20 features; each feature slot draws from `values` distinct keys with a skew
/// (square of a uniform), so the model holds up to 20 × `values` coordinates.
fn examples(n: usize, values: f64) -> Vec<Vec<Feature>> {
    let mut rng = Pcg64Mcg::seed_from_u64(2);
    (0..n)
        .map(|_| {
            (0..20u64)
                .map(|slot| {
                    let v = (rng.random::<f64>().powi(2) * values) as u64;
                    Feature {
                        key: combine(slot, v),
                        value: 1.0,
                    }
                })
                .collect()
        })
        .collect()
}

fn ftrl(c: &mut Criterion) {
    for (name, n, values) in [
        ("cold", 1 << 19, 1_000_000.0),
        ("warm", 1 << 16, 50_000.0),
        ("hot", 1 << 16, 1_000.0),
    ] {
        ftrl_case(c, name, &examples(n, values));
    }
}

fn ftrl_case(c: &mut Criterion, name: &str, examples: &[Vec<Feature>]) {
    let mut model = Ftrl::new(FtrlConfig {
        admit_after: 1,
        ..FtrlConfig::default()
    })
    .unwrap();
    for (i, e) in examples
        .iter()
        .cycle()
        .take(1_000_000.max(examples.len()))
        .enumerate()
    {
        model.learn(e, i % 50 == 0, 1.0, i as i64).unwrap();
    }
    eprintln!(
        "ftrl {name}: {} coordinates, {:.1} bytes per coordinate (+ {} bytes admission filter when enabled)",
        model.coordinates(),
        model.bytes_per_coordinate(),
        Ftrl::new(FtrlConfig::default()).unwrap().filter_bytes()
    );
    let mut g = c.benchmark_group(format!("ftrl_{name}"));
    g.throughput(Throughput::Elements(1));
    let mask = examples.len() - 1;
    let mut i = 0usize;
    g.bench_function("learn_20", |b| {
        b.iter(|| {
            i = (i + 1) & mask;
            black_box(
                model
                    .learn(&examples[i], i.is_multiple_of(50), 1.0, 2_000_000)
                    .unwrap(),
            )
        })
    });
    g.bench_function("predict_20", |b| {
        b.iter(|| {
            i = (i + 1) & mask;
            black_box(model.predict(&examples[i]))
        })
    });
    g.finish();
}

fn counts(c: &mut Criterion) {
    // Cold: 200,000 ads over 2M impressions. Warm: 10,000 ads (the whole-stream data). Hot:
    // 50 ads and 2 hour values, a few thousand keys.
    counts_case(c, "cold", &stream_over(2_000_000, 200_000.0, &HOURS));
    counts_case(c, "warm", &stream(200_000));
    counts_case(c, "hot", &stream_over(200_000, 50.0, &HOURS[..2]));
}

fn counts_case(c: &mut Criterion, name: &str, data: &[Owned]) {
    let mut model = CountModel::new(CountsConfig::default()).unwrap();
    for o in data {
        model.update(&imp(o), o.clicked, 1.0).unwrap();
    }
    // Keys per impression: campaign, ad, one per context field, the full context.
    eprintln!(
        "counts {name}: {} keys, {:.1} bytes per key; an impression updates {} keys",
        model.keys(),
        model.bytes_per_key(),
        3 + data[0].ctx.len()
    );
    let mut g = c.benchmark_group(format!("counts_{name}"));
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("update", |b| {
        b.iter(|| {
            i = (i + 1) % data.len();
            let o = &data[i];
            model.update(black_box(&imp(o)), o.clicked, 1.0).unwrap()
        })
    });
    g.bench_function("predict", |b| {
        b.iter(|| {
            i = (i + 1) % data.len();
            black_box(model.predict(&imp(&data[i])))
        })
    });
    g.finish();
}

fn whole_stream(c: &mut Criterion) {
    let data = stream(200_000);
    let mut g = c.benchmark_group("stream");
    g.throughput(Throughput::Elements(data.len() as u64));
    g.sample_size(10);
    for kind in [
        VariantKind::Counts,
        VariantKind::Ftrl,
        VariantKind::Combined,
    ] {
        let cfg = VariantConfig::of(kind);
        g.bench_function(cfg.name.clone(), |b| {
            b.iter(|| {
                let mut set = ModelSet::new(vec![cfg.clone()]).unwrap();
                for o in &data {
                    set.learn(&imp(o), o.clicked, 1.0).unwrap();
                }
                black_box(set.examples())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, ftrl, counts, whole_stream);
criterion_main!(benches);
