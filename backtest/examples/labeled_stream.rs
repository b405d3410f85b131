//! Writes a seeded stream of labeled impressions as JSON lines to stdout (the backtest's
//! `labeled-jsonl` format), for measuring `ctr-backtest` on inputs too large to keep as files:
//!
//!   cargo run --release -p ctr-backtest --example labeled_stream -- RECORDS [HOURS] | ctr-backtest --input /dev/stdin ...
//!
//! 10,000 ads with Zipf popularity in 500 campaigns; four context fields (6 geos, 3 devices, 8
//! categories, and `HOURS` hour-of-day values, default 24); positions 1–4 with a position
//! effect; a true CTR per ad around 2%; event time advancing 5 ms per record; unique label IDs.
//! The distinct (ad, context) keys, what the count model and the exact totals grow with, are
//! at most 10,000 × 144 × HOURS.

use std::io::Write;

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

// The live simulator's vocabulary, so the two streams describe the same marketplace.
use ctr_ingest::sim::{CATEGORIES, DEVICES, GEOS};

fn main() -> std::io::Result<()> {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let hours: u64 = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .filter(|h| (1..=24).contains(h))
        .unwrap_or(24);
    let mut rng = Pcg64Mcg::seed_from_u64(0x5eed_1abe_11ed_0001);
    let ads = 10_000usize;
    let ctr: Vec<f64> = (0..ads)
        .map(|i| 0.01 + 0.02 * ((i * 37) % 100) as f64 / 100.0)
        .collect();
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, out.lock());
    for i in 0..n {
        let ad = (rng.random::<f64>().powi(3) * ads as f64) as usize;
        let pos = 1 + (rng.random::<f64>() * 4.0) as usize;
        let geo = GEOS[(rng.random::<f64>() * GEOS.len() as f64) as usize];
        let device = DEVICES[(rng.random::<f64>() * DEVICES.len() as f64) as usize];
        let cat = CATEGORIES[(rng.random::<f64>() * CATEGORIES.len() as f64) as usize];
        let hour = (i / 720_000) % hours; // an hour of event time is 720,000 records at 5 ms
        let p =
            ctr[ad] * [1.0, 0.7, 0.5, 0.35][pos - 1] * if device == "mobile" { 1.2 } else { 0.9 };
        let clicked = rng.random::<f64>() < p;
        writeln!(
            out,
            r#"{{"ts_ms":{},"ad_id":"ad-{ad:05}","campaign_id":"camp-{:03}","label_id":"{i}:ad-{ad:05}","position":{pos},"context":{{"query_category":"{cat}","geo":"{geo}","device":"{device}","hour":"{hour}"}},"clicked":{clicked}}}"#,
            1_760_000_000_000u64 + i * 5,
            ad % 500
        )?;
    }
    out.flush()
}
