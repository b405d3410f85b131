//! The join step in-process (issue #4): serves and clicks, already decoded, through one
//! `PartitionJoin`, labels out. Run: `cargo bench -p ctr-feedback --bench join`
//!
//! Also prints the resident memory per pending serve, measured as RSS growth while a million
//! serves (3 ads each) wait in one join.

// `criterion_group!` defines an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ctr_feedback::join::{JoinConfig, PartitionJoin};
use ctr_schemas::{AdShown, Click, Context, Serve};

const T0: i64 = 1_760_000_000_000;

fn serve(i: i64) -> Serve {
    Serve {
        serve_id: 1_000_000 + i,
        ts_ms: T0 + i / 10,
        context: Context {
            query_category: "electronics".into(),
            geo: "US".into(),
            device: "mobile".into(),
            extra: Default::default(),
        },
        ads: (0..3)
            .map(|k| AdShown {
                ad_id: format!("ad-{:05}", (i * 7 + k * 13) % 10_000),
                campaign_id: format!("camp-{:04}", (i + k) % 500),
                position: k as i32 + 1,
                bid: 1.0,
            })
            .collect(),
    }
}

/// 100k serves (10,000 per event-time second) and a click on 3% of them, 0.5–3 s later, in
/// event-time order: about 103k events.
fn stream() -> Vec<Result<Serve, Click>> {
    let mut events: Vec<(i64, Result<Serve, Click>)> = Vec::new();
    for i in 0..100_000i64 {
        let s = serve(i);
        if i % 33 == 0 {
            let ts = s.ts_ms + 500 + (i % 25) * 100;
            events.push((
                ts,
                Err(Click {
                    click_id: i + 1,
                    serve_id: s.serve_id,
                    ad_id: s.ads[0].ad_id.clone(),
                    ts_ms: ts,
                }),
            ));
        }
        events.push((s.ts_ms, Ok(s)));
    }
    events.sort_by_key(|e| e.0);
    events.into_iter().map(|e| e.1).collect()
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn memory_per_pending_serve() {
    let cfg = JoinConfig {
        window_ms: i64::MAX / 4,
        max_pending: usize::MAX,
        ..JoinConfig::default()
    };
    let serves: Vec<Serve> = (0..1_000_000).map(serve).collect();
    let before = rss_bytes();
    let mut j = PartitionJoin::new(cfg, 0);
    let mut out = Vec::new();
    for s in serves {
        j.on_serve(s, 0, &mut out);
    }
    let after = rss_bytes();
    eprintln!(
        "join: {} pending serves of 3 ads, {:.0} bytes of resident memory per pending serve",
        j.pending(),
        (after.saturating_sub(before)) as f64 / j.pending() as f64
    );
    black_box(&j);
}

fn join(c: &mut Criterion) {
    memory_per_pending_serve();
    let events = stream();
    let cfg = JoinConfig {
        window_ms: 30_000,
        grace_ms: 5_000,
        ..JoinConfig::default()
    };
    let mut g = c.benchmark_group("join");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.sample_size(10);
    g.bench_function("events", |b| {
        b.iter_batched(
            || events.clone(),
            |events| {
                let mut j = PartitionJoin::new(cfg, 0);
                let mut out = Vec::with_capacity(1024);
                let mut labels = 0usize;
                for e in events {
                    match e {
                        Ok(s) => j.on_serve(s, 0, &mut out),
                        Err(c) => j.on_click(c, 0, &mut out),
                    }
                    labels += out.len();
                    out.clear();
                }
                j.advance(i64::MAX / 2, &mut out);
                black_box(labels + out.len())
            },
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, join);
criterion_main!(benches);
